#!/usr/bin/env python
"""Peak activation memory of a training step on CPU, measured, against ``training/memory.py``'s estimate.

    python benchmarks/memory.py                      # the two configurations below, every mode
    python benchmarks/memory.py --configs small --modes none
    python benchmarks/memory.py --configs small --time-interleaved 5   # step time of each mode

Each (configuration, recomputation mode) runs in a fresh subprocess (fp32, one process, the
model and torch's fused AdamW as the trainer builds them), with glibc's mmap threshold fixed at
64 KiB (``MALLOC_MMAP_THRESHOLD_``): every tensor larger than that is its own mapping, returned
to the system when freed, so the resident set follows the live tensors instead of the heap's
high-water mark. What is measured: one warm-up step (forward, backward, optimizer step; the
gradients stay allocated, zeroed, as DeepSpeed keeps them), then the resident set ``VmRSS``
before the second step's forward, the peak-RSS counter ``VmHWM`` reset (``/proc/self/clear_refs``)
and read after its backward. ``measured = peak - before``: what the forward and backward
passes add on top of weights, gradients and optimizer state. The estimate is ``Activations.peak``
(saved tensors plus the logits beside their copy at the end of the forward pass). The process's
``ru_maxrss`` (its whole lifetime, warm-up included) is printed too.

Step time: ``--steps`` full steps per repetition after the measurement, ``--repeats``
repetitions, median ms per step; the load average is printed beside it (on a shared machine
the absolute times move with the other work). ``--time-interleaved ROUNDS`` compares the modes
fairly: one process, one model per mode (same weights), one forward + backward of each per
round, medians of wall and CPU time (``time.process_time``, less sensitive to other work on
the machine) and their ratios to the first mode.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time

CONFIGS = {
    # 8 layers of d=256 at 8 x 1024 tokens: about 3.8 GB of RSS in fp32 without recomputation
    "large": dict(num_layers=8, hidden_size=256, num_attention_heads=4, seq_length=1024, micro_batch=8, vocab=16384),
    "small": dict(num_layers=4, hidden_size=128, num_attention_heads=4, seq_length=512, micro_batch=4, vocab=8192),
    # tests/test_memory_report.py
    "tiny": dict(num_layers=2, hidden_size=128, num_attention_heads=4, seq_length=256, micro_batch=4, vocab=2048),
}
# (name, granularity, method, num_layers)
MODES = {
    "none": (None, "uniform", 1),
    "full-uniform-1": ("full", "uniform", 1),
    "full-block-2": ("full", "block", 2),
    "selective": ("selective", "uniform", 1),
}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1))


def model_config(config_name: str, mode: str):
    """The ``ModelConfig`` of configuration ``config_name`` in recomputation mode ``mode``."""
    from an_megatron.model import ModelConfig

    c = CONFIGS[config_name]
    granularity, method, n = MODES[mode]
    return ModelConfig(
        recompute_granularity=granularity,
        recompute_method=method if granularity == "full" else None,
        recompute_num_layers=n if granularity == "full" else None,
        num_layers=c["num_layers"],
        hidden_size=c["hidden_size"],
        num_attention_heads=c["num_attention_heads"],
        seq_length=c["seq_length"],
        vocab_size=c["vocab"],
    )


def child(config_name: str, mode: str, steps: int, repeats: int) -> dict:
    import torch

    os.environ.setdefault("LOCAL_RANK", "0")
    from an_megatron.model import GPTModel
    from an_megatron.optim.optimizer import build_optimizer
    from an_megatron.parallel import initialize_parallel
    from an_megatron.training.memory import activation_bytes, recompute_from

    c = CONFIGS[config_name]
    initialize_parallel(1, 1)
    config = model_config(config_name, mode)
    model = GPTModel(config)
    hyper = argparse.Namespace(weight_decay=0.0, lr=1e-3, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8)
    opt = build_optimizer(model, hyper)
    gen = torch.Generator().manual_seed(0)
    b, s, V = c["micro_batch"], c["seq_length"], c["vocab"]
    tokens = torch.randint(0, V, (b, s), generator=gen)
    labels = torch.randint(0, V, (b, s), generator=gen)

    def step():
        loss = model(tokens, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)

    step()  # warm-up: optimizer state, gradients, kernels' first-use allocations
    before = _status_kib("VmRSS") * 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    loss = model(tokens, labels)
    loss.backward()
    peak = _status_kib("VmHWM") * 1024
    opt.step()
    opt.zero_grad(set_to_none=False)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        times.append((time.perf_counter() - t0) / steps * 1e3)
    est = activation_bytes(config, b, recompute=recompute_from(config))
    return dict(
        config=config_name,
        mode=mode,
        measured=peak - before,
        estimated_peak=est.peak,
        estimated_stored=est.stored,
        before=before,
        ru_maxrss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        ms_per_step=statistics.median(times) if times else None,
        ms_range=(min(times), max(times)) if times else None,
        threads=torch.get_num_threads(),
    )


def interleaved_times(config_name: str, modes: list[str], rounds: int) -> dict[str, list[float]]:
    """Forward + backward ms of each mode's model (same weights), one step of each per round, so
    that every mode sees the same machine state; the first round is a warm-up."""
    import torch

    os.environ.setdefault("LOCAL_RANK", "0")
    from an_megatron.model import GPTModel
    from an_megatron.parallel import initialize_parallel

    c = CONFIGS[config_name]
    initialize_parallel(1, 1)
    models = {}
    for mode in modes:
        models[mode] = GPTModel(model_config(config_name, mode))
    gen = torch.Generator().manual_seed(0)
    tokens, labels = torch.randint(0, c["vocab"], (2, c["micro_batch"], c["seq_length"]), generator=gen)
    times = {mode: ([], []) for mode in modes}  # (wall, CPU) ms
    for r in range(rounds + 1):
        for mode, model in models.items():
            t0, c0 = time.perf_counter(), time.process_time()
            model(tokens, labels).backward()
            if r:
                times[mode][0].append((time.perf_counter() - t0) * 1e3)
                times[mode][1].append((time.process_time() - c0) * 1e3)
            model.zero_grad(set_to_none=False)
    return times


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--steps", type=int, default=3, help="steps per timing repetition")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--time-interleaved",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="instead: time forward + backward of every mode in one process, interleaved, over ROUNDS rounds",
    )
    p.add_argument("--child", nargs=2, metavar=("CONFIG", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.time_interleaved:
        import torch

        torch.set_num_threads(args.threads)
        for config_name in args.configs:
            load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
            times = interleaved_times(config_name, args.modes, args.time_interleaved)
            load_after = " ".join(f"{x:.2f}" for x in os.getloadavg())
            base = [statistics.median(t) for t in times[args.modes[0]]]
            print(
                f"{config_name}: {args.time_interleaved} interleaved rounds, {args.threads} threads, "
                f"load average before {load_before}; after {load_after}"
            )
            print(f"| recomputation | wall ms [range] | ratio to {args.modes[0]} | CPU ms [range] | CPU ratio |")
            print("| --- | --- | --- | --- | --- |")
            for mode, (wall, cpu) in times.items():
                w, c = statistics.median(wall), statistics.median(cpu)
                print(
                    f"| {mode} | {w:.0f} [{min(wall):.0f}-{max(wall):.0f}] | {w / base[0]:.3f} | "
                    f"{c:.0f} [{min(cpu):.0f}-{max(cpu):.0f}] | {c / base[1]:.3f} |"
                )
        return
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(child(*args.child, args.steps, args.repeats)))
        return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"machine: {os.cpu_count()} cores; {args.threads} torch threads; fp32; {when}")
    columns = ["config", "recomputation", "measured (MiB)", "estimated peak (MiB)", "ratio est/meas"]
    columns += ["saved (MiB)", "ru_maxrss (MiB)", "ms/step [range]", "load avg before; after"]
    print("| " + " | ".join(columns) + " |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    mib = 1024**2
    for config_name in args.configs:
        for mode in args.modes:
            load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
            cmd = [sys.executable, __file__, "--child", config_name, mode, "--steps", str(args.steps)]
            cmd += ["--repeats", str(args.repeats), "--threads", str(args.threads)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if out.returncode != 0:
                print(f"| {config_name} | {mode} | failed: {out.stderr.strip().splitlines()[-1]} |||||||")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            load_after = " ".join(f"{x:.2f}" for x in os.getloadavg())
            print(
                f"| {config_name} | {mode} | {r['measured'] / mib:.0f} | {r['estimated_peak'] / mib:.0f} | "
                f"{r['estimated_peak'] / r['measured']:.3f} | {r['estimated_stored'] / mib:.0f} | "
                f"{r['ru_maxrss'] / mib:.0f} | {r['ms_per_step']:.0f} "
                f"[{r['ms_range'][0]:.0f}-{r['ms_range'][1]:.0f}] | "
                f"{load_before}; {load_after} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
