"""The test harness's device switch (tests/distributed.py): the choice from the GPU count and
AN_MEGATRON_TEST_DEVICE, what a spawned world gets, and what pytest does with a forced choice."""

import os
import subprocess
import sys

import distributed
import pytest
import torch
from distributed import DEVICE_ENV, DeviceUnavailable, choose_device, run_distributed

from an_megatron.parallel import groups

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "ranks,gpus,requested,expected",
    [
        (1, 0, None, "cpu"),  # automatic: no GPU
        (1, 1, None, "cuda"),  # automatic: one process, one GPU
        (2, 1, None, "cpu"),  # automatic: too few GPUs for the ranks
        (2, 2, None, "cuda"),
        (4, 2, None, "cpu"),
        (4, 8, "", "cuda"),  # set but empty: automatic
        (1, 8, "cpu", "cpu"),  # forced CPU, whatever the GPUs
        (2, 2, "cpu", "cpu"),
        (1, 1, "cuda", "cuda"),
        (2, 4, "cuda", "cuda"),
    ],
)
def test_choice_from_gpu_count_and_request(ranks, gpus, requested, expected):
    assert choose_device(ranks, gpus, requested) == expected


@pytest.mark.parametrize("ranks,gpus", [(1, 0), (2, 1), (4, 2)])
def test_forced_cuda_with_too_few_gpus_names_both_counts(ranks, gpus):
    with pytest.raises(DeviceUnavailable) as e:
        choose_device(ranks, gpus, "cuda")
    assert str(e.value).startswith(f"{DEVICE_ENV}=cuda: needs {ranks} GPU")
    assert str(e.value).endswith(f"this machine has {gpus}")


@pytest.mark.parametrize("bad", ["gpu", "CUDA", "cuda:0", "auto"])
def test_unknown_request_is_refused_naming_it(bad):
    with pytest.raises(ValueError, match=f"^{DEVICE_ENV}='{bad}': must be cpu, cuda, or unset"):
        choose_device(1, 1, bad)


def _rank_device_and_backend():
    import torch.distributed as dist

    from an_megatron.parallel import initialize_parallel

    initialize_parallel(1, 1)
    seen = torch.tensor([1.0], device=distributed.current_device())
    dist.all_reduce(seen)  # the process group works on this device
    set_by_harness = distributed._RANK_DEVICE is not None  # not the pytest process's fallback
    device = str(distributed.current_device())
    return device, dist.get_backend(), os.environ["DS_ACCELERATOR"], seen.item(), set_by_harness


def _on_this_machine(ranks):
    """What the switch must pick here for ``ranks`` without a request."""
    return "cuda" if distributed.gpu_count() >= ranks else "cpu"


@pytest.mark.timeout(180)
@pytest.mark.parametrize("requested", [None, "cpu"])
def test_two_rank_world_gets_the_device_and_backend(monkeypatch, requested):
    """Automatic (here: CPU and gloo when the machine has fewer than 2 GPUs) and forced CPU:
    each rank's device, its process group's backend and DeepSpeed's accelerator agree."""
    if requested is None:
        monkeypatch.delenv(DEVICE_ENV, raising=False)
    else:
        monkeypatch.setenv(DEVICE_ENV, requested)
    kind = requested or _on_this_machine(2)
    ranks = run_distributed(_rank_device_and_backend, 2)
    expected = [(f"cuda:{r}" if kind == "cuda" else "cpu", "nccl" if kind == "cuda" else "gloo") for r in range(2)]
    assert [r[:2] for r in ranks] == expected
    assert [r[2:] for r in ranks] == [(kind, 2.0, True)] * 2


@pytest.mark.timeout(60)
def test_forced_cuda_without_enough_gpus_skips_the_world(monkeypatch):
    if distributed.gpu_count() >= 2:
        pytest.skip("this machine has 2 GPUs: forced cuda runs the world")
    monkeypatch.setenv(DEVICE_ENV, "cuda")
    with pytest.raises(pytest.skip.Exception, match=f"needs 2 GPUs .*, this machine has {distributed.gpu_count()}"):
        run_distributed(_rank_device_and_backend, 2)


def test_single_process_device_fixture(device, monkeypatch):
    assert device.type == ("cpu" if os.environ.get(DEVICE_ENV) == "cpu" else _on_this_machine(1))
    monkeypatch.setenv(DEVICE_ENV, "cpu")
    assert distributed.current_device() == torch.device("cpu")


def test_tf32_is_off():
    assert not torch.backends.cuda.matmul.allow_tf32
    assert not torch.backends.cudnn.allow_tf32


def test_default_backend_follows_deepspeed_accelerator(monkeypatch):
    """The training entry point's backend: DS_ACCELERATOR=cpu means gloo even with GPUs."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert groups.default_backend() == "gloo"
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    assert groups.default_backend() == ("nccl" if torch.cuda.is_available() else "gloo")
    monkeypatch.delenv("DS_ACCELERATOR")
    assert groups.default_backend() == ("nccl" if torch.cuda.is_available() else "gloo")


def test_more_processes_than_gpus_is_refused_naming_local_rank(monkeypatch):
    count = torch.cuda.device_count()
    monkeypatch.setenv("LOCAL_RANK", str(count))
    with pytest.raises(RuntimeError, match=f"^LOCAL_RANK {count} but this node has {count} GPU"):
        groups._set_local_gpu()


def test_launched_training_runs_follow_the_switch():
    """conftest points DeepSpeed's accelerator (and so the launched runs' backend) at the device
    for their 2 processes, stated here as the rule rather than by calling the switch again: CPU
    when asked for, or when nothing is asked and there are fewer than 2 GPUs; else cuda (with
    AN_MEGATRON_TEST_DEVICE=cuda even without the GPUs, so that such runs fail loudly)."""
    requested, gpus = os.environ.get(DEVICE_ENV) or None, distributed.gpu_count()
    expected = "cpu" if requested == "cpu" or (requested is None and gpus < 2) else "cuda"
    assert os.environ["DS_ACCELERATOR"] == expected


def _pytest(*args, env):
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
        env={**os.environ, **env},
    )


@pytest.mark.timeout(300)
def test_forced_cuda_in_a_pytest_run_skips_with_the_reason():
    """AN_MEGATRON_TEST_DEVICE=cuda on a machine without GPUs: the device tests are skipped, each
    with the reason; tests that need no device still run."""
    if distributed.gpu_count() >= 2:
        pytest.skip("this machine has GPUs for both worlds")
    out = _pytest(
        "-rs",
        "tests/test_norm_bound.py::test_row_parallel_rows_use_the_whole_norm",
        "tests/test_norm_bound.py::test_normalize_rows_and_columns",
        "tests/test_device_switch.py::test_tf32_is_off",
        env={DEVICE_ENV: "cuda"},
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert f"{DEVICE_ENV}=cuda: needs 2 GPUs (one per rank), this machine has {distributed.gpu_count()}" in out.stdout
    if distributed.gpu_count() == 0:
        assert f"{DEVICE_ENV}=cuda: needs 1 GPU (one per rank), this machine has 0" in out.stdout
        assert "1 passed, 2 skipped" in out.stdout, out.stdout[-2000:]
    assert f"test device: {DEVICE_ENV}=cuda" in out.stdout


@pytest.mark.timeout(120)
def test_unknown_value_stops_pytest_with_one_line():
    out = _pytest("tests/test_device_switch.py::test_tf32_is_off", env={DEVICE_ENV: "gpu"})
    assert out.returncode == 4  # pytest's usage error
    assert f"ERROR: {DEVICE_ENV}='gpu': must be cpu, cuda, or unset (automatic)" in out.stderr, out.stderr[-2000:]
