#!/usr/bin/env bash
# The GPU measurements of BENCHMARKS.md section 1 and the GPU tests, on a machine with two GPUs (the two halves of
# each part run side by side, one per GPU), in commands of under 10 minutes each. With one GPU the halves run one
# after the other; name one (`gpu_suite.sh fla 0`, then `... fla 1`) to keep each command under 10 minutes:
#   OUT=results_dir bash benchmarks/gpu_suite.sh nofla   # before fla is installed: our own PyTorch GDN path
#                                                        # (training eager + compiled), generate(), GPU tests
#   OUT=results_dir bash benchmarks/gpu_suite.sh fla     # with fla-core + tilelang (../shared/gpu/stage-wheels.sh):
#                                                        # training, ours and the peers in one process, eager then
#                                                        # compiled; GPU tests; profile; generate()
# Every benchmark has its own time limit so that a slow one cannot eat the others' time, and writes what it
# measured as it goes; at the end everything is packed into $OUT/results.tgz (the device returns a handful of files
# per call). Triton and tilelang JIT caches are kept in $OUT/kernels.tgz; carry it back as .gpu-kernel-cache/ to
# skip minutes of kernel compilation on a fresh machine.
set -u
OUT=${OUT:-results}
PART=${1:-fla}
ONLY=${2:-}  # 0 or 1: run only that half
mkdir -p "$OUT" /tmp/kcache
[ -f .gpu-kernel-cache/kernels.tgz ] && tar -xzf .gpu-kernel-cache/kernels.tgz -C /tmp/kcache
export TRITON_CACHE_DIR=/tmp/kcache/triton TILELANG_CACHE_DIR=/tmp/kcache/tilelang PYTHONUNBUFFERED=1
export PYTHONPATH=${PYTHONPATH:-}:$PWD
nvidia-smi --query-gpu=index,name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
SECOND=$(( $(nvidia-smi -L | wc -l) > 1 ? 1 : 0 ))
bench() { local limit=$1 name=$2; shift 2; timeout "$limit" python benchmarks/bench_gpu.py --steps 8 --warmup 3 \
    --out "$OUT/bench_$name.json" "$@" > "$OUT/bench_$name.log" 2>&1; grep '^{' "$OUT/bench_$name.log"; }
gpu_tests() { timeout "$1" python -m pytest -q -p no:cacheprovider --tb=short -rfEs tests/test_gpu.py \
    > "$OUT/test_gpu_$2.log" 2>&1; grep -v Warn "$OUT/test_gpu_$2.log" | tail -30; }
if [ "$PART" = nofla ]; then
    half0() {
        bench 160 generate_torch --models llamathink:torch,llamathink:torch:eager-decode,hf-qwen3.5,hf-llama --no-train
        gpu_tests 150 nofla; }
    half1() { bench 280 train_torch --models llamathink:torch --compile --no-generate; }
else
    half0() {
        bench 230 train_eager --models llamathink:fla,hf-qwen3.5,hf-llama --train-batches 16,64 --no-generate
        bench 320 train_compiled --models llamathink:fla,hf-llama,hf-qwen3.5 --compiled-only --no-generate; }
    half1() {
        gpu_tests 170 fla
        timeout 240 python benchmarks/profile_gpu.py --backend auto --compile --out "$OUT" > "$OUT/profile.log" 2>&1
        tail -3 "$OUT/profile.log"
        bench 130 generate_fla --models llamathink:fla,hf-qwen3.5 --no-train; }
fi
if [ -n "$ONLY" ]; then
    "half$ONLY" > "$OUT/half$ONLY.txt" 2>&1
elif [ "$SECOND" = 1 ]; then
    CUDA_VISIBLE_DEVICES=0 half0 > "$OUT/half0.txt" 2>&1 &
    CUDA_VISIBLE_DEVICES=1 half1 > "$OUT/half1.txt" 2>&1 &
    wait
else
    half0 > "$OUT/half0.txt" 2>&1
    half1 > "$OUT/half1.txt" 2>&1
fi
cat "$OUT"/half*.txt
[ -f "$OUT/profile_auto.txt" ] && head -c 6000 "$OUT/profile_auto.txt"
# The device returns only a few files per call: everything measured goes back as one archive.
tar -czf /tmp/results.tgz -C "$OUT" . && rm -rf "${OUT:?}"/* && mv /tmp/results.tgz "$OUT/results.tgz"
tar -czf "$OUT/kernels.tgz" -C /tmp/kcache . && ls -la "$OUT"
