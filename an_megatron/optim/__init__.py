"""Optimizer-side pieces: the weight norm bound / normalization, and LR schedules."""

from an_megatron.optim.deepspeed_bound import NormBound, register_norm_bound  # noqa: F401
from an_megatron.optim.norm_bound import (  # noqa: F401
    Fragment,
    NormConstraint,
    constrain_fragments_,
    constrain_parameters_,
    constrained_parameters,
)
