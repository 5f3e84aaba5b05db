"""The MMIDIDX format: byte-for-byte compatibility with a writer made from the documented layout,
and check_indexed_dataset's errors on missing, truncated and corrupt files."""

import os
import shutil
import struct

import numpy
import pytest
from test_data_support import run_tool, write_jsonl

from an_megatron.data import IndexedDatasetError, check_indexed_dataset, open_indexed_dataset
from an_megatron.data.indexed import CompactIndexedDatasetBuilder

DOCS = [[5, 6, 7], [1], [99, 98, 97, 96, 95], [3, 3]]


def reference_write(prefix, docs, dtype):
    """Megatron's MMIDIDX v1 layout, written by hand (one sequence per document):
    .bin: the tokens; .idx: b"MMIDIDX\\0\\0", <Q version 1, <B dtype code, <Q #sequences,
    <Q #boundaries, int32 lengths, int64 byte offsets, int64 boundaries [0, 1, ..., n]."""
    code = {numpy.uint16: 8, numpy.int32: 4}[dtype]
    itemsize = numpy.dtype(dtype).itemsize
    with open(prefix + ".bin", "wb") as out:
        for doc in docs:
            for token in doc:
                out.write(struct.pack("<H" if itemsize == 2 else "<i", token))
    offsets, position = [], 0
    for doc in docs:
        offsets.append(position)
        position += len(doc) * itemsize
    with open(prefix + ".idx", "wb") as out:
        out.write(b"MMIDIDX\x00\x00")
        out.write(struct.pack("<Q", 1))
        out.write(struct.pack("<B", code))
        out.write(struct.pack("<Q", len(docs)))
        out.write(struct.pack("<Q", len(docs) + 1))
        out.write(b"".join(struct.pack("<i", len(doc)) for doc in docs))
        out.write(b"".join(struct.pack("<q", offset) for offset in offsets))
        out.write(b"".join(struct.pack("<q", i) for i in range(len(docs) + 1)))


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("vocab_size, dtype", [(1000, numpy.uint16), (70000, numpy.int32)])
def test_preprocess_output_equals_reference_bytes(tmp_path, vocab_size, dtype):
    # NullTokenizer ids are the text itself; the documents without EOD are DOCS.
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": " ".join(map(str, d))} for d in DOCS])
    done = run_tool(
        "preprocess_data.py",
        "--input",
        corpus,
        "--tokenizer-type",
        "NullTokenizer",
        "--vocab-size",
        vocab_size,
        "--output-prefix",
        tmp_path / "ours",
    )
    assert done.returncode == 0, done.stderr
    reference_write(str(tmp_path / "ref"), DOCS, dtype)
    for ext in (".bin", ".idx"):
        assert read_bytes(tmp_path / f"ours_text_document{ext}") == read_bytes(tmp_path / f"ref{ext}")
    # Our reader loads the reference files.
    dataset = open_indexed_dataset(str(tmp_path / "ref"))
    assert dataset.index.dtype == dtype
    assert [d.tolist() for d in dataset[0 : len(DOCS)]] == DOCS
    info = check_indexed_dataset(str(tmp_path / "ref"))
    assert (info.num_documents, info.num_tokens) == (4, 11)


def test_compact_builder_matches_megatron_core_builder(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefixes = []
    for name, builder_class in (("upstream", IndexedDatasetBuilder), ("compact", CompactIndexedDatasetBuilder)):
        prefix = str(tmp_path / name)
        builder = builder_class(prefix + ".bin", dtype=numpy.uint16)
        for doc in DOCS:
            builder.add_document(numpy.array(doc), [len(doc)])
        builder.finalize(prefix + ".idx")
        prefixes.append(prefix)
    for ext in (".bin", ".idx"):
        assert read_bytes(prefixes[0] + ext) == read_bytes(prefixes[1] + ext)

    # Merging (add_index) also agrees, and the merged dataset holds both parts in order.
    merged = []
    for name, builder_class in (("m_upstream", IndexedDatasetBuilder), ("m_compact", CompactIndexedDatasetBuilder)):
        prefix = str(tmp_path / name)
        builder = builder_class(prefix + ".bin", dtype=numpy.uint16)
        builder.add_index(prefixes[0])
        builder.add_index(prefixes[1])
        builder.finalize(prefix + ".idx")
        merged.append(prefix)
    for ext in (".bin", ".idx"):
        assert read_bytes(merged[0] + ext) == read_bytes(merged[1] + ext)
    dataset = open_indexed_dataset(merged[1])  # keep it alive: items are views of its mmap
    assert [d.tolist() for d in dataset[0:8]] == DOCS + DOCS


@pytest.fixture
def good(tmp_path):
    prefix = str(tmp_path / "good")
    reference_write(prefix, DOCS, numpy.uint16)
    return prefix


def corrupt(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def truncate(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


@pytest.mark.parametrize(
    "damage, file_named, message",
    [
        (lambda p: os.remove(p + ".bin"), ".bin", "missing"),
        (lambda p: os.remove(p + ".idx"), ".idx", "missing"),
        (lambda p: truncate(p + ".idx", 20), ".idx", "shorter than the 34-byte header"),
        (lambda p: corrupt(p + ".idx", 0, b"XXIDIDX"), ".idx", "not a Megatron MMIDIDX index"),
        (lambda p: corrupt(p + ".idx", 9, struct.pack("<Q", 2)), ".idx", "unsupported index version 2"),
        (lambda p: corrupt(p + ".idx", 17, b"\x63"), ".idx", "unknown dtype code 99"),
        (lambda p: truncate(p + ".idx", 34 + 4 * 12), ".idx", "truncated or corrupt index"),
        (lambda p: corrupt(p + ".idx", 18, struct.pack("<Q", 5)), ".idx", "truncated or corrupt"),
        (
            lambda p: corrupt(p + ".idx", 34 + 16 + 8, struct.pack("<q", 4)),
            ".idx",
            "sequence 1 starts at byte 4, expected 6",
        ),
        (lambda p: corrupt(p + ".idx", 34 + 4, struct.pack("<i", -1)), ".idx", "negative length"),
        (
            lambda p: corrupt(p + ".idx", 34 + 48 + 32, struct.pack("<q", 7)),
            ".idx",
            "document boundaries run from 0 to 7",
        ),
        (lambda p: truncate(p + ".bin", 10), ".bin", "truncated .bin"),
        (lambda p: open(p + ".bin", "ab").write(b"\0\0"), ".bin", "24 bytes"),
    ],
)
def test_check_reports_the_bad_file(good, damage, file_named, message):
    damage(good)
    with pytest.raises(IndexedDatasetError) as error:
        check_indexed_dataset(good)
    text = str(error.value)
    assert message in text and good + file_named in text and "\n" not in text


def test_check_accepts_prefix_only(good):
    with pytest.raises(IndexedDatasetError, match="without the extension"):
        check_indexed_dataset(good + ".bin")
    assert check_indexed_dataset(good).num_sequences == 4


def test_check_mentions_unfinished_run(good):
    shutil.move(good + ".idx", good + ".idx.tmp.1234")
    with pytest.raises(IndexedDatasetError, match="unfinished temporary file"):
        check_indexed_dataset(good)


@pytest.mark.timeout(120)
def test_merge_tool(tmp_path, good):
    second = str(tmp_path / "second")
    reference_write(second, [[1, 2], [3]], numpy.uint16)
    done = run_tool("merge_datasets.py", "--input", good, second, "--output-prefix", tmp_path / "out" / "merged")
    assert done.returncode == 0, done.stderr
    merged = open_indexed_dataset(str(tmp_path / "out" / "merged"))
    assert [d.tolist() for d in merged[0:6]] == DOCS + [[1, 2], [3]]
    assert "6 documents, 14 tokens" in done.stdout

    wide = str(tmp_path / "wide")
    reference_write(wide, [[1]], numpy.int32)
    from an_megatron.data.merge import merge_datasets

    with pytest.raises(IndexedDatasetError) as error:
        merge_datasets([good, wide], str(tmp_path / "bad"))
    assert str(error.value) == f"{wide}: token dtype int32 differs from uint16 of the datasets before it"
    assert not any(n.startswith("bad") for n in os.listdir(tmp_path))
