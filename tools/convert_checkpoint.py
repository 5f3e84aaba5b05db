#!/usr/bin/env python
"""Consolidate a training checkpoint into one fp32 file, or write it for another parallel layout.

    # any TP/PP/DP/ZeRO checkpoint -> one fp32 GPTModel state dict + its config
    python tools/convert_checkpoint.py consolidate --load ckpt --output model.pt [--tag iter_0000100]

    # a consolidated file (or a checkpoint directory) -> a weights-only checkpoint for TP=2, PP=1
    python tools/convert_checkpoint.py reshard --input model.pt --save ckpt_tp2 \\
        --target-tensor-model-parallel-size 2 --target-pipeline-model-parallel-size 1

    # then train from it with a fresh optimizer (ZeRO stage 0-2)
    torchrun --nproc_per_node 2 examples/pretrain_angpt.py ... --tensor-model-parallel-size 2 \\
        --load ckpt_tp2 --no-load-optim

See an_megatron/training/convert.py for how each step works and why.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from an_megatron.cli import ArgumentParser, output_dir, output_file, positive_int


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("consolidate", help="checkpoint directory -> one fp32 file")
    c.add_argument("--load", required=True, help="checkpoint directory (holds 'latest' and iter_NNNNNNN/)")
    c.add_argument("--tag", default=None, help="iteration directory to read (default: the one 'latest' names)")
    c.add_argument("--output", type=output_file, required=True, help="file to write (torch.save)")
    r = sub.add_parser("reshard", help="consolidated file or checkpoint directory -> weights-only checkpoint")
    r.add_argument("--input", required=True, help="consolidated file, or a checkpoint directory")
    r.add_argument("--save", type=output_dir, required=True, help="directory to write the checkpoint to")
    r.add_argument(
        "--overwrite-save",
        action="store_true",
        help="write into a --save directory that already holds checkpoints (an existing tag is still refused)",
    )
    r.add_argument("--target-tensor-model-parallel-size", type=positive_int, default=1)
    r.add_argument("--target-pipeline-model-parallel-size", type=positive_int, default=1)
    return p.parse_args(argv)


def main(argv=None) -> int:
    from an_megatron.training.convert import (
        ConvertError,
        check_target_layout,
        consolidate,
        refuse_existing,
        write_layout,
    )

    args = parse_args(argv)
    try:
        if args.command == "consolidate":
            obj = consolidate(args.load, args.tag)
            os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
            torch.save(obj, args.output)
            n = sum(t.numel() for t in obj["model"].values())
            print(
                f"wrote {args.output}: {len(obj['model'])} tensors, {n:,} parameters, iteration {obj['iteration']}, "
                f"from {obj['source']}"
            )
            return 0
        refuse_existing(args.save, args.overwrite_save)  # before anything is written there
        src = args.input
        if os.path.isdir(src):  # consolidate on the fly, next to the output
            obj = consolidate(args.input)
            check_target_layout(
                obj["config"], args.target_tensor_model_parallel_size, args.target_pipeline_model_parallel_size
            )
            os.makedirs(args.save, exist_ok=True)
            src = os.path.join(args.save, "consolidated.pt")
            torch.save(obj, src)
        out = write_layout(
            src,
            args.save,
            args.target_tensor_model_parallel_size,
            args.target_pipeline_model_parallel_size,
            overwrite=args.overwrite_save,
        )
        print(f"wrote {out} (weights only: load with --no-load-optim)")
        return 0
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
