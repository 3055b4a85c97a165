# call 3: batch 64 with CUDA graphs, one call: HF Llama compiled whole, LlamaThink with fla, with FlashQLA (its
# prebuild); then the loss benchmark at batch 64's rows
t0=$(date +%s)
if [ ! -d /tmp/site/fla ]; then mkdir -p /tmp/site /tmp/kcache && tar -xJf runs/gpu-site.tar.xz -C /tmp/site && python -m zipfile -e .gpu-wheels-a/liger_kernel-0.8.5-py3-none-any.whl /tmp/site; echo fresh machine; fi
. docs/results/h200_s30/env.sh
mkdir -p $OUT/c3
timeout 520 python benchmarks/bench_gpu.py --steps 8 --warmup 3 --compiled-only --no-generate --train-batches 64 \
  --budget-s 215 --models hf-llama:cudagraphs,llamathink:fla:cudagraphs,llamathink:flash_qla:cudagraphs:prebuild \
  --out $OUT/c3/b64.json > $OUT/c3/b64.log 2>&1
echo "b64 rc=$? at $(( $(date +%s) - t0 )) s"; grep '^{"model' $OUT/c3/b64.log | cut -c1-900
left=$(( 590 - $(date +%s) + t0 ))
timeout $left python benchmarks/bench_loss.py --rows 65536 --out $OUT/c3/loss_b64.json > $OUT/c3/loss_b64.log 2>&1
echo "loss rc=$? at $(( $(date +%s) - t0 )) s"; grep '^{' $OUT/c3/loss_b64.log | cut -c1-300
