"""Whether every candidate configuration of fla's autotuned Gated DeltaNet kernels computes correctly on this GPU.

    python benchmarks/fla_config_errors.py [--batch 4] [--seq 1024] [--packed] [--kernels wy_repr] [--out errors.jsonl]

Why: Triton has miscompiled some of fla's kernels for some launch configurations on Hopper GPUs (fla issues #640 and
#984: with Triton 3.4-3.7, `chunk_bwd_kernel_dqkwg`, and the ungated delta rule's `prepare_wy_repr_bwd_kernel` at
num_warps=4, gave gradients half wrong). An autotuner times its candidates and keeps the fastest, never checking that
it computes the right thing, and `llamathink/fla_configs/` ships the choices made on one machine; so a wrong candidate
can be chosen silently. This runs one Gated DeltaNet forward + backward (bf16, the default model's 9 heads of 112)
through fla once with every kernel's chosen configuration, then once per candidate configuration of each autotuned
kernel that the step launches (that kernel pinned to that one configuration, the others as chosen), and compares
the output and the five input gradients with our float32 PyTorch kernel (`torch_chunk_gated_delta_rule`) on the
same inputs. It prints one JSON line per run: the kernel, its configuration, the relative errors
|x - x_ref| / |x_ref| of o, dq, dk, dv, dg, dbeta, and `suspect`: the tensors more than twice as far from the
reference as with the chosen configurations, plus 0.01 (bf16 rounding moves them by about 1e-3 to 1e-2; a
miscompiled kernel by far more). GPU only; each configuration compiles once (seconds each).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OUTPUTS = ("o", "dq", "dk", "dv", "dg", "dbeta")


def gdn_inputs(batch: int, seq: int, heads: int, dk: int, dv: int, seed: int) -> dict:
    """Random inputs in the ranges the model gives its Gated DeltaNet kernel: q, k [B, T, H, dk] L2-normalised,
    v [B, T, H, dv], log-decays g [B, T, H] in about (-3, 0), beta [B, T, H] in (0, 1), the output's gradient."""
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", generator=gen)

    return {
        "q": F.normalize(randn(batch, seq, heads, dk), dim=-1),
        "k": F.normalize(randn(batch, seq, heads, dk), dim=-1),
        "v": randn(batch, seq, heads, dv),
        "g": -F.softplus(randn(batch, seq, heads) - 1.0),
        "beta": torch.sigmoid(randn(batch, seq, heads)),
        "do": randn(batch, seq, heads, dv),
    }


def packed_offsets(batch: int, seq: int) -> torch.Tensor:
    """cu_seqlens [N + 1] of documents of uneven lengths (not multiples of fla's 64-token chunk) filling batch x seq
    tokens in one row: fla's variable-length kernels."""
    lengths, total, n = [], batch * seq, 0
    while n < total:
        lengths.append(min(97 + 61 * (len(lengths) % 7), total - n))
        n += lengths[-1]
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda", dtype=torch.long)


def forward_backward(fn, inputs: dict, dtype: torch.dtype, scale: float, cu_seqlens=None) -> dict:
    """o and the gradients of (o * do).sum() w.r.t. q, k, v, g, beta, all in float32. `cu_seqlens` (fla only): the
    inputs' rows are joined into one row of those documents."""
    leaves = {  # fresh leaves (a copy even where the dtype is unchanged): the inputs are reused
        n: inputs[n].detach().to(dtype if n != "g" else torch.float32, copy=True).requires_grad_()
        for n in ("q", "k", "v", "g", "beta")
    }
    args = leaves
    if cu_seqlens is not None:  # [B, T, ...] -> [1, B*T, ...]
        args = {n: t.reshape(1, -1, *t.shape[2:]) for n, t in leaves.items()}
    extra = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}
    o, _ = fn(args["q"], args["k"], args["v"], args["g"], args["beta"], scale, **extra)
    o = o.reshape(inputs["do"].shape)
    (o.float() * inputs["do"]).sum().backward()
    result = {"o": o.detach().float()}
    result.update({"d" + n: t.grad.float() for n, t in leaves.items()})
    return result


def reference(inputs: dict, scale: float, cu_seqlens=None) -> dict:
    """Our float32 PyTorch chunked kernel; with `cu_seqlens`, each document on its own from a zero state."""
    from llamathink.modeling_llamathink import torch_chunk_gated_delta_rule

    if cu_seqlens is None:
        return forward_backward(torch_chunk_gated_delta_rule, inputs, torch.float32, scale)
    flat = {n: t.reshape(1, -1, *t.shape[2:]) for n, t in inputs.items()}
    parts = []
    bounds = cu_seqlens.tolist()
    for a, b in itertools.pairwise(bounds):
        parts.append(
            forward_backward(
                torch_chunk_gated_delta_rule, {n: t[:, a:b] for n, t in flat.items()}, torch.float32, scale
            )
        )
    shape = {"o": inputs["do"].shape, **{"d" + n: inputs[n].shape for n in ("q", "k", "v", "g", "beta")}}
    return {n: torch.cat([p[n] for p in parts], dim=1).reshape(shape[n]) for n in OUTPUTS}


def relative_errors(result: dict, ref: dict) -> dict:
    return {n: round(float((result[n] - ref[n]).norm() / ref[n].norm()), 5) for n in OUTPUTS}


def _counting(run, name: str, launched: set):
    """An autotuner's `run` that also records `name` in `launched` when called."""

    def wrapper(*args, **kwargs):
        launched.add(name)
        return run(*args, **kwargs)

    return wrapper


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--head-dim", type=int, default=112)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--packed", action="store_true", help="documents of uneven lengths in one row (cu_seqlens)")
    parser.add_argument("--kernels", default="", help="only kernels whose name contains this text")
    parser.add_argument("--out", default=None, help="append the JSON lines here too")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("fla_config_errors.py needs a CUDA GPU", file=sys.stderr)
        return 2
    from llamathink.kernels_llamathink import (
        _fla_autotuners,
        _fla_ops,
        fla_chunk_gated_delta_rule,
        load_fla_tuned_configs,
    )

    if _fla_ops() is None:
        print("fla is not installed", file=sys.stderr)
        return 2
    load_fla_tuned_configs()  # the choices the package ships for this GPU, as a model build gives them
    torch.backends.cuda.matmul.allow_tf32 = False  # a float32 reference
    inputs = gdn_inputs(args.batch, args.seq, args.heads, args.head_dim, args.head_dim, args.seed)
    scale = args.head_dim**-0.5
    cu_seqlens = packed_offsets(args.batch, args.seq) if args.packed else None
    ref = reference(inputs, scale, cu_seqlens)

    def run_fla() -> dict:
        return relative_errors(
            forward_backward(fla_chunk_gated_delta_rule, inputs, torch.bfloat16, scale, cu_seqlens), ref
        )

    def emit(record: dict):
        line = json.dumps(record)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")

    # the chosen configurations' run, which also lets every autotuner pick (or take the shipped choice) for these
    # shapes; the autotuners it calls are the kernels of the step (a shipped choice fills caches it never uses)
    launched = set()
    tuners = {name: t for name, t in _fla_autotuners().items() if args.kernels in name}
    for name, tuner in tuners.items():
        tuner.run = _counting(tuner.run, name, launched)
    try:
        chosen = run_fla()
    finally:
        for tuner in tuners.values():
            del tuner.run  # back to the class's method
    tuners = {name: t for name, t in tuners.items() if name in launched}
    emit(
        {
            "kernel": "(chosen)",
            "config": None,
            "errors": chosen,
            "suspect": [],
            "gpu": torch.cuda.get_device_name(),
            "kernels": sorted(tuners),
        }
    )
    for name, tuner in sorted(tuners.items()):
        configs, cache = list(tuner.configs), dict(tuner.cache)
        chosen_configs = {str(c) for c in cache.values()}
        try:
            for config in configs:
                tuner.configs, tuner.cache = [config], {}  # one candidate: the autotuner launches it untimed
                t0 = time.perf_counter()
                try:
                    errors = run_fla()
                except Exception as error:  # noqa: BLE001 - a candidate that does not compile or launch here
                    emit({"kernel": name, "config": str(config), "error": f"{type(error).__name__}: {error}"[:300]})
                    continue
                suspect = [n for n in OUTPUTS if errors[n] > 2 * chosen[n] + 1e-2]
                emit(
                    {
                        "kernel": name,
                        "config": str(config),
                        "chosen": str(config) in chosen_configs,
                        "errors": errors,
                        "suspect": suspect,
                        "s": round(time.perf_counter() - t0, 1),
                    }
                )
        finally:
            tuner.configs, tuner.cache = configs, cache
    return 0


if __name__ == "__main__":
    sys.exit(main())
