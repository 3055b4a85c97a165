"""One compressed-sparse-attention (CSA) decoder layer's forward + backward on one GPU, compiled as training compiles
it, for several query chunks of its local path, beside a full-attention decoder layer of the same model.

`LlamaThinkCompressedSparseAttention._local_attention` runs the sliding window as one SDPA call over query chunks
of C tokens, each against a band of C + W keys (W = `csa_window`) with a band mask: a query scores C + W keys of
which it may see W. Whole-window chunks (C = W, the original form) waste half the scores at W = 512; shorter
chunks waste less for more, smaller chunks. This measures which C the GPU runs fastest, and what a CSA layer costs
against a full-attention layer (causal SDPA, no mask), the peer inside the model.

Each row: the GPU kernel time of one forward + backward of the decoder layer (torch.profiler, the mean of five, ms),
the mean wall time of one (`triton.testing.do_bench`, ms), and the largest difference of its output and input
gradient from the first CSA row's, relative to that row's largest value (the chunk does not change the function,
only the rounding; list the whole window first). With `--kernels N` each row is followed by its GPU time by kind of
kernel and its N kernels with the most time, each inductor kernel with the FX nodes it fuses (the model's variable
names): where a CSA layer's time goes beside a full-attention layer's. `--no-combo` compiles without inductor's combo
kernels, whose names do not say what they fuse.

    python benchmarks/bench_csa.py [--batch 16] [--seq 1024] [--chunks 512,256,128,64] [--model JSON] [--out f.json]
                                   [--kernels 30] [--no-combo]

Needs a CUDA GPU. The layer compiles as `compile_layers` compiles it (inductor, combo kernels where this torch has
them), under bf16 autocast, with the model's fp32 weights.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's llamathink, also run from elsewhere

REPO = Path(__file__).resolve().parents[1]


def layer_inputs(model, ids: torch.Tensor, kinds=("csa", "full")) -> dict:
    """mixer kind -> (decoder layer, its hidden_states input [B, T, hidden], its ForwardContext), captured from one
    eager forward of `model` on `ids` [B, T] (the first layer of each kind)."""
    from llamathink.modeling_llamathink import LlamaThinkDecoderLayer

    found: dict = {}
    handles = []
    for layer in model.model.layers:
        if isinstance(layer, LlamaThinkDecoderLayer) and layer.mixer_type in kinds and layer.mixer_type not in found:
            found[layer.mixer_type] = None

            def hook(module, args, kwargs, kind=layer.mixer_type):
                if found[kind] is None:
                    hidden = args[0] if args else kwargs["hidden_states"]
                    found[kind] = (module, hidden.detach(), kwargs["ctx"])

            handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    with torch.no_grad():
        model(ids, use_cache=False)
    for handle in handles:
        handle.remove()
    missing = [kind for kind in kinds if found.get(kind) is None]
    if missing:
        raise ValueError(f"the model has no decoder layer of mixer type {missing}")
    return found


def gpu_kernel_ms(fn, calls: int = 5) -> float:
    """GPU kernel time of one call of `fn`, the mean of `calls` (torch.profiler; every kernel and copy summed), ms."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages() if e.self_device_time_total > 0) / 1e3 / calls


def kernels_text(averages, top: int, origins: dict | None = None) -> str:
    """The GPU kernels of one profiled call, from its `prof.key_averages()`: GPU ms by kind
    (`profile_gpu.kernel_kinds`), then the `top` kernels by their own time (ms, launches, name), each inductor kernel
    followed by the FX nodes it fuses, in every graph that defines its name, where `origins`
    (`profile_gpu.kernel_origins`) has it."""
    from profile_gpu import is_gpu_kernel, kernel_kinds

    kernels = sorted((e for e in averages if is_gpu_kernel(e)), key=lambda e: -e.self_device_time_total)
    lines = [kernel_kinds(averages), f"the {min(top, len(kernels))} kernels with the most time (ms, launches, name):"]
    for e in kernels[:top]:
        lines.append(f"  {e.self_device_time_total / 1e3:8.3f} {e.count:5d}  {e.key[:150]}")
        lines += [f"      <- {graph}: [{nodes[:200]}]" for graph, nodes in (origins or {}).get(e.key, [])]
    return "\n".join(lines)


def layer_kernels(fn, top: int, origins: dict | None = None) -> str:
    """`kernels_text` of one call of `fn` (torch.profiler, GPU activity only)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return kernels_text(prof.key_averages(), top, origins)


def run_layer(layer, hidden: torch.Tensor, ctx, grad: torch.Tensor):
    """One forward + backward of a decoder layer under bf16 autocast -> (output, input gradient); the weights'
    gradients are dropped (not accumulated from call to call)."""
    layer.zero_grad(set_to_none=True)
    x = hidden.detach().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = layer(x, ctx=ctx)
    out.backward(grad)
    return out.detach(), x.grad


def measure(
    layer, hidden, ctx, grad, compile_kwargs: dict, top_kernels: int = 0
) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Compile a copy of `layer` and time its forward + backward -> (times, output, input gradient); with
    `top_kernels` the times also hold "kernels", `layer_kernels`'s text for one call, the kernels traced to the FX
    nodes of the layer's generated code."""
    import triton
    from profile_gpu import kernel_origins
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()  # each configuration its own compilation, never past dynamo's recompile limit
    layer = copy.deepcopy(layer)
    layer.compile(**compile_kwargs)
    (out, dx), sources = run_and_get_code(run_layer, layer, hidden, ctx, grad)  # compiles: keep inductor's code
    for _ in range(2):  # autotuning, warm-up
        out, dx = run_layer(layer, hidden, ctx, grad)
    kernels = gpu_kernel_ms(lambda: run_layer(layer, hidden, ctx, grad))
    wall = triton.testing.do_bench(lambda: run_layer(layer, hidden, ctx, grad), warmup=25, rep=200)
    times = {"gpu_kernel_ms": round(kernels, 4), "wall_ms": round(wall, 4)}
    if top_kernels:
        origins = kernel_origins(sources)
        times["kernels"] = layer_kernels(lambda: run_layer(layer, hidden, ctx, grad), top_kernels, origins)
    return times, out, dx


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--chunks", default="512,256,128,64", help="local query chunks C to time, comma-separated")
    parser.add_argument("--model", default=str(REPO / "configuration" / "models" / "llamathink-95m.json"))
    parser.add_argument("--out", help="also write the rows as JSON")
    parser.add_argument("--kernels", type=int, default=0, help="print each row's N kernels with the most GPU time")
    parser.add_argument("--no-combo", action="store_true", help="compile without inductor's combo kernels")
    args = parser.parse_args(argv)
    if args.kernels < 0:
        parser.error(f"--kernels: a count of kernels, 0 or more (got {args.kernels})")
    chunks = [int(c) for c in args.chunks.split(",") if c.strip()]
    if not chunks or min(chunks) < 1:
        parser.error(f"--chunks: positive integers, comma-separated (got {args.chunks!r})")
    if not torch.cuda.is_available():
        print("bench_csa.py needs a CUDA GPU", file=sys.stderr)
        return 2

    from llamathink import LlamaThinkConfig, LlamaThinkForCausalLM
    from llamathink.train.loop import compile_kwargs

    torch.manual_seed(0)
    config = LlamaThinkConfig.from_json_file(args.model)
    model = LlamaThinkForCausalLM(config).cuda()
    with torch.no_grad():  # the zero-initialised scales and projections would make the gradients trivial
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), device="cuda")
    inputs = layer_inputs(model, ids)
    how = compile_kwargs("default", combo_kernels=not args.no_combo)
    grad = torch.randn(args.batch, args.seq, config.hidden_size, device="cuda", dtype=torch.bfloat16)

    rows = []
    csa_layer, hidden, ctx = inputs["csa"]
    window = csa_layer.mixer.window
    first = None
    for chunk in chunks:
        layer = copy.deepcopy(csa_layer)
        layer.mixer.local_chunk = chunk
        times, out, dx = measure(layer, hidden, ctx, grad, how, args.kernels)
        kernels = times.pop("kernels", None)
        row = {"layer": "csa", "local_chunk": chunk, "effective_chunk": min(args.seq, window, chunk), **times}
        if first is None:
            first = (out, dx)
        # relative to the first row's largest value: bf16 rounding is about 1e-2 of it
        row["out_diff_rel"] = float((out.float() - first[0].float()).abs().max() / first[0].float().abs().max())
        row["dx_diff_rel"] = float((dx.float() - first[1].float()).abs().max() / first[1].float().abs().max())
        rows.append(row)
        print(json.dumps(row), flush=True)
        if kernels:
            print(kernels, flush=True)
    full_layer, hidden, ctx = inputs["full"]
    times = measure(full_layer, hidden, ctx, grad, how, args.kernels)[0]
    kernels = times.pop("kernels", None)
    row = {"layer": "full", **times}
    rows.append(row)
    print(json.dumps(row), flush=True)
    if kernels:
        print(kernels, flush=True)

    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "batch": args.batch,
        "seq": args.seq,
        "csa_window": window,
        "combo_kernels": not args.no_combo,
        "rows": rows,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
