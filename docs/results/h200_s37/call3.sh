# call 3: the prebuild test after the two tests that ran before it where it failed, its failure message now naming how
# each kernel the step rebuilt differs from the child's builds of it
. gpu_s37/common.sh
W=/tmp/r/c3; mkdir -p $W
T=tests/test_gpu.py
( s=$(date +%s); PYTHONPATH=/tmp/site:$R:$R/tests TORCHINDUCTOR_CACHE_DIR=/tmp/kcache/ind_o3 timeout 300 python -m pytest -v -p no:cacheprovider --timeout 280 --tb=short -rfEs "$T::test_fla_causal_conv_matches_the_reference[100]" "$T::test_compiled_gated_deltanet_hands_its_padded_qkv_rows_to_fla_conv_uncopied" "$T::test_fla_prebuild_child_builds_every_kernel_the_compiled_step_launches[rows-inductors-folder]" > $W/test_order.log 2>&1; echo "== order rc=$? $(( $(date +%s) - s )) s"; grep -E "PASSED|FAILED|passed|failed|^E  " $W/test_order.log | cut -c1-600 | head -40 )
tar -czf $OUT/c3.tgz -C /tmp/r c3
echo "total $(( $(date +%s) - t0 )) s"
