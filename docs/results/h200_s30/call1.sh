# call 1 (carry runs/gpu-site.tar.xz and the liger-kernel wheel): FlashQLA's four TileLang builds alone (one process
# each, all at once, empty caches, nothing else running), the loss benchmark (ours, Liger-Kernel, full logits), then
# the GPU tests owed since session 29 (FlashQLA prebuild rows / packed, the prebuild wait, CUDA-graph decoding across
# PEFT adapter switches), side by side
t0=$(date +%s)
mkdir -p /tmp/site /tmp/kcache && tar -xJf runs/gpu-site.tar.xz -C /tmp/site && python -m zipfile -e .gpu-wheels-a/liger_kernel-0.8.5-py3-none-any.whl /tmp/site
. docs/results/h200_s30/env.sh
nproc; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -c "import torch, triton, fla, tilelang, flash_qla, transformers, liger_kernel, peft; print(torch.__version__, triton.__version__, fla.__version__, tilelang.__version__, transformers.__version__, peft.__version__)"
git log --oneline -1
mkdir -p $OUT/c1
timeout 200 python benchmarks/bench_flash_qla_builds.py --out $OUT/c1/builds.json > $OUT/c1/builds.log 2>&1
echo "builds rc=$? at $(( $(date +%s) - t0 )) s"; grep '^{' $OUT/c1/builds.log
timeout 150 python benchmarks/bench_loss.py --out $OUT/c1/loss.json > $OUT/c1/loss.log 2>&1
echo "loss rc=$? at $(( $(date +%s) - t0 )) s"; grep '^{' $OUT/c1/loss.log | cut -c1-400; tail -3 $OUT/c1/loss.log
t() { local name=$1; shift; ( s=$(date +%s); timeout $(( 560 - $(date +%s) + t0 )) python -m pytest -v -p no:cacheprovider --tb=short -rfEs --durations=5 tests/test_gpu.py -k "$@" > $OUT/c1/$name.log 2>&1; echo "== $name rc=$? $(( $(date +%s) - s )) s" ) & }
t rows "flash_qla_prebuild and rows"
t packed "flash_qla_prebuild and packed"
t waits "flash_qla_step_waits"
t peft "peft"
wait
grep -h -E "PASSED|FAILED|ERROR|passed|failed|s call|Error|assert" $OUT/c1/*.log | head -40
echo "total $(( $(date +%s) - t0 )) s"
