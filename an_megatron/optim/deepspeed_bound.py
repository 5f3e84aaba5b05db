"""The norm bound (anGPT) / normalization (nGPT) on DeepSpeed's fp32 master weights.

Bounding the model's weights after ``engine.step()`` is not enough under mixed precision or
ZeRO: the next step starts from the fp32 masters, which would still be unbounded. The
constraint must act on the masters, after the update and before DeepSpeed copies them into the
model weights and all-gathers them. Every DeepSpeed wrapper (ZeRO-1/2/3, ``BF16_Optimizer``,
the fp16/bf16 stage-0 optimizers) calls the inner torch optimizer's ``step()`` and only then
copies, so one hook point serves all modes: a step post-hook on the inner optimizer. What
differs between modes is only *where this rank's masters are*; each mode is a small adapter
(``_Masters`` below) that turns "the tensors the inner optimizer just stepped" into
``Fragment`` objects, and the math is ``constrain_fragments_`` (one all-reduce over the DP group
when the masters are partitioned, one over the TP group for row-parallel rows).

Usage, once, after ``deepspeed.initialize``::

    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config, mpu=DeepSpeedMPU)
    register_norm_bound(engine)          # then train as usual: engine.step() applies the bound

The DeepSpeed internals the adapters read (which tensors are the masters, where a parameter's
fragment lies in them) are accessors of ``an_megatron/compat/deepspeed.py``, read from 0.19.8.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from an_megatron.compat import deepspeed as ds_compat
from an_megatron.optim.norm_bound import Fragment, constrain_fragments_, constrained_parameters


def _index_of(master: torch.Tensor, tensors: Sequence[torch.Tensor]) -> int:
    """Position of ``master`` (by identity) in a wrapper's list of flat master tensors."""
    for i, t in enumerate(tensors):
        if t is master:
            return i
    raise RuntimeError(
        "the inner optimizer stepped a tensor that is not one of DeepSpeed's fp32 masters; "
        "DeepSpeed's internals changed: re-check an_megatron/compat/deepspeed.py"
    )


def _one_group(groups: list):
    """The single DP group of one hook call (MoE expert groups would need one call per group)."""
    if any(g is not groups[0] for g in groups[1:]):
        raise NotImplementedError("norm bound over masters partitioned on different DP groups (MoE)")
    return groups[0] if groups else None


class _Masters:
    """Where this rank's fp32 masters are, for one DeepSpeed optimizer mode.

    ``lp_groups`` lists the model parameters per master group, in the same order on every rank;
    ``fragments`` maps the masters the inner optimizer just stepped to fragments of those
    parameters (an empty tensor where this rank holds nothing of a parameter), plus the DP group
    the masters are partitioned over (None when every rank holds whole copies).
    """

    name = ""
    dp_partitioned = False

    def __init__(self, wrapper):
        self.wrapper = wrapper

    def lp_groups(self) -> list[list[torch.nn.Parameter]]:
        return ds_compat.model_param_groups(self.wrapper)

    def fragments(self, masters: list[torch.Tensor]) -> tuple[list[Fragment], object]:
        raise NotImplementedError


class _DenseMasters(_Masters):
    """No wrapper (fp32, no ZeRO): the inner optimizer steps the model parameters themselves."""

    name = "dense"

    def lp_groups(self):
        return [list(g["params"]) for g in self.wrapper.param_groups]

    def fragments(self, masters):
        frags = [Fragment(p.detach(), 0, tuple(p.shape), p.norm_constraint) for p in constrained_parameters(masters)]
        return frags, None


class _UnfusedMasters(_Masters):
    """``FP16_UnfusedOptimizer`` (stage 0 with bf16/fp16 and a non-fused optimizer): whole fp32
    copies, master ``j`` of group ``i`` is that of model parameter ``j`` of group ``i``."""

    name = "stage0-unfused"

    def fragments(self, masters):
        lp_of = {
            id(hp): lp
            for hps, lps in zip(ds_compat.fp32_masters(self.wrapper), self.lp_groups())
            for hp, lp in zip(hps, lps)
        }
        frags = []
        for hp in masters:
            lp = lp_of[id(hp)]
            if getattr(lp, "norm_constraint", None) is not None:
                frags.append(Fragment(hp.detach(), 0, tuple(lp.shape), lp.norm_constraint))
        return frags, None


class _FusedFlatMasters(_Masters):
    """``FP16_Optimizer`` (stage 0 with DeepSpeed's fused Adam): one flat fp32 copy per group,
    holding the group's model parameters back to back."""

    name = "stage0-fused"

    def __init__(self, wrapper):
        if ds_compat.uses_legacy_fusion(wrapper):
            raise NotImplementedError("norm bound with legacy_fusion: the fp16 weights bypass the masters")
        super().__init__(wrapper)

    def fragments(self, masters):
        frags = []
        for hp in masters:
            offset = 0
            for lp in self.lp_groups()[_index_of(hp, ds_compat.fp32_masters(self.wrapper))]:
                if getattr(lp, "norm_constraint", None) is not None:
                    piece = hp.detach().narrow(0, offset, lp.numel())
                    frags.append(Fragment(piece, 0, tuple(lp.shape), lp.norm_constraint))
                offset += lp.numel()
        return frags, None


class _HpMappedMasters(_Masters):
    """ZeRO-1/2 (``DeepSpeedZeroOptimizer``) and ``BF16_Optimizer``: one flat fp32 partition per
    group on each rank, holding a fragment of some parameters (``hp_fragment``); a fragment may
    start or end mid-row."""

    dp_partitioned = True

    def __init__(self, wrapper, name):
        super().__init__(wrapper)
        self.name = name

    def fragments(self, masters):
        frags, groups = [], []
        for hp in masters:
            i = _index_of(hp, ds_compat.fp32_masters(self.wrapper))
            groups.append(ds_compat.master_dp_group(self.wrapper, i))
            for lp in constrained_parameters(self.lp_groups()[i]):
                at = ds_compat.hp_fragment(lp)
                if at is None:  # none of lp here: an empty piece of the master (right device and dtype)
                    frags.append(Fragment(hp.detach()[:0], 0, tuple(lp.shape), lp.norm_constraint))
                    continue
                piece = hp.detach().narrow(0, at.offset, at.numel)
                frags.append(Fragment(piece, at.param_start, tuple(lp.shape), lp.norm_constraint))
        return frags, _one_group(groups)


class _Stage3Masters(_Masters):
    """ZeRO-3 (``DeepSpeedZeroOptimizer_Stage3``): one flat fp32 partition per sub-group, and
    the inner step runs once per sub-group. Each rank holds an equal slice of every parameter
    (``zero3_param_slice``), which may start or end mid-row."""

    name = "zero-3"
    dp_partitioned = True

    def fragments(self, masters):
        frags, groups = [], []
        for hp in masters:
            sg = _index_of(hp, ds_compat.fp32_masters(self.wrapper))
            group = ds_compat.master_dp_group(self.wrapper, sg)
            groups.append(group)
            rank = dist.get_rank(group=group)
            for lp in constrained_parameters(self.lp_groups()[sg]):
                at = ds_compat.zero3_param_slice(self.wrapper, lp, rank)
                piece = hp.detach().narrow(0, at.offset, at.numel)
                frags.append(Fragment(piece, at.param_start, ds_compat.zero3_full_shape(lp), lp.norm_constraint))
        return frags, _one_group(groups)


def _masters_of(optimizer) -> _Masters:
    """The adapter for an engine's ``optimizer`` (a DeepSpeed wrapper or a bare torch optimizer)."""
    if isinstance(optimizer, torch.optim.Optimizer):  # DeepSpeed's wrappers are not torch optimizers
        return _DenseMasters(optimizer)
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if isinstance(optimizer, DeepSpeedZeroOptimizer_Stage3):
        return _Stage3Masters(optimizer)
    if isinstance(optimizer, DeepSpeedZeroOptimizer):
        if ds_compat.uses_zenflow(optimizer):
            raise NotImplementedError("norm bound with ZenFlow")
        return _HpMappedMasters(optimizer, "zero-1/2")
    if isinstance(optimizer, BF16_Optimizer):
        return _HpMappedMasters(optimizer, "bf16-optimizer")
    if isinstance(optimizer, FP16_UnfusedOptimizer):
        return _UnfusedMasters(optimizer)
    if isinstance(optimizer, FP16_Optimizer):
        return _FusedFlatMasters(optimizer)
    raise TypeError(f"norm bound: unsupported DeepSpeed optimizer {type(optimizer).__name__}")


def _inner_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    """The torch optimizer(s) whose ``step()`` updates the masters."""
    if isinstance(optimizer, torch.optim.Optimizer):
        return [optimizer]
    return ds_compat.inner_optimizers(optimizer)


class NormBound:
    """The registered bound: ``mode`` names the adapter in use; ``remove()`` unregisters it."""

    def __init__(self, masters: _Masters, tp_group):
        self.masters, self.tp_group, self._handles = masters, tp_group, []

    @property
    def mode(self) -> str:
        return self.masters.name

    @torch.no_grad()
    def __call__(self, optimizer, args, kwargs) -> None:
        masters = [t for g in optimizer.param_groups for t in g["params"]]
        frags, dp_group = self.masters.fragments(masters)
        constrain_fragments_(
            frags, dp_group=dp_group, tp_group=self.tp_group, dp_partitioned=self.masters.dp_partitioned
        )

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def register_norm_bound(engine, model: torch.nn.Module | None = None, tp_group=None) -> NormBound:
    """Apply every ``param.norm_constraint`` of ``model`` (default ``engine.module``) to
    DeepSpeed's fp32 masters at the end of each inner optimizer step. Call once, after
    ``deepspeed.initialize``. ``tp_group`` defaults to megatron-core's tensor-parallel group
    (needed only when some constrained rows are split over it).

    Raises if a trainable constrained parameter has no master the hook would reach.
    """
    model = engine.module if model is None else model
    masters = _masters_of(engine.optimizer)
    # offloaded masters are on the CPU: their row sums would be all-reduced from there over NCCL
    if ds_compat.offloads_optimizer(engine.optimizer) and dist.get_backend() == "nccl":
        raise NotImplementedError("norm bound with ZeRO optimizer offload on NCCL (masters on the CPU)")
    constrained = constrained_parameters(p for p in model.parameters() if p.requires_grad)
    reached = {id(p) for group in masters.lp_groups() for p in group}
    missing = [
        name
        for name, p in model.named_parameters()
        if p.requires_grad and getattr(p, "norm_constraint", None) is not None and id(p) not in reached
    ]
    if missing:
        raise ValueError(f"norm bound: constrained parameters not updated by the optimizer: {missing}")
    if tp_group is None and any(p.norm_constraint.tp_split for p in constrained):
        from an_megatron.parallel import tp_group as _tp_group

        tp_group = _tp_group()
    bound = NormBound(masters, tp_group)
    bound._handles = [opt.register_step_post_hook(bound) for opt in _inner_optimizers(engine.optimizer)]
    return bound
