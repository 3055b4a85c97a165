python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu-wheels-a/*.whl 2>&1 | tail -3
mkdir -p /tmp/kcache /tmp/data && tar -xzf runs/english200.tgz -C /tmp/data && cp runs/llama2-tokenizer.model /tmp/ && echo ready
