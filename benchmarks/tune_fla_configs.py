"""Record fla's autotune choices for this GPU, so that a cold machine's first training step compiles one kernel
configuration each instead of timing every candidate.

    python benchmarks/tune_fla_configs.py [--model-config configuration/models/llamathink-95m.json]
                                          [--batches 1,4,8,16,32,64] [--seq 1024] [--out PATH] [--keep-recorded]

Runs bf16 training steps (forward + backward) of the model at each batch size, a packed batch (documents of varied
length: fla's variable-length kernels) and a no-grad forward, with autotuning from scratch
(`LLAMATHINK_FLA_TUNED_CONFIGS=0`), then writes what fla's autotuners chose to `--out` (default: the package's file
for this GPU, `llamathink/fla_configs/<GPU name>.json`, merged over its entries for the same fla and Triton
versions). `load_fla_tuned_configs` (called when a model with fla layers is built) gives them back. Run it on a
machine whose Triton cache is empty (`TRITON_CACHE_DIR` pointing at a new folder) so that its timings are printed.

`--keep-recorded`: the autotuners first get the choices already recorded in `--out` (as a model build gives them),
so that only keys the file lacks are timed: what a change that adds kernel shapes (new channel counts, say) needs,
in seconds rather than the minutes of a full tune. The recorded choices are written back unchanged. Refused (before
anything runs) where `--out` is missing, damaged, or measured on another GPU or with other fla or Triton versions,
whose choices would not be taken.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-config", default=None, help="model config JSON (default: LlamaThinkConfig())")
    parser.add_argument("--batches", default="1,4,8,16,32,64")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--keep-recorded", action="store_true", help="keep --out's recorded choices; time only the keys it lacks"
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("tune_fla_configs.py needs a CUDA GPU")
    # before the model probes fla: tune from scratch (--keep-recorded names --out instead, below)
    os.environ["LLAMATHINK_FLA_TUNED_CONFIGS"] = "0"

    from llamathink import LlamaThinkConfig, LlamaThinkForCausalLM
    from llamathink.kernels_llamathink import _library_versions as library_versions
    from llamathink.kernels_llamathink import (
        earlier_tuned_configs,
        fla_autotune_choices,
        fla_conv_available,
        fla_tuned_configs_path,
        write_fla_tuned_configs,
    )

    if not fla_conv_available():
        raise SystemExit(
            "fla-core is not importable here: there are no fla kernels to tune (pip install llamathink[hopper])"
        )

    gpu = torch.cuda.get_device_name()
    out = Path(args.out) if args.out else fla_tuned_configs_path(gpu)
    try:  # before minutes of tuning, not after
        out.resolve().parent.mkdir(parents=True, exist_ok=True)
        probe = out.resolve().with_name(out.resolve().name + ".tmp")
        probe.write_text("")
        probe.unlink()
        if out.exists():
            earlier_tuned_configs(out)  # a file that is not a tuned-configs file is refused now
    except (OSError, ValueError) as err:
        raise SystemExit(f"cannot write {out}: {err}; name another file with --out") from None
    measured_with = f"benchmarks/tune_fla_configs.py --batches {args.batches} --seq {args.seq}"
    if args.keep_recorded:
        # only choices this process's loader will take can be kept: else every key would be timed again at these
        # batches alone, and the file replaced by them
        earlier, why = earlier_tuned_configs(out) if out.is_file() else (None, "no such file")
        if earlier is None:
            raise SystemExit(f"--keep-recorded: {out} holds no recorded choices to keep ({why}); tune without it")
        here = {"gpu": gpu, "versions": {k: library_versions()[k] for k in ("fla", "triton")}}  # what the loader checks
        if {"gpu": earlier["gpu"], "versions": {k: earlier["versions"].get(k) for k in ("fla", "triton")}} != here:
            raise SystemExit(
                f"--keep-recorded: {out} was measured for {earlier['gpu']} with {earlier['versions']}; this process "
                f"has {here['gpu']} with {here['versions']}: its choices would not be taken. Tune without "
                "--keep-recorded (all batch sizes) or name another file with --out"
            )
        os.environ["LLAMATHINK_FLA_TUNED_CONFIGS"] = str(out.resolve())
        measured_with = f"{earlier.get('measured_with', 'an earlier tune')}; then {measured_with} --keep-recorded"
    config = LlamaThinkConfig.from_json_file(args.model_config) if args.model_config else LlamaThinkConfig()
    config.gdn_backend = "fla"
    torch.manual_seed(0)
    model = LlamaThinkForCausalLM(config).cuda()
    vocab = config.vocab_size

    def step(ids, position_ids=None, grad=True):
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16), torch.set_grad_enabled(grad):
            result = model(input_ids=ids, labels=ids, position_ids=position_ids, use_cache=False, skip_logits=True)
            if grad:
                result.loss.backward()
        torch.cuda.synchronize()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for batch in [int(b) for b in args.batches.split(",") if b]:
        ids = torch.randint(3, vocab, (batch, args.seq), device="cuda")
        first, second = step(ids), step(ids)
        print(f"batch {batch:3d}: first step {first:6.1f} s, second {second * 1e3:7.1f} ms", flush=True)
    # packed documents of 64..700 tokens in one row of 4 x seq: position ids restart at each document
    generator = torch.Generator().manual_seed(0)
    lengths, total = [], 4 * args.seq
    while sum(lengths) < total:
        lengths.append(min(int(torch.randint(64, 701, (1,), generator=generator)), total - sum(lengths)))
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None].cuda()
    ids = torch.randint(3, vocab, (1, total), device="cuda")
    print(f"packed ({len(lengths)} documents): first step {step(ids, position_ids):6.1f} s", flush=True)
    print(
        f"no-grad forward, batch 16: {step(torch.randint(3, vocab, (16, args.seq), device='cuda'), grad=False):6.1f} s"
    )

    choices = fla_autotune_choices()
    try:
        doc = write_fla_tuned_configs(
            out,
            gpu,
            extra={"measured_with": measured_with},
        )
    except (RuntimeError, ValueError, OSError) as err:  # fla did not run, --out names another kind of file, disk full
        raise SystemExit(f"nothing written to {out}: {err}") from None
    print(f"{sum(len(v) for v in choices.values())} choices of {len(choices)} kernels this run; ", end="")
    print(f"{sum(len(v) for v in doc['kernels'].values())} in {out} (fla {doc['versions']['fla']}, ", end="")
    print(f"Triton {doc['versions']['triton']}, {gpu})")
    for name, entries in choices.items():
        print(f"  {len(entries):2d}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
