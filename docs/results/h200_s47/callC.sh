# call C (session 47): the loss's compiled chunks of 4096 rows with each chunk's gradient freed (7de9e47) against main
# (bb241a0, session 46's tree), bench_gpu with FlashQLA's kernels at batch 16, alternating, HF Llama beside; then
# the loss's GPU tests
[ -d /tmp/site/fla ] || { mkdir -p /tmp/site /tmp/kcache && tar -xJf runs/gpu-site-trim.tar.xz -C /tmp/site; }
. docs/results/h200_s36/common.sh
W=/tmp/r/cC; mkdir -p $W /tmp/main && tar -xzf runs/main_tree.tar.gz -C /tmp/main
b() { local dir=$1; shift; ( s=$(date +%s); cd $dir && PYTHONPATH=/tmp/site:$dir:$dir/tests timeout $2 python benchmarks/bench_gpu.py --compiled-only --no-generate --models $3 --budget-s $4 --out $W/bench_$1.json > $W/bench_$1.txt 2>&1; echo "== bench $1 rc=$? $(( $(date +%s) - s )) s"; grep '"model"' $W/bench_$1.txt | cut -c1-330 ); }
b $R new1 120 llamathink:flash_qla:cudagraphs:prebuild 115
b /tmp/main main1 100 llamathink:flash_qla:cudagraphs 95
b $R hf 100 hf-llama:cudagraphs 95
tar -czf $OUT/cC.tgz -C /tmp/r cC
b $R new2 100 llamathink:flash_qla:cudagraphs 95
tar -czf $OUT/cC.tgz -C /tmp/r cC
t loss $R $(left 520) "compiled_chunked_loss_holds or chunked_loss_accumulates or head_gradient_accumulates"
tar -czf $OUT/cC.tgz -C /tmp/r cC
[ $(left 585) -gt 75 ] && b /tmp/main main2 $(left 585) llamathink:flash_qla:cudagraphs $(( $(left 585) - 5 ))
tar -czf $OUT/cC.tgz -C /tmp/r cC
echo "total $(( $(date +%s) - t0 )) s"
