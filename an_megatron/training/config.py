"""The training run's configuration: one frozen dataclass, built once by ``parse_args``.

``TrainConfig`` holds the training flags after the per-architecture defaults and the ds.json
reconciliation (batch sizes, gradient accumulation, data-parallel size, ZeRO stage, clipping,
precision), the data pipeline's ``DataConfig`` and the model's fields (everything of a
``ModelConfig`` but the padded vocabulary, which the tokenizer decides). Nothing writes to it
after construction.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType

from an_megatron.data.config import DataConfig
from an_megatron.model.config import ModelConfig


@dataclass(frozen=True)
class TrainConfig:
    arch: str
    train_iters: int
    lr: float
    # batch sizes, as reconciled with ds.json: global = micro x accumulation x data-parallel size
    micro_batch_size: int
    global_batch_size: int
    gradient_accumulation_steps: int
    data_parallel_size: int
    zero_stage: int = 0
    # schedule and optimizer (the arch's defaults filled in)
    min_lr: float = 0.0
    lr_decay_style: str = "cosine"
    lr_decay_iters: int | None = None
    lr_warmup_iters: int = 0
    lr_wsd_decay_iters: int | None = None
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    seed: int = 1234
    bf16: bool = False
    max_nonfinite_steps: int = 10
    # parallelism
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False  # as given; at TP=1 it is off (``sequence_parallel_on``)
    # checkpointing, evaluation and logging
    save: str | None = None
    overwrite_save: bool = False
    save_interval: int | None = None
    exit_interval: int | None = None
    load: str | None = None
    ckpt_step: int | None = None
    no_load_optim: bool = False
    no_load_rng: bool = False
    eval_interval: int = 1000
    eval_iters: int = 10
    full_validation: bool = False
    log_interval: int = 100
    metrics_file: str | None = None
    tensorboard_dir: str | None = None
    peak_tflops: float | None = None
    generate_tokens: int = 0
    report_memory: bool = False
    deepspeed_config: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    # ModelConfig's fields but vocab_size (read-only mapping)
    model: Mapping = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self):
        if not isinstance(self.model, MappingProxyType):
            object.__setattr__(self, "model", MappingProxyType(dict(self.model)))

    @property
    def sequence_parallel_on(self) -> bool:
        """``--sequence-parallel`` in effect: it needs TP > 1 (Megatron-LM turns it off at TP=1)."""
        return self.sequence_parallel and self.tensor_model_parallel_size > 1

    @property
    def seq_length(self) -> int:
        return self.data.seq_length

    def model_config(self, vocab_size: int) -> ModelConfig:
        """The model for a (padded) vocabulary of `vocab_size`; raises ValueError for shapes
        that cannot work."""
        return ModelConfig(**self.model, vocab_size=vocab_size)

    def as_record(self) -> dict:
        """The run's settings as one flat dict of plain values (saved with checkpoints)."""
        record = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("data", "model")}
        record.update({f.name: getattr(self.data, f.name) for f in fields(self.data)})
        record.update(self.model)
        plain = (int, float, str, bool, list, tuple, type(None))
        return {k: list(v) if isinstance(v, tuple) else v for k, v in record.items() if isinstance(v, plain)}
