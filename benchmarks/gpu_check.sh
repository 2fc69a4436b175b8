#!/usr/bin/env bash
# The GPU figures of benchmarks/RESULTS.md in one run, on a machine with a CUDA GPU, PyTorch, Triton
# and this project installed (pip install -e '.[dev]'):
#   1. the kernel and fast-path tests on the real GPU (on CPU they run under TRITON_INTERPRET=1),
#   2. each kernel's check() and micro-benchmark (python -m blip3v.kernels.NAME),
#   3. bench decode: full-depth Phi-3-mini (random weights) fp16 and INT4 on the torch backend's
#      static-KV + CUDA-graph decoder beside transformers' eager generate, with bandwidth floors,
#   4. bench budget: the released sizes (SigLIP so400m, 8 frames) per token budget, fp16, and the
#      visual path in one call beside its compute floor.
# Logs and JSON go to OUT_DIR; sections of benchmarks/RESULTS.md are rewritten in place.
#
#   benchmarks/gpu_check.sh OUT_DIR
set -u
out=${1:?usage: benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,temperature.gpu,power.draw \
    --format=csv > "$out/gpu.txt" 2>&1
cat "$out/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_fast_decode.py > "$out/pytest.log" 2>&1
echo "tests on the GPU: rc $? ($(tail -n 1 "$out/pytest.log"))"
for k in int4_matmul decode_attention rmsnorm token_learner; do
    echo "== $k"; python3 -m "blip3v.kernels.$k"
done > "$out/kernels.log" 2>&1
echo "kernel checks + micro-benchmarks: rc $? (kernels.log)"
blip3v bench decode --device cuda --backend torch --layers 32 --precision fp16,int4 --new-tokens 128 \
    --repeats 5 --profile --quiet --results benchmarks/RESULTS.md --json > "$out/decode.json" 2> "$out/decode.log"
echo "bench decode: rc $?"
blip3v bench budget --model real --layers 32 --device cuda --repeats 5 --quiet \
    --results benchmarks/RESULTS.md --json > "$out/budget.json" 2> "$out/budget.log"
echo "bench budget: rc $?"
cp benchmarks/RESULTS.md "$out/RESULTS.md"
