# call C (session 38): compiled training throughput at batch 16 (bench_gpu, each model its own process): the working
# tree (CSA through FlexAttention) and HF Llama compiled, then main (treeM, HEAD)
. gpu_s38/common.sh
W=/tmp/r/cC; mkdir -p $W
( s=$(date +%s); PYTHONPATH=/tmp/site:$R TORCHINDUCTOR_CACHE_DIR=/tmp/kcache/ind_bF timeout 330 python benchmarks/bench_gpu.py --compiled-only --no-generate --models llamathink:fla,hf-llama --budget-s 160 --out $W/bench_F.json > $W/bench_F.txt 2>&1; echo "== bench F rc=$? $(( $(date +%s) - s )) s"; tail -12 $W/bench_F.txt )
tar -czf $OUT/cC.tgz -C /tmp/r cC
( s=$(date +%s); cd gpu_s38/treeM && PYTHONPATH=/tmp/site:$PWD TORCHINDUCTOR_CACHE_DIR=/tmp/kcache/ind_bM timeout $(left 560) python benchmarks/bench_gpu.py --compiled-only --no-generate --models llamathink:fla --budget-s 160 --out $W/bench_M.json > $W/bench_M.txt 2>&1; echo "== bench M rc=$? $(( $(date +%s) - s )) s"; tail -8 $W/bench_M.txt )
tar -czf $OUT/cC.tgz -C /tmp/r cC
echo "total $(( $(date +%s) - t0 )) s"
