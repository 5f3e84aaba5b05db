"""Every factor against a Monte-Carlo estimate on random unit inputs (d = 512)."""

import math

import pytest
import torch
import torch.nn.functional as F

from an_megatron.model.factors import (
    logit_variance,
    nu_act,
    nu_att_dense,
    nu_att_exact,
    nu_att_gaussian,
    nu_lerp,
    nu_linear,
)

D = 512
N = 4000  # samples; norms concentrate, so the Monte-Carlo error is well under 1%


def unit(*shape):
    return F.normalize(torch.randn(*shape, dtype=torch.float64), dim=-1)


def mean_norm(x):
    return x.norm(dim=-1).mean().item()


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("n_in,n_out", [(512, 64), (64, 512), (512, 2048), (2048, 512), (512, 512)])
def test_nu_linear(n_in, n_out):
    W = unit(n_out, n_in)
    x = unit(N, n_in)
    assert mean_norm(nu_linear(n_in, n_out) * x @ W.T) == pytest.approx(1.0, rel=0.02)


def test_nu_o_on_concatenated_heads():
    H, dh = 8, 64
    o = unit(N, H, dh).reshape(N, H * dh)  # H unit-norm head outputs
    W = unit(D, D)
    assert mean_norm(nu_linear(dh, D) * o @ W.T) == pytest.approx(1.0, rel=0.02)


@pytest.mark.parametrize("alpha", [0.05, 0.3, 0.5, 0.9])
def test_nu_lerp(alpha):
    h, x = unit(N, D), unit(N, D)
    a = torch.full((D,), alpha, dtype=torch.float64)
    assert mean_norm(nu_lerp(a) * torch.lerp(h, x, a)) == pytest.approx(1.0, rel=0.02)


def test_nu_lerp_elementwise_alpha():
    h, x = unit(N, D), unit(N, D)
    a = torch.rand(D, dtype=torch.float64)  # a different alpha per coordinate
    assert mean_norm(torch.lerp(h, x, a)) < 0.9  # without the factor the norm shrinks
    assert mean_norm(nu_lerp(a) * torch.lerp(h, x, a)) == pytest.approx(1.0, rel=0.02)


def test_nu_act_value_for_4d():
    assert nu_act(D, 4 * D) == pytest.approx(3.72, abs=0.02)


@pytest.mark.parametrize("ratio", [4, 8 / 3, 2])
def test_nu_act_monte_carlo(ratio):
    f = int(D * ratio)
    u = unit(N, f)
    z = unit(N, f) * math.sqrt(D)  # nGPT's rescale of the gate
    assert mean_norm(nu_act(D, f) * u * F.silu(z)) == pytest.approx(1.0, rel=0.02)


def test_nu_att_dense_on_uniform_attention():
    T, dh = 64, 64
    v = unit(N // 16, T, dh)
    a = torch.tril(torch.ones(T, T, dtype=torch.float64))
    a = a / a.sum(-1, keepdim=True)  # uniform over the visible positions
    o = (a @ v) * nu_att_dense(torch.arange(1, T + 1, dtype=torch.float64))[:, None]
    assert mean_norm(o) == pytest.approx(1.0, rel=0.02)


def test_nu_att_exact_on_any_attention():
    T, dh = 64, 64
    v = unit(N // 16, T, dh)
    s = torch.randn(N // 16, T, T, dtype=torch.float64) * 2.0  # far from uniform
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    a = torch.softmax(s, -1)
    exact = nu_att_exact(torch.logsumexp(s, -1, keepdim=True), torch.logsumexp(2 * s, -1, keepdim=True))
    torch.testing.assert_close(exact, (a**2).sum(-1, keepdim=True).rsqrt())
    assert mean_norm((a @ v) * exact) == pytest.approx(1.0, rel=0.02)


@pytest.mark.parametrize("variance", [0.0, 1.0, 5.0])
def test_nu_att_gaussian_on_gaussian_logits(variance):
    """For independent N(0, variance) logits the factor brings the attention average of
    independent unit values to norm 1 at every query position (Monte Carlo)."""
    T, dh = 64, 64
    gen = torch.Generator().manual_seed(0)
    v = unit(N // 16, T, dh)
    s = torch.randn(N // 16, T, T, dtype=torch.float64, generator=gen) * math.sqrt(variance)
    a = torch.softmax(s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")), -1)
    nu = nu_att_gaussian(torch.arange(1, T + 1), torch.tensor([variance]))[:, 0].double()
    o = (a @ v) * nu[:, None]
    per_position = o.norm(dim=-1).pow(2).mean(0).sqrt()  # RMS norm at each query position
    torch.testing.assert_close(per_position, torch.ones(T, dtype=torch.float64), atol=0.05, rtol=0)
    if variance > 0:  # sqrt(t) over-corrects peaked attention; this factor does not
        dense = (a @ v) * nu_att_dense(torch.arange(1, T + 1, dtype=torch.float64))[:, None]
        assert dense.norm(dim=-1).mean() > 1.2


def test_logit_variance_matches_qk_norm():
    """The variance s_qk implies is what QK-normalized random q, k give."""
    dh, scale = 64, 8.0
    gen = torch.Generator().manual_seed(0)
    s_qk = 0.5 + torch.rand(2, dh, dtype=torch.float64, generator=gen)
    q, k = unit(N, 2, dh) * s_qk, unit(N, 2, dh) * s_qk
    measured = (scale * (q * k).sum(-1)).var(0)
    torch.testing.assert_close(measured, logit_variance(s_qk, scale), rtol=0.05, atol=0)
