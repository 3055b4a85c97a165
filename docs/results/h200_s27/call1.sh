set -x
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu-wheels-a/*.whl 2>&1 | tail -3
mkdir -p /tmp/kcache /tmp/data && tar -xzf runs/english200.tgz -C /tmp/data && cp runs/llama2-tokenizer.model /tmp/
. gpu_s27/env.sh
python -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
which nvcc; ls /usr/local/cuda*/bin/nvcc 2>/dev/null; python -c "import nvidia, os; print(os.listdir(os.path.dirname(nvidia.__path__[0]+'/x')))" 2>&1 | head -3
