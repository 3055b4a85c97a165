# sourced by each call: the extra packages, the two branch trees (main + gpu_s33/<name>), helpers
t0=$(date +%s)
[ -d /tmp/site/fla ] || { mkdir -p /tmp/site /tmp/kcache && tar -xJf runs/gpu-site.tar.xz -C /tmp/site; }
. docs/results/h200_s31/env.sh
R=$PWD
for b in conv loss; do rm -rf /tmp/$b; mkdir -p /tmp/$b && cp -r llamathink tests benchmarks setup.py /tmp/$b/ && cp -r gpu_s33/$b/. /tmp/$b/; done
[ -d gpu_s33/both ] && { rm -rf /tmp/both; mkdir -p /tmp/both && cp -r llamathink tests benchmarks setup.py /tmp/both/ && cp -r gpu_s33/both/. /tmp/both/; }
# one inductor cache per version of a tree's package (its graph-cache key misses custom ops' tags and bodies)
ic() { echo "/tmp/kcache/inductor_$(find "$1/llamathink" -name '*.py' | sort | xargs cat | md5sum | cut -c1-12)"; }
left() { echo $(( $1 - $(date +%s) + t0 )); }
# t NAME DIR LIMIT -k-expr: GPU tests of a tree
t() { local name=$1 dir=$2 lim=$3; shift 3; ( s=$(date +%s); cd $dir && PYTHONPATH=/tmp/site:$dir:$dir/tests TORCHINDUCTOR_CACHE_DIR=$(ic $dir) timeout $lim python -m pytest -v -p no:cacheprovider --tb=short -rfEs --durations=8 tests/test_gpu.py -k "$@" > $W/test_$name.log 2>&1; echo "== test $name rc=$? $(( $(date +%s) - s )) s"; grep -E "PASSED|FAILED|ERROR|passed|failed|^E  " $W/test_$name.log | head -30 ); }
# p NAME DIR LIMIT BATCH [args]: the compiled step's kernels by kind
p() { local name=$1 dir=$2 lim=$3 b=$4; shift 4; [ $lim -lt 40 ] && { echo "== $name skipped ($lim s left)"; return; }
  ( s=$(date +%s); cd $dir && PYTHONPATH=/tmp/site:$dir:$dir/tests TORCHINDUCTOR_CACHE_DIR=$(ic $dir) timeout $lim python benchmarks/profile_gpu.py --compile --no-eager --no-decode --top-kernels 400 --batch $b --backend fla "$@" > $W/kinds_$name.txt 2>&1; echo "== prof $name rc=$? $(( $(date +%s) - s )) s"; grep -E "^  [a-zA-Z].* ms .*%|wall time|GPU kernel time|Error" $W/kinds_$name.txt | head -24 ); }
