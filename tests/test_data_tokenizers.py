"""Tokenizers behind --tokenizer-type: vocab sizes, eod ids, round trips, padding, errors."""

import pickle
from argparse import Namespace

import pytest
from test_data_support import make_gpt2_files, make_hf_tokenizer_json, train_tiny_sentencepiece

from an_megatron.data import DataConfig, DataError, build_tokenizer, pad_vocab_size
from an_megatron.data.arguments import data_error_message

FIELD_OF = {"tokenizer-model": "tokenizer_model", "vocab-file": "vocab_file", "tokenizer-type": "tokenizer_type"}
FIELD_OF["needs"] = "vocab_size"  # "... needs --vocab-size"

TEXT = "In the beginning God created the heaven and the earth.\nAnd the earth was without form."


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    return train_tiny_sentencepiece(tmp_path_factory.mktemp("sp"))


def test_pad_vocab_size_follows_megatron_rule():
    assert pad_vocab_size(50277, 128, 1) == 50304
    assert pad_vocab_size(50277, 128, 2) == 50432  # multiple of 256
    assert pad_vocab_size(256, 128, 2) == 256
    assert pad_vocab_size(1, 8, 1) == 8
    with pytest.raises(DataError, match="make_vocab_size_divisible_by"):
        pad_vocab_size(100, 0, 1)


def test_sentencepiece_types(sp_model):
    args = Namespace(
        tokenizer_type="SentencePieceTokenizer",
        tokenizer_model=sp_model,
        make_vocab_size_divisible_by=128,
        tensor_model_parallel_size=2,
    )
    megatron_style = build_tokenizer(args)
    # The trained model carries Megatron's specials, so nothing is appended: vocab == 1000.
    assert megatron_style.vocab_size == 1000
    assert DataConfig.from_namespace(args).padded_vocab_size(megatron_style.vocab_size) == 1024
    assert megatron_style.eod == 6  # <EOD>
    ids = megatron_style.tokenize(TEXT)
    assert megatron_style.detokenize(ids) == TEXT
    assert max(ids) < 1000 and min(ids) >= 0

    gpt_style = build_tokenizer(Namespace(tokenizer_type="GPTSentencePieceTokenizer", tokenizer_model=sp_model))
    assert gpt_style.vocab_size == 1000 and gpt_style.eod == 2  # </s>
    assert gpt_style.tokenize(TEXT) == ids
    # Byte fallback: characters never seen in training still round-trip.
    assert gpt_style.detokenize(gpt_style.tokenize("naïve ☃ 🚀")) == "naïve ☃ 🚀"
    # Workers rebuild tokenizers from their constructor arguments.
    assert pickle.loads(pickle.dumps(gpt_style)).tokenize(TEXT) == ids


def test_sentencepiece_appends_megatron_specials_when_missing(tmp_path):
    import sentencepiece
    from test_data_support import kjv_texts

    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(kjv_texts(100)),
        model_prefix=str(tmp_path / "plain"),
        vocab_size=500,
        model_type="bpe",
        minloglevel=2,
    )  # no <CLS>/<SEP>/<EOD>/<MASK>, no pad
    tokenizer = build_tokenizer(
        Namespace(tokenizer_type="SentencePieceTokenizer", tokenizer_model=str(tmp_path / "plain.model"))
    )
    # Megatron-LM appends <CLS>, <SEP>, <EOD>, <MASK>, then <PAD> (the model has no pad piece).
    assert tokenizer.vocab_size == 505
    assert tokenizer.eod == 502
    assert tokenizer.detokenize(tokenizer.tokenize("the earth") + [tokenizer.eod]) == "the earth<EOD>"


def test_huggingface_tokenizer_json(tmp_path):
    path = make_hf_tokenizer_json(tmp_path)
    tokenizer = build_tokenizer(Namespace(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=path))
    assert tokenizer.eod == 0  # <|endoftext|>, the first special token
    assert tokenizer.vocab_size == 400
    ids = tokenizer.tokenize(TEXT)
    assert tokenizer.detokenize(ids) == TEXT
    # A folder holding tokenizer.json works too, as with HuggingFace checkpoints.
    by_folder = build_tokenizer(Namespace(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=str(tmp_path)))
    assert by_folder.tokenize(TEXT) == ids


def test_gpt2_bpe(tmp_path):
    vocab, merges = make_gpt2_files(tmp_path)
    tokenizer = build_tokenizer(Namespace(tokenizer_type="GPT2BPETokenizer", vocab_file=vocab, merge_file=merges))
    assert tokenizer.vocab_size == 256 + 7 + 1 and tokenizer.eod == 263
    ids = tokenizer.tokenize("the and")
    # GPT-2 pre-tokenizes into "the", " and"; " and" is the last merge (id 262).
    assert ids == [ord("t"), 257, 262] and tokenizer.detokenize(ids) == "the and"
    assert tokenizer.detokenize(tokenizer.tokenize(TEXT)) == TEXT


def test_null_tokenizer():
    args = Namespace(tokenizer_type="NullTokenizer", vocab_size=100)
    tokenizer = build_tokenizer(args)
    assert tokenizer.vocab_size == 101 and tokenizer.eod == 100
    assert DataConfig.from_namespace(args).padded_vocab_size(tokenizer.vocab_size) == 128
    assert tokenizer.tokenize(" 1 2\t3\n4 ") == [1, 2, 3, 4]
    assert tokenizer.detokenize([1, 2, 3]) == "1 2 3"
    with pytest.raises(ValueError, match="integer ids"):
        tokenizer.tokenize("1 two")


@pytest.mark.parametrize(
    "args, message",
    [
        (
            dict(tokenizer_type="SentencePieceTokenizer", tokenizer_model="/nope/tok.model"),
            "--tokenizer-model /nope/tok.model: no such file",
        ),
        (
            dict(tokenizer_type="HuggingFaceTokenizer", tokenizer_model="/nope/tokenizer.json"),
            "--tokenizer-model /nope/tokenizer.json: no such file",
        ),
        (
            dict(tokenizer_type="GPT2BPETokenizer", vocab_file="/nope/vocab.json", merge_file="m.txt"),
            "--vocab-file /nope/vocab.json: no such file",
        ),
        (dict(tokenizer_type="SentencePieceTokenizer"), "--tokenizer-model is required"),
        (dict(tokenizer_type="NullTokenizer"), "needs --vocab-size"),
        (dict(tokenizer_type="BertTokenizer"), "--tokenizer-type BertTokenizer: unknown"),
        (dict(), "--tokenizer-type is required"),
        (
            dict(tokenizer_type="GPTSentencePieceTokenizer", tokenizer_model=__file__),
            f"--tokenizer-model {__file__}: not a SentencePiece model",
        ),
        (
            dict(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=__file__),
            f"--tokenizer-model {__file__}: not a HuggingFace tokenizer.json",
        ),
    ],
)
def test_tokenizer_errors_name_flag_and_path(args, message):
    """The data code names the field (tokenizer_model); the command line shows the flag."""
    with pytest.raises(DataError) as error:
        build_tokenizer(Namespace(**args))
    shown = data_error_message(error.value)
    assert message in shown and "\n" not in shown
    assert "--" not in str(error.value) and FIELD_OF[message.split()[0].removeprefix("--")] in str(error.value)
