"""Benchmark the C runner (export_c/run.c) on a random model of the real 95.7M shape.

    python benchmarks/bench_c.py [--threads 2] [--decode 256] [--prompt 512] [--repeat 3]
                                 [--dtypes fp32,bf16,int8] [--workdir DIR] [--cc cc]

Builds run.c (-O3 -march=native -fopenmp), writes a random checkpoint with the default
LlamaThinkConfig shape (no PyTorch model needed), exports it at each dtype, then times greedy
decode of --decode tokens and prefill of a --prompt-token prompt.  Prints tok/s and the ratio to
the bandwidth ceilings of DESIGN.md section 5 (~84 fp32, ~170 bf16, ~315 int8 tok/s on two
threads at ~32 GB/s).  Best of --repeat runs is reported (other processes share the cores).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

CEILING = {"fp32": 84.0, "bf16": 170.0, "int8": 315.0}
TARGET = {"fp32": 70.0, "bf16": 140.0, "int8": 300.0}


def build(cc: str, out: str) -> None:
    src = os.path.join(ROOT, "export_c", "run.c")
    subprocess.run([cc, "-O3", "-march=native", "-fopenmp", "-o", out, src, "-lm"], check=True)


BW_SRC = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
/* streaming read bandwidth of n threads over 512 MB (best of 5) */
int main(int argc, char **argv) {
    int nt = argc > 1 ? atoi(argv[1]) : 2;
    size_t n = (size_t)512 << 20, m = n / sizeof(unsigned);
    unsigned *a = aligned_alloc(64, n);
    memset(a, 1, n);
    double best = 0;
    for (int it = 0; it < 5; it++) {
        double t = omp_get_wtime();
        unsigned tot = 0; /* integer sums vectorise (float ones would not without -ffast-math) */
#pragma omp parallel for num_threads(nt) reduction(+ : tot) schedule(static)
        for (size_t i = 0; i < m; i++) tot += a[i];
        t = omp_get_wtime() - t;
        if (n / t / 1e9 > best) best = n / t / 1e9;
        if (tot == 42u) puts("");
    }
    printf("%.2f\n", best);
    return 0;
}
"""


def bandwidth(cc: str, wd: str, threads: int) -> float:
    src, exe = os.path.join(wd, "bw.c"), os.path.join(wd, "bw")
    if not os.path.exists(exe):
        with open(src, "w") as f:
            f.write(BW_SRC)
        subprocess.run([cc, "-O3", "-march=native", "-fopenmp", "-o", exe, src], check=True)
    return float(subprocess.run([exe, str(threads)], capture_output=True, text=True, check=True).stdout)


def run_stats(binary, model, ids, steps, threads):
    cmd = [binary, model, "--ids", " ".join(map(str, ids)), "-n", str(steps), "-t", "0",
           "--ignore-eos", "--print-ids", "--stats", "-T", str(threads)]
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    pre = re.search(r"prefill: (\d+) tokens in ([\d.]+) s", r.stderr)
    dec = re.search(r"decode: (\d+) tokens in ([\d.]+) s \(([\d.]+) tok/s\)", r.stderr)
    pol = re.search(r"OMP_WAIT_POLICY=(\S+)", r.stderr)
    run_stats.policy = pol.group(1) if pol else "?"
    return int(pre.group(1)) / float(pre.group(2)), float(dec.group(3))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", default="2", help="comma-separated thread counts, e.g. 1,2")
    ap.add_argument("--decode", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dtypes", default="fp32,bf16,int8")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--cc", default=os.environ.get("CC", "cc"))
    a = ap.parse_args(argv)

    import numpy as np
    from export_c.export import DEFAULTS, export
    from export_c.reference import make_random_checkpoint

    wd = a.workdir or tempfile.mkdtemp(prefix="bench_c_")
    os.makedirs(wd, exist_ok=True)
    binary = os.path.join(wd, "run")
    build(a.cc, binary)
    ck = os.path.join(wd, "ckpt")
    if not os.path.exists(os.path.join(ck, "model.safetensors")):
        make_random_checkpoint(ck, dict(DEFAULTS), seed=0)
    rng = np.random.default_rng(0)
    prompt = [1] + rng.integers(3, DEFAULTS["vocab_size"], a.prompt - 1).tolist()
    short = [1]
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    print(f"decode={a.decode} tokens, prompt={a.prompt} tokens, best of {a.repeat}; "
          f"load average at start {load} (other processes share the cores: rerun when quiet)")
    threads = [int(x) for x in str(a.threads).split(",")]
    bw = {th: bandwidth(a.cc, wd, th) for th in threads}
    print("streaming read bandwidth measured now: " +
          ", ".join(f"{th} thread(s) {bw[th]:.1f} GB/s" for th in threads) +
          " (DESIGN.md: ~16 / ~32 GB/s); 'now-ceil' = that bandwidth / file size")
    print(f"{'dtype':6} {'thr':>3} {'MB':>7} {'decode tok/s':>13} {'ceiling':>8} {'ratio':>6} "
          f"{'now-ceil':>8} {'ratio':>6} {'target':>7} {'prefill tok/s':>14}  wait-policy")
    for dt in a.dtypes.split(","):
        model = os.path.join(wd, f"model_{dt}.bin")
        if not os.path.exists(model):
            export(ck, model, dt, verbose=False)
        mb = os.path.getsize(model) / 1e6
        for th in threads:
            dec = max(run_stats(binary, model, short, a.decode, th)[1] for _ in range(a.repeat))
            pre = max(run_stats(binary, model, prompt, 1, th)[0] for _ in range(a.repeat))
            now = bw[th] * 1e3 / mb
            print(f"{dt:6} {th:3d} {mb:7.1f} {dec:13.1f} {CEILING[dt]:8.0f} {dec / CEILING[dt]:6.2f} "
                  f"{now:8.0f} {dec / now:6.2f} {TARGET[dt]:7.0f} {pre:14.1f}  {run_stats.policy}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
