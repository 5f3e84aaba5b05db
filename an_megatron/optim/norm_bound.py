"""Keeping weight vectors in the unit ball: anGPT's bound and nGPT's exact normalization.

anGPT projects every row back into the unit ball after each optimizer step,
``w_i <- w_i / max(1, ||w_i||)`` (a bound: shorter rows are left alone); nGPT normalizes to
exactly ``||w_i|| = 1`` along the embedding dimension. Both are "scale each vector of a matrix
by a function of its norm", so one mechanism serves both, in three settings:

* dense: a whole (local) weight, ``constrain_parameters_``;
* tensor-parallel: a row-parallel weight splits each row over the TP group, so the squared
  norm is the sum of the ranks' partial sums (``NormConstraint.tp_split``);
* ZeRO: the fp32 masters are flat partitions over the data-parallel group, and a partition can
  begin or end mid-row. ``constrain_fragments_`` takes any flat fragment of a parameter: rows
  it holds whole are bounded at once; for the vectors split between ranks it sums squares
  locally, all-reduces the sums over the DP group (and the TP group for split rows), then each
  rank scales only its own elements.

Element ``k`` of a row-major ``(R, C)`` matrix belongs to row ``k // C`` (``dim=1``, norms
along the input dimension) and column ``k % C`` (``dim=0``); a fragment is handled as at most a
partial row, a block of whole rows and a partial row, so every pass runs on plain views.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.distributed as dist

MODES = ("bound", "normalize")


@dataclass(frozen=True)
class NormConstraint:
    """How one weight is kept in the unit ball.

    mode: ``bound`` (``||w_i|| <= max_norm``) or ``normalize`` (``||w_i|| = max_norm``).
    dim: the axis the norms run along: 1 for rows of an ``(out, in)`` weight, 0 for columns.
    tp_split: the vectors are split over the tensor-parallel group (rows of a row-parallel
        weight), so partial sums are all-reduced over it.
    """

    mode: str
    dim: int = 1
    tp_split: bool = False
    max_norm: float = 1.0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown norm constraint mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.dim not in (0, 1):
            raise ValueError(f"norm constraint dim must be 0 or 1, got {self.dim}")


def num_vectors(shape: Sequence[int], dim: int) -> int:
    return shape[0] if dim == 1 else shape[1]


def _pieces(fragment: torch.Tensor, start: int, cols: int):
    """Split a flat fragment ``[start, start + n)`` of a row-major ``(R, cols)`` matrix into at
    most three views: a partial first row, a ``(k, cols)`` block of whole rows, a partial last
    row. Yields ``(view, row, col)`` with the row and column of the view's first element; the
    block is 2-D. Working on views keeps the bound at memory speed (no per-element index)."""
    flat = fragment.view(-1)
    n, pos = flat.numel(), 0
    head = min(n, (-start) % cols)
    if head:
        yield flat[:head], start // cols, start % cols
        pos = head
    whole = (n - pos) // cols
    if whole:
        yield flat[pos : pos + whole * cols].view(whole, cols), (start + pos) // cols, 0
        pos += whole * cols
    if pos < n:
        yield flat[pos:], (start + pos) // cols, 0


def _held_whole(constraint: NormConstraint) -> bool:
    """Whether a block of whole rows in a fragment holds its vectors' every element on this rank:
    rows (``dim=1``) not split over tensor-parallel ranks. Columns gather elements from every row,
    so they are never held whole by a fragment that is not the whole weight."""
    return constraint.dim == 1 and not constraint.tp_split


def partial_sq_norms(
    fragment: torch.Tensor, start: int, shape: Sequence[int], dim: int, skip_whole_rows: bool = False
) -> torch.Tensor:
    """Per-vector sums of squares over the elements this fragment holds (zeros elsewhere), fp32;
    with ``skip_whole_rows``, over its partial first and last rows only (``bound_whole_rows_``
    handles the rest without any communication).

    Norms along rows go through ``vector_norm``: one read of the rows at memory speed, where
    ``pow(2).sum(1)`` writes and reads a squared copy (about 4x slower on a CPU core). Along
    columns ``vector_norm(dim=0)`` is the slow one (a strided reduction), so the squares stay."""
    out = torch.zeros(num_vectors(shape, dim), dtype=torch.float32, device=fragment.device)
    for piece, row, col in _pieces(fragment.detach(), start, shape[1]):
        if dim == 1:
            if skip_whole_rows and piece.dim() == 2:
                continue
            rows = piece if piece.dim() == 2 else piece[None]
            out[row : row + rows.shape[0]] += torch.linalg.vector_norm(rows, dim=1, dtype=torch.float32).square()
        elif piece.dim() == 2:
            out += piece.float().pow(2).sum(0)
        else:
            out[col : col + piece.numel()] += piece.float().pow(2)
    return out


def norm_scales(sq_norms: torch.Tensor, mode: str, max_norm: float = 1.0) -> torch.Tensor:
    """The factor for each vector: ``max_norm / max(max_norm, ||w||)`` for a bound,
    ``max_norm / ||w||`` for a normalization (a zero vector stays zero)."""
    norms = sq_norms.sqrt()
    if mode == "bound":
        return max_norm / norms.clamp_min(max_norm)
    return max_norm / norms.clamp_min(torch.finfo(torch.float32).tiny)


def apply_scales_(
    fragment: torch.Tensor, start: int, shape: Sequence[int], dim: int, scales: torch.Tensor, skip_whole_rows=False
) -> None:
    """Multiply each element of the flat fragment by its vector's scale, in place (with
    ``skip_whole_rows``, only the elements of its partial first and last rows)."""
    scales = scales.to(fragment.dtype)
    for piece, row, col in _pieces(fragment, start, shape[1]):
        if piece.dim() == 2:
            if not skip_whole_rows:
                piece.mul_(scales[row : row + piece.shape[0], None] if dim == 1 else scales[None, :])
        elif dim == 1:
            piece.mul_(scales[row])
        else:
            piece.mul_(scales[col : col + piece.numel()])


def bound_whole_rows_(fragment: torch.Tensor, start: int, shape: Sequence[int], constraint: NormConstraint) -> None:
    """Constrain the block of whole rows of a fragment in place: their norms are complete here,
    so no rank's sums are needed (the same arithmetic as the all-reduced path)."""
    for piece, _row, _col in _pieces(fragment, start, shape[1]):
        if piece.dim() == 2:
            sq = torch.linalg.vector_norm(piece, dim=1, dtype=torch.float32).square()
            piece.mul_(norm_scales(sq, constraint.mode, constraint.max_norm).to(piece.dtype)[:, None])


@dataclass
class Fragment:
    """A flat piece ``[start, start + numel)`` of a weight of (local) ``shape``."""

    tensor: torch.Tensor  # the values to constrain, in place (any shape; treated as flat)
    start: int
    shape: tuple
    constraint: NormConstraint


def constrain_fragments_(
    fragments: Sequence[Fragment], dp_group=None, tp_group=None, dp_partitioned: bool = False
) -> None:
    """Apply each fragment's constraint, with per-vector norms summed across ranks.

    Every rank passes the same list of weights in the same order (a rank that holds nothing of
    a weight passes an empty tensor), so the sums line up in one flat buffer: one all-reduce
    over ``dp_group`` when the weights are partitioned over data-parallel ranks (ZeRO), and one
    over ``tp_group`` for the weights whose vectors are split over tensor-parallel ranks.

    Only the vectors no rank holds whole need those sums: under ZeRO a partition boundary splits
    at most one row of a weight. So the buffer carries the partial rows (and columns, and rows
    split over TP), its all-reduce runs in the background, and meanwhile each rank bounds the
    rows it holds whole: nearly all of the work, and none of it waits for the other ranks.
    """
    if not fragments:
        return
    reduce_dp = dp_partitioned and dp_group is not None and dist.get_world_size(dp_group) > 1
    skip = [_held_whole(f.constraint) for f in fragments]
    partials = [
        partial_sq_norms(f.tensor, f.start, f.shape, f.constraint.dim, skip_whole_rows=k)
        for f, k in zip(fragments, skip)
    ]
    sizes = [p.numel() for p in partials]
    flat = torch.cat(partials)
    pending = dist.all_reduce(flat, group=dp_group, async_op=True) if reduce_dp else None
    for f, k in zip(fragments, skip):
        if k:
            bound_whole_rows_(f.tensor, f.start, f.shape, f.constraint)
    if pending is not None:
        pending.wait()
    split = [i for i, f in enumerate(fragments) if f.constraint.tp_split]
    sq = list(flat.split(sizes))
    if split and tp_group is not None and dist.get_world_size(tp_group) > 1:
        tp_flat = torch.cat([sq[i] for i in split])
        dist.all_reduce(tp_flat, group=tp_group)
        for i, part in zip(split, tp_flat.split([sizes[i] for i in split])):
            sq[i] = part
    for f, s, k in zip(fragments, sq, skip):
        c = f.constraint
        apply_scales_(f.tensor, f.start, f.shape, c.dim, norm_scales(s, c.mode, c.max_norm), skip_whole_rows=k)


def constrained_parameters(params: Iterable[torch.nn.Parameter]):
    """The parameters that carry a ``norm_constraint`` (set by the model's layer builders)."""
    return [p for p in params if getattr(p, "norm_constraint", None) is not None]


@torch.no_grad()
def constrain_parameters_(params: Iterable[torch.nn.Parameter], tp_group=None) -> None:
    """Apply every parameter's ``norm_constraint`` to its whole local tensor (no ZeRO): the
    dense and tensor-parallel case. Call after each optimizer step."""
    frags = [Fragment(p.data, 0, tuple(p.shape), p.norm_constraint) for p in constrained_parameters(params)]
    if tp_group is None and any(f.constraint.tp_split for f in frags):
        from an_megatron.parallel import tp_group as _tp_group

        tp_group = _tp_group()
    constrain_fragments_(frags, tp_group=tp_group)
