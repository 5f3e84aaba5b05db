"""Per-output-channel scales multiplied into the weight's rows (``layers.row_scaled``) against
the same scales applied to the layer's output: logits, loss and every gradient, TP=1 and TP=2."""

import pytest
import torch
from distributed import current_device, run_distributed

SHAPE = dict(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=192, vocab_size=256, seq_length=32)
# Scales away from 1, so that a scale applied to the wrong rows (e.g. s_v on u) shows.
SCALES = {"s_u": (0.5, 2.0), "s_v": (1.5, 0.5), "s_z": (3.0, 0.25)}
# fp32: both forms compute the same products, rounded in another order (W * s before the matmul
# instead of after it; the gradient of s summed over W's columns instead of over tokens), so
# elementwise 1e-6 with a floor of 1e-6 times the tensor's largest entry near zero crossings.
RTOL = 1e-6


def _both_forms(arch, tp):
    """(logits, loss, local gradients) with the scales in the weights, then on the outputs."""
    from an_megatron.model import GPTModel, ModelConfig
    from an_megatron.parallel import initialize_parallel

    initialize_parallel(tp, 1)
    model = GPTModel(ModelConfig(arch=arch, tensor_model_parallel_size=tp, scales=SCALES, **SHAPE))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every scale entry different, so each row sees its own
        for p in model.parameters():
            if p.ndim == 1:
                p.mul_(0.5 + torch.rand(p.shape, generator=gen))
    tokens = torch.randint(0, SHAPE["vocab_size"], (3, SHAPE["seq_length"] + 1), generator=gen).to(current_device())
    model.to(current_device())
    layers = [m for m in model.modules() if hasattr(m, "scales_weight_rows")]
    assert layers and all(m.scales_weight_rows for m in layers)  # the local linears take weight=
    out = []
    for in_weight in (True, False):
        for m in layers:
            m.scales_weight_rows = in_weight
        model.zero_grad(set_to_none=True)
        logits = model(tokens[:, :-1])
        loss = model.loss(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        out.append(dict(logits=logits.detach(), loss=loss.detach(), grads=grads))
    return out


def _assert_rel_close(a, b, what):
    torch.testing.assert_close(a, b, rtol=RTOL, atol=RTOL * b.abs().max().item(), msg=lambda m: f"{what}: {m}")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("arch", ["angpt", "ngpt"])
def test_scales_in_weights_equal_scales_on_outputs(arch, tp):
    for weights, outputs in run_distributed(_both_forms, tp, arch, tp):
        _assert_rel_close(weights["logits"], outputs["logits"], "logits")
        _assert_rel_close(weights["loss"], outputs["loss"], "loss")
        assert weights["grads"].keys() == outputs["grads"].keys()
        for name, g in outputs["grads"].items():
            _assert_rel_close(weights["grads"][name], g, f"grad {name}")
