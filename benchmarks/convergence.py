#!/usr/bin/env python
"""Reproduce the paper's claims at small scale, and settle anGPT's open choices by measurement.

    python benchmarks/convergence.py --out runs/convergence            # sweep + ablations
    python benchmarks/convergence.py --out runs/kjv --bracket 3 --seeds 3 --wsd --wsd-seeds 1 \
        --no-ablations --jobs 2                                        # the study with error bars
    python benchmarks/convergence.py --out runs/sotu --corpus sotu ...  # the second corpus
    python benchmarks/convergence.py --out /tmp/smoke --smoke          # tiny runs (tests)

Trains GPT+, nGPT and anGPT through examples/pretrain_angpt.py on a bundled corpus (`--corpus
kjv`: the King James Bible; `sotu`: State of the Union addresses) with a SentencePiece tokenizer
trained on it: same data order, same token budget, validation loss at fixed intervals over the
whole validation split (``--full-validation``). The stages:

1. a learning-rate sweep per architecture (cosine decay), extended by factors of 2
   (``--bracket N``) until each best rate has a worse one on both sides;
2. ``--seeds N``: more seeds (data order and initialization) at each best rate, reported as mean,
   spread and a speedup per seed pair and of the mean curves;
3. ``--wsd``: warmup-stable-decay budgets without retraining: one constant-rate run per
   architecture, with cool-downs over the last 20% of 25%, 50% and 100% of the steps branched
   from its checkpoints (``--load --ckpt-step``), giving loss against steps and the steps each
   architecture needs to reach GPT+'s loss;
4. anGPT's ablations at its best rate.

A finished run is not repeated (its metrics file is complete, or it stopped after non-finite
steps: diverged), so an interrupted benchmark continues where it stopped; a run that fails
otherwise (a bad flag, a crash, a kill) is reported with its log and left out, never counted
as diverged nor summarized from a partial curve. ``--warmup ARCH:ITERS`` gives an
architecture a warm-up other than its default, in runs of their own names
(``NAME_warmupITERS``). Writes ``summary.md``, ``summary.json`` and PNG plots into ``--out``;
every run's metrics JSONL is under ``--out/runs/NAME/``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import paper  # noqa: E402  (benchmarks/, this script's directory)
from run_analysis import (  # noqa: E402
    bracket_extension,
    budget_to_reach,
    mean_curve,
    median_step_time,
    spread,
    step_speedup,
    steps_to_reach,
    val_curve,
)

from an_megatron.model.config import ModelConfig  # noqa: E402
from an_megatron.training.metrics import read_metrics  # noqa: E402
from an_megatron.training.pretrain import EXIT_DIVERGED  # noqa: E402

ARCHS = ("gptplus", "ngpt", "angpt")
# Chosen so the whole benchmark (12 sweep runs + 5 ablations, one process each) fits in about an
# hour on a 2-core CPU (~3 min a run): the demo's model (d=128, 4 layers, T=128), 400 steps of
# 16 sequences (0.8M tokens, about 0.8 epochs of the corpus). Wider or longer runs would not
# leave room for the sweep, which a fair comparison needs more than size.
FULL = dict(
    model=["--num-layers", "4", "--hidden-size", "128", "--num-attention-heads", "4", "--seq-length", "128"],
    micro=16,
    global_batch=16,
    iters=400,
    eval_interval=40,
    eval_iters=8,
    vocab=4000,
    lrs=[1.5e-3, 3e-3, 6e-3, 1.2e-2],
)
# One size up (--size medium): 6 layers of d=256 (~4.5x the small model's FLOPs per token),
# same data, batch and steps, to see whether the gaps grow or shrink with size.
MEDIUM_MODEL = ["--num-layers", "6", "--hidden-size", "256", "--num-attention-heads", "4", "--seq-length", "128"]
SMOKE = dict(
    model=["--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "2", "--seq-length", "32"],
    micro=4,
    global_batch=4,
    iters=8,
    eval_interval=4,
    eval_iters=1,
    vocab=500,
    lrs=[3e-3],
)
CORPORA = {"kjv": "kjv.jsonl.gz", "sotu": "sotu.jsonl.gz"}  # examples/data/README.md has both
SEED = 1234  # the sweep's seed; --seeds N adds SEED+1 .. SEED+N-1 at each architecture's best rate
# WSD: cool-downs over the last 20% of each budget, branched from one constant-rate run.
WSD_BUDGET_FRACTIONS = (0.25, 0.5, 1.0)
WSD_COOLDOWN_FRACTION = 0.2
ABLATIONS = {  # name: flags, on anGPT at its best learning rate
    "nu_att=exact": ["--nu-att", "exact"],
    "nu_att=dense": ["--nu-att", "dense"],
    "nu_att=none": ["--nu-att", "none"],
    "alpha_init=0.01": ["--alpha-init", "0.01"],
    "no nu_lerp": ["--no-nu-lerp"],
    "exact weight normalization": ["--weight-norm", "normalize"],
}


def sh(cmd, log, env=None):
    with open(log, "w") as f:
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env).returncode


def prepare_data(out: str, cfg: dict, corpus_name: str = "kjv") -> tuple[str, str]:
    data = os.path.join(out, "data")
    os.makedirs(data, exist_ok=True)
    corpus = os.path.join(ROOT, "examples", "data", CORPORA[corpus_name])
    tok, prefix = os.path.join(data, "tok"), os.path.join(data, corpus_name)
    if not os.path.exists(tok + ".model"):
        rc = sh(
            [
                sys.executable,
                "tools/train_tokenizer.py",
                "--input",
                corpus,
                "--json-keys",
                "text",
                "--vocab-size",
                str(cfg["vocab"]),
                "--output-prefix",
                tok,
            ],
            os.path.join(data, "tokenizer.log"),
        )
        assert rc == 0, f"tokenizer training failed: see {data}/tokenizer.log"
    if not os.path.exists(prefix + "_text_document.idx"):
        rc = sh(
            [
                sys.executable,
                "tools/preprocess_data.py",
                "--input",
                corpus,
                "--json-keys",
                "text",
                "--tokenizer-type",
                "SentencePieceTokenizer",
                "--tokenizer-model",
                tok + ".model",
                "--output-prefix",
                prefix,
                "--append-eod",
                "--workers",
                "2",
            ],
            os.path.join(data, "preprocess.log"),
        )
        assert rc == 0, f"preprocessing failed: see {data}/preprocess.log"
    return tok + ".model", prefix + "_text_document"


def run_name(arch: str, lr: float, ablation: str | None = None, seed: int = SEED, part: str | None = None) -> str:
    name = f"{arch}_lr{lr:g}"
    if ablation is not None:
        name += "_" + ablation.replace(" ", "_").replace("=", "")
    if seed != SEED:
        name += f"_seed{seed}"
    return name if part is None else f"{name}_{part}"


def is_finished(metrics: str, iters: int) -> bool:
    """Whether a run need not be started again: it reached its final evaluation, or it stopped
    after non-finite steps (``outcome.json`` beside its metrics; it would diverge again)."""
    if not os.path.exists(metrics):
        return False
    evals = read_metrics(metrics)["eval"]
    return (bool(evals) and evals[-1]["iteration"] == iters) or run_outcome(metrics).get("diverged", False)


def run_outcome(metrics: str) -> dict:
    """``{"returncode": ..., "diverged": ...}`` as the runner recorded it, or {} (older runs)."""
    path = os.path.join(os.path.dirname(metrics), "outcome.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def warmup_iters(arch: str, iters: int, overrides: dict[str, int] | None = None) -> int:
    """The warm-up of a run of ``iters`` steps: ``overrides[arch]`` (``--warmup``) or the
    architecture's default (GPT+: 10%; none for anGPT and nGPT), fixed explicitly so WSD
    branches of any length share it."""
    from an_megatron.model.arch import ARCH_SPECS

    if overrides and arch in overrides:
        return overrides[arch]
    return ARCH_SPECS[arch].optimizer.warmup_iters(iters)


class Runner:
    """Starts training runs (``jobs`` at a time, each with ``2 / jobs`` threads), skipping any
    whose metrics already hold its final evaluation, so an interrupted benchmark resumes.

    ``cfg["warmup"]`` ({arch: iterations}, from ``--warmup``) replaces an architecture's default
    warm-up in every run of it; those runs live under their own names (``NAME_warmupN``), so
    they never mix with the default runs in the same ``--out``. A run that neither finished nor
    diverged (any exit status but 0 and ``EXIT_DIVERGED``: a bad flag, a crash, a kill) is
    reported with its log and returned as None, so a partial curve is never summarized."""

    def __init__(self, out, cfg, tok, data, jobs=1, summarize_only=False):
        self.out, self.cfg, self.tok, self.data = out, cfg, tok, data
        self.jobs, self.summarize_only = jobs, summarize_only
        self.failed: list[str] = []

    def run_dir(self, spec: dict) -> str:
        warmup = self.cfg.get("warmup", {}).get(spec["arch"])
        name = spec["name"] if warmup is None else f"{spec['name']}_warmup{warmup}"
        return os.path.join(self.out, "runs", name)

    def command(self, arch, lr, seed, metrics, iters, extra):
        c = self.cfg
        if arch in c.get("warmup", {}) and "--lr-warmup-iters" not in extra:
            extra = ["--lr-warmup-iters", str(c["warmup"][arch]), *extra]
        return [
            sys.executable,
            "examples/pretrain_angpt.py",
            "--deepspeed_config",
            "examples/ds_fp32.json",
            "--arch",
            arch,
            *c["model"],
            "--micro-batch-size",
            str(c["micro"]),
            "--global-batch-size",
            str(c["global_batch"]),
            "--train-iters",
            str(iters),
            "--lr",
            str(lr),
            "--data-path",
            self.data,
            "--split",
            "98,2,0",
            "--tokenizer-type",
            "SentencePieceTokenizer",
            "--tokenizer-model",
            self.tok,
            "--num-workers",
            "0",
            "--seed",
            str(seed),
            "--eval-interval",
            str(c["eval_interval"]),
            "--eval-iters",
            str(c["eval_iters"]),
            *(["--full-validation"] if c["full_validation"] else []),
            "--log-interval",
            str(max(1, c["eval_interval"] // 5)),
            "--metrics-file",
            metrics,
            *extra,
        ]

    def run(self, specs: list[dict]) -> dict[str, str | None]:
        """``specs``: dicts with name, arch, lr and optionally seed, iters, extra. Returns
        {name: metrics path, or None when not finished and --summarize-only}."""
        from concurrent.futures import ThreadPoolExecutor

        results, todo = {}, []
        for spec in specs:
            metrics = os.path.join(self.run_dir(spec), "metrics.jsonl")
            iters = spec.get("iters", self.cfg["iters"])
            if is_finished(metrics, iters):
                results[spec["name"]] = metrics
            elif self.summarize_only:
                results[spec["name"]] = None
            else:
                todo.append((spec, metrics, iters))

        def one(item):
            spec, metrics, iters = item
            run_dir = os.path.dirname(metrics)
            if os.path.exists(metrics):
                os.remove(metrics)
            os.makedirs(run_dir, exist_ok=True)
            cmd = self.command(spec["arch"], spec["lr"], spec.get("seed", SEED), metrics, iters, spec.get("extra", ()))
            threads = str(max(1, 2 // self.jobs))
            env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
            t0 = time.time()
            log = os.path.join(run_dir, "train.log")
            outcome = os.path.join(run_dir, "outcome.json")
            if os.path.exists(outcome):
                os.remove(outcome)
            rc = sh(cmd, log, env)
            with open(outcome, "w") as f:
                json.dump(dict(returncode=rc, diverged=rc == EXIT_DIVERGED), f)
            print(f"  {os.path.basename(run_dir)}: exit {rc} in {time.time() - t0:.0f} s", flush=True)
            if rc not in (0, EXIT_DIVERGED):
                print(f"  {os.path.basename(run_dir)} FAILED (exit {rc}), left out; see {log}", flush=True)
                self.failed.append(log)
                return spec["name"], None
            return spec["name"], metrics

        with ThreadPoolExecutor(max_workers=self.jobs) as pool:
            results.update(pool.map(one, todo))
        return results


def wsd_plan(iters: int) -> list[tuple[int, int]]:
    """(budget, branch point) per WSD budget: each cool-down decays over the last 20%."""
    budgets = sorted({max(2, round(iters * f)) for f in WSD_BUDGET_FRACTIONS})
    return [(b, b - max(1, round(b * WSD_COOLDOWN_FRACTION))) for b in budgets]


def run_wsd(
    runner: Runner, points: list[tuple[str, float, int]]
) -> dict[tuple[str, float, int], dict[int, str | None]]:
    """For each (arch, lr, seed): one constant-rate run saving at every branch point, then a
    linear cool-down branched from each (``--load --ckpt-step``: weights, optimizer state and
    data position of that step). Returns {(arch, lr, seed): {budget: metrics}}."""
    plan = wsd_plan(runner.cfg["iters"])
    branch_points = [k for _, k in plan]
    stables, branches, names = [], [], {}
    for arch, lr, seed in points:
        warmup = ["--lr-warmup-iters", str(warmup_iters(arch, runner.cfg["iters"], runner.cfg.get("warmup")))]
        stable = run_name(arch, lr, seed=seed, part="wsd_stable")
        ckpt = os.path.join(runner.run_dir(dict(name=stable, arch=arch)), "ckpt")
        save = ["--save", ckpt, "--save-interval", str(math.gcd(*branch_points)), "--overwrite-save"]
        stables.append(
            dict(
                name=stable,
                arch=arch,
                lr=lr,
                seed=seed,
                iters=max(branch_points),
                extra=[*warmup, "--lr-decay-style", "constant", *save],
            )
        )
        for budget, k in plan:
            name = run_name(arch, lr, seed=seed, part=f"wsd{budget}")
            names[(arch, lr, seed, budget)] = name
            cooldown = [
                "--lr-decay-style",
                "wsd",
                "--lr-decay-iters",
                str(budget),
                "--lr-wsd-decay-iters",
                str(budget - k),
            ]
            branches.append(
                dict(
                    name=name,
                    arch=arch,
                    lr=lr,
                    seed=seed,
                    iters=budget,
                    extra=[*warmup, *cooldown, "--load", ckpt, "--ckpt-step", str(k)],
                )
            )
    runner.run(stables)
    paths = runner.run(branches)
    out: dict[tuple[str, float, int], dict[int, str | None]] = {}
    for (arch, lr, seed, budget), name in names.items():
        out.setdefault((arch, lr, seed), {})[budget] = paths[name]
    return out


def wsd_points(best: dict[str, float], factors: list[float], seeds: list[int]) -> list[tuple[str, float, int]]:
    """(arch, lr, seed) of the WSD runs: every seed at each architecture's cosine-best rate,
    the first seed at the other rates ``best * factor`` (WSD's best rate need not be cosine's:
    the rate stays at its peak for 80% of the steps)."""
    return [
        (a, best[a] * f, s)
        for a in best
        for f in sorted(set(factors) | {1.0})
        for s in (seeds if f == 1.0 else seeds[:1])
    ]


def final_val(metrics_path: str | None) -> float:
    """The last validation loss; inf for a run that diverged (its last evaluation before the
    stop may still have been finite) or never evaluated."""
    if not (metrics_path and os.path.exists(metrics_path)) or run_outcome(metrics_path).get("diverged"):
        return math.inf
    evals = read_metrics(metrics_path)["eval"]
    loss = evals[-1]["val_loss"] if evals else math.nan
    return loss if math.isfinite(loss) else math.inf


def best_lr(runs: dict[float, str | None]) -> float:
    return min(runs, key=lambda lr: final_val(runs[lr]))


def summarize(cfg, sweep: dict, seed_runs: dict, wsd: dict, ablations: dict) -> dict:
    """Every figure the markdown reports, computed from the runs' metrics files."""
    best = {a: best_lr(sweep[a]) for a in sweep}
    curves = {a: val_curve(read_metrics(sweep[a][best[a]])) for a in sweep}
    base = curves.get("gptplus")
    summary = dict(
        config={k: v for k, v in cfg.items()},
        best_lr=best,
        final_val_loss={},
        lr_sensitivity={},
        lr_bracketed={},
        steps_speedup_vs_gptplus={},
        steps_to_gptplus_final={},
        step_time_ratio_vs_gptplus={},
        seeds={},
        wsd={},
        ablations={},
    )
    step_time = {a: median_step_time(read_metrics(sweep[a][best[a]])) for a in sweep}
    for a in sweep:
        summary["final_val_loss"][a] = final_val(sweep[a][best[a]])
        losses = {lr: final_val(p) for lr, p in sweep[a].items()}
        summary["lr_sensitivity"][a] = {f"{lr:g}": v for lr, v in sorted(losses.items())}
        summary["lr_bracketed"][a] = len(losses) > 1 and bracket_extension(losses) is None
        if base is not None:
            summary["steps_speedup_vs_gptplus"][a] = step_speedup(base, curves[a])
            summary["steps_to_gptplus_final"][a] = steps_to_reach(curves[a], base[-1][1])
            summary["step_time_ratio_vs_gptplus"][a] = step_time[a] / step_time["gptplus"]
    finished = {a: {s: p for s, p in runs.items() if p} for a, runs in seed_runs.items()}
    if any(len(runs) > 1 for runs in finished.values()):
        seed_curves = {a: {s: val_curve(read_metrics(p)) for s, p in runs.items()} for a, runs in finished.items()}
        for a, runs in finished.items():
            entry = dict(final_val_loss=spread([final_val(p) for p in runs.values()]), seeds=sorted(runs))
            if "gptplus" in seed_curves:
                pairs = [
                    step_speedup(seed_curves["gptplus"][s], c)
                    for s, c in seed_curves[a].items()
                    if s in seed_curves["gptplus"]
                ]
                entry["speedup_per_seed"] = [None if x is None else round(x, 4) for x in pairs]
                entry["speedup_per_seed_spread"] = spread([x for x in pairs]) if all(pairs) and pairs else None
                entry["speedup_of_mean_curves"] = step_speedup(
                    mean_curve(list(seed_curves["gptplus"].values())), mean_curve(list(seed_curves[a].values()))
                )
            summary["seeds"][a] = entry
    if wsd:
        # mean final loss over seeds per (arch, lr, budget); each budget takes the best rate
        by_rate: dict[str, dict[float, dict[int, list[float]]]] = {}
        for (a, lr, _seed), budgets in wsd.items():
            for budget, p in budgets.items():
                if p:
                    by_rate.setdefault(a, {}).setdefault(lr, {}).setdefault(budget, []).append(final_val(p))
        full = cfg["iters"]
        envelope: dict[str, dict[int, tuple[float, float, int]]] = {}  # arch: {budget: (loss, lr, runs)}
        for a, rates in by_rate.items():
            for lr, bs in rates.items():
                for b, v in bs.items():
                    m = statistics.fmean(v)
                    if b not in envelope.setdefault(a, {}) or m < envelope[a][b][0]:
                        envelope[a][b] = (m, lr, len(v))
        target = envelope.get("gptplus", {}).get(full, (None,))[0]
        for a, env in envelope.items():
            m = {b: env[b][0] for b in sorted(env)}
            steps = budget_to_reach(list(m.items()), target) if target is not None else None
            summary["wsd"][a] = dict(
                final_val_loss={str(b): v for b, v in m.items()},
                best_lr_per_budget={str(b): env[b][1] for b in sorted(env)},
                runs_per_budget={str(b): env[b][2] for b in sorted(env)},
                by_lr={
                    f"{lr:g}": {str(b): statistics.fmean(v) for b, v in sorted(bs.items())}
                    for lr, bs in sorted(by_rate[a].items())
                },
                steps_to_gptplus_final=steps,
                speedup_vs_gptplus=None if steps is None else full / steps,
                speedup_is_lower_bound=steps is not None and steps <= min(m),
            )
    for name, path in ablations.items():
        summary["ablations"][name] = dict(
            final_val_loss=final_val(path),
            speedup_vs_gptplus=step_speedup(base, val_curve(read_metrics(path)))
            if base and path and os.path.exists(path) and read_metrics(path)["eval"]
            else None,
        )
    return summary


def markdown(summary: dict) -> str:
    def f(x, fmt=".4f"):
        return "n/a" if x is None else ("diverged" if x == math.inf else format(x, fmt))

    warmup = summary["config"].get("warmup") or {}
    lines = (
        [f"Learning-rate warm-up replaced: {', '.join(f'{a} {n} iterations' for a, n in warmup.items())}.\n"]
        if warmup
        else []
    )
    lines += [
        "| arch | best lr | final val loss | steps to GPT+'s final loss | step speedup vs GPT+ (paper) "
        "| step time ratio vs GPT+ (paper) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for a in summary["best_lr"]:
        lines.append(
            f"| {a} | {summary['best_lr'][a]:g} | {f(summary['final_val_loss'][a])} "
            f"| {f(summary['steps_to_gptplus_final'].get(a), '.0f')} "
            f"| {f(summary['steps_speedup_vs_gptplus'].get(a), '.2f')} ({paper.STEP_SPEEDUP[a]}) "
            f"| {f(summary['step_time_ratio_vs_gptplus'].get(a), '.3f')} ({paper.STEP_TIME_RATIO[a]}) |"
        )
    lrs = sorted({lr for v in summary["lr_sensitivity"].values() for lr in v}, key=float)
    lines += [
        "",
        "Final validation loss across the learning-rate sweep (best in bold; bracketed: a worse rate was tried on "
        "both sides of it):",
        "",
        "| arch | " + " | ".join(f"lr {lr}" for lr in lrs) + " | bracketed |",
        "| --- |" + " --- |" * (len(lrs) + 1),
    ]
    for a, v in summary["lr_sensitivity"].items():
        best = f"{summary['best_lr'][a]:g}"
        cells = [(f"**{f(v[lr])}**" if lr == best else f(v[lr])) if lr in v else "" for lr in lrs]
        lines.append(f"| {a} | " + " | ".join(cells) + f" | {'yes' if summary['lr_bracketed'][a] else 'no'} |")
    if summary["seeds"]:
        lines += [
            "",
            "Seeds (data order and initialization) at each architecture's best learning rate:",
            "",
            "| arch | seeds | final val loss mean | std | min-max | speedup vs GPT+ per seed pair | mean (min-max) "
            "| speedup of the mean curves |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for a, e in summary["seeds"].items():
            fv, sp = e["final_val_loss"], e.get("speedup_per_seed_spread")
            per_seed = ", ".join(f(x, ".2f") for x in e.get("speedup_per_seed", []))
            speedup_range = f"{f(sp['mean'], '.2f')} ({f(sp['min'], '.2f')}-{f(sp['max'], '.2f')})" if sp else "n/a"
            lines.append(
                f"| {a} | {fv['n']} | {f(fv['mean'])} | {f(fv['std'])} | {f(fv['min'])}-{f(fv['max'])} | {per_seed} "
                f"| {speedup_range} "
                f"| {f(e.get('speedup_of_mean_curves'), '.2f')} |"
            )
    if summary["wsd"]:
        budgets = sorted({int(b) for e in summary["wsd"].values() for b in e["final_val_loss"]})
        lines += [
            "",
            "Warmup-stable-decay: final validation loss after a cool-down over the last 20% of each budget, branched "
            "from one constant-rate run (mean over seeds), at the best rate tried for that budget (in brackets); "
            "steps to reach GPT+'s loss at the full budget, interpolated in log(steps):",
            "",
            "| arch | " + " | ".join(f"{b} steps" for b in budgets) + " | steps to GPT+'s final | speedup vs GPT+ |",
            "| --- |" + " --- |" * (len(budgets) + 2),
        ]
        for a, e in summary["wsd"].items():
            lr_at = e.get("best_lr_per_budget", {})
            cells = [
                f(e["final_val_loss"].get(str(b))) + (f" ({lr_at[str(b)]:g})" if str(b) in lr_at else "")
                for b in budgets
            ]
            bound = "<= " if e["speedup_is_lower_bound"] else ""
            speed = (">= " if e["speedup_is_lower_bound"] else "") + f(e["speedup_vs_gptplus"], ".2f")
            lines.append(
                f"| {a} | " + " | ".join(cells) + f" | {bound}{f(e['steps_to_gptplus_final'], '.0f')} | {speed} |"
            )
        if any(len(e.get("by_lr", {})) > 1 for e in summary["wsd"].values()):
            lines += [
                "",
                "Warmup-stable-decay by learning rate (final validation loss per budget):",
                "",
                "| arch | lr | " + " | ".join(f"{b} steps" for b in budgets) + " |",
                "| --- | --- |" + " --- |" * len(budgets),
            ]
            for a, e in summary["wsd"].items():
                for lr, losses in e.get("by_lr", {}).items():
                    lines.append(f"| {a} | {lr} | " + " | ".join(f(losses.get(str(b))) for b in budgets) + " |")
    if summary["ablations"]:
        lines += [
            "",
            f"anGPT ablations (at anGPT's best learning rate; defaults: nu_att={ModelConfig.nu_att}, "
            "alpha_init=0.05, nu_lerp on, row bound):",
            "",
            "| variant | final val loss | step speedup vs GPT+ |",
            "| --- | --- | --- |",
            f"| anGPT (defaults) | {f(summary['final_val_loss'].get('angpt'))} "
            f"| {f(summary['steps_speedup_vs_gptplus'].get('angpt'), '.2f')} |",
        ]
        for name, r in summary["ablations"].items():
            lines.append(f"| {name} | {f(r['final_val_loss'])} | {f(r['speedup_vs_gptplus'], '.2f')} |")
    return "\n".join(lines) + "\n"


def parse_warmup(parser: argparse.ArgumentParser, values: list[str]) -> dict[str, int]:
    warmup = {}
    for value in values:
        arch, _, iters = value.partition(":")
        if arch not in ARCHS or not iters.isdigit():
            parser.error(f"--warmup {value}: expected ARCH:ITERS with ARCH one of {', '.join(ARCHS)}")
        warmup[arch] = int(iters)
    return warmup


def sweep_specs(sweep_lrs: dict[str, list[float]]) -> list[dict]:
    return [dict(name=run_name(a, lr), arch=a, lr=lr) for a, lrs in sweep_lrs.items() for lr in lrs]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--smoke", action="store_true", help="tiny runs, a few steps (the test suite's check)")
    p.add_argument("--corpus", choices=sorted(CORPORA), default="kjv")
    p.add_argument("--size", choices=("small", "medium"), default="small", help="medium: 6 layers of d=256")
    p.add_argument("--archs", nargs="*", default=None)
    p.add_argument(
        "--lrs",
        nargs="*",
        default=None,
        metavar="[ARCH:]LR",
        help="learning rates to sweep (default: the config's); ARCH:LR sweeps LR for ARCH only",
    )
    p.add_argument(
        "--bracket",
        type=int,
        default=0,
        metavar="N",
        help="extend each sweep by factors of 2, at most N times, until its best rate has a worse one on both sides",
    )
    p.add_argument("--seeds", type=int, default=1, help="seeds at each architecture's best learning rate")
    p.add_argument("--wsd", action="store_true", help="WSD cool-downs at 25/50/100%% of the steps, per seed")
    p.add_argument("--wsd-seeds", type=int, default=None, help="seeds for --wsd (default: --seeds)")
    p.add_argument(
        "--wsd-lr-factors",
        type=float,
        nargs="*",
        default=[1.0],
        metavar="F",
        help="WSD also at each architecture's cosine-best rate times F (first seed only); each budget "
        "reports the best rate tried",
    )
    p.add_argument(
        "--warmup",
        nargs="*",
        default=[],
        metavar="ARCH:ITERS",
        help="a linear learning-rate warm-up over ITERS iterations for ARCH instead of its default "
        "(GPT+ 10%%, none for anGPT and nGPT); these runs are named NAME_warmupITERS",
    )
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (each with 2 / jobs threads)")
    p.add_argument(
        "--no-full-validation",
        action="store_true",
        help="evaluate on successive validation batches (Megatron's default) instead of the whole split each time",
    )
    p.add_argument("--no-ablations", action="store_true")
    p.add_argument(
        "--ablations",
        nargs="*",
        choices=sorted(ABLATIONS),
        default=None,
        help="run only these anGPT ablations (default: all)",
    )
    p.add_argument(
        "--summarize-only",
        action="store_true",
        help="train nothing: summarize the finished runs under --out (e.g. of an interrupted benchmark)",
    )
    args = p.parse_args(argv)
    cfg = dict(SMOKE if args.smoke else FULL)
    if args.size == "medium" and not args.smoke:
        cfg["model"] = MEDIUM_MODEL
    cfg.update(corpus=args.corpus, size=args.size, full_validation=not args.no_full_validation)
    cfg["warmup"] = parse_warmup(p, args.warmup)
    lrs = {arch: list(cfg["lrs"]) for arch in ARCHS}
    if args.lrs:
        lrs = {
            arch: [float(lr.split(":")[-1]) for lr in args.lrs if ":" not in lr or lr.startswith(arch + ":")]
            for arch in ARCHS
        }
    archs = args.archs or (["gptplus", "angpt"] if args.smoke else list(ARCHS))
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    tok, data = prepare_data(args.out, cfg, args.corpus)
    runner = Runner(args.out, cfg, tok, data, args.jobs, args.summarize_only)

    # 1. the learning-rate sweep, extended until each best rate is bracketed
    sweep_lrs = {a: lrs[a] for a in archs if lrs[a]}
    print(f"sweep: {sweep_lrs}", flush=True)
    paths = runner.run(sweep_specs(sweep_lrs))
    for _ in range(args.bracket):
        extend = {}
        for a, a_lrs in sweep_lrs.items():
            losses = {lr: final_val(paths[run_name(a, lr)]) for lr in a_lrs}
            nxt = bracket_extension(losses) if all(paths[run_name(a, lr)] for lr in a_lrs) else None
            if nxt is not None:
                extend[a] = [nxt]
                a_lrs.append(nxt)
        if not extend:
            break
        print(f"bracketing: {extend}", flush=True)
        paths.update(runner.run(sweep_specs(extend)))
    sweep = {
        a: {lr: paths[run_name(a, lr)] for lr in a_lrs if paths[run_name(a, lr)]} for a, a_lrs in sweep_lrs.items()
    }
    sweep = {a: runs for a, runs in sweep.items() if runs}
    best = {a: best_lr(runs) for a, runs in sweep.items()}

    # 2. seeds at each best rate (the sweep's own run is the first seed)
    seeds = [SEED + i for i in range(max(1, args.seeds))]
    seed_specs = [dict(name=run_name(a, best[a], seed=s), arch=a, lr=best[a], seed=s) for a in best for s in seeds[1:]]
    if seed_specs:
        print(f"seeds {seeds[1:]} at {best}", flush=True)
    seed_paths = runner.run(seed_specs)
    seed_runs = {
        a: {s: sweep[a][best[a]] if s == SEED else seed_paths[run_name(a, best[a], seed=s)] for s in seeds}
        for a in best
    }

    # 3. warmup-stable-decay budgets
    wsd = {}
    if args.wsd:
        wsd_seeds = seeds[: args.wsd_seeds] if args.wsd_seeds else seeds
        print(f"WSD at {best} x {args.wsd_lr_factors}, seeds {wsd_seeds}: budgets {wsd_plan(cfg['iters'])}", flush=True)
        wsd = run_wsd(runner, wsd_points(best, args.wsd_lr_factors, wsd_seeds))

    # 4. anGPT's ablations at its best rate
    ablations = {}
    if "angpt" in best and not (args.no_ablations or args.smoke):
        print(f"anGPT ablations at lr {best['angpt']:g}", flush=True)
        chosen = {n: fl for n, fl in ABLATIONS.items() if args.ablations is None or n in args.ablations}
        specs = [
            dict(name=run_name("angpt", best["angpt"], n), arch="angpt", lr=best["angpt"], extra=fl)
            for n, fl in chosen.items()
        ]
        ab_paths = runner.run(specs)
        ablations = {n: ab_paths[spec["name"]] for n, spec in zip(chosen, specs) if ab_paths[spec["name"]]}

    summary = summarize(cfg, sweep, seed_runs, wsd, ablations)
    summary["wall_time_s"] = time.time() - t0
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    md = markdown(summary)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(md)
    print(md)
    try:
        sys.path.insert(0, os.path.join(ROOT, "tools"))
        from plot_runs import plot

        plot(
            [sweep[a][best[a]] for a in sweep],
            [f"{a} (lr {best[a]:g})" for a in sweep],
            os.path.join(args.out, "curves.png"),
            "validation loss, each architecture at its best learning rate",
        )
        if ablations:
            plot(
                [sweep["angpt"][best["angpt"]], *ablations.values()],
                ["anGPT defaults", *ablations],
                os.path.join(args.out, "ablations.png"),
                "anGPT ablations",
            )
        if summary["wsd"]:
            plot_budgets(summary, os.path.join(args.out, "wsd.png"))
    except ImportError as e:
        print(f"(no plots: {e})")
    print(f"benchmark wall time {summary['wall_time_s'] / 60:.1f} min; results in {args.out}")
    if runner.failed:
        print(f"{len(runner.failed)} run(s) failed and are left out:", *runner.failed, sep="\n  ")
        return 1
    return 0


def plot_budgets(summary: dict, output: str) -> None:
    """Final validation loss against the step budget (WSD cool-downs), one line per architecture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for a, e in summary["wsd"].items():
        budgets = sorted(int(b) for b in e["final_val_loss"])
        ax.plot(budgets, [e["final_val_loss"][str(b)] for b in budgets], marker="o", label=a)
    ax.set_xscale("log")
    ax.set_xlabel("steps (each a WSD run cooled down over its last 20%)")
    ax.set_ylabel("final validation loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(output, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
