"""Megatron's pretraining batch sampler and the DataLoader built on it.

Samples are consumed in index order, one micro-batch per data-parallel rank per step: of each
run of micro_batch_size * data_parallel_size consecutive indices, rank r takes the contiguous
slice [r * micro_batch_size, (r + 1) * micro_batch_size). Over a global batch (those runs times
the gradient-accumulation steps), every layout therefore sees the same samples, and resuming
from a number of consumed samples continues the same sequence.
"""

from __future__ import annotations

import torch

from an_megatron.data.errors import DataError


class MegatronPretrainingSampler:
    """Batch sampler yielding this rank's micro-batches of dataset indices (drop_last semantics)."""

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
    ) -> None:
        if total_samples <= 0:
            raise DataError(f"the dataset has no samples (total_samples={total_samples})")
        if micro_batch_size <= 0 or data_parallel_size <= 0:
            raise DataError(
                f"micro_batch_size ({micro_batch_size}) and data_parallel_size ({data_parallel_size}) must be positive"
            )
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise DataError(f"data_parallel_rank {data_parallel_rank} is outside [0, {data_parallel_size})")
        if not 0 <= consumed_samples < total_samples:
            raise DataError(
                f"consumed samples {consumed_samples} must be in [0, {total_samples}) "
                f"(the dataset has {total_samples} samples; build it for more)"
            )
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.step_size = micro_batch_size * data_parallel_size

    def __len__(self) -> int:
        """Micro-batches this rank will yield."""
        return (self.total_samples - self.consumed_samples) // self.step_size

    def __iter__(self):
        first = self.data_parallel_rank * self.micro_batch_size
        last_full_step = self.total_samples - self.step_size
        for step_start in range(self.consumed_samples, last_full_step + 1, self.step_size):
            start = step_start + first
            yield list(range(start, start + self.micro_batch_size))


def build_data_loader(
    dataset,
    consumed_samples: int,
    micro_batch_size: int,
    data_parallel_rank: int,
    data_parallel_size: int,
    num_workers: int = 0,
) -> torch.utils.data.DataLoader | None:
    """A DataLoader over `dataset` (a GPTDataset or blend) for this data-parallel rank.

    Batches are dicts of stacked tensors as GPTDataset returns them: at least 'tokens', 'labels'
    (both [micro_batch_size, seq_length], int64), 'loss_mask' (float) and 'position_ids'.
    Returns None for a missing dataset (e.g. an empty test split).
    """
    if dataset is None:
        return None
    sampler = MegatronPretrainingSampler(
        len(dataset), consumed_samples, micro_batch_size, data_parallel_rank, data_parallel_size
    )
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
    )
