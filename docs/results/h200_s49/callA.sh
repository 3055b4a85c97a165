# call A (session 49, a fresh machine): the eager step with fla's in-kernel gates and fused gated norm and CSA's
# whole-row masks (this tree) against main (bb9a7e5, runs/main_tree.tar.gz) and HF Qwen3.5's eager step, each model
# in its own process; then the GPU tests of the new paths and of the eager fla training they change
[ -d /tmp/site/fla ] || { mkdir -p /tmp/site /tmp/kcache && tar -xJf runs/gpu-site-slim.tar.xz -C /tmp/site; }
. docs/results/h200_s36/common.sh
W=/tmp/r/cA; mkdir -p $W /tmp/main && tar -xzf runs/main_tree.tar.gz -C /tmp/main
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader > $W/gpu.txt
python -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)" >> $W/gpu.txt 2>&1
PYTHONPATH=/tmp/site python -c "import fla, tilelang; print('fla', fla.__version__)" >> $W/gpu.txt 2>&1
cat $W/gpu.txt
# b DIR NAME LIMIT MODELS BUDGET: eager bench_gpu rows of the tree in DIR
b() { local dir=$1; shift; ( s=$(date +%s); cd $dir && PYTHONPATH=/tmp/site:$dir:$dir/tests timeout $2 python benchmarks/bench_gpu.py --no-generate --models $3 --budget-s $4 --out $W/bench_$1.json > $W/bench_$1.txt 2>&1; echo "== bench $1 rc=$? $(( $(date +%s) - s )) s"; grep '"model"' $W/bench_$1.txt | cut -c1-330 ); }
b $R new1 90 llamathink:fla 60
grep -q "is not available" $W/bench_new1.txt && { echo "fla did not import: stop"; tar -czf $OUT/cA.tgz -C /tmp/r cA; exit 3; }
b /tmp/main main1 80 llamathink:fla 55
tar -czf $OUT/cA.tgz -C /tmp/r cA
b $R qwen1 150 hf-qwen3.5 120
tar -czf $OUT/cA.tgz -C /tmp/r cA
W=$W t new $R $(left 585) "in_kernel or whole_row_masks or backends_match or (packed_training_on_gpu and eager) or fla_chunk_matches or fla_recurrent"
tar -czf $OUT/cA.tgz -C /tmp/r cA
echo "total $(( $(date +%s) - t0 )) s"
