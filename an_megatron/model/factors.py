"""anGPT's normalization factors ``nu``: constants that replace exact normalizations.

Each factor is ``1 / E||output||`` of an operation whose inputs have (about) unit norm, computed
from the layer's shape alone. High-dimensional random vectors have tightly concentrated norms,
so the expected norm is what each token actually sees, to within a few percent.

All dimensions are the model's **global** dimensions (``d``, ``f``, ``d_h``). A tensor-parallel
rank holds only ``f / tp`` MLP columns or ``H / tp`` heads, but the norms it must correct are
those of the whole vectors, so a shard's local shape would be off by ``sqrt(tp)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from an_megatron.model.config import ModelConfig

NU_ATT_OPTIONS = ("gaussian", "exact", "dense", "none")


def nu_linear(n_in: int, n_out: int) -> float:
    """Factor after a linear map ``R^n_in -> R^n_out`` with unit-norm rows.

    Each of the ``n_out`` outputs is the dot product of two unit vectors in ``R^n_in``; for
    independent directions it has mean 0 and variance ``1 / n_in``. So
    ``E||W x||^2 = n_out / n_in`` and the factor restoring unit norm is ``sqrt(n_in / n_out)``.

    Uses in the block: ``nu_qkv = nu_linear(d, d_h)`` (one head's slice of ``W_q h``),
    ``nu_o = nu_linear(d_h, d)``: the concatenation of ``H`` unit head outputs has squared norm
    ``H = d / d_h`` and ``W_o`` keeps it (``d x d``), so ``1 / sqrt(H) = sqrt(d_h / d)``,
    ``nu_uz = nu_linear(d, f)`` and ``nu_down = nu_linear(f, d)``.
    """
    return math.sqrt(n_in / n_out)


def nu_lerp(alpha: torch.Tensor) -> torch.Tensor:
    """Factor after the residual update ``h + alpha * (x - h)`` (elementwise ``alpha``).

    With ``h`` and ``x`` unit norm, independent and zero-mean, the cross term vanishes in
    expectation: ``E||(1 - alpha) h + alpha x||^2 = (1 - alpha)^2 + alpha^2`` (per coordinate,
    since every coordinate carries ``1/d`` of each squared norm). The paper finds this factor
    critical: without it training is unstable. It is recomputed from ``alpha`` every forward.
    """
    return torch.rsqrt((1 - alpha) ** 2 + alpha**2)


@lru_cache(maxsize=None)
def nu_act(d: int, f: int, points: int = 100) -> float:
    """Factor after the SwiGLU product ``u * SiLU(z)``.

    After ``nu_uz`` the gate ``z`` has unit norm over ``f`` entries (variance ``1/f`` each), and
    nGPT's rescale ``z <- sqrt(d) * z`` makes each entry ``N(0, sigma^2)`` with
    ``sigma^2 = d / f``. ``u`` has unit norm and is independent of ``z``, so
    ``E||u * SiLU(z)||^2 = sum_i u_i^2 E[SiLU(z_i)^2] = E_{g ~ N(0, sigma^2)}[SiLU(g)^2]`` and
    ``nu_act = E[SiLU(g)^2]^(-1/2)``. The expectation is a Gauss-Hermite quadrature:
    ``E[F(g)] = pi^(-1/2) sum_i w_i F(sqrt(2) sigma x_i)``. For ``f = 4d`` it is about 3.72.
    """
    x, w = np.polynomial.hermite.hermgauss(points)
    g = math.sqrt(2.0 * d / f) * x
    silu = g / (1.0 + np.exp(-g))
    return float(1.0 / math.sqrt(np.sum(w * silu**2) / math.sqrt(math.pi)))


def nu_att_dense(visible_keys: torch.Tensor) -> torch.Tensor:
    """``nu_att(t) = sqrt(t)`` for a query that sees ``t`` keys (``t = 1..T`` for causal
    attention; restarting at each document under document masking).

    With attention weights ``a_tj`` over independent unit-norm values ``v_j``,
    ``E||sum_j a_tj v_j||^2 = sum_j a_tj^2``. Under the dense assumption (uniform attention over
    the ``t`` visible positions, ``a_tj = 1/t``) this is ``1/t``, hence the factor ``sqrt(t)``.
    """
    return visible_keys.sqrt()


def logit_variance(s_qk: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """Variance of the attention logits that QK-norm with gains ``s_qk`` ``(heads, d_h)`` implies.

    ``q = s * Norm(q')``, ``k = s * Norm(k')`` with ``Norm(q')``, ``Norm(k')`` independent
    random unit vectors: each product ``q_i k_i = s_i^2 qn_i kn_i`` has mean 0 and variance
    ``s_i^4 / d_h^2`` and distinct ``i`` are uncorrelated, so the logit
    ``softmax_scale * q . k`` has variance ``softmax_scale^2 * sum_i s_i^4 / d_h^2`` per head
    (1 at initialization, where ``s = 1`` and ``softmax_scale = sqrt(d_h)``).
    """
    return softmax_scale**2 * s_qk.pow(4).sum(-1) / s_qk.shape[-1] ** 2


def expected_sum_sq_weights(
    variance: torch.Tensor, keys: torch.Tensor, quadrature_points: int = 48, grid_points: int = 512
) -> torch.Tensor:
    """``E[sum_j a_j^2]`` for softmax weights over ``keys`` independent ``N(0, variance)`` logits.

    With ``w_j = exp(s_j)`` and ``1 / x^2 = int_0^inf lam e^(-lam x) dlam``, independence gives
    ``E[sum_j w_j^2 / (sum_j w_j)^2] = t int_0^inf lam phi2(lam) phi0(lam)^(t-1) dlam`` with
    ``phi0(lam) = E[e^(-lam w)]`` and ``phi2(lam) = E[w^2 e^(-lam w)]``: two Gauss-Hermite
    expectations over the logit, and one integral over ``u = log(lam)`` on a uniform grid that
    covers every weight the quadrature sees. Exact at ``t = 1`` (1) and for ``variance = 0``
    (``1/t``); it agrees with Monte Carlo to within 1% for variances 0.25-10 and ``t`` up to 1024.
    (The large-``t`` limit ``e^(variance) / t`` is off by up to 2x below ``t ~ e^(2 variance)``.)

    ``variance`` ``(heads,)``, ``keys`` ``(K,)`` (real, >= 1); returns ``(heads, K)``, float64.
    """
    x, w = np.polynomial.hermite.hermgauss(quadrature_points)
    x = torch.as_tensor(x, dtype=torch.float64, device=variance.device)
    w = torch.as_tensor(w / math.sqrt(math.pi), dtype=torch.float64, device=variance.device)
    sigma = variance.detach().double().clamp_min(0).sqrt()[:, None]
    log_w = sigma * math.sqrt(2.0) * x  # (heads, G): log weights at the quadrature nodes
    keys = keys.double()
    # lam * w spans [e^(lo - 6 sigma), e^(hi + 6 sigma)]: from "every exp(-lam w) is ~1" to "~0"
    reach = 6.0 * float(math.sqrt(max(float(variance.detach().max()), 0.0))) + 8.0  # one sync per call
    u = torch.linspace(
        -reach - math.log(float(keys.max())), reach, grid_points, dtype=torch.float64, device=variance.device
    )
    lam_w = torch.exp(u[None, :, None] + log_w[:, None, :])  # (heads, U, G)
    phi0 = (w * torch.exp(-lam_w)).sum(-1)  # (heads, U)
    phi2 = (w * torch.exp(2 * log_w[:, None, :] - lam_w)).sum(-1)
    integrand = torch.exp(2 * u) * phi2[:, None, :] * phi0[:, None, :].pow(keys[None, :, None] - 1)
    return keys * torch.trapezoid(integrand, dx=float(u[1] - u[0]), dim=-1)


# The table behind nu_att_gaussian: logit standard deviations 0..SIGMA_MAX (beyond it attention
# is close to one-hot and sum_j a_j^2 barely moves) by key counts 1..2^20, log-spaced.
SIGMA_MAX, SIGMA_POINTS, KEYS_MAX, KEY_POINTS = 6.0, 97, 2**20, 81


@lru_cache(maxsize=4)
def _log_sum_sq_table(device: torch.device) -> torch.Tensor:
    """``log E[sum_j a_j^2]`` on the (logit std, log key count) grid, ``(SIGMA_POINTS, KEY_POINTS)``.
    Built once per process and device (about a second on a CPU core)."""
    keys = torch.logspace(0, math.log10(KEYS_MAX), KEY_POINTS, dtype=torch.float64)
    sigma = torch.linspace(0, SIGMA_MAX, SIGMA_POINTS, dtype=torch.float64)
    table = torch.cat([expected_sum_sq_weights(chunk**2, keys) for chunk in sigma.split(8)])
    return table.clamp(max=1.0).log().float().to(device)


def nu_att_gaussian(visible_keys: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """``nu_att = E[sum_j a_tj^2]^(-1/2)`` for independent Gaussian logits of ``variance`` (per
    head) over the ``t`` keys each query sees.

    Uniform attention (the dense assumption) is the case ``variance = 0``: ``sum_j a_tj^2 = 1/t``.
    Random logits make attention peaked and keep more of the values' norm, ``e^(variance) / t``
    for large ``t``, which is why ``sqrt(t)`` over-corrects (by ``sqrt(e) = 1.65`` at init).
    ``expected_sum_sq_weights`` gives it for any ``t``; it is tabulated once on a grid of logit
    standard deviations and log key counts, and interpolated bilinearly here (a few small
    operations per layer).

    ``visible_keys`` ``(..., T)`` integers (at most 2^20), ``variance`` ``(heads,)``;
    returns ``(..., T, heads)``.
    """
    per_head = nu_att_gaussian_grid(variance)  # (K, heads)
    j, g = _lerp_index(visible_keys.float().log() * ((KEY_POINTS - 1) / math.log(KEYS_MAX)), KEY_POINTS)
    return torch.exp(-0.5 * torch.lerp(per_head[j], per_head[j + 1], g[..., None])).to(variance.dtype)


def _lerp_index(pos: torch.Tensor, size: int):
    lo = pos.floor().long().clamp(0, size - 2)
    return lo, (pos - lo).clamp(0, 1)


def nu_att_gaussian_grid(variance: torch.Tensor) -> torch.Tensor:
    """``log E[sum_j a_j^2]`` per head at the ``KEY_POINTS`` log-spaced key counts ``1..KEYS_MAX``,
    ``(KEY_POINTS, heads)``: the table interpolated at each head's logit ``variance`` ``(heads,)``.
    ``nu_att_gaussian`` finishes the interpolation over ``log t``; the Hugging Face export ships
    this grid, since it depends only on the (then fixed) ``s_qk``."""
    table = _log_sum_sq_table(variance.device)
    i, f = _lerp_index(variance.float().clamp_min(0).sqrt() * ((SIGMA_POINTS - 1) / SIGMA_MAX), SIGMA_POINTS)
    return torch.lerp(table[i], table[i + 1], f[:, None]).T


def nu_att_exact(logits_lse: torch.Tensor, logits_lse2: torch.Tensor) -> torch.Tensor:
    """Exact ``(sum_j a_tj^2)^(-1/2)`` from two log-sum-exps of the attention logits ``s``.

    ``a_tj = exp(s_tj - LSE(s_t))``, so ``sum_j a_tj^2 = exp(LSE(2 s_t) - 2 LSE(s_t))`` and the
    factor is ``exp(LSE(s_t) - LSE(2 s_t) / 2)``. Both LSEs are what a flash-style kernel keeps
    per query, which is how this option can run without materializing attention weights.
    """
    return torch.exp(logits_lse - 0.5 * logits_lse2)


@dataclass(frozen=True)
class Factors:
    """The constant factors a block multiplies in (``gpt.py`` folds them): anGPT's
    (``angpt_factors``), or all 1 and no ``nu_att`` (``no_factors``: nGPT and GPT+)."""

    nu_qkv: float = 1.0  # after W_q, W_k, W_v (per head)
    nu_o: float = 1.0  # after W_o
    nu_uz: float = 1.0  # after W_u and W_z
    nu_act: float = 1.0  # after u * SiLU(z)
    nu_down: float = 1.0  # after W_down
    nu_att: str = "none"  # after attention: one of NU_ATT_OPTIONS


def angpt_factors(config: ModelConfig) -> Factors:
    d, dh, f = config.hidden_size, config.head_dim, config.ffn_hidden_size
    return Factors(
        nu_qkv=nu_linear(d, dh),
        nu_o=nu_linear(dh, d),
        nu_uz=nu_linear(d, f),
        nu_act=nu_act(d, f),
        nu_down=nu_linear(f, d),
        nu_att=config.nu_att,
    )


def no_factors(config: ModelConfig) -> Factors:
    return Factors()


def check_nu_att(option: str) -> str:
    if option not in NU_ATT_OPTIONS:
        raise ValueError(f"unknown nu_att option {option!r}; choose one of {', '.join(NU_ATT_OPTIONS)}")
    return option
