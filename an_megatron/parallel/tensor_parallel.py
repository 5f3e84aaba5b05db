"""Moving between a rank's tensor-parallel shards and the full tensors of the model.

megatron-core marks each sharded parameter with ``tensor_model_parallel``, ``partition_dim``
and ``partition_stride``. A stride ``s`` > 1 means the full tensor is ``s`` logical parts
stacked along ``partition_dim`` (fused Q/K/V: s=3, fused up/gate: s=2), and each rank holds
its slice of every part, in order. Replicated parameters are the same on every rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_tp_sharded(param: torch.Tensor) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


def gather_tp_tensor(local: torch.Tensor, partition_dim: int, stride: int, group) -> torch.Tensor:
    """The full tensor from every rank's ``local`` shard (collective over ``group``)."""
    world = dist.get_world_size(group)
    if world == 1:
        return local.detach().clone()
    shards = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(shards, local.detach().contiguous(), group=group)
    return merge_tp_shards(shards, partition_dim, stride)


def merge_tp_shards(shards: list[torch.Tensor], partition_dim: int, stride: int) -> torch.Tensor:
    """The full tensor from every rank's shard, in rank order (no process group: checkpoint
    conversion reads the shards from files)."""
    parts = [s.chunk(stride, dim=partition_dim) for s in shards]  # parts[rank][j]
    return torch.cat([parts[r][j] for j in range(stride) for r in range(len(shards))], dim=partition_dim)


def shard_tp_tensor(full: torch.Tensor, partition_dim: int, stride: int, rank: int, world: int) -> torch.Tensor:
    """This rank's shard of ``full`` (the inverse of ``gather_tp_tensor``)."""
    parts = full.chunk(stride, dim=partition_dim)
    return torch.cat([p.chunk(world, dim=partition_dim)[rank] for p in parts], dim=partition_dim).clone()
