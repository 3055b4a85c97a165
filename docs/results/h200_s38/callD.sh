# call D (session 38): compiled training throughput at batch 16 with CUDA graphs (training's default), each model its
# own process: the working tree (CSA through FlexAttention) and HF Llama, then main (treeM, HEAD)
. gpu_s38/common.sh
W=/tmp/r/cD; mkdir -p $W
( s=$(date +%s); PYTHONPATH=/tmp/site:$R TORCHINDUCTOR_CACHE_DIR=/tmp/kcache/ind_gF timeout 250 python benchmarks/bench_gpu.py --compiled-only --no-generate --models llamathink:fla:cudagraphs,hf-llama:cudagraphs --budget-s 120 --out $W/bench_F.json > $W/bench_F.txt 2>&1; echo "== bench F rc=$? $(( $(date +%s) - s )) s"; grep '"model"' $W/bench_F.txt | cut -c1-330 )
tar -czf $OUT/cD.tgz -C /tmp/r cD
( s=$(date +%s); cd gpu_s38/treeM && PYTHONPATH=/tmp/site:$PWD TORCHINDUCTOR_CACHE_DIR=/tmp/kcache/ind_gM timeout $(left 380) python benchmarks/bench_gpu.py --compiled-only --no-generate --models llamathink:fla:cudagraphs --budget-s 120 --out $W/bench_M.json > $W/bench_M.txt 2>&1; echo "== bench M rc=$? $(( $(date +%s) - s )) s"; grep '"model"' $W/bench_M.txt | cut -c1-330 )
tar -czf $OUT/cD.tgz -C /tmp/r cD
echo "total $(( $(date +%s) - t0 )) s"
