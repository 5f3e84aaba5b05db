"""Let megatron-core build a blended dataset with a cache path in a process without a group.

Why: megatron-core 0.16.1's ``BlendedDataset`` calls ``torch.distributed.get_rank()`` whenever
a cache path is set, even when torch.distributed is not initialized (``GPTDataset`` checks
``is_initialized()`` first), so a blend with ``--data-cache-path`` fails in single-process tools
and tests. Inside ``single_process_rank_zero()`` ``get_rank`` answers 0 when, and only when, no
process group exists; with one it changes nothing.
"""

import contextlib
from unittest import mock

import torch


@contextlib.contextmanager
def single_process_rank_zero():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        yield
        return
    with mock.patch.object(torch.distributed, "get_rank", lambda group=None: 0):
        yield
