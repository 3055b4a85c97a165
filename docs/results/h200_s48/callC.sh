# call C (session 48, call B's machine straight after): HF Qwen3.5 eager with a longer limit (its row in call B ran
# out of 70 s), then eager LlamaThink (fla) again beside it
[ -d /tmp/site/fla ] || { mkdir -p /tmp/site /tmp/kcache && tar -xJf runs/gpu-site-slim.tar.xz -C /tmp/site; }
. docs/results/h200_s36/common.sh
W=/tmp/r/cC; mkdir -p $W
e() { local name=$1 lim=$2 models=$3 budget=$4; shift 4; ( s=$(date +%s); PYTHONPATH=/tmp/site:$R:$R/tests timeout $lim python benchmarks/bench_gpu.py --no-generate --models $models --budget-s $budget --out $W/bench_$name.json "$@" > $W/bench_$name.txt 2>&1; echo "== bench $name rc=$? $(( $(date +%s) - s )) s"; grep '"model"' $W/bench_$name.txt | cut -c1-330 ); }
e qwen 230 hf-qwen3.5 225
tar -czf $OUT/cC.tgz -C /tmp/r cC
[ $(left 370) -gt 50 ] && e lt $(left 370) llamathink:fla $(( $(left 370) - 5 ))
tar -czf $OUT/cC.tgz -C /tmp/r cC
echo "total $(( $(date +%s) - t0 )) s"
