# call A (session 46, fresh machine): traces of main's step (bench_gpu, CUDA graphs, batch 16) to place what runs
# outside the compiled graphs: fla's kernels and HF Llama in one process each, then FlashQLA (built by its prebuild run)
[ -d /tmp/site/fla ] || { mkdir -p /tmp/site /tmp/kcache && tar -xJf runs/gpu-site-trim.tar.xz -C /tmp/site; }
. docs/results/h200_s36/common.sh
W=/tmp/r/cA; mkdir -p $W
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)"
b() { ( s=$(date +%s); timeout $2 python benchmarks/bench_gpu.py --compiled-only --no-generate --models $3 --budget-s $4 --trace $W/traces_$1 --out $W/bench_$1.json > $W/bench_$1.txt 2>&1; echo "== bench $1 rc=$? $(( $(date +%s) - s )) s"; grep '"model"' $W/bench_$1.txt | cut -c1-420 ); }
b fla $(left 230) llamathink:fla:cudagraphs,hf-llama:cudagraphs 100
tar -czf $OUT/cA.tgz -C /tmp/r cA
b qla $(left 560) llamathink:flash_qla:cudagraphs:prebuild,llamathink:flash_qla:cudagraphs 140
tar -czf $OUT/cA.tgz -C /tmp/r cA
echo "total $(( $(date +%s) - t0 )) s"
