# call D (session 46, fresh machine): the rest of the change's GPU tests (the embedding's index_add backward; compiled
# runs with fla's kernels), then bench_gpu with fla's kernels, main (28a5474) against the change, HF Llama beside,
# then FlashQLA's kernels with the change (its prebuild run)
[ -d /tmp/site/fla ] || { mkdir -p /tmp/site /tmp/kcache && tar -xJf runs/gpu-site-trim.tar.xz -C /tmp/site; }
. docs/results/h200_s36/common.sh
W=/tmp/r/cD; mkdir -p $W /tmp/main && tar -xzf runs/main_tree.tar.gz -C /tmp/main
t emb $R 60 "embedding_lookup"
t runs $R 170 "compiled_runs_of_layers and fla"
tar -czf $OUT/cD.tgz -C /tmp/r cD
b() { local dir=$1; shift; ( s=$(date +%s); cd $dir && PYTHONPATH=/tmp/site:$dir:$dir/tests timeout $2 python benchmarks/bench_gpu.py --compiled-only --no-generate --models $3 --budget-s $4 --trace $W/traces_$1 --out $W/bench_$1.json > $W/bench_$1.txt 2>&1; echo "== bench $1 rc=$? $(( $(date +%s) - s )) s"; grep '"model"' $W/bench_$1.txt | cut -c1-330 ); }
b /tmp/main main $(left 330) llamathink:fla:cudagraphs 95
tar -czf $OUT/cD.tgz -C /tmp/r cD
b $R new $(left 470) llamathink:fla:cudagraphs,hf-llama:cudagraphs 95
tar -czf $OUT/cD.tgz -C /tmp/r cD
[ $(left 530) -gt 60 ] && b $R qla $(left 530) llamathink:flash_qla:cudagraphs:prebuild $(( $(left 530) - 5 ))
tar -czf $OUT/cD.tgz -C /tmp/r cD
echo "total $(( $(date +%s) - t0 )) s"
