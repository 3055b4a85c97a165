# call C (session 45, call B's machine straight after): bench_gpu with FlashQLA's kernels at batch 64: runs of the
# mixer pattern (the new default) against one layer per region (`:group1`), HF Llama beside
[ -d /tmp/site/fla ] || { mkdir -p /tmp/site /tmp/kcache && tar -xJf runs/gpu-site-trim.tar.xz -C /tmp/site; }
. docs/results/h200_s36/common.sh
W=/tmp/r/cC; mkdir -p $W
b() { ( s=$(date +%s); timeout $2 python benchmarks/bench_gpu.py --compiled-only --no-generate --batch 64 --models $3 --budget-s $4 --out $W/bench_$1.json > $W/bench_$1.txt 2>&1; echo "== bench $1 rc=$? $(( $(date +%s) - s )) s"; grep '"model"' $W/bench_$1.txt | cut -c1-420 ); }
b qla64 $(left 300) llamathink:flash_qla:cudagraphs,llamathink:flash_qla:cudagraphs:group1,hf-llama:cudagraphs 95
tar -czf $OUT/cC.tgz -C /tmp/r cC
echo "total $(( $(date +%s) - t0 )) s"
