# call 2: (1) the site's Python files byte-compiled first, as pip install does (the archive is unpacked wheels,
# so call 1's processes compiled them at import, four at once); FlashQLA's four builds alone again (setup_s: the
# imports with .pyc); (2) the cold first step with CUDA graphs at batch 16, each its own empty compiler caches:
# FlashQLA with its prebuild, then fla with its prebuild; (3) the loss benchmark with GPU kernel times;
# (4) batch 64 with CUDA graphs: HF Llama compiled whole, fla, FlashQLA (one call)
t0=$(date +%s)
if [ ! -d /tmp/site/fla ]; then mkdir -p /tmp/site /tmp/kcache && tar -xJf runs/gpu-site.tar.xz -C /tmp/site && python -m zipfile -e .gpu-wheels-a/liger_kernel-0.8.5-py3-none-any.whl /tmp/site; echo fresh machine; fi
s=$(date +%s); python -m compileall -q -j 16 /tmp/site > /dev/null 2>&1; echo "compileall $(( $(date +%s) - s )) s"
. docs/results/h200_s30/env.sh
mkdir -p $OUT/c2
python -c "import torch, triton, fla, tilelang, flash_qla, transformers; print(torch.__version__, triton.__version__, fla.__version__, tilelang.__version__, transformers.__version__)"
timeout 120 python benchmarks/bench_flash_qla_builds.py --out $OUT/c2/builds.json > $OUT/c2/builds.log 2>&1
echo "builds rc=$? at $(( $(date +%s) - t0 )) s"; grep '^{' $OUT/c2/builds.log
timeout 250 python benchmarks/bench_gpu.py --steps 8 --warmup 3 --compiled-only --no-generate --train-batches 16 \
  --budget-s 125 --models llamathink:flash_qla:cudagraphs:prebuild:cold,llamathink:fla:cudagraphs:prebuild:cold \
  --out $OUT/c2/cold_b16.json > $OUT/c2/cold_b16.log 2>&1
echo "cold rc=$? at $(( $(date +%s) - t0 )) s"; grep '^{"model' $OUT/c2/cold_b16.log | cut -c1-900
timeout 60 python benchmarks/bench_loss.py --out $OUT/c2/loss.json > $OUT/c2/loss.log 2>&1
echo "loss rc=$? at $(( $(date +%s) - t0 )) s"; grep '^{' $OUT/c2/loss.log | cut -c1-300
left=$(( 585 - $(date +%s) + t0 ))
timeout $left python benchmarks/bench_gpu.py --steps 8 --warmup 3 --compiled-only --no-generate --train-batches 64 \
  --budget-s $(( left / 3 - 5 )) --models hf-llama:cudagraphs,llamathink:fla:cudagraphs,llamathink:flash_qla:cudagraphs:prebuild \
  --out $OUT/c2/b64.json > $OUT/c2/b64.log 2>&1
echo "b64 rc=$? at $(( $(date +%s) - t0 )) s"; grep '^{"model' $OUT/c2/b64.log | cut -c1-500
