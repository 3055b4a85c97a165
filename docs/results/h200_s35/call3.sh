# call 3: the conv-per-part branch's GPU tests (its new and changed ones, and those through fla's conv); then the CSA
# window at query chunks of 128 in the whole step beside main (same call)
. gpu_s35/common.sh
W=/tmp/r/c3; mkdir -p $W
( s=$(date +%s); cd $R/gpu_s35/apart && PYTHONPATH=/tmp/site:$PWD:$PWD/tests TORCHINDUCTOR_CACHE_DIR=/tmp/kcache/ind_tp timeout 150 python -m pytest -v -n 8 -p no:cacheprovider --tb=short -rfEs --durations=12 tests/test_gpu.py -k "not flash_qla and (fla_causal_conv or padded_qkv or gpu_backends_match or compiled_fla_training or packed_training_on_gpu or combo_kernels_train_like or shipped_fla_configs or fla_prebuild or cached_decode_equals or fla_chunk_matches)" > $W/test_apart.log 2>&1; echo "== tests rc=$? $(( $(date +%s) - s )) s"; grep -E "PASSED|FAILED|ERROR|passed|failed|^E  " $W/test_apart.log | head -40 )
tar -czf $OUT/c3.tgz -C /tmp/r c3
p C128 $R $(left 245) 16 /tmp/kcache/ind_C128 --model llamathink:fla:csa-chunk128
tar -czf $OUT/c3.tgz -C /tmp/r c3
p M16 $R $(left 320) 16 /tmp/kcache/ind_M16
tar -czf $OUT/c3.tgz -C /tmp/r c3 && ls -la $OUT/c3.tgz
echo "total $(( $(date +%s) - t0 )) s"
