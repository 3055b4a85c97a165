"""CPU count of the aten ops one decoder layer dispatches in an eager bf16-autocast forward + backward (session 48):
the difference between 4- and 2-layer models of one mixer type, batch 1 x 256, the Gated DeltaNet delta rule stubbed
(one op each way, as a GPU kernel call), views included. Run from the repository root: python
docs/results/h200_s48/eager_ops_cpu.py > docs/results/h200_s48/eager_ops_cpu.txt"""

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from llamathink.configuration_llamathink import LlamaThinkConfig
from llamathink.modeling_llamathink import LlamaThinkForCausalLM, LlamaThinkGatedDeltaNet


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.c = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.c[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


class FakeRule(torch.autograd.Function):  # stands in for fla's kernel: one op forward, one backward
    @staticmethod
    def forward(ctx, q, k, v, g, beta):
        return v.clone()

    @staticmethod
    def backward(ctx, go):
        return None, None, go, None, None


def fake(self, q, k, v, g, beta, *a, **kw):
    return FakeRule.apply(q, k, v, g, beta), None


LlamaThinkGatedDeltaNet._delta_rule = fake

torch.manual_seed(0)
for kinds in (["linear"], ["csa"], ["full"]):
    cfg = LlamaThinkConfig(num_hidden_layers=4, mixer_types=kinds * 4)
    model = LlamaThinkForCausalLM(cfg).train()
    ids = torch.randint(0, 32000, (1, 256))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids, skip_logits=True)
    out.loss.backward()
    model.zero_grad()
    for n_layers in (2, 4):
        cfg = LlamaThinkConfig(num_hidden_layers=n_layers, mixer_types=kinds * n_layers)
        model = LlamaThinkForCausalLM(cfg).train()
        mode = Count()
        with mode:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(ids, labels=ids, skip_logits=True)
            out.loss.backward()
        if n_layers == 2:
            base = mode.c
        else:
            per = {k: (mode.c[k] - base[k]) / 2 for k in mode.c if mode.c[k] != base[k]}
            print(kinds[0], "ops per layer (fwd+bwd):", sum(per.values()))
            print("  ", sorted(((v, k) for k, v in per.items()), reverse=True)[:18])
