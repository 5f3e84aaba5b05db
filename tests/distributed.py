"""The test harness's device switch, and running a function in N processes (a hang fails after a
timeout instead of blocking CI).

One switch picks where tests run. A world of N ranks runs each rank on ``cuda:LOCAL_RANK`` over
NCCL when the machine has at least N GPUs, otherwise on CPU over gloo; a single-process test is
a world of one (the GPU when there is one). ``AN_MEGATRON_TEST_DEVICE=cpu`` forces CPU;
``=cuda`` forces GPUs, and a test needing more GPUs than the machine has is skipped, the
reason naming both counts. Tests put their models and inputs on ``current_device()`` (the
``device`` fixture in the pytest process); ``run_distributed`` returns results on the CPU.

TF32 is off wherever tests run (``disable_tf32``): fp32 matmuls on a GPU then round like fp32,
and the equivalence tests keep their fp32 tolerances (``FP32_RTOL``) on every device.
"""

from __future__ import annotations

import os
import tempfile
import time
import traceback

import torch
import torch.multiprocessing as mp

from an_megatron.parallel.groups import free_port, local_rank_env
from an_megatron.parallel.tensor_parallel import gather_tp_tensor, is_tp_sharded

DEVICE_ENV = "AN_MEGATRON_TEST_DEVICE"
# The equivalence tests' fp32 tolerance, elementwise, with an absolute floor of the same times the
# tensor's largest entry: the same on CPU and on a GPU with TF32 off (both round to fp32, only the
# order of the sums differs between layouts).
FP32_RTOL = 1e-5
# Launched runs of the training command (torchrun, deepspeed) start at most this many processes.
LAUNCHED_PROCESSES = 2


class DeviceUnavailable(Exception):
    """``AN_MEGATRON_TEST_DEVICE=cuda`` on a machine with fewer GPUs than the test's ranks."""


def choose_device(ranks: int, gpu_count: int, requested: str | None) -> str:
    """``"cuda"`` or ``"cpu"`` for a world of ``ranks`` processes on a machine with ``gpu_count``
    GPUs. ``requested`` is the value of ``AN_MEGATRON_TEST_DEVICE`` (None or "" when unset)."""
    if requested not in (None, "", "cpu", "cuda"):
        raise ValueError(f"{DEVICE_ENV}={requested!r}: must be cpu, cuda, or unset (automatic)")
    if requested == "cpu":
        return "cpu"
    if gpu_count >= ranks:
        return "cuda"
    if requested == "cuda":
        raise DeviceUnavailable(
            f"{DEVICE_ENV}=cuda: needs {ranks} GPU{'s' if ranks > 1 else ''} (one per rank), "
            f"this machine has {gpu_count}"
        )
    return "cpu"


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def backend_for(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


def device_type_for(ranks: int) -> str:
    """The switch's choice for a world of ``ranks`` on this machine; skips the calling test when
    GPUs are forced and too few (call it from a test, not from a spawned rank)."""
    import pytest

    try:
        return choose_device(ranks, gpu_count(), os.environ.get(DEVICE_ENV))
    except DeviceUnavailable as e:
        pytest.skip(str(e))


def disable_tf32() -> None:
    """fp32 matmuls and convolutions in full fp32 on a GPU (no effect on CPU)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


_RANK_DEVICE: torch.device | None = None  # set in a spawned rank


def current_device() -> torch.device:
    """Where this process's test puts models and inputs: in a rank of ``run_distributed`` its
    ``cuda:LOCAL_RANK`` or the CPU, in the pytest process the choice for one process."""
    if _RANK_DEVICE is not None:
        return _RANK_DEVICE
    return torch.device("cuda", torch.cuda.current_device()) if device_type_for(1) == "cuda" else torch.device("cpu")


def to_cpu(obj):
    """``obj`` with every tensor inside (dicts, lists, tuples) moved to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu() if obj.device.type != "cpu" else obj
    if isinstance(obj, dict):
        return type(obj)((k, to_cpu(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def _worker(rank, world_size, port, device_type, fn, args, out_dir):
    global _RANK_DEVICE
    os.environ.update(local_rank_env(rank, world_size, port))
    # DeepSpeed's switch: its engine places tensors there, and initialize_parallel's default
    # backend follows it (nccl for cuda, gloo for cpu).
    os.environ["DS_ACCELERATOR"] = device_type
    torch.set_num_threads(1)
    disable_tf32()
    if device_type == "cuda":
        torch.cuda.set_device(rank)
        _RANK_DEVICE = torch.device("cuda", rank)
    else:
        _RANK_DEVICE = torch.device("cpu")
    try:
        result = to_cpu(fn(*args))
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        from an_megatron.parallel import destroy_parallel

        destroy_parallel()


class _PortTaken(Exception):
    pass


def run_distributed(fn, world_size: int, *args, timeout: float = 240.0, attempts: int = 3, device: str | None = None):
    """Call ``fn(*args)`` on ``world_size`` spawned ranks; return the list of their results, with
    every tensor on the CPU.

    ``fn`` must be a module-level function; it calls ``initialize_parallel`` itself, whose
    default backend is the switch's (nccl on GPUs, gloo on CPU), and puts its tensors on
    ``current_device()``. ``device="cpu"`` keeps a test that only makes CPU tensors on CPU and
    gloo on any machine; by default the switch chooses (see the module docstring). The port
    is free when chosen but another process can take it before rank 0 listens on it: then the
    world is started again on a new port.
    """
    device_type = device or device_type_for(world_size)
    for attempt in range(attempts):
        try:
            return _run_once(fn, world_size, args, timeout, device_type)
        except _PortTaken:
            if attempt == attempts - 1:
                raise AssertionError(f"no free port for the rendezvous after {attempts} attempts") from None


def _run_once(fn, world_size: int, args, timeout: float, device_type: str):
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(
            _worker,
            args=(world_size, free_port(), device_type, fn, args, out_dir),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        try:
            deadline = time.monotonic() + timeout
            # join returns False whenever one rank finishes while others still run
            while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"distributed test did not finish within {timeout:.0f} s")
        except mp.ProcessRaisedException as e:
            errs = [open(os.path.join(out_dir, f)).read() for f in sorted(os.listdir(out_dir)) if f.endswith(".err")]
            if any("EADDRINUSE" in err for err in errs):
                raise _PortTaken from None
            raise AssertionError("a rank failed:\n" + ("\n".join(errs) or str(e))) from None
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]


def full_named_tensors(module: torch.nn.Module, group, grads: bool = False) -> dict[str, torch.Tensor]:
    """Every parameter (or its gradient) of ``module`` as the full, unsharded tensor."""
    out = {}
    for name, p in module.named_parameters():
        t = p.grad if grads else p.data
        if t is None:
            continue
        if is_tp_sharded(p):
            t = gather_tp_tensor(t, p.partition_dim, p.partition_stride, group)
        out[name] = t.detach().clone()
    return out


def bounded_adam_steps(model: torch.nn.Module, loss_fn, steps: int = 3) -> None:
    """``steps`` Adam steps on ``loss_fn()`` with the norm bound applied after each, starting
    from every matrix pushed 1.5x past the bound, so that the bound acts on all of them.

    Adam's step is ``lr * m / (sqrt(v) + eps)``: for a gradient near zero it multiplies the fp32
    rounding of ``g`` (summed in another order under TP) by ``lr / max(|g|, eps)``. With eps 1e-4
    that stays below the layouts' tolerance; with the default 1e-8 a 1e-9 gradient's last bits
    move a weight by about ``lr``. Layout tests compare the gradients themselves separately."""
    from an_megatron.optim import constrain_parameters_

    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(1.5)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
        constrain_parameters_(model.parameters())
