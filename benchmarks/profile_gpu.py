"""Where the time goes: a torch.profiler view of one LlamaThink training step and of cached decoding on one GPU.

    python benchmarks/profile_gpu.py [--backend auto] [--batch 16] [--seq 1024] [--decode-tokens 32] [--compile]
                                     [--cuda-graphs] [--no-eager] [--peers hf-llama] [--eager-peers hf-qwen3.5]
                                     [--optimizer | --optimizer-only] [--out DIR] [--top-kernels N] [--eager-ops]
                                     [--host-python] [--kernel-sources] [--inductor-option KEY=VALUE ...]

Prints (and with --out writes as text) the kernels that take the most GPU time in a bf16 training step (with
--compile also those of the step with the decoder layers compiled as training compiles them), the GPU time per layer
kind (forward + backward, measured with CUDA events around each decoder layer and the loss), and for greedy decoding
at batch 1: host time per token, host launch calls per token and the host<->device syncs per token, with the Python
lines that cause them (`torch.cuda.set_sync_debug_mode`); every kernel table also gives the step's host launch
calls, the eager steps their host syncs by Python line, and `--eager-peers hf-qwen3.5` profiles that peer's eager
step the same way in the same process (the eager target of issue 17); with --optimizer also the host and GPU time of
gradient clipping + the optimizer step (Muon + AdamW), with Muon's Newton-Schulz step eager and recorded as a CUDA
graph (`muon_cuda_graph`); --optimizer-only times only that, for LlamaThink and for HF Llama (the peer of
`bench_gpu.py`, same optimizer code) in one process. Every kernel table ends with the step's GPU time by kind of
kernel (matrix products, attention, fla, inductor's fused kernels, ...); `--peers hf-llama` profiles that peer's
compiled step the same way in the same process, so the kinds can be compared model against model. With --cuda-graphs
the layers (and the peers) compile in torch.compile's reduce-overhead mode, as one-GPU training compiles them: the
profile then shows the kernels the CUDA graphs replay (CSA's FlexAttention path among them).

With --kernel-sources (and --compile) inductor's generated code of the compiled step is kept (with --out, in
DIR/kernel_sources_<backend>.py.gz): every inductor kernel of the top-kernel list is followed by the graph that
defines it and the model's lines it fuses (inductor's "Source Nodes" comment: the variable names of the model's
code), combo kernels included, and inductor's time is summed by compiled graph (`kernel_origins`,
`inductor_ms_by_graph`). Every list of top kernels says, under each inductor kernel, the configuration inductor's
autotuner kept for it in this process (`inductor_autotune_picks`): the same code can keep another in another process.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import re
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llamathink import LlamaThinkForCausalLM  # noqa: E402


def layer_times(model, ids, steps=3) -> dict[str, float]:
    """Milliseconds of GPU time per layer kind for forward + backward (events around each layer's forward and, via
    tensor hooks on its output and input, around its backward)."""
    totals: dict[str, float] = collections.defaultdict(float)
    events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            hidden = args[0]
            start.record()
            out = fn(*args, **kwargs)
            end.record()
            events.append((name + " fwd", start, end))
            if hidden.requires_grad:  # backward of this layer: from the grad of its output to the grad of its input
                b_start, b_end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                out.register_hook(lambda g: (b_start.record(), g)[1])
                hidden.register_hook(lambda g: (b_end.record(), g)[1])
                events.append((name + " bwd", b_start, b_end))
            return out

        return wrapper

    for layer in model.model.layers:
        layer.forward = timed(f"{layer.mixer_type}+mlp", layer.forward)
    try:
        _timed_steps(model, ids, steps, events, totals)
    finally:  # the instance attributes shadow the class's forward: removing them restores it
        for layer in model.model.layers:
            del layer.forward
    return dict(totals)


def _timed_steps(model, ids, steps, events, totals):
    for i in range(steps + 1):
        events.clear()
        t0, t1, t2 = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            t0.record()
            loss = model(input_ids=ids, labels=ids, use_cache=False, skip_logits=True).loss
            t1.record()
        loss.backward()
        t2.record()
        torch.cuda.synchronize()
        if i == 0:
            continue  # warm-up
        totals["step total (fwd)"] += t0.elapsed_time(t1) / steps
        totals["step total (bwd)"] += t1.elapsed_time(t2) / steps
        for name, start, end in events:
            totals[name] += start.elapsed_time(end) / steps
    model.zero_grad(set_to_none=True)


def training_loss(model, ids):
    """The bf16 training forward of one step; `model` may be the torch.compile'd module or a peer from
    `bench_gpu.build` (no `skip_logits`: it computes its logits)."""
    kwargs = {"skip_logits": True} if isinstance(getattr(model, "_orig_mod", model), LlamaThinkForCausalLM) else {}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        return model(input_ids=ids, labels=ids, use_cache=False, **kwargs).loss


def forward_backward(model, ids):
    """One bf16 training step without the optimizer (`training_loss`, then its backward). A model compiled with CUDA
    graphs (`with_cuda_graphs`) begins a new cudagraph-trees step first and keeps its `.grad` tensors (zeroed), as
    training does."""
    graphs = getattr(model, "profile_cuda_graphs", False)
    if graphs:
        torch.compiler.cudagraph_mark_step_begin()
    training_loss(model, ids).backward()
    model.zero_grad(set_to_none=not graphs)


def with_cuda_graphs(model):
    """Mark `model` (compiled in a CUDA-graph mode) for `forward_backward`, and give every parameter a zero `.grad`
    that lives for the run (no gradient is then a graph's output, which the next replay would overwrite). Returns
    the model."""
    model.profile_cuda_graphs = True
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    return model


# Kernel-name patterns of each kind of GPU work, first match wins (names as CUDA, cuBLAS/cuDNN, fla, tilelang and
# inductor give them). Inductor's kernels first: their names list the ops they fuse, which can be the ops of another
# kind (a pointwise kernel that feeds cuDNN attention's backward is named after it), FlexAttention's templates before
# its other kernels.
KERNEL_KINDS = (
    ("FlexAttention (inductor)", ("triton_tem_fused",)),
    ("inductor fused (triton_*)", ("triton_",)),
    ("matrix products (cuBLAS/CUTLASS)", ("nvjet", "gemm", "cutlass", "xmma", "cublas", "splitkreduce")),
    ("attention (SDPA: cuDNN/flash/efficient)", ("sdpa", "flash", "fmha", "attention", "cudnn")),
    ("FlexAttention (inductor)", ("flex",)),
    ("fla causal conv", ("causal_conv1d",)),
    (
        "fla Gated DeltaNet (Triton, tilelang)",
        (
            "chunk_",
            "gated_delta",
            "kernel_kernel",
            "solve_tril",
            "wy_",
            "merge_16x16",
            "recompute_w_u",
            "l2norm",
            "prepare_",
            "cumsum",
        ),
    ),
    ("copies and fills", ("copy", "memcpy", "memset", "fill")),
    ("aten elementwise / reductions", ("elementwise", "reduce", "at::native")),
)


def is_gpu_kernel(event) -> bool:
    """A GPU kernel (or copy) of `prof.key_averages()`, not a range: with `record_shapes` the profiler also puts
    inductor's "## Call CompiledFxGraph ... ##" annotations on the GPU timeline, spanning the kernels they call."""
    return (
        event.device_type == torch.autograd.DeviceType.CUDA
        and event.self_device_time_total > 0
        and not event.key.startswith("## ")
    )


def kernel_kinds(averages) -> str:
    """GPU milliseconds of one profiled step by kind of kernel (`KERNEL_KINDS`), from `prof.key_averages()`: where
    the step's GPU time goes, comparable between models and between compile modes."""
    totals: dict[str, float] = collections.defaultdict(float)
    counts: dict[str, int] = collections.defaultdict(int)
    for e in averages:
        if not is_gpu_kernel(e):
            continue
        name = e.key.lower()
        kind = next((k for k, pats in KERNEL_KINDS if any(p in name for p in pats)), "other")
        totals[kind] += e.self_device_time_total / 1e3
        counts[kind] += e.count
    total = sum(totals.values())
    lines = ["GPU ms by kind of kernel:"]
    for kind, ms in sorted(totals.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {kind:42s} {ms:8.2f} ms  {100 * ms / total:5.1f}%  {counts[kind]:5d} launches")
    return "\n".join(lines)


# The host API calls that put work on the GPU's queue: kernels (runtime and driver APIs), and copies and fills.
LAUNCH_CALLS = (
    "cudaLaunchKernel",
    "cudaLaunchKernelExC",
    "cuLaunchKernel",
    "cuLaunchKernelEx",
    "cudaMemcpyAsync",
    "cudaMemsetAsync",
    "cudaGraphLaunch",
)


def launch_calls(averages) -> int:
    """How many times the host put work on the GPU's queue in a profiled region (`LAUNCH_CALLS` in
    `prof.key_averages()`): each costs host time, which is what bounds an eager step whose GPU waits on its host.
    A CUDA graph's replay counts once."""
    return sum(e.count for e in averages if e.key in LAUNCH_CALLS)


# What `torch.cuda.set_sync_debug_mode("warn")` warns with (c10/cuda/CUDAFunctions.cpp)
_SYNC_WARNING = "called a synchronizing CUDA operation"


def host_syncs(run) -> collections.Counter:
    """The host<->device synchronisations that `run()` makes, counted by the Python line that makes them
    ("file.py:line"), caught with `torch.cuda.set_sync_debug_mode("warn")`. A sync in a step makes the host wait for
    the GPU to finish everything queued before it, so host and GPU time add up where they would overlap. Warnings
    other than the sync warning are not counted; the mode set before is set again afterwards."""
    syncs = collections.Counter()
    before = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode(before)
    for w in caught:
        if _SYNC_WARNING in str(w.message):
            syncs[f"{Path(w.filename).name}:{w.lineno}"] += 1
    return syncs


def step_syncs(model, ids, rows: int = 10) -> str:
    """The host syncs of one training step (`forward_backward`) by Python line (`host_syncs`), after a warm-up step
    (autotuners and first calls sync once)."""
    forward_backward(model, ids)
    torch.cuda.synchronize()
    syncs = host_syncs(lambda: forward_backward(model, ids))
    lines = [f"host syncs in a training step: {sum(syncs.values())}" + ("; by line:" if syncs else "")]
    lines += [f"  {n:6d}  {where}" for where, n in syncs.most_common(rows)]
    return "\n".join(lines)


_AOT_ID = re.compile(r"^# AOT ID: \['([^']*)'\]")
_KERNEL_DEFINITION = re.compile(r"^(\w+) = async_compile\.(?:triton|cpp_pybinding|cpp)\(")
_LOG_PREFIX = re.compile(r"^.*?\[__output_code\] ")  # what TORCH_LOGS=output_code puts before each line


def kernel_origins(sources: list[str]) -> dict[str, list[tuple[str, str]]]:
    """Inductor kernel name -> [(graph, source nodes)], from the generated code of compiled graphs: the sources that
    `torch._inductor.utils.run_and_get_code` collects, or a `TORCH_LOGS=output_code` log (its line prefixes are
    dropped). Each graph's code starts with its AOT ID ("0_forward", "0_backward", "1_inference", ...: dynamo's
    compile order; "?" for code before any AOT ID), and above each kernel's definition inductor writes the FX nodes
    it fuses, named after the model's variables ("# Topologically Sorted Source Nodes: [qkv, silu], Original ATen:
    [...]"; "" where there is no such comment). Inductor numbers kernels per graph, so one name can be defined by
    several graphs: each definition is listed."""
    origins: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
    for code in sources:
        graph, nodes = "?", ""
        for line in code.splitlines():
            line = _LOG_PREFIX.sub("", line, count=1)
            if match := _AOT_ID.match(line):
                graph = match.group(1)
            elif "Source Nodes: [" in line:
                nodes = line.split("Source Nodes: ", 1)[1].split("], Original ATen:", 1)[0].strip("[]")
            elif match := _KERNEL_DEFINITION.match(line):
                origins[match.group(1)].append((graph, nodes))
                nodes = ""
    return dict(origins)


def loaded_inductor_modules() -> list:
    """The generated modules torch's `PyCodeCache` has loaded in this process (compiled graphs' code and kernels'
    own files), oldest first; [] where this torch keeps them otherwise."""
    try:
        from torch._inductor.codecache import PyCodeCache

        return [*PyCodeCache.modules, *PyCodeCache.modules_no_attr.values()]
    except Exception:  # noqa: BLE001 - a reading aid of a profile: never its failure
        return []


def _kept_config(kernel) -> str | None:
    """The configuration an inductor kernel (torch's `CachingAutotuner`) runs with and how it was chosen, or None
    where it has not chosen yet or this torch describes it otherwise."""
    try:
        launchers = list(kernel.launchers or ())
        if len(launchers) != 1:
            return None
        config = launchers[0].config
        settings = [f"{key}={value}" for key, value in sorted(config.kwargs.items())]
        settings += [f"{key}={getattr(config, key)}" for key in ("num_warps", "num_stages") if hasattr(config, key)]
        info = getattr(kernel, "autotune_cache_info", None) or {}
        # torch drops `configs` (sets it to None) once they are compiled: the count is in the cache info
        candidates = info.get("num_configs")
        if candidates is None:
            candidates = len(getattr(kernel, "configs", None) or ())
        if info.get("autotune_cache_state") == "hit":
            how = "cached pick"
        elif int(candidates) > 1:
            times = _measured_times(kernel, config)
            how = f"of {candidates} configs; timed {times}" if times else f"of {candidates} timed"
        else:
            how = "only config"
    except Exception:  # noqa: BLE001 - one kernel this torch describes otherwise: left out
        return None
    return f"{', '.join(settings)} ({how})"


def _measured_times(kernel, config) -> str:
    """ "21.0*, 25.3 us": what inductor's autotuner measured for each configuration it timed for `kernel` (torch
    keeps the times on the kernel's coordinate-descent tuner, in ms, keyed as `triton_config_to_hashable` keys
    them; a combo kernel's block-size trials are there too, so there may be more times than configurations),
    fastest first, `config` (the kept one) starred; "" where this torch keeps them otherwise. Close times make the
    pick a coin toss between processes."""
    try:
        from torch._inductor.runtime.runtime_utils import triton_config_to_hashable

        timed = getattr(getattr(kernel, "coordesc_tuner", None), "cached_benchmark_results", None) or {}
        kept = triton_config_to_hashable(config)
        timings = sorted((float(ms), key == kept) for key, ms in timed.items())
    except Exception:  # noqa: BLE001 - the kept configuration is still listed
        return ""
    return (", ".join(f"{ms * 1e3:.1f}{'*' * star}" for ms, star in timings) + " us") if timings else ""


def inductor_autotune_picks(modules) -> dict[str, list[str]]:
    """What inductor's autotuner kept for each of its Triton kernels in `modules` (generated modules, e.g. those of
    `loaded_inductor_modules` that one model's compilation loaded): kernel name -> one line per definition
    ("0_forward: XBLOCK=8, num_warps=8, num_stages=1 (of 3 configs; timed 21.0*, 25.3, 90.1 us)", the times as
    the autotuner measured them on the first launch, fastest first, the kept one starred; "... (cached pick)" where
    inductor's on-disk autotune cache gave it, "... (only config)" where there was nothing to choose). Inductor
    times 2-6 block sizes of a reduction on its first launch and keeps the fastest for the process; two processes
    running the same generated code can keep different ones (BENCHMARKS.md section 1, sessions 33-34), which this
    shows beside the kernel table.

    A kernel is an attribute named "triton_..." with `launchers` (torch's `CachingAutotuner`), found once however
    many modules hold it; its graph is the AOT ID of the first module holding it that has one ("?" otherwise). A
    kernel that has several candidates and has not run yet (no single launcher) is left out, as is one this torch
    describes otherwise (no `config` on its launcher). Never raises."""
    found: dict[int, tuple[str, object, str]] = {}
    for module in modules:
        graph = "?"
        try:
            with open(module.__file__, encoding="utf-8") as f:
                if match := _AOT_ID.match(f.readline()):
                    graph = match.group(1)
        except (OSError, AttributeError, TypeError, ValueError):
            pass
        for name, kernel in list(getattr(module, "__dict__", {}).items()):
            if not name.startswith("triton_") or not hasattr(kernel, "launchers"):
                continue
            if id(kernel) not in found or (found[id(kernel)][2] == "?" and graph != "?"):
                found[id(kernel)] = (name, kernel, graph)
    picks: dict[str, list[str]] = collections.defaultdict(list)
    for name, kernel, graph in sorted(found.values(), key=lambda entry: (entry[0], entry[2])):
        if (kept := _kept_config(kernel)) is not None:
            picks[name].append(f"{graph}: {kept}")
    return dict(picks)


def inductor_ms_by_graph(
    kernels: list[tuple[str, float]], origins: dict[str, list[tuple[str, str]]], skip: tuple[str, ...] = ()
) -> dict:
    """GPU ms of inductor's kernels by the compiled graph that defines them.

    `kernels` [(kernel name, ms)]: one profiled step; a name of 150 characters or more may be cut short, as this
    script's tables cut names, and is matched by its prefix. `origins`: from `kernel_origins`. `skip`: graphs (AOT
    IDs) whose definitions do not count, e.g. a peer's compiled in the same process. A name several graphs define is
    split evenly between them (the profiler sums launches by name). Inductor's kernels (named "triton_..." or
    "cpp_...") of no graph in `origins` are summed under "(no graph)"; other kernels (cuBLAS, fla, ...) are left
    out. Returns {graph: ms}, the largest first."""
    by_graph: dict[str, float] = collections.defaultdict(float)
    for name, ms in kernels:
        places = origins.get(name, [])
        if not places and len(name) >= 150:
            places = [place for full, found in origins.items() if full.startswith(name) for place in found]
        graphs = sorted({graph for graph, _ in places if graph not in skip})
        if not graphs and name.startswith(("triton_", "cpp_")):
            graphs = ["(no graph)"]
        for graph in graphs:
            by_graph[graph] += ms / len(graphs)
    return dict(sorted(by_graph.items(), key=lambda kv: -kv[1]))


def kernel_table(
    model,
    ids,
    rows=30,
    host_stacks: bool = False,
    top_kernels: int = 0,
    eager_ops: bool = False,
    sources: list[str] | None = None,
    trace: Path | None = None,
) -> str:
    """The kernels taking the most GPU time in one training step; with `host_stacks` also the Python call sites
    taking the most host time (where a step that waits on the host spends it); with `top_kernels` also that many
    GPU kernels by their own time (inductor's fused kernels one by one); with `eager_ops` also the aten ops that
    launch kernels of their own (inductor's calls to matrix products and attention, and the ops inside custom ops
    or between compiled regions), by input shapes, which tell where they come from. With `sources` (a list) the
    generated code of the model's compilation is appended to it, each top kernel is followed by where it comes
    from (`kernel_origins`) and inductor's time is summed by compiled graph (`inductor_ms_by_graph`). The code is
    caught by `torch._inductor.utils.run_and_get_code`, which first resets dynamo for the whole process
    (`torch._dynamo.reset`: every compiled function recompiles at its next call): pass `sources` for the first
    model this process compiles, before any other is profiled. With `trace` (a path ending in .json.gz) the step's
    profile is also written there as a gzipped Chrome trace, which `trace_gaps.py` reads (where the GPU waits, and
    for which host op)."""
    from torch.profiler import ProfilerActivity, profile

    earlier = {id(module) for module in loaded_inductor_modules()}  # other models' code: not this one's picks
    if sources is not None:  # the first call compiles: keep inductor's code (this resets dynamo first)
        from torch._inductor.utils import run_and_get_code

        sources += run_and_get_code(forward_backward, model, ids)[1]
    for _ in range(2):  # warm-up (and, for a compiled model, compilation)
        forward_backward(model, ids)
    torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
    with profile(activities=activities, with_stack=host_stacks, record_shapes=eager_ops) as prof:
        forward_backward(model, ids)
        torch.cuda.synchronize()
    averages = prof.key_averages()
    busy_ms = sum(e.self_device_time_total for e in averages if is_gpu_kernel(e)) / 1e3
    table = averages.table(sort_by="device_time_total", row_limit=rows, max_name_column_width=70)
    text = (
        f"{table}\nGPU kernel time of the step (forward + backward): {busy_ms:.1f} ms; host launch calls "
        f"(`LAUNCH_CALLS`): {launch_calls(averages)}\n{kernel_kinds(averages)}"
    )
    if trace is not None:  # (the profiler gzips a path ending in .gz itself, as bench_gpu's `trace_steps` has it)
        trace.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace))
    if top_kernels:
        kernels = [e for e in averages if is_gpu_kernel(e)]
        kernels.sort(key=lambda e: -e.self_device_time_total)
        origins = kernel_origins(sources) if sources is not None else {}
        picks = inductor_autotune_picks([m for m in loaded_inductor_modules() if id(m) not in earlier])
        lines = []
        for e in kernels[:top_kernels]:
            lines.append(f"  {e.self_device_time_total / 1e3:8.3f} {e.count:5d}  {e.key[:150]}")
            lines += [f"      <- {graph}: [{nodes[:200]}]" for graph, nodes in origins.get(e.key, [])]
            lines += [f"      kept {pick}" for pick in picks.get(e.key, [])]
        text += f"\n## the {top_kernels} GPU kernels with the most time (ms, launches, name)\n" + "\n".join(lines)
        if sources is not None:
            by_graph = inductor_ms_by_graph([(e.key, e.self_device_time_total / 1e3) for e in kernels], origins)
            text += (
                "\n## inductor's GPU ms by compiled graph (AOT IDs in dynamo's compile order; a kernel name that "
                "several graphs define is split evenly; (no graph): inductor's kernels found in no graph's code)\n"
                + "\n".join(f"  {graph:24s} {ms:8.2f}" for graph, ms in by_graph.items())
            )
    if eager_ops:
        ops = [
            e
            for e in prof.key_averages(group_by_input_shape=True)
            if e.key.startswith("aten::") and e.self_device_time_total > 0
        ]
        ops.sort(key=lambda e: -e.self_device_time_total)
        text += "\n## aten ops with their own GPU kernels (ms, calls, op, input shapes)\n" + "\n".join(
            f"  {e.self_device_time_total / 1e3:8.3f} {e.count:5d}  {e.key}  {str(e.input_shapes)[:160]}"
            for e in ops[:40]
        )
    if host_stacks:
        stacks = prof.key_averages(group_by_stack_n=8).table(
            sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60, max_src_column_width=110
        )
        text += "\n## host time by call site (self CPU time, grouped by the innermost 8 Python frames)\n" + stacks
    return text


def step_wall_ms(model, ids, steps=5) -> str:
    """Wall time of a synchronised training step (forward + backward): compared with the GPU kernel time above, the
    difference is time the GPU waits on the host (launch overhead, graph breaks, syncs); and the peak memory
    allocated during these steps (GiB) with what was allocated before them (a peer profiled after LlamaThink in one
    process finds LlamaThink's model still there)."""
    wall = 0.0
    held = torch.cuda.memory_allocated() / 2**30  # weights and whatever else the process keeps on the GPU
    torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        forward_backward(model, ids)
        torch.cuda.synchronize()
        wall += (time.perf_counter() - t0) * 1e3 / steps
    peak = torch.cuda.max_memory_allocated() / 2**30
    return (
        f"wall time of a training step (forward + backward, no optimizer): {wall:.1f} ms; peak memory {peak:.2f} GiB, "
        f"{held:.2f} GiB of it held before the step"
    )


# Where a host-bound step's Python time goes, by the package of the source file (first match wins): torch.profiler
# charges a custom op's Python body (fla's launch code) to the op, so only a Python profiler splits it.
HOST_PACKAGES = (
    ("fla", ("/fla/",)),
    ("tilelang / tvm_ffi", ("/tilelang/", "/tvm_ffi/")),
    ("triton", ("/triton/",)),
    ("inductor (compiled graphs' wrappers)", ("/torch/_inductor/", "torchinductor", "/inductor/")),
    ("dynamo (guards, frames)", ("/torch/_dynamo/",)),
    ("AOTAutograd", ("/torch/_functorch/",)),
    ("torch.library / custom ops", ("/torch/_library/", "/torch/_ops.py")),
    ("autograd", ("/torch/autograd/",)),
    ("llamathink", ("/llamathink/",)),
)


def host_python_profile(model, ids, steps: int = 5, rows: int = 40) -> str:
    """Where the host's time goes in the forwards of `steps` training steps, by Python function (cProfile): the
    share of each package (fla's launch code, tilelang's, Triton's launcher, inductor's graph wrappers, dynamo,
    autograd) and the functions with the most time of their own. Only the forward is profiled: the backward runs in
    autograd's device thread, and Python 3.12's cProfile (built on sys.monitoring, which sees every thread) folds it
    into the main thread's call stack, where its time lands on the wrong functions (session 24 found 155 ms of own
    time in a 126 ms step). cProfile slows each Python call by about a microsecond, so the shares are what to read,
    not the absolute milliseconds; the first line gives the wall time per step without the profiler and the host
    time of the profiled forwards (`benchmarks/fla_host_time.py` times fla's calls one by one, backward too)."""
    import cProfile
    import pstats

    for _ in range(2):
        forward_backward(model, ids)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        forward_backward(model, ids)
    torch.cuda.synchronize()
    plain_ms = (time.perf_counter() - t0) * 1e3 / steps
    profiler = cProfile.Profile()
    forward_s = 0.0
    graphs = getattr(model, "profile_cuda_graphs", False)
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        profiler.enable()
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        loss = training_loss(model, ids)
        profiler.disable()
        forward_s += time.perf_counter() - t0
        loss.backward()
        model.zero_grad(set_to_none=not graphs)
    torch.cuda.synchronize()
    profiled_ms = forward_s * 1e3 / steps
    stats = pstats.Stats(profiler)
    by_package = collections.Counter()
    own = []
    for (path, line, func), (_, calls, tottime, _, _) in stats.stats.items():
        package = next(
            (name for name, marks in HOST_PACKAGES if any(mark in path for mark in marks)),
            "other Python and C calls",
        )
        by_package[package] += tottime * 1e3 / steps
        own.append((tottime * 1e3 / steps, calls // steps, f"{path.split('site-packages/')[-1]}:{line}({func})"))
    own.sort(reverse=True)
    lines = [
        (
            f"wall time per step: {plain_ms:.1f} ms without the profiler; host time of the forward under cProfile: "
            f"{profiled_ms:.1f} ms; host ms per forward by package (cProfile's own time of each function, summed):"
        )
    ]
    lines += [f"  {name:40s} {ms:8.2f}" for name, ms in by_package.most_common()]
    lines.append(
        f"## the {rows} functions with the most time of their own (ms per forward, calls per forward, function)"
    )
    lines += [f"  {ms:8.3f} {calls:6d}  {where[:160]}" for ms, calls, where in own[:rows]]
    return "\n".join(lines)


def eager_step_report(model, ids, what: str, host_python: bool, trace: Path | None = None) -> list[str]:
    """The eager step's sections of the report, alike for LlamaThink and an eager peer: its kernels
    (`kernel_table`, with `trace` also written as a Chrome trace there), wall time and peak memory (`step_wall_ms`),
    host syncs (`step_syncs`) and, with `host_python`, its host time by package (`host_python_profile`); `what`
    names the step in that last heading."""
    out = [kernel_table(model, ids, trace=trace), step_wall_ms(model, ids), step_syncs(model, ids)]
    if host_python:
        out += [f"## host time of {what} by Python package and function (cProfile)", host_python_profile(model, ids)]
    return out


def optimizer_ms(model, steps: int = 10, cuda_graph: bool = True) -> str:
    """The training loop's work between backward and the next forward, alone: gradient clipping and the project's
    optimizer (Muon for hidden matrices, AdamW for the rest; `llamathink.train.optim.build_optimizer` with the
    default settings) on random gradients. Host time is the time to launch it (no sync); wall time waits for the
    GPU. When the host time is above the GPU time, the GPU idles for the difference on every step (the loop reads
    the loss and the gradient norm before the update). `cuda_graph`: the run setting `muon_cuda_graph` (Muon's
    Newton-Schulz step recorded as a CUDA graph, or eager)."""
    from torch.profiler import ProfilerActivity, profile

    from llamathink.train.config import RunConfig
    from llamathink.train.optim import build_optimizer

    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    allocated0, reserved0 = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    optimizer = build_optimizer(model, RunConfig(muon_cuda_graph=cuda_graph))

    def step():
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    gib = 2**-30
    memory = (
        f"memory: {(torch.cuda.memory_allocated() - allocated0) * gib:.2f} GiB allocated and "
        f"{(torch.cuda.memory_reserved() - reserved0) * gib:.2f} GiB reserved after the first steps (optimizer state "
        f"and buffers), peak {(torch.cuda.max_memory_allocated() - allocated0) * gib:.2f} GiB above the gradients"
    )
    host = wall = 0.0
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        host += (t1 - t0) * 1e3 / steps
        wall += (time.perf_counter() - t0) * 1e3 / steps
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    launches = sum(e.count for e in averages if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx"))
    model.zero_grad(set_to_none=True)
    table = averages.table(sort_by="device_time_total", row_limit=20, max_name_column_width=70)
    return (
        f"clip + optimizer step (muon_cuda_graph: {str(cuda_graph).lower()}): host (launch) {host:.1f} ms, wall {wall:.1f} ms, {launches} kernel launches; its "
        f"kernels' GPU time is the table's 'Self CUDA time total' (the optimizer's own annotation row counts the "
        f"span, not kernels); {memory}\n{table}"
    )


@torch.no_grad()
def decode_profile(model, tokens: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    model.eval()
    ids = torch.randint(3, 32000, (1, 32), device="cuda")
    kwargs = dict(do_sample=False, pad_token_id=0, max_new_tokens=tokens, min_new_tokens=tokens)
    model.generate(ids, **kwargs)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(ids, **kwargs)
    torch.cuda.synchronize()
    per_token = (time.perf_counter() - t0) / tokens
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        model.generate(ids, **kwargs)
        torch.cuda.synchronize()
    launches = launch_calls(prof.key_averages())
    gpu_us = sum(e.device_time_total for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA)
    syncs = host_syncs(lambda: model.generate(ids, **kwargs))
    lines = [
        f"decode batch 1: {1 / per_token:.1f} tokens/s, {per_token * 1e3:.2f} ms/token host wall time",
        f"host launch calls per token: {launches / tokens:.0f}; GPU busy per token: {gpu_us / tokens / 1e3:.3f} ms",
        f"host syncs per token: {sum(syncs.values()) / tokens:.1f}; by line:",
    ]
    lines += [f"  {n / tokens:6.2f}  {where}" for where, n in syncs.most_common(20)]
    lines.append(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=60))
    return "\n".join(lines)


def inductor_option(text: str) -> tuple[str, object]:
    """ "KEY=VALUE" -> (KEY, VALUE read as a Python literal, or as the string where it is none), for an option of
    torch._inductor.config whose default has VALUE's type (a bool option takes True or False, an int one an int).
    Raises SystemExit naming an option inductor does not have or a value of the wrong type, so that a typo stops
    before any GPU work rather than at the first compiled call."""
    import ast

    import torch._inductor.config as inductor_config

    key, sep, value = text.partition("=")
    options = inductor_config.get_config_copy()
    if not sep or key not in options:
        raise SystemExit(f"--inductor-option {text!r}: not KEY=VALUE with KEY one of torch._inductor.config's options")
    try:
        value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        pass  # a string
    default = options[key]
    if default is not None:
        wanted = (int, float) if type(default) is float else type(default)
        if isinstance(value, bool) != isinstance(default, bool) or not isinstance(value, wanted):
            raise SystemExit(
                f"--inductor-option {text!r}: {key} wants a value of type {type(default).__name__} (default {default!r}), "
                f"not {value!r}"
            )
    return key, value


MODEL_VARIANTS = ("no-hc", "head128", "eager-decode")  # bench_gpu's variants that change the model, not its running


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="auto")
    parser.add_argument(
        "--model",
        default=None,
        help="the LlamaThink model as bench_gpu.py names it (default llamathink:BACKEND; e.g. llamathink:auto:no-hc)",
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--compile", action="store_true", help="also profile the torch.compile'd training step")
    parser.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="compile in torch.compile's reduce-overhead mode, as one-GPU training does (compile_mode: auto): the "
        "layers' kernels replayed as CUDA graphs (CSA then runs through FlexAttention); the peers too (needs "
        "--compile)",
    )
    parser.add_argument("--out", default=None, help="also write the report to DIR/profile_<backend>.txt")
    parser.add_argument("--no-decode", action="store_true", help="skip the decoding profile")
    parser.add_argument("--host-stacks", action="store_true", help="also where the compiled step spends host time")
    parser.add_argument(
        "--host-python",
        action="store_true",
        help="also each profiled step's host time by Python function and package (cProfile): the eager step's "
        "(and the eager peers'), with --compile also the compiled step's",
    )
    parser.add_argument("--optimizer", action="store_true", help="also time gradient clipping + the optimizer step")
    parser.add_argument("--optimizer-only", action="store_true", help="only that, for LlamaThink and HF Llama")
    parser.add_argument("--no-eager", action="store_true", help="skip the eager step (layer times and kernels)")
    parser.add_argument("--top-kernels", type=int, default=0, help="list this many kernels of each compiled step")
    parser.add_argument(
        "--inductor-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an inductor option for the compiled layers (torch.compile's options; repeatable), e.g. "
        "coordinate_descent_tuning=True; VALUE is read as a Python literal (needs --compile). The layers compile "
        "with training's options (llamathink.train.loop.compile_kwargs: combo_kernels=True, inplace_buffers=False); "
        "these override them",
    )
    parser.add_argument(
        "--eager-ops",
        action="store_true",
        help="also the compiled step's aten ops that launch kernels of their own, by input shape: inductor's calls "
        "to matrix products and attention, and the ops inside custom ops and between compiled regions (needs --compile)",
    )
    parser.add_argument(
        "--kernel-sources",
        action="store_true",
        help="keep inductor's generated code of the compiled step (with --out, in DIR/kernel_sources_BACKEND.py.gz): "
        "each of the top kernels (40 where --top-kernels is not given; peers' lists too) followed by its graph and "
        "the model lines it fuses, and inductor's time by compiled graph (needs --compile)",
    )
    parser.add_argument(
        "--peers", default="", help="comma list of bench_gpu.py peers (e.g. hf-llama) to profile compiled whole"
    )
    parser.add_argument(
        "--eager-peers",
        default="",
        help="comma list of bench_gpu.py peers (e.g. hf-qwen3.5) whose eager step to profile as LlamaThink's: "
        "kernels, launch calls, wall time, syncs (not with --no-eager)",
    )
    parser.add_argument(
        "--eager-trace",
        action="store_true",
        help="also write each profiled eager step (LlamaThink's and the eager peers') as a gzipped Chrome trace in "
        "--out's folder (trace_eager_<model>.json.gz), for trace_gaps.py",
    )
    args = parser.parse_args(argv)
    if args.eager_trace and (not args.out or args.no_eager or args.optimizer_only):
        parser.error(
            "--eager-trace writes the eager steps' traces into --out's folder: give --out, with the eager step"
        )
    from bench_gpu import PEERS, build, check_model_name, csa_chunk  # the models exactly as bench_gpu.py builds them

    name = args.model or f"llamathink:{args.backend}"
    check_model_name(name)  # before any GPU work: a misspelt variant would profile the plain model
    if not name.startswith("llamathink:"):
        parser.error(f"--model {name}: profile_gpu profiles a LlamaThink model (peers go in --peers)")
    if {part for part in name.split(":")[2:] if not csa_chunk(part)} - set(MODEL_VARIANTS):
        parser.error(
            f"--model {name}: of bench_gpu's variants only those of the model itself profile here "
            f"({', '.join(MODEL_VARIANTS)}, csa-chunk<N>)"
        )
    eager_peers = [peer for peer in args.eager_peers.split(",") if peer]
    for peer in filter(None, args.peers.split(",")):
        check_model_name(peer)
    for peer in eager_peers:
        if peer not in PEERS:
            parser.error(f"--eager-peers {peer}: expected peers of bench_gpu.py ({', '.join(PEERS)}), no variants")
    if eager_peers and (args.no_eager or args.optimizer_only):
        parser.error("--eager-peers profiles beside the eager step: not with --no-eager or --optimizer-only")
    options = dict(inductor_option(text) for text in args.inductor_option)  # refused before any GPU work
    if (options or args.eager_ops or args.kernel_sources or args.cuda_graphs) and (
        not args.compile or args.optimizer_only
    ):
        parser.error(
            "--inductor-option, --eager-ops, --kernel-sources and --cuda-graphs apply to the compiled step: add "
            "--compile (not --optimizer-only)"
        )
    if args.host_python and (args.optimizer_only or (args.no_eager and not args.compile)):
        parser.error(
            "--host-python profiles the eager or the compiled step: not with --optimizer-only, nor with --no-eager "
            "without --compile"
        )
    top_kernels = args.top_kernels or (40 if args.kernel_sources else 0)
    torch.manual_seed(0)
    if args.optimizer_only:
        report = [f"# {torch.cuda.get_device_name()}, torch {torch.__version__}: clipping + optimizer step"]
        for name in ("llamathink:auto", "hf-llama"):
            model = build(name).cuda()
            report.append(f"## {name}, {sum(p.numel() for p in model.parameters()):,} parameters")
            report += [optimizer_ms(model, cuda_graph=False), optimizer_ms(model, cuda_graph=True)]
            del model
            torch.cuda.empty_cache()
        print("\n".join(report))
        return 0
    model = build(name).cuda()
    ids = torch.randint(0, 32000, (args.batch, args.seq), device="cuda")
    report = [f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, {name}, batch {args.batch}"]
    if not args.no_eager:
        report.append("## GPU ms per training step, by layer kind (forward, backward; summed over layers)")
        for name, ms in sorted(layer_times(model, ids).items()):
            report.append(f"  {name:24s} {ms:8.2f}")
        report.append("## top kernels of one training step")
        traces = Path(args.out) if args.out and args.eager_trace else None
        trace = traces / f"trace_eager_{args.backend}.json.gz" if traces else None
        report += eager_step_report(model, ids, "the eager step", args.host_python, trace)
        for peer_name in eager_peers:  # in this process, before anything compiles: eager against eager
            peer = build(peer_name).cuda()
            report.append(f"## top kernels of one eager training step of {peer_name}")
            trace = traces / f"trace_eager_{peer_name}.json.gz" if traces else None
            report += eager_step_report(peer, ids, f"{peer_name}'s eager step", args.host_python, trace)
            del peer
            torch.cuda.empty_cache()
    if args.compile:
        from torch._dynamo.utils import counters

        from llamathink.train.loop import compile_kwargs

        # regional compilation with the run setting combo_kernels' default, as `compile: true` trains
        mode = "reduce-overhead" if args.cuda_graphs else "default"
        training = compile_kwargs(mode, combo_kernels=True)["options"]
        compiled = model.compile_layers(options={**training, **options})
        if args.cuda_graphs:
            with_cuda_graphs(compiled)
        report.append(f"## top kernels of one compiled training step (`compile_layers`; {mode} mode)")
        sources = [] if args.kernel_sources else None
        report.append(
            kernel_table(
                compiled,
                ids,
                host_stacks=args.host_stacks,
                top_kernels=top_kernels,
                eager_ops=args.eager_ops,
                sources=sources,
            )
        )
        if sources and args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            with gzip.open(Path(args.out) / f"kernel_sources_{args.backend}.py.gz", "wt") as f:
                f.write("\n\n".join(sources))
        breaks = dict(counters["graph_break"])
        report.append(f"graph breaks: {sum(breaks.values())} ({len(counters['stats'])} dynamo stats); reasons:")
        report += [f"  {n:4d}  {reason[:200]}" for reason, n in sorted(breaks.items(), key=lambda kv: -kv[1])[:10]]
        report.append(step_wall_ms(compiled, ids))
        if args.host_python:
            report.append("## host time of the compiled step by Python package and function (cProfile)")
            report.append(host_python_profile(compiled, ids))
    for peer_name in filter(None, args.peers.split(",")):
        peer = build(peer_name).cuda()
        if args.cuda_graphs:  # compiled whole, as bench_gpu.py compiles the peers (`:cudagraphs`: the same mode)
            peer = with_cuda_graphs(torch.compile(peer, mode="reduce-overhead"))
        else:
            peer = torch.compile(peer)
        report.append(f"## top kernels of one compiled training step of {peer_name} (compiled whole)")
        report.append(kernel_table(peer, ids, top_kernels=top_kernels))
        report.append(step_wall_ms(peer, ids))
        del peer
        torch.cuda.empty_cache()
    if args.optimizer:
        report.append("## the optimizer step (Muon + AdamW, default settings) and gradient clipping")
        report.append(optimizer_ms(model, cuda_graph=False))
        report.append(optimizer_ms(model, cuda_graph=True))
    if not args.no_decode:
        report.append("## cached greedy decode, batch 1 (bf16 weights)")
        report.append(decode_profile(model.to(torch.bfloat16), args.decode_tokens))
    text = "\n".join(report)
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"profile_{args.backend}.txt").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
