"""Where a profiled training step leaves the GPU idle, and what the host was doing then.

    python benchmarks/trace_gaps.py TRACE.json[.gz] [--marker bench_step] [--top 15] [--min-gap-us 2]

Reads a torch.profiler (Kineto) Chrome trace, such as `bench_gpu.py --trace DIR` writes, and for each training
step (the GPU work launched inside one span of the user annotation `--marker`; the whole trace without one)
reports:
- its window on the GPU, the GPU's busy time there (the union of the kernels, copies and fills on every stream)
  and its idle time;
- the idle gaps longer than `--min-gap-us`, summed by the host code that launched the work ending each gap (the
  chain of host ops around the launch: a gap ends when the host launches the next work, so a long gap before work
  launched from `aten::embedding` says the host was still getting there);
- the host's waits for the device (`cudaStreamSynchronize`, `cudaDeviceSynchronize`, `cudaEventSynchronize`,
  `cudaMemcpy`, and copies to the host), with the host ops around each;
- the copies and fills the host launched on the device outside CUDA graphs (copy and fill events, and kernels
  launched inside a host copy or fill op: `COPY_OPS`), summed by the host ops around each launch: among them
  torch.compile's CUDA graphs copying each input that is not static (a parameter, a buffer, a tensor marked with
  `torch._dynamo.mark_static_address`) into the graph's own memory before every replay (`aten::_foreach_copy_`).

The step's wall time is its GPU busy time plus its idle time; a step whose kernels alone would reach a peer's MFU
but whose wall time does not is losing the difference in these gaps. Method: the Chrome trace format of Kineto,
whose kernel events carry the `correlation` id of the host runtime call (cudaLaunchKernel, cudaGraphLaunch, ...)
that launched them (every kernel of a replayed CUDA graph carries its cudaGraphLaunch's).
"""

from __future__ import annotations

import argparse
import bisect
import collections
import gzip
import itertools
import json
import sys
from pathlib import Path

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
HOST_OP_CATEGORIES = ("cpu_op", "user_annotation", "python_function")
RUNTIME_CATEGORIES = ("cuda_runtime", "cuda_driver")
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
# host ops whose kernels copy or fill memory (casts run `aten::copy_`; `zeros` runs `aten::fill_`)
COPY_OPS = frozenset(("aten::copy_", "aten::_foreach_copy_", "aten::fill_", "aten::zero_", "aten::_foreach_zero_"))


def load_trace(path: str | Path) -> list[dict]:
    """The complete events ("ph": "X") of a Chrome trace file (plain or gzipped JSON), each with a str `name`,
    numbers `ts` and `dur` (microseconds) and a dict `args` (given empty where the event has none). Raises
    ValueError naming the file when it is not such a trace, or the first event that lacks one of those."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt") as f:
            doc = json.load(f)
    except (OSError, ValueError, EOFError) as err:
        raise ValueError(f"{path}: not a readable Chrome trace ({err})") from err
    events = doc.get("traceEvents") if isinstance(doc, dict) else doc
    if not isinstance(events, list):
        raise ValueError(f"{path}: no traceEvents list (not a torch.profiler trace)")  # noqa: TRY004 (a bad file)
    complete = []
    for index, e in enumerate(events):
        if not isinstance(e, dict) or e.get("ph") != "X":
            continue
        number = (int, float)
        fields_ok = isinstance(e.get("name"), str) and isinstance(e.get("args", {}), dict)
        times_ok = all(isinstance(e.get(k), number) and not isinstance(e.get(k), bool) for k in ("ts", "dur"))
        if not (fields_ok and times_ok):
            raise ValueError(
                f"{path}: traceEvents[{index}] is a complete event without a name, numeric ts and dur, or with args "
                f"that are no object: {json.dumps(e)[:200]}"
            )
        complete.append({**e, "args": e.get("args", {})})
    return complete


def _merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(s, e) for s, e in out]


class _HostOps:
    """The host ops of one thread, nested by their times, to find those enclosing a moment (outermost first)."""

    def __init__(self, ops: list[dict]):
        self.ops = sorted(ops, key=lambda e: (e["ts"], -e["dur"]))
        self.starts = [e["ts"] for e in self.ops]
        self.parent = []
        stack: list[int] = []
        for i, e in enumerate(self.ops):
            while stack and self._end(stack[-1]) < e["ts"]:
                stack.pop()
            self.parent.append(stack[-1] if stack else -1)
            stack.append(i)

    def _end(self, i: int) -> float:
        return self.ops[i]["ts"] + self.ops[i]["dur"]

    def around(self, ts: float) -> list[str]:
        i = bisect.bisect_right(self.starts, ts) - 1  # the last op begun by ts, or one of its parents, holds ts
        chain = []
        while i >= 0:
            if self._end(i) >= ts:
                chain.append(self.ops[i]["name"])
            i = self.parent[i]
        return chain[::-1]


def analyse(events: list[dict], marker: str | None = "bench_step", min_gap_us: float = 2.0, levels: int = 3) -> dict:
    """GPU busy and idle time per step and the idle gaps by their host origin (see the module docstring).

    `events`: `load_trace`'s list. `marker`: the name of the user annotation around each step on the host (None, or no
    such annotation: the whole trace, first to last GPU event, as one step). A step's GPU work is the work its host
    span launched; its window on the GPU runs from its first work to the first work of the step that began next on
    the GPU (the last one's to the end of all work): a wait for the host before a step's first kernel counts with
    the step before, whatever the host was doing. Busy time is the union of every GPU event (all streams, any
    step's) within the window; a step that launched no GPU work has an empty window. `levels`: how many host ops
    under the step's own annotation name a gap's origin. Returns {"steps": [per step: span_us, busy_us, idle_us],
    "busy_us_per_step", "idle_us_per_step", "gaps_by_origin": [[origin, total_us_per_step, count_per_step], ...]
    (largest first), "waits_by_origin": the same for the host's waits inside the steps (the whole trace without
    steps), "host_copies_by_origin": the same for the copies and fills the steps' host code launched outside CUDA
    graphs (their GPU time), "largest_gaps": [...]}. Raises ValueError for a trace without GPU events, or whose
    steps launched none."""
    gpu = sorted((e for e in events if e.get("cat") in GPU_CATEGORIES), key=lambda e: e["ts"])
    if not gpu:
        raise ValueError("the trace has no GPU events (profiled without CUDA activity, or on the CPU)")
    runtime = {}
    for e in events:
        if e.get("cat") in RUNTIME_CATEGORIES and "correlation" in e["args"]:
            runtime[e["args"]["correlation"]] = e
    threads = collections.defaultdict(list)
    for e in events:
        if e.get("cat") in HOST_OP_CATEGORIES:
            threads[e.get("tid")].append(e)
    host = {tid: _HostOps(ops) for tid, ops in threads.items()}
    spans = sorted(
        (e["ts"], e["ts"] + e["dur"])
        for e in events
        if marker and e.get("cat") == "user_annotation" and e["name"] == marker
    )

    def origin(ts: float, tid) -> str:
        chain = host[tid].around(ts) if tid in host else []
        if marker in chain:
            chain = chain[chain.index(marker) + 1 :]
        return " > ".join(chain[:levels]) or "(no host op)"

    def launch_of(e: dict) -> dict | None:
        return runtime.get(e["args"].get("correlation"))

    def step_of(e: dict) -> int | None:  # the step whose host span launched GPU event e
        if not spans:
            return 0
        launch = launch_of(e)
        if launch is None:
            return None
        i = bisect.bisect_right(spans_lo, launch["ts"]) - 1
        return i if i >= 0 and launch["ts"] <= spans[i][1] else None

    spans_lo = [lo for lo, _ in spans]
    n_steps = len(spans) or 1
    firsts, lasts = {}, {}
    for e in gpu:
        i = step_of(e)
        if i is not None:
            firsts.setdefault(i, e["ts"])
            lasts[i] = max(lasts.get(i, e["ts"]), e["ts"] + e["dur"])
    if not firsts:
        raise ValueError(f"no GPU work in the trace was launched inside a {marker!r} annotation")
    # windows in the order the steps began on the GPU (a step's first copy may run on an idle stream before the
    # step before it begins): each ends where the next begins, so none is negative and they do not overlap
    order = sorted(firsts, key=lambda i: (firsts[i], i))
    ends = [firsts[j] for j in order[1:]] + [max(lasts.values())]
    windows = {i: (firsts[i], end) for i, end in zip(order, ends)}
    bounds = [windows[i] for i in order]  # (contiguous, in time order)
    busy = _merged([(e["ts"], e["ts"] + e["dur"]) for e in gpu])  # every stream's work, any step's
    starts = [e["ts"] for e in gpu]
    steps = []
    for i in range(n_steps):
        lo, hi = windows.get(i, (0.0, 0.0))
        busy_us = sum(max(0.0, min(e, hi) - max(s, lo)) for s, e in busy)
        steps.append({"span_us": hi - lo, "busy_us": busy_us, "idle_us": hi - lo - busy_us})
    # each gap between busy intervals inside the windows, with the step whose window holds it, named by the host
    # code that launched the work ending it
    lows = [lo for lo, _ in bounds]
    gaps_by, largest = collections.defaultdict(lambda: [0.0, 0]), []
    for (_, gap_start), (next_start, _) in itertools.pairwise(busy):
        gap = next_start - gap_start
        k = bisect.bisect_right(lows, gap_start) - 1
        if gap < min_gap_us or k < 0 or gap_start >= bounds[k][1]:
            continue
        first = gpu[bisect.bisect_left(starts, next_start)]
        launch = launch_of(first)
        where = origin(launch["ts"], launch.get("tid")) if launch else "(launch not in the trace)"
        gaps_by[where][0] += gap
        gaps_by[where][1] += 1
        call = launch["name"] if launch else "?"
        largest.append({"gap_us": gap, "origin": where, "launch": call, "next": first["name"][:80]})
    # the host's waits: synchronising calls, and copies to the host (an asynchronous one to pageable memory waits too)
    to_host = {e["args"].get("correlation") for e in gpu if e["name"].startswith("Memcpy DtoH")}
    waits_by = collections.defaultdict(lambda: [0.0, 0])
    for e in events:
        waiting = e.get("cat") in RUNTIME_CATEGORIES and (
            e["name"] in SYNC_CALLS or (e["name"].startswith("cudaMemcpy") and e["args"].get("correlation") in to_host)
        )
        if waiting and (not spans or any(lo <= e["ts"] <= hi for lo, hi in spans)):
            where = origin(e["ts"], e.get("tid"))
            waits_by[where][0] += e["dur"]
            waits_by[where][1] += 1

    # the host's own copies and fills (a CUDA graph's are launched by its cudaGraphLaunch)
    copies_by = collections.defaultdict(lambda: [0.0, 0])
    for e in gpu:
        launch = launch_of(e)
        if launch is None or launch["name"] == "cudaGraphLaunch" or step_of(e) is None:
            continue
        tid = launch.get("tid")
        if e.get("cat") == "kernel" and (tid not in host or COPY_OPS.isdisjoint(host[tid].around(launch["ts"]))):
            continue
        where = origin(launch["ts"], tid)
        copies_by[where][0] += e["dur"]
        copies_by[where][1] += 1

    def table(d):
        rows = sorted(d.items(), key=lambda kv: -kv[1][0])
        return [[k, round(v[0] / n_steps, 1), round(v[1] / n_steps, 2)] for k, v in rows]

    return {
        "steps": [{k: round(v, 1) for k, v in s.items()} for s in steps],
        "busy_us_per_step": round(sum(s["busy_us"] for s in steps) / n_steps, 1),
        "idle_us_per_step": round(sum(s["idle_us"] for s in steps) / n_steps, 1),
        "gaps_by_origin": table(gaps_by),
        "waits_by_origin": table(waits_by),
        "host_copies_by_origin": table(copies_by),
        "largest_gaps": sorted(largest, key=lambda g: -g["gap_us"])[:20],
    }


def report(result: dict, top: int = 15) -> str:
    """`analyse`'s result as text."""
    lines = [
        (
            f"steps: {len(result['steps'])}; per step: GPU busy {result['busy_us_per_step'] / 1e3:.2f} ms, "
            f"idle {result['idle_us_per_step'] / 1e3:.2f} ms"
        ),
        "idle gaps by the host code that launched the work after them (us per step, gaps per step):",
    ]
    lines += [f"  {us:9.1f}  {count:7.2f}  {where}" for where, us, count in result["gaps_by_origin"][:top]]
    lines.append("host waits for the device (us per step, waits per step):")
    lines += [f"  {us:9.1f}  {count:7.2f}  {where}" for where, us, count in result["waits_by_origin"][:top]]
    lines.append("copies and fills launched by the host, outside CUDA graphs (us per step, copies per step):")
    lines += [f"  {us:9.1f}  {count:7.2f}  {where}" for where, us, count in result["host_copies_by_origin"][:top]]
    lines.append("largest gaps:")
    lines += [
        f"  {g['gap_us']:9.1f}  {g['launch']} from {g['origin']} -> {g['next']}" for g in result["largest_gaps"][:top]
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace")
    parser.add_argument("--marker", default="bench_step", help="the user annotation around each step")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--min-gap-us", type=float, default=2.0)
    parser.add_argument("--levels", type=int, default=3, help="host ops under the step that name a gap's origin")
    args = parser.parse_args(argv)
    try:
        result = analyse(load_trace(args.trace), args.marker, args.min_gap_us, args.levels)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    print(report(result, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
