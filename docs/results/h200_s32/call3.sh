# call 3: main at batch 16 (combo kernels on) three ways in one call, each its own process: as is (beside HF Llama),
# with inductor's persistent reductions widened to stride-1 inner reductions (gpu_s32/inner_strided.py, fresh
# inductor cache), with triton.multi_kernel=1; then the conv branch's GPU test with the dw tolerance mended
t0=$(date +%s)
[ -d /tmp/site/fla ] || { mkdir -p /tmp/site /tmp/kcache && tar -xJf runs/gpu-site.tar.xz -C /tmp/site; }
. docs/results/h200_s31/env.sh
R=$PWD; for b in conv; do rm -rf /tmp/$b; mkdir -p /tmp/$b && cp -r llamathink tests benchmarks setup.py /tmp/$b/ && cp -r gpu_s32/$b/. /tmp/$b/; done; W=/tmp/r/c3; mkdir -p $W
python -c "import torch._inductor.config as c; print('inductor_choices_class' in dir(c))"
p() { local name=$1 lim=$2; shift 2; ( s=$(date +%s); timeout $lim "$@" --compile --no-eager --no-decode --top-kernels 400 --batch 16 --backend fla --kernel-sources --out $W/src_$name > $W/kinds_$name.txt 2>&1; echo "== prof $name rc=$? $(( $(date +%s) - s )) s"; grep -E "^  [a-zA-Z].* ms .*%|wall time|GPU kernel time|inner_strided" $W/kinds_$name.txt ); }
p main 170 python benchmarks/profile_gpu.py --peers hf-llama
TORCHINDUCTOR_CACHE_DIR=/tmp/kcache/inductor_is p inner 170 python gpu_s32/inner_strided.py
TORCHINDUCTOR_CACHE_DIR=/tmp/kcache/inductor_mk p multi 170 python benchmarks/profile_gpu.py --inductor-option triton.multi_kernel=1
( cd /tmp/conv && PYTHONPATH=/tmp/site:/tmp/conv:/tmp/conv/tests timeout 100 python -m pytest -v -p no:cacheprovider --tb=short -rfEs tests/test_gpu.py -k "fla_causal_conv" > $W/test_conv3.log 2>&1; echo "== test conv3 rc=$?"; grep -E "PASSED|FAILED|ERROR|passed|failed|^E " $W/test_conv3.log | head )
tar -czf $OUT/c3.tgz -C /tmp/r c3 && ls -la $OUT/c3.tgz
echo "total $(( $(date +%s) - t0 )) s"
