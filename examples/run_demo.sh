#!/usr/bin/env bash
# The demo: train a tokenizer on the bundled corpus, preprocess it, train a small anGPT with the
# deepspeed launcher on 2 processes (GPUs if there are 2, else CPU processes on gloo), evaluate,
# save, and print a generated sample. A few minutes on a 2-core CPU.
#
#   bash examples/run_demo.sh [extra pretrain flags...]     (output in $OUT, default demo_out/)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-demo_out}
ITERS=${ITERS:-300}
mkdir -p "$OUT"

python tools/train_tokenizer.py --input examples/data/kjv.jsonl.gz --json-keys text \
    --vocab-size 4000 --output-prefix "$OUT/tok"
python tools/preprocess_data.py --input examples/data/kjv.jsonl.gz --json-keys text \
    --tokenizer-type SentencePieceTokenizer --tokenizer-model "$OUT/tok.model" \
    --output-prefix "$OUT/kjv" --append-eod --workers 2

# bf16 with ZeRO-1 on GPUs; fp32 with ZeRO-1 on CPU (bf16 matmuls are slow on most CPUs).
if python -c "import sys, torch; sys.exit(0 if torch.cuda.device_count() >= 2 else 1)"; then
    DS_CONFIG=examples/ds.json; PRECISION=--bf16
else
    DS_CONFIG=examples/ds_fp32.json; PRECISION=
fi

deepspeed --num_gpus 2 examples/pretrain_angpt.py --deepspeed_config "$DS_CONFIG" $PRECISION \
    --arch angpt --num-layers 4 --hidden-size 128 --num-attention-heads 4 --seq-length 128 \
    --micro-batch-size 8 --global-batch-size 16 --train-iters "$ITERS" --lr 3e-3 --clip-grad 0 \
    --data-path "$OUT/kjv_text_document" --split 98,2,0 --num-workers 0 \
    --tokenizer-type SentencePieceTokenizer --tokenizer-model "$OUT/tok.model" \
    --save "$OUT/ckpt" --save-interval 100 --eval-interval 100 --eval-iters 5 --log-interval 20 \
    --metrics-file "$OUT/metrics.jsonl" --generate-tokens 60 "$@"
