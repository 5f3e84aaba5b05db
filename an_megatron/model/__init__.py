"""anGPT, nGPT and GPT+ as one model with swappable block math."""

from an_megatron.model.arch import ARCH_SPECS, ArchSpec  # noqa: F401
from an_megatron.model.config import ARCHS, ModelConfig  # noqa: F401
from an_megatron.model.gpt import GPTModel, lm_loss  # noqa: F401
