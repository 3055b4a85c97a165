"""LlamaThink's Triton causal conv + SiLU (`triton_causal_conv1d_silu`) against the model's PyTorch conv, forward
and gradients, on CPU under Triton's interpreter (`TRITON_INTERPRET=1`, set before the kernels are defined, hence a
fresh process). The GPU run of the same kernels is `tests/test_gpu.py::test_triton_causal_conv_matches_the_reference`."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO_ROOT

pytest.importorskip("triton", reason="setup.py's dev extra installs triton; without it there is no kernel to test")

CHECK = textwrap.dedent(
    """
    import json, sys
    import torch
    from llamathink.kernels_llamathink import triton_causal_conv1d_silu
    from llamathink.modeling_llamathink import LlamaThinkGatedDeltaNet
    sys.path.insert(0, "tests")
    from conftest import tiny_config

    torch.manual_seed(0)
    results = []
    # (rows, tokens, K, packed): 150 tokens cross the forward's 64-token tiles and the backward's 32-token tiles,
    # 300 its 256-token weight-gradient groups; the tiny model's 72 channels are a 64-channel tile and a masked one
    for B, T, K, packed in [(1, 300, 4, False), (2, 150, 4, True), (1, 70, 3, False), (3, 17, 4, True)]:
        layer = LlamaThinkGatedDeltaNet(tiny_config(linear_conv_kernel_dim=K), layer_idx=0).double()
        C = layer.conv_dim
        x = torch.randn(B, T, C, dtype=torch.float64)
        with torch.no_grad():
            layer.conv1d.weight.normal_(0, 0.5)
        pos = None
        if packed:  # documents of 1, 2, 3, ... tokens (each token's position in its document, as position_ids)
            lengths, n = [], 1
            while sum(lengths) < T:
                lengths.append(min(n, T - sum(lengths)))
                n += 1
            pos = torch.cat([torch.arange(n) for n in lengths])[None].repeat(B, 1)
            pos[-1] = torch.arange(T)  # and one row holding a single document
        xs = x.float().requires_grad_()
        ws = layer.conv1d.weight[:, 0].detach().float().requires_grad_()
        out = triton_causal_conv1d_silu(xs, ws, pos)
        xr = x.clone().requires_grad_()
        ref = layer._causal_conv(xr, None, "torch", None, pos)  # the model's PyTorch conv, fp64
        grad = torch.randn_like(ref)
        (out.double() * grad).sum().backward()
        (ref * grad).sum().backward()
        wr = layer.conv1d.weight.grad[:, 0]
        results.append(dict(
            case=[B, T, K, packed], dtype=str(out.dtype), w_grad_dtype=str(ws.grad.dtype),
            out=(out.double() - ref).abs().max().item(), dx=(xs.grad.double() - xr.grad).abs().max().item(),
            dw=(ws.grad.double() - wr).abs().max().item(), ref_scale=ref.abs().max().item(),
            dw_scale=wr.abs().max().item(),
        ))
    print(json.dumps(results))
    """
)


def test_triton_causal_conv_matches_the_model_conv_under_the_interpreter():
    """fp32 kernels against the model's fp64 conv (`_causal_conv`'s PyTorch form, packed rows masked by position):
    output, input and weight gradients to fp32 rounding, rows of one sequence and packed documents, K = 3 and 4."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", CHECK], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 4
    for r in results:
        assert r["dtype"] == "torch.float32" and r["w_grad_dtype"] == "torch.float32", r
        assert r["ref_scale"] > 0.5 and r["dw_scale"] > 1.0, r  # the comparison is not of zeros
        assert r["out"] < 1e-5 and r["dx"] < 1e-5 and r["dw"] < 1e-4, r
