"""megatron-core's internals, behind names that say what they do (read from megatron-core 0.16.1).

Users: the indexed-dataset tools (``data/indexed.py``: the .idx reader and writer), the
torch FP8 linears (``model/linear_impl.py``: the local matmul hook of the parallel linears) and
sequence parallelism (``parallel/sequence_parallel.py``: the mode of built parallel layers).
megatron-core itself is imported only inside the functions that need it (~5 s), except by
``LocalLinearOverride``, whose users subclass megatron-core's linears anyway.
"""

from __future__ import annotations

from an_megatron.compat import require_version

SUPPORTED = "==0.16.1"  # the release every accessor below was read from
require_version("megatron-core", SUPPORTED)


# ---- the .idx file of an indexed dataset ----------------------------------------------------


def index_reader(idx_path: str):
    """megatron-core's reader of a .idx file: ``dtype`` and the memory-mapped ``sequence_lengths``,
    ``sequence_pointers`` and ``document_indices``. The arrays are views of a map that closes
    when the reader is collected: copy what outlives it. 0.16.1: ``_IndexReader``."""
    from megatron.core.datasets import indexed_dataset

    return indexed_dataset._IndexReader(idx_path, multimodal=False)


def write_index(idx_path: str, dtype, sequence_lengths, document_indices, sequence_pointers) -> None:
    """Write a .idx file with megatron-core's writer, given each sequence's byte offset in the
    .bin (``sequence_pointers``; megatron-core computes them in a Python loop over sequences).
    0.16.1: ``_IndexWriter``, whose ``write`` asks ``_sequence_pointers`` for the offsets."""
    from megatron.core.datasets import indexed_dataset

    class GivenPointersWriter(indexed_dataset._IndexWriter):
        def _sequence_pointers(self, _sequence_lengths):
            return sequence_pointers

    with GivenPointersWriter(idx_path, dtype) as writer:
        writer.write(sequence_lengths, None, document_indices)


# ---- the local matmul of the tensor-parallel linears ----------------------------------------


class LocalLinearOverride:
    """Mixin for megatron-core's ``ColumnParallelLinear`` / ``RowParallelLinear`` replacing only
    their local matmul (with its backward all-reduce of grad_x) by the subclass's
    ``local_linear(input, weight, bias, *, gradient_accumulation_fusion, allreduce_dgrad,
    sequence_parallel, tp_group)``; the communication around it stays megatron-core's.

    0.16.1: both layers' ``forward`` call ``self._forward_impl(input=, weight=, bias=,
    gradient_accumulation_fusion=, allreduce_dgrad=, sequence_parallel=, tp_group=,
    grad_output_buffer=[, wgrad_deferral_limit=])``; the last two serve deferred embedding
    wgrad computation, which the subclasses do not support.
    """

    def _forward_impl(
        self,
        input,
        weight,
        bias,
        gradient_accumulation_fusion,
        allreduce_dgrad,
        sequence_parallel,
        tp_group=None,
        **unused,
    ):
        return self.local_linear(
            input,
            weight,
            bias,
            gradient_accumulation_fusion=gradient_accumulation_fusion,
            allreduce_dgrad=allreduce_dgrad,
            sequence_parallel=sequence_parallel,
            tp_group=tp_group,
        )


# ---- sequence parallelism on built layers ---------------------------------------------------


def enable_sequence_parallel(layer, reduce_grad_input: bool = False) -> None:
    """Switch a built ``ColumnParallelLinear`` or ``RowParallelLinear`` to sequence-parallel mode,
    as if its ``ModelParallelConfig`` had had ``sequence_parallel=True`` at construction.

    0.16.1: ``__init__`` copies ``config.sequence_parallel`` into ``self.sequence_parallel`` and
    (column) derives ``self.allreduce_dgrad = tp > 1 and not sequence_parallel``; ``forward``
    reads only these two attributes (the column layer then all-gathers its input along the first
    dimension and reduce-scatters grad_x, the row layer reduce-scatters its output).
    ``reduce_grad_input``: the column layer's grad_x all-reduce (off under sequence parallelism).
    """
    layer.sequence_parallel = True
    layer.config.sequence_parallel = True
    if hasattr(layer, "allreduce_dgrad"):
        layer.allreduce_dgrad = reduce_grad_input


def enable_embedding_reduce_scatter(embedding) -> None:
    """A built ``VocabParallelEmbedding`` reduce-scatters its output along the sequence instead of
    all-reducing it, handing on ``(s / tp, b, d)``. 0.16.1: the constructor argument
    ``reduce_scatter_embeddings`` is stored as the attribute ``forward`` reads."""
    embedding.reduce_scatter_embeddings = True
