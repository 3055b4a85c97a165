"""CPU count of the leaf aten ops one decoder layer runs in an eager bf16-autocast forward + backward (session 50):
torch.profiler's aten ops that have no aten op under them, the difference between 4- and 2-layer models of one
mixer type, batch 1 x T (default 1024), after two warm-up steps, the Gated DeltaNet delta rule stood in for (one op
each way, as a GPU kernel call). Unlike session 48's dispatch-mode count (`docs/results/h200_s48/eager_ops_cpu.py`)
it sees the paths that are taken only outside a dispatch mode (branch try/eager-fused's whole-row CSA). Run from the
repository root of each tree: python docs/results/h200_s50/eager_leaf_ops_cpu.py 1024"""

import collections, sys
import torch
from torch.profiler import profile, ProfilerActivity
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

def leaf_ops(prof):
    c = collections.Counter()
    for e in prof.events():
        if e.name.startswith("aten::") and not any(ch.name.startswith("aten::") for ch in e.cpu_children):
            c[e.name] += 1
    return c

T = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
torch.manual_seed(0)
ids = torch.randint(0, 32000, (1, T))
for kinds in (["linear"], ["csa"], ["full"]):
    counts = {}
    for n in (2, 4):
        cfg = LlamaThinkConfig(num_hidden_layers=n, mixer_types=kinds * n)
        model = LlamaThinkForCausalLM(cfg).train()
        for _ in range(2):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(ids, labels=ids, skip_logits=True)
            out.loss.backward(); model.zero_grad()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(ids, labels=ids, skip_logits=True)
            out.loss.backward()
        counts[n] = leaf_ops(prof)
    per = {k: (counts[4][k] - counts[2][k]) / 2 for k in counts[4] | counts[2] if counts[4][k] != counts[2][k]}
    print(kinds[0], "leaf aten ops per layer (fwd+bwd):", sum(per.values()))
    print("  ", sorted(((v, k) for k, v in per.items()), reverse=True)[:14])
