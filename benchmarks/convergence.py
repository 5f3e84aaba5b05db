#!/usr/bin/env python
"""Reproduce the paper's claims at small scale, and settle anGPT's open choices by measurement.

    python benchmarks/convergence.py --out runs/convergence            # the full benchmark
    python benchmarks/convergence.py --out /tmp/smoke --smoke          # two tiny runs (tests)

Trains GPT+, nGPT and anGPT through examples/pretrain_angpt.py on the bundled corpus (KJV) with
a SentencePiece tokenizer trained on it: same data order, same token budget, validation loss
at fixed intervals. Each architecture gets a learning-rate sweep; anGPT's ablations run at its
best learning rate. A finished run is not repeated (its metrics file is complete), so an
interrupted benchmark continues where it stopped. Writes ``summary.md``, ``summary.json`` and
PNG curves into ``--out``; every run's metrics JSONL is under ``--out/runs/NAME/``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import paper  # noqa: E402  (benchmarks/, this script's directory)
from run_analysis import median_step_time, step_speedup, steps_to_reach, val_curve  # noqa: E402

from an_megatron.model.config import ModelConfig  # noqa: E402
from an_megatron.training.metrics import read_metrics  # noqa: E402

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
SMOKE = dict(
    model=["--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "2", "--seq-length", "32"],
    micro=4,
    global_batch=4,
    iters=6,
    eval_interval=3,
    eval_iters=1,
    vocab=500,
    lrs=[3e-3],
)
ABLATIONS = {  # name: flags, on anGPT at its best learning rate
    "nu_att=exact": ["--nu-att", "exact"],
    "nu_att=dense": ["--nu-att", "dense"],
    "nu_att=none": ["--nu-att", "none"],
    "alpha_init=0.01": ["--alpha-init", "0.01"],
    "no nu_lerp": ["--no-nu-lerp"],
    "exact weight normalization": ["--weight-norm", "normalize"],
}


def sh(cmd, log):
    with open(log, "w") as f:
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode


def prepare_data(out: str, cfg: dict) -> tuple[str, str]:
    data = os.path.join(out, "data")
    os.makedirs(data, exist_ok=True)
    corpus = os.path.join(ROOT, "examples", "data", "kjv.jsonl.gz")
    tok, prefix = os.path.join(data, "tok"), os.path.join(data, "kjv")
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


def run_name(arch: str, lr: float, ablation: str | None = None) -> str:
    base = f"{arch}_lr{lr:g}"
    return base if ablation is None else f"{base}_{ablation.replace(' ', '_').replace('=', '')}"


def is_finished(metrics: str, cfg: dict) -> bool:
    if not os.path.exists(metrics):
        return False
    evals = read_metrics(metrics)["eval"]
    return bool(evals) and evals[-1]["iteration"] == cfg["iters"]


def train(out, cfg, tok, data, arch, lr, extra=(), name=None, summarize_only=False) -> str | None:
    """One run (skipped when its metrics already hold the final evaluation). With
    ``summarize_only``, the metrics of a finished run or None."""
    name = name or run_name(arch, lr)
    run_dir = os.path.join(out, "runs", name)
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if is_finished(metrics, cfg):
        return metrics
    if summarize_only:
        return None
    if os.path.exists(metrics):
        os.remove(metrics)
    os.makedirs(run_dir, exist_ok=True)
    cmd = [
        sys.executable,
        "examples/pretrain_angpt.py",
        "--deepspeed_config",
        "examples/ds_fp32.json",
        "--arch",
        arch,
        *cfg["model"],
        "--micro-batch-size",
        str(cfg["micro"]),
        "--global-batch-size",
        str(cfg["global_batch"]),
        "--train-iters",
        str(cfg["iters"]),
        "--lr",
        str(lr),
        "--data-path",
        data,
        "--split",
        "98,2,0",
        "--tokenizer-type",
        "SentencePieceTokenizer",
        "--tokenizer-model",
        tok,
        "--num-workers",
        "0",
        "--seed",
        "1234",
        "--eval-interval",
        str(cfg["eval_interval"]),
        "--eval-iters",
        str(cfg["eval_iters"]),
        "--log-interval",
        str(max(1, cfg["eval_interval"] // 5)),
        "--metrics-file",
        metrics,
        *extra,
    ]
    t0 = time.time()
    rc = sh(cmd, os.path.join(run_dir, "train.log"))
    print(f"  {name}: exit {rc} in {time.time() - t0:.0f} s", flush=True)
    return metrics


def final_val(metrics_path: str) -> float:
    evals = read_metrics(metrics_path)["eval"] if os.path.exists(metrics_path) else []
    loss = evals[-1]["val_loss"] if evals else math.nan
    return loss if math.isfinite(loss) else math.inf


def summarize(out, cfg, sweep: dict, ablations: dict) -> dict:
    best = {a: min(sweep[a], key=lambda lr: final_val(sweep[a][lr])) for a in sweep}
    curves = {a: val_curve(read_metrics(sweep[a][best[a]])) for a in sweep}
    base = curves.get("gptplus")
    summary = dict(
        config={k: v for k, v in cfg.items()},
        best_lr=best,
        final_val_loss={},
        lr_sensitivity={},
        steps_speedup_vs_gptplus={},
        steps_to_gptplus_final={},
        step_time_ratio_vs_gptplus={},
        ablations={},
    )
    step_time = {a: median_step_time(read_metrics(sweep[a][best[a]])) for a in sweep}
    for a in sweep:
        summary["final_val_loss"][a] = final_val(sweep[a][best[a]])
        summary["lr_sensitivity"][a] = {f"{lr:g}": final_val(p) for lr, p in sweep[a].items()}
        if base is not None:
            summary["steps_speedup_vs_gptplus"][a] = step_speedup(base, curves[a])
            summary["steps_to_gptplus_final"][a] = steps_to_reach(curves[a], base[-1][1])
            summary["step_time_ratio_vs_gptplus"][a] = step_time[a] / step_time["gptplus"]
    for name, path in ablations.items():
        summary["ablations"][name] = dict(
            final_val_loss=final_val(path),
            speedup_vs_gptplus=step_speedup(base, val_curve(read_metrics(path)))
            if base and os.path.exists(path) and read_metrics(path)["eval"]
            else None,
        )
    return summary


def markdown(summary: dict) -> str:
    def f(x, fmt=".4f"):
        return "n/a" if x is None else ("diverged" if x == math.inf else format(x, fmt))

    lines = [
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
        "Final validation loss across the learning-rate sweep:",
        "",
        "| arch | " + " | ".join(f"lr {lr}" for lr in lrs) + " |",
        "| --- |" + " --- |" * len(lrs),
    ]
    for a, v in summary["lr_sensitivity"].items():
        lines.append(f"| {a} | " + " | ".join(f(v.get(lr)) for lr in lrs) + " |")
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--smoke", action="store_true", help="two tiny runs, a few steps (the test suite's check)")
    p.add_argument("--archs", nargs="*", default=None)
    p.add_argument(
        "--lrs",
        nargs="*",
        default=None,
        metavar="[ARCH:]LR",
        help="learning rates to sweep (default: the config's); ARCH:LR sweeps LR for ARCH only",
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
    lrs = {arch: cfg["lrs"] for arch in ARCHS}
    if args.lrs:
        lrs = {
            arch: [float(lr.split(":")[-1]) for lr in args.lrs if ":" not in lr or lr.startswith(arch + ":")]
            for arch in ARCHS
        }
    archs = args.archs or (["gptplus", "angpt"] if args.smoke else list(ARCHS))
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    tok, data = prepare_data(args.out, cfg)
    sweep = {}
    for arch in archs:
        print(f"{arch}: learning rates {lrs[arch]}", flush=True)
        runs = {lr: train(args.out, cfg, tok, data, arch, lr, summarize_only=args.summarize_only) for lr in lrs[arch]}
        runs = {lr: path for lr, path in runs.items() if path}
        if runs:
            sweep[arch] = runs
    ablations = {}
    if "angpt" in sweep and not (args.no_ablations or args.smoke):
        lr = min(sweep["angpt"], key=lambda x: final_val(sweep["angpt"][x]))
        print(f"anGPT ablations at lr {lr:g}", flush=True)
        for name, flags in ABLATIONS.items():
            if args.ablations is not None and name not in args.ablations:
                continue
            path = train(
                args.out,
                cfg,
                tok,
                data,
                "angpt",
                lr,
                flags,
                name=run_name("angpt", lr, name),
                summarize_only=args.summarize_only,
            )
            if path:
                ablations[name] = path
    summary = summarize(args.out, cfg, sweep, ablations)
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

        best = [sweep[a][summary["best_lr"][a]] for a in sweep]
        plot(
            best,
            [f"{a} (lr {summary['best_lr'][a]:g})" for a in sweep],
            os.path.join(args.out, "curves.png"),
            "validation loss, each architecture at its best learning rate",
        )
        if ablations:
            plot(
                [sweep["angpt"][summary["best_lr"]["angpt"]], *ablations.values()],
                ["anGPT defaults", *ablations],
                os.path.join(args.out, "ablations.png"),
                "anGPT ablations",
            )
    except ImportError as e:
        print(f"(no plots: {e})")
    print(f"benchmark wall time {summary['wall_time_s'] / 60:.1f} min; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
