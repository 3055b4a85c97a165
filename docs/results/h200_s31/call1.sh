# call 1 (carry runs/gpu-site.tar.xz): (1) profile_gpu of the compiled step with inductor's combo kernels off (kernel
# names say what they fuse) and its generated code, batch 16 and 64 (HF Llama compiled whole beside at 64);
# (2) FlashQLA's four builds alone with TileLang's NVRTC execution backend; (3) the GPU tests owed: the new prebuild
# child program (FlashQLA prebuild rows / packed, the prebuild wait), side by side
t0=$(date +%s)
mkdir -p /tmp/site /tmp/kcache && tar -xJf runs/gpu-site.tar.xz -C /tmp/site
. docs/results/h200_s31/env.sh
nproc; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -c "import torch, triton, fla, tilelang, flash_qla, transformers, peft; print(torch.__version__, triton.__version__, fla.__version__, tilelang.__version__, transformers.__version__, peft.__version__)"
git log --oneline -1
mkdir -p $OUT/c1
for b in 16 64; do
  s=$(date +%s)
  TORCH_LOGS=output_code timeout 170 python benchmarks/profile_gpu.py --compile --no-eager --no-decode --top-kernels 400 \
    --batch $b --backend fla --inductor-option combo_kernels=False $([ $b = 64 ] && echo --peers hf-llama) \
    > $OUT/c1/kinds_b$b.txt 2> $OUT/c1/code_b$b.log
  echo "== profile b$b rc=$? $(( $(date +%s) - s )) s"; gzip -f $OUT/c1/code_b$b.log
  grep -E "^# |^  [a-zA-Z].* ms .*%|wall time|GPU kernel time" $OUT/c1/kinds_b$b.txt | head -30
done
s=$(date +%s)
TILELANG_EXECUTION_BACKEND=nvrtc timeout 130 python benchmarks/bench_flash_qla_builds.py --out $OUT/c1/builds_nvrtc.json > $OUT/c1/builds_nvrtc.log 2>&1
echo "== nvrtc builds rc=$? $(( $(date +%s) - s )) s"; grep '^{' $OUT/c1/builds_nvrtc.log; tail -5 $OUT/c1/builds_nvrtc.log
t() { local name=$1; shift; ( s=$(date +%s); timeout $(( 585 - $(date +%s) + t0 )) python -m pytest -v -p no:cacheprovider --tb=short -rfEs --durations=5 tests/test_gpu.py -k "$@" > $OUT/c1/$name.log 2>&1; echo "== $name rc=$? $(( $(date +%s) - s )) s" ) & }
t rows "flash_qla_prebuild and rows"
t packed "flash_qla_prebuild and packed"
t waits "step_waits"
t fla "fla_prebuild_child"
wait
grep -h -E "PASSED|FAILED|ERROR|passed|failed|s call" $OUT/c1/{rows,packed,waits,fla}.log | head -30
echo "total $(( $(date +%s) - t0 )) s"
