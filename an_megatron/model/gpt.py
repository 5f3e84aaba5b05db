"""The model: token embedding, L blocks, output head, loss; one code path for three architectures.

Read top to bottom, this is ANGPT.md's forward pass. Where anGPT, nGPT and GPT+ differ, the
block calls a component chosen by the architecture's ``ArchSpec`` (``arch.py``); anGPT's
constant factors ``nu`` are ``Factor`` modules (no-ops in the other two). Tensors are
``(batch, seq, ...)``; under tensor parallelism a rank computes ``H / tp`` heads, ``f / tp``
MLP units and ``V / tp`` logits, through megatron-core's parallel layers (``layers.py``).
The model itself contains no process-group code.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
from torch import nn

from an_megatron.model.arch import ARCH_SPECS, ArchSpec
from an_megatron.model.config import ModelConfig
from an_megatron.model.factors import nu_act, nu_att_dense, nu_att_exact, nu_linear
from an_megatron.model.layers import column_parallel, row_parallel, vocab_embedding
from an_megatron.model.scales import Tap, factor


@lru_cache(maxsize=8)
def _rope_tables(seq_len: int, head_dim: int, theta: float, device: torch.device):
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)[:, None, :]  # (s, 1, d_h): broadcast over heads
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary position embedding on ``(b, s, heads, d_h)`` (rotate-half convention). A rotation:
    it keeps each head's norm."""
    cos, sin = _rope_tables(x.shape[1], x.shape[-1], theta, x.device)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat([-x2, x1], dim=-1) * sin.to(x.dtype)


def causal_attention(q, k, v, softmax_scale: float, nu_att: str) -> torch.Tensor:
    """Per-head causal softmax attention on ``(b, s, heads, d_h)``, followed by ``nu_att``.

    ``dense`` and ``none`` run through ``scaled_dot_product_attention``. ``exact`` needs
    ``sum_j a_tj^2`` per query, which SDPA does not expose, so it computes the logits
    explicitly and takes the factor from two log-sum-exps, as a constant in backward.
    """
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (b, heads, s, d_h)
    if nu_att == "exact":
        T = q.shape[2]
        logits = (q @ k.transpose(-1, -2)) * softmax_scale
        logits = logits.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        o = torch.exp(logits - lse) @ v
        o = o * nu_att_exact(lse, torch.logsumexp(2 * logits, dim=-1, keepdim=True)).detach()
    else:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=softmax_scale)
        if nu_att == "dense":
            o = o * nu_att_dense(q.shape[2], o.dtype, o.device)[:, None]
    return o.transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, spec: ArchSpec, layer: int):
        super().__init__()
        d, dh = config.hidden_size, config.head_dim
        self.local_heads = config.num_attention_heads // config.tensor_model_parallel_size
        self.head_dim, self.rope_theta = dh, config.rope_theta
        self.qkv = column_parallel(config, f"layers.{layer}.attention.qkv", d, 3 * d, stride=3)
        self.nu_qkv = factor(nu_linear(d, dh), spec.factors)
        self.qk_norm = spec.qk_norm(config)
        self.softmax_scale = spec.softmax_scale(dh)
        self.nu_att = config.nu_att if spec.factors else "none"
        self.proj = row_parallel(config, f"layers.{layer}.attention.proj", d, d)
        self.nu_o = factor(nu_linear(dh, d), spec.factors)
        self.tap_q, self.tap_k, self.tap_v, self.tap_heads, self.tap_out = Tap(), Tap(), Tap(), Tap(), Tap()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, s, _ = h.shape
        qkv = self.nu_qkv(self.qkv(h)[0]).view(b, s, 3, self.local_heads, self.head_dim)
        q, k, v = self.tap_q(qkv[:, :, 0]), self.tap_k(qkv[:, :, 1]), self.tap_v(qkv[:, :, 2])
        q, k = self.qk_norm(apply_rope(q, self.rope_theta), apply_rope(k, self.rope_theta))
        o = self.tap_heads(causal_attention(q, k, v, self.softmax_scale, self.nu_att))
        return self.tap_out(self.nu_o(self.proj(o.reshape(b, s, -1))[0]))


class MLP(nn.Module):
    """SwiGLU: ``W_down (u * SiLU(z))`` with ``u = W_u h``, ``z = W_z h`` (fused, one matmul)."""

    def __init__(self, config: ModelConfig, spec: ArchSpec, layer: int):
        super().__init__()
        d, f = config.hidden_size, config.ffn_hidden_size
        self.up_gate = column_parallel(config, f"layers.{layer}.mlp.up_gate", d, 2 * f, stride=2)
        self.nu_uz = factor(nu_linear(d, f), spec.factors)
        self.gate_scales = spec.gate_scales(config)
        self.nu_act = factor(nu_act(d, f), spec.factors)
        self.down = row_parallel(config, f"layers.{layer}.mlp.down", f, d)
        self.nu_down = factor(nu_linear(f, d), spec.factors)
        self.tap_u, self.tap_act, self.tap_out = Tap(tp_sharded=True), Tap(tp_sharded=True), Tap()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        u, z = self.nu_uz(self.up_gate(h)[0]).chunk(2, dim=-1)
        u, z = self.gate_scales(self.tap_u(u), z)
        a = self.tap_act(self.nu_act(u * F.silu(z)))
        return self.tap_out(self.nu_down(self.down(a)[0]))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, spec: ArchSpec, layer: int):
        super().__init__()
        self.attention_norm = spec.pre_norm(config)
        self.attention = Attention(config, spec, layer)
        self.attention_residual = spec.residual(config)
        self.mlp_norm = spec.pre_norm(config)
        self.mlp = MLP(config, spec, layer)
        self.mlp_residual = spec.residual(config)
        self.tap_h_attention, self.tap_h_mlp = Tap(), Tap()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.tap_h_attention(self.attention_residual(h, self.attention(self.attention_norm(h))))
        return self.tap_h_mlp(self.mlp_residual(h, self.mlp(self.mlp_norm(h))))


class Embedding(nn.Module):
    """``h = E[token]``; no factor (rows of E start at unit norm and stay in the unit ball)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.word_embeddings = vocab_embedding(config, "embedding")
        self.tap_out = Tap()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tap_out(self.word_embeddings(tokens))


class Head(nn.Module):
    """This rank's slice of the logits, ``(b, s, V / tp)``: GPT+ normalizes h first; nGPT and
    anGPT use the raw (about unit-norm) h and a learnable temperature ``s_z``."""

    def __init__(self, config: ModelConfig, spec: ArchSpec):
        super().__init__()
        self.final_norm = spec.final_norm(config)
        self.output = column_parallel(config, "output", config.hidden_size, config.vocab_size)
        self.logit_scale = spec.logit_scale(config)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.logit_scale(self.output(self.final_norm(h))[0])


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over unmasked tokens, from vocab-parallel logits."""
    # megatron-core's vocab-parallel cross-entropy works in place on its input: give it a copy.
    losses = vocab_parallel_cross_entropy(logits.float().clone(), labels)
    if loss_mask is None:
        return losses.mean()
    loss_mask = loss_mask.float()
    return (losses * loss_mask).sum() / loss_mask.sum().clamp_min(1.0)


class GPTModel(nn.Module):
    """anGPT, nGPT or GPT+ (``config.arch``), on megatron-core's tensor-parallel layers."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        spec = ARCH_SPECS[config.arch]
        self.embedding = Embedding(config)
        self.layers = nn.ModuleList(Block(config, spec, i) for i in range(config.num_layers))
        self.head = Head(config, spec)

    def forward(self, tokens: torch.Tensor, labels=None, loss_mask=None) -> torch.Tensor:
        """Vocab-parallel logits ``(b, s, V / tp)`` for token ids ``(b, s)``; with ``labels``,
        the mean loss instead (so a DeepSpeed engine's forward returns the loss)."""
        h = self.embedding(tokens)
        for block in self.layers:
            h = block(h)
        logits = self.head(h)
        return logits if labels is None else lm_loss(logits, labels, loss_mask)

    def loss(self, tokens, labels, loss_mask=None) -> torch.Tensor:
        return self(tokens, labels, loss_mask)
