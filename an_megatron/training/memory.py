"""Per-rank memory of a training configuration: model states (weights, gradients, optimizer) and
the activations one micro-batch leaves for backward, counted for this project's block.

Model states
------------
``N`` is this rank's parameter count: its pipeline stage's blocks (DeepSpeed's ``type:Block``
partition), the embedding on the first stage and the head on the last, every matrix and every
per-head or per-channel vector divided by the tensor-parallel size ``t`` (the norm gains of GPT+
and the residual weights ``alpha`` are whole on every rank). With data-parallel size ``D``, bytes:

===================  ===========  ===========  ==============================================
precision            weights      gradients    optimizer (Adam ``m``, ``v``; fp32 masters)
===================  ===========  ===========  ==============================================
fp32, ZeRO 0         4 N          4 N          8 N (the torch optimizer steps the weights)
fp32, ZeRO 1-3       4 N          4 N          12 N / D (DeepSpeed keeps an fp32 partition
                                               of the weights besides them)
bf16, ZeRO 0         2 N          2 N          12 N (a whole fp32 copy and the moments)
bf16, ZeRO 1-3       2 N          2 N          12 N / D
===================  ===========  ===========  ==============================================

ZeRO 2 divides the gradients by ``D``, ZeRO 3 the weights too. Not counted: DeepSpeed's
communication buckets and the fp32 gradient partition it makes during the step.

Activations
-----------
Counted by what autograd saves for backward in one micro-batch (``b`` sequences of ``s``
tokens, hidden size ``h``, ``a`` heads, MLP width ``f``, padded vocabulary ``V``, tensor-parallel
size ``t``); ``w`` is the activation width (4 bytes in fp32, 2 under ``--bf16``). A tensor saved
by several operations, or a view saved by one of them, is counted once, by its storage. Per
block, without recomputation (``block_terms``, bytes):

- ``matmul_inputs``, ``2 w sbh``: the inputs of the two column-parallel matmuls (QKV and
  ``u; z``), whole on every tensor-parallel rank; under sequence parallelism megatron-core's
  fused linear keeps this rank's shard (``/ t``) and gathers it again in backward. On CPU
  (``megatron_patches/sequence_parallel_on_cpu.py`` runs it as a gather and a plain linear) it
  keeps the gathered sequence: ``gathered_inputs_kept``;
- ``residual_stream``, ``pre_norms``: a pre-norm (GPT+'s RMSNorm) keeps the stream it
  normalizes and the normalized value, both fp32 (torch upcasts a bf16 input), ``2 x 8 sbh``
  per block; without pre-norms the stream is the matmul's input, except where the linear keeps
  a gathered copy: anGPT's and nGPT's residual updates then keep their shard, ``2 w sbh / t``;
- ``residual_updates``: anGPT's ``nu (1 - alpha) h + nu alpha x`` keeps the update ``x``
  (``w sbh`` each), nGPT's ``Norm(h + alpha (Norm(x) - h))`` keeps ``x``, ``Norm(x)`` and the
  lerp (``3 w sbh`` each), GPT+'s ``h + x`` nothing;
- ``qkv_output``, ``3 w sbh / t``: ``v`` is a view of it and the attention kernel saves ``v``,
  so the whole fused output stays alive;
- ``qk_norm_inner``, ``qk_scaled``: for ``q`` and for ``k``, RoPE's output (kept by the norm,
  in fp32), the normalized value (kept by the gain's product) and the scaled one (kept by the
  kernel): ``2 (4 + 2 w) sbh / t``;
- ``attention_output``, ``w sbh / t``: the proj's input, the kernel's output itself for nGPT
  and GPT+; where anGPT's factor ``nu_att nu_qkv nu_o`` multiplies it, the kernel's output is
  another ``w sbh / t`` (``attention_kernel_output``). The fused kernels of torch on CPU and
  CUDA keep O(s) memory (output and log-sum-exp): there is no ``s x s`` matrix;
- ``up_gate_output``, ``silu``, ``swiglu_output``: the fused ``u; z`` (``2 w sbf / t``),
  ``SiLU(z)`` and the product (``w sbf / t`` each);
- ``up_gate_weight_copy``: where a per-channel scale multiplies ``W_u; W_z``'s rows
  (``layers.row_scaled``), autograd holds the scaled copy, ``2 w f h / t`` (no ``b``, no ``s``);
- ``attention_stats``, ``norm_stats``: per token and head, the QK norms' two reciprocal RMS
  values and the log-sum-exp (fp32, ``12 sba / t``) and the attention factor; per token, the
  norms of nGPT's normalizations and GPT+'s RMSNorms;
- ``document_mask``: with ``--reset-attention-mask``, the additive mask ``(b, 1, s, s)`` the
  kernel saves, ``w b s^2`` per block on every tensor-parallel rank; none on CUDA in bf16,
  where the variable-length kernel needs no mask.

With ``f = 4h``, ``t = 1``, fp32: anGPT keeps ``31 sbh`` elements per block plus ``8 h^2`` (the
weight copy), nGPT ``34 sbh + 8 h^2``, GPT+ ``32 sbh``; under bf16 anGPT keeps ``66 sbh`` bytes.
Megatron's ``sbh (34 + 5 a s / h)`` bytes (fp16) are for GPT with dropout masks and the
attention matrix: here there is neither, but the QK normalization keeps six copies of ``q`` and
``k``. Outside the blocks: the token ids (``8 sb`` bytes); the head's input ``w sbh`` (and GPT+'s
final norm, ``8 sbh / seq_split``); the scaled ``W_out`` copy ``w V h / t`` (anGPT's and nGPT's
``s_z``); the loss: megatron-core's vocab-parallel cross-entropy works in place on a copy of the
logits and saves the softmax, ``4 sbV / t`` bytes in fp32 whatever ``w``, with the targets and
their mask (``9 sb`` bytes).

Sequence parallelism splits what lives outside the tensor-parallel matmuls along the sequence
(``seq_split = t``): the matmuls' inputs, the residual updates, the norms, the head's input.

The peak of a step (``Activations.peak``) is the larger of two moments: the end of the forward
pass (everything stored, plus the logits beside their fp32 copy: ``w sbV / t``, and ``4 sbV / t``
more under bf16 for the cast) and the backward of the last block (the head's tensors freed;
what that block recomputes alive again; the gradient reaching it and the gradient of its
``u; z`` output, ``w (sbh + 2 sbf / t)``).

Recomputation (``ModelConfig.recompute_*``, ``model/recompute.py``):

- ``full``: a recomputed chunk keeps only its input, ``w sbh / seq_split``; ``uniform`` makes
  chunks of ``recompute_num_layers`` blocks of this stage, ``block`` recomputes the first
  ``recompute_num_layers`` blocks one by one and stores the others whole. The backward of a
  chunk holds its blocks' activations again;
- ``selective``: every block stops keeping what is saved inside the parts
  ``SELECTIVE_RECOMPUTE`` names (``SELECTIVE_PART_TERMS``): the attention core keeps its input
  (the QKV output) and its output (the proj's input) and drops the QK path, the kernel's own
  output and statistics and the document mask; the SwiGLU product drops ``SiLU(z)``.

Pipeline parallelism: DeepSpeed's schedule has ``min(p - stage, micro-batches per step)``
micro-batches in flight on a stage, each holding its stored activations.

``tests/test_memory_report.py`` checks every mode against the storages autograd saves
(``torch.autograd.graph.saved_tensors_hooks``; torch's checkpoint keeps its inputs through the
same hooks), and ``benchmarks/memory.py`` the peak against the resident set of a CPU step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from an_megatron.model import components
from an_megatron.model.config import ModelConfig

GIB = 1024**3

# What the pre-norm and the residual update the spec names save besides the matmuls' inputs
# (module docstring); a component missing here has no formula. A pre-norm (torch's RMSNorm)
# saves its input, upcast to fp32 under bf16, and the normalized value in fp32; a residual
# update saves this many ``sbh`` of its own and whether it saves the stream ``h`` it updates.
PRE_NORMS = {components.no_op: False, components.hidden_rmsnorm: True}
RESIDUAL_SAVED = {components.ScaledLerpResidual: 1, components.SphereResidual: 3, components.AddResidual: 0}
RESIDUAL_SAVES_STREAM = {
    components.ScaledLerpResidual: True,
    components.SphereResidual: True,
    components.AddResidual: False,
}
# Per-token norms (``sb`` elements; fp32 for the RMSNorms) each pre-norm and residual update saves.
PRE_NORM_STATS = {components.no_op: 0, components.hidden_rmsnorm: 1}
RESIDUAL_STATS = {components.ScaledLerpResidual: 0, components.SphereResidual: 2, components.AddResidual: 0}


class NoFormula(ValueError):
    """The configuration uses a component whose saved tensors this module does not count."""


def stage_blocks(num_layers: int, pp: int, stage: int) -> int:
    """The number of blocks on pipeline ``stage``: DeepSpeed's ``type:Block`` partition."""
    if pp == 1:
        return num_layers
    from deepspeed.runtime.utils import partition_balanced

    weights = [0] + [1] * num_layers + [0]  # [Embedding, Block 0 .. L-1, Head]
    parts = partition_balanced(weights=weights, num_parts=pp)
    return sum(weights[parts[stage] : parts[stage + 1]])


def _vector_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameter_count(config: ModelConfig, pp: int = 1, stage: int = 0) -> int:
    """This rank's parameters: the stage's blocks (embedding on the first stage, head on the
    last), matrices and TP-sharded vectors divided by the tensor-parallel size. The per-channel
    components (norm gains, scales, ``alpha``) are built (vectors only) and counted, so any
    spec is counted as it is built."""
    spec, d, f, V = config.spec, config.hidden_size, config.ffn_hidden_size, config.vocab_size
    t = config.tensor_model_parallel_size
    factors = spec.factors(config)
    block = (3 * d * d + d * d + 2 * f * d + f * d) // t
    block += 2 * _vector_params(spec.pre_norm(config)) + _vector_params(spec.qk_norm(config))
    block += 2 * _vector_params(spec.residual(config))
    block += _vector_params(spec.gate_scales(config, factors.nu_uz * factors.nu_act * factors.nu_down, factors.nu_uz))
    n = stage_blocks(config.num_layers, pp, stage) * block
    if stage == 0:
        n += V * d // t
    if stage == pp - 1:
        n += V * d // t + _vector_params(spec.final_norm(config)) + _vector_params(spec.logit_scale(config))
    return n


@dataclass(frozen=True)
class ModelStates:
    """Bytes of this rank's weights, gradients and optimizer state."""

    params: int
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer


def model_state_bytes(n: int, bf16: bool, zero_stage: int, dp: int) -> ModelStates:
    """The table of the module docstring for ``n`` local parameters."""
    width = 2 if bf16 else 4
    optimizer = 12 * n if bf16 or zero_stage > 0 else 8 * n  # fp32 masters, m, v (ZeRO 0 fp32: m, v)
    return ModelStates(
        params=width * n // (dp if zero_stage >= 3 else 1),
        grads=width * n // (dp if zero_stage >= 2 else 1),
        optimizer=optimizer // (dp if zero_stage >= 1 else 1),
    )


@dataclass(frozen=True)
class Recompute:
    """What is recomputed: ``granularity`` None, ``full`` or ``selective``; for ``full``, the
    ``method`` (``uniform`` or ``block``) and ``num_layers``; for ``selective``, the block terms
    it drops (names of ``block_terms``)."""

    granularity: str | None = None
    method: str = "uniform"
    num_layers: int = 1
    selective_terms: tuple[str, ...] = ()


@dataclass(frozen=True)
class Activations:
    """Bytes held by one micro-batch's activations on this rank: ``block`` per block (by term),
    ``stored`` at the end of the forward pass, ``peak`` the most alive at once in the step."""

    block: dict = field(default_factory=dict)
    stored: int = 0
    peak: int = 0
    in_flight: int = 1  # micro-batches in flight on this pipeline stage


def block_terms(
    config: ModelConfig,
    micro_batch: int,
    bf16: bool = False,
    sequence_parallel: bool = False,
    document_mask: bool = False,
    varlen_attention: bool = False,
    gathered_inputs_kept: bool = False,
) -> dict[str, float]:
    """Bytes one block saves for backward without recomputation, by term (module docstring)."""
    spec, t = config.spec, config.tensor_model_parallel_size
    b, s, d, f, a = (
        micro_batch,
        config.seq_length,
        config.hidden_size,
        config.ffn_hidden_size,
        config.num_attention_heads,
    )
    for table, component, place in (
        (PRE_NORMS, spec.pre_norm, "pre_norm"),
        (RESIDUAL_SAVED, spec.residual, "residual"),
    ):
        if component not in table:
            raise NoFormula(f"no activation formula for the {place} component {component.__name__}")
    if config.transformer_impl != "local" or config.fp8 is not None:
        raise NoFormula(f"no activation formula for --transformer-impl {config.transformer_impl} / FP8 linears")
    w = 2 if bf16 else 4
    sbh = s * b * d
    seq_split = t if sequence_parallel else 1  # what lives outside the tensor-parallel matmuls
    factors = spec.factors(config)
    factor_applied = factors.nu_att != "none" or factors.nu_qkv * factors.nu_o != 1.0
    gate_scaled = spec.gate_scales(config).row_scale() is not None
    gathered = sequence_parallel and gathered_inputs_kept  # the matmuls keep a gathered copy
    if PRE_NORMS[spec.pre_norm]:  # the norm keeps the stream (fp32) and its normalized value
        stream, normalized = 2 * 4 * sbh / seq_split, 2 * 4 * sbh / seq_split
    else:  # the residual update keeps the stream: the matmul's input itself, unless it gathered it
        stream = 2 * w * sbh / t if gathered and RESIDUAL_SAVES_STREAM[spec.residual] else 0
        normalized = 0
    return {
        # the qkv and u; z matmuls' inputs (this rank's shard under sequence parallelism, or the
        # gathered sequence where the linear keeps that)
        "matmul_inputs": 2 * w * sbh / (1 if gathered else seq_split),
        "residual_stream": stream,
        "pre_norms": normalized,
        "residual_updates": 2 * RESIDUAL_SAVED[spec.residual] * w * sbh / seq_split,
        "qkv_output": 3 * w * sbh / t,
        # q and k: RoPE's output (kept by the norm in fp32) and the normalized value; the scaled
        # value, which the attention kernel saves
        "qk_norm_inner": 2 * (4 + w) * sbh / t,
        "qk_scaled": 2 * w * sbh / t,
        # the kernel's output when the attention factor multiplies it; the proj's input either way
        "attention_kernel_output": w * sbh / t if factor_applied else 0,
        "attention_output": w * sbh / t,
        "up_gate_output": 2 * w * s * b * f / t,
        "silu": w * s * b * f / t,
        "swiglu_output": w * s * b * f / t,
        "up_gate_weight_copy": 2 * w * f * d / t if gate_scaled else 0,
        # the QK norms' reciprocal RMS and the log-sum-exp (fp32), the attention factor
        "attention_stats": (
            3 * 4 * s * b * a / t
            + (w * s * b * a / t if factors.nu_att == "exact" else w * s * a / t if factor_applied else 0)
        ),
        "norm_stats": 2 * (4 * PRE_NORM_STATS[spec.pre_norm] + w * RESIDUAL_STATS[spec.residual]) * s * b / seq_split,
        "document_mask": w * b * s * s if document_mask and not varlen_attention else 0,
    }


def activation_bytes(
    config: ModelConfig,
    micro_batch: int,
    bf16: bool = False,
    sequence_parallel: bool = False,
    document_mask: bool = False,
    varlen_attention: bool = False,
    recompute: Recompute = Recompute(),
    pp: int = 1,
    stage: int = 0,
    micro_batches: int = 1,
    gathered_inputs_kept: bool = False,
) -> Activations:
    """One micro-batch's activations on pipeline ``stage`` (module docstring)."""
    t, width = config.tensor_model_parallel_size, 2 if bf16 else 4
    b, s, d, V = micro_batch, config.seq_length, config.hidden_size, config.vocab_size
    seq_split = t if sequence_parallel else 1
    terms = block_terms(
        config, micro_batch, bf16, sequence_parallel, document_mask, varlen_attention, gathered_inputs_kept
    )
    block = sum(terms.values())
    n_blocks = stage_blocks(config.num_layers, pp, stage)
    block_input = s * b * d * width / seq_split

    ids, head, loss = 0.0, 0.0, 0.0
    if stage == 0:
        ids = 8 * s * b  # token ids
    if stage == pp - 1:
        spec = config.spec
        final_norm = spec.final_norm
        head += s * b * d * width / (1 if gathered_inputs_kept else seq_split)  # W_out's input
        head += 2 * 4 * s * b * d / seq_split if PRE_NORMS.get(final_norm) else 0  # the norm's input, normalized
        head += 4 * s * b * PRE_NORM_STATS.get(final_norm, 0) / seq_split
        head += V * d * width / t if spec.logit_scale(config).row_scale() is not None else 0
        head += 4 * s * b * V / t + 9 * s * b  # the softmax (fp32), the targets and their mask
        # beside the saved softmax, at the end of the forward pass: the logits, and under bf16
        # their fp32 cast
        loss = s * b * V / t * (width + (4 if bf16 else 0))

    recomputed = 0.0  # what the backward of the last block (or chunk) computes again
    if recompute.granularity == "full":
        n = min(max(1, recompute.num_layers), n_blocks) if n_blocks else 0
        if recompute.method == "block":
            kept = n * block_input + (n_blocks - n) * block
            recomputed = block if n == n_blocks else 0  # the last block is recomputed only if all are
        else:
            kept = math.ceil(n_blocks / n) * block_input if n else 0
            recomputed = n * block  # a whole chunk (the last one may be shorter; an earlier one is not)
    else:
        if recompute.granularity == "selective":
            unknown = set(recompute.selective_terms) - set(terms)
            if unknown:
                raise NoFormula(f"selective recomputation of unknown terms {sorted(unknown)}")
            dropped = sum(terms[name] for name in recompute.selective_terms)
            block -= dropped
            recomputed = dropped if n_blocks else 0
        kept = n_blocks * block
    stored = ids + kept + head
    # The backward of the last block (chunk): the head's tensors are freed, what it recomputes is
    # alive again, beside the gradient reaching it and the gradient of its fused u; z output.
    transient = width * (s * b * d / seq_split + 2 * s * b * config.ffn_hidden_size / t) if n_blocks else 0
    peak = max(stored + loss, ids + kept + recomputed + transient)
    in_flight = min(pp - stage, micro_batches) if pp > 1 else 1
    return Activations(block=terms, stored=int(stored), peak=int(peak), in_flight=in_flight)


def gib(n: float) -> str:
    """Bytes in GiB, or MiB / KiB below one of the unit (tiny test models)."""
    for unit, size in (("GiB", GIB), ("MiB", 1024**2)):
        if n >= size:
            return f"{n / size:.3f} {unit}"
    return f"{n / 1024:.1f} KiB"


# The block terms each part that selective recomputation can recompute (``model/recompute.py``'s
# PARTS) stops keeping: what is saved inside the part, not its inputs (kept to recompute it) nor
# its output (saved by the next operation). The attention core runs from the qkv output (whose
# storage stays: it is the input) to the proj's input; the SwiGLU product from ``u; z`` to the
# product.
SELECTIVE_PART_TERMS = {
    "attention_core": ("qk_norm_inner", "qk_scaled", "attention_kernel_output", "attention_stats", "document_mask"),
    "rope_qk_norm": ("qk_norm_inner",),
    "swiglu": ("silu",),
}


def selective_terms() -> tuple[str, ...]:
    """The block terms selective recomputation drops, from the recompute module's list of what it
    recomputes (``SELECTIVE_RECOMPUTE``); NoFormula for a part without a row above."""
    try:
        from an_megatron.model.recompute import SELECTIVE_RECOMPUTE
    except ImportError:
        raise NoFormula("selective recomputation is not available in this build") from None
    missing = [part for part in SELECTIVE_RECOMPUTE if part not in SELECTIVE_PART_TERMS]
    if missing:
        raise NoFormula(f"no activation formula for selective recomputation of {', '.join(missing)}")
    return tuple(term for part in SELECTIVE_RECOMPUTE for term in SELECTIVE_PART_TERMS[part])


def recompute_from(config) -> Recompute:
    """The recomputation a ``ModelConfig`` asks for (``--recompute-*``; none in a build without
    the fields)."""
    granularity = getattr(config, "recompute_granularity", None)
    if granularity == "selective":
        return Recompute("selective", selective_terms=selective_terms())
    if granularity == "full":
        method = getattr(config, "recompute_method", None) or "uniform"
        return Recompute("full", method, getattr(config, "recompute_num_layers", None) or 1)
    return Recompute()


def report_lines(
    config: ModelConfig,
    *,
    micro_batch: int,
    bf16: bool,
    zero_stage: int,
    dp: int,
    pp: int = 1,
    stage: int = 0,
    micro_batches: int = 1,
    recompute: Recompute = Recompute(),
    sequence_parallel: bool = False,
    document_mask: bool = False,
    varlen_attention: bool = False,
    gathered_inputs_kept: bool = False,
) -> list[str]:
    """The ``--report-memory`` lines of one rank: model states, activations per micro-batch
    under each recomputation mode (the chosen one marked) and one total."""
    t = config.tensor_model_parallel_size
    n = parameter_count(config, pp, stage)
    states = model_state_bytes(n, bf16, zero_stage, dp)
    blocks = stage_blocks(config.num_layers, pp, stage)
    parts = (
        [f"{blocks} blocks"] + (["embedding"] if stage == 0 else []) + (["head and loss"] if stage == pp - 1 else [])
    )
    opt_what = "fp32 masters, Adam m and v" if bf16 or zero_stage else "Adam m and v"
    lines = [
        f"memory estimate (training/memory.py): TP={t} PP={pp} (stage {stage}: {', '.join(parts)}) DP={dp} "
        f"ZeRO-{zero_stage} {'bf16 with fp32 masters' if bf16 else 'fp32'}",
        f"  parameters: {n:,} on this rank; weights {gib(states.params)}, gradients {gib(states.grads)}, "
        f"optimizer {gib(states.optimizer)} ({opt_what})",
    ]
    common = dict(
        config=config,
        micro_batch=micro_batch,
        bf16=bf16,
        document_mask=document_mask,
        varlen_attention=varlen_attention,
        gathered_inputs_kept=gathered_inputs_kept,
        pp=pp,
        stage=stage,
        micro_batches=micro_batches,
    )
    n_recompute = recompute.num_layers if recompute.granularity == "full" else 1
    modes = [
        ("no recomputation", Recompute(), False),
        (
            f"full, {recompute.method if recompute.granularity == 'full' else 'uniform'}, {n_recompute} layer(s)",
            Recompute("full", recompute.method if recompute.granularity == "full" else "uniform", n_recompute),
            False,
        ),
    ]
    try:
        modes.append(("selective", Recompute("selective", selective_terms=selective_terms()), False))
    except NoFormula:
        pass
    if t > 1:
        modes.append(("no recomputation, --sequence-parallel", Recompute(), True))
    chosen = activation_bytes(**common, recompute=recompute, sequence_parallel=sequence_parallel)
    lines.append(
        f"  activations per micro-batch (b={micro_batch}, s={config.seq_length}): stored {gib(chosen.stored)}, "
        f"peak {gib(chosen.peak)}; {chosen.in_flight} micro-batch(es) in flight on this stage"
    )
    for name, mode, sp in modes:
        a = activation_bytes(**common, recompute=mode, sequence_parallel=sp)
        mark = " <- this run" if (mode, sp) == (recompute, sequence_parallel) else ""
        lines.append(f"    {name}: stored {gib(a.stored)}, peak {gib(a.peak)}{mark}")
    total = states.total + chosen.stored * (chosen.in_flight - 1) + chosen.peak
    lines.append(
        f"  total: {gib(total)} = weights, gradients and optimizer {gib(states.total)} + activations peak "
        f"{gib(chosen.peak)}"
        + (f" + {chosen.in_flight - 1} x stored {gib(chosen.stored)}" if chosen.in_flight > 1 else "")
    )
    return lines
