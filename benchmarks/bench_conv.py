"""The Gated DeltaNet's short causal conv + SiLU at the model's shape, forward and backward, on one GPU.

Times the package's conv ops (`llamathink::fla_causal_conv1d_silu_split` forward, once per q, k and v part, and
`llamathink::fla_causal_conv1d_silu_backward`, once over all channels) as a compiled training step calls them: the
input in rows padded to 3072 elements (inductor's layout of the qkv projection's output), bf16, K = 4. For each of
fla-core's two implementations of the conv, as the package chooses them (`LLAMATHINK_FLA_CONV`, `fla_conv_kernels`;
fla's own `FLA_CONV_GLUON` is unset while this runs):
  - `triton`: fla's Triton kernels (`fla.modules.causal_conv1d.ops`; the backward first reruns the forward to get
    the pre-activation);
  - `gluon`: fla's Gluon kernels (`fla.modules.causal_conv1d.backends.gluon`, the package's default; the backward
    recomputes the pre-activation in registers);
with each one's error against the float32 PyTorch conv (`torch.nn.functional.conv1d`, depthwise) on the same
inputs. Times are medians of `triton.testing.do_bench` (ms); bytes/s counts each tensor the step must read or write
once (forward: x, y; backward: x, dy, dx), so 100% is the HBM traffic of an ideal fused kernel, not a peak.

    python benchmarks/bench_conv.py --batch 16 --seq 1024 [--packed] [--out f.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os

import torch
import torch.nn.functional as F


def reference(x: torch.Tensor, weight: torch.Tensor, dy: torch.Tensor, lengths: list[int] | None):
    """float32 depthwise causal conv + SiLU, each document of `lengths` alone -> y, dx, dw (float32)."""
    xr = x.detach().float().requires_grad_()
    wr = weight.detach().float().requires_grad_()

    def conv(t):  # [B, T, C] -> [B, T, C]
        out = F.conv1d(F.pad(t.transpose(1, 2), (wr.shape[1] - 1, 0)), wr[:, None], groups=t.shape[-1])
        return F.silu(out).transpose(1, 2)

    if lengths is None:
        y = conv(xr)
    else:
        bounds = [0]
        for n in lengths:
            bounds.append(bounds[-1] + n)
        y = torch.cat([conv(xr[:, a:b]) for a, b in itertools.pairwise(bounds)], dim=1)
    y.backward(dy.float())
    return y.detach(), xr.grad, wr.grad


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.float() - ref).norm() / ref.norm().clamp_min(1e-30))


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--parts", default="1008,1008,1008", help="channels of q, k, v (the seed's 3024)")
    parser.add_argument("--row", type=int, default=3072, help="row length of the padded input (inductor's)")
    parser.add_argument("--packed", action="store_true", help="one row of documents (cu_seqlens), as packed runs")
    parser.add_argument("--implementations", default="triton,gluon")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    import triton

    from llamathink.kernels_llamathink import FLA_CONV_ENV, fla_conv_available, fla_conv_kernels

    if not torch.cuda.is_available() or not fla_conv_available():
        raise SystemExit("needs a CUDA GPU and fla-core")
    parts = [int(p) for p in args.parts.split(",")]
    C = sum(parts)
    B, T = (1, args.batch * args.seq) if args.packed else (args.batch, args.seq)
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B, T, args.row, device="cuda", generator=gen).bfloat16()[..., :C]  # padded rows
    weight = torch.randn(C, 4, device="cuda", generator=gen) * 0.5
    dy = torch.randn(B, T, C, device="cuda", generator=gen).bfloat16()
    lengths = cu_seqlens = None
    if args.packed:  # documents of 1 to 2048 tokens
        lengths, left = [], T
        while left:
            n = min(left, int(torch.randint(1, 2049, (1,), generator=torch.Generator().manual_seed(len(lengths)))))
            lengths.append(n)
            left -= n
        cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda")
    ref_y, ref_dx, ref_dw = reference(x, weight, dy, lengths)
    split = torch.ops.llamathink.fla_causal_conv1d_silu_split
    backward = torch.ops.llamathink.fla_causal_conv1d_silu_backward
    traffic = {"fwd": 2 * B * T * C * 2, "bwd": 3 * B * T * C * 2}  # bytes: bf16 x + y; x + dy + dx

    rows = []
    for variable in ("FLA_CONV_GLUON", "FLA_GLUON"):  # fla's own switches would send Triton's calls to Gluon
        os.environ.pop(variable, None)
    for name in args.implementations.split(","):
        os.environ[FLA_CONV_ENV] = name
        ran = fla_conv_kernels(x, weight, cu_seqlens)
        if ran != name:
            raise SystemExit(f"{FLA_CONV_ENV}={name}: the package's conv ops would run fla's {ran} kernels here")
        ys = split(x, weight, cu_seqlens, parts)
        dx, dw = backward(x, weight, dy, cu_seqlens)
        errors = {
            "y": rel(torch.cat(ys, -1), ref_y),
            "dx": rel(dx, ref_dx),
            "dw": rel(dw, ref_dw),
        }
        t_fwd = triton.testing.do_bench(lambda: split(x, weight, cu_seqlens, parts), return_mode="median")
        t_bwd = triton.testing.do_bench(lambda: backward(x, weight, dy, cu_seqlens), return_mode="median")
        row = {
            "implementation": name,
            "batch": args.batch,
            "seq": args.seq,
            "packed": args.packed,
            "channels": C,
            "fwd_ms": round(t_fwd, 4),
            "bwd_ms": round(t_bwd, 4),
            "fwd_bwd_ms": round(t_fwd + t_bwd, 4),
            "fwd_TBps": round(traffic["fwd"] / t_fwd / 1e9, 3),
            "bwd_TBps": round(traffic["bwd"] / t_bwd / 1e9, 3),
            "rel_err": {k: float(f"{v:.3e}") for k, v in errors.items()},
        }
        rows.append(row)
        print(json.dumps(row))
    os.environ.pop(FLA_CONV_ENV, None)
    info = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    import fla

    info["fla"] = fla.__version__
    print(json.dumps(info))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"info": info, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
