"""Command-line flags of the data pipeline (Megatron's names and defaults)."""

from __future__ import annotations

import argparse
import math

from an_megatron.cli import nonnegative_int, output_dir, positive_int
from an_megatron.data.tokenizers import TOKENIZER_TYPES

# The flag that sets each DataConfig field: the data code names fields (DataFieldError), the
# command line names its flags.
DATA_FIELD_FLAGS = {
    "data_path": "--data-path",
    "split": "--split",
    "data_cache_path": "--data-cache-path",
    "mock_data": "--mock-data",
    "num_workers": "--num-workers",
    "reset_position_ids": "--reset-position-ids",
    "reset_attention_mask": "--reset-attention-mask",
    "eod_mask_loss": "--eod-mask-loss",
    "eod_token": "--eod-token",
    "tokenizer_type": "--tokenizer-type",
    "tokenizer_model": "--tokenizer-model",
    "vocab_file": "--vocab-file",
    "merge_file": "--merge-file",
    "vocab_size": "--vocab-size",
    "make_vocab_size_divisible_by": "--make-vocab-size-divisible-by",
    "seq_length": "--seq-length",
    "seed": "--seed",
    "tensor_model_parallel_size": "--tensor-model-parallel-size",
}


def data_error_message(error: Exception) -> str:
    """A data error as the command line reports it: fields named by their flags."""
    from an_megatron.errors import FieldError

    return error.render(DATA_FIELD_FLAGS) if isinstance(error, FieldError) else str(error)


def split_spec(text: str) -> str:
    """``--split``: one to three proportions ``train,valid,test`` (``,`` or ``/`` between), each
    >= 0, with a positive sum; kept as the text megatron-core reads."""
    try:
        values = [float(part) for part in text.replace("/", ",").split(",")]
    except ValueError:
        values = []
    if not 1 <= len(values) <= 3 or not all(math.isfinite(v) and v >= 0 for v in values) or sum(values) <= 0:
        raise argparse.ArgumentTypeError(
            f"expected train,valid,test proportions (up to three numbers >= 0 with a positive sum, "
            f"e.g. 98,2,0), got {text!r}"
        )
    return text


def add_data_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add data and tokenizer flags. Sequence length, seed, batch sizes and parallel sizes are
    defined by the training arguments. The data functions take a `DataConfig`
    (`DataConfig.from_namespace(args)` builds one from these flags)."""
    group = parser.add_argument_group("data")
    group.add_argument(
        "--data-path",
        nargs="*",
        default=None,
        help="one dataset prefix ({prefix}.bin/.idx), several prefixes (blended "
        "by size), or a blend 'w1 prefix1 w2 prefix2 ...'",
    )
    group.add_argument(
        "--split",
        type=split_spec,
        default="969,30,1",
        help="train,valid,test proportions of the documents, e.g. 98,2,0",
    )
    group.add_argument(
        "--data-cache-path",
        type=output_dir,
        default=None,
        help="where to keep the sample/shuffle index cache (default: beside each dataset, in {prefix}/cache)",
    )
    group.add_argument(
        "--mock-data", action="store_true", help="train on megatron-core's synthetic tokens instead of --data-path"
    )
    group.add_argument("--num-workers", type=nonnegative_int, default=2, help="DataLoader worker processes")
    group.add_argument(
        "--reset-position-ids", action="store_true", help="restart position ids after each end-of-document token"
    )
    group.add_argument(
        "--reset-attention-mask", action="store_true", help="stop attention across end-of-document tokens"
    )
    group.add_argument(
        "--eod-mask-loss",
        action="store_true",
        help="leave positions whose input is the end-of-document token out of the loss "
        "(as Megatron-LM: the prediction of the next document's first token)",
    )
    group.add_argument(
        "--eod-token",
        default="auto",
        metavar="auto|TOKEN|ID",
        help="the token that ends documents in the data (used by the three "
        "flags above). auto (default): read from each --data-path prefix, "
        "choosing between the tokenizer's end of document and the one "
        "Megatron-LM's other SentencePiece path writes (<EOD> legacy, </s> "
        "default). A token (e.g. </s>) or an integer id: used as given",
    )
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", default=None, choices=TOKENIZER_TYPES)
    group.add_argument(
        "--tokenizer-model", default=None, help="SentencePiece .model, or a HuggingFace tokenizer.json / its folder"
    )
    group.add_argument("--vocab-file", default=None, help="GPT-2 vocab.json")
    group.add_argument("--merge-file", default=None, help="GPT-2 merges.txt")
    group.add_argument(
        "--vocab-size",
        type=positive_int,
        default=None,
        help="NullTokenizer's number of ids (its end of document is this id)",
    )
    group.add_argument(
        "--make-vocab-size-divisible-by",
        type=positive_int,
        default=128,
        help="pad the embedding to a multiple of this times the TP size",
    )
    return parser
