# call 2 (same warm machine as call 1): the two tests of call 1 that failed or were cut, alone, two pytest workers,
# their own inductor cache folder
. gpu_s36/common.sh; W=/tmp/r/c2; mkdir -p $W; ls /tmp/kcache; ( s=$(date +%s); PYTHONPATH=/tmp/site:$R:$R/tests TORCHINDUCTOR_CACHE_DIR=/tmp/kcache/ind_t2 timeout 330 python -m pytest -v -n 2 -p no:cacheprovider --tb=long -rfEs --durations=5 tests/test_gpu.py -k "rows-inductors-folder or dims8x10" > $W/test_c2.log 2>&1; echo "== rc=$? $(( $(date +%s) - s )) s" ); tail -150 $W/test_c2.log | cut -c1-400; cp $W/test_c2.log $OUT/
