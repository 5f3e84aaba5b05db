"""Tokenizers selected by Megatron's `--tokenizer-type` flag.

megatron-core ships tokenizer wrappers (`megatron.core.tokenizers`), but its HuggingFace and GPT-2
BPE wrappers need the `transformers` package, which is large and which we do not otherwise need.
These thin wrappers sit directly on `sentencepiece` and `tokenizers` and reproduce Megatron-LM's
vocabulary sizes and end-of-document ids, so data preprocessed by Megatron-LM lines up with ours:

- SentencePieceTokenizer: the .model's pieces, then Megatron's special tokens (<CLS>, <SEP>,
  <EOD>, <MASK>, pad, bos, eos) appended when the model lacks them; eod is <EOD>.
- GPTSentencePieceTokenizer: the .model's pieces only; eod is the model's eos (</s>).
- HuggingFaceTokenizer: a tokenizer.json (or a folder holding one); eod is the eos token of a
  tokenizer_config.json beside it, else the first of <|endoftext|>, </s>, ... in the vocabulary.
- GPT2BPETokenizer: GPT-2's vocab.json + merges.txt; eod is <|endoftext|>.
- NullTokenizer: whitespace-separated integer ids; vocab_size is --vocab-size + 1, eod is
  --vocab-size (Megatron's convention).

Each has `vocab_size`, `eod`, `tokenize(text) -> list[int]`, `detokenize(ids) -> str` and
`unique_identifiers` (megatron-core's datasets hash it into their cache file names). Tokenizers
pickle by their constructor arguments, so DataLoader and preprocessing workers can rebuild them.

For --eod-token (see eod.py) each also has `token_to_id(token)`, `id_to_token(id)` and
`eod_candidates`: the ids another Megatron tokenizer path may have written as end of document
for the same model (SentencePiece: <EOD> and the model's eos </s>).
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict

from an_megatron.data.errors import DataError, DataFieldError

TOKENIZER_TYPES = (
    "SentencePieceTokenizer",
    "GPTSentencePieceTokenizer",
    "HuggingFaceTokenizer",
    "GPT2BPETokenizer",
    "NullTokenizer",
)

# Megatron-LM's SentencePieceTokenizer makes sure these exist, appending missing ones in order.
MEGATRON_SP_SPECIALS = ("<CLS>", "<SEP>", "<EOD>", "<MASK>")
# Tried in order when a tokenizer.json comes without a tokenizer_config.json naming its eos.
HF_EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "<EOD>")


def pad_vocab_size(vocab_size: int, divisible_by: int = 128, tp_size: int = 1) -> int:
    """Megatron's padded vocabulary: round up to a multiple of divisible_by * tp_size."""
    for name, value in (
        ("vocab_size", vocab_size),
        ("make_vocab_size_divisible_by", divisible_by),
        ("tensor_model_parallel_size", tp_size),
    ):
        if not isinstance(value, int) or value < 1:
            raise DataError(f"{name} must be a positive integer, got {value!r}")
    multiple = divisible_by * tp_size
    return -(-vocab_size // multiple) * multiple


class _Tokenizer:
    """Common behaviour: pickling by constructor arguments and Megatron-style identifiers."""

    def __init__(self, *init_args) -> None:
        self._init_args = init_args

    def __reduce__(self):
        return (type(self), self._init_args)

    def tokenize_batch(self, texts: list) -> list:
        """tokenize() of each text; subclasses batch it in their library where that is faster."""
        return [self.tokenize(text) for text in texts]

    @property
    def unique_identifiers(self) -> OrderedDict:
        return OrderedDict(
            [
                ("class", f"{type(self).__module__}.{type(self).__qualname__}"),
                ("files", [os.path.abspath(a) if isinstance(a, str) else a for a in self._init_args]),
                ("vocab_size", self.vocab_size),
            ]
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eod={self.eod})"

    def token_to_id(self, token: str):
        """The id of a whole token (not its encoding), or None if there is no such token."""
        return None

    def id_to_token(self, token_id: int) -> str:
        return str(token_id)

    @property
    def eod_candidates(self) -> tuple:
        """Ids that may end documents in data preprocessed for this model: eod first."""
        return (self.eod,)


class _SentencePieceModel(_Tokenizer):
    """Loading and encoding shared by the two SentencePiece types."""

    def __init__(self, model_file: str) -> None:
        super().__init__(model_file)
        import sentencepiece

        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
        except (OSError, RuntimeError) as error:
            reason = str(error).strip().splitlines()[-1] if str(error).strip() else repr(error)
            raise DataFieldError(
                "{tokenizer_model} {path}: not a SentencePiece model ({reason})",
                "tokenizer_model",
                path=model_file,
                reason=reason,
            ) from None

    def tokenize(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def tokenize_batch(self, texts: list) -> list:
        # One call into C++ for the whole batch: ~25% faster than a Python loop.
        return self._sp.encode(list(texts), num_threads=1)

    def token_to_id(self, token: str):
        piece_id = self._sp.piece_to_id(token)
        return piece_id if self._sp.id_to_piece(piece_id) == token else None  # unknown -> <unk>

    def id_to_token(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id) if 0 <= token_id < self._sp.get_piece_size() else str(token_id)


class SentencePieceTokenizer(_SentencePieceModel):
    """A SentencePiece .model with Megatron-LM's special tokens appended when missing."""

    def __init__(self, model_file: str) -> None:
        super().__init__(model_file)
        self._num_pieces = self._sp.get_piece_size()
        self._special_ids: dict[str, int] = {}
        self._appended: dict[int, str] = {}  # ids past the model's pieces -> token text
        wanted = list(MEGATRON_SP_SPECIALS)
        for id_fn, fallback in ((self._sp.pad_id, "<PAD>"), (self._sp.bos_id, "<BOS>"), (self._sp.eos_id, "<EOS>")):
            piece_id = id_fn()
            wanted.append(self._sp.id_to_piece(piece_id) if piece_id >= 0 else fallback)
        for token in wanted:
            piece_id = self._sp.piece_to_id(token)
            if self._sp.id_to_piece(piece_id) != token:  # unknown pieces map to <unk>
                piece_id = self._num_pieces + len(self._appended)
                self._appended[piece_id] = token
            self._special_ids[token] = piece_id

    @property
    def vocab_size(self) -> int:
        return self._num_pieces + len(self._appended)

    @property
    def eod(self) -> int:
        return self._special_ids["<EOD>"]

    @property
    def eod_candidates(self) -> tuple:
        # Megatron-LM 0.16's default (non-legacy) SentencePiece path ends documents with </s>.
        eos = self._sp.eos_id()
        return (self.eod,) if eos < 0 or eos == self.eod else (self.eod, eos)

    def token_to_id(self, token: str):
        return self._special_ids.get(token, super().token_to_id(token))

    def id_to_token(self, token_id: int) -> str:
        return self._appended.get(token_id) or super().id_to_token(token_id)

    def detokenize(self, ids) -> str:
        # Decode runs of model pieces; appended specials become their token text.
        parts, run = [], []
        for i in ids:
            i = int(i)
            if i in self._appended:
                parts.append(self._sp.decode(run))
                parts.append(self._appended[i])
                run = []
            else:
                run.append(i)
        parts.append(self._sp.decode(run))
        return "".join(parts)


class GPTSentencePieceTokenizer(_SentencePieceModel):
    """A SentencePiece .model used as is; the end of a document is the model's eos piece."""

    def __init__(self, model_file: str) -> None:
        super().__init__(model_file)
        if self._sp.eos_id() < 0:
            raise DataFieldError(
                "{tokenizer_model} {path}: the SentencePiece model has no eos "
                "piece, which GPTSentencePieceTokenizer uses as end of document",
                "tokenizer_model",
                path=model_file,
            )

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eod(self) -> int:
        return self._sp.eos_id()

    @property
    def eod_candidates(self) -> tuple:
        # Megatron's legacy SentencePieceTokenizer ends documents with <EOD>, if the model has it.
        legacy = self.token_to_id("<EOD>")
        return (self.eod,) if legacy is None or legacy == self.eod else (self.eod, legacy)

    def detokenize(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])


class _HFTokenizersWrapper(_Tokenizer):
    """Shared encode/decode over a `tokenizers.Tokenizer`."""

    _tok = None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def tokenize_batch(self, texts: list) -> list:
        return [encoding.ids for encoding in self._tok.encode_batch(list(texts))]

    def detokenize(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_to_id(self, token: str):
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str:
        token = self._tok.id_to_token(token_id)
        return str(token_id) if token is None else token


class HuggingFaceTokenizer(_HFTokenizersWrapper):
    """A HuggingFace tokenizer.json (e.g. GPT-NeoX's), loaded with the `tokenizers` library."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        from tokenizers import Tokenizer

        json_path = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(json_path):
            raise DataFieldError("{tokenizer_model} {path}: no tokenizer.json there", "tokenizer_model", path=path)
        try:
            self._tok = Tokenizer.from_file(json_path)
        except Exception as error:  # the library raises a bare Exception on bad JSON
            raise DataFieldError(
                "{tokenizer_model} {path}: not a HuggingFace tokenizer.json ({reason})",
                "tokenizer_model",
                path=json_path,
                reason=str(error).splitlines()[0],
            ) from None
        self._eod = self._find_eod(json_path)

    def _find_eod(self, json_path: str) -> int:
        config_path = os.path.join(os.path.dirname(json_path), "tokenizer_config.json")
        candidates = list(HF_EOD_CANDIDATES)
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as config_file:
                eos = json.load(config_file).get("eos_token")
            if isinstance(eos, dict):
                eos = eos.get("content")
            if isinstance(eos, str):
                candidates.insert(0, eos)
        for token in candidates:
            token_id = self._tok.token_to_id(token)
            if token_id is not None:
                return token_id
        raise DataFieldError(
            "{tokenizer_model} {path}: cannot find an end-of-document token (tried {tried})",
            "tokenizer_model",
            path=json_path,
            tried=", ".join(candidates),
        )

    @property
    def eod(self) -> int:
        return self._eod


class GPT2BPETokenizer(_HFTokenizersWrapper):
    """GPT-2's byte-level BPE from vocab.json and merges.txt (the `tokenizers` implementation)."""

    def __init__(self, vocab_file: str, merge_file: str) -> None:
        super().__init__(vocab_file, merge_file)
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        try:
            self._tok = Tokenizer(models.BPE.from_file(vocab_file, merge_file))
        except Exception as error:
            raise DataFieldError(
                "{vocab_file} {vocab} / {merge_file} {merges}: cannot load GPT-2 BPE ({reason})",
                "vocab_file",
                "merge_file",
                vocab=vocab_file,
                merges=merge_file,
                reason=str(error).splitlines()[0],
            ) from None
        # GPT-2 splits on its regex and maps bytes to printable characters, no prefix space.
        self._tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self._tok.decoder = decoders.ByteLevel()
        eod = self._tok.token_to_id("<|endoftext|>")
        if eod is None:
            raise DataFieldError("{vocab_file} {path}: no <|endoftext|> token", "vocab_file", path=vocab_file)
        self._eod = eod

    @property
    def eod(self) -> int:
        return self._eod


class NullTokenizer(_Tokenizer):
    """Text is whitespace-separated integer ids; for tests and mock runs."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__(vocab_size)
        self._num_ids = int(vocab_size)

    @property
    def vocab_size(self) -> int:
        return self._num_ids + 1

    @property
    def eod(self) -> int:
        return self._num_ids

    def tokenize(self, text: str) -> list[int]:
        ids = []
        for token in text.split():
            try:
                ids.append(int(token))
            except ValueError:
                raise ValueError(f"NullTokenizer expects integer ids, got {token[:20]!r}") from None
        return ids

    def detokenize(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)


class TokenizerWithEod:
    """`tokenizer` with another end-of-document id (resolve_eod's); all else is delegated.

    megatron-core's GPTDataset reads `tokenizer.eod` for its document masks. unique_identifiers
    is delegated unchanged: eod only affects the masks computed per sample, not the
    document/sample/shuffle indices, so the cached indices stay valid.
    """

    def __init__(self, tokenizer, eod: int) -> None:
        self.tokenizer = tokenizer
        self._eod = int(eod)

    @property
    def eod(self) -> int:
        return self._eod

    def __getattr__(self, name):  # only called for attributes not found on the wrapper
        if name == "tokenizer":  # not yet set (never while constructed normally)
            raise AttributeError(name)
        return getattr(self.tokenizer, name)

    def __reduce__(self):
        return (type(self), (self.tokenizer, self._eod))

    def __repr__(self) -> str:
        return f"TokenizerWithEod({self.tokenizer!r}, eod={self._eod})"


def _require_file(field: str, path) -> str:
    if not path:
        raise DataFieldError("{%s} is required for this {tokenizer_type}" % field, field, "tokenizer_type")
    if not os.path.exists(path):
        raise DataFieldError("{%s} {path}: no such file" % field, field, path=path)
    return path


def build_tokenizer(config):
    """Build the tokenizer named by `config.tokenizer_type`.

    `config` is a `DataConfig` (an argparse Namespace with Megatron's attribute names is
    converted by `DataConfig.from_namespace`). The padded vocabulary the model holds is
    `config.padded_vocab_size(tokenizer.vocab_size)`.
    """
    from an_megatron.data.config import DataConfig

    c = DataConfig.from_namespace(config)
    kind = c.tokenizer_type
    if kind == "SentencePieceTokenizer":
        tokenizer = SentencePieceTokenizer(_require_file("tokenizer_model", c.tokenizer_model))
    elif kind == "GPTSentencePieceTokenizer":
        tokenizer = GPTSentencePieceTokenizer(_require_file("tokenizer_model", c.tokenizer_model))
    elif kind == "HuggingFaceTokenizer":
        tokenizer = HuggingFaceTokenizer(_require_file("tokenizer_model", c.tokenizer_model))
    elif kind == "GPT2BPETokenizer":
        tokenizer = GPT2BPETokenizer(
            _require_file("vocab_file", c.vocab_file),
            _require_file("merge_file", c.merge_file),
        )
    elif kind == "NullTokenizer":
        vocab_size = c.vocab_size
        if not isinstance(vocab_size, int) or vocab_size < 1:
            raise DataFieldError(
                "{tokenizer_type} NullTokenizer needs {vocab_size} N (N >= 1), got {value!r}",
                "tokenizer_type",
                "vocab_size",
                value=vocab_size,
            )
        tokenizer = NullTokenizer(vocab_size)
    elif kind is None:
        types = ", ".join(TOKENIZER_TYPES)
        raise DataFieldError("{tokenizer_type} is required (one of {types})", "tokenizer_type", types=types)
    else:
        types = ", ".join(TOKENIZER_TYPES)
        raise DataFieldError(
            "{tokenizer_type} {kind}: unknown (one of {types})", "tokenizer_type", kind=kind, types=types
        )
    return tokenizer
