"""Host (CPU) time of one call of fla's Gated DeltaNet and causal-conv kernels, called directly and through
LlamaThink's custom ops, at the default model's shape (issue 17: the compiled batch-16 step waits on the host).

    python benchmarks/fla_host_time.py [--batch 16] [--seq 1024] [--calls 20] [--profile-rows 25]

For each of fla's chunked forward and backward and the conv's forward and backward, called directly and through
`torch.ops.llamathink.*` (what the compiled step calls):
- `idle`: milliseconds from the call to its return with the GPU idle before it (synchronised first): the time to
  launch its kernels;
- `queued`: the same calls back to back without synchronising: where this is well above `idle`, the call waits on
  the GPU (an implicit synchronisation, or a full launch queue);
- `gpu`: wall milliseconds per call of the queued calls (kernels included).
Then a cProfile of the direct calls in this thread (no autograd thread), by function's own time, and the Python
threads alive (a thread holding the GIL delays every launch). fla gets the autotune choices that building a model
gives it (`load_fla_tuned_configs`), so that the calls launch what training launches.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llamathink import LlamaThinkConfig
from llamathink import kernels_llamathink as kl


def timed(fn, calls: int) -> dict[str, float]:
    """Median host ms per call with the GPU idle before each call, mean host and wall ms per call back to back."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    idle = []
    for _ in range(calls):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        idle.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    queued = (time.perf_counter() - t0) * 1e3 / calls
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) * 1e3 / calls
    return {"idle": statistics.median(idle), "queued": queued, "gpu": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--profile-rows", type=int, default=25)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("fla_host_time.py needs a CUDA GPU")
    if kl._fla_chunk_internals() is None or kl._fla_conv_internals() is None:
        raise SystemExit("fla-core (with the functions LlamaThink calls) is not installed")
    cfg = LlamaThinkConfig()
    B, T, H = args.batch, args.seq, cfg.linear_num_value_heads
    Dk, Dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
    C = 2 * cfg.linear_num_key_heads * Dk + H * Dv
    dev, bf16 = torch.device("cuda"), torch.bfloat16
    gen = torch.Generator(dev).manual_seed(0)

    def randn(*shape, dtype=bf16):
        return torch.randn(*shape, device=dev, dtype=dtype, generator=gen)

    q = torch.nn.functional.normalize(randn(B, T, H, Dk).float(), dim=-1).to(bf16)
    k = torch.nn.functional.normalize(randn(B, T, H, Dk).float(), dim=-1).to(bf16)
    v, do = randn(B, T, H, Dv), randn(B, T, H, Dv)
    g = -torch.rand(B, T, H, device=dev, generator=gen) * 0.1
    beta = torch.rand(B, T, H, device=dev, generator=gen).to(bf16)
    x, dy, w = randn(B, T, C), randn(B, T, C), randn(C, cfg.linear_conv_kernel_dim, dtype=torch.float32)
    scale = Dk**-0.5
    kl.load_fla_tuned_configs()  # the autotune choices a model build gives fla for this GPU, as training has them
    fwd, bwd = kl._fla_chunk_internals()
    cfwd, cbwd = kl._fla_conv_internals()
    ops = torch.ops.llamathink
    _, _, g_cum, A = ops.fla_chunk_gdn(q, k, v, g, beta, scale, None, False)  # (o, final state, gates, A)
    calls = {
        "gdn forward, fla direct": lambda: fwd(
            q=q, k=k, v=v, g=g, beta=beta, scale=scale, initial_state=None, output_final_state=False
        ),
        "gdn forward, custom op": lambda: ops.fla_chunk_gdn(q, k, v, g, beta, scale, None, False),
        "gdn backward, fla direct": lambda: bwd(
            q=q, k=k, v=v, g=g_cum, beta=beta, A=A, scale=scale, initial_state=None, do=do, dht=None
        ),
        "gdn backward, custom op": lambda: ops.fla_chunk_gdn_backward(q, k, v, g_cum, beta, A, scale, None, do, None),
        "conv forward, fla direct": lambda: cfwd(
            x=x,
            weight=w,
            bias=None,
            residual=None,
            initial_state=None,
            output_final_state=False,
            activation="silu",
            cu_seqlens=None,
        ),
        "conv forward, custom op": lambda: ops.fla_causal_conv1d_silu(x, w, None),
        "conv backward, fla direct": lambda: cbwd(
            x=x,
            dy=dy,
            dht=None,
            weight=w,
            bias=None,
            residual=None,
            initial_state=None,
            activation="silu",
            cu_seqlens=None,
        ),
        "conv backward, custom op": lambda: ops.fla_causal_conv1d_silu_backward(x, w, dy, None),
    }
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, batch {B} x {T}, {H} heads {Dk}x{Dv}")
    print(f"{'call':28s} {'idle ms':>8s} {'queued ms':>10s} {'gpu ms':>8s}")
    for name, fn in calls.items():
        try:
            r = timed(fn, args.calls)
        except Exception as err:  # noqa: BLE001 - e.g. fla refusing its Triton backward on Hopper
            print(f"{name:28s} failed: {type(err).__name__}: {str(err)[-600:]}")
            continue
        print(f"{name:28s} {r['idle']:8.3f} {r['queued']:10.3f} {r['gpu']:8.3f}", flush=True)
    print("python threads:", ", ".join(t.name for t in threading.enumerate()))
    for name in ("gdn forward, fla direct", "gdn backward, fla direct", "conv backward, fla direct"):
        profiler = cProfile.Profile()
        torch.cuda.synchronize()
        profiler.enable()
        try:
            for _ in range(args.calls):
                calls[name]()
        except Exception:  # noqa: BLE001 - reported by the timing above
            profiler.disable()
            continue
        torch.cuda.synchronize()
        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(args.profile_rows)
        print(f"## cProfile, {args.calls} calls of {name}, by own time\n" + out.getvalue().split("\n\n", 2)[-1])


if __name__ == "__main__":
    main()
