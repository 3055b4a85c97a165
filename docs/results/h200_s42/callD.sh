# call D (session 42, call C's machine straight after): batch 64 with CUDA graphs and the host-side checks:
# FlashQLA (prebuild), fla, HF Llama, each its own process
. docs/results/h200_s36/common.sh
W=/tmp/r/cD; mkdir -p $W
( s=$(date +%s); PYTHONPATH=/tmp/site:$R timeout 400 python benchmarks/bench_gpu.py --compiled-only --no-generate --batch 64 --models hf-llama:cudagraphs,llamathink:flash_qla:cudagraphs:prebuild,llamathink:fla:cudagraphs --budget-s 130 --out $W/bench.json > $W/bench.txt 2>&1; echo "== bench rc=$? $(( $(date +%s) - s )) s"; grep '"model"' $W/bench.txt | cut -c1-700 )
tar -czf $OUT/cD.tgz -C /tmp/r cD
echo "total $(( $(date +%s) - t0 )) s"
