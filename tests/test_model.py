"""Model structure: nGPT on the sphere, GPT+ against a plain reference, constraints, errors."""

import math

import pytest
import torch
import torch.nn.functional as F
from distributed import FP32_RTOL
from torch import nn

from an_megatron.model import GPTModel, ModelConfig
from an_megatron.optim import constrained_parameters

SMALL = dict(num_layers=3, hidden_size=64, num_attention_heads=4, vocab_size=128, seq_length=16)


def test_ngpt_hidden_states_on_the_sphere(single_process, device):
    torch.manual_seed(0)
    model = GPTModel(ModelConfig(arch="ngpt", **SMALL)).to(device)
    states = []
    for block in model.layers:
        for tap in (block.tap_h_attention, block.tap_h_mlp):
            tap.register_forward_hook(lambda m, i, o: states.append(o.norm(dim=-1)))
    model(torch.randint(0, 128, (2, 16)).to(device))
    assert len(states) == 2 * SMALL["num_layers"]
    for norms in states:
        torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-5, rtol=0)


class ReferenceGPTPlus(nn.Module):
    """GPT+ written out plainly: pre-norm RMSNorm, per-head RMSNorm QK-norm with per-head
    gains, RoPE, SwiGLU, final RMSNorm, untied embedding and output."""

    def __init__(self, d, H, f, V, L):
        super().__init__()
        self.d, self.H, self.dh = d, H, d // H
        self.emb = nn.Embedding(V, d)
        self.blocks = nn.ModuleList()
        for _ in range(L):
            b = nn.Module()
            b.n1, b.n2 = nn.RMSNorm(d, eps=1e-6), nn.RMSNorm(d, eps=1e-6)
            b.wq, b.wk, b.wv, b.wo = (nn.Linear(d, d, bias=False) for _ in range(4))
            b.gq, b.gk = nn.Parameter(torch.ones(H, self.dh)), nn.Parameter(torch.ones(H, self.dh))
            b.wu, b.wz, b.wd = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False), nn.Linear(f, d, bias=False)
            self.blocks.append(b)
        self.norm = nn.RMSNorm(d, eps=1e-6)
        self.out = nn.Linear(d, V, bias=False)

    def rope(self, x):  # (b, H, T, dh)
        T, dh = x.shape[2], x.shape[3]
        inv = 10000.0 ** (-torch.arange(0, dh, 2, device=x.device).float() / dh)
        ang = torch.outer(torch.arange(T, device=x.device).float(), inv)
        ang = torch.cat([ang, ang], -1)
        x1, x2 = x[..., : dh // 2], x[..., dh // 2 :]
        return x * ang.cos() + torch.cat([-x2, x1], -1) * ang.sin()

    def forward(self, tokens):
        h = self.emb(tokens)
        B, T = tokens.shape
        for b in self.blocks:
            x = b.n1(h)
            q, k, v = (w(x).view(B, T, self.H, self.dh).transpose(1, 2) for w in (b.wq, b.wk, b.wv))
            q, k = self.rope(q), self.rope(k)
            q = F.rms_norm(q, (self.dh,), eps=1e-6) * b.gq[:, None, :]
            k = F.rms_norm(k, (self.dh,), eps=1e-6) * b.gk[:, None, :]
            att = (q @ k.transpose(-1, -2)) / math.sqrt(self.dh)
            causal = torch.ones(T, T, dtype=torch.bool, device=att.device).triu(1)
            att = att.masked_fill(causal, float("-inf")).softmax(-1)
            h = h + b.wo((att @ v).transpose(1, 2).reshape(B, T, self.d))
            x = b.n2(h)
            h = h + b.wd(b.wu(x) * F.silu(b.wz(x)))
        return self.out(self.norm(h))


def test_gptplus_matches_plain_reference(single_process, device):
    torch.manual_seed(0)
    cfg = ModelConfig(arch="gptplus", **SMALL)
    model = GPTModel(cfg)
    d, f = cfg.hidden_size, cfg.ffn_hidden_size
    ref = ReferenceGPTPlus(d, cfg.num_attention_heads, f, cfg.vocab_size, cfg.num_layers)
    with torch.no_grad():
        for p in model.parameters():  # non-trivial gains, so they are checked too
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
        ref.emb.weight.copy_(model.embedding.word_embeddings.weight)
        for b, blk in zip(ref.blocks, model.layers):
            wq, wk, wv = blk.attention.qkv.weight.split(d)
            b.wq.weight.copy_(wq), b.wk.weight.copy_(wk), b.wv.weight.copy_(wv)
            b.wo.weight.copy_(blk.attention.proj.weight)
            b.gq.copy_(blk.attention.qk_norm.q_gain().view(cfg.num_attention_heads, -1))
            b.gk.copy_(blk.attention.qk_norm.k_gain().view(cfg.num_attention_heads, -1))
            wu, wz = blk.mlp.up_gate.weight.split(f)
            b.wu.weight.copy_(wu), b.wz.weight.copy_(wz), b.wd.weight.copy_(blk.mlp.down.weight)
            b.n1.weight.copy_(blk.attention_norm.weight), b.n2.weight.copy_(blk.mlp_norm.weight)
        ref.norm.weight.copy_(model.head.final_norm.weight)
        ref.out.weight.copy_(model.head.output.weight)
    model.to(device), ref.to(device)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16)).to(device)
    torch.testing.assert_close(model(tokens), ref(tokens), rtol=FP32_RTOL, atol=FP32_RTOL)


def test_init_and_constraints(single_process, device):
    torch.manual_seed(0)
    for arch in ("angpt", "ngpt"):
        model = GPTModel(ModelConfig(arch=arch, **SMALL)).to(device)
        matrices = [p for p in model.parameters() if p.ndim == 2]
        assert constrained_parameters(model.parameters()) == matrices  # every matrix, nothing else
        for name, p in model.named_parameters():
            if p.ndim == 2:
                dim = p.norm_constraint.dim
                torch.testing.assert_close(p.norm(dim=dim), torch.ones(p.shape[1 - dim], device=device), msg=name)
                is_output_embedding_dim = name.endswith(("proj.weight", "down.weight"))
                expected = 0 if (arch == "ngpt" and is_output_embedding_dim) else 1
                assert dim == expected, name
    model = GPTModel(ModelConfig(arch="gptplus", **SMALL))
    assert constrained_parameters(model.parameters()) == []
    w = model.layers[0].mlp.up_gate.weight
    assert w.std().item() == pytest.approx(0.02, rel=0.05)


def test_learnable_scale_reparameterization(single_process):
    cfg = ModelConfig(arch="angpt", scales={"alpha": (0.01, 0.5)}, **SMALL)
    model = GPTModel(cfg)
    alpha = model.layers[0].attention_residual.alpha
    assert torch.allclose(alpha.s_hat, torch.full((64,), 0.5))
    assert torch.allclose(alpha(), torch.full((64,), 0.01))
    s_z = model.head.logit_scale.s_z
    assert torch.allclose(s_z.s_hat, torch.full((128,), 1 / 8))  # s_scale = 1/sqrt(d)
    assert torch.allclose(s_z(), torch.ones(128))


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(num_attention_heads=6), "hidden-size 64 is not divisible by num-attention-heads 6"),
        (dict(num_attention_heads=2, tensor_model_parallel_size=4), "does not divide num-attention-heads 2"),
        (dict(ffn_hidden_size=250, tensor_model_parallel_size=4), "does not divide ffn-hidden-size 250"),
        (dict(vocab_size=130, tensor_model_parallel_size=4), "does not divide the padded vocabulary size 130"),
        (dict(arch="gpt5"), "unknown arch 'gpt5'"),
        (dict(nu_att="sparse"), "unknown nu_att option 'sparse'"),
    ],
)
def test_config_errors_name_the_value(overrides, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{**SMALL, **overrides})


@pytest.mark.parametrize("nu_att", ["gaussian", "exact", "dense", "none"])
def test_bf16_model_runs_in_bf16(single_process, device, nu_att):
    """The attention factors are computed in fp32 but must not turn bf16 activations into fp32
    (the next matmul would see mixed dtypes), with or without document masking."""
    model = GPTModel(ModelConfig(arch="angpt", nu_att=nu_att, **SMALL)).to(device, torch.bfloat16)
    tokens = torch.randint(0, 128, (2, 16)).to(device)
    docs = (torch.arange(16) >= 9).long().expand(2, -1).to(device)
    for masking in ({}, dict(document_ids=docs)):
        logits = model(tokens, **masking)
        assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
        model.loss(tokens, tokens, **masking).backward()
