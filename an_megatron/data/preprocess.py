"""Streaming preprocessing of jsonl corpora into Megatron indexed datasets.

The logic behind tools/preprocess_data.py (same flags and output names as Megatron-LM's):
input lines are read as raw bytes in batches; with --workers N > 1 a multiprocessing pool parses
and tokenizes the batches (Pool.imap, results in input order) while the main process only reads
and writes. At most a few batches are in flight (a semaphore throttles imap's feeder thread, which
would otherwise read the whole input ahead), so peak memory does not grow with the corpus; the
index of the output (12 bytes per document) is the only thing that does.

Outputs `{prefix}_{key}_document.bin/.idx`, and beside them `.stats.json` (the largest token id
and the tokenizer, which training checks against its own), are written under temporary names and
renamed only when complete; an error, Ctrl-C or SIGTERM removes the temporary files. An input
that yields no document for a key is an error, and nothing is written.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy

from an_megatron.data.errors import DataError
from an_megatron.data.indexed import (
    STATS_SUFFIX,
    CompactIndexedDatasetBuilder,
    check_indexed_dataset,
    dataset_paths,
    read_token_stats,
    token_dtype_for_vocab,
    write_token_stats,
)
from an_megatron.data.tokenizers import build_tokenizer

BATCH_MAX_LINES = 1024
BATCH_MAX_BYTES = 1 << 20
SKIP_HINT = " (use --skip-bad-lines to skip such lines)"


# ----------------------------------------------------------------------------- input


def expand_input_paths(patterns: list[str], flag: str = "--input") -> list[str]:
    """Expand files and globs in order; a pattern that matches nothing is an error."""
    paths = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise DataError(f"{flag} {pattern}: no such file")
        paths.extend(matches)
    return paths


def open_binary_lines(path: str):
    """Open a .jsonl/.txt file, or its .gz, for reading lines as bytes."""
    if path.endswith(".gz"):
        return io.BufferedReader(gzip.open(path, "rb"), buffer_size=1 << 20)
    return open(path, "rb", buffering=1 << 20)


class BadLine(Exception):
    """A line that is not a JSON object holding a string under every requested key."""


def parse_json_line(line: bytes, json_keys: list[str]) -> dict[str, str]:
    """The requested keys' texts of one jsonl line; BadLine says what is wrong with it."""
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        reason = error.msg if isinstance(error, json.JSONDecodeError) else "invalid UTF-8"
        raise BadLine(f"not valid JSON ({reason})") from None
    if not isinstance(record, dict):
        raise BadLine(f"expected a JSON object, got {type(record).__name__}")
    texts = {}
    for key in json_keys:
        if key not in record:
            keys = ", ".join(list(record)[:5])
            raise BadLine(f"no key {key!r} (keys: {keys or 'none'})")
        value = record[key]
        if not isinstance(value, str):
            raise BadLine(f"key {key!r} holds a {type(value).__name__}, not a string")
        texts[key] = value
    return texts


@dataclass
class LineBatch:
    """Consecutive raw lines of one input file."""

    path: str
    first_line: int  # 1-based number of lines[0]
    lines: list
    num_bytes: int


def iter_line_batches(paths: list[str]):
    """Yield LineBatch objects of at most BATCH_MAX_LINES lines / BATCH_MAX_BYTES bytes."""
    for path in paths:
        with open_binary_lines(path) as stream:
            lines, num_bytes, first = [], 0, 1
            for number, line in enumerate(stream, start=1):
                lines.append(line)
                num_bytes += len(line)
                if len(lines) >= BATCH_MAX_LINES or num_bytes >= BATCH_MAX_BYTES:
                    yield LineBatch(path, first, lines, num_bytes)
                    lines, num_bytes, first = [], 0, number + 1
            if lines:
                yield LineBatch(path, first, lines, num_bytes)


# ----------------------------------------------------------------------------- encoding


@dataclass
class EncodedBatch:
    """Token ids of one LineBatch, per key, plus what was skipped and why."""

    num_bytes: int
    tokens: dict  # key -> 1-D array of all kept documents' ids, in the output dtype
    lengths: dict  # key -> list of kept documents' lengths
    empty: dict  # key -> number of empty documents skipped
    blank_lines: int = 0
    bad_lines: list = field(default_factory=list)  # (path, line number, reason)
    fatal: str | None = None  # an error that --skip-bad-lines does not cover


class DocumentEncoder:
    """Parses and tokenizes line batches; one per worker process."""

    def __init__(self, tokenizer, json_keys: list[str], append_eod: bool) -> None:
        self.tokenizer = tokenizer
        self.json_keys = list(json_keys)
        self.append_eod = append_eod
        self.vocab_size = tokenizer.vocab_size
        self.dtype = numpy.dtype(token_dtype_for_vocab(self.vocab_size))

    def encode(self, batch: LineBatch) -> EncodedBatch:
        ids = {key: [] for key in self.json_keys}
        lengths = {key: [] for key in self.json_keys}
        first_line_of_doc = {key: [] for key in self.json_keys}
        result = EncodedBatch(batch.num_bytes, {}, lengths, {key: 0 for key in self.json_keys})
        numbers, records = [], []
        for offset, line in enumerate(batch.lines):
            number = batch.first_line + offset
            if not line.strip():
                result.blank_lines += 1
                continue
            try:
                records.append(parse_json_line(line, self.json_keys))
                numbers.append(number)
            except BadLine as bad:
                result.bad_lines.append((batch.path, number, str(bad)))
        untokenizable: dict[int, str] = {}  # record index -> reason
        encoded = {key: self._tokenize_all([r[key] for r in records], key, untokenizable) for key in self.json_keys}
        for index, number in enumerate(numbers):
            if index in untokenizable:
                result.bad_lines.append((batch.path, number, untokenizable[index]))
                continue
            for key in self.json_keys:
                doc_ids = encoded[key][index]
                if not doc_ids:
                    result.empty[key] += 1
                    continue
                if self.append_eod:
                    doc_ids.append(self.tokenizer.eod)
                ids[key].extend(doc_ids)
                lengths[key].append(len(doc_ids))
                first_line_of_doc[key].append(number)
        result.bad_lines.sort(key=lambda bad: bad[1])  # the first in file order is reported
        for key in self.json_keys:
            flat = numpy.array(ids[key], dtype=numpy.int64)
            out_of_range = (flat < 0) | (flat >= self.vocab_size)
            if out_of_range.any():
                position = int(numpy.argmax(out_of_range))
                doc = int(numpy.searchsorted(numpy.cumsum(lengths[key]), position, side="right"))
                result.fatal = (
                    f"{batch.path}:{first_line_of_doc[key][doc]}: token id {flat[position]} "
                    f"(key {key!r}) does not fit: the index dtype is {self.dtype.name}, chosen for "
                    f"vocab size {self.vocab_size}, so ids must be in [0, {self.vocab_size})"
                )
                return result
            result.tokens[key] = flat.astype(self.dtype)
        return result

    def _tokenize_all(self, texts: list, key: str, untokenizable: dict) -> list:
        """Token ids of every text, batched; texts the tokenizer rejects get [] and a reason."""
        try:
            return self.tokenizer.tokenize_batch(texts)
        except Exception:
            pass  # find the rejected texts one by one
        encoded = []
        for index, text in enumerate(texts):
            try:
                encoded.append(self.tokenizer.tokenize(text))
            except Exception as error:
                untokenizable.setdefault(index, f"cannot tokenize key {key!r}: {error}")
                encoded.append([])
        return encoded


_WORKER_ENCODER: DocumentEncoder | None = None


def _init_worker(tokenizer_args, json_keys, append_eod) -> None:
    # The main process handles Ctrl-C and SIGTERM and terminates the pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process
    global _WORKER_ENCODER
    _WORKER_ENCODER = DocumentEncoder(build_tokenizer(tokenizer_args), json_keys, append_eod)


def _encode_in_worker(batch: LineBatch) -> EncodedBatch:
    return _WORKER_ENCODER.encode(batch)


def _throttled(items, slots: threading.Semaphore, stop: threading.Event):
    """Yield items, each only after taking a slot; gives up when `stop` is set."""
    for item in items:
        while not slots.acquire(timeout=0.1):
            if stop.is_set():
                return
        if stop.is_set():
            return
        yield item


# ----------------------------------------------------------------------------- output


class AtomicDatasetWriter:
    """Writes one indexed dataset, and its stats file, under temporary names; commit() renames,
    discard() deletes. `tokenizer` (type, model, vocab_size) goes into the stats file."""

    def __init__(self, prefix: str, dtype, tokenizer: dict | None = None) -> None:
        self.bin_path, self.idx_path = dataset_paths(prefix)
        self.stats_path = prefix + STATS_SUFFIX
        if os.path.dirname(prefix):
            os.makedirs(os.path.dirname(prefix), exist_ok=True)
        suffix = f".tmp.{os.getpid()}"
        self.tmp_bin, self.tmp_idx, self.tmp_stats = (
            p + suffix for p in (self.bin_path, self.idx_path, self.stats_path)
        )
        self.builder = CompactIndexedDatasetBuilder(self.tmp_bin, dtype=dtype)
        self.tokenizer = tokenizer
        self.max_token_id = -1  # None once a part of unknown largest id is added
        self.parts = 0  # datasets added whole (add_dataset)
        self.done = False

    def add_documents(self, tokens: numpy.ndarray, lengths: list) -> None:
        self.builder.add_documents(tokens, lengths)
        if len(tokens) and self.max_token_id is not None:
            self.max_token_id = max(self.max_token_id, int(tokens.max()))

    def add_dataset(self, prefix: str) -> None:
        """Append a whole dataset; its stats file (if valid) carries its largest id over."""
        info = check_indexed_dataset(prefix)
        self.builder.add_index(prefix)
        stats = read_token_stats(info)
        made_by = stats.get("tokenizer") if stats else None
        self.tokenizer = made_by if self.parts == 0 or self.tokenizer == made_by else None  # shared, or none
        self.parts += 1
        if stats is None or self.max_token_id is None:
            self.max_token_id = None
        else:
            self.max_token_id = max(self.max_token_id, stats["max_token_id"])

    def commit(self) -> None:
        self.builder.finalize(self.tmp_idx)
        num_tokens = os.path.getsize(self.tmp_bin) // numpy.dtype(self.builder.dtype).itemsize
        known = self.max_token_id is not None and num_tokens
        if known:
            write_token_stats(
                self.tmp_stats,
                num_tokens,
                len(self.builder.document_indices) - 1,
                os.path.getsize(self.tmp_bin),
                self.max_token_id,
                self.tokenizer,
            )
        # Remove an old .idx (and stats) first: a crash between the renames then leaves no matching pair.
        for old in (self.idx_path, self.stats_path):
            if os.path.exists(old):
                os.remove(old)
        os.replace(self.tmp_bin, self.bin_path)
        os.replace(self.tmp_idx, self.idx_path)
        if known:
            os.replace(self.tmp_stats, self.stats_path)
        self.done = True

    def discard(self) -> None:
        if self.done:
            return
        if not self.builder.data_file.closed:
            self.builder.data_file.close()
        for path in (self.tmp_bin, self.tmp_idx, self.tmp_stats):
            if os.path.exists(path):
                os.remove(path)


def tokenizer_record(tokenizer_args, tokenizer) -> dict:
    """What a stats file says of the tokenizer that made the data: type, model file, vocab size."""
    model = next(
        (
            getattr(tokenizer_args, k, None)
            for k in ("tokenizer_model", "vocab_file")
            if getattr(tokenizer_args, k, None)
        ),
        None,
    )
    return dict(
        type=getattr(tokenizer_args, "tokenizer_type", None),
        model=None if model is None else os.path.abspath(model),
        vocab_size=tokenizer.vocab_size,
    )


# ----------------------------------------------------------------------------- driver


@dataclass
class PreprocessStats:
    documents: dict  # key -> documents written
    tokens: dict  # key -> tokens written (EOD included)
    empty_documents: dict  # key -> empty documents skipped
    blank_lines: int = 0
    bad_lines: int = 0
    first_bad_lines: list = field(default_factory=list)
    bytes_read: int = 0
    seconds: float = 0.0
    outputs: list = field(default_factory=list)

    def summary_lines(self) -> list[str]:
        total_docs, total_tokens = sum(self.documents.values()), sum(self.tokens.values())
        secs = max(self.seconds, 1e-9)
        lines = [
            f"documents: {total_docs}",
            f"tokens: {total_tokens}",
            f"skipped: {sum(self.empty_documents.values())} empty documents, "
            f"{self.blank_lines} blank lines, {self.bad_lines} bad lines",
            f"time: {self.seconds:.2f} s ({total_docs / secs:.1f} documents/s, "
            f"{total_tokens / secs:.0f} tokens/s, {self.bytes_read / secs / 1e6:.2f} MB/s)",
        ]
        if len(self.documents) > 1:
            lines += [
                f"  key {k}: {self.documents[k]} documents, {self.tokens[k]} tokens, {self.empty_documents[k]} empty"
                for k in self.documents
            ]
        lines += [f"  skipped {p}:{n}: {r}" for p, n, r in self.first_bad_lines]
        lines += [f"output: {path}" for path in self.outputs]
        return lines


def output_prefix_for_key(output_prefix: str, key: str) -> str:
    """Megatron's output naming: {prefix}_{key}_document."""
    return f"{output_prefix}_{key}_document"


class _Progress:
    """A tqdm bar on a terminal, else a log line every `log_interval` documents."""

    def __init__(self, total_bytes, log_interval: int) -> None:
        self.start = time.time()
        self.log_interval = max(1, log_interval)
        self.next_log = self.log_interval
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="preprocess", file=sys.stderr
            )

    def update(self, num_bytes: int, stats: PreprocessStats) -> None:
        docs, tokens = sum(stats.documents.values()), sum(stats.tokens.values())
        elapsed = max(time.time() - self.start, 1e-9)
        rates = (
            f"{docs / elapsed:.0f} docs/s, {tokens / elapsed:.0f} tokens/s, {stats.bytes_read / elapsed / 1e6:.1f} MB/s"
        )
        if self.bar is not None:
            self.bar.set_postfix_str(rates, refresh=False)
            self.bar.update(num_bytes)
        elif docs >= self.next_log:
            print(f"processed {docs} documents ({rates})", file=sys.stderr, flush=True)
            self.next_log = (docs // self.log_interval + 1) * self.log_interval

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def preprocess(
    inputs: list[str],
    json_keys: list[str],
    tokenizer_args,
    output_prefix: str,
    append_eod: bool = False,
    workers: int = 1,
    log_interval: int = 1000,
    skip_bad_lines: bool = False,
) -> PreprocessStats:
    """Tokenize jsonl(.gz) `inputs` into `{output_prefix}_{key}_document.bin/.idx` per key."""
    if not json_keys:
        raise DataError("--json-keys: give at least one key")
    if workers < 1:
        raise DataError(f"--workers must be >= 1, got {workers}")
    paths = expand_input_paths(inputs)
    tokenizer = build_tokenizer(tokenizer_args)  # fail early on a bad tokenizer flag
    dtype = token_dtype_for_vocab(tokenizer.vocab_size)

    stats = PreprocessStats({k: 0 for k in json_keys}, {k: 0 for k in json_keys}, {k: 0 for k in json_keys})
    total_bytes = None if any(p.endswith(".gz") for p in paths) else sum(map(os.path.getsize, paths))
    writers, pool, stop = {}, None, threading.Event()
    progress = None
    try:
        for key in json_keys:
            writers[key] = AtomicDatasetWriter(
                output_prefix_for_key(output_prefix, key), dtype, tokenizer_record(tokenizer_args, tokenizer)
            )
        if workers == 1:
            encoder = DocumentEncoder(tokenizer, json_keys, append_eod)
            results = map(encoder.encode, iter_line_batches(paths))
            slots = None
        else:
            slots = threading.Semaphore(2 * workers + 2)
            pool = multiprocessing.Pool(
                workers, initializer=_init_worker, initargs=(tokenizer_args, json_keys, append_eod)
            )
            results = pool.imap(_encode_in_worker, _throttled(iter_line_batches(paths), slots, stop))
        progress = _Progress(total_bytes, log_interval)
        for encoded in results:
            if slots is not None:
                slots.release()
            _absorb(encoded, stats, writers, skip_bad_lines)
            progress.update(encoded.num_bytes, stats)
        _refuse_empty_output(paths, stats)
        for writer in writers.values():
            writer.commit()
            stats.outputs += [writer.bin_path, writer.idx_path] + [writer.stats_path] * os.path.exists(
                writer.stats_path
            )
    finally:
        stop.set()
        if progress is not None:
            progress.close()
        if pool is not None:
            pool.terminate()
            pool.join()
        for writer in writers.values():
            writer.discard()
    stats.seconds = time.time() - (progress.start if progress else time.time())
    return stats


def _refuse_empty_output(paths: list[str], stats: PreprocessStats) -> None:
    """An input without one document for some key is an error naming it: a dataset of no
    documents cannot be trained on (megatron-core fails on it with 'cannot mmap an empty file')."""
    for key, documents in stats.documents.items():
        if documents:
            continue
        where = paths[0] if len(paths) == 1 else f"{', '.join(paths[:3])}{', ...' if len(paths) > 3 else ''}"
        first = "; the first bad line: {}:{}: {}".format(*stats.first_bad_lines[0]) if stats.first_bad_lines else ""
        raise DataError(
            f"{where}: no documents for key {key!r} ({stats.bad_lines} bad lines skipped, {stats.blank_lines} "
            f"blank lines, {stats.empty_documents[key]} empty documents{first}): nothing written"
        )


def _absorb(encoded: EncodedBatch, stats: PreprocessStats, writers: dict, skip_bad_lines: bool):
    """Fold one encoded batch into the outputs and counters, raising on a fatal problem."""
    if encoded.bad_lines and not skip_bad_lines:
        path, number, reason = encoded.bad_lines[0]
        raise DataError(f"{path}:{number}: {reason}{SKIP_HINT}")
    if encoded.fatal:
        raise DataError(encoded.fatal)
    stats.bad_lines += len(encoded.bad_lines)
    room = 10 - len(stats.first_bad_lines)
    stats.first_bad_lines += encoded.bad_lines[: max(room, 0)]
    stats.blank_lines += encoded.blank_lines
    stats.bytes_read += encoded.num_bytes
    for key, writer in writers.items():
        writer.add_documents(encoded.tokens[key], encoded.lengths[key])
        stats.documents[key] += len(encoded.lengths[key])
        stats.tokens[key] += int(encoded.tokens[key].size)
        stats.empty_documents[key] += encoded.empty[key]
