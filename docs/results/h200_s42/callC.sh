# call C (session 42, call B's machine straight after): FlashQLA with the host-side checks at batch 16 with CUDA
# graphs (cold with the prebuild, then with its kernels built), HF Llama beside, traces; then the owed test of
# gdn_backend auto's FlashQLA flow
. docs/results/h200_s36/common.sh
W=/tmp/r/cC; mkdir -p $W
( s=$(date +%s); PYTHONPATH=/tmp/site:$R timeout 330 python benchmarks/bench_gpu.py --compiled-only --no-generate --models llamathink:flash_qla:cudagraphs:prebuild,llamathink:flash_qla:cudagraphs,hf-llama:cudagraphs --budget-s 170 --trace $W/traces --out $W/bench.json > $W/bench.txt 2>&1; echo "== bench rc=$? $(( $(date +%s) - s )) s"; grep '"model"' $W/bench.txt | cut -c1-700 )
tar -czf $OUT/cC.tgz -C /tmp/r cC
t auto_flow $R $(left 585) "auto_layers_build_flash_qla"
tar -czf $OUT/cC.tgz -C /tmp/r cC
echo "total $(( $(date +%s) - t0 )) s"
