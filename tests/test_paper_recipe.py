"""examples/paper_0.5b: the GPU recipe's flags are ones the trainer accepts, for the model the
README describes, and its estimate is the trainer's own FLOP count."""

import os
import subprocess

import pytest

from an_megatron.training.arguments import parse_args
from an_megatron.training.metrics import flops_per_token

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "examples", "paper_0.5b", "run.sh")
ENV = {**os.environ, "PYTHONPATH": ROOT}


def run(*archs, **env):
    return subprocess.run(
        ["bash", RUN, *archs], capture_output=True, text=True, timeout=120, cwd=ROOT, env={**ENV, **env}
    )


def flags(arch, tmp_path, **env):
    out = run(arch, PRINT_ARGS="1", OUT=str(tmp_path), **env)
    assert out.returncode == 0, out.stderr
    (line,) = out.stdout.strip().splitlines()
    return line.split()


@pytest.mark.parametrize("arch", ["gptplus", "ngpt", "angpt"])
def test_recipe_flags_parse_into_the_paper_model(arch, tmp_path):
    cfg, ds = parse_args(flags(arch, tmp_path), world_size=8)
    config = cfg.model_config(cfg.data.padded_vocab_size(50277))
    assert (cfg.arch, config.num_layers, config.hidden_size, config.num_attention_heads) == (arch, 24, 1024, 16)
    assert (config.ffn_hidden_size, config.seq_length, config.vocab_size) == (4096, 2048, 50304)
    assert cfg.bf16 and ds["bf16"]["enabled"] and ds["zero_optimization"]["stage"] == 1
    assert cfg.global_batch_size * cfg.seq_length * cfg.train_iters == pytest.approx(1e10, rel=1e-3)
    assert cfg.micro_batch_size * cfg.gradient_accumulation_steps * 8 == cfg.global_batch_size
    assert (cfg.weight_decay > 0, cfg.lr_warmup_iters > 0) == ((True, True) if arch == "gptplus" else (False, False))
    assert cfg.load is None  # nothing to resume yet


def test_recipe_resumes_once_a_checkpoint_exists(tmp_path):
    (tmp_path / "angpt" / "ckpt").mkdir(parents=True)
    (tmp_path / "angpt" / "ckpt" / "latest").write_text("iter_0001000")
    argv = flags("angpt", tmp_path)
    assert argv[argv.index("--load") + 1] == str(tmp_path / "angpt" / "ckpt")


def test_recipe_warmup_for_the_normalized_models(tmp_path):
    cfg, _ = parse_args(flags("angpt", tmp_path, WARMUP_ANGPT="190"), world_size=8)
    assert cfg.lr_warmup_iters == 190
    cfg, _ = parse_args(flags("ngpt", tmp_path, WARMUP_ANGPT="190"), world_size=8)
    assert cfg.lr_warmup_iters == 0  # each architecture's own variable


def test_recipe_estimate_uses_the_trainers_flop_count(tmp_path):
    out = run(ESTIMATE="1", GPUS="8", OUT=str(tmp_path))
    assert out.returncode == 0, out.stderr
    cfg, _ = parse_args(flags("angpt", tmp_path), world_size=8)
    per_token = flops_per_token(cfg.model_config(50304))
    assert f"{per_token / 1e9:.2f} GFLOP per token" in out.stdout
    assert "0.506B parameters" in out.stdout and "10.00B tokens" in out.stdout
    hours = per_token * 9536 * 512 * 2048 / (989e12 * 0.4) / 3600
    assert f"{hours:.1f} h on one GPU, {hours / 8:.1f} h on 8" in out.stdout


def test_recipe_refuses_without_data_and_unknown_arch(tmp_path):
    out = run("angpt", OUT=str(tmp_path), DATA="")
    assert out.returncode == 2 and "error: DATA is not set" in out.stderr
    out = run("gpt5", PRINT_ARGS="1", OUT=str(tmp_path))
    assert out.returncode == 2 and "error: unknown architecture: gpt5" in out.stderr
    assert not any(tmp_path.iterdir())  # nothing written
