python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu-wheels-b/*.whl 2>&1 | tail -3
. gpu_s27/env.sh
mkdir -p $OUT/c2
timeout 330 python benchmarks/bench_gdn_kernels.py --graph --out $OUT/c2/b16.json 2>&1 | grep -v Warning | tail -20
timeout 150 python benchmarks/bench_gdn_kernels.py --packed --out $OUT/c2/b16_packed.json 2>&1 | grep -v Warning | tail -8
timeout 100 python benchmarks/bench_gdn_kernels.py --batch 64 --kernels fla,flash_qla --out $OUT/c2/b64.json 2>&1 | grep -v Warning | tail -8
