"""How far the bf16 GPU training paths' gradients are from the float32 CPU reference, tensor by tensor, over seeds.

    python benchmarks/gradient_error_seeds.py [--seeds 8] [--backend fla] [--out errors.jsonl] [--code OTHER_CHECKOUT]

The question it answers: when a change moves one tensor's error past a GPU test's tolerance (for example
`test_compiled_layers_train_like_eager_and_compile_once_per_mixer_type`, which holds the compiled layers' error of
each gradient to twice the eager path's plus 0.01), is that tensor's error higher on every seed, or is it the
spread of bf16 rounding on a tensor of few entries? For each seed (the model's init and the batch) it builds the
tiny model of that test, computes the loss and gradients in float32 on the CPU (our PyTorch kernels: the
reference), then with bf16 autocast on the GPU eagerly and with the decoder layers compiled (`compile_layers`,
inductor), and prints one JSON line per seed: the relative error |g - g_ref| / |g_ref| of the eager and compiled
gradients for the decay parameters (`A_log`, `dt_bias`) and the conv weights of each Gated DeltaNet layer, the
largest error of any tensor, and the tensors over the test's tolerance. Run it on two trees (`--code`, or `gpu_suite.sh seeds`) to compare; GPU only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# the model and batch of tests/test_gpu.py's compiled-layers test (heads of 16 and 32: fla's unmasked tiles)
DIMS = {"linear_key_head_dim": 16, "linear_value_head_dim": 32, "head_dim": 16, "hidden_size": 64}
WATCHED = ("A_log", "dt_bias", "conv1d.weight")


def errors_for_seed(seed: int, backend: str) -> dict:
    """The eager and compiled bf16 gradients' errors against the float32 CPU reference for one seed (after
    `import_model_code`)."""
    from conftest import loss_and_grads, relative_errors, tiny_model

    ids = torch.randint(1, 96, (2, 150), generator=torch.Generator().manual_seed(seed))
    reference = tiny_model(dtype=torch.float32, seed=seed, gdn_backend="torch", **DIMS).train()
    loss_ref, grads_ref = loss_and_grads(reference, ids, autocast=False)
    model = tiny_model(dtype=torch.float32, seed=seed, gdn_backend=backend, **DIMS).cuda().train()
    loss_eager, grads_eager = loss_and_grads(model, ids.cuda(), autocast=True)
    torch._dynamo.reset()
    model.compile_layers()
    loss_comp, grads_comp = loss_and_grads(model, ids.cuda(), autocast=True)
    eager, comp = relative_errors(grads_eager, grads_ref), relative_errors(grads_comp, grads_ref)
    watched = {n: [round(eager[n], 5), round(comp[n], 5)] for n in comp if n.endswith(WATCHED)}
    over = sorted(n for n in comp if comp[n] >= 2 * eager[n] + 1e-2)
    return {
        "seed": seed,
        "loss_error": [abs(loss_eager - loss_ref), abs(loss_comp - loss_ref)],
        "largest": [max(eager.values()), max(comp.values())],
        "watched_eager_compiled": watched,
        "over_tolerance": over,
    }


def import_model_code(code: Path):
    """Import the `llamathink` package from the checkout `code`, then this tree's test helpers (tests/conftest.py),
    which would otherwise put this tree first on sys.path. Returns the package."""
    sys.path.insert(0, str(code))
    import llamathink

    sys.path.insert(0, str(ROOT / "tests"))
    import conftest  # noqa: F401

    return llamathink


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument(
        "--backend", default="fla", help="the GPU path's Gated DeltaNet kernels: fla, flash_qla or torch"
    )
    parser.add_argument("--out", default=None, help="append the JSON lines here too")
    parser.add_argument(
        "--code", default=None, help="a checkout whose llamathink package to measure (default: this tree)"
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gradient_error_seeds.py needs a CUDA GPU", file=sys.stderr)
        return 2
    llamathink = import_model_code(Path(args.code).resolve() if args.code else ROOT)
    print(f"llamathink from {Path(llamathink.__file__).parent}", flush=True)
    for seed in range(args.seeds):
        line = json.dumps(errors_for_seed(seed, args.backend))
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
