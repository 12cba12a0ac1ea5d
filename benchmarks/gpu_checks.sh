#!/usr/bin/env bash
# The checks that need a CUDA GPU, as one script (run from the repository root on a GPU machine with torch):
#   bash benchmarks/gpu_checks.sh OUT_DIR [STORIES260K_DIR]
# 1. the GPU tests (fla's RWKV-7 kernels and arwkv's chunked kernel on CUDA vs the fp64 reference),
# 2. distillation throughput for SmolLM2-135M's shape in bf16 (benchmarks/distill_throughput.py),
# 3. the stories260K recipe end to end on the GPU, unchanged except processes=1 and the teacher path,
# 4. the WKV kernels vs flash attention (benchmarks/wkv_cuda.py).
# Each step has its own time limit, so one hang does not cost the others.
set -u
out=${1:?output directory}
stories=${2:-../shared/assets/llama2c-stories260K}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu_tests.txt"
python3 -c "import torch, transformers, fla; print('torch', torch.__version__, 'transformers', transformers.__version__, 'fla', fla.__version__)" | tee -a "$out/gpu_tests.txt"
TRITON_F32_DEFAULT=ieee timeout 180 python3 -m pytest -q -p no:cacheprovider -m gpu \
  tests/ops/test_wkv7_fla.py tests/ops/test_wkv6_fla.py tests/interop/test_rwkv_hybrid.py 2>&1 | tail -25 | tee -a "$out/gpu_tests.txt"
timeout 100 python3 benchmarks/distill_throughput.py --device cuda --bf16 --seq-len 2048 --batch 16 \
  --steps 5 --warmup 2 --json "$out/distill_throughput.json" 2>&1 | tail -12 | tee "$out/distill_throughput.txt"
timeout 180 python3 -m arwkv convert --recipe stories260k processes=1 device=cuda \
  teacher.path="$stories/stories260K.bin" out_dir=/tmp/gpu_stories/run > "$out/stories260k.log" 2>&1
tail -5 "$out/stories260k.log"
cp /tmp/gpu_stories/run/report.md "$out/stories260k_report.md" 2>/dev/null
cp /tmp/gpu_stories/run/summary.json "$out/stories260k_summary.json" 2>/dev/null
timeout 110 python3 benchmarks/wkv_cuda.py --json "$out/wkv_cuda.json" 2>&1 | tail -10 | tee "$out/wkv_cuda.txt"
