"""`benchmarks/profile_gpu.py`'s CPU-side parts: its option checks, and the training step it profiles in a
CUDA-graph mode (as one-GPU training runs it)."""

import sys

import pytest
import torch
from conftest import REPO_ROOT, tiny_model

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import profile_gpu


@pytest.mark.parametrize("argv", [["--cuda-graphs"], ["--cuda-graphs", "--compile", "--optimizer-only"]])
def test_cuda_graphs_needs_the_compiled_step(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        profile_gpu.main(argv)
    assert exit_info.value.code == 2
    assert "--cuda-graphs apply to the compiled step" in capsys.readouterr().err


def test_a_cuda_graph_step_marks_its_start_and_keeps_zeroed_gradients(monkeypatch):
    """With CUDA graphs the profiled step begins a cudagraph-trees step and accumulates into `.grad` tensors that
    live across steps (zeroed after each), as `run_training` does; without, gradients are dropped (None)."""
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    model = tiny_model(dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    profile_gpu.forward_backward(model, ids)
    assert marks == [] and all(p.grad is None for p in model.parameters())

    profile_gpu.with_cuda_graphs(model)
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(g is not None and not g.any() for g in grads.values())
    seen = {}
    hook = model.lm_head.weight.register_hook(lambda g: seen.update(norm=g.norm().item()))
    profile_gpu.forward_backward(model, ids)
    hook.remove()
    assert marks == [1] and seen["norm"] > 0  # a real backward ran, then its gradients were zeroed in place
    for name, p in model.named_parameters():
        assert p.grad is grads[name] and not p.grad.any(), name
