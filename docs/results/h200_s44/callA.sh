# call A (session 44, fresh machine): the optimizer's GPU tests (the recorded Muon step, the fused AdamW groups),
# bench_optimizer.py for this tree and main's (HEAD 203fbdd, runs/main_tree.tar.gz), then the training loop's owed
# GPU tests (the late-read values)
[ -d /tmp/site/fla ] || { mkdir -p /tmp/site /tmp/kcache && tar -xJf runs/gpu-site-fla.tar.xz -C /tmp/site; }
. docs/results/h200_s36/common.sh
W=/tmp/r/cA; mkdir -p $W /tmp/main
tar -xzf runs/main_tree.tar.gz -C /tmp/main
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)"
( s=$(date +%s); timeout 120 python -m pytest -q -p no:cacheprovider -rfEs tests/test_muon.py -m gpu > $W/test_muon.log 2>&1; echo "== muon gpu tests rc=$? $(( $(date +%s) - s )) s"; tail -4 $W/test_muon.log )
bo() { ( s=$(date +%s); cd $2 && PYTHONPATH=/tmp/site:$2 timeout $3 python benchmarks/bench_optimizer.py --out $W/optimizer_$1.json > $W/optimizer_$1.log 2>&1; echo "== bench_optimizer $1 rc=$? $(( $(date +%s) - s )) s"; grep -v Warning $W/optimizer_$1.log | cut -c1-300 | head -30 ); }
bo new $R 120
bo main /tmp/main 120
bo new2 $R 100
tar -czf $OUT/cA.tgz -C /tmp/r cA
t loop $R $(left 585) "default_compiled_pretraining_replays or batch_copies_and_step_values"
tar -czf $OUT/cA.tgz -C /tmp/r cA
echo "total $(( $(date +%s) - t0 )) s"
