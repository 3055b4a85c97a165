"""Subprocess worker for the distributed Muon test in tests/test_muon.py.

Usage: python tests/_dist_muon_worker.py RANK WORLD_SIZE INIT_FILE OUT_FILE

Each rank builds the *same* parameters and feeds the *same* gradients every step (as
DDP would after its all-reduce), runs the distributed Muon over the gloo backend and
saves its final parameters, momentum buffers and how many matrices it orthogonalised.
``build_problem`` / ``run_steps`` are also imported by the test for the single-process
reference, so both sides are guaranteed to use identical data.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Shapes of the Muon matrices.  Several share a shape (batched NS + one all-gather per
# shape bucket), bucket sizes 3, 2, 1, 1 are not multiples of the world size (padding)
# and single-matrix buckets exercise the global round-robin offset.
MUON_SHAPES = [(16, 24), (16, 24), (16, 24), (24, 16), (24, 16), (20, 20), (8, 40)]
ADAMW_SHAPES = [(12,), (6, 4)]
STEPS = 3


def build_problem(seed: int = 0):
    """Return (muon_params, frozen_muon_param, adamw_params, grads_per_step)."""
    gen = torch.Generator().manual_seed(seed)
    muon = [torch.randn(s, generator=gen).requires_grad_() for s in MUON_SHAPES]
    no_grad = torch.randn(10, 10, generator=gen).requires_grad_()  # grad stays None
    adamw = [torch.randn(s, generator=gen).requires_grad_() for s in ADAMW_SHAPES]
    grads = [[torch.randn(p.shape, generator=gen) for p in muon + adamw] for _ in range(STEPS)]
    return muon, no_grad, adamw, grads


def load_muon_module():
    """The already-imported ``llamathink.muon`` (test process) or muon.py loaded by path.

    Loading the file directly in the workers skips ``llamathink/__init__`` (which
    imports the model and transformers: seconds per process on a loaded 2-core box);
    muon.py depends on nothing but torch, so it is the very same code.
    """
    mod = sys.modules.get("llamathink.muon") or sys.modules.get("_llamathink_muon")
    if mod is None:
        spec = importlib.util.spec_from_file_location(
            "_llamathink_muon", os.path.join(REPO_ROOT, "llamathink", "muon.py")
        )
        mod = importlib.util.module_from_spec(spec)
        sys.modules["_llamathink_muon"] = mod  # load once: the NS counter patches this copy
        spec.loader.exec_module(mod)
    return mod


def make_optimizer(muon, no_grad, adamw, **kwargs):
    Muon = load_muon_module().Muon
    return Muon(
        [
            {"params": muon[:4] + [no_grad], "use_muon": True},
            {"params": muon[4:], "use_muon": True, "lr": 0.03, "adjust_lr_fn": "match_rms_adamw"},
            {"params": adamw, "use_muon": False},
        ],
        weight_decay=0.1,
        **kwargs,
    )


def run_steps(opt, muon, adamw, grads):
    for step_grads in grads:
        for p, g in zip(muon + adamw, step_grads):
            p.grad = g.clone()
        opt.step()


def main() -> None:
    rank, world, init_file, out_file = (
        int(sys.argv[1]),
        int(sys.argv[2]),
        sys.argv[3],
        sys.argv[4],
    )
    torch.set_num_threads(1)
    import torch.distributed as dist

    muon_mod = load_muon_module()

    # Count the matrices this rank orthogonalises (the optimizer looks the function up
    # as a module global at call time, so patching the module attribute is enough).
    calls: list[tuple[int, tuple[int, int]]] = []
    real_ns = muon_mod.zeropower_via_newtonschulz

    def counting_ns(x, *args, **kwargs):
        calls.append((x.shape[0] if x.ndim == 3 else 1, tuple(x.shape[-2:])))
        return real_ns(x, *args, **kwargs)

    muon_mod.zeropower_via_newtonschulz = counting_ns

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        muon, no_grad, adamw, grads = build_problem()
        opt = make_optimizer(muon, no_grad, adamw)
        run_steps(opt, muon, adamw, grads)
        torch.save(
            {
                "muon": [p.detach() for p in muon],
                "no_grad": no_grad.detach(),
                "adamw": [p.detach() for p in adamw],
                "momentum": [opt.state[p]["momentum_buffer"] for p in muon],
                "no_grad_has_state": no_grad in opt.state and len(opt.state[no_grad]) > 0,
                "ns_calls": calls,
            },
            out_file,
        )
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    # Both ranks have written their results. Leave without gloo's teardown: now and then it aborts the process after
    # the work is done ("terminate called without an active exception": std::terminate from a thread torn down at
    # exit, about 1 run in 20 with torch 2.13 on CPUs), which the test would read as a failed rank.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
