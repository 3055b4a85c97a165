"""Session 32 probe: why inductor loops the q/k L2 norms (triton_red, not triton_per), and what a one-pass kernel
would save. Forward + backward of the Gated DeltaNet q/k normalisation on a conv output [16, 1024, 3024] bf16."""

import sys

import torch
from torch._inductor import choices

B, T, H, D = int(sys.argv[1]) if len(sys.argv) > 1 else 16, 1024, 9, 112
FORCE = {"on": False}
LOG = []
_orig = choices.InductorChoices.should_use_persistent_reduction


def _patched(features, cooperative_reduction):
    result = _orig(features, cooperative_reduction)
    try:
        info = (
            str(features.reduction_numel),
            str(features.get_reduction_hint()),
            features.has_non_contiguous_pw_in_reduction_kernel(),
            result,
        )
    except Exception as err:  # noqa: BLE001
        info = ("?", repr(err), None, result)
    if FORCE["on"] and not result:
        try:
            result = bool(int(features.reduction_numel) <= 1024)
        except Exception:  # noqa: BLE001, S110 (a symbolic size: leave inductor's choice)
            pass
    LOG.append(info + (result,))
    return result


choices.InductorChoices.should_use_persistent_reduction = staticmethod(_patched)


def l2norm(x, eps=1e-6):
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def ref(qkv):
    q, k, _ = qkv.split((H * D, H * D, H * D), dim=-1)
    q = l2norm(q.reshape(B, T, H, D).float()).to(torch.bfloat16)
    k = l2norm(k.reshape(B, T, H, D).float()).to(torch.bfloat16)
    return q, k


def contig(q, k):
    return l2norm(q.float()).to(torch.bfloat16), l2norm(k.float()).to(torch.bfloat16)


def timed(name, fn, inputs, grads, iters=20):
    for _ in range(3):
        outs = fn(*inputs)
        torch.autograd.backward(outs, grads)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            outs = fn(*inputs)
            torch.autograd.backward(outs, grads)
        torch.cuda.synchronize()
    rows = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            rows.setdefault(e.name, [0.0, 0])
            rows[e.name][0] += e.device_time / 1000 / iters
            rows[e.name][1] += 1
    total = sum(v[0] for v in rows.values())
    print(f"== {name}: {total * 1000:.1f} us of kernels per fwd+bwd (both q and k)")
    for k_, v in sorted(rows.items(), key=lambda kv: -kv[1][0])[:8]:
        print(f"   {v[0] * 1000:8.1f} us  {v[1] // iters:3d}x  {k_[:120]}")


torch.manual_seed(0)
dev = "cuda"
qkv = torch.randn(B, T, 3 * H * D, device=dev, dtype=torch.bfloat16, requires_grad=True)
gq, gk = (torch.randn(B, T, H, D, device=dev, dtype=torch.bfloat16) for _ in range(2))
qc = qkv.detach()[..., : H * D].reshape(B, T, H, D).contiguous().requires_grad_()
kc = qkv.detach()[..., H * D : 2 * H * D].reshape(B, T, H, D).contiguous().requires_grad_()
want = ref(qkv)

for name, fn, inputs, force in [
    ("ref eager", ref, (qkv,), False),
    ("ref compiled", torch.compile(ref), (qkv,), False),
    ("ref compiled, persistent forced", torch.compile(ref), (qkv,), True),
    ("contiguous input compiled", torch.compile(contig), (qc, kc), False),
]:
    torch._dynamo.reset()
    LOG.clear()
    FORCE["on"] = force
    got = fn(*inputs)
    err = max((a.float() - b.float()).abs().max().item() for a, b in zip(got, want))
    timed(name, fn, inputs, (gq, gk))
    print(f"   max |out - eager| {err:.2e}; persistent decisions (rnumel, hint, non-contiguous pw, inductor's, used):")
    for row in LOG:
        print("     ", row)

try:
    from fla.modules.l2norm import l2norm as fla_l2norm

    def fla_fn(q, k):
        return fla_l2norm(q), fla_l2norm(k)

    got = fla_fn(qc, kc)
    err = max((a.float() - b.float()).abs().max().item() for a, b in zip(got, want))
    timed("fla l2norm (contiguous input, eager)", fla_fn, (qc, kc), (gq, gk))
    print(f"   max |out - eager ref| {err:.2e}")

    def fla_strided(qkv_):
        q, k, _ = qkv_.split((H * D, H * D, H * D), dim=-1)
        return fla_l2norm(q.reshape(B, T, H, D)), fla_l2norm(k.reshape(B, T, H, D))

    timed("fla l2norm on the split (input_guard's copies, eager)", fla_strided, (qkv,), (gq, gk))
except Exception as err:  # noqa: BLE001
    print("fla l2norm:", repr(err))
