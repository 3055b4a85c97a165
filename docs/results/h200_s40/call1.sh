# call 1 (session 40, fresh machine): (a) FlashQLA's first step once TileLang's disk cache holds its kernels (a
# second run on the machine), and its tokens/s, beside fla and HF Llama, batch 16, CUDA graphs, each its own process;
# (b) the first GPU run of profile_gpu --cuda-graphs (the layers as one-GPU training replays them), HF Llama beside
. docs/results/h200_s36/common.sh
W=/tmp/r/c1; mkdir -p $W
python -c "import torch, triton, fla, transformers, tilelang; print(torch.__version__, triton.__version__, fla.__version__, transformers.__version__, tilelang.__version__)" 2>&1 | tail -1
( s=$(date +%s); PYTHONPATH=/tmp/site:$R timeout 400 python benchmarks/bench_gpu.py --compiled-only --no-generate --models llamathink:flash_qla:cudagraphs:prebuild,llamathink:flash_qla:cudagraphs,llamathink:fla:cudagraphs,hf-llama:cudagraphs --budget-s 150 --out $W/bench_qla.json > $W/bench_qla.txt 2>&1; echo "== qla rc=$? $(( $(date +%s) - s )) s"; grep '"model"' $W/bench_qla.txt | cut -c1-420 )
tar -czf $OUT/c1.tgz -C /tmp/r c1
p G16 $R $(left 585) 16 /tmp/kcache/ind_G16 --cuda-graphs --peers hf-llama
tar -czf $OUT/c1.tgz -C /tmp/r c1
echo "total $(( $(date +%s) - t0 )) s"
