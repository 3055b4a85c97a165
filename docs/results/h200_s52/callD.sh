# call D (session 52, the last device time after call C's machine was taken back): the GPU tests of the eager fast
# paths, then this tree's eager LlamaThink and HF Qwen3.5's eager step in turns in one process
# (bench_gpu --interleave: rounds of 10 steps each, their ratio per round)
[ -d /tmp/site/fla ] || { mkdir -p /tmp/site /tmp/kcache && tar -xJf runs/gpu-site-slim.tar.xz -C /tmp/site; }
. docs/results/h200_s36/common.sh
W=/tmp/r/cD; mkdir -p $W
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.sm --format=csv,noheader > $W/gpu.txt; cat $W/gpu.txt
W=$W t new $R 110 "computing_the_gates or gated_norm_takes or (backends_match and 16x32)"
tar -czf $OUT/cD.tgz -C /tmp/r cD
s=$(date +%s); timeout $(left 265) python benchmarks/bench_gpu.py --no-generate --models llamathink:fla,hf-qwen3.5 --interleave 8 --steps 10 --warmup 3 --out $W/interleaved.json > $W/interleaved.txt 2>&1; echo "== interleaved rc=$? $(( $(date +%s) - s )) s"; grep '"model"' $W/interleaved.txt | cut -c1-400
tar -czf $OUT/cD.tgz -C /tmp/r cD
echo "total $(( $(date +%s) - t0 )) s"
