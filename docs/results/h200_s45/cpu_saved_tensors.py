# CPU probe (session 45): the tensors the partitioner (inductor's min-cut) saves for the backward, compiled one
# layer per region against runs of the pattern csa, full; bf16 autocast, 1 x 256 tokens, the seed's widths. Output:
#   1 [17.74, 13.95, 0.77] MiB fw outputs per graph (incl. the layer output)
#   None [31.63, 0.77] MiB fw outputs per graph (incl. the layer output)
# Run from the repository root: python docs/results/h200_s45/cpu_saved_tensors.py
import sys

import torch

sys.path.insert(0, "tests")
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.partitioners import min_cut_rematerialization_partition

from llamathink import LlamaThinkConfig, LlamaThinkForCausalLM

rec = []


def fw(gm, ex):
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    saved = 0
    for a in out:
        v = getattr(a, "meta", {}).get("val") if hasattr(a, "meta") else None
        if isinstance(v, torch.Tensor):
            saved += v.numel() * v.element_size()
    rec.append(saved)
    return gm.forward


def bw(gm, ex):
    return gm.forward


backend = aot_autograd(fw_compiler=fw, bw_compiler=bw, partition_fn=min_cut_rematerialization_partition)
cfg = LlamaThinkConfig(mixer_types=["csa", "full"] * 2, num_hidden_layers=4, vocab_size=1000)
ids = torch.randint(0, 1000, (1, 256))
for lpg in (1, None):
    torch._dynamo.reset()
    rec.clear()
    torch.manual_seed(0)
    m = LlamaThinkForCausalLM(cfg).train()
    m.compile_layers(layers_per_graph=lpg, backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m(input_ids=ids, labels=ids, use_cache=False, skip_logits=True).loss.backward()
    print(lpg, [round(r / 2**20, 2) for r in rec], "MiB fw outputs per graph (incl. the layer output)")
