# call B (session 56; ran on an H100, docs/results/h100_s56/): the eager step of main (runs/main.tar: `git archive HEAD llamathink benchmarks configuration setup.py` of main) and of this tree, each against
# HF Qwen3.5's in turns in its own process (bench_gpu --interleave), then this tree's eager step and HF Qwen3.5's
# profiled in one process with the GPU's idle gaps and Chrome traces (profile_gpu --eager-peers --eager-trace).
mkdir -p /tmp/site /tmp/kcache; [ -d /tmp/site/fla ] || tar -xJf runs/gpu-site-slim.tar.xz -C /tmp/site
. docs/results/h200_s36/common.sh
W=/tmp/r/cB; mkdir -p $W /tmp/main && tar -xf runs/main.tar -C /tmp/main
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.sm --format=csv,noheader > $W/gpu.txt; cat $W/gpu.txt
il() { local name=$1 dir=$2 lim=$3; ( s=$(date +%s); cd $dir && PYTHONPATH=/tmp/site:$dir timeout $lim python benchmarks/bench_gpu.py --no-generate --models llamathink:fla,hf-qwen3.5 --interleave 6 --steps 10 --warmup 3 --out $W/il_$name.json > $W/il_$name.txt 2>&1; echo "== interleaved $name rc=$? $(( $(date +%s) - s )) s"; grep '"model"' $W/il_$name.txt | cut -c1-400 ); }
il main /tmp/main 200
tar -czf $OUT/cB.tgz -C /tmp/r cB
il tree $R $(left 330)
tar -czf $OUT/cB.tgz -C /tmp/r cB
s=$(date +%s); timeout $(left 560) python benchmarks/profile_gpu.py --backend fla --no-decode --eager-peers hf-qwen3.5 --eager-trace --out $W > $W/profile.txt 2>&1; echo "== profile rc=$? $(( $(date +%s) - s )) s"; grep -E "GPU kernel time|wall time|GPU idle|host syncs" $W/profile.txt
tar -czf $OUT/cB.tgz -C /tmp/r cB
echo "total $(( $(date +%s) - t0 )) s"
