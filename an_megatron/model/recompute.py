"""Activation recomputation (Megatron's ``--recompute-*`` flags): which activations the blocks
keep for backward and which they compute again.

Every recomputation goes through torch's non-reentrant ``torch.utils.checkpoint.checkpoint``:
forward runs the function without keeping what autograd would save inside it (only its
inputs), and backward runs it again when it first needs one of those tensors. The model has no
dropout and no other random operation, so there is no RNG state to replay
(``preserve_rng_state=False``); the recomputed values are the forward's, bit for bit.
Non-reentrant checkpointing also passes gradients to inputs that do not require them (the
integer ids) and works with module hooks such as ZeRO-3's parameter gathering, which re-gathers
a block's weights when the recomputation calls the block's modules again. (Forward hooks inside
a recomputed part, such as the ``Tap`` points, fire again in backward; the norm measurement runs
without backward.)

Granularities (``ModelConfig.recompute_granularity``):

- ``full`` recomputes whole blocks, on each pipeline stage's blocks (``run_blocks``, called by
  ``GPTModel``'s loop and by the pipeline stage's forward): ``uniform`` splits them into
  chunks of ``recompute_num_layers`` consecutive blocks and keeps only each chunk's input;
  ``block`` recomputes the first ``recompute_num_layers`` blocks (each keeping its input) and
  keeps all activations of the others.
- ``selective`` recomputes, in every block, the parts named in ``SELECTIVE_RECOMPUTE``
  (``selective``, called where the block computes them).

What selective recomputes was measured (``benchmarks/recompute_parts.py``): one block, fp32,
CPU, d=256, 4 heads, f=1024, micro-batch 8 x 1024 tokens (8 layers of it peak at 3.8 GB in fp32), bytes
autograd keeps for backward counted per storage with ``torch.autograd.graph.saved_tensors_hooks``
(parameters left out), and the part's forward timed alone (what recomputing it costs; medians of
5 on a shared 2-core machine, so within about 2x)::

                      anGPT: 250.9 MB kept per block       GPT+: 256.9 MB kept per block
    part              freed MB   recompute ms   ms/MB       freed MB   recompute ms   ms/MB
    attention_core      56.9        311          5.5          48.9        395          8.1
    rope_qk_norm        32.8        216          6.6          32.8        183          5.6
    swiglu              32.0         81          2.5          32.0         36          1.1
    residual             0.0         51           -          -16.0         12           -
    pre_norm             0.0          0           -           16.1        535         33

(a block's forward + backward: about 3.5 s anGPT, 3.2 s GPT+). The attention core frees the most
(its RoPE, QK-norm and attention outputs and the kernel's saved tensors; only the qkv output is
kept, and attention's v is a view of it anyway), at one attention forward; the SwiGLU product
frees its SiLU output for almost nothing. The residual updates free nothing: what anGPT's keeps
(h and the branch output) is what recomputing it keeps, its inputs, and GPT+'s addition keeps
nothing, so recomputing it costs 16 MB. anGPT and nGPT have no pre-norms; GPT+'s free 16 MB at
a cost that varied 57-535 ms between runs. RoPE with the QK-norm alone is inside the attention
core. So selective
recomputes the attention core and the SwiGLU product: anGPT keeps 162.0 MB per block instead of
250.9 (-35%), GPT+ 176.1 instead of 256.9 (-31%); full keeps the block's input, 8 MB.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING

from torch import nn
from torch.utils.checkpoint import checkpoint

from an_megatron.errors import FieldError

if TYPE_CHECKING:
    from an_megatron.model.config import ModelConfig

GRANULARITIES = ("full", "selective")
METHODS = ("uniform", "block")
# The parts of a block that can be recomputed on their own (the candidates measured above):
# attention_core: everything between the qkv matmul's output and the proj's input (RoPE, the
#   QK-norm with s_qk, attention, the nu_att factor);
# rope_qk_norm: RoPE and the QK-norm alone (the elementwise start of attention_core);
# swiglu: the SwiGLU product u * SiLU(z) between the up/gate matmul and the down matmul;
# residual: the residual updates (anGPT's scaled_lerp with nu_lerp, nGPT's normalized lerp);
# pre_norm: the normalizations before attention and MLP (GPT+'s RMSNorm; none in anGPT, nGPT).
PARTS = ("attention_core", "rope_qk_norm", "swiglu", "residual", "pre_norm")
# What --recompute-granularity selective recomputes in every block (a memory estimator reads it).
SELECTIVE_RECOMPUTE = ("attention_core", "swiglu")


def _recompute(fn: Callable, *args):
    # No dropout or other randomness in the model: no RNG state to save and replay.
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)


def selective(fn: Callable, part: str, config: ModelConfig) -> Callable:
    """``fn``, or ``fn`` recomputed in backward when ``part`` is one of the parts selective
    recomputation recomputes and the config asks for it. Called once per module, when built.

    A module comes back as its bound ``__call__`` (its hooks, such as ZeRO-3's parameter
    gathering, still run), so that keeping the result on another module does not register the
    module a second time (a second name for its weights in the state dict)."""
    if part not in PARTS:
        raise ValueError(f"unknown recompute part {part!r}; known: {', '.join(PARTS)}")
    if isinstance(fn, nn.Module):
        fn = fn.__call__
    if config.recompute_granularity == "selective" and part in SELECTIVE_RECOMPUTE:
        return partial(_recompute, fn)
    return fn


def chunks(num_blocks: int, config: ModelConfig) -> list[tuple[int, int, bool]]:
    """How ``full`` recomputation runs ``num_blocks`` consecutive blocks (one pipeline stage's):
    ``(start, end, recomputed)`` ranges, in order, covering them all."""
    if config.recompute_granularity != "full":
        return [(0, num_blocks, False)]
    n = config.recompute_num_layers
    if config.recompute_method == "uniform":
        return [(i, min(i + n, num_blocks), True) for i in range(0, num_blocks, n)]
    first = min(n, num_blocks)  # block: the first n recomputed one by one, the rest kept
    return [(i, i + 1, True) for i in range(first)] + ([(first, num_blocks, False)] if first < num_blocks else [])


def run_blocks(blocks: Sequence, x, config: ModelConfig, call: Callable | None = None):
    """Run ``blocks`` in order on ``x`` with ``full`` recomputation as ``config`` asks (plainly
    otherwise). ``call(block, x)`` runs one block (default ``block(x)``)."""
    call = call or (lambda block, value: block(value))

    def run_range(start, end, value):
        for block in blocks[start:end]:
            value = call(block, value)
        return value

    for start, end, recomputed in chunks(len(blocks), config):
        x = _recompute(partial(run_range, start, end), x) if recomputed else run_range(start, end, x)
    return x


def check_recompute(config: ModelConfig) -> int | None:
    """Megatron's rules for the recompute fields; returns ``recompute_num_layers`` resolved (1
    for ``full`` when not given). ``FieldError`` names the fields."""
    granularity, method, n = config.recompute_granularity, config.recompute_method, config.recompute_num_layers
    if granularity is not None and granularity not in GRANULARITIES:
        raise FieldError(
            "{recompute_granularity} {value!r}: choose one of " + ", ".join(GRANULARITIES),
            "recompute_granularity",
            value=granularity,
        )
    if method is not None and method not in METHODS:
        raise FieldError(
            "{recompute_method} {value!r}: choose one of " + ", ".join(METHODS), "recompute_method", value=method
        )
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise FieldError("{recompute_num_layers} {value}: must be an integer >= 1", "recompute_num_layers", value=n)
    if granularity != "full":
        for field, value in (("recompute_method", method), ("recompute_num_layers", n)):
            if value is not None:
                raise FieldError(
                    "{%s} {value} needs {recompute_granularity} full" % field,
                    field,
                    "recompute_granularity",
                    value=value,
                )
        return None
    if method is None:
        raise FieldError(
            "{recompute_granularity} full needs {recompute_method} uniform or block",
            "recompute_granularity",
            "recompute_method",
        )
    # Not bounded by num_layers here: a chunk or a block count beyond a stage's blocks covers them
    # all (``chunks``), so a config narrowed to fewer layers (the converter's one-block probe) stays
    # valid; the command line bounds it by the blocks per stage (training/arguments.py).
    return 1 if n is None else n


def describe(config: ModelConfig) -> str:
    """The recompute mode in a few words, for the line that describes a run."""
    if config.recompute_granularity == "full":
        return f"recompute full {config.recompute_method} {config.recompute_num_layers}"
    if config.recompute_granularity == "selective":
        return f"recompute selective ({', '.join(SELECTIVE_RECOMPUTE)})"
    return "no recompute"
