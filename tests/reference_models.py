"""anGPT and nGPT written out literally from docs/ANGPT.md: the reference the tests hold
``an_megatron.model.GPTModel`` to.

The production model folds anGPT's constant factors into neighbouring multiplications, so it
no longer reads like the equations. This file is the equations: every factor is applied where
ANGPT.md applies it, nothing is folded, nothing is fused, and no model code is called. It is
slow and plain on purpose (explicit attention logits, one matmul per weight).

Three pieces:

* ``read_weights(model)``: GPTModel's parameters as plain leaf tensors named by ANGPT.md's
  symbols (``E``, ``W_q``, ..., ``s_z``), fused matrices split. Learnable scales are read as
  their stored surrogate ``s_hat``; the reference applies the reparameterization itself.
* ``reference_forward(w, config, tokens, ...)``: the logits, for ``nu_att`` ``dense``,
  ``exact``, ``none`` (ANGPT.md) and ``gaussian`` (the package's newer default; see
  ``gaussian_nu_att`` below). An option it does not know raises, so nothing passes by default.
* ``project_weights(w, mode)``: the constraint after an optimizer step (bound or normalize).

``to_model_layout`` maps anything in the reference's layout (weights, their gradients) back to
GPTModel's parameter names, so tests compare parameter by parameter.
"""

from __future__ import annotations

import math

import torch

# Two quadratures are taken from the package: E[SiLU(g)^2] (nu_act, checked by Monte Carlo in
# tests/test_factors.py) and E[sum_j a_tj^2] for Gaussian logits (the gaussian nu_att, checked
# against measured norms in tests/test_norms_at_init.py). Every other factor, and every input to
# these two, is derived below.
from an_megatron.model.factors import nu_act
from an_megatron.model.factors import nu_att_gaussian as _nu_att_gaussian

# ANGPT.md, "Learnable scalars": name -> (s_init, s_scale); None means 1/sqrt(d). Written out
# here rather than imported, so a wrong default in the package is caught.
SCALE_TABLE = {
    "alpha": (0.05, None),
    "s_qk": (1.0, None),
    "s_u": (1.0, 1.0),
    "s_v": (1.0, 1.0),
    "s_z": (1.0, None),
}

MATRICES = ("E", "W_q", "W_k", "W_v", "W_o", "W_u", "W_z", "W_down", "W_out")


# ----------------------------------------------------------------------------------------------
# Reading GPTModel's parameters


def _layer_names(i: int) -> dict[str, str]:
    """Reference name -> GPTModel parameter name, for the unfused tensors of layer ``i``."""
    p = f"layers.{i}."
    return {
        f"{p}s_qk": p + "attention.qk_norm.s_qk.s_hat",
        f"{p}W_o": p + "attention.proj.weight",
        f"{p}alpha_A": p + "attention_residual.alpha.s_hat",
        f"{p}s_u": p + "mlp.gate_scales.s_u.s_hat",
        f"{p}s_v": p + "mlp.gate_scales.s_v.s_hat",
        f"{p}W_down": p + "mlp.down.weight",
        f"{p}alpha_M": p + "mlp_residual.alpha.s_hat",
    }


_GLOBAL_NAMES = {
    "E": "embedding.word_embeddings.weight",
    "W_out": "head.output.weight",
    "s_z": "head.logit_scale.s_z.s_hat",
}


def read_weights(model, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """GPTModel's parameters as fresh leaf tensors (``requires_grad``) in the reference layout.

    The fused ``qkv`` weight is ``[W_q; W_k; W_v]`` stacked along the output dimension and
    ``up_gate`` is ``[W_u; W_z]``; they are split here. Scales are the raw ``s_hat``.
    """
    cfg = model.config
    d, f = cfg.hidden_size, cfg.ffn_hidden_size
    params = dict(model.named_parameters())
    w = {name: params[pname] for name, pname in _GLOBAL_NAMES.items()}
    for i in range(cfg.num_layers):
        w.update({name: params[pname] for name, pname in _layer_names(i).items()})
        w[f"layers.{i}.W_q"], w[f"layers.{i}.W_k"], w[f"layers.{i}.W_v"] = params[
            f"layers.{i}.attention.qkv.weight"
        ].split(d)
        w[f"layers.{i}.W_u"], w[f"layers.{i}.W_z"] = params[f"layers.{i}.mlp.up_gate.weight"].split(f)
    return {k: v.detach().to(dtype or v.dtype).clone().requires_grad_() for k, v in w.items()}


def to_model_layout(t: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """The inverse of ``read_weights``' layout: GPTModel parameter name -> tensor (fused
    matrices concatenated again). Use it on weights or on their gradients."""
    out = {pname: t[name] for name, pname in _GLOBAL_NAMES.items()}
    for i in range(num_layers):
        out.update({pname: t[name] for name, pname in _layer_names(i).items()})
        p = f"layers.{i}."
        out[p + "attention.qkv.weight"] = torch.cat([t[p + "W_q"], t[p + "W_k"], t[p + "W_v"]])
        out[p + "mlp.up_gate.weight"] = torch.cat([t[p + "W_u"], t[p + "W_z"]])
    return out


def symbol(name: str) -> str:
    """``layers.3.W_q`` -> ``W_q``."""
    return name.rsplit(".", 1)[-1]


# ----------------------------------------------------------------------------------------------
# The forward pass


def effective_scale(config, kind: str, s_hat: torch.Tensor) -> torch.Tensor:
    """``s = (s_init / s_scale) * s_hat`` (ANGPT.md's reparameterization), with the config's
    overrides of ANGPT.md's table."""
    s_init, s_scale = config.scales.get(kind, SCALE_TABLE[kind])
    if s_scale is None:
        s_scale = 1.0 / math.sqrt(config.hidden_size)
    return (s_init / s_scale) * s_hat


def unit(x: torch.Tensor) -> torch.Tensor:
    """``Norm(x) = x / ||x||_2`` over the last dimension."""
    return x / x.norm(dim=-1, keepdim=True)


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding, rotate-half convention, on ``(B, H, T, d_h)`` at ``positions (B, T)``."""
    dh = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, dh, 2, dtype=torch.float32, device=x.device) / dh)
    angles = positions[:, None, :, None].float() * inv_freq  # (B, 1, T, d_h / 2): same for all heads
    angles = torch.cat([angles, angles], dim=-1).to(x.dtype)
    x1, x2 = x[..., : dh // 2], x[..., dh // 2 :]
    return x * angles.cos() + torch.cat([-x2, x1], dim=-1) * angles.sin()


def gaussian_nu_att(t: torch.Tensor, s_qk: torch.Tensor, dh: int) -> torch.Tensor:
    """The ``gaussian`` option: ``nu_att = E[sum_j a_tj^2]^(-1/2)`` predicted for independent
    Gaussian logits over the ``t`` visible keys, per query and head; a constant in backward.

    Not in ANGPT.md's list yet. The prediction of ``E[sum_j a_tj^2]`` from the logit variance
    and ``t`` is a quadrature, taken from the package like ``nu_act``; what goes into it is
    derived here. With ``q = s_qk * Norm(.)``, ``k`` likewise, and independent random unit
    directions, ``q . k = sum_i s_i^2 qn_i kn_i`` has variance ``sum_i s_i^4 / d_h^2``, so the
    logit ``sqrt(d_h) q . k`` has ``sigma^2 = d_h sum_i s_i^4 / d_h^2`` per head (1 at init).
    ``t (B, 1, T, 1)``, ``s_qk (H, 1, d_h)``; returns ``(B, H, T, 1)``.
    """
    sigma2 = dh * (s_qk**4).sum(-1).squeeze(-1) / dh**2  # (H,)
    nu = _nu_att_gaussian(t[:, 0, :, 0], sigma2.detach())  # (B, T, H)
    return nu.permute(0, 2, 1)[..., None].detach()


def reference_forward(
    w: dict[str, torch.Tensor],
    config,
    tokens: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    document_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits ``(B, T, V)`` of anGPT or nGPT (``config.arch``) for ``tokens (B, T)``.

    ``position_ids (B, T)`` replace ``0..T-1`` in RoPE. ``document_ids (B, T)``: a query sees a
    key only if it is not in the future *and* in the same document; anGPT's dense ``nu_att(t)``
    then counts the visible keys (position within the document + 1).
    """
    angpt = config.arch == "angpt"
    if config.arch not in ("angpt", "ngpt"):
        raise ValueError(f"the reference implements anGPT and nGPT, not {config.arch!r}")
    d, H, f = config.hidden_size, config.num_attention_heads, config.ffn_hidden_size
    dh = d // H
    B, T = tokens.shape

    # anGPT's constant factors (ANGPT.md); nGPT has none, it normalizes exactly instead.
    # nu_linear(n -> m) = sqrt(n / m): a unit vector through unit rows has E||W x||^2 = m / n.
    nu_qkv = math.sqrt(d / dh) if angpt else 1.0  # one head's slice of W_q h: d -> d_h
    nu_o = math.sqrt(dh / d) if angpt else 1.0  # H unit head outputs have squared norm H
    nu_uz = math.sqrt(d / f) if angpt else 1.0
    nu_down = math.sqrt(f / d) if angpt else 1.0
    nu_a = nu_act(d, f) if angpt else 1.0
    nu_att = config.nu_att if angpt else "none"

    def nu_lerp(alpha):  # E||(1 - alpha) h + alpha x||^2 = (1 - alpha)^2 + alpha^2
        return 1.0 / torch.sqrt((1 - alpha) ** 2 + alpha**2) if config.use_nu_lerp else 1.0

    def s(kind, name):
        return effective_scale(config, kind, w[name])

    # Which keys each query sees: causal, and within its document. (B, 1, T, T), all heads.
    visible = torch.ones(T, T, dtype=torch.bool, device=tokens.device).tril().expand(B, T, T)
    if document_ids is not None:
        visible = visible & (document_ids[:, :, None] == document_ids[:, None, :])
    visible = visible[:, None]
    t = visible.sum(-1, keepdim=True)  # (B, 1, T, 1): the 1-based position t = visible keys
    positions = torch.arange(T, device=tokens.device).expand(B, T) if position_ids is None else position_ids

    def heads(x):  # (B, T, d) -> (B, H, T, d_h)
        return x.view(B, T, H, dh).transpose(1, 2)

    h = w["E"][tokens]  # no factor: rows of E are unit / bounded
    for i in range(config.num_layers):
        p = f"layers.{i}."

        # Attention
        q = heads(nu_qkv * (h @ w[p + "W_q"].T))
        k = heads(nu_qkv * (h @ w[p + "W_k"].T))
        v = heads(nu_qkv * (h @ w[p + "W_v"].T))
        q, k = rope(q, positions, config.rope_theta), rope(k, positions, config.rope_theta)
        s_qk = s("s_qk", p + "s_qk").view(H, 1, dh)  # H x d_h entries, one vector per head
        q, k = s_qk * unit(q), s_qk * unit(k)
        logits = math.sqrt(dh) * (q @ k.transpose(-1, -2))
        logits = logits.masked_fill(~visible, float("-inf"))
        a = torch.softmax(logits, dim=-1)  # a_tj
        o = a @ v
        if nu_att == "dense":  # uniform attention over t keys: sum_j a_tj^2 = 1 / t
            o = torch.sqrt(t.to(o.dtype)) * o
        elif nu_att == "exact":  # (sum_j a_tj^2)^(-1/2), a constant in backward
            o = ((a**2).sum(-1, keepdim=True) ** -0.5).detach() * o
        elif nu_att == "gaussian":
            o = gaussian_nu_att(t, s_qk, dh) * o
        elif nu_att != "none":
            raise NotImplementedError(f"the reference has no nu_att {nu_att!r}")
        o = o.transpose(1, 2).reshape(B, T, d)  # concat_heads
        x_A = nu_o * (o @ w[p + "W_o"].T)
        alpha_A = s("alpha", p + "alpha_A")
        if angpt:
            h = nu_lerp(alpha_A) * (h + alpha_A * (x_A - h))
        else:
            h = unit(h + alpha_A * (unit(x_A) - h))

        # MLP (SwiGLU)
        u = nu_uz * (h @ w[p + "W_u"].T)
        z = nu_uz * (h @ w[p + "W_z"].T)
        u = s("s_u", p + "s_u") * u
        z = s("s_v", p + "s_v") * math.sqrt(d) * z  # gate entries at variance d / f
        a_mlp = nu_a * (u * (z * torch.sigmoid(z)))  # SiLU(z) = z sigmoid(z)
        x_M = nu_down * (a_mlp @ w[p + "W_down"].T)
        alpha_M = s("alpha", p + "alpha_M")
        if angpt:
            h = nu_lerp(alpha_M) * (h + alpha_M * (x_M - h))
        else:
            h = unit(h + alpha_M * (unit(x_M) - h))

    return s("s_z", "s_z") * (h @ w["W_out"].T)  # no final norm: h is about unit norm


# ----------------------------------------------------------------------------------------------
# The weight constraint after each optimizer step


def norm_dim(name: str, mode: str) -> int:
    """The axis a matrix's unit vectors run along: 1 (rows, along the input) or 0 (columns).

    anGPT's bound acts on rows of every matrix. nGPT normalizes along the embedding dimension:
    rows of E, W_out, W_q, W_k, W_v, W_u, W_z, but columns of W_o and W_down, whose output is
    the embedding. Unconstrained (``none``) matrices still start with unit rows.
    """
    if mode == "normalize" and symbol(name) in ("W_o", "W_down"):
        return 0
    return 1


def project_weights(w: dict[str, torch.Tensor], mode: str) -> dict[str, torch.Tensor]:
    """ANGPT.md's projection of every matrix: ``w_i / max(1, ||w_i||)`` (bound) or
    ``w_i / ||w_i||`` (normalize); ``none`` and the learnable scales are left alone."""
    out = {}
    for name, x in w.items():
        x = x.detach()
        if mode == "none" or symbol(name) not in MATRICES:
            out[name] = x.clone()
            continue
        norms = x.norm(dim=norm_dim(name, mode), keepdim=True)
        out[name] = x / torch.clamp(norms, min=1.0) if mode == "bound" else x / norms
    return out
