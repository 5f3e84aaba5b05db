"""anGPT, nGPT and GPT+ in their plain inference form, for Hugging Face ``transformers``.

Shipped inside every exported model directory (``tools/export_hf.py``) and loaded with
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)``; it imports only torch
and transformers, so the directory works without ``an_megatron`` installed.

The export folds every constant factor, and every learned scale a weight can absorb, into that
weight (``an_megatron/hf/export.py`` derives each fold), so what is left here is what no weight
can hold:

- **The QK normalization** (all three architectures): a per-head norm of ``q`` and ``k`` after
  RoPE, a nonlinear function of each token. ``q . k`` with gains ``g_q``, ``g_k`` on both sides
  equals ``(g_q g_k) q . k``, so the gains (anGPT's and nGPT's ``s_qk`` twice, GPT+'s two RMSNorm
  gains) and the softmax scale are one per-head vector ``q_scale`` on ``q``; ``k`` is only
  normalized, which is also what the cache holds.
- **The attention factor** ``nu_att`` (anGPT): it depends on the query's position ``t`` (the
  number of keys it sees), and with ``gaussian`` also on the head, so it multiplies the head
  outputs after the attention average; no weight sees ``t``. ``t`` is the token's absolute
  position in the cache plus one (left padding excluded). The ``gaussian`` factor is exported as
  a per-head table of ``log E[sum_j a_tj^2]`` over a log-spaced grid of ``t`` (the training
  code's own table, already interpolated at each head's ``s_qk``), and interpolated here over
  ``log t`` exactly as in training; a lookup table over positions up to
  ``max_position_embeddings`` is built from it on first use.
- **The residual mix.** anGPT's ``nu_lerp(alpha) (h + alpha (x - h))`` is ``a * h + b * x``:
  ``b`` is folded into the rows of ``W_o`` and ``W_down`` (so ``x`` arrives scaled), ``a`` stays
  (it multiplies the residual stream, which no weight produces). nGPT's
  ``Norm(h + alpha (Norm(x) - h))`` normalizes twice; nothing folds. GPT+ adds.
- **GPT+'s RMSNorms** before attention, MLP and the output head: the division by the RMS is
  computed; their gains are folded into the columns of the weight that follows (``W_qkv``,
  ``W_u;W_z``, ``W_out``), so the baseline gets the same folding as anGPT.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_angpt import AnGPTConfig


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float):
    """RoPE's tables at ``positions`` ``(b, s)``: ``(b, s, 1, d_h)`` (rotate-half convention,
    computed in fp32 as in training)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1).unsqueeze(-2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class AnGPTAttention(nn.Module):
    def __init__(self, config: AnGPTConfig, layer_idx: int):
        super().__init__()
        d, self.heads, self.head_dim = config.hidden_size, config.num_attention_heads, config.head_dim
        self.layer_idx, self.eps, self.nu_att = layer_idx, config.qk_norm_eps, config.nu_att
        self.qkv_proj = nn.Linear(d, 3 * d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.q_scale = nn.Parameter(torch.ones(self.heads, self.head_dim))
        if config.nu_att == "gaussian":
            self.register_buffer("nu_att_log_grid", torch.zeros(config.nu_att_key_points, self.heads))

    def forward(self, h, cos, sin, mask, nu, cache):
        b, s, _ = h.shape
        q, k, v = self.qkv_proj(h).view(b, s, 3, self.heads, self.head_dim).unbind(2)
        q = F.rms_norm(apply_rope(q, cos, sin), (self.head_dim,), eps=self.eps) * self.q_scale
        k = F.rms_norm(apply_rope(k, cos, sin), (self.head_dim,), eps=self.eps)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (b, heads, s, d_h)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        if self.nu_att == "exact":
            o, nu = _attention_exact_nu(q, k, v, mask)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.bias, is_causal=mask.is_causal, scale=1.0)
        if nu is not None:
            o = o * nu.to(o.dtype)
        return self.o_proj(o.transpose(1, 2).reshape(b, s, -1))


def _attention_exact_nu(q, k, v, mask):
    """Attention with explicit logits and ``nu_att = exp(LSE(s) - LSE(2 s) / 2)`` per query and
    head (the exact factor: it depends on this query's logits, so it is computed, not folded)."""
    logits = (q @ k.transpose(-1, -2)).float()
    allowed = mask.allowed(q.shape[2], k.shape[2], q.device)
    logits = logits.masked_fill(~allowed, float("-inf"))
    lse, lse2 = torch.logsumexp(logits, -1, keepdim=True), torch.logsumexp(2 * logits, -1, keepdim=True)
    o = torch.exp(logits - lse).to(v.dtype) @ v
    return o, torch.exp(lse - 0.5 * lse2)


class AttentionMask:
    """Which keys each query sees: every earlier key (causal, with a cache: every key up to its
    own position) and, with a padding mask, only non-padding keys (plus itself, so a padding
    query gets finite values that nothing reads). ``bias`` for SDPA is None where ``is_causal``
    or no mask says it all."""

    def __init__(self, q_len: int, past: int, padding: torch.Tensor | None, device: torch.device):
        self.q_len, self.past, self.padding = q_len, past, padding
        self.is_causal = padding is None and past == 0 and q_len > 1
        self.bias = None
        if padding is not None or (past > 0 and q_len > 1):
            self.bias = self.allowed(q_len, past + q_len, device)

    def allowed(self, q_len: int, kv_len: int, device) -> torch.Tensor:
        qpos = self.past + torch.arange(q_len, device=device)[:, None]
        kpos = torch.arange(kv_len, device=device)[None, :]
        allowed = kpos <= qpos
        if self.padding is not None:
            allowed = (allowed & self.padding[:, None, None, -kv_len:].bool()) | (kpos == qpos)
        return allowed


class AnGPTBlock(nn.Module):
    def __init__(self, config: AnGPTConfig, layer_idx: int):
        super().__init__()
        d, f, self.arch, self.eps = config.hidden_size, config.intermediate_size, config.arch, config.rms_norm_eps
        self.attn = AnGPTAttention(config, layer_idx)
        self.gate_up_proj = nn.Linear(d, 2 * f, bias=False)  # [u; z]: the SwiGLU's value and gate
        self.down_proj = nn.Linear(f, d, bias=False)
        if self.arch != "gptplus":  # anGPT: the residual stream's factor a; nGPT: alpha
            self.attn_residual = nn.Parameter(torch.ones(d))
            self.mlp_residual = nn.Parameter(torch.ones(d))

    def _residual(self, h, x, scale):
        if self.arch == "angpt":
            return torch.addcmul(x, h, scale)  # a * h + (b * x, b folded into the weight)
        if self.arch == "ngpt":
            return F.normalize(torch.lerp(h, F.normalize(x, dim=-1), scale), dim=-1)
        return h + x

    def forward(self, h, cos, sin, mask, nu, cache):
        if self.arch == "gptplus":
            x = self.attn(F.rms_norm(h, (h.shape[-1],), eps=self.eps), cos, sin, mask, nu, cache)
            h = h + x
            u, z = self.gate_up_proj(F.rms_norm(h, (h.shape[-1],), eps=self.eps)).chunk(2, dim=-1)
            return h + self.down_proj(u * F.silu(z))
        h = self._residual(h, self.attn(h, cos, sin, mask, nu, cache), self.attn_residual)
        u, z = self.gate_up_proj(h).chunk(2, dim=-1)
        return self._residual(h, self.down_proj(u * F.silu(z)), self.mlp_residual)


class AnGPTPreTrainedModel(PreTrainedModel):
    config_class = AnGPTConfig
    config: AnGPTConfig
    base_model_prefix = "model"
    _no_split_modules = ["AnGPTBlock"]
    _supports_sdpa = True

    def _init_weights(self, module):
        # Only for a model built from a configuration alone (from_pretrained loads every weight).
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)


class AnGPTModel(AnGPTPreTrainedModel):
    def __init__(self, config: AnGPTConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(AnGPTBlock(config, i) for i in range(config.num_hidden_layers))
        self._nu_tables = None  # (key, (layers, heads, P) table of the gaussian nu_att), built on first use
        self.post_init()

    def _gaussian_nu_att(self, t: torch.Tensor) -> torch.Tensor:
        """``(layers, b, heads, s, 1)`` gaussian factors for key counts ``t`` ``(b, s)``: the training
        code's bilinear interpolation, finished here over ``log t`` on each head's exported grid."""
        buffers = [block.attn.nu_att_log_grid for block in self.layers]
        P = self.config.max_position_embeddings
        key = (tuple(int(g._version) for g in buffers), buffers[0].device, P)
        if self._nu_tables is None or self._nu_tables[0] != key:
            grids = torch.stack([g.float() for g in buffers])  # (L, K, heads)
            positions = torch.arange(1, P + 1, device=grids.device)
            self._nu_tables = (key, grids, _interpolate_grid(grids, positions, self.config))
        _, grids, table = self._nu_tables  # table: (L, P, heads)
        if int(t.max()) <= P:
            nu = table[:, t - 1]
        else:  # past the lookup table: the same interpolation, at these positions
            nu = _interpolate_grid(grids, t.reshape(-1), self.config).view(len(buffers), *t.shape, -1)
        return nu.movedim(-1, -2)[..., None]

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None):
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, s = h.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        padding = attention_mask if attention_mask is not None and not bool(attention_mask.all()) else None
        if position_ids is None:
            if padding is not None:  # left padding: a token's position counts only real tokens
                position_ids = (padding.long().cumsum(-1) - 1).clamp_min(0)[:, -s:]
            else:
                position_ids = (past + torch.arange(s, device=h.device))[None].expand(b, s)
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta)
        cos, sin = cos.to(h.dtype), sin.to(h.dtype)
        mask = AttentionMask(s, past, padding, h.device)
        t = position_ids + 1  # keys each query sees: its absolute position in the cache, plus one
        nus = [None] * len(self.layers)
        if self.config.nu_att == "dense":
            nus = [t.float().sqrt()[:, None, :, None]] * len(self.layers)
        elif self.config.nu_att == "gaussian":
            nus = list(self._gaussian_nu_att(t))
        for block, nu in zip(self.layers, nus):
            h = block(h, cos, sin, mask, nu, cache)
        if self.config.arch == "gptplus":
            h = F.rms_norm(h, (h.shape[-1],), eps=self.config.rms_norm_eps)
        return h


def _interpolate_grid(grids: torch.Tensor, t: torch.Tensor, config: AnGPTConfig) -> torch.Tensor:
    """``exp(-log E[sum a^2] / 2)`` at key counts ``t`` ``(n,)`` from per-head grids ``(L, K, heads)``
    over ``log t`` (``K`` points from 1 to ``nu_att_keys_max``): ``(L, n, heads)``."""
    K = config.nu_att_key_points
    pos = t.float().log() * ((K - 1) / math.log(config.nu_att_keys_max))
    j = pos.floor().long().clamp(0, K - 2)
    g = (pos - j).clamp(0, 1)
    return torch.exp(-0.5 * torch.lerp(grids[:, j], grids[:, j + 1], g[:, None]))


class AnGPTForCausalLM(AnGPTPreTrainedModel, GenerationMixin):
    def __init__(self, config: AnGPTConfig):
        super().__init__(config)
        self.model = AnGPTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache: Cache | None = None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        past_key_values=None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        cache = cache if cache is not None else past_key_values
        use_cache = use_cache if use_cache is not None else getattr(self.config, "use_cache", False)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        h = self.model(input_ids, attention_mask, position_ids, cache if use_cache else None, inputs_embeds)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache else None)
