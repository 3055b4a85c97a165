# call D (session 44, fresh machine): call C's A/B again with longer windows, alternating the trees: bench_quality's
# loop (LlamaThink, fla's kernels, Muon, CUDA graphs, batch 16 x 1024, 300 steps, tokens/s over steps 60-300), this
# tree's optimizer against main's (HEAD 203fbdd), three runs each (the first of each compiles cold)
[ -d /tmp/site/fla ] || { mkdir -p /tmp/site /tmp/kcache && tar -xJf runs/gpu-site-fla.tar.xz -C /tmp/site; }
. docs/results/h200_s36/common.sh
W=/tmp/r/cD; mkdir -p $W /tmp/data /tmp/main
[ -d /tmp/data/english1k ] || tar -xJf runs/english1k.tar.xz -C /tmp/data
tar -xzf runs/main_tree.tar.gz -C /tmp/main
q() { local name=$1 dir=$2 lim=$3; shift 3; [ $lim -lt 30 ] && { echo "== $name skipped"; return; }; ( s=$(date +%s); cd $dir && PYTHONPATH=/tmp/site:$dir timeout $lim python benchmarks/bench_quality.py --data /tmp/data/english1k --val-docs 50 --steps 300 --eval-every 300 --eval-windows 2 --speed-from 60 --out $W/q_$name "$@" > $W/quality_$name.log 2>&1; echo "== quality $name rc=$? $(( $(date +%s) - s )) s"; grep -E "final|Error" $W/quality_$name.log | head -4 ); }
for i in 1 2 3; do
  q new$i $R $(( $(left 470) < 130 ? $(left 470) : 130 )) --run lt:compile=1,gdn_backend=fla
  q main$i /tmp/main $(( $(left 470) < 130 ? $(left 470) : 130 )) --run lt:compile=1,gdn_backend=fla
done
tar -czf $OUT/cD.tgz -C /tmp/r cD
echo "total $(( $(date +%s) - t0 )) s"
