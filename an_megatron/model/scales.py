"""Learnable scales with nGPT's reparameterization, and taps for measuring norms.

A scale ``s`` is stored as ``s_hat`` (initialised to ``s_scale``) and used as
``s = (s_init / s_scale) * s_hat``: every stored parameter then has a magnitude near its
``s_scale``, so Adam's per-parameter step sizes act uniformly on all of them.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from torch import nn


class Scale(nn.Module):
    """A learnable vector ``s = (s_init / s_scale) * s_hat``; calling it returns ``s``.

    ``tp_sharded`` marks a vector that follows a column-parallel output (``s_u``, ``s_v``,
    ``s_qk``, ``s_z``): each rank holds its slice, of ``local_size`` entries. Its initial value
    is a constant, so every tensor-parallel layout starts from the same full vector.
    """

    def __init__(self, local_size: int, s_init: float, s_scale: float, tp_sharded: bool = False):
        super().__init__()
        self.s_hat = nn.Parameter(torch.full((local_size,), float(s_scale)))
        self.multiplier = s_init / s_scale
        if tp_sharded:
            set_tensor_model_parallel_attributes(self.s_hat, is_parallel=True, dim=0, stride=1)

    def forward(self) -> torch.Tensor:
        return self.multiplier * self.s_hat

    def extra_repr(self) -> str:
        return f"size={self.s_hat.numel()}, multiplier={self.multiplier:.4g}"


class Tap(nn.Module):
    """A named point in the forward pass whose value tools can observe with a forward hook
    (``tools/measure_norms.py``). ``tap(x, scale)`` returns ``x`` unchanged; the observed
    quantity is ``x * scale``, so a constant folded into a later operation costs nothing in
    training and is still measured. ``tp_sharded``: the last dimension is this rank's slice of
    a vector split over the tensor-parallel group."""

    def __init__(self, tp_sharded: bool = False):
        super().__init__()
        self.tp_sharded = tp_sharded

    def forward(self, x: torch.Tensor, scale=1.0) -> torch.Tensor:
        return x
