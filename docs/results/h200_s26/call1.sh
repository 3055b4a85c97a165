# wheels a, data, the old tree; the GPU tests that need no fla
set -u
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu-wheels-a/*.whl 2>&1 | tail -2
mkdir -p /tmp/kcache /tmp/data /tmp/old && tar -xzf runs/english200.tgz -C /tmp/data && tar -xf runs/old_1253bc8.tar -C /tmp/old
cp runs/llama2-tokenizer.model /tmp/
. gpu_s26/env.sh
nvidia-smi --query-gpu=index,name,driver_version --format=csv,noheader | tee $OUT/gpu.txt
python -c "import torch, transformers, triton, platform; print(torch.__version__, transformers.__version__, triton.__version__, platform.python_version())" | tee $OUT/versions.txt
timeout 300 python -m pytest -v -p no:cacheprovider --tb=short tests/test_gpu.py -k "cuda_graph_gradients and torch" > $OUT/tests1.log 2>&1
grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed" $OUT/tests1.log | tail -12
