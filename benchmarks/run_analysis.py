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


# ---- learning-rate brackets, seeds and budgets ------------------------------------------------


def bracket_extension(losses: dict[float, float], factor: float = 2.0) -> float | None:
    """The next learning rate a sweep needs for its best value to be bracketed, i.e. to have a
    tried neighbour with a higher final loss on both sides: ``factor`` beyond the best when the
    best is the largest tried, ``1 / factor`` below it when it is the smallest; None when the
    best is already inside. A diverged run (inf or nan loss) counts as higher."""
    clean = {lr: (v if math.isfinite(v) else math.inf) for lr, v in losses.items()}
    best = min(clean, key=clean.get)
    if best == max(clean):
        return best * factor
    if best == min(clean):
        return best / factor
    return None


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation, min and max (std None for one value)."""
    values = [float(v) for v in values]
    return dict(
        mean=statistics.fmean(values),
        std=statistics.stdev(values) if len(values) > 1 else None,
        min=min(values),
        max=max(values),
        n=len(values),
    )


def mean_curve(curves: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
    """Pointwise mean of validation curves evaluated at the same iterations."""
    its = [it for it, _ in curves[0]]
    if any([it for it, _ in c] != its for c in curves):
        raise ValueError("curves are evaluated at different iterations")
    return [(it, statistics.fmean(c[i][1] for c in curves)) for i, it in enumerate(its)]


def budget_to_reach(points: list[tuple[int, float]], target: float) -> float | None:
    """Steps needed to end at ``target`` from (budget, final loss) points of runs that each
    completed their schedule (WSD cool-downs): interpolated linearly in log(budget) between
    the two budgets that bracket the target; the smallest budget when it already reaches it
    (a bound: fewer steps might do); None when even the largest does not."""
    points = sorted(points)
    if points[0][1] <= target:
        return float(points[0][0])
    for (b0, l0), (b1, l1) in zip(points, points[1:]):
        if l1 <= target:
            w = (l0 - target) / (l0 - l1)
            return math.exp(math.log(b0) + w * (math.log(b1) - math.log(b0)))
    return None
