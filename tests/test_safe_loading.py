"""Loading a checkpoint runs no code from its files: a crafted pickle in the place of each kind of
file our loaders and DeepSpeed's read is refused by ``pretrain_angpt.py --load`` and by
``tools/convert_checkpoint.py`` (consolidate, reshard) with one line naming the file, and the
code in it never runs (it would create a marker directory)."""

import os
import shutil
import subprocess

import pytest
import torch

from tests.test_checkpoint_safety import ENV, ROOT, cmd, one_error_line, tool, train


class Crafted:
    """Unpickling this calls ``os.mkdir(marker)``: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def plant(path, marker, zipfile=True):
    """Replace the file ``path`` by a torch file whose unpickling runs code."""
    os.remove(path)
    torch.save({"module": Crafted(marker)}, path, _use_new_zipfile_serialization=zipfile)


def refused(result, path, marker, kind="not loaded: it names posix.mkdir"):
    assert result.returncode == 1, result.stderr[-3000:]
    assert one_error_line(result).startswith(f"error: {path}: {kind}")
    assert not os.path.exists(marker), "the checkpoint's code ran"


def saved(tmp_path_factory, name, *flags):
    """A finished 1-iteration run (single process unless ``flags`` say otherwise)."""
    d = tmp_path_factory.mktemp(name) / "ck"
    r = train("--train-iters", 1, "--save", d, *flags)
    assert r.returncode == 0, r.stderr[-3000:]
    return d


@pytest.fixture(scope="module")
def zero1(tmp_path_factory):
    return saved(tmp_path_factory, "zero1")  # examples/ds_fp32.json: ZeRO-1, fp32


@pytest.fixture(scope="module")
def zero3(tmp_path_factory):
    cfg = tmp_path_factory.mktemp("cfg") / "zero3.json"
    cfg.write_text('{"zero_optimization": {"stage": 3}}')
    return saved(tmp_path_factory, "zero3", "--deepspeed_config", cfg)


@pytest.fixture(scope="module")
def pp2(tmp_path_factory):
    """PP=2, ZeRO-0: the weights are in DeepSpeed's per-layer files."""
    cfg = tmp_path_factory.mktemp("cfg") / "zero0.json"
    cfg.write_text('{"zero_optimization": {"stage": 0}}')
    d = tmp_path_factory.mktemp("pp2") / "ck"
    args = cmd("--train-iters", 1, "--save", d, "--deepspeed_config", cfg, "--pipeline-model-parallel-size", 2)
    r = subprocess.run(
        ["torchrun", "--nproc_per_node", "2", *args[1:]], capture_output=True, text=True, timeout=300, cwd=ROOT, env=ENV
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return d


def copy_with_crafted(src, tmp_path, name, zipfile=True):
    """A copy of checkpoint directory ``src`` whose ``iter_0000001/name`` runs code when unpickled."""
    d = tmp_path / "ck"
    shutil.copytree(src, d)
    path = d / "iter_0000001" / name
    assert path.is_file(), sorted(os.listdir(path.parent))
    plant(path, tmp_path / "marker", zipfile)
    return d, path


# ---- pretrain_angpt.py --load: DeepSpeed's loader --------------------------------------------


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "name", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"], ids=["model", "optim"]
)
def test_load_refuses_a_crafted_file(zero1, tmp_path, name):
    d, path = copy_with_crafted(zero1, tmp_path, name)
    refused(train("--train-iters", 2, "--load", d), path, tmp_path / "marker")


@pytest.mark.timeout(300)
def test_load_without_optimizer_refuses_a_crafted_zero3_file(zero3, tmp_path):
    """ZeRO-3 without optimizer states: DeepSpeed rebuilds the weights with zero_to_fp32, whose
    own loads read the optimizer files."""
    d, path = copy_with_crafted(zero3, tmp_path, "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    cfg = tmp_path / "zero3.json"
    cfg.write_text('{"zero_optimization": {"stage": 3}}')
    r = train("--train-iters", 2, "--load", d, "--no-load-optim", "--deepspeed_config", cfg)
    refused(r, path, tmp_path / "marker")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_load_refuses_a_crafted_layer_file(pp2, tmp_path):
    """PP=2: each stage reads its layer files through the engine's checkpoint engine. The rank
    whose file it is stops with the line; torchrun then stops the other (and reports it)."""
    d, path = copy_with_crafted(pp2, tmp_path, "layer_01-model_00-model_states.pt")
    args = cmd("--train-iters", 2, "--load", d, "--pipeline-model-parallel-size", 2)
    r = subprocess.run(
        ["torchrun", "--nproc_per_node", "2", *args[1:]], capture_output=True, text=True, timeout=300, cwd=ROOT, env=ENV
    )
    assert r.returncode != 0
    assert f"error: {path}: not loaded: it names posix.mkdir" in r.stderr, r.stderr[-3000:]
    assert not os.path.exists(tmp_path / "marker"), "the checkpoint's code ran"


# ---- tools/convert_checkpoint.py: our loaders and zero_to_fp32's -----------------------------


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "layout, name",
    [
        ("zero1", "mp_rank_00_model_states.pt"),
        ("zero1", "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
        ("zero3", "zero_pp_rank_0_mp_rank_00_model_states.pt"),
        ("pp2", "layer_02-model_00-model_states.pt"),
    ],
    ids=["model", "optim", "zero3-model", "layer"],
)
def test_consolidate_refuses_a_crafted_file(request, tmp_path, layout, name):
    d, path = copy_with_crafted(request.getfixturevalue(layout), tmp_path, name)
    refused(tool("consolidate", "--load", d, "--output", tmp_path / "model.pt"), path, tmp_path / "marker")
    assert not os.path.exists(tmp_path / "model.pt")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy"])
def test_reshard_refuses_a_crafted_consolidated_file(tmp_path, zipfile):
    path = tmp_path / "model.pt"
    path.touch()
    plant(path, tmp_path / "marker", zipfile)
    kind = "not loaded: it names posix.mkdir" if zipfile else "cannot be read as a torch checkpoint (UnpicklingError: "
    refused(tool("reshard", "--input", path, "--save", tmp_path / "out"), path, tmp_path / "marker", kind)
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.timeout(300)
def test_reshard_refuses_a_crafted_checkpoint_directory(zero1, tmp_path):
    d, path = copy_with_crafted(zero1, tmp_path, "mp_rank_00_model_states.pt")
    refused(tool("reshard", "--input", d, "--save", tmp_path / "out"), path, tmp_path / "marker")


def test_the_trainer_writes_plain_client_state(zero1):
    """Our client state (iteration, RNG states, config, flags) names no type at all; the optimizer
    states name only DeepSpeed's allowed ones."""
    from an_megatron.compat.deepspeed import CHECKPOINT_GLOBALS

    tag = zero1 / "iter_0000001"
    assert torch.serialization.get_unsafe_globals_in_checkpoint(tag / "mp_rank_00_model_states.pt") == []
    named = torch.serialization.get_unsafe_globals_in_checkpoint(tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert named and set(named) <= CHECKPOINT_GLOBALS


@pytest.mark.timeout(300)
def test_load_refuses_universal_checkpoint_loading(zero1, tmp_path):
    """DeepSpeed reads universal checkpoints outside its checkpoint engine, unpickling anything."""
    cfg = tmp_path / "universal.json"
    cfg.write_text('{"zero_optimization": {"stage": 1}, "checkpoint": {"load_universal": true}}')
    r = train("--train-iters", 2, "--load", zero1, "--deepspeed_config", cfg)
    assert r.returncode == 1, r.stderr[-3000:]
    assert one_error_line(r) == (
        f"error: --load {zero1}: checkpoint.load_universal in the DeepSpeed config is not supported (DeepSpeed "
        f"reads universal checkpoints with loaders that run code from the files)"
    )
