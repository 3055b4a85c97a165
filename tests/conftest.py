"""Shared fixtures: a tiny configuration with every mixer type, and helpers to randomise weights so that
norms, gates and hyper-connection scales are non-trivial (a freshly initialised model hides many bugs)."""

import contextlib
import os
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # tests run from a checkout without installing too
    sys.path.insert(0, str(REPO_ROOT))

from llamathink import LlamaThinkConfig, LlamaThinkForCausalLM  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# Deterministic cuBLAS (the GPU tests' `deterministic` fixture) needs this before CUDA starts; it only fixes the
# workspace cuBLAS may use.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


@contextlib.contextmanager
def torch_threads(n: int):
    """Run PyTorch's CPU ops on `n` intra-op threads: the tiny models' many small ops run ~20-30x slower with two
    OpenMP threads spinning on a busy 2-core machine than with one."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


LLAMA2_TOKENIZER = Path(
    os.environ.get("LLAMATHINK_LLAMA2_TOKENIZER", REPO_ROOT.parent / "shared" / "tokenizer" / "llama2-tokenizer.model")
)


def llama2_model_path() -> Path:
    """The real Llama 2 tokenizer.model (not part of the repository), or skip the test saying where it was sought."""
    if not LLAMA2_TOKENIZER.is_file():
        pytest.skip(f"Llama 2 tokenizer.model not found at {LLAMA2_TOKENIZER} (set LLAMATHINK_LLAMA2_TOKENIZER)")
    return LLAMA2_TOKENIZER


def tiny_config(**overrides) -> LlamaThinkConfig:
    """The tiny test model's config. Its residual projections start N(0, initializer_range), not at zero (the
    default): a test model's every mixer must reach the logits, or comparisons of two paths through it would hold
    whatever those paths compute."""
    kwargs = dict(
        zero_init_residual=False,
        vocab_size=96,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=8,
        linear_value_head_dim=10,
        mixer_types=["linear", "csa", "full", "linear"],
        csa_stride=4,
        csa_window=16,
        max_position_embeddings=256,
        gdn_chunk_size=16,
        pad_token_id=0,
    )
    kwargs.update(overrides)
    return LlamaThinkConfig(**kwargs)


@torch.no_grad()
def randomize_(model: torch.nn.Module, scale: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """Perturb every parameter (norm weights, hyper-connection scales, gates included)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
        if name.endswith("A_log"):
            p.copy_(torch.empty(p.shape, dtype=torch.float64).uniform_(-1.0, 1.0, generator=gen).to(p.dtype))
        elif p.dim() == 1:
            p.add_(scale * noise)
        else:
            p.add_(scale * noise / p.shape[-1] ** 0.5)
    return model


def tiny_model(dtype=torch.float64, seed: int = 0, **overrides) -> LlamaThinkForCausalLM:
    torch.manual_seed(seed)
    model = LlamaThinkForCausalLM(tiny_config(**overrides)).to(dtype)
    return randomize_(model, seed=seed).eval()


def graph_test_model(gdn_backend: str, mode: str) -> LlamaThinkForCausalLM:
    """The tiny model of the CUDA-graph GPU tests (and of benchmarks/graph_gradient_spread.py): GDN heads of 16 x 32,
    hidden 64, float32 weights on the GPU, compiled layer by layer in `mode` ("eager": not compiled) with training's
    inductor options without combo kernels (`llamathink.train.loop.compile_kwargs`), from the same weights every
    time. Its CSA layer runs its SDPA paths in every mode, so that the modes run the same kernels (with CUDA graphs
    it would take FlexAttention: `test_compiled_csa_layers_run_flex_attention_with_the_sdpa_paths_values`)."""
    from llamathink.train.loop import compile_kwargs

    torch._dynamo.reset()
    dims = {"linear_key_head_dim": 16, "linear_value_head_dim": 32, "head_dim": 16, "hidden_size": 64}
    model = tiny_model(dtype=torch.float32, gdn_backend=gdn_backend, **dims).cuda().train()
    for layer in model.model.layers:
        if hasattr(layer.mixer, "flex_window"):
            layer.mixer.flex_window = False
    return model if mode == "eager" else model.compile_layers(**compile_kwargs(mode))


def graph_test_grads(gdn_backend: str, mode: str, calls: int, autocast: bool = True) -> list[dict]:
    """Per-parameter gradients {name: tensor} of `calls` forward/backward calls of one fixed batch [2, 128] by
    `graph_test_model`, each on zeroed gradients (a cudagraph-trees step begun before each), with bf16 autocast or
    in float32."""
    ids = torch.randint(1, 96, (2, 128), generator=torch.Generator().manual_seed(0)).cuda()
    model = graph_test_model(gdn_backend, mode)
    out = []
    for _ in range(calls):
        model.zero_grad(set_to_none=True)
        torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            model(ids, labels=ids, use_cache=False, skip_logits=True).loss.backward()
        out.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
    return out


def loss_and_grads(model, ids, autocast: bool, forward=None) -> tuple[float, dict]:
    """One forward/backward of the language-model loss on `ids` [B, T] (as labels too) from zeroed gradients,
    with bf16 autocast or without; `forward` replaces `model` as the callable (a compiled model). Returns the loss
    and {name: gradient} in float32 on the CPU."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = (model if forward is None else forward)(ids, labels=ids, use_cache=False, skip_logits=True).loss
    loss.backward()
    return loss.item(), {name: p.grad.detach().float().cpu() for name, p in model.named_parameters()}


def relative_errors(grads: dict, reference: dict) -> dict:
    """{name: |g - g_ref| / |g_ref|} for each tensor of `grads` ({name: tensor} dicts; a zero reference counts as
    1e-8)."""
    return {n: ((g - reference[n]).norm() / reference[n].norm().clamp_min(1e-8)).item() for n, g in grads.items()}


def largest_gap(a: dict, b: dict, *, nonzero_reference: bool = True) -> tuple[float, str]:
    """The largest per-tensor gap |a[n] - b[n]| / |b[n]| over the tensors of `b` ({name: tensor} dicts), with the
    name; `nonzero_reference` asserts that no reference tensor is zero (its gap would not be relative)."""
    gaps = []
    for name, ref in b.items():
        assert not nonzero_reference or ref.norm() > 0, f"{name} is zero"
        gaps.append((float((a[name] - ref).norm() / ref.norm()), name))
    return max(gaps)


@pytest.fixture
def model():
    return tiny_model()
