#!/usr/bin/env python
"""Step time of anGPT, nGPT and GPT+ inside the full training loop (examples/pretrain_angpt.py).

    python benchmarks/loop_step_time.py [--rounds 3] [--iters 30] [-- extra pretrain flags]

Runs the three architectures in turn, ``--rounds`` times (A B C A B C ...), each for ``--iters``
iterations on mock data, and reports the median logged ``step_time_s`` per architecture (the
first logged window, which holds start-up, is dropped) and its ratio to GPT+. Everything the
loop does is inside: forward, backward, DeepSpeed's step, the norm bound, the LR update.
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

from an_megatron.training.metrics import read_metrics  # noqa: E402

ARCHS = ("gptplus", "ngpt", "angpt")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--nproc", type=int, default=1, help="processes (torchrun) per run")
    p.add_argument("extra", nargs="*", help="more pretrain flags (after --)")
    args = p.parse_args()
    model = [
        "--num-layers",
        "4",
        "--hidden-size",
        "512",
        "--num-attention-heads",
        "8",
        "--seq-length",
        "256",
        "--micro-batch-size",
        "8",
        "--global-batch-size",
        "8" if args.nproc == 1 else str(8 * args.nproc),
    ]
    times = {a: [] for a in ARCHS}
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
                times[arch] += [rec["step_time_s"] for rec in read_metrics(metrics)["train"][1:]]
    med = {a: statistics.median(t) for a, t in times.items()}
    print(
        f"# full training loop, d=512 L=4 H=8 T=256 micro-batch 8, fp32 ZeRO-1, {args.nproc} process(es), "
        f"{args.rounds} rounds x {args.iters} iterations, median of 5-iteration windows"
    )
    print("| arch | median step (ms) | ratio to GPT+ | paper (A100) |")
    print("| --- | --- | --- | --- |")
    for a in ARCHS:
        print(f"| {a} | {med[a] * 1e3:.1f} | {med[a] / med['gptplus']:.3f} | {paper.STEP_TIME_RATIO[a]} |")


if __name__ == "__main__":
    main()
