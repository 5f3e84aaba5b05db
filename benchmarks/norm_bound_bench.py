"""Time the norm bound inside DeepSpeed's optimizer step (ZeRO-1, DP=2 by default).

The bound runs as a step post-hook on the inner optimizer; this script brackets it with two
more post-hooks (one registered before it, one after), so the bound's own time is measured
without adding anything to its code path. It reports, per training iteration, the time in the
bound, in ``engine.step()`` and in the whole iteration (forward, backward, step), then removes
the bound and times the same iterations without it. "floor" is one norm pass and one scaling
pass over as many fp32 elements as this rank's masters, with views instead of index tensors:
what the bound's local math would cost at memory speed; "bound / floor" is how far the bound
is from it (its all-reduces and per-parameter work included).

    python benchmarks/norm_bound_bench.py                      # spawns 2 ranks on gloo (CPU)
    python benchmarks/norm_bound_bench.py --hidden-size 256 --zero-stage 2
"""

from __future__ import annotations

import argparse
import os
import queue as queue_module
import statistics
import time

import torch
import torch.multiprocessing as mp

from an_megatron.parallel.groups import free_port, local_rank_env


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--zero-stage", type=int, default=1)
    p.add_argument("--arch", default="angpt")
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=512)
    p.add_argument("--num-attention-heads", type=int, default=8)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument(
        "--cpu-time",
        action="store_true",
        help="time by each rank's CPU time instead of wall time (leaves out waiting for a core on a "
        "shared machine, and for the other ranks in all-reduces)",
    )
    return p.parse_args(argv)


CLOCK = time.perf_counter  # a rank's clock: wall time, or CPU time with --cpu-time


class _Stopwatch:
    """Sums the time between its ``start`` and ``stop`` hooks (bracketing the bound's hook)."""

    def __init__(self, sync):
        self.sync, self.total, self._t0 = sync, 0.0, None

    def start(self, *_):
        self.sync()
        self._t0 = CLOCK()

    def stop(self, *_):
        self.sync()
        self.total += CLOCK() - self._t0


def _timed_iters(engine, batches, watch, sync):
    """Per iteration: (iteration s, engine.step s, bound s)."""
    rows = []
    for tokens in batches:
        watch.total = 0.0
        sync()
        t0 = CLOCK()
        loss = engine(tokens[:, :-1], tokens[:, 1:])
        engine.backward(loss)
        sync()
        t1 = CLOCK()
        engine.step()
        sync()
        t2 = CLOCK()
        rows.append((t2 - t0, t2 - t1, watch.total))
    return rows


def _floor_ms(numel: int, width: int, reps: int = 10) -> float:
    """A floor for the bound's local math: one norm pass and one scaling pass over ``numel``
    fp32 elements as rows of ``width`` (views, no index tensors), median ms."""
    rows = torch.randn(numel // width, width)
    times = []
    for _ in range(reps + 1):
        t0 = CLOCK()
        scales = 1.0 / torch.linalg.vector_norm(rows, dim=1).clamp_min(1.0)
        rows.mul_(scales.unsqueeze(1))
        times.append(CLOCK() - t0)
    return 1e3 * statistics.median(times[1:])


def _rank_main(rank, args, port):
    global CLOCK
    CLOCK = time.process_time if args.cpu_time else time.perf_counter
    os.environ.update(local_rank_env(rank, args.world_size, port))
    torch.set_num_threads(args.threads)
    import logging

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from an_megatron.model import GPTModel, ModelConfig
    from an_megatron.optim.deepspeed_bound import register_norm_bound
    from an_megatron.parallel import DeepSpeedMPU, destroy_parallel, dp_size, initialize_parallel

    deepspeed.utils.logger.setLevel(logging.WARNING)
    try:
        initialize_parallel(1, 1)
        torch.manual_seed(0)
        config = ModelConfig(
            arch=args.arch,
            num_layers=args.num_layers,
            hidden_size=args.hidden_size,
            num_attention_heads=args.num_attention_heads,
            vocab_size=args.vocab_size,
            seq_length=args.seq_length,
        )
        model = GPTModel(config)
        ds_config = {
            "train_micro_batch_size_per_gpu": args.micro_batch_size,
            "train_batch_size": args.micro_batch_size * dp_size(),
            "gradient_clipping": 0.0,
            "zero_optimization": {"stage": args.zero_stage},
            "steps_per_print": 10**9,
        }
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3), config=ds_config, mpu=DeepSpeedMPU
        )
        sync = get_accelerator().synchronize
        watch = _Stopwatch(sync)
        inner = engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer") else engine.optimizer
        hooks = [inner.register_step_post_hook(watch.start)]
        bound = register_norm_bound(engine)
        hooks.append(inner.register_step_post_hook(watch.stop))

        gen = torch.Generator().manual_seed(1 + rank)
        n = args.warmup + args.iters
        batches = torch.randint(0, args.vocab_size, (2 * n, args.micro_batch_size, args.seq_length + 1), generator=gen)
        with_bound = _timed_iters(engine, batches[:n], watch, sync)[args.warmup :]
        bound.remove()
        without = _timed_iters(engine, batches[n:], watch, sync)[args.warmup :]
        for h in hooks:
            h.remove()
        n_params = sum(p.numel() for p in model.parameters())
        constrained = sum(p.numel() for p in model.parameters() if getattr(p, "norm_constraint", None) is not None)
        local = sum(t.numel() for g in inner.param_groups for t in g["params"])  # this rank's masters
        return dict(
            mode=bound.mode,
            with_bound=with_bound,
            without=without,
            n_params=n_params,
            constrained=constrained,
            local=local,
            floor_ms=_floor_ms(local, args.hidden_size),
        )
    finally:
        destroy_parallel()


def _worker(rank, args, port, queue):
    queue.put((rank, _rank_main(rank, args, port)))


def _median_ms(rows, i):
    return 1e3 * statistics.median(r[i] for r in rows)


def main(argv=None):
    args = parse_args(argv)
    load = os.getloadavg()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, args, port, queue)) for r in range(args.world_size)]
    for p in procs:
        p.start()
    results = {}
    while len(results) < len(procs):  # a rank that dies (its traceback is on stderr) ends the run
        try:
            rank, result = queue.get(timeout=1.0)
            results[rank] = result
        except queue_module.Empty:
            if any(p.exitcode not in (None, 0) for p in procs):
                for p in procs:
                    p.kill()
                raise SystemExit("a rank failed; see its traceback above")
    for p in procs:
        p.join()
    r0 = results[0]
    print(
        f"mode {r0['mode']}, ZeRO-{args.zero_stage}, DP={args.world_size}, {args.arch} L={args.num_layers} "
        f"d={args.hidden_size} H={args.num_attention_heads} V={args.vocab_size} T={args.seq_length} "
        f"micro-batch {args.micro_batch_size}; {r0['n_params'] / 1e6:.2f}M parameters, "
        f"{r0['constrained'] / 1e6:.2f}M constrained; median of {args.iters} iterations per rank "
        f"({'CPU' if args.cpu_time else 'wall'} time, {args.threads} thread(s) per rank)"
    )
    print(f"load average before: {load[0]:.2f}, after: {os.getloadavg()[0]:.2f} (1 min)")
    print(
        "rank | fp32 masters held | bound ms | engine.step ms | iteration ms | bound / step | bound / iteration "
        "| step ms without bound | iteration ms without bound | floor ms | bound / floor"
    )
    for rank in sorted(results):
        res = results[rank]
        w, wo = res["with_bound"], res["without"]
        bound, step, it = (_median_ms(w, i) for i in (2, 1, 0))
        print(
            f"{rank} | {res['local'] / 1e6:.2f}M | {bound:.2f} | {step:.2f} | {it:.1f} | {bound / step:.1%} "
            f"| {bound / it:.2%} | {_median_ms(wo, 1):.2f} | {_median_ms(wo, 0):.1f} | {res['floor_ms']:.2f} "
            f"| {bound / res['floor_ms']:.2f}x"
        )


if __name__ == "__main__":
    main()
