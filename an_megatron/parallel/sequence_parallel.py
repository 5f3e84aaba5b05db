"""Sequence parallelism: the activations outside the tensor-parallel matmuls split along the sequence.

With tensor parallelism alone every rank of a TP group holds the whole ``(b, s, d)`` residual
stream, and computes the pre-norms, the residual update and the final norm on all of it.
``apply_sequence_parallel(model)`` turns a built ``GPTModel`` (or a pipeline stage of it) into
Megatron's sequence-parallel form, on megatron-core's own regions:

- the embedding reduce-scatters its output along the sequence instead of all-reducing it
  (``VocabParallelEmbedding.reduce_scatter_embeddings``): each rank holds ``s / tp`` positions;
- every column-parallel linear (``W_qkv``, ``W_u; W_z``, ``W_out``) all-gathers its input along
  the sequence before the matmul and reduce-scatters grad_x in backward; every row-parallel
  linear (``W_o``, ``W_down``) reduce-scatters its output along the sequence instead of
  all-reducing it (megatron-core's ``sequence_parallel`` mode of both layers). So attention runs
  on the whole sequence with this rank's heads: RoPE, the causal and document masks and anGPT's
  ``nu_att`` (per query position) see global positions, and the head's vocab-parallel logits and
  loss cover the whole sequence;
- between them, the pre-norms, the residual (anGPT's ``nu_lerp`` LERP, nGPT's normalized LERP,
  GPT+'s sum) and the final norm run on the shard: they act on each position alone.

Layout: megatron-core gathers and scatters the first dimension, so the sequence-parallel region
is sequence-first, ``(s / tp, b, d)``, as in Megatron; the model is batch-first. The adaptation
is at the edges of the parallel linears, with forward hooks that only transpose (a view):
a column-parallel linear's ``(s, b, n)`` output is handed on as ``(b, s, n)``, a row-parallel
linear's ``(b, s, n)`` input enters as ``(s, b, n)``. The norms and residuals act on the last
dimension, so they do not care which of the first two is the sequence. Nothing is renamed or
rewrapped: parameter names, checkpoints, conversion and export are those of the plain model.

Gradients: a replicated parameter used on the shard (the RMSNorm gains, the ``alpha`` vectors)
receives only its positions' share of the gradient. Megatron marks these ``sequence_parallel``
and all-reduces them over the TP group in ``finalize_model_grads``; here a hook on each of them
all-reduces its gradient as autograd produces it, once per backward pass, before DeepSpeed
accumulates it (so every micro-batch's contribution is reduced exactly once, at any ZeRO stage).

Pipeline parallelism: the activations a stage sends are the sequence shards, different on each
rank of the TP group, so DeepSpeed's ``pipe_partitioned`` / ``grad_partitioned`` (which split a
tensor assumed equal on every TP rank, and gather it on the next stage) must be off: the shards
are already ``1 / tp`` of the activation (``pipeline_ds_config``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

import megatron_patches.sequence_parallel_on_cpu  # noqa: F401  (the collectives on CPU tensors)
from an_megatron.compat.megatron_core import enable_embedding_reduce_scatter, enable_sequence_parallel
from an_megatron.model.gpt import MLP, Attention, Block, Embedding, Head
from an_megatron.parallel.groups import tp_group, tp_size
from an_megatron.parallel.tensor_parallel import is_tp_sharded


def _batch_first_output(module, args, output):
    out, bias = output
    return out.transpose(0, 1), bias


def _sequence_first_input(module, args):
    return (args[0].transpose(0, 1), *args[1:])


def _gather_input_sequence(layer: nn.Module) -> None:
    """A column-parallel linear: all-gather the ``(s / tp, b, d)`` input along the sequence
    (its backward reduce-scatters grad_x, which replaces the all-reduce), output ``(b, s, n)``."""
    enable_sequence_parallel(layer)
    layer.register_forward_hook(_batch_first_output)


def _scatter_output_sequence(layer: nn.Module) -> None:
    """A row-parallel linear: ``(b, s, n / tp)`` input, reduce-scatter the output along the
    sequence to ``(s / tp, b, d)``."""
    enable_sequence_parallel(layer)
    layer.register_forward_pre_hook(_sequence_first_input)


def _all_reduce_over_tp(grad: torch.Tensor) -> torch.Tensor:
    grad = grad.clone()
    dist.all_reduce(grad, group=tp_group())
    return grad


def sequence_parallel_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters used on the sequence shard: those of the pre-norms, the residuals and the
    final norm, by name. Raises if the model holds a replicated parameter elsewhere (it would
    be unclear whether its gradient is whole or a shard's)."""
    shard_modules = []
    for module in model.modules():
        if isinstance(module, Block):
            shard_modules += [module.attention_norm, module.attention_residual, module.mlp_norm, module.mlp_residual]
        elif isinstance(module, Head):
            shard_modules.append(module.final_norm)
    on_shard = {id(p) for m in shard_modules for p in m.parameters()}
    found, elsewhere = [], []
    for name, p in model.named_parameters():
        if id(p) in on_shard:
            found.append((name, p))
        elif not is_tp_sharded(p):
            elsewhere.append(name)
    if elsewhere:
        raise ValueError(
            f"sequence parallelism: replicated parameters outside the sequence-parallel region: {elsewhere}"
        )
    return found


def apply_sequence_parallel(model: nn.Module) -> nn.Module:
    """Make ``model`` (a ``GPTModel``, or a pipeline stage holding some of its pieces) run
    sequence parallel over megatron-core's tensor-parallel group; returns it. Call after it is
    built and before ``deepspeed.initialize``, with a TP size above 1 and a sequence length
    divisible by it. Idempotent."""
    if tp_size() < 2:
        raise ValueError("sequence parallelism needs a tensor-parallel size above 1")
    if getattr(model, "sequence_parallel", False):
        return model
    for module in model.modules():
        if isinstance(module, Embedding):
            enable_embedding_reduce_scatter(module.word_embeddings)
        elif isinstance(module, Attention):
            _gather_input_sequence(module.qkv)
            _scatter_output_sequence(module.proj)
        elif isinstance(module, MLP):
            _gather_input_sequence(module.up_gate)
            _scatter_output_sequence(module.down)
        elif isinstance(module, Head):
            _gather_input_sequence(module.output)
    for _, p in sequence_parallel_parameters(model):
        p.sequence_parallel = True  # megatron-core's mark for these parameters
        p.register_hook(_all_reduce_over_tp)
    model.sequence_parallel = True
    return model


def pipeline_ds_config(ds_config: dict) -> dict:
    """The DeepSpeed config for a pipeline of sequence-parallel stages: the activations sent
    between stages are each rank's own shard, so DeepSpeed must not partition them over the
    TP group. Raises if the config turns that partitioning on explicitly."""
    pipeline = dict(ds_config.get("pipeline", {}))
    for key in ("pipe_partitioned", "grad_partitioned"):
        if pipeline.get(key, False):
            raise ValueError(
                f"ds.json pipeline.{key} true with --sequence-parallel: the activations between stages are already "
                f"split over the tensor-parallel ranks (set it to false or remove it)"
            )
        pipeline[key] = False
    return {**ds_config, "pipeline": pipeline}
