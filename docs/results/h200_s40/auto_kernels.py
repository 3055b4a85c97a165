"""Session 40, call 3: `gdn_backend: auto` across two compiled pretraining runs on one machine, in one process
(TileLang's and Triton's caches in fresh folders): the first trains on fla's kernels and builds FlashQLA's in the
background after its first step; once that build is recorded, the second (another out_dir) trains with FlashQLA's.
The 95M model, batch 16 x 1024, bf16, CUDA graphs, the bundled prose sample (builtin tokenizer)."""

import json
import sys
import time
from pathlib import Path

import torch

from llamathink import kernels_llamathink as kernels
from llamathink.data import LocalSource, prepare
from llamathink.tokenizer_utils import sample_data_path
from llamathink.train import pretrain

out = Path(sys.argv[1])
data = out / "data"
prepare(LocalSource([str(sample_data_path("prose.jsonl"))]), data, "builtin", val_docs=20, progress=False)


def run(name: str, steps: int) -> dict:
    torch._dynamo.reset()
    cfg = pretrain.TrainConfig(
        data_dir=str(data),
        out_dir=str(out / name),
        seq_len=1024,
        micro_batch_size=16,
        grad_accum=1,
        max_steps=steps,
        warmup_steps=10,
        compile=True,
        mixed_precision="bf16",
        eval_every=10_000,
        eval_batches=1,
        sample_every=10_000,
        log_every=50,
        save_every=10_000,
        wandb_mode="disabled",
        progress_bar=False,
    )
    start = time.perf_counter()
    result = pretrain.train(cfg)
    return {"seconds": time.perf_counter() - start, "losses": {k: result["losses"][k] for k in (1, steps)}}


first = run("first", 300)
t = time.perf_counter()
codes = [c.wait(timeout=400) for c in kernels._prebuild_children]
print(f"background build ended {codes} after a further {time.perf_counter() - t:.1f} s", flush=True)
second = run("second", 300)
print(json.dumps({"first": first, "second": second}, indent=1))
