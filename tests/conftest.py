import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/distributed.py


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def single_process():
    """A one-process world with TP=PP=1 (megatron-core's layers need parallel_state)."""
    from an_megatron.parallel import destroy_parallel, initialize_parallel

    initialize_parallel(1, 1)
    yield
    destroy_parallel()
