# call 4 (session 39, the warm machine of call 3: /tmp/site kept): equal-token quality and time to loss, 800 steps,
# seed 0, as session 36's call 3: LlamaThink as training compiles it (CUDA graphs, combo kernels; CSA now through
# FlexAttention), HF Llama compiled whole with CUDA graphs and training's inductor options, one process
. docs/results/h200_s36/common.sh
mkdir -p /tmp/data && tar -xzf runs/english200.tgz -C /tmp/data
D=/tmp/data/english200; W=$OUT/q; mkdir -p $W
TORCHINDUCTOR_CACHE_DIR=/tmp/kcache/ind_q timeout $(left 570) python benchmarks/bench_quality.py --data $D --steps 800 --eval-every 100 \
  --out $W --run lt-s0:compile=1 \
  --run llama-cg-s0:model=hf-llama,compile=1,compile_mode=reduce-overhead,combo_kernels=1 > $W/quality.log 2>&1; echo rc=$?
grep -vE "Warning|warn" $W/quality.log | tail -20 | cut -c1-300
echo "total $(( $(date +%s) - t0 )) s"
