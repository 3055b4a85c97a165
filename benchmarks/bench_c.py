"""Benchmark the C runner (export_c/run.c) on a random model of the real 95.7M shape.

    python benchmarks/bench_c.py [--threads 2] [--decode 256] [--prompt 512] [--repeat 3]
                                 [--dtypes fp32,bf16,int8] [--workdir DIR] [--cc cc]
                                 [--llama2c PATH/TO/llama2.c/run.c] [--json OUT.json]

Builds run.c (-O3 -march=native -fopenmp), writes a random checkpoint with the default
LlamaThinkConfig shape (no PyTorch model needed), exports it at each dtype, then times greedy
decode of --decode tokens and prefill of a --prompt-token prompt.  Prints tok/s and the ratio to
the bandwidth ceilings in CEILING (~84 fp32, ~170 bf16, ~315 int8 tok/s on two threads at an
assumed ~32 GB/s, which the decode targets in TARGET assume too) and to the ceilings at the
bandwidth measured in the run ('now-ceil'); BENCHMARKS.md section 4 records the results.  Best of
--repeat runs is reported (other processes share the cores).

--llama2c: a peer in the same run.  Builds that run.c (karpathy/llama2.c; not part of this
repository) with the same flags (-O3 -march=native -fopenmp) and with its own `make runomp` flags
(-Ofast -march=native -fopenmp: -Ofast lets gcc vectorise its dot-product loops), writes a
random-weight checkpoint of its 110M shape in its legacy float32 format (dim 768, hidden 2048,
12 layers, 12 heads, 12 kv heads, vocab 32000, seq_len 1024, shared classifier) and a
tokenizer.bin of 32000 dummy pieces, and times greedy decode of --decode tokens from BOS with
OMP_NUM_THREADS threads (its own "achieved tok/s" line).  Bytes per token: its whole file (every
weight, the classifier = the embedding, is read once per token).
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


LLAMA2C_110M = dict(dim=768, hidden_dim=2048, n_layers=12, n_heads=12, n_kv_heads=12, vocab_size=32000, seq_len=1024)


def write_llama2c_checkpoint(path: str, cfg: dict, seed: int = 0) -> None:
    """llama2.c legacy (version 0) checkpoint: 7 int32 (dim, hidden_dim, n_layers, n_heads,
    n_kv_heads, vocab_size > 0 = shared classifier, seq_len), then float32 tensors: token
    embedding [V, D], rms_att [L, D], wq, wk, wv [L, D, D] (kv heads: [L, D, Hkv*hs]), wo, rms_ffn
    [L, D], w1 [L, Hd, D], w2 [L, D, Hd], w3 [L, Hd, D], rms_final [D], freq_cis_real and _imag
    [seq_len, hs/2] (skipped by run.c).  Random weights (N(0, 0.02)); the embedding row of token 1
    (BOS, where llama2.c stops) is scaled down so that greedy decoding never picks it."""
    import numpy as np

    D, Hd, L, H, Hkv = cfg["dim"], cfg["hidden_dim"], cfg["n_layers"], cfg["n_heads"], cfg["n_kv_heads"]
    V, S = cfg["vocab_size"], cfg["seq_len"]
    hs = D // H
    rng = np.random.default_rng(seed)

    def rnd(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)

    with open(path, "wb") as f:
        f.write(np.array([D, Hd, L, H, Hkv, V, S], dtype=np.int32).tobytes())
        emb = rnd(V, D)
        emb[1] *= 1e-3
        f.write(emb.tobytes())
        f.write(np.ones((L, D), np.float32).tobytes())
        for shape in ((L, D, H * hs), (L, D, Hkv * hs), (L, D, Hkv * hs), (L, H * hs, D)):
            for layer in range(L):
                f.write(rnd(*shape[1:]).tobytes())
        f.write(np.ones((L, D), np.float32).tobytes())
        for shape in ((L, Hd, D), (L, D, Hd), (L, Hd, D)):
            for layer in range(L):
                f.write(rnd(*shape[1:]).tobytes())
        f.write(np.ones(D, np.float32).tobytes())
        f.write(np.zeros((2, S, hs // 2), np.float32).tobytes())


def write_llama2c_tokenizer(path: str, vocab: int) -> None:
    """llama2.c tokenizer.bin: int32 max_token_length, then per token float32 score, int32 length,
    bytes.  Dummy pieces ("<unk>", "<s>", "</s>", then " t3", " t4", ...)."""
    import struct

    pieces = [b"<unk>", b"<s>", b"</s>"] + [b" t%d" % i for i in range(3, vocab)]
    with open(path, "wb") as f:
        f.write(struct.pack("<i", max(len(p) for p in pieces)))
        for i, p in enumerate(pieces):
            f.write(struct.pack("<fi", -float(i), len(p)) + p)


def llama2c_decode(binary, model, tok, steps, threads):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    r = subprocess.run(
        [binary, model, "-z", tok, "-n", str(steps), "-t", "0", "-s", "1"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    m = re.search(r"achieved tok/s: ([\d.]+)", r.stderr)
    n = len(r.stdout.split())
    if not m or n < steps - 2:
        raise RuntimeError(f"llama2.c run stopped early ({n} tokens): {r.stderr[-500:]}")
    return float(m.group(1))


def run_stats(binary, model, ids, steps, threads):
    cmd = [
        binary,
        model,
        "--ids",
        " ".join(map(str, ids)),
        "-n",
        str(steps),
        "-t",
        "0",
        "--ignore-eos",
        "--print-ids",
        "--stats",
        "-T",
        str(threads),
    ]
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
    ap.add_argument("--llama2c", default=None, help="path to llama2.c's run.c: measure it in the same run")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
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
    cc_ver = subprocess.run([a.cc, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for ln in f:
            if ln.startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
    print(f"{cpu}, {os.cpu_count()} CPUs; {cc_ver}; -O3 -march=native -fopenmp")
    print(
        f"decode={a.decode} tokens, prompt={a.prompt} tokens, best of {a.repeat}; "
        f"load average at start {load} (other processes share the cores: rerun when quiet)"
    )
    threads = [int(x) for x in str(a.threads).split(",")]
    bw = {th: bandwidth(a.cc, wd, th) for th in threads}
    print(
        "streaming read bandwidth measured now: "
        + ", ".join(f"{th} thread(s) {bw[th]:.1f} GB/s" for th in threads)
        + " (the ceilings and targets assume ~32 GB/s on 2 threads); 'now-ceil' = that bandwidth / bytes per token"
    )
    print(
        f"{'model':16} {'thr':>3} {'MB/tok':>7} {'decode tok/s':>13} {'ceiling':>8} {'ratio':>6} "
        f"{'now-ceil':>8} {'ratio':>6} {'target':>7} {'prefill tok/s':>14}  wait-policy"
    )
    results = dict(
        cpu=cpu,
        cc=cc_ver,
        load_at_start=float(load),
        decode_tokens=a.decode,
        prompt_tokens=a.prompt,
        repeat=a.repeat,
        bandwidth_gbs={str(k): v for k, v in bw.items()},
        runs=[],
    )
    for dt in a.dtypes.split(","):
        model = os.path.join(wd, f"model_{dt}.bin")
        if not os.path.exists(model):
            export(ck, model, dt, verbose=False)
        mb = os.path.getsize(model) / 1e6
        for th in threads:
            dec = max(run_stats(binary, model, short, a.decode, th)[1] for _ in range(a.repeat))
            pre = max(run_stats(binary, model, prompt, 1, th)[0] for _ in range(a.repeat))
            now = bw[th] * 1e3 / mb
            print(
                f"{'llamathink-' + dt:16} {th:3d} {mb:7.1f} {dec:13.1f} {CEILING[dt]:8.0f} {dec / CEILING[dt]:6.2f} "
                f"{now:8.0f} {dec / now:6.2f} {TARGET[dt]:7.0f} {pre:14.1f}  {run_stats.policy}",
                flush=True,
            )
            results["runs"].append(
                dict(
                    model=f"llamathink-{dt}",
                    threads=th,
                    mb_per_token=mb,
                    decode_tok_s=dec,
                    prefill_tok_s=pre,
                    bandwidth_share=dec / now,
                    wait_policy=run_stats.policy,
                )
            )
    if a.llama2c:
        ck2 = os.path.join(wd, "llama2c_110M.bin")
        tok2 = os.path.join(wd, "llama2c_tokenizer.bin")
        if not os.path.exists(ck2):
            write_llama2c_checkpoint(ck2 + ".tmp", LLAMA2C_110M)
            os.replace(ck2 + ".tmp", ck2)
        if not os.path.exists(tok2):
            write_llama2c_tokenizer(tok2, LLAMA2C_110M["vocab_size"])
        mb = os.path.getsize(ck2) / 1e6
        for name, flags in (("llama2.c -O3", ["-O3"]), ("llama2.c-Ofast", ["-Ofast"])):
            exe = os.path.join(wd, "llama2c_" + flags[0].lstrip("-"))
            subprocess.run([a.cc, *flags, "-march=native", "-fopenmp", "-o", exe, a.llama2c, "-lm"], check=True)
            for th in threads:
                dec = max(llama2c_decode(exe, ck2, tok2, a.decode, th) for _ in range(a.repeat))
                now = bw[th] * 1e3 / mb
                print(
                    f"{name:16} {th:3d} {mb:7.1f} {dec:13.1f} {'':>8} {'':>6} {now:8.0f} {dec / now:6.2f} "
                    f"{'':>7} {'(none)':>14}",
                    flush=True,
                )
                results["runs"].append(
                    dict(
                        model=name + " 110M fp32",
                        threads=th,
                        mb_per_token=mb,
                        decode_tok_s=dec,
                        bandwidth_share=dec / now,
                    )
                )
    if a.json:
        import json

        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
