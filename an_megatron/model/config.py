"""The model's configuration: one dataclass for anGPT, nGPT and GPT+, validated on creation."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from an_megatron.errors import FieldError
from an_megatron.model.arch import ARCH_SPECS, ARCHS, ArchSpec  # noqa: F401 (ARCHS: its importers)
from an_megatron.model.factors import check_nu_att
from an_megatron.model.fp8 import check_fp8
from an_megatron.model.recompute import check_recompute

WEIGHT_NORMS = ("bound", "normalize", "none")
POSITIVE_INT_FIELDS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "ffn_hidden_size",
    "vocab_size",
    "seq_length",
    "tensor_model_parallel_size",
)

# (s_init, s_scale) per learnable scale; None means 1/sqrt(d). nGPT's values (ANGPT.md).
DEFAULT_SCALES = {
    "alpha": (0.05, None),  # alpha_A and alpha_M, per layer
    "s_qk": (1.0, None),
    "s_u": (1.0, 1.0),
    "s_v": (1.0, 1.0),
    "s_z": (1.0, None),
}


@dataclass(frozen=True)
class ModelConfig:
    """Frozen: the defaults that depend on other fields (ffn_hidden_size, weight_norm, the FP8
    backend and recipe) are resolved in ``__post_init__``; change a field with
    ``dataclasses.replace``, which validates again."""

    arch: str = "angpt"  # a key of arch.ARCH_SPECS
    num_layers: int = 4
    hidden_size: int = 256
    num_attention_heads: int = 4
    ffn_hidden_size: int | None = None  # default 4 * hidden_size
    vocab_size: int = 256  # the (padded) vocabulary the model holds
    seq_length: int = 256
    rope_theta: float = 10000.0
    # anGPT's open choices (ANGPT.md, "Open choices"); defaults backed by benchmarks/RESULTS.md.
    nu_att: str = "gaussian"
    use_nu_lerp: bool = True  # ablation switch: without it the paper reports instability
    alpha_per_dim: bool = True  # alpha as a vector in R^d (nGPT) or one scalar per block
    # Learnable scales: {name: (s_init, s_scale)}; unspecified names use DEFAULT_SCALES.
    scales: dict = field(default_factory=dict)
    # How weights are kept in the unit ball: anGPT bounds rows, nGPT normalizes exactly, GPT+
    # uses weight decay instead. None picks the architecture's own.
    weight_norm: str | None = None
    init_std: float = 0.02  # GPT+'s normal_init; anGPT and nGPT start from unit-norm rows
    norm_eps: float = 1e-6  # RMSNorm (GPT+)
    tensor_model_parallel_size: int = 1
    seed: int = 1234
    # Precision of the linears (docs/FP8.md; Megatron's flags). fp8 is the format: None (bf16/fp32),
    # "e4m3" or "hybrid". Recipe and backend None resolve in check_fp8.
    transformer_impl: str = "local"
    fp8: str | None = None
    fp8_recipe: str | None = None
    fp8_backend: str | None = None
    fp8_margin: int = 0
    fp8_amax_history_len: int = 1
    fp8_amax_compute_algo: str = "most_recent"
    # Compile the blocks' elementwise chains (residual update, QK-norm, SwiGLU product) with
    # torch.compile: each becomes one fused kernel forward and one backward (components.compiled).
    torch_compile: bool = False
    # Activation recomputation (Megatron's flags; model/recompute.py): None, "full" or
    # "selective"; full's method ("uniform" or "block") and number of layers (default 1). It
    # changes what backward keeps, never the math: checkpoints and exports do not depend on it.
    recompute_granularity: str | None = None
    recompute_method: str | None = None
    recompute_num_layers: int | None = None

    def __post_init__(self):
        if self.arch not in ARCH_SPECS:
            raise ValueError(f"unknown arch {self.arch!r}; choose one of {', '.join(ARCH_SPECS)}")
        check_nu_att(self.nu_att)
        resolved = dict(zip(("fp8_backend", "fp8_recipe"), check_fp8(self)))
        if self.ffn_hidden_size is None:
            resolved["ffn_hidden_size"] = 4 * self.hidden_size
        if self.weight_norm is None:
            resolved["weight_norm"] = self.spec.weight_norm
        for name, value in resolved.items():  # construction, not mutation: frozen from here on
            object.__setattr__(self, name, value)
        if self.weight_norm not in WEIGHT_NORMS:
            raise ValueError(f"unknown weight_norm {self.weight_norm!r}; choose one of {', '.join(WEIGHT_NORMS)}")
        unknown = set(self.scales) - set(DEFAULT_SCALES)
        if unknown:
            raise ValueError(f"unknown learnable scale(s) {sorted(unknown)}; known: {sorted(DEFAULT_SCALES)}")
        self._check_ranges()
        object.__setattr__(self, "recompute_num_layers", check_recompute(self))  # 1 for full when not given
        d, H, tp = self.hidden_size, self.num_attention_heads, self.tensor_model_parallel_size
        if d % H:
            raise ValueError(f"hidden-size {d} is not divisible by num-attention-heads {H}")
        if (d // H) % 2:
            raise ValueError(f"head size {d // H} (hidden-size / num-attention-heads) must be even for RoPE")
        if H % tp:
            raise ValueError(f"tensor-model-parallel-size {tp} does not divide num-attention-heads {H}")
        if self.ffn_hidden_size % tp:
            raise ValueError(f"tensor-model-parallel-size {tp} does not divide ffn-hidden-size {self.ffn_hidden_size}")
        if self.vocab_size % tp:
            raise ValueError(
                f"tensor-model-parallel-size {tp} does not divide the padded vocabulary size {self.vocab_size}"
            )

    def _check_ranges(self) -> None:
        """Sizes are positive integers; the RoPE base, init std and learnable scales positive."""
        for name in POSITIVE_INT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise FieldError("{%s} {value}: must be an integer >= 1" % name, name, value=value)
        for name in ("rope_theta", "init_std"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise FieldError("{%s} {value}: must be a finite number > 0" % name, name, value=value)
        for name, (s_init, s_scale) in self.scales.items():
            if not all(math.isfinite(v) and v > 0 for v in (s_init, 1.0 if s_scale is None else s_scale)):
                raise FieldError(
                    "{scales} {name}={init},{scale}: INIT and SCALE must be finite numbers > 0",
                    "scales",
                    name=name,
                    init=s_init,
                    scale=s_scale,
                )

    @property
    def spec(self) -> ArchSpec:
        return ARCH_SPECS[self.arch]

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def scale_init(self, name: str) -> tuple[float, float]:
        """(s_init, s_scale) of a learnable scale, with s_scale None resolved to 1/sqrt(d)."""
        s_init, s_scale = self.scales.get(name, DEFAULT_SCALES[name])
        return s_init, (1.0 / math.sqrt(self.hidden_size) if s_scale is None else s_scale)

    def to_dict(self) -> dict:
        return asdict(self)
