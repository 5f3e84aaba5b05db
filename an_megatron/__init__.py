"""an_megatron: train anGPT, the approximately normalized Transformer, with DeepSpeed and megatron-core."""

import megatron_patches  # noqa: F401  (documented adaptations; see megatron_patches/__init__.py)

__version__ = "0.1.0"
