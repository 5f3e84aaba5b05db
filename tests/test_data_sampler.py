"""The Megatron pretraining sampler: data-parallel layouts see the same global batches, and a
resumed run continues the same sequence."""

import pytest
import torch

from an_megatron.data import DataError, MegatronPretrainingSampler, build_data_loader


class IndexDataset(torch.utils.data.Dataset):
    """Sample i is {'tokens': [i, i], ...}, so batches show which indices they hold."""

    def __init__(self, size):
        self.size = size

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        return {"tokens": torch.tensor([i, i]), "labels": torch.tensor([i, i]), "loss_mask": torch.ones(2)}


def global_batches(total, micro, dp, accumulation, consumed=0):
    """Per step: the sorted indices all ranks consumed over `accumulation` micro-batches."""
    iterators = [iter(MegatronPretrainingSampler(total, consumed, micro, rank, dp)) for rank in range(dp)]
    steps = []
    while True:
        try:
            step = [i for _ in range(accumulation) for it in iterators for i in next(it)]
        except StopIteration:
            return steps
        steps.append(sorted(step))


def test_megatron_order_contiguous_slices_per_rank():
    rank0 = list(MegatronPretrainingSampler(16, 0, 2, 0, 2))
    rank1 = list(MegatronPretrainingSampler(16, 0, 2, 1, 2))
    assert rank0 == [[0, 1], [4, 5], [8, 9], [12, 13]]
    assert rank1 == [[2, 3], [6, 7], [10, 11], [14, 15]]
    assert len(MegatronPretrainingSampler(17, 0, 2, 1, 2)) == 4  # the partial step is dropped


@pytest.mark.parametrize("total", [48, 50])
def test_dp1_and_dp2_see_the_same_global_batches(total):
    # Global batch 8: DP=1 with 4 accumulation steps of 2, DP=2 with 2 steps of 2, DP=4 with 1.
    reference = global_batches(total, 2, 1, 4)
    assert reference == [list(range(s, s + 8)) for s in range(0, total - 7, 8)]
    assert global_batches(total, 2, 2, 2) == reference
    assert global_batches(total, 2, 4, 1) == reference
    assert global_batches(total, 4, 2, 1) == reference


def test_resume_from_consumed_samples_continues_the_sequence():
    full = [batch for rank in range(2) for batch in MegatronPretrainingSampler(40, 0, 2, rank, 2)]
    uninterrupted = {rank: list(MegatronPretrainingSampler(40, 0, 2, rank, 2)) for rank in range(2)}
    resumed = {rank: list(MegatronPretrainingSampler(40, 12, 2, rank, 2)) for rank in range(2)}
    for rank in range(2):
        assert resumed[rank] == uninterrupted[rank][3:]  # 12 consumed = 3 steps of 4
    assert len(full) == 20


def test_data_loader_batches_and_resume():
    dataset = IndexDataset(20)
    loader = build_data_loader(
        dataset, consumed_samples=4, micro_batch_size=2, data_parallel_rank=1, data_parallel_size=2
    )
    batches = list(loader)
    assert [b["tokens"][:, 0].tolist() for b in batches] == [[6, 7], [10, 11], [14, 15], [18, 19]]
    assert batches[0]["tokens"].shape == (2, 2) and set(batches[0]) == {"tokens", "labels", "loss_mask"}
    assert build_data_loader(None, 0, 2, 0, 1) is None


@pytest.mark.parametrize(
    "args, message",
    [
        ((10, 10, 2, 0, 1), "consumed samples 10 must be in [0, 10)"),
        ((10, 0, 2, 2, 2), "data_parallel_rank 2 is outside [0, 2)"),
        ((0, 0, 2, 0, 1), "no samples"),
        ((10, 0, 0, 0, 1), "must be positive"),
    ],
)
def test_sampler_errors(args, message):
    with pytest.raises(DataError) as error:
        MegatronPretrainingSampler(*args)
    assert message in str(error.value)
