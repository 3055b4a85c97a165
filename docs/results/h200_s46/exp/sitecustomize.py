# Session 46 probe (call B): inductor's mix-order reduction split size from LT_MOR_SPLIT, for every process of a
# bench_gpu run (its models run in child processes, which inherit the environment)
import os

_split = os.environ.get("LT_MOR_SPLIT")
if _split:
    import torch._inductor.config as _config

    _config.triton.mix_order_reduction_split_size = int(_split)
    print(f"[sitecustomize] triton.mix_order_reduction_split_size = {_split}", flush=True)
