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
from run_analysis import (  # noqa: E402
    bracket_extension,
    budget_to_reach,
    mean_curve,
    spread,
    step_speedup,
    steps_to_reach,
)


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


def test_bracket_extension_asks_for_the_missing_side():
    assert bracket_extension({1e-3: 4.0, 2e-3: 3.5, 4e-3: 3.9}) is None  # inside
    assert bracket_extension({1e-3: 4.0, 2e-3: 3.5}) == pytest.approx(4e-3)  # best at the top: go up
    assert bracket_extension({1e-3: 3.4, 2e-3: 3.5}) == pytest.approx(5e-4)  # best at the bottom: go down
    assert bracket_extension({1e-3: 3.4, 2e-3: math.inf, 5e-4: 3.6}) is None  # a diverged run is worse
    assert bracket_extension({1e-3: 3.4, 2e-3: math.nan}) == pytest.approx(5e-4)


def test_spread_and_mean_curve():
    s = spread([1.0, 2.0, 3.0])
    assert (s["mean"], s["std"], s["min"], s["max"], s["n"]) == (2.0, 1.0, 1.0, 3.0, 3)
    assert spread([5.0])["std"] is None
    assert mean_curve([[(10, 2.0), (20, 1.0)], [(10, 4.0), (20, 3.0)]]) == [(10, 3.0), (20, 2.0)]
    with pytest.raises(ValueError, match="different iterations"):
        mean_curve([[(10, 2.0)], [(20, 1.0)]])


def test_budget_to_reach_interpolates_in_log_steps():
    # loss = 10 - log(budget): the budget reaching loss 10 - log(200) is 200, between 100 and 400
    points = [(b, 10 - math.log(b)) for b in (100, 400, 800)]
    assert budget_to_reach(points, 10 - math.log(200)) == pytest.approx(200.0)
    assert budget_to_reach(points, 20.0) == 100.0  # the smallest budget already does (a bound)
    assert budget_to_reach(points, 0.0) is None


def test_read_metrics_names_a_bad_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"iteration": 1, "lm_loss": 3.0}\nnot json\n')
    with pytest.raises(ValueError, match=r"m.jsonl:2: not a JSON record"):
        read_metrics(str(path))


def _metrics_file(path, val_losses: dict[int, float]) -> str:
    """A metrics JSONL with one train record per evaluation and the given validation losses."""
    path.parent.mkdir(parents=True, exist_ok=True)
    records = []
    for it, loss in sorted(val_losses.items()):
        records.append({"iteration": it, "lm_loss": loss, "step_time_s": 0.1})
        records.append({"iteration": it, "val_loss": loss})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_wsd_rate_sweep_reports_the_best_rate_per_budget(tmp_path):
    import convergence

    # every seed at the cosine-best rate, the first seed at the others
    points = convergence.wsd_points({"angpt": 0.024}, [0.5, 2.0], [1234, 1235])
    assert points == [("angpt", 0.012, 1234), ("angpt", 0.024, 1234), ("angpt", 0.024, 1235), ("angpt", 0.048, 1234)]

    def run(name, losses):
        return _metrics_file(tmp_path / name / "metrics.jsonl", losses)

    sweep = {"gptplus": {0.003: run("g", {400: 4.2})}, "angpt": {0.024: run("a", {400: 4.1})}}
    seed_runs = {a: {1234: next(iter(r.values()))} for a, r in sweep.items()}
    wsd = {
        ("gptplus", 0.003, 1234): {
            100: run("g100", {100: 4.8}),
            200: run("g200", {200: 4.5}),
            400: run("g400", {400: 4.2}),
        },
        # the cosine-best rate wins the short budget, half of it the long ones
        ("angpt", 0.024, 1234): {
            100: run("a100", {100: 4.6}),
            200: run("a200", {200: 4.5}),
            400: run("a400", {400: 4.3}),
        },
        ("angpt", 0.012, 1234): {
            100: run("b100", {100: 4.7}),
            200: run("b200", {200: 4.3}),
            400: run("b400", {400: 4.0}),
        },
    }
    summary = convergence.summarize(dict(iters=400), sweep, seed_runs, wsd, {})
    e = summary["wsd"]["angpt"]
    assert e["final_val_loss"] == {"100": 4.6, "200": 4.3, "400": 4.0}
    assert e["best_lr_per_budget"] == {"100": 0.024, "200": 0.012, "400": 0.012}
    assert e["by_lr"]["0.012"]["100"] == 4.7
    # GPT+'s 4.2 at 400 steps is reached a third of the way from 200 to 400 steps (4.3 -> 4.0), in log(steps)
    assert e["steps_to_gptplus_final"] == pytest.approx(math.exp(math.log(200) + math.log(2) / 3))
    md = convergence.markdown(summary)
    assert "| angpt | 0.012 | 4.7000 | 4.3000 | 4.0000 |" in md and "4.0000 (0.012)" in md


@pytest.mark.timeout(120)
def test_runner_sets_failed_runs_apart_from_diverged_ones(tmp_path):
    import convergence

    cfg = dict(convergence.SMOKE, full_validation=False, warmup={"angpt": 3})
    runner = convergence.Runner(str(tmp_path), cfg, tok="unused.model", data="unused")
    # --warmup: its own run names and flag, for that architecture only
    spec = dict(name="angpt_lr0.003", arch="angpt", lr=0.003, extra=["--no-such-flag"])
    assert runner.run_dir(spec) == str(tmp_path / "runs" / "angpt_lr0.003_warmup3")
    cmd = runner.command("angpt", 0.003, 1234, "m.jsonl", 8, [])
    assert cmd[cmd.index("--lr-warmup-iters") + 1] == "3"
    assert "--lr-warmup-iters" not in runner.command("gptplus", 0.003, 1234, "m.jsonl", 8, [])
    assert convergence.warmup_iters("angpt", 400, cfg["warmup"]) == 3
    # a run that exits with neither 0 nor EXIT_DIVERGED is reported and left out, not counted as diverged
    assert runner.run([spec]) == {"angpt_lr0.003": None}
    assert runner.failed == [str(tmp_path / "runs" / "angpt_lr0.003_warmup3" / "train.log")]
    assert "--no-such-flag" in (tmp_path / "runs" / "angpt_lr0.003_warmup3" / "train.log").read_text()
    # a run stopped after non-finite steps (no evaluation yet) ranks as diverged
    stopped = tmp_path / "stopped.jsonl"
    stopped.write_text(json.dumps({"iteration": 2, "lm_loss": None, "grad_norm": None}) + "\n")
    assert convergence.final_val(str(stopped)) == math.inf
    # ... and a resumed benchmark does not start it again once the runner recorded the divergence
    assert not convergence.is_finished(str(stopped), 8)
    (tmp_path / "outcome.json").write_text(json.dumps(dict(returncode=convergence.EXIT_DIVERGED, diverged=True)))
    assert convergence.is_finished(str(stopped), 8)
    # an evaluation before the stop may have been finite: the run still counts as diverged
    stopped.write_text(stopped.read_text() + json.dumps({"iteration": 2, "val_loss": 5.9e18}) + "\n")
    assert convergence.final_val(str(stopped)) == math.inf
    outcome = json.loads((tmp_path / "runs" / "angpt_lr0.003_warmup3" / "outcome.json").read_text())
    assert outcome == dict(returncode=2, diverged=False)  # the bad flag's exit status
    assert convergence.final_val(str(tmp_path / "missing.jsonl")) == math.inf


@pytest.mark.timeout(600)
def test_convergence_smoke_run_and_plot(tmp_path):
    """Every stage on tiny runs: sweep, one bracketing round, a second seed, WSD cool-downs."""
    args = ["--smoke", "--bracket", "1", "--seeds", "2", "--wsd", "--wsd-seeds", "1", "--jobs", "2"]
    out = subprocess.run(
        [sys.executable, "benchmarks/convergence.py", "--out", str(tmp_path), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=580,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    for run in ("gptplus_lr0.003", "angpt_lr0.003"):
        m = read_metrics(str(tmp_path / "runs" / run / "metrics.jsonl"))
        assert [r["iteration"] for r in m["eval"]] == [4, 8]
        assert len(m["train"]) == 8 and all(math.isfinite(r["lm_loss"]) for r in m["train"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["final_val_loss"]) == {"gptplus", "angpt"}
    assert summary["steps_speedup_vs_gptplus"]["gptplus"] == pytest.approx(1.0)
    # one bracketing round: the sweep's single rate was the best, so twice it was tried too
    assert set(summary["lr_sensitivity"]["angpt"]) == {"0.003", "0.006"}
    for arch in ("gptplus", "angpt"):
        assert summary["seeds"][arch]["final_val_loss"]["n"] == 2
        assert summary["seeds"][arch]["seeds"] == [1234, 1235]
        # each cool-down branch resumed from its stable run's checkpoint and ended at its budget
        best = summary["best_lr"][arch]
        for budget, start in ((2, 1), (4, 3), (8, 6)):
            m = read_metrics(str(tmp_path / "runs" / f"{arch}_lr{best:g}_wsd{budget}" / "metrics.jsonl"))
            assert m["train"][0]["iteration"] == start + 1 and m["eval"][-1]["iteration"] == budget
        assert m["train"][-1]["lr"] < best  # the 8-step budget's last step is in its 2-step cool-down
        assert set(summary["wsd"][arch]["final_val_loss"]) == {"2", "4", "8"}
    assert summary["seeds"]["gptplus"]["speedup_per_seed"] == [1.0, 1.0]
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    assert (tmp_path / "wsd.png").stat().st_size > 10_000
    md = (tmp_path / "summary.md").read_text()
    assert "| angpt |" in md and "Warmup-stable-decay" in md and "Seeds (data order" in md


def _run_benchmark(args, timeout):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    return out.stdout


def _ratio_rows(stdout):
    """{arch: (median, low, high)} from the '| arch | ... | median [low-high] | ...' rows."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) > 2 and "[" in line and not cells[0].startswith("arch"):
            ratio = next(c for c in cells if "[" in c)
            med, rng = ratio.split(" [")
            low, high = rng.rstrip("]").split("-")
            rows[cells[0]] = (float(med), float(low), float(high))
    return rows


@pytest.mark.timeout(300)
def test_step_time_repeats_report_median_range_and_load():
    stdout = _run_benchmark(
        [
            "benchmarks/step_time.py",
            *("--hidden-size", "64", "--num-layers", "1", "--num-attention-heads", "2", "--seq-length", "16"),
            *("--batch", "2", "--vocab-size", "256", "--steps", "2", "--repeats", "2", "--warmup", "1"),
            *("--threads", "1", "--cpu-time"),
        ],
        timeout=280,
    )
    assert "2 repetitions of 2 interleaved steps (CPU time)" in stdout
    assert "1 torch thread(s), pinned to core(s)" in stdout and "load average (1/5/15 min) before" in stdout
    rows = _ratio_rows(stdout)
    assert set(rows) == {"angpt", "ngpt", "gptplus"}
    assert rows["gptplus"] == (1.0, 1.0, 1.0)
    assert all(low <= med <= high and med > 0 for med, low, high in rows.values())


@pytest.mark.timeout(400)
def test_loop_step_time_smoke():
    stdout = _run_benchmark(
        ["benchmarks/loop_step_time.py", "--smoke", "--rounds", "1", "--iters", "10", "--threads", "1"], timeout=380
    )
    assert "d=64 L=1" in stdout and "load average (1/5/15 min) before" in stdout
    rows = _ratio_rows(stdout)
    assert set(rows) == {"angpt", "ngpt", "gptplus"} and rows["gptplus"] == (1.0, 1.0, 1.0)


@pytest.mark.timeout(400)
def test_step_time_compare_compile_smoke():
    stdout = _run_benchmark(
        [
            "benchmarks/step_time.py",
            *("--hidden-size", "32", "--num-layers", "1", "--num-attention-heads", "2", "--seq-length", "8"),
            *("--batch", "1", "--vocab-size", "64", "--steps", "1", "--repeats", "1", "--warmup", "1"),
            *("--threads", "1", "--compare-compile"),
        ],
        timeout=380,
    )
    assert set(_ratio_rows(stdout)) == {"gptplus", "gptplus compiled", "angpt", "angpt compiled"}
