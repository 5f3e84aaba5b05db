"""The memory estimate (``an_megatron/training/memory.py``) against the real tensors.

Activations: the formula against the storages autograd saves in a forward pass (each storage
counted once, parameters excluded), counted with ``torch.autograd.graph.saved_tensors_hooks``.
The formula leaves out tensors without a batch or sequence dimension beyond the weight copies
(RoPE's tables, the scale and ``alpha`` vectors, under 0.7% here), hence the 1% tolerance; one
missing ``sbh`` term is 3% of a block. Parameters, gradients and optimizer state: against the
model's parameters and DeepSpeed's fp32 partitions and Adam moments after a step.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from distributed import run_distributed

from an_megatron.model import GPTModel, ModelConfig
from an_megatron.training.memory import (
    Recompute,
    activation_bytes,
    block_terms,
    gib,
    model_state_bytes,
    parameter_count,
    recompute_from,
    report_lines,
    selective_terms,
)

# The multi-rank counts run on CPU on every machine: the estimate's CPU path is what they check
# (on CUDA megatron-core's sequence-parallel linear keeps its input's shard instead).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, S, D, H, V = 4, 64, 64, 4, 512
RTOL = 0.01


def saved_bytes(model: torch.nn.Module, *inputs) -> int:
    """Bytes of the storages autograd saves in ``model(*inputs)``, each once, weights excluded."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(*inputs)
    return sum(saved.values())


def _config(arch="angpt", layers=2, tp=1, **kw):
    return ModelConfig(
        arch=arch,
        num_layers=layers,
        hidden_size=D,
        num_attention_heads=H,
        vocab_size=V,
        seq_length=S,
        tensor_model_parallel_size=tp,
        **kw,
    )


def _batch(documents: bool):
    gen = torch.Generator().manual_seed(0)
    tokens, labels = torch.randint(0, V, (2, B, S), generator=gen)
    doc = (torch.arange(S) >= S // 3).long().expand(B, S) if documents else None
    return tokens, labels, None, None, doc


def _measure(config, documents=False, bf16=False):
    """Saved bytes of one forward pass of ``config``'s model, and the model."""
    model = GPTModel(config)
    if bf16:
        model = model.bfloat16()
    return saved_bytes(model, *_batch(documents)), model


@pytest.fixture(scope="module", autouse=True)
def one_process():
    from an_megatron.parallel import destroy_parallel, initialize_parallel

    os.environ.setdefault("LOCAL_RANK", "0")
    initialize_parallel(1, 1)
    yield
    destroy_parallel()


@pytest.mark.parametrize(
    "arch, documents, kw",
    [
        ("angpt", False, {}),
        ("angpt", True, {}),
        ("angpt", False, {"nu_att": "exact"}),
        ("angpt", False, {"nu_att": "dense", "alpha_per_dim": False}),
        ("ngpt", False, {}),
        ("ngpt", True, {}),
        ("gptplus", False, {}),
        ("gptplus", True, {}),
    ],
)
def test_activation_formula_matches_saved_tensors(arch, documents, kw):
    measured = {}
    for layers in (1, 3):
        config = _config(arch, layers, **kw)
        measured[layers], model = _measure(config, documents)
        estimate = activation_bytes(config, B, document_mask=documents).stored
        assert estimate == pytest.approx(measured[layers], rel=RTOL), (layers, estimate, measured[layers])
        assert sum(p.numel() for p in model.parameters()) == parameter_count(config)
    # two more blocks: what one block saves, the formula's per-block terms
    per_block = sum(block_terms(config, B, document_mask=documents).values())
    assert per_block == pytest.approx((measured[3] - measured[1]) / 2, rel=RTOL)


def test_angpt_block_is_31_sbh_plus_the_weight_copy():
    terms = block_terms(_config(), B)
    sbh = 4 * S * B * D
    big = {k: v for k, v in terms.items() if k not in ("attention_stats", "norm_stats", "up_gate_weight_copy")}
    assert sum(big.values()) == 31 * sbh
    assert terms["up_gate_weight_copy"] == 4 * 2 * (4 * D) * D
    assert terms["document_mask"] == 0


@pytest.mark.parametrize("arch", ["angpt", "ngpt", "gptplus"])
def test_bf16_activations(arch):
    """Under bf16 the norms keep fp32 copies (RoPE's output for the QK norm, the residual
    stream for GPT+'s RMSNorm) and the loss its fp32 softmax."""
    config = _config(arch, 2)
    measured, _ = _measure(config, bf16=True)
    assert activation_bytes(config, B, bf16=True).stored == pytest.approx(measured, rel=RTOL)


def _recompute_config(arch, granularity, method=None, n=None, layers=3):
    return _config(arch, layers, recompute_granularity=granularity, recompute_method=method, recompute_num_layers=n)


@pytest.mark.parametrize("arch", ["angpt", "ngpt", "gptplus"])
@pytest.mark.parametrize("documents", [False, True])
def test_selective_recompute_drops_its_terms(arch, documents):
    """What torch's checkpoint keeps (the parts' inputs: the qkv output, the u; z output) reaches
    the hooks too: the count is what stays alive."""
    config = _recompute_config(arch, "selective")
    measured, _ = _measure(config, documents)
    estimate = activation_bytes(config, B, document_mask=documents, recompute=recompute_from(config)).stored
    assert estimate == pytest.approx(measured, rel=RTOL)
    plain = activation_bytes(_recompute_config(arch, None), B, document_mask=documents).stored
    assert estimate < 0.8 * plain


@pytest.mark.parametrize("method, n", [("uniform", 1), ("uniform", 2), ("block", 2)])
def test_full_recompute_keeps_chunk_inputs(method, n):
    """Kept: each recomputed chunk's input (one ``sbh``), the blocks not recomputed, the head."""
    config = _recompute_config("angpt", "full", method, n)
    measured, _ = _measure(config)
    recompute = recompute_from(config)
    assert recompute == Recompute("full", method, n)
    estimate = activation_bytes(config, B, recompute=recompute).stored
    assert estimate == pytest.approx(measured, rel=RTOL)


def test_full_recompute_peak_is_the_larger_phase():
    config = _config("angpt", 4)
    none = activation_bytes(config, B)
    block = sum(none.block.values())
    uniform2 = activation_bytes(config, B, recompute=Recompute("full", "uniform", 2))
    sbh = 4 * S * B * D
    assert none.stored - uniform2.stored == 4 * block - 2 * sbh
    end_of_forward = uniform2.stored + (none.peak - none.stored)
    assert uniform2.peak >= end_of_forward
    assert uniform2.peak < none.peak


def test_tensor_and_sequence_parallel_split():
    one, two = block_terms(_config(), B), block_terms(_config(tp=2), B)
    two_sp = block_terms(_config(tp=2), B, sequence_parallel=True)
    for name in ("qkv_output", "qk_norm_inner", "qk_scaled", "attention_output", "up_gate_output", "silu"):
        assert two[name] * 2 == one[name] == two_sp[name] * 2
    assert two["residual_updates"] == one["residual_updates"] == two_sp["residual_updates"] * 2
    # megatron-core's fused linear (CUDA) keeps the shard of its input, which is what anGPT's
    # residual update keeps too
    assert two["matmul_inputs"] == one["matmul_inputs"] == two_sp["matmul_inputs"] * 2
    assert one["residual_stream"] == two["residual_stream"] == two_sp["residual_stream"] == 0
    # on CPU it keeps the gathered input, and the residual update its shard besides
    cpu_sp = block_terms(_config(tp=2), B, sequence_parallel=True, gathered_inputs_kept=True)
    assert cpu_sp["matmul_inputs"] == one["matmul_inputs"]
    assert cpu_sp["residual_stream"] == one["matmul_inputs"] / 2


def _tp2_counts():
    """Per architecture, this TP=2 rank's saved bytes with document masking, without and with
    sequence parallelism, and its parameter count."""
    from an_megatron.parallel import initialize_parallel
    from an_megatron.parallel.sequence_parallel import apply_sequence_parallel

    initialize_parallel(2, 1)
    out = {}
    for arch in ("angpt", "ngpt", "gptplus"):
        config = _config(arch, 2, tp=2)
        measured, model = _measure(config, documents=True)
        out[arch, False] = measured
        out[arch, True] = saved_bytes(apply_sequence_parallel(model), *_batch(True))
        out[arch, "params"] = sum(p.numel() for p in model.parameters())
    return out


@pytest.mark.timeout(300)
def test_tensor_and_sequence_parallel_rank_share():
    for rank in run_distributed(_tp2_counts, 2, timeout=240, device="cpu"):
        for arch in ("angpt", "ngpt", "gptplus"):
            config = _config(arch, 2, tp=2)
            for sp in (False, True):
                # on CPU (megatron_patches/sequence_parallel_on_cpu.py) the linear keeps the gathered input
                estimate = activation_bytes(
                    config, B, document_mask=True, sequence_parallel=sp, gathered_inputs_kept=True
                ).stored
                assert estimate == pytest.approx(rank[arch, sp], rel=RTOL), (arch, sp)
            assert rank[arch, "params"] == parameter_count(config)


def _pp2_params():
    from an_megatron.parallel import initialize_parallel, pp_rank
    from an_megatron.parallel.pipeline import build_pipeline_module

    initialize_parallel(1, 2)
    module = build_pipeline_module(_config("gptplus", 3))
    return pp_rank(), sum(p.numel() for p in module.parameters())


def _zero_states():
    """Per DeepSpeed mode at DP=2: this rank's bytes of weights (ZeRO-3: its partitions),
    optimizer state (fp32 masters the wrapper holds besides the weights, Adam's moments)."""
    import logging

    import deepspeed

    from an_megatron.compat.deepspeed import fp32_masters, inner_optimizers, zero3_partition
    from an_megatron.parallel import DeepSpeedMPU, initialize_parallel

    deepspeed.utils.logger.setLevel(logging.WARNING)
    initialize_parallel(1, 1)
    tokens, labels, *_ = _batch(False)
    out = {}
    for stage, bf16 in ((0, False), (1, False), (2, False), (3, False), (0, True), (1, True)):
        model = GPTModel(_config("angpt", 2))
        ds = {
            "train_batch_size": 2 * B,
            "train_micro_batch_size_per_gpu": B,
            "zero_optimization": {"stage": stage},
            "bf16": {"enabled": bf16},
            "steps_per_print": 10**9,
        }
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds, mpu=DeepSpeedMPU)
        engine.backward(engine(tokens, labels))
        engine.step()
        wrapper = engine.optimizer
        masters = 0
        if wrapper is not opt:
            for group in fp32_masters(wrapper):
                masters += sum(t.numel() * t.element_size() for t in (group if isinstance(group, list) else [group]))
        inner = [opt] if wrapper is opt else inner_optimizers(wrapper)
        moments = sum(
            v.numel() * v.element_size()
            for o in inner
            for state in o.state.values()
            for k, v in state.items()
            if k in ("exp_avg", "exp_avg_sq")
        )
        params = engine.module.parameters()
        weights = sum(
            (zero3_partition(p) if zero3_partition(p) is not None else p).numel() * p.element_size() for p in params
        )
        out[(stage, bf16)] = dict(optimizer=masters + moments, weights=weights)
        engine.destroy()
    return out


@pytest.mark.timeout(420)
def test_model_states_against_deepspeed_dp2():
    n = parameter_count(_config("angpt", 2))
    for rank in run_distributed(_zero_states, 2, timeout=400, device="cpu"):
        for (stage, bf16), real in rank.items():
            expected = model_state_bytes(n, bf16, stage, dp=2)
            # ZeRO pads each partition to an aligned size: a few elements per group
            assert real["optimizer"] == pytest.approx(expected.optimizer, rel=1e-3), (stage, bf16)
            assert real["weights"] == pytest.approx(expected.params, rel=1e-3), (stage, bf16)


@pytest.mark.timeout(300)
def test_pipeline_stage_parameters():
    config = _config("gptplus", 3)
    for stage, params in run_distributed(_pp2_params, 2, timeout=240, device="cpu"):
        assert params == parameter_count(config, pp=2, stage=stage)


def test_report_lines_total():
    config = _config("angpt", 2)
    lines = report_lines(config, micro_batch=B, bf16=True, zero_stage=1, dp=4)
    assert lines[0].startswith("memory estimate") and "ZeRO-1 bf16" in lines[0]
    assert lines[-1].startswith("  total:")
    assert any(line.endswith("<- this run") for line in lines)


@pytest.mark.timeout(300)
def test_report_memory_flag_prints_before_the_first_step(tmp_path):
    argv = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32"]
    argv += ["--num-workers", "0", "--eval-interval", "0", "--mock-data", "--tokenizer-type", "NullTokenizer"]
    argv += ["--vocab-size", "255", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "1"]
    argv += ["--lr", "1e-3", "--log-interval", "1", "--report-memory", "--recompute-granularity", "selective"]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "pretrain_angpt.py"), *argv],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=280,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    report = [i for i, line in enumerate(lines) if line.startswith("[rank 0] ")]
    first_step = next(i for i, line in enumerate(lines) if line.lstrip().startswith("iteration"))
    assert report and max(report) < first_step
    text = "\n".join(lines[i] for i in report)
    n = parameter_count(_config_for_run())
    assert f"parameters: {n:,} on this rank" in text
    assert "activations per micro-batch (b=2, s=32)" in text
    assert "[rank 0]   total: " in text
    selective = next(line for line in lines if line.startswith("[rank 0]     selective: "))
    assert selective.endswith("<- this run")
    config = _config_for_run()
    estimate = activation_bytes(config, 2, recompute=Recompute("selective", selective_terms=selective_terms()))
    assert f"activations per micro-batch (b=2, s=32): stored {gib(estimate.stored)}" in text


def _config_for_run():
    # NullTokenizer --vocab-size 255: 256 ids with end-of-document, padded to a multiple of 128
    return ModelConfig(arch="angpt", num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=256, seq_length=32)
