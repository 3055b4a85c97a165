# call 3 (session 40, fresh machine): gdn_backend auto taking FlashQLA's kernels once built. (a) the GPU test of the
# whole flow (build for later runs, recorded, then trained with from TileLang's cache) and FlashQLA's other tests;
# (b) two compiled pretraining runs in one process (auto_kernels.py): the first on fla's kernels with FlashQLA's built
# in the background, the second with FlashQLA's
. docs/results/h200_s36/common.sh
W=/tmp/r/c3; mkdir -p $W
( s=$(date +%s); PYTHONPATH=/tmp/site:$R:$R/tests TORCHINDUCTOR_CACHE_DIR=/tmp/kcache/ind_t timeout 250 python -m pytest -v -p no:cacheprovider --tb=short -rfEs tests/test_gpu.py -k "auto_layers_build_flash_qla or flash_qla_chunk_matches" > $W/test_auto.log 2>&1; echo "== tests rc=$? $(( $(date +%s) - s )) s"; grep -E "PASSED|FAILED|ERROR|passed|failed|^E  " $W/test_auto.log | cut -c1-400 | head -30 )
tar -czf $OUT/c3.tgz -C /tmp/r c3
( s=$(date +%s); TILELANG_CACHE_DIR=/tmp/kcache/tl_auto TRITON_CACHE_DIR=/tmp/kcache/tr_auto TORCHINDUCTOR_CACHE_DIR=/tmp/kcache/ind_auto PYTHONPATH=/tmp/site:$R timeout $(left 580) python docs/results/h200_s40/auto_kernels.py /tmp/r/c3/auto > $W/auto.log 2>&1; echo "== auto rc=$? $(( $(date +%s) - s )) s"; grep -vE "Warning|warn\(" $W/auto.log | grep -E "Gated DeltaNet|step|background|first_step|seconds|losses|Error|error" | cut -c1-300 | tail -30 )
rm -rf /tmp/r/c3/auto/data
tar -czf $OUT/c3.tgz -C /tmp/r c3
echo "total $(( $(date +%s) - t0 )) s"
