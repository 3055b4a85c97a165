# call B (session 45, fresh machine): the GPU test of compiled runs of layers (CUDA graphs, float32 and fla), then
# bench_gpu with FlashQLA's kernels at batch 16: runs of the mixer pattern (the new default) against one layer per
# region (`:group1`), HF Llama beside, traces
[ -d /tmp/site/fla ] || { mkdir -p /tmp/site /tmp/kcache && tar -xJf runs/gpu-site-trim.tar.xz -C /tmp/site; }
. docs/results/h200_s36/common.sh
W=/tmp/r/cB; mkdir -p $W
t runs $R 200 "compiled_runs_of_layers or flex_attention_with_the_sdpa"
tar -czf $OUT/cB.tgz -C /tmp/r cB
b() { ( s=$(date +%s); timeout $2 python benchmarks/bench_gpu.py --compiled-only --no-generate --models $3 --budget-s $4 --trace $W/traces_$1 --out $W/bench_$1.json > $W/bench_$1.txt 2>&1; echo "== bench $1 rc=$? $(( $(date +%s) - s )) s"; grep '"model"' $W/bench_$1.txt | cut -c1-420 ); }
b qla $(left 585) llamathink:flash_qla:cudagraphs:prebuild,llamathink:flash_qla:cudagraphs:group1,llamathink:flash_qla:cudagraphs,hf-llama:cudagraphs 140
tar -czf $OUT/cB.tgz -C /tmp/r cB
echo "total $(( $(date +%s) - t0 )) s"
