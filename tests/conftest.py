import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/distributed.py

import distributed  # noqa: E402


def pytest_configure(config):
    """Check the switch once, turn TF32 off, and point launched training runs at the device the
    switch picks for their processes."""
    requested = os.environ.get(distributed.DEVICE_ENV)
    try:
        distributed.choose_device(1, 0, requested)
    except ValueError as e:
        raise pytest.UsageError(str(e)) from None
    except distributed.DeviceUnavailable:
        pass
    distributed.disable_tf32()
    # Tests that start the training command (torchrun, deepspeed) pass this environment on; its
    # device follows DeepSpeed's accelerator and its backend follows that (groups.default_backend).
    # Without enough GPUs for its processes a launched run goes to CPU and gloo; with
    # AN_MEGATRON_TEST_DEVICE=cuda and too few GPUs it is left on cuda and fails (with one GPU, in
    # one line naming LOCAL_RANK).
    try:
        launched = distributed.choose_device(distributed.LAUNCHED_PROCESSES, distributed.gpu_count(), requested)
    except distributed.DeviceUnavailable:
        launched = "cuda"
    os.environ["DS_ACCELERATOR"] = launched


def pytest_report_header(config):
    requested = os.environ.get(distributed.DEVICE_ENV) or "unset (automatic)"
    count = distributed.gpu_count()
    return (
        f"test device: {distributed.DEVICE_ENV}={requested}, {count} GPU(s); one process on "
        f"{_describe(1, count)}, 2 ranks on {_describe(2, count)}, 4 ranks on {_describe(4, count)}; "
        f"launched training runs: DS_ACCELERATOR={os.environ.get('DS_ACCELERATOR')}"
    )


def _describe(ranks: int, count: int) -> str:
    try:
        device = distributed.choose_device(ranks, count, os.environ.get(distributed.DEVICE_ENV))
    except distributed.DeviceUnavailable:
        return "skipped"
    return f"{device}/{distributed.backend_for(device)}" if ranks > 1 else device


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu"):  # the marker, not any keyword (a parameter named gpu)
            item.add_marker(skip)


@pytest.fixture
def device():
    """Where a single-process test puts its model and inputs: the GPU when there is one (see
    tests/distributed.py for the switch)."""
    return distributed.current_device()


@pytest.fixture
def single_process(device):
    """A one-process world with TP=PP=1 (megatron-core's layers need parallel_state), on the
    backend of the test's device."""
    from an_megatron.parallel import destroy_parallel, initialize_parallel

    initialize_parallel(1, 1, backend=distributed.backend_for(device.type))
    yield
    destroy_parallel()
