"""The data pipeline's configuration: one frozen dataclass, built once by the command line.

`DataConfig` holds what the data functions read (tokenizer, datasets, end of document,
loader workers), including the few values the training flags define (sequence length, seed,
tensor-parallel size). Nothing writes to it after construction; derived values are methods.
"""

from __future__ import annotations

import argparse
import types
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class DataConfig:
    data_path: tuple[str, ...] | None = None
    split: str = "969,30,1"
    data_cache_path: str | None = None
    mock_data: bool = False
    num_workers: int = 2
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False
    eod_token: str = "auto"
    tokenizer_type: str | None = None
    tokenizer_model: str | None = None
    vocab_file: str | None = None
    merge_file: str | None = None
    vocab_size: int | None = None  # NullTokenizer's number of ids
    make_vocab_size_divisible_by: int = 128
    # defined by the training flags; the datasets and the padded vocabulary need them
    seq_length: int = 256
    seed: int = 1234
    tensor_model_parallel_size: int = 1

    def __post_init__(self):
        if self.data_path is not None and not isinstance(self.data_path, tuple):
            object.__setattr__(self, "data_path", tuple(self.data_path))  # a list from argparse: frozen too

    def padded_vocab_size(self, vocab_size: int) -> int:
        """Megatron's padded vocabulary for a tokenizer of `vocab_size` ids."""
        from an_megatron.data.tokenizers import pad_vocab_size

        divisible_by, tp = self.make_vocab_size_divisible_by or 128, self.tensor_model_parallel_size or 1
        return pad_vocab_size(vocab_size, divisible_by, tp)

    @classmethod
    def from_namespace(cls, args) -> DataConfig:
        """An adapter for callers holding an argparse Namespace (tools, tests): its attributes
        of the same names; missing ones (or None where a default exists) take the defaults."""
        if isinstance(args, cls):
            return args
        if not isinstance(args, (argparse.Namespace, types.SimpleNamespace)):
            # e.g. a TrainConfig: its data fields are in .data, and reading them here would
            # silently fall back to the defaults
            raise TypeError(f"expected a DataConfig or an argparse Namespace, got {type(args).__name__}")
        values = {}
        for f in fields(cls):
            value = getattr(args, f.name, None)
            if value is not None:
                values[f.name] = value
        return cls(**values)
