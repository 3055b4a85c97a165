# call A (session 56; never ran: no machine started for it, call B replaced it): main's eager step against HF Qwen3.5's on an H200 in turns in one process (bench_gpu
# --interleave), then both eager steps profiled in one process with the GPU's idle gaps and Chrome traces
# (profile_gpu --eager-peers hf-qwen3.5 --eager-trace), then fla's choices for the eager step's added kernels at batch 16
# (tune_fla_configs --keep-recorded; copy $W/tuned.json over llamathink/fla_configs/NVIDIA_H200.json if it changed;
# on an H100, a first record at batch 16 from scratch).
mkdir -p /tmp/site /tmp/kcache; [ -d /tmp/site/fla ] || tar -xJf runs/gpu-site-slim.tar.xz -C /tmp/site
. docs/results/h200_s36/common.sh
W=/tmp/r/cA; mkdir -p $W
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.sm --format=csv,noheader > $W/gpu.txt; cat $W/gpu.txt
s=$(date +%s); timeout 230 python benchmarks/bench_gpu.py --no-generate --models llamathink:fla,hf-qwen3.5 --interleave 8 --steps 10 --warmup 3 --out $W/interleaved.json > $W/interleaved.txt 2>&1; echo "== interleaved rc=$? $(( $(date +%s) - s )) s"; grep '"model"\|ratio' $W/interleaved.txt | cut -c1-400
tar -czf $OUT/cA.tgz -C /tmp/r cA
s=$(date +%s); timeout $(left 470) python benchmarks/profile_gpu.py --backend fla --no-decode --eager-peers hf-qwen3.5 --host-python --eager-trace --out $W > $W/profile.txt 2>&1; echo "== profile rc=$? $(( $(date +%s) - s )) s"; grep -E "GPU kernel time|wall time|GPU idle|host syncs" $W/profile.txt
tar -czf $OUT/cA.tgz -C /tmp/r cA
# on an H100 (no choices recorded for it): a first record at batch 16, from scratch
if grep -q H200 $W/gpu.txt; then cp llamathink/fla_configs/NVIDIA_H200.json $W/tuned.json; keep=--keep-recorded; else keep=; fi
s=$(date +%s); timeout $(left 580) python benchmarks/tune_fla_configs.py --batches 16 --seq 1024 $keep --out $W/tuned.json > $W/tune.txt 2>&1; echo "== tune rc=$? $(( $(date +%s) - s )) s"; tail -3 $W/tune.txt
tar -czf $OUT/cA.tgz -C /tmp/r cA
echo "total $(( $(date +%s) - t0 )) s"
