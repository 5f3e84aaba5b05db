#!/usr/bin/env python
"""What each recomputable part of a block saves for backward, and what recomputing it costs.

    python benchmarks/recompute_parts.py                      # d=256, 4 heads, batch 8 x 1024 tokens
    python benchmarks/recompute_parts.py --arch gptplus --json out.json
    python benchmarks/recompute_parts.py --hidden-size 64 --seq-length 64 --batch 2   # a smoke run

One block (fp32, CPU) runs forward under ``torch.autograd.graph.saved_tensors_hooks``, which
sees every tensor autograd keeps for backward; the bytes are counted once per storage (views
of one tensor share it) and parameters are left out, so the figure is the block's activation
memory. With a part recomputed (``model/recompute.py``, ``PARTS``), the part keeps only its
inputs (counted once, like everything). "freed" is the difference. The cost of
recomputing a part is its forward (with autograd recording, as in the recomputation), timed on
its own: median of ``--repeats`` runs. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import contextmanager
from dataclasses import replace
from unittest import mock

import torch

from an_megatron.model import ModelConfig, recompute
from an_megatron.model.arch import ARCH_SPECS
from an_megatron.model.gpt import Block
from an_megatron.parallel import destroy_parallel, initialize_parallel

MB = 2**20


@contextmanager
def saved_storages(params: set[int]):
    """Collect ``{storage pointer: bytes}`` of the non-parameter tensors autograd saves. A
    recomputed part's inputs are among them: non-reentrant checkpointing keeps them through the
    same saved-tensor mechanism."""
    seen: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield seen


def build_block(config: ModelConfig, parts: tuple[str, ...]) -> Block:
    with mock.patch.object(recompute, "SELECTIVE_RECOMPUTE", parts):
        torch.manual_seed(0)
        return Block(config, config.spec, 0)


def saved_mb(config: ModelConfig, parts: tuple[str, ...], h: torch.Tensor) -> float:
    block = build_block(config, parts)
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    with saved_storages(params) as seen:
        out = block(h)
    del out
    return sum(seen.values()) / MB


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):  # the first call warms up
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
        del out
    return 1e3 * statistics.median(times[1:])


def part_forwards(block: Block, h: torch.Tensor) -> dict:
    """Each part's forward on realistic inputs (what recomputing it runs), as callables."""
    with torch.no_grad():
        qkv = block.attention.qkv(h)[0]
        x_a = block.attention.proj(block.attention._core(qkv, None, None))[0]
        u, z = block.mlp.up_gate(h)[0].chunk(2, dim=-1)
    qkv, x_a, u, z = (t.detach().requires_grad_() for t in (qkv, x_a, u, z))
    q, k, _ = qkv.view(*h.shape[:2], 3, block.attention.local_heads, block.attention.head_dim).unbind(2)
    return {
        "attention_core": lambda: block.attention._core(qkv, None, None),
        "rope_qk_norm": lambda: block.attention._rope_qk_norm(q, k, None),
        "swiglu": lambda: block.mlp.swiglu(u, z),
        "residual": lambda: (block.attention_residual(h, x_a), block.mlp_residual(h, x_a)),
        "pre_norm": lambda: (block.attention_norm(h), block.mlp_norm(h)),
    }


def measure(config: ModelConfig, batch: int, repeats: int) -> dict:
    config = replace(config, recompute_granularity="selective")
    h = torch.randn(batch, config.seq_length, config.hidden_size)
    h = (h / h.norm(dim=-1, keepdim=True)).requires_grad_()
    none = saved_mb(config, (), h)
    block = build_block(config, ())
    forwards = part_forwards(block, h)
    rows = []
    for part in recompute.PARTS:
        with_part = saved_mb(config, (part,), h)
        ms = median_ms(forwards[part], repeats)
        freed = none - with_part
        rows.append(dict(part=part, saved_mb=none, saved_with_part_mb=with_part, freed_mb=freed, recompute_ms=ms))
    step_ms = median_ms(lambda: block(h).sum().backward(), repeats)  # the block's forward + backward
    selected = saved_mb(config, recompute.SELECTIVE_RECOMPUTE, h)
    full = config.seq_length * batch * config.hidden_size * h.element_size() / MB  # a full block keeps its input
    return dict(rows=rows, none_mb=none, selective_mb=selected, full_mb=full, step_ms=step_ms)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", choices=tuple(ARCH_SPECS), default="angpt")
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    initialize_parallel(1, 1)
    try:
        config = ModelConfig(
            arch=a.arch,
            num_layers=1,
            hidden_size=a.hidden_size,
            num_attention_heads=a.num_attention_heads,
            seq_length=a.seq_length,
        )
        result = measure(config, a.batch, a.repeats)
    finally:
        destroy_parallel()
    print(
        f"{a.arch}, one block, d={a.hidden_size}, {a.num_attention_heads} heads, f={config.ffn_hidden_size}, "
        f"batch {a.batch} x {a.seq_length} tokens, fp32, {torch.get_num_threads()} threads"
    )
    print(
        "| part | saved by the block (MB) | with the part recomputed (MB) | freed (MB) | recompute (ms) "
        "| ms per MB freed |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in result["rows"]:
        per = f"{r['recompute_ms'] / r['freed_mb']:.2f}" if r["freed_mb"] > 0.01 else "-"
        print(
            f"| {r['part']} | {r['saved_mb']:.1f} | {r['saved_with_part_mb']:.1f} | {r['freed_mb']:.1f} | "
            f"{r['recompute_ms']:.1f} | {per} |"
        )
    print(
        f"selective ({', '.join(recompute.SELECTIVE_RECOMPUTE)}): {result['selective_mb']:.1f} MB per block; "
        f"none {result['none_mb']:.1f}; full keeps the block input, {result['full_mb']:.1f}; "
        f"the block's forward + backward without recomputation: {result['step_ms']:.0f} ms"
    )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(args=vars(a), **result), f, indent=1)


if __name__ == "__main__":
    main()
