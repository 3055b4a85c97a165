# Which ptxas Triton and torch have here, and whether inductor's first compile points this process at another one.
import os
import subprocess
from pathlib import Path

import torch
from triton.backends.nvidia import compiler as nv

print("TRITON_PTXAS_PATH before:", os.environ.get("TRITON_PTXAS_PATH"))
for p in (Path(torch.__file__).parent / "bin" / "ptxas", Path(nv.__file__).parent / "bin" / "ptxas"):
    out = subprocess.run([str(p), "--version"], capture_output=True).stdout.decode().splitlines()[-2:] if p.exists() else None
    print(p, p.exists(), out)
f = torch.compile(lambda x: (x.sin() + 1).sum())
f(torch.randn(1000, device="cuda"))
print("TRITON_PTXAS_PATH after inductor's first compile:", os.environ.get("TRITON_PTXAS_PATH"))
