"""The small modules in which the three architectures differ (chosen by ``arch.ArchSpec``).

Each is the literal formula from ANGPT.md; the block code in ``gpt.py`` calls them without
knowing which architecture it is.
"""

from __future__ import annotations

import math
from functools import cache
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import nn

from an_megatron.model.factors import logit_variance, nu_lerp
from an_megatron.model.scales import Scale

if TYPE_CHECKING:  # config.py imports the specs, and so this module
    from an_megatron.model.config import ModelConfig


def unit_init(w: torch.Tensor, norm_dim: int, config: ModelConfig) -> torch.Tensor:
    """anGPT's and nGPT's initialization: a standard normal draw ``w`` scaled to unit-norm
    vectors along ``norm_dim`` (the axis the weight's norm constraint runs along)."""
    return w / w.norm(dim=norm_dim, keepdim=True)


def normal_init(w: torch.Tensor, norm_dim: int, config: ModelConfig) -> torch.Tensor:
    """GPT+'s: ``N(0, init_std^2)`` entries."""
    return w * config.init_std


def _local(size: int, config: ModelConfig) -> int:
    return size // config.tensor_model_parallel_size


def compiled(fn: Callable, config: ModelConfig) -> Callable:
    """``fn`` (a short elementwise chain of tensors) as one fused kernel forward and one backward
    under ``--torch-compile``, else ``fn`` itself. One compiled function serves every layer."""
    return _torch_compile(fn) if config.torch_compile else fn


@cache
def _torch_compile(fn: Callable) -> Callable:
    return torch.compile(fn)


def rms_norm_qk(q, k, q_gain, k_gain, eps: float):
    """``rms_norm(q) * q_gain``, ``rms_norm(k) * k_gain`` over each head ``(b, s, heads, d_h)``."""
    shape = q.shape[-1:]
    return F.rms_norm(q, shape, eps=eps) * q_gain, F.rms_norm(k, shape, eps=eps) * k_gain


def scaled_lerp(h, x, alpha):
    """``nu_lerp(alpha) * (h + alpha * (x - h))`` as ``(nu (1 - alpha)) h + (nu alpha) x``: the
    factor joins the two d-vector coefficients. Forward and backward take 30% less CPU time than
    a lerp followed by a product (whose backward needs more passes over ``(b, s, d)``)."""
    nu = nu_lerp(alpha)
    return torch.addcmul(h * (nu * (1 - alpha)), x, nu * alpha)


def swiglu(u, z):
    return u * F.silu(z)


class RMSNorm(nn.Module):
    """GPT+'s normalization: ``x / rms(x) * g`` with a learnable gain ``g``."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def hidden_rmsnorm(config: ModelConfig) -> nn.Module:
    return RMSNorm(config.hidden_size, config.norm_eps)


def no_op(config: ModelConfig) -> nn.Module:
    return nn.Identity()


class QKRMSNorm(nn.Module):
    """GPT+'s QK-norm: RMSNorm over each head of q and of k.

    The gains have one entry per head and head dimension (``H x d_h``, like nGPT's ``s_qk``)
    and are split with the heads over tensor-parallel ranks. A gain of ``d_h`` entries shared
    by all heads would see only this rank's heads, so its gradient would be a partial sum.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.head_dim, self.eps = config.head_dim, config.norm_eps
        local = _local(config.hidden_size, config)
        self.q_gain = Scale(local, 1.0, 1.0, tp_sharded=True)
        self.k_gain = Scale(local, 1.0, 1.0, tp_sharded=True)
        self.norm_qk = compiled(rms_norm_qk, config)

    def forward(self, q, k):  # (b, s, heads, d_h)
        q_gain, k_gain = (g().view(-1, self.head_dim) for g in (self.q_gain, self.k_gain))
        return self.norm_qk(q, k, q_gain, k_gain, self.eps)


class ScaledUnitQK(nn.Module):
    """nGPT's and anGPT's exact QK-norm: ``q, k = s_qk * Norm(q), s_qk * Norm(k)`` per head.
    ``s_qk`` (``H x d_h`` entries) follows the heads, so it is split with them over TP."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.head_dim = config.head_dim
        self.s_qk = Scale(_local(config.hidden_size, config), *config.scale_init("s_qk"), tp_sharded=True)
        self.norm_qk = compiled(rms_norm_qk, config)

    def forward(self, q, k):  # (b, s, heads, d_h)
        # Norm(x) = rms_norm(x) / sqrt(d_h): rms_norm is one fused kernel (F.normalize is a norm,
        # a clamp and a division); its eps, 1e-24 / d_h, is F.normalize's 1e-12 on the norm.
        s = self.s_qk().view(-1, self.head_dim) * (1.0 / math.sqrt(self.head_dim))
        return self.norm_qk(q, k, s, s, 1e-24 / self.head_dim)

    def logit_variance(self, softmax_scale: float) -> torch.Tensor:
        """Per head (this rank's heads): what ``s_qk`` implies for the logits' variance."""
        return logit_variance(self.s_qk().view(-1, self.head_dim), softmax_scale)


def _alpha(config: ModelConfig) -> Scale:
    return Scale(config.hidden_size if config.alpha_per_dim else 1, *config.scale_init("alpha"))


class AddResidual(nn.Module):
    """GPT+: ``h + x``."""

    def __init__(self, config: ModelConfig):
        super().__init__()

    def forward(self, h, x):
        return h + x


class SphereResidual(nn.Module):
    """nGPT: ``Norm(h + alpha * (Norm(x) - h))``, every hidden state exactly on the sphere."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.alpha = _alpha(config)

    def forward(self, h, x):
        return F.normalize(torch.lerp(h, F.normalize(x, dim=-1), self.alpha()), dim=-1)


class ScaledLerpResidual(nn.Module):
    """anGPT: ``nu_lerp(alpha) * (h + alpha * (x - h))``; no norm is computed."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.alpha = _alpha(config)
        self.update = compiled(scaled_lerp if config.use_nu_lerp else torch.lerp, config)

    def forward(self, h, x):
        return self.update(h, x, self.alpha())


class GateScales(nn.Module):
    """nGPT's SwiGLU rescale: ``u = s_u * u``, ``z = s_v * sqrt(d) * z``. The ``sqrt(d)`` puts
    the gate's entries (unit norm over ``f``) at variance ``d / f``, where SiLU is not linear.
    ``u_factor`` and ``z_factor`` are constants folded into the same multiplications (anGPT's
    ``nu`` factors; 1 for nGPT).

    Both are per output channel of the fused ``W_u; W_z``, so ``row_scale`` returns them as one
    vector over this rank's rows, ``[u rows; z rows]`` (the local layout of the stride-2 fused
    weight); the MLP multiplies it into the weight (``layers.row_scaled``)."""

    def __init__(self, config: ModelConfig, u_factor: float = 1.0, z_factor: float = 1.0):
        super().__init__()
        f = _local(config.ffn_hidden_size, config)
        self.s_u = Scale(f, *config.scale_init("s_u"), tp_sharded=True)
        self.s_v = Scale(f, *config.scale_init("s_v"), tp_sharded=True)
        self.u_factor, self.z_factor = u_factor, z_factor * math.sqrt(config.hidden_size)

    def row_scale(self) -> torch.Tensor:
        return torch.cat([self.s_u() * self.u_factor, self.s_v() * self.z_factor])


class NoGateScales(nn.Module):
    def __init__(self, config: ModelConfig, u_factor: float = 1.0, z_factor: float = 1.0):
        super().__init__()
        if (u_factor, z_factor) != (1.0, 1.0):
            raise ValueError("constant factors need a GateScales component to be folded into")

    def row_scale(self) -> None:
        return None


class LogitScale(nn.Module):
    """nGPT's and anGPT's output temperature: ``logits = s_z * (W_out h)``, per vocabulary
    entry, split over TP like the vocabulary; ``row_scale`` is ``s_z``, which the head
    multiplies into ``W_out``'s rows (``layers.row_scaled``)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.s_z = Scale(_local(config.vocab_size, config), *config.scale_init("s_z"), tp_sharded=True)

    def row_scale(self) -> torch.Tensor:
        return self.s_z()


class NoLogitScale(nn.Module):
    """GPT+: no learnable temperature; the logits are ``W_out h`` (``h`` after the final RMSNorm)."""

    def __init__(self, config: ModelConfig):
        super().__init__()

    def row_scale(self) -> None:
        return None
