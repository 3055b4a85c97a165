# call A (session 38): the FlexAttention CSA GPU test (working tree), then the prebuild test after the two tests
# that make it fail (its message now names the differing metadata fields and first IR lines)
. gpu_s38/common.sh
W=/tmp/r/cA; mkdir -p $W
python -c "import torch, triton, fla, transformers; print(torch.__version__, triton.__version__, fla.__version__, transformers.__version__)" 2>&1 | tail -1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
T=tests/test_gpu.py
( s=$(date +%s); PYTHONPATH=/tmp/site:$R:$R/tests TORCHINDUCTOR_CACHE_DIR=/tmp/kcache/ind_tf timeout 200 python -m pytest -v -p no:cacheprovider --timeout 180 --tb=short -rfEs $T -k "flex_attention_with_the_sdpa or compiled_layers_train_like_eager" > $W/test_flex.log 2>&1; echo "== flex test rc=$? $(( $(date +%s) - s )) s"; grep -E "PASSED|FAILED|passed|failed|^E  " $W/test_flex.log | cut -c1-600 | head -20 )
tar -czf $OUT/cA.tgz -C /tmp/r cA
( s=$(date +%s); PYTHONPATH=/tmp/site:$R:$R/tests TORCHINDUCTOR_CACHE_DIR=/tmp/kcache/ind_o timeout $(left 585) python -m pytest -v -p no:cacheprovider --timeout 400 --tb=short -rfEs "$T::test_fla_causal_conv_matches_the_reference[100]" "$T::test_compiled_gated_deltanet_hands_its_padded_qkv_rows_to_fla_conv_uncopied" "$T::test_fla_prebuild_child_builds_every_kernel_the_compiled_step_launches[rows-inductors-folder]" > $W/test_order.log 2>&1; echo "== order rc=$? $(( $(date +%s) - s )) s"; grep -E "PASSED|FAILED|passed|failed|^E  " $W/test_order.log | cut -c1-1500 | head -60 )
tar -czf $OUT/cA.tgz -C /tmp/r cA
echo "total $(( $(date +%s) - t0 )) s"
