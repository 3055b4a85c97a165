# call A (session 52): record fla's choices for the kernels the eager fast paths add (tune_fla_configs
# --keep-recorded), then eager bench_gpu rows alternating this tree, HF Qwen3.5 and main (4ed4ef9,
# runs/main_tree.tar.gz), each in its own process
[ -d /tmp/site/fla ] || { mkdir -p /tmp/site /tmp/kcache && tar -xJf runs/gpu-site-slim.tar.xz -C /tmp/site; }
. docs/results/h200_s36/common.sh
W=/tmp/r/cA; mkdir -p $W /tmp/main && tar -xzf runs/main_tree.tar.gz -C /tmp/main
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.sm --format=csv,noheader > $W/gpu.txt
python -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)" >> $W/gpu.txt 2>&1
cat $W/gpu.txt
b() { local dir=$1; shift; ( s=$(date +%s); cd $dir && PYTHONPATH=/tmp/site:$dir:$dir/tests timeout $2 python benchmarks/bench_gpu.py --no-generate --models $3 --budget-s $4 --out $W/bench_$1.json > $W/bench_$1.txt 2>&1; echo "== bench $1 rc=$? $(( $(date +%s) - s )) s"; grep '"model"' $W/bench_$1.txt | cut -c1-330 ); }
cp llamathink/fla_configs/NVIDIA_H200.json $W/tuned.json
s=$(date +%s); timeout 200 python benchmarks/tune_fla_configs.py --batches 1,4,8,16,32,64 --seq 1024 --keep-recorded --out $W/tuned.json > $W/tune.txt 2>&1; echo "== tune rc=$? $(( $(date +%s) - s )) s"; tail -5 $W/tune.txt
cmp -s $W/tuned.json llamathink/fla_configs/NVIDIA_H200.json || cp $W/tuned.json llamathink/fla_configs/NVIDIA_H200.json
tar -czf $OUT/cA.tgz -C /tmp/r cA
b $R new1 100 llamathink:fla 30
b $R qwen1 150 hf-qwen3.5 30
b /tmp/main main1 60 llamathink:fla 30
b $R new2 60 llamathink:fla 30
tar -czf $OUT/cA.tgz -C /tmp/r cA
b $R qwen2 60 hf-qwen3.5 30
b /tmp/main main2 60 llamathink:fla 30
tar -czf $OUT/cA.tgz -C /tmp/r cA
echo "total $(( $(date +%s) - t0 )) s"
