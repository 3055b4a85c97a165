# call C (session 43, call B's warm machine: fla's site in /tmp/site): FlashQLA's wheels added (runs/qla), then
# paired-seed quality of FlashQLA's delta-rule kernels against fla's (bench_quality, seeds 0 and 1, 250 steps at
# batch 16, same batches), HF Llama beside at seed 0
[ -d /tmp/site/fla ] || { mkdir -p /tmp/site /tmp/kcache && tar -xJf runs/gpu-site-fla.tar.xz -C /tmp/site; }
for w in runs/qla/*.whl; do python3 -m zipfile -e $w /tmp/site; done
. docs/results/h200_s36/common.sh
W=/tmp/r/cC; mkdir -p $W /tmp/data
[ -d /tmp/data/english1k ] || tar -xJf runs/english1k.tar.xz -C /tmp/data
python -c "import flash_qla, tilelang; print('flash_qla', flash_qla.__file__, tilelang.__version__)" 2>&1 | tail -1
( s=$(date +%s); timeout 560 python benchmarks/bench_quality.py --data /tmp/data/english1k --val-docs 50 --steps 250 --eval-every 50 --eval-windows 8 --speed-from 60 --out $W/q --run fla-s0:compile=1,gdn_backend=fla,seed=0 --run qla-s0:compile=1,gdn_backend=flash_qla,seed=0 --run fla-s1:compile=1,gdn_backend=fla,seed=1 --run qla-s1:compile=1,gdn_backend=flash_qla,seed=1 --run llama-s0:model=hf-llama,compile=1,compile_mode=reduce-overhead,combo_kernels=1,seed=0 > $W/quality.log 2>&1; echo "== quality rc=$? $(( $(date +%s) - s )) s"; grep -E "final|Error|error" $W/quality.log | head -12 )
tar -czf $OUT/cC.tgz -C /tmp/r cC
echo "total $(( $(date +%s) - t0 )) s"
