# call 5 (the machine of calls 3-4, warm): the conv branch against main on one machine, batch 16 then 64, each
# tree its own process (combo kernels on)
t0=$(date +%s)
. docs/results/h200_s31/env.sh
W=/tmp/r/c5; mkdir -p $W
p() { local name=$1 dir=$2 b=$3; local left=$(( 370 - $(date +%s) + t0 )); [ $left -lt 40 ] && { echo "== $name skipped"; return; }
  ( s=$(date +%s); cd $dir && PYTHONPATH=/tmp/site:$dir:$dir/tests timeout $left python benchmarks/profile_gpu.py --compile --no-eager --no-decode --top-kernels 400 --batch $b --backend fla > $W/kinds_$name.txt 2>&1; echo "== prof $name rc=$? $(( $(date +%s) - s )) s"; grep -E "^  [a-zA-Z].* ms .*%|GPU kernel time" $W/kinds_$name.txt | head -4 ); }
p conv_b16 /tmp/conv 16
p main_b16 $PWD 16
p conv_b64 /tmp/conv 64
p main_b64 $PWD 64
tar -czf $OUT/c5.tgz -C /tmp/r c5
echo "total $(( $(date +%s) - t0 )) s"
