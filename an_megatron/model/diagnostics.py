"""Measured norms of the quantities anGPT's factors claim to normalize.

Every ``Tap`` in the model marks such a quantity. ``measure_norms`` runs a forward pass with a
hook on each tap and reports, per tap, the mean, standard deviation and maximum over tokens of
the norm along the last dimension (per head for ``(b, s, heads, d_h)`` tensors). For anGPT each
should be near 1 at initialization; that is the approximation the method rests on. The maximum
shows the tokens a mean hides: nothing renormalizes anGPT's hidden state, so a few tokens whose
norm has grown are where a divergence starts (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from an_megatron.model.scales import Tap

# What each tap holds, in ANGPT.md's notation, for reports.
TAP_NAMES = {
    "embedding.tap_out": "h (embedding)",
    "attention.tap_q": "q per head (nu_qkv W_q h)",
    "attention.tap_k": "k per head (nu_qkv W_k h)",
    "attention.tap_v": "v per head (nu_qkv W_v h)",
    "attention.tap_heads": "head output (after nu_att)",
    "attention.tap_out": "x_A (nu_o W_o o)",
    "tap_h_attention": "h after attention residual",
    "mlp.tap_u": "u (nu_uz W_u h)",
    "mlp.tap_act": "SwiGLU product (after nu_act)",
    "mlp.tap_out": "x_M (nu_down W_down a)",
    "tap_h_mlp": "h after MLP residual",
}


def _layer_and_name(module_name: str) -> tuple[int | None, str]:
    parts = module_name.split(".")
    if parts[0] == "layers":
        return int(parts[1]), ".".join(parts[2:])
    return None, module_name


@torch.no_grad()
def measure_norms(model: torch.nn.Module, tokens: torch.Tensor, tp_group=None) -> list[dict]:
    """One record per tap: ``layer`` (None outside the blocks), ``name``, ``what``, ``mean``,
    ``std``, ``max``, ``target`` (1.0). Norms of tensor-parallel-sharded taps are summed over
    ``tp_group``, so every rank reports whole-vector norms."""
    records, handles = [], []

    def hook(name, tap):
        def fn(module, inputs, output):
            scale = inputs[1] if len(inputs) > 1 else 1.0
            sq = (output.float() * scale).pow(2).sum(-1)
            if tap.tp_sharded and tp_group is not None and dist.get_world_size(tp_group) > 1:
                dist.all_reduce(sq, group=tp_group)
            norms = sq.sqrt().flatten()
            layer, short = _layer_and_name(name)
            records.append(
                dict(
                    layer=layer,
                    name=short,
                    what=TAP_NAMES.get(short, short),
                    mean=norms.mean().item(),
                    std=norms.std().item(),
                    max=norms.max().item(),
                    target=1.0,
                )
            )

        return fn

    for name, module in model.named_modules():
        if isinstance(module, Tap):
            handles.append(module.register_forward_hook(hook(name, module)))
    try:
        model(tokens)
    finally:
        for h in handles:
            h.remove()
    return records
