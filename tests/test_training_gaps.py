"""What the end-to-end training tests left open: no validation data, the final checkpoint before
anything that can fail, the LR schedules, GPT+'s weight decay, gradient clipping, refused
configurations leaving nothing behind, and --eod-mask-loss.

Runs are tiny (2 layers, d=64, seq 32, a few iterations, fp32). A few tests drive a ``Trainer``
in a child process (``PROBE``) to watch the real optimizer step from inside."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from test_training import MOCK, ROOT, TINY, corpus, run  # noqa: F401  (corpus is a fixture)

from an_megatron.parallel.groups import free_port, local_rank_env

FP32 = ["--deepspeed_config", "examples/ds_fp32.json"]
SMALL = [*TINY, "--micro-batch-size", "2", "--global-batch-size", "2"]


def records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def latest(save_dir):
    with open(os.path.join(save_dir, "latest")) as f:
        return f.read().strip()


def corpus_flags(corpus, tmp_path):
    return [
        "--data-path",
        str(corpus / "kjv_text_document"),
        "--data-cache-path",
        str(tmp_path / "cache"),
        "--tokenizer-type",
        "SentencePieceTokenizer",
        "--tokenizer-model",
        str(corpus / "tok.model"),
    ]


# ---- A. no work lost after the last step ------------------------------------------------------


@pytest.mark.timeout(300)
def test_no_validation_data_skips_evaluation_and_keeps_the_final_checkpoint(corpus, tmp_path):
    ck, metrics = tmp_path / "ck", tmp_path / "m.jsonl"
    out = run(
        [
            *FP32,
            *SMALL,
            "--train-iters",
            "3",
            "--lr",
            "1e-3",
            "--eval-interval",
            "2",
            *corpus_flags(corpus, tmp_path),
            "--split",
            "100,0,0",
            "--save",
            str(ck),
            "--metrics-file",
            str(metrics),
            "--generate-tokens",
            "4",
        ]
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert "Traceback" not in out.stderr
    # two evaluation points (2 and 3), one line
    skipped = [line for line in out.stdout.splitlines() if "evaluation skipped" in line]
    assert skipped == ["evaluation skipped: no validation data (--split 100,0,0)"], out.stdout[-3000:]
    assert latest(ck) == "iter_0000003"
    rs = records(metrics)
    assert [r["iteration"] for r in rs if "lm_loss" in r] == [1, 2, 3]
    assert not [r for r in rs if "val_loss" in r]
    # the final checkpoint comes before the sample
    assert out.stdout.index(f"saved checkpoint {ck / 'iter_0000003'}") < out.stdout.index("--- sample ---")


# Training as examples/pretrain_angpt.py runs it, with the evaluation at the last iteration failing.
FAILING_FINAL_EVALUATION = """
import sys
from an_megatron.training import pretrain as p
evaluate = p.Trainer.evaluate
def failing(self):
    if self.iteration == self.cfg.train_iters:
        raise RuntimeError("simulated failure in the final evaluation")
    return evaluate(self)
p.Trainer.evaluate = failing
sys.exit(p.pretrain(sys.argv[1:]))
"""


@pytest.mark.timeout(300)
def test_final_checkpoint_is_saved_before_the_final_evaluation(tmp_path):
    ck, metrics = tmp_path / "ck", tmp_path / "m.jsonl"
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            FAILING_FINAL_EVALUATION,
            *FP32,
            *SMALL,
            *MOCK,
            "--train-iters",
            "3",
            "--lr",
            "1e-3",
            "--eval-interval",
            "2",
            "--save",
            str(ck),
            "--save-interval",
            "2",
            "--metrics-file",
            str(metrics),
        ],
        capture_output=True,
        text=True,
        timeout=280,
        cwd=ROOT,
    )
    assert out.returncode != 0
    assert "simulated failure in the final evaluation" in out.stderr, out.stderr[-3000:]
    assert latest(ck) == "iter_0000003"  # saved although the evaluation after it failed
    assert (ck / "iter_0000002").is_dir()  # the periodic save still happens
    assert [r["iteration"] for r in records(metrics) if "val_loss" in r] == [2]  # evaluation 2 ran as before


# ---- B2. learning-rate schedules --------------------------------------------------------------


def reference_lr(it, *, lr, min_lr, warmup, decay, style, wsd=None):
    """The schedules as documented, written out phase by phase (0-based iteration ``it``)."""
    if it < warmup:  # linear warm-up; the first step already moves: lr/warmup
        return lr * (it + 1) / warmup
    if style == "constant":
        return lr
    if it >= decay:
        return min_lr
    if style == "wsd":
        length = wsd if wsd is not None else max(1, (decay - warmup) // 10)
        if it < decay - length:
            return lr  # stable
        left = (decay - it) / length  # 1 at the start of the decay, 0 at its end
        return min_lr + left * (lr - min_lr)
    done = (it - warmup) / (decay - warmup)
    if style == "linear":
        return min_lr + (1 - done) * (lr - min_lr)
    return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * done)) / 2


S = dict(lr=1.0, min_lr=0.1, warmup=4, decay=14)  # decay runs over iterations 4..13
ANCHORS = [  # (style, iteration, value by hand)
    ("cosine", 0, 0.25),
    ("cosine", 1, 0.5),
    ("cosine", 3, 1.0),  # start, mid, end of warm-up
    ("cosine", 4, 1.0),
    ("cosine", 9, 0.55),
    ("cosine", 14, 0.1),
    ("cosine", 50, 0.1),
    ("linear", 4, 1.0),
    ("linear", 9, 0.55),
    ("linear", 13, 0.19),
    ("linear", 14, 0.1),
    ("linear", 50, 0.1),
    ("constant", 1, 0.5),
    ("constant", 4, 1.0),
    ("constant", 13, 1.0),
    ("constant", 50, 1.0),
    ("wsd", 1, 0.5),
    ("wsd", 8, 1.0),
    ("wsd", 9, 1.0),
    ("wsd", 11, 0.64),
    ("wsd", 13, 0.28),
    ("wsd", 14, 0.1),
    ("wsd", 50, 0.1),
]


@pytest.mark.parametrize("style,it,value", ANCHORS)
def test_schedule_values(style, it, value):
    from an_megatron.optim.schedules import learning_rate

    wsd = 5 if style == "wsd" else None
    assert reference_lr(it, **S, style=style, wsd=wsd) == pytest.approx(value, abs=1e-12)
    got = learning_rate(
        it,
        lr=S["lr"],
        min_lr=S["min_lr"],
        warmup_iters=S["warmup"],
        decay_iters=S["decay"],
        style=style,
        wsd_decay_iters=wsd,
    )
    assert got == pytest.approx(value, abs=1e-12)


@pytest.mark.parametrize("style", ["cosine", "linear", "constant", "wsd"])
@pytest.mark.parametrize("warmup,min_lr,wsd", [(0, 0.0, None), (3, 0.0, None), (4, 0.1, 5), (1, 0.25, 1)])
def test_schedule_matches_reference_everywhere(style, warmup, min_lr, wsd):
    from an_megatron.optim.schedules import learning_rate

    for it in range(0, 25):
        want = reference_lr(it, lr=2e-3, min_lr=min_lr * 2e-3, warmup=warmup, decay=17, style=style, wsd=wsd)
        got = learning_rate(
            it, lr=2e-3, min_lr=min_lr * 2e-3, warmup_iters=warmup, decay_iters=17, style=style, wsd_decay_iters=wsd
        )
        assert got == pytest.approx(want, rel=1e-12, abs=1e-18), (style, it)


def test_arch_schedule_defaults():
    from an_megatron.training.arguments import parse_args

    def parsed(*flags):
        return parse_args([*SMALL, *MOCK, "--lr", "1e-3", *flags], world_size=1)[0]

    a = parsed("--arch", "gptplus", "--train-iters", "100")
    assert (a.lr_warmup_iters, a.lr_decay_iters, a.lr_decay_style, a.min_lr) == (10, 100, "cosine", 0.0)
    assert parsed("--arch", "gptplus", "--train-iters", "50000").lr_warmup_iters == 2000
    assert parsed("--arch", "angpt", "--train-iters", "100").lr_warmup_iters == 0
    assert parsed("--arch", "ngpt", "--train-iters", "100").lr_warmup_iters == 0
    assert parsed("--arch", "gptplus", "--train-iters", "100", "--lr-warmup-iters", "3").lr_warmup_iters == 3


LR_RUNS = {  # flags, and the reference's parameters: warm-up, cosine to min_lr, then past decay_iters
    "cosine": (
        ["--lr-warmup-iters", "2", "--lr-decay-style", "cosine", "--min-lr", "1e-4", "--lr-decay-iters", "5"],
        dict(warmup=2, decay=5, style="cosine", min_lr=1e-4),
    ),
    "wsd": (
        [
            "--lr-warmup-iters",
            "2",
            "--lr-decay-style",
            "wsd",
            "--lr-wsd-decay-iters",
            "3",
            "--min-lr",
            "1e-4",
            "--lr-decay-iters",
            "6",
        ],
        dict(warmup=2, decay=6, style="wsd", wsd=3, min_lr=1e-4),
    ),
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", LR_RUNS)
def test_training_logs_the_scheduled_lr(case, tmp_path):
    flags, ref = LR_RUNS[case]
    metrics = tmp_path / "m.jsonl"
    out = run([*FP32, *SMALL, *MOCK, "--train-iters", "7", "--lr", "1e-3", *flags, "--metrics-file", str(metrics)])
    assert out.returncode == 0, out.stderr[-3000:]
    lrs = {r["iteration"]: r["lr"] for r in records(metrics) if "lm_loss" in r}
    assert sorted(lrs) == list(range(1, 8))
    # logged iteration k is the k-th step, taken at 0-based iteration k - 1
    want = {k: reference_lr(k - 1, lr=1e-3, **ref) for k in lrs}
    assert lrs == pytest.approx(want, rel=1e-12)
    assert len(set(lrs.values())) >= 4  # warm-up, decay and floor all show


# ---- B3. weight decay ------------------------------------------------------------------------


def _model_and_optimizer(arch, *flags):
    from an_megatron.data import build_tokenizer
    from an_megatron.model import GPTModel
    from an_megatron.optim.optimizer import build_optimizer
    from an_megatron.training.arguments import parse_args

    cfg, _ = parse_args([*SMALL, *MOCK, "--arch", arch, "--train-iters", "10", "--lr", "0.5", *flags], world_size=1)
    vocab = cfg.data.padded_vocab_size(build_tokenizer(cfg.data).vocab_size)  # as training does
    torch.manual_seed(0)
    model = GPTModel(cfg.model_config(vocab))
    return cfg, model, build_optimizer(model, cfg)


def _zero_grad_step(model, optimizer):
    """One optimizer step with zero gradients: Adam's moments stay 0, only weight decay moves."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    return before


def test_gptplus_decays_matrices_only(single_process):
    args, model, opt = _model_and_optimizer("gptplus")
    assert args.weight_decay == 0.1
    decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert len(decay_of) == len(names)  # every parameter is optimized, once
    vectors = [n for n, p in names.items() if p.ndim == 1]
    assert any("norm" in n for n in vectors) and any("qk_norm" in n for n in vectors)  # RMSNorm and QK-norm gains
    for n, p in names.items():
        assert decay_of[id(p)] == (0.1 if p.ndim >= 2 else 0.0), n

    before = _zero_grad_step(model, opt)
    lr, wd = args.lr, args.weight_decay
    for n, p in model.named_parameters():
        if p.ndim >= 2:  # decoupled decay: w <- w - lr * wd * w
            torch.testing.assert_close(p.detach(), before[n] * (1 - lr * wd), rtol=1e-6, atol=0, msg=n)
            assert not torch.equal(p.detach(), before[n]), n
        else:
            assert torch.equal(p.detach(), before[n]), n


@pytest.mark.parametrize("arch", ["angpt", "ngpt"])
def test_normalized_archs_have_no_weight_decay(arch, single_process):
    args, model, opt = _model_and_optimizer(arch)
    assert args.weight_decay == 0.0
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    before = _zero_grad_step(model, opt)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n


def test_explicit_weight_decay_reaches_the_matrices(single_process):
    _, model, opt = _model_and_optimizer("angpt", "--weight-decay", "0.05")
    decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert {decay_of[id(p)] for p in model.parameters() if p.ndim >= 2} == {0.05}
    assert {decay_of[id(p)] for p in model.parameters() if p.ndim == 1} == {0.0}


# ---- B4. gradient clipping (and the LR the optimizer really gets) ------------------------------

# Builds the Trainer as pretrain() does, hooks the inner torch optimizer (the one DeepSpeed
# steps, on its fp32 gradients after clipping) and runs the real training loop.
PROBE = """
import json, os, sys
os.environ.setdefault("LOCAL_RANK", "0")
from an_megatron.parallel import groups
from an_megatron.training.arguments import parse_args
from an_megatron.training.pretrain import Trainer

args, ds = parse_args(sys.argv[2:], world_size=1)
groups.initialize_parallel(1, 1)
trainer = Trainer(args, ds)
opt = trainer.engine.optimizer
inner = getattr(opt, "optimizer", opt)
steps = {}

def hook(o, *_):  # ZeRO steps its groups one at a time: sum over the calls of one iteration
    s = steps.setdefault(trainer.iteration + 1, dict(sq=0.0, lr=[]))
    for g in o.param_groups:
        s["lr"].append(g["lr"])
        s["sq"] += sum(float(p.grad.double().square().sum()) for p in g["params"] if p.grad is not None)

inner.register_step_pre_hook(hook)
trainer.train()
trainer.sink.close()
with open(sys.argv[1], "w") as f:
    json.dump(dict(clipping=trainer.engine.gradient_clipping(), optimizer=type(opt).__name__,
                   steps={k: dict(norm=v["sq"] ** 0.5, lr=v["lr"]) for k, v in steps.items()}), f)
groups.destroy_parallel()
"""


def probe(tmp_path, flags):
    """Run PROBE on ``flags``; returns (its JSON, the metrics records)."""
    result, metrics = tmp_path / "probe.json", tmp_path / "m.jsonl"
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(result), *flags, "--metrics-file", str(metrics)],
        capture_output=True,
        text=True,
        timeout=280,
        cwd=ROOT,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    with open(result) as f:
        return json.load(f), [r for r in records(metrics) if "lm_loss" in r]


def test_clip_grad_reaches_the_deepspeed_config():
    from an_megatron.training.arguments import ConfigError, parse_args

    base = [*SMALL, *MOCK, "--train-iters", "2", "--lr", "1e-3"]
    assert parse_args(base, world_size=1)[1]["gradient_clipping"] == 1.0  # Megatron's default
    assert parse_args(base + ["--clip-grad", "0.25"], world_size=1)[1]["gradient_clipping"] == 0.25
    assert parse_args(base + ["--clip-grad", "0"], world_size=1)[1]["gradient_clipping"] == 0.0
    args, ds = parse_args(base + ["--deepspeed_config", "examples/ds.json"], world_size=1)  # ds.json says 1.0
    assert ds["gradient_clipping"] == args.clip_grad == 1.0
    with pytest.raises(ConfigError, match="--clip-grad 0.5 disagrees with ds.json gradient_clipping 1.0"):
        parse_args(base + ["--deepspeed_config", "examples/ds.json", "--clip-grad", "0.5"], world_size=1)


ZERO0 = {"steps_per_print": 10**9}  # no ZeRO, fp32: DeepSpeed's plain optimizer path
CLIP_CASES = {  # ds.json, --clip-grad, expected optimizer wrapper
    "zero1-clip": ("examples/ds_fp32.json", 1e-3, "DeepSpeedZeroOptimizer"),
    "zero0-clip": (ZERO0, 1e-3, "AdamW"),
    "zero1-no-clip": ("examples/ds_fp32.json", 0.0, "DeepSpeedZeroOptimizer"),
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", CLIP_CASES)
def test_clip_grad_bounds_the_applied_gradient(case, tmp_path):
    ds, clip, wrapper = CLIP_CASES[case]
    if isinstance(ds, dict):
        (tmp_path / "ds.json").write_text(json.dumps(ds))
        ds = str(tmp_path / "ds.json")
    schedule = ["--lr-warmup-iters", "1", "--lr-decay-style", "linear", "--min-lr", "1e-4"]
    got, logged = probe(
        tmp_path,
        [
            "--deepspeed_config",
            ds,
            *SMALL,
            *MOCK,
            "--train-iters",
            "3",
            "--lr",
            "1e-3",
            "--clip-grad",
            str(clip),
            *schedule,
        ],
    )
    assert got["optimizer"] == wrapper
    assert got["clipping"] == clip
    steps = {int(k): v for k, v in got["steps"].items()}
    assert sorted(steps) == [1, 2, 3] and [r["iteration"] for r in logged] == [1, 2, 3]
    for r in logged:
        raw, applied = r["grad_norm"], steps[r["iteration"]]["norm"]
        if clip:
            assert raw > 10 * clip  # the case under test: clipping must act
            assert applied == pytest.approx(clip, rel=1e-4)  # DeepSpeed scales by clip / (norm + 1e-6)
        else:
            assert applied == pytest.approx(raw, rel=1e-5)
        # the optimizer steps with the scheduled LR (not just the one logged)
        want = reference_lr(r["iteration"] - 1, lr=1e-3, min_lr=1e-4, warmup=1, decay=3, style="linear")
        seen = steps[r["iteration"]]["lr"]
        assert seen and all(lr == pytest.approx(want, rel=1e-12) for lr in seen), (seen, want)
        assert r["lr"] == pytest.approx(want, rel=1e-12)


# ---- B5. refused configurations leave nothing behind ------------------------------------------


def run_ranks(args, nproc, timeout=240, env=None):
    """The entry point on ``nproc`` ranks (the launcher's environment, without a launcher whose own
    messages would mix in); returns one CompletedProcess per rank."""
    if nproc == 1:
        return [run(args, timeout=timeout, env=env)]
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "examples", "pretrain_angpt.py"), *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {}), **local_rank_env(r, nproc, port)},
        )
        for r in range(nproc)
    ]
    results = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


BATCH = ["--micro-batch-size", "4", "--global-batch-size", "8"]
REFUSED = {  # flags (after the tiny model and mock data), ds.json written for the case, the message, ranks
    "tp-does-not-divide-heads": (
        ["--num-attention-heads", "3", "--hidden-size", "96", "--tensor-model-parallel-size", "2"],
        None,
        "tensor-model-parallel-size 2 does not divide num-attention-heads 3",
        2,
    ),
    "ds-optimizer-section": (
        [],
        {"optimizer": {"type": "Adam", "params": {"lr": 1e-3}}},
        "--deepspeed_config has an 'optimizer' section; this trainer sets it from --lr/--adam-*/--weight-decay",
        1,
    ),
    "ds-batch-disagrees": (
        [],
        {"train_batch_size": 32},
        "--global-batch-size 8 disagrees with ds.json train_batch_size 32",
        1,
    ),
    "missing-data-prefix": (["--data-path", "{tmp}/missing_text_document"], None, "{tmp}/missing_text_document", 1),
    "zero3-with-pp": (
        ["--deepspeed_config", "examples/ds_zero3.json", "--pipeline-model-parallel-size", "2"],
        None,
        "ZeRO stage 3 with --pipeline-model-parallel-size 2",
        2,
    ),
    "missing-checkpoint": (
        ["--load", "{tmp}/no_such_checkpoint"],
        None,
        "--load {tmp}/no_such_checkpoint: no such directory",
        1,
    ),
    "split-without-training-data": (
        ["--data-path", "{tmp}/missing_text_document", "--split", "0,100,0"],
        None,
        "--split 0,100,0: training gets no data",
        1,
    ),
    # a share too small for any document: megatron-core would loop forever building it
    "empty-validation-split": (
        [
            "--data-path",
            "{corpus}/kjv_text_document",
            "--split",
            "99999,1,0",
            "--data-cache-path",
            "{tmp}/cache",
            "--tokenizer-type",
            "SentencePieceTokenizer",
            "--tokenizer-model",
            "{corpus}/tok.model",
        ],
        None,
        "--split 99999,1,0: the validation split of {corpus}/kjv_text_document gets none of its 1189 documents",
        1,
    ),
    # every rank checks the outputs before anything starts, and all stop with the same line
    "save-not-writable": (
        ["--save", "/dev/null/ck"],
        None,
        "--save /dev/null/ck: would be inside /dev/null, which is not a directory",
        2,
    ),
    # tensorboard made unimportable (NO_TENSORBOARD on PYTHONPATH), installed or not
    "tensorboard-missing": (
        ["--tensorboard-dir", "{tmp}/out/tb"],
        None,
        "--tensorboard-dir {tmp}/out/tb: the tensorboard package is not installed",
        1,
    ),
}
NO_TENSORBOARD = "raise ImportError('tensorboard hidden by the test')\n"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", REFUSED)
def test_refused_configuration_fails_cleanly(case, tmp_path, request):
    flags, ds, message, nproc = REFUSED[case]
    subs = dict(tmp=str(tmp_path))
    if any("{corpus}" in f for f in flags):
        subs["corpus"] = str(request.getfixturevalue("corpus"))
    flags = [f.format(**subs) for f in flags]
    if ds is not None:
        (tmp_path / "ds.json").write_text(json.dumps(ds))
        flags += ["--deepspeed_config", str(tmp_path / "ds.json")]
    out_dir = tmp_path / "out"
    base = [
        *TINY,
        *BATCH,
        "--train-iters",
        "2",
        "--lr",
        "1e-3",
        "--save",
        str(out_dir),
        "--save-interval",
        "1",
        "--metrics-file",
        str(out_dir / "m.jsonl"),
    ]
    if "--tokenizer-type" not in flags:
        base += ["--tokenizer-type", "NullTokenizer", "--vocab-size", "255"]
    if "--data-path" not in flags:
        base.append("--mock-data")
    env = None
    if "--tensorboard-dir" in flags:
        (tmp_path / "shim" / "tensorboard").mkdir(parents=True)
        (tmp_path / "shim" / "tensorboard" / "__init__.py").write_text(NO_TENSORBOARD)
        env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "shim"), os.environ.get("PYTHONPATH", "")])}
    for rank, out in enumerate(run_ranks(base + flags, nproc, env=env)):
        assert out.returncode != 0, (rank, out.stdout[-2000:])
        errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message.format(**subs) in errors[0], (rank, out.stderr[-3000:])
        assert "Traceback" not in out.stderr, (rank, out.stderr[-3000:])
    assert not out_dir.exists(), sorted(os.listdir(out_dir))  # no checkpoint, latest, metrics or events


@pytest.mark.timeout(120)  # megatron-core used to loop forever here
def test_a_test_split_without_documents_is_dropped(corpus, tmp_path):
    from an_megatron.data import build_tokenizer, build_train_valid_test_datasets
    from an_megatron.training.arguments import parse_args

    # the test share rounds to no document of the corpus's 1189 (the default 969,30,1 does so
    # for any corpus under 500 documents); training never reads the test split
    args, _ = parse_args(
        [*SMALL, "--train-iters", "1", "--lr", "1e-3", *corpus_flags(corpus, tmp_path), "--split", "969,30,0.1"],
        world_size=1,
    )
    train, valid, test = build_train_valid_test_datasets(args.data, build_tokenizer(args.data), [16, 8, 8])
    assert len(train) >= 16 and len(valid) >= 8 and test is None


# ---- B6. --eod-mask-loss ------------------------------------------------------------------------


def _train_dataset(corpus, tmp_path, *flags):
    from an_megatron.data import build_tokenizer, build_train_valid_test_datasets
    from an_megatron.training.arguments import parse_args

    args, _ = parse_args(
        [*SMALL, "--train-iters", "1", "--lr", "1e-3", *corpus_flags(corpus, tmp_path), "--split", "100,0,0", *flags],
        world_size=1,
    )
    tokenizer = build_tokenizer(args.data)
    train, valid, _ = build_train_valid_test_datasets(args.data, tokenizer, [256, 0, 0])
    assert valid is None
    return train, tokenizer.eod, args.data.padded_vocab_size(tokenizer.vocab_size)


def test_eod_mask_loss(corpus, tmp_path, single_process):
    from an_megatron.model.gpt import lm_loss

    masked, eod, vocab = _train_dataset(corpus, tmp_path, "--eod-mask-loss")
    plain, eod_plain, _ = _train_dataset(corpus, tmp_path)
    assert eod == eod_plain
    with_eod = []
    for i in range(256):
        m, p = masked[i], plain[i]
        assert torch.equal(m["tokens"], p["tokens"]) and torch.equal(m["labels"], p["labels"])  # same samples
        assert torch.equal(m["tokens"][1:], m["labels"][:-1])  # labels are the next tokens
        # megatron-core: no loss where the input token is the end of document (the prediction of
        # the next document's first token from across the boundary); 1 everywhere else
        assert torch.equal(m["loss_mask"], (m["tokens"] != eod).float()), i
        assert torch.equal(p["loss_mask"], torch.ones_like(p["loss_mask"])), i
        if (m["tokens"] == eod).any():
            with_eod.append(m)
    assert len(with_eod) >= 3  # the check above was not vacuous
    eod_as_label = sum(int(((s["labels"] == eod) & (s["loss_mask"] == 1)).sum()) for s in with_eod)
    assert eod_as_label >= 1  # predicting the end of document itself stays in the loss

    # lm_loss with that mask: the mean over unmasked positions only
    torch.manual_seed(0)
    tokens = torch.stack([s["tokens"] for s in with_eod])
    labels = torch.stack([s["labels"] for s in with_eod])
    mask = torch.stack([s["loss_mask"] for s in with_eod])
    logits = torch.randn(*labels.shape, vocab)
    keep = mask.bool()
    want = torch.nn.functional.cross_entropy(logits[keep], labels[keep])
    torch.testing.assert_close(lm_loss(logits, labels, mask), want, rtol=1e-6, atol=1e-6)
    changed = logits.clone()
    changed[~keep] = torch.randn_like(changed[~keep]) * 10  # masked positions do not count
    torch.testing.assert_close(lm_loss(changed, labels, mask), want, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(lm_loss(changed, labels), lm_loss(logits, labels))  # but would without the mask
    assert int((tokens == eod).sum()) == int((~keep).sum())
