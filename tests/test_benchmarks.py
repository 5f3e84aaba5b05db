"""The convergence benchmark's code paths: a smoke run, the speedup arithmetic, the plots."""

import json
import math
import os
import subprocess
import sys

import pytest

from an_megatron.training.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from run_analysis import step_speedup, steps_to_reach  # noqa: E402


def test_steps_to_reach_interpolates():
    curve = [(100, 5.0), (200, 4.0), (300, 3.0)]
    assert steps_to_reach(curve, 3.5) == pytest.approx(250.0)
    assert steps_to_reach(curve, 5.5) == 100.0  # reached at the first evaluation
    assert steps_to_reach(curve, 2.0) is None


def test_speedup_on_synthetic_curves_with_known_answer():
    # loss(t) = 10 / sqrt(t) for the baseline; a model 1.4x faster has loss(t) = 10 / sqrt(1.4 t)
    its = list(range(50, 1001, 50))
    base = [(t, 10 / math.sqrt(t)) for t in its]
    fast = [(t, 10 / math.sqrt(1.4 * t)) for t in its]
    slow = [(t, 10 / math.sqrt(0.5 * t)) for t in its]
    assert step_speedup(base, fast) == pytest.approx(1.4, rel=0.01)  # interpolation error only
    assert step_speedup(base, slow) is None  # never reaches the baseline's final loss
    assert step_speedup(base, base) == pytest.approx(1.0)


def test_read_metrics_names_a_bad_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"iteration": 1, "lm_loss": 3.0}\nnot json\n')
    with pytest.raises(ValueError, match=r"m.jsonl:2: not a JSON record"):
        read_metrics(str(path))


@pytest.mark.timeout(400)
def test_convergence_smoke_run_and_plot(tmp_path):
    out = subprocess.run(
        [sys.executable, "benchmarks/convergence.py", "--out", str(tmp_path), "--smoke"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=380,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    for run in ("gptplus_lr0.003", "angpt_lr0.003"):
        m = read_metrics(str(tmp_path / "runs" / run / "metrics.jsonl"))
        assert [r["iteration"] for r in m["eval"]] == [3, 6]
        assert len(m["train"]) == 6 and all(math.isfinite(r["lm_loss"]) for r in m["train"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["final_val_loss"]) == {"gptplus", "angpt"}
    assert summary["steps_speedup_vs_gptplus"]["gptplus"] == pytest.approx(1.0)
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    assert "| angpt |" in (tmp_path / "summary.md").read_text()
