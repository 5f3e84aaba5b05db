"""Comparing the convergence of training runs, from their metrics (``metrics.read_metrics``).

The paper's headline number is a step ratio: how many steps a model needs to reach the final
validation loss of the GPT+ baseline, relative to GPT+'s own steps.
"""

from __future__ import annotations

import math
import statistics


def val_curve(metrics: dict) -> list[tuple[int, float]]:
    return [(r["iteration"], r["val_loss"]) for r in metrics["eval"]]


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """First (linearly interpolated) iteration at which the validation loss reaches ``target``;
    None when it never does. ``curve`` is [(iteration, val_loss)] in increasing iterations."""
    prev = (0, math.inf)
    for it, loss in curve:
        if loss <= target:
            if not math.isfinite(prev[1]):
                return float(it)
            # interpolate between the previous evaluation (above target) and this one
            return prev[0] + (it - prev[0]) * (prev[1] - target) / (prev[1] - loss)
        prev = (it, loss)
    return None


def step_speedup(baseline_curve, curve) -> float | None:
    """Steps GPT+ took to its final validation loss over the steps ``curve`` needs to reach it
    (> 1: faster than the baseline). None when ``curve`` never reaches that loss."""
    final_it, final_loss = baseline_curve[-1]
    base_steps = steps_to_reach(baseline_curve, final_loss) or final_it
    steps = steps_to_reach(curve, final_loss)
    return None if steps is None else base_steps / steps


def median_step_time(metrics: dict, skip_first: int = 1) -> float:
    times = [r["step_time_s"] for r in metrics["train"][skip_first:]] or [r["step_time_s"] for r in metrics["train"]]
    return statistics.median(times)
