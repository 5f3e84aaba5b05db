"""Learning-rate schedules, as a pure function of the iteration (so a resumed run needs no
scheduler state): linear warm-up, then cosine, linear, constant or WSD decay to ``min_lr``."""

from __future__ import annotations

import math

DECAY_STYLES = ("cosine", "linear", "constant", "wsd")


def learning_rate(
    iteration: int,
    *,
    lr: float,
    min_lr: float,
    warmup_iters: int,
    decay_iters: int,
    style: str = "cosine",
    wsd_decay_iters: int | None = None,
) -> float:
    """The learning rate for (0-based) ``iteration``.

    Warm-up ramps linearly over ``warmup_iters`` (the first step uses ``lr / warmup_iters``).
    Decay runs from the end of warm-up to ``decay_iters``; after it, ``min_lr``. WSD
    (warmup-stable-decay) holds ``lr`` and decays linearly over its last ``wsd_decay_iters``.
    """
    if style not in DECAY_STYLES:
        raise ValueError(f"unknown --lr-decay-style {style!r}; choose one of {', '.join(DECAY_STYLES)}")
    if warmup_iters > 0 and iteration < warmup_iters:
        return lr * (iteration + 1) / warmup_iters
    if style == "constant":
        return lr
    if iteration >= decay_iters:
        return min_lr
    if style == "wsd":
        length = wsd_decay_iters if wsd_decay_iters is not None else max(1, (decay_iters - warmup_iters) // 10)
        start = decay_iters - length
        if iteration < start:
            return lr
        return min_lr + (lr - min_lr) * (decay_iters - iteration) / length
    progress = (iteration - warmup_iters) / max(1, decay_iters - warmup_iters)
    if style == "linear":
        return lr - (lr - min_lr) * progress
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
