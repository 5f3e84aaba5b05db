"""The bad-input audit: every flag of the training entry point and of the tools outside its valid
range, and the files they name being missing, of the wrong kind or damaged.

One row per case: the command, its arguments, a substring of the expected message and the exit
status (2: an argument that cannot work, as argparse; 1: found at run time). Each row must end
with exactly one stderr line starting with ``error:`` that holds the message, no traceback, and
nothing written. Rows run in-process (the parsers refuse before anything starts) except the few
that need a real run (``RUN_ROWS``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32"]
TINY += ["--num-workers", "0", "--eval-iters", "1"]
MOCK = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "255"]
BATCH = ["--micro-batch-size", "2", "--global-batch-size", "4"]
RUN = ["--train-iters", "2", "--lr", "1e-3"]


NO_BATCH = "(no batch flags)"


def train_argv(*flags: str) -> list[str]:
    """A tiny run on mock data with `flags` added (each default group only if `flags` lacks it;
    NO_BATCH in `flags`: no batch sizes)."""
    argv = [*TINY, *(f for f in flags if f != NO_BATCH)]
    if "--data-path" not in flags and "--mock-data" not in flags:
        argv += MOCK
    if not {"--micro-batch-size", "--global-batch-size", NO_BATCH} & set(flags):
        argv += BATCH
    if "--train-iters" not in flags and "--lr" not in flags:
        argv += RUN
    return argv


def R(argv, message, code=2):
    return (argv, message, code)


# ---- the table ----------------------------------------------------------------------------------
# {in}: the directory of shared inputs (see `inputs`); {out}: the empty working directory of the row.

TRAIN = {
    # model
    "num-layers-0": R(["--num-layers", "0"], "argument --num-layers: expected an integer >= 1, got '0'"),
    "hidden-size-negative": R(["--hidden-size", "-64"], "argument --hidden-size: expected an integer >= 1"),
    "heads-0": R(["--num-attention-heads", "0"], "argument --num-attention-heads: expected an integer >= 1"),
    "ffn-0": R(["--ffn-hidden-size", "0"], "argument --ffn-hidden-size: expected an integer >= 1, got '0'"),
    "seq-length-0": R(["--seq-length", "0"], "argument --seq-length: expected an integer >= 1, got '0'"),
    "seq-length-text": R(["--seq-length", "long"], "argument --seq-length: expected an integer >= 1, got 'long'"),
    "odd-head-size": R(["--hidden-size", "60"], "head size 15 (hidden-size / num-attention-heads) must be even"),
    "hidden-not-divisible": R(["--hidden-size", "66", "--num-attention-heads", "4"], "hidden-size 66 is not divisible"),
    "tp-heads": R(["--tensor-model-parallel-size", "3"], "tensor-model-parallel-size 3 does not divide"),
    "tp-ffn": R(
        ["--ffn-hidden-size", "255", "--tensor-model-parallel-size", "2"],
        "tensor-model-parallel-size 2 does not divide ffn-hidden-size 255",
    ),
    "rotary-base-negative": R(["--rotary-base", "-1"], "argument --rotary-base: expected a finite number > 0"),
    "alpha-init-0": R(["--alpha-init", "0"], "argument --alpha-init: expected a finite number > 0, got '0'"),
    "init-std-0": R(["--init-method-std", "0"], "argument --init-method-std: expected a finite number > 0"),
    "scale-unknown": R(["--scale", "s_x=1"], "--scale 's_x=1': expected NAME=INIT[,SCALE] with NAME in alpha"),
    "scale-zero": R(["--scale", "s_qk=1,0"], "--scale 's_qk=1,0': expected NAME=INIT[,SCALE]"),
    "scale-no-value": R(["--scale", "s_qk"], "--scale 's_qk': expected NAME=INIT[,SCALE]"),
    "arch-unknown": R(["--arch", "gpt"], "argument --arch: invalid choice: 'gpt'"),
    "fp8-history-0": R(["--fp8-amax-history-len", "0"], "argument --fp8-amax-history-len: expected an integer >= 1"),
    "fp8-recipe-alone": R(["--fp8-recipe", "tensorwise"], "--fp8-recipe tensorwise has no effect without --fp8-format"),
    # activation recomputation
    "recompute-granularity-unknown": R(
        ["--recompute-granularity", "some"], "argument --recompute-granularity: invalid choice: 'some'"
    ),
    "recompute-full-no-method": R(
        ["--recompute-granularity", "full"], "--recompute-granularity full needs --recompute-method uniform or block"
    ),
    "recompute-method-unknown": R(["--recompute-method", "all"], "argument --recompute-method: invalid choice: 'all'"),
    "recompute-method-without-full": R(
        ["--recompute-method", "uniform"], "--recompute-method uniform needs --recompute-granularity full"
    ),
    "recompute-method-with-selective": R(
        ["--recompute-granularity", "selective", "--recompute-method", "block"],
        "--recompute-method block needs --recompute-granularity full",
    ),
    "recompute-num-layers-without-full": R(
        ["--recompute-num-layers", "1"], "--recompute-num-layers 1 needs --recompute-granularity full"
    ),
    "recompute-num-layers-0": R(
        ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "0"],
        "argument --recompute-num-layers: expected an integer >= 1, got '0'",
    ),
    "recompute-num-layers-above-layers": R(
        ["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "3"],
        "--recompute-num-layers 3 is more than --num-layers 2",
    ),
    "recompute-num-layers-above-stage": R(
        ["--pipeline-model-parallel-size", "2", "--recompute-granularity", "full", "--recompute-method", "block"]
        + ["--recompute-num-layers", "2"],
        "--recompute-num-layers 2 is more than 1, the blocks on the smallest pipeline stage",
    ),
    "recompute-activations-with-full": R(
        ["--recompute-activations", "--recompute-granularity", "full", "--recompute-method", "uniform"],
        "--recompute-activations means --recompute-granularity selective; it conflicts with --recompute-granularity "
        "full",
    ),
    # batch and schedule
    "micro-batch-0": R(["--micro-batch-size", "0", "--global-batch-size", "4"], "argument --micro-batch-size"),
    "global-batch-negative": R(["--micro-batch-size", "2", "--global-batch-size", "-4"], "argument --global-batch"),
    "global-not-divisible": R(
        ["--micro-batch-size", "4", "--global-batch-size", "6"],
        "--global-batch-size 6 is not divisible by --micro-batch-size 4 x data-parallel size 1",
    ),
    "no-batch-size": R([NO_BATCH, "--deepspeed_config", "{in}/ds_empty.json"], "no batch size: give --micro-batch"),
    "train-iters-0": R(["--train-iters", "0", "--lr", "1e-3"], "argument --train-iters: expected an integer >= 1"),
    "train-iters-missing": R(["--lr", "1e-3"], "the following arguments are required: --train-iters"),
    "lr-0": R(["--train-iters", "2", "--lr", "0"], "argument --lr: expected a finite number > 0, got '0'"),
    "lr-nan": R(["--train-iters", "2", "--lr", "nan"], "argument --lr: expected a finite number > 0, got 'nan'"),
    "min-lr-above-lr": R(["--min-lr", "0.1"], "--min-lr 0.1 is above --lr 0.001"),
    "min-lr-negative": R(["--min-lr", "-0.5"], "argument --min-lr: expected a finite number >= 0, got '-0.5'"),
    "decay-iters-0": R(["--lr-decay-iters", "0"], "argument --lr-decay-iters: expected an integer >= 1, got '0'"),
    "warmup-negative": R(["--lr-warmup-iters", "-1"], "argument --lr-warmup-iters: expected an integer >= 0"),
    "warmup-past-decay": R(["--lr-warmup-iters", "50"], "--lr-warmup-iters 50 is more than --lr-decay-iters 2"),
    "default-warmup-past-decay": R(
        ["--arch", "gptplus", "--train-iters", "100", "--lr", "1e-3", "--lr-decay-iters", "5"],
        "--lr-warmup-iters 10 (the default for --arch gptplus) is more than --lr-decay-iters 5",
    ),
    "decay-style-unknown": R(["--lr-decay-style", "exp"], "argument --lr-decay-style: invalid choice: 'exp'"),
    "wsd-iters-without-wsd": R(["--lr-wsd-decay-iters", "1"], "--lr-wsd-decay-iters needs --lr-decay-style wsd"),
    "wsd-iters-too-long": R(
        ["--lr-decay-style", "wsd", "--lr-wsd-decay-iters", "5"], "--lr-wsd-decay-iters 5 is more than the 2 iterations"
    ),
    "weight-decay-negative": R(["--weight-decay", "-0.1"], "argument --weight-decay: expected a finite number >= 0"),
    "clip-grad-negative": R(["--clip-grad", "-1"], "argument --clip-grad: expected a finite number >= 0"),
    "beta1-1": R(["--adam-beta1", "1"], "argument --adam-beta1: expected a finite number >= 0 and < 1, got '1'"),
    "beta2-negative": R(["--adam-beta2", "-0.5"], "argument --adam-beta2: expected a finite number >= 0 and < 1"),
    "adam-eps-0": R(["--adam-eps", "0"], "argument --adam-eps: expected a finite number > 0, got '0'"),
    "seed-negative": R(["--seed", "-1"], "argument --seed: expected an integer from 0 to 4294967295, got '-1'"),
    "max-nonfinite-0": R(["--max-nonfinite-steps", "0"], "argument --max-nonfinite-steps: expected an integer >= 1"),
    # parallelism
    "tp-0": R(["--tensor-model-parallel-size", "0"], "argument --tensor-model-parallel-size: expected an integer >= 1"),
    "pp-0": R(["--pipeline-model-parallel-size", "0"], "argument --pipeline-model-parallel-size: expected an"),
    "pp-above-layers": R(["--pipeline-model-parallel-size", "4"], "--pipeline-model-parallel-size 4 is more than"),
    "pp-world": R(["--pipeline-model-parallel-size", "2"], "world size 1 is not divisible by"),
    "sequence-parallel-seq-length": R(
        ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--seq-length", "33"],
        "--sequence-parallel: --seq-length 33 is not divisible by --tensor-model-parallel-size 2",
    ),
    "sequence-parallel-fp8-torch": R(
        ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--fp8-format", "e4m3", "--fp8-backend", "torch"],
        "--sequence-parallel with --fp8-backend torch: its linears do not support sequence parallelism",
    ),
    "sequence-parallel-te": R(
        ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--transformer-impl", "transformer_engine"],
        "--sequence-parallel with --transformer-impl transformer_engine: not supported",
    ),
    # checkpointing, evaluation, logging
    "save-interval-0": R(["--save-interval", "0"], "argument --save-interval: expected an integer >= 1, got '0'"),
    "save-interval-without-save": R(["--save-interval", "5"], "--save-interval needs --save DIR"),
    "overwrite-save-without-save": R(["--overwrite-save"], "--overwrite-save needs --save DIR"),
    "no-load-optim-without-load": R(["--no-load-optim"], "--no-load-optim needs --load DIR"),
    "exit-interval-0": R(["--exit-interval", "0"], "argument --exit-interval: expected an integer >= 1, got '0'"),
    "eval-interval-negative": R(["--eval-interval", "-1"], "argument --eval-interval: expected an integer >= 0"),
    "eval-iters-negative": R(["--eval-iters", "-1"], "argument --eval-iters: expected an integer >= 0, got '-1'"),
    "log-interval-0": R(["--log-interval", "0"], "argument --log-interval: expected an integer >= 1, got '0'"),
    "peak-tflops-0": R(["--peak-tflops", "0"], "argument --peak-tflops: expected a finite number > 0, got '0'"),
    "generate-negative": R(["--generate-tokens", "-5"], "argument --generate-tokens: expected an integer >= 0"),
    "save-under-file": R(["--save", "{in}/text.txt/ck"], "argument --save: {in}/text.txt/ck: {in}/text.txt is not a"),
    "save-is-file": R(["--save", "{in}/text.txt"], "argument --save: {in}/text.txt is a file, expected a directory"),
    "metrics-file-directory": R(["--metrics-file", "{in}"], "argument --metrics-file: {in} is a directory"),
    "metrics-file-under-file": R(["--metrics-file", "{in}/text.txt/m.jsonl"], "{in}/text.txt is not a directory"),
    "tensorboard-dir-file": R(["--tensorboard-dir", "{in}/text.txt"], "argument --tensorboard-dir: {in}/text.txt is"),
    "unknown-flag": R(["--learning-rate", "1"], "unrecognized arguments: --learning-rate 1"),
    # ds.json
    "ds-missing": R(["--deepspeed_config", "{in}/none.json"], "--deepspeed_config {in}/none.json: no such file"),
    "ds-directory": R(["--deepspeed_config", "{in}"], "--deepspeed_config {in}: a directory"),
    "ds-not-json": R(["--deepspeed_config", "{in}/text.txt"], "--deepspeed_config {in}/text.txt: not valid JSON"),
    "ds-not-object": R(["--deepspeed_config", "{in}/ds_list.json"], "expected a JSON object, got list"),
    "ds-micro-0": R(["--deepspeed_config", "{in}/ds_micro0.json"], "train_micro_batch_size_per_gpu 0 must be an"),
    "ds-bf16-not-object": R(["--deepspeed_config", "{in}/ds_bf16_true.json"], "bf16 True must be a JSON object"),
    "ds-zero-stage-5": R(["--deepspeed_config", "{in}/ds_stage5.json"], "zero_optimization stage 5 must be 0, 1, 2"),
    "ds-accumulation-above-global": R(
        ["--deepspeed_config", "{in}/ds_accum4.json", "--global-batch-size", "2"],
        "--global-batch-size 2 is less than ds.json gradient_accumulation_steps 4 x data-parallel size 1",
    ),
    # data and tokenizer
    "no-data": R(["--tokenizer-type", "NullTokenizer", "--vocab-size", "255", "--data-path"], "no training data"),
    "no-tokenizer": R(["--data-path", "{in}/corpus_text_document"], "--tokenizer-type is required"),
    "tokenizer-unknown": R(["--tokenizer-type", "BPE"], "argument --tokenizer-type: invalid choice: 'BPE'"),
    "vocab-size-0": R(["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "0"], "argument --vocab-s"),
    "vocab-divisible-0": R(["--make-vocab-size-divisible-by", "0"], "argument --make-vocab-size-divisible-by"),
    "num-workers-negative": R(["--num-workers", "-1"], "argument --num-workers: expected an integer >= 0"),
    "split-text": R(["--split", "a,b,c"], "argument --split: expected train,valid,test proportions"),
    "split-four": R(["--split", "90,5,3,2"], "got '90,5,3,2'"),
    "split-zero-sum": R(["--split", "0,0,0"], "got '0,0,0'"),
    "blend-odd": R(
        ["--data-path", "0.5", "{in}/a", "0.5", "--tokenizer-type", "NullTokenizer", "--vocab-size", "100"],
        "expected one or more prefixes, or pairs 'weight prefix weight prefix ...'",
    ),
    "blend-zero-weights": R(
        ["--data-path", "0", "{in}/a", "0", "{in}/b", "--tokenizer-type", "NullTokenizer", "--vocab-size", "100"],
        "--data-path weights [0.0, 0.0]: must be >= 0 with a positive sum",
    ),
    "data-cache-file": R(["--data-cache-path", "{in}/text.txt"], "argument --data-cache-path: {in}/text.txt is a file"),
}

PREPROCESS = {
    "workers-0": R(["--workers", "0"], "argument --workers: expected an integer >= 1, got '0'"),
    "log-interval-0": R(["--log-interval", "0"], "argument --log-interval: expected an integer >= 1"),
    "partitions-0": R(["--partitions", "0"], "argument --partitions: expected an integer >= 1"),
    "vocab-size-0": R(["--vocab-size", "0"], "argument --vocab-size: expected an integer >= 1, got '0'"),
    "output-under-file": R(["--output-prefix", "{in}/text.txt/x"], "{in}/text.txt is not a directory"),
    "no-json-keys": R(["--json-keys"], "argument --json-keys: expected at least one argument"),
    "tokenizer-unknown": R(["--tokenizer-type", "Words"], "argument --tokenizer-type: invalid choice: 'Words'"),
    "missing-input": R(
        ["--input", "{in}/none.jsonl", "--vocab-size", "100"], "--input {in}/none.jsonl: no such file", 1
    ),
    "no-vocab-size": R(["--tokenizer-type", "NullTokenizer"], "--tokenizer-type NullTokenizer needs --vocab-size", 1),
    "no-model": R(["--tokenizer-type", "SentencePieceTokenizer"], "--tokenizer-model is required", 1),
    "model-missing": R(
        ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", "{in}/none.model"],
        "--tokenizer-model {in}/none.model: no such file",
        1,
    ),
    "model-not-sentencepiece": R(
        ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", "{in}/text.txt"],
        "--tokenizer-model {in}/text.txt: not a SentencePiece model",
        1,
    ),
    "hf-folder-without-json": R(
        ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", "{in}/empty"], "no tokenizer.json there", 1
    ),
    "gpt2-without-vocab": R(["--tokenizer-type", "GPT2BPETokenizer"], "--vocab-file is required", 1),
}
PREPROCESS_BASE = ["--input", "{in}/ids.jsonl", "--tokenizer-type", "NullTokenizer", "--output-prefix", "{out}/c"]

TOKENIZER = {
    "vocab-size-0": R(["--vocab-size", "0"], "argument --vocab-size: expected an integer >= 1, got '0'"),
    "vocab-size-small": R(["--vocab-size", "100"], "--vocab-size 100: too small", 1),
    "sample-0": R(["--sample-sentences", "0"], "argument --sample-sentences: expected an integer >= 1, got '0'"),
    "max-length-5": R(["--max-sentence-length", "5"], "argument --max-sentence-length: expected an integer >= 10"),
    "coverage-low": R(["--character-coverage", "0.5"], "argument --character-coverage: expected a finite number >="),
    "coverage-high": R(["--character-coverage", "1.5"], "expected a finite number >= 0.98 and <= 1, got '1.5'"),
    "threads-0": R(["--num-threads", "0"], "argument --num-threads: expected an integer >= 1, got '0'"),
    "missing-input": R(["--input", "{in}/none.txt"], "--input {in}/none.txt: no such file", 1),
    "output-under-file": R(["--output-prefix", "{in}/text.txt/tok"], "{in}/text.txt is not a directory"),
    "no-vocab-size": R(["--vocab-size"], "argument --vocab-size: expected one argument"),
}
TOKENIZER_BASE = ["--input", "{in}/words.txt", "--vocab-size", "300", "--output-prefix", "{out}/tok"]

MERGE = {
    "missing-input": R(["--input", "{in}/none"], "{in}/none", 1),
    "output-under-file": R(["--input", "{in}/corpus_text_document", "--output-prefix", "{in}/text.txt/m"], "not a dir"),
}
MERGE_BASE = ["--input", "{in}/corpus_text_document", "--output-prefix", "{out}/merged"]

MEASURE = {
    "num-layers-0": R(["--num-layers", "0"], "argument --num-layers: expected an integer >= 1, got '0'"),
    "vocab-size-0": R(["--vocab-size", "0"], "argument --vocab-size: expected an integer >= 1, got '0'"),
    "micro-batch-0": R(["--micro-batch-size", "0"], "argument --micro-batch-size: expected an integer >= 1"),
    "seq-length-0": R(["--seq-length", "0"], "argument --seq-length: expected an integer >= 1, got '0'"),
    "heads-not-dividing": R(["--num-attention-heads", "3"], "hidden-size 64 is not divisible by num-attention-heads 3"),
    "fp8-without-te": R(["--fp8-format", "e4m3"], "--fp8-backend te needs --transformer-impl transformer_engine"),
    "scale-zero": R(["--scale", "s_u=1,0"], "--scale 's_u=1,0': expected NAME=INIT[,SCALE]"),
    "nu-att-without-load": R(["--with-nu-att", "exact"], "--with-nu-att exact needs --load"),
    "data-missing": R(["--data-path", "{in}/none"], "--data-path: indexed dataset '{in}/none': missing", 1),
    "data-too-short": R(["--data-path", "{in}/corpus_text_document"], "corpus has 300 tokens, need 512", 1),
    "data-beyond-vocab": R(
        ["--data-path", "{in}/corpus_text_document", "--seq-length", "8", "--vocab-size", "5"], ">= --vocab-size 5", 1
    ),
    "load-missing": R(["--load", "{in}/none.pt"], "{in}/none.pt: missing", 1),
    "load-not-torch": R(["--load", "{in}/text.txt"], "{in}/text.txt:", 1),
    "load-not-checkpoint-dir": R(["--load", "{in}/empty"], "--load {in}/empty: no 'latest' file", 1),
}
MEASURE_BASE = ["--num-layers", "1", "--hidden-size", "64", "--seq-length", "128", "--vocab-size", "100"]

CONVERT = {
    "no-command": R([], "the following arguments are required: command"),
    "unknown-command": R(["merge"], "argument command: invalid choice: 'merge'"),
    "consolidate-no-output": R(["consolidate", "--load", "{in}/ckpt"], "the following arguments are required: --out"),
    "consolidate-missing": R(["consolidate", "--load", "{in}/none", "--output", "{out}/m.pt"], "no such directory", 1),
    "consolidate-output-dir": R(["consolidate", "--load", "{in}/ckpt", "--output", "{out}"], "{out} is a directory"),
    "consolidate-tag-missing": R(
        ["consolidate", "--load", "{in}/ckpt", "--tag", "iter_0000099", "--output", "{out}/m.pt"],
        "--tag iter_0000099",
        1,
    ),
    "consolidate-damaged-meta": R(
        ["consolidate", "--load", "{in}/ckpt_bad_meta", "--output", "{out}/m.pt"], "an_megatron.json is not valid", 1
    ),
    "consolidate-truncated": R(
        ["consolidate", "--load", "{in}/ckpt_truncated", "--output", "{out}/m.pt"], "mp_rank_00_model_states.pt", 1
    ),
    "reshard-missing-input": R(["reshard", "--input", "{in}/none.pt", "--save", "{out}/s"], "{in}/none.pt: missing", 1),
    "reshard-not-torch": R(["reshard", "--input", "{in}/text.txt", "--save", "{out}/s"], "{in}/text.txt:", 1),
    "reshard-tp-0": R(
        ["reshard", "--input", "{in}/ckpt", "--save", "{out}/s", "--target-tensor-model-parallel-size", "0"],
        "argument --target-tensor-model-parallel-size: expected an integer >= 1, got '0'",
    ),
    "reshard-pp-negative": R(
        ["reshard", "--input", "{in}/ckpt", "--save", "{out}/s", "--target-pipeline-model-parallel-size", "-1"],
        "argument --target-pipeline-model-parallel-size: expected an integer >= 1, got '-1'",
    ),
    "reshard-tp-heads": R(
        ["reshard", "--input", "{in}/ckpt", "--save", "{out}/s", "--target-tensor-model-parallel-size", "3"],
        "--target-tensor-model-parallel-size 3: tensor-model-parallel-size 3 does not divide num-attention-heads 4",
        1,
    ),
    "reshard-pp-layers": R(
        ["reshard", "--input", "{in}/ckpt", "--save", "{out}/s", "--target-pipeline-model-parallel-size", "3"],
        "--target-pipeline-model-parallel-size 3: must be 1..2",
        1,
    ),
    "reshard-save-file": R(["reshard", "--input", "{in}/ckpt", "--save", "{in}/text.txt"], "{in}/text.txt is a file"),
}

PLOT = {
    "missing": R(["{in}/none.jsonl", "--output", "{out}/p.png"], "{in}/none.jsonl: no such file"),
    "no-output": R(["{in}/metrics.jsonl"], "the following arguments are required: --output"),
    "output-dir": R(["{in}/metrics.jsonl", "--output", "{out}"], "argument --output: {out} is a directory"),
    "output-format": R(["{in}/metrics.jsonl", "--output", "{out}/p.xyz"], "--output {out}/p.xyz: expected an image"),
    "labels-count": R(["{in}/metrics.jsonl", "--labels", "a", "b", "--output", "{out}/p.png"], "--labels has 2"),
    "not-json": R(["{in}/text.txt", "--output", "{out}/p.png"], "{in}/text.txt:1: not a JSON record", 1),
    "not-records": R(["{in}/list.jsonl", "--output", "{out}/p.png"], "{in}/list.jsonl:1: not a metrics record", 1),
    "no-eval": R(["{in}/train_only.jsonl", "--output", "{out}/p.png"], "no evaluation records (val_loss)", 1),
    "loss-not-number": R(["{in}/bad_loss.jsonl", "--output", "{out}/p.png"], "no number under val_loss", 1),
}

ROWS = [
    *(("pretrain", k, train_argv(*v[0]), *v[1:]) for k, v in TRAIN.items()),
    *(("preprocess_data", k, PREPROCESS_BASE + v[0], *v[1:]) for k, v in PREPROCESS.items()),
    *(("train_tokenizer", k, TOKENIZER_BASE + v[0], *v[1:]) for k, v in TOKENIZER.items()),
    *(("merge_datasets", k, MERGE_BASE + v[0], *v[1:]) for k, v in MERGE.items()),
    *(("measure_norms", k, MEASURE_BASE + v[0], *v[1:]) for k, v in MEASURE.items()),
    *(("convert_checkpoint", k, *v) for k, v in CONVERT.items()),
    *(("plot_runs", k, *v) for k, v in PLOT.items()),
]


# ---- inputs ---------------------------------------------------------------------------------------


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _train(argv, nproc=1, timeout=300):
    launcher = ["torchrun", "--nproc_per_node", str(nproc)] if nproc > 1 else [sys.executable]
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run(
        [*launcher, os.path.join(ROOT, "examples", "pretrain_angpt.py"), *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
    )


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Shared inputs, read-only for the rows: text, corpora, metrics, ds.json files, and a ZeRO-1
    checkpoint of a 2-process (data-parallel size 2) run with damaged copies."""
    d = tmp_path_factory.mktemp("inputs")
    (d / "empty").mkdir()
    (d / "text.txt").write_text("not json\n")
    (d / "ids.jsonl").write_text("".join(json.dumps({"text": " ".join(["7"] * 30)}) + "\n" for _ in range(10)))
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    (d / "words.txt").write_text("".join(" ".join(words[(i + j) % 8] for j in range(10)) + "\n" for i in range(200)))
    (d / "list.jsonl").write_text("[1, 2]\n")
    (d / "metrics.jsonl").write_text(json.dumps({"iteration": 1, "val_loss": 2.0, "val_ppl": 7.4}) + "\n")
    (d / "train_only.jsonl").write_text(
        json.dumps({"iteration": 1, "lm_loss": 2.0, "step_time_s": 1.0, "consumed_tokens": 64}) + "\n"
    )
    (d / "bad_loss.jsonl").write_text(json.dumps({"iteration": 1, "val_loss": "low"}) + "\n")
    for name, ds in {
        "ds_empty": {},
        "ds_list": [1],
        "ds_micro0": {"train_micro_batch_size_per_gpu": 0},
        "ds_stage5": {"zero_optimization": {"stage": 5}},
        "ds_bf16_true": {"bf16": True},
        "ds_accum4": {"gradient_accumulation_steps": 4},
    }.items():
        (d / f"{name}.json").write_text(json.dumps(ds))
    from an_megatron.data.preprocess import preprocess

    null = argparse.Namespace(tokenizer_type="NullTokenizer", vocab_size=100)
    preprocess([str(d / "ids.jsonl")], ["text"], null, str(d / "corpus"), append_eod=False, workers=1)

    ckpt = d / "ckpt"
    flags = ["--deepspeed_config", "examples/ds.json", "--save", str(ckpt), "--eval-interval", "0"]
    out = _train(train_argv(*flags), nproc=2)
    assert out.returncode == 0, out.stderr[-3000:]
    shutil.copytree(ckpt, d / "ckpt_truncated")
    states = d / "ckpt_truncated" / "iter_0000002" / "mp_rank_00_model_states.pt"
    os.truncate(states, os.path.getsize(states) // 2)
    shutil.copytree(ckpt, d / "ckpt_bad_meta")
    meta = d / "ckpt_bad_meta" / "iter_0000002" / "an_megatron.json"
    meta.write_text(meta.read_text()[:20])
    return d


def _files(*dirs) -> dict:
    return {
        os.path.join(root, name): os.path.getsize(os.path.join(root, name))
        for d in dirs
        for root, subdirs, names in os.walk(d)
        for name in names + subdirs
        if os.path.exists(os.path.join(root, name))
    }


def _run_in_process(command: str, argv: list[str], capfd) -> tuple[int, str]:
    """`command` as its console entry runs it; (exit status, stderr)."""
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        if command == "pretrain":
            from an_megatron.training.pretrain import pretrain

            code = pretrain(argv)
        elif command in ("preprocess_data", "train_tokenizer", "merge_datasets"):
            from an_megatron.data.cli import run_tool

            code = run_tool(_tool(command).main, argv)
        else:
            code = _tool(command).main(argv)
    except SystemExit as e:  # what the interpreter does with it at exit
        code = e.code
        if isinstance(code, str):
            print(code, file=sys.stderr)
            code = 1
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    return code, capfd.readouterr().err


def _check(code, err, want_code, message, before, after):
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert "Traceback" not in err, err[-3000:]
    assert len(errors) == 1, err[-3000:]
    assert message in errors[0], errors[0]
    assert code == want_code, (code, errors[0])
    assert after == before, sorted(after.keys() ^ before.keys())  # nothing written, nothing removed


@pytest.mark.timeout(300)
@pytest.mark.parametrize("command, case, argv, message, code", ROWS, ids=[f"{r[0]}:{r[1]}" for r in ROWS])
def test_bad_input_is_one_line_and_writes_nothing(
    command, case, argv, message, code, inputs, tmp_path, capfd, monkeypatch
):
    out = tmp_path / "out"
    out.mkdir()
    subs = {"in": str(inputs), "out": str(out)}
    argv = [a.format(**subs) for a in argv]
    before = _files(inputs, tmp_path)
    monkeypatch.chdir(tmp_path)
    got, err = _run_in_process(command, argv, capfd)
    _check(got, err, code, message.format(**subs), before, _files(inputs, tmp_path))


# Found once DeepSpeed has started: a real (one-process) run each.
RUN_ROWS = {
    "load-other-data-parallel-size": R(
        ["--load", "{in}/ckpt"],
        "--load {in}/ckpt: iter_0000002 was saved with data-parallel size 2 (ZeRO partitions its optimizer state 2 "
        "ways), this run has 1: launch 2 x TP x PP processes to resume exactly, or add --no-load-optim",
        1,
    ),
    "load-truncated-file": R(
        ["--load", "{in}/ckpt_truncated"],
        "--load {in}/ckpt_truncated: {in}/ckpt_truncated/iter_0000002/mp_rank_00_model_states.pt is damaged",
        1,
    ),
    "load-damaged-meta": R(["--load", "{in}/ckpt_bad_meta"], "an_megatron.json is not valid JSON", 1),
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", RUN_ROWS)
def test_bad_checkpoint_is_one_line_and_writes_nothing(case, inputs, tmp_path):
    argv, message, code = RUN_ROWS[case]
    subs = {"in": str(inputs)}
    argv = [a.format(**subs) for a in argv]
    before = _files(inputs)
    out = _train(train_argv("--deepspeed_config", "examples/ds.json", *argv, "--train-iters", "4", "--lr", "1e-3"))
    _check(out.returncode, out.stderr, code, message.format(**subs), before, _files(inputs))


def test_the_table_covers_every_command():
    commands = {row[0] for row in ROWS}
    assert commands == {
        "pretrain",
        "preprocess_data",
        "train_tokenizer",
        "merge_datasets",
        "measure_norms",
        "convert_checkpoint",
        "plot_runs",
    }
    assert len(ROWS) + len(RUN_ROWS) >= 100
