#!/usr/bin/env python
"""CPU forward time per token of the exported (factors folded) anGPT against exported GPT+ (and
nGPT) at the same shapes: prefill, and decoding with the KV cache.

    python benchmarks/inference_overhead.py                  # d=512, 4 layers, 8 heads, V=8192
    python benchmarks/inference_overhead.py --rounds 3 --prompt 32 --decode 8   # a quick look

The models are ``an_megatron/hf/modeling_angpt.py`` (the code an export ships) holding
``fold_state_dict`` of a GPTModel whose weights and scales are perturbed from initialization,
exactly what ``tools/export_hf.py`` writes. Each round times, for each architecture in turn:
one prefill of ``--prompt`` tokens (batch 1, building the cache), then ``--decode`` single-token
steps with that cache. Interleaving exposes every model to the same machine state; the ratio to
GPT+ is taken per round (paired) and its median and range are printed, with the load average
before and after (the figures of a loaded machine are preliminary).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch


def build(arch: str, shape: dict, seed: int):
    from an_megatron.hf.configuration_angpt import AnGPTConfig
    from an_megatron.hf.export import fold_state_dict, hf_config_kwargs
    from an_megatron.model import GPTModel, ModelConfig

    config = ModelConfig(arch=arch, **shape)
    gen = torch.Generator().manual_seed(seed)
    weights = {
        n: p.detach() * (1 + 0.1 * torch.rand(p.shape, generator=gen)) for n, p in GPTModel(config).named_parameters()
    }
    from an_megatron.hf.modeling_angpt import AnGPTForCausalLM

    model = AnGPTForCausalLM(AnGPTConfig(**hf_config_kwargs(config))).eval()
    model.load_state_dict(fold_state_dict(weights, config), strict=True)
    return model


@torch.inference_mode()
def time_round(model, prompt: torch.Tensor, steps: int, clock=time.perf_counter) -> tuple[float, float]:
    """(seconds per prompt token in the prefill, seconds per decoded token)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    t0 = clock()
    logits = model(prompt, cache=cache, use_cache=True).logits
    prefill = clock() - t0
    token = logits[:, -1:].argmax(-1)
    t0 = clock()
    for _ in range(steps):
        token = model(token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
    decode = clock() - t0
    return prefill / prompt.shape[1], decode / steps


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden-size", type=int, default=512)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--num-attention-heads", type=int, default=8)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--prompt", type=int, default=256, help="prefill length (tokens)")
    p.add_argument("--decode", type=int, default=64, help="decoded tokens per round, with the cache")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads (fixed; default 1)")
    p.add_argument("--archs", default="gptplus,angpt,ngpt")
    p.add_argument(
        "--cpu-time",
        action="store_true",
        help="time by the process's CPU time instead of wall time: with --threads 1 it leaves out "
        "time spent waiting for a core on a shared machine",
    )
    args = p.parse_args()

    from an_megatron.parallel import destroy_parallel, initialize_parallel

    torch.set_num_threads(args.threads)
    initialize_parallel(1, 1)  # GPTModel's layers (built once, to be folded) need a world
    shape = dict(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        vocab_size=args.vocab_size,
        seq_length=args.prompt + args.decode,
    )
    archs = args.archs.split(",")
    models = {a: build(a, shape, i) for i, a in enumerate(archs)}
    destroy_parallel()
    prompt = torch.randint(0, args.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    clock = time.process_time if args.cpu_time else time.perf_counter
    load_before = os.getloadavg()
    times = {a: ([], []) for a in archs}
    for r in range(args.warmup + args.rounds):
        for a in archs:
            prefill, decode = time_round(models[a], prompt, args.decode, clock)
            if r >= args.warmup:
                times[a][0].append(prefill)
                times[a][1].append(decode)
    load_after = os.getloadavg()

    print(
        f"# exported models, forward time per token: d={args.hidden_size} L={args.num_layers} "
        f"H={args.num_attention_heads} V={args.vocab_size}, prefill {args.prompt} tokens, decode {args.decode} "
        f"tokens with the cache, batch 1; {args.rounds} interleaved rounds after {args.warmup} warm-up "
        f"({'CPU' if args.cpu_time else 'wall'} time); "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
        f"{platform.processor() or platform.machine()}; load average (1, 5, 15 min) before "
        f"{', '.join(f'{x:.2f}' for x in load_before)}, after {', '.join(f'{x:.2f}' for x in load_after)}"
    )
    print("| arch | phase | median (ms/token) | range (ms/token) | ratio to GPT+, median of rounds | range of ratios |")
    print("| --- | --- | --- | --- | --- | --- |")
    for phase, i in (("prefill", 0), ("decode", 1)):
        for a in archs:
            t = times[a][i]
            ratios = [x / g for x, g in zip(t, times["gptplus"][i])] if "gptplus" in times else [float("nan")]
            print(
                f"| {a} | {phase} | {statistics.median(t) * 1e3:.3f} | {min(t) * 1e3:.3f}-{max(t) * 1e3:.3f} | "
                f"{statistics.median(ratios):.3f} | {min(ratios):.3f}-{max(ratios):.3f} |"
            )


if __name__ == "__main__":
    main()
