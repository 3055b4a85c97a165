# call D (session 47, the machine of call C): batch 64 with FlashQLA's kernels, the loss's 4096-row chunks (7de9e47)
# against main (bb241a0), HF Llama beside; then fla's kernels at batch 16, new against main
. docs/results/h200_s36/common.sh
W=/tmp/r/cD; mkdir -p $W
b() { local dir=$1; shift; ( s=$(date +%s); cd $dir && PYTHONPATH=/tmp/site:$dir:$dir/tests timeout $2 python benchmarks/bench_gpu.py --compiled-only --no-generate --batch $3 --models $4 --budget-s $5 --out $W/bench_$1.json > $W/bench_$1.txt 2>&1; echo "== bench $1 rc=$? $(( $(date +%s) - s )) s"; grep '"model"' $W/bench_$1.txt | cut -c1-330 ); }
b $R new64 130 64 llamathink:flash_qla:cudagraphs:prebuild 125
b /tmp/main main64 90 64 llamathink:flash_qla:cudagraphs 85
b $R hf64 90 64 hf-llama:cudagraphs 85
tar -czf $OUT/cD.tgz -C /tmp/r cD
[ $(left 440) -gt 60 ] && b $R fla_new $(left 440) 16 llamathink:fla:cudagraphs $(( $(left 440) - 5 ))
[ $(left 520) -gt 60 ] && b /tmp/main fla_main $(left 520) 16 llamathink:fla:cudagraphs $(( $(left 520) - 5 ))
tar -czf $OUT/cD.tgz -C /tmp/r cD
echo "total $(( $(date +%s) - t0 )) s"
