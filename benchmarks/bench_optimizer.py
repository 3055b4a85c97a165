"""The optimizer's share of a training step on one GPU: what the loop runs after the backward (gradient clipping,
then the optimizer step), for LlamaThink's parameters and HF Llama's, with random gradients.

The training loop with Muon runs at a lower tokens/s than `bench_gpu.py`'s step (AdamW) for both models; this
measures the part that differs, one phase at a time, each model's parameters in fp32 on the GPU:
  - `clip`: `torch.nn.utils.clip_grad_norm_` over all gradients (foreach norm and scale, as the loop calls it);
  - `muon`: `llamathink.train.optim.build_optimizer` with the run defaults (Muon for hidden matrices with its
    Newton-Schulz step replayed as a CUDA graph, AdamW for the rest), as training builds it;
  - `muon_eager`: the same with `muon_cuda_graph: false` (the reference path);
  - `adamw`: the same routing with AdamW alone (`optimizer: adamw`);
  - `torch_adamw_fused`: `torch.optim.AdamW(fused=True)` over all parameters (what `bench_gpu.py` steps with).
Each row reports the mean wall time of a call (CUDA events around `--steps` calls, after `--warmup`; ms), the GPU
kernel time of one call (torch.profiler; ms) with its largest kernels, and the number of kernels launched. A call
whose wall time exceeds its kernel time leaves the GPU waiting on the host when the step around it does too.

    python benchmarks/bench_optimizer.py [--models llamathink,hf-llama] [--steps 20] [--out f.json]

Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's llamathink, also run from elsewhere
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_gpu import build, versions

from llamathink.train.config import RunConfig
from llamathink.train.optim import build_optimizer


def random_gradients(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every parameter a gradient of its shape (N(0, 1e-3), a fixed seed)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    for p in model.parameters():
        p.grad = 1e-3 * torch.randn(p.shape, device=p.device, dtype=p.dtype, generator=gen)


def phases(model: torch.nn.Module) -> dict:
    """name -> a function of no argument running that phase once (optimizers built here, on the model's params)."""
    params = list(model.parameters())
    cfg = RunConfig()
    return {
        "clip": lambda: torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip),
        "muon": build_optimizer(model, cfg).step,
        "muon_eager": build_optimizer(model, RunConfig(muon_cuda_graph=False)).step,
        "adamw": build_optimizer(model, RunConfig(optimizer="adamw")).step,
        "torch_adamw_fused": torch.optim.AdamW(params, lr=cfg.adamw_lr, fused=True).step,
    }


def measure(fn, steps: int, warmup: int, top: int) -> dict:
    """Wall ms per call (CUDA events over `steps` calls), then one profiled call's kernels."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        fn()
    end.record()
    torch.cuda.synchronize()
    wall_ms = start.elapsed_time(end) / steps
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = collections.Counter()
    launches = 0
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.name[:100]] += event.device_time_total / 1000.0  # us -> ms
            launches += 1
    return {
        "wall_ms": round(wall_ms, 4),
        "kernel_ms": round(sum(kernels.values()), 4),
        "kernels": launches,
        "top_kernels_ms": {name: round(ms, 4) for name, ms in kernels.most_common(top)},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="llamathink,hf-llama", help="comma list: llamathink, hf-llama")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--top", type=int, default=12, help="largest kernels listed per row")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    rows = []
    for name in args.models.split(","):
        model = build("llamathink:fla" if name == "llamathink" else name).cuda()
        matrices = sum(p.numel() for p in model.parameters() if p.ndim == 2)
        for phase, fn in phases(model).items():
            random_gradients(model)
            row = {"model": name, "phase": phase, "params": sum(p.numel() for p in model.parameters())}
            row.update(matrices=matrices, **measure(fn, args.steps, args.warmup, args.top))
            print(json.dumps(row), flush=True)
            rows.append(row)
        del model
        torch.cuda.empty_cache()
    if args.out:
        Path(args.out).write_text(json.dumps({"versions": versions(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
