"""At initialization, every quantity an anGPT factor normalizes has measured norm near 1."""

import json
import subprocess
import sys

import torch

from an_megatron.model import GPTModel, ModelConfig
from an_megatron.model.diagnostics import measure_norms

SHAPE = dict(num_layers=4, hidden_size=512, num_attention_heads=8, vocab_size=1024, seq_length=128)
ALWAYS = {
    "attention.tap_q",
    "attention.tap_k",
    "attention.tap_v",
    "mlp.tap_u",
    "mlp.tap_act",
    "mlp.tap_out",
    "tap_h_attention",
    "tap_h_mlp",
    "embedding.tap_out",
}
AFTER_ATTENTION = {"attention.tap_heads", "attention.tap_out"}


def _measure(nu_att, uniform_attention=False):
    torch.manual_seed(0)
    model = GPTModel(ModelConfig(arch="angpt", nu_att=nu_att, **SHAPE))
    if uniform_attention:  # s_qk = 0 makes every logit 0: uniform attention
        for m in model.modules():
            if hasattr(m, "s_qk"):
                m.s_qk.s_hat.data.zero_()
    tokens = torch.randint(0, SHAPE["vocab_size"], (4, SHAPE["seq_length"]))
    return measure_norms(model, tokens)


def _check(records, names):
    measured = [r for r in records if r["name"] in names]
    assert {r["name"] for r in measured} == names
    bad = [(r["layer"], r["name"], round(r["mean"], 3)) for r in measured if abs(r["mean"] - 1) > 0.10]
    assert not bad, f"norms off by more than 10%: {bad}"


def test_default_nu_att_normalizes_attention(single_process):
    """The default (gaussian: predicted from the logit variance s_qk implies) keeps the head
    outputs and x_A within 10% in every layer (measured 1.00-1.06 at this shape)."""
    assert ModelConfig().nu_att == "gaussian"
    _check(_measure("gaussian"), ALWAYS | AFTER_ATTENTION)


def test_gaussian_nu_att_follows_s_qk(single_process):
    """Sharper attention (s_qk = 1.5: logit variance 1.5^4 ~ 5) keeps more norm; the factor
    predicted from s_qk follows it, where a factor that ignored s_qk would not."""
    torch.manual_seed(0)
    model = GPTModel(ModelConfig(arch="angpt", nu_att="gaussian", **SHAPE))
    for m in model.modules():
        if hasattr(m, "s_qk"):
            m.s_qk.s_hat.data.mul_(1.5)
    tokens = torch.randint(0, SHAPE["vocab_size"], (4, SHAPE["seq_length"]))
    heads = [r["mean"] for r in measure_norms(model, tokens) if r["name"] == "attention.tap_heads"]
    assert all(0.85 < m < 1.15 for m in heads), heads  # measured 0.93-0.94; dense gives 3.2


def test_exact_nu_att_on_any_attention(single_process):
    _check(_measure("exact"), ALWAYS | AFTER_ATTENTION)


def test_dense_nu_att_on_uniform_attention(single_process):
    records = _measure("dense", uniform_attention=True)
    _check(records, ALWAYS)
    # sqrt(t) is exact for uniform attention over independent values, which is what layer 0
    # sees (embeddings of random tokens). Deeper, uniform attention adds the same prefix mean
    # to every position, the values become slightly correlated and an average over t of them
    # keeps more norm (measured: 1.04, 1.09, 1.19 in layers 1-3); the exact factor does not
    # drift that way (1.02-1.06).
    _check([r for r in records if r["layer"] == 0], AFTER_ATTENTION)


def test_dense_overestimates_on_peaked_attention(single_process):
    # Documented limitation (the paper's open problem): random logits of std ~1 make attention
    # non-uniform, and sqrt(t) over-corrects by about sqrt(e) ~ 1.65.
    heads = [r["mean"] for r in _measure("dense") if r["name"] == "attention.tap_heads"]
    assert all(1.3 < m < 2.0 for m in heads), heads


def test_measure_norms_tool_json():
    out = subprocess.run(
        [
            sys.executable,
            "tools/measure_norms.py",
            "--arch",
            "angpt",
            "--num-layers",
            "2",
            "--hidden-size",
            "128",
            "--num-attention-heads",
            "4",
            "--seq-length",
            "64",
            "--vocab-size",
            "512",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    records = [json.loads(line) for line in out.splitlines()]
    assert len(records) == 1 + 2 * 10
    for r in records:
        assert {"layer", "name", "mean", "std", "max"} <= r.keys()
        assert r["mean"] <= r["max"] < 3  # the largest token's (or head's) norm: near 1 at initialization too
    assert {r["layer"] for r in records} == {None, 0, 1}
    assert all(abs(r["mean"] - 1) < 0.15 for r in records), records
