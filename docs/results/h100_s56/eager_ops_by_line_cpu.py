"""CPU count of the kernel-launching aten ops of an eager bf16-autocast training step (forward by model line,
backward by op), session 56: a TorchDispatchMode over one forward + backward of a LlamaThink model of the mixer types
given, batch 1 x T, after two warm-up steps, the Gated DeltaNet delta rule stood in for (one op each way, as one GPU
kernel call). Run from the repository root: python docs/results/h100_s56/eager_ops_by_line_cpu.py 128 linear,linear,csa,full
Figures of session 56 (this 2-core CPU machine, torch 2.13.0+cpu): forward 467 -> 411 and backward 588 -> 526
launches from 412e664 to b242ddc for that model; 1502 -> 1225 (forward + backward) for csa,csa,csa,csa at 4886c42.
From e043248 on the forward counts 7 more here (418): under a dispatch mode the RoPE index table is made at every
forward (`_constant_cache` keeps no tensor made under one), where a normal forward takes it from the cache."""
import collections
import sys
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from llamathink.configuration_llamathink import LlamaThinkConfig
from llamathink.modeling_llamathink import LlamaThinkForCausalLM, LlamaThinkGatedDeltaNet


class FakeRule(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta):
        return v.clone()
    @staticmethod
    def backward(ctx, go):
        return None, None, go, None, None
def fake(self, q, k, v, g, beta, *a, **kw):
    return FakeRule.apply(q, k, v, g, beta), None
LlamaThinkGatedDeltaNet._delta_rule = fake

NOKERNEL = {"view", "_unsafe_view", "as_strided", "empty", "empty_strided", "detach", "t", "transpose", "permute",
            "expand", "slice", "select", "split", "split_with_sizes", "unsqueeze", "squeeze", "reshape", "alias",
            "_reshape_alias", "unbind", "chunk", "narrow", "lift_fresh", "result_type", "_to_copy_noop", "new_empty",
            "new_empty_strided", "resolve_conj", "resolve_neg", "empty_like", "set_", "is_same_size", "_has_compatible_shallow_copy_type", "diagonal", "unflatten", "flatten", "view_as", "sym_size", "sym_stride"}

class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__(); self.fwd = collections.Counter(); self.bwd = collections.Counter(); self.phase = "fwd"
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in NOKERNEL:
            if self.phase == "fwd":
                where = "?"
                for fr in reversed(traceback.extract_stack()[:-1]):
                    if "llamathink/" in fr.filename:
                        where = f"{fr.filename.split('/')[-1]}:{fr.lineno} {fr.line[:60]}"; break
                self.fwd[(name, where)] += 1
            else:
                self.bwd[name] += 1
        return func(*args, **(kwargs or {}))

T = int(sys.argv[1]) if len(sys.argv) > 1 else 128
kinds = sys.argv[2].split(",") if len(sys.argv) > 2 else ["linear", "linear", "csa", "full"]
torch.manual_seed(0)
ids = torch.randint(0, 32000, (1, T))
cfg = LlamaThinkConfig(num_hidden_layers=len(kinds), mixer_types=kinds)
model = LlamaThinkForCausalLM(cfg).train()
for _ in range(2):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids, skip_logits=True)
    out.loss.backward(); model.zero_grad()
c = Count()
with c:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids, skip_logits=True)
    c.phase = "bwd"
    out.loss.backward()
print("forward kernel ops:", sum(c.fwd.values()), " backward:", sum(c.bwd.values()))
for (name, where), n in sorted(c.fwd.items(), key=lambda kv: kv[0][1]):
    print(f"  {n:4d} {name:24s} {where}")
print("backward by op:", c.bwd.most_common(30))
