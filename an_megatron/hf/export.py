"""Export a trained model as a Hugging Face ``transformers`` model directory, factors folded in.

Input: any training checkpoint (any TP/PP/DP/ZeRO layout, through ``training/convert.py``'s
consolidation) or a consolidated file. Output: ``config.json`` (``model_type`` ``angpt`` and an
``auto_map``), ``configuration_angpt.py`` and ``modeling_angpt.py`` (this package's files, which
import only torch and transformers), ``model.safetensors``, ``generation_config.json`` and the
tokenizer files (``tokenizer.json``, ``tokenizer_config.json``) that ``AutoTokenizer`` loads.

**The folds** (ANGPT.md's forward pass, ``s`` = each learned scale after its reparameterization):

- ``nu_qkv`` on ``q`` and ``k``: dropped (the exact QK-norm removes any positive constant).
- ``nu_qkv`` on ``v`` and ``nu_o`` are constants through the attention average and ``W_o``;
  anGPT's residual ``nu_lerp(alpha_A) (h + alpha_A (x_A - h)) = a h + b x_A`` with
  ``a = nu_lerp (1 - alpha_A)``, ``b = nu_lerp alpha_A``: ``b`` scales ``x_A``'s coordinates,
  which are ``W_o``'s rows. So ``W_o <- diag(b) W_o nu_qkv nu_o``; ``a`` stays (it scales ``h``).
- ``s_qk``: ``(s q) . (s k) = (s^2 q) . k``, so both sides' gains and the softmax scale become one
  per-head vector on ``q`` (``q_scale``); the normalization itself is computed (nonlinear).
  GPT+'s two QK-RMSNorm gains are folded the same way.
- MLP: ``u * SiLU(z)`` is linear in ``u`` and ``W_down`` is linear, so
  ``s_u nu_uz nu_act nu_down`` scales ``W_u``'s rows; ``s_v sqrt(d) nu_uz`` scales ``W_z``'s rows
  (inside SiLU, but a row scale of ``W_z`` is exactly a scale of ``z``); anGPT's ``b`` of the
  MLP residual scales ``W_down``'s rows.
- ``s_z`` scales ``W_out``'s rows.

What cannot fold is computed by ``modeling_angpt.py`` (its docstring says why): the QK
normalization, the residual mix (anGPT's ``a``, nGPT's two normalizations, GPT+'s addition),
``nu_att`` per position (``gaussian``: shipped as the per-head grid over ``log t`` that training
interpolates, since it depends only on ``s_qk``), and GPT+'s RMSNorms (whose gains are folded
into the columns of ``W_qkv``, ``W_u;W_z`` and ``W_out``: ``W (g * x) = (W diag(g)) x``).
"""

from __future__ import annotations

import json
import math
import os
import shutil

import torch

HF_SOURCE = os.path.dirname(os.path.abspath(__file__))
MODEL_FILES = ("configuration_angpt.py", "modeling_angpt.py")
EXPORT_ARCHS = ("angpt", "ngpt", "gptplus")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Text the exported tokenizer must encode to our tokenizer's ids (checked at export).
TOKENIZER_CHECK_TEXT = (
    "In the beginning God created the heaven and the earth.\n\nAnd the earth was without form, and void; "
    "  double  spaces, tabs\tand digits 1234567 -- unicode: naïve café, 東京, emoji 🙂, <EOD> </s> <s>"
)


class ExportError(RuntimeError):
    """Bad input to the export; the message is one line naming the problem."""


# ---- the folds ---------------------------------------------------------------------------------


def _scale(weights: dict, name: str, config, scale_name: str) -> torch.Tensor:
    """A learned scale's value ``(s_init / s_scale) * s_hat``."""
    s_init, s_scale = config.scale_init(scale_name)
    return (s_init / s_scale) * weights[name].double()


def fold_state_dict(weights: dict, config) -> dict[str, torch.Tensor]:
    """GPTModel's fp32 state dict (TP=1) -> ``AnGPTForCausalLM``'s, every fold applied (in fp64,
    then rounded to fp32)."""
    from an_megatron.model.factors import logit_variance, nu_att_gaussian_grid, nu_lerp

    d, H, dh = config.hidden_size, config.num_attention_heads, config.head_dim
    arch, fac = config.arch, config.spec.factors(config)
    softmax_scale = config.spec.softmax_scale(dh)
    w = {k: v.double() for k, v in weights.items()}
    out = {"model.embed_tokens.weight": w["embedding.word_embeddings.weight"]}
    for i in range(config.num_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        W_q, W_k, W_v = w[src + "attention.qkv.weight"].chunk(3)
        W_o = w[src + "attention.proj.weight"]
        W_u, W_z = w[src + "mlp.up_gate.weight"].chunk(2)
        W_down = w[src + "mlp.down.weight"]
        if arch == "gptplus":
            g_q, g_k = w[src + "attention.qk_norm.q_gain.s_hat"], w[src + "attention.qk_norm.k_gain.s_hat"]
            # RMSNorm(x) = sqrt(d_h) Norm(x): the logits are softmax_scale (g_q rms(q)) . (g_k rms(k))
            q_scale = g_q * g_k * softmax_scale
            # the pre-norms' gains: W (g * rms(h)) = (W diag(g)) rms(h), a column scale
            g_attn, g_mlp = w[src + "attention_norm.weight"], w[src + "mlp_norm.weight"]
            W_q, W_k, W_v = (W * g_attn for W in (W_q, W_k, W_v))
            W_u, W_z = W_u * g_mlp, W_z * g_mlp
        else:
            s_qk = _scale(w, src + "attention.qk_norm.s_qk.s_hat", config, "s_qk")
            # softmax_scale (s Norm q) . (s Norm k) = (s^2 softmax_scale / d_h) rms(q) . rms(k)
            q_scale = s_qk**2 * softmax_scale / dh
            alpha_a = _scale(w, src + "attention_residual.alpha.s_hat", config, "alpha").expand(d)
            alpha_m = _scale(w, src + "mlp_residual.alpha.s_hat", config, "alpha").expand(d)
            s_u = _scale(w, src + "mlp.gate_scales.s_u.s_hat", config, "s_u")
            s_v = _scale(w, src + "mlp.gate_scales.s_v.s_hat", config, "s_v")
            W_u = (s_u * fac.nu_uz * fac.nu_act * fac.nu_down)[:, None] * W_u
            W_z = (s_v * math.sqrt(d) * fac.nu_uz)[:, None] * W_z
            if arch == "angpt":
                W_o = W_o * (fac.nu_qkv * fac.nu_o)
                a_a, b_a = _lerp_terms(alpha_a, config.use_nu_lerp, nu_lerp)
                a_m, b_m = _lerp_terms(alpha_m, config.use_nu_lerp, nu_lerp)
                W_o, W_down = b_a[:, None] * W_o, b_m[:, None] * W_down
                out[dst + "attn_residual"], out[dst + "mlp_residual"] = a_a, a_m
                if config.nu_att == "gaussian":
                    with torch.no_grad():
                        variance = logit_variance(s_qk.float().view(H, dh), softmax_scale)
                        out[dst + "attn.nu_att_log_grid"] = nu_att_gaussian_grid(variance)
            else:  # nGPT: alpha inside its normalized interpolation
                out[dst + "attn_residual"], out[dst + "mlp_residual"] = alpha_a, alpha_m
        out[dst + "attn.qkv_proj.weight"] = torch.cat([W_q, W_k, W_v])
        out[dst + "attn.q_scale"] = q_scale.reshape(H, dh)
        out[dst + "attn.o_proj.weight"] = W_o
        out[dst + "gate_up_proj.weight"] = torch.cat([W_u, W_z])
        out[dst + "down_proj.weight"] = W_down
    W_out = w["head.output.weight"]
    if arch == "gptplus":
        W_out = W_out * w["head.final_norm.weight"]
    else:
        W_out = _scale(w, "head.logit_scale.s_z.s_hat", config, "s_z")[:, None] * W_out
    out["lm_head.weight"] = W_out
    return {k: v.float().contiguous() for k, v in out.items()}


def _lerp_terms(alpha: torch.Tensor, use_nu_lerp: bool, nu_lerp):
    """anGPT's residual ``nu (h + alpha (x - h)) = a h + b x``: ``(a, b)``."""
    nu = nu_lerp(alpha) if use_nu_lerp else torch.ones_like(alpha)
    return nu * (1 - alpha), nu * alpha


def hf_config_kwargs(config) -> dict:
    """``AnGPTConfig``'s arguments for a GPTModel ``ModelConfig``."""
    from an_megatron.model.factors import KEY_POINTS, KEYS_MAX

    return dict(
        arch=config.arch,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads,
        intermediate_size=config.ffn_hidden_size,
        max_position_embeddings=config.seq_length,
        rope_theta=config.rope_theta,
        nu_att=config.nu_att if config.arch == "angpt" else "none",
        nu_att_keys_max=KEYS_MAX,
        nu_att_key_points=KEY_POINTS,
        # GPT+'s QK-RMSNorm epsilon; anGPT's and nGPT's exact normalization has none to speak of
        qk_norm_eps=config.norm_eps if config.arch == "gptplus" else 1e-12,
        rms_norm_eps=config.norm_eps,
    )


# ---- the tokenizer -----------------------------------------------------------------------------

TOKENIZER_FIELDS = ("tokenizer_type", "tokenizer_model", "vocab_file", "merge_file", "vocab_size")


def recorded_tokenizer(load: str) -> dict:
    """The tokenizer settings a training checkpoint recorded (the run's settings in its
    ``an_megatron.json``); ``{}`` for a consolidated file or a checkpoint without them."""
    if not os.path.isdir(load):
        return {}
    from an_megatron.training.checkpointing import CheckpointError, read_checkpoint_meta

    try:
        _, meta = read_checkpoint_meta(load)
    except CheckpointError:
        return {}
    run = meta.get("run") or {}
    return {k: run[k] for k in TOKENIZER_FIELDS if run.get(k) is not None}


def _build_tokenizer(settings: dict):
    from an_megatron.data import DataError
    from an_megatron.data.arguments import data_error_message
    from an_megatron.data.config import DataConfig
    from an_megatron.data.tokenizers import build_tokenizer

    try:
        return build_tokenizer(DataConfig(**settings))
    except DataError as e:
        raise ExportError(data_error_message(e)) from None


def _sentencepiece_tokenizer_json(model_file: str):
    """A ``tokenizers.Tokenizer`` that encodes like the SentencePiece model (transformers' own
    converter, which follows the model's normalizer and merge settings)."""
    from transformers.convert_slow_tokenizer import SentencePieceExtractor, SpmConverter

    proto = SentencePieceExtractor(model_file).proto
    if proto.trainer_spec.model_type == 1:  # unigram
        vocab = [(p.piece, p.score) for p in proto.pieces]
    else:
        vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    return SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=True)


def write_tokenizer(tokenizer, settings: dict, out_dir: str, max_length: int) -> dict:
    """``tokenizer.json`` and ``tokenizer_config.json`` for ``PreTrainedTokenizerFast``, with our
    ids (the end-of-document token as eos); returns ``{eos_token_id, pad_token_id, vocab_size}``."""
    from tokenizers import AddedToken

    kind = settings["tokenizer_type"]
    if kind in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer"):
        tok = _sentencepiece_tokenizer_json(settings["tokenizer_model"])
        sp = tokenizer._sp
        specials = [sp.id_to_piece(i) for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)]
        specials += [tokenizer.id_to_token(i) for i in range(sp.get_piece_size(), tokenizer.vocab_size)]
    else:  # HuggingFaceTokenizer, GPT2BPETokenizer: already a tokenizers.Tokenizer
        tok = tokenizer._tok
        specials = [tokenizer.id_to_token(tokenizer.eod)]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    eos = tokenizer.id_to_token(tokenizer.eod)
    if tok.token_to_id(eos) != tokenizer.eod or tok.get_vocab_size(with_added_tokens=True) != tokenizer.vocab_size:
        raise ExportError(f"{kind}: the exported tokenizer does not keep our ids (end of document {eos!r})")
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    pad = next((t for t in ("<pad>", "<PAD>") if tok.token_to_id(t) is not None), eos)
    config = dict(
        tokenizer_class="PreTrainedTokenizerFast",
        eos_token=eos,
        pad_token=pad,
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
        # our tokenizers read "<EOD>" or "</s>" in text as characters, never as the special id
        split_special_tokens=True,
    )
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=1)
    return dict(eos_token_id=tokenizer.eod, pad_token_id=tok.token_to_id(pad), vocab_size=tokenizer.vocab_size)


def check_tokenizer(tokenizer, out_dir: str) -> None:
    """The directory's tokenizer, loaded as users load it, must give our ids and eos."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(out_dir)
    ours = tokenizer.tokenize(TOKENIZER_CHECK_TEXT)
    theirs = hf(TOKENIZER_CHECK_TEXT, add_special_tokens=False)["input_ids"]
    if ours != theirs:
        first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        raise ExportError(f"the exported tokenizer encodes differently from ours from token {first} on")
    if hf.eos_token_id != tokenizer.eod:
        raise ExportError(f"the exported tokenizer's eos id {hf.eos_token_id} != our end of document ({tokenizer.eod})")


# ---- the export --------------------------------------------------------------------------------


def _refuse_output(output: str) -> None:
    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
        raise ExportError(f"--output {output}: exists and is not an empty directory")


def load_source(load: str, tokenizer: dict | None = None):
    """``(weights dict, ModelConfig, tokenizer or None, tokenizer settings)`` of a checkpoint
    directory or consolidated file; ``tokenizer`` settings override those the run recorded."""
    from an_megatron.model.config import ModelConfig
    from an_megatron.training.convert import ConvertError, load_weights

    # the tokenizer first: a missing file is refused before the weights are consolidated
    given = {k: v for k, v in (tokenizer or {}).items() if v is not None}
    settings = {**recorded_tokenizer(load), **given}
    try:
        tok = _build_tokenizer(settings) if settings.get("tokenizer_type") else None
    except ExportError as e:
        if given:
            raise
        raise ExportError(f"{e} (recorded by the checkpoint's run; give --tokenizer-type/--tokenizer-model)") from None
    try:
        obj = load_weights(load)
    except ConvertError as e:
        raise ExportError(str(e)) from None
    arch = obj["config"].get("arch")
    if arch not in EXPORT_ARCHS:
        raise ExportError(f"{load}: architecture {arch!r} has no exported form (supported: {', '.join(EXPORT_ARCHS)})")
    try:
        config = ModelConfig(**obj["config"])
    except (TypeError, ValueError) as e:
        raise ExportError(f"{load}: its model configuration is invalid ({e})") from None
    if tok is not None and tok.vocab_size > config.vocab_size:
        raise ExportError(f"the tokenizer has {tok.vocab_size} ids, more than the model's {config.vocab_size} rows")
    return obj, config, tok, settings


def folded_model(weights: dict, config, tok=None, ids: dict | None = None, dtype: str = "fp32"):
    """``AnGPTForCausalLM`` (the shipped modeling code) holding the folded ``weights``, with the
    tokenizer's eos and pad ids; the vocabulary's padding rows are suppressed in generation."""
    from an_megatron.hf.configuration_angpt import AnGPTConfig
    from an_megatron.hf.modeling_angpt import AnGPTForCausalLM

    ids = ids if ids is not None else ({"eos_token_id": tok.eod} if tok is not None else {})
    hf_config = AnGPTConfig(
        **hf_config_kwargs(config),
        eos_token_id=ids.get("eos_token_id"),
        pad_token_id=ids.get("pad_token_id"),
        auto_map={
            "AutoConfig": "configuration_angpt.AnGPTConfig",
            "AutoModelForCausalLM": "modeling_angpt.AnGPTForCausalLM",
        },
    )
    model = AnGPTForCausalLM(hf_config)
    model.load_state_dict(fold_state_dict(weights, config), strict=True)
    model.to(DTYPES[dtype]).eval()
    gen = model.generation_config
    gen.eos_token_id, gen.pad_token_id, gen.bos_token_id = ids.get("eos_token_id"), ids.get("pad_token_id"), None
    if tok is not None and tok.vocab_size < config.vocab_size:  # the padding rows are no tokens
        gen.suppress_tokens = list(range(tok.vocab_size, config.vocab_size))
    return model


def export(load: str, output: str, tokenizer: dict | None = None, dtype: str = "fp32") -> dict:
    """Write the Hugging Face directory ``output`` for the checkpoint or consolidated file ``load``.
    ``tokenizer``: settings (``TOKENIZER_FIELDS``) overriding those the checkpoint recorded.
    Everything is written into a temporary directory that is renamed to ``output`` at the end, so
    a refusal or failure leaves nothing behind."""
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    _refuse_output(output)
    obj, config, tok, settings = load_source(load, tokenizer)
    if settings.get("tokenizer_type") == "NullTokenizer":
        tok = None  # integer ids only: nothing for AutoTokenizer to load
    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(output))}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        ids = {}
        if tok is not None:
            ids = write_tokenizer(tok, settings, tmp, config.seq_length)
            check_tokenizer(tok, tmp)
        folded_model(obj["model"], config, tok, ids, dtype).save_pretrained(tmp)
        for name in MODEL_FILES:
            shutil.copyfile(os.path.join(HF_SOURCE, name), os.path.join(tmp, name))
        _refuse_output(output)  # still free?
        if os.path.isdir(output):
            os.rmdir(output)
        os.rename(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dict(
        arch=config.arch,
        iteration=obj.get("iteration"),
        parameters=sum(t.numel() for t in obj["model"].values()),
        tokenizer=settings.get("tokenizer_type") if tok is not None else None,
        dtype=dtype,
    )
