"""Pipeline parallelism (DeepSpeed PipelineModule + engine) against one process running GPTModel.

Same global batch, same seed: the losses of 5 steps and the final weights must match, with the
weights pushed past the norm bound so that it acts every step.
"""

import functools
import os

import pytest
import torch
from distributed import FP32_RTOL, current_device, full_named_tensors, run_distributed

SHAPE = dict(num_layers=4, hidden_size=64, num_attention_heads=4, vocab_size=256, seq_length=32)
MICRO_BATCH_SIZE, MICRO_BATCHES, STEPS = 2, 2, 5


def _micro_batches(documents=False, device="cpu"):
    """GPTDataset-style dicts, ``STEPS * MICRO_BATCHES`` of them, with some tokens masked out
    (so a pipeline that dropped the loss mask would give other losses). With ``documents``,
    each sequence packs documents (token 0 ends one) and carries the document ids and the
    positions restarting at each, as training makes them with --reset-attention-mask and
    --reset-position-ids. Made on the CPU (the same numbers on every device), then moved to
    ``device``."""
    from an_megatron.data import document_ids

    gen = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(STEPS * MICRO_BATCHES):
        tokens = torch.randint(1, SHAPE["vocab_size"], (MICRO_BATCH_SIZE, SHAPE["seq_length"] + 1), generator=gen)
        loss_mask = (torch.rand(MICRO_BATCH_SIZE, SHAPE["seq_length"], generator=gen) > 0.3).float()
        batch = dict(tokens=tokens[:, :-1], labels=tokens[:, 1:], loss_mask=loss_mask)
        if documents:
            batch["tokens"][torch.rand(batch["tokens"].shape, generator=gen) < 0.15] = 0  # EOD
            docs = document_ids(batch["tokens"], 0)
            starts = (
                torch.arange(docs.shape[1])
                .expand_as(docs)
                .masked_fill(torch.cat([torch.zeros_like(docs[:, :1]), docs[:, 1:] != docs[:, :-1]], 1) == 0, 0)
                .cummax(1)
                .values
            )
            batch.update(document_ids=docs, position_ids=torch.arange(docs.shape[1]) - starts)
        batches.append({k: v.to(device) for k, v in batch.items()})
    return batches


def _push_past_bound_(module):
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim == 2:
                p.mul_(1.5)


def _adam(params):
    # eps 1e-4: see the comment in test_tensor_parallel.py (rounding of near-zero gradients)
    return torch.optim.Adam(params, lr=1e-3, eps=1e-4)


@functools.lru_cache(maxsize=None)
def _reference_result(arch, documents=False):
    return run_distributed(_reference, 1, arch, documents)[0]


def _reference(arch, documents=False):
    """One process, GPTModel: each step averages the micro-batch losses, as the engine does."""
    from an_megatron.model import GPTModel, ModelConfig
    from an_megatron.optim import constrain_parameters_
    from an_megatron.parallel import initialize_parallel, tp_group

    initialize_parallel(1, 1)
    model = GPTModel(ModelConfig(arch=arch, **SHAPE)).to(current_device())
    _push_past_bound_(model)
    opt = _adam(model.parameters())
    batches, losses = iter(_micro_batches(documents, current_device())), []
    for _ in range(STEPS):
        opt.zero_grad()
        step_loss = 0.0
        for _ in range(MICRO_BATCHES):
            b = next(batches)
            loss = (
                model.loss(b["tokens"], b["labels"], b["loss_mask"], b.get("position_ids"), b.get("document_ids"))
                / MICRO_BATCHES
            )
            loss.backward()
            step_loss += loss.detach()
        opt.step()
        constrain_parameters_(model.parameters())
        losses.append(step_loss)
    return dict(losses=torch.stack(losses), weights=full_named_tensors(model, tp_group()))


def _pipeline(arch, tp, pp, save_dir=None, activation_checkpoint_interval=0, documents=False):
    """``train_batch`` on this rank's stage; returns the losses, this stage's weights under
    GPTModel's names (full tensors), and which layers this stage built."""
    import deepspeed

    from an_megatron.model import ModelConfig
    from an_megatron.optim import constrain_parameters_
    from an_megatron.parallel import initialize_parallel, tp_group
    from an_megatron.parallel.pipeline import build_pipeline_module, gpt_param_name, pipeline_batch

    initialize_parallel(tp, pp)
    config = ModelConfig(arch=arch, tensor_model_parallel_size=tp, **SHAPE)
    module = build_pipeline_module(config, activation_checkpoint_interval=activation_checkpoint_interval)
    module.to(current_device())
    _push_past_bound_(module)
    ds_config = {
        "train_micro_batch_size_per_gpu": MICRO_BATCH_SIZE,
        "gradient_accumulation_steps": MICRO_BATCHES,
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=module, optimizer=_adam(module.parameters()), config=ds_config)
    engine.set_batch_fn(pipeline_batch)
    batches = iter(_micro_batches(documents, current_device()))
    losses = []
    for _ in range(STEPS):
        losses.append(engine.train_batch(batches).detach().clone())
        constrain_parameters_(module.parameters())
    if save_dir is not None:
        engine.save_checkpoint(save_dir, tag="final")
    weights = {gpt_param_name(n, SHAPE["num_layers"]): w for n, w in full_named_tensors(module, tp_group()).items()}
    stage_layers = [(int(name), type(layer).__name__) for name, layer in module.named_children() if name.isdigit()]
    return dict(losses=torch.stack(losses), weights=weights, stage_layers=stage_layers)


def _assert_close(a, b, what):
    torch.testing.assert_close(
        a, b, rtol=FP32_RTOL, atol=FP32_RTOL * b.abs().max().item(), msg=lambda m: f"{what}: {m}"
    )


def _assert_matches_reference(ranks, ref):
    for rank_out in ranks:  # train_batch returns the step's loss on every stage
        _assert_close(rank_out["losses"], ref["losses"], "losses")
    weights = {}
    for rank_out in ranks:
        weights.update(rank_out["weights"])
    assert weights.keys() == ref["weights"].keys()
    for name, w in ref["weights"].items():
        _assert_close(weights[name], w, f"weight {name}")


def _assert_stages_hold_embedding_first_head_last_blocks_even(ranks, pp):
    """Stage ``s`` is rank ``s * tp`` (pipe is the slowest axis); each stage holds a run of
    consecutive layers: the embedding on the first, the head on the last, blocks spread evenly."""
    tp = len(ranks) // pp
    stages = [ranks[s * tp]["stage_layers"] for s in range(pp)]
    L = SHAPE["num_layers"]
    assert stages[0][0] == (0, "PipelineEmbedding")
    assert stages[-1][-1] == (L + 1, "PipelineHead")
    assert [i for stage in stages for i, _ in stage] == list(range(L + 2))  # each layer once, in order
    blocks = [sum(t == "PipelineBlock" for _, t in stage) for stage in stages]
    assert sum(blocks) == L and max(blocks) - min(blocks) <= 1, blocks


@pytest.mark.timeout(180)
def test_pp2_angpt_matches_single_process(tmp_path):
    ref = _reference_result("angpt")
    got = run_distributed(_pipeline, 2, "angpt", 1, 2, str(tmp_path))
    _assert_stages_hold_embedding_first_head_last_blocks_even(got, 2)
    _assert_matches_reference(got, ref)
    for name, w in ref["weights"].items():  # the bound acted: no row left above 1
        if w.ndim == 2:
            assert w.norm(dim=1).max() < 1 + 1e-5, name
    # DeepSpeed's per-layer checkpoint files convert to GPTModel's names
    from an_megatron.training.checkpointing import gpt_state_dict_from_layer_files

    saved = gpt_state_dict_from_layer_files(os.path.join(tmp_path, "final"), SHAPE["num_layers"])
    for name, w in ref["weights"].items():
        _assert_close(saved[name].cpu(), w, f"saved {name}")


@pytest.mark.timeout(180)
def test_pp2_gptplus_with_activation_checkpointing_matches_single_process():
    """Also recomputes each block in backward (activation checkpointing): same numbers."""
    ref = _reference_result("gptplus")
    got = run_distributed(_pipeline, 2, "gptplus", 1, 2, None, 1)
    _assert_matches_reference(got, ref)


@pytest.mark.timeout(180)
def test_pp2_document_masking_with_activation_checkpointing_matches_single_process():
    """Packed documents: document and position ids travel with the hidden states between
    stages (and through recomputed blocks); same numbers as one process."""
    ref = _reference_result("angpt", True)
    got = run_distributed(_pipeline, 2, "angpt", 1, 2, None, 1, True)
    _assert_matches_reference(got, ref)


@pytest.mark.timeout(240)
def test_tp2_pp2_angpt_matches_single_process():
    ref = _reference_result("angpt")
    got = run_distributed(_pipeline, 4, "angpt", 2, 2)
    _assert_stages_hold_embedding_first_head_last_blocks_even(got, 2)
    _assert_matches_reference(got, ref)


@pytest.mark.timeout(240)
def test_pp4_angpt_matches_single_process():
    """Four stages of one block each: the middle stages only receive and send."""
    got = run_distributed(_pipeline, 4, "angpt", 1, 4)
    _assert_stages_hold_embedding_first_head_last_blocks_even(got, 4)
    _assert_matches_reference(got, _reference_result("angpt"))


def test_names_map_both_ways():
    from an_megatron.parallel.pipeline import gpt_param_name, pipeline_param_name

    L = SHAPE["num_layers"]
    pairs = {
        "0.word_embeddings.weight": "embedding.word_embeddings.weight",
        "1.attention.qkv.weight": "layers.0.attention.qkv.weight",
        f"{L}.mlp.down.weight": f"layers.{L - 1}.mlp.down.weight",
        f"{L + 1}.output.weight": "head.output.weight",
    }
    for pipe_name, gpt_name in pairs.items():
        assert gpt_param_name(pipe_name, L) == gpt_name
        assert pipeline_param_name(gpt_name, L) == pipe_name
    for bad in (f"{L + 2}.output.weight", "output.weight"):
        with pytest.raises(ValueError):
            gpt_param_name(bad, L)
    with pytest.raises(ValueError):
        pipeline_param_name(f"layers.{L}.mlp.down.weight", L)
