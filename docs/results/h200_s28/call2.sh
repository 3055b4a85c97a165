# call 2: the compiled training step at batch 16 (bench_gpu, each model its own process and time limit): FlashQLA
# from empty caches with the prebuild child (the cold first step), FlashQLA again, fla, HF Llama compiled whole
. gpu_s28/env.sh
mkdir -p /tmp/data && tar -xzf runs/english200.tgz -C /tmp/data
mkdir -p $OUT/c2
timeout 570 python benchmarks/bench_gpu.py --steps 8 --warmup 3 --compiled-only --no-generate --train-batches 16 \
  --budget-s ${BUDGET:-135} --models llamathink:flash_qla:prebuild:cold,llamathink:flash_qla,llamathink:fla,hf-llama \
  --out $OUT/c2/bench_b16.json > $OUT/c2/bench_b16.log 2>&1
grep '^{' $OUT/c2/bench_b16.log | cut -c1-400; tail -5 $OUT/c2/bench_b16.log
tar -czf $OUT/c2.tgz -C $OUT c2 && rm -rf $OUT/c2
