"""DeepSpeed's internals, behind accessors named for what they return (read from DeepSpeed 0.19.8).

Users: the norm bound (``optim/deepspeed_bound.py``: where each optimizer wrapper keeps this
rank's fp32 masters), the checkpoint converter (``training/convert.py``: ZeRO partitions merged
by ``zero_to_fp32``'s functions), the global weight norm (``training/metrics.py``: ZeRO-3
partitions) and checkpoint loading (``training/checkpointing.py``: every file DeepSpeed reads is
loaded with ``load_file``, which runs no code from it). DeepSpeed itself is imported only inside
the functions that need it (~10 s).

Why the norm bound does not use DeepSpeed's public ``safe_get_full_fp32_param`` /
``safe_get_local_fp32_param`` / ``safe_set_local_fp32_param`` (0.19.8, ``utils/tensor_fragment.py``):

- ``safe_get_full_fp32_param`` gives the whole parameter, so row norms would be right, but it
  assembles it with one collective per parameter (ZeRO-1/2 and ``BF16_Optimizer``: an
  all-reduce of a zero-filled full-size fp32 buffer; ZeRO-3: an all-gather of the partitions),
  and writing back needs ``safe_set_full_fp32_param`` per parameter. Every step would move the
  whole model in fp32 over the data-parallel group, against the bound's one all-reduce of a
  sum of squares per constrained row.
- ``safe_get_local_fp32_param`` / ``safe_set_local_fp32_param`` exist for ZeRO-3 only, and
  return the partition without saying which elements of the parameter it holds (needed to find
  the rows it cuts): the partition rank and the padding stay internals. They would replace
  only ``grad_position`` below, and add a copy per parameter per step wherever ``.to(device)``
  copies (optimizer offload). ZeRO-1/2 and ``BF16_Optimizer`` have no local accessor.
"""

from __future__ import annotations

import importlib
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from an_megatron.compat import require_version

SUPPORTED = "==0.19.8"  # the release every accessor below was read from
require_version("deepspeed", SUPPORTED)


# ---- the optimizer wrappers' fp32 masters ---------------------------------------------------

# Wrapper class -> (its model parameters per group, its fp32 masters per group), 0.19.8:
# flat tensors, one per group (ZeRO-1/2 and BF16_Optimizer: this rank's partition; ZeRO-3: per
# sub-group; FP16_Optimizer: ``_flatten_dense_tensors`` of the group, no alignment), except
# FP16_UnfusedOptimizer's, a list of whole fp32 copies per group.
_GROUP_ATTRIBUTES = {
    "DeepSpeedZeroOptimizer": ("bit16_groups", "single_partition_of_fp32_groups"),
    "BF16_Optimizer": ("bf16_groups", "fp32_groups_flat_partition"),
    "DeepSpeedZeroOptimizer_Stage3": ("fp16_groups", "fp32_partitioned_groups_flat"),
    "FP16_Optimizer": ("fp16_groups", "fp32_groups_flat"),
    "FP16_UnfusedOptimizer": ("fp16_groups", "fp32_groups"),
}


def _group_attributes(wrapper) -> tuple[str, str]:
    for cls in type(wrapper).__mro__:
        if cls.__name__ in _GROUP_ATTRIBUTES:
            return _GROUP_ATTRIBUTES[cls.__name__]
    raise TypeError(f"unsupported DeepSpeed optimizer {type(wrapper).__name__}")


def model_param_groups(wrapper) -> list[list[torch.nn.Parameter]]:
    """The model (low-precision) parameters of each master group, in the same order on every rank."""
    return getattr(wrapper, _group_attributes(wrapper)[0])


def fp32_masters(wrapper) -> list:
    """The fp32 masters of each group, the tensors the inner optimizer steps (see ``_GROUP_ATTRIBUTES``)."""
    return getattr(wrapper, _group_attributes(wrapper)[1])


def master_dp_group(wrapper, group: int):
    """The data-parallel group that group ``group``'s masters are partitioned over (ZeRO-1/2,
    ``BF16_Optimizer``: ``real_dp_process_group``; ZeRO-3: per sub-group), 0.19.8."""
    if hasattr(wrapper, "sub_group_process_groups"):
        return wrapper.sub_group_process_groups[group]
    return wrapper.real_dp_process_group[group]


def inner_optimizers(wrapper) -> list[torch.optim.Optimizer]:
    """The torch optimizer(s) whose ``step()`` updates the masters: ``optimizer``, plus ZeRO-3's
    ``backup_optimizer`` for the sub-groups kept on the GPU under partial offload (0.19.8)."""
    inner = [wrapper.optimizer, getattr(wrapper, "backup_optimizer", None)]
    return [o for o in inner if o is not None]


def offloads_optimizer(wrapper) -> bool:
    """Whether the masters live on the CPU (ZeRO-1/2 ``cpu_offload``, ZeRO-3 ``offload_optimizer``), 0.19.8."""
    return bool(getattr(wrapper, "cpu_offload", False) or getattr(wrapper, "offload_optimizer", False))


def uses_zenflow(wrapper) -> bool:
    """ZeRO-1/2 with ZenFlow, which steps the masters without the inner optimizer's ``step()`` (0.19.8)."""
    return bool(wrapper.zenflow)


def uses_legacy_fusion(wrapper) -> bool:
    """``FP16_Optimizer`` with ``legacy_fusion``: its fused kernel writes the fp16 weights inside
    the step, bypassing the masters (0.19.8)."""
    return bool(wrapper.fused_adam_legacy)


@dataclass(frozen=True)
class MasterSlice:
    """Where a parameter's fp32 fragment lies in a flat master: ``flat[offset:offset + numel]``
    holds the parameter's flat elements ``param_start .. param_start + numel - 1``."""

    offset: int
    numel: int
    param_start: int


def hp_fragment(param) -> MasterSlice | None:
    """ZeRO-1/2 and ``BF16_Optimizer``: this rank's fragment of ``param`` in its group's flat
    partition, None where this rank holds nothing of it. It may start or end mid-row.
    0.19.8: ``param._hp_mapping`` (``hp_fragment_address``, ``lp_fragment_address``)."""
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is None:
        return None
    at = mapping.hp_fragment_address
    return MasterSlice(at.start, at.numel, mapping.lp_fragment_address.start)


def zero3_param_slice(wrapper, param, rank: int) -> MasterSlice:
    """ZeRO-3: this rank's fragment of ``param`` in its sub-group's flat partition, padding
    dropped (``numel`` may be 0). ``rank`` is this rank in the sub-group's process group.
    0.19.8: ``grad_position[get_param_id(p)] = (sub-group, offset, n)``; element ``k`` of the
    partition is element ``rank * n + k`` of the parameter; elements past ``ds_numel`` are padding."""
    _, offset, n = wrapper.grad_position[wrapper.get_param_id(param)]
    start = rank * n
    return MasterSlice(offset, max(0, min(n, param.ds_numel - start)), start)


def zero3_full_shape(param) -> tuple[int, ...]:
    """ZeRO-3: the parameter's shape (``p.shape`` is ``(0,)`` while partitioned); 0.19.8: ``ds_shape``."""
    return tuple(param.ds_shape)


def zero3_partition(param) -> torch.Tensor | None:
    """ZeRO-3: this rank's partition of the model parameter ``param`` (None if not partitioned);
    0.19.8: ``ds_tensor``."""
    return getattr(param, "ds_tensor", None)


# ---- merging a ZeRO checkpoint's partitions (deepspeed.utils.zero_to_fp32, 0.19.8) -----------


def zero_model_states(model_files: list[str]) -> list:
    """The ``zero_model_state`` descriptions of the model-states files of one model-parallel rank."""
    from deepspeed.utils import zero_to_fp32

    with loading_weights_only():
        return zero_to_fp32.parse_model_states(model_files)


def zero_model_states_from_shapes(model_states: dict) -> list:
    """The description of one loaded model-states dict that holds no ``module`` (a pipeline's:
    its weights are in layer files), from its ``param_shapes``."""
    from deepspeed.utils import zero_to_fp32

    return [
        zero_to_fp32.zero_model_state(
            buffers={},
            param_shapes=model_states["param_shapes"],
            shared_params=[],
            ds_version=model_states.get("ds_version"),
            frozen_param_shapes=None,
            frozen_param_fragments=None,
        )
    ]


def zero_fp32_state_dict(ckpt_dir: str, optim_files: list[str], model_states: list) -> dict[str, torch.Tensor]:
    """The fp32 masters of one model-parallel rank, merged over the data-parallel partitions in
    ``optim_files``. ``zero_to_fp32``'s public entry points glob every ``*_optim_states.pt`` of
    the directory (one model-parallel rank only); these are the private functions they call.
    Raises ``ValueError``/``KeyError`` on files that are not ZeRO's, ``CheckpointFileError`` on
    files that do not load."""
    from deepspeed.utils import zero_to_fp32

    with loading_weights_only():
        stage, world, fp32_groups, paddings = zero_to_fp32.parse_optim_states(optim_files, ckpt_dir)
    if stage <= 2:
        return zero_to_fp32._get_fp32_state_dict_from_zero2_checkpoint(
            world, fp32_groups, model_states, False, paddings
        )
    return zero_to_fp32._get_fp32_state_dict_from_zero3_checkpoint(world, fp32_groups, model_states, False)


# ---- loading checkpoint files without running code from them ---------------------------------

# Besides tensors and plain data (what torch.load(weights_only=True) accepts by itself), the files
# of a checkpoint hold these, and nothing else may be named in them (0.19.8; found by listing the
# globals of checkpoints of ZeRO 0-3, fp32 and bf16, TP=2, PP=2, DP=2). Each is rebuilt from data
# without running code of the file: DeepSpeed's loss scaler (an object whose attributes are set),
# ZeRO stage enum (looked up by value) and fragment addresses (a dataclass of two ints), in the
# ZeRO optimizer states; numpy's array rebuild (the four types megatron-core allows too), for the
# numpy RNG state in the client state of checkpoints that hold it as an array (the trainer stores
# it as a list).
CHECKPOINT_GLOBALS = {
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "numpy._core.multiarray._reconstruct",
    "numpy.ndarray",
    "numpy.dtype",
    "numpy.dtypes.UInt32DType",
}


class CheckpointFileError(RuntimeError):
    """A checkpoint file that is not loaded (missing, unreadable, or naming other objects than
    ``CHECKPOINT_GLOBALS``); the message is one line naming the file."""


def _resolve(name: str):
    module, _, attribute = name.rpartition(".")
    return getattr(importlib.import_module(module), attribute)


def _first_line(e: Exception) -> str:
    """The reason in torch's message (the weights-only unpickler's is many lines of advice)."""
    advice = ("Weights only load failed", "Check the documentation")
    paragraphs = [p.strip() for p in str(e).split("WeightsUnpickler error:")[-1].split("\n\n") if p.strip()]
    reason = next((p for p in paragraphs if not p.startswith(advice)), paragraphs[0] if paragraphs else "")
    return f"{type(e).__name__}: {reason.splitlines()[0] if reason else ''}"


def _safe_globals(named: set[str]) -> list:
    """The allowed globals a file names (DeepSpeed's are imported only then), and numpy's always:
    a dtype is rebuilt as an instance of its class (``numpy.dtypes.UInt32DType``), which the file
    does not name."""
    return [(_resolve(n), n) for n in sorted(CHECKPOINT_GLOBALS) if n in named or n.startswith("numpy.")]


def load_file(path, map_location="cpu", mmap=None):
    """``torch.load(path, weights_only=True)``, allowing only ``CHECKPOINT_GLOBALS`` besides
    torch's own: no code named in the file runs. Any failure is a ``CheckpointFileError``."""
    try:
        named = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except FileNotFoundError:
        raise CheckpointFileError(f"{path}: missing") from None
    except Exception:  # not a zip-format torch file: the weights-only unpickler alone decides
        named = set()
    refused = sorted(named - CHECKPOINT_GLOBALS)
    if refused:
        raise CheckpointFileError(
            f"{path}: not loaded: it names {', '.join(refused)}, which a checkpoint may not hold (files "
            f"are loaded weights-only: tensors, plain data and a few DeepSpeed and numpy types)"
        )
    try:
        with torch.serialization.safe_globals(_safe_globals(named)):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # truncated, not a torch file, or refused by the weights-only unpickler
        raise CheckpointFileError(f"{path}: cannot be read as a torch checkpoint ({_first_line(e)})") from None


class _LoadingWeightsOnly:
    """``inner`` (the torch module, a DeepSpeed checkpoint engine) with ``load`` replaced by
    ``load_file``; every other attribute is ``inner``'s."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    @staticmethod
    def load(path, map_location=None, mmap=None, weights_only=None):  # weights_only: True, whatever is asked
        return load_file(path, map_location=map_location, mmap=mmap)


@contextmanager
def loading_weights_only(engine=None):
    """While it lasts, DeepSpeed 0.19.8 reads checkpoint files with ``load_file`` where it would
    call ``torch.load(..., weights_only=False)``: through ``engine.checkpoint_engine`` (the
    ``mp_rank_XX``/``zero_pp_rank_*`` model states, ZeRO optimizer states, the pipeline's layer
    files: its ``TorchCheckpointEngine.load``), and in ``zero_to_fp32`` (``parse_model_states``,
    ``parse_optim_states``: a ZeRO-3 checkpoint loaded without optimizer states, and ours)."""
    from deepspeed.utils import zero_to_fp32

    saved = zero_to_fp32.torch, getattr(engine, "checkpoint_engine", None)
    zero_to_fp32.torch = _LoadingWeightsOnly(saved[0])
    if engine is not None:
        engine.checkpoint_engine = _LoadingWeightsOnly(saved[1])
    try:
        yield
    finally:
        zero_to_fp32.torch = saved[0]
        if engine is not None:
            engine.checkpoint_engine = saved[1]
