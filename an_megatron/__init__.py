"""an_megatron: train anGPT, the approximately normalized Transformer, with DeepSpeed and megatron-core."""
__version__ = "0.1.0"
