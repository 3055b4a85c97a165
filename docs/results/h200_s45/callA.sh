# call A (session 45, fresh machine): the decoder layers compiled four at a time (one region per run of the mixer
# pattern linear, linear, csa, full: `compile_layers(layers_per_graph=4)`) against one layer at a time, fla's kernels,
# CUDA graphs, batch 16; cold first steps (empty compiler caches, the prebuild) then warm, HF Llama beside; traces
[ -d /tmp/site/fla ] || { mkdir -p /tmp/site /tmp/kcache && tar -xJf runs/gpu-site-fla.tar.xz -C /tmp/site; }
. docs/results/h200_s36/common.sh
W=/tmp/r/cA; mkdir -p $W
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)"
b() { ( s=$(date +%s); timeout $2 python benchmarks/bench_gpu.py --compiled-only --no-generate --models $3 --budget-s $4 --trace $W/traces_$1 --out $W/bench_$1.json > $W/bench_$1.txt 2>&1; echo "== bench $1 rc=$? $(( $(date +%s) - s )) s"; grep '"model"' $W/bench_$1.txt | cut -c1-600 ); }
b cold $(left 250) llamathink:fla:cudagraphs:prebuild:cold,llamathink:fla:cudagraphs:group4:prebuild:cold 115
tar -czf $OUT/cA.tgz -C /tmp/r cA
b warm $(left 500) llamathink:fla:cudagraphs,llamathink:fla:cudagraphs:group4,hf-llama:cudagraphs,llamathink:fla:cudagraphs:group4 80
tar -czf $OUT/cA.tgz -C /tmp/r cA
tar -czf $OUT/cA.tgz -C /tmp/r cA
echo "total $(( $(date +%s) - t0 )) s"
