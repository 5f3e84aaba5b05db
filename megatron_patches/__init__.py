"""The few adaptations of megatron-core and DeepSpeed this project needs, each in its own module
with the reason it exists. ``an_megatron`` applies them on import; none changes numerics.

- ``quiet_optional_imports``: megatron-core warns at import time, four times, that Transformer
  Engine and Apex are missing, although we use neither unless FP8 is asked for.
- ``blended_dataset_rank``: megatron-core's ``BlendedDataset`` asks for the process rank even
  without a process group; single-process runs with ``--data-cache-path`` need an answer.
- ``sequence_parallel_on_cpu``: megatron-core allocates the buffers of its sequence-parallel
  collectives on the current CUDA device; on CPU tensors (gloo) they go on the input's device.
  Applied when ``an_megatron.parallel.sequence_parallel`` is imported (it imports megatron-core's
  tensor-parallel layers, which ``import an_megatron`` does not).
"""

from megatron_patches import quiet_optional_imports  # noqa: F401
