"""The norm bound on DeepSpeed's fp32 masters, in every optimizer mode, against one process.

Reference: one process, the whole global batch, torch Adam then ``constrain_parameters_``.
DeepSpeed: DP=2 (each rank half the batch), ``register_norm_bound`` after ``initialize``.
Every weight matrix is pushed to 1.5x its unit-norm init, so the bound acts at every step;
without it (or with it on the model copy only) the weights end ~1.5x off. The runs of each
file section share one spawn: starting a process that imports DeepSpeed takes ~10 s here.
"""

import pytest
import torch
from distributed import FP32_RTOL, current_device, full_named_tensors, run_distributed

SHAPE = dict(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=192, vocab_size=256, seq_length=32)
GLOBAL_BATCH, STEPS, PUSH = 4, 5, 1.5


def _tiny_lm(arch, tp):
    """The tiny GPT plus one constrained 5x7 weight: odd numel, so ZeRO-3 over 2 ranks pads it
    and cuts it mid-row. Every matrix starts at 1.5x its (unit-row) init."""
    from an_megatron.model import GPTModel, ModelConfig
    from an_megatron.optim import NormConstraint

    class TinyLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gpt = GPTModel(ModelConfig(arch=arch, tensor_model_parallel_size=tp, **SHAPE))
            odd = torch.randn(5, 7)
            self.odd = torch.nn.Parameter(odd / odd.norm(dim=1, keepdim=True))
            self.odd.norm_constraint = NormConstraint(self.gpt.config.weight_norm, dim=1)

        def forward(self, tokens, labels):
            return self.gpt.loss(tokens, labels) + 0.1 * torch.tanh(self.odd).pow(2).mean()

    torch.manual_seed(0)
    model = TinyLM()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(PUSH)
    return model.to(current_device())


def _batches():
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, SHAPE["vocab_size"], (STEPS, GLOBAL_BATCH, SHAPE["seq_length"] + 1), generator=gen)
    return tokens.to(current_device())


def _adam(params):
    # eps 1e-4: see tests/test_tensor_parallel.py (near-zero gradients summed in another order)
    return torch.optim.Adam(params, lr=1e-3, eps=1e-4)


def _reference(arch):
    """One process: torch Adam on the whole batch, then the constraint on the weights."""
    from an_megatron.optim import constrain_parameters_

    model = _tiny_lm(arch, 1)
    opt = _adam(model.parameters())
    losses = []
    for tokens in _batches():
        opt.zero_grad()
        loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        opt.step()
        constrain_parameters_(model.parameters())
        losses.append(loss.item())
    return dict(
        losses=torch.tensor(losses),
        weights={n: p.detach().clone() for n, p in model.named_parameters()},
        dims={
            n: p.norm_constraint.dim
            for n, p in model.named_parameters()
            if getattr(p, "norm_constraint", None) is not None
        },
    )


def _ds_config(stage, bf16=False, grad_accum_fp32=False):
    from an_megatron.parallel import dp_size

    cfg = {
        "train_batch_size": GLOBAL_BATCH,
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // dp_size(),
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,  # DeepSpeed's default is 1.0
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
    }
    if bf16:
        cfg["bf16"] = {"enabled": True}
    if grad_accum_fp32:
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    return cfg


def _engine(arch, tp, config):
    import deepspeed

    from an_megatron.optim.deepspeed_bound import register_norm_bound
    from an_megatron.parallel import DeepSpeedMPU

    model = _tiny_lm(arch, tp)
    engine, *_ = deepspeed.initialize(model=model, optimizer=_adam(model.parameters()), config=config, mpu=DeepSpeedMPU)
    return engine, register_norm_bound(engine)


def _train(engine, reload_dir=None):
    """STEPS steps on this rank's half of each batch; with ``reload_dir``, save a checkpoint after
    step 2 and load it back into the engine (the hook must still find the masters after that)."""
    from an_megatron.parallel import dp_rank

    half = GLOBAL_BATCH // 2
    losses = []
    for step, tokens in enumerate(_batches()):
        if reload_dir is not None and step == 2:
            engine.save_checkpoint(reload_dir, tag="step2")
            engine.load_checkpoint(reload_dir, tag="step2")
        mine = tokens[dp_rank() * half : (dp_rank() + 1) * half]
        loss = engine(mine[:, :-1], mine[:, 1:])
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return torch.tensor(losses)


def _full_weights(engine):
    """Every weight of the model as the full tensor (gathering ZeRO-3 and TP shards)."""
    import deepspeed

    from an_megatron.parallel import tp_group

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=engine.zero_optimization_stage() == 3):
        return full_named_tensors(engine.module, tp_group())


def _zero12_cuts_a_row(engine):
    """ZeRO-1/2: does this rank's partition begin or end inside a constrained row?"""
    for p in engine.module.parameters():
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is None or getattr(p, "norm_constraint", None) is None:
            continue
        a = mapping.lp_fragment_address
        if a.start % p.shape[1] or (a.start + a.numel) % p.shape[1]:
            return True
    return False


def _fp32_modes(tp, modes, checkpoint_dir=None):
    """Train every (arch, stage[, "reload"]) on this world; rank 0 also runs the references
    (TP=1 only). "reload": save and load a checkpoint mid-run, in ``checkpoint_dir``."""
    import logging

    import deepspeed

    from an_megatron.parallel import initialize_parallel

    deepspeed.utils.logger.setLevel(logging.WARNING)
    initialize_parallel(tp, 1)
    out = {}
    if tp == 1 and torch.distributed.get_rank() == 0:
        out["reference"] = {arch: _reference(arch) for arch in sorted({key[0] for key in modes})}
    for key in modes:
        arch, stage = key[:2]
        engine, bound = _engine(arch, tp, _ds_config(stage))
        cuts = _zero12_cuts_a_row(engine) if stage in (1, 2) else None
        losses = _train(engine, f"{checkpoint_dir}/{arch}-{stage}" if "reload" in key else None)
        out[key] = dict(
            mode=bound.mode,
            wrapper=type(engine.optimizer).__name__,
            losses=losses,
            weights=_full_weights(engine),
            cuts_a_row=cuts,
        )
        engine.destroy()
    return out


FP32_MODES = [
    ("angpt", 0),
    ("angpt", 1),
    ("angpt", 2),
    ("angpt", 3),
    ("ngpt", 2),
    ("ngpt", 3),
    ("angpt", 1, "reload"),
    ("angpt", 3, "reload"),
]
WRAPPERS = {
    0: ("dense", "Adam"),
    1: ("zero-1/2", "DeepSpeedZeroOptimizer"),
    2: ("zero-1/2", "DeepSpeedZeroOptimizer"),
    3: ("zero-3", "DeepSpeedZeroOptimizer_Stage3"),
}


@pytest.fixture(scope="module")
def dp2_fp32(tmp_path_factory):
    ranks = run_distributed(_fp32_modes, 2, 1, FP32_MODES, str(tmp_path_factory.mktemp("ckpt")), timeout=240)
    return ranks, ranks[0]["reference"]


def _assert_close(a, b, what):
    torch.testing.assert_close(
        a, b, rtol=FP32_RTOL, atol=FP32_RTOL * b.abs().max().item(), msg=lambda m: f"{what}: {m}"
    )


def _assert_matches_reference(ranks, key, ref):
    arch, stage = key[:2]
    assert (ranks[0][key]["mode"], ranks[0][key]["wrapper"]) == WRAPPERS[stage]
    # each DP rank's loss is over its half of the batch: their mean is the whole batch's
    _assert_close(torch.stack([r[key]["losses"] for r in ranks]).mean(0), ref[arch]["losses"], f"{key} losses")
    for r in ranks:
        assert r[key]["weights"].keys() == ref[arch]["weights"].keys()
        for name, w in ref[arch]["weights"].items():
            _assert_close(r[key]["weights"][name], w, f"{key} weight {name}")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("key", FP32_MODES, ids=["-".join([k[0], f"zero{k[1]}", *k[2:]]) for k in FP32_MODES])
def test_dp2_matches_one_process(dp2_fp32, key):
    ranks, ref = dp2_fp32
    _assert_matches_reference(ranks, key, ref)
    if key[1] in (1, 2):  # the hard case is covered: a partition boundary inside a row
        assert any(r[key]["cuts_a_row"] for r in ranks)


@pytest.mark.timeout(300)
def test_reference_bound_acted(dp2_fp32):
    """The references themselves: anGPT rows at most 1, nGPT rows / columns exactly 1."""
    _, ref = dp2_fp32
    for arch in ("angpt", "ngpt"):
        assert len(ref[arch]["dims"]) == 2 + 4 * SHAPE["num_layers"] + 1  # embedding, head, 4 per layer, odd
        for name, dim in ref[arch]["dims"].items():
            norms = ref[arch]["weights"][name].norm(dim=dim)
            if arch == "ngpt":
                torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=1e-5, msg=name)
            else:
                assert norms.max() <= 1 + 1e-5, name
                assert norms.min() >= 0.95, name  # at the bound (pushed past it), not collapsed


def _full_masters(engine):
    """The fp32 master of every constrained weight, as the full tensor (collective)."""
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.utils import safe_get_full_fp32_param
    from torch._utils import _unflatten_dense_tensors

    opt = engine.optimizer
    if isinstance(opt, FP16_UnfusedOptimizer):  # whole fp32 copies, not reachable by safe_get_*
        hp_of = {id(lp): hp for lps, hps in zip(opt.fp16_groups, opt.fp32_groups) for lp, hp in zip(lps, hps)}
        return {n: hp_of[id(p)].detach().clone() for n, p in engine.module.named_parameters()}
    if isinstance(opt, FP16_Optimizer):  # split the flat copies the way its step() does
        hp_of = {
            id(lp): hp
            for lps, flat in zip(opt.fp16_groups, opt.fp32_groups_flat)
            for lp, hp in zip(lps, _unflatten_dense_tensors(flat, lps))
        }
        return {n: hp_of[id(p)].detach().clone() for n, p in engine.module.named_parameters()}
    return {n: safe_get_full_fp32_param(p).detach().clone() for n, p in engine.module.named_parameters()}


BF16_MODES = {  # name: (ds config arguments, expected adapter, expected DeepSpeed wrapper)
    "stage0": ((0, True), "stage0-unfused", "FP16_UnfusedOptimizer"),
    "zero1": ((1, True), "zero-1/2", "DeepSpeedZeroOptimizer"),
    "zero2": ((2, True), "zero-1/2", "DeepSpeedZeroOptimizer"),
    "zero3": ((3, True), "zero-3", "DeepSpeedZeroOptimizer_Stage3"),
    "bf16-optimizer": ((1, True, True), "bf16-optimizer", "BF16_Optimizer"),
    "stage0-fused": (None, "stage0-fused", "FP16_Optimizer"),
}


class _FusedStage0:
    """``FP16_Optimizer`` (stage 0 + bf16/fp16 with DeepSpeed's fused Adam) built directly around a
    torch Adam: ``initialize`` picks it only for its CUDA FusedAdam. Each rank trains its own
    replica on its half of the batch (no gradient averaging: the bound is what is checked)."""

    def __init__(self):
        from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer

        from an_megatron.parallel import DeepSpeedMPU

        self.module = _tiny_lm("angpt", 1).to(torch.bfloat16)
        self.optimizer = FP16_Optimizer(
            _adam(self.module.parameters()), low_precision_dtype=torch.bfloat16, mpu=DeepSpeedMPU, clip_grad=0.0
        )

    def __call__(self, tokens, labels):
        return self.module(tokens, labels)

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.optimizer.step()

    def zero_optimization_stage(self):
        return 0

    def destroy(self):
        pass


def _bf16_modes():
    import logging

    import deepspeed

    from an_megatron.optim.deepspeed_bound import register_norm_bound
    from an_megatron.parallel import initialize_parallel

    deepspeed.utils.logger.setLevel(logging.WARNING)
    initialize_parallel(1, 1)
    out = {}
    for name, (config_args, _, _) in BF16_MODES.items():
        if config_args is None:
            engine = _FusedStage0()
            bound = register_norm_bound(engine)
        else:
            engine, bound = _engine("angpt", 1, _ds_config(*config_args))
        _train(engine)
        dims = {
            n: p.norm_constraint.dim
            for n, p in engine.module.named_parameters()
            if getattr(p, "norm_constraint", None) is not None
        }
        out[name] = dict(
            mode=bound.mode,
            wrapper=type(engine.optimizer).__name__,
            dims=dims,
            masters=_full_masters(engine),
            weights=_full_weights(engine),
        )
        engine.destroy()
    return out


@pytest.fixture(scope="module")
def dp2_bf16():
    return run_distributed(_bf16_modes, 2, timeout=240)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(BF16_MODES))
def test_bf16_masters_bounded_and_model_is_their_rounding(dp2_bf16, name):
    """bf16: DP ranks need not match one process bit for bit, but after every step each
    constrained row of the fp32 master is in the unit ball (at its edge, being pushed past it),
    and the model's bf16 weight is exactly that master rounded: the bound reached the model."""
    _, adapter, wrapper = BF16_MODES[name]
    for rank in dp2_bf16:
        got = rank[name]
        assert (got["mode"], got["wrapper"]) == (adapter, wrapper)
        assert len(got["dims"]) == 2 + 4 * SHAPE["num_layers"] + 1
        for param, dim in got["dims"].items():
            master, weight = got["masters"][param], got["weights"][param]
            assert master.dtype == torch.float32 and weight.dtype == torch.bfloat16
            norms = master.norm(dim=dim)
            assert norms.max() <= 1 + 1e-6, f"{name} {param}: row norm {norms.max():.7f}"
            assert norms.min() >= 0.95, f"{name} {param}: row norm {norms.min():.7f}"
            assert torch.equal(weight, master.to(torch.bfloat16)), f"{name} {param}"


TP_MODES = [("angpt", 1), ("angpt", 3)]


@pytest.mark.timeout(300)
def test_tp2_dp2_matches_one_process(dp2_fp32):
    """TP=2 x DP=2 on 4 ranks: row-parallel rows are split over TP and cut by ZeRO over DP, so
    their norms need both all-reduces. The TP=1 reference has the same init (same seed)."""
    _, ref = dp2_fp32
    ranks = run_distributed(_fp32_modes, 4, 2, TP_MODES, timeout=240)
    for key in TP_MODES:
        _assert_matches_reference(ranks, key, ref)
    assert any(r[("angpt", 1)]["cuts_a_row"] for r in ranks)


class _TwoWeights(torch.nn.Module):
    def __init__(self):
        super().__init__()
        from an_megatron.optim import NormConstraint

        self.a, self.b = torch.nn.Parameter(torch.full((2, 3), 1.0)), torch.nn.Parameter(torch.full((2, 3), 1.0))
        for p in (self.a, self.b):
            p.norm_constraint = NormConstraint("bound")


@pytest.mark.timeout(60)
def test_constrained_weight_outside_the_optimizer_is_an_error():
    """A constrained weight that no master covers would silently drift past the bound."""
    from types import SimpleNamespace

    from an_megatron.optim.deepspeed_bound import register_norm_bound

    model = _TwoWeights()
    engine = SimpleNamespace(module=model, optimizer=torch.optim.Adam([model.a], lr=0.5))
    with pytest.raises(ValueError, match=r"\['b'\]"):
        register_norm_bound(engine)
    model.b.requires_grad_(False)  # frozen: never updated, nothing to bound
    bound = register_norm_bound(engine)
    assert bound.mode == "dense"
    model.a.grad = -torch.ones_like(model.a)  # Adam adds lr = 0.5 to every entry
    engine.optimizer.step()
    torch.testing.assert_close(model.a.detach().norm(dim=1), torch.ones(2))
    bound.remove()
    engine.optimizer.step()
    torch.testing.assert_close(model.a.detach().norm(dim=1), torch.full((2,), (3**-0.5 + 0.5) * 3**0.5))
