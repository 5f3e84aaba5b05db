#!/usr/bin/env bash
# The GPU check, in one call on a lent GPU machine (see docs/FP8.md and README "Tests"):
#   1. install the carried wheels (the machine has no network) into /tmp/site;
#   2. run the GPU tests of tests/test_fp8.py;
#   3. run the suite's single-GPU part on the GPU (AN_MEGATRON_TEST_DEVICE=cuda): the
#      single-process equivalence tests, the device switch's own tests, the gpu-marked tests;
#      with one GPU the 2-rank tests among them are skipped, each with the reason;
#   4. benchmark bf16 against FP8 for anGPT and GPT+ at d=2048 (benchmarks/fp8_bench.py).
# Ends with a table of the stages and the benchmark table. Logs and JSON go to $OUT (or
# /tmp/fp8_check without it). Meant to finish inside 10 minutes on an H100: each stage has its
# own timeout.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fp8_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
if ls wheels/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site wheels/*.whl \
        || { echo "gpu_check: installing wheels/ failed"; exit 1; }
    export PYTHONPATH=/tmp/site:$PWD
else
    echo "gpu_check: no wheels/ folder; using what is installed (docs/FP8.md says how to carry it)"
    export PYTHONPATH=$PWD
fi
"$PY" - <<'PYEOF' || { echo "gpu_check: environment check failed"; exit 1; }
import torch, deepspeed, megatron.core
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}) on {torch.cuda.get_device_name()}, "
      f"deepspeed {deepspeed.__version__}, megatron-core {megatron.core.__version__}")
a = torch.randn(64, 64, device="cuda").to(torch.float8_e4m3fn)
one = torch.tensor(1.0, device="cuda")
torch._scaled_mm(a, a.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
print("torch._scaled_mm runs on this GPU")
PYEOF

timeout 180 "$PY" -m pytest -q -m gpu -rs -p no:cacheprovider tests/test_fp8.py 2>&1 | tee "$OUT/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}

AN_MEGATRON_TEST_DEVICE=cuda timeout 200 "$PY" -m pytest -q -rs -p no:cacheprovider \
    tests/test_model.py tests/test_reference.py tests/test_document_masking.py tests/test_norm_bound.py \
    tests/test_device_switch.py tests/test_gpu_bf16.py 2>&1 | tee "$OUT/suite_on_gpu.log"
suite_rc=${PIPESTATUS[0]}

timeout 200 "$PY" benchmarks/fp8_bench.py --json "$OUT/fp8_bench.json" 2>&1 | tee "$OUT/fp8_bench.log"
bench_rc=${PIPESTATUS[0]}

echo
echo "| stage | exit | result |"
echo "|---|---|---|"
echo "| FP8 GPU tests | $tests_rc | $(tail -n 1 "$OUT/gpu_tests.log") |"
echo "| suite on the GPU | $suite_rc | $(tail -n 1 "$OUT/suite_on_gpu.log") |"
echo "| FP8 benchmark | $bench_rc | see below |"
echo
sed -n '/^| arch /,$p' "$OUT/fp8_bench.log"
[ "$tests_rc" -eq 0 ] && [ "$suite_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
