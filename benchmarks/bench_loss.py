"""The language-model head's loss at the training shape, forward + backward, on one GPU: LlamaThink's chunked
loss against Liger-Kernel's fused linear cross-entropy and the plain full-logits loss.

Issue 17 asks whether a well-kept fused kernel beats what the training step runs. The step's loss is
`chunked_causal_lm_loss` (the head's matrix products and the softmax chunk by chunk, the full logits never in
memory; each chunk compiled by inductor as `compile_layers` sets it). Compared here, on the same bf16 inputs:
  - `ours`: `chunked_causal_lm_loss(..., compile_backend="inductor")`, as the compiled training step calls it;
  - `ours_eager`: the same, its chunks run eagerly (the eager training step);
  - `liger`: Liger-Kernel's `LigerFusedLinearCrossEntropyLoss` (chunked too; gradients computed in its forward);
  - `full`: transformers' way, `F.cross_entropy` on the full float32 logits, compiled whole by inductor.
Each row reports the mean wall time of forward + backward (`triton.testing.do_bench`, ms; includes waiting on the
host where the GPU runs ahead of it), the GPU kernel time of one forward + backward (torch.profiler, ms: what the
loss costs inside a training step whose GPU queue is full), the peak memory above the inputs (GiB), and the loss
and gradients' largest differences from a float32 reference of the same loss.

    python benchmarks/bench_loss.py [--rows 16384] [--hidden 576] [--vocab 32000] [--out f.json]

Needs a CUDA GPU; `liger` needs `liger-kernel` (its row is skipped, with the reason, where it does not import).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's llamathink, also run from elsewhere


def make_inputs(rows: int, hidden: int, vocab: int, seed: int = 0):
    """hidden [1, rows, hidden] and the head's weight [vocab, hidden], bf16 leaves (std as the model's last norm
    output and its tied embedding give); labels [1, rows] of token ids with a few -100s."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    h = torch.randn(1, rows, hidden, device="cuda", generator=gen).bfloat16().requires_grad_()
    w = (0.02 * torch.randn(vocab, hidden, device="cuda", generator=gen)).bfloat16().requires_grad_()
    labels = torch.randint(0, vocab, (1, rows), device="cuda", generator=gen)
    labels[0, :: max(1, rows // 50)] = -100
    return h, w, labels


def shifted(labels: torch.Tensor) -> torch.Tensor:
    """labels [1, rows] -> next-token targets [rows] (-100 at the end), as the model's loss shifts them."""
    return F.pad(labels, (0, 1), value=-100)[0, 1:]


def losses(rows: int, chunk_rows: list[int] = ()):
    """name -> function(h, w, labels) -> mean next-token loss (a 0-d tensor), or the reason it cannot run.
    `chunk_rows`: more rows of ours, compiled, with chunks of at most that many rows each (`ours_rows<N>`)."""
    from llamathink.modeling_llamathink import chunked_causal_lm_loss

    fns = {
        "ours": lambda h, w, y: chunked_causal_lm_loss(h, w, y, compile_backend="inductor"),
        "ours_eager": lambda h, w, y: chunked_causal_lm_loss(h, w, y),
    }
    for n in chunk_rows:
        fns[f"ours_rows{n}"] = lambda h, w, y, n=n: chunked_causal_lm_loss(
            h, w, y, chunk_rows=n, compile_backend="inductor"
        )
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        fns["liger"] = lambda h, w, y: liger(w, h.reshape(-1, h.shape[-1]), shifted(y))
    except Exception as exc:  # noqa: BLE001 (not installed, or not for this torch / Triton: the row says why)
        fns["liger"] = f"{type(exc).__name__}: {exc}"

    @torch.compile
    def full(h, w, y):
        logits = (h @ w.T).float()  # [1, rows, vocab], as transformers' causal-LM heads upcast before the loss
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), shifted(y), ignore_index=-100)

    fns["full"] = full
    return fns


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=16384, help="tokens of the batch (batch x seq)")
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--out", help="also write the rows as JSON here")
    parser.add_argument(
        "--chunk-rows", default="", help="comma list: also ours compiled with chunks of at most N rows (ours_rows<N>)"
    )
    parser.add_argument("--only", default="", help="comma list of the rows to measure (default: every row)")
    args = parser.parse_args(argv)
    try:
        chunk_rows = [int(n) for n in args.chunk_rows.split(",") if n.strip()]
    except ValueError:
        raise SystemExit(f"--chunk-rows: {args.chunk_rows!r} is not a comma list of row counts") from None
    if any(n < 1 for n in chunk_rows):
        raise SystemExit(f"--chunk-rows: every count must be at least 1, got {args.chunk_rows!r}")
    for option, value in (("--rows", args.rows), ("--hidden", args.hidden), ("--vocab", args.vocab)):
        if value < 1:
            raise SystemExit(f"{option} must be at least 1, got {value}")
    if args.rows < 2:
        raise SystemExit("--rows must be at least 2: the last row predicts nothing, so one row has no loss")
    if not torch.cuda.is_available():
        raise SystemExit("bench_loss.py needs a CUDA GPU")
    from triton.testing import do_bench

    from llamathink.modeling_llamathink import _compiled_cross_entropy_chunk

    h, w, labels = make_inputs(args.rows, args.hidden, args.vocab)
    h32, w32 = (t.detach().float().requires_grad_() for t in (h, w))
    ref = F.cross_entropy((h32 @ w32.T).reshape(-1, args.vocab), shifted(labels), ignore_index=-100)
    ref.backward()
    ref_grads = (h32.grad, w32.grad)
    results = []
    only = {n.strip() for n in args.only.split(",") if n.strip()}
    fns = losses(args.rows, chunk_rows)
    if only - fns.keys():
        raise SystemExit(f"--only: no row {min(only - fns.keys())!r} (rows: {', '.join(fns)})")
    for name, fn in fns.items():
        if only and name not in only:
            continue
        row = {"name": name, "rows": args.rows, "hidden": args.hidden, "vocab": args.vocab}
        if isinstance(fn, str):
            results.append(row | {"skipped": fn})
            print(json.dumps(results[-1]), flush=True)
            continue

        def step(fn=fn):
            h.grad = w.grad = None
            fn(h, w, labels).backward()

        # each row compiles its own chunk shape afresh: after a first shape dynamo would compile the next ones with
        # the row count as a variable (automatic dynamic shapes), which the training step at one batch shape never runs
        torch._dynamo.reset()
        _compiled_cross_entropy_chunk.cache_clear()
        step()  # builds (compiles) it
        torch.cuda.synchronize()
        loss = fn(h, w, labels)
        h.grad = w.grad = None
        loss.backward()
        errors = {
            "loss_abs_err": abs(loss.item() - ref.item()),
            "grad_hidden_max_err": (h.grad.float() - ref_grads[0]).abs().max().item(),
            "grad_weight_max_err": (w.grad.float() - ref_grads[1]).abs().max().item(),
        }
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        from torch.autograd import DeviceType

        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        kernel_us = sum(e.device_time for e in prof.events() if e.device_type == DeviceType.CUDA)
        row |= {
            "ms": do_bench(step),
            "gpu_kernel_ms": kernel_us / 1000,
            "peak_gib_above_inputs": (torch.cuda.max_memory_allocated() - base) / 2**30,
            **errors,
            "gpu": torch.cuda.get_device_name(),
            "torch": torch.__version__,
        }
        results.append(row)
        print(json.dumps(results[-1]), flush=True)
        if args.out:  # after every row, so a run cut short keeps what it measured
            Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
