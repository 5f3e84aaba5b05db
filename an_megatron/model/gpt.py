"""The model: token embedding, L blocks, output head, loss; one code path for three architectures.

Read top to bottom, this is ANGPT.md's forward pass. Where anGPT, nGPT and GPT+ differ, the
block calls a component chosen by the architecture's ``ArchSpec`` (``arch.py``); anGPT's
constant factors ``nu`` (``factors.py``; 1 in the other two) are folded into neighbouring
multiplications, as each class's docstring derives, and ``Tap`` points record the quantities
of ANGPT.md for ``tools/measure_norms.py``. Tensors are
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
from an_megatron.model.scales import Tap


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


def causal_attention(q, k, v, softmax_scale: float, exact_nu_att: bool) -> torch.Tensor:
    """Per-head causal softmax attention on ``(b, s, heads, d_h)``.

    Through ``scaled_dot_product_attention``, unless ``exact_nu_att``: the exact factor needs
    ``sum_j a_tj^2`` per query, which SDPA does not expose, so that path computes the logits
    explicitly and multiplies each head's output by ``nu_att_exact`` from two log-sum-exps,
    as a constant in backward.
    """
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (b, heads, s, d_h)
    if exact_nu_att:
        T = q.shape[2]
        logits = (q @ k.transpose(-1, -2)) * softmax_scale
        logits = logits.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        o = torch.exp(logits - lse) @ v
        o = o * nu_att_exact(lse, torch.logsumexp(2 * logits, dim=-1, keepdim=True)).detach()
    else:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=softmax_scale)
    return o.transpose(1, 2)


class Attention(nn.Module):
    """``x_A = nu_o W_o concat_h(nu_att * softmax(.) (nu_qkv W_v h))`` with per-head QK-norm.

    anGPT's constant factors are folded so they cost one elementwise pass, not four: ``nu_qkv``
    on q and k is undone by the exact QK-norm that follows, and on v it is a constant through
    the (linear) attention average and ``W_o``, as are ``nu_o`` and the dense ``nu_att(t)``
    (the same for every head); so all of them become one per-position factor on the output.
    The taps record the quantities of ANGPT.md with their factors (for measure_norms).
    """

    def __init__(self, config: ModelConfig, spec: ArchSpec, layer: int):
        super().__init__()
        d, dh = config.hidden_size, config.head_dim
        self.local_heads = config.num_attention_heads // config.tensor_model_parallel_size
        self.head_dim, self.rope_theta = dh, config.rope_theta
        self.qkv = column_parallel(config, f"layers.{layer}.attention.qkv", d, 3 * d, stride=3)
        self.nu_qkv = nu_linear(d, dh) if spec.factors else 1.0
        self.qk_norm = spec.qk_norm(config)
        self.softmax_scale = spec.softmax_scale(dh)
        self.nu_att = config.nu_att if spec.factors else "none"
        self.factors = spec.factors
        self.proj = row_parallel(config, f"layers.{layer}.attention.proj", d, d)
        self.nu_o = nu_linear(dh, d) if spec.factors else 1.0
        self.tap_q, self.tap_k, self.tap_v, self.tap_heads, self.tap_out = Tap(), Tap(), Tap(), Tap(), Tap()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, s, _ = h.shape
        q, k, v = self.qkv(h)[0].view(b, s, 3, self.local_heads, self.head_dim).unbind(2)
        self.tap_q(q, self.nu_qkv), self.tap_k(k, self.nu_qkv), self.tap_v(v, self.nu_qkv)
        q, k = self.qk_norm(apply_rope(q, self.rope_theta), apply_rope(k, self.rope_theta))
        o = causal_attention(q, k, v, self.softmax_scale, exact_nu_att=self.nu_att == "exact")
        if not self.factors:
            self.tap_heads(o)
            return self.tap_out(self.proj(o.reshape(b, s, -1))[0])
        # nu_att(t) per position when dense (1 otherwise: exact is already in o)
        per_position = nu_att_dense(s, o.dtype, o.device) if self.nu_att == "dense" else o.new_ones(s)
        self.tap_heads(o, self.nu_qkv * per_position[:, None, None])
        return self.tap_out(self.proj(o.reshape(b, s, -1))[0] * (self.nu_qkv * self.nu_o * per_position[:, None]))


class MLP(nn.Module):
    """SwiGLU: ``W_down (u * SiLU(z))`` with ``u = W_u h``, ``z = W_z h`` (fused, one matmul).

    anGPT's ``x_M = nu_down W_down(nu_act (s_u nu_uz u) * SiLU(s_v sqrt(d) nu_uz z))``: the
    product is linear in ``u`` and ``W_down`` is linear, so ``nu_uz nu_act nu_down`` joins
    ``s_u`` and ``nu_uz`` joins ``s_v``: the factors cost no elementwise pass at all.
    """

    def __init__(self, config: ModelConfig, spec: ArchSpec, layer: int):
        super().__init__()
        d, f = config.hidden_size, config.ffn_hidden_size
        self.up_gate = column_parallel(config, f"layers.{layer}.mlp.up_gate", d, 2 * f, stride=2)
        self.nu_uz = nu_linear(d, f) if spec.factors else 1.0
        self.nu_down = nu_linear(f, d) if spec.factors else 1.0
        u_factor = self.nu_uz * (nu_act(d, f) if spec.factors else 1.0) * self.nu_down
        self.gate_scales = spec.gate_scales(config, u_factor=u_factor, z_factor=self.nu_uz)
        self.down = row_parallel(config, f"layers.{layer}.mlp.down", f, d)
        self.tap_u, self.tap_act, self.tap_out = Tap(tp_sharded=True), Tap(tp_sharded=True), Tap()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        u, z = self.up_gate(h)[0].chunk(2, dim=-1)
        self.tap_u(u, self.nu_uz)
        u, z = self.gate_scales(u, z)
        a = u * F.silu(z)
        self.tap_act(a, 1.0 / self.nu_down)
        return self.tap_out(self.down(a)[0])


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
