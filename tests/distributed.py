"""Run a function in N processes on gloo (a hang fails after a timeout instead of blocking CI)."""

from __future__ import annotations

import os
import tempfile
import time
import traceback

import torch
import torch.multiprocessing as mp

from an_megatron.parallel.groups import free_port, local_rank_env
from an_megatron.parallel.tensor_parallel import gather_tp_tensor, is_tp_sharded


def _worker(rank, world_size, port, fn, args, out_dir):
    os.environ.update(local_rank_env(rank, world_size, port))
    torch.set_num_threads(1)
    try:
        result = fn(*args)
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


def run_distributed(fn, world_size: int, *args, timeout: float = 240.0, attempts: int = 3):
    """Call ``fn(*args)`` on ``world_size`` spawned ranks; return the list of their results.

    ``fn`` must be a module-level function; it calls ``initialize_parallel`` itself. The port
    is free when chosen but another process can take it before rank 0 listens on it: then the
    world is started again on a new port.
    """
    for attempt in range(attempts):
        try:
            return _run_once(fn, world_size, args, timeout)
        except _PortTaken:
            if attempt == attempts - 1:
                raise AssertionError(f"no free port for the rendezvous after {attempts} attempts") from None


def _run_once(fn, world_size: int, args, timeout: float):
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(
            _worker,
            args=(world_size, free_port(), fn, args, out_dir),
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
