"""Which classes build the model's column- and row-parallel linears (a megatron-core style spec).

``layers.py`` asks ``linear_impl(config, name)`` for a ``LinearImpl`` and calls its ``column`` or
``row`` with megatron-core's constructor arguments; the model never sees the choice. One entry
per (``--transformer-impl``, FP8 backend) pair:

- local, no FP8: megatron-core's ``ColumnParallelLinear`` / ``RowParallelLinear``;
- local, ``--fp8-backend torch``: the same layers with only the local matmul swapped for
  ``fp8.FP8Matmul`` (``compat.megatron_core.LocalLinearOverride``: the hook both layers call
  between their communication);
- transformer_engine (bf16, or ``--fp8-backend te``): megatron-core's TE wrappers, which take
  the same ``init_method``/``stride`` and set the same tensor-parallel attributes.

The logits layer (``output``) stays local in every case, as in Megatron: FP8 error there lands
directly on the softmax over the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import partial
from typing import Callable

from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
from torch import nn

from an_megatron.compat.megatron_core import LocalLinearOverride
from an_megatron.model.config import ModelConfig
from an_megatron.model.fp8 import FP8Scaling, fp8_linear, import_transformer_engine

HIGH_PRECISION_LINEARS = frozenset({"output"})


@dataclass(frozen=True)
class LinearImpl:
    name: str
    column: Callable[..., nn.Module]  # ColumnParallelLinear's arguments
    row: Callable[..., nn.Module]  # RowParallelLinear's arguments
    # The column layer's forward takes ``weight=`` (megatron-core's own): a per-output-channel
    # scale can then be multiplied into the weight's rows (``layers.row_scaled``). FP8 keeps
    # scaling the output: a row-scaled weight would change what its per-tensor scaling quantizes.
    scales_weight_rows: bool = False


class _FP8MatmulMixin(LocalLinearOverride):
    """Replaces megatron-core's local matmul (the fused matmul + backward all-reduce) with
    ``fp8_linear``. A column-parallel layer under TP skips ``copy_to_tensor_model_parallel_region``
    and asks the local matmul to all-reduce grad_x instead (``allreduce_dgrad``): we apply that
    same region here, so the communication is megatron-core's own."""

    def __init__(self, *args, fp8_scaling: FP8Scaling, **kwargs):
        super().__init__(*args, **kwargs)
        self.fp8_scaling = fp8_scaling

    def local_linear(
        self, input, weight, bias, *, gradient_accumulation_fusion, allreduce_dgrad, sequence_parallel, tp_group
    ):
        if sequence_parallel or gradient_accumulation_fusion:
            raise ValueError(
                "--fp8-backend torch supports neither sequence parallelism nor gradient accumulation fusion"
            )
        if allreduce_dgrad:
            input = copy_to_tensor_model_parallel_region(input, group=tp_group)
        out = fp8_linear(input, weight, self.fp8_scaling)
        return out if bias is None else out + bias


class TorchFP8ColumnParallelLinear(_FP8MatmulMixin, ColumnParallelLinear):
    pass


class TorchFP8RowParallelLinear(_FP8MatmulMixin, RowParallelLinear):
    pass


LOCAL = LinearImpl("local", ColumnParallelLinear, RowParallelLinear, scales_weight_rows=True)


def _torch_fp8(config: ModelConfig) -> LinearImpl:
    scaling = FP8Scaling.from_format(config.fp8, config.fp8_margin)
    return LinearImpl(
        "torch_fp8",
        partial(TorchFP8ColumnParallelLinear, fp8_scaling=scaling),
        partial(TorchFP8RowParallelLinear, fp8_scaling=scaling),
    )


def _transformer_engine(config: ModelConfig) -> LinearImpl:
    import_transformer_engine()  # the one-line install hint, before megatron-core's own import error
    from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TERowParallelLinear
    from megatron.core.transformer.transformer_config import TransformerConfig

    def te_config(parallel: ModelParallelConfig) -> TransformerConfig:
        # TE's wrappers read TransformerConfig fields; the layer shapes come from the caller.
        return TransformerConfig(
            num_layers=config.num_layers,
            hidden_size=config.hidden_size,
            num_attention_heads=config.num_attention_heads,
            **{f.name: getattr(parallel, f.name) for f in fields(parallel) if f.init},
        )

    def column(n_in, n_out, *, config, **kwargs):
        return TEColumnParallelLinear(
            n_in, n_out, config=te_config(config), skip_bias_add=False, is_expert=False, **kwargs
        )

    def row(n_in, n_out, *, config, **kwargs):
        return TERowParallelLinear(n_in, n_out, config=te_config(config), is_expert=False, **kwargs)

    return LinearImpl("transformer_engine", column, row)


# (--transformer-impl, FP8 backend or None without FP8) -> builder; check_fp8 admits these only.
LINEAR_IMPLS: dict[tuple[str, str | None], Callable[[ModelConfig], LinearImpl]] = {
    ("local", None): lambda config: LOCAL,
    ("local", "torch"): _torch_fp8,
    ("transformer_engine", None): _transformer_engine,
    ("transformer_engine", "te"): _transformer_engine,
}


def linear_impl(config: ModelConfig, name: str) -> LinearImpl:
    """The implementation of the linear ``name`` (e.g. ``layers.0.mlp.down``)."""
    if name in HIGH_PRECISION_LINEARS:
        return LOCAL
    return LINEAR_IMPLS[(config.transformer_impl, config.fp8_backend if config.fp8 else None)](config)
