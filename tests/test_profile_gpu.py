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


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--eager-peers", "hf-qwen"], "--eager-peers hf-qwen: expected peers of bench_gpu.py"),
        (["--eager-peers", "hf-llama:cudagraphs"], "--eager-peers hf-llama:cudagraphs: expected peers"),
        (["--eager-peers", "llamathink:fla"], "--eager-peers llamathink:fla: expected peers"),
        (["--eager-peers", "hf-qwen3.5", "--no-eager"], "--eager-peers profiles beside the eager step"),
        (["--host-python", "--optimizer-only"], "--host-python profiles the eager or the compiled step"),
        (["--host-python", "--no-eager"], "--host-python profiles the eager or the compiled step"),
        (["--eager-ops"], "--eager-ops, --kernel-sources and --cuda-graphs apply to the compiled step"),
    ],
)
def test_options_that_profile_nothing_stop_before_any_gpu_work(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        profile_gpu.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_launch_calls_count_what_the_host_queues_on_the_gpu_only():
    """Kernel launches of both CUDA APIs, copies, fills and graph replays count; other host calls and GPU kernels
    (which the profiler lists under their own names) do not."""

    class Event:
        def __init__(self, key, count):
            self.key, self.count = key, count

    events = [
        Event("cudaLaunchKernel", 300),
        Event("cuLaunchKernelEx", 40),
        Event("cudaMemcpyAsync", 7),
        Event("cudaMemsetAsync", 5),
        Event("cudaGraphLaunch", 2),
        Event("cudaStreamSynchronize", 3),
        Event("aten::mm", 50),
        Event("void at::native::elementwise_kernel<128, 2>", 300),
    ]
    assert profile_gpu.launch_calls(events) == 354


def test_host_syncs_count_sync_warnings_by_line_and_restore_the_mode(monkeypatch):
    """`host_syncs` counts the sync debug mode's warnings by the Python line that raised them, not other warnings,
    and sets the mode it found back also where the run raises (CPU: the mode and the warnings stood in for)."""
    import warnings

    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: 0)  # "default", as the mode reads back

    def run():
        for _ in range(3):
            warnings.warn("called a synchronizing CUDA operation", UserWarning)  # the first line
        warnings.warn("called a synchronizing CUDA operation", UserWarning)  # the second
        warnings.warn("an unrelated warning", UserWarning)

    first = run.__code__.co_firstlineno + 2
    syncs = profile_gpu.host_syncs(run)
    assert syncs == {f"test_profile_gpu.py:{first}": 3, f"test_profile_gpu.py:{first + 1}": 1}
    assert modes == ["warn", 0]

    def fails():
        raise RuntimeError("boom")

    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: 2)  # a caller's "error" mode is set again
    with pytest.raises(RuntimeError, match="boom"):
        profile_gpu.host_syncs(fails)
    assert modes[-2:] == ["warn", 2]


@pytest.mark.parametrize("argv", [["--eager-trace"], ["--eager-trace", "--out", "x", "--no-eager"]])
def test_eager_trace_needs_a_folder_and_the_eager_step(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        profile_gpu.main(argv)
    assert exit_info.value.code == 2
    assert "--eager-trace writes the eager steps' traces into --out's folder" in capsys.readouterr().err
