"""Helpers shared by the tests/test_data_*.py files and benchmarks/preprocess_bench.py (no tests here)."""

import gzip
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KJV = os.path.join(REPO, "examples", "data", "kjv.jsonl.gz")


def tool_env() -> dict:
    """Environment for running tools/*.py: the repository importable even before
    `pip install -e .` has picked up a new top-level package, and no import-time warnings."""
    path = os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, PYTHONWARNINGS="ignore")


def run_tool(script: str, *args, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run tools/<script> with this Python; returns the finished process (output captured)."""
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=tool_env(),
    )


def write_jsonl(path, records) -> str:
    """Write records (dicts, or raw strings written as they are) one per line."""
    with open(path, "w", encoding="utf-8") as out:
        for record in records:
            out.write((record if isinstance(record, str) else json.dumps(record)) + "\n")
    return str(path)


def kjv_texts(limit=None) -> list:
    texts = []
    with gzip.open(KJV, "rt", encoding="utf-8") as corpus:
        for line in corpus:
            texts.append(json.loads(line)["text"])
            if limit is not None and len(texts) >= limit:
                break
    return texts


def train_tiny_sentencepiece(directory, vocab_size: int = 1000) -> str:
    """A SentencePiece model trained on the bundled corpus; returns the .model path."""
    from an_megatron.data.tokenizer_training import train_sentencepiece

    prefix = os.path.join(str(directory), "sp")
    train_sentencepiece([KJV], prefix, vocab_size, sample_sentences=20000, num_threads=1)
    return prefix + ".model"


def make_hf_tokenizer_json(directory) -> str:
    """A tiny byte-level BPE tokenizer.json (GPT-NeoX style) built with `tokenizers`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|padding|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(kjv_texts(50), trainer=trainer)
    path = os.path.join(str(directory), "tokenizer.json")
    tokenizer.save(path)
    return path


def gpt2_bytes_to_unicode() -> dict:
    """GPT-2's reversible byte -> printable character table (as published with GPT-2)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def make_gpt2_files(directory) -> tuple:
    """A tiny GPT-2 vocab.json/merges.txt: the 256 byte symbols, a few merges, <|endoftext|>."""
    symbols = [gpt2_bytes_to_unicode()[b] for b in range(256)]
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("a", "n"), ("an", "d"), ("Ġ", "and")]
    vocab = {symbol: i for i, symbol in enumerate(symbols)}
    for left, right in merges:
        vocab[left + right] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    vocab_path = os.path.join(str(directory), "vocab.json")
    merges_path = os.path.join(str(directory), "merges.txt")
    with open(vocab_path, "w", encoding="utf-8") as out:
        json.dump(vocab, out, ensure_ascii=False)
    with open(merges_path, "w", encoding="utf-8") as out:
        out.write("#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in merges))
    return vocab_path, merges_path


def finished_outputs(directory) -> list:
    """Files under `directory` that look like finished datasets (.bin or .idx)."""
    return sorted(name for name in os.listdir(directory) if name.endswith((".bin", ".idx")))
