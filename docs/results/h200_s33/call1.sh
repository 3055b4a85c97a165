# call 1 (carry runs/gpu-site.tar.xz): conv branch: record fla's choices for its new conv shapes (--keep-recorded),
# its GPU tests, the loss branch's GPU tests beside them; then batch-16 kernels: conv, main beside HF Llama
. gpu_s33/common.sh
W=/tmp/r/c1; mkdir -p $W
python -c "import torch, triton, fla, transformers; print(torch.__version__, triton.__version__, fla.__version__, transformers.__version__)"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
cp /tmp/conv/llamathink/fla_configs/NVIDIA_H200.json $W/NVIDIA_H200.json
( s=$(date +%s); cd /tmp/conv && PYTHONPATH=/tmp/site:/tmp/conv timeout 200 python benchmarks/tune_fla_configs.py --keep-recorded --batches 16 --out $W/NVIDIA_H200.json > $W/tune.log 2>&1; echo "== tune rc=$? $(( $(date +%s) - s )) s"; grep -v Warn $W/tune.log | tail -16 )
cmp -s $W/NVIDIA_H200.json /tmp/conv/llamathink/fla_configs/NVIDIA_H200.json || cp $W/NVIDIA_H200.json /tmp/conv/llamathink/fla_configs/
t loss /tmp/loss 150 "head_gradient or chunked_loss" &
t conv /tmp/conv $(left 380) "hands_its_padded or fla_causal_conv or compiled_fla_training or packed_training_on_gpu or shipped_fla"
wait
p conv_b16 /tmp/conv $(left 480) 16 --kernel-sources --out $W/src_conv
p main_b16 $R $(left 575) 16 --peers hf-llama
tar -czf $OUT/c1.tgz -C /tmp/r c1 && ls -la $OUT/c1.tgz
echo "total $(( $(date +%s) - t0 )) s"
