"""Pipeline parallelism: the model as a DeepSpeed ``PipelineModule``, run by DeepSpeed's engine.

The pipeline is the model's own pieces in order, ``[Embedding, Block 0 .. Block L-1, Head]``,
with ``lm_loss`` as the ``loss_fn`` on the last stage. Each piece is a ``LayerSpec``, so a stage
builds only its own layers; every matrix is seeded by its name (``layers.py``) and each block is
built with its global index, so the weights are those of ``GPTModel`` with the same config.

Stages are cut by counting ``Block`` layers (``partition_method='type:Block'``): the blocks are
spread as evenly as possible, the embedding goes with the first block and the head with the
last. The topology is ``deepspeed_topology()``, so DeepSpeed's grid and megatron-core's
tensor-parallel groups describe the same ranks.

The training loop::

    module = build_pipeline_module(config)
    engine, *_ = deepspeed.initialize(model=module, optimizer=..., config=ds_config)
    engine.set_batch_fn(pipeline_batch)  # GPTDataset dicts -> (tokens, (labels, loss_mask))
    loss = engine.train_batch(iter(micro_batches))  # pulls gradient_accumulation_steps batches

Only the first and the last stage read from the iterator (others may pass ``None``).
``train_batch`` returns the step's loss on every rank: the mean over micro-batches (each a
masked token mean) and over data-parallel replicas.

Names: ``PipelineModule`` registers layer ``i`` as ``"{i}"``, so its parameters are
``"{i}.<name inside the layer>"``; ``gpt_param_name`` / ``pipeline_param_name`` convert between
these and ``GPTModel``'s names, ``gpt_name_in_layer`` names what one layer holds (the files a
pipeline checkpoint stores per layer are read in ``training/checkpointing.py``).
"""

from __future__ import annotations

import re
from dataclasses import replace

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.pipe import LayerSpec, PipelineModule

from an_megatron.model.config import ModelConfig
from an_megatron.model.gpt import Block, Embedding, Head, lm_loss
from an_megatron.model.recompute import run_blocks
from an_megatron.parallel.groups import deepspeed_topology

# Checkpoint files live in training/checkpointing.py; re-exported for training/convert.py, which
# imports them from here.

PARTITION_METHOD = "type:Block"


class PipelineEmbedding(Embedding):
    """The first layer. Its input is the token ids, or ``(tokens, position_ids, document_ids)``
    with document masking; the ids travel with the hidden states to every block."""

    def forward(self, inputs):
        if torch.is_tensor(inputs):
            return super().forward(inputs)
        tokens, position_ids, document_ids = inputs
        return super().forward(tokens), position_ids, document_ids


class PipelineBlock(Block):
    def forward(self, inputs):
        if torch.is_tensor(inputs):
            return super().forward(inputs)
        h, position_ids, document_ids = inputs
        return super().forward(h, position_ids, document_ids), position_ids, document_ids


class PipelineHead(Head):
    def forward(self, inputs):
        return super().forward(inputs if torch.is_tensor(inputs) else inputs[0])


def layer_specs(config: ModelConfig) -> list[LayerSpec]:
    """The model as pipeline layers: index 0 the embedding, 1..L the blocks, L+1 the head."""
    spec = config.spec
    return (
        [LayerSpec(PipelineEmbedding, config)]
        + [LayerSpec(PipelineBlock, config, spec, i) for i in range(config.num_layers)]
        + [LayerSpec(PipelineHead, config, spec)]
    )


def pipeline_loss(logits: torch.Tensor, labels_and_mask: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The pipeline's ``loss_fn``: the engine hands it the head's output and the batch's second
    element, which ``pipeline_batch`` makes ``(labels, loss_mask)``."""
    labels, loss_mask = labels_and_mask
    return lm_loss(logits, labels, loss_mask)


def pipeline_batch(batch: dict):
    """A batch dict as the engine wants it: ``(inputs, (labels, loss_mask))``. The first stage
    reads the inputs: ``tokens``, or with ``position_ids`` / ``document_ids`` in the batch
    (document masking) ``(tokens, position_ids, document_ids)``, the missing one filled with
    its neutral value (positions ``0..s-1``; one document). The last stage reads the labels."""
    tokens = batch["tokens"]
    if "position_ids" in batch or "document_ids" in batch:
        position_ids = batch.get("position_ids")
        if position_ids is None:
            position_ids = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        document_ids = batch.get("document_ids")
        inputs = (tokens, position_ids, torch.zeros_like(tokens) if document_ids is None else document_ids)
    else:
        inputs = tokens
    return inputs, (batch["labels"], batch["loss_mask"])


class StageModule(PipelineModule):
    """DeepSpeed's ``PipelineModule`` whose forward runs this stage's blocks through
    ``recompute.run_blocks``, as ``GPTModel`` runs all of them: ``--recompute-*`` mean the same
    on every layout (chunks of consecutive blocks, or the first N blocks of the stage).

    DeepSpeed's own ``activation_checkpoint_interval`` stays 0: it counts every layer of the
    stage from its first, so with the embedding first (or the head last) its chunks would not
    line up with blocks, and chunks holding the embedding or the head would not be recomputed.
    DeepSpeed's forward at interval 0 calls each layer in turn (what this one does around the
    blocks); its per-layer seeding (``seed_layers``) is off here, as the model draws nothing."""

    def __init__(self, config: ModelConfig, **kwargs):
        super().__init__(**kwargs)
        self.recompute_config = config

    def forward(self, forward_input):
        x, layers, i = forward_input, self.forward_funcs, 0
        while i < len(layers):
            if isinstance(layers[i], Block):
                end = i
                while end < len(layers) and isinstance(layers[end], Block):
                    end += 1
                x = run_blocks(layers[i:end], x, self.recompute_config)
                i = end
            else:
                x = layers[i](x)
                i += 1
        return x


def build_pipeline_module(
    config: ModelConfig,
    partition_method: str = PARTITION_METHOD,
    activation_checkpoint_interval: int = 0,
) -> PipelineModule:
    """This rank's stage of the model, as a ``PipelineModule`` for ``deepspeed.initialize``.

    Needs ``initialize_parallel(tp, pp)`` first (the topology comes from megatron-core's groups).
    Pass no ``mpu`` to ``deepspeed.initialize``: it takes the module's grid.

    Recomputation follows ``config`` (``recompute.py``). ``activation_checkpoint_interval`` N > 0,
    DeepSpeed's name, is ``--recompute-granularity full --recompute-method uniform
    --recompute-num-layers N`` (chunks of N blocks); it cannot be combined with a config that
    already recomputes.
    """
    if partition_method == "parameters":
        # DeepSpeed counts parameters by building every layer on every rank, and the vocabulary
        # matrices would outweigh the blocks: stages would not hold equal numbers of blocks.
        raise ValueError("partition_method 'parameters' builds the whole model on every rank; use 'type:Block'")
    if activation_checkpoint_interval:
        if config.recompute_granularity is not None:
            raise ValueError(
                f"activation_checkpoint_interval {activation_checkpoint_interval} with recompute granularity "
                f"{config.recompute_granularity!r}: give one of them"
            )
        config = replace(
            config,
            recompute_granularity="full",
            recompute_method="uniform",
            recompute_num_layers=activation_checkpoint_interval,
        )
    # PipelineModule talks through deepspeed.comm, which must wrap our process group first
    # (deepspeed.initialize would do it, but only after the module is built).
    deepspeed.init_distributed(dist_backend=dist.get_backend())
    return StageModule(
        config,
        layers=layer_specs(config),
        topology=deepspeed_topology(),
        loss_fn=pipeline_loss,
        partition_method=partition_method,
    )


# ---- names: PipelineModule / DeepSpeed layer files <-> GPTModel ----

_PIPE_NAME = re.compile(r"(\d+)\.(.+)")
_GPT_BLOCK_NAME = re.compile(r"layers\.(\d+)\.(.+)")


def gpt_param_name(pipeline_name: str, num_layers: int) -> str:
    """``GPTModel``'s name for the pipeline's ``"{i}.<rest>"`` (e.g. ``"3.mlp.down.weight"`` ->
    ``"layers.2.mlp.down.weight"``)."""
    m = _PIPE_NAME.fullmatch(pipeline_name)
    if m is None:
        raise ValueError(f"not a pipeline parameter name (expected '<layer index>.<name>'): {pipeline_name!r}")
    return gpt_name_in_layer(int(m.group(1)), m.group(2), num_layers)


def gpt_name_in_layer(layer_index: int, name_in_layer: str, num_layers: int) -> str:
    """``GPTModel``'s name for ``name_in_layer`` of pipeline layer ``layer_index`` (the key of a
    DeepSpeed ``layer_XX-model_YY-model_states.pt`` file)."""
    if layer_index == 0:
        return f"embedding.{name_in_layer}"
    if 1 <= layer_index <= num_layers:
        return f"layers.{layer_index - 1}.{name_in_layer}"
    if layer_index == num_layers + 1:
        return f"head.{name_in_layer}"
    raise ValueError(f"pipeline layer index {layer_index} out of range for {num_layers} blocks")


def pipeline_param_name(gpt_name: str, num_layers: int) -> str:
    """The pipeline's ``"{i}.<rest>"`` name for a ``GPTModel`` name (inverse of ``gpt_param_name``)."""
    first, _, rest = gpt_name.partition(".")
    if first == "embedding" and rest:
        return f"0.{rest}"
    if first == "head" and rest:
        return f"{num_layers + 1}.{rest}"
    m = _GPT_BLOCK_NAME.fullmatch(gpt_name)
    if m is not None and int(m.group(1)) < num_layers:
        return f"{int(m.group(1)) + 1}.{m.group(2)}"
    raise ValueError(f"not a GPTModel parameter name for {num_layers} blocks: {gpt_name!r}")
