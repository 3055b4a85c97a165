# call 3 (carry runs/gpu-site.tar.xz): FlashQLA's prebuild with its forward split in two processes and the step's
# FlashQLA calls waiting for the prebuild's parts (`wait_for_prebuild`): the cold first step with CUDA graphs at
# batch 16 (each its own empty caches), FlashQLA with the prebuild, then fla with its prebuild; then the GPU tests
# of FlashQLA's prebuild and of the wait, side by side
t0=$(date +%s)
mkdir -p /tmp/site /tmp/kcache && tar -xJf runs/gpu-site.tar.xz -C /tmp/site
. docs/results/h200_s29/env.sh
python -c "import torch, triton, fla, tilelang, flash_qla, transformers; print(torch.__version__, triton.__version__, fla.__version__, tilelang.__version__, transformers.__version__)"
mkdir -p $OUT/c3
timeout 250 python benchmarks/bench_gpu.py --steps 8 --warmup 3 --compiled-only --no-generate --train-batches 16 \
  --budget-s 140 --models llamathink:flash_qla:cudagraphs:prebuild:cold,llamathink:fla:cudagraphs:prebuild:cold \
  --out $OUT/c3/bench_b16.json > $OUT/c3/bench_b16.log 2>&1
echo "bench rc=$? at $(( $(date +%s) - t0 )) s"
grep '^{"model' $OUT/c3/bench_b16.log | cut -c1-700; grep -E "TileLang (begins|completes)" $OUT/c3/bench_b16.log | cut -c1-160
t() { local name=$1; shift; ( s=$(date +%s); timeout $(( 480 - $(date +%s) + t0 )) python -m pytest -v -p no:cacheprovider --tb=short -rfEs --durations=5 tests/test_gpu.py -k "$@" > $OUT/c3/$name.log 2>&1; echo "== $name rc=$? $(( $(date +%s) - s )) s" ) & }
t rows "flash_qla_prebuild and rows"
t packed "flash_qla_prebuild and packed"
t waits "flash_qla_step_waits"
wait
grep -h -E "PASSED|FAILED|ERROR|passed|failed|s call|Error|assert" $OUT/c3/*.log | head -30
tar -czf $OUT/c3.tgz -C $OUT c3 && rm -rf $OUT/c3
