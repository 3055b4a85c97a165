# call A (session 42, fresh machine): (a) bench_gpu at batch 16 with CUDA graphs, fla (Gluon conv) and HF Llama, each
# its own process, then a profiled trace of 3 more steps each (--trace: where the step leaves the GPU idle);
# (b) the owed GPU tests: the conv ops through the package's choice (100-channel cases), the prebuild test
. docs/results/h200_s36/common.sh
W=/tmp/r/cA; mkdir -p $W
python -c "import torch, triton, fla, transformers, tilelang; print(torch.__version__, triton.__version__, fla.__version__, transformers.__version__, tilelang.__version__)" 2>&1 | tail -1
( s=$(date +%s); PYTHONPATH=/tmp/site:$R timeout 330 python benchmarks/bench_gpu.py --compiled-only --no-generate --models llamathink:fla:cudagraphs:prebuild,hf-llama:cudagraphs --budget-s 160 --trace $W/traces --out $W/bench.json > $W/bench.txt 2>&1; echo "== bench rc=$? $(( $(date +%s) - s )) s"; grep '"model"' $W/bench.txt | cut -c1-1500 )
tar -czf $OUT/cA.tgz -C /tmp/r cA
t conv $R $(left 560) "fla_causal_conv or padded_qkv or fla_prebuild_child"
tar -czf $OUT/cA.tgz -C /tmp/r cA
echo "total $(( $(date +%s) - t0 )) s"
