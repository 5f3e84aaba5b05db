#!/usr/bin/env python
"""Plot validation loss of several runs against steps, tokens and wall time, in one PNG.

python tools/plot_runs.py runs/*/metrics.jsonl --output curves.png [--labels a b c]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

from an_megatron.cli import ArgumentParser, output_file
from an_megatron.training.metrics import read_metrics

# the formats matplotlib's Agg backend writes (without the ones that need extra packages)
IMAGE_FORMATS = ("png", "pdf", "svg", "svgz", "eps", "ps", "jpg", "jpeg", "tif", "tiff", "webp")


TRAIN_KEYS, EVAL_KEYS = ("step_time_s", "consumed_tokens"), ("val_loss",)


def read_runs(paths: list[str]) -> dict[str, dict]:
    """Each file's metrics (``read_metrics``); ValueError naming the file for one that cannot be
    plotted, or when no file has an evaluation record."""
    runs = {}
    for path in paths:
        m = runs[path] = read_metrics(path)
        for kind, keys in (("train", TRAIN_KEYS), ("eval", EVAL_KEYS)):
            for r in m[kind]:
                missing = [k for k in keys if not isinstance(r.get(k), (int, float))]
                if missing:
                    raise ValueError(f"{path}: iteration {r['iteration']}: no number under {', '.join(missing)}")
        if not m["eval"]:
            print(f"warning: {path} has no evaluation records; skipped", file=sys.stderr)
    if not any(m["eval"] for m in runs.values()):
        raise ValueError(f"no evaluation records (val_loss) in {', '.join(paths)}: nothing to plot")
    return runs


def plot(paths: list[str], labels: list[str], output: str, title: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = read_runs(paths)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5), sharey=True)
    for path, label in zip(paths, labels):
        m = runs[path]
        if not m["eval"]:
            continue
        its = [r["iteration"] for r in m["eval"]]
        losses = [r["val_loss"] for r in m["eval"]]
        tokens_per_it = (m["train"][0]["consumed_tokens"] / m["train"][0]["iteration"]) if m["train"] else 0
        # each record's step_time_s is the mean over the iterations since the previous record
        train_its = [r["iteration"] for r in m["train"]]
        times = list(
            itertools.accumulate(
                r["step_time_s"] * (it - prev) for r, it, prev in zip(m["train"], train_its, [0] + train_its[:-1])
            )
        )
        wall = [next((t for i, t in zip(train_its, times) if i >= it), times[-1] if times else 0) for it in its]
        axes[0].plot(its, losses, marker="o", ms=3, label=label)
        axes[1].plot([it * tokens_per_it / 1e6 for it in its], losses, marker="o", ms=3, label=label)
        axes[2].plot(wall, losses, marker="o", ms=3, label=label)
    for ax, xlabel in zip(axes, ("iteration", "tokens (M)", "training time (s)")):
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation loss")
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("metrics", nargs="+", help="metrics JSONL files (--metrics-file of each run)")
    p.add_argument("--output", type=output_file, required=True, help="image to write (.png, .pdf, .svg, ...)")
    p.add_argument("--labels", nargs="*", default=None, help="one per file (default: the file's folder name)")
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)
    labels = args.labels or [os.path.basename(os.path.dirname(os.path.abspath(m))) for m in args.metrics]
    if len(labels) != len(args.metrics):
        p.error(f"--labels has {len(labels)} entries for {len(args.metrics)} files")
    for m in args.metrics:
        if not os.path.isfile(m):
            p.error(f"{m}: no such file")
    ext = os.path.splitext(args.output)[1].lstrip(".").lower()
    if ext not in IMAGE_FORMATS:
        p.error(f"--output {args.output}: expected an image file name ending in one of .{', .'.join(IMAGE_FORMATS)}")
    try:
        plot(args.metrics, labels, args.output, args.title)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
