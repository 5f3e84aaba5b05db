"""Tokenize jsonl corpora into Megatron indexed datasets ({prefix}_{key}_document.bin/.idx).

Same flags and output as Megatron-LM's tools/preprocess_data.py, plus --skip-bad-lines. Streams
.jsonl and .jsonl.gz input; see an_megatron/data/preprocess.py for how.

    python tools/preprocess_data.py --input corpus.jsonl --json-keys text \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model \\
        --output-prefix data/corpus --append-eod --workers 2
"""

import argparse
import sys

from an_megatron.cli import ArgumentParser, output_prefix, positive_int
from an_megatron.data.cli import run_tool
from an_megatron.data.tokenizers import TOKENIZER_TYPES


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_argument_group("input data")
    group.add_argument(
        "--input", nargs="+", required=True, help="jsonl or jsonl.gz files or globs, one JSON object per line"
    )
    group.add_argument(
        "--json-keys", nargs="+", default=["text"], help="keys to extract from each object; one output dataset per key"
    )
    group.add_argument(
        "--skip-bad-lines",
        action="store_true",
        help="skip (and count) lines that are not JSON objects holding a string "
        "under every key, instead of stopping at the first one",
    )
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    group.add_argument("--tokenizer-model", help="SentencePiece .model or HuggingFace tokenizer.json")
    group.add_argument("--vocab-file", help="GPT-2 vocab.json")
    group.add_argument("--merge-file", help="GPT-2 merges.txt")
    group.add_argument("--vocab-size", type=positive_int, help="NullTokenizer's number of ids (eod is this id)")
    group.add_argument("--append-eod", action="store_true", help="append the end-of-document token to every document")
    group = parser.add_argument_group("output data")
    group.add_argument(
        "--output-prefix",
        type=output_prefix,
        required=True,
        help="writes {prefix}_{key}_document.bin, .idx and .stats.json (largest token id, tokenizer)",
    )
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=positive_int, default=1, help="tokenizing processes")
    group.add_argument(
        "--partitions",
        type=positive_int,
        default=1,
        help="accepted for Megatron compatibility; input is streamed to --workers "
        "processes, so splitting it into partitions is not needed",
    )
    group.add_argument(
        "--log-interval",
        type=positive_int,
        default=1000,
        help="documents between progress lines when stderr is not a terminal",
    )
    return parser


def main(argv=None) -> None:
    from an_megatron.data.preprocess import preprocess

    args = build_parser().parse_args(argv)
    if args.partitions != 1:
        print(
            f"note: --partitions {args.partitions} ignored: the input is streamed to "
            f"--workers {args.workers} processes without partitioning",
            file=sys.stderr,
        )
    stats = preprocess(
        args.input,
        args.json_keys,
        args,
        args.output_prefix,
        append_eod=args.append_eod,
        workers=args.workers,
        log_interval=args.log_interval,
        skip_bad_lines=args.skip_bad_lines,
    )
    for line in stats.summary_lines():
        print(line)


if __name__ == "__main__":
    sys.exit(run_tool(main))
