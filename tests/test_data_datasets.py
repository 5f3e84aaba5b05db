"""Train/valid/test datasets from --data-path blends and --split on megatron-core, mock data,
flag parsing, and rank-0-first index building under torch.distributed."""

import argparse
import os

import pytest
import torch
from test_data_support import kjv_texts, train_tiny_sentencepiece, write_jsonl

from an_megatron.data import (
    DataError,
    IndexedDatasetError,
    add_data_args,
    build_data_loader,
    build_tokenizer,
    build_train_valid_test_datasets,
    document_ids,
    parse_data_path,
)
from an_megatron.data.arguments import data_error_message
from an_megatron.data.preprocess import preprocess

SEQ = 32


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """Two preprocessed prefixes (KJV chapters 0-199 and 200-399) and the tokenizer args."""
    directory = tmp_path_factory.mktemp("blend")
    tokenizer_args = argparse.Namespace(
        tokenizer_type="GPTSentencePieceTokenizer", tokenizer_model=train_tiny_sentencepiece(directory, 600)
    )
    texts = kjv_texts(400)
    prefixes = []
    for name, part in (("a", texts[:200]), ("b", texts[200:])):
        corpus = write_jsonl(directory / f"{name}.jsonl", [{"text": t} for t in part])
        preprocess([corpus], ["text"], tokenizer_args, str(directory / name), append_eod=True)
        prefixes.append(str(directory / f"{name}_text_document"))
    return directory, tokenizer_args, prefixes


def make_args(tokenizer_args, argv):
    parser = argparse.ArgumentParser()
    add_data_args(parser)
    args = parser.parse_args(argv)
    args.tokenizer_type, args.tokenizer_model = (tokenizer_args.tokenizer_type, tokenizer_args.tokenizer_model)
    args.seq_length, args.seed = SEQ, 1234  # defined by the training arguments
    return args


def test_add_data_args_defaults():
    parser = argparse.ArgumentParser()
    add_data_args(parser)
    args = parser.parse_args([])
    assert args.split == "969,30,1" and args.data_path is None and not args.mock_data
    assert args.make_vocab_size_divisible_by == 128 and args.num_workers == 2
    args = parser.parse_args(["--data-path", "0.3", "a", "0.7", "b", "--eod-mask-loss"])
    assert args.data_path == ["0.3", "a", "0.7", "b"] and args.eod_mask_loss
    for training_flag in (
        "--seq-length",
        "--seed",
        "--micro-batch-size",
        "--global-batch-size",
        "--tensor-model-parallel-size",
    ):
        assert training_flag not in parser._option_string_actions


def test_parse_data_path():
    assert parse_data_path(["p"]) == (["p"], None)
    assert parse_data_path(["p", "q"]) == (["p", "q"], None)
    assert parse_data_path(["1", "p", "3", "q"]) == (["p", "q"], [1.0, 3.0])
    for bad in (["1", "p", "q"], ["p", "1"], ["1", "2"]):
        with pytest.raises(DataError, match="expected one or more prefixes, or pairs"):
            parse_data_path(bad)
    with pytest.raises(DataError, match="data_path is required") as error:
        parse_data_path([])
    assert data_error_message(error.value).startswith("--data-path is required (or --mock-data")


def check_sample(sample, vocab_size):
    assert sample["tokens"].shape == (SEQ,) and sample["labels"].shape == (SEQ,)
    assert torch.equal(sample["labels"][:-1], sample["tokens"][1:])  # next-token targets
    assert sample["loss_mask"].dtype == torch.float32 and sample["position_ids"].shape == (SEQ,)
    assert int(sample["tokens"].max()) < vocab_size and int(sample["tokens"].min()) >= 0


def test_blend_of_two_prefixes_with_split(corpora):
    directory, tokenizer_args, (a, b) = corpora
    args = make_args(
        tokenizer_args,
        ["--data-path", "0.3", a, "0.7", b, "--split", "90,10,0", "--data-cache-path", str(directory / "cache")],
    )
    tokenizer = build_tokenizer(args)
    train, valid, test = build_train_valid_test_datasets(args, tokenizer, [200, 20, 0])
    assert type(train).__name__ == "BlendedDataset" and test is None
    assert len(train) >= 200 and len(valid) >= 20
    for i in (0, 1, 199):
        check_sample(train[i], tokenizer.vocab_size)
    # Both prefixes contribute, in about the requested proportion.
    from_b = sum(int(train[i]["dataset_id"]) for i in range(200))
    assert 120 <= from_b <= 160
    assert len(os.listdir(directory / "cache")) > 0  # indices cached where asked

    # A second build loads the cached indices and gives the same samples.
    again, _, _ = build_train_valid_test_datasets(args, tokenizer, [200, 20, 0])
    assert all(torch.equal(again[i]["tokens"], train[i]["tokens"]) for i in range(0, 200, 17))

    loader = build_data_loader(
        train, consumed_samples=8, micro_batch_size=4, data_parallel_rank=0, data_parallel_size=2
    )
    batch = next(iter(loader))
    assert batch["tokens"].shape == (4, SEQ) and batch["loss_mask"].shape == (4, SEQ)
    assert torch.equal(batch["tokens"][0], train[8]["tokens"])


def test_single_prefix_and_document_masks(corpora):
    directory, tokenizer_args, (a, _) = corpora
    args = make_args(
        tokenizer_args,
        [
            "--data-path",
            a,
            "--split",
            "98,2,0",
            "--eod-mask-loss",
            "--reset-position-ids",
            "--reset-attention-mask",
            "--data-cache-path",
            str(directory / "cache1"),
        ],
    )
    tokenizer = build_tokenizer(args)
    train, _, _ = build_train_valid_test_datasets(args, tokenizer, [50, 5, 0])
    assert type(train).__name__ == "GPTDataset"
    sample = next(train[i] for i in range(len(train)) if (train[i]["tokens"] == tokenizer.eod).any())
    eod_at = int((sample["tokens"] == tokenizer.eod).nonzero()[0])
    assert sample["loss_mask"][eod_at] == 0  # --eod-mask-loss
    if eod_at + 1 < SEQ:
        assert sample["position_ids"][eod_at + 1] == 0  # --reset-position-ids
    # --reset-attention-mask: no s x s mask per sample; the trainer derives document ids, which
    # change right after each end-of-document token
    assert "attention_mask" not in sample
    docs = document_ids(sample["tokens"][None], tokenizer.eod)[0]
    if eod_at + 1 < SEQ:
        assert docs[eod_at + 1] == docs[eod_at] + 1


def test_mock_data():
    args = make_args(
        argparse.Namespace(tokenizer_type="NullTokenizer", tokenizer_model=None),
        ["--mock-data", "--vocab-size", "1000"],
    )
    tokenizer = build_tokenizer(args)
    train, valid, test = build_train_valid_test_datasets(args, tokenizer, [64, 8, 8])
    assert type(train).__name__ == "MockGPTDataset" and len(train) >= 64
    check_sample(train[0], tokenizer.vocab_size)
    assert "attention_mask" not in train[0]


def test_missing_and_corrupt_data_paths(corpora, tmp_path):
    directory, tokenizer_args, (a, _) = corpora
    args = make_args(tokenizer_args, ["--data-path", str(tmp_path / "nope_text_document")])
    with pytest.raises(IndexedDatasetError) as error:
        build_train_valid_test_datasets(args, build_tokenizer(args), [10, 1, 0])
    nope = str(tmp_path / "nope_text_document")
    assert str(error.value) == f"indexed dataset {nope!r}: missing {nope}.bin and {nope}.idx"
    args = make_args(tokenizer_args, [])
    with pytest.raises(DataError, match="data_path is required"):
        build_train_valid_test_datasets(args, build_tokenizer(args), [10, 1, 0])
    # A dataset whose ids are too narrow for the tokenizer was made with another tokenizer.
    wide = make_args(
        argparse.Namespace(tokenizer_type="NullTokenizer", tokenizer_model=None),
        ["--data-path", a, "--vocab-size", "100000"],
    )
    with pytest.raises(DataError, match="stores uint16 token ids, too narrow"):
        build_train_valid_test_datasets(wide, build_tokenizer(wide), [10, 1, 0])


def _build_on_two_ranks(data_path, tokenizer_args, cache):
    """One rank of the distributed test: what the cache held each time this rank built."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    args = make_args(tokenizer_args, ["--data-path", *data_path, "--split", "90,10,0", "--data-cache-path", cache])
    seen = []

    def is_built_on_rank():
        seen.append(sorted(os.listdir(cache)) if os.path.isdir(cache) else [])
        return True

    train, _, _ = build_train_valid_test_datasets(args, build_tokenizer(args), [100, 10, 0], is_built_on_rank)
    return seen, [train[i]["tokens"] for i in range(0, 100, 9)]


@pytest.mark.timeout(180)
def test_indices_built_by_rank0_and_loaded_by_the_others(corpora, tmp_path):
    from distributed import run_distributed

    _, tokenizer_args, (a, b) = corpora
    cache = str(tmp_path / "cache")
    (seen0, samples0), (seen1, samples1) = run_distributed(
        _build_on_two_ranks, 2, ["1", a, "2", b], tokenizer_args, cache, timeout=150, device="cpu"
    )
    # megatron-core builds each dataset on rank 0, then a barrier, then on the other ranks:
    assert seen0[0] == []  # rank 0 started on an empty cache,
    assert seen1[0] != []  # rank 1 started only once rank 0 had written the first indices,
    assert seen1[-1] == sorted(os.listdir(cache))  # and its last build found the cache complete.
    assert all(torch.equal(x, y) for x, y in zip(samples0, samples1))
