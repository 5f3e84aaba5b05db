"""Parallel layouts through the real entry point: the logged loss of every iteration matches a
single process with the same global batch (fp32, no clipping), so runs compare line by line.

(The engine-level tests, test_deepspeed_bound.py and test_pipeline.py, also compare weights with
the bound acting every step; this one checks what the training loop adds: data sharding across
data-parallel ranks, gradient accumulation, loss averaging, pipeline batch feeding.)
"""

import pytest
from test_training import MOCK, TINY, losses, run


def layout_flags(num_layers: int, train_iters: int, *extra: str) -> list[str]:
    """What every layout run and its single-process reference share: a global batch of 8 in
    micro-batches of 2, fp32, no clipping, mock data."""
    return [
        "--micro-batch-size",
        "2",
        "--global-batch-size",
        "8",
        "--train-iters",
        str(train_iters),
        "--lr",
        "1e-2",
        "--clip-grad",
        "0",
        "--num-layers",
        str(num_layers),
        *extra,
        *TINY[2:],
        *MOCK,
    ]


def single_process_run(tmp_path_factory, common: list[str]):
    """The reference: ``common`` in one process. Returns (the completed process, {iteration: loss})."""
    path = tmp_path_factory.mktemp("ref") / "m.jsonl"
    out = run(common + ["--deepspeed_config", "examples/ds_fp32.json", "--metrics-file", str(path)])
    assert out.returncode == 0, out.stderr[-3000:]
    return out, losses(path)


def assert_ranks_match(args: list[str], reference: dict, iters: int, metrics, nproc: int = 2, timeout: int = 300):
    """``args`` (writing ``metrics``) on ``nproc`` ranks logs the reference's loss at each of
    iterations 1..``iters`` (rel 1e-5). Returns the completed process."""
    out = run(
        args + ["--metrics-file", str(metrics)], launcher=["torchrun", "--nproc_per_node", str(nproc)], timeout=timeout
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    got = losses(metrics)
    assert sorted(got) == sorted(reference) == list(range(1, iters + 1))
    for it in reference:
        assert got[it] == pytest.approx(reference[it], rel=1e-5), (it, got, reference)
    return out


COMMON = layout_flags(2, 5)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return single_process_run(tmp_path_factory, COMMON)[1]


LAYOUTS = {
    "dp2-zero0": ["--deepspeed_config", "{zero0}"],
    "dp2-zero1": ["--deepspeed_config", "examples/ds_fp32.json"],
    "dp2-zero3": ["--deepspeed_config", "{zero3}"],
    "tp2": ["--deepspeed_config", "examples/ds_fp32.json", "--tensor-model-parallel-size", "2"],
    "pp2": ["--deepspeed_config", "{zero0}", "--pipeline-model-parallel-size", "2"],
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_losses_match_single_process(layout, reference, tmp_path):
    (tmp_path / "zero0.json").write_text('{"zero_optimization": {"stage": 0}}')
    (tmp_path / "zero3.json").write_text('{"zero_optimization": {"stage": 3}}')
    flags = [f.format(zero0=tmp_path / "zero0.json", zero3=tmp_path / "zero3.json") for f in LAYOUTS[layout]]
    assert_ranks_match(COMMON + flags, reference, 5, tmp_path / "m.jsonl")
