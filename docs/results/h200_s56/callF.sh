# call F (written in session 56 for the next GPU call; not run): the GPU tests of the eager step's launch savings at
# main's HEAD (the backends against the CPU reference, eager bf16 training; packed training; cached and CUDA-graph
# decode; fla's gated norm), then this tree's eager step against HF Qwen3.5's in turns (bench_gpu --interleave), twice,
# then fla's choices for any kernel shape not recorded (tune_fla_configs --keep-recorded on an H200; copy
# $W/tuned.json over llamathink/fla_configs/NVIDIA_H200.json if it changed). Carry runs/gpu-site-slim.tar.xz
# (benchmarks/pack_gpu_site.sh after ../shared/gpu/stage-wheels.sh).
mkdir -p /tmp/site /tmp/kcache; [ -d /tmp/site/fla ] || tar -xJf runs/gpu-site-slim.tar.xz -C /tmp/site
. docs/results/h200_s36/common.sh
W=/tmp/r/cF; mkdir -p $W
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.sm --format=csv,noheader > $W/gpu.txt; cat $W/gpu.txt
t head $R 300 "(backends_match and 16x32) or (packed_training_on_gpu and eager and fla) or cached_decode_equals or cuda_graph_decode_equals or gated_norm_takes or computing_the_gates"
tar -czf $OUT/cF.tgz -C /tmp/r cF
for i in 1 2; do s=$(date +%s); timeout $(left $((300 + 100 * i))) python benchmarks/bench_gpu.py --no-generate --models llamathink:fla,hf-qwen3.5 --interleave 8 --steps 10 --warmup 3 --out $W/il_$i.json > $W/il_$i.txt 2>&1; echo "== interleaved $i rc=$? $(( $(date +%s) - s )) s"; grep '"model"' $W/il_$i.txt | cut -c150-260; done
tar -czf $OUT/cF.tgz -C /tmp/r cF
if grep -q H200 $W/gpu.txt; then cp llamathink/fla_configs/NVIDIA_H200.json $W/tuned.json; s=$(date +%s); timeout $(left 585) python benchmarks/tune_fla_configs.py --batches 16 --seq 1024 --keep-recorded --out $W/tuned.json > $W/tune.txt 2>&1; echo "== tune rc=$? $(( $(date +%s) - s )) s"; tail -3 $W/tune.txt; fi
tar -czf $OUT/cF.tgz -C /tmp/r cF
echo "total $(( $(date +%s) - t0 )) s"
