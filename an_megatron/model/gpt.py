"""The model: token embedding, L blocks, output head, loss; one code path for three architectures.

Read top to bottom, this is ANGPT.md's forward pass. Where anGPT, nGPT and GPT+ differ, the
block calls a component chosen by the architecture's ``ArchSpec`` (``arch.py``); the spec's
constant factors ``nu`` (``factors.Factors``: anGPT's, all 1 in the other two) are folded into
neighbouring multiplications, as each class's docstring derives, and ``Tap`` points record the
quantities of ANGPT.md for ``tools/measure_norms.py``. Tensors are
``(batch, seq, ...)``; under tensor parallelism a rank computes ``H / tp`` heads, ``f / tp``
MLP units and ``V / tp`` logits, through megatron-core's parallel layers (``layers.py``).
The model itself contains no process-group code; sequence parallelism is applied to a built
model by ``parallel/sequence_parallel.py``.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
from torch import nn

from an_megatron.model.arch import ArchSpec
from an_megatron.model.attention import attention, attention_with_exact_nu_att, visible_keys
from an_megatron.model.components import compiled, swiglu
from an_megatron.model.config import ModelConfig
from an_megatron.model.factors import nu_att_dense, nu_att_gaussian
from an_megatron.model.layers import column_parallel, row_parallel, row_scaled, vocab_embedding
from an_megatron.model.recompute import run_blocks, selective
from an_megatron.model.scales import Tap


@lru_cache(maxsize=8)
def _inv_freq(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    return theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)


@lru_cache(maxsize=8)
def _rope_tables(seq_len: int, head_dim: int, theta: float, device: torch.device):
    return _rope_cos_sin(torch.arange(seq_len, dtype=torch.float32, device=device), head_dim, theta)


def _rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float):
    angles = positions.float()[..., None] * _inv_freq(head_dim, theta, positions.device)
    angles = torch.cat([angles, angles], dim=-1).unsqueeze(-2)  # (..., s, 1, d_h): broadcast over heads
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, theta: float, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Rotary position embedding on ``(b, s, heads, d_h)`` (rotate-half convention), at positions
    ``0..s-1`` or at ``position_ids`` ``(b, s)`` (which restart at each document with
    ``--reset-position-ids``). A rotation: it keeps each head's norm."""
    if position_ids is None:
        cos, sin = _rope_tables(x.shape[1], x.shape[-1], theta, x.device)
    else:
        cos, sin = _rope_cos_sin(position_ids, x.shape[-1], theta)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat([-x2, x1], dim=-1) * sin.to(x.dtype)


class Attention(nn.Module):
    """``x_A = nu_o W_o concat_h(nu_att * softmax(.) (nu_qkv W_v h))`` with per-head QK-norm.

    anGPT's constant factors are folded so they cost one elementwise pass, not four: ``nu_qkv``
    on q and k is undone by the exact QK-norm that follows, and on v it is a constant through
    the (linear) attention average and ``W_o``, as is ``nu_o``; so both join ``nu_att`` (per
    query position, and per head for ``gaussian`` and ``exact``) in one multiplication of the
    head outputs before ``W_o``. The taps record the quantities of ANGPT.md with their factors
    (for measure_norms).

    ``document_ids`` ``(b, s)``: a query sees only keys of its own document (and ``t``, the
    number of keys it sees, restarts there); ``position_ids`` ``(b, s)``: RoPE's positions.
    """

    def __init__(self, config: ModelConfig, spec: ArchSpec, layer: int):
        super().__init__()
        d, dh = config.hidden_size, config.head_dim
        self.local_heads = config.num_attention_heads // config.tensor_model_parallel_size
        self.head_dim, self.rope_theta = dh, config.rope_theta
        self.factors = spec.factors(config)
        self.qkv = column_parallel(config, f"layers.{layer}.attention.qkv", d, 3 * d, stride=3)
        self.qk_norm = spec.qk_norm(config)
        self.softmax_scale = spec.softmax_scale(dh)
        self.proj = row_parallel(config, f"layers.{layer}.attention.proj", d, d)
        self.core = selective(self._core, "attention_core", config)
        self.rope_qk_norm = selective(self._rope_qk_norm, "rope_qk_norm", config)
        self.tap_q, self.tap_k, self.tap_v, self.tap_heads, self.tap_out = Tap(), Tap(), Tap(), Tap(), Tap()

    def forward(self, h: torch.Tensor, position_ids=None, document_ids=None) -> torch.Tensor:
        o = self.core(self.qkv(h)[0], position_ids, document_ids)
        return self.tap_out(self.proj(o)[0])

    def _core(self, qkv: torch.Tensor, position_ids, document_ids) -> torch.Tensor:
        """From the qkv matmul's output ``(b, s, 3 d / tp)`` to the proj's input ``(b, s, d / tp)``:
        RoPE, QK-norm, attention and the folded factors (what selective recomputation can redo)."""
        b, s, _ = qkv.shape  # the whole sequence (under sequence parallelism h holds a shard of it)
        nu_qkv, nu_o = self.factors.nu_qkv, self.factors.nu_o
        q, k, v = qkv.view(b, s, 3, self.local_heads, self.head_dim).unbind(2)
        self.tap_q(q, nu_qkv), self.tap_k(k, nu_qkv), self.tap_v(v, nu_qkv)
        q, k = self.rope_qk_norm(q, k, position_ids)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (b, heads, s, d_h) for the kernels
        if self.factors.nu_att == "exact":
            o, nu = attention_with_exact_nu_att(q, k, v, self.softmax_scale, document_ids)
            nu = nu.transpose(1, 2)  # (b, s, heads, 1)
        else:
            o = attention(q, k, v, self.softmax_scale, document_ids)
            nu = self._nu_att(document_ids, s, o.device)
            nu = nu.to(o.dtype) if torch.is_tensor(nu) else nu  # computed in fp32; keep bf16 activations bf16
        o = o.transpose(1, 2)  # (b, s, heads, d_h)
        self.tap_heads(o, nu_qkv * nu)
        factor = nu_qkv * nu_o * nu  # nu_att with the constants (linear through the average and W_o)
        if torch.is_tensor(factor) or factor != 1.0:  # no pass for nGPT and GPT+ (all factors 1)
            o = o * factor
        return o.reshape(b, s, -1)

    def _rope_qk_norm(self, q: torch.Tensor, k: torch.Tensor, position_ids) -> tuple[torch.Tensor, torch.Tensor]:
        return self.qk_norm(apply_rope(q, self.rope_theta, position_ids), apply_rope(k, self.rope_theta, position_ids))

    def _nu_att(self, document_ids, s: int, device):
        """The predicted ``nu_att`` per query (and head), broadcastable to ``(b, s, heads, 1)``."""
        if self.factors.nu_att == "none":
            return 1.0
        t = visible_keys(document_ids, s, device)  # (s,) or (b, s)
        if self.factors.nu_att == "dense":
            return nu_att_dense(t.float())[..., None, None]
        # gaussian: a constant in backward, like every factor (no gradient into s_qk through it)
        with torch.no_grad():
            return nu_att_gaussian(t, self.qk_norm.logit_variance(self.softmax_scale).float())[..., None]


class MLP(nn.Module):
    """SwiGLU: ``W_down (u * SiLU(z))`` with ``u = W_u h``, ``z = W_z h`` (fused, one matmul).

    anGPT's ``x_M = nu_down W_down(nu_act (s_u nu_uz u) * SiLU(s_v sqrt(d) nu_uz z))``: the
    product is linear in ``u`` and ``W_down`` is linear, so ``nu_uz nu_act nu_down`` joins
    ``s_u`` and ``nu_uz`` joins ``s_v``. Both scales are per output channel of ``W_u; W_z``,
    so they scale its rows (``row_scaled``): the factors and scales cost no pass over the
    ``(b, s, f)`` activations.
    """

    def __init__(self, config: ModelConfig, spec: ArchSpec, layer: int):
        super().__init__()
        d, f = config.hidden_size, config.ffn_hidden_size
        self.factors = spec.factors(config)
        nu_uz, nu_act, nu_down = self.factors.nu_uz, self.factors.nu_act, self.factors.nu_down
        self.up_gate = column_parallel(config, f"layers.{layer}.mlp.up_gate", d, 2 * f, stride=2)
        self.gate_scales = spec.gate_scales(config, u_factor=nu_uz * nu_act * nu_down, z_factor=nu_uz)
        self.down = row_parallel(config, f"layers.{layer}.mlp.down", f, d)
        self.swiglu = selective(compiled(swiglu, config), "swiglu", config)
        self.tap_u, self.tap_act, self.tap_out = Tap(tp_sharded=True), Tap(tp_sharded=True), Tap()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        row_scale = self.gate_scales.row_scale()  # [s_u * nu_uz nu_act nu_down; s_v * sqrt(d) nu_uz], or None
        u, z = row_scaled(self.up_gate, h, row_scale).chunk(2, dim=-1)
        # u came out scaled; the tap records nu_uz W_u h (a detached f-vector: nothing in training)
        u_tap_scale = 1.0 if row_scale is None else self.factors.nu_uz / row_scale[: u.shape[-1]].detach()
        self.tap_u(u, u_tap_scale)
        a = self.swiglu(u, z)
        self.tap_act(a, 1.0 / self.factors.nu_down)
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
        # the norms and residual updates as called (recomputed in backward if selective asks)
        self.norm_attention_input = selective(self.attention_norm, "pre_norm", config)
        self.norm_mlp_input = selective(self.mlp_norm, "pre_norm", config)
        self.update_after_attention = selective(self.attention_residual, "residual", config)
        self.update_after_mlp = selective(self.mlp_residual, "residual", config)

    def forward(self, h: torch.Tensor, position_ids=None, document_ids=None) -> torch.Tensor:
        x_a = self.attention(self.norm_attention_input(h), position_ids, document_ids)
        h = self.tap_h_attention(self.update_after_attention(h, x_a))
        return self.tap_h_mlp(self.update_after_mlp(h, self.mlp(self.norm_mlp_input(h))))


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
    anGPT use the raw (about unit-norm) h and a learnable temperature ``s_z``, per vocabulary
    entry, so it scales the rows of ``W_out`` (``row_scaled``), not the logits."""

    def __init__(self, config: ModelConfig, spec: ArchSpec):
        super().__init__()
        self.final_norm = spec.final_norm(config)
        self.output = column_parallel(config, "output", config.hidden_size, config.vocab_size)
        self.logit_scale = spec.logit_scale(config)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return row_scaled(self.output, self.final_norm(h), self.logit_scale.row_scale())


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over unmasked tokens, from vocab-parallel logits."""
    # megatron-core's vocab-parallel cross-entropy works in place on its input and views it as
    # (tokens, V / tp): give it a contiguous copy (the logits may be a transposed view).
    losses = vocab_parallel_cross_entropy(logits.float().clone(memory_format=torch.contiguous_format), labels)
    if loss_mask is None:
        return losses.mean()
    loss_mask = loss_mask.float()
    return (losses * loss_mask).sum() / loss_mask.sum().clamp_min(1.0)


class GPTModel(nn.Module):
    """anGPT, nGPT or GPT+ (``config.arch``), on megatron-core's tensor-parallel layers."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        spec = config.spec
        self.embedding = Embedding(config)
        self.layers = nn.ModuleList(Block(config, spec, i) for i in range(config.num_layers))
        self.head = Head(config, spec)

    def forward(
        self, tokens: torch.Tensor, labels=None, loss_mask=None, position_ids=None, document_ids=None
    ) -> torch.Tensor:
        """Vocab-parallel logits ``(b, s, V / tp)`` for token ids ``(b, s)``; with ``labels``,
        the mean loss instead (so a DeepSpeed engine's forward returns the loss).
        ``document_ids`` ``(b, s)`` keep attention inside each packed document;
        ``position_ids`` ``(b, s)`` are RoPE's positions (default ``0..s-1``)."""
        h = self.embedding(tokens)
        h = run_blocks(self.layers, h, self.config, lambda block, x: block(x, position_ids, document_ids))
        logits = self.head(h)
        return logits if labels is None else lm_loss(logits, labels, loss_mask)

    def loss(self, tokens, labels, loss_mask=None, position_ids=None, document_ids=None) -> torch.Tensor:
        return self(tokens, labels, loss_mask, position_ids, document_ids)
