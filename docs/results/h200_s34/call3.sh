# call 3: training's new inductor options (inplace_buffers=False): the GPU tests that compile as training does; the
# batch-16 kernels beside HF Llama compiled whole (G); batch 64 with (I) and without (J) the option: peak memory.
# Results are packed after each step (the call may be cut by the session's device time).
. gpu_s34/common.sh
W=/tmp/r/c3; mkdir -p $W
pack() { tar -czf $OUT/c3.tgz -C /tmp/r c3; }
export TORCHINDUCTOR_CACHE_DIR=/tmp/kcache/ind_T
t train $R 220 "combo_kernels_train_like or cuda_graph_gradients_equal_default_mode_gradients or compiled_layers_train_like_eager"; pack
p G $R $(left 330) 16 /tmp/kcache/ind_G --peers hf-llama; pack
p I $R $(left 420) 64 /tmp/kcache/ind_I; pack
p J $R $(left 500) 64 /tmp/kcache/ind_J --inductor-option inplace_buffers=True; pack
ls -la $OUT/c3.tgz
echo "total $(( $(date +%s) - t0 )) s"
