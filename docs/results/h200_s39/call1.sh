# call 1 (session 39, fresh machine): owed from session 38
# (a) the cold first step with and without the prebuild, now that the child reads the parent's ptxas (each its own
#     empty caches: bench_gpu's :cold), CUDA graphs as training runs, batch 16, HF Llama cold beside;
# (b) the three prebuild tests in the order that failed in sessions 36-38, and the CUDA-graph equality tests whose
#     graph test model now keeps CSA on its SDPA paths
. docs/results/h200_s36/common.sh
W=/tmp/r/c1; mkdir -p $W
python -c "import torch, triton, fla, transformers; print(torch.__version__, triton.__version__, fla.__version__, transformers.__version__)" 2>&1 | tail -1
( s=$(date +%s); PYTHONPATH=/tmp/site:$R timeout 300 python benchmarks/bench_gpu.py --compiled-only --no-generate --models llamathink:fla:cudagraphs:prebuild:cold,llamathink:fla:cudagraphs:cold,hf-llama:cudagraphs:cold --budget-s 95 --out $W/bench_cold.json > $W/bench_cold.txt 2>&1; echo "== cold rc=$? $(( $(date +%s) - s )) s"; grep '"model"' $W/bench_cold.txt | cut -c1-420 )
tar -czf $OUT/c1.tgz -C /tmp/r c1
T=tests/test_gpu.py
( s=$(date +%s); PYTHONPATH=/tmp/site:$R:$R/tests TORCHINDUCTOR_CACHE_DIR=/tmp/kcache/ind_o timeout $(left 585) python -m pytest -v -p no:cacheprovider --timeout 250 --tb=short -rfEs "$T::test_fla_causal_conv_matches_the_reference[100]" "$T::test_compiled_gated_deltanet_hands_its_padded_qkv_rows_to_fla_conv_uncopied" "$T::test_fla_prebuild_child_builds_every_kernel_the_compiled_step_launches[rows-inductors-folder]" > $W/test_order.log 2>&1; echo "== order rc=$? $(( $(date +%s) - s )) s"; grep -E "PASSED|FAILED|passed|failed|^E  " $W/test_order.log | cut -c1-600 | head -30 )
tar -czf $OUT/c1.tgz -C /tmp/r c1
echo "total $(( $(date +%s) - t0 )) s"
