"""Session 36 probe: does inductor's first compile change the ptxas that a child process's Triton keys its kernels
by, against the parent's (lru-cached) choice? Prints the two ptxas paths and versions, then compiles one kernel in
the parent (fixing its ptxas version), sets TRITON_PTXAS_PATH as inductor's first compile does, has a child compile
the same kernel into a fresh cache, and checks whether the parent then finds it there or writes its own."""

import os
import subprocess
import sys
import tempfile

cache = tempfile.mkdtemp()
os.environ["TRITON_CACHE_DIR"] = cache
from pathlib import Path

import torch
import triton
from torch._inductor import config as ind_config
from torch._inductor.runtime import compile_tasks
from triton import knobs

print("torch", torch.__version__, "triton", triton.__version__)
torch_ptxas = Path(compile_tasks.__file__).absolute().parents[1] / "bin" / "ptxas"
print("inductor's ptxas:", torch_ptxas, torch_ptxas.exists())
print("TRITON_PTXAS_PATH before:", os.environ.get("TRITON_PTXAS_PATH"), "triton's:", knobs.nvidia.ptxas.path)
for p in {str(torch_ptxas), knobs.nvidia.ptxas.path}:
    if os.path.exists(p):
        print(
            p,
            "->",
            subprocess.run([p, "--version"], capture_output=True, text=True, check=False)
            .stdout.strip()
            .splitlines()[-1],
        )
print("use_pytorch_libdevice:", getattr(getattr(ind_config, "eager_numerics", None), "use_pytorch_libdevice", None))

SRC = """import torch, triton, triton.language as tl
@triton.jit
def k(out, v: tl.constexpr):
    tl.store(out, v)
def run():
    k[(1,)](torch.zeros(1, device="cuda"), v=3.5)
    torch.cuda.synchronize()
"""
Path("/tmp/probe_kernel.py").write_text(SRC)
sys.path.insert(0, "/tmp")
import probe_kernel

probe_kernel.run()  # the parent's ptxas version is now cached (Triton's own path, or TRITON_PTXAS_PATH's)
first = set(os.listdir(cache))
compile_tasks._set_triton_ptxas_path()
compile_tasks._set_triton_libdevice_path()
print("TRITON_PTXAS_PATH after inductor's setter:", os.environ.get("TRITON_PTXAS_PATH"))
print("TRITON_LIBDEVICE_PATH after:", os.environ.get("TRITON_LIBDEVICE_PATH"))
child_cache = tempfile.mkdtemp()
env = dict(os.environ, TRITON_CACHE_DIR=child_cache)
subprocess.run(
    [sys.executable, "-c", "import sys; sys.path.insert(0, '/tmp'); import probe_kernel; probe_kernel.run()"],
    env=env,
    check=True,
)
print("child's cache entries:", sorted(os.listdir(child_cache)))
print("parent's entries:", sorted(first))
print("same keys:", set(os.listdir(child_cache)) == first)
