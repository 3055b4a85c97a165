# call B (session 46): inductor's mix-order reductions (a norm's input and weight gradients in one kernel) end with an
# aten sum over [rows / split, channels] partials; call A's traces put 96 of them at 0.82 ms a step. Probe the split
# size (LT_MOR_SPLIT through exp/sitecustomize.py) on fla's kernels, CUDA graphs, batch 16, traces
[ -d /tmp/site/fla ] || { mkdir -p /tmp/site /tmp/kcache && tar -xJf runs/gpu-site-trim.tar.xz -C /tmp/site; }
. docs/results/h200_s36/common.sh
export PYTHONPATH=$PWD/docs/results/h200_s46/exp:$PYTHONPATH
W=/tmp/r/cB; mkdir -p $W
python -c "import torch._inductor.config as c; print('split size option', c.triton.mix_order_reduction_split_size)"
b() { ( s=$(date +%s); timeout $2 python benchmarks/bench_gpu.py --compiled-only --no-generate --models $3 --budget-s $4 --trace $W/traces_$1 --out $W/bench_$1.json > $W/bench_$1.txt 2>&1; echo "== bench $1 rc=$? $(( $(date +%s) - s )) s"; grep '"model"' $W/bench_$1.txt | cut -c1-330 ); }
b main 125 llamathink:fla:cudagraphs 90
tar -czf $OUT/cB.tgz -C /tmp/r cB
for n in 128 64 32; do [ $(left 585) -gt 100 ] && LT_MOR_SPLIT=$n b s$n $(( $(left 585) < 125 ? $(left 585) : 125 )) llamathink:fla:cudagraphs 90; done
tar -czf $OUT/cB.tgz -C /tmp/r cB
echo "total $(( $(date +%s) - t0 )) s"
