# call C (session 56; ran on an H100, docs/results/h100_s56/): GPU tests of the eager launch savings (the GPU backends against the CPU reference, eager bf16
# training; packed training; the cached and CUDA-graph decode), then main (runs/main.tar) and this tree in turns,
# each its own process of bench_gpu --interleave against HF Qwen3.5, twice.
mkdir -p /tmp/site /tmp/kcache; [ -d /tmp/site/fla ] || tar -xJf runs/gpu-site-slim.tar.xz -C /tmp/site
. docs/results/h200_s36/common.sh
W=/tmp/r/cC; mkdir -p $W /tmp/main && tar -xf runs/main.tar -C /tmp/main
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.sm --format=csv,noheader > $W/gpu.txt; cat $W/gpu.txt
t tree $R 230 "(backends_match and 16x32) or (packed_training_on_gpu and eager and fla) or cached_decode_equals or cuda_graph_decode_equals or gated_norm_takes"
tar -czf $OUT/cC.tgz -C /tmp/r cC
il() { local name=$1 dir=$2 lim=$3; [ $lim -lt 50 ] && { echo "== $name skipped"; return; }; ( s=$(date +%s); cd $dir && PYTHONPATH=/tmp/site:$dir timeout $lim python benchmarks/bench_gpu.py --no-generate --models llamathink:fla,hf-qwen3.5 --interleave 8 --steps 10 --warmup 3 --out $W/il_$name.json > $W/il_$name.txt 2>&1; echo "== interleaved $name rc=$? $(( $(date +%s) - s )) s"; grep '"model"' $W/il_$name.txt | cut -c1-200 ); }
il main1 /tmp/main $(left 330); il tree1 $R $(left 400); il main2 /tmp/main $(left 470); il tree2 $R $(left 540)
tar -czf $OUT/cC.tgz -C /tmp/r cC
echo "total $(( $(date +%s) - t0 )) s"
