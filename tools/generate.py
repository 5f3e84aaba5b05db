#!/usr/bin/env python
"""Sample text from a training checkpoint, a consolidated file or an exported directory.

    python tools/generate.py --load hf_model --prompt "In the beginning" --max-new-tokens 50
    python tools/generate.py --load ckpt --prompt "In the beginning" --temperature 0.8 --top-k 40 --top-p 0.95

An exported directory (tools/export_hf.py) is loaded with transformers' Auto classes; a checkpoint
(any TP/PP/DP/ZeRO layout) or consolidated file is folded in memory into the same modeling code,
with the tokenizer its run recorded (or --tokenizer-type/--tokenizer-model). Generation is
transformers' generate() with the KV cache; --temperature 0 decodes greedily. With a
NullTokenizer checkpoint the prompt and output are whitespace-separated token ids.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout's package


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="exported directory, checkpoint directory or consolidated file")
    p.add_argument("--prompt", default="", help="text to continue (default: start a document)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy decoding")
    p.add_argument("--top-k", type=int, default=40, help="0: no top-k filter")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer-type", default=None, help="for a checkpoint: default the one it recorded")
    p.add_argument("--tokenizer-model", default=None)
    return p.parse_args(argv)


def _exported(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and os.path.isfile(os.path.join(path, "modeling_angpt.py"))


def load(args):
    """``(model, encode, decode, start id)``."""
    if _exported(args.load):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.load, trust_remote_code=True).eval()
        if not os.path.isfile(os.path.join(args.load, "tokenizer.json")):
            return model, _ids, _text, model.config.eos_token_id
        tok = AutoTokenizer.from_pretrained(args.load, trust_remote_code=True)
        return model, (lambda s: tok(s, add_special_tokens=False)["input_ids"]), tok.decode, tok.eos_token_id
    from an_megatron.hf.export import folded_model, load_source

    settings = dict(tokenizer_type=args.tokenizer_type, tokenizer_model=args.tokenizer_model)
    obj, config, tok, _ = load_source(args.load, settings)
    model = folded_model(obj["model"], config, tok)
    if tok is None:
        return model, _ids, _text, None
    return model, tok.tokenize, tok.detokenize, tok.eod


def _ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split()]
    except ValueError:
        raise SystemExit(f"error: --prompt {text[:40]!r}: this model has no tokenizer; give token ids") from None


def _text(ids) -> str:
    return " ".join(str(int(i)) for i in ids)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from an_megatron.hf.export import ExportError

    try:
        model, encode, decode, start = load(args)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    ids = encode(args.prompt) if args.prompt else []
    if not ids:
        if start is None:
            print("error: --prompt is empty and the model has no end-of-document token to start from", file=sys.stderr)
            return 1
        ids = [start]
    torch.manual_seed(args.seed)
    sample = args.temperature > 0
    options = dict(temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p) if sample else {}
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=args.max_new_tokens, do_sample=sample, use_cache=True, **options
        )
    print(decode(out[0].tolist()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
