"""The training entry point end to end: resume, the README command, refused configurations."""

import json
import os
import subprocess
import sys

import pytest

from an_megatron.training.pretrain import EXIT_DIVERGED

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--num-layers",
    "2",
    "--hidden-size",
    "64",
    "--num-attention-heads",
    "4",
    "--seq-length",
    "32",
    "--num-workers",
    "0",
    "--log-interval",
    "1",
    "--eval-interval",
    "1000",
    "--eval-iters",
    "1",
]
# 255 ids + end of document = 256: the padded vocabulary is 256 for TP=1 and TP=2 alike
MOCK = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "255"]


def run(args, launcher=None, timeout=300, env=None):
    cmd = (launcher or [sys.executable]) + [os.path.join(ROOT, "examples", "pretrain_angpt.py")] + args
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})}
    )


def losses(metrics_file):
    with open(metrics_file) as f:
        return {r["iteration"]: r["lm_loss"] for r in map(json.loads, f) if "lm_loss" in r}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A tokenizer and a preprocessed corpus from the bundled text."""
    d = tmp_path_factory.mktemp("corpus")
    data = os.path.join(ROOT, "examples", "data", "kjv.jsonl.gz")
    subprocess.run(
        [
            sys.executable,
            "tools/train_tokenizer.py",
            "--input",
            data,
            "--json-keys",
            "text",
            "--vocab-size",
            "500",
            "--output-prefix",
            str(d / "tok"),
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=120,
    )
    subprocess.run(
        [
            sys.executable,
            "tools/preprocess_data.py",
            "--input",
            data,
            "--json-keys",
            "text",
            "--tokenizer-type",
            "SentencePieceTokenizer",
            "--tokenizer-model",
            str(d / "tok.model"),
            "--output-prefix",
            str(d / "kjv"),
            "--append-eod",
            "--workers",
            "1",
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=120,
    )
    return d


@pytest.mark.timeout(400)
def test_resume_continues_exactly(tmp_path):
    common = [
        "--deepspeed_config",
        "examples/ds_fp32.json",
        "--micro-batch-size",
        "4",
        "--global-batch-size",
        "8",
        "--train-iters",
        "10",
        "--lr",
        "3e-3",
        *TINY,
        *MOCK,
    ]
    straight = run(common + ["--metrics-file", str(tmp_path / "straight.jsonl")])
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = run(
        common
        + [
            "--exit-interval",
            "5",
            "--save",
            str(tmp_path / "ck"),
            "--save-interval",
            "5",
            "--metrics-file",
            str(tmp_path / "first.jsonl"),
        ]
    )
    assert first.returncode == 0, first.stderr[-3000:]
    second = run(common + ["--load", str(tmp_path / "ck"), "--metrics-file", str(tmp_path / "second.jsonl")])
    assert second.returncode == 0, second.stderr[-3000:]
    assert "exiting at iteration 5 (--exit-interval 5)" in first.stdout
    assert f"loaded checkpoint from {tmp_path / 'ck'} at iteration 5" in second.stdout
    assert sorted(losses(tmp_path / "first.jsonl")) == [1, 2, 3, 4, 5]
    assert sorted(losses(tmp_path / "second.jsonl")) == [6, 7, 8, 9, 10]  # resumes at the next iteration
    want = losses(tmp_path / "straight.jsonl")
    got = {**losses(tmp_path / "first.jsonl"), **losses(tmp_path / "second.jsonl")}
    assert sorted(got) == list(range(1, 11))
    assert got == want  # bit-identical: same data position, optimizer state and schedule


@pytest.mark.timeout(400)
def test_readme_deepspeed_command_on_cpu(corpus, tmp_path):
    out = run(
        [
            "--deepspeed_config",
            "examples/ds.json",
            "--arch",
            "angpt",
            *TINY,
            "--tensor-model-parallel-size",
            "2",
            "--pipeline-model-parallel-size",
            "1",
            "--micro-batch-size",
            "4",
            "--global-batch-size",
            "16",
            "--train-iters",
            "6",
            "--lr",
            "3e-3",
            "--data-path",
            str(corpus / "kjv_text_document"),
            "--split",
            "98,2,0",
            "--tokenizer-type",
            "SentencePieceTokenizer",
            "--tokenizer-model",
            str(corpus / "tok.model"),
            "--save",
            str(tmp_path / "ckpt"),
            "--save-interval",
            "3",
            "--eval-interval",
            "3",
            "--metrics-file",
            str(tmp_path / "ckpt" / "metrics.jsonl"),
        ],
        launcher=["deepspeed", "--num_gpus", "2"],
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    records = [json.loads(line) for line in open(tmp_path / "ckpt" / "metrics.jsonl")]
    train = [r for r in records if "lm_loss" in r]
    evals = [r for r in records if "val_loss" in r]
    assert [r["iteration"] for r in train] == list(range(1, 7))
    for r in train:
        assert {
            "iteration",
            "lm_loss",
            "lr",
            "grad_norm",
            "step_time_s",
            "tokens_per_sec",
            "consumed_tokens",
        } <= r.keys()
    assert [r["iteration"] for r in evals] == [3, 6] and all(r["val_ppl"] > 1 for r in evals)
    assert open(tmp_path / "ckpt" / "latest").read().strip() == "iter_0000006"
    assert "iteration        6/       6" in out.stdout


BATCH = ["--micro-batch-size", "4", "--global-batch-size", "8"]
REFUSED = {  # flags, the message, processes
    "batch-conflict": (
        BATCH + ["--deepspeed_config", "{ds_batch}"],
        "--global-batch-size 8 disagrees with ds.json train_batch_size 32",
        1,
    ),
    "zero2-with-pp": (
        BATCH + ["--deepspeed_config", "examples/ds_zero2.json", "--pipeline-model-parallel-size", "2"],
        "ZeRO stage 2 with --pipeline-model-parallel-size 2",
        2,
    ),
    "tp-heads": (
        BATCH + ["--num-attention-heads", "3", "--hidden-size", "96", "--tensor-model-parallel-size", "2"],
        "tensor-model-parallel-size 2 does not divide num-attention-heads 3",
        2,
    ),
    "missing-data": (BATCH + ["--data-path", "{tmp}/missing_text_document"], "{tmp}/missing_text_document", 1),
    "missing-checkpoint": (
        BATCH + ["--load", "{tmp}/no_such_checkpoint"],
        "--load {tmp}/no_such_checkpoint: no such directory",
        1,
    ),
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", REFUSED)
def test_refused_configurations(case, tmp_path):
    flags, message, nproc = REFUSED[case]
    ds_batch = tmp_path / "ds_batch.json"
    ds_batch.write_text(json.dumps({"train_batch_size": 32}))
    subs = dict(tmp=str(tmp_path), ds_batch=str(ds_batch))
    flags = [f.format(**subs) for f in flags]
    base = [*TINY, "--train-iters", "2", "--lr", "1e-3", "--tokenizer-type", "NullTokenizer", "--vocab-size", "256"]
    if "--data-path" not in flags:
        base.append("--mock-data")
    launcher = ["torchrun", "--nproc_per_node", str(nproc)] if nproc > 1 else None
    out = run(base + flags, launcher=launcher)
    assert out.returncode != 0
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert errors, out.stderr[-3000:]
    assert message.format(**subs) in errors[0], errors


@pytest.mark.timeout(300)
def test_nonfinite_steps_stop_training_and_save_no_checkpoint_of_overflowing_weights(tmp_path):
    # GPT+ (no norm bound) with an absurd learning rate: the first step blows the weights up,
    # then every loss is non-finite and skipped, until the limit stops the run.
    out = run(
        [
            "--arch",
            "gptplus",
            "--deepspeed_config",
            "examples/ds_fp32.json",
            "--micro-batch-size",
            "4",
            "--global-batch-size",
            "8",
            "--train-iters",
            "20",
            "--lr",
            "1e30",
            "--lr-warmup-iters",
            "0",
            "--clip-grad",
            "0",
            "--max-nonfinite-steps",
            "3",
            "--save",
            str(tmp_path / "ck"),
            "--save-interval",
            "1",
            *TINY,
            *MOCK,
        ]
    )
    assert out.returncode == EXIT_DIVERGED, out.stderr[-3000:]
    # Step 1 had a finite loss and gradient but left weights of about 1e30: their squared norm
    # overflows, so that checkpoint is not saved; nothing is saved during the non-finite streak.
    assert "not saving the checkpoint of iteration 1: the weights' norm is inf" in out.stdout
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: 3 consecutive steps with a non-finite loss or gradient (iterations 2 to 4); stopping. "
        "No checkpoint was saved in this run before the first of them"
    ], out.stderr[-3000:]
    assert not (tmp_path / "ck" / "latest").exists() and not list((tmp_path / "ck").glob("iter_*"))
    assert "number of skipped iterations:   3" in out.stdout
