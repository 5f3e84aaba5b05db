"""anGPT's row bound and nGPT's normalization: dense, tensor-parallel, and on flat fragments."""

import pytest
import torch
from distributed import current_device, device_type_for, run_distributed

from an_megatron.optim.norm_bound import Fragment, NormConstraint, constrain_fragments_, partial_sq_norms


@torch.no_grad()
def bound_row_norms_(weight: torch.Tensor, max_norm: float = 1.0, tp_group=None) -> torch.Tensor:
    """anGPT's bound on one weight: ``w_i <- w_i / max(1, ||w_i||)`` for each row. With
    ``tp_group``, rows are split over that group and whole-row norms are used."""
    c = NormConstraint("bound", dim=1, tp_split=tp_group is not None, max_norm=max_norm)
    constrain_fragments_([Fragment(weight, 0, tuple(weight.shape), c)], tp_group=tp_group)
    return weight


@torch.no_grad()
def normalize_norms_(weight: torch.Tensor, dim: int = 1, tp_group=None) -> torch.Tensor:
    """nGPT's exact normalization of each row (``dim=1``) or column (``dim=0``) to unit norm."""
    c = NormConstraint("normalize", dim=dim, tp_split=tp_group is not None)
    constrain_fragments_([Fragment(weight, 0, tuple(weight.shape), c)], tp_group=tp_group)
    return weight


def test_bound_scales_long_rows_and_leaves_short_rows(device):
    torch.manual_seed(0)
    w = torch.randn(6, 10).to(device)
    w[0] *= 3.0 / w[0].norm()  # above 1
    w[1] *= 0.4 / w[1].norm()  # below 1
    w[2] *= 1.0 / w[2].norm()  # exactly 1
    before = w.clone()
    bound_row_norms_(w)
    norms = w.norm(dim=1)
    assert norms.max() <= 1 + 1e-6
    torch.testing.assert_close(w[0], before[0] / 3.0)
    assert torch.equal(w[1], before[1])
    long_rows = before.norm(dim=1) > 1
    torch.testing.assert_close(norms[long_rows], torch.ones(int(long_rows.sum()), device=device))
    torch.testing.assert_close(w[~long_rows], before[~long_rows])


def test_normalize_rows_and_columns(device):
    torch.manual_seed(0)
    w = torch.randn(5, 7).to(device) * 0.3
    torch.testing.assert_close(normalize_norms_(w.clone(), dim=1).norm(dim=1), torch.ones(5, device=device))
    torch.testing.assert_close(normalize_norms_(w.clone(), dim=0).norm(dim=0), torch.ones(7, device=device))


@pytest.mark.parametrize("dim", [0, 1])
def test_fragments_cover_the_matrix_like_the_whole(dim, device):
    """Split a matrix into flat fragments that start and end mid-row; summing their partial
    norms (what the DP all-reduce does) and scaling each gives the dense result."""
    torch.manual_seed(0)
    w = torch.randn(7, 9).to(device)
    c = NormConstraint("bound", dim=dim)
    dense = w.clone()
    constrain_fragments_([Fragment(dense, 0, tuple(w.shape), c)])
    flat = w.clone().view(-1)
    cuts = [0, 5, 22, 23, 40, 63]  # fragment boundaries inside rows and columns
    frags = [(a, flat[a:b]) for a, b in zip(cuts, cuts[1:])]
    total = sum(partial_sq_norms(t, a, w.shape, dim) for a, t in frags)
    torch.testing.assert_close(total, w.pow(2).sum(dim))
    for a, t in frags:
        # one fragment per "rank"; the all-reduce is replaced by the known total
        from an_megatron.optim.norm_bound import apply_scales_, norm_scales

        apply_scales_(t, a, w.shape, dim, norm_scales(total, "bound"))
    torch.testing.assert_close(flat.view(7, 9), dense)


def _tp_row_parallel_bound():
    from an_megatron.parallel import initialize_parallel, tp_group, tp_rank

    initialize_parallel(2, 1)
    # Two rows, each split in two halves (row-parallel): halves of norm 0.8 (whole 1.131)
    # and halves of norm 0.6 (whole 0.849: under the bound).
    half = torch.zeros(2, 4, device=current_device())
    half[0, tp_rank()] = 0.8
    half[1, 2 + tp_rank()] = 0.6
    bound_row_norms_(half, tp_group=tp_group())
    return half


@pytest.mark.timeout(120)
def test_row_parallel_rows_use_the_whole_norm():
    ranks = run_distributed(_tp_row_parallel_bound, 2)
    whole = torch.cat(ranks, dim=1)  # the full (2, 8) matrix
    assert whole[0].norm().item() == pytest.approx(1.0, abs=1e-6)  # scaled by 1/1.131, not by the halves
    assert ranks[0][0, 0].item() == pytest.approx(0.8 / (0.8 * 2**0.5), abs=1e-6)
    assert whole[1].norm().item() == pytest.approx(0.6 * 2**0.5, abs=1e-6)  # untouched


def _weight_with_rows_on_both_sides_of_one():
    torch.manual_seed(0)
    w = torch.randn(5, 6) * 0.45  # row norms about 1.1: some above the bound, some below
    assert (w.norm(dim=1) > 1).any() and (w.norm(dim=1) < 1).any()
    return w


def _dp_partitioned_fragments(mode, dim):
    """Each of 2 ranks holds half of the flat weight (ZeRO-style, the cut mid-row)."""
    from an_megatron.parallel import dp_group, dp_rank, initialize_parallel

    initialize_parallel(1, 1)
    w = _weight_with_rows_on_both_sides_of_one().to(current_device())
    cut = 13  # rank 0: rows 0-1 whole and 1 element of row 2; rank 1: the rest of row 2, rows 3-4
    start, piece = (0, w.view(-1)[:cut].clone()) if dp_rank() == 0 else (cut, w.view(-1)[cut:].clone())
    constrain_fragments_(
        [Fragment(piece, start, (5, 6), NormConstraint(mode, dim=dim))], dp_group=dp_group(), dp_partitioned=True
    )
    return start, piece


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode, dim", [("normalize", 0), ("normalize", 1), ("bound", 1)])
def test_dp_partitioned_fragments_match_dense(mode, dim):
    (s0, p0), (s1, p1) = run_distributed(_dp_partitioned_fragments, 2, mode, dim)
    got = torch.cat([p0, p1]).view(5, 6)
    w = _weight_with_rows_on_both_sides_of_one()
    norms = w.norm(dim=dim, keepdim=True)
    expected = w / (norms.clamp_min(1.0) if mode == "bound" else norms)
    torch.testing.assert_close(got, expected)
    if dim == 1 and device_type_for(2) == "cpu":  # rows held whole by one rank: the same arithmetic as here
        dense = w.clone()
        constrain_fragments_([Fragment(dense, 0, (5, 6), NormConstraint(mode, dim=dim))])
        whole = [0, 1, 3, 4]
        assert torch.equal(got[whole], dense[whole])
