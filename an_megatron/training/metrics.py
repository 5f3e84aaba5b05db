"""What a training run reports: FLOPs and MFU, norms across shards, the Megatron console line,
the JSONL metrics file and TensorBoard scalars."""

from __future__ import annotations

import json
import math
import os

import torch
import torch.distributed as dist

from an_megatron.compat import deepspeed as ds_compat
from an_megatron.model.config import ModelConfig
from an_megatron.parallel.tensor_parallel import is_tp_sharded

# Dense bf16 peak TFLOP/s per device (vendor figures, without sparsity), by device-name substring.
KNOWN_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "H800": 989.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "A10G": 70.0,
    "V100": 125.0,
}


def flops_per_token(config: ModelConfig) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), counting matmuls only:
    per layer ``2 (4 d^2 + 3 d f)`` for Q/K/V/O and SwiGLU, ``4 s d`` for QK^T and AV (full,
    as Megatron counts them), plus ``2 d V`` for the logits."""
    d, f, s, V = config.hidden_size, config.ffn_hidden_size, config.seq_length, config.vocab_size
    per_layer = 2 * (4 * d * d + 3 * d * f) + 4 * s * d
    return 3.0 * (config.num_layers * per_layer + 2 * d * V)


def peak_tflops(flag_value: float | None) -> float | None:
    if flag_value is not None:
        return flag_value
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, value in KNOWN_PEAK_TFLOPS.items():
            if key in name:
                return value
    return None


def global_norm(params, grads: bool, tp_group, pp_group=None, dp_group=None) -> float:
    """L2 norm over every shard of the model, counting replicated tensors once: TP-sharded
    tensors are summed over the TP group, replicated ones taken from TP rank 0; then summed
    over pipeline stages; ZeRO-3 partitions are summed over data parallel."""
    tp_rank = dist.get_rank(tp_group) if tp_group is not None else 0
    whole, dp_partitioned = torch.zeros(()), torch.zeros(())
    for p in params:
        partition = None if grads else ds_compat.zero3_partition(p)
        t = p.grad if grads else p.data if partition is None else partition
        if t is None or (tp_rank != 0 and not is_tp_sharded(p)):
            continue  # a replicated tensor counts once, on TP rank 0
        sq = t.detach().float().pow(2).sum().cpu()
        if partition is not None:
            dp_partitioned += sq
        else:
            whole += sq
    device = params[0].device if params else "cpu"
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        dp_partitioned = dp_partitioned.to(device)
        dist.all_reduce(dp_partitioned, group=dp_group)
    total = (whole + dp_partitioned.cpu()).reshape(1).to(device)
    for group in (tp_group, pp_group):
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(total, group=group)
    return math.sqrt(total.item())


def lm_loss(r: dict) -> str:
    """The window's mean loss over its applied steps; a window whose every step was skipped
    has none, and says so rather than print nan."""
    if r.get("lm_loss") is not None:
        return format(r["lm_loss"], ".6E")
    n = r.get("window_iterations")
    return f"skipped ({n} of {n} iterations)" if n else "skipped"


def console_line(r: dict) -> str:
    """Megatron's log line."""

    def num(key, fmt):
        return "n/a" if r.get(key) is None else format(r[key], fmt)  # inf and nan print as such

    parts = [
        f" iteration {r['iteration']:8d}/{r['train_iters']:8d}",
        f"consumed samples: {r['consumed_samples']:12d}",
        f"elapsed time per iteration (ms): {r['step_time_s'] * 1e3:.1f}",
        f"learning rate: {r['lr']:.6E}",
        f"global batch size: {r['global_batch_size']:5d}",
        f"lm loss: {lm_loss(r)}",
        f"grad norm: {num('grad_norm', '.3f')}",
        f"params norm: {num('params_norm', '.3f')}",
        f"tokens/s: {r['tokens_per_sec']:.0f}",
        f"TFLOP/s/device: {r['tflops_per_device']:.3f}",
    ]
    if r.get("mfu") is not None:
        parts.append(f"MFU: {r['mfu'] * 100:.1f}%")
    parts += [
        f"number of skipped iterations: {r['skipped_iterations']:3d}",
        f"number of nan iterations: {r['nan_iterations']:3d}",
    ]
    return " | ".join(parts) + " |"


class MetricsSink:
    """JSONL records and TensorBoard scalars, written by one rank only."""

    def __init__(self, metrics_file: str | None, tensorboard_dir: str | None, active: bool):
        self.file = None
        self.tb = None
        if not active:
            return
        if metrics_file:
            os.makedirs(os.path.dirname(os.path.abspath(metrics_file)), exist_ok=True)
            self.file = open(metrics_file, "a", buffering=1)
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise RuntimeError(
                    f"--tensorboard-dir {tensorboard_dir}: the tensorboard package is not installed "
                    "(pip install tensorboard)"
                ) from None
            self.tb = SummaryWriter(log_dir=tensorboard_dir)

    def write(self, record: dict) -> None:
        # JSON has no NaN or Infinity: a non-finite value is recorded as null
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        if self.file:
            self.file.write(json.dumps(record) + "\n")
        if self.tb:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "iteration" and v is not None and math.isfinite(v):
                    self.tb.add_scalar(k, v, record["iteration"])

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb:
            self.tb.close()


def read_metrics(path: str) -> dict:
    """``{"train": [...], "eval": [...]}`` records of one run's ``--metrics-file``. A line that
    is not JSON is an error naming the file and line."""
    train, evals = [], []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{n}: not a JSON record") from None
            if not isinstance(r, dict) or not isinstance(r.get("iteration"), int):
                raise ValueError(f"{path}:{n}: not a metrics record (a JSON object with an 'iteration')")
            (evals if "val_loss" in r else train).append(r)
    return {"train": train, "eval": evals}
