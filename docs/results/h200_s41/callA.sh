# call A (session 41, fresh machine): (a) fla's Gluon conv against its Triton conv, alone (bench_conv.py: b16, b64,
# packed); (b) GPU tests: the conv ops under FLA_CONV_GLUON=1, the owed test of gdn_backend auto's FlashQLA flow,
# cached and CUDA-graph decoding; (c) the step's kernels (profile_gpu --cuda-graphs) with each conv, HF Llama beside
. docs/results/h200_s36/common.sh
W=/tmp/r/cA; mkdir -p $W
python -c "import torch, triton, fla, transformers, tilelang; print(torch.__version__, triton.__version__, fla.__version__, transformers.__version__, tilelang.__version__)" 2>&1 | tail -1
for a in "--batch 16" "--batch 64" "--batch 16 --packed"; do
  timeout 120 python benchmarks/bench_conv.py $a --out $W/conv_$(echo $a | tr -d ' -').json 2>&1 | tail -3; done
FLA_CONV_GLUON=1 t conv_gluon $R $(left 200) "fla_causal_conv or padded_qkv"
t auto_flow $R $(left 420) "auto_layers_build_flash_qla or cached_decode_equals or cuda_graph_decode"
tar -czf $OUT/cA.tgz -C /tmp/r cA
p fla_triton $R $(left 560) 16 /tmp/kcache/ind_G16 --cuda-graphs --peers hf-llama
FLA_CONV_GLUON=1 p fla_gluon $R $(left 590) 16 /tmp/kcache/ind_G16 --cuda-graphs
tar -czf $OUT/cA.tgz -C /tmp/r cA
echo "total $(( $(date +%s) - t0 )) s"
