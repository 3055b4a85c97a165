# call 1: main (in-place buffers off) at batch 16 beside HF Llama; the GPU training tests under training's new
# inductor options (fla and torch backends); batch 64's kernels and peak memory with the new options
. gpu_s35/common.sh
W=/tmp/r/c1; mkdir -p $W
python -c "import torch, triton, fla, transformers; print(torch.__version__, triton.__version__, fla.__version__, transformers.__version__)"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
p M16 $R 170 16 /tmp/kcache/ind_M16 --peers hf-llama
tar -czf $OUT/c1.tgz -C /tmp/r c1
TORCHINDUCTOR_CACHE_DIR=/tmp/kcache/ind_t t opts $R $(left 440) "(combo_kernels_train_like or compiled_layers_train_like_eager or cuda_graph) and not flash_qla"
tar -czf $OUT/c1.tgz -C /tmp/r c1
p M64 $R $(left 575) 64 /tmp/kcache/ind_M64
tar -czf $OUT/c1.tgz -C /tmp/r c1 && ls -la $OUT/c1.tgz
echo "total $(( $(date +%s) - t0 )) s"
