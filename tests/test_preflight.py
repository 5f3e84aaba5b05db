"""What a run checks before its first step, and what it reports when it stops.

Data that does not fit the tokenizer (ids past its vocabulary, whether inside the padded
embedding or past it), an empty dataset, a split without one sample, and an output that cannot
be written are each one error line before the engine is built, and nothing is written. After
non-finite steps, the stop report names the last checkpoint saved before the first of them and
says what was checked of it; a log window of skipped steps says so instead of ``lm loss: nan``.
Training runs are tiny (2 layers, d=64, seq 32, fp32) in subprocesses with timeouts."""

import json
import math
import os
import subprocess
import sys
from argparse import Namespace

import numpy
import pytest
from test_data_support import write_jsonl
from test_training import MOCK, ROOT, TINY, run

from an_megatron.data import DataError, build_tokenizer, build_train_valid_test_datasets, check_indexed_dataset
from an_megatron.data import indexed as indexed_module
from an_megatron.data.arguments import data_error_message
from an_megatron.data.config import DataConfig
from an_megatron.data.indexed import STATS_SUFFIX, CompactIndexedDatasetBuilder, token_id_range
from an_megatron.data.merge import merge_datasets
from an_megatron.data.preprocess import preprocess
from an_megatron.training.metrics import MetricsSink, console_line
from an_megatron.training.pretrain import EXIT_DIVERGED

FP32 = ["--deepspeed_config", "examples/ds_fp32.json"]
SMALL = [*TINY, *FP32, "--micro-batch-size", "2", "--global-batch-size", "2"]
SEQ = 32  # TINY's --seq-length


def null_corpus(directory, name, documents, vocab_size=500):
    """`documents` (lists of ids) preprocessed with NullTokenizer of `vocab_size` ids (+ eod)."""
    corpus = write_jsonl(os.path.join(directory, f"{name}.jsonl"), [{"text": " ".join(map(str, d))} for d in documents])
    args = Namespace(tokenizer_type="NullTokenizer", vocab_size=vocab_size)
    preprocess([corpus], ["text"], args, os.path.join(directory, name), append_eod=True)
    return os.path.join(directory, f"{name}_text_document")


def documents(count, length=100, top=499, seed=0):
    """`count` documents of random ids below 300, the first holding `top`."""
    rng = numpy.random.default_rng(seed)
    docs = [rng.integers(0, 300, length).tolist() for _ in range(count)]
    docs[0][5] = top
    return docs


def build(prefixes, vocab_size, split="90,10,0", seq_length=SEQ):
    """The datasets as training builds them, with a NullTokenizer of `vocab_size`; a DataError
    comes back as the line the command line prints."""
    config = DataConfig(
        data_path=tuple(prefixes),
        split=split,
        tokenizer_type="NullTokenizer",
        vocab_size=vocab_size,
        seq_length=seq_length,
        data_cache_path=os.path.join(os.path.dirname(prefixes[-1]), "cache"),
    )
    try:
        return build_train_valid_test_datasets(config, build_tokenizer(config), [8, 4, 4])
    except DataError as e:
        return data_error_message(e)


# ---- the tokenizer against the data ------------------------------------------------------------


def test_preprocessing_records_the_largest_id_and_the_tokenizer(tmp_path):
    prefix = null_corpus(tmp_path, "c", documents(4))
    stats = json.load(open(prefix + STATS_SUFFIX))
    assert stats["max_token_id"] == 500  # the end-of-document id of NullTokenizer 500
    assert stats["tokenizer"] == {"type": "NullTokenizer", "model": None, "vocab_size": 501}
    found = token_id_range(check_indexed_dataset(prefix))
    assert found.max_token_id == 500 and found.describe().startswith("recorded when it was preprocessed")
    # a merge carries the largest id and the shared tokenizer over
    merged = str(tmp_path / "merged")
    other = null_corpus(tmp_path, "d", documents(2, top=7), vocab_size=500)
    merge_datasets([prefix, other], merged)
    assert json.load(open(merged + STATS_SUFFIX))["max_token_id"] == 500
    assert json.load(open(merged + STATS_SUFFIX))["tokenizer"] == stats["tokenizer"]
    # with a part of unknown largest id the merge records none, and removes the one it replaces
    os.remove(other + STATS_SUFFIX)
    merge_datasets([prefix, other], merged)
    assert not os.path.exists(merged + STATS_SUFFIX)
    assert token_id_range(check_indexed_dataset(merged)).describe() == "found in all 606 tokens"


@pytest.mark.parametrize("vocab_size", [400, 100])  # ids inside the padded embedding (512), past it (128)
def test_ids_past_the_vocabulary_are_refused(tmp_path, vocab_size):
    prefix = null_corpus(tmp_path, "c", documents(20))
    error = build([prefix], vocab_size)
    assert error == (
        f"--data-path {prefix}: token ids up to 500 (recorded when it was preprocessed with NullTokenizer, "
        f"vocab size 501), but the tokenizer (--tokenizer-type NullTokenizer --vocab-size {vocab_size}) has "
        f"{vocab_size + 1} ids (0 to {vocab_size}): the data was preprocessed with another tokenizer"
    )
    assert not (tmp_path / "cache").exists()  # refused before megatron-core builds any index


def test_a_tokenizer_of_another_size_whose_ids_fit_is_warned_about(tmp_path, capsys):
    prefix = null_corpus(tmp_path, "c", documents(20))
    assert isinstance(build([prefix], 600), tuple)  # ids up to 500 fit 601: trained, with a warning
    assert (
        f"warning: {prefix}: its token ids fit, but it was recorded when it was preprocessed with "
        f"NullTokenizer, vocab size 501, and the tokenizer of this run has 601 ids"
    ) in capsys.readouterr().out.splitlines()
    assert isinstance(build([prefix], 500), tuple)  # the same tokenizer: nothing to say
    assert "warning" not in capsys.readouterr().out


def test_without_a_stats_file_the_ids_are_scanned(tmp_path, monkeypatch):
    prefix = null_corpus(tmp_path, "c", documents(20, top=499), vocab_size=600)
    os.remove(prefix + STATS_SUFFIX)  # as Megatron-LM's preprocessing leaves it
    assert build([prefix], 400).startswith(
        f"--data-path {prefix}: token ids up to 600 (found in all 2020 tokens), but the tokenizer"
    )
    # a stats file that describes other data (the pair was rewritten since) is not believed
    json.dump(
        dict(format="an_megatron token stats", num_tokens=5, num_documents=1, bin_bytes=10, max_token_id=3),
        open(prefix + STATS_SUFFIX, "w"),
    )
    assert "(found in all 2020 tokens)" in build([prefix], 400)
    # a .bin larger than the scan budget is sampled, and the message says so
    monkeypatch.setattr(indexed_module, "SCAN_BYTES", 256)
    monkeypatch.setattr(indexed_module, "SCAN_PIECES", 4)
    found = token_id_range(check_indexed_dataset(prefix))
    assert (
        found.partial
        and found.scanned == 128
        and found.describe() == "found in 128 of its 2020 tokens (a partial scan)"
    )


def test_every_prefix_of_a_blend_is_checked(tmp_path):
    good = null_corpus(tmp_path, "good", documents(20, top=7), vocab_size=300)
    bad = null_corpus(tmp_path, "bad", documents(20, top=450), vocab_size=500)
    assert isinstance(build([good], 300), tuple)  # fits: built
    error = build(["0.5", good, "0.5", bad], 300)
    assert isinstance(error, str) and error.startswith(f"--data-path {bad}: token ids up to 500"), error


@pytest.mark.timeout(200)
def test_training_refuses_data_of_another_tokenizer_before_the_engine(tmp_path):
    prefix = null_corpus(tmp_path, "c", documents(20))
    out = run(
        [
            *SMALL,
            "--train-iters",
            "2",
            "--lr",
            "1e-3",
            "--data-path",
            prefix,
            "--data-cache-path",
            str(tmp_path / "cache"),
            "--tokenizer-type",
            "NullTokenizer",
            "--vocab-size",
            "400",
            "--save",
            str(tmp_path / "ck"),
        ],
        timeout=180,
    )
    assert out.returncode == 1, (out.stdout + out.stderr)[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"--data-path {prefix}: token ids up to 500" in errors[0], out.stderr[-3000:]
    assert "--tokenizer-type NullTokenizer --vocab-size 400" in errors[0]
    assert "Traceback" not in out.stderr and "training angpt" not in out.stdout
    assert not (tmp_path / "ck").exists()


# ---- empty data, splits without a sample ----------------------------------------------------------


def test_a_dataset_without_tokens_is_refused(tmp_path):
    prefix = str(tmp_path / "empty_text_document")
    builder = CompactIndexedDatasetBuilder(prefix + ".bin", dtype=numpy.uint16)  # as an older tool could
    builder.finalize(prefix + ".idx")
    assert build([prefix], 500) == f"--data-path {prefix}: holds no tokens (0 documents): nothing to train on"


def test_a_split_without_one_sample_is_refused_or_dropped(tmp_path):
    # 20 documents of 11 tokens: a 10% split holds 2 documents, 22 tokens, under one sample of 32 + 1
    prefix = null_corpus(tmp_path, "c", documents(20, length=10, top=5))
    assert build([prefix], 500, split="90,10,0") == (
        f"--split 90,10,0: the validation split of {prefix} gets 2 of its 20 documents, 22 tokens, fewer "
        f"than one sample (--seq-length 32 + 1): give it a larger share (or 0 for none)"
    )
    assert build([prefix], 500, split="10,90,0").startswith("--split 10,90,0: the train split of")
    train, valid, test = build([prefix], 500, split="80,15,5")  # a test split that small is dropped
    assert train is not None and valid is not None and test is None


# ---- outputs that cannot be written ---------------------------------------------------------------

UNWRITABLE = {  # flag, path, the error after "error: " (/proc takes no new file, even for root)
    "save": ("--save", "/proc/an_megatron_ck", "--save /proc/an_megatron_ck: cannot write in /proc"),
    "metrics": ("--metrics-file", "/proc/m.jsonl", "--metrics-file /proc/m.jsonl: cannot write in /proc"),
    "cache": ("--data-cache-path", "/proc/cache", "--data-cache-path /proc/cache: cannot write in /proc"),
    "tensorboard": ("--tensorboard-dir", "/proc/tb", "--tensorboard-dir /proc/tb: cannot write in /proc"),
}


@pytest.mark.timeout(200)
@pytest.mark.parametrize("case", UNWRITABLE)
def test_an_output_that_cannot_be_written_is_refused_before_anything_starts(case, tmp_path):
    flag, path, message = (s.format(tmp=tmp_path) for s in UNWRITABLE[case])
    if flag == "--tensorboard-dir":
        pytest.importorskip("torch.utils.tensorboard")
    out = run([*SMALL, *MOCK, "--train-iters", "2", "--lr", "1e-3", flag, path], timeout=180)
    assert out.returncode == 1, (out.stdout + out.stderr)[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {message} ("), errors
    assert "Traceback" not in out.stderr and "training angpt" not in out.stdout


# ---- non-finite steps: the log and the stop report -----------------------------------------------

# Training as examples/pretrain_angpt.py runs it, with an infinite gradient injected into one
# parameter at the iterations in BAD (the loss stays finite): DeepSpeed's own overflow check
# skips those steps.
INJECT = """
import math, sys
from an_megatron.training import pretrain as p
BAD = {int(i) for i in sys.argv[1].split(",")}
init = p.Trainer.__init__
def patched(self, *args, **kwargs):
    init(self, *args, **kwargs)
    param = next(self.model.parameters())
    param.register_hook(lambda g: g * math.inf if self.iteration + 1 in BAD else g)
p.Trainer.__init__ = patched
sys.exit(p.pretrain(sys.argv[2:]))
"""


@pytest.mark.timeout(300)
def test_skipped_steps_are_reported_as_such_and_the_stop_names_the_checkpoint_before_them(tmp_path):
    ck, metrics = tmp_path / "ck", tmp_path / "m.jsonl"
    flags = [*SMALL, *MOCK, "--train-iters", "10", "--lr", "1e-3", "--log-interval", "2"]
    flags += ["--max-nonfinite-steps", "3", "--save", str(ck), "--save-interval", "2", "--metrics-file", str(metrics)]
    out = subprocess.run(
        [sys.executable, "-c", INJECT, "3,4,5", *flags], capture_output=True, text=True, timeout=280, cwd=ROOT
    )
    assert out.returncode == EXIT_DIVERGED, (out.stdout + out.stderr)[-3000:]
    lines = {
        int(line.split()[1].split("/")[0]): line for line in out.stdout.splitlines() if line.startswith(" iteration")
    }
    assert "lm loss: skipped (2 of 2 iterations)" in lines[4], lines[4]  # 3 and 4: no loss to show
    assert "number of skipped iterations:   2 | number of nan iterations:   0" in lines[4]
    assert "lm loss: nan" not in out.stdout and "grad norm: inf" in lines[4]  # the injected gradient's norm
    rs = [json.loads(line) for line in open(metrics)]
    four = next(r for r in rs if r["iteration"] == 4)
    assert (
        four["lm_loss"] is None
        and four["grad_norm"] is None
        and four["window_skipped_iterations"] == 2
        and four["nan_iterations"] == 0
    )
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: 3 consecutive steps with a non-finite loss or gradient (iterations 3 to 5); stopping. "
        f"Last checkpoint saved before the first of them: {ck / 'iter_0000002'} (checked when saved: its step's "
        "loss and gradient norm and its weights' norm were finite)"
    ], out.stderr[-3000:]
    assert open(ck / "latest").read().strip() == "iter_0000002"


@pytest.mark.timeout(300)
def test_a_resumed_run_that_saved_nothing_names_the_checkpoint_it_loaded(tmp_path):
    ck = tmp_path / "ck"
    flags = [*SMALL, *MOCK, "--train-iters", "6", "--lr", "1e-3"]
    first = run([*flags, "--save", str(ck), "--exit-interval", "2"], timeout=200)
    assert first.returncode == 0, first.stderr[-3000:]
    out = subprocess.run(
        [sys.executable, "-c", INJECT, "3,4", *flags, "--load", str(ck), "--max-nonfinite-steps", "2"],
        capture_output=True,
        text=True,
        timeout=200,
        cwd=ROOT,
    )
    assert out.returncode == EXIT_DIVERGED, (out.stdout + out.stderr)[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: 2 consecutive steps with a non-finite loss or gradient (iterations 3 to 4); stopping. "
        f"No checkpoint was saved in this run before the first of them; it started from --load {ck} (iteration 2)"
    ], out.stderr[-3000:]


def test_console_line_of_a_window_without_an_applied_step():
    record = dict(
        iteration=4,
        train_iters=10,
        consumed_samples=8,
        step_time_s=0.1,
        lr=1e-3,
        global_batch_size=2,
        lm_loss=None,
        window_iterations=3,
        grad_norm=None,
        params_norm=math.inf,
        tokens_per_sec=1.0,
        tflops_per_device=0.0,
        skipped_iterations=3,
        nan_iterations=1,
    )
    line = console_line(record)
    assert "lm loss: skipped (3 of 3 iterations)" in line
    assert "grad norm: n/a" in line and "params norm: inf" in line  # unknown, and non-finite


def test_metrics_file_records_non_finite_values_as_null(tmp_path):
    sink = MetricsSink(str(tmp_path / "m.jsonl"), None, active=True)
    sink.write(dict(iteration=1, lm_loss=math.nan, params_norm=math.inf, lr=1e-3))
    sink.close()
    text = (tmp_path / "m.jsonl").read_text()
    assert json.loads(text) == dict(iteration=1, lm_loss=None, params_norm=None, lr=1e-3), text
