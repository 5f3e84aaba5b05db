"""Process groups and the parallel wrappers that turn the model into a distributed one."""

from an_megatron.parallel.groups import (  # noqa: F401
    DeepSpeedMPU,
    deepspeed_topology,
    destroy_parallel,
    dp_group,
    dp_rank,
    dp_size,
    initialize_parallel,
    pp_rank,
    pp_size,
    tp_group,
    tp_rank,
    tp_size,
)
