# call 4 (the machine of call 3, warm): main at batch 16 with the widened persistent reductions; then the conv
# branch's conv test alone with more time
t0=$(date +%s)
[ -d /tmp/site/fla ] || { mkdir -p /tmp/site /tmp/kcache && tar -xJf runs/gpu-site.tar.xz -C /tmp/site; }
. docs/results/h200_s31/env.sh
for b in conv; do rm -rf /tmp/$b; mkdir -p /tmp/$b && cp -r llamathink tests benchmarks setup.py /tmp/$b/ && cp -r gpu_s32/$b/. /tmp/$b/; done; W=/tmp/r/c4; mkdir -p $W
s=$(date +%s); TORCHINDUCTOR_CACHE_DIR=/tmp/kcache/inductor_is timeout 200 python gpu_s32/inner_strided.py --compile --no-eager --no-decode --top-kernels 400 --batch 16 --backend fla --kernel-sources --out $W/src_inner > $W/kinds_inner.txt 2>&1; echo "== prof inner rc=$? $(( $(date +%s) - s )) s"; grep -E "^  [a-zA-Z].* ms .*%|wall time|GPU kernel time|inner_strided|Error" $W/kinds_inner.txt
( cd /tmp/conv && PYTHONPATH=/tmp/site:/tmp/conv:/tmp/conv/tests timeout $(( 440 - $(date +%s) + t0 )) python -m pytest -v -p no:cacheprovider --tb=short -rfEs tests/test_gpu.py -k "fla_causal_conv" > $W/test_conv4.log 2>&1; echo "== test conv4 rc=$?"; grep -E "PASSED|FAILED|ERROR|passed|failed|^E " $W/test_conv4.log | head )
tar -czf $OUT/c4.tgz -C /tmp/r c4 && ls -la $OUT/c4.tgz
echo "total $(( $(date +%s) - t0 )) s"
