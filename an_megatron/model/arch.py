"""Architecture specs: which components each architecture uses (megatron-core style).

The block code is shared; an ``ArchSpec`` names the modules that implement the places where
ANGPT.md says the math differs. Adding a variant means adding a spec, not an ``if`` ladder.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from torch import nn

from an_megatron.model import components as c
from an_megatron.model.config import ModelConfig

ModuleFactory = Callable[[ModelConfig], nn.Module]


@dataclass(frozen=True)
class ArchSpec:
    pre_norm: ModuleFactory  # before attention and MLP
    qk_norm: ModuleFactory  # (q, k) -> (q, k), per head
    residual: ModuleFactory  # (h, x) -> new h
    gate_scales: ModuleFactory  # (u, z) -> (u, z) in SwiGLU
    final_norm: ModuleFactory  # before the output head
    logit_scale: ModuleFactory  # on the logits
    softmax_scale: Callable[[int], float]  # head size -> multiplier of q k^T
    factors: bool  # anGPT's constant nu factors (and nu_att)


ARCH_SPECS = {
    "gptplus": ArchSpec(
        pre_norm=c.hidden_rmsnorm, qk_norm=c.QKRMSNorm, residual=c.AddResidual, gate_scales=c.NoGateScales,
        final_norm=c.hidden_rmsnorm, logit_scale=c.no_op, softmax_scale=lambda dh: 1 / math.sqrt(dh),
        factors=False,
    ),
    "ngpt": ArchSpec(
        pre_norm=c.no_op, qk_norm=c.ScaledUnitQK, residual=c.SphereResidual, gate_scales=c.GateScales,
        final_norm=c.no_op, logit_scale=c.LogitScale, softmax_scale=math.sqrt, factors=False,
    ),
    "angpt": ArchSpec(
        pre_norm=c.no_op, qk_norm=c.ScaledUnitQK, residual=c.ScaledLerpResidual, gate_scales=c.GateScales,
        final_norm=c.no_op, logit_scale=c.LogitScale, softmax_scale=math.sqrt, factors=True,
    ),
}
