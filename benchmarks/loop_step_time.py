#!/usr/bin/env python
"""Step time of anGPT, nGPT and GPT+ inside the full training loop (examples/pretrain_angpt.py).

    python benchmarks/loop_step_time.py [--rounds 3] [--iters 30] [--threads 1] [-- extra pretrain flags]

Runs the three architectures in turn, ``--rounds`` times (A B C A B C ...), each for ``--iters``
iterations on mock data, and reports the median logged ``step_time_s`` per architecture (the
first logged window, which holds start-up, is dropped) and its ratio to GPT+: the median over
rounds of each round's ratio, with its range. Everything the loop does is inside: forward,
backward, DeepSpeed's step, the norm bound, the LR update. The logged step time is wall time:
on a shared machine the range shows how much the load moved it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import paper  # noqa: E402  (benchmarks/, this script's directory)
from timing import fix_threads, load_average, machine, ratio_summary  # noqa: E402

from an_megatron.training.metrics import read_metrics  # noqa: E402

ARCHS = ("gptplus", "ngpt", "angpt")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--nproc", type=int, default=1, help="processes (torchrun) per run")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process, pinned to as many cores")
    p.add_argument("--smoke", action="store_true", help="a tiny model (d=64, one layer): tests of this script")
    p.add_argument("extra", nargs="*", help="more pretrain flags (after --)")
    args = p.parse_args()
    threads = fix_threads(args.threads)  # the runs inherit the pinning and OMP_NUM_THREADS
    load_before = load_average()
    # d, L, H, T, micro-batch; --smoke: a tiny model, to test this script
    d, layers, heads, seq, micro = (64, 1, 2, 32, 2) if args.smoke else (512, 4, 8, 256, 8)
    model = [
        *("--num-layers", str(layers), "--hidden-size", str(d), "--num-attention-heads", str(heads)),
        *("--seq-length", str(seq), "--micro-batch-size", str(micro)),
        *("--global-batch-size", str(micro * args.nproc)),
    ]
    times = {a: [] for a in ARCHS}
    round_medians = {a: [] for a in ARCHS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for arch in ARCHS:
                metrics = os.path.join(tmp, f"{arch}_{r}.jsonl")
                launcher = [sys.executable] if args.nproc == 1 else ["torchrun", "--nproc_per_node", str(args.nproc)]
                cmd = launcher + [
                    "examples/pretrain_angpt.py",
                    "--deepspeed_config",
                    "examples/ds_fp32.json",
                    "--arch",
                    arch,
                    *model,
                    "--train-iters",
                    str(args.iters),
                    "--lr",
                    "1e-3",
                    "--mock-data",
                    "--tokenizer-type",
                    "NullTokenizer",
                    "--vocab-size",
                    "8191",
                    "--num-workers",
                    "0",
                    "--eval-interval",
                    "0",
                    "--log-interval",
                    "5",
                    "--metrics-file",
                    metrics,
                    *args.extra,
                ]
                subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                windows = [rec["step_time_s"] for rec in read_metrics(metrics)["train"][1:]]
                times[arch] += windows
                round_medians[arch].append(statistics.median(windows))
    med = {a: statistics.median(t) for a, t in times.items()}
    ratios = {a: [m / g for m, g in zip(round_medians[a], round_medians["gptplus"])] for a in ARCHS}
    print(
        f"# full training loop, d={d} L={layers} H={heads} T={seq} micro-batch {micro}, fp32 ZeRO-1, "
        f"{args.nproc} process(es), "
        f"{args.rounds} rounds x {args.iters} iterations, median of 5-iteration windows (wall time); "
        f"{threads}, {machine()}; load average (1/5/15 min) before {load_before}, after {load_average()}"
    )
    print("| arch | median step (ms) | ratio to GPT+: median [range] over rounds | paper (A100) |")
    print("| --- | --- | --- | --- |")
    for a in ARCHS:
        print(f"| {a} | {med[a] * 1e3:.1f} | {ratio_summary(ratios[a])} | {paper.STEP_TIME_RATIO[a]} |")


if __name__ == "__main__":
    main()
