"""Validation and writing of Megatron's indexed datasets (MMIDIDX version 1, a .bin/.idx pair).

Reading and writing are megatron-core's `IndexedDataset` and `IndexedDatasetBuilder`; this module
adds what they lack for corpus-scale use:

- `check_indexed_dataset(prefix)` checks a pair before training opens it, so a missing, truncated
  or mismatched file is a one-line error naming the file instead of an assertion or a numpy
  traceback from deep inside GPTDataset.
- `CompactIndexedDatasetBuilder` keeps the per-sequence index in packed arrays (12 bytes per
  document instead of ~70 for Python int lists) and computes byte pointers with numpy instead of a
  Python loop. The bytes written are the same as megatron-core's builder writes.

Layout of the .idx file (little-endian), for reference:
    9 bytes magic b"MMIDIDX\\x00\\x00", uint64 version (1), uint8 dtype code,
    uint64 sequence count S, uint64 document-boundary count D,
    int32[S] sequence lengths (tokens), int64[S] byte offsets into .bin, int64[D] document
    boundaries (sequence indices, first 0, last S).

Beside the pair, preprocessing writes ``{prefix}.stats.json`` (`write_token_stats`): the
largest token id and the tokenizer that made the data. Megatron's readers ignore it; training
reads it (`token_id_range`) to refuse a tokenizer whose vocabulary the ids do not fit, and scans
a bounded sample of the .bin instead for datasets without it (made by Megatron-LM's tools).
"""

from __future__ import annotations

import array
import importlib
import json
import os
import shutil
import struct
from dataclasses import dataclass

import numpy

from an_megatron.compat import megatron_core as mcore_compat
from an_megatron.data.errors import IndexedDatasetError

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
INDEX_HEADER_BYTES = len(INDEX_MAGIC) + 8 + 1 + 8 + 8  # 34

# Megatron's dtype codes (megatron.core.datasets.indexed_dataset.DType); fixed by the file format.
DTYPE_BY_CODE = {
    1: numpy.uint8,
    2: numpy.int8,
    3: numpy.int16,
    4: numpy.int32,
    5: numpy.int64,
    6: numpy.float64,
    7: numpy.float32,
    8: numpy.uint16,
}
CODE_BY_DTYPE = {numpy.dtype(t): c for c, t in DTYPE_BY_CODE.items()}

# Pointers are checked this many sequences at a time, so validation memory stays bounded.
_CHECK_CHUNK = 1 << 22

STATS_SUFFIX = ".stats.json"
STATS_FORMAT = "an_megatron token stats"
# Without a stats file, the token ids are scanned: all of a .bin up to this size, else this many
# bytes in SCAN_PIECES pieces spread evenly over it.
SCAN_BYTES = 64 << 20
SCAN_PIECES = 64


def import_megatron_core(module: str = "megatron.core.datasets.indexed_dataset"):
    """Import a megatron-core module on first use (importing the data package stays cheap).
    Its import-time warnings about Transformer Engine and Apex are filtered once, when
    ``an_megatron`` is imported (``megatron_patches.quiet_optional_imports``)."""
    return importlib.import_module(module)


def token_dtype_for_vocab(vocab_size: int) -> type:
    """The .bin dtype for token ids, chosen as Megatron's preprocess_data.py does."""
    return import_megatron_core().DType.optimal_dtype(vocab_size)


def dataset_paths(prefix: str) -> tuple[str, str]:
    """(bin_path, idx_path) of a dataset prefix."""
    return prefix + ".bin", prefix + ".idx"


@dataclass(frozen=True)
class IndexedDatasetInfo:
    """What check_indexed_dataset learned about a valid dataset."""

    prefix: str
    dtype: type
    num_sequences: int
    num_documents: int
    num_tokens: int


def check_indexed_dataset(prefix: str) -> IndexedDatasetInfo:
    """Validate the .bin/.idx pair at `prefix`; raise IndexedDatasetError naming the bad file.

    Checks: both files exist; the header magic, version and dtype code; that the .idx length
    matches the counts in its header; document boundaries (start 0, end at the sequence count,
    non-decreasing); non-negative lengths; each pointer equals the previous pointer plus the
    previous length; and the .bin length equals the last pointer plus the last length.
    """
    prefix = os.fspath(prefix)
    bin_path, idx_path = dataset_paths(prefix)
    for ext in (".bin", ".idx"):
        if prefix.endswith(ext) and not os.path.exists(idx_path):
            raise IndexedDatasetError(
                f"data path {prefix!r} ends in {ext}: give the prefix without the extension ({prefix[: -len(ext)]!r})"
            )
    missing = [p for p in (bin_path, idx_path) if not os.path.isfile(p)]
    if missing:
        unfinished = [p for p in missing if _has_unfinished_temp(p)]
        hint = " (only an unfinished temporary file of an interrupted preprocessing run is there)" if unfinished else ""
        raise IndexedDatasetError(f"indexed dataset {prefix!r}: missing {' and '.join(missing)}{hint}")

    idx_size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as idx_file:
        header = idx_file.read(INDEX_HEADER_BYTES)
    if len(header) < INDEX_HEADER_BYTES:
        raise IndexedDatasetError(
            f"{idx_path}: truncated index: {idx_size} bytes, shorter than the {INDEX_HEADER_BYTES}-byte header"
        )
    if header[: len(INDEX_MAGIC)] != INDEX_MAGIC:
        raise IndexedDatasetError(f"{idx_path}: not a Megatron MMIDIDX index (starts with {header[:9]!r})")
    (version,) = struct.unpack_from("<Q", header, 9)
    if version != INDEX_VERSION:
        raise IndexedDatasetError(f"{idx_path}: unsupported index version {version} (expected {INDEX_VERSION})")
    code = header[17]
    if code not in DTYPE_BY_CODE:
        raise IndexedDatasetError(f"{idx_path}: unknown dtype code {code} (known: {sorted(DTYPE_BY_CODE)})")
    dtype = numpy.dtype(DTYPE_BY_CODE[code])
    num_sequences, num_boundaries = struct.unpack_from("<QQ", header, 18)
    expected_idx_size = INDEX_HEADER_BYTES + num_sequences * 12 + num_boundaries * 8
    if idx_size != expected_idx_size:
        raise IndexedDatasetError(
            f"{idx_path}: {idx_size} bytes, but its header counts {num_sequences} sequences and "
            f"{num_boundaries} document boundaries, which take {expected_idx_size} bytes "
            f"(truncated or corrupt index)"
        )
    if num_boundaries < 1:
        raise IndexedDatasetError(f"{idx_path}: no document boundaries (corrupt index)")

    offset = INDEX_HEADER_BYTES
    lengths = _map(idx_path, numpy.int32, offset, num_sequences)
    offset += num_sequences * 4
    pointers = _map(idx_path, numpy.int64, offset, num_sequences)
    offset += num_sequences * 8
    boundaries = _map(idx_path, numpy.int64, offset, num_boundaries)

    if boundaries[0] != 0 or boundaries[-1] != num_sequences:
        raise IndexedDatasetError(
            f"{idx_path}: document boundaries run from {boundaries[0]} to {boundaries[-1]}, "
            f"expected 0 to {num_sequences} (corrupt index)"
        )
    expected_pointer = 0
    for start in range(0, num_boundaries, _CHECK_CHUNK):
        chunk = boundaries[start : start + _CHECK_CHUNK + 1]
        if (numpy.diff(chunk) < 0).any():
            raise IndexedDatasetError(f"{idx_path}: document boundaries decrease (corrupt index)")
    for start in range(0, num_sequences, _CHECK_CHUNK):
        chunk_lengths = lengths[start : start + _CHECK_CHUNK].astype(numpy.int64)
        if (chunk_lengths < 0).any():
            bad = start + int(numpy.argmax(chunk_lengths < 0))
            raise IndexedDatasetError(f"{idx_path}: sequence {bad} has negative length {lengths[bad]} (corrupt index)")
        byte_lengths = chunk_lengths * dtype.itemsize
        expected = expected_pointer + numpy.concatenate(([0], numpy.cumsum(byte_lengths)[:-1]))
        actual = pointers[start : start + len(chunk_lengths)]
        if not numpy.array_equal(actual, expected):
            bad = start + int(numpy.argmax(actual != expected))
            raise IndexedDatasetError(
                f"{idx_path}: sequence {bad} starts at byte {pointers[bad]}, expected "
                f"{expected[bad - start]} from the lengths before it (corrupt index)"
            )
        expected_pointer += int(byte_lengths.sum())

    bin_size = os.path.getsize(bin_path)
    if bin_size != expected_pointer:
        raise IndexedDatasetError(
            f"{bin_path}: {bin_size} bytes, but {idx_path} describes "
            f"{expected_pointer // dtype.itemsize} tokens of {dtype.name} = {expected_pointer} "
            f"bytes (truncated .bin, or .bin and .idx from different runs)"
        )
    return IndexedDatasetInfo(
        prefix=prefix,
        dtype=dtype.type,
        num_sequences=num_sequences,
        num_documents=num_boundaries - 1,
        num_tokens=expected_pointer // dtype.itemsize,
    )


def write_token_stats(path: str, num_tokens: int, num_documents: int, bin_bytes: int, max_token_id, tokenizer) -> None:
    """Write a stats file (`STATS_SUFFIX`) at `path`: what the .bin/.idx pair it belongs to holds
    (so a stale file is recognised), its largest token id, and `tokenizer` (a dict: type, model,
    vocab_size; or None)."""
    record = dict(
        format=STATS_FORMAT,
        version=1,
        num_tokens=int(num_tokens),
        num_documents=int(num_documents),
        bin_bytes=int(bin_bytes),
        max_token_id=None if max_token_id is None else int(max_token_id),
        tokenizer=tokenizer,
    )
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")


def read_token_stats(info: IndexedDatasetInfo) -> dict | None:
    """The stats file of a checked dataset, or None when there is none, it is unreadable, or it
    describes other data (a .bin/.idx pair rewritten by another tool since)."""
    path = info.prefix + STATS_SUFFIX
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    bin_bytes = info.num_tokens * numpy.dtype(info.dtype).itemsize
    if not isinstance(record, dict) or record.get("format") != STATS_FORMAT:
        return None
    matches = (record.get("num_tokens"), record.get("num_documents"), record.get("bin_bytes")) == (
        info.num_tokens,
        info.num_documents,
        bin_bytes,
    )
    return record if matches and isinstance(record.get("max_token_id"), int) else None


@dataclass(frozen=True)
class TokenIdRange:
    """The largest token id of a dataset, or of the part of it that was read (`scanned` of
    `num_tokens` tokens); `recorded`: read from its stats file, with the tokenizer there."""

    max_token_id: int
    scanned: int
    num_tokens: int
    recorded: dict | None = None

    @property
    def partial(self) -> bool:
        return self.recorded is None and self.scanned < self.num_tokens

    def describe(self) -> str:
        """Where the maximum comes from, for messages."""
        if self.recorded is not None:
            tok = self.recorded.get("tokenizer") or {}
            made = " ".join(str(tok[k]) for k in ("type", "model") if tok.get(k) is not None)
            size = f", vocab size {tok['vocab_size']}" if tok.get("vocab_size") is not None else ""
            return f"recorded when it was preprocessed{f' with {made}{size}' if made else ''}"
        if self.partial:
            return f"found in {self.scanned} of its {self.num_tokens} tokens (a partial scan)"
        return f"found in all {self.num_tokens} tokens"


def token_id_range(info: IndexedDatasetInfo) -> TokenIdRange:
    """The largest token id of a checked, non-empty dataset: from its stats file, else from a
    scan of its .bin bounded by SCAN_BYTES (numpy over a memory map)."""
    recorded = read_token_stats(info)
    if recorded is not None:
        return TokenIdRange(recorded["max_token_id"], info.num_tokens, info.num_tokens, recorded)
    tokens = numpy.memmap(info.prefix + ".bin", dtype=info.dtype, mode="r")
    itemsize = numpy.dtype(info.dtype).itemsize
    if info.num_tokens * itemsize <= SCAN_BYTES:
        return TokenIdRange(int(tokens.max()), info.num_tokens, info.num_tokens)
    piece = SCAN_BYTES // SCAN_PIECES // itemsize
    starts = numpy.linspace(0, info.num_tokens - piece, SCAN_PIECES).astype(numpy.int64)
    largest = max(int(tokens[start : start + piece].max()) for start in starts)
    return TokenIdRange(largest, piece * SCAN_PIECES, info.num_tokens)


def open_indexed_dataset(prefix: str, mmap: bool = True):
    """Validate `prefix` with check_indexed_dataset, then open it as megatron-core's IndexedDataset.

    The arrays it returns are views of its memory map, and megatron-core closes the map when the
    dataset is garbage-collected: keep the dataset referenced while using them (or copy them),
    or reading them crashes the interpreter.
    """
    check_indexed_dataset(prefix)
    return import_megatron_core().IndexedDataset(os.fspath(prefix), multimodal=False, mmap=mmap)


def document_last_tokens(prefix: str, limit: int) -> numpy.ndarray:
    """The last token of up to `limit` non-empty documents, spread evenly over the dataset.

    Spread rather than the first `limit`, so a dataset merged from differently preprocessed parts
    shows its mix. Reads only the index entries and tokens it needs; the dataset must be valid
    (check_indexed_dataset).
    """
    reader = mcore_compat.index_reader(os.fspath(prefix) + ".idx")
    try:
        boundaries = reader.document_indices
        num_documents = len(boundaries) - 1
        picked = numpy.unique(
            numpy.linspace(0, num_documents - 1, min(num_documents, limit)).round().astype(numpy.int64)
        )
        first, end = boundaries[picked], boundaries[picked + 1]  # sequences [first, end)
        last = end[end > first] - 1  # documents without sequences have no last token
        lengths = reader.sequence_lengths[last].astype(numpy.int64)
        last, lengths = last[lengths > 0], lengths[lengths > 0]
        positions = reader.sequence_pointers[last] // numpy.dtype(reader.dtype).itemsize + lengths - 1
        dtype = reader.dtype
    finally:
        del reader  # its arrays are views of a map that closes with it: copies were taken above
    if len(positions) == 0:
        return numpy.zeros(0, dtype=numpy.int64)
    tokens = numpy.memmap(os.fspath(prefix) + ".bin", dtype=dtype, mode="r")
    return numpy.asarray(tokens[positions], dtype=numpy.int64)


def document_range_tokens(prefix: str, ranges) -> list[int]:
    """The number of tokens in each document range ``(first, end)`` of a checked dataset."""
    reader = mcore_compat.index_reader(os.fspath(prefix) + ".idx")
    try:
        bounds, lengths = reader.document_indices, reader.sequence_lengths
        return [int(lengths[bounds[first] : bounds[end]].sum(dtype=numpy.int64)) for first, end in ranges]
    finally:
        del reader  # its arrays are views of a map that closes with it


def _map(path: str, dtype, offset: int, count: int) -> numpy.ndarray:
    if count == 0:
        return numpy.zeros(0, dtype=dtype)
    return numpy.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,))


def _has_unfinished_temp(final_path: str) -> bool:
    directory = os.path.dirname(final_path) or "."
    stem = os.path.basename(final_path) + ".tmp"
    try:
        return any(name.startswith(stem) for name in os.listdir(directory))
    except OSError:
        return False


def _byte_pointers(sequence_lengths, dtype) -> numpy.ndarray:
    """Each sequence's byte offset in the .bin, by numpy.cumsum (megatron-core loops in Python)."""
    byte_lengths = numpy.asarray(sequence_lengths, dtype=numpy.int64) * numpy.int64(numpy.dtype(dtype).itemsize)
    pointers = numpy.zeros(len(byte_lengths), dtype=numpy.int64)
    numpy.cumsum(byte_lengths[:-1], out=pointers[1:])
    return pointers


def _compact_index_builder_class():
    """Build the CompactIndexedDatasetBuilder class lazily: megatron-core takes ~5 s to import."""
    mcore = import_megatron_core()

    class CompactIndexedDatasetBuilder(mcore.IndexedDatasetBuilder):
        """megatron-core's IndexedDatasetBuilder with its index kept in packed arrays.

        Token data goes straight to the .bin file as in the parent class; only the index (int32
        length per sequence, int64 boundary per document) stays in memory until finalize().
        """

        def __init__(self, bin_path: str, dtype=numpy.int32) -> None:
            super().__init__(bin_path, dtype=dtype, multimodal=False)
            self.sequence_lengths = array.array("i")
            self.document_indices = array.array("q", [0])

        def add_documents(self, tokens: numpy.ndarray, lengths) -> None:
            """Append many one-sequence documents: `tokens` concatenated, `lengths` per document.

            The same bytes as add_document() per document, without its per-call overhead.
            """
            if len(lengths) == 0:
                return
            self.data_file.write(numpy.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
            start = len(self.sequence_lengths)
            self.sequence_lengths.extend(lengths)
            self.document_indices.extend(range(start + 1, start + len(lengths) + 1))

        def add_index(self, path_prefix: str) -> None:
            """Append a whole dataset (validated first); its dtype must match ours."""
            info = check_indexed_dataset(path_prefix)
            if numpy.dtype(info.dtype) != numpy.dtype(self.dtype):
                raise IndexedDatasetError(
                    f"{path_prefix}: token dtype {numpy.dtype(info.dtype).name} differs from "
                    f"{numpy.dtype(self.dtype).name} of the datasets before it"
                )
            reader = mcore_compat.index_reader(path_prefix + ".idx")
            offset = len(self.sequence_lengths)
            self.sequence_lengths.frombytes(reader.sequence_lengths.tobytes())
            self.document_indices.frombytes((reader.document_indices[1:] + offset).astype(numpy.int64).tobytes())
            del reader
            with open(path_prefix + ".bin", "rb") as part:
                shutil.copyfileobj(part, self.data_file, 16 << 20)

        def finalize(self, idx_path: str) -> None:
            self.data_file.close()
            mcore_compat.write_index(
                idx_path,
                self.dtype,
                self.sequence_lengths,
                self.document_indices,
                _byte_pointers(self.sequence_lengths, self.dtype),
            )

    return CompactIndexedDatasetBuilder


_BUILDER_CLASS = None


def CompactIndexedDatasetBuilder(bin_path: str, dtype=numpy.int32):  # noqa: N802 (a class factory)
    """Create a CompactIndexedDatasetBuilder (see _compact_index_builder_class) writing `bin_path`."""
    global _BUILDER_CLASS
    if _BUILDER_CLASS is None:
        _BUILDER_CLASS = _compact_index_builder_class()
    return _BUILDER_CLASS(bin_path, dtype=dtype)
