#!/usr/bin/env python
"""Measure, per layer, the norm of every quantity an anGPT factor claims to normalize.

    python tools/measure_norms.py --arch angpt --num-layers 4 --hidden-size 512 --num-attention-heads 8 --json

Each quantity should be near 1 for anGPT (its factors are expected values for random unit
vectors); this shows whether that holds for your shapes, on random tokens or on the first
sequences of a preprocessed corpus (``--data-path``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import torch

from an_megatron.cli import ArgumentParser, positive_int, seed_int
from an_megatron.model import GPTModel
from an_megatron.model.arguments import add_model_args, model_config_from_args
from an_megatron.model.diagnostics import measure_norms
from an_megatron.model.factors import NU_ATT_OPTIONS
from an_megatron.model.gpt import Attention
from an_megatron.parallel import destroy_parallel, initialize_parallel
from an_megatron.training.arguments import MODEL_FIELD_FLAGS, config_error


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--vocab-size", type=positive_int, default=32000, help="vocabulary of random tokens / the model")
    p.add_argument("--micro-batch-size", type=positive_int, default=4)
    p.add_argument("--seed", type=seed_int, default=1234)
    p.add_argument(
        "--data-path", default=None, help="prefix of a preprocessed corpus (.bin/.idx); random tokens if absent"
    )
    p.add_argument("--json", action="store_true", help="one JSON object per measured quantity")
    p.add_argument(
        "--load",
        default=None,
        help="measure these weights: a checkpoint directory or a file from "
        "tools/convert_checkpoint.py consolidate (its config replaces the model flags)",
    )
    p.add_argument(
        "--with-nu-att",
        choices=NU_ATT_OPTIONS,
        default=None,
        help="with --load: measure the loaded weights under this attention factor instead of their own",
    )
    args = p.parse_args(argv)
    if args.with_nu_att and not args.load:
        p.error(f"--with-nu-att {args.with_nu_att} needs --load (without it, give --nu-att)")
    if not args.load:
        try:
            args.config = model_config_from_args(args, args.vocab_size)
        except ValueError as e:
            p.error(str(config_error(e, {**MODEL_FIELD_FLAGS, "vocab_size": "--vocab-size"})))
    return args


def corpus_tokens(prefix: str, batch: int, seq: int, vocab: int) -> torch.Tensor:
    """The first ``batch * seq`` tokens of the corpus, as ``(batch, seq)``."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from an_megatron.data import DataError, check_indexed_dataset

    try:
        check_indexed_dataset(prefix)
    except DataError as e:
        raise SystemExit(f"error: --data-path: {e}") from None
    ds = IndexedDataset(prefix)
    need, chunks, i = batch * seq, [], 0
    while sum(map(len, chunks)) < need and i < len(ds):
        chunks.append(torch.as_tensor(ds[i].astype("int64")))
        i += 1
    tokens = torch.cat(chunks)[:need]
    if tokens.numel() < need:
        raise SystemExit(f"error: --data-path {prefix}: corpus has {tokens.numel()} tokens, need {need}")
    if int(tokens.max()) >= vocab:
        raise SystemExit(f"error: --data-path {prefix}: token id {int(tokens.max())} >= --vocab-size {vocab}")
    return tokens.view(batch, seq)


@contextlib.contextmanager
def _stdout_to_stderr():
    """Send everything written to file descriptor 1 (prints, loggers) to stderr meanwhile."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def main(argv=None) -> int:
    args = parse_args(argv)
    initialize_parallel(1, 1)
    try:
        torch.manual_seed(args.seed)
        if args.load:
            from an_megatron.training.convert import ConvertError, load_into_model

            try:
                with _stdout_to_stderr():  # DeepSpeed's loader logs to stdout: keep --json output clean
                    model = load_into_model(args.load)
            except ConvertError as e:
                raise SystemExit(f"error: {e}") from None
            if args.with_nu_att:
                from dataclasses import replace

                model.config = replace(model.config, nu_att=args.with_nu_att)
                for module in model.modules():
                    if isinstance(module, Attention):  # the spec's factors under the new nu_att
                        module.factors = model.config.spec.factors(model.config)
            config = model.config
            args.vocab_size, args.seq_length = config.vocab_size, config.seq_length
        else:
            config = args.config
            model = GPTModel(config)
        if args.data_path:
            tokens = corpus_tokens(args.data_path, args.micro_batch_size, args.seq_length, args.vocab_size)
        else:
            tokens = torch.randint(0, args.vocab_size, (args.micro_batch_size, args.seq_length))
        records = measure_norms(model, tokens)
    finally:
        destroy_parallel()
    if args.json:
        for r in records:
            print(json.dumps(r))
        return 0
    print(
        f"{config.arch}: d={config.hidden_size} H={config.num_attention_heads} f={config.ffn_hidden_size} "
        f"T={config.seq_length} nu_att={config.nu_att}; norms over {tokens.numel()} tokens (target 1)"
    )
    print(f"{'layer':>5}  {'quantity':<32} {'mean':>8} {'std':>8} {'max':>10}")
    for r in records:
        layer = "-" if r["layer"] is None else r["layer"]
        print(f"{layer:>5}  {r['what']:<32} {r['mean']:8.4f} {r['std']:8.4f} {r['max']:10.4g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
