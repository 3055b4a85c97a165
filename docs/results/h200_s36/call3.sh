# call 3 (same warm machine as calls 1-2, /tmp/site kept): equal-token quality and time to loss, 800 steps, seed 0:
# LlamaThink compiled as training compiles it (CUDA graphs, combo kernels), HF Llama compiled whole in torch.compile's
# default mode and with CUDA graphs + training's inductor options (like for like), one process, one after the other
. gpu_s36/common.sh
mkdir -p /tmp/data && tar -xzf runs/english200.tgz -C /tmp/data && ls /tmp/data
D=$(dirname $(find /tmp/data -name meta.json | head -1)); echo data $D
W=$OUT/q; mkdir -p $W
TORCHINDUCTOR_CACHE_DIR=/tmp/kcache/ind_q timeout 560 python benchmarks/bench_quality.py --data $D --steps 800 --eval-every 100 \
  --out $W --run lt-s0:compile=1 --run llama-s0:model=hf-llama,compile=1 \
  --run llama-cg-s0:model=hf-llama,compile=1,compile_mode=reduce-overhead,combo_kernels=1 > $W/quality.log 2>&1; echo rc=$?
grep -vE "Warning|warn" $W/quality.log | tail -30 | cut -c1-300
echo "total $(( $(date +%s) - t0 )) s"
