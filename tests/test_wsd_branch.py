"""Branching a run from an earlier checkpoint (--ckpt-step), as WSD cool-downs are branched from a
constant-rate run, and --full-validation (the same validation samples at every evaluation)."""

import json
import os
import random
import subprocess
import sys

import pytest

from an_megatron.optim.schedules import learning_rate
from tests.test_training import MOCK, ROOT, TINY, run

COMMON = ["--deepspeed_config", "examples/ds_fp32.json", "--micro-batch-size", "2", "--global-batch-size", "2", *TINY]
LR = 1e-3


def records(path):
    with open(path) as f:
        return {r["iteration"]: r for r in map(json.loads, f) if "lm_loss" in r}


@pytest.mark.timeout(400)
def test_a_cooldown_branched_from_an_earlier_step_continues_it_exactly(tmp_path):
    stable, branch = tmp_path / "stable", tmp_path / "branch"
    out = run(
        [*COMMON, *MOCK, "--lr", str(LR), "--lr-decay-style", "constant", "--train-iters", "8"]
        + ["--save", str(stable), "--save-interval", "4", "--metrics-file", str(tmp_path / "stable.jsonl")]
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert open(stable / "latest").read().strip() == "iter_0000008"
    cooldown = ["--lr-decay-style", "wsd", "--lr-decay-iters", "8", "--lr-wsd-decay-iters", "3"]
    out = run(
        [*COMMON, *MOCK, "--lr", str(LR), *cooldown, "--train-iters", "8", "--load", str(stable), "--ckpt-step", "4"]
        + ["--save", str(branch), "--metrics-file", str(tmp_path / "branch.jsonl")]
    )
    assert out.returncode == 0, out.stderr[-2000:]
    a, b = records(tmp_path / "stable.jsonl"), records(tmp_path / "branch.jsonl")
    assert sorted(b) == [5, 6, 7, 8]  # resumed after step 4, not 8
    # Weights, optimizer state and data position of step 4: the same losses while the rate is
    # the same (steps 5 and 6 at LR; step 7's loss is computed before its lower-rate update).
    for it in (5, 6, 7):
        assert b[it]["lm_loss"] == pytest.approx(a[it]["lm_loss"], rel=1e-6), it
    assert abs(b[8]["lm_loss"] - a[8]["lm_loss"]) > 1e-7  # step 7 used the cool-down's rate
    expected = [
        learning_rate(it - 1, lr=LR, min_lr=0.0, warmup_iters=0, decay_iters=8, style="wsd", wsd_decay_iters=3)
        for it in (5, 6, 7, 8)
    ]
    assert [b[it]["lr"] for it in (5, 6, 7, 8)] == pytest.approx(expected)
    assert expected[0] == LR and expected[-1] < LR / 2
    assert open(branch / "latest").read().strip() == "iter_0000008"
    assert open(stable / "latest").read().strip() == "iter_0000008"  # the source is untouched


@pytest.mark.timeout(300)
def test_ckpt_step_refusals(tmp_path):
    stable = tmp_path / "stable"
    out = run([*COMMON, *MOCK, "--lr", str(LR), "--train-iters", "4", "--save", str(stable), "--save-interval", "2"])
    assert out.returncode == 0, out.stderr[-2000:]
    before = sorted(os.listdir(stable))
    # branching into the source directory would replace its later checkpoints
    out = run(
        [*COMMON, *MOCK, "--lr", str(LR), "--train-iters", "4", "--load", str(stable), "--ckpt-step", "2"]
        + ["--save", str(stable)]
    )
    assert out.returncode == 1 and "would replace its later checkpoints (iter_0000004)" in out.stderr
    out = run([*COMMON, *MOCK, "--lr", str(LR), "--train-iters", "4", "--load", str(stable), "--ckpt-step", "3"])
    assert out.returncode == 1
    assert (
        "--ckpt-step 3: --load" in out.stderr
        and "has no iter_0000003 (it has: iter_0000002, iter_0000004)" in out.stderr
    )
    out = run([*COMMON, *MOCK, "--lr", str(LR), "--train-iters", "4", "--ckpt-step", "2"])
    assert out.returncode == 2 and "error: --ckpt-step needs --load DIR" in out.stderr
    assert sorted(os.listdir(stable)) == before
    for result in (out,):
        assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def id_corpus(tmp_path_factory):
    """A small preprocessed corpus of random ids (NullTokenizer), with a validation split."""
    d = tmp_path_factory.mktemp("ids")
    rng = random.Random(0)
    with open(d / "docs.jsonl", "w") as f:
        for _ in range(300):
            f.write(
                json.dumps({"text": " ".join(str(rng.randrange(255)) for _ in range(rng.randrange(20, 80)))}) + "\n"
            )
    subprocess.run(
        [sys.executable, "tools/preprocess_data.py", "--input", str(d / "docs.jsonl"), "--json-keys", "text"]
        + [
            "--tokenizer-type",
            "NullTokenizer",
            "--vocab-size",
            "255",
            "--output-prefix",
            str(d / "ids"),
            "--append-eod",
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=120,
    )
    return str(d / "ids_text_document")


def val_losses(path):
    with open(path) as f:
        return [r["val_loss"] for r in map(json.loads, f) if "val_loss" in r]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("full", [True, False])
def test_full_validation_evaluates_the_same_samples_each_time(tmp_path, id_corpus, full):
    # A learning rate so small the weights do not move: only the samples can change the loss.
    metrics = tmp_path / "m.jsonl"
    args = [*COMMON, "--data-path", id_corpus, "--split", "80,20,0", "--tokenizer-type", "NullTokenizer"]
    args += ["--vocab-size", "255", "--lr", "1e-12", "--train-iters", "4", "--eval-interval", "2"]
    out = run(args + ["--metrics-file", str(metrics)] + (["--full-validation"] if full else []))
    assert out.returncode == 0, out.stderr[-2000:]
    first, *rest = val_losses(metrics)
    assert len(rest) == 1
    if full:
        assert rest[0] == pytest.approx(first, abs=1e-6)
    else:  # successive batches of the split: different samples, a different loss
        assert abs(rest[0] - first) > 1e-3
