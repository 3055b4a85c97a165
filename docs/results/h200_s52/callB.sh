# call B (session 52): the GPU tests of the eager fast paths and of the paths they change, and the decode test
# that had not run on a GPU
[ -d /tmp/site/fla ] || { mkdir -p /tmp/site /tmp/kcache && tar -xJf runs/gpu-site-slim.tar.xz -C /tmp/site; }
. docs/results/h200_s36/common.sh
W=/tmp/r/cB; mkdir -p $W
W=$W t new $R 330 "computing_the_gates or gated_norm_takes or backends_match or (packed_training_on_gpu and eager) or fla_causal_conv_matches or gives_way_to_forward_hooks or cached_decode_equals or fla_chunk_matches"
tar -czf $OUT/cB.tgz -C /tmp/r cB
echo "total $(( $(date +%s) - t0 )) s"
