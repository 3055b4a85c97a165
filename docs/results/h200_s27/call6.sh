python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu-wheels-b/*.whl 2>&1 | tail -3
. gpu_s27/env.sh
mkdir -p $OUT/c6
timeout 230 python -m pytest -q -p no:cacheprovider --tb=short -rfEs tests/test_gpu.py -k "flash_qla_chunk or default_compiled_pretraining or (compiled_layers and flash_qla) or (packed_training and flash_qla and layers)" > $OUT/c6/tests.log 2>&1; grep -v Warn $OUT/c6/tests.log | tail -25
timeout 130 python benchmarks/profile_gpu.py --compile --no-eager --no-decode --top-kernels 40 --batch 16 --peers hf-llama > $OUT/c6/kinds_b16.txt 2>&1
grep -E "^# |^  [a-zA-Z].* ms .*%|wall time|GPU kernel time" $OUT/c6/kinds_b16.txt
