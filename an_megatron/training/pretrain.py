"""The training loop: DeepSpeed engine, data, evaluation, logging, checkpoints, fault handling.

``pretrain()`` is what ``examples/pretrain_angpt.py`` runs under the ``deepspeed`` launcher or
``torchrun``. It knows nothing of the model's math: it builds ``GPTModel`` (or its pipeline
form), hands it to DeepSpeed with the norm bound hooked into the optimizer step, and loops.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from an_megatron.model import recompute
from an_megatron.model.fp8 import fp8_autocast
from an_megatron.optim.schedules import learning_rate
from an_megatron.parallel import groups
from an_megatron.training.arguments import ConfigError, config_error, parse_args
from an_megatron.training.checkpointing import (
    LATEST,
    CheckpointError,
    SaveLock,
    existing_checkpoints,
    load_checkpoint,
    remove_leftovers,
    save_checkpoint,
    tag_for,
)
from an_megatron.training.config import TrainConfig
from an_megatron.training.metrics import MetricsSink, console_line, flops_per_token, global_norm, peak_tflops
from an_megatron.training.preflight import PreflightError, check_outputs


class TrainingError(RuntimeError):
    pass


class DivergedError(TrainingError):
    """``--max-nonfinite-steps`` consecutive non-finite steps: the run diverged."""


# pretrain's exit status when a run stops after non-finite steps (1 is any other error, 2 a
# bad flag): a job script or scheduler can tell a diverged run, which a plain relaunch would
# repeat, from a crash worth relaunching.
EXIT_DIVERGED = 3


def print_rank0(*a, **k):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*a, **k, flush=True)


def is_logger_rank(cfg: TrainConfig) -> bool:
    """The rank that prints the log lines and writes the metrics: the last pipeline stage sees
    the loss."""
    return dist.get_rank() == (dist.get_world_size() - 1 if cfg.pipeline_model_parallel_size > 1 else 0)


class Trainer:
    def __init__(self, cfg: TrainConfig, ds_config: dict):
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        from an_megatron.data import build_tokenizer
        from an_megatron.optim.deepspeed_bound import register_norm_bound
        from an_megatron.optim.optimizer import build_optimizer

        self.cfg = cfg
        self.device = torch.device(get_accelerator().current_device_name())
        random.seed(cfg.seed), np.random.seed(cfg.seed), torch.manual_seed(cfg.seed)
        self.tokenizer = build_tokenizer(cfg.data)
        try:
            self.config = cfg.model_config(cfg.data.padded_vocab_size(self.tokenizer.vocab_size))
        except ValueError as e:  # shapes that cannot work: one line naming the value (or the flag)
            raise config_error(e) from None
        self._build_datasets()  # the data's errors come before the model and engine are built
        self.pipelined = cfg.pipeline_model_parallel_size > 1
        if self.pipelined:
            from an_megatron.parallel.pipeline import build_pipeline_module

            model = build_pipeline_module(self.config)
        else:
            from an_megatron.model import GPTModel

            model = GPTModel(self.config)
        model.to(self.device)
        if cfg.sequence_parallel_on:  # after the move: its gradient hooks are on the parameters as they will train
            from an_megatron.parallel.sequence_parallel import apply_sequence_parallel

            apply_sequence_parallel(model)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=build_optimizer(model, cfg),
            config=ds_config,
            mpu=None if self.pipelined else groups.DeepSpeedMPU,
        )
        self.model = model
        register_norm_bound(self.engine, model)
        if cfg.report_memory:
            self.report_memory()
        self.iteration, self.consumed_samples = 0, 0
        self.loaded_iteration = None
        if cfg.load:
            self.iteration, self.consumed_samples = load_checkpoint(
                self.engine,
                cfg.load,
                self.config,
                load_optim=not cfg.no_load_optim,
                load_rng=not cfg.no_load_rng,
                iteration=cfg.ckpt_step,
            )
            print_rank0(f"loaded checkpoint from {cfg.load} at iteration {self.iteration}")
            self.loaded_iteration = self.iteration
        self.last_saved = None  # the iteration of the newest checkpoint of this run's state in --save
        self.saved_in_run = None  # the iteration of the newest checkpoint this run wrote
        if cfg.load and cfg.save and os.path.realpath(cfg.load) == os.path.realpath(cfg.save):
            self.last_saved = self.iteration  # the resumed state is that checkpoint: never saved again
        self._build_loader()
        is_logger = is_logger_rank(cfg)
        self.sink = MetricsSink(cfg.metrics_file, cfg.tensorboard_dir, active=is_logger)
        self.is_logger = is_logger
        self.tokens_per_iteration = cfg.global_batch_size * cfg.seq_length
        self.flops_per_iteration = flops_per_token(self.config) * self.tokens_per_iteration
        self.peak = peak_tflops(cfg.peak_tflops)
        self.skipped, self.nan_iterations, self.nonfinite_streak = 0, 0, 0
        self.first_nonfinite = None  # the iteration where the current streak of non-finite steps began

    def report_memory(self):
        """``--report-memory``: this rank's estimate (``training/memory.py``), before the first step."""
        from an_megatron.training.memory import NoFormula, recompute_from, report_lines

        c = self.cfg
        try:
            lines = report_lines(
                self.config,
                micro_batch=c.micro_batch_size,
                bf16=c.bf16,
                zero_stage=c.zero_stage,
                dp=c.data_parallel_size,
                pp=c.pipeline_model_parallel_size,
                stage=groups.pp_rank(),
                micro_batches=c.gradient_accumulation_steps,
                recompute=recompute_from(self.config),
                sequence_parallel=getattr(c, "sequence_parallel_on", False),
                document_mask=c.data.reset_attention_mask,
                varlen_attention=self.device.type == "cuda" and c.bf16,
                # megatron_patches/sequence_parallel_on_cpu.py: on CPU the linear keeps its gathered input
                gathered_inputs_kept=self.device.type == "cpu",
            )
        except NoFormula as e:
            lines = [f"memory estimate: none ({e})"]
        for line in lines:
            print(f"[rank {dist.get_rank()}] {line}", flush=True)

    # ---- data ------------------------------------------------------------------------------
    def _build_datasets(self):
        """Check the data (present, non-empty, token ids inside the tokenizer's vocabulary, a
        sample for every split with a share) and build the datasets."""
        from an_megatron.data import build_train_valid_test_datasets, resolve_eod

        c = self.cfg
        evals = c.train_iters // c.eval_interval + 1 if c.eval_interval else 0
        num_samples = [
            c.train_iters * c.global_batch_size,
            None if c.full_validation else evals * c.eval_iters * c.global_batch_size,  # None: one epoch
            c.eval_iters * c.global_batch_size,
        ]
        self.train_dataset, self.valid_dataset, _ = build_train_valid_test_datasets(c.data, self.tokenizer, num_samples)
        valid = self.valid_dataset
        if c.full_validation and valid is not None and len(valid) < c.global_batch_size:
            raise ConfigError(
                f"--full-validation: the validation split holds {len(valid)} samples of --seq-length "
                f"{c.seq_length}, fewer than one global batch ({c.global_batch_size}): give it a larger --split share"
            )
        self.eod = resolve_eod(c.data, self.tokenizer)  # the corpus's own end of document (documents masks)

    def _build_loader(self):
        """The training batches, from the data position of the loaded checkpoint."""
        from an_megatron.data import build_data_loader

        c = self.cfg
        self.train_loader = build_data_loader(
            self.train_dataset,
            self.consumed_samples,
            c.micro_batch_size,
            groups.dp_rank(),
            groups.dp_size(),
            c.data.num_workers,
        )
        self.train_iter = iter(self.train_loader)
        self.valid_consumed = 0

    def _to_device(self, batch):
        """The model's inputs on this rank's device: ``tokens``, ``labels``, ``loss_mask``, and
        ``position_ids`` / ``document_ids`` with --reset-position-ids / --reset-attention-mask."""
        from an_megatron.data import document_ids

        c = self.cfg
        batch = {
            k: batch[k].to(self.device, non_blocking=True) for k in ("tokens", "labels", "loss_mask", "position_ids")
        }
        if c.data.reset_attention_mask:
            batch["document_ids"] = document_ids(batch["tokens"], self.eod)
        if not c.data.reset_position_ids:
            del batch["position_ids"]  # 0..s-1: the model's cached RoPE tables
        return batch

    def _forward(self, batch) -> torch.Tensor:
        with fp8_autocast(self.config):
            return self.engine(
                batch["tokens"],
                batch["labels"],
                batch["loss_mask"],
                batch.get("position_ids"),
                batch.get("document_ids"),
            )

    # ---- one step --------------------------------------------------------------------------
    def _set_lr(self, iteration):
        c = self.cfg
        lr = learning_rate(
            iteration,
            lr=c.lr,
            min_lr=c.min_lr,
            warmup_iters=c.lr_warmup_iters,
            decay_iters=c.lr_decay_iters,
            style=c.lr_decay_style,
            wsd_decay_iters=c.lr_wsd_decay_iters,
        )
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def _dp_mean(self, value: torch.Tensor) -> float:
        group = groups.dp_group()
        if dist.get_world_size(group) > 1:
            value = value.clone()
            dist.all_reduce(value, group=group)
            value /= dist.get_world_size(group)
        return value.item()

    def train_step(self) -> tuple[float, float | None, bool]:
        """One global batch. Returns (mean loss over the global batch, grad norm, step applied)."""
        if self.pipelined:
            with fp8_autocast(self.config):  # the pipeline engine runs forward and backward inside
                loss = self.engine.train_batch(data_iter=self._pipeline_batches(self.train_iter))
            grad_norm = self.engine.get_global_grad_norm()
            return float(loss), None if grad_norm is None else float(grad_norm), self.engine.was_step_applied()
        losses = []
        for _ in range(self.cfg.gradient_accumulation_steps):
            loss = self._forward(self._to_device(next(self.train_iter)))
            self.engine.backward(loss)
            losses.append(loss.detach())
            if not self.engine.is_gradient_accumulation_boundary():
                self.engine.step()
        grad_norm, finite = None, True
        if self.cfg.zero_stage == 0 and not self.cfg.bf16:
            # DeepSpeed's plain fp32 path has no overflow check and computes no norm: do both
            # on the all-reduced gradients. Dropping every .grad makes torch's optimizer skip
            # all parameters, weights and moments alike: a true skip.
            grad_norm = global_norm(list(self.model.parameters()), True, groups.tp_group())
            finite = math.isfinite(grad_norm)
            if not finite:
                for p in self.model.parameters():
                    p.grad = None
        self.engine.step()
        applied = self.engine.was_step_applied() and finite
        if grad_norm is None:
            grad_norm = self.engine.get_global_grad_norm()
            grad_norm = None if grad_norm is None else float(grad_norm)  # a tensor in some modes
        return self._dp_mean(torch.stack(losses).float().mean()), grad_norm, applied

    def _pipeline_batches(self, it):
        from an_megatron.parallel.pipeline import pipeline_batch

        while True:
            yield pipeline_batch(self._to_device(next(it)))

    # ---- evaluation --------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> float:
        from an_megatron.data import build_data_loader

        c = self.cfg
        # --full-validation: every complete global batch of the split, from its start each time
        start = 0 if c.full_validation else self.valid_consumed
        iters = len(self.valid_dataset) // c.global_batch_size if c.full_validation else c.eval_iters
        loader = build_data_loader(self.valid_dataset, start, c.micro_batch_size, groups.dp_rank(), groups.dp_size(), 0)
        it = iter(loader)
        losses = []
        self.engine.eval()
        for _ in range(iters):
            if self.pipelined:
                with fp8_autocast(self.config):
                    losses.append(torch.as_tensor(float(self.engine.eval_batch(self._pipeline_batches(it)))))
                continue
            for _ in range(c.gradient_accumulation_steps):
                losses.append(self._forward(self._to_device(next(it))).float())
        self.engine.train()
        if not c.full_validation:
            self.valid_consumed += c.eval_iters * c.global_batch_size
        return self._dp_mean(torch.stack(losses).mean())

    # ---- the loop ----------------------------------------------------------------------------
    def save(self):
        """Save this iteration's checkpoint, unless the weights' norm is not finite (a finite
        loss and gradient do not guarantee sane weights: one step at a huge learning rate
        leaves weights of 1e30, whose squared norm overflows)."""
        if self.cfg.save and self.last_saved != self.iteration:
            norm = self.params_norm()
            if not math.isfinite(norm):
                print_rank0(f"not saving the checkpoint of iteration {self.iteration}: the weights' norm is {norm}")
                return
            tag = save_checkpoint(
                self.engine, self.cfg.save, self.iteration, self.consumed_samples, self.config, self.cfg
            )
            self.last_saved = self.saved_in_run = self.iteration
            print_rank0(f"saved checkpoint {os.path.join(self.cfg.save, tag)}")

    def stop_report(self) -> str:
        """Why training stops after non-finite steps, and which checkpoint to go back to: the
        newest one saved before the streak began, with what was checked of it."""
        c = self.cfg
        report = (
            f"{self.nonfinite_streak} consecutive steps with a non-finite loss or gradient (iterations "
            f"{self.first_nonfinite} to {self.iteration}); stopping. "
        )
        if self.saved_in_run is not None:
            return report + (
                f"Last checkpoint saved before the first of them: {os.path.join(c.save, tag_for(self.saved_in_run))} "
                f"(checked when saved: its step's loss and gradient norm and its weights' norm were finite)"
            )
        report += "No checkpoint was saved in this run before the first of them"
        if self.loaded_iteration is not None:
            report += f"; it started from --load {c.load} (iteration {self.loaded_iteration})"
        return report

    def params_norm(self):
        pp_group = groups.parallel_state.get_pipeline_model_parallel_group() if self.pipelined else None
        dp_group = groups.dp_group() if self.cfg.zero_stage == 3 else None
        return global_norm(list(self.model.parameters()), False, groups.tp_group(), pp_group, dp_group)

    def train(self):
        c = self.cfg
        print_rank0(
            f"training {c.arch}: {sum(p.numel() for p in self.model.parameters()):,} parameters on this rank, "
            f"TP={c.tensor_model_parallel_size}{sequence_parallel_note(c)} PP={c.pipeline_model_parallel_size} "
            f"DP={c.data_parallel_size} "
            f"ZeRO-{c.zero_stage} {'bf16' if c.bf16 else 'fp32'}, global batch {c.global_batch_size} "
            f"(micro {c.micro_batch_size} x accumulation {c.gradient_accumulation_steps} x DP), "
            f"{recompute.describe(self.config)}"
        )
        window = dict(losses=[], start=time.perf_counter(), iters=0)
        while self.iteration < c.train_iters:
            lr = self._set_lr(self.iteration)
            loss, grad_norm, applied = self.train_step()
            self.iteration += 1
            self.consumed_samples += c.global_batch_size
            finite = math.isfinite(loss) and applied
            self.nan_iterations += not math.isfinite(loss)
            self.skipped += not applied
            self.nonfinite_streak = 0 if finite else self.nonfinite_streak + 1
            if self.nonfinite_streak == 1:
                self.first_nonfinite = self.iteration
            if finite:
                window["losses"].append(loss)
            window["iters"] += 1
            if self.iteration % c.log_interval == 0 or self.iteration == c.train_iters:
                self._log(window, lr, grad_norm)
                window = dict(losses=[], start=time.perf_counter(), iters=0)
            exiting = bool(c.exit_interval) and self.iteration % c.exit_interval == 0
            final = exiting or self.iteration == c.train_iters
            # Save before evaluating: whatever fails after the last step must not cost its checkpoint.
            # Nothing is saved during a non-finite streak (the last good checkpoint stays latest).
            periodic = bool(c.save_interval) and self.iteration % c.save_interval == 0
            if (periodic or final) and self.nonfinite_streak == 0:
                self.save()
            if self.nonfinite_streak >= c.max_nonfinite_steps:
                raise DivergedError(self.stop_report())
            if c.eval_interval and (self.iteration % c.eval_interval == 0 or self.iteration == c.train_iters):
                t_eval = time.perf_counter()
                self._log_eval()
                window["start"] += time.perf_counter() - t_eval  # step times exclude evaluation
            if exiting:
                print_rank0(f"exiting at iteration {self.iteration} (--exit-interval {c.exit_interval})")
                break
        if self.nonfinite_streak == 0:
            self.save()  # a no-op unless the loop ran no step (resumed at --train-iters)

    def _log(self, window, lr, grad_norm):
        c = self.cfg
        elapsed = time.perf_counter() - window["start"]
        step_time = elapsed / max(1, window["iters"])
        tflops = self.flops_per_iteration / step_time / 1e12 / dist.get_world_size()
        record = dict(
            iteration=self.iteration,
            train_iters=c.train_iters,
            consumed_samples=self.consumed_samples,
            consumed_tokens=self.consumed_samples * c.seq_length,
            global_batch_size=c.global_batch_size,
            lm_loss=sum(window["losses"]) / len(window["losses"]) if window["losses"] else None,
            window_iterations=window["iters"],
            window_skipped_iterations=window["iters"] - len(window["losses"]),
            lr=lr,
            grad_norm=grad_norm,  # the metrics file records a non-finite value as null
            params_norm=self.params_norm(),
            step_time_s=step_time,
            tokens_per_sec=self.tokens_per_iteration / step_time,
            tflops_per_device=tflops,
            mfu=tflops / self.peak if self.peak else None,
            skipped_iterations=self.skipped,
            nan_iterations=self.nan_iterations,
        )
        if self.is_logger:
            print(console_line(record), flush=True)
            self.sink.write(record)

    def _log_eval(self):
        c = self.cfg
        if self.valid_dataset is None or c.eval_iters <= 0:
            if not getattr(self, "_eval_skip_noted", False):  # one line, at the first evaluation point
                why = (
                    f"--eval-iters {c.eval_iters}"
                    if c.eval_iters <= 0
                    else f"no validation data (--split {c.data.split})"
                    if not c.data.mock_data
                    else "no validation data"
                )
                print_rank0(f"evaluation skipped: {why}")
                self._eval_skip_noted = True
            return
        val_loss = self.evaluate()
        if self.is_logger:
            ppl = math.exp(min(val_loss, 30.0))
            print(
                f" validation loss at iteration {self.iteration} | lm loss value: {val_loss:.6E} | "
                f"lm loss PPL: {ppl:.6E} |",
                flush=True,
            )
            self.sink.write(dict(iteration=self.iteration, val_loss=val_loss, val_ppl=ppl))

    def generate_sample(self, num_tokens: int, prompt: str = "In the beginning"):
        from an_megatron.training.generate import sample

        if self.pipelined:
            print_rank0("(no sample: generation needs a single pipeline stage)")
            return
        # NullTokenizer has no text: start from an end-of-document token instead.
        null = self.cfg.data.tokenizer_type == "NullTokenizer"
        ids = [self.tokenizer.eod] if null else self.tokenizer.tokenize(prompt)
        out = sample(
            self.engine.module,
            ids,
            num_tokens,
            self.config.seq_length,
            self.tokenizer.vocab_size,
            seed=self.cfg.seed,
            length_multiple=self.cfg.tensor_model_parallel_size if self.cfg.sequence_parallel_on else 1,
        )
        print_rank0(f"\n--- sample ---\n{self.tokenizer.detokenize(out)}\n--------------")


def sequence_parallel_note(cfg: TrainConfig) -> str:
    """What the start-up line says of ``--sequence-parallel`` (nothing without it)."""
    if cfg.sequence_parallel_on:
        return " (sequence parallel)"
    if cfg.sequence_parallel:
        return " (--sequence-parallel off: it needs TP > 1, as in Megatron-LM)"
    return ""


def _some(names: list[str]) -> str:
    """The first few of ``names``, for a one-line message."""
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def guard_save_dir(cfg: TrainConfig) -> SaveLock | None:
    """Global rank 0: lock ``--save``, refuse a fresh run into a directory holding checkpoints
    (unless --overwrite-save), remove leftovers of crashed saves. Every rank gets the verdict, so
    all stop together with rank 0's one-line error; nothing is left written on refusal."""
    lock, error = None, None
    if cfg.save and dist.get_rank() == 0:
        lock = SaveLock(cfg.save)
        try:
            lock.acquire()
            for note in lock.notes:
                print(note, flush=True)
            found = existing_checkpoints(cfg.save)
            if cfg.ckpt_step is not None and os.path.realpath(cfg.load) == os.path.realpath(cfg.save):
                later = [n for n in found if n != LATEST and n > tag_for(cfg.ckpt_step)]  # tags are zero-padded
                if later:
                    raise CheckpointError(
                        f"--ckpt-step {cfg.ckpt_step} with --save equal to --load {cfg.load}: the run would replace "
                        f"its later checkpoints ({_some(later)}): branch into another --save"
                    )
            if not cfg.load and found and not cfg.overwrite_save:
                raise CheckpointError(
                    f"--save {cfg.save} already holds checkpoints ({_some(found)}) and this run has no --load: "
                    f"resume with --load {cfg.save}, choose another --save, or pass --overwrite-save"
                )
            removed = remove_leftovers(cfg.save)
            if removed:
                print(
                    f"removed {len(removed)} unfinished checkpoint(s) of a crashed save in {cfg.save}: "
                    f"{', '.join(removed)}",
                    flush=True,
                )
        except CheckpointError as e:
            lock.release()
            lock, error = None, str(e)
        except BaseException:
            lock.release()
            raise
    verdict = [error]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        raise CheckpointError(verdict[0])
    return lock


def pretrain(argv=None) -> int:
    try:
        cfg, ds_config = parse_args(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # DeepSpeed insists on LOCAL_RANK, which only launchers set: a plain `python` run is rank 0.
    os.environ.setdefault("LOCAL_RANK", "0")
    groups.initialize_parallel(cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size)
    trainer, lock = None, None
    try:
        check_outputs(cfg, is_logger_rank(cfg))
        lock = guard_save_dir(cfg)
        trainer = Trainer(cfg, ds_config)
        trainer.train()
        if cfg.generate_tokens:
            trainer.generate_sample(cfg.generate_tokens)
        return 0
    except (ConfigError, CheckpointError, TrainingError, PreflightError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_DIVERGED if isinstance(e, DivergedError) else 1
    except Exception as e:  # data errors and friends carry a one-line message too
        from an_megatron.data import DataError

        if isinstance(e, DataError):
            from an_megatron.data.arguments import data_error_message

            print(f"error: {data_error_message(e)}", file=sys.stderr, flush=True)
            return 1
        raise
    finally:
        if trainer is not None:
            trainer.sink.close()
        if lock is not None:
            lock.release()
        groups.destroy_parallel()
