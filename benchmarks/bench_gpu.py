"""Training and generation throughput on one GPU, LlamaThink beside its Hugging Face peers.

    python benchmarks/bench_gpu.py [--batch 16] [--seq 1024] [--steps 10] [--compile] [--budget-s 240] [--out results.json]
                                   [--interleave ROUNDS]

Models at the 95M shape with tied embeddings: LlamaThink with a Gated DeltaNet backend (fla, torch), transformers'
LlamaForCausalLM (all full attention) and transformers' Qwen3.5 text model with the pattern linear, linear, full,
full (the closest HF peer). Every model trains with bf16 autocast and fused AdamW on random tokens; we report
tokens/s, MFU against `--peak-tflops` (6 x (non-embedding params + head) + attention terms per token,
`llamathink.modeling_llamathink.flops_per_token` for LlamaThink, the same 6N rule for the peers), peak memory and
the first step's seconds (with --compile: the compilation), then greedy `generate()` tokens/s at batch 1 and 32.

Each model runs in its own process with its own time limit (`--budget-s`), one after the other, so that one slow
compilation cannot take the others' time; a model listed twice measures a warm restart (the second process finds the
first one's compiler caches). `--interleave ROUNDS` instead builds the models in this one process and runs their
eager training in turns, `--steps` steps each per round, and gives each round's tokens/s ratio to the first model:
rows of separate processes can differ by more than the change measured (BENCHMARKS.md section 1, session 52).
Compiled LlamaThink is compiled by regions (`compile_layers`: runs of the mixer pattern, what `compile: true` trains
with); `llamathink:<backend>:whole` compiles the whole model as one graph instead; the peers are compiled whole
(`torch.compile(model)`). Variants of LlamaThink: `:no-hc` (hyper-connections off), `:packed` (documents of 64-700
tokens per row, position ids restarting: the document-masked training path), `:device-checks` (the forward checks
its token ids and labels itself, with host syncs every step, as outside the training loop, which checks them on the
host: `inputs_checked_by_caller`), `:eager-decode` (one-token steps without CUDA graphs), `:head128` (8 Gated
DeltaNet heads of 128 instead of 9 of 112: what fla's padding of 112 to 128-wide tiles costs), `:untuned-fla` (fla's
kernels autotuned in the process instead of taking the package's recorded choices,
`LLAMATHINK_FLA_TUNED_CONFIGS=0`), `:prebuild` (compiled: fla's kernels built by a child process while the first
step compiles, `start_fla_prebuild`, as the pretraining loop does), `:csa-chunk<N>` (the CSA window's local path in
query chunks of N, `local_chunk`: the same function, run in other kernels; the default is 128), `:group<N>`
(compiled: runs of N consecutive layers per compiled region, `compile_layers(layers_per_graph=N)`; `:group1`
compiles each layer alone; the default is one repetition of the mixer pattern), `:loss-rows<N>` (the chunked loss in
chunks of at most N rows, `chunked_causal_lm_loss(chunk_rows=N)`). On any model, `:cudagraphs` compiles with
`mode="reduce-overhead"` (the compiled kernels replayed as CUDA graphs: no per-kernel launch cost on the host) and
`:cold` runs the process with new, empty compiler caches (Triton's, inductor's, tilelang's), so that its first step
is what a fresh machine pays, however warm this one is. Compiled LlamaThink takes the inductor options training
takes (`llamathink.train.loop.compile_kwargs`): combo kernels, as the run setting `combo_kernels` does by default
(`:no-combo`: without them), and `TRAINING_INDUCTOR_OPTIONS`; a peer compiles with torch.compile's defaults, or with
`:combo` with training's options."""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # trace_gaps


def versions() -> dict:
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    try:
        import fla

        info["fla"] = getattr(fla, "__version__", "?")
    except ImportError:
        info["fla"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["driver"] = torch.version.cuda
    return info


LLAMATHINK_BACKENDS = ("auto", "flash_qla", "fla", "torch")
LLAMATHINK_VARIANTS = (
    "device-checks",
    "no-hc",
    "eager-decode",
    "whole",
    "packed",
    "head128",
    "cudagraphs",
    "cold",
    "untuned-fla",
    "prebuild",
    "no-combo",
)
PEERS = ("hf-llama", "hf-qwen3.5")
PEER_VARIANTS = ("cudagraphs", "cold", "combo")


def csa_chunk(part: str) -> int | None:
    """The query chunk of a `csa-chunk<N>` variant (N a positive number: the CSA window's local path in chunks of N
    queries, `LlamaThinkCompressedSparseAttention.local_chunk`), or None where `part` is not one."""
    match = re.fullmatch(r"csa-chunk([1-9][0-9]*)", part)
    return int(match.group(1)) if match else None


def loss_rows(part: str) -> int | None:
    """The most rows per chunk of the chunked loss of a `loss-rows<N>` variant (`chunked_causal_lm_loss(...,
    chunk_rows=N)`), or None where `part` is not one."""
    match = re.fullmatch(r"loss-rows([1-9][0-9]*)", part)
    return int(match.group(1)) if match else None


def layer_group(part: str) -> int | None:
    """The layers per compiled region of a `group<N>` variant (`compile_layers(layers_per_graph=N)`: N consecutive
    layers per region), or None where `part` is not one."""
    match = re.fullmatch(r"group([1-9][0-9]*)", part)
    return int(match.group(1)) if match else None


def check_model_name(name: str) -> None:
    """Raise SystemExit naming what is wrong with a `--models` entry: an unknown model, LlamaThink without a
    backend, or a variant the model does not have (a misspelt variant would otherwise be measured as the plain
    model)."""
    model, *parts = name.split(":")
    if model == "llamathink":
        if not parts or parts[0] not in LLAMATHINK_BACKENDS:
            raise SystemExit(f"{name!r}: llamathink needs a backend first ({', '.join(LLAMATHINK_BACKENDS)})")
        parts, known = parts[1:], LLAMATHINK_VARIANTS
    elif model in PEERS:
        known = PEER_VARIANTS
    else:
        raise SystemExit(f"{name!r}: unknown model (llamathink:<backend>, {', '.join(PEERS)})")
    if model == "llamathink":
        chunks = [part for part in parts if part.startswith("csa-chunk")]
        bad = [part for part in chunks if csa_chunk(part) is None]
        if bad:
            raise SystemExit(f"{name!r}: {bad[0]!r}: csa-chunk<N> needs a positive integer N without leading zeros")
        if len(chunks) > 1:
            raise SystemExit(f"{name!r}: more than one csa-chunk<N> ({', '.join(chunks)}); name one")
        groups = [part for part in parts if layer_group(part) is not None]
        if len(groups) > 1:
            raise SystemExit(f"{name!r}: more than one group<N> ({', '.join(groups)}); name one")
        if groups and "whole" in parts:
            raise SystemExit(f"{name!r}: {groups[0]!r} sets the layers per compiled region; 'whole' compiles one graph")
        rows = [part for part in parts if loss_rows(part) is not None]
        if len(rows) > 1:
            raise SystemExit(f"{name!r}: more than one loss-rows<N> ({', '.join(rows)}); name one")
        parts = [part for part in parts if part not in chunks + groups + rows]
        known = (*known, "csa-chunk<N>", "group<N>", "loss-rows<N>")
    unknown = [part for part in parts if part not in known]
    if unknown:
        raise SystemExit(f"{name!r}: unknown variant {unknown[0]!r} of {model} ({', '.join(known)})")


# variants that change only the compiled measurement: without --compile / --compiled-only they would measure the
# plain eager model under their name
COMPILED_VARIANTS = ("whole", "cudagraphs", "prebuild", "no-combo", "combo")


def _batch_list(text: str, option: str) -> list[int]:
    """A comma list of positive batch sizes (`--train-batches`, `--generate-batches`); SystemExit naming the
    option and the entry otherwise."""
    sizes = []
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        if not entry.isdigit() or int(entry) < 1:
            raise SystemExit(f"{option}: {entry!r} is not a positive batch size (a comma list such as 1,32)")
        sizes.append(int(entry))
    return sizes


def check_arguments(args) -> None:
    """Raise SystemExit naming the option where the command's numbers or variants cannot give a measurement, before
    any process starts: batch lists, counts and limits that must be positive, and compiled-only variants without a
    compiled measurement."""
    _batch_list(args.generate_batches, "--generate-batches")
    if args.train_batches is not None and not _batch_list(args.train_batches, "--train-batches"):
        raise SystemExit("--train-batches: no batch size given")
    for option, value in (
        ("--batch", args.batch),
        ("--seq", args.seq),
        ("--steps", args.steps),
        ("--warmup", args.warmup),
    ):
        if value < 1:
            raise SystemExit(f"{option} must be at least 1, got {value}")
    for option, value in (("--peak-tflops", args.peak_tflops), ("--budget-s", args.budget_s)):
        if not 0 < value < float("inf"):
            raise SystemExit(f"{option} must be a positive number, got {value}")
    if args.interleave < 0:
        raise SystemExit(f"--interleave must be a number of rounds (at least 1; 0: off), got {args.interleave}")
    if args.interleave:
        clashing = [
            option
            for option, on in (
                ("--compile", args.compile),
                ("--compiled-only", args.compiled_only),
                ("--train-batches", args.train_batches is not None),
                ("--trace", args.trace is not None),
                ("--no-train", args.no_train),
            )
            if on
        ]
        if clashing:
            raise SystemExit(f"--interleave measures eager training at --batch only: leave out {', '.join(clashing)}")
    if not (args.compile or args.compiled_only) or args.no_train:  # no compiled training measured
        for name in args.models.split(","):
            compiled_only = [p for p in name.split(":")[1:] if p in COMPILED_VARIANTS or layer_group(p) is not None]
            if compiled_only:
                raise SystemExit(
                    f"{name!r}: {compiled_only[0]!r} changes only the compiled training measurement: add --compile "
                    "or --compiled-only, without --no-train"
                )


def build(name: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    from llamathink import LlamaThinkConfig, LlamaThinkForCausalLM

    if name.startswith("llamathink"):
        # llamathink:<backend>[:no-hc][:eager-decode][:whole][:packed][:head128][:cudagraphs][:cold][:untuned-fla]
        # [:no-combo][:csa-chunk<N>]
        parts = name.split(":")
        head128 = {
            "linear_num_key_heads": 8,
            "linear_num_value_heads": 8,
            "linear_key_head_dim": 128,
            "linear_value_head_dim": 128,
        }
        model = LlamaThinkForCausalLM(
            LlamaThinkConfig(
                gdn_backend=parts[1],
                decode_cuda_graphs="eager-decode" not in parts,
                hyper_connections="no-hc" not in parts,
                **(head128 if "head128" in parts else {}),
            )
        )
        for chunk in filter(None, map(csa_chunk, parts)):
            for layer in model.model.layers:
                if layer.mixer_type == "csa":
                    layer.mixer.local_chunk = chunk
        for rows in filter(None, map(loss_rows, parts)):  # (this model's own process: `main` refuses --in-process)
            from llamathink import modeling_llamathink

            loss = modeling_llamathink.chunked_causal_lm_loss
            modeling_llamathink.chunked_causal_lm_loss = functools.partial(loss, chunk_rows=rows)
        return model
    name = name.split(":")[0]  # a peer's variants (`:cudagraphs`) only change how it is compiled
    if name == "hf-llama":
        cfg = LlamaConfig(
            vocab_size=32000,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=16,
            num_attention_heads=9,
            num_key_value_heads=3,
            head_dim=64,
            max_position_embeddings=1024,
            tie_word_embeddings=True,
            rope_theta=20000.0,
        )
        cfg._attn_implementation = "sdpa"
        return LlamaForCausalLM(cfg)
    if name == "hf-qwen3.5":
        from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5TextConfig
        from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5ForCausalLM

        cfg = Qwen3_5TextConfig(
            vocab_size=32000,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=16,
            layer_types=["linear_attention", "linear_attention", "full_attention", "full_attention"] * 4,
            num_attention_heads=9,
            num_key_value_heads=3,
            head_dim=64,
            linear_num_key_heads=9,
            linear_num_value_heads=9,
            linear_key_head_dim=112,
            linear_value_head_dim=112,
            max_position_embeddings=1024,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 20000.0, "partial_rotary_factor": 0.5},
        )
        cfg._attn_implementation = "sdpa"
        return Qwen3_5ForCausalLM(cfg)
    raise ValueError(name)


def flops_per_token(name: str, model, seq: int) -> float:
    if name.startswith("llamathink"):
        from llamathink.modeling_llamathink import flops_per_token as ours

        return ours(model.config, seq)
    cfg = model.config
    n = (
        sum(p.numel() for n_, p in model.named_parameters() if "embed_tokens" not in n_)
        + cfg.vocab_size * cfg.hidden_size
    )
    layer_types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    attn = 0.0
    for t in layer_types:
        if t == "full_attention":
            attn += 6.0 * cfg.num_attention_heads * cfg.head_dim * seq
        else:
            attn += 12.0 * cfg.linear_num_value_heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim
    return 6.0 * n + attn


def packed_positions(batch: int, seq: int, seed: int) -> torch.Tensor:
    """position_ids [batch, seq] of rows packed with documents of 64-700 tokens (restarting at 0 at each)."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        lengths, total = [], 0
        while total < seq:
            n = min(int(torch.randint(64, 700, (), generator=gen)), seq - total)
            lengths.append(n)
            total += n
        rows.append(torch.cat([torch.arange(n) for n in lengths]))
    return torch.stack(rows)


# dynamo's timers (torch._dynamo.utils.compilation_time_metrics, seconds summed over calls) that split a compiled
# first step; they nest: tracing and the forward's compile run inside compile_inner, the backward's compile runs
# lazily at the first backward, inductor's codegen and its wait for the Triton compile workers inside both
COMPILE_PHASES = {
    "dynamo_total": "_compile.compile_inner",  # dynamo + AOTAutograd + the forward graphs' inductor compile
    "dynamo_bytecode_tracing": "bytecode_tracing",
    "forward_compile": "compile_fx.<locals>.fw_compiler_base",
    "backward_compile": "compile_fx.<locals>.bw_compiler",
    "inductor_codegen": "GraphLowering.codegen",
    "triton_compile_wait": "async_compile.wait",
}


def compile_phases(first_step_s: float) -> dict:
    """Where a first step's seconds went, from dynamo's timers (`COMPILE_PHASES`): `outside_torch_compile` is the
    rest (running the step, and the kernels built on their first call: fla's Triton kernels, tilelang's)."""
    metrics = torch._dynamo.utils.compilation_time_metrics
    phases = {name: round(sum(metrics.get(key, [])), 2) for name, key in COMPILE_PHASES.items()}
    phases["outside_torch_compile"] = round(first_step_s - phases["dynamo_total"] - phases["backward_compile"], 2)
    return phases


def training_step(name: str, batch: int, seq: int, compile_model: bool = False) -> types.SimpleNamespace:
    """Model `name` built on the GPU with its fused AdamW, and its training step on one random batch [batch, seq] as
    bench_gpu times it (bf16 autocast; compiled as training compiles it with `compile_model`). Returns a namespace:
    `step()` (one forward, backward and optimizer step; returns the loss), `tracing` (a one-item list: True
    annotates the step's parts for `trace_steps`), `model`, `opt`, `step_model`, `n_params`, `fpt` (FLOPs per
    token) and `scope` (what was compiled: "layers", "model" or None)."""
    from llamathink.modeling_llamathink import inputs_checked_by_caller

    torch.manual_seed(0)
    model = build(name).cuda()
    n_params = sum(p.numel() for p in model.parameters())
    fpt = flops_per_token(name, model, seq)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    scope = None
    cudagraphs = ":cudagraphs" in name
    if compile_model:
        from llamathink.train.loop import compile_kwargs

        regional = name.startswith("llamathink") and ":whole" not in name
        scope = "layers" if regional else "model"
        # the run settings compile_mode and combo_kernels, as the training loop passes them to torch.compile:
        # LlamaThink with the setting's default (combo kernels; `:no-combo` without), peers as torch.compile
        # compiles them (`:combo`: training's options, combo kernels included)
        mode = "reduce-overhead" if cudagraphs else "default"
        if name.startswith("llamathink") or ":combo" in name:
            kwargs = compile_kwargs(mode, combo_kernels=":no-combo" not in name)
        else:
            kwargs = {"mode": mode}
        if regional:
            group = next(filter(None, map(layer_group, name.split(":"))), None)
            step_model = model.compile_layers(layers_per_graph=group, **kwargs)
        else:
            step_model = torch.compile(model, **kwargs)
    else:
        step_model = model
    if ":prebuild" in name and compile_model:  # fla's kernels built by a child process while the step compiles
        model.start_fla_prebuild(batch, seq, packed=":packed" in name)
    ids = torch.randint(0, 32000, (batch, seq), device="cuda")
    # packed rows: a new packing every step (as real data), from a few precomputed ones
    packings = [packed_positions(batch, seq, i).cuda() for i in range(4)] if ":packed" in name else None
    ours = {"skip_logits": True} if name.startswith("llamathink") else {}  # peers: transformers' own loss
    # LlamaThink as the training loop runs it: the batch's token ids checked on the host (here: made in range), the
    # forward's own check and its host syncs skipped; `:device-checks` keeps them (peers check nothing)
    trusted = name.startswith("llamathink") and ":device-checks" not in name
    checked = (lambda: inputs_checked_by_caller(model)) if trusted else contextlib.nullcontext
    torch.cuda.reset_peak_memory_stats()
    count = [0]

    tracing = [False]  # while the trace's steps run: their parts annotated (`trace_gaps.py` reads them)

    def part(label: str):
        return torch.profiler.record_function(label) if tracing[0] else contextlib.nullcontext()

    def step():
        extra = {"position_ids": packings[count[0] % len(packings)]} if packings else {}
        extra.update(ours)  # LlamaThink's chunked loss, as in training
        count[0] += 1
        with part("bench_step"):
            if cudagraphs and compile_model:
                torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs may be overwritten
            with part("forward"), checked(), torch.autocast("cuda", dtype=torch.bfloat16):
                loss = step_model(input_ids=ids, labels=ids, use_cache=False, **extra).loss
            with part("backward"):
                loss.backward()
            with part("optimizer"):
                opt.step()
                opt.zero_grad(set_to_none=True)
        return loss

    return types.SimpleNamespace(
        step=step, tracing=tracing, model=model, opt=opt, step_model=step_model, n_params=n_params, fpt=fpt, scope=scope
    )


def bench_train(name, batch, seq, steps, warmup, peak, compile_model=False, trace_dir=None) -> dict:
    """One training row: `training_step`'s first step (the compilation, where compiled), `warmup` - 1 more, then
    the mean time of `steps` steps -> tokens/s, MFU against `peak` FLOP/s, peak memory and the first step's
    seconds; with `trace_dir`, `trace_steps`' GPU idle time."""
    run = training_step(name, batch, seq, compile_model)
    step, tracing, n_params, fpt, scope = run.step, run.tracing, run.n_params, run.fpt, run.scope
    torch._dynamo.utils.compilation_time_metrics.clear()
    t_first = time.perf_counter()
    step()  # the first step also compiles
    torch.cuda.synchronize()
    first_step_s = time.perf_counter() - t_first
    first_step_phases = compile_phases(first_step_s)
    for _ in range(warmup - 1):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    tok_s = batch * seq / dt
    result = {
        "model": name,
        "params": n_params,
        "batch": batch,
        "seq": seq,
        "compiled": scope or False,
        "step_s": dt,
        "tokens_per_s": tok_s,
        "mfu": tok_s * fpt / peak,
        "flops_per_token": fpt,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
        "loss": float(loss.detach()),
        "first_step_s": first_step_s,
        "first_step_phases_s": first_step_phases,
    }
    if trace_dir is not None:
        result["gpu_idle"] = trace_steps(step, tracing, name, batch, trace_dir)
    del run, step
    gc.collect()
    torch.cuda.empty_cache()
    return result


def bench_interleaved(names: list[str], batch: int, seq: int, steps: int, warmup: int, rounds: int, peak: float):
    """Eager training rows of several models measured in turns in this one process: each model built and warmed up
    (its first step, then `warmup` - 1 more), then `rounds` rounds in which every model runs `steps` steps (the order
    reversed every other round). A machine's speed drifts between processes and over minutes (clocks, the host's
    load): in turns, each model's rounds see the same drift, so the ratio of two models' tokens/s within a round is
    steadier than that of rows measured in separate processes. Returns one row per model: `tokens_per_s` from the
    median round, `round_tokens_per_s` (each round's), MFU, the first step's seconds (not comparable between the
    models: a later model finds the kernels an earlier one built, and autotuned, in this process) and
    `peak_mem_gib` (the peak during its own warm-up above the memory held before it was built: the other models'
    weights and optimizer states stay resident and are not counted), then, for each model after the first, a row
    of its per-round tokens/s ratios to the first model's (`ratio_to`, `round_ratios`, their median)."""
    runs, rows = [], []
    for name in names:
        held = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run = training_step(name, batch, seq)
        t_first = time.perf_counter()
        run.step()
        torch.cuda.synchronize()
        first_step_s = time.perf_counter() - t_first
        for _ in range(warmup - 1):
            run.step()
        torch.cuda.synchronize()
        peak_mem = (torch.cuda.max_memory_allocated() - held) / 2**30
        runs.append((name, run, first_step_s, peak_mem))
    per_round = {name: [] for name in names}
    for r in range(rounds):
        for name, run, _, _ in runs if r % 2 == 0 else runs[::-1]:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(steps):
                loss = run.step()
            torch.cuda.synchronize()
            per_round[name].append(batch * seq * steps / (time.perf_counter() - t0))
            run.last_loss = float(loss.detach())
    for name, run, first_step_s, peak_mem in runs:
        tok_s = statistics.median(per_round[name])
        rows.append(
            {
                "model": name,
                "params": run.n_params,
                "batch": batch,
                "seq": seq,
                "compiled": False,
                "interleaved_rounds": rounds,
                "steps_per_round": steps,
                "step_s": batch * seq / tok_s,
                "tokens_per_s": tok_s,
                "round_tokens_per_s": per_round[name],
                "mfu": tok_s * run.fpt / peak,
                "flops_per_token": run.fpt,
                "peak_mem_gib": peak_mem,
                "loss": run.last_loss,
                "first_step_s": first_step_s,
            }
        )
    first = names[0]
    for name in names[1:]:
        ratios = [a / b for a, b in zip(per_round[name], per_round[first])]
        rows.append(
            {"model": name, "ratio_to": first, "round_ratios": ratios, "median_ratio": statistics.median(ratios)}
        )
    return rows


TRACE_STEPS = 3


def trace_steps(step, tracing: list, name: str, batch: int, trace_dir: str) -> dict:
    """Profile `TRACE_STEPS` more steps (torch.profiler, host and device, after one unrecorded step under it), write
    the Chrome trace to `trace_dir`/trace_<name>_b<batch>.json.gz and return where the steps left the GPU idle
    (`trace_gaps.analyse`: per step its busy and idle microseconds and the largest origins of its gaps and host
    waits)."""
    import trace_gaps

    path = Path(trace_dir) / f"trace_{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}_b{batch}.json.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    # one step under the profiler before the recorded ones: the first recorded step would pay the profiler's start
    schedule = torch.profiler.schedule(wait=0, warmup=1, active=TRACE_STEPS, repeat=1)
    tracing[0] = True
    try:
        with torch.profiler.profile(
            activities=activities, schedule=schedule, on_trace_ready=lambda p: p.export_chrome_trace(str(path))
        ) as prof:
            for i in range(1 + TRACE_STEPS):
                step()
                if i == TRACE_STEPS:  # the last step's kernels have run before the recording stops
                    torch.cuda.synchronize()
                prof.step()
    finally:
        tracing[0] = False
    gaps = trace_gaps.analyse(trace_gaps.load_trace(path), marker="bench_step")
    return {
        "trace": path.name,
        "busy_us_per_step": gaps["busy_us_per_step"],
        "idle_us_per_step": gaps["idle_us_per_step"],
        "gaps_by_origin": gaps["gaps_by_origin"][:12],
        "waits_by_origin": gaps["waits_by_origin"][:8],
    }


@torch.no_grad()
def bench_generate(name, batch, prompt_len=32, new_tokens=128) -> dict:
    torch.manual_seed(0)
    model = build(name).cuda().to(torch.bfloat16).eval()
    ids = torch.randint(3, 32000, (batch, prompt_len), device="cuda")
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    model.generate(ids, **{**kwargs, "max_new_tokens": 8, "min_new_tokens": 8})  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model.generate(ids, **kwargs)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    assert out.shape[1] == prompt_len + new_tokens
    result = {
        "model": name,
        "batch": batch,
        "new_tokens": new_tokens,
        "seconds": dt,
        "tokens_per_s_per_sequence": new_tokens / dt,
        "tokens_per_s_total": batch * new_tokens / dt,
    }
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return result


def run_one(name: str, args, peak: float) -> dict:
    """Every measurement of one model (this process): training rows, then generation rows."""
    results = {"train": [], "generate": []}
    train_batches = _batch_list(args.train_batches or str(args.batch), "--train-batches")
    for compiled in [True] if args.compiled_only else [False, True] if args.compile else [False]:
        for batch in [] if args.no_train else train_batches:
            try:
                r = bench_train(name, batch, args.seq, args.steps, args.warmup, peak, compiled, args.trace)
            except Exception as err:  # an out-of-memory batch must not hide the others
                r = {"model": name, "batch": batch, "compiled": compiled, "error": f"{type(err).__name__}: {err}"[:500]}
                gc.collect()
                torch.cuda.empty_cache()
            results["train"].append(r)
            print(json.dumps(r), flush=True)
    for b in [] if args.no_generate or ":packed" in name else _batch_list(args.generate_batches, "--generate-batches"):
        try:
            r = bench_generate(name, b)
        except Exception as err:
            r = {"model": name, "batch": b, "error": f"{type(err).__name__}: {err}"[:500]}
            torch.cuda.empty_cache()
        results["generate"].append(r)
        print(json.dumps(r), flush=True)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--models", default="llamathink:fla,llamathink:torch,hf-llama,hf-qwen3.5")
    parser.add_argument("--compile", action="store_true", help="also measure compiled training")
    parser.add_argument("--compiled-only", action="store_true", help="measure only compiled training")
    parser.add_argument("--generate-batches", default="1,32")
    parser.add_argument("--train-batches", default=None, help="comma list of batch sizes (default: --batch)")
    parser.add_argument("--no-train", action="store_true")
    parser.add_argument("--no-generate", action="store_true")
    parser.add_argument("--budget-s", type=float, default=300.0, help="time limit of each model's process")
    parser.add_argument("--in-process", action="store_true", help="measure every model in this process")
    parser.add_argument(
        "--interleave",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="eager training only: every model in this process, in ROUNDS rounds of --steps steps each, taking turns"
        " (`bench_interleaved`); rows give the median round and each model's ratio to the first",
    )
    parser.add_argument("--out", default=None, help="write results as JSON here")
    parser.add_argument(
        "--trace",
        default=None,
        metavar="DIR",
        help="after timing, profile a few more training steps: their trace to DIR, their GPU idle time to the row",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # the process measuring one model
    args = parser.parse_args(argv)
    names = args.models.split(",")
    for name in names:
        check_model_name(name)
    check_arguments(args)
    # variants that need a process of their own: their own environment, or the loss of the process patched (`build`)
    own_env = [
        n for n in names if {"cold", "untuned-fla"} & set(n.split(":")[1:]) or any(map(loss_rows, n.split(":")[1:]))
    ]
    if (args.in_process or args.interleave) and own_env:
        option = "--in-process" if args.in_process else "--interleave"
        raise SystemExit(f"{option} cannot give {', '.join(own_env)} a process of its own: leave it out")
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA GPU")
    results = {"versions": versions(), "train": [], "generate": []}
    print(json.dumps(results["versions"]), flush=True)
    peak = args.peak_tflops * 1e12
    if args.interleave:
        for row in bench_interleaved(names, args.batch, args.seq, args.steps, args.warmup, args.interleave, peak):
            results["train"].append(row)
            print(json.dumps(row), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2))
        return 0
    for index, name in enumerate(names):
        if args.child or args.in_process or (len(names) == 1 and name not in own_env):
            part = run_one(name, args, peak)
        else:  # its own process and time limit; a model listed twice finds the compiler caches warm
            part = _run_in_subprocess(name, index, argv if argv is not None else sys.argv[1:], args.budget_s)
        for key in ("train", "generate"):
            results[key] += part[key]
        if args.out:  # after every model, so a run cut short keeps what it measured
            Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


def subprocess_env(name: str, tmp: str) -> dict:
    """The environment of the process that measures model `name`: `:cold` gives it empty compiler caches (folders
    under `tmp`), `:untuned-fla` turns the package's recorded fla autotune choices off."""
    env = dict(os.environ)
    parts = name.split(":")[1:]
    if "cold" in parts:
        for var in ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "TILELANG_CACHE_DIR"):
            env[var] = os.path.join(tmp, "cold-cache", var.lower())
    if "untuned-fla" in parts:
        env["LLAMATHINK_FLA_TUNED_CONFIGS"] = "0"
    return env


def _run_in_subprocess(name: str, index: int, argv: list[str], budget_s: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "one.json"
        rest = [a for i, a in enumerate(argv) if not _is_option_of(argv, i, ("--models", "--out"))]
        cmd = [sys.executable, os.path.abspath(__file__), *rest, "--models", name, "--out", str(out), "--child"]
        try:
            subprocess.run(
                cmd, timeout=budget_s, check=False, stdout=sys.stdout, stderr=sys.stderr, env=subprocess_env(name, tmp)
            )
        except subprocess.TimeoutExpired:
            print(json.dumps({"model": name, "index": index, "error": f"time limit of {budget_s:.0f} s"}), flush=True)
        if out.exists():
            part = json.loads(out.read_text())
            return {"train": part.get("train", []), "generate": part.get("generate", [])}
    return {"train": [{"model": name, "error": f"no result within {budget_s:.0f} s"}], "generate": []}


def _is_option_of(argv: list[str], i: int, options: tuple[str, ...]) -> bool:
    """Whether argv[i] is one of `options` (as `--x v` or `--x=v`) or the value following one."""
    a = argv[i]
    if a in options or a.split("=", 1)[0] in options:
        return True
    return i > 0 and argv[i - 1] in options


if __name__ == "__main__":
    sys.exit(main())
