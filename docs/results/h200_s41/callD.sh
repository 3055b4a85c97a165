# call D (session 41, call C's machine, started within 30 s of its end: the same caches): HF Llama's row that call
# C's limit cut, bench_gpu at batch 16 with CUDA graphs
. docs/results/h200_s36/common.sh; W=/tmp/r/cD; mkdir -p $W; PYTHONPATH=/tmp/site:$R timeout 120 python benchmarks/bench_gpu.py --compiled-only --no-generate --models hf-llama:cudagraphs --budget-s 115 --out $W/bench.json > $W/bench.txt 2>&1; echo "rc=$?"; grep '"model"' $W/bench.txt | cut -c1-300; tar -czf $OUT/cD.tgz -C /tmp/r cD
