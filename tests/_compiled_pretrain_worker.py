"""One process of a `torch.distributed.run` pretraining job with compiled decoder layers (tests/test_train.py).

Usage: python -m torch.distributed.run --standalone --nproc_per_node N tests/_compiled_pretrain_worker.py --key value ...

The arguments are `train_hf.py`'s. `compile_layers` runs on dynamo's "aot_eager" backend: each decoder layer is
traced into a graph and runs as AOTAutograd's compiled autograd function, as it does under inductor on a GPU, so
DDP's gradient hooks and `no_sync` meet the compiled layers' backward; inductor's C++ code generation would take
minutes per process on a CPU. After training it prints "rank R graphs N": dynamo's count of graphs it compiled, in
one write (under the pipe's atomic size), so the two processes' lines cannot interleave on the shared stdout.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from llamathink.modeling_llamathink import LlamaThinkPreTrainedModel
from llamathink.train import pretrain

_compile_layers = LlamaThinkPreTrainedModel.compile_layers


def compile_layers(self, **kwargs):
    return _compile_layers(self, **{**kwargs, "backend": "aot_eager"})


if __name__ == "__main__":
    LlamaThinkPreTrainedModel.compile_layers = compile_layers
    status = pretrain.main(sys.argv[1:])
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    # print() writes the text and its newline separately; the other process's line could land between them
    sys.stdout.write(f"rank {os.environ.get('RANK', '0')} graphs {graphs}\n")
    sys.stdout.flush()
    sys.exit(status)
