# call 1 (carry runs/gpu-site.tar.xz): the L2-norm probe; the two branches' GPU tests (conv: gpu_s32/conv = s32/conv,
# loss: gpu_s32/loss = s32/loss, both main + one commit); compiled-step kernels at batch 16 (combo kernels on, code
# kept): main beside HF Llama, then conv, then loss, each its own process
t0=$(date +%s)
mkdir -p /tmp/site /tmp/kcache && tar -xJf runs/gpu-site.tar.xz -C /tmp/site
. docs/results/h200_s31/env.sh
R=$PWD; for b in conv loss; do [ -d /tmp/$b ] || { mkdir -p /tmp/$b && cp -r llamathink tests benchmarks setup.py /tmp/$b/ && cp -r gpu_s32/$b/. /tmp/$b/; }; done; W=/tmp/r/c1; mkdir -p $W
python -c "import torch, triton, fla, transformers; print(torch.__version__, triton.__version__, fla.__version__, transformers.__version__)"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
s=$(date +%s); timeout 200 python gpu_s32/l2norm_probe.py > $W/l2norm_probe.txt 2>&1; echo "== probe rc=$? $(( $(date +%s) - s )) s"
cat $W/l2norm_probe.txt | grep -v Warn | head -80
t() { local name=$1 dir=$2 lim=$3; shift 3; ( s=$(date +%s); cd $dir && PYTHONPATH=/tmp/site:$dir:$dir/tests timeout $lim python -m pytest -v -p no:cacheprovider --tb=short -rfEs --durations=6 tests/test_gpu.py -k "$@" > $W/test_$name.log 2>&1; echo "== test $name rc=$? $(( $(date +%s) - s )) s" ) & }
t conv /tmp/conv 240 "fla_causal_conv or hands_its_padded or compiled_fla_training"
t loss /tmp/loss 240 "head_gradient or chunked_loss"
wait
grep -h -E "PASSED|FAILED|ERROR|passed|failed|^E  .*assert" $W/test_*.log | head -40
p() { local name=$1 dir=$2 lim=$3; shift 3; ( s=$(date +%s); cd $dir && PYTHONPATH=/tmp/site:$dir:$dir/tests timeout $lim python benchmarks/profile_gpu.py --compile --no-eager --no-decode --top-kernels 400 --batch 16 --backend fla --kernel-sources --out $W/src_$name "$@" > $W/kinds_$name.txt 2>&1; echo "== prof $name rc=$? $(( $(date +%s) - s )) s"; grep -E "^  [a-zA-Z].* ms .*%|wall time|GPU kernel time" $W/kinds_$name.txt ); }
p main $R 200 --peers hf-llama
ls -la $W $W/src_* 2>/dev/null | head -30
tar -czf $OUT/c1.tgz -C /tmp/r c1 && ls -la $OUT/c1.tgz
echo "total $(( $(date +%s) - t0 )) s"
