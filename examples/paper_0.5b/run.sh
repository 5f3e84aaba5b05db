#!/usr/bin/env bash
# The paper's 0.5B comparison on one GPU node: GPT+, nGPT and anGPT, one after the other, with
# the same data, tokenizer, batch and token budget. See examples/paper_0.5b/README.md.
#
#   DATA=/data/slimpajama_text_document bash examples/paper_0.5b/run.sh [ARCH ...]
#
# ARCH: gptplus ngpt angpt (default: all three). Settings come from the environment:
#   DATA        preprocessed prefix (tools/preprocess_data.py output, GPT-NeoX tokenizer)   required
#   TOKENIZER   GPT-NeoX-20B's tokenizer.json, or the folder holding it      default gpt-neox-20b/
#   GPUS        GPUs on the node                                           default: all visible ones
#   TOKENS      training tokens per run                                            default 10000000000
#   GLOBAL_BATCH sequences per step (of SEQ tokens)                                        default 512
#   MICRO       sequences per GPU per micro-step                                              default 8
#   LR_GPTPLUS LR_NGPT LR_ANGPT   peak learning rates               default 1.5e-3 / 3e-3 / 3e-3
#   WARMUP_NGPT WARMUP_ANGPT      linear warm-up iterations         default none (the paper's setting)
#   OUT         output root (checkpoints, metrics)                              default runs/paper_0.5b
#   PRINT_ARGS=1  print each run's pretrain_angpt.py flags (one run per line) and exit
#   ESTIMATE=1    print parameters, FLOPs and the expected hours per run on H100/H200, and exit
set -euo pipefail
cd "$(dirname "$0")/../.."

ARCHS=("$@")
[ ${#ARCHS[@]} -eq 0 ] && ARCHS=(gptplus ngpt angpt)
SEQ=2048
GLOBAL_BATCH=${GLOBAL_BATCH:-512}
MICRO=${MICRO:-8}
TOKENS=${TOKENS:-10000000000}
ITERS=$(( TOKENS / (GLOBAL_BATCH * SEQ) ))
OUT=${OUT:-runs/paper_0.5b}
TOKENIZER=${TOKENIZER:-gpt-neox-20b/}

warmup_flag() {
    local iters=""
    case "$1" in
        ngpt) iters=${WARMUP_NGPT:-} ;;
        angpt) iters=${WARMUP_ANGPT:-} ;;
    esac
    if [ -n "$iters" ]; then echo --lr-warmup-iters "$iters"; fi
}

lr_for() {
    case "$1" in
        gptplus) echo "${LR_GPTPLUS:-1.5e-3}" ;;
        ngpt) echo "${LR_NGPT:-3e-3}" ;;
        angpt) echo "${LR_ANGPT:-3e-3}" ;;
    esac
}
for arch in "${ARCHS[@]}"; do
    case "$arch" in
        gptplus | ngpt | angpt) ;;
        *) echo "error: unknown architecture: $arch (gptplus, ngpt or angpt)" >&2; exit 2 ;;
    esac
done

# 24 layers, d=1024, 16 heads of 64, SwiGLU with f=4096, RoPE, context 2048: 0.50B parameters
# with GPT-NeoX's vocabulary (50277, padded to 50304). Cosine decay to 0;
# GPT+ gets AdamW with weight decay 0.1 and 10% warm-up (its defaults), nGPT and anGPT neither
# unless WARMUP_NGPT / WARMUP_ANGPT say so.
# An interrupted run resumes from its newest checkpoint when relaunched.
resume_flag() {
    if [ -f "$OUT/$1/ckpt/latest" ]; then echo --load "$OUT/$1/ckpt"; fi
}

flags_for() {
    local arch=$1
    echo --deepspeed_config examples/paper_0.5b/ds_bf16_zero1.json --bf16 \
        --arch "$arch" --num-layers 24 --hidden-size 1024 --num-attention-heads 16 \
        --ffn-hidden-size 4096 --seq-length "$SEQ" \
        --micro-batch-size "$MICRO" --global-batch-size "$GLOBAL_BATCH" \
        --train-iters "$ITERS" --lr "$(lr_for "$arch")" --lr-decay-style cosine $(warmup_flag "$arch") \
        --data-path "${DATA:-DATA_PREFIX}" --split 998,2,0 --num-workers 2 \
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER" \
        --save "$OUT/$arch/ckpt" --save-interval 1000 $(resume_flag "$arch") \
        --eval-interval 500 --eval-iters 20 --log-interval 10 \
        --metrics-file "$OUT/$arch/metrics.jsonl"
}

if [ "${PRINT_ARGS:-0}" = 1 ]; then
    for arch in "${ARCHS[@]}"; do flags_for "$arch"; done
    exit 0
fi
if [ "${ESTIMATE:-0}" = 1 ]; then
    GPUS=${GPUS:-8}
    # shellcheck disable=SC2046
    python examples/paper_0.5b/estimate.py --gpus "$GPUS" -- $(flags_for angpt)
    exit 0
fi
if [ -z "${DATA:-}" ]; then
    echo "error: DATA is not set: give the preprocessed prefix, e.g. DATA=/data/slimpajama_text_document" >&2
    exit 2
fi
GPUS=${GPUS:-$(python -c "import torch; print(torch.cuda.device_count())")}
for arch in "${ARCHS[@]}"; do
    mkdir -p "$OUT/$arch"
    # shellcheck disable=SC2046
    deepspeed --num_gpus "$GPUS" examples/pretrain_angpt.py $(flags_for "$arch") 2>&1 | tee -a "$OUT/$arch/log.txt"
done
