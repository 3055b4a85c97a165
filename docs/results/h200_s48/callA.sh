# call A (session 48, a fresh machine): the chunked loss's float32 scaling (4e4b438: the divisor inside each chunk,
# the hidden gradient written in float32 in one product) against main (84bce19, runs/main_tree.tar.gz), bench_gpu
# with FlashQLA's kernels at batch 16, CUDA graphs, each its own process, alternating with HF Llama
[ -d /tmp/site/fla ] || { mkdir -p /tmp/site /tmp/kcache && tar -xJf runs/gpu-site-slim.tar.xz -C /tmp/site; }
. docs/results/h200_s36/common.sh
W=/tmp/r/cA; mkdir -p $W /tmp/main && tar -xzf runs/main_tree.tar.gz -C /tmp/main
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader > $W/gpu.txt
python -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)" >> $W/gpu.txt 2>&1
b() { local dir=$1; shift; ( s=$(date +%s); cd $dir && PYTHONPATH=/tmp/site:$dir:$dir/tests timeout $2 python benchmarks/bench_gpu.py --compiled-only --no-generate --models $3 --budget-s $4 --out $W/bench_$1.json > $W/bench_$1.txt 2>&1; echo "== bench $1 rc=$? $(( $(date +%s) - s )) s"; grep '"model"' $W/bench_$1.txt | cut -c1-330 ); }
b $R new1 130 llamathink:flash_qla:cudagraphs:prebuild 125
grep -q "is not available" $W/bench_new1.txt && { echo "fla did not import: stop"; tar -czf $OUT/cA.tgz -C /tmp/r cA; exit 3; }
b $R hf1 100 hf-llama:cudagraphs 95
tar -czf $OUT/cA.tgz -C /tmp/r cA
b /tmp/main main1 80 llamathink:flash_qla:cudagraphs 75
b $R new2 80 llamathink:flash_qla:cudagraphs 75
tar -czf $OUT/cA.tgz -C /tmp/r cA
[ $(left 580) -gt 70 ] && b $R hf2 $(left 580) hf-llama:cudagraphs $(( $(left 580) - 5 ))
tar -czf $OUT/cA.tgz -C /tmp/r cA
[ $(left 585) -gt 60 ] && b /tmp/main main2 $(left 585) llamathink:flash_qla:cudagraphs $(( $(left 585) - 5 ))
tar -czf $OUT/cA.tgz -C /tmp/r cA
echo "total $(( $(date +%s) - t0 )) s"
