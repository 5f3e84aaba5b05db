"""Size, FLOPs and expected wall time of a pretrain_angpt.py configuration, before launching it.

    python examples/paper_0.5b/estimate.py --gpus 8 [--mfu 0.4] -- PRETRAIN FLAGS...

The flags are parsed by the trainer's own parser (so a typo fails here, not on the cluster);
the data is not opened: the vocabulary is GPT-NeoX's 50277 ids unless --vocab-size says
otherwise. FLOPs per token are the trainer's own count (``metrics.flops_per_token``, the figure
its MFU log uses); the time assumes the stated MFU of the GPUs' dense bf16 peak.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from an_megatron.training.arguments import ConfigError, parse_args  # noqa: E402
from an_megatron.training.metrics import KNOWN_PEAK_TFLOPS, flops_per_token  # noqa: E402

GPT_NEOX_VOCAB = 50277


def matmul_parameters(config) -> int:
    """Weights of the matmuls and the embedding (the learned scales and gains add < 0.1%)."""
    d, f, V, L = config.hidden_size, config.ffn_hidden_size, config.vocab_size, config.num_layers
    return L * (4 * d * d + 3 * d * f) + 2 * V * d


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=8, help="GPUs the run is spread over (data parallel)")
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilization")
    parser.add_argument("--vocab-size", type=int, default=GPT_NEOX_VOCAB)
    parser.add_argument("flags", nargs=argparse.REMAINDER, help="-- then pretrain_angpt.py's flags")
    args = parser.parse_args(argv)
    flags = args.flags[1:] if args.flags[:1] == ["--"] else args.flags
    try:
        cfg, _ = parse_args(flags, world_size=args.gpus)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    config = cfg.model_config(cfg.data.padded_vocab_size(args.vocab_size))
    tokens = cfg.train_iters * cfg.global_batch_size * cfg.seq_length
    flops = flops_per_token(config) * tokens
    print(
        f"{cfg.arch}: {matmul_parameters(config) / 1e9:.3f}B parameters (vocabulary {config.vocab_size}), "
        f"{cfg.train_iters} steps x {cfg.global_batch_size} x {cfg.seq_length} = {tokens / 1e9:.2f}B tokens, "
        f"{flops_per_token(config) / 1e9:.2f} GFLOP per token, {flops:.3g} FLOPs in all"
    )
    for gpu in ("H100", "H200"):
        seconds = flops / (KNOWN_PEAK_TFLOPS[gpu] * 1e12 * args.mfu)
        print(
            f"  {gpu} ({KNOWN_PEAK_TFLOPS[gpu]:.0f} TFLOP/s bf16 dense) at {args.mfu:.0%} MFU: "
            f"{seconds / 3600:.1f} h on one GPU, {seconds / 3600 / args.gpus:.1f} h on {args.gpus}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
