# call 2 (the machine of call 1, warm): compiled-step kernels at batch 16 of the two branches, each its own process
t0=$(date +%s)
[ -d /tmp/site/fla ] || { mkdir -p /tmp/site /tmp/kcache && tar -xJf runs/gpu-site.tar.xz -C /tmp/site; }
. docs/results/h200_s31/env.sh
R=$PWD; for b in conv loss; do [ -d /tmp/$b ] || { mkdir -p /tmp/$b && cp -r llamathink tests benchmarks setup.py /tmp/$b/ && cp -r gpu_s32/$b/. /tmp/$b/; }; done; W=/tmp/r/c2; mkdir -p $W
p() { local name=$1 dir=$2 lim=$3 b=$4; shift 4; ( s=$(date +%s); cd $dir && PYTHONPATH=/tmp/site:$dir:$dir/tests timeout $lim python benchmarks/profile_gpu.py --compile --no-eager --no-decode --top-kernels 400 --batch $b --backend fla --kernel-sources --out $W/src_$name "$@" > $W/kinds_$name.txt 2>&1; echo "== prof $name rc=$? $(( $(date +%s) - s )) s"; grep -E "^  [a-zA-Z].* ms .*%|wall time|GPU kernel time" $W/kinds_$name.txt ); }
p conv /tmp/conv 170 16
p loss /tmp/loss 170 16
( cd /tmp/conv && PYTHONPATH=/tmp/site:/tmp/conv:/tmp/conv/tests timeout 200 python -m pytest -v -p no:cacheprovider --tb=short -rfEs --durations=6 tests/test_gpu.py -k "hands_its_padded or fla_causal_conv" > $W/test_conv2.log 2>&1; echo "== test conv2 rc=$?"; grep -E "PASSED|FAILED|ERROR|passed|failed|^E " $W/test_conv2.log | head )
tar -czf $OUT/c2.tgz -C /tmp/r c2 && ls -la $OUT/c2.tgz
echo "total $(( $(date +%s) - t0 )) s"
