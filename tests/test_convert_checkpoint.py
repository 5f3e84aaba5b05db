"""Checkpoint conversion: TP=2, PP=2 and DP=2 ZeRO-3 checkpoints consolidate to the weights of one
process trained the same way (fp32, no clipping: the layouts train identically); a consolidated
checkpoint written for TP=2 and loaded with --no-load-optim continues where the source left off;
broken inputs give one-line errors naming the file.

One single-process reference run (4 iterations, saved at 3 and 4) and three 2-process runs
(3 iterations) are shared by the whole module. A constant learning rate makes the first three
steps the same whatever --train-iters is.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from test_training import MOCK, ROOT, TINY, losses, run

# lr 1e-3: Adam turns rounding noise in near-zero gradients into weight noise of order lr * 1e-3,
# so TP=2 stays well inside 1e-5 of one process, while 3 steps move weights by ~1e-3.
COMMON = [
    "--micro-batch-size",
    "2",
    "--global-batch-size",
    "8",
    "--lr",
    "1e-3",
    "--lr-decay-style",
    "constant",
    "--clip-grad",
    "0",
    *TINY,
    *MOCK,
]
TORCHRUN = ["torchrun", "--nproc_per_node", "2"]
LAYOUTS = {
    "tp2-zero1": ["--deepspeed_config", "examples/ds_fp32.json", "--tensor-model-parallel-size", "2"],
    "pp2-zero0": ["--deepspeed_config", "{zero0}", "--pipeline-model-parallel-size", "2"],
    "dp2-zero3": ["--deepspeed_config", "{zero3}"],
}
ENV = {"PYTHONPATH": ROOT}  # the entry points import the checkout's packages


def _tool(*args):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, **ENV},
    )


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("convert")
    (d / "zero0.json").write_text('{"zero_optimization": {"stage": 0}}')
    (d / "zero3.json").write_text('{"zero_optimization": {"stage": 3}}')
    out = run(
        COMMON
        + [
            "--deepspeed_config",
            "examples/ds_fp32.json",
            "--train-iters",
            "4",
            "--save-interval",
            "3",
            "--save",
            str(d / "ref"),
            "--metrics-file",
            str(d / "ref.jsonl"),
        ],
        env=ENV,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    for name, flags in LAYOUTS.items():
        flags = [f.format(zero0=d / "zero0.json", zero3=d / "zero3.json") for f in flags]
        out = run(COMMON + flags + ["--train-iters", "3", "--save", str(d / name)], launcher=TORCHRUN, env=ENV)
        assert out.returncode == 0, (name, (out.stdout + out.stderr)[-3000:])
    (d / "bf16.json").write_text('{"bf16": {"enabled": true}, "zero_optimization": {"stage": 1}}')
    out = run(
        COMMON
        + [
            "--deepspeed_config",
            str(d / "bf16.json"),
            "--pipeline-model-parallel-size",
            "2",
            "--train-iters",
            "3",
            "--save",
            str(d / "pp2-zero1-bf16"),
        ],
        launcher=TORCHRUN,
        env=ENV,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    return d


@pytest.fixture(scope="module")
def reference(ckpts):
    from an_megatron.training.convert import consolidate

    return consolidate(str(ckpts / "ref"), "iter_0000003")


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_consolidated_layout_equals_single_process(layout, ckpts, reference):
    from an_megatron.training.convert import consolidate

    got = consolidate(str(ckpts / layout))
    tp, pp, dp, zero = {"tp2-zero1": (2, 1, 1, 1), "pp2-zero0": (1, 2, 1, 0), "dp2-zero3": (1, 1, 2, 3)}[layout]
    assert (
        got["source"]["tensor_model_parallel_size"],
        got["source"]["pipeline_model_parallel_size"],
        got["source"]["data_parallel_size"],
        got["source"]["zero_stage"],
    ) == (tp, pp, dp, zero)
    assert got["iteration"] == 3 and got["config"] == reference["config"]
    assert got["config"]["tensor_model_parallel_size"] == 1
    assert all(t.dtype == torch.float32 for t in got["model"].values())
    assert _max_diff(got["model"], reference["model"]) < 1e-5


@pytest.mark.timeout(120)
def test_bf16_consolidates_the_fp32_masters(ckpts):
    """PP=2 ZeRO-1 bf16: the result is ZeRO's fp32 masters (mapped from the pipeline's names), which
    round to exactly the bf16 weights the model holds, and are not themselves bf16 values."""
    from an_megatron.training.checkpointing import gpt_state_dict_from_layer_files
    from an_megatron.training.convert import consolidate

    got = consolidate(str(ckpts / "pp2-zero1-bf16"))
    assert got["source"]["bf16"] and got["source"]["zero_stage"] == 1
    module = gpt_state_dict_from_layer_files(str(ckpts / "pp2-zero1-bf16" / "iter_0000003"), 2)
    assert all(w.dtype == torch.float32 and torch.equal(w.bfloat16(), module[k]) for k, w in got["model"].items())
    assert max((w - w.bfloat16().float()).abs().max().item() for w in got["model"].values()) > 1e-4


@pytest.mark.timeout(120)
def test_tolerance_is_meaningful(ckpts, reference):
    """One more training step moves the weights far beyond the 1e-5 the layouts are held to."""
    from an_megatron.training.convert import consolidate

    assert _max_diff(consolidate(str(ckpts / "ref"))["model"], reference["model"]) > 1e-4


@pytest.mark.timeout(600)
def test_round_trip_to_tp2_continues_the_source_run(ckpts, tmp_path):
    """ref iter 3 -> consolidated (CLI) -> TP=2 weights-only checkpoint -> TP=2 run: its loss at
    iteration 4 is the reference's (computed on the same weights and batch)."""
    out = _tool(
        "consolidate", "--load", str(ckpts / "ref"), "--tag", "iter_0000003", "--output", str(tmp_path / "model.pt")
    )
    assert out.returncode == 0, out.stderr[-3000:]
    out = _tool(
        "reshard",
        "--input",
        str(tmp_path / "model.pt"),
        "--save",
        str(tmp_path / "tp2"),
        "--target-tensor-model-parallel-size",
        "2",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    meta = json.loads((tmp_path / "tp2" / "iter_0000003" / "an_megatron.json").read_text())
    assert meta["weights_only"] and meta["model_config"]["tensor_model_parallel_size"] == 2
    assert sorted(os.listdir(tmp_path / "tp2" / "iter_0000003")) == [
        "an_megatron.json",
        "mp_rank_00_model_states.pt",
        "mp_rank_01_model_states.pt",
    ]
    from an_megatron.training.convert import consolidate, load_consolidated

    source, back = load_consolidated(str(tmp_path / "model.pt")), consolidate(str(tmp_path / "tp2"))
    assert source["model"].keys() == back["model"].keys()
    assert all(torch.equal(source["model"][k], back["model"][k]) for k in source["model"])  # stage 0: exact

    flags = COMMON + [
        "--deepspeed_config",
        "examples/ds_fp32.json",
        "--train-iters",
        "4",
        "--load",
        str(tmp_path / "tp2"),
    ]
    # A layout other than the checkpoint's, or no --no-load-optim: one clear line, no DeepSpeed traceback.
    refused = run(flags, env=ENV)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert (
        f"error: --load {tmp_path / 'tp2'}: iter_0000003 was saved with TP=2 PP=1, this run is TP=1 PP=1: "
        f"convert it with tools/convert_checkpoint.py reshard"
    ) in refused.stderr.splitlines()

    refused = run(flags + ["--tensor-model-parallel-size", "2"], launcher=TORCHRUN, env=ENV)
    assert (
        refused.returncode != 0
        and (
            f"error: --load {tmp_path / 'tp2'}: iter_0000003 holds weights only "
            f"(written by tools/convert_checkpoint.py): add --no-load-optim"
        )
        in refused.stderr.splitlines()
    )
    out = run(
        flags + ["--tensor-model-parallel-size", "2", "--no-load-optim", "--metrics-file", str(tmp_path / "m.jsonl")],
        launcher=TORCHRUN,
        env=ENV,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    got, want = losses(tmp_path / "m.jsonl"), losses(ckpts / "ref.jsonl")
    assert list(got) == [4]
    assert got[4] == pytest.approx(want[4], rel=1e-5), (got, want)
    assert got[4] != pytest.approx(want[1], rel=1e-3)  # not the untrained model's loss

    # measure_norms reads the converted checkpoint (and the consolidated file) as well
    norms = [
        subprocess.run(
            [sys.executable, os.path.join(ROOT, "tools", "measure_norms.py"), "--load", str(src), "--json"],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
            env={**os.environ, **ENV},
        )
        for src in (tmp_path / "tp2", tmp_path / "model.pt")
    ]
    assert all(r.returncode == 0 for r in norms), norms[0].stderr[-2000:] + norms[1].stderr[-2000:]
    records = [[json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")] for r in norms]
    assert records[0] == records[1] and {r["name"] for r in records[0]} >= {"tap_h_mlp", "embedding.tap_out"}


@pytest.mark.timeout(120)
def test_errors_name_the_file(ckpts, tmp_path):
    from an_megatron.training.convert import ConvertError, consolidate, load_consolidated

    broken = tmp_path / "tp2"
    shutil.copytree(ckpts / "tp2-zero1", broken)
    missing = broken / "iter_0000003" / "zero_pp_rank_0_mp_rank_01_optim_states.pt"
    missing.unlink()
    with pytest.raises(ConvertError, match=f"^{re.escape(str(missing))}: missing$"):
        consolidate(str(broken))
    garbage = broken / "iter_0000003" / "mp_rank_00_model_states.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ConvertError, match=f"^{re.escape(str(garbage))}: cannot be read"):
        consolidate(str(broken))

    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(ConvertError, match=f"^{re.escape(str(tmp_path / 'other.pt'))}: not a consolidated checkpoint"):
        load_consolidated(str(tmp_path / "other.pt"))
    out = _tool("reshard", "--input", str(tmp_path / "nope.pt"), "--save", str(tmp_path / "out"))
    assert out.returncode == 1 and out.stderr.strip() == f"error: {tmp_path / 'nope.pt'}: missing"
