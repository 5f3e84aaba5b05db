"""Activation recomputation (--recompute-*): the same numbers as without it, less memory kept.

In one process, gradients with full (uniform, block) and selective recomputation are bitwise
those without (fp32; the model draws nothing, so the recomputation replays the forward
exactly), for anGPT, nGPT and GPT+ and with document masking. Through the training entry point,
runs with recomputation on TP=2 (ZeRO-1), PP=2 (ZeRO-0), DP=2 with ZeRO-2 and ZeRO-3 log the
losses of a single process without it.
"""

from dataclasses import replace

import pytest
import torch
from test_layouts import assert_ranks_match, layout_flags, single_process_run
from test_training import MOCK, TINY, losses, run

from an_megatron.model import GPTModel, ModelConfig
from an_megatron.model.recompute import PARTS, SELECTIVE_RECOMPUTE, chunks, describe, run_blocks

SHAPE = dict(num_layers=4, hidden_size=64, num_attention_heads=4, vocab_size=128, seq_length=32)
MODES = {
    "full-uniform-1": dict(recompute_granularity="full", recompute_method="uniform"),
    "full-uniform-3": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=3),
    "full-block-2": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=2),
    "selective": dict(recompute_granularity="selective"),
}
MODELS = {
    "angpt": dict(arch="angpt"),
    "angpt-exact-nu-att": dict(arch="angpt", nu_att="exact"),
    "ngpt": dict(arch="ngpt"),
    "gptplus": dict(arch="gptplus"),
}


def _batch(documents: bool):
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 128, (2, 32), generator=gen)
    labels = torch.randint(0, 128, (2, 32), generator=gen)
    if not documents:
        return tokens, labels, None, None
    document_ids = torch.tensor([[0] * 10 + [1] * 15 + [2] * 7, [0] * 32])
    starts = [0, 10, 25]
    position_ids = torch.stack([torch.arange(32), torch.arange(32)])
    for s, e in zip(starts, starts[1:] + [32]):
        position_ids[0, s:e] = torch.arange(e - s)
    return tokens, labels, position_ids, document_ids


def _loss_and_grads(config, documents):
    model = GPTModel(config)
    tokens, labels, position_ids, document_ids = _batch(documents)
    loss = model(tokens, labels, None, position_ids, document_ids)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("documents", [False, True], ids=["one-document", "document-masking"])
@pytest.mark.parametrize("model", MODELS)
def test_gradients_with_recompute_equal_without(single_process, model, documents):
    base = ModelConfig(**MODELS[model], **SHAPE)
    ref_loss, ref_grads = _loss_and_grads(base, documents)
    for mode, fields in MODES.items():
        loss, grads = _loss_and_grads(replace(base, **fields), documents)
        assert torch.equal(loss, ref_loss), mode
        assert grads.keys() == ref_grads.keys()
        for name, g in grads.items():
            assert torch.equal(g, ref_grads[name]), (mode, name, (g - ref_grads[name]).abs().max())


def _saved_activation_bytes(config) -> int:
    """Bytes of the tensors autograd keeps for backward (per storage; parameters left out)."""
    model = GPTModel(config)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    tokens, labels, _, _ = _batch(False)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens, labels)
    return sum(seen.values())


def test_recompute_keeps_less(single_process):
    """The checkpoints are in place: full keeps far less than none, selective less than none."""
    base = ModelConfig(arch="angpt", **{**SHAPE, "hidden_size": 64, "seq_length": 32})
    none = _saved_activation_bytes(base)
    full = _saved_activation_bytes(replace(base, **MODES["full-uniform-1"]))
    selective = _saved_activation_bytes(replace(base, **MODES["selective"]))
    block = _saved_activation_bytes(replace(base, **MODES["full-block-2"]))
    assert full < block < none
    assert full < selective < none
    assert full < 0.5 * none, (full, none)


def test_chunks_follow_megatron_methods():
    def plan(method, n, blocks=5):
        return chunks(
            blocks,
            ModelConfig(
                **{**SHAPE, "num_layers": 5},
                **MODES["full-uniform-1"] | {"recompute_method": method, "recompute_num_layers": n},
            ),
        )

    assert plan("uniform", 1) == [(i, i + 1, True) for i in range(5)]
    assert plan("uniform", 2) == [(0, 2, True), (2, 4, True), (4, 5, True)]
    assert plan("uniform", 5) == [(0, 5, True)]
    assert plan("block", 2) == [(0, 1, True), (1, 2, True), (2, 5, False)]
    assert plan("block", 5) == [(i, i + 1, True) for i in range(5)]
    assert plan("block", 3, blocks=2) == [(0, 1, True), (1, 2, True)]  # a smaller stage: all its blocks
    assert chunks(5, ModelConfig(**SHAPE)) == [(0, 5, False)]
    assert chunks(5, ModelConfig(**SHAPE, recompute_granularity="selective")) == [(0, 5, False)]


def test_run_blocks_keeps_only_chunk_inputs():
    """uniform N keeps each chunk's input, block N keeps the first N blocks' inputs and every
    activation of the rest: counted as the tensors a chain of 6 small blocks keeps (non-reentrant
    checkpointing keeps a chunk's input through the same saved-tensor mechanism)."""
    weights = [torch.full((1000,), 1.0 + i / 10, requires_grad=True) for i in range(6)]
    blocks = [lambda x, w=w: (x * w).sin() for w in weights]

    def kept(**fields):
        config = ModelConfig(**{**SHAPE, "num_layers": 6}, **fields)
        seen = set()

        def pack(t):
            seen.add(t.untyped_storage().data_ptr())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = run_blocks(blocks, torch.ones(1000), config)
        out.sum().backward()
        return len(seen - {w.untyped_storage().data_ptr() for w in weights})

    assert kept() == 12  # each block keeps x (for w's gradient) and x * w (for sin's)
    assert kept(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=3) == 2
    assert kept(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1) == 6
    assert kept(recompute_granularity="full", recompute_method="block", recompute_num_layers=2) == 2 + 4 * 2


def test_flags_set_the_config_and_alias():
    from an_megatron.training.arguments import parse_args

    common = [*TINY, *MOCK, "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "1", "--lr", "1e-3"]
    cfg, _ = parse_args([*common, "--recompute-activations"], world_size=1)
    assert cfg.model["recompute_granularity"] == "selective"
    cfg, _ = parse_args([*common, "--recompute-granularity", "full", "--recompute-method", "block"], world_size=1)
    config = cfg.model_config(256)
    assert (config.recompute_granularity, config.recompute_method, config.recompute_num_layers) == ("full", "block", 1)
    assert describe(config) == "recompute full block 1"
    assert "attention_core" in describe(replace(config, **_selective()))
    assert set(SELECTIVE_RECOMPUTE) <= set(PARTS)


def _selective():
    return dict(NO_RECOMPUTE, recompute_granularity="selective")


NO_RECOMPUTE = dict(recompute_granularity=None, recompute_method=None, recompute_num_layers=None)


def test_checkpoint_with_recompute_loads_into_model_without(single_process, tmp_path):
    """Recomputation changes no name and no weight: a model saved with it (its state dict and
    its an_megatron.json-style config) loads strictly into one without."""
    config = ModelConfig(**SHAPE, **MODES["full-uniform-3"])
    saved = GPTModel(config)
    torch.save(dict(config=config.to_dict(), model=saved.state_dict()), tmp_path / "m.pt")
    obj = torch.load(tmp_path / "m.pt", weights_only=False)
    loaded_config = ModelConfig(**obj["config"])
    assert loaded_config == config
    plain = GPTModel(replace(loaded_config, **NO_RECOMPUTE))
    plain.load_state_dict(obj["model"], strict=True)
    # each weight under one name only (a module kept twice would add a second)
    weights = [k for k in obj["model"] if not k.endswith("._extra_state")]  # megatron-core's layer metadata
    assert sorted(weights) == sorted(n for n, _ in saved.named_parameters())
    tokens, labels, _, _ = _batch(False)
    assert torch.equal(plain(tokens, labels), saved(tokens, labels))
    # a training checkpoint's an_megatron.json with recompute on: loading it with the flags off is allowed
    from an_megatron.training.checkpointing import check_compatible

    check_compatible({"model_config": config.to_dict()}, plain.config, str(tmp_path))


# ---- through the training entry point ----------------------------------------------------------

COMMON = layout_flags(4, 3, "--reset-attention-mask", "--reset-position-ids")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out, reference = single_process_run(tmp_path_factory, COMMON)
    assert "no recompute" in out.stdout
    return reference


RUNS = {
    "tp2-selective": (["--tensor-model-parallel-size", "2", "--recompute-activations"], "recompute selective"),
    "tp2-full-uniform-1": (
        ["--tensor-model-parallel-size", "2", *"--recompute-granularity full --recompute-method uniform".split()],
        "recompute full uniform 1",
    ),
    "pp2-selective": (["--pipeline-model-parallel-size", "2", "--recompute-activations"], "recompute selective"),
    "pp2-full-uniform-2": (
        ["--pipeline-model-parallel-size", "2", *"--recompute-granularity full --recompute-method uniform".split()]
        + ["--recompute-num-layers", "2"],
        "recompute full uniform 2",
    ),
    "pp2-full-block-1": (
        ["--pipeline-model-parallel-size", "2", *"--recompute-granularity full --recompute-method block".split()],
        "recompute full block 1",
    ),
    "dp2-zero2-full-block-2": (
        ["--zero2", *"--recompute-granularity full --recompute-method block --recompute-num-layers 2".split()],
        "recompute full block 2",
    ),
    "dp2-zero3-full-uniform-1": (
        ["--zero3", *"--recompute-granularity full --recompute-method uniform".split()],
        "recompute full uniform 1",
    ),
    "dp2-zero3-selective": (["--zero3", "--recompute-granularity", "selective"], "recompute selective"),
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", RUNS)
def test_training_with_recompute_matches_single_process_without(layout, reference, tmp_path):
    flags, described = RUNS[layout]
    (tmp_path / "zero0.json").write_text('{"zero_optimization": {"stage": 0}}')
    (tmp_path / "zero2.json").write_text('{"zero_optimization": {"stage": 2}}')
    (tmp_path / "zero3.json").write_text('{"zero_optimization": {"stage": 3}}')
    zero = [f for f in flags if f in ("--zero2", "--zero3")]
    if zero:
        flags = [f for f in flags if f not in zero] + ["--deepspeed_config", str(tmp_path / f"{zero[0][2:]}.json")]
    elif "--pipeline-model-parallel-size" in flags:
        flags = flags + ["--deepspeed_config", str(tmp_path / "zero0.json")]
    else:
        flags = flags + ["--deepspeed_config", "examples/ds_fp32.json"]
    out = assert_ranks_match(COMMON + flags, reference, 3, tmp_path / "m.jsonl")
    assert described in out.stdout


@pytest.mark.timeout(600)
def test_checkpoint_saved_with_recompute_resumes_and_converts_without(reference, tmp_path):
    """A run with full recomputation saves at iteration 2; a run without recomputation resumes
    from it and logs the reference's loss at iteration 3, and the consolidated checkpoint loads
    into a model without recomputation."""
    ds = ["--deepspeed_config", "examples/ds_fp32.json"]
    recompute = "--recompute-granularity full --recompute-method uniform --recompute-num-layers 2".split()
    out = run(COMMON + ds + recompute + ["--exit-interval", "2", "--save", str(tmp_path / "ckpt")])
    assert out.returncode == 0, out.stderr[-3000:]
    out = run(COMMON + ds + ["--load", str(tmp_path / "ckpt"), "--metrics-file", str(tmp_path / "m.jsonl")])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "no recompute" in out.stdout
    got = losses(tmp_path / "m.jsonl")
    assert sorted(got) == [3]
    assert got[3] == pytest.approx(reference[3], rel=1e-5)

    from an_megatron.training.convert import consolidate

    obj = consolidate(str(tmp_path / "ckpt"), "iter_0000002")
    assert obj["config"]["recompute_granularity"] == "full"
    model = GPTModel(ModelConfig(**{**obj["config"], **NO_RECOMPUTE}))
    missing, unexpected = model.load_state_dict(obj["model"], strict=False)
    assert not unexpected and all(k.endswith("._extra_state") for k in missing), (missing, unexpected)
