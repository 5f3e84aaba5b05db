"""Process groups: one place that starts torch.distributed and megatron-core's ``parallel_state``.

Rank order is DeepSpeed's ``PipeModelDataParallelTopology`` (tensor fastest, then data, then
pipe), which is also megatron-core's default order ``tp-cp-ep-dp-pp``. With TP=2, PP=2 on four
ranks the tensor groups are [0,1],[2,3] and the pipeline groups [0,2],[1,3], so the topology we
hand DeepSpeed (``deepspeed_topology``) and megatron-core's groups describe the same layout.

Everything else asks this module (or megatron-core's ``parallel_state``, which it fills) for
ranks and groups; nothing else creates process groups.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now, for a world of local processes."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_rank_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    """What a launcher (``deepspeed``, ``torchrun``) sets for ``rank`` of ``world_size`` local
    processes, and ``initialize_parallel`` reads: for tests, tools and benchmarks that spawn
    their own ranks."""
    return dict(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank)
    )


def default_backend() -> str:
    """nccl when this process has a GPU, gloo otherwise (CPU development and CI).

    ``DS_ACCELERATOR`` set to anything but ``cuda`` (DeepSpeed's own switch, which also places
    the engine's tensors) means gloo: ``DS_ACCELERATOR=cpu`` runs on CPU on a GPU machine."""
    if os.environ.get("DS_ACCELERATOR", "cuda") != "cuda":
        return "gloo"
    return "nccl" if torch.cuda.is_available() else "gloo"


def _set_local_gpu() -> None:
    """One GPU per process: ``cuda:LOCAL_RANK``. More processes on a node than GPUs is refused
    in one line instead of failing inside NCCL."""
    local_rank, count = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
    if local_rank >= count:
        raise RuntimeError(
            f"LOCAL_RANK {local_rank} but this node has {count} GPU(s): start at most one process per GPU "
            "(or run on CPU with DS_ACCELERATOR=cpu)"
        )
    torch.cuda.set_device(local_rank)


def initialize_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    backend: str | None = None,
    timeout_minutes: int = 10,
) -> None:
    """Start torch.distributed (if needed) and megatron-core's TP x PP x DP groups.

    Reads the launcher's RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT (``deepspeed`` and
    ``torchrun`` both set them); without them it starts a one-process world, so single-process
    tools and tests use the same code path. Calling it again with the same sizes is a no-op.
    """
    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    if not dist.is_initialized():
        backend = backend or default_backend()
        if backend == "nccl":
            _set_local_gpu()
        timeout = datetime.timedelta(minutes=timeout_minutes)
        if "RANK" in os.environ:
            dist.init_process_group(backend=backend, timeout=timeout)
        else:  # not launched: a one-process world, without touching the environment
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    world = dist.get_world_size()
    if world % (tp * pp) != 0:
        raise ValueError(
            f"world size {world} is not divisible by tensor-model-parallel-size {tp} "
            f"x pipeline-model-parallel-size {pp}"
        )
    if parallel_state.model_parallel_is_initialized():
        if (
            parallel_state.get_tensor_model_parallel_world_size() == tp
            and parallel_state.get_pipeline_model_parallel_world_size() == pp
        ):
            return
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        distributed_timeout_minutes=timeout_minutes,
        order="tp-cp-ep-dp-pp",
    )


def destroy_parallel() -> None:
    """Tear down megatron-core's groups and torch.distributed (call before exit: gloo can abort
    at interpreter shutdown otherwise)."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


# Thin accessors, so callers need not know megatron-core's names.
def tp_group():
    return parallel_state.get_tensor_model_parallel_group()


def tp_rank() -> int:
    return parallel_state.get_tensor_model_parallel_rank()


def tp_size() -> int:
    return parallel_state.get_tensor_model_parallel_world_size()


def pp_rank() -> int:
    return parallel_state.get_pipeline_model_parallel_rank()


def pp_size() -> int:
    return parallel_state.get_pipeline_model_parallel_world_size()


def dp_group():
    return parallel_state.get_data_parallel_group()


def dp_rank() -> int:
    return parallel_state.get_data_parallel_rank()


def dp_size() -> int:
    return parallel_state.get_data_parallel_world_size()


def deepspeed_topology():
    """DeepSpeed's view of the same layout (axes pipe, data, model; model fastest)."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    return PipeModelDataParallelTopology(num_pp=pp_size(), num_mp=tp_size(), num_dp=dp_size())


class DeepSpeedMPU:
    """The ``mpu`` object ``deepspeed.initialize`` asks for, backed by megatron-core's groups.

    DeepSpeed uses it to reduce gradient norms over model-parallel shards (and to count each
    replicated parameter once) and to find the data-parallel group that ZeRO partitions over.
    """

    get_model_parallel_rank = staticmethod(tp_rank)
    get_model_parallel_world_size = staticmethod(tp_size)
    get_model_parallel_group = staticmethod(tp_group)
    get_tensor_model_parallel_rank = staticmethod(tp_rank)
    get_tensor_model_parallel_world_size = staticmethod(tp_size)
    get_tensor_model_parallel_group = staticmethod(tp_group)
    get_pipeline_model_parallel_rank = staticmethod(pp_rank)
    get_pipeline_model_parallel_world_size = staticmethod(pp_size)
    get_data_parallel_rank = staticmethod(dp_rank)
    get_data_parallel_world_size = staticmethod(dp_size)
    get_data_parallel_group = staticmethod(dp_group)
