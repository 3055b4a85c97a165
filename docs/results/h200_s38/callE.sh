# call E (session 38): FlexAttention CSA only with CUDA graphs: its GPU test (two steps, replayed) and the CUDA-graph
# equality test whose modes must run the same kernels
. gpu_s38/common.sh
W=/tmp/r/cE; mkdir -p $W
( s=$(date +%s); PYTHONPATH=/tmp/site:$R:$R/tests TORCHINDUCTOR_CACHE_DIR=/tmp/kcache/ind_tE timeout 195 python -m pytest -v -p no:cacheprovider --timeout 190 --tb=short -rfEs tests/test_gpu.py -k "flex_attention_with_the_sdpa or (cuda_graph_gradients_equal_default_mode_gradients and torch-bf16)" > $W/test_E.log 2>&1; echo "== tests rc=$? $(( $(date +%s) - s )) s"; grep -E "PASSED|FAILED|passed|failed|^E  " $W/test_E.log | cut -c1-600 | head -20 )
tar -czf $OUT/cE.tgz -C /tmp/r cE
echo "total $(( $(date +%s) - t0 )) s"
