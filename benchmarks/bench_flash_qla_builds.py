"""How long TileLang takes to build each of FlashQLA's Gated DeltaNet kernels from an empty cache, on one GPU.

The cold first training step with `gdn_backend: flash_qla` waits for these builds (BENCHMARKS.md section 1, session
29: 102.4 s, 64.3 s of it outside torch.compile), which `start_fla_prebuild` runs in four processes, one per kernel,
beside the step's compilation. This measures each kernel's build alone: each in a process of its own, all at once,
then (`--together`) all four one after another in one process. Every process gets new,
empty TileLang and Triton caches. Inputs are random at the 95M model's training shape (heads zero-padded to 128);
the kernels' code depends on the shapes alone.

    python benchmarks/bench_flash_qla_builds.py [--batch 16] [--seq 1024] [--heads 9] [--together] [--out f.json]

Prints one JSON line per process: the kernels it built, the seconds of imports and inputs, and of the first calls
(the builds). Needs a GPU FlashQLA runs on (`flash_qla_problem`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's llamathink, also run from elsewhere

KERNELS = ("kkt_solve", "fused_gdr_fwd", "fused_gdr_h", "fused_gdr_bwd")


def build(kernels: list[str], batch: int, seq: int, heads: int) -> dict:
    """Call each of `kernels` once on random bf16 inputs [batch, seq, heads, 128] (chunks of 64), in this process;
    returns the seconds spent on imports and inputs and on the calls (TileLang's builds where its cache is empty)."""
    t0 = time.perf_counter()
    import torch

    from llamathink.kernels_llamathink import FLASH_QLA_HEAD_DIM, _flash_qla_kernels, flash_qla_problem

    problem = flash_qla_problem(torch.device("cuda"), (FLASH_QLA_HEAD_DIM,) * 2, torch.bfloat16)
    if problem is not None:
        raise SystemExit(f"FlashQLA cannot run here: {problem}")
    kkt_solve, fused_fwd, fused_h, fused_bwd, _ = _flash_qla_kernels()
    B, T, H, D = batch, seq, heads, FLASH_QLA_HEAD_DIM
    q, k, v, do = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) / 8 for _ in range(4))
    beta = torch.rand(B, T, H, device="cuda", dtype=torch.bfloat16)
    g = -torch.rand(B, T, H, device="cuda").cumsum(1) / T  # chunk-local sums would be smaller; shapes are what count
    A = torch.randn(B, T, H, 64, device="cuda", dtype=torch.bfloat16) / 8  # the WY matrices [B, T, H, chunk]
    h = torch.randn(B, -(-T // 64), H, D, D, device="cuda", dtype=torch.bfloat16) / 8  # chunk states [B, NT, H, K, V]
    calls = {
        "kkt_solve": lambda: kkt_solve(k=k, b=beta, chunk_size=64, cu_seqlens=None),
        "fused_gdr_fwd": lambda: fused_fwd(
            q=q, k=k, v=v, a=A, g=g, b=beta, scale=D**-0.5, initial_state=None, output_final_state=False,
            output_h=False, output_o=True, cu_seqlens=None,
        ),
        "fused_gdr_h": lambda: fused_h(
            k=k, v=v, a=A, g=g, b=beta, initial_state=None, output_final_state=False, output_h=True, cu_seqlens=None
        ),
        "fused_gdr_bwd": lambda: fused_bwd(
            q=q, k=k, v=v, a=A, g=g, b=beta, do=do, dht=None, h=h, scale=D**-0.5, cu_seqlens=None
        ),
    }  # fmt: skip
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    each = {}
    for name in kernels:
        start = time.perf_counter()
        calls[name]()
        torch.cuda.synchronize()
        each[name] = round(time.perf_counter() - start, 1)
    return {"kernels": each, "setup_s": round(t1 - t0, 1), "builds_s": round(time.perf_counter() - t1, 1)}


def run_processes(groups: list[list[str]], args) -> list[dict]:
    """One process per group of kernels, all started at once, each with empty caches; their results in the order
    they end, with the wall seconds from the start of all (`ended_s`)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="flash_qla_builds_") as tmp:
        running = []
        for i, group in enumerate(groups):
            folder = Path(tmp, str(i))
            env = dict(os.environ, TILELANG_CACHE_DIR=str(folder / "tilelang"), TRITON_CACHE_DIR=str(folder / "triton"))
            cmd = [sys.executable, __file__, "--child", ",".join(group)]
            cmd += ["--batch", str(args.batch), "--seq", str(args.seq), "--heads", str(args.heads)]
            folder.mkdir()
            log = open(folder / "child.log", "w+")  # noqa: SIM115 (closed when read); TileLang's notes go there too
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
            running.append((group, proc, log))
        results = []
        while running:
            time.sleep(0.2)
            for item in [r for r in running if r[1].poll() is not None]:
                running.remove(item)
                group, proc, log = item
                log.seek(0)
                lines = log.read().splitlines()
                log.close()
                found = [s for s in lines if s.startswith("{")]
                result = json.loads(found[-1]) if found else {"error": lines[-5:]}
                result.update(group=group, exit_code=proc.returncode, ended_s=round(time.perf_counter() - t0, 1))
                print(json.dumps(result), flush=True)
                results.append(result)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--together", action="store_true", help="then all four kernels in one process")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(build(args.child.split(","), args.batch, args.seq, args.heads)))
        return
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench_flash_qla_builds needs a CUDA GPU (FlashQLA's kernels are for sm90 / sm100)")
    results = {"apart": run_processes([[name] for name in KERNELS], args)}
    if args.together:
        results["together"] = run_processes([list(KERNELS)], args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
