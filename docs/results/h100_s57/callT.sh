# session 57, call T: fla's autotune choices for the H100 (none are recorded: a fresh H100's first eager step timed
# fla's candidate configurations for 98 s in session 55). A fresh machine (empty Triton cache), batch 16 + packed +
# no-grad first (written at once), then the other batch sizes merged in with --keep-recorded.
mkdir -p /tmp/site /tmp/kcache; [ -d /tmp/site/fla ] || tar -xJf runs/gpu-site-slim.tar.xz -C /tmp/site
. docs/results/h200_s36/common.sh
export TRITON_CACHE_DIR=/tmp/kcache/triton_tune_$t0
W=/tmp/r/cT; mkdir -p $W
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee $W/gpu.txt
s=$(date +%s); timeout $(left 330) python benchmarks/tune_fla_configs.py --batches 16 --seq 1024 --out $W/tuned.json > $W/tune_1.txt 2>&1; echo "== tune 1 rc=$? $(( $(date +%s) - s )) s"; grep -vE "TileLang|^\s*$" $W/tune_1.txt | tail -16
cp $W/* $OUT/ 2>/dev/null
[ -f $W/tuned.json ] && { s=$(date +%s); timeout $(left 585) python benchmarks/tune_fla_configs.py --batches 1,4,8,32,64 --seq 1024 --keep-recorded --out $W/tuned.json > $W/tune_2.txt 2>&1; echo "== tune 2 rc=$? $(( $(date +%s) - s )) s"; grep -vE "TileLang|^\s*$" $W/tune_2.txt | tail -16; }
cp $W/* $OUT/ 2>/dev/null
echo "total $(( $(date +%s) - t0 )) s"
