"""Model flags (Megatron's names where Megatron has the concept) and the config they build."""

from __future__ import annotations

import argparse

from an_megatron.cli import positive_float, positive_int
from an_megatron.errors import FieldError
from an_megatron.model.arch import ARCH_SPECS
from an_megatron.model.config import DEFAULT_SCALES, WEIGHT_NORMS, ModelConfig
from an_megatron.model.factors import NU_ATT_OPTIONS
from an_megatron.model.fp8 import AMAX_COMPUTE_ALGOS, FP8_BACKENDS, FP8_FORMATS, FP8_RECIPES, TRANSFORMER_IMPLS
from an_megatron.model.recompute import GRANULARITIES, METHODS, SELECTIVE_RECOMPUTE


def _scale_spec(text: str):
    """``NAME=INIT`` or ``NAME=INIT,SCALE`` for ``--scale``."""
    try:
        name, value = text.split("=")
        init, _, scale = value.partition(",")
        if name not in DEFAULT_SCALES:
            raise ValueError
        numbers = positive_float(init), positive_float(scale) if scale else DEFAULT_SCALES[name][1]
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(
            f"--scale {text!r}: expected NAME=INIT[,SCALE] with NAME in {', '.join(DEFAULT_SCALES)} and "
            f"INIT, SCALE finite numbers > 0"
        ) from None
    return name, numbers


def add_model_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("model")
    g.add_argument("--arch", choices=tuple(ARCH_SPECS), default="angpt")
    g.add_argument("--num-layers", type=positive_int, default=4)
    g.add_argument("--hidden-size", type=positive_int, default=256)
    g.add_argument("--num-attention-heads", type=positive_int, default=4)
    g.add_argument("--ffn-hidden-size", type=positive_int, default=None, help="default 4 * hidden size")
    g.add_argument("--seq-length", type=positive_int, default=256)
    g.add_argument("--rotary-base", type=positive_float, default=10000.0)
    g.add_argument(
        "--nu-att",
        choices=NU_ATT_OPTIONS,
        default="gaussian",
        help="anGPT's factor after attention: gaussian (predicted from s_qk's logit variance; default), "
        "exact (sum of squared attention weights, from the kernels' log-sum-exp; one extra "
        "forward-only attention pass), dense (sqrt(t), the paper's uniform-attention assumption), none",
    )
    g.add_argument(
        "--alpha-init", type=positive_float, default=None, help="s_init of alpha_A and alpha_M (default 0.05)"
    )
    g.add_argument("--alpha-scalar", action="store_true", help="one alpha per block instead of a vector")
    g.add_argument("--no-nu-lerp", action="store_true", help="ablation: drop anGPT's residual factor")
    g.add_argument(
        "--weight-norm",
        choices=WEIGHT_NORMS,
        default=None,
        help="bound (anGPT), normalize (nGPT) or none (GPT+); default: the arch's own",
    )
    g.add_argument(
        "--scale",
        type=_scale_spec,
        action="append",
        default=[],
        metavar="NAME=INIT[,SCALE]",
        help=f"learnable scale init/reparameterization; NAME in {', '.join(DEFAULT_SCALES)}",
    )
    g.add_argument("--init-method-std", type=positive_float, default=0.02, help="GPT+ weight init std")
    g.add_argument(
        "--torch-compile",
        action="store_true",
        help="fuse the blocks' elementwise chains (residual, QK-norm, SwiGLU) with torch.compile",
    )
    add_fp8_args(parser)
    add_recompute_args(parser)
    return parser


def add_recompute_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron's activation recomputation flags (``model/recompute.py``)."""
    g = parser.add_argument_group("activation recomputation")
    g.add_argument(
        "--recompute-granularity",
        choices=GRANULARITIES,
        default=None,
        help="full: recompute whole blocks (needs --recompute-method); selective: recompute the parts of every "
        f"block that hold much memory and cost little to redo ({', '.join(SELECTIVE_RECOMPUTE)})",
    )
    g.add_argument(
        "--recompute-method",
        choices=METHODS,
        default=None,
        help="with full: uniform keeps only the input of each chunk of --recompute-num-layers consecutive blocks; "
        "block recomputes the first --recompute-num-layers blocks of each pipeline stage and keeps the others'",
    )
    g.add_argument(
        "--recompute-num-layers",
        type=positive_int,
        default=None,
        help="with full: blocks per chunk (uniform) or recomputed blocks per pipeline stage (block); default 1",
    )
    g.add_argument(
        "--recompute-activations",
        action="store_true",
        help="Megatron's alias for --recompute-granularity selective",
    )
    return parser


def recompute_granularity(args: argparse.Namespace) -> str | None:
    """``--recompute-granularity``, with ``--recompute-activations`` as ``selective``; a
    conflict between the two is a ``FieldError`` naming both."""
    if not getattr(args, "recompute_activations", False):
        return args.recompute_granularity
    if args.recompute_granularity not in (None, "selective"):
        raise FieldError(
            "{recompute_activations} means {recompute_granularity} selective; it conflicts with "
            "{recompute_granularity} {value}",
            "recompute_activations",
            "recompute_granularity",
            value=args.recompute_granularity,
        )
    return "selective"


def add_fp8_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron's precision flags, plus ``--fp8-backend`` (docs/FP8.md)."""
    g = parser.add_argument_group("transformer engine and FP8")
    g.add_argument(
        "--transformer-impl",
        choices=TRANSFORMER_IMPLS,
        default="local",
        help="local: megatron-core's linears; transformer_engine: TE's (pip install -e '.[fp8]', CUDA)",
    )
    g.add_argument(
        "--fp8-format",
        dest="fp8",
        choices=FP8_FORMATS,
        default=None,
        help="train the linears in FP8: e4m3 everywhere, or hybrid (e4m3 forward, e5m2 gradients)",
    )
    g.add_argument(
        "--fp8-recipe",
        choices=FP8_RECIPES,
        default=None,
        help="scaling recipe; default delayed with --fp8-backend te, tensorwise with torch",
    )
    g.add_argument(
        "--fp8-backend",
        choices=FP8_BACKENDS,
        default=None,
        help="te: Transformer Engine (default); torch: torch._scaled_mm, per-tensor dynamic scaling",
    )
    g.add_argument("--fp8-margin", type=int, default=0, help="scale so that amax sits 2^margin below the maximum")
    g.add_argument("--fp8-amax-history-len", type=positive_int, default=1, help="delayed scaling: amax history length")
    g.add_argument(
        "--fp8-amax-compute-algo",
        choices=AMAX_COMPUTE_ALGOS,
        default="most_recent",
        help="delayed scaling: scale from the most recent amax or the history's max",
    )
    return parser


def model_config_kwargs(args: argparse.Namespace) -> dict:
    """The ``ModelConfig`` fields the model flags set: all but ``vocab_size`` (the padded
    vocabulary, which the tokenizer decides)."""
    scales = dict(args.scale)
    if args.alpha_init is not None:
        scales["alpha"] = (args.alpha_init, scales.get("alpha", DEFAULT_SCALES["alpha"])[1])
    return dict(
        arch=args.arch,
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        ffn_hidden_size=args.ffn_hidden_size,
        seq_length=args.seq_length,
        rope_theta=args.rotary_base,
        nu_att=args.nu_att,
        use_nu_lerp=not args.no_nu_lerp,
        alpha_per_dim=not args.alpha_scalar,
        scales=scales,
        weight_norm=args.weight_norm,
        init_std=args.init_method_std,
        torch_compile=args.torch_compile,
        tensor_model_parallel_size=getattr(args, "tensor_model_parallel_size", 1),
        seed=getattr(args, "seed", 1234),
        transformer_impl=args.transformer_impl,
        fp8=args.fp8,
        fp8_recipe=args.fp8_recipe,
        fp8_backend=args.fp8_backend,
        fp8_margin=args.fp8_margin,
        fp8_amax_history_len=args.fp8_amax_history_len,
        fp8_amax_compute_algo=args.fp8_amax_compute_algo,
        recompute_granularity=recompute_granularity(args),
        recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers,
    )


def model_config_from_args(args: argparse.Namespace, vocab_size: int) -> ModelConfig:
    """The model the flags in `args` describe, holding a (padded) vocabulary of `vocab_size`."""
    return ModelConfig(**model_config_kwargs(args), vocab_size=vocab_size)
