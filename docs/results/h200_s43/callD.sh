# call D (session 43, call C's warm machine): fla's Triton conv kernels (LLAMATHINK_FLA_CONV=triton) at call C's
# seeds and batches, paired with call C's fla runs (fla's Gluon conv, the default)
. docs/results/h200_s36/common.sh
W=/tmp/r/cD; mkdir -p $W
( s=$(date +%s); LLAMATHINK_FLA_CONV=triton timeout 400 python benchmarks/bench_quality.py --data /tmp/data/english1k --val-docs 50 --steps 250 --eval-every 50 --eval-windows 8 --speed-from 60 --out $W/q --run fla-triton-s0:compile=1,gdn_backend=fla,seed=0 --run fla-triton-s1:compile=1,gdn_backend=fla,seed=1 > $W/quality.log 2>&1; echo "== quality rc=$? $(( $(date +%s) - s )) s"; grep -E "final|Error|error|conv" $W/quality.log | head -12 )
tar -czf $OUT/cD.tgz -C /tmp/r cD
echo "total $(( $(date +%s) - t0 )) s"
