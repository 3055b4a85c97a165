"""Session 32 experiment: profile_gpu.py with inductor's persistent-reduction choice widened to reductions whose
every read runs along the reduction with stride 1 (slices of wider rows: the q/k L2 norms over the conv output),
which inductor's default treats as DEFAULT (threshold 64) rather than INNER (threshold 1024). Usage:
python gpu_s32/inner_strided.py <profile_gpu.py args>"""

import runpy
import sys

from torch._inductor import config
from torch._inductor.choices import InductorChoices
from torch._inductor.dependencies import MemoryDep
from torch._inductor.runtime.hints import ReductionHint
from torch._inductor.virtualized import V

WIDENED = []


class InnerStrided(InductorChoices):
    @staticmethod
    def should_use_persistent_reduction(features, cooperative_reduction):
        if InductorChoices.should_use_persistent_reduction(features, cooperative_reduction):
            return True
        if not config.triton.persistent_reductions or cooperative_reduction:
            return False
        if features.get_reduction_hint() != ReductionHint.DEFAULT:
            return False
        for node in features.reduction_nodes():
            for dep in node.read_writes.reads:
                if not isinstance(dep, MemoryDep) or not dep.var_names:
                    continue
                last = dep.var_names[-1]
                if last in dep.index.free_symbols and not dep.stride1_for_last_dim(False):
                    return False
        ok = V.graph.sizevars.statically_known_leq(features.reduction_numel, 1024)
        if ok:
            WIDENED.append(str(features.reduction_numel))
        return ok

    def uuid(self):  # for inductor's cache key where this class is installed through config
        return "inner_strided_s32"


V.set_choices_handler(InnerStrided())
if hasattr(config, "inductor_choices_class"):  # threads that start their own handler (autograd's backward)
    config.inductor_choices_class = InnerStrided
sys.path.insert(0, "benchmarks")
sys.argv = ["benchmarks/profile_gpu.py", *sys.argv[1:]]
try:
    runpy.run_path("benchmarks/profile_gpu.py", run_name="__main__")
finally:
    print(f"inner_strided: {len(WIDENED)} reductions made persistent, rnumel {sorted(set(WIDENED))}", flush=True)
