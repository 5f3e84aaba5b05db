"""Bad input to tools/preprocess_data.py: each case is one clear error naming the file and line
(or, with --skip-bad-lines, a counted skip), and no finished-looking output is left behind,
including when the run is interrupted."""

import os
import signal
import subprocess
import sys
import time
from argparse import Namespace

import pytest
from test_data_support import REPO, finished_outputs, run_tool, tool_env, write_jsonl

from an_megatron.data import DataError, IndexedDatasetError, check_indexed_dataset
from an_megatron.data.preprocess import preprocess

NULL_TOKENIZER = Namespace(tokenizer_type="NullTokenizer", vocab_size=100)
GOOD = {"text": "1 2 3"}


def run_preprocess(corpus, out_dir, **kwargs):
    return preprocess([corpus], ["text"], NULL_TOKENIZER, os.path.join(out_dir, "out"), append_eod=True, **kwargs)


@pytest.mark.parametrize(
    "bad_line, line_number, reason",
    [
        ('{"text": "1 2"', 3, "not valid JSON (Expecting ',' delimiter)"),
        ('{"body": "1 2"}', 2, "no key 'text' (keys: body)"),
        ('{"text": 5}', 4, "key 'text' holds a int, not a string"),
        ('{"text": null}', 2, "key 'text' holds a NoneType, not a string"),
        ("[1, 2]", 3, "expected a JSON object, got list"),
        (b'{"text": "\xff\xfe"}', 2, "not valid JSON (invalid UTF-8)"),
        ('{"text": "1 two 3"}', 2, "cannot tokenize key 'text': NullTokenizer expects integer ids"),
    ],
)
@pytest.mark.parametrize("workers", [1, 2])
def test_bad_line_is_an_error_naming_file_and_line(tmp_path, bad_line, line_number, reason, workers):
    lines = [GOOD] * 5
    lines.insert(line_number - 1, "BAD")
    corpus = write_jsonl(tmp_path / "c.jsonl", lines)
    if isinstance(bad_line, bytes):
        data = open(corpus, "rb").read().replace(b'"BAD"', bad_line).replace(b"BAD", bad_line)
    else:
        data = open(corpus, "rb").read().replace(b"BAD", bad_line.encode())
    open(corpus, "wb").write(data)
    out_dir = tmp_path / "out"
    with pytest.raises(DataError) as error:
        run_preprocess(corpus, str(out_dir), workers=workers)
    message = str(error.value)
    assert message.startswith(f"{corpus}:{line_number}: {reason}")
    assert message.endswith("(use --skip-bad-lines to skip such lines)") and "\n" not in message
    assert os.listdir(out_dir) == []  # no output at all, not even temporary files

    stats = run_preprocess(corpus, str(out_dir), workers=workers, skip_bad_lines=True)
    assert stats.bad_lines == 1 and stats.documents["text"] == 5
    assert stats.first_bad_lines[0][:2] == (corpus, line_number)
    assert f"skipped {corpus}:{line_number}: {reason}" in "\n".join(stats.summary_lines())
    assert check_indexed_dataset(str(out_dir / "out_text_document")).num_documents == 5


def test_empty_documents_and_blank_lines_are_skipped_and_counted(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [GOOD, {"text": ""}, "", {"text": "  \n "}, GOOD])
    stats = run_preprocess(corpus, str(tmp_path))
    assert stats.documents["text"] == 2 and stats.empty_documents["text"] == 2
    assert stats.blank_lines == 1
    assert "skipped: 2 empty documents, 1 blank lines, 0 bad lines" in stats.summary_lines()


@pytest.mark.parametrize("skip_bad_lines", [False, True])
def test_token_id_outside_vocab_and_dtype_is_an_error(tmp_path, skip_bad_lines):
    corpus = write_jsonl(tmp_path / "c.jsonl", [GOOD, GOOD, {"text": "5 70000"}])
    with pytest.raises(DataError) as error:
        run_preprocess(corpus, str(tmp_path / "out"), skip_bad_lines=skip_bad_lines)
    assert str(error.value) == (
        f"{corpus}:3: token id 70000 (key 'text') does not fit: the index dtype is uint16, "
        f"chosen for vocab size 101, so ids must be in [0, 101)"
    )
    assert os.listdir(tmp_path / "out") == []


def test_missing_input_is_an_error(tmp_path):
    with pytest.raises(DataError, match=r"--input .*nothing\*\.jsonl: no such file"):
        run_preprocess(str(tmp_path / "nothing*.jsonl"), str(tmp_path))


def preprocess_cli(corpus, output_prefix, *flags):
    """tools/preprocess_data.py on `corpus` with NullTokenizer (100 ids); the finished process."""
    return run_tool(
        "preprocess_data.py",
        *("--input", corpus, "--tokenizer-type", "NullTokenizer", "--vocab-size", "100"),
        *("--output-prefix", output_prefix, *flags),
        timeout=100,
    )


@pytest.mark.timeout(120)
def test_cli_prints_one_line_and_exits_nonzero(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [GOOD, '{"text": 5}'])
    done = preprocess_cli(corpus, tmp_path / "out" / "x", "--workers", "2")
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"error: {corpus}:2: key 'text' holds a int, not a string (use --skip-bad-lines to skip such lines)"
    ]
    assert os.listdir(tmp_path / "out") == []


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory):
    """~60 MB of NullTokenizer text: long enough to interrupt a run mid-way."""
    path = tmp_path_factory.mktemp("big") / "big.jsonl"
    line = ('{"text": "' + " ".join(str(i % 90) for i in range(200)) + '"}\n').encode()
    with open(path, "wb") as out:
        out.write(line * (60_000_000 // len(line)))
    return str(path)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_interrupted_run_leaves_no_finished_output(tmp_path, big_corpus, signum):
    out_dir = tmp_path / "out"
    process = subprocess.Popen(
        [
            sys.executable,
            os.path.join(REPO, "tools", "preprocess_data.py"),
            "--input",
            big_corpus,
            "--tokenizer-type",
            "NullTokenizer",
            "--vocab-size",
            "100",
            "--append-eod",
            "--output-prefix",
            str(out_dir / "big"),
            "--workers",
            "2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=tool_env(),
    )
    try:
        deadline = time.time() + 60
        while not (out_dir.exists() and any(".tmp." in n for n in os.listdir(out_dir))):
            assert process.poll() is None, process.communicate()
            assert time.time() < deadline
            time.sleep(0.05)
        time.sleep(0.5)  # well inside the run: 60 MB take several seconds
        assert process.poll() is None, "the run finished before it could be interrupted"
        process.send_signal(signum)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode != 0
    assert finished_outputs(out_dir) == []
    prefix = str(out_dir / "big_text_document")
    with pytest.raises(IndexedDatasetError, match="missing"):
        check_indexed_dataset(prefix)
    if signum == signal.SIGKILL:
        # Nothing can clean up after SIGKILL; the leftovers are named *.tmp.<pid>.
        assert all(".tmp." in n for n in os.listdir(out_dir))
    else:
        assert os.listdir(out_dir) == []


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "lines, skip, counts",
    [
        ([], False, "0 bad lines skipped, 0 blank lines, 0 empty documents"),
        (["", {"text": ""}, {"text": " "}], False, "0 bad lines skipped, 1 blank lines, 2 empty documents"),
        (
            ['{"text": 5}', "[1]", ""],
            True,
            "2 bad lines skipped, 1 blank lines, 0 empty documents; the first bad line: {corpus}:1: "
            "key 'text' holds a int, not a string",
        ),
    ],
    ids=["empty-file", "only-empty-documents", "all-bad-lines-skipped"],
)
def test_a_corpus_without_documents_is_an_error_and_writes_nothing(tmp_path, lines, skip, counts):
    corpus = write_jsonl(tmp_path / "c.jsonl", lines)
    done = preprocess_cli(corpus, tmp_path / "out" / "x", "--append-eod", *(["--skip-bad-lines"] if skip else []))
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"error: {corpus}: no documents for key 'text' ({counts.format(corpus=corpus)}): nothing written"
    ]
    assert os.listdir(tmp_path / "out") == []
