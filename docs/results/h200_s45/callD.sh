# call D (session 45, call C's machine straight after; the packages from call B): bench_quality's training loop
# (Muon, clipping, compiled, CUDA graphs, batch 16 x 1024, real text, 160 steps, fla's kernels): this tree (runs of
# the mixer pattern) and main's (HEAD cff9e24: one layer per region, runs/main_tree.tar.gz), alternating, then HF
# Llama in the same harness
[ -d /tmp/site/fla ] || { echo "no packages on this machine (a fresh one): stop"; exit 3; }
. docs/results/h200_s36/common.sh
W=/tmp/r/cD; mkdir -p $W /tmp/data /tmp/main
[ -d /tmp/data/english1k ] || tar -xJf runs/english1k.tar.xz -C /tmp/data
tar -xzf runs/main_tree.tar.gz -C /tmp/main
q() { local name=$1 dir=$2 lim=$3; shift 3; ( s=$(date +%s); cd $dir && PYTHONPATH=/tmp/site:$dir timeout $lim python benchmarks/bench_quality.py --data /tmp/data/english1k --val-docs 50 --steps 160 --eval-every 160 --eval-windows 4 --speed-from 40 --out $W/q_$name "$@" > $W/quality_$name.log 2>&1; echo "== quality $name rc=$? $(( $(date +%s) - s )) s"; grep -E "final|Error" $W/quality_$name.log | head -4 ); }
q new $R 130 --run lt:compile=1,gdn_backend=fla
q main /tmp/main 120 --run lt:compile=1,gdn_backend=fla
q new2 $R 90 --run lt:compile=1,gdn_backend=fla
q main2 /tmp/main 90 --run lt:compile=1,gdn_backend=fla
tar -czf $OUT/cD.tgz -C /tmp/r cD
q llama $R $(left 570) --run llama:model=hf-llama,compile=1,compile_mode=reduce-overhead,combo_kernels=1
tar -czf $OUT/cD.tgz -C /tmp/r cD
echo "total $(( $(date +%s) - t0 )) s"
# call E (session 45, fresh machine, the tree after the review's fixes, nothing carried):
#   export PYTHONPATH=$PWD:$PWD/tests CUBLAS_WORKSPACE_CONFIG=:4096:8
#   timeout 200 python -m pytest -q -p no:cacheprovider -rfEs tests/test_gpu.py -k "compiled_runs_of_layers"
#   -> 1 passed (float32, the PyTorch kernels), 1 skipped (fla is not installed), 51.4 s
