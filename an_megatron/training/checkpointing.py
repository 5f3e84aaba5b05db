"""Checkpoints: DeepSpeed's engine checkpoint plus our client state, with a crash-safe pointer.

Layout (Megatron-DeepSpeed's): ``{save}/iter_0000100/`` holds DeepSpeed's files for that
iteration and ``an_megatron.json`` (model config, iteration, consumed samples); ``{save}/latest``
names the newest complete one. The pointer is replaced atomically and only after every rank
has finished writing, so a crash during a save leaves the previous checkpoint loadable. Under
pipeline parallelism DeepSpeed writes one file per layer and tensor rank (``layer_file_name``).
"""

from __future__ import annotations

import json
import os
import random
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from an_megatron.model.config import ModelConfig

if TYPE_CHECKING:
    from an_megatron.training.config import TrainConfig

LATEST = "latest"  # DeepSpeed's name, so deepspeed's own tools find our checkpoints
META = "an_megatron.json"
# Fields that fix the shapes of the weights: a checkpoint can only be loaded when they agree.
SHAPE_FIELDS = (
    "arch",
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "ffn_hidden_size",
    "vocab_size",
    "alpha_per_dim",
)


class CheckpointError(RuntimeError):
    pass


def tag_for(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def _rng_state() -> dict:
    state = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(
    engine, save_dir: str, iteration: int, consumed_samples: int, config: ModelConfig, run: TrainConfig
) -> str:
    tag = tag_for(iteration)
    client_state = dict(
        iteration=iteration,
        consumed_samples=consumed_samples,
        rng=_rng_state(),
        model_config=config.to_dict(),
        args=run.as_record(),
    )
    engine.save_checkpoint(save_dir, tag=tag, client_state=client_state, save_latest=False)
    dist.barrier()  # every rank's files are written before the pointer moves
    if dist.get_rank() == 0:
        meta = dict(
            iteration=iteration,
            consumed_samples=consumed_samples,
            model_config=config.to_dict(),
            pipeline_model_parallel_size=run.pipeline_model_parallel_size,
        )
        _write_atomic(os.path.join(save_dir, tag, META), json.dumps(meta, indent=1))
        _write_atomic(os.path.join(save_dir, LATEST), tag)
    dist.barrier()
    return tag


def read_checkpoint_meta(load_dir: str) -> tuple[str, dict]:
    """The tag ``latest`` points to and its metadata; a clear error when there is none."""
    if not os.path.isdir(load_dir):
        raise CheckpointError(f"--load {load_dir}: no such directory")
    pointer = os.path.join(load_dir, LATEST)
    if not os.path.isfile(pointer):
        raise CheckpointError(f"--load {load_dir}: no '{LATEST}' file, so no complete checkpoint to resume from")
    tag = open(pointer).read().strip()
    meta_path = os.path.join(load_dir, tag, META)
    if not os.path.isfile(meta_path):
        raise CheckpointError(f"--load {load_dir}: '{LATEST}' names {tag!r} but {meta_path} is missing")
    with open(meta_path) as f:
        return tag, json.load(f)


def check_compatible(meta: dict, config: ModelConfig, load_dir: str) -> None:
    saved = meta["model_config"]
    diffs = [
        f"{k}={saved.get(k)} (flags: {getattr(config, k)})" for k in SHAPE_FIELDS if saved.get(k) != getattr(config, k)
    ]
    if diffs:
        raise CheckpointError(f"--load {load_dir}: checkpoint model differs from the flags: {', '.join(diffs)}")


def load_checkpoint(
    engine, load_dir: str, config: ModelConfig, load_optim: bool = True, load_rng: bool = True
) -> tuple[int, int]:
    """Restore engine (weights, and the optimizer unless ``load_optim`` is False) and our state;
    returns (iteration, consumed_samples). Without the optimizer, DeepSpeed loads the module only
    (``load_module_only``) and ZeRO-1/2 copy the loaded weights into their fp32 masters."""
    from an_megatron.parallel import groups

    tag, meta = read_checkpoint_meta(load_dir)
    check_compatible(meta, config, load_dir)
    saved = (meta["model_config"].get("tensor_model_parallel_size"), meta.get("pipeline_model_parallel_size"))
    run = (config.tensor_model_parallel_size, groups.pp_size())
    if saved[0] != run[0] or saved[1] not in (None, run[1]):  # DeepSpeed would fail with a traceback
        raise CheckpointError(
            f"--load {load_dir}: {tag} was saved with TP={saved[0]} PP={saved[1]}, this run is "
            f"TP={run[0]} PP={run[1]}: convert it with tools/convert_checkpoint.py reshard"
        )
    if meta.get("weights_only") and load_optim:
        raise CheckpointError(
            f"--load {load_dir}: {tag} holds weights only (written by tools/convert_checkpoint.py): add --no-load-optim"
        )
    if meta.get("weights_only") and engine.zero_optimization_partition_weights():
        raise CheckpointError(
            f"--load {load_dir}: {tag} holds weights only, and DeepSpeed loads ZeRO-3 weights from "
            f"optimizer files: start from it with ZeRO stage 0-2"
        )
    path, client_state = engine.load_checkpoint(
        load_dir,
        tag=tag,
        load_optimizer_states=load_optim,
        load_lr_scheduler_states=load_optim,
        load_module_only=not load_optim,
    )
    if path is None:
        raise CheckpointError(f"--load {load_dir}: DeepSpeed could not load {tag!r}")
    if load_rng and client_state and "rng" in client_state:
        _set_rng_state(client_state["rng"])
    return meta["iteration"], meta["consumed_samples"]


def layer_file_name(layer_index: int, tp_rank: int = 0) -> str:
    """The file DeepSpeed's ``PipelineModule.save_state_dict`` writes for one layer and tensor
    rank (``ckpt_layer_path`` with our topology's axes; the data axis is omitted)."""
    return f"layer_{layer_index:02d}-model_{tp_rank:02d}-model_states.pt"


def gpt_state_dict_from_layer_files(checkpoint_dir: str, num_layers: int, tp_rank: int = 0) -> dict:
    """One tensor rank's ``GPTModel`` state dict from a DeepSpeed pipeline checkpoint directory
    (``<save_dir>/<tag>``), whatever the pipeline size it was saved with."""
    from an_megatron.parallel.pipeline import gpt_name_in_layer  # here: pipeline imports this module

    state = {}
    for layer_index in range(num_layers + 2):
        path = os.path.join(checkpoint_dir, layer_file_name(layer_index, tp_rank))
        for name, value in torch.load(path, map_location="cpu", weights_only=False).items():
            state[gpt_name_in_layer(layer_index, name, num_layers)] = value
    return state
