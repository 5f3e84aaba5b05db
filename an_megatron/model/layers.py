"""Tensor-parallel linear layers (megatron-core) with our initialization and norm constraints.

The model asks for "a column-parallel matrix named X" and gets a megatron-core layer whose
weight is initialized the same way for every tensor-parallel size: the full matrix is drawn
from a generator seeded by (seed, name), normalized, and megatron-core's CPU initializer takes
this rank's shard (for fused matrices with ``stride``, each logical part's shard). Each weight
also carries the ``norm_constraint`` the optimizer applies after every step.

Which classes implement the column- and row-parallel linears (megatron-core's, their FP8 form,
or Transformer Engine's) is chosen here from the config by ``linear_impl``; every choice takes
the same initializer and gets the same ``norm_constraint``.
"""

from __future__ import annotations

import zlib

import torch
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

from an_megatron.model.config import ModelConfig
from an_megatron.model.linear_impl import linear_impl
from an_megatron.optim.norm_bound import NormConstraint


def parallel_config(config: ModelConfig) -> ModelParallelConfig:
    # CPU initialization builds the full matrix on every rank and keeps the shard: what makes
    # TP=1 and TP=2 start from the same weights (and the only path that runs without CUDA).
    return ModelParallelConfig(
        tensor_model_parallel_size=config.tensor_model_parallel_size,
        use_cpu_initialization=True,
        perform_initialization=True,
        params_dtype=torch.float32,
    )


def _init_method(config: ModelConfig, name: str, norm_dim: int):
    """Initializer for the full matrix ``name``: the architecture's ``init`` (unit-norm vectors
    along ``norm_dim`` for anGPT and nGPT, N(0, init_std^2) for GPT+) of a draw seeded by name."""

    def init(master: torch.Tensor) -> None:
        gen = torch.Generator().manual_seed(config.seed * 1_000_003 + zlib.crc32(name.encode()))
        w = config.spec.init(torch.randn(master.shape, generator=gen, dtype=torch.float32), norm_dim, config)
        with torch.no_grad():
            master.copy_(w)

    return init


def _constraint(config: ModelConfig, embedding_axis: int, row_parallel: bool) -> NormConstraint | None:
    """anGPT bounds rows (``dim=1``, along the input); nGPT normalizes along the embedding
    dimension, which is the output (``dim=0``) for W_o and W_down. A row-parallel layer splits
    rows, never columns, over the tensor-parallel group."""
    if config.weight_norm == "none":
        return None
    dim = 1 if config.weight_norm == "bound" else embedding_axis
    return NormConstraint(config.weight_norm, dim=dim, tp_split=row_parallel and dim == 1)


def _norm_dim(config: ModelConfig, embedding_axis: int) -> int:
    c = _constraint(config, embedding_axis, row_parallel=False)
    return c.dim if c is not None else 1


def column_parallel(config: ModelConfig, name: str, n_in: int, n_out: int, stride: int = 1) -> ColumnParallelLinear:
    """``n_in -> n_out`` with the output split over TP ranks (rows whole on each rank).
    ``stride`` > 1 fuses that many equal logical matrices stacked along the output."""
    impl = linear_impl(config, name)
    layer = impl.column(
        n_in,
        n_out,
        config=parallel_config(config),
        init_method=_init_method(config, name, _norm_dim(config, 1)),
        bias=False,
        gather_output=False,
        stride=stride,
    )
    layer.weight.norm_constraint = _constraint(config, embedding_axis=1, row_parallel=False)
    layer.scales_weight_rows = impl.scales_weight_rows
    return layer


def row_scaled(layer: ColumnParallelLinear, x: torch.Tensor, row_scale: torch.Tensor | None) -> torch.Tensor:
    """``row_scale * (W x)``: a column-parallel layer's local output with a scale per output
    channel (this rank's rows; ``None``: no scale), the same in exact arithmetic either way.

    Where the layer takes ``weight=`` it computes ``(W * row_scale[:, None]) x``: one pass over
    ``W`` (``rows x in``) instead of one over the output (``tokens x rows``) forward and two
    backward; at 16k tokens per micro-batch the logits hold 16x more entries than ``W_out``.
    The price in memory: the scaled copy of ``W`` is held for backward (one weight-sized tensor
    per linear), while the activation form holds the unscaled output instead.
    Otherwise (FP8 and Transformer Engine linears) the output is scaled."""
    if row_scale is None:
        return layer(x)[0]
    if layer.scales_weight_rows:
        return layer(x, weight=layer.weight * row_scale[:, None])[0]
    return layer(x)[0] * row_scale


def row_parallel(config: ModelConfig, name: str, n_in: int, n_out: int) -> RowParallelLinear:
    """``n_in -> n_out`` with the input split over TP ranks; the output is all-reduced.
    Used for W_o and W_down, whose embedding dimension is the output."""
    layer = linear_impl(config, name).row(
        n_in,
        n_out,
        config=parallel_config(config),
        init_method=_init_method(config, name, _norm_dim(config, 0)),
        bias=False,
        input_is_parallel=True,
        skip_bias_add=False,
    )
    layer.weight.norm_constraint = _constraint(config, embedding_axis=0, row_parallel=True)
    return layer


def vocab_embedding(config: ModelConfig, name: str) -> VocabParallelEmbedding:
    """The ``(V, d)`` table split over TP ranks by vocabulary; one row per token."""
    layer = VocabParallelEmbedding(
        config.vocab_size,
        config.hidden_size,
        init_method=_init_method(config, name, _norm_dim(config, 1)),
        config=parallel_config(config),
    )
    layer.weight.norm_constraint = _constraint(config, embedding_axis=1, row_parallel=False)
    return layer
