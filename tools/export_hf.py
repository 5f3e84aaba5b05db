#!/usr/bin/env python
"""Export a trained model as a Hugging Face transformers directory, with the factors folded in.

    python tools/export_hf.py --load ckpt --output hf_model [--dtype fp32|bf16]
        [--tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model]

--load: a training checkpoint directory (any TP/PP/DP/ZeRO layout) or a file written by
tools/convert_checkpoint.py consolidate. The tokenizer defaults to the one the checkpoint's run
recorded. The result loads with

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True); AutoTokenizer.from_pretrained(DIR)

See an_megatron/hf/export.py for what is folded into which weight.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout's package


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint directory or consolidated file")
    p.add_argument("--output", required=True, help="directory to create (must not exist, or be empty)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="weights' precision (default fp32)")
    p.add_argument("--tokenizer-type", default=None, help="default: the one the checkpoint recorded")
    p.add_argument("--tokenizer-model", default=None, help="SentencePiece .model or tokenizer.json")
    p.add_argument("--vocab-file", default=None, help="GPT2BPETokenizer's vocab.json")
    p.add_argument("--merge-file", default=None, help="GPT2BPETokenizer's merges.txt")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from an_megatron.hf.export import ExportError, export

    tokenizer = dict(
        tokenizer_type=args.tokenizer_type,
        tokenizer_model=args.tokenizer_model,
        vocab_file=args.vocab_file,
        merge_file=args.merge_file,
    )
    try:
        info = export(args.load, args.output, tokenizer, args.dtype)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    tok = info["tokenizer"] or "none (integer ids: no tokenizer files)"
    print(
        f"wrote {args.output}: {info['arch']}, {info['parameters']:,} parameters, iteration {info['iteration']}, "
        f"{info['dtype']}, tokenizer {tok}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
