"""Train a SentencePiece BPE tokenizer (byte fallback, <EOD>) on jsonl or text files.

    python tools/train_tokenizer.py --input corpus.jsonl --json-keys text --vocab-size 8000 \\
        --output-prefix tok

writes tok.model and tok.vocab; use them with --tokenizer-type SentencePieceTokenizer (end of
document <EOD>) or GPTSentencePieceTokenizer (end of document </s>) and --tokenizer-model tok.model.
Files ending in .jsonl/.json (optionally .gz) are read as JSON lines, others as plain text.
"""

import sys

from an_megatron.cli import ArgumentParser, float_in, int_in, output_prefix, positive_int
from an_megatron.data.cli import run_tool


def main(argv=None) -> None:
    from an_megatron.data.tokenizer_training import train_sentencepiece

    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", nargs="+", required=True, help="files or globs")
    parser.add_argument(
        "--json-keys", nargs="+", default=["text"], help="keys whose text is used, for JSON lines input"
    )
    parser.add_argument("--vocab-size", type=positive_int, required=True)
    parser.add_argument("--output-prefix", type=output_prefix, required=True, help="writes {prefix}.model and .vocab")
    parser.add_argument(
        "--sample-sentences",
        type=positive_int,
        default=2_000_000,
        help="train on a uniform random sample of at most this many lines",
    )
    parser.add_argument(
        "--max-sentence-length",
        type=int_in(10),
        default=4192,
        help="lines longer than this many bytes are split at whitespace (SentencePiece needs >= 10)",
    )
    parser.add_argument(
        "--character-coverage",
        type=float_in(0.98, 1),
        default=0.9995,
        help="share of characters given their own piece; the rest use bytes (SentencePiece: 0.98 to 1)",
    )
    parser.add_argument(
        "--skip-bad-lines", action="store_true", help="skip (and count) bad JSON lines instead of stopping"
    )
    parser.add_argument("--num-threads", type=positive_int, default=None)
    parser.add_argument("--verbose", action="store_true", help="show SentencePiece's log")
    args = parser.parse_args(argv)
    stats = train_sentencepiece(
        args.input,
        args.output_prefix,
        args.vocab_size,
        json_keys=args.json_keys,
        sample_sentences=args.sample_sentences,
        max_sentence_length=args.max_sentence_length,
        character_coverage=args.character_coverage,
        skip_bad_lines=args.skip_bad_lines,
        num_threads=args.num_threads,
        verbose=args.verbose,
    )
    print(f"read {stats.documents} documents, {stats.sentences} lines from {stats.files} files")
    print(
        f"split {stats.long_lines_split} lines longer than {args.max_sentence_length} bytes "
        f"into {stats.pieces_from_long_lines} pieces"
    )
    if stats.bad_lines:
        print(f"skipped {stats.bad_lines} bad lines")
        for line in stats.first_bad_lines:
            print(f"  skipped {line}")
    print(
        f"trained SentencePiece BPE, vocab size {args.vocab_size}, in {stats.seconds:.1f} s: "
        f"{args.output_prefix}.model, {args.output_prefix}.vocab"
    )
    print("special ids: <unk>=0 <s>=1 </s>=2 <pad>=3 <CLS>=4 <SEP>=5 <EOD>=6 <MASK>=7")


if __name__ == "__main__":
    sys.exit(run_tool(main))
