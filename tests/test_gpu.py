"""GPU checks (skipped where there is no CUDA device): the fla backend against the PyTorch reference, forward and
gradients, and cached decoding against the uncached forward on the GPU."""

import pytest
import torch
from conftest import tiny_model

from llamathink.modeling_llamathink import (
    _fla_ops,
    fla_backward_problem,
    fla_chunk_gated_delta_rule,
    fla_recurrent_gated_delta_rule,
    l2norm,
    torch_chunk_gated_delta_rule,
    torch_recurrent_gated_delta_rule,
)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
needs_fla = pytest.mark.skipif(not torch.cuda.is_available() or _fla_ops() is None, reason="fla is not installed")


def _inputs(B=2, T=300, H=4, Dk=64, Dv=64, dtype=torch.bfloat16, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    kw = dict(device="cuda", generator=gen)
    q = l2norm(torch.randn(B, T, H, Dk, **kw)).to(dtype)
    k = l2norm(torch.randn(B, T, H, Dk, **kw)).to(dtype)
    v = torch.randn(B, T, H, Dv, **kw).to(dtype)
    g = -torch.nn.functional.softplus(torch.randn(B, T, H, **kw)) * 0.3
    beta = torch.rand(B, T, H, **kw).to(dtype)
    s0 = torch.randn(B, H, Dk, Dv, **kw) * 0.1
    return q, k, v, g, beta, s0


@needs_fla
def test_fla_chunk_matches_reference_forward_and_backward():
    q, k, v, g, beta, s0 = _inputs()
    ref_in = [x.float().requires_grad_() for x in (q, k, v, g, beta, s0)]
    fla_in = [x.clone().requires_grad_() for x in (q, k, v, g, beta, s0)]
    o_ref, s_ref = torch_chunk_gated_delta_rule(*ref_in[:5], 0.125, ref_in[5], True)
    o_fla, s_fla = fla_chunk_gated_delta_rule(*fla_in[:5], 0.125, fla_in[5], True)
    torch.testing.assert_close(o_fla.float(), o_ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(s_fla.float(), s_ref, rtol=2e-2, atol=2e-2)
    if fla_backward_problem(q.device) is not None:
        pytest.skip(fla_backward_problem(q.device))
    w = torch.randn_like(o_ref)
    g_ref = torch.autograd.grad((o_ref * w).sum() + s_ref.sum(), ref_in)
    g_fla = torch.autograd.grad((o_fla.float() * w).sum() + s_fla.float().sum(), fla_in)
    for name, a, b in zip("q k v g beta s0".split(), g_fla, g_ref):
        err = (a.float() - b).norm() / b.norm()
        assert err < 3e-2, (name, err.item())


@needs_fla
def test_fla_recurrent_matches_reference():
    q, k, v, g, beta, s0 = _inputs(T=1)
    o_ref, s_ref = torch_recurrent_gated_delta_rule(q.float(), k.float(), v.float(), g, beta.float(), 0.125, s0, True)
    o_fla, s_fla = fla_recurrent_gated_delta_rule(q, k, v, g, beta, 0.125, s0, True)
    torch.testing.assert_close(o_fla.float(), o_ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(s_fla.float(), s_ref, rtol=2e-2, atol=2e-2)


# Gated DeltaNet head dims: the tiny test model's odd 8 / 10, and multiples of 16 as real models use (fla's Triton
# tiles are at least 16 wide, so odd dims run its masked paths).
GDN_DIMS = {"dims8x10": {}, "dims16x32": dict(linear_key_head_dim=16, linear_value_head_dim=32)}


@pytest.mark.parametrize("dims", sorted(GDN_DIMS))
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_gpu_model_matches_cpu_reference_forward_and_gradients(backend, dims):
    """fp32 on the GPU (fla where available) against fp32 on the CPU, then a bf16-autocast step that stays close."""
    cpu = tiny_model(dtype=torch.float32, gdn_backend="torch", **GDN_DIMS[dims])
    gpu = tiny_model(dtype=torch.float32, gdn_backend=backend, **GDN_DIMS[dims]).cuda()
    ids = torch.randint(1, 96, (2, 150), generator=torch.Generator().manual_seed(0))
    cpu.train(), gpu.train()
    loss_cpu = cpu(ids, labels=ids).loss
    loss_cpu.backward()
    loss_gpu = gpu(ids.cuda(), labels=ids.cuda()).loss
    loss_gpu.backward()
    # fla and cuDNN's conv use TF32 inside, hence 1e-3 rather than 1e-6
    assert abs(loss_gpu.item() - loss_cpu.item()) < 1e-3 * abs(loss_cpu.item()), (loss_gpu.item(), loss_cpu.item())
    errors = {}
    for (name, p_cpu), (_, p_gpu) in zip(cpu.named_parameters(), gpu.named_parameters()):
        errors[name] = ((p_gpu.grad.cpu() - p_cpu.grad).norm() / p_cpu.grad.norm().clamp_min(1e-8)).item()
    assert max(errors.values()) < 2e-2, sorted(errors.items(), key=lambda kv: -kv[1])[:5]
    gpu.zero_grad()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss_bf16 = gpu(ids.cuda(), labels=ids.cuda()).loss
    loss_bf16.backward()
    assert abs(loss_bf16.item() - loss_cpu.item()) < 2e-2 * abs(loss_cpu.item())
    assert all(torch.isfinite(p.grad).all() for p in gpu.parameters())


def test_cached_decode_equals_uncached_forward_on_gpu():
    model = tiny_model(dtype=torch.float32, csa_window=64, mixer_types=["csa", "linear", "full", "csa"]).cuda()
    ids = torch.randint(1, 96, (2, 90), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :70], use_cache=True)
        pieces, cache = [out.logits], out.cache
        for t in range(70, 90):
            out = model(ids[:, t : t + 1], cache=cache)
            pieces.append(out.logits)
    # fla's kernels use TF32 for fp32 inputs: cached (recurrent) and uncached (chunked) steps differ at ~1e-3
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=2e-3, atol=2e-3)


def test_cuda_graph_decode_equals_eager_decode():
    """generate() with one-token steps replayed from a CUDA graph == the eager path, token for token and in logits;
    the graph is reused by a second generate() call."""
    model = tiny_model(dtype=torch.float32, csa_window=64, mixer_types=["csa", "linear", "full", "csa"]).cuda().eval()
    prompt = torch.randint(3, 96, (2, 11), generator=torch.Generator().manual_seed(2)).cuda()
    kwargs = dict(max_new_tokens=90, do_sample=False, pad_token_id=0, eos_token_id=None, output_scores=True,
                  return_dict_in_generate=True)  # fmt: skip
    with torch.no_grad():
        fast = [model.generate(prompt, **kwargs) for _ in range(2)]
        assert any(d.graph is not None for d in model.__dict__["_static_decoders"].values())
        model.config.decode_cuda_graphs = False
        slow = model.generate(prompt, **kwargs)
    for out in fast:
        assert torch.equal(out.sequences, slow.sequences)
        torch.testing.assert_close(torch.stack(out.scores), torch.stack(slow.scores), rtol=1e-4, atol=1e-4)
