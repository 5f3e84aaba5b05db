"""bf16 on GPUs: TP=2 (two GPUs, NCCL) against one process, both in bf16. Skipped without 2 GPUs.

The fp32 equivalence tests (test_tensor_parallel.py) check the parallel layout to 1e-5; this one
checks that it also holds in the precision training runs in, where a sharded matmul rounds its
partial sums to bf16 before the all-reduce adds them. The tolerance comes from bf16's 8-bit
significand: every rounding to bf16 moves a value by at most u = 2^-8 relative. TP=2 and TP=1
round the same exact values at different points (partial sums, then their sum), so per rounded
operation they differ by up to 2u; over the forward of a two-block model (about a dozen rounded
operations on the residual path, errors of random sign adding in quadrature, sqrt(12) < 4)
logits differ by at most 8u in norm relative to their norm, gradients (twice the chain) by 16u,
and the loss (a mean over every token, computed in fp32 from the logits) by 2u. A real layout
error (a missing all-reduce, a shard in the wrong place) moves these by tens of percent.
"""

import pytest
import torch
from distributed import current_device, full_named_tensors, gpu_count, run_distributed

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(gpu_count() < 2, reason=f"needs 2 GPUs (TP=2 on NCCL), this machine has {gpu_count()}"),
]

SHAPE = dict(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=192, vocab_size=256, seq_length=32)
U = 2.0**-8  # bf16's unit roundoff: 8 significand bits (7 stored)
LOGITS_RTOL, GRAD_RTOL, LOSS_RTOL = 8 * U, 16 * U, 2 * U


def _bf16_step(arch, tp):
    from an_megatron.model import GPTModel, ModelConfig
    from an_megatron.parallel import initialize_parallel, tp_group
    from an_megatron.parallel.tensor_parallel import gather_tp_tensor

    initialize_parallel(tp, 1)
    device = current_device()
    torch.manual_seed(0)  # the same fp32 init on CPU at any TP, then rounded to bf16
    model = GPTModel(ModelConfig(arch=arch, tensor_model_parallel_size=tp, **SHAPE)).to(device, torch.bfloat16)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, SHAPE["vocab_size"], (4, SHAPE["seq_length"] + 1), generator=gen).to(device)
    logits = gather_tp_tensor(model(tokens[:, :-1]), -1, 1, tp_group())
    loss = model.loss(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    return dict(
        logits=logits.float(), loss=loss.detach().float(), grads=full_named_tensors(model, tp_group(), grads=True)
    )


def _relative(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("arch", ["angpt", "ngpt", "gptplus"])
def test_tp2_matches_one_process_in_bf16(arch):
    (ref,) = run_distributed(_bf16_step, 1, arch, 1)
    for got in run_distributed(_bf16_step, 2, arch, 2):
        assert _relative(got["logits"], ref["logits"]) <= LOGITS_RTOL
        assert abs(got["loss"] - ref["loss"]).item() <= LOSS_RTOL * ref["loss"].item()
        assert got["grads"].keys() == ref["grads"].keys()
        for name, g in ref["grads"].items():
            assert got["grads"][name].dtype == torch.bfloat16
            assert _relative(got["grads"][name], g) <= GRAD_RTOL, name
