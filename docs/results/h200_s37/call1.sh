# call 1: main's compiled step at batch 16 with combo kernels off and inductor's code kept (every inductor kernel
# named by its graph and FX nodes); one CSA layer against a full-attention layer (bench_csa --kernels) on main and
# on try/csa-uncached-blocks (gpu_s37/treeB: main with that branch's one line); the prebuild GPU tests rerun with
# six workers and a per-test timeout so that a failure prints
. gpu_s37/common.sh
W=/tmp/r/c1; mkdir -p $W
python -c "import torch, triton, fla, transformers; print(torch.__version__, triton.__version__, fla.__version__, transformers.__version__)"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
git log --oneline -1
p NC16 $R 200 16 /tmp/kcache/ind_NC16 --inductor-option combo_kernels=False --kernel-sources --out $W/src_NC16
tar -czf $OUT/c1.tgz -C /tmp/r c1
for tree in main:$R B:$R/gpu_s37/treeB; do n=${tree%%:*}; d=${tree#*:}
  ( s=$(date +%s); cd $d && PYTHONPATH=/tmp/site:$d TORCHINDUCTOR_CACHE_DIR=/tmp/kcache/ind_csa_$n timeout 150 python benchmarks/bench_csa.py --chunks 128 --kernels 40 --no-combo --out $W/csa_$n.json > $W/csa_$n.txt 2>&1; echo "== csa $n rc=$? $(( $(date +%s) - s )) s"; grep -E "^\| |ms" $W/csa_$n.txt | head -12 )
  tar -czf $OUT/c1.tgz -C /tmp/r c1
done
( s=$(date +%s); PYTHONPATH=/tmp/site:$R:$R/tests TORCHINDUCTOR_CACHE_DIR=/tmp/kcache/ind_t timeout $(left 580) python -m pytest -v -n 6 -p no:cacheprovider --timeout 300 --tb=long -rfEs --durations=15 tests/test_gpu.py -k "(padded_qkv or fla_causal_conv or packed_training_on_gpu or fla_prebuild or gpu_backends_match or compiled_fla_training or compiled_layers_train_like_eager) and not flash_qla" > $W/test_split.log 2>&1; echo "== tests rc=$? $(( $(date +%s) - s )) s"; grep -E "PASSED|FAILED|ERROR|passed|failed|^E  |s call|Timeout" $W/test_split.log | head -50 )
tar -czf $OUT/c1.tgz -C /tmp/r c1 && ls -la $OUT/c1.tgz
echo "total $(( $(date +%s) - t0 )) s"
