"""Which token ends documents in the training data (--eod-token).

Megatron-LM's tokenizer paths disagree on the end-of-document (EOD) id for one SentencePiece
model: its legacy SentencePieceTokenizer (ours) appends <EOD>, its default path in 0.16 the
model's eos </s>. A corpus preprocessed with --append-eod by either differs only in the last
token of each document, so training with the wrong id would silently leave documents unseparated
by --reset-attention-mask, --reset-position-ids and --eod-mask-loss.

So by default (--eod-token auto) the id is read from the data: for each --data-path prefix, the
last tokens of up to SAMPLE_DOCUMENTS documents decide between the tokenizer's `eod_candidates`.
`resolve_eod(config, tokenizer)` gives the id; build_train_valid_test_datasets hands it to
megatron-core's GPTDataset, and the training loop should use the same function.
"""

from __future__ import annotations

import os
from collections import Counter

from an_megatron.data.errors import DataFieldError

SAMPLE_DOCUMENTS = 1000
# A candidate ending at least this share of the sampled documents is the EOD. With --append-eod
# it is all of them; less means parts preprocessed without it were merged in (warned about).
MIN_SHARE = 0.9
DOCUMENT_FLAGS = ("reset_attention_mask", "reset_position_ids", "eod_mask_loss")

_RESOLVED: dict = {}  # one scan (and one message) per process for the same data and tokenizer


def resolve_eod(config, tokenizer) -> int:
    """The end-of-document id for the data of `config` (a `DataConfig`; an argparse Namespace
    from add_data_args is converted) and `tokenizer`.

    config.eod_token: "auto" (default) detects it from the --data-path prefixes;
    an integer is taken as an id, anything else as a token of the tokenizer (e.g. </s>).
    Raises DataError (one line) for a bad --eod-token, for blend prefixes whose documents end
    with different tokens, and for documents without an EOD when document masking or
    --eod-mask-loss is on. Prints a line on rank 0 when the EOD is not the tokenizer's default.
    """
    from an_megatron.data.config import DataConfig

    return _resolve(DataConfig.from_namespace(config), tokenizer, validate=True)


def _resolve(config, tokenizer, validate: bool) -> int:
    override = config.eod_token or "auto"
    if override != "auto":
        return parse_eod_token(override, tokenizer)
    if config.mock_data or not config.data_path:
        return tokenizer.eod
    from an_megatron.data.datasets import parse_data_path

    prefixes, _ = parse_data_path(config.data_path)
    flags = tuple(name for name in DOCUMENT_FLAGS if getattr(config, name))
    candidates = tuple(getattr(tokenizer, "eod_candidates", (tokenizer.eod,)))
    key = (tuple(os.path.abspath(p) for p in prefixes), tokenizer.eod, candidates, flags)
    if key not in _RESOLVED:
        _RESOLVED[key] = _detect(prefixes, tokenizer, candidates, flags, validate)
    return _RESOLVED[key]


def parse_eod_token(value: str, tokenizer) -> int:
    """--eod-token's id: an integer is an id, anything else a token the tokenizer must know."""
    try:
        token_id = int(value)
    except ValueError:
        lookup = getattr(tokenizer, "token_to_id", None)
        token_id = lookup(value) if lookup else None
        if token_id is None:
            raise DataFieldError(
                "{eod_token} {value}: not a token of the tokenizer "
                "(give a token such as </s> or <EOD>, an id, or auto)",
                "eod_token",
                value=value,
            ) from None
    if not 0 <= token_id < tokenizer.vocab_size:
        raise DataFieldError(
            "{eod_token} {value}: id out of range [0, {size})", "eod_token", value=value, size=tokenizer.vocab_size
        )
    return token_id


def _detect(prefixes, tokenizer, candidates, flags, validate: bool) -> int:
    from an_megatron.data.indexed import check_indexed_dataset, document_last_tokens

    name = _namer(tokenizer)
    found = {}  # prefix -> its EOD id
    for prefix in prefixes:
        if validate:
            check_indexed_dataset(prefix)
        last = Counter(document_last_tokens(prefix, SAMPLE_DOCUMENTS).tolist())
        sampled = sum(last.values())
        if sampled == 0:
            continue  # no documents: nothing to separate, and no say in the choice
        best = max(candidates, key=lambda c: last[c])
        if last[best] >= MIN_SHARE * sampled:
            found[prefix] = best
            if last[best] < sampled:
                _print_rank0(
                    f"warning: {prefix}: {sampled - last[best]} of {sampled} sampled "
                    f"documents do not end with {name(best)}: they run into the next"
                )
            continue
        common, count = last.most_common(1)[0]
        counts = [(last[c], name(c)) for c in candidates]
        if common not in candidates:  # what they end with instead
            counts.append((count, name(common, quote=True)))
        what = f"of {sampled} sampled: " + ", ".join(
            f"{n} {'end ' if i == 0 else ''}with {token}" for i, (n, token) in enumerate(counts)
        )
        # Documents without an EOD cannot be separated. The document flags exist only to
        # separate them, so with one on, training would silently do the opposite of what was
        # asked (cross-document attention, loss on every boundary): fail at startup instead.
        # Without them a corpus of concatenated documents is legitimate: warn only.
        # --eod-token skips this check for whoever really wants it.
        if flags:
            names = ", ".join("{%s}" % flag for flag in flags)
            raise DataFieldError(
                "{prefix}: documents do not end with an end-of-document token ({what}), so "
                + names
                + " cannot separate them: preprocess with --append-eod",
                *flags,
                prefix=prefix,
                what=what,
            )
        _print_rank0(
            f"warning: {prefix}: documents do not end with an end-of-document token "
            f"({what}): they run into each other (preprocessed without --append-eod?)"
        )
    if not found:
        return tokenizer.eod
    (first, eod), *others = found.items()
    for prefix, other in others:
        if other != eod:
            raise DataFieldError(
                "{data_path}: {first} ends documents with {eod} but {prefix} with {other}: "
                "preprocess them with the same tokenizer path",
                "data_path",
                first=first,
                eod=name(eod),
                prefix=prefix,
                other=name(other),
            )
    if eod != tokenizer.eod:
        where = first if not others else f"{first} and {len(others)} other --data-path prefixes"
        default = _token(tokenizer, tokenizer.eod)
        _print_rank0(
            f"{where}: documents end with {name(eod)}, not {default}: using {_token(tokenizer, eod)} as end of document"
        )
    return eod


def _token(tokenizer, token_id: int) -> str:
    to_token = getattr(tokenizer, "id_to_token", None)
    return to_token(token_id) if to_token else str(token_id)


def _namer(tokenizer):
    """`name(id)` -> e.g. "</s> (id 2)"; quote=True for ordinary tokens (whitespace shows)."""

    def name(token_id: int, quote: bool = False) -> str:
        token = _token(tokenizer, token_id)
        return f"{token!r} (id {token_id})" if quote else f"{token} (id {token_id})"

    return name


def _print_rank0(line: str) -> None:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_rank() == 0:
        print(line, flush=True)
