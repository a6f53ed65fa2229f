#!/usr/bin/env bash
# Every GPU check of modelcode's decoding in one call, for a lent GPU whose time is short (about 8 minutes on an
# H100 or H200; a llama-3-8b shape compiles in under a minute there):
#   1. the tests that need CUDA (compiled greedy equals eager; the Triton kernels against the plain computation;
#      the bench's GPU time per step), which skip on CPU;
#   2. `modelcode bench` on a llama-3-8b shape (random weights), compiled, batch 1 and 16, prompt 128, 128 new
#      tokens, in bfloat16, int8 and int4 (group 32, head int8): tok/s, % of the roofline the bench measures,
#      and the GPU's time per step beside the wall time (a host gap shows as their difference).
# The JSON results go to $OUT (default bench-out/); the last lines printed are the summary.
#
#     bash benchmarks/gpu.sh
set -u
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"

timeout 180 python -m pytest -q -p no:warnings -x -k "cuda or gpu or triton" tests 2>&1 | tail -20 | tee "$OUT/tests.txt"

for mode in bf16 int8 int4; do
    quantize=()
    [ "$mode" != bf16 ] && quantize=(--quantize "$mode")
    timeout 150 python -m modelcode.cli bench --model llama-3-8b --device cuda --compile --batch-sizes 1 16 \
        --prompt-len 128 --new-tokens 128 --repeats 3 --no-hf "${quantize[@]}" \
        --out "$OUT/llama-3-8b-$mode.json" > "$OUT/bench-$mode.txt" 2>&1
    echo "== $mode (exit $?)"
    tail -4 "$OUT/bench-$mode.txt"
done
