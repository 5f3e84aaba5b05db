"""A new architecture is one ``ArchSpec``: defined here, registered, built and trained through
the ordinary entry points without touching any module of the package."""

from __future__ import annotations

import argparse
from dataclasses import replace

import pytest
import torch
from torch import nn

from an_megatron.model import ARCH_SPECS, GPTModel, ModelConfig, components
from an_megatron.model.arch import OptimizerDefaults
from an_megatron.model.arguments import add_model_args, model_config_from_args
from an_megatron.model.scales import Scale
from an_megatron.optim import constrain_parameters_
from an_megatron.training.arguments import _arch_defaults

SMALL = dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=128, seq_length=16)


class PlainLerpResidual(nn.Module):
    """A component written outside the package: anGPT's update without nu_lerp."""

    def __init__(self, config):
        super().__init__()
        self.alpha = Scale(config.hidden_size, *config.scale_init("alpha"))

    def forward(self, h, x):
        return torch.lerp(h, x, self.alpha())


# anGPT without nu_lerp; GPT+'s block with anGPT's initialization, norm bound and Adam recipe.
NEW_SPECS = {
    "angpt_plain_lerp": replace(ARCH_SPECS["angpt"], residual=PlainLerpResidual),
    "gptplus_unit": replace(
        ARCH_SPECS["gptplus"], init=components.unit_init, weight_norm="bound", optimizer=OptimizerDefaults()
    ),
}


@pytest.fixture(autouse=True)
def registered(monkeypatch, single_process):
    for name, spec in NEW_SPECS.items():
        monkeypatch.setitem(ARCH_SPECS, name, spec)


def test_new_spec_matches_the_equivalent_flag():
    """anGPT with a plain-lerp residual is anGPT with --no-nu-lerp: same weights, same logits."""
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    new = GPTModel(ModelConfig(arch="angpt_plain_lerp", **SMALL))
    ablation = GPTModel(ModelConfig(arch="angpt", use_nu_lerp=False, **SMALL))
    assert new.config.weight_norm == "bound"
    torch.testing.assert_close(new(tokens), ablation(tokens), rtol=0, atol=0)


def test_new_spec_trains_from_the_command_line_flags():
    """--arch offers the new spec; its init, weight norm and optimizer defaults apply."""
    parser = add_model_args(argparse.ArgumentParser())
    args = parser.parse_args(["--arch", "gptplus_unit", "--num-layers", "2", "--hidden-size", "64"])
    config = model_config_from_args(args, vocab_size=128)
    model = GPTModel(config)
    w = model.layers[0].attention.qkv.weight
    torch.testing.assert_close(w.norm(dim=1), torch.ones(w.shape[0]))  # anGPT's unit rows, not N(0, 0.02)
    assert w.norm_constraint.mode == "bound"
    assert isinstance(model.layers[0].attention_norm, components.RMSNorm)  # still GPT+'s block

    train = argparse.Namespace(
        arch="gptplus_unit", weight_decay=None, lr_warmup_iters=None, train_iters=1000, lr_decay_iters=None
    )
    defaults = _arch_defaults(train)
    assert (defaults["weight_decay"], defaults["lr_warmup_iters"]) == (0.0, 0)

    tokens = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        loss = model(tokens[:, :-1], tokens[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        constrain_parameters_(model.parameters())
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert w.norm(dim=1).max() <= 1 + 1e-5


def test_unknown_arch_names_the_registered_ones():
    with pytest.raises(ValueError, match="gptplus_unit"):
        ModelConfig(arch="nope")
