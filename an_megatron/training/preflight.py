"""Checks a training run makes before it builds anything: every output it will write can be
written. The data is checked as the datasets are built, which ``Trainer`` does before the model
and the engine (``build_train_valid_test_datasets``: present, non-empty, token ids inside the
tokenizer's vocabulary, a sample for every split with a share).

An output directory that does not exist yet is not created here: its nearest existing ancestor
must be a directory that takes a file. A probe file is written and removed at once, so a refused
run leaves nothing behind.
"""

from __future__ import annotations

import os
import tempfile

import torch.distributed as dist

PROBE_PREFIX = ".an_megatron-probe-"


class PreflightError(RuntimeError):
    """An output the run cannot write; the message names the flag and the path."""


def directory_problem(flag: str, path: str, directory: str | None = None) -> str | None:
    """Why `directory` (default: `path`, the flag's value) cannot be (or become) a directory
    this process writes files in, or None."""
    directory = os.path.abspath(path if directory is None else directory)
    existing = directory
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        what = "is" if existing == os.path.abspath(path) else "would be inside"
        return f"{flag} {path}: {what} {existing}, which is not a directory"
    try:
        fd, probe = tempfile.mkstemp(prefix=PROBE_PREFIX, dir=existing)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        return f"{flag} {path}: cannot write in {existing} ({e.strerror or e})"
    return None


def file_problem(flag: str, path: str) -> str | None:
    """Why the file `path` cannot be appended to (or created), or None."""
    if os.path.isdir(path):
        return f"{flag} {path}: is a directory"
    if not os.path.exists(path):
        return directory_problem(flag, path, os.path.dirname(os.path.abspath(path)))
    try:
        with open(path, "a"):
            pass
    except OSError as e:
        return f"{flag} {path}: cannot append to it ({e.strerror or e})"
    return None


def check_outputs(cfg, is_logger: bool) -> None:
    """Every rank checks what it will write: ``--save`` (every rank writes its part of a
    checkpoint), ``--metrics-file`` and ``--tensorboard-dir`` (the logging rank),
    ``--data-cache-path`` (rank 0 builds the index cache). All ranks then raise the first
    problem found, so they stop together with one line each. Collective: call on every rank."""
    checks = []
    if cfg.save:
        checks.append(("--save", cfg.save, directory_problem))
    if is_logger and cfg.metrics_file:
        checks.append(("--metrics-file", cfg.metrics_file, file_problem))
    if is_logger and cfg.tensorboard_dir:
        checks.append(("--tensorboard-dir", cfg.tensorboard_dir, directory_problem))
    if cfg.data.data_cache_path and (not dist.is_initialized() or dist.get_rank() == 0):
        checks.append(("--data-cache-path", cfg.data.data_cache_path, directory_problem))
    mine = next((p for p in (check(flag, path) for flag, path, check in checks) if p), None)
    found = [mine]
    if dist.is_initialized() and dist.get_world_size() > 1:
        found = [None] * dist.get_world_size()
        dist.all_gather_object(found, mine)
    problem = next((p for p in found if p), None)
    if problem:
        raise PreflightError(problem)
