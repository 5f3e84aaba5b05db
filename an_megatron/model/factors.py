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
from functools import lru_cache

import numpy as np
import torch

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


def nu_att_gaussian(visible_keys: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """``nu_att`` for independent Gaussian logits of ``variance`` (per head) over ``t`` keys.

    With weights ``w_j = exp(s_j)``, ``s_j ~ N(0, sigma^2)``: ``sum_j a_tj^2`` is
    ``sum_j w_j^2 / (sum_j w_j)^2``. For large ``t`` it tends to
    ``t E[w^2] / (t E[w])^2 = e^(sigma^2) / t``: peaked attention keeps more of the values'
    norm than uniform attention (``1/t``) does. Writing ``sum_j a_tj^2 = 1/t + sum_j (a_tj - 1/t)^2``
    and the spread term as ``(e^(sigma^2) - 1)(1 - 1/t) / t`` makes it exact at ``t = 1`` and
    for uniform attention (``sigma = 0``), and right for large ``t``; in between it
    overestimates (Monte Carlo at ``sigma^2 = 1``: the factor is 17% low for ``t = 2..4``, 4%
    at ``t = 64``, 1% at 256). Capped at 1 (``sum_j a_tj^2 <= 1``).

    ``visible_keys`` ``(..., T)``, ``variance`` ``(heads,)``; returns ``(..., T, heads)``.
    """
    t = visible_keys[..., None].to(variance.dtype)
    spread = torch.expm1(variance) * (1 - 1 / t)
    return ((1 + spread) / t).clamp(max=1.0).rsqrt()


def nu_att_exact(logits_lse: torch.Tensor, logits_lse2: torch.Tensor) -> torch.Tensor:
    """Exact ``(sum_j a_tj^2)^(-1/2)`` from two log-sum-exps of the attention logits ``s``.

    ``a_tj = exp(s_tj - LSE(s_t))``, so ``sum_j a_tj^2 = exp(LSE(2 s_t) - 2 LSE(s_t))`` and the
    factor is ``exp(LSE(s_t) - LSE(2 s_t) / 2)``. Both LSEs are what a flash-style kernel keeps
    per query, which is how this option can run without materializing attention weights.
    """
    return torch.exp(logits_lse - 0.5 * logits_lse2)


def check_nu_att(option: str) -> str:
    if option not in NU_ATT_OPTIONS:
        raise ValueError(f"unknown nu_att option {option!r}; choose one of {', '.join(NU_ATT_OPTIONS)}")
    return option
