# call 1 (carry runs/gpu-site.tar.xz): install; the compiled step with CUDA graphs (training's default) at batch 16
# from empty caches: FlashQLA with the three-process prebuild first (the cold step), FlashQLA again, fla, HF Llama
# compiled whole, each in its own process (bench_gpu); then the three-process prebuild's GPU test, rows and packed
# side by side
t0=$(date +%s)
mkdir -p /tmp/site /tmp/kcache && tar -xJf runs/gpu-site.tar.xz -C /tmp/site
echo "installed in $(( $(date +%s) - t0 )) s"
. docs/results/h200_s29/env.sh
python -c "import torch, triton, fla, tilelang, flash_qla, transformers; print(torch.__version__, triton.__version__, fla.__version__, tilelang.__version__, transformers.__version__)"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; nproc
mkdir -p $OUT/c1
timeout 390 python benchmarks/bench_gpu.py --steps 8 --warmup 3 --compiled-only --no-generate --train-batches 16 \
  --budget-s 150 --models llamathink:flash_qla:cudagraphs:prebuild:cold,llamathink:flash_qla:cudagraphs,llamathink:fla:cudagraphs,hf-llama:cudagraphs \
  --out $OUT/c1/bench_b16.json > $OUT/c1/bench_b16.log 2>&1
echo "bench rc=$? at $(( $(date +%s) - t0 )) s"
grep '^{' $OUT/c1/bench_b16.log | cut -c1-500; grep -iE "prebuild|built|tilelang|fused_gdr|kkt" $OUT/c1/bench_b16.log | cut -c1-200 | head -20
for p in rows packed; do ( s=$(date +%s); timeout $(( 585 - $(date +%s) + t0 )) python -m pytest -v -p no:cacheprovider --tb=short -rfEs --durations=5 tests/test_gpu.py -k "flash_qla_prebuild and $p" > $OUT/c1/prebuild_$p.log 2>&1; echo "== prebuild $p rc=$? $(( $(date +%s) - s )) s" ) & done
wait
grep -h -E "PASSED|FAILED|ERROR|passed|failed|s call" $OUT/c1/prebuild_*.log | head -20
tar -czf $OUT/c1.tgz -C $OUT c1 && rm -rf $OUT/c1
