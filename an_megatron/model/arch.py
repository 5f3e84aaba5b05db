"""Architecture specs: everything that differs between anGPT, nGPT and GPT+, in one place.

The block code is shared; an ``ArchSpec`` names the modules that implement the places where
ANGPT.md says the math differs, the constant factors, how weights start and are kept in the
unit ball, and the optimizer defaults. ``ModelConfig(arch=name)`` looks the spec up in
``ARCH_SPECS``, and ``--arch`` offers its keys: a new architecture is a new entry here (or one
registered in ``ARCH_SPECS`` from outside), not an ``if`` in the block code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from an_megatron.model import components as c
from an_megatron.model.factors import Factors, angpt_factors, no_factors

if TYPE_CHECKING:  # config.py imports this module to validate ``arch``
    from an_megatron.model.config import ModelConfig

ModuleFactory = Callable[["ModelConfig"], nn.Module]


@dataclass(frozen=True)
class OptimizerDefaults:
    """The training recipe's defaults (``training/arguments.py``; a flag given explicitly wins)."""

    weight_decay: float = 0.0  # on matrices only (optim/optimizer.py)
    warmup_percent: int = 0  # linear warm-up over this share of the training iterations,
    max_warmup_iters: int = 0  # capped here

    def warmup_iters(self, train_iters: int) -> int:
        return min(self.max_warmup_iters, train_iters * self.warmup_percent // 100)


@dataclass(frozen=True)
class ArchSpec:
    pre_norm: ModuleFactory  # before attention and MLP
    qk_norm: ModuleFactory  # (q, k) -> (q, k), per head
    residual: ModuleFactory  # (h, x) -> new h
    gate_scales: Callable[..., nn.Module]  # (config, u_factor, z_factor) -> module: row_scale() of W_u; W_z, or None
    final_norm: ModuleFactory  # before the output head
    logit_scale: ModuleFactory  # module: row_scale() of W_out (the logits' scale), or None
    softmax_scale: Callable[[int], float]  # head size -> multiplier of q k^T
    factors: Callable[["ModelConfig"], Factors]  # the constant nu factors (all 1 without them)
    init: Callable[[torch.Tensor, int, "ModelConfig"], torch.Tensor]  # (N(0, 1) draw, norm axis, config) -> weight
    weight_norm: str  # default ModelConfig.weight_norm: bound, normalize or none
    optimizer: OptimizerDefaults = OptimizerDefaults()


ARCH_SPECS: dict[str, ArchSpec] = {
    "angpt": ArchSpec(
        pre_norm=c.no_op,
        qk_norm=c.ScaledUnitQK,
        residual=c.ScaledLerpResidual,
        gate_scales=c.GateScales,
        final_norm=c.no_op,
        logit_scale=c.LogitScale,
        softmax_scale=math.sqrt,
        factors=angpt_factors,
        init=c.unit_init,
        weight_norm="bound",
    ),
    "ngpt": ArchSpec(
        pre_norm=c.no_op,
        qk_norm=c.ScaledUnitQK,
        residual=c.SphereResidual,
        gate_scales=c.GateScales,
        final_norm=c.no_op,
        logit_scale=c.LogitScale,
        softmax_scale=math.sqrt,
        factors=no_factors,
        init=c.unit_init,
        weight_norm="normalize",
    ),
    "gptplus": ArchSpec(
        pre_norm=c.hidden_rmsnorm,
        qk_norm=c.QKRMSNorm,
        residual=c.AddResidual,
        gate_scales=c.NoGateScales,
        final_norm=c.hidden_rmsnorm,
        logit_scale=c.NoLogitScale,
        softmax_scale=lambda dh: 1 / math.sqrt(dh),
        factors=no_factors,
        init=c.normal_init,
        weight_norm="none",
        # the paper's GPT+ recipe: AdamW with weight decay and 10% warm-up (at most 2000 iterations)
        optimizer=OptimizerDefaults(weight_decay=0.1, warmup_percent=10, max_warmup_iters=2000),
    ),
}
ARCHS = tuple(ARCH_SPECS)  # the built-in architectures (the CLI reads ARCH_SPECS itself)
