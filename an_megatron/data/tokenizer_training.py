"""Training a SentencePiece BPE tokenizer on jsonl or text corpora (tools/train_tokenizer.py).

Input is streamed to SentencePiece's trainer through `sentence_iterator`; the trainer keeps a
uniform random sample of at most `sample_sentences` sentences (reservoir sampling), so memory is
bounded however large the corpus. Each document is split into its lines (newlines themselves are
then encoded by byte fallback, as <0x0A>). SentencePiece silently drops sentences longer than
its max_sentence_length, so longer lines are split at whitespace into pieces that fit, and the
number of split lines is reported.

The model has byte fallback, <unk>=0, <s>=1, </s>=2, <pad>=3 and the control symbols <CLS>,
<SEP>, <EOD>, <MASK> (ids 4-7): with them Megatron's SentencePieceTokenizer appends nothing (its
vocabulary is exactly --vocab-size, end of document is <EOD>), and GPTSentencePieceTokenizer
ends documents with </s>.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field

from an_megatron.data.errors import DataError
from an_megatron.data.preprocess import BadLine, expand_input_paths, open_binary_lines, parse_json_line
from an_megatron.data.tokenizers import MEGATRON_SP_SPECIALS

JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
_WORDS = re.compile(r"\S+\s*|\s+")


def split_long_line(line: str, max_bytes: int) -> list[str]:
    """Split `line` into pieces of at most `max_bytes` UTF-8 bytes, at whitespace if possible."""
    if len(line.encode("utf-8")) <= max_bytes:
        return [line]
    pieces, current, size = [], [], 0
    for word in _WORDS.findall(line):
        word_bytes = len(word.encode("utf-8"))
        if size + word_bytes > max_bytes and current:
            pieces.append("".join(current))
            current, size = [], 0
        if word_bytes <= max_bytes:
            current.append(word)
            size += word_bytes
            continue
        for char in word:  # a single "word" longer than the limit: cut between characters
            char_bytes = len(char.encode("utf-8"))
            if size + char_bytes > max_bytes:
                pieces.append("".join(current))
                current, size = [], 0
            current.append(char)
            size += char_bytes
    if current:
        pieces.append("".join(current))
    return pieces


@dataclass
class TokenizerTrainingStats:
    files: int = 0
    documents: int = 0
    sentences: int = 0
    long_lines_split: int = 0
    pieces_from_long_lines: int = 0
    bad_lines: int = 0
    first_bad_lines: list = field(default_factory=list)
    seconds: float = 0.0


def iter_sentences(
    paths: list[str], json_keys: list[str], max_bytes: int, skip_bad_lines: bool, stats: TokenizerTrainingStats
):
    """Yield training sentences: the lines of every document, long ones split to fit."""
    for path in paths:
        stats.files += 1
        is_json = path.endswith(JSON_SUFFIXES)
        with open_binary_lines(path) as stream:
            for number, raw in enumerate(stream, start=1):
                if not raw.strip():
                    continue
                if is_json:
                    try:
                        texts = list(parse_json_line(raw, json_keys).values())
                    except BadLine as bad:
                        if not skip_bad_lines:
                            raise DataError(
                                f"{path}:{number}: {bad} (use --skip-bad-lines to skip such lines)"
                            ) from None
                        stats.bad_lines += 1
                        if len(stats.first_bad_lines) < 10:
                            stats.first_bad_lines.append(f"{path}:{number}: {bad}")
                        continue
                else:
                    texts = [raw.decode("utf-8", errors="replace")]
                stats.documents += 1
                for text in texts:
                    for line in text.splitlines():
                        if not line.strip():
                            continue
                        pieces = split_long_line(line, max_bytes)
                        if len(pieces) > 1:
                            stats.long_lines_split += 1
                            stats.pieces_from_long_lines += len(pieces)
                        for piece in pieces:
                            stats.sentences += 1
                            yield piece


def train_sentencepiece(
    inputs: list[str],
    output_prefix: str,
    vocab_size: int,
    json_keys=("text",),
    sample_sentences: int = 2_000_000,
    max_sentence_length: int = 4192,
    character_coverage: float = 0.9995,
    skip_bad_lines: bool = False,
    num_threads: int | None = None,
    verbose: bool = False,
) -> TokenizerTrainingStats:
    """Train `{output_prefix}.model` / `.vocab` (written under temporary names, then renamed)."""
    import sentencepiece

    if vocab_size < 8 + 256 + 1:
        raise DataError(
            f"--vocab-size {vocab_size}: too small; byte fallback and the special pieces alone take {8 + 256}"
        )
    paths = expand_input_paths(list(inputs))
    stats = TokenizerTrainingStats()
    if os.path.dirname(output_prefix):
        os.makedirs(os.path.dirname(output_prefix), exist_ok=True)
    tmp_prefix = f"{output_prefix}.tmp.{os.getpid()}"
    start = time.time()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter_sentences(paths, list(json_keys), max_sentence_length, skip_bad_lines, stats),
            model_prefix=tmp_prefix,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            character_coverage=character_coverage,
            input_sentence_size=sample_sentences,
            shuffle_input_sentence=True,
            max_sentence_length=max_sentence_length,
            # Keep text as written: detokenize(tokenize(text)) gives the text back.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            control_symbols=list(MEGATRON_SP_SPECIALS),  # so Megatron's tokenizer appends none
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=0 if verbose else 2,
        )
        if stats.sentences == 0:
            raise DataError(f"--input {' '.join(inputs)}: no text to train on")
        for ext in (".model", ".vocab"):
            os.replace(tmp_prefix + ext, output_prefix + ext)
    except RuntimeError as error:
        message = str(error).strip().splitlines()[-1] if str(error).strip() else repr(error)
        if "Vocabulary size" in message:
            # Drop SentencePiece's "INTERNAL: trainer_interface.cc(...) [...]" preamble.
            message = message[message.index("Vocabulary size") :]
            raise DataError(f"--vocab-size {vocab_size}: {message} for this corpus") from None
        raise DataError(f"SentencePiece training failed: {message}") from None
    finally:
        for ext in (".model", ".vocab"):
            if os.path.exists(tmp_prefix + ext):
                os.remove(tmp_prefix + ext)
    stats.seconds = time.time() - start
    return stats
