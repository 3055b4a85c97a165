"""The chunked Gated DeltaNet kernels at the model's shape, forward and forward + backward, on one GPU.

Compares the kernels the model can train with, each against the float32 PyTorch reference
(`torch_chunk_gated_delta_rule`) on the same inputs:
  - `fla`: fla-core's chunked kernels (what `gdn_backend: fla` runs), at the model's head width;
  - `flash_qla`: FlashQLA (`flash-qla`, the Qwen team's fused TileLang kernels, also fla's own backend on Hopper),
    which takes heads of 128 only: narrower heads are zero-padded to 128 (exact: zero key and value columns stay
    zero in the state and the output) and the output and gradients sliced back;
  - `fla128`: fla-core on the same zero-padded heads, which tells the padding's cost from the kernels' speed.
Times are means of `triton.testing.do_bench` (its default `return_mode`; ms); "first call" is the first launch's
wall time (JIT builds).
With --packed the batch is one row of documents (`cu_seqlens`), as packed pretraining runs them.

    python benchmarks/bench_gdn_kernels.py --batch 16 --seq 1024 --heads 9 --head-dim 112 [--packed] [--out f.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time

import torch
import torch.nn.functional as F


def make_inputs(batch: int, seq: int, heads: int, dim: int, seed: int, device: str = "cuda"):
    """q, k (L2-normed), v, beta (bf16) [B, T, H, D] / [B, T, H]; g fp32 log-decay as the model makes it (A in
    [0.01, 16], dt in [1e-3, 0.1]); do, the output's gradient. All leaves in float32 for the reference."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device)

    q = F.normalize(randn(batch, seq, heads, dim), dim=-1)
    k = F.normalize(randn(batch, seq, heads, dim), dim=-1)
    v = randn(batch, seq, heads, dim)
    A = torch.empty(heads, device=device).uniform_(0.01, 16.0, generator=gen)
    dt = torch.exp(torch.empty(heads, device=device).uniform_(math.log(1e-3), math.log(0.1), generator=gen))
    dt_bias = dt + torch.log(-torch.expm1(-dt))  # inverse softplus
    g = -A * F.softplus(randn(batch, seq, heads) + dt_bias)
    beta = torch.sigmoid(randn(batch, seq, heads))
    do = randn(batch, seq, heads, dim)
    return q, k, v, g, beta, do


def pad_heads(x: torch.Tensor, width: int) -> torch.Tensor:
    return F.pad(x, (0, width - x.shape[-1])) if x.shape[-1] < width else x


def fla_pair():
    """fla's chunked kernels through the package's custom ops (`llamathink::fla_chunk_gdn` and its backward), as a
    compiled training step calls them."""
    from llamathink.kernels_llamathink import _fla_chunk_op

    def fwd(q, k, v, g, beta, scale, cu_seqlens=None):
        o, _, g_cum, A = _fla_chunk_op(q, k, v, g, beta, scale, None, False, cu_seqlens)
        return o, (g_cum, A)

    def bwd(q, k, v, beta, saved, do, scale, cu_seqlens=None):
        g_cum, A = saved
        backward = torch.ops.llamathink.fla_chunk_gdn_backward
        dq, dk, dv, dg, dbeta, _ = backward(q, k, v, g_cum, beta, A, scale, None, do, None, cu_seqlens)
        return dq, dk, dv, dg, dbeta

    return fwd, bwd


def flash_qla_pair():
    """FlashQLA's kernels through the package's custom ops (`llamathink::flash_qla_chunk_gdn` and its backward:
    FlashQLA's kkt_solve, fused_gdr_fwd, fused_gdr_h and fused_gdr_bwd, with fla's chunk-local gate sums), as the
    model calls them."""
    from llamathink.kernels_llamathink import _flash_qla_op

    def fwd(q, k, v, g, beta, scale, cu_seqlens=None):
        o, g_cum, A = _flash_qla_op(q, k, v, g, beta, scale, cu_seqlens)
        return o, (g_cum, A)

    def bwd(q, k, v, beta, saved, do, scale, cu_seqlens=None):
        g_cum, A = saved
        return torch.ops.llamathink.flash_qla_chunk_gdn_backward(q, k, v, g_cum, beta, A, scale, do, cu_seqlens)

    return fwd, bwd


def reference(q, k, v, g, beta, do, scale, lengths):
    """float32 PyTorch kernel, each document of `lengths` alone (one row per batch row when None)."""
    from llamathink.modeling_llamathink import torch_chunk_gated_delta_rule

    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, g, beta)]
    if lengths is None:
        o = torch_chunk_gated_delta_rule(*leaves, scale)[0]
    else:
        parts, start = [], 0
        for n in lengths:
            parts.append(torch_chunk_gated_delta_rule(*(t[:, start : start + n] for t in leaves), scale)[0])
            start += n
        o = torch.cat(parts, dim=1)
    o.backward(do)
    return o.detach(), [t.grad for t in leaves]


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.float() - ref).norm() / ref.norm().clamp_min(1e-30))


def run_kernel(name, pair, width, inputs16, g, do16, scale, cu_seqlens, ref):
    import triton

    fwd, bwd = pair
    q, k, v, beta = inputs16
    D = v.shape[-1]
    qp, kp, vp, dop = (pad_heads(t, width).contiguous() for t in (q, k, v, do16))
    args = {"cu_seqlens": cu_seqlens}
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    o, saved = fwd(qp, kp, vp, g, beta, scale, **args)
    grads = bwd(qp, kp, vp, beta, saved, dop, scale, **args)
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    dq, dk, dv, dg, dbeta = grads
    got = {"o": o[..., :D], "dq": dq[..., :D], "dk": dk[..., :D], "dv": dv[..., :D], "dg": dg, "dbeta": dbeta}
    ref_o, (rq, rk, rv, rg, rbeta) = ref
    errors = {n: rel(got[n], r) for n, r in zip(got, (ref_o, rq, rk, rv, rg, rbeta))}
    # zero value columns stay zero in the state: the padded output and its values' gradient are exactly zero
    pad_zero = width == D or bool(o[..., D:].abs().max() == 0 and dv[..., D:].abs().max() == 0)

    def step():
        _o, saved = fwd(qp, kp, vp, g, beta, scale, **args)
        bwd(qp, kp, vp, beta, saved, dop, scale, **args)

    t_fwd = triton.testing.do_bench(lambda: fwd(qp, kp, vp, g, beta, scale, **args), warmup=25, rep=200)
    t_step = triton.testing.do_bench(step, warmup=25, rep=200)
    return {
        "kernel": name,
        "width": width,
        "first_call_s": round(first, 2),
        "fwd_ms": round(t_fwd, 4),
        "fwd_bwd_ms": round(t_step, 4),
        "rel_errors": errors,
        "padded_dv_zero": pad_zero,
    }


def graph_replay_check(pair, width, inputs16, g, do16, scale):
    """Capture forward + backward in one CUDA graph, replay it and compare with an eager call (bit-exact expected)."""
    fwd, bwd = pair
    q, k, v, beta = inputs16
    qp, kp, vp, dop = (pad_heads(t, width).contiguous() for t in (q, k, v, do16))
    eager = bwd(qp, kp, vp, beta, fwd(qp, kp, vp, g, beta, scale)[1], dop, scale)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            bwd(qp, kp, vp, beta, fwd(qp, kp, vp, g, beta, scale)[1], dop, scale)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = bwd(qp, kp, vp, beta, fwd(qp, kp, vp, g, beta, scale)[1], dop, scale)
    graph.replay()
    torch.cuda.synchronize()
    return max(float((a.float() - b.float()).abs().max()) for a, b in zip(out, eager))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--head-dim", type=int, default=112)
    parser.add_argument("--packed", action="store_true", help="one row of documents of random lengths")
    parser.add_argument("--kernels", default="fla,flash_qla,fla128")
    parser.add_argument("--graph", action="store_true", help="also check a CUDA-graph replay of each kernel")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from llamathink.kernels_llamathink import load_fla_tuned_configs

    load_fla_tuned_configs()  # fla's recorded autotune choices for this GPU, as building a model loads them
    q, k, v, g, beta, do = make_inputs(args.batch, args.seq, args.heads, args.head_dim, args.seed)
    scale = args.head_dim**-0.5
    cu_seqlens = lengths = None
    if args.packed:
        total = args.batch * args.seq
        gen = torch.Generator().manual_seed(args.seed)
        cuts = sorted(torch.randperm(total - 1, generator=gen)[: 4 * args.batch - 1].add(1).tolist())
        bounds = [0, *cuts, total]
        lengths = [b - a for a, b in itertools.pairwise(bounds)]
        q, k, v, g, beta, do = (t.reshape(1, total, *t.shape[2:]) for t in (q, k, v, g, beta, do))
        cu_seqlens = torch.tensor(bounds, device="cuda", dtype=torch.long)
    ref = reference(q, k, v, g, beta, do, scale, lengths)
    inputs16 = tuple(t.to(torch.bfloat16).contiguous() for t in (q, k, v, beta))
    do16 = do.to(torch.bfloat16).contiguous()
    pairs = {"fla": (fla_pair, args.head_dim), "flash_qla": (flash_qla_pair, 128), "fla128": (fla_pair, 128)}
    header = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "shape": {
            "batch": args.batch,
            "seq": args.seq,
            "heads": args.heads,
            "head_dim": args.head_dim,
            "packed": args.packed,
        },
    }
    for lib in ("triton", "fla", "flash_qla", "tilelang"):
        try:
            header[lib] = __import__(lib).__version__
        except Exception as exc:  # noqa: BLE001 - a missing library is a row of the report
            header[lib] = f"unavailable: {type(exc).__name__}: {exc}"
    print(json.dumps(header), flush=True)
    rows = []
    for name in args.kernels.split(","):
        make, width = pairs[name]
        try:
            row = run_kernel(name, make(), width, inputs16, g, do16, scale, cu_seqlens, ref)
            if args.graph and not args.packed:
                row["graph_replay_max_diff"] = graph_replay_check(make(), width, inputs16, g, do16, scale)
        except Exception as exc:  # noqa: BLE001 - report and go on to the next kernel
            row = {"kernel": name, "error": f"{type(exc).__name__}: {exc}"[:2000]}
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(header, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
