"""Concatenation of indexed datasets (the logic of tools/merge_datasets.py)."""

from __future__ import annotations

import os

from an_megatron.data.errors import DataError
from an_megatron.data.indexed import check_indexed_dataset
from an_megatron.data.preprocess import AtomicDatasetWriter


def merge_datasets(prefixes: list[str], output_prefix: str):
    """Write the concatenation of `prefixes` to `output_prefix`; returns its IndexedDatasetInfo."""
    if not prefixes:
        raise DataError("--input: give at least one dataset prefix")
    infos = [check_indexed_dataset(prefix) for prefix in prefixes]
    if os.path.abspath(output_prefix) in {os.path.abspath(p) for p in prefixes}:
        raise DataError(f"--output-prefix {output_prefix} is also an input")
    writer = AtomicDatasetWriter(output_prefix, infos[0].dtype)
    try:
        for prefix in prefixes:
            writer.add_dataset(prefix)
        writer.commit()
    finally:
        writer.discard()
    return check_indexed_dataset(output_prefix)
