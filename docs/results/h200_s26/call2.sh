# fla + tilelang; the GPU tests changed since they last ran
set -u
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu-wheels-b/*.whl 2>&1 | tail -2
. gpu_s26/env.sh
python -c "import fla, tilelang; print('fla', fla.__version__, 'tilelang', tilelang.__version__)" | tee -a $OUT/versions.txt
timeout ${T:-520} python -m pytest -v -p no:cacheprovider --tb=short tests/test_gpu.py -k "${K:-combo or cuda_graph_training or cuda_graph_replay or compiled_layers or default_compiled_pretraining}" > $OUT/tests2.log 2>&1
grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed" $OUT/tests2.log | tail -14
tail -40 $OUT/tests2.log | grep -E "Error|assert" | head -10
