# call 2: (a) the prebuild test after the two tests that ran before it in the worker where it failed (sessions 36
# and 37), in one process in that order; (b) the whole step at batch 16 on main and on treeB (try/csa-uncached-blocks),
# training's options, each its own process and empty inductor cache; (c) treeB's GPU tests that run CSA layers
. gpu_s37/common.sh
W=/tmp/r/c2; mkdir -p $W
T=tests/test_gpu.py
( s=$(date +%s); PYTHONPATH=/tmp/site:$R:$R/tests TORCHINDUCTOR_CACHE_DIR=/tmp/kcache/ind_o timeout 260 python -m pytest -v -p no:cacheprovider --timeout 240 --tb=long -rfEs "$T::test_fla_causal_conv_matches_the_reference[100]" "$T::test_compiled_gated_deltanet_hands_its_padded_qkv_rows_to_fla_conv_uncopied" "$T::test_fla_prebuild_child_builds_every_kernel_the_compiled_step_launches[rows-inductors-folder]" > $W/test_order.log 2>&1; echo "== order rc=$? $(( $(date +%s) - s )) s"; grep -E "PASSED|FAILED|passed|failed|^E  " $W/test_order.log | head -30 )
tar -czf $OUT/c2.tgz -C /tmp/r c2
p M16 $R 130 16 /tmp/kcache/ind_M16
p B16 $R/gpu_s37/treeB 130 16 /tmp/kcache/ind_B16
tar -czf $OUT/c2.tgz -C /tmp/r c2
( s=$(date +%s); cd gpu_s37/treeB && PYTHONPATH=/tmp/site:$PWD:$PWD/tests TORCHINDUCTOR_CACHE_DIR=/tmp/kcache/ind_tb timeout $(left 585) python -m pytest -v -n 6 -p no:cacheprovider --timeout 200 --tb=short -rfEs --durations=15 tests/test_gpu.py -k "(gpu_backends_match or packed_training_on_gpu or compiled_fla_training or compiled_layers_train_like_eager or cached_decode_equals_uncached or cuda_graph_decode_equals) and not flash_qla" > $W/test_B.log 2>&1; echo "== testsB rc=$? $(( $(date +%s) - s )) s"; grep -E "PASSED|FAILED|ERROR|passed|failed|^E  |Timeout" $W/test_B.log | head -40 )
tar -czf $OUT/c2.tgz -C /tmp/r c2 && ls -la $OUT/c2.tgz
echo "total $(( $(date +%s) - t0 )) s"
