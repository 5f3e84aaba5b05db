"""FP8 for the model's linears: the settings, Transformer Engine's recipe and autocast, and a
torch-only FP8 matmul. See docs/FP8.md.

Two backends, chosen by ``--fp8-backend`` once ``--fp8-format`` asks for FP8:

- ``te``: Transformer Engine's linears (megatron-core's ``TEColumnParallelLinear`` /
  ``TERowParallelLinear``), forward under ``fp8_autocast`` with the recipe from the flags and
  the amax reduced over the tensor x data-parallel group. TE needs CUDA to install, so it is
  imported only when asked for; without it the request fails with a one-line install hint.
- ``torch``: ``FP8Matmul`` below, ``torch._scaled_mm`` with per-tensor dynamic ("current")
  scaling: activations and weights in e4m3 forward, gradients in e5m2 backward (``hybrid``).
  It replaces only the local matmul of megatron-core's parallel linears (``linear_impl.py``),
  so their tensor-parallel communication is untouched.

Why our own ~100 lines and not torchao's ``Float8Linear``:

1. torchao converts ``nn.Linear`` modules (``convert_to_float8_training``). Our linears are
   megatron-core's ``ColumnParallelLinear``/``RowParallelLinear``: not ``nn.Linear``, and they
   own the tensor-parallel communication. We need to swap the matmul *inside* them
   (``_forward_impl``); a module swap would mean re-implementing megatron's TP regions.
2. torchao's float8 training is built for FSDP2/DTensor and relies on ``torch.compile`` to fuse
   amax, scale and cast; we train under DeepSpeed ZeRO and megatron TP, uncompiled.
3. It is one more dependency whose releases follow specific torch releases, and it is not on
   the GPU machines' image; ``_scaled_mm`` is part of torch.
4. The recipe we need is three ``_scaled_mm`` calls per linear: short enough to read, and its
   scaling logic is testable on CPU (the float8 dtypes and ``_scaled_mm`` exist there).

The cost of this choice: amax, scale and cast run as separate kernels (extra passes over each
operand), so the speedup is below TE's fused kernels. TE remains the fast path where installed.
"""

from __future__ import annotations

import functools
import importlib.util
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from an_megatron.errors import FieldError

TRANSFORMER_IMPLS = ("local", "transformer_engine")
FP8_FORMATS = ("e4m3", "hybrid")
FP8_RECIPES = ("delayed", "tensorwise", "mxfp8")
FP8_BACKENDS = ("te", "torch")
AMAX_COMPUTE_ALGOS = ("most_recent", "max")

# (activations and weights, gradients) per format, as in Transformer Engine's ``Format``.
FORMAT_DTYPES = {
    "e4m3": (torch.float8_e4m3fn, torch.float8_e4m3fn),
    "hybrid": (torch.float8_e4m3fn, torch.float8_e5m2),
}

TE_INSTALL_HINT = "pip install -e '.[fp8]' (transformer-engine[pytorch]; needs CUDA and its toolkit)"


# ---- settings ---------------------------------------------------------------------------------
def check_fp8(config) -> tuple[str | None, str | None]:
    """Validate the precision fields of a ``ModelConfig`` (one-line ``FieldError``s naming the
    fields; the command line names its flags instead) and return ``(fp8_backend, fp8_recipe)``
    resolved; the config is not written to. The defaults depend on other fields: backend
    ``te``; recipe ``delayed`` for TE (Megatron's default), ``tensorwise`` for the torch backend
    (the one it implements). Without FP8 both are None."""
    c = config
    if c.transformer_impl not in TRANSFORMER_IMPLS:
        raise _not_one_of("transformer_impl", c.transformer_impl, TRANSFORMER_IMPLS)
    if c.transformer_impl == "transformer_engine" and not transformer_engine_installed():
        raise FieldError(
            "{transformer_impl} transformer_engine: Transformer Engine is not installed; {hint}",
            "transformer_impl",
            hint=TE_INSTALL_HINT,
        )
    if c.fp8 is None:
        for name in ("fp8_recipe", "fp8_backend"):
            if getattr(c, name) is not None:
                raise FieldError(
                    "{%s} {value} has no effect without {fp8} (e4m3 or hybrid)" % name,
                    name,
                    "fp8",
                    value=getattr(c, name),
                )
        return None, None
    if c.fp8 not in FP8_FORMATS:
        raise _not_one_of("fp8", c.fp8, FP8_FORMATS)
    backend = c.fp8_backend or "te"
    if backend not in FP8_BACKENDS:
        raise _not_one_of("fp8_backend", backend, FP8_BACKENDS)
    recipe = c.fp8_recipe or ("delayed" if backend == "te" else "tensorwise")
    if recipe not in FP8_RECIPES:
        raise _not_one_of("fp8_recipe", recipe, FP8_RECIPES)
    if backend == "te" and c.transformer_impl != "transformer_engine":
        raise FieldError(
            "{fp8_backend} te needs {transformer_impl} transformer_engine "
            "(or {fp8_backend} torch, which needs no Transformer Engine)",
            "fp8_backend",
            "transformer_impl",
        )
    if backend == "torch" and c.transformer_impl != "local":
        raise FieldError(
            "{fp8_backend} torch swaps the matmul of the local linears: use {transformer_impl} local",
            "fp8_backend",
            "transformer_impl",
        )
    if backend == "torch" and recipe != "tensorwise":
        raise FieldError(
            "{fp8_backend} torch implements {fp8_recipe} tensorwise (per-tensor dynamic scaling) only, not {value!r}",
            "fp8_backend",
            "fp8_recipe",
            value=recipe,
        )
    if c.fp8_margin < 0:
        raise FieldError("{fp8_margin} {value} must be >= 0", "fp8_margin", value=c.fp8_margin)
    if c.fp8_amax_history_len < 1:
        history = c.fp8_amax_history_len
        raise FieldError("{fp8_amax_history_len} {value} must be >= 1", "fp8_amax_history_len", value=history)
    if c.fp8_amax_compute_algo not in AMAX_COMPUTE_ALGOS:
        raise _not_one_of("fp8_amax_compute_algo", c.fp8_amax_compute_algo, AMAX_COMPUTE_ALGOS)
    if recipe != "delayed" and (c.fp8_amax_history_len != 1 or c.fp8_amax_compute_algo != "most_recent"):
        raise FieldError(
            "{fp8_amax_history_len}/{fp8_amax_compute_algo} apply to {fp8_recipe} delayed only, not {value!r}",
            "fp8_amax_history_len",
            "fp8_amax_compute_algo",
            "fp8_recipe",
            value=recipe,
        )
    return backend, recipe


def _not_one_of(field: str, value, choices) -> FieldError:
    return FieldError("{%s} {value!r}: choose one of {choices}" % field, field, value=value, choices=", ".join(choices))


# ---- Transformer Engine -----------------------------------------------------------------------
class TransformerEngineMissing(ImportError):
    pass


def transformer_engine_installed() -> bool:
    """Whether TE can be imported, without importing it (checked when the flags ask for it)."""
    return importlib.util.find_spec("transformer_engine") is not None


def import_transformer_engine():
    """``transformer_engine`` (imported on first use), or a one-line error saying how to install it."""
    try:
        import transformer_engine
        import transformer_engine.pytorch  # noqa: F401
    except ImportError as e:
        raise TransformerEngineMissing(f"Transformer Engine is not available ({e}); {TE_INSTALL_HINT}") from None
    return transformer_engine


def te_recipe_kwargs(
    fp8_format: str, recipe: str, margin: int = 0, amax_history_len: int = 1, amax_compute_algo: str = "most_recent"
) -> tuple[str, dict]:
    """``(class name in transformer_engine.common.recipe, keyword arguments)`` for the flags, as
    megatron-core's ``get_fp8_recipe`` builds it; the format is the name of a ``Format`` member.
    Plain data, so it is testable without TE."""
    te_format = {"e4m3": "E4M3", "hybrid": "HYBRID"}[fp8_format]
    if recipe == "delayed":
        return "DelayedScaling", dict(
            fp8_format=te_format, margin=margin, amax_history_len=amax_history_len, amax_compute_algo=amax_compute_algo
        )
    return {"tensorwise": "Float8CurrentScaling", "mxfp8": "MXFP8BlockScaling"}[recipe], dict(fp8_format=te_format)


@functools.lru_cache(maxsize=4)
def _te_recipe(fp8_format, recipe, margin, amax_history_len, amax_compute_algo):
    te_recipe = import_transformer_engine().common.recipe
    name, kwargs = te_recipe_kwargs(fp8_format, recipe, margin, amax_history_len, amax_compute_algo)
    kwargs["fp8_format"] = getattr(te_recipe.Format, kwargs["fp8_format"])
    return getattr(te_recipe, name)(**kwargs)


def fp8_autocast(config):
    """The context to run the model's forward in: TE's ``fp8_autocast`` with the flags' recipe
    and the amax reduced over the tensor x data-parallel group (megatron-core's amax reduction
    group), or a no-op (no FP8, or the torch backend, whose scaling is per call)."""
    if config.fp8 is None or config.fp8_backend != "te":
        return nullcontext()
    from megatron.core import parallel_state

    te = import_transformer_engine()
    recipe = _te_recipe(
        config.fp8, config.fp8_recipe, config.fp8_margin, config.fp8_amax_history_len, config.fp8_amax_compute_algo
    )
    group = (
        parallel_state.get_amax_reduction_group(with_context_parallel=True)
        if parallel_state.model_parallel_is_initialized()
        else None
    )
    return te.pytorch.fp8_autocast(enabled=True, fp8_recipe=recipe, fp8_group=group)


# ---- torch FP8: per-tensor dynamic scaling -------------------------------------------------------
def fp8_max(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).max


def quantization_scale(amax: torch.Tensor, dtype: torch.dtype, margin: int = 0) -> torch.Tensor:
    """The factor that maps ``amax`` onto the format's largest value (``2^-margin`` below it),
    so the tensor uses the whole range. An all-zero tensor gets scale 1."""
    amax = amax.float()
    scale = fp8_max(dtype) / amax / 2.0**margin
    return torch.where(amax > 0, scale, torch.ones_like(scale))


def to_fp8_saturated(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast to FP8, clamping to the format's range first: a plain cast turns e5m2 overflow into
    inf, and fp32 rounding can put ``amax * scale`` just past the maximum."""
    limit = fp8_max(dtype)
    return x.clamp(-limit, limit).to(dtype)


def quantize(x: torch.Tensor, dtype: torch.dtype, margin: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``x * scale`` in FP8, and the dequantization factor ``1 / scale`` (what ``_scaled_mm``
    takes), with the scale from x's current amax."""
    scale = quantization_scale(x.detach().abs().amax(), dtype, margin)
    return to_fp8_saturated(x.float() * scale, dtype), scale.reciprocal()


def scaled_matmul(a: torch.Tensor, a_inv_scale, b: torch.Tensor, b_inv_scale, out_dtype) -> torch.Tensor:
    """``(a / s_a) @ (b / s_b)`` for FP8 ``a (m, k)``, ``b (k, n)``, accumulated in fp32. cuBLAS
    wants ``a`` row-major and ``b`` column-major; the copies are no-ops when already so."""
    return torch._scaled_mm(
        a.contiguous(), b.t().contiguous().t(), scale_a=a_inv_scale, scale_b=b_inv_scale, out_dtype=out_dtype
    )


@dataclass(frozen=True)
class FP8Scaling:
    """Formats of the torch backend: ``forward`` for activations and weights, ``grad`` for the
    output gradient; ``margin`` leaves ``2^margin`` headroom below the format's maximum."""

    forward: torch.dtype = torch.float8_e4m3fn
    grad: torch.dtype = torch.float8_e5m2
    margin: int = 0

    @classmethod
    def from_format(cls, fp8_format: str, margin: int = 0) -> "FP8Scaling":
        forward, grad = FORMAT_DTYPES[fp8_format]
        return cls(forward, grad, margin)


class FP8Matmul(torch.autograd.Function):
    """``y = x W^T`` with x and W in FP8, scaled per tensor from their current amax.

    Backward quantizes the output gradient (e5m2 in ``hybrid``) and reuses the FP8 copies of
    x and W saved in forward (half the activation memory of bf16):
    ``grad_x = g W``, ``grad_W = g^T x``, each one ``_scaled_mm``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, scaling: FP8Scaling):
        x2 = x.reshape(-1, x.shape[-1])
        xq, x_inv = quantize(x2, scaling.forward, scaling.margin)
        wq, w_inv = quantize(weight, scaling.forward, scaling.margin)
        y = scaled_matmul(xq, x_inv, wq.t(), w_inv, out_dtype=x.dtype)
        ctx.save_for_backward(xq, x_inv, wq, w_inv)
        ctx.scaling, ctx.x_shape, ctx.x_dtype, ctx.w_dtype = scaling, x.shape, x.dtype, weight.dtype
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        xq, x_inv, wq, w_inv = ctx.saved_tensors
        gq, g_inv = quantize(grad_y.reshape(-1, grad_y.shape[-1]), ctx.scaling.grad, ctx.scaling.margin)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = scaled_matmul(gq, g_inv, wq, w_inv, out_dtype=ctx.x_dtype).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            grad_w = scaled_matmul(gq.t(), g_inv, xq, x_inv, out_dtype=ctx.w_dtype)
        return grad_x, grad_w, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scaling: FP8Scaling) -> torch.Tensor:
    """``x W^T`` through ``FP8Matmul``. On CUDA, cuBLAS's FP8 GEMM needs the inner and outer
    sizes (features and the token count) to be multiples of 16: checked here, with the sizes."""
    if x.is_cuda:
        tokens = x.numel() // x.shape[-1]
        if x.shape[-1] % 16 or weight.shape[0] % 16 or tokens % 16:
            raise ValueError(
                f"FP8 linear needs sizes divisible by 16: in {x.shape[-1]}, out {weight.shape[0]}, "
                f"tokens per micro-batch {tokens}"
            )
    return FP8Matmul.apply(x, weight, scaling)
