"""Training flags: Megatron's names, merged with DeepSpeed's own, and the ds.json reconciliation.

Per-architecture defaults (``ArchSpec.optimizer``) follow the paper: anGPT and nGPT train with
Adam, no weight decay and no warm-up; GPT+ with AdamW, weight decay 0.1 (matrices only) and a
linear warm-up. A flag given explicitly always wins.

This is the only place that turns flags into configs: ``parse_args`` returns a frozen
``TrainConfig`` (with its ``DataConfig`` and the model's fields), built once from the flags,
the defaults and ds.json; the parsed Namespace is read, never written, and not passed on.
"""

from __future__ import annotations

import argparse
import json
import os
import re

from an_megatron.cli import (
    ArgumentParser,
    float_in,
    nonnegative_float,
    nonnegative_int,
    output_dir,
    output_file,
    positive_float,
    positive_int,
    seed_int,
)
from an_megatron.data.arguments import add_data_args
from an_megatron.data.config import DataConfig
from an_megatron.errors import FieldError
from an_megatron.model.arch import ARCH_SPECS
from an_megatron.model.arguments import add_model_args, model_config_kwargs
from an_megatron.model.config import ModelConfig
from an_megatron.optim.schedules import DECAY_STYLES
from an_megatron.training.config import TrainConfig

BETA = float_in(0, 1, high_open=True)  # Adam's betas: [0, 1)


class ConfigError(ValueError):
    """A flag, or a ds.json value, that cannot work; the message names it."""


# The flag that sets each ModelConfig field: config code names fields (FieldError), the
# command line names its flags.
MODEL_FIELD_FLAGS = {
    "arch": "--arch",
    "num_layers": "--num-layers",
    "hidden_size": "--hidden-size",
    "num_attention_heads": "--num-attention-heads",
    "ffn_hidden_size": "--ffn-hidden-size",
    "seq_length": "--seq-length",
    "rope_theta": "--rotary-base",
    "nu_att": "--nu-att",
    "use_nu_lerp": "--no-nu-lerp",
    "alpha_per_dim": "--alpha-scalar",
    "scales": "--scale",
    "weight_norm": "--weight-norm",
    "init_std": "--init-method-std",
    "tensor_model_parallel_size": "--tensor-model-parallel-size",
    "seed": "--seed",
    "transformer_impl": "--transformer-impl",
    "fp8": "--fp8-format",
    "fp8_recipe": "--fp8-recipe",
    "fp8_backend": "--fp8-backend",
    "fp8_margin": "--fp8-margin",
    "fp8_amax_history_len": "--fp8-amax-history-len",
    "fp8_amax_compute_algo": "--fp8-amax-compute-algo",
    "torch_compile": "--torch-compile",
    "recompute_granularity": "--recompute-granularity",
    "recompute_method": "--recompute-method",
    "recompute_num_layers": "--recompute-num-layers",
    "recompute_activations": "--recompute-activations",
}


def config_error(error: ValueError, flags=MODEL_FIELD_FLAGS) -> ConfigError:
    """A config's validation error as the command line reports it: fields named by their flags
    (`flags`: field -> flag)."""
    if isinstance(error, ConfigError):
        return error
    if isinstance(error, FieldError):
        return ConfigError(error.render(flags))
    return ConfigError(str(error))


def add_training_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=positive_int, default=None)
    g.add_argument("--global-batch-size", type=positive_int, default=None)
    g.add_argument("--train-iters", type=positive_int, required=True)
    g.add_argument("--lr", type=positive_float, required=True)
    g.add_argument("--min-lr", type=nonnegative_float, default=0.0)
    g.add_argument("--lr-decay-style", choices=DECAY_STYLES, default="cosine")
    g.add_argument("--lr-decay-iters", type=positive_int, default=None, help="default --train-iters")
    g.add_argument(
        "--lr-warmup-iters",
        type=nonnegative_int,
        default=None,
        help="default 0 for anGPT/nGPT; for GPT+ 10%% of --train-iters, at most 2000",
    )
    g.add_argument("--lr-wsd-decay-iters", type=positive_int, default=None)
    g.add_argument(
        "--weight-decay", type=nonnegative_float, default=None, help="default 0 for anGPT/nGPT, 0.1 for GPT+"
    )
    g.add_argument("--clip-grad", type=nonnegative_float, default=1.0, help="0 disables clipping")
    g.add_argument("--adam-beta1", type=BETA, default=0.9)
    g.add_argument("--adam-beta2", type=BETA, default=0.95)
    g.add_argument("--adam-eps", type=positive_float, default=1e-8)
    g.add_argument("--seed", type=seed_int, default=1234)
    g.add_argument("--bf16", action="store_true")
    g.add_argument(
        "--max-nonfinite-steps",
        type=positive_int,
        default=10,
        help="stop after this many consecutive steps with a non-finite loss or gradient",
    )
    g = parser.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=positive_int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=positive_int, default=1)
    g.add_argument(
        "--sequence-parallel",
        action="store_true",
        help="split the activations outside the tensor-parallel matmuls (norms, residuals) along the sequence over "
        "the TP ranks; off at TP=1, as in Megatron-LM",
    )
    g.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    g = parser.add_argument_group("checkpointing, evaluation and logging")
    g.add_argument(
        "--save",
        type=output_dir,
        default=None,
        help="checkpoint directory; a run holds {save}/.lock while it writes and never rewrites a published checkpoint "
        "in place",
    )
    g.add_argument(
        "--overwrite-save",
        action="store_true",
        help="allow a fresh run (no --load) to save into a --save directory that already holds checkpoints "
        "(its checkpoints of the same iterations are replaced)",
    )
    g.add_argument("--save-interval", type=positive_int, default=None)
    g.add_argument(
        "--exit-interval",
        type=positive_int,
        default=None,
        help="save (with --save) and exit when the iteration is a multiple of this",
    )
    g.add_argument("--load", default=None)
    g.add_argument(
        "--ckpt-step",
        type=nonnegative_int,
        default=None,
        help="load this iteration's checkpoint from --load instead of the one 'latest' names (e.g. to branch a WSD "
        "cool-down from an earlier step)",
    )
    g.add_argument(
        "--no-load-optim",
        action="store_true",
        help="load only the weights from --load (fresh optimizer; needed for converted checkpoints)",
    )
    g.add_argument("--no-load-rng", action="store_true", help="do not restore the RNG states saved in --load")
    g.add_argument("--eval-interval", type=nonnegative_int, default=1000, help="0: never evaluate")
    g.add_argument("--eval-iters", type=nonnegative_int, default=10)
    g.add_argument(
        "--full-validation",
        action="store_true",
        help="every evaluation covers the whole validation split, the same samples each time (instead of "
        "--eval-iters batches that move on through it)",
    )
    g.add_argument("--log-interval", type=positive_int, default=100)
    g.add_argument(
        "--metrics-file", type=output_file, default=None, help="JSONL: one record per logged iteration and evaluation"
    )
    g.add_argument("--tensorboard-dir", type=output_dir, default=None)
    g.add_argument(
        "--peak-tflops",
        type=positive_float,
        default=None,
        help="dense bf16 peak per device for MFU (default: known GPUs; none on CPU)",
    )
    g.add_argument(
        "--report-memory",
        action="store_true",
        help="before the first step, print each rank's estimated memory: weights, gradients, optimizer state and "
        "activations per micro-batch (training/memory.py)",
    )
    g.add_argument(
        "--generate-tokens",
        type=nonnegative_int,
        default=0,
        help="after training, print a sample of this many tokens (single pipeline stage only)",
    )
    return parser


def build_parser() -> argparse.ArgumentParser:
    import deepspeed

    parser = ArgumentParser(description="Pretrain anGPT, nGPT or GPT+ with DeepSpeed.", allow_abbrev=False)
    add_model_args(parser)
    add_data_args(parser)
    add_training_args(parser)
    return deepspeed.add_config_arguments(parser)


def _arch_defaults(args) -> dict:
    """weight_decay, lr_warmup_iters and lr_decay_iters: the flag's value, else the arch's."""
    defaults = ARCH_SPECS[args.arch].optimizer
    return dict(
        weight_decay=defaults.weight_decay if args.weight_decay is None else args.weight_decay,
        lr_warmup_iters=(
            defaults.warmup_iters(args.train_iters) if args.lr_warmup_iters is None else args.lr_warmup_iters
        ),
        lr_decay_iters=args.train_iters if args.lr_decay_iters is None else args.lr_decay_iters,
    )


def load_ds_config(args) -> dict:
    path = args.deepspeed_config
    if path is None:
        return {}
    if not os.path.isfile(path):
        raise ConfigError(f"--deepspeed_config {path}: {'a directory' if os.path.isdir(path) else 'no such file'}")
    try:
        with open(path) as f:
            ds = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"--deepspeed_config {path}: not valid JSON ({e})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"--deepspeed_config {path}: expected a JSON object, got {type(ds).__name__}")
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        value = ds.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"--deepspeed_config {path}: {key} {value!r} must be an integer >= 1")
    for key in ("bf16", "fp16", "zero_optimization"):
        if not isinstance(ds.get(key, {}), dict):
            raise ConfigError(f"--deepspeed_config {path}: {key} {ds[key]!r} must be a JSON object")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"--deepspeed_config {path}: zero_optimization stage {stage!r} must be 0, 1, 2 or 3")
    return ds


def reconcile_ds_config(args, ds: dict, world_size: int, explicit_flags=frozenset()) -> tuple[dict, dict]:
    """Make ds.json and the flags agree; fill in what either leaves out.

    Batch sizes: ``global = micro * accumulation * data_parallel``. Each value may come from a
    flag or from ds.json; given in both and different is an error naming both. The optimizer,
    learning-rate schedule, clipping and precision are set by the flags. `explicit_flags`: the
    flags given on the command line (a default --clip-grad yields to ds.json).

    Returns ``(ds_config, settled)``: the DeepSpeed config to hand to ``deepspeed.initialize``,
    and the training values it settles (micro_batch_size, global_batch_size,
    gradient_accumulation_steps, data_parallel_size, clip_grad, bf16, zero_stage). `args` and
    `ds` are not written to.
    """
    ds = dict(ds)
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if world_size % (tp * pp):
        raise ConfigError(
            f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} "
            f"x --pipeline-model-parallel-size {pp}"
        )
    dp = world_size // (tp * pp)
    for key, flag in (
        ("optimizer", "--lr/--adam-*/--weight-decay"),
        ("scheduler", "--lr-decay-style/--lr-warmup-iters"),
    ):
        if key in ds:
            raise ConfigError(f"--deepspeed_config has an '{key}' section; this trainer sets it from {flag}: remove it")

    def pick(flag_value, flag, key):
        if key in ds and flag_value is not None and ds[key] != flag_value:
            raise ConfigError(f"{flag} {flag_value} disagrees with ds.json {key} {ds[key]}")
        return flag_value if flag_value is not None else ds.get(key)

    micro = pick(args.micro_batch_size, "--micro-batch-size", "train_micro_batch_size_per_gpu")
    glob = pick(args.global_batch_size, "--global-batch-size", "train_batch_size")
    accum = ds.get("gradient_accumulation_steps")
    if micro is None and glob is None:
        raise ConfigError("no batch size: give --micro-batch-size and --global-batch-size (or set them in ds.json)")
    if micro is None:
        if accum is None:
            raise ConfigError(f"--global-batch-size {glob} alone is ambiguous: give --micro-batch-size")
        if glob < accum * dp:
            raise ConfigError(
                f"--global-batch-size {glob} is less than ds.json gradient_accumulation_steps {accum} x "
                f"data-parallel size {dp}"
            )
        micro = glob // (accum * dp)
    if glob is None:
        glob = micro * (accum or 1) * dp
    if glob % (micro * dp):
        raise ConfigError(
            f"--global-batch-size {glob} is not divisible by --micro-batch-size {micro} x data-parallel size {dp}"
        )
    if accum is not None and accum != glob // (micro * dp):
        raise ConfigError(
            f"ds.json gradient_accumulation_steps {accum} disagrees with --global-batch-size {glob} / "
            f"(--micro-batch-size {micro} x data-parallel size {dp}) = {glob // (micro * dp)}"
        )
    accum = glob // (micro * dp)
    ds.update(train_batch_size=glob, train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum)

    clip = ds.get("gradient_clipping")
    if clip is not None and "--clip-grad" in explicit_flags and clip != args.clip_grad:
        raise ConfigError(f"--clip-grad {args.clip_grad} disagrees with ds.json gradient_clipping {clip}")
    clip_grad = args.clip_grad if clip is None else clip
    ds["gradient_clipping"] = clip_grad

    ds_bf16 = ds.get("bf16", {}).get("enabled")
    if args.bf16 and ds_bf16 is False:
        raise ConfigError("--bf16 disagrees with ds.json bf16.enabled false")
    bf16 = args.bf16 or bool(ds_bf16)
    if ds.get("fp16", {}).get("enabled", False):
        raise ConfigError('ds.json enables fp16: anGPT trains in bf16 or fp32 (use "bf16": {"enabled": true})')
    if bf16:
        # DeepSpeed's bf16 paths skip a step with a non-finite gradient only when asked to.
        ds["bf16"] = {**ds.get("bf16", {}), "enabled": True, "check_grad_overflow": True}
    zero_stage = ds.get("zero_optimization", {}).get("stage", 0)
    if pp > 1 and zero_stage > 1:
        raise ConfigError(
            f"ZeRO stage {zero_stage} with --pipeline-model-parallel-size {pp}: DeepSpeed's pipeline "
            f"engine supports ZeRO stage 0 and 1 only"
        )
    ds.setdefault("steps_per_print", 10**9)  # our own log lines replace DeepSpeed's
    ds.setdefault("wall_clock_breakdown", False)
    settled = dict(
        micro_batch_size=micro,
        global_batch_size=glob,
        gradient_accumulation_steps=accum,
        data_parallel_size=dp,
        clip_grad=clip_grad,
        bf16=bf16,
        zero_stage=zero_stage,
    )
    return ds, settled


def data_config(args) -> DataConfig:
    """The data pipeline's config from the data, tokenizer and training flags."""
    return DataConfig.from_namespace(args)


def train_config(args, settled: dict) -> TrainConfig:
    """The run's config: the flags (read from `args`), the arch's defaults and what ds.json
    settled (``reconcile_ds_config``)."""
    derived = {**_arch_defaults(args), **settled}
    flags = (f for f in TrainConfig.__dataclass_fields__ if f not in ("data", "model", *derived))
    values = {f: getattr(args, f) for f in flags}
    return TrainConfig(**values, **derived, data=data_config(args), model=model_config_kwargs(args))


def check_flags(args) -> None:
    """The relations between flags that the flags' own types cannot check; ``ConfigError``."""
    for flag, value, needs, given in (
        ("--save-interval", args.save_interval, "--save DIR", args.save),
        ("--overwrite-save", args.overwrite_save, "--save DIR", args.save),
        ("--no-load-optim", args.no_load_optim, "--load DIR", args.load),
        ("--no-load-rng", args.no_load_rng, "--load DIR", args.load),
        ("--ckpt-step", args.ckpt_step, "--load DIR", args.load),
        ("--lr-wsd-decay-iters", args.lr_wsd_decay_iters, "--lr-decay-style wsd", args.lr_decay_style == "wsd"),
    ):
        if value not in (None, False) and not given:
            raise ConfigError(f"{flag} needs {needs}")
    shares = re.findall(r"[0-9]*\.?[0-9]+", args.split)  # the numbers, as megatron-core reads them
    if not args.mock_data and shares and float(shares[0]) <= 0:
        raise ConfigError(f"--split {args.split}: training gets no data (its share, the first number, is 0)")
    if args.min_lr > args.lr:
        raise ConfigError(f"--min-lr {args.min_lr} is above --lr {args.lr}")
    schedule = _arch_defaults(args)
    warmup, decay = schedule["lr_warmup_iters"], schedule["lr_decay_iters"]
    if warmup > decay:
        given = "" if args.lr_warmup_iters is not None else f" (the default for --arch {args.arch})"
        raise ConfigError(f"--lr-warmup-iters {warmup}{given} is more than --lr-decay-iters {decay}")
    if args.lr_wsd_decay_iters is not None and args.lr_wsd_decay_iters > decay - warmup:
        raise ConfigError(
            f"--lr-wsd-decay-iters {args.lr_wsd_decay_iters} is more than the {decay - warmup} iterations between "
            f"the warm-up (--lr-warmup-iters {warmup}) and --lr-decay-iters {decay}"
        )
    pp = args.pipeline_model_parallel_size
    if pp > args.num_layers:
        raise ConfigError(
            f"--pipeline-model-parallel-size {pp} is more than --num-layers {args.num_layers} (one block per stage "
            f"at least)"
        )
    check_sequence_parallel(args)
    # The model's shapes (heads, ffn and vocabulary against the TP size, ...), before anything
    # starts: the padded vocabulary is a multiple of the TP size, so any multiple stands for it.
    try:
        kwargs = model_config_kwargs(args)
        ModelConfig(**kwargs, vocab_size=args.make_vocab_size_divisible_by * kwargs["tensor_model_parallel_size"])
    except ValueError as e:
        raise config_error(e) from None
    check_recompute_per_stage(args)
    if args.data_path:
        from an_megatron.data.arguments import data_error_message
        from an_megatron.data.datasets import parse_data_path
        from an_megatron.data.errors import DataError

        try:
            parse_data_path(args.data_path)
        except DataError as e:
            raise ConfigError(data_error_message(e)) from None


def check_recompute_per_stage(args) -> None:
    """``--recompute-num-layers`` counts blocks of one pipeline stage (Megatron's meaning): at
    most the blocks of the smallest stage (stages hold ``--num-layers / pp`` blocks, rounded
    down or up), all of them without pipeline parallelism."""
    n, pp, layers = args.recompute_num_layers, args.pipeline_model_parallel_size, args.num_layers
    if n is None or n <= layers // pp:
        return
    if pp == 1:
        raise ConfigError(f"--recompute-num-layers {n} is more than --num-layers {layers}")
    raise ConfigError(
        f"--recompute-num-layers {n} is more than {layers // pp}, the blocks on the smallest pipeline stage "
        f"(--num-layers {layers} over --pipeline-model-parallel-size {pp})"
    )


def check_sequence_parallel(args) -> None:
    """``--sequence-parallel`` with TP > 1: what its layers cannot do is refused (at TP=1 it is
    off, as in Megatron-LM, and nothing is checked)."""
    tp = args.tensor_model_parallel_size
    if not args.sequence_parallel or tp == 1:
        return
    if args.seq_length % tp:
        raise ConfigError(
            f"--sequence-parallel: --seq-length {args.seq_length} is not divisible by "
            f"--tensor-model-parallel-size {tp} (each rank holds an equal part of the sequence)"
        )
    if args.transformer_impl == "transformer_engine":
        raise ConfigError(
            "--sequence-parallel with --transformer-impl transformer_engine: not supported (sequence parallelism is "
            "applied to megatron-core's local linears of a built model; Transformer Engine's linears take it only "
            "when they are constructed)"
        )
    try:  # the FP8 backend as the model resolves it (the model's own check reports bad FP8 flags)
        config = ModelConfig(**model_config_kwargs(args), vocab_size=args.make_vocab_size_divisible_by * tp)
    except ValueError:
        return
    if config.fp8 and config.fp8_backend == "torch":
        raise ConfigError(
            "--sequence-parallel with --fp8-backend torch: its linears do not support sequence parallelism "
            "(drop one of them)"
        )


def parse_args(argv=None, world_size: int | None = None) -> tuple[TrainConfig, dict]:
    """Parse flags, apply per-architecture defaults, reconcile with ds.json.

    Returns ``(config, ds_config)``: the frozen ``TrainConfig`` and the DeepSpeed config; raises
    ``ConfigError`` with a one-line message."""
    import sys

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    explicit_flags = frozenset(a.split("=")[0] for a in argv if a.startswith("--"))
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if not args.mock_data and not args.data_path:
        raise ConfigError("no training data: give --data-path PREFIX (or --mock-data)")
    if args.tokenizer_type is None:
        raise ConfigError("--tokenizer-type is required (NullTokenizer with --vocab-size for synthetic ids)")
    check_flags(args)
    if args.tensorboard_dir is not None:  # refuse now, not after the model and data are built
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError(
                f"--tensorboard-dir {args.tensorboard_dir}: the tensorboard package is not installed "
                "(pip install tensorboard)"
            ) from None
    ds = load_ds_config(args)
    if args.sequence_parallel and args.tensor_model_parallel_size > 1 and args.pipeline_model_parallel_size > 1:
        from an_megatron.parallel.sequence_parallel import pipeline_ds_config

        try:
            ds = pipeline_ds_config(ds)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    ds, settled = reconcile_ds_config(args, ds, world_size, explicit_flags)
    return train_config(args, settled), ds
