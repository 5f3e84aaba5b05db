#!/usr/bin/env python
"""Pretrain anGPT (or nGPT / GPT+ with --arch) with DeepSpeed. Launch with ``deepspeed`` or
``torchrun``; see the README for the flags and examples/*.json for DeepSpeed configs."""

import sys

from an_megatron.training.pretrain import pretrain

if __name__ == "__main__":
    sys.exit(pretrain())
