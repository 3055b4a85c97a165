#!/usr/bin/env bash
# The GPU measurements of BENCHMARKS.md section 1 and the GPU tests, in one command on one GPU machine:
#   OUT=results_dir bash benchmarks/gpu_suite.sh
# (fla-core + tilelang installed, see ../shared/gpu/stage-wheels.sh). Each part has its own time limit so that a
# slow part cannot eat the others' time; every part writes what it measured as it goes.
set -u
OUT=${OUT:-results}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-}:$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
timeout ${T_OURS:-240} python benchmarks/bench_gpu.py --models llamathink:fla --compile --train-batches 16,64 \
    --steps 8 --warmup 3 --out "$OUT/bench_ours.json" 2>&1 | grep -v Warning | tail -12
timeout ${T_EAGER:-40} python benchmarks/bench_gpu.py --models llamathink:fla:eager-decode --no-train \
    --generate-batches 1 --out "$OUT/bench_eager_decode.json" 2>&1 | tail -2
timeout ${T_PEERS:-150} python benchmarks/bench_gpu.py --models hf-qwen3.5,hf-llama --steps 8 --warmup 3 \
    --out "$OUT/bench_peers.json" 2>&1 | grep -v Warning | tail -8
timeout ${T_TESTS:-120} python -m pytest -q -p no:cacheprovider --tb=line -rfE tests/test_gpu.py 2>&1 | tail -8
timeout ${T_PROFILE:-100} python benchmarks/profile_gpu.py --backend auto --out "$OUT" > /dev/null 2>&1
head -c 3000 "$OUT/profile_auto.txt" 2>/dev/null
