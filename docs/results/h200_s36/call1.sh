# call 1: main with both of session 35's changes at batch 16 beside HF Llama and at batch 64; then the GPU tests of
# the conv per q, k, v part that session 35's calls cut (six pytest workers)
. gpu_s36/common.sh
W=/tmp/r/c1; mkdir -p $W
python -c "import torch, triton, fla, transformers; print(torch.__version__, triton.__version__, fla.__version__, transformers.__version__)"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
git log --oneline -1
p M16 $R 175 16 /tmp/kcache/ind_M16 --peers hf-llama
tar -czf $OUT/c1.tgz -C /tmp/r c1
p M64 $R 100 64 /tmp/kcache/ind_M64
tar -czf $OUT/c1.tgz -C /tmp/r c1
( s=$(date +%s); PYTHONPATH=/tmp/site:$R:$R/tests TORCHINDUCTOR_CACHE_DIR=/tmp/kcache/ind_t timeout $(left 585) python -m pytest -v -n 6 -p no:cacheprovider --tb=short -rfEs --durations=15 tests/test_gpu.py -k "(padded_qkv or fla_causal_conv or packed_training_on_gpu or fla_prebuild or gpu_backends_match or compiled_fla_training or compiled_layers_train_like_eager) and not flash_qla" > $W/test_split.log 2>&1; echo "== tests rc=$? $(( $(date +%s) - s )) s"; grep -E "PASSED|FAILED|ERROR|passed|failed|^E  |s call" $W/test_split.log | head -50 )
tar -czf $OUT/c1.tgz -C /tmp/r c1 && ls -la $OUT/c1.tgz
echo "total $(( $(date +%s) - t0 )) s"
