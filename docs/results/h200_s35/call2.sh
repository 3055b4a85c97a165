# call 2: the GPU training tests under training's inductor options (fla, torch), 6 pytest workers; then the CSA
# window at query chunks of 128 in the whole step beside main in the same call, batch 64 with in-place buffers
. gpu_s35/common.sh
W=/tmp/r/c2; mkdir -p $W
( s=$(date +%s); PYTHONPATH=/tmp/site:$R:$R/tests TORCHINDUCTOR_CACHE_DIR=/tmp/kcache/ind_t timeout 320 python -m pytest -v -n 6 -p no:cacheprovider --tb=short -rfEs --durations=12 -o faulthandler_timeout=280 tests/test_gpu.py -k "(combo_kernels_train_like or compiled_layers_train_like_eager or cuda_graph) and not flash_qla and not decode" > $W/test_opts.log 2>&1; echo "== tests rc=$? $(( $(date +%s) - s )) s"; grep -E "PASSED|FAILED|ERROR|passed|failed|^E  |s call" $W/test_opts.log | head -40 )
tar -czf $OUT/c2.tgz -C /tmp/r c2
p C128 $R $(left 440) 16 /tmp/kcache/ind_C128 --model llamathink:fla:csa-chunk128
tar -czf $OUT/c2.tgz -C /tmp/r c2
p M16 $R $(left 530) 16 /tmp/kcache/ind_M16
tar -czf $OUT/c2.tgz -C /tmp/r c2
p P16 $R/gpu_s35/apart $(left 590) 16 /tmp/kcache/ind_P16
tar -czf $OUT/c2.tgz -C /tmp/r c2 && ls -la $OUT/c2.tgz
echo "total $(( $(date +%s) - t0 )) s"
