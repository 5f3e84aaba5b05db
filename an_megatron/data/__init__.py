"""Data: tokenizers, Megatron indexed datasets, blends/splits on megatron-core, the sampler.

Importing this package does not import megatron-core (slow); the functions that need it do.
"""

from an_megatron.data.arguments import add_data_args
from an_megatron.data.config import DataConfig
from an_megatron.data.datasets import build_train_valid_test_datasets, document_ids, parse_data_path
from an_megatron.data.eod import resolve_eod
from an_megatron.data.errors import DataError, IndexedDatasetError
from an_megatron.data.indexed import (
    CompactIndexedDatasetBuilder,
    IndexedDatasetInfo,
    check_indexed_dataset,
    open_indexed_dataset,
)
from an_megatron.data.sampler import MegatronPretrainingSampler, build_data_loader
from an_megatron.data.tokenizers import TOKENIZER_TYPES, build_tokenizer, pad_vocab_size

__all__ = [
    "add_data_args",
    "DataConfig",
    "build_train_valid_test_datasets",
    "document_ids",
    "parse_data_path",
    "resolve_eod",
    "DataError",
    "IndexedDatasetError",
    "CompactIndexedDatasetBuilder",
    "IndexedDatasetInfo",
    "check_indexed_dataset",
    "open_indexed_dataset",
    "MegatronPretrainingSampler",
    "build_data_loader",
    "TOKENIZER_TYPES",
    "build_tokenizer",
    "pad_vocab_size",
]
