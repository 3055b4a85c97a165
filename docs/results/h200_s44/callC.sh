# call C (session 44, fresh machine): bench_quality's training loop (Muon, clipping, compiled, CUDA graphs, batch
# 16 x 1024, real text, 160 steps), as session 43's call B ran it: LlamaThink with fla's kernels with this tree's
# optimizer and with main's (HEAD 203fbdd, runs/main_tree.tar.gz), and HF Llama, one after the other in one call
[ -d /tmp/site/fla ] || { mkdir -p /tmp/site /tmp/kcache && tar -xJf runs/gpu-site-fla.tar.xz -C /tmp/site; }
. docs/results/h200_s36/common.sh
W=/tmp/r/cC; mkdir -p $W /tmp/data /tmp/main
[ -d /tmp/data/english1k ] || tar -xJf runs/english1k.tar.xz -C /tmp/data
tar -xzf runs/main_tree.tar.gz -C /tmp/main
q() { local name=$1 dir=$2 lim=$3; shift 3; ( s=$(date +%s); cd $dir && PYTHONPATH=/tmp/site:$dir timeout $lim python benchmarks/bench_quality.py --data /tmp/data/english1k --val-docs 50 --steps 160 --eval-every 160 --eval-windows 4 --speed-from 40 --out $W/q_$name "$@" > $W/quality_$name.log 2>&1; echo "== quality $name rc=$? $(( $(date +%s) - s )) s"; grep -E "final|Error" $W/quality_$name.log | head -4 ); }
q new $R 170 --run lt:compile=1,gdn_backend=fla
q main /tmp/main 150 --run lt:compile=1,gdn_backend=fla
q llama $R 140 --run llama:model=hf-llama,compile=1,compile_mode=reduce-overhead,combo_kernels=1
tar -czf $OUT/cC.tgz -C /tmp/r cC
echo "total $(( $(date +%s) - t0 )) s"
