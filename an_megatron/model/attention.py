"""Causal softmax attention on torch's fused kernels, with the log-sum-exp anGPT's exact factor needs.

The exact attention factor (``factors.nu_att_exact``) is ``exp(LSE(s) - LSE(2 s) / 2)`` per
query and head, for the attention logits ``s``. Fused (flash-style) kernels compute ``LSE(s)``
anyway, to normalize blockwise and to run backward, but torch's public
``scaled_dot_product_attention`` returns only the output. The aten ops behind it return the
log-sum-exp too; this module is the one place that calls them. ``LSE(2 s)`` is a second,
forward-only call at twice the softmax scale. Both keep the kernels' O(T) memory: no T x T
matrix of logits or weights is made. On a device or dtype without such a kernel, the logits are
computed explicitly (same values, O(T^2) memory).

Document masking: ``document_ids`` ``(b, T)`` (non-decreasing along T) let a query see only
the keys of its own document. On CUDA in bf16/fp16, torch's variable-length flash attention
(``torch.nn.attention.varlen.varlen_attn``) runs each document as its own causal sequence: no
mask is made at all. Elsewhere (CPU, fp32, and the exact factor's log-sum-exps) the mask is an
additive bias ``(b, 1, T, T)`` of 0 and -inf: ``b T^2`` elements, while the kernels still never
hold the logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from an_megatron.model.factors import nu_att_exact


def document_bias(document_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(b, 1, T, T)`` additive mask: 0 where query t may see key j (``j <= t``, same
    document), -inf elsewhere."""
    T = document_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=document_ids.device).tril()
    allowed = (document_ids[:, :, None] == document_ids[:, None, :]) & causal
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))[:, None]


def visible_keys(document_ids: torch.Tensor | None, seq_len: int, device) -> torch.Tensor:
    """How many keys each query sees: ``t = 1..T``, restarting at each document when
    ``document_ids`` is given (then ``(b, T)``, else ``(T,)``)."""
    idx = torch.arange(seq_len, device=device)
    if document_ids is None:
        return idx + 1
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values  # start of t's document
    return idx - first + 1


def _kernel_with_lse(q, k, v, scale: float, bias: torch.Tensor | None):
    """``(output, LSE)`` from a fused kernel, or None where none applies. ``(b, heads, T, d_h)``."""
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, bias is None, attn_mask=None if bias is None else bias.to(q.dtype), scale=scale
        )
        return out, lse
    if q.device.type == "cuda":
        # The memory-efficient kernel takes a bias and returns LSE (padded along the queries).
        if bias is not None:
            bias = bias.to(q.dtype).expand(q.shape[0], q.shape[1], -1, -1)
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, bias, True, 0.0, bias is None, scale=scale
        )[:2]
        return out, lse[..., : q.shape[2]]
    return None


def _explicit_with_lse(q, k, v, scale: float, bias: torch.Tensor | None):
    logits = (q @ k.transpose(-1, -2)) * scale
    if bias is None:
        T = q.shape[2]
        bias = torch.zeros(T, T, dtype=q.dtype, device=q.device).masked_fill_(
            torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf")
        )
    logits = logits + bias.to(logits.dtype)
    lse = torch.logsumexp(logits, dim=-1)
    return torch.exp(logits - lse[..., None]) @ v, lse


def attention_with_lse(q, k, v, scale: float, bias: torch.Tensor | None = None, fused: bool = True):
    """Causal attention (plus ``bias``) and the log-sum-exp of its logits per query, ``(b, heads, T)``."""
    result = _kernel_with_lse(q, k, v, scale, bias) if fused else None
    return result if result is not None else _explicit_with_lse(q, k, v, scale, bias)


def _varlen_applies(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)


def _varlen_causal_attention(q, k, v, scale: float, document_ids: torch.Tensor) -> torch.Tensor:
    """Each document of each sequence as its own causal sequence, through flash attention's
    variable-length kernel; ``(b, heads, T, d_h)`` in and out."""
    from torch.nn.attention.varlen import varlen_attn

    b, heads, T, dh = q.shape
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    first = starts.flatten().nonzero().squeeze(1)
    cu_seqlens = torch.cat([first, first.new_tensor([b * T])]).to(torch.int32)
    longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())  # one device sync per layer

    def tokens_major(x):
        return x.transpose(1, 2).reshape(b * T, heads, dh)

    out = varlen_attn(
        tokens_major(q),
        tokens_major(k),
        tokens_major(v),
        cu_seqlens,
        cu_seqlens,
        longest,
        longest,
        scale=scale,
        window_size=(-1, 0),
    )
    return out.view(b, T, heads, dh).transpose(1, 2)


def attention(q, k, v, scale: float, document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention, inside each document when ``document_ids`` is given; torch picks the
    kernel (public SDPA, or the variable-length flash kernel for documents on CUDA)."""
    if document_ids is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    if _varlen_applies(q):
        return _varlen_causal_attention(q, k, v, scale, document_ids)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=document_bias(document_ids, q.dtype), scale=scale)


def attention_with_exact_nu_att(q, k, v, scale: float, document_ids: torch.Tensor | None = None, fused: bool = True):
    """``(output, nu_att)``: the attention output and the exact factor ``(sum_j a_tj^2)^(-1/2)``
    per query and head, ``(b, heads, T, 1)``, a constant in backward (as ANGPT.md defines it).

    ``sum_j a_tj^2 = exp(LSE(2 s_t) - 2 LSE(s_t))``: ``LSE(s)`` comes with the output,
    ``LSE(2 s)`` from a forward-only pass at twice the scale (its output is not used).
    """
    bias = None if document_ids is None else document_bias(document_ids, q.dtype)
    out, lse = attention_with_lse(q, k, v, scale, bias, fused)
    with torch.no_grad():
        _, lse2 = attention_with_lse(q.detach(), k.detach(), v.detach(), 2 * scale, bias, fused)
        nu = nu_att_exact(lse.detach(), lse2)
    return out, nu[..., None].to(out.dtype)
