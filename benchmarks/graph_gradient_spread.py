"""How far apart the gradients of repeated calls on one batch are, per compile mode: is a gap between CUDA-graph
calls (`compile_layers(mode="reduce-overhead")`) and the first call larger than the default mode's own spread?

    python benchmarks/graph_gradient_spread.py [--backends torch,fla] [--calls 4] [--out spread.jsonl]

For each GDN backend, precision (bf16 autocast; float32 with TF32 off) and determinism setting
(`torch.use_deterministic_algorithms`), trains nothing: it runs `--calls` forward/backward calls of one fixed batch on
zeroed gradients with the tiny model of tests/test_gpu.py's CUDA-graph tests, eager, compiled layer by layer in the
default mode and with CUDA graphs, and prints one JSON line per setting with the largest gap of any parameter's
gradient (|g_call - g_first| / |g_first|) between calls of one mode, and between the modes' first calls. If the
default mode's calls are as far apart as the CUDA-graph calls, the gap is the kernels' nondeterminism (atomic adds),
not the graphs. GPU only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import graph_test_grads, largest_gap


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="torch,fla")
    parser.add_argument("--calls", type=int, default=4)
    parser.add_argument("--out", default=None, help="append the JSON lines here too")
    args = parser.parse_args(argv)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what deterministic cuBLAS needs
    for backend in args.backends.split(","):
        for autocast in (True, False):
            for deterministic in (False, True):
                start = time.time()
                torch.use_deterministic_algorithms(deterministic, warn_only=True)
                tf32 = torch.backends.cuda.matmul.allow_tf32
                torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
                try:
                    runs = {
                        m: graph_test_grads(backend, m, args.calls, autocast)
                        for m in ("eager", "default", "reduce-overhead")
                    }
                    row = {"backend": backend}
                    for mode, grads in runs.items():
                        row[f"{mode}: calls vs first"] = max(
                            largest_gap(g, grads[0], nonzero_reference=False) for g in grads[1:]
                        )
                    row["default vs eager"] = largest_gap(runs["default"][0], runs["eager"][0], nonzero_reference=False)
                    row["graphs (last) vs default (first)"] = largest_gap(
                        runs["reduce-overhead"][-1], runs["default"][0], nonzero_reference=False
                    )
                finally:
                    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
                    torch.use_deterministic_algorithms(False)
                row.update(
                    precision="bf16-autocast" if autocast else "float32",
                    deterministic=deterministic,
                    seconds=round(time.time() - start, 1),
                )
                line = json.dumps(row)
                print(line, flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(line + "\n")


if __name__ == "__main__":
    main()
