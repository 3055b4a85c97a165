# call C (session 41, fresh machine): this session's tree (fla's Gluon conv the default): (a) GPU tests of the conv
# ops with each of fla's conv kernels; (b) bench_gpu at batch 16 with CUDA graphs, each its own process, HF Llama
# beside: FlashQLA cold with the prebuild, FlashQLA again (kernels built), fla; (c) the owed GPU test of
# gdn_backend auto's FlashQLA flow (fixed: its cache snapshot now taken after fla's own TileLang build)
. docs/results/h200_s36/common.sh
W=/tmp/r/cC; mkdir -p $W
python -c "import torch, triton, fla, transformers, tilelang; print(torch.__version__, triton.__version__, fla.__version__, transformers.__version__, tilelang.__version__)" 2>&1 | tail -1
t conv $R 120 "fla_causal_conv or padded_qkv"
( s=$(date +%s); PYTHONPATH=/tmp/site:$R timeout $(left 390) python benchmarks/bench_gpu.py --compiled-only --no-generate --models llamathink:flash_qla:cudagraphs:prebuild,llamathink:flash_qla:cudagraphs,llamathink:fla:cudagraphs,hf-llama:cudagraphs --budget-s 130 --out $W/bench.json > $W/bench.txt 2>&1; echo "== bench rc=$? $(( $(date +%s) - s )) s"; grep '"model"' $W/bench.txt | cut -c1-400 )
tar -czf $OUT/cC.tgz -C /tmp/r cC
t auto_flow $R $(left 590) "auto_layers_build_flash_qla"
tar -czf $OUT/cC.tgz -C /tmp/r cC
echo "total $(( $(date +%s) - t0 )) s"
