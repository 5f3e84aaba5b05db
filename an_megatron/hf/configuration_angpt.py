"""The configuration of an exported anGPT, nGPT or GPT+ model (Hugging Face ``transformers``).

Shipped inside every exported model directory next to ``modeling_angpt.py`` and loaded with
``trust_remote_code=True``; it imports only ``transformers``, so the directory works without
``an_megatron`` installed. ``tools/export_hf.py`` writes it.
"""

from __future__ import annotations

from transformers import PretrainedConfig

ARCHS = ("angpt", "ngpt", "gptplus")
NU_ATT = ("gaussian", "exact", "dense", "none")


class AnGPTConfig(PretrainedConfig):
    """Shapes and the few choices the inference form still computes.

    ``arch``: ``angpt``, ``ngpt`` or ``gptplus``. ``nu_att`` (anGPT only): how the attention
    factor is computed per position; ``nu_att_keys_max`` and ``nu_att_key_points`` describe the
    log-spaced grid of key counts the ``gaussian`` factor's per-head table is given on.
    ``qk_norm_eps``: the epsilon of the per-head QK normalization (GPT+'s RMSNorm epsilon; a
    negligible one for anGPT's and nGPT's exact normalization). ``rms_norm_eps``: GPT+'s
    RMSNorm before attention, MLP and the output head.
    """

    model_type = "angpt"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    def __init__(
        self,
        arch: str = "angpt",
        vocab_size: int = 256,
        hidden_size: int = 256,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        intermediate_size: int = 1024,
        max_position_embeddings: int = 256,
        rope_theta: float = 10000.0,
        nu_att: str = "none",
        nu_att_keys_max: int = 2**20,
        nu_att_key_points: int = 81,
        qk_norm_eps: float = 1e-12,
        rms_norm_eps: float = 1e-6,
        tie_word_embeddings: bool = False,
        use_cache: bool = True,
        **kwargs,
    ):
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
        if nu_att not in NU_ATT:
            raise ValueError(f"unknown nu_att {nu_att!r}; choose one of {', '.join(NU_ATT)}")
        self.arch = arch
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads
        self.head_dim = hidden_size // num_attention_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.nu_att = nu_att
        self.nu_att_keys_max = nu_att_keys_max
        self.nu_att_key_points = nu_att_key_points
        self.qk_norm_eps = qk_norm_eps
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
