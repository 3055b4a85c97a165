python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu-wheels-b/*.whl 2>&1 | tail -3
. gpu_s27/env.sh
mkdir -p $OUT/c4
timeout 250 python benchmarks/bench_gdn_kernels.py --graph --kernels flash_qla,fla --out $OUT/c4/b16.json 2>&1 | grep -v "Warning\|TileLang" | tail -20
timeout 120 python benchmarks/bench_gdn_kernels.py --packed --kernels flash_qla,fla --out $OUT/c4/b16_packed.json 2>&1 | grep -v "Warning\|TileLang" | tail -8
timeout 120 python benchmarks/bench_gdn_kernels.py --batch 64 --kernels flash_qla,fla --out $OUT/c4/b64.json 2>&1 | grep -v "Warning\|TileLang" | tail -8
tar -czf $OUT/c4/tl_cache.tgz -C /tmp/kcache tilelang 2>/dev/null; ls -la $OUT/c4
