#!/usr/bin/env python
"""bf16 against FP8 for anGPT and GPT+ at a size where the matmuls dominate (docs/FP8.md).

    python benchmarks/fp8_bench.py                       # d=2048, 8 layers, T=1024, batch 8, 40 steps
    python benchmarks/fp8_bench.py --json out.json       # also write every number
    python benchmarks/fp8_bench.py --hidden-size 128 --num-layers 2 --seq-length 64 --batch 2 \\
        --vocab-size 512 --steps 4 --warmup 2            # a smoke run (CPU works, slowly)

For each architecture it trains the same model from the same initial weights on the same
batches in bf16 and in each FP8 backend available (``torch`` always, ``te`` when Transformer
Engine is installed), one GPU, no DeepSpeed: bf16 weights and a fused AdamW (anGPT: Adam with
the norm bound, no warm-up; GPT+: weight decay 0.1 and a linear warm-up), so that the only
difference between rows is the precision of the block linears. Reports the median step time
after warm-up, tokens/s, model TFLOP/s and MFU against the dense bf16 peak (FP8 rows too, so
MFU above the bf16 row's is the FP8 gain), the FP8/bf16 speedup, peak memory, and the mean loss
of the last 5 steps. The data repeat a random 16-token motif per sequence, so the loss falls
within a few dozen steps and the curves can be compared. Prints a markdown table last.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

from an_megatron.model import GPTModel, ModelConfig
from an_megatron.model.fp8 import fp8_autocast, transformer_engine_installed
from an_megatron.optim import constrain_parameters_
from an_megatron.parallel import destroy_parallel, initialize_parallel
from an_megatron.training.metrics import flops_per_token, peak_tflops

PRECISIONS = {
    "bf16": {},
    "fp8-torch": dict(fp8="hybrid", fp8_backend="torch"),
    "fp8-te": dict(
        transformer_impl="transformer_engine",
        fp8="hybrid",
        fp8_backend="te",
        fp8_recipe="delayed",
        fp8_amax_history_len=16,
        fp8_amax_compute_algo="max",
    ),
}


def batches(args, device):
    gen = torch.Generator().manual_seed(0)
    motifs = torch.randint(0, args.vocab_size, (args.steps, args.batch, 16), generator=gen)
    reps = (args.seq_length + 1 + 15) // 16
    return motifs.repeat(1, 1, reps)[:, :, : args.seq_length + 1].to(device)


def run(arch, precision, args, data, device):
    config = ModelConfig(
        arch=arch,
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        vocab_size=args.vocab_size,
        seq_length=args.seq_length,
        **PRECISIONS[precision],
    )
    model = GPTModel(config).to(device=device, dtype=torch.bfloat16)
    defaults = config.spec.optimizer  # the trainer's weight decay and warm-up for this architecture
    lr = args.lr or (1e-3 if arch == "gptplus" else 3e-3)
    opt = torch.optim.AdamW(
        model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=defaults.weight_decay, fused=device.type == "cuda"
    )
    warmup = defaults.warmup_iters(args.steps)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses, times = [], []
    for step, tokens in enumerate(data):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup) if warmup else lr
        sync()
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with fp8_autocast(config):
            loss = model.loss(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        opt.step()
        constrain_parameters_(model.parameters())  # the norm bound (none for GPT+)
        sync()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    step_s = statistics.median(times[args.warmup :])
    tokens_per_s = args.batch * args.seq_length / step_s
    tflops = flops_per_token(config) * tokens_per_s / 1e12
    peak = peak_tflops(args.peak_tflops)
    result = dict(
        arch=arch,
        precision=precision,
        lr=lr,
        step_ms=1e3 * step_s,
        tokens_per_s=tokens_per_s,
        tflops=tflops,
        mfu=tflops / peak if peak else None,
        final_loss=sum(losses[-5:]) / len(losses[-5:]),
        first_loss=losses[0],
        losses=losses,
        peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
    )
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def table(results) -> str:
    base = {r["arch"]: r for r in results if r["precision"] == "bf16"}
    rows = [
        "| arch | precision | step ms | tokens/s | TFLOP/s | MFU (bf16 peak) | speedup vs bf16 | loss first -> last5 "
        "| loss vs bf16 | peak GiB |",
        "|" + " --- |" * 10,
    ]
    for r in results:
        b = base[r["arch"]]
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "n/a"
        rows.append(
            f"| {r['arch']} | {r['precision']} | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | "
            f"{r['tflops']:.1f} | {mfu} | {b['step_ms'] / r['step_ms']:.2f}x | "
            f"{r['first_loss']:.3f} -> {r['final_loss']:.3f} | "
            f"{100 * (r['final_loss'] - b['final_loss']) / b['final_loss']:+.2f}% | {mem} |"
        )
    return "\n".join(rows)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", default="angpt,gptplus")
    p.add_argument("--precisions", default=None, help="default: bf16, fp8-torch, and fp8-te when TE is installed")
    p.add_argument("--hidden-size", type=int, default=2048)
    p.add_argument("--num-layers", type=int, default=8)
    p.add_argument("--num-attention-heads", type=int, default=16)
    p.add_argument("--seq-length", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=10, help="steps left out of the timing")
    p.add_argument("--lr", type=float, default=None, help="default 3e-3 for anGPT, 1e-3 for GPT+")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak (default: known GPUs)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.steps <= args.warmup:
        p.error(f"--steps {args.steps} must exceed --warmup {args.warmup}")
    precisions = (
        args.precisions.split(",")
        if args.precisions
        else ["bf16", "fp8-torch"] + (["fp8-te"] if transformer_engine_installed() else [])
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    initialize_parallel(1, 1)
    try:
        name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
        print(
            f"device {name}, torch {torch.__version__}, bf16 peak {peak_tflops(args.peak_tflops)} TFLOP/s; "
            f"d={args.hidden_size} L={args.num_layers} H={args.num_attention_heads} T={args.seq_length} "
            f"batch {args.batch} V={args.vocab_size}, {args.steps} steps (timing after {args.warmup})",
            flush=True,
        )
        data = batches(args, device)
        results = []
        for arch in args.archs.split(","):
            for precision in precisions:
                r = run(arch, precision, args, data, device)
                print(
                    f"{arch:8s} {precision:9s} step {r['step_ms']:8.1f} ms  loss {r['first_loss']:.3f} -> "
                    f"{r['final_loss']:.3f}",
                    flush=True,
                )
                if not all(math.isfinite(v) for v in r["losses"]):
                    print(f"  (non-finite loss in {arch} {precision})", flush=True)
                results.append(r)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(args=vars(args), device=name, results=results), f, indent=1)
        print("\n" + table(results), flush=True)
    finally:
        destroy_parallel()


if __name__ == "__main__":
    main()
