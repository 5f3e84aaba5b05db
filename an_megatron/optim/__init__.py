"""Optimizer-side pieces: the weight norm bound / normalization, and LR schedules."""
from an_megatron.optim.norm_bound import (  # noqa: F401
    Fragment,
    NormConstraint,
    bound_row_norms_,
    constrain_fragments_,
    constrain_parameters_,
    constrained_parameters,
    normalize_norms_,
)
from an_megatron.optim.deepspeed_bound import NormBound, register_norm_bound  # noqa: F401
