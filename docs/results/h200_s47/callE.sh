# call E (session 47, a fresh machine, the session's last device seconds): HF Llama, then FlashQLA's kernels with the
# loss's 4096-row chunks (7de9e47, its prebuild run), batch 16
[ -d /tmp/site/fla ] || { mkdir -p /tmp/site /tmp/kcache && tar -xJf runs/gpu-site-trim.tar.xz -C /tmp/site; }
. docs/results/h200_s36/common.sh
W=/tmp/r/cE; mkdir -p $W
b() { local name=$1; shift; ( s=$(date +%s); PYTHONPATH=/tmp/site:$R:$R/tests timeout $1 python benchmarks/bench_gpu.py --compiled-only --no-generate --models $2 --budget-s $3 --out $W/bench_$name.json > $W/bench_$name.txt 2>&1; echo "== bench $name rc=$? $(( $(date +%s) - s )) s"; grep '"model"' $W/bench_$name.txt | cut -c1-330 ); }
b hf 70 hf-llama:cudagraphs 65
tar -czf $OUT/cE.tgz -C /tmp/r cE
b new $(left 185) llamathink:flash_qla:cudagraphs:prebuild $(( $(left 185) - 3 ))
tar -czf $OUT/cE.tgz -C /tmp/r cE
echo "total $(( $(date +%s) - t0 )) s"
