# call 3 (session 39): the hyper-connections' share of the compiled step's kernels: main (HF Llama compiled whole
# profiled beside it) and main with hyper-connections off (`--model llamathink:fla:no-hc`), each its own process and
# empty inductor cache, batch 16; then the import time of FlashQLA's build process (what its prebuild child imports)
. docs/results/h200_s36/common.sh
W=/tmp/r/c3; mkdir -p $W
p M16 $R $(left 250) 16 /tmp/kcache/ind_M16 --peers hf-llama
tar -czf $OUT/c3.tgz -C /tmp/r c3
p H16 $R $(left 420) 16 /tmp/kcache/ind_H16 --model llamathink:fla:no-hc
tar -czf $OUT/c3.tgz -C /tmp/r c3
( cd /tmp && PYTHONPATH=/tmp/site timeout $(left 500) python -X importtime -c "import torch, tilelang, flash_qla" 2> $W/importtime.txt; echo "== importtime rc=$?"; sort -t'|' -k2 -n $W/importtime.txt | tail -12 )
tar -czf $OUT/c3.tgz -C /tmp/r c3
echo "total $(( $(date +%s) - t0 )) s"
