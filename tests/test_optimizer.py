"""build_optimizer: torch's fused AdamW (one multi-tensor kernel per group), the same steps as
the per-tensor reference."""

from types import SimpleNamespace

import torch

from an_megatron.model import GPTModel, ModelConfig
from an_megatron.optim.optimizer import build_optimizer

TINY = dict(num_layers=1, hidden_size=32, num_attention_heads=2, vocab_size=64, seq_length=8)


def test_fused_adamw_steps_like_the_per_tensor_one(single_process):
    cfg = SimpleNamespace(weight_decay=0.1, lr=1e-2, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8)
    model = GPTModel(ModelConfig(arch="angpt", **TINY))
    reference = GPTModel(ModelConfig(arch="angpt", **TINY))
    reference.load_state_dict(model.state_dict())
    opt = build_optimizer(model, cfg)
    assert opt.defaults["fused"]
    ref_opt = torch.optim.AdamW(
        [
            dict(params=[p for p in reference.parameters() if p.ndim >= 2], weight_decay=0.1),
            dict(params=[p for p in reference.parameters() if p.ndim < 2], weight_decay=0.0),
        ],
        lr=1e-2,
        betas=(0.9, 0.95),
        eps=1e-8,
        foreach=False,
    )
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        for p, r in zip(model.parameters(), reference.parameters()):
            p.grad = torch.randn(p.shape, generator=gen)
            r.grad = p.grad.clone()
        opt.step()
        ref_opt.step()
    for (name, p), r in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")
    assert any(
        not torch.equal(p, q)
        for p, q in zip(model.parameters(), GPTModel(ModelConfig(arch="angpt", **TINY)).parameters())
    )
