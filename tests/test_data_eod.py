"""--eod-token: the end-of-document id read from the data (<EOD> of Megatron's legacy
SentencePiece path, </s> of Megatron-LM's default), the override, and the errors."""

import argparse
import pickle
import re

import pytest
import torch
from test_data_support import kjv_texts, train_tiny_sentencepiece, write_jsonl

from an_megatron.data import (
    CompactIndexedDatasetBuilder,
    DataError,
    add_data_args,
    build_tokenizer,
    build_train_valid_test_datasets,
    check_indexed_dataset,
    resolve_eod,
)
from an_megatron.data import eod as eod_module
from an_megatron.data.arguments import data_error_message
from an_megatron.data.indexed import document_last_tokens
from an_megatron.data.preprocess import preprocess
from an_megatron.data.tokenizers import TokenizerWithEod

SEQ = 32
LEGACY, DEFAULT = "SentencePieceTokenizer", "GPTSentencePieceTokenizer"
EOD, EOS = 6, 2  # <EOD> and </s> of the tokenizer tools/train_tokenizer.py trains


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """The same texts preprocessed three ways: ending documents with <EOD> (our and Megatron's
    legacy tokenizer), with </s> (as Megatron-LM's default path writes), and without an EOD."""
    directory = tmp_path_factory.mktemp("eod")
    model = train_tiny_sentencepiece(directory, 600)
    corpus = write_jsonl(directory / "c.jsonl", [{"text": t} for t in kjv_texts(60)])
    prefixes = {}
    for name, kind, append_eod in (("eod", LEGACY, True), ("eos", DEFAULT, True), ("none", LEGACY, False)):
        tokenizer_args = argparse.Namespace(tokenizer_type=kind, tokenizer_model=model)
        preprocess([corpus], ["text"], tokenizer_args, str(directory / name), append_eod=append_eod)
        prefixes[name] = str(directory / f"{name}_text_document")
    return directory, model, prefixes


@pytest.fixture(autouse=True)
def fresh_resolution():
    eod_module._RESOLVED.clear()  # each test sees its own messages
    yield


def make_args(model, argv, kind=LEGACY):
    parser = argparse.ArgumentParser()
    add_data_args(parser)
    args = parser.parse_args(["--tokenizer-type", kind, "--tokenizer-model", model, *argv])
    args.seq_length, args.seed = SEQ, 1234  # defined by the training arguments
    return args


def test_documents_end_as_the_two_paths_write_them(corpora):
    _, model, prefixes = corpora
    eod_ends, eos_ends = (document_last_tokens(prefixes[n], 1000) for n in ("eod", "eos"))
    assert len(eod_ends) == 60 and set(eod_ends.tolist()) == {EOD}
    assert len(eos_ends) == 60 and set(eos_ends.tolist()) == {EOS}
    assert len(document_last_tokens(prefixes["eod"], 7)) == 7  # a spread sample


def test_detection(corpora, capsys):
    _, model, prefixes = corpora
    args = make_args(model, ["--data-path", prefixes["eod"]])
    assert build_tokenizer(args).eod_candidates == (EOD, EOS)
    assert resolve_eod(args, build_tokenizer(args)) == EOD
    assert capsys.readouterr().out == ""  # the tokenizer's own eod: nothing to say

    args = make_args(model, ["--data-path", prefixes["eos"]])
    assert resolve_eod(args, build_tokenizer(args)) == EOS
    assert capsys.readouterr().out == (
        f"{prefixes['eos']}: documents end with </s> (id 2), not <EOD>: using </s> as end of document\n"
    )
    assert resolve_eod(args, build_tokenizer(args)) == EOS
    assert capsys.readouterr().out == ""  # said once

    # Symmetrically, GPTSentencePieceTokenizer (eod </s>) reads legacy <EOD> data right.
    args = make_args(model, ["--data-path", prefixes["eod"]], kind=DEFAULT)
    assert build_tokenizer(args).eod_candidates == (EOS, EOD)
    assert resolve_eod(args, build_tokenizer(args)) == EOD


@pytest.mark.parametrize("name, expected", [("eod", EOD), ("eos", EOS)])
def test_gpt_dataset_masks_exactly_the_detected_eod(corpora, name, expected):
    directory, model, prefixes = corpora
    args = make_args(
        model,
        [
            "--data-path",
            prefixes[name],
            "--split",
            "100,0,0",
            "--eod-mask-loss",
            "--reset-position-ids",
            "--data-cache-path",
            str(directory / f"cache_{name}"),
        ],
    )
    tokenizer = build_tokenizer(args)
    train, _, _ = build_train_valid_test_datasets(args, tokenizer, [40, 0, 0])
    assert train.config.tokenizer.eod == expected
    seen = 0
    for i in range(len(train)):
        sample = train[i]
        is_eod = sample["tokens"] == expected
        assert torch.equal(sample["loss_mask"] == 0, is_eod)
        for at in is_eod.nonzero().flatten().tolist():
            if at + 1 < SEQ:
                assert sample["position_ids"][at + 1] == 0
        seen += int(is_eod.sum())
    assert seen > 0
    # DataLoader workers get the dataset pickled: the detected eod survives.
    assert pickle.loads(pickle.dumps(train)).config.tokenizer.eod == expected


def test_override_wins(corpora, capsys):
    _, model, prefixes = corpora
    for value, expected in (("<EOD>", EOD), ("</s>", EOS), ("2", EOS), ("17", 17)):
        args = make_args(model, ["--data-path", prefixes["eos"], "--eod-token", value])
        assert resolve_eod(args, build_tokenizer(args)) == expected
    assert capsys.readouterr().out == ""  # no detection, no message
    for value, message in (
        ("<nope>", "eod_token <nope>: not a token of the tokenizer"),
        ("600", "eod_token 600: id out of range [0, 600)"),
    ):
        args = make_args(model, ["--data-path", prefixes["eos"], "--eod-token", value])
        with pytest.raises(DataError, match=re.escape(message)) as error:  # the data code names the field
            resolve_eod(args, build_tokenizer(args))
        assert data_error_message(error.value).startswith("--" + message.replace("_", "-"))  # the CLI the flag


def test_blend_whose_prefixes_disagree_is_an_error(corpora):
    _, model, prefixes = corpora
    args = make_args(model, ["--data-path", "1", prefixes["eod"], "1", prefixes["eos"]])
    with pytest.raises(DataError) as error:
        build_train_valid_test_datasets(args, build_tokenizer(args), [10, 0, 0])
    message = str(error.value)
    assert prefixes["eod"] in message and prefixes["eos"] in message and "\n" not in message
    assert "<EOD> (id 6)" in message and "</s> (id 2)" in message


def test_documents_without_eod(corpora, capsys):
    _, model, prefixes = corpora
    for flag in ("--eod-mask-loss", "--reset-attention-mask", "--reset-position-ids"):
        args = make_args(model, ["--data-path", prefixes["none"], flag])
        with pytest.raises(DataError) as error:
            resolve_eod(args, build_tokenizer(args))
        message = data_error_message(error.value)  # as the command line shows it
        assert message.startswith(
            f"{prefixes['none']}: documents do not end with an end-of-document token (of 60 sampled: 0 end with <EOD>"
        )
        assert flag in message and "--append-eod" in message and "\n" not in message
        assert flag[2:].replace("-", "_") in str(error.value)  # the data code names the field
    # Without document flags, concatenated documents are legitimate: a warning, the default eod.
    args = make_args(model, ["--data-path", prefixes["none"]])
    assert resolve_eod(args, build_tokenizer(args)) == EOD
    assert capsys.readouterr().out.startswith(f"warning: {prefixes['none']}: documents do not end")
    # --eod-token skips detection, for whoever wants document flags on such data anyway.
    args = make_args(model, ["--data-path", prefixes["none"], "--eod-mask-loss", "--eod-token", "<EOD>"])
    assert resolve_eod(args, build_tokenizer(args)) == EOD


def test_mostly_ending_with_eod_warns(corpora, tmp_path, capsys):
    """A prefix merged from a --append-eod part and a small part without it."""
    _, model, prefixes = corpora
    tokenizer = build_tokenizer(make_args(model, []))
    builder = CompactIndexedDatasetBuilder(str(tmp_path / "m.bin"), dtype=check_indexed_dataset(prefixes["eos"]).dtype)
    for _ in range(19):
        builder.add_index(prefixes["eos"])
    builder.add_index(prefixes["none"])
    builder.finalize(str(tmp_path / "m.idx"))
    args = make_args(model, ["--data-path", str(tmp_path / "m"), "--eod-mask-loss"])
    assert resolve_eod(args, tokenizer) == EOS
    out = capsys.readouterr().out
    assert "do not end with </s> (id 2): they run into the next" in out
    assert "using </s> as end of document" in out


def test_eod_token_flag_and_wrapper():
    parser = argparse.ArgumentParser()
    add_data_args(parser)
    assert parser.parse_args([]).eod_token == "auto"
    assert "--eod-token" in parser.format_help()
    inner = build_tokenizer(argparse.Namespace(tokenizer_type="NullTokenizer", vocab_size=10))
    wrapped = TokenizerWithEod(inner, 3)
    assert wrapped.eod == 3 and wrapped.vocab_size == 11 and wrapped.tokenize("1 2") == [1, 2]
    assert wrapped.unique_identifiers == inner.unique_identifiers  # the index cache stays valid
    assert pickle.loads(pickle.dumps(wrapped)).eod == 3
    with pytest.raises(AttributeError):
        wrapped.pad  # megatron-core falls back to its own pad id
