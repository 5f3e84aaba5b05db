"""Train/valid/test datasets from --data-path blends and --split, on megatron-core.

A thin mapping of Megatron's flags onto `GPTDatasetConfig` and `BlendedMegatronDatasetBuilder`
(`MockGPTDataset` for --mock-data). Every prefix is validated with check_indexed_dataset first,
so a missing or corrupt dataset is a one-line error naming it.

With torch.distributed initialized, megatron-core builds each dataset on global rank 0 first
(writing the document/sample/shuffle index cache), then all ranks meet at a barrier, then the
other ranks build it, which loads the cached indices. The cache directory (--data-cache-path,
or `{prefix}/cache` beside each dataset) must therefore be visible to every rank.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy

from an_megatron.data.config import DataConfig
from an_megatron.data.eod import _print_rank0
from an_megatron.data.eod import _resolve as _resolve_eod
from an_megatron.data.errors import DataError, DataFieldError
from an_megatron.data.indexed import (
    check_indexed_dataset,
    document_range_tokens,
    import_megatron_core,
    token_id_range,
)
from an_megatron.data.tokenizers import TokenizerWithEod
from megatron_patches.blended_dataset_rank import single_process_rank_zero

if TYPE_CHECKING:  # the data package does not import torch at import time
    import torch


def parse_data_path(data_path: list[str]) -> tuple[list[str], list[float] | None]:
    """Megatron's --data-path: `prefix`, `prefix1 prefix2 ...`, or `w1 prefix1 w2 prefix2 ...`,
    read by megatron-core's `get_blend_from_list`. A list it would misread (a weight without a
    prefix, a number where a prefix belongs) or weights that cannot blend are refused here."""
    if not data_path:
        raise DataFieldError("{data_path} is required (or {mock_data} for synthetic tokens)", "data_path", "mock_data")

    def is_weight(text):
        try:
            float(text)
            return True
        except ValueError:
            return False

    weighted = [is_weight(item) for item in data_path]
    if any(weighted) and (len(data_path) % 2 or not all(weighted[0::2]) or any(weighted[1::2])):
        raise DataFieldError(
            "{data_path} {value}: expected one or more prefixes, or pairs 'weight prefix weight prefix ...'",
            "data_path",
            value=" ".join(data_path),
        )
    prefixes, weights = import_megatron_core("megatron.core.datasets.utils").get_blend_from_list(list(data_path))
    if weights is not None and (any(w < 0 for w in weights) or sum(weights) <= 0):
        raise DataFieldError(
            "{data_path} weights {weights}: must be >= 0 with a positive sum", "data_path", weights=weights
        )
    return prefixes, weights


def document_ids(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """Which packed document each position belongs to, ``(b, s)``, numbered from 0 per sample.

    As in Megatron's ``--reset-attention-mask``, an end-of-document token belongs to the
    document it ends and the next position starts a new one. O(s) per sample, where Megatron's
    datasets build an ``s x s`` mask.
    """
    is_eod = tokens == eod
    return is_eod.cumsum(-1) - is_eod.long()


def build_train_valid_test_datasets(config, tokenizer, train_valid_test_num_samples, is_built_on_rank=None):
    """(train, valid, test) datasets; each is a GPTDataset, a BlendedDataset or None.

    `config` is a `DataConfig` (an argparse Namespace from add_data_args, with seq_length and
    seed, is converted): data_path, split, data_cache_path, mock_data, reset_position_ids,
    reset_attention_mask, eod_mask_loss, eod_token, seq_length, seed. The end-of-document id
    is resolve_eod(config, tokenizer)'s.
    `train_valid_test_num_samples` are the samples each split must provide (None: one epoch).
    `is_built_on_rank` (default: every rank) lets ranks that need no data skip building.
    Samples are dicts: 'tokens' and 'labels' (seq_length ids each: the labels are the tokens
    shifted by one), 'loss_mask' and 'position_ids' (restarting at each document with
    --reset-position-ids). Document masks come from ``document_ids(tokens, eod)``.
    """
    c = DataConfig.from_namespace(config)
    gpt = import_megatron_core("megatron.core.datasets.gpt_dataset")
    builder_module = import_megatron_core("megatron.core.datasets.blended_megatron_dataset_builder")
    if c.mock_data:
        blend, dataset_class = None, gpt.MockGPTDataset
    else:
        prefixes, weights = parse_data_path(c.data_path)
        infos = []
        for prefix in prefixes:
            info = check_indexed_dataset(prefix)
            infos.append(info)
            if info.num_tokens == 0:
                raise DataFieldError(
                    "{data_path} {prefix}: holds no tokens ({count} documents): nothing to train on",
                    "data_path",
                    prefix=prefix,
                    count=info.num_documents,
                )
            if tokenizer.vocab_size > numpy.iinfo(info.dtype).max + 1:
                raise DataError(
                    f"{prefix}: stores {numpy.dtype(info.dtype).name} token ids, too narrow for "
                    f"the tokenizer's vocab size {tokenizer.vocab_size}: was it preprocessed with "
                    f"another tokenizer?"
                )
            _check_token_ids(c, tokenizer, info)
        blend, dataset_class = (prefixes, weights), gpt.GPTDataset
    eod = _resolve_eod(c, tokenizer, validate=False)  # the prefixes were just checked
    if eod != tokenizer.eod:
        tokenizer = TokenizerWithEod(tokenizer, eod)  # GPTDataset reads tokenizer.eod
    sizes = list(train_valid_test_num_samples)
    if len(sizes) != 3:
        raise DataError(f"train_valid_test_num_samples needs 3 entries, got {sizes}")
    config = gpt.GPTDatasetConfig(
        random_seed=c.seed,
        sequence_length=c.seq_length,
        blend=blend,
        split=c.split if blend is not None else None,
        path_to_cache=c.data_cache_path,
        tokenizer=tokenizer,
        reset_position_ids=bool(c.reset_position_ids),
        reset_attention_mask=bool(c.reset_attention_mask),
        eod_mask_loss=bool(c.eod_mask_loss),
        # The model builds its masks from document ids (see document_ids below): no [1, s, s]
        # mask per sample is made or loaded.
        create_attention_mask=False,
    )
    if blend is not None:
        _drop_or_refuse_empty_splits(config, infos, config.split)
    builder = builder_module.BlendedMegatronDatasetBuilder(
        dataset_class, sizes, is_built_on_rank or (lambda: True), config
    )
    with single_process_rank_zero():  # a megatron-core workaround: see megatron_patches
        train, valid, test = builder.build()
    return train, valid, test


def _check_token_ids(c: DataConfig, tokenizer, info) -> None:
    """Refuse data whose token ids do not fit the tokenizer: ids past its vocabulary but inside
    the padded embedding would train silently on rows no text maps to, ids past the padding
    fail in the embedding. The largest id is the one recorded at preprocessing, else found by a
    bounded scan (``token_id_range``)."""
    found = token_id_range(info)
    if found.max_token_id < tokenizer.vocab_size:
        made_by = (found.recorded or {}).get("tokenizer") or {}
        model = c.tokenizer_model or c.vocab_file
        same_model = model is not None and made_by.get("model") == os.path.abspath(model)  # another path's specials
        if made_by.get("vocab_size") not in (None, tokenizer.vocab_size) and not same_model:  # fits by chance?
            _print_rank0(
                f"warning: {info.prefix}: its token ids fit, but it was {found.describe()}, and the tokenizer "
                f"of this run has {tokenizer.vocab_size} ids"
            )
        return
    which = ["{tokenizer_type} {type}"]
    fields = ["tokenizer_type"]
    for name in ("tokenizer_model", "vocab_file", "vocab_size"):
        if getattr(c, name) is not None:
            which.append("{%s} {%s_value}" % (name, name))
            fields.append(name)
    raise DataFieldError(
        "{data_path} {prefix}: token ids up to {max_id} ({how}), but the tokenizer ("
        + " ".join(which)
        + ") has {size} ids (0 to {last}): the data was preprocessed with another tokenizer",
        "data_path",
        *fields,
        prefix=info.prefix,
        max_id=found.max_token_id,
        how=found.describe(),
        type=c.tokenizer_type,
        size=tokenizer.vocab_size,
        last=tokenizer.vocab_size - 1,
        **{f"{name}_value": getattr(c, name) for name in fields[1:]},
    )


def _drop_or_refuse_empty_splits(config, infos, split: str) -> None:
    """A split with a share but not one sample of some prefix (a small corpus, a small share:
    the default 969,30,1 leaves the test split of a corpus under 500 documents empty) makes
    megatron-core loop forever counting epochs of zero tokens, or repeat a few tokens to fill
    every sample. Such a test split is dropped (training never reads it); a train or validation
    split with fewer tokens than one sample (--seq-length + 1) is refused, naming the prefix.
    Document ranges as megatron-core's builder computes them."""
    sample = config.sequence_length + 1
    ranges = {}  # prefix -> [(first, end) per split]
    for info in infos:
        ranges[info.prefix] = [
            (0, 0)
            if bounds is None
            else (int(round(bounds[0] * info.num_documents)), int(round(bounds[1] * info.num_documents)))
            for bounds in config.split_matrix
        ]
    tokens = {info.prefix: document_range_tokens(info.prefix, ranges[info.prefix]) for info in infos}
    for i, name in enumerate(("train", "validation", "test")):
        if config.split_matrix[i] is None:
            continue
        small = [info for info in infos if tokens[info.prefix][i] < sample]
        if not small:
            continue
        if name == "test":
            config.split_matrix[i] = None
            continue
        info = small[0]
        first, end = ranges[info.prefix][i]
        raise DataFieldError(
            "{split} {value}: the {name} split of {prefix} gets {documents} of its {count} documents, "
            "{tokens} tokens, fewer than one sample ({seq_length} {length} + 1): give it a larger share "
            "(or 0 for none)",
            "split",
            "seq_length",
            value=split,
            name=name,
            prefix=info.prefix,
            documents=end - first if end > first else "none",
            count=info.num_documents,
            tokens=tokens[info.prefix][i],
            length=config.sequence_length,
        )
