# call 2 (session 39, warm machine): the CUDA-graph tests (graph test model: CSA on SDPA in every mode), the
# FlexAttention CSA test, the prebuild tests; then batch 16 again (q, k now cast to bf16) and 64 with CUDA graphs, the session's tree (FlexAttention CSA)
# with HF Llama beside
. docs/results/h200_s36/common.sh
W=/tmp/r/c2; mkdir -p $W
( s=$(date +%s); PYTHONPATH=/tmp/site:$R:$R/tests TORCHINDUCTOR_CACHE_DIR=/tmp/kcache/ind_t2 timeout 330 python -m pytest -v -n 4 -p no:cacheprovider --timeout 300 --tb=short -rfEs tests/test_gpu.py -k "(cuda_graph or default_compiled_pretraining or flex_attention_with_the_sdpa or fla_prebuild) and not flash_qla" > $W/test_graphs.log 2>&1; echo "== tests rc=$? $(( $(date +%s) - s )) s"; grep -E "PASSED|FAILED|ERROR|passed|failed|^E  " $W/test_graphs.log | cut -c1-400 | head -40 )
tar -czf $OUT/c2.tgz -C /tmp/r c2
tar -czf $OUT/c2.tgz -C /tmp/r c2
( s=$(date +%s); PYTHONPATH=/tmp/site:$R TORCHINDUCTOR_CACHE_DIR=/tmp/kcache/ind_b64 timeout $(left 585) python benchmarks/bench_gpu.py --compiled-only --no-generate --train-batches 64 --models llamathink:fla:cudagraphs,hf-llama:cudagraphs --budget-s 120 --out $W/bench_b64.json > $W/bench_b64.txt 2>&1; echo "== b64 rc=$? $(( $(date +%s) - s )) s"; grep '"model"' $W/bench_b64.txt | cut -c1-330 )
tar -czf $OUT/c2.tgz -C /tmp/r c2
echo "total $(( $(date +%s) - t0 )) s"
