"""Checkpoint conversion: any saved layout -> one fp32 ``GPTModel`` state dict -> any other layout.

**Consolidate** (``consolidate``): a checkpoint written by ``pretrain_angpt.py`` with any TP, PP,
DP and ZeRO stage becomes ``{"model": fp32 state dict with GPTModel names, "config": ModelConfig
dict (TP=1), "iteration", "consumed_samples", "source"}``. Where ZeRO keeps fp32 masters (stage
1-3) they are the weights: in bf16 the module copies are rounded. DeepSpeed's own reader
(``zero_to_fp32``) merges the data-parallel partitions, but it globs every ``*_optim_states.pt``
of the directory and so handles one model-parallel rank only; we call the functions it builds on
(``an_megatron/compat/deepspeed.py``) once per model-parallel rank (``mp_rank_XX``: pipeline
stage x tensor rank; a pipeline's model states hold no ``module``, so we describe them to it
ourselves). Stage 0 takes the module's weights
(``mp_rank_XX_model_states.pt``, or the pipeline's layer files): exact in fp32; in bf16 they are
the rounded copies (the stage-0 bf16 optimizer's masters are stored without names).
Tensor-parallel shards are merged with ``merge_tp_shards``; which parameters are split, along
which dimension and with which stride is read from a TP=1 ``GPTModel`` built from the saved config
(megatron-core marks its parameters), so it cannot drift from the model. Every file is read
weights-only (``compat.deepspeed.load_file``, also inside ``zero_to_fp32``): a file naming code
is refused with one line naming it, and nothing of it runs.

The writer starts ``T * P`` processes that each load the whole consolidated file: the host needs
that much memory (fine for CPU-side conversion of the models this project trains).

**Write another layout** (``write_layout``): the target checkpoint is written by DeepSpeed itself.
We start ``T * P`` processes (a one-node gloo world), build the target model (``GPTModel`` or the
pipeline module) with the target TP, copy each rank's shard in, and call the engine's
``save_checkpoint`` with ZeRO stage 0 and no optimizer. Writing DeepSpeed's files by hand would
have to track every key its loader reads (``mp_rank_XX`` vs ``layer_XX-model_YY`` files, the
pipeline's mp-rank numbering, client state) across versions; the engine writes exactly what the
engine loads. The target holds weights only, so ``an_megatron.json`` says ``"weights_only": true``
and the trainer refuses it without ``--no-load-optim``. The iteration and consumed samples of the
source are kept (Megatron's ``--no-load-optim`` keeps them too): training continues the data and
learning-rate schedule with a fresh optimizer. Limitation: DeepSpeed 0.19.8 rebuilds ZeRO-3
weights from optimizer files when it loads without optimizer states, so the target run must use
ZeRO stage 0, 1 or 2.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace

import torch

from an_megatron.compat import deepspeed as ds_compat
from an_megatron.model.config import ModelConfig
from an_megatron.parallel.tensor_parallel import merge_tp_shards, shard_tp_tensor
from an_megatron.training.checkpointing import META, CheckpointError, _write_atomic, publish, read_checkpoint_meta

WEIGHTS_ONLY = "weights_only"  # an_megatron.json key of a converted (optimizer-less) checkpoint
FORMAT = "an_megatron.consolidated.v1"


class ConvertError(RuntimeError):
    """A checkpoint that cannot be converted; the message names the file or flag."""


# ---- which parameters are tensor-parallel, from the model itself -----------------------------

_LAYER = re.compile(r"layers\.0\.(.+)")


def param_metadata(config: ModelConfig) -> dict[str, tuple[tuple, int | None, int]]:
    """``{GPTModel name: (full shape, partition_dim or None, partition_stride)}``.

    Built from a TP=1 model with one block (blocks differ only in their seed), whose
    megatron-core parameters carry ``tensor_model_parallel``/``partition_dim``/``partition_stride``.
    Needs a one-process world; starts (and ends) one if none is running.
    """
    import torch.distributed as dist

    from an_megatron.model import GPTModel
    from an_megatron.parallel import destroy_parallel, initialize_parallel
    from an_megatron.parallel.tensor_parallel import is_tp_sharded

    started = not dist.is_initialized()
    if started:
        initialize_parallel(1, 1)
    try:
        model = GPTModel(replace(config, tensor_model_parallel_size=1, num_layers=1))
        one = {
            n: (
                tuple(p.shape),
                p.partition_dim if is_tp_sharded(p) else None,
                p.partition_stride if is_tp_sharded(p) else 1,
            )
            for n, p in model.named_parameters()
        }
    finally:
        if started:
            destroy_parallel()
    out = {}
    for name, info in one.items():
        m = _LAYER.fullmatch(name)
        if m is None:
            out[name] = info
        else:
            out.update({f"layers.{i}.{m.group(1)}": info for i in range(config.num_layers)})
    return out


# ---- reading a saved checkpoint --------------------------------------------------------------


def _load(path: str) -> dict:
    """A file of a checkpoint or a consolidated file, loaded weights-only (``load_file``)."""
    if not os.path.isfile(path):
        raise ConvertError(f"{path}: missing")
    try:
        return ds_compat.load_file(path)
    except ds_compat.CheckpointFileError as e:  # truncated, not a torch file, or naming code
        raise ConvertError(str(e)) from None


def _zero_masters(
    ckpt_dir: str, mp_rank: int, stage: int, dp: int, bf16: bool, pipelined: bool
) -> dict[str, torch.Tensor]:
    """One model-parallel rank's fp32 masters, merged over its ``dp`` data-parallel partitions by
    DeepSpeed's own ``zero_to_fp32`` functions (file names as the engine writes them)."""
    mp = f"mp_rank_{mp_rank:02d}"
    model_files = (
        [f"zero_pp_rank_{d}_{mp}_model_states.pt" for d in range(dp)] if stage == 3 else [f"{mp}_model_states.pt"]
    )
    optim_files = [f"{'bf16_' if bf16 else ''}zero_pp_rank_{d}_{mp}_optim_states.pt" for d in range(dp)]
    model_files, optim_files = ([os.path.join(ckpt_dir, f) for f in files] for files in (model_files, optim_files))
    for f in model_files + optim_files:
        _load_exists(f)
    try:
        if pipelined:  # the pipeline's weights are in layer files: its model states have no 'module'
            states = ds_compat.zero_model_states_from_shapes(_load(model_files[0]))
        else:
            states = ds_compat.zero_model_states(model_files)
        sd = ds_compat.zero_fp32_state_dict(ckpt_dir, optim_files, states)
    except (ValueError, KeyError) as e:  # e.g. BF16_Optimizer files (bf16 + grad_accum_dtype fp32): not ZeRO's
        raise ConvertError(f"{ckpt_dir} (mp_rank_{mp_rank:02d}): {e}") from None
    return {k: v.contiguous().float().clone() for k, v in sd.items()}


def _module_weights(ckpt_dir: str, mp_rank: int, tp_rank: int, pipelined: bool, num_layers: int) -> dict:
    """Stage 0: the module's weights (exact in fp32; no masters exist)."""
    from an_megatron.training.checkpointing import gpt_state_dict_from_layer_files, layer_file_name

    if pipelined:
        for i in range(num_layers + 2):
            _load_exists(os.path.join(ckpt_dir, layer_file_name(i, tp_rank)))
        return {
            k: v.float()
            for k, v in gpt_state_dict_from_layer_files(ckpt_dir, num_layers, tp_rank).items()
            if isinstance(v, torch.Tensor)
        }
    path = os.path.join(ckpt_dir, f"mp_rank_{mp_rank:02d}_model_states.pt")
    module = _load(path).get("module")
    if not isinstance(module, dict):
        raise ConvertError(f"{path}: no 'module' state dict")
    return {k: v.float() for k, v in module.items() if isinstance(v, torch.Tensor)}


def _load_exists(path: str) -> None:
    if not os.path.isfile(path):
        raise ConvertError(f"{path}: missing")


def _ds_state_file(ckpt_dir: str) -> str:
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if os.path.isfile(os.path.join(ckpt_dir, name)):
            return os.path.join(ckpt_dir, name)
    raise ConvertError(
        f"{os.path.join(ckpt_dir, 'mp_rank_00_model_states.pt')}: missing (no DeepSpeed model states in {ckpt_dir})"
    )


def consolidate(load_dir: str, tag: str | None = None) -> dict:
    """The checkpoint ``load_dir`` (``latest``, or ``tag``) as one fp32 ``GPTModel`` state dict."""
    from an_megatron.parallel.pipeline import gpt_param_name

    try:
        latest_tag, meta = read_checkpoint_meta(load_dir)
    except CheckpointError as e:
        raise ConvertError(str(e)) from None
    if tag is not None and tag != latest_tag:
        meta_path = os.path.join(load_dir, tag, META)
        if not os.path.isfile(meta_path):
            raise ConvertError(f"--tag {tag}: {meta_path} missing")
        with open(meta_path) as f:
            meta = json.load(f)
    tag = tag or latest_tag
    ckpt_dir = os.path.join(load_dir, tag)
    config = ModelConfig(**meta["model_config"])
    tp = config.tensor_model_parallel_size
    head = _load(_ds_state_file(ckpt_dir))
    mp_world, dp = head.get("mp_world_size", 1), head.get("dp_world_size", 1)
    ds_config = head.get("ds_config") or {}
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    bf16 = bool(ds_config.get("bf16", {}).get("enabled"))
    pp = max(1, mp_world // tp)
    pipelined = os.path.isfile(os.path.join(ckpt_dir, "layer_00-model_00-model_states.pt"))
    if mp_world != tp * pp:
        raise ConvertError(f"{ckpt_dir}: {mp_world} model-parallel ranks is not a multiple of TP={tp}")

    # Each mp rank (stage * TP + tensor rank, DeepSpeed's numbering) -> its shard of each name.
    shards: dict[str, dict[int, torch.Tensor]] = {}
    for mp_rank in range(mp_world):
        tp_rank = mp_rank % tp
        try:  # files read by zero_to_fp32 and the layer files: one line naming the file
            if stage > 0:
                local = _zero_masters(ckpt_dir, mp_rank, stage, dp, bf16, pipelined)
            elif pipelined and mp_rank >= tp:
                continue  # the layer files of every stage were read with the first stage
            else:
                local = _module_weights(ckpt_dir, mp_rank, tp_rank, pipelined, config.num_layers)
        except ds_compat.CheckpointFileError as e:
            raise ConvertError(str(e)) from None
        for name, value in local.items():
            if pipelined and stage > 0:
                name = gpt_param_name(name, config.num_layers)
            if tp_rank in shards.setdefault(name, {}):
                raise ConvertError(f"{ckpt_dir}: parameter {name} found twice for tensor rank {tp_rank}")
            shards[name][tp_rank] = value

    model = {}
    for name, (shape, dim, stride) in param_metadata(config).items():
        got = shards.get(name)
        if not got or sorted(got) != list(range(tp)):
            raise ConvertError(
                f"{ckpt_dir}: parameter {name} missing for tensor ranks {sorted(set(range(tp)) - set(got or {}))}"
            )
        full = merge_tp_shards([got[r] for r in range(tp)], dim, stride) if dim is not None else got[0]
        if tuple(full.shape) != shape:
            raise ConvertError(f"{ckpt_dir}: parameter {name} has shape {tuple(full.shape)}, the config says {shape}")
        model[name] = full.contiguous()
    return dict(
        format=FORMAT,
        model=model,
        config=replace(config, tensor_model_parallel_size=1).to_dict(),
        iteration=meta["iteration"],
        consumed_samples=meta.get("consumed_samples", 0),
        source=dict(
            path=ckpt_dir,
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            data_parallel_size=dp,
            zero_stage=stage,
            bf16=bf16,
        ),
    )


def load_consolidated(path: str) -> dict:
    """A file written by ``consolidate`` + ``torch.save``; one-line errors naming the file."""
    obj = _load(path)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT or not {"model", "config"} <= obj.keys():
        raise ConvertError(
            f"{path}: not a consolidated checkpoint (expected a file written by "
            f"tools/convert_checkpoint.py consolidate)"
        )
    return obj


def load_weights(path: str) -> dict:
    """A consolidated file, or a checkpoint directory (consolidated on the fly)."""
    return consolidate(path) if os.path.isdir(path) else load_consolidated(path)


def load_into_model(path: str):
    """A TP=1 ``GPTModel`` holding the weights of ``path`` (consolidated file or checkpoint
    directory); needs a one-process world (``initialize_parallel(1, 1)``)."""
    from an_megatron.model import GPTModel

    obj = load_weights(path)
    model = GPTModel(ModelConfig(**obj["config"]))
    params = dict(model.named_parameters())
    if params.keys() != obj["model"].keys():
        raise ConvertError(
            f"{path}: parameters differ from the model its config builds: "
            f"{sorted(params.keys() ^ obj['model'].keys())[:4]}"
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(obj["model"][name])
    return model


# ---- writing another layout ------------------------------------------------------------------


def _write_rank(rank: int, world: int, port: int, src: str, out_dir: str, tp: int, pp: int, tag: str):
    """One process of the target layout: build the model, copy its shards in, let DeepSpeed save."""
    import deepspeed
    import torch.distributed as dist

    from an_megatron.parallel import destroy_parallel, groups, initialize_parallel
    from an_megatron.parallel.tensor_parallel import is_tp_sharded

    os.environ.update(groups.local_rank_env(rank, world, port))
    torch.set_num_threads(1)
    initialize_parallel(tp, pp, backend="gloo")
    try:
        obj = load_consolidated(src)
        config = replace(ModelConfig(**obj["config"]), tensor_model_parallel_size=tp)
        if pp > 1:
            from an_megatron.parallel.pipeline import build_pipeline_module, gpt_param_name

            module = build_pipeline_module(config)
            to_gpt = lambda n: gpt_param_name(n, config.num_layers)  # noqa: E731
        else:
            from an_megatron.model import GPTModel

            module, to_gpt = GPTModel(config), (lambda n: n)
        with torch.no_grad():
            for name, p in module.named_parameters():
                full = obj["model"][to_gpt(name)]
                if is_tp_sharded(p):
                    full = shard_tp_tensor(full, p.partition_dim, p.partition_stride, groups.tp_rank(), tp)
                p.copy_(full)
        ds_config = dict(
            train_micro_batch_size_per_gpu=1,
            gradient_accumulation_steps=1,
            train_batch_size=1,
            zero_optimization=dict(stage=0),
            steps_per_print=10**9,
        )
        engine, *_ = deepspeed.initialize(model=module, config=ds_config, mpu=None if pp > 1 else groups.DeepSpeedMPU)
        client = dict(
            iteration=obj["iteration"], consumed_samples=obj["consumed_samples"], model_config=config.to_dict()
        )
        temp_tag = f"{tag}.tmp-{os.getppid()}"  # the converting process: one name for every rank
        engine.save_checkpoint(out_dir, tag=temp_tag, client_state=client, save_latest=False)
        dist.barrier()
        if rank == 0:
            meta = dict(
                iteration=obj["iteration"],
                consumed_samples=obj["consumed_samples"],
                model_config=config.to_dict(),
                pipeline_model_parallel_size=pp,
                **{WEIGHTS_ONLY: True},
                converted_from=obj.get("source"),
            )
            _write_atomic(os.path.join(out_dir, temp_tag, META), json.dumps(meta, indent=1))
            publish(out_dir, temp_tag, tag)  # renamed into place, then `latest`
        dist.barrier()
    finally:
        destroy_parallel()


def refuse_existing(out_dir: str, overwrite: bool = False) -> None:
    """--save of ``reshard``: refused when it holds checkpoints already, unless ``overwrite``."""
    from an_megatron.training.checkpointing import existing_checkpoints

    found = existing_checkpoints(out_dir)
    if found and not overwrite:
        raise ConvertError(
            f"--save {out_dir} already holds checkpoints ({', '.join(found[:3])}{', ...' if len(found) > 3 else ''}): "
            f"choose an empty directory, or pass --overwrite-save"
        )


def check_target_layout(config: dict, tp: int, pp: int) -> None:
    """The model of `config` (a ``ModelConfig`` dict) must work for TP=``tp`` x PP=``pp``: heads,
    ffn and vocabulary divisible by ``tp``, one block per pipeline stage at least."""
    try:
        config = replace(ModelConfig(**config), tensor_model_parallel_size=tp)
    except ValueError as e:
        raise ConvertError(f"--target-tensor-model-parallel-size {tp}: {e}") from None
    if pp < 1 or pp > config.num_layers:
        raise ConvertError(
            f"--target-pipeline-model-parallel-size {pp}: must be 1..{config.num_layers} (one block per stage at least)"
        )


def write_layout(consolidated_path: str, out_dir: str, tp: int, pp: int, overwrite: bool = False) -> str:
    """Write ``consolidated_path`` as a weights-only checkpoint for TP=``tp`` x PP=``pp`` in
    ``out_dir``; returns the tag directory. Runs ``tp * pp`` local processes. A directory holding
    checkpoints is refused unless ``overwrite``; an existing tag is never rewritten."""
    import torch.multiprocessing as mp

    from an_megatron.parallel.groups import free_port
    from an_megatron.training.checkpointing import tag_for

    obj = load_consolidated(consolidated_path)
    check_target_layout(obj["config"], tp, pp)
    tag = tag_for(obj["iteration"])
    refuse_existing(out_dir, overwrite)
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(os.path.join(out_dir, tag)):
        raise ConvertError(f"{os.path.join(out_dir, tag)}: already exists; choose an empty --save directory")
    mp.start_processes(
        _write_rank,
        args=(tp * pp, free_port(), os.path.abspath(consolidated_path), out_dir, tp, pp, tag),
        nprocs=tp * pp,
        join=True,
        start_method="spawn",
    )
    return os.path.join(out_dir, tag)
