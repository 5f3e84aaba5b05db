"""Let megatron-core's sequence-parallel collectives run on CPU tensors (gloo).

Why: megatron-core 0.16.1 allocates the output of its first-dimension all-gather and
reduce-scatter (``tensor_parallel/mappings.py``: ``_gather_along_first_dim``,
``_reduce_scatter_along_first_dim``, and ``_gather_along_last_dim``, which gathers along the
first dimension too) with ``device=torch.cuda.current_device()``, and the sequence-parallel path
of its linear (``LinearWithGradAccumulationAndAsyncCommunication``) takes its all-gather buffer
from ``GlobalMemoryBuffer`` (also on the current CUDA device) and its reduce-scatter output the
same way. On a CPU-only machine, where the project's tests run on gloo, all of them fail.

What changes, and only for tensors on the CPU (CUDA tensors take megatron-core's own code):

- the three functions above allocate their output on the input's device and run the same
  collective (all-gather / reduce-scatter into one tensor, or the list forms for uneven
  splits); gloo has all of them;
- a sequence-parallel linear on CPU tensors runs as megatron-core's own two pieces instead of
  the fused autograd function: ``gather_from_sequence_parallel_region`` (all-gather forward,
  reduce-scatter of grad_x backward) followed by the same linear without sequence parallelism
  and without a grad_x all-reduce. This is what megatron-core's ``linear_with_frozen_weight``
  does for sequence parallelism, and computes the same values: the same all-gathered input, the
  same matmuls, the same reduce-scatter of the same grad_x.

The replacements are module attributes of ``megatron.core.tensor_parallel.mappings`` and
``.layers``, which megatron-core's autograd functions and layers look up at call time; nothing
in torch is patched.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import layers, mappings

# torch 2.13 names the single-tensor collectives *_single and deprecates the *_tensor names
_all_gather_single = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)


def _on_cpu(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "cpu"


def _cpu_or_original(cpu_version):
    """``cpu_version`` for a CPU input on a group of more than one rank, else megatron-core's own."""
    original = getattr(mappings, cpu_version.__name__)

    @functools.wraps(original)
    def dispatch(input_, group, *args, **kwargs):
        if _on_cpu(input_) and group is not None and group.size() > 1:
            return cpu_version(input_, group, *args, **kwargs)
        return original(input_, group, *args, **kwargs)

    dispatch.megatron_core_original = original
    return dispatch


def _gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
    world = group.size()
    if output_split_sizes is None:
        output = input_.new_empty((input_.shape[0] * world, *input_.shape[1:]))
        _all_gather_single(output, input_.contiguous(), group=group)
        return output
    output = input_.new_empty((sum(output_split_sizes), *input_.shape[1:]))
    dist.all_gather(list(torch.split(output, output_split_sizes, dim=0)), input_.contiguous(), group=group)
    return output


def _reduce_scatter_along_first_dim(input_, group, input_split_sizes=None, use_global_buffer=False):
    world = group.size()
    if input_split_sizes is None:
        if input_.shape[0] % world:
            raise ValueError(f"first dimension {input_.shape[0]} is not divisible by the group size {world}")
        output = input_.new_empty((input_.shape[0] // world, *input_.shape[1:]))
        _reduce_scatter_single(output, input_.contiguous(), group=group)
        return output
    parts = [p.contiguous() for p in torch.split(input_, input_split_sizes, dim=0)]
    output = torch.empty_like(parts[group.rank()])
    dist.reduce_scatter(output, parts, group=group)
    return output


def _gather_along_last_dim(input_, group):
    gathered = _gather_along_first_dim(input_, group)
    return torch.cat(gathered.chunk(group.size(), dim=0), dim=-1).contiguous()


def _sequence_parallel_linear_on_cpu(original):
    @functools.wraps(original)
    def linear(input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad, sequence_parallel, *args, **kwargs):
        if sequence_parallel and _on_cpu(input):
            tp_group = kwargs.get("tp_group")
            input = mappings.gather_from_sequence_parallel_region(
                input, tensor_parallel_output_grad=True, group=tp_group
            )
            sequence_parallel = False
        return original(
            input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad, sequence_parallel, *args, **kwargs
        )

    linear.megatron_core_original = original
    return linear


def apply() -> None:
    """Install the CPU paths (idempotent)."""
    for cpu_version in (_gather_along_first_dim, _reduce_scatter_along_first_dim, _gather_along_last_dim):
        if not hasattr(getattr(mappings, cpu_version.__name__), "megatron_core_original"):
            setattr(mappings, cpu_version.__name__, _cpu_or_original(cpu_version))
    name = "linear_with_grad_accumulation_and_async_allreduce"
    if not hasattr(getattr(layers, name), "megatron_core_original"):
        setattr(layers, name, _sequence_parallel_linear_on_cpu(getattr(layers, name)))


apply()
