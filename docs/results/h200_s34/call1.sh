# call 1: CSA local chunk sizes (bench_csa), then main's batch-16 kernels in three processes: two with empty inductor
# caches (A, B), one on A's cache (A2): do identical code's kernel times follow inductor's autotune picks?
. gpu_s34/common.sh
W=/tmp/r/c1; mkdir -p $W
python -c "import torch, triton, fla, transformers; print(torch.__version__, triton.__version__, fla.__version__, transformers.__version__)"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
( s=$(date +%s); TORCHINDUCTOR_CACHE_DIR=/tmp/kcache/ind_csa timeout 200 python benchmarks/bench_csa.py --out $W/csa_b16.json > $W/csa_b16.log 2>&1; echo "== csa rc=$? $(( $(date +%s) - s )) s"; grep -v Warn $W/csa_b16.log | tail -8 )
p A $R $(left 330) 16 /tmp/kcache/ind_A
p B $R $(left 450) 16 /tmp/kcache/ind_B
p A2 $R $(left 570) 16 /tmp/kcache/ind_A
tar -czf $OUT/c1.tgz -C /tmp/r c1 && ls -la $OUT/c1.tgz
echo "total $(( $(date +%s) - t0 )) s"
