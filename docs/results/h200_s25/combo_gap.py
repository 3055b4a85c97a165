# Session 25's diagnostic: how far combo kernels' training is from inductor's defaults', against a repeat's and eager
# training's distance (tests/test_gpu.py's helpers). Run from the repository root on a GPU with fla:
#   CUBLAS_WORKSPACE_CONFIG=:4096:8 PYTHONPATH=$PWD:$PWD/tests python docs/results/h200_s25/combo_gap.py
import torch

torch.use_deterministic_algorithms(True)
from conftest import largest_gap
from test_gpu import _sgd_training

batches = [torch.randint(1, 96, (2, 128), generator=torch.Generator().manual_seed(s)).cuda() for s in (0, 1) * 3]
runs = {"plain": _sgd_training("default", batches, 2, True)}
runs["plain2"] = _sgd_training("default", batches, 2, True)
runs["combo"] = _sgd_training("default", batches, 2, True, combo_kernels=True)
runs["eager"] = _sgd_training("eager", batches, 2, True)
ref = runs["plain"]
for k, r in runs.items():
    lrel = [abs(a - b) / abs(b) for a, b in zip(r[0], ref[0])]
    erel = [abs(a - b) / abs(b) for a, b in zip(r[1], ref[1])]
    print(k, "losses", r[0], "evals", r[1])
    print(
        k,
        "loss rel gaps",
        [f"{x:.2e}" for x in lrel],
        "eval rel gaps",
        [f"{x:.2e}" for x in erel],
        "weights",
        largest_gap(r[2], ref[2]),
    )
