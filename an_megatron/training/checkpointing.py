"""Checkpoints: DeepSpeed's engine checkpoint plus our client state, with a crash-safe pointer.

Layout (Megatron-DeepSpeed's): ``{save}/iter_0000100/`` holds DeepSpeed's files for that
iteration and ``an_megatron.json`` (model config, iteration, consumed samples); ``{save}/latest``
names the newest complete one. Under pipeline parallelism DeepSpeed writes one file per layer and
tensor rank (``layer_file_name``).

Crash safety: every rank writes into a temporary tag directory ``iter_NNNNNNN.tmp-<pid>`` (rank 0's
pid); after a barrier rank 0 adds ``an_megatron.json``, renames the directory to its final tag and
only then replaces ``latest`` atomically. A checkpoint directory is never written into once
published; leftovers of a crashed save are removed at the next start (``remove_leftovers``). A run
holds ``{save}/.lock`` while it writes (``SaveLock``).

Loading runs no code from the files: every file DeepSpeed's loader reads goes through
``compat.deepspeed.load_file`` (``torch.load(weights_only=True)`` with a short allowlist of
DeepSpeed's plain types); our client state holds plain data only (the RNG states as tuples,
lists and tensors).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import time
import zipfile
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from an_megatron.compat import deepspeed as ds_compat
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


# A save in progress (or a crashed one): ``iter_NNNNNNN.tmp-<pid>``; ``.old`` marks a published
# checkpoint moved aside while a new one of the same iteration replaces it.
_TEMP_TAG = re.compile(r"^(iter_\d{7})\.tmp-\d+(\.old)?$")
_TAG = re.compile(r"^iter_\d{7}$")
_TEMP_LATEST = re.compile(r"^latest\.tmp\.\d+$")  # _write_atomic's temporary file for `latest`
LOCK = ".lock"


def existing_checkpoints(save_dir: str) -> list[str]:
    """What in ``save_dir`` marks it as holding checkpoints: ``latest`` and ``iter_*`` dirs."""
    if not os.path.isdir(save_dir):
        return []
    names = sorted(os.listdir(save_dir))
    return [n for n in names if n == LATEST or (_TAG.match(n) and os.path.isdir(os.path.join(save_dir, n)))]


def remove_leftovers(save_dir: str) -> list[str]:
    """Remove the temporary tag directories of crashed saves (only names of our pattern); a
    checkpoint moved aside (``.old``) whose replacement was never published is put back. A
    temporary ``latest`` of a crash while it was replaced is removed too (not listed)."""
    if not os.path.isdir(save_dir):
        return []
    removed = []
    for name in sorted(os.listdir(save_dir)):
        m = _TEMP_TAG.match(name)
        path = os.path.join(save_dir, name)
        if _TEMP_LATEST.match(name) and os.path.isfile(path):
            os.remove(path)
            continue
        if not m or not os.path.isdir(path):
            continue
        final = os.path.join(save_dir, m.group(1))
        if m.group(2) and not os.path.exists(final):
            os.rename(path, final)
            continue
        shutil.rmtree(path)
        removed.append(name)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SaveLock:
    """``{save}/.lock``: host, pid and start time as JSON, created exclusively (O_CREAT|O_EXCL).
    A lock of a dead process on this host is taken over; any other refuses with a
    ``CheckpointError``. ``notes`` collects the lines to print (a taken-over lock)."""

    def __init__(self, save_dir: str):
        self.save_dir = save_dir
        self.path = os.path.join(save_dir, LOCK)
        self.held = False
        self.created = False  # the directory is removed again if the run leaves it empty
        self.notes: list[str] = []

    def acquire(self) -> None:
        self.created = not os.path.isdir(self.save_dir)
        os.makedirs(self.save_dir, exist_ok=True)
        record = dict(host=socket.gethostname(), pid=os.getpid(), started=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._refuse_or_take_over()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
            self.held = True
            return
        raise CheckpointError(f"--save {self.save_dir}: could not take {self.path}")

    def _refuse_or_take_over(self) -> None:
        try:
            with open(self.path) as f:
                other = json.load(f)
            host, pid, started = other["host"], int(other["pid"]), other.get("started", "?")
        except FileNotFoundError:
            return  # released meanwhile: try again
        except (OSError, ValueError, KeyError, TypeError):
            raise CheckpointError(
                f"--save {self.save_dir} has an unreadable lock file {self.path}: if no run is using the "
                f"directory, remove it"
            ) from None
        if host == socket.gethostname() and not _pid_alive(pid):
            os.remove(self.path)
            self.notes.append(
                f"taking over the stale lock {self.path} of pid {pid} (started {started}, no longer running)"
            )
            return
        where = f"--save {self.save_dir} is in use by host {host} pid {pid} (started {started})"
        if host != socket.gethostname():
            where += f"; if that run has ended, remove {self.path}"
        raise CheckpointError(where)

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            with open(self.path) as f:
                mine = json.load(f).get("pid") == os.getpid()
        except (OSError, ValueError):
            return
        if mine:
            os.remove(self.path)
        if self.created:
            try:
                os.rmdir(self.save_dir)  # only when empty: a run that wrote nothing leaves nothing
            except OSError:
                pass


def _rng_state() -> dict:
    """Plain data and tensors only (loaded weights-only): numpy's key array becomes a list."""
    kind, key, *rest = np.random.get_state()
    state = dict(python=random.getstate(), numpy=(kind, key.tolist(), *rest), torch=torch.get_rng_state())
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


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish(save_dir: str, temp_tag: str, tag: str) -> None:
    """Rank 0, after every rank has written ``temp_tag``: rename it to ``tag``, then point ``latest``
    at it. An existing ``tag`` (not the one resumed from) is moved aside first and removed after."""
    final = os.path.join(save_dir, tag)
    old = None
    if os.path.exists(final):
        old = os.path.join(save_dir, f"{temp_tag}.old")
        os.rename(final, old)
    os.rename(os.path.join(save_dir, temp_tag), final)
    _fsync_dir(save_dir)
    _write_atomic(os.path.join(save_dir, LATEST), tag)
    _fsync_dir(save_dir)
    if old is not None:
        shutil.rmtree(old)


def save_checkpoint(
    engine, save_dir: str, iteration: int, consumed_samples: int, config: ModelConfig, run: TrainConfig
) -> str:
    tag = tag_for(iteration)
    pid = [os.getpid()]
    dist.broadcast_object_list(pid, src=0)  # one temporary name for every rank: rank 0's pid
    temp_tag = f"{tag}.tmp-{pid[0]}"
    client_state = dict(
        iteration=iteration,
        consumed_samples=consumed_samples,
        rng=_rng_state(),
        model_config=config.to_dict(),
        args=run.as_record(),
    )
    engine.save_checkpoint(save_dir, tag=temp_tag, client_state=client_state, save_latest=False)
    dist.barrier()  # every rank's files are written before the checkpoint is published
    if dist.get_rank() == 0:
        meta = dict(
            iteration=iteration,
            consumed_samples=consumed_samples,
            model_config=config.to_dict(),
            pipeline_model_parallel_size=run.pipeline_model_parallel_size,
            run=run.as_record(),  # the run's settings (tokenizer, schedule, ...): read by the HF export
        )
        _write_atomic(os.path.join(save_dir, temp_tag, META), json.dumps(meta, indent=1))
        publish(save_dir, temp_tag, tag)
    dist.barrier()
    return tag


def read_checkpoint_meta(load_dir: str, iteration: int | None = None) -> tuple[str, dict]:
    """The tag ``latest`` points to (or ``iteration``'s, with --ckpt-step) and its metadata; a
    clear error when there is none."""
    if not os.path.isdir(load_dir):
        raise CheckpointError(f"--load {load_dir}: no such directory")
    if iteration is not None:
        tag = tag_for(iteration)
        if not os.path.isdir(os.path.join(load_dir, tag)):
            found = [n for n in existing_checkpoints(load_dir) if n != LATEST]
            raise CheckpointError(
                f"--ckpt-step {iteration}: --load {load_dir} has no {tag} (it has: {', '.join(found) or 'none'})"
            )
    else:
        pointer = os.path.join(load_dir, LATEST)
        if not os.path.isfile(pointer):
            raise CheckpointError(f"--load {load_dir}: no '{LATEST}' file, so no complete checkpoint to resume from")
        tag = open(pointer).read().strip()
    meta_path = os.path.join(load_dir, tag, META)
    if not os.path.isfile(meta_path):
        raise CheckpointError(f"--load {load_dir}: checkpoint {tag!r} is incomplete: {meta_path} is missing")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:  # truncated or overwritten
        raise CheckpointError(f"--load {load_dir}: {meta_path} is not valid JSON ({e}): the checkpoint is damaged")
    return tag, meta


def check_compatible(meta: dict, config: ModelConfig, load_dir: str) -> None:
    saved = meta["model_config"]
    diffs = [
        f"{k}={saved.get(k)} (flags: {getattr(config, k)})" for k in SHAPE_FIELDS if saved.get(k) != getattr(config, k)
    ]
    if diffs:
        raise CheckpointError(f"--load {load_dir}: checkpoint model differs from the flags: {', '.join(diffs)}")


_ZERO_PARTITION = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")


def _torch_file_intact(path: str) -> bool:
    """A zip archive (torch.save's format) with its central directory, or a legacy pickle; reads
    the file's first and last bytes only, never unpickles."""
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"  # the pickle protocol marker of torch's legacy format


def check_files(load_dir: str, tag: str, dp: int, load_optim: bool) -> None:
    """Refuse, in one line, what DeepSpeed's loader would fail on with a traceback: a damaged
    file (every ``.pt`` is a zip archive; a truncated one has no central directory), and ZeRO
    optimizer partitions of another data-parallel size."""
    ckpt_dir = os.path.join(load_dir, tag)
    names = sorted(os.listdir(ckpt_dir))
    for path in (os.path.join(ckpt_dir, name) for name in names if name.endswith(".pt")):
        if not _torch_file_intact(path):
            raise CheckpointError(
                f"--load {load_dir}: {path} is damaged (truncated or not a torch checkpoint file, "
                f"{os.path.getsize(path)} bytes): resume from an earlier checkpoint by writing its iter_* name "
                f"into {os.path.join(load_dir, LATEST)}"
            )
    saved_dp = len({m.group(1) for m in map(_ZERO_PARTITION.match, names) if m})
    if load_optim and saved_dp and saved_dp != dp:
        raise CheckpointError(
            f"--load {load_dir}: {tag} was saved with data-parallel size {saved_dp} (ZeRO partitions its optimizer "
            f"state {saved_dp} ways), this run has {dp}: launch {saved_dp} x TP x PP processes to resume exactly, or "
            f"add --no-load-optim to continue from its weights with a fresh optimizer"
        )


def load_checkpoint(
    engine,
    load_dir: str,
    config: ModelConfig,
    load_optim: bool = True,
    load_rng: bool = True,
    iteration: int | None = None,
) -> tuple[int, int]:
    """Restore engine (weights, and the optimizer unless ``load_optim`` is False) and our state
    from ``latest``'s checkpoint, or ``iteration``'s; returns (iteration, consumed_samples).
    Without the optimizer, DeepSpeed loads the module only (``load_module_only``) and ZeRO-1/2
    copy the loaded weights into their fp32 masters."""
    from an_megatron.parallel import groups

    tag, meta = read_checkpoint_meta(load_dir, iteration)
    check_compatible(meta, config, load_dir)
    saved = (meta["model_config"].get("tensor_model_parallel_size"), meta.get("pipeline_model_parallel_size"))
    run = (config.tensor_model_parallel_size, groups.pp_size())
    if saved[0] != run[0] or saved[1] not in (None, run[1]):  # DeepSpeed would fail with a traceback
        raise CheckpointError(
            f"--load {load_dir}: {tag} was saved with TP={saved[0]} PP={saved[1]}, this run is "
            f"TP={run[0]} PP={run[1]}: convert it with tools/convert_checkpoint.py reshard"
        )
    check_files(load_dir, tag, groups.dp_size(), load_optim)
    if meta.get("weights_only") and load_optim:
        raise CheckpointError(
            f"--load {load_dir}: {tag} holds weights only (written by tools/convert_checkpoint.py): add --no-load-optim"
        )
    if meta.get("weights_only") and engine.zero_optimization_partition_weights():
        raise CheckpointError(
            f"--load {load_dir}: {tag} holds weights only, and DeepSpeed loads ZeRO-3 weights from "
            f"optimizer files: start from it with ZeRO stage 0-2"
        )
    if engine.load_universal_checkpoint():
        raise CheckpointError(
            f"--load {load_dir}: checkpoint.load_universal in the DeepSpeed config is not supported (DeepSpeed "
            f"reads universal checkpoints with loaders that run code from the files)"
        )
    try:
        with ds_compat.loading_weights_only(engine):
            path, client_state = engine.load_checkpoint(
                load_dir,
                tag=tag,
                load_optimizer_states=load_optim,
                load_lr_scheduler_states=load_optim,
                load_module_only=not load_optim,
            )
    except ds_compat.CheckpointFileError as e:
        raise CheckpointError(str(e)) from None
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
    (``<save_dir>/<tag>``), whatever the pipeline size it was saved with. A file that does not
    load raises ``compat.deepspeed.CheckpointFileError``."""
    from an_megatron.parallel.pipeline import gpt_name_in_layer  # here: pipeline imports this module

    state = {}
    for layer_index in range(num_layers + 2):
        path = os.path.join(checkpoint_dir, layer_file_name(layer_index, tp_rank))
        for name, value in ds_compat.load_file(path).items():
            state[gpt_name_in_layer(layer_index, name, num_layers)] = value
    return state
