"""tools/preprocess_data.py and tools/train_tokenizer.py end to end: round trips through the
reader for each tokenizer type, worker counts, gzip input, long lines in tokenizer training."""

import gzip
import json
import os
import re
import shutil
from argparse import Namespace

import pytest
from test_data_support import KJV, kjv_texts, make_gpt2_files, make_hf_tokenizer_json, run_tool, write_jsonl

from an_megatron.data import DataError, build_tokenizer, check_indexed_dataset, open_indexed_dataset
from an_megatron.data.preprocess import preprocess
from an_megatron.data.tokenizer_training import split_long_line, train_sentencepiece

NUM_DOCS = 40


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    directory = tmp_path_factory.mktemp("corpus")
    return write_jsonl(directory / "kjv40.jsonl", [{"text": t, "id": i} for i, t in enumerate(kjv_texts(NUM_DOCS))])


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    """Trained with the real tool on the bundled .jsonl.gz corpus."""
    prefix = tmp_path_factory.mktemp("sp") / "kjv"
    done = run_tool(
        "train_tokenizer.py", "--input", KJV, "--json-keys", "text", "--vocab-size", 1000, "--output-prefix", prefix
    )
    assert done.returncode == 0, done.stderr
    assert "read 1189 documents" in done.stdout
    return str(prefix) + ".model"


def tokenizer_flags(kind, directory, sp_model):
    if kind in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer"):
        return ["--tokenizer-model", sp_model]
    if kind == "HuggingFaceTokenizer":
        return ["--tokenizer-model", make_hf_tokenizer_json(directory)]
    if kind == "GPT2BPETokenizer":
        vocab, merges = make_gpt2_files(directory)
        return ["--vocab-file", vocab, "--merge-file", merges]
    raise AssertionError(kind)


def namespace(kind, flags):
    values = dict(zip(flags[0::2], flags[1::2]))
    return Namespace(
        tokenizer_type=kind,
        tokenizer_model=values.get("--tokenizer-model"),
        vocab_file=values.get("--vocab-file"),
        merge_file=values.get("--merge-file"),
    )


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "kind", ["SentencePieceTokenizer", "GPTSentencePieceTokenizer", "HuggingFaceTokenizer", "GPT2BPETokenizer"]
)
def test_round_trip(tmp_path, corpus, sp_model, kind):
    flags = tokenizer_flags(kind, tmp_path, sp_model)
    done = run_tool(
        "preprocess_data.py",
        "--input",
        corpus,
        "--json-keys",
        "text",
        "--tokenizer-type",
        kind,
        *flags,
        "--append-eod",
        "--output-prefix",
        tmp_path / "out" / "kjv",
        "--workers",
        2,
    )
    assert done.returncode == 0, done.stderr
    assert f"documents: {NUM_DOCS}" in done.stdout and "0 bad lines" in done.stdout
    prefix = str(tmp_path / "out" / "kjv_text_document")
    tokenizer = build_tokenizer(namespace(kind, flags))
    dataset = open_indexed_dataset(prefix)
    assert len(dataset) == NUM_DOCS
    for text, ids in zip(kjv_texts(NUM_DOCS), dataset[0:NUM_DOCS]):
        assert ids[-1] == tokenizer.eod
        assert ids[:-1].tolist() == tokenizer.tokenize(text)
        assert tokenizer.detokenize(ids[:-1].tolist()) == text
    info = check_indexed_dataset(prefix)
    assert f"tokens: {info.num_tokens}" in done.stdout
    assert sorted(os.listdir(tmp_path / "out")) == [
        "kjv_text_document.bin",
        "kjv_text_document.idx",
        "kjv_text_document.stats.json",
    ]
    largest = max(int(ids.max()) for ids in dataset[0:NUM_DOCS])
    assert json.load(open(prefix + ".stats.json"))["max_token_id"] == largest


@pytest.mark.timeout(120)
def test_null_tokenizer_gzip_two_keys_and_worker_counts(tmp_path):
    records = [
        {"text": " ".join(str((i * 7 + j) % 50) for j in range(i % 9)), "title": str(i % 50)} for i in range(3000)
    ]
    plain = write_jsonl(tmp_path / "ids.jsonl", records)
    with open(plain, "rb") as src, gzip.open(tmp_path / "ids.jsonl.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    # Two workers on the .gz through the command line; one in-process on the plain file.
    done = run_tool(
        "preprocess_data.py",
        "--input",
        tmp_path / "ids.jsonl.gz",
        "--json-keys",
        "text",
        "title",
        "--tokenizer-type",
        "NullTokenizer",
        "--vocab-size",
        50,
        "--append-eod",
        "--output-prefix",
        tmp_path / "w2",
        "--workers",
        2,
    )
    assert done.returncode == 0, done.stderr
    # Every 9th text is empty: skipped and counted.
    assert "skipped: 334 empty documents, 0 blank lines, 0 bad lines" in done.stdout
    # Without a terminal, progress lines instead of a bar (one per batch at most).
    assert re.search(r"processed \d+ documents \(\d+ docs/s, \d+ tokens/s, [.\d]+ MB/s\)", done.stderr)
    stats = preprocess(
        [plain],
        ["text", "title"],
        Namespace(tokenizer_type="NullTokenizer", vocab_size=50),
        str(tmp_path / "w1"),
        append_eod=True,
        workers=1,
    )
    assert stats.empty_documents == {"text": 334, "title": 0}
    outputs = {
        workers: {
            ext: open(tmp_path / f"w{workers}_{key}_document{ext}", "rb").read()
            for key in ("text", "title")
            for ext in (".bin", ".idx")
        }
        for workers in (1, 2)
    }
    assert outputs[1] == outputs[2]  # same bytes, in input order, whatever the worker count
    texts = open_indexed_dataset(str(tmp_path / "w2_text_document"))
    kept = [r["text"] for r in records if r["text"]]
    assert len(texts) == len(kept)
    assert texts[5].tolist() == [int(t) for t in kept[5].split()] + [50]


def test_split_long_line_keeps_every_character():
    line = ("word " * 2000) + "x" * 9000 + " é" * 3000
    pieces = split_long_line(line, 4192)
    assert "".join(pieces) == line
    assert all(len(p.encode("utf-8")) <= 4192 for p in pieces)
    assert split_long_line("short", 4192) == ["short"]


@pytest.mark.timeout(120)
def test_train_tokenizer_splits_and_reports_long_lines(tmp_path):
    long_line = "In the beginning God created the heaven and the earth. " * 200  # 11,200 bytes
    text_file = tmp_path / "plain.txt"
    text_file.write_text("\n".join(kjv_texts(30)) + "\n" + long_line + "\n", encoding="utf-8")
    done = run_tool(
        "train_tokenizer.py",
        "--input",
        str(tmp_path / "*.txt"),
        "--vocab-size",
        600,
        "--output-prefix",
        tmp_path / "tok",
    )
    assert done.returncode == 0, done.stderr
    assert "split 1 lines longer than 4192 bytes into 3 pieces" in done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.txt", "tok.model", "tok.vocab"]

    with pytest.raises(DataError) as error:
        train_sentencepiece([str(text_file)], str(tmp_path / "big"), 100000)
    assert str(error.value).startswith("--vocab-size 100000: Vocabulary size too high")
    assert not any(p.name.startswith("big") for p in tmp_path.iterdir())
