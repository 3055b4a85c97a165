# call C (session 52): eager bench_gpu rows alternating this tree (q, k by one fused rms_norm each; fla computes
# beta and the decay; fla's gated norm; the conv called without the custom op), HF Qwen3.5 and main (4ed4ef9); the
# GPU tests of the paths; then fla's choices for the added kernels at batch 16 (tune_fla_configs --keep-recorded)
[ -d /tmp/site/fla ] || { mkdir -p /tmp/site /tmp/kcache && tar -xJf runs/gpu-site-slim.tar.xz -C /tmp/site; }
. docs/results/h200_s36/common.sh
W=/tmp/r/cC; mkdir -p $W /tmp/main && tar -xzf runs/main_tree.tar.gz -C /tmp/main
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.sm --format=csv,noheader > $W/gpu.txt; cat $W/gpu.txt
b() { local dir=$1; shift; ( s=$(date +%s); cd $dir && PYTHONPATH=/tmp/site:$dir:$dir/tests timeout $2 python benchmarks/bench_gpu.py --no-generate --models $3 --budget-s $4 --out $W/bench_$1.json > $W/bench_$1.txt 2>&1; echo "== bench $1 rc=$? $(( $(date +%s) - s )) s"; grep '"model"' $W/bench_$1.txt | cut -c1-330 ); }
b /tmp/main main0 40 llamathink:fla 10
b $R new1 100 llamathink:fla 20
b $R qwen1 130 hf-qwen3.5 20
b /tmp/main main1 50 llamathink:fla 20
b $R new2 50 llamathink:fla 20
b $R qwen2 50 hf-qwen3.5 20
tar -czf $OUT/cC.tgz -C /tmp/r cC
W=$W t new $R $(( $(left 560) > 220 ? 220 : $(left 560) )) "computing_the_gates or gated_norm_takes or backends_match or (packed_training_on_gpu and eager and fla) or gives_way_to_forward_hooks"
tar -czf $OUT/cC.tgz -C /tmp/r cC
cp llamathink/fla_configs/NVIDIA_H200.json $W/tuned.json
s=$(date +%s); timeout $(left 575) python benchmarks/tune_fla_configs.py --batches 16 --seq 1024 --keep-recorded --out $W/tuned.json > $W/tune.txt 2>&1; echo "== tune rc=$? $(( $(date +%s) - s )) s"; tail -3 $W/tune.txt
tar -czf $OUT/cC.tgz -C /tmp/r cC
echo "total $(( $(date +%s) - t0 )) s"
