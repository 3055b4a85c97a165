# call 2: the conv branch's second form (one split op: forward per q/k/v part, one backward): its GPU tests; then
# batch-16 kernels of conv, main (beside HF Llama) and loss, each its own process and inductor cache
. gpu_s33/common.sh
W=/tmp/r/c2; mkdir -p $W
t conv_a /tmp/conv $(left 200) "hands_its_padded or fla_causal_conv or shipped_fla"
p conv_b16 /tmp/conv $(left 300) 16 --kernel-sources --out $W/src_conv
p main_b16 $R $(left 400) 16 --peers hf-llama
p loss_b16 /tmp/loss $(left 480) 16
t conv_b /tmp/conv $(left 570) "compiled_fla_training or packed_training_on_gpu"
tar -czf $OUT/c2.tgz -C /tmp/r c2 && ls -la $OUT/c2.tgz
echo "total $(( $(date +%s) - t0 )) s"
