# call 2 (session 40, the warm machine of call 1: /tmp/site kept): paired quality seeds, CSA through FlexAttention
# (training's CUDA-graph path) against its SDPA paths (`csa_flex=0`), seeds 0-2, 800 steps, one process, one shared
# inductor cache (later runs reuse earlier runs' compiled graphs)
. docs/results/h200_s36/common.sh
mkdir -p /tmp/data && tar -xzf runs/english200.tgz -C /tmp/data
D=/tmp/data/english200; W=$OUT/q; mkdir -p $W
TORCHINDUCTOR_CACHE_DIR=/tmp/kcache/ind_q timeout $(left 590) python benchmarks/bench_quality.py --data $D --steps 800 --eval-every 100 \
  --out $W --run flex-s0:compile=1,seed=0 --run sdpa-s0:compile=1,seed=0,csa_flex=0 \
  --run flex-s1:compile=1,seed=1 --run sdpa-s1:compile=1,seed=1,csa_flex=0 \
  --run flex-s2:compile=1,seed=2 --run sdpa-s2:compile=1,seed=2,csa_flex=0 > $W/quality.log 2>&1; echo rc=$?
grep -vE "Warning|warn" $W/quality.log | tail -24 | cut -c1-300
echo "total $(( $(date +%s) - t0 )) s"
