"""Sequence parallelism (``--sequence-parallel``) at TP=2 against one process, in fp32.

Model level: logits, loss, every gradient (gathered to full size) and the weights after three
Adam steps with the norm bound, for anGPT, nGPT and GPT+, with and without packed documents.
DeepSpeed: weights after a few steps with gradient accumulation at ZeRO stages 0-3 (each
micro-batch's gradient of the replicated parameters must be all-reduced exactly once). Entry
point: the logged loss of every iteration at TP=2 and at TP=2 x PP=2. Each section's runs share
one spawn per world size.
"""

import pytest
import torch
from distributed import bounded_adam_steps, current_device, full_named_tensors, run_distributed
from test_layouts import COMMON, assert_ranks_match
from test_training import losses, run

SHAPE = dict(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=192, vocab_size=256, seq_length=32)
# (arch, packed documents, anGPT's nu_att): nu_att depends on each query's global position
MODEL_CASES = [(arch, documents, "gaussian") for arch in ("angpt", "ngpt", "gptplus") for documents in (False, True)]
MODEL_CASES += [("angpt", True, "exact"), ("angpt", False, "dense")]


def _assert_close(a, b, what):
    torch.testing.assert_close(
        a, b, rtol=1e-5, atol=1e-6 * max(1.0, b.abs().max().item()), msg=lambda m: f"{what}: {m}"
    )


def _model(arch, tp, sequence_parallel, **overrides):
    from an_megatron.model import GPTModel, ModelConfig

    torch.manual_seed(0)
    model = GPTModel(ModelConfig(arch=arch, tensor_model_parallel_size=tp, **{**SHAPE, **overrides}))
    model.to(current_device())
    if sequence_parallel:
        from an_megatron.parallel.sequence_parallel import apply_sequence_parallel

        apply_sequence_parallel(model)
    return model


def _batch(gen, batch, documents):
    """Token ids ``(batch, s + 1)``, and with ``documents`` packed documents: ``document_ids`` and
    ``position_ids`` restarting at each (as --reset-attention-mask --reset-position-ids make)."""
    from an_megatron.model.attention import visible_keys

    tokens = torch.randint(0, SHAPE["vocab_size"], (batch, SHAPE["seq_length"] + 1), generator=gen)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    masking = {}
    if documents:
        docs = torch.randint(0, 2, inputs.shape, generator=gen).cumsum(1) // 4
        masking = dict(document_ids=docs, position_ids=visible_keys(docs, docs.shape[1], docs.device) - 1)
    device = current_device()
    return inputs.to(device), labels.to(device), {k: v.to(device) for k, v in masking.items()}


def _model_cases(tp, sequence_parallel, cases):
    from an_megatron.parallel import initialize_parallel, tp_group
    from an_megatron.parallel.tensor_parallel import gather_tp_tensor

    initialize_parallel(tp, 1)
    out = {}
    for arch, documents, nu_att in cases:
        model = _model(arch, tp, sequence_parallel, nu_att=nu_att)
        inputs, labels, masking = _batch(torch.Generator().manual_seed(1), 3, documents)
        # a loss mask with holes, as --eod-mask-loss makes
        loss_mask = (torch.arange(inputs.numel(), device=inputs.device).view(inputs.shape) % 5 != 0).float()
        logits = gather_tp_tensor(model(inputs, **masking), -1, 1, tp_group())
        loss = model.loss(inputs, labels, loss_mask, **masking)
        loss.backward()
        result = dict(logits=logits, loss=loss.detach(), grads=full_named_tensors(model, tp_group(), grads=True))
        bounded_adam_steps(model, lambda: model.loss(inputs, labels, loss_mask, **masking))
        result["weights"] = full_named_tensors(model, tp_group())
        out[(arch, documents, nu_att)] = result
    return out


@pytest.fixture(scope="module")
def model_runs():
    (ref,) = run_distributed(_model_cases, 1, 1, False, MODEL_CASES, timeout=450)
    got = run_distributed(_model_cases, 2, 2, True, MODEL_CASES, timeout=450)
    return ref, got


@pytest.mark.timeout(1000)
@pytest.mark.parametrize(
    "case", MODEL_CASES, ids=[f"{a}-{'documents' if d else 'plain'}-{n}" for a, d, n in MODEL_CASES]
)
def test_sequence_parallel_model_matches_one_process(model_runs, case):
    ref, got = model_runs
    ref = ref[case]
    for rank in got:
        out = rank[case]
        _assert_close(out["logits"], ref["logits"], "logits")
        _assert_close(out["loss"], ref["loss"], "loss")
        assert out["grads"].keys() == ref["grads"].keys()
        for name, g in ref["grads"].items():
            _assert_close(out["grads"][name], g, f"grad {name}")
        for name, w in ref["weights"].items():
            _assert_close(out["weights"][name], w, f"weight {name}")


def _shapes_and_marks(tp):
    """What apply_sequence_parallel does to a built model: the residual stream's shape between
    blocks, the logits' shape, which parameters are marked, and that names are unchanged."""
    from an_megatron.parallel import initialize_parallel
    from an_megatron.training.generate import sample

    initialize_parallel(tp, 1)
    plain = _model("gptplus", tp, False)
    plain_names = [n for n, _ in plain.named_parameters()]
    model = _model("gptplus", tp, True)
    # generation pads odd-length contexts to a multiple of the TP size: same tokens as without SP
    args = ([5, 7, 11], 6, SHAPE["seq_length"], SHAPE["vocab_size"])
    samples = (sample(plain, *args, seed=3), sample(model, *args, seed=3, length_multiple=tp))
    seen = {}
    model.layers[0].register_forward_hook(lambda m, a, out: seen.update(block=tuple(out.shape)))
    inputs, _, _ = _batch(torch.Generator().manual_seed(1), 3, False)
    logits = model(inputs)
    marked = sorted(n for n, p in model.named_parameters() if getattr(p, "sequence_parallel", False))
    return dict(
        samples=samples,
        block=seen["block"],
        logits=tuple(logits.shape),
        marked=marked,
        names_equal=plain_names == [n for n, _ in model.named_parameters()],
    )


@pytest.mark.timeout(450)
def test_sequence_parallel_shards_the_residual_stream():
    ranks = run_distributed(_shapes_and_marks, 2, 2, timeout=400)
    s, d, V = SHAPE["seq_length"], SHAPE["hidden_size"], SHAPE["vocab_size"]
    for rank in ranks:
        assert rank["block"] == (s // 2, 3, d)  # sequence-first shard, as megatron-core's regions split dim 0
        assert rank["logits"] == (3, s, V // 2)  # the whole sequence, this rank's vocabulary slice
        assert rank["names_equal"]
        assert rank["samples"][0] == rank["samples"][1] and len(rank["samples"][0]) == 3 + 6
        # GPT+: the RMSNorm gains of the pre-norms and the final norm (anGPT's alphas are covered above)
        assert rank["marked"] == sorted(
            [f"layers.{i}.{n}.weight" for i in range(SHAPE["num_layers"]) for n in ("attention_norm", "mlp_norm")]
            + ["head.final_norm.weight"]
        )


# ---- DeepSpeed: gradient accumulation and ZeRO ----------------------------------------------

ENGINE_CASES = [("angpt", 1, False), ("ngpt", 0, True), ("gptplus", 2, True), ("angpt", 3, True)]
STEPS, ACCUMULATION, MICRO = 3, 2, 2


def _engine_batches(documents):
    gen = torch.Generator().manual_seed(2)
    return [[_batch(gen, MICRO, documents) for _ in range(ACCUMULATION)] for _ in range(STEPS)]


def _engine_reference(arch, documents):
    """One process, torch Adam on each step's whole batch (the mean of its micro-batches' losses)."""
    from an_megatron.optim import constrain_parameters_

    model = _model(arch, 1, False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-4)
    step_losses = []
    for micro_batches in _engine_batches(documents):
        opt.zero_grad()
        loss = sum(model(x, y, None, **m) for x, y, m in micro_batches) / ACCUMULATION
        loss.backward()
        opt.step()
        constrain_parameters_(model.parameters())
        step_losses.append(loss.item())
    return dict(losses=torch.tensor(step_losses), weights={n: p.detach().clone() for n, p in model.named_parameters()})


def _engine_cases(tp, cases):
    import logging

    import deepspeed

    from an_megatron.optim.deepspeed_bound import register_norm_bound
    from an_megatron.parallel import DeepSpeedMPU, initialize_parallel, tp_group

    deepspeed.utils.logger.setLevel(logging.WARNING)
    initialize_parallel(tp, 1)
    out = {}
    for arch, stage, documents in cases:
        if tp == 1:
            out[(arch, stage, documents)] = _engine_reference(arch, documents)
            continue
        model = _model(arch, tp, True)
        config = {
            "train_batch_size": MICRO * ACCUMULATION,
            "train_micro_batch_size_per_gpu": MICRO,
            "gradient_accumulation_steps": ACCUMULATION,
            "gradient_clipping": 0.0,
            "zero_optimization": {"stage": stage},
            "steps_per_print": 10**9,
        }
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-4)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config, mpu=DeepSpeedMPU)
        register_norm_bound(engine)
        step_losses = []
        for micro_batches in _engine_batches(documents):
            total = 0.0
            for x, y, m in micro_batches:
                loss = engine(x, y, None, m.get("position_ids"), m.get("document_ids"))
                engine.backward(loss)
                engine.step()
                total += loss.item()
            step_losses.append(total / ACCUMULATION)
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=stage == 3):
            weights = full_named_tensors(engine.module, tp_group())
        out[(arch, stage, documents)] = dict(losses=torch.tensor(step_losses), weights=weights)
        engine.destroy()
    return out


@pytest.mark.timeout(1200)
def test_sequence_parallel_deepspeed_matches_one_process():
    (ref,) = run_distributed(_engine_cases, 1, 1, ENGINE_CASES, timeout=450)
    got = run_distributed(_engine_cases, 2, 2, ENGINE_CASES, timeout=700)
    for case in ENGINE_CASES:
        for rank in got:
            _assert_close(rank[case]["losses"], ref[case]["losses"], f"{case} losses")
            assert rank[case]["weights"].keys() == ref[case]["weights"].keys()
            for name, w in ref[case]["weights"].items():
                _assert_close(rank[case]["weights"][name], w, f"{case} weight {name}")


# ---- the entry point ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """One process; --sequence-parallel is given and is off at TP=1 (the start-up line says so)."""
    path = tmp_path_factory.mktemp("ref") / "m.jsonl"
    out = run(
        COMMON + ["--deepspeed_config", "examples/ds_fp32.json", "--sequence-parallel", "--metrics-file", str(path)],
        timeout=540,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out, losses(path)


@pytest.mark.timeout(600)
def test_sequence_parallel_is_off_at_tp1(reference_run):
    out, _ = reference_run
    assert "TP=1 (--sequence-parallel off: it needs TP > 1, as in Megatron-LM) PP=1" in out.stdout


LAYOUTS = {
    "tp2": (2, ["--tensor-model-parallel-size", "2"]),
    "tp2-pp2": (4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]),
}


@pytest.mark.timeout(900)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_sequence_parallel_entry_point_losses_match_single_process(layout, reference_run, tmp_path):
    _, reference = reference_run
    nproc, flags = LAYOUTS[layout]
    (tmp_path / "zero0.json").write_text('{"zero_optimization": {"stage": 0}}')
    args = COMMON + flags + ["--sequence-parallel", "--deepspeed_config", str(tmp_path / "zero0.json")]
    out = assert_ranks_match(args, reference, 5, tmp_path / "m.jsonl", nproc=nproc, timeout=840)
    assert "TP=2 (sequence parallel)" in out.stdout


def test_pipeline_config_turns_partitioning_off():
    """Pipeline stages send their own sequence shards: DeepSpeed must not partition them again."""
    from an_megatron.parallel.sequence_parallel import pipeline_ds_config

    ds = {"train_batch_size": 8, "pipeline": {"activation_checkpoint_interval": 1}}
    assert pipeline_ds_config(ds) == {
        "train_batch_size": 8,
        "pipeline": {"activation_checkpoint_interval": 1, "pipe_partitioned": False, "grad_partitioned": False},
    }
    assert "pipe_partitioned" not in ds["pipeline"]  # the given config is not written to
    with pytest.raises(ValueError, match="pipeline.pipe_partitioned true with --sequence-parallel"):
        pipeline_ds_config({"pipeline": {"pipe_partitioned": True}})


@pytest.mark.timeout(900)
def test_sequence_parallel_entry_point_with_documents(tmp_path):
    """GPT+ with --reset-position-ids --reset-attention-mask --eod-mask-loss: the document ids
    the trainer builds reach attention whole, the loss mask covers the gathered logits."""
    flags = COMMON + ["--arch", "gptplus", "--reset-position-ids", "--reset-attention-mask", "--eod-mask-loss"]
    flags += ["--deepspeed_config", "examples/ds_fp32.json"]
    ref = run(flags + ["--metrics-file", str(tmp_path / "ref.jsonl")], timeout=400)
    assert ref.returncode == 0, ref.stderr[-3000:]
    sp = flags + ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
    assert_ranks_match(sp, losses(tmp_path / "ref.jsonl"), 5, tmp_path / "sp.jsonl", timeout=400)
