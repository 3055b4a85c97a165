#!/usr/bin/env bash
# The GPU measurements of BENCHMARKS.md section 1 and the GPU tests, on one GPU machine, in two commands of under
# 10 minutes each (fla-core + tilelang installed first, see ../shared/gpu/stage-wheels.sh):
#   OUT=results_dir bash benchmarks/gpu_suite.sh train     # training: ours and the peers, eager and compiled
#   OUT=results_dir bash benchmarks/gpu_suite.sh rest      # generate(), GPU tests, profile
# Each part has its own time limit so that a slow one cannot eat the others' time, and writes what it measured as
# it goes. Triton and tilelang JIT caches are kept in $OUT/kernels.tgz; carry it back as .gpu-kernel-cache/ to
# skip minutes of kernel compilation on a fresh machine.
set -u
OUT=${OUT:-results}
PART=${1:-train}
mkdir -p "$OUT" /tmp/kcache
[ -f .gpu-kernel-cache/kernels.tgz ] && tar -xzf .gpu-kernel-cache/kernels.tgz -C /tmp/kcache
export TRITON_CACHE_DIR=/tmp/kcache/triton TILELANG_CACHE_DIR=/tmp/kcache/tilelang
export PYTHONPATH=${PYTHONPATH:-}:$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
bench() { local limit=$1 name=$2; shift 2; timeout "$limit" python benchmarks/bench_gpu.py --steps 8 --warmup 3 \
    --out "$OUT/bench_$name.json" "$@" 2>&1 | grep '^{' ; }
if [ "$PART" = train ]; then
    bench 150 ours --models llamathink:fla --train-batches 16,64 --no-generate
    bench 150 peers --models hf-qwen3.5,hf-llama --no-generate
    bench 250 compiled --models llamathink:fla,hf-qwen3.5,hf-llama --compiled-only --train-batches 16 --no-generate
else
    bench 150 generate --models llamathink:fla,llamathink:fla:eager-decode,hf-qwen3.5,hf-llama --no-train
    timeout 200 python -m pytest -q -p no:cacheprovider --tb=short -rfE tests/test_gpu.py 2>&1 | grep -v Warn | tail -25
    timeout 120 python benchmarks/profile_gpu.py --backend auto --out "$OUT" > /dev/null 2>&1
    head -c 4000 "$OUT/profile_auto.txt" 2>/dev/null
fi
tar -czf "$OUT/kernels.tgz" -C /tmp/kcache . && ls -la "$OUT/kernels.tgz"
