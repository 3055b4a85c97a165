# sourced by each call: the extra packages, helpers (session 38)
t0=$(date +%s)
[ -d /tmp/site/fla ] || { mkdir -p /tmp/site /tmp/kcache && tar -xJf runs/gpu-site.tar.xz -C /tmp/site; }
. docs/results/h200_s31/env.sh
R=$PWD
left() { echo $(( $1 - $(date +%s) + t0 )); }
# t NAME DIR LIMIT -k-expr: GPU tests of a tree (inductor cache as set in the environment)
t() { local name=$1 dir=$2 lim=$3; shift 3; ( s=$(date +%s); cd $dir && PYTHONPATH=/tmp/site:$dir:$dir/tests timeout $lim python -m pytest -v -p no:cacheprovider --tb=short -rfEs --durations=8 tests/test_gpu.py -k "$@" > $W/test_$name.log 2>&1; echo "== test $name rc=$? $(( $(date +%s) - s )) s"; grep -E "PASSED|FAILED|ERROR|passed|failed|^E  " $W/test_$name.log | head -30 ); }
# p NAME DIR LIMIT BATCH CACHE [args]: the compiled step's kernels by kind, inductor cache folder CACHE
p() { local name=$1 dir=$2 lim=$3 b=$4 c=$5; shift 5; [ $lim -lt 40 ] && { echo "== $name skipped ($lim s left)"; return; }
  ( s=$(date +%s); cd $dir && PYTHONPATH=/tmp/site:$dir:$dir/tests TORCHINDUCTOR_CACHE_DIR=$c timeout $lim python benchmarks/profile_gpu.py --compile --no-eager --no-decode --top-kernels 400 --batch $b --backend fla "$@" > $W/kinds_$name.txt 2>&1; echo "== prof $name rc=$? $(( $(date +%s) - s )) s"; grep -E "^  [a-zA-Z].* ms .*%|wall time|GPU kernel time|Error" $W/kinds_$name.txt | head -24 ); }
