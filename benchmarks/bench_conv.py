"""The Gated DeltaNet short conv + SiLU alone on one GPU: LlamaThink's Triton kernels at several tile sizes against
fla's fused conv, forward and backward, at the 95M model's shape.

    python benchmarks/bench_conv.py [--batches 16,64] [--channels 3024] [--seq 1024] [--out FILE]

For each batch size: fla's conv (forward; backward = its recomputed forward + backward kernel + the weight-gradient
sum), then a sweep of `kernels_llamathink.CONV_TILES` (the forward's tiles, which the backward's dx kernel shares,
then the backward's dpre kernel's), each checked against the default tiles' outputs. Times are medians of
`triton.testing.do_bench` (ms); GB/s counts the bytes each pass must move (forward: read x, write y; backward: read
x and dy, write dx), so it compares kernels with HBM's bandwidth. Prints one JSON line per row (and writes them to
--out)."""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llamathink import kernels_llamathink as kernels  # noqa: E402


def timed(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=50)


def measure(x, w, dy, forward, backward) -> dict:
    """Median ms of the forward and of the backward, and their GB/s."""
    fwd, bwd = timed(lambda: forward(x, w)), timed(lambda: backward(x, w, dy))
    nbytes = x.numel() * x.element_size()
    return {"fwd_ms": round(fwd, 4), "bwd_ms": round(bwd, 4), "fwd_GBps": round(2 * nbytes / fwd / 1e6),
            "bwd_GBps": round(3 * nbytes / bwd / 1e6)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="16,64")
    parser.add_argument("--channels", type=int, default=3024)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or not kernels.triton_conv_available():
        raise SystemExit("bench_conv needs a CUDA GPU and triton")
    rows = []

    def emit(row):
        print(json.dumps(row), flush=True)
        rows.append(row)

    empty = torch.empty(0, dtype=torch.int32, device="cuda")
    ours_fwd = lambda x, w: kernels.triton_causal_conv1d_silu_forward(x, w, empty)  # noqa: E731
    ours_bwd = lambda x, w, dy: kernels.triton_causal_conv1d_silu_backward(x, w, empty, dy)  # noqa: E731
    default = dict(kernels.CONV_TILES)
    for batch in [int(b) for b in args.batches.split(",")]:
        gen = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(batch, args.seq, args.channels, device="cuda", generator=gen).bfloat16()
        dy = torch.randn(batch, args.seq, args.channels, device="cuda", generator=gen).bfloat16()
        w = torch.randn(args.channels, 4, device="cuda", generator=gen) * 0.5
        base = {"batch": batch, "seq": args.seq, "channels": args.channels, "gpu": torch.cuda.get_device_name()}
        if kernels.fla_conv_available():
            internals = kernels._fla_conv_internals()
            fla_fwd = lambda x, w: torch.ops.llamathink.fla_causal_conv1d_silu(x, w, None)  # noqa: E731
            fla_bwd = lambda x, w, dy: torch.ops.llamathink.fla_causal_conv1d_silu_backward(x, w, dy, None)  # noqa: E731
            if internals is not None:
                emit({**base, "kernel": "fla", **measure(x, w, dy, fla_fwd, fla_bwd)})
        kernels.CONV_TILES.update(default)
        y_ref, (dx_ref, dw_ref) = ours_fwd(x, w), ours_bwd(x, w, dy)
        sweeps = [
            ("fwd", {"fwd_bt": [32, 64, 128], "fwd_bc": [64, 128], "fwd_warps": [4, 8]}),
            ("bwd", {"bwd_bt": [16, 32, 64], "bwd_bc": [32, 64, 128], "bwd_tiles": [1, 4], "bwd_warps": [4, 8]}),
        ]
        for part, grid in sweeps:
            best = None
            for values in itertools.product(*grid.values()):
                tiles = dict(zip(grid, values))
                kernels.CONV_TILES.update(tiles)
                try:
                    y, (dx, dw) = ours_fwd(x, w), ours_bwd(x, w, dy)
                    error = max((a.float() - b.float()).abs().max().item() / b.float().abs().max().item()
                                for a, b in ((y, y_ref), (dx, dx_ref), (dw, dw_ref)))
                    row = {**base, "kernel": "ours", "tiles": dict(kernels.CONV_TILES), "max_rel_diff": error,
                           **measure(x, w, dy, ours_fwd, ours_bwd)}
                except Exception as err:  # a tile too large for the GPU's registers or shared memory
                    row = {**base, "kernel": "ours", "tiles": dict(kernels.CONV_TILES), "error": repr(err)[:200]}
                emit(row)
                key = f"{part}_ms"
                if key in row and (best is None or row[key] < best[key]):
                    best = row
            if best is not None:  # the next sweep starts from this one's best
                kernels.CONV_TILES.update({k: best["tiles"][k] for k in grid})
                emit({**base, "best": part, "tiles": best["tiles"], f"{part}_ms": best[f"{part}_ms"]})
        kernels.CONV_TILES.update(default)
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
