# call D (written in session 52 for the next GPU call; not run): the GPU tests of the eager fast paths' final form
# and session 51's decode test, then this tree's eager LlamaThink and HF Qwen3.5's eager step in turns in one
# process (bench_gpu --interleave: rounds of 10 steps each, their ratio per round), then fla's choices for the added
# kernels at batch 16 (tune_fla_configs --keep-recorded; copy $W/tuned.json over llamathink/fla_configs/NVIDIA_H200.json
# if it changed). For main's share run the same bench on `git archive 4ed4ef9` in another call.
[ -d /tmp/site/fla ] || { mkdir -p /tmp/site /tmp/kcache && tar -xJf runs/gpu-site-slim.tar.xz -C /tmp/site; }
. docs/results/h200_s36/common.sh
W=/tmp/r/cD; mkdir -p $W
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.sm --format=csv,noheader > $W/gpu.txt; cat $W/gpu.txt
W=$W t new $R 200 "computing_the_gates or gated_norm_takes or (backends_match and 16x32) or gives_way_to_forward_hooks"
tar -czf $OUT/cD.tgz -C /tmp/r cD
s=$(date +%s); timeout 220 python benchmarks/bench_gpu.py --no-generate --models llamathink:fla,hf-qwen3.5 --interleave 8 --steps 10 --warmup 3 --out $W/interleaved.json > $W/interleaved.txt 2>&1; echo "== interleaved rc=$? $(( $(date +%s) - s )) s"; grep '"model"' $W/interleaved.txt | cut -c1-400
tar -czf $OUT/cD.tgz -C /tmp/r cD
cp llamathink/fla_configs/NVIDIA_H200.json $W/tuned.json
s=$(date +%s); timeout $(left 585) python benchmarks/tune_fla_configs.py --batches 16 --seq 1024 --keep-recorded --out $W/tuned.json > $W/tune.txt 2>&1; echo "== tune rc=$? $(( $(date +%s) - s )) s"; tail -3 $W/tune.txt
tar -czf $OUT/cD.tgz -C /tmp/r cD
echo "total $(( $(date +%s) - t0 )) s"
