# call E (session 56, for branch try/eager-conv-once = eager_conv_once.patch here, `git apply` on main; not run: no device time left): GPU tests of the eager conv in one launch (fla's conv against the reference, the split's views),
# the eager model against the CPU reference, the gates computed in fla's kernels; then, time left, this tree against
# HF Qwen3.5 in turns (bench_gpu --interleave).
mkdir -p /tmp/site /tmp/kcache; [ -d /tmp/site/fla ] || tar -xJf runs/gpu-site-slim.tar.xz -C /tmp/site
. docs/results/h200_s36/common.sh
W=/tmp/r/cE; mkdir -p $W
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.sm --format=csv,noheader > $W/gpu.txt; cat $W/gpu.txt
t conv $R 120 "(fla_causal_conv_matches and 100) or (backends_match and 16x32) or computing_the_gates"
tar -czf $OUT/cE.tgz -C /tmp/r cE
s=$(date +%s); lim=$(left 200); [ $lim -gt 60 ] && timeout $lim python benchmarks/bench_gpu.py --no-generate --models llamathink:fla,hf-qwen3.5 --interleave 6 --steps 10 --warmup 3 --out $W/il_tree.json > $W/il_tree.txt 2>&1; echo "== interleaved rc=$? $(( $(date +%s) - s )) s"; grep '"model"' $W/il_tree.txt | cut -c150-260
tar -czf $OUT/cE.tgz -C /tmp/r cE
