# call D (session 48, the last device time): where the eager step's time goes (fla's kernels, batch 16), since eager
# LlamaThink ran at 0.71-0.82x HF Qwen3.5's eager tokens/s in calls B and C
[ -d /tmp/site/fla ] || { mkdir -p /tmp/site /tmp/kcache && tar -xJf runs/gpu-site-slim.tar.xz -C /tmp/site; }
. docs/results/h200_s36/common.sh
W=$OUT/cD; mkdir -p $W
( s=$(date +%s); PYTHONPATH=/tmp/site:$R:$R/tests timeout $(left 190) python benchmarks/profile_gpu.py --backend fla --no-decode --top-kernels 60 --out $W > $W/profile.txt 2>&1; echo "== profile rc=$? $(( $(date +%s) - s )) s" )
grep -E "wall|GPU kernel time|per layer|ms" $W/profile.txt | head -60
echo "total $(( $(date +%s) - t0 )) s"
