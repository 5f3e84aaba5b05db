#!/usr/bin/env python
"""Forward+backward time per step of anGPT, nGPT and GPT+ at one size, interleaved in one process.

    python benchmarks/step_time.py                 # d=512, 4 layers, 8 heads, T=256, batch 8
    python benchmarks/step_time.py --profile angpt # where anGPT's time goes (torch.profiler)
    python benchmarks/step_time.py --compare-nu-att # anGPT under each --nu-att option, and GPT+
    python benchmarks/step_time.py --document-length 64 --compare-masking  # the cost of document masking
    python benchmarks/step_time.py --torch-compile   # the blocks' elementwise chains compiled (all models)
    python benchmarks/step_time.py --compare-compile # GPT+ and anGPT, eager and compiled

Interleaving (one step of each architecture per round) exposes all three to the same machine
state, so the ratios are fair even when absolute times drift. The interleaved measurement
(``--steps`` rounds) is repeated ``--repeats`` times; each repetition gives one ratio to GPT+
(of median step times), and the table reports the median ratio over repetitions and its range.
The load average before and after, the threads and the pinning are printed with it. On a
shared machine use ``--threads 1 --cpu-time``. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import paper  # benchmarks/, this script's directory
import torch
from timing import fix_threads, load_average, machine, ratio_summary

from an_megatron.model import ARCHS, GPTModel, ModelConfig
from an_megatron.model.factors import NU_ATT_OPTIONS
from an_megatron.parallel import destroy_parallel, initialize_parallel


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden-size", type=int, default=512)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--num-attention-heads", type=int, default=8)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--steps", type=int, default=20, help="interleaved rounds per repetition")
    p.add_argument("--repeats", type=int, default=3, help="repetitions of the interleaved measurement")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--nu-att", default=ModelConfig.nu_att)
    p.add_argument(
        "--document-length",
        type=int,
        default=0,
        help="pack documents of about this many tokens per sequence, with document masking",
    )
    p.add_argument(
        "--compare-masking",
        action="store_true",
        help="with --document-length: time GPT+ and anGPT with and without document masking",
    )
    p.add_argument(
        "--compare-nu-att",
        action="store_true",
        help="time anGPT once per --nu-att option (and GPT+) instead of the three architectures",
    )
    p.add_argument("--torch-compile", action="store_true", help="every model with --torch-compile")
    p.add_argument(
        "--compare-compile",
        action="store_true",
        help="time GPT+ and anGPT eager and with --torch-compile (ratios to eager GPT+)",
    )
    p.add_argument("--profile", choices=ARCHS, default=None, help="profile one architecture instead")
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads, pinned to as many cores (default: torch's, unpinned)"
    )
    p.add_argument(
        "--cpu-time",
        action="store_true",
        help="time steps by the process's CPU time instead of wall time: with --threads 1 it "
        "leaves out time spent waiting for a core on a shared machine",
    )
    args = p.parse_args()

    threads = fix_threads(args.threads)
    load_before = load_average()
    clock = time.process_time if args.cpu_time else time.perf_counter
    initialize_parallel(1, 1)
    torch.manual_seed(0)
    shape = dict(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        vocab_size=args.vocab_size,
        seq_length=args.seq_length,
    )
    masked, compile_ = bool(args.document_length), args.torch_compile
    if args.compare_nu_att:
        variants = {
            "gptplus": ("gptplus", args.nu_att, masked, compile_),
            **{f"angpt nu_att={o}": ("angpt", o, masked, compile_) for o in NU_ATT_OPTIONS},
        }
    elif args.compare_masking:
        variants = {
            f"{a}{' masked' if m else ''}": (a, args.nu_att, m, compile_)
            for a in ("gptplus", "angpt")
            for m in (False, True)
        }
    elif args.compare_compile:
        variants = {
            f"{a}{' compiled' if c else ''}": (a, args.nu_att, masked, c)
            for a in ("gptplus", "angpt")
            for c in (False, True)
        }
    else:
        variants = {a: (a, args.nu_att, masked, compile_) for a in ARCHS}
    models = {
        name: GPTModel(ModelConfig(arch=a, nu_att=o, torch_compile=c, **shape))
        for name, (a, o, _, c) in variants.items()
    }
    tokens = torch.randint(0, args.vocab_size, (args.batch, args.seq_length + 1))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    masking = {}
    if args.document_length:  # document boundaries at random positions, as --reset-attention-mask gives
        from an_megatron.model.attention import visible_keys

        starts = torch.rand(inputs.shape) < 1 / args.document_length
        docs = starts.long().cumsum(1)
        masking = dict(document_ids=docs, position_ids=visible_keys(docs, args.seq_length, docs.device) - 1)

    def step(name):
        model = models[name]
        model.zero_grad(set_to_none=True)
        t0 = clock()
        model.loss(inputs, labels, **(masking if variants[name][2] else {})).backward()
        return clock() - t0

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for _ in range(args.warmup):
            step(args.profile)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                step(args.profile)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        destroy_parallel()
        return

    for _ in range(args.warmup):
        for a in models:
            step(a)
    runs = []  # per repetition: {variant: [step times]}
    for _ in range(args.repeats):
        times = {a: [] for a in models}
        for _ in range(args.steps):
            for a in models:
                times[a].append(step(a))
        runs.append(times)
    destroy_parallel()
    load_after = load_average()
    base = "gptplus" if "gptplus" in models else next(iter(models))
    ratios = {a: [statistics.median(t[a]) / statistics.median(t[base]) for t in runs] for a in models}
    print(
        f"# step time (forward+backward), d={args.hidden_size} L={args.num_layers} H={args.num_attention_heads} "
        f"T={args.seq_length} batch={args.batch} V={args.vocab_size} nu_att={args.nu_att}"
        f"{f', documents of ~{args.document_length} tokens, masked' if args.document_length else ''}"
        f"{', --torch-compile' if args.torch_compile else ''}; "
        f"{args.repeats} repetitions of {args.steps} interleaved steps ({'CPU' if args.cpu_time else 'wall'} time); "
        f"torch {torch.__version__}, {threads}, {machine()}; "
        f"load average (1/5/15 min) before {load_before}, after {load_after}"
    )
    print(f"| arch | median step (ms) | min (ms) | ratio to {base}: median [range] over repetitions | paper (A100) |")
    print("| --- | --- | --- | --- | --- |")
    for a in models:
        all_times = [x for t in runs for x in t[a]]
        print(
            f"| {a} | {statistics.median(all_times) * 1e3:.1f} | {min(all_times) * 1e3:.1f} | "
            f"{ratio_summary(ratios[a])} | {paper.STEP_TIME_RATIO.get(a, '')} |"
        )


if __name__ == "__main__":
    main()
