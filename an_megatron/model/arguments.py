"""Model flags (Megatron's names where Megatron has the concept) and the config they build."""
from __future__ import annotations

import argparse

from an_megatron.model.config import ARCHS, DEFAULT_SCALES, WEIGHT_NORMS, ModelConfig
from an_megatron.model.factors import NU_ATT_OPTIONS


def _scale_spec(text: str):
    """``NAME=INIT`` or ``NAME=INIT,SCALE`` for ``--scale``."""
    try:
        name, value = text.split("=")
        init, _, scale = value.partition(",")
        if name not in DEFAULT_SCALES:
            raise ValueError
        return name, (float(init), float(scale) if scale else DEFAULT_SCALES[name][1])
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--scale {text!r}: expected NAME=INIT[,SCALE] with NAME in {', '.join(DEFAULT_SCALES)}"
        ) from None


def add_model_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("model")
    g.add_argument("--arch", choices=ARCHS, default="angpt")
    g.add_argument("--num-layers", type=int, default=4)
    g.add_argument("--hidden-size", type=int, default=256)
    g.add_argument("--num-attention-heads", type=int, default=4)
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="default 4 * hidden size")
    g.add_argument("--seq-length", type=int, default=256)
    g.add_argument("--rotary-base", type=float, default=10000.0)
    g.add_argument("--nu-att", choices=NU_ATT_OPTIONS, default="dense", help="anGPT's factor after attention")
    g.add_argument("--alpha-init", type=float, default=None, help="s_init of alpha_A and alpha_M (default 0.05)")
    g.add_argument("--alpha-scalar", action="store_true", help="one alpha per block instead of a vector")
    g.add_argument("--no-nu-lerp", action="store_true", help="ablation: drop anGPT's residual factor")
    g.add_argument("--weight-norm", choices=WEIGHT_NORMS, default=None,
                   help="bound (anGPT), normalize (nGPT) or none (GPT+); default: the arch's own")
    g.add_argument("--scale", type=_scale_spec, action="append", default=[], metavar="NAME=INIT[,SCALE]",
                   help=f"learnable scale init/reparameterization; NAME in {', '.join(DEFAULT_SCALES)}")
    g.add_argument("--init-method-std", type=float, default=0.02, help="GPT+ weight init std")
    return parser


def model_config_from_args(args: argparse.Namespace, vocab_size: int) -> ModelConfig:
    scales = dict(args.scale)
    if args.alpha_init is not None:
        scales["alpha"] = (args.alpha_init, scales.get("alpha", DEFAULT_SCALES["alpha"])[1])
    return ModelConfig(
        arch=args.arch, num_layers=args.num_layers, hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads, ffn_hidden_size=args.ffn_hidden_size,
        vocab_size=vocab_size, seq_length=args.seq_length, rope_theta=args.rotary_base, nu_att=args.nu_att,
        use_nu_lerp=not args.no_nu_lerp, alpha_per_dim=not args.alpha_scalar, scales=scales,
        weight_norm=args.weight_norm, init_std=args.init_method_std,
        tensor_model_parallel_size=getattr(args, "tensor_model_parallel_size", 1), seed=getattr(args, "seed", 1234),
    )
