# call 1: install (fla-core, tilelang, flash-qla and their needs, unpacked here from their wheels), the 9-head
# TileLang kernels of session 27 call 4; then the GPU tests in 5 processes side by side (TileLang and Triton builds
# are CPU-bound and one after another within a process): FlashQLA's chunk tests; FlashQLA in the model's training
# paths; FlashQLA's prebuild; fla's prebuild; every other GPU test.
t0=$(date +%s)
mkdir -p /tmp/site /tmp/kcache && tar -xJf runs/site28.tar.xz -C /tmp/site && tar -xzf runs/tl_cache_s27_h9.tgz -C /tmp/kcache
cp runs/llama2-tokenizer.model /tmp/
echo "installed in $(( $(date +%s) - t0 )) s"
. gpu_s28/env.sh
python -c "import torch, triton, fla, tilelang, flash_qla, transformers; print(torch.__version__, triton.__version__, fla.__version__, tilelang.__version__, transformers.__version__)"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
mkdir -p $OUT/c1
t() { local name=$1; shift; ( s=$(date +%s); timeout 530 python -m pytest -v -p no:cacheprovider --tb=short -rfEs --durations=12 tests/test_gpu.py -k "$@" > $OUT/c1/$name.log 2>&1; echo "== $name rc=$? $(( $(date +%s) - s )) s" ) & }
t chunk "flash_qla_chunk"
t paths "(flash_qla and not prebuild and not chunk_matches) or gpu_backends_match"
t fq_prebuild "flash_qla_prebuild"
t fla_prebuild "fla_prebuild"
t rest "not flash_qla and not prebuild and not gpu_backends_match"
wait
for f in $OUT/c1/*.log; do echo "#### $f"; grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed" $f | grep -v "^tests.*PASSED" | tail -12; done
grep -h -E "FAILED|ERROR" $OUT/c1/*.log | head -20
tar -czf $OUT/c1.tgz -C $OUT c1 && rm -rf $OUT/c1
