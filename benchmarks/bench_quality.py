"""Equal-token quality: how much each model learns from the same tokens, and in how many seconds (time to loss).

    python benchmarks/bench_quality.py --data runs/english200 --steps 800 --out runs/quality
    python benchmarks/bench_quality.py --data ... --run "lt:compile=1" --run "no-hc:hyper_connections=false" \
        --run "adamw:optimizer=adamw,adamw_lr=0.002" --run "llama:model=hf-llama,compile=1"
    python benchmarks/bench_quality.py --plot runs/quality/quality.json   # redraw the PNG from a JSON
    python benchmarks/bench_quality.py --plot a/quality.json b/quality.json --plot-runs "(lt|qwen)-s\\d" \\
        --plot-mean-seeds --plot-out seeds.png      # several JSONs in one plot, seeds averaged

Every run trains one freshly initialised model at the 95M shape with this project's optimizer routing
(`llamathink.train.optim.build_optimizer`: Muon for hidden matrices, AdamW for the rest, or AdamW alone) and schedule
(`llamathink.train.optim.lr_factor`: linear warmup, cosine to 0), bf16 autocast, gradient clipping, on the same batches in the
same order (`llamathink.data.TokenBatchLoader`, one seed), and is validated every `--eval-every` steps on the
same windows. Peers: HF Qwen3.5 (its text model, pattern linear, linear, full, full, fla when importable) and
HF Llama (all full attention), built as in `bench_gpu.py`.

Held-out data: the validation documents of a `python -m llamathink.data prepare --val-docs N` folder are split
in two at a document boundary: the first `--val-docs` documents are the validation set (curves, choices), the
rest the test set, read once at the end of each run for the figure that is reported.

A run is `NAME:key=value,key=value`. Keys: `model` (llamathink, hf-qwen3.5, hf-llama), `compile` (0/1),
`compile_mode` (`torch.compile`'s mode, or `auto` as training resolves it, `resolve_compile_mode`: CUDA graphs
for llamathink's compiled layers on a GPU without document masking; default `auto` for llamathink, as training
compiles it, `default` for the peers, as torch.compile compiles them, so compiled tokens/s compare each model as
its users get it: give a peer `compile_mode=reduce-overhead` for a like-for-like mode; each record's
`torch_compile_mode` names the mode used), `combo_kernels` (0/1: inductor's combo kernels, as the run setting;
default 1 for llamathink, as training compiles it, 0 for the peers, as torch.compile compiles them; llamathink and a
peer given 1 also take training's other inductor options, `compile_kwargs`),
`optimizer` (muon, adamw), `muon_lr`, `adamw_lr`, `weight_decay`, `seed`, `adamw_suffixes` (parameter-name
suffixes, `/`-separated, routed to AdamW instead of Muon: `classify_parameter`'s `extra_adamw_suffixes`); for
llamathink also any
`LlamaThinkConfig` field (`hyper_connections=false`, `rescale_prenorm_residual=true`, `A_init_range=[0.01,16]`,
`pattern=linear/linear/full/full`, repeated to the depth) and re-initialisations of the default init applied
after construction: `init.conv=uniform|STD` (depthwise conv: PyTorch's uniform(+-1/sqrt(k)) or N(0, STD)),
`init.embed=STD`, `init.compress=identity|STD` (CSA's compress_k/compress_v), `init.residual_out=STD` (every
projection that writes into the residual stream, `o_proj`/`out_proj`/`down_proj`: N(0, STD), 0 = zeros, as
modded-nanogpt starts its output projections; Muon's orthogonalised update moves a zero matrix from the first
step), `init.blend_bias=B` (the model's
`csa_blend_bias=B`: CSA's blend gate gets a learned bias starting at B, every other tensor as without it at the same
seed: B = -4 starts the layer at 2% compressed path), `init.shared_from_default=1` (every
tensor the default pattern also has starts as the default model's at the same seed: a paired pattern ablation);
`csa_blend=local` (CSA layers output their local window alone: no compressed path, no blend gate), `csa_blend=joint`
(one softmax over the local window's keys and the visible compressed blocks together, as DeepSeek-V4's compressed
attention shares one softmax with its sliding window, instead of two softmaxes mixed by the blend gate; training
forward only, a dense [T, T + T / stride] mask), `csa_blend=select` (the same softmax also over the raw tokens of
`csa_select` compressed blocks outside the window, default 16, chosen per kv head by compressed-attention
probability as in Native Sparse Attention), `csa_flex=0` (CSA layers keep their SDPA paths where CUDA-graph layers
would run them through FlexAttention: the same attention by other kernels, for a paired comparison of the two).
Values are read as JSON where they parse, otherwise as text.

Output: `quality.json` (settings, versions, per-run curves of validation loss against steps, tokens and
training seconds, final validation and test loss, tokens/s) and `quality.png` (validation loss against tokens
and against wall-clock training seconds, the first compiling step included).
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import math
import re
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_gpu import build as build_peer, versions  # noqa: E402

from llamathink import LlamaThinkConfig, LlamaThinkForCausalLM  # noqa: E402
from llamathink.modeling_llamathink import LlamaThinkCompressedSparseAttention, apply_rotary, uses_cuda_graphs
from llamathink.train.loop import compile_kwargs
from llamathink.train.pretrain import COMPILE_MODES, resolve_compile_mode
from llamathink.data import TokenBatchLoader, document_position_ids, find_shards, load_meta, open_shard  # noqa: E402

DEFAULT_RUNS = ("llamathink:compile=1", "hf-qwen3.5:model=hf-qwen3.5", "hf-llama:model=hf-llama,compile=1")
RUN_KEYS = {
    "model",
    "compile",
    "compile_mode",
    "combo_kernels",
    "optimizer",
    "muon_lr",
    "adamw_lr",
    "weight_decay",
    "seed",
    "document_masking",
    "adamw_suffixes",
    "csa_blend",
    "csa_select",
    "csa_flex",
}
CSA_BLENDS = ("learned", "local", "joint", "select")
INIT_KEYS = {
    "init.conv",
    "init.embed",
    "init.compress",
    "init.residual_out",
    "init.shared_from_default",
    "init.blend_bias",
}


# ----------------------------------------------------------------------------------------------------------------
# Run specifications
# ----------------------------------------------------------------------------------------------------------------


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_run(spec: str) -> dict:
    """`NAME:key=value,...` -> {"name", "model", "compile", "optimizer", ..., "config": {...}, "init": {...}}.

    Commas inside [...] belong to the value (`A_init_range=[0.01,16]`). Raises ValueError naming the bad part."""
    name, _, body = spec.partition(":")
    if not name:
        raise ValueError(f"run {spec!r} has no name (write NAME:key=value,...)")
    run = {"name": name, "model": "llamathink", "compile": False, "optimizer": "muon", "config": {}, "init": {}}
    parts, depth, current = [], 0, ""
    for ch in body:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    if current:
        parts.append(current)
    for part in parts:
        key, eq, raw = part.partition("=")
        if not eq:
            raise ValueError(f"run {name!r}: {part!r} is not key=value")
        value = _value(raw)
        if key in ("compile", "document_masking", "combo_kernels", "csa_flex"):
            run[key] = bool(value)
        elif key == "adamw_suffixes":
            run[key] = str(value).split("/")
            if not all(run[key]):
                raise ValueError(
                    f"run {name!r}: adamw_suffixes={raw!r} has an empty suffix (it would match every name)"
                )
        elif key in RUN_KEYS:
            run[key] = value
        elif key in INIT_KEYS:
            run["init"][key.split(".", 1)[1]] = value
        elif key == "pattern":
            run["config"]["mixer_pattern"] = str(value).split("/")
        else:
            run["config"][key] = value
    if run["model"] not in ("llamathink", "hf-qwen3.5", "hf-llama"):
        raise ValueError(f"run {name!r}: model must be llamathink, hf-qwen3.5 or hf-llama, got {run['model']!r}")
    if run.get("csa_blend", "learned") not in CSA_BLENDS:
        raise ValueError(f"run {name!r}: csa_blend must be one of {CSA_BLENDS}, got {run['csa_blend']!r}")
    if "csa_select" in run and (
        run.get("csa_blend") != "select"
        or isinstance(run["csa_select"], bool)
        or not isinstance(run["csa_select"], int)
        or run["csa_select"] < 1
    ):
        raise ValueError(f"run {name!r}: csa_select must be a positive integer with csa_blend=select")
    if "blend_bias" in run["init"] and "csa_blend_bias" in run["config"]:
        raise ValueError(f"run {name!r}: init.blend_bias and csa_blend_bias are one setting; give one")
    biased = run["init"].get("blend_bias") is not None or run["config"].get("csa_blend_bias") is not None
    if biased and run.get("csa_blend", "learned") != "learned":
        raise ValueError(f"run {name!r}: init.blend_bias (csa_blend_bias) needs the learned blend (csa_blend=learned)")
    if run["model"] != "llamathink" and (
        run["config"] or run["init"] or run.get("document_masking") or "csa_blend" in run or "csa_flex" in run
    ):
        raise ValueError(f"run {name!r}: config and init overrides apply to llamathink only")
    known = set(inspect.signature(LlamaThinkConfig.__init__).parameters) - {"self", "kwargs"}
    unknown = sorted(set(run["config"]) - known - {"mixer_pattern"})
    if unknown:
        raise ValueError(f"run {name!r}: {unknown} are not run keys, init choices or LlamaThinkConfig fields")
    if run["optimizer"] not in ("muon", "adamw"):
        raise ValueError(f"run {name!r}: optimizer must be muon or adamw, got {run['optimizer']!r}")
    run.setdefault("compile_mode", "auto" if run["model"] == "llamathink" else "default")
    if run["compile_mode"] not in COMPILE_MODES:
        raise ValueError(f"run {name!r}: compile_mode must be one of {COMPILE_MODES}, got {run['compile_mode']!r}")
    if run["compile_mode"] not in ("auto", "default") and not run["compile"]:
        raise ValueError(f"run {name!r}: compile_mode needs compile=1")
    run.setdefault("combo_kernels", run["model"] == "llamathink")
    return run


def build_model(run: dict, seed: int = 0) -> torch.nn.Module:
    """A fresh model for one run (seeded by the caller with `seed`, which `init.shared_from_default` uses again)."""
    if run["model"] != "llamathink":
        return build_peer(run["model"])
    overrides = dict(run["config"])
    if "blend_bias" in run["init"]:  # the name the session-10 runs used for the config field
        overrides["csa_blend_bias"] = run["init"]["blend_bias"]
    explicit_bias = overrides.get("csa_blend_bias") is not None
    if run.get("csa_blend", "learned") != "learned":  # these layers have no blend gate: no bias left untrained
        overrides["csa_blend_bias"] = None
    pattern = overrides.pop("mixer_pattern", None)
    if pattern is not None:
        layers = overrides.get("num_hidden_layers", LlamaThinkConfig().num_hidden_layers)
        if layers % len(pattern):
            raise ValueError(f"run {run['name']!r}: pattern {pattern} does not divide {layers} layers")
        overrides["mixer_types"] = pattern * (layers // len(pattern))
    try:
        config = LlamaThinkConfig(**overrides)
    except (TypeError, ValueError) as err:
        raise ValueError(f"run {run['name']!r}: {err}") from None
    model = LlamaThinkForCausalLM(config)
    if explicit_bias and "csa" not in config.mixer_types:
        raise ValueError(
            f"run {run['name']!r}: init.blend_bias (csa_blend_bias) needs CSA layers; the pattern has none"
        )
    choices = dict(run["init"])
    choices.pop("blend_bias", None)  # a config field (above)
    if choices.pop("shared_from_default", False):
        copy_shared_from_default(model, overrides, seed)
    reinit(model, choices)
    blend = run.get("csa_blend", "learned")
    for module in model.modules():
        if isinstance(module, LlamaThinkCompressedSparseAttention) and not run.get("csa_flex", True):
            module.flex_window = False
        if isinstance(module, LlamaThinkCompressedSparseAttention) and blend == "local":
            module._combine = types.MethodType(_combine_local_only, module)
        if isinstance(module, LlamaThinkCompressedSparseAttention) and blend in ("joint", "select"):
            select = int(run.get("csa_select", 16)) if blend == "select" else 0
            module.forward = types.MethodType(
                lambda self, hidden_states, ctx, n=select: _forward_one_softmax(self, hidden_states, ctx, n), module
            )
    return model


@torch.no_grad()
def copy_shared_from_default(model: torch.nn.Module, overrides: dict, seed: int) -> None:
    """Give `model` the weights that the default mixer pattern builds at model seed `seed` (with the run's other
    config overrides) for every tensor of the same name and shape. A pattern change otherwise changes the random
    draws of every later layer as well, so two patterns at one seed would differ by more than the pattern."""
    with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
        torch.manual_seed(seed)
        config = LlamaThinkConfig(**{k: v for k, v in overrides.items() if k != "mixer_types"})
        reference = LlamaThinkForCausalLM(config)
    mine = dict(model.named_parameters())
    for name, p in reference.named_parameters():
        if name in mine and mine[name].shape == p.shape:
            mine[name].copy_(p)


def _combine_local_only(self, local, comp, hidden_states, gate):
    """`LlamaThinkCompressedSparseAttention._combine` without the compressed path and the blend gate: the layer is
    then sliding-window attention (full causal attention with `csa_window` >= the sequence), in CSA's own code."""
    B, T, _ = hidden_states.shape
    local = local.transpose(1, 2).reshape(B, T, -1)  # [B, T, Hq*D]
    return self.o_proj(local * torch.sigmoid(gate))


def _forward_one_softmax(self, hidden_states, ctx, select: int = 0):
    """A CSA layer whose queries attend their local window and the completed compressed blocks in ONE softmax
    (keys [T raw positions | T / stride blocks], a dense mask), then the output gate and projection; `blend_proj`
    is unused. Blocks are pooled and compressed as in `_compressed_attention`.

    With `select` = n > 0, each query also attends the raw tokens of n compressed blocks outside its window, chosen
    per kv head as Native Sparse Attention chooses (Yuan et al. 2025, arXiv:2502.11089, section 3.3.2): the blocks
    with the largest compressed-attention probability summed over the kv head's query group. The choice is a top-k
    (no gradient of its own); the scores learn through the compressed blocks in the same softmax.

    Training forward only: one unpadded, unpacked batch without cache (NotImplementedError otherwise)."""
    if ctx.cache is not None or ctx.static is not None or ctx.segments is not None or ctx.valid is not None:
        raise NotImplementedError("csa_blend=joint|select is a training ablation: no cache, padding or packing")
    B, T, _ = hidden_states.shape
    q, k, k_raw, v, gate = self.project(hidden_states, ctx.cos, ctx.sin)
    S, W = self.stride, self.window
    Hkv, G, D = self.num_kv_heads, self.num_groups, self.head_dim
    N, E = T // S, Hkv * D
    kv = torch.cat((k_raw[:, :, : N * S], v[:, :, : N * S]), dim=1)  # [B, 2 Hkv, N S, D]
    mean = kv.view(B, 2 * Hkv, N, S, D).mean(3).transpose(1, 2).reshape(B, N, 2 * E)  # [B, N, 2E]: k heads | v heads
    blocks_k = self.compress_k(mean[..., :E]).view(B, N, Hkv, D).transpose(1, 2)  # [B, Hkv, N, D]
    blocks_v = self.compress_v(mean[..., E:]).view(B, N, Hkv, D).transpose(1, 2)
    centres = ctx.position_ids[:, : N * S : S] + S // 2  # [B, N]: each row's positions run on (no packing)
    cos, sin = ctx.rotary(centres, blocks_k.dtype)
    blocks_k = apply_rotary(blocks_k, cos, sin)
    t = torch.arange(T, device=q.device)[:, None]
    s = torch.arange(T, device=q.device)[None, :]
    j = torch.arange(N, device=q.device)[None, :]
    window = (s <= t) & (s > t - W)  # [T, T]: the query's own position and the W - 1 before it
    blocks = j < t // S  # [T, N]: block j visible iff S (j + 1) <= t
    keys, values = torch.cat((k, blocks_k), 2), torch.cat((v, blocks_v), 2)  # [B, Hkv, T + N, D]
    if select <= 0:
        mask = torch.cat((window, blocks), dim=1)[None, None]  # [1, 1, T, T + N]
        out = self._grouped_sdpa(q, keys, values, mask)  # [B, Hq, T, D]
    else:
        with torch.no_grad():
            grouped = q.view(B, Hkv, G, T, D)  # query head h = kv head h // G, member h % G
            logits = torch.einsum("bhgtd,bhnd->bhgtn", grouped, blocks_k) * self.scaling
            probs = torch.softmax(logits.masked_fill(~blocks, float("-inf")), -1).nan_to_num(0.0)  # no block: 0
            eligible = blocks & (j * S <= t - W)  # [T, N]: visible, and not wholly inside the window
            importance = probs.sum(2).masked_fill(~eligible, float("-inf"))  # [B, Hkv, T, N]
            top = importance.topk(min(select, N), dim=-1).indices
            chosen = torch.zeros_like(importance, dtype=torch.bool).scatter_(-1, top, True) & eligible
            tokens = F.pad(chosen.repeat_interleave(S, dim=-1), (0, T - N * S), value=False)  # [B, Hkv, T, T]
        mask = torch.cat((window | tokens, blocks.expand(B, Hkv, T, N)), dim=-1)  # [B, Hkv, T, T + N]
        mask = mask[:, :, None].expand(B, Hkv, G, T, T + N).reshape(B, Hkv, G * T, T + N)
        out = F.scaled_dot_product_attention(
            q.reshape(B, Hkv, G * T, D), keys, values, attn_mask=mask, scale=self.scaling
        ).view(B, self.num_heads, T, D)  # [B, Hkv, G T, D] -> [B, Hq, T, D]
    out = out.transpose(1, 2).reshape(B, T, -1)  # [B, T, Hq*D]
    return self.o_proj(out * torch.sigmoid(gate))


@torch.no_grad()
def reinit(model: torch.nn.Module, choices: dict) -> None:
    """Apply the `init.*` ablations of a run to a freshly built LlamaThink (see the module docstring)."""
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if "conv" in choices and leaf == "conv1d":
            if choices["conv"] == "uniform":  # PyTorch's own Conv1d init for a depthwise filter (fan-in = kernel)
                bound = 1.0 / math.sqrt(module.kernel_size[0])
                module.weight.uniform_(-bound, bound)
            else:
                module.weight.normal_(0.0, float(choices["conv"]))
        if "embed" in choices and leaf == "embed_tokens":
            module.weight.normal_(0.0, float(choices["embed"]))
        if "residual_out" in choices and getattr(module, "_is_residual_out", False):
            module.weight.normal_(0.0, float(choices["residual_out"]))  # std 0: zeros
        if "compress" in choices and leaf in ("compress_k", "compress_v"):
            if choices["compress"] == "identity":
                module.weight.copy_(torch.eye(*module.weight.shape))
            else:
                module.weight.normal_(0.0, float(choices["compress"]))
    unknown = set(choices) - {k.split(".", 1)[1] for k in INIT_KEYS}
    if unknown:
        raise ValueError(f"unknown init choices {sorted(unknown)}")


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


def heldout_windows(data_dir: str | Path, seq_len: int, val_docs: int) -> tuple[np.ndarray, np.ndarray]:
    """The validation shard's documents split at document `val_docs` (documents start at BOS): returns the
    [N_val, seq_len] and [N_test, seq_len] int64 windows of each part (consecutive windows, the tail dropped).

    Raises ValueError when the folder holds no more than `val_docs` held-out documents."""
    meta = load_meta(data_dir)
    tokens = np.concatenate([np.asarray(open_shard(p), dtype=np.int64) for p in find_shards(data_dir, "val")])
    starts = np.flatnonzero(tokens == meta["bos_token_id"])
    if len(starts) <= val_docs:
        raise ValueError(
            f"{data_dir} holds {len(starts)} held-out documents; the test set needs more than "
            f"--val-docs={val_docs} (prepare with a larger --val-docs)"
        )
    cut = int(starts[val_docs])

    def windows(part: np.ndarray) -> np.ndarray:
        n = len(part) // seq_len
        return part[: n * seq_len].reshape(n, seq_len)

    return windows(tokens[:cut]), windows(tokens[cut:])


# ----------------------------------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------------------------------


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def evaluate(model, windows: np.ndarray, batch: int, device: torch.device, bos_id: int | None = None) -> float:
    """Mean next-token loss over the windows (every window has seq_len - 1 targets, so this is the token mean).
    With `bos_id`, each document of a window is read alone (position ids restart at every BOS), as it was trained."""
    model.eval()
    total = torch.zeros((), device=device, dtype=torch.float64)
    for i in range(0, len(windows), batch):
        ids = torch.from_numpy(windows[i : i + batch]).to(device)
        extra = {"position_ids": document_position_ids(ids, bos_id)} if bos_id is not None else {}
        with _autocast(device):
            loss = model(input_ids=ids, labels=ids, use_cache=False, **extra).loss
        total += loss.double() * len(ids)
    model.train()
    return float(total) / len(windows)


def torch_compile_kwargs(run: dict, mode: str) -> dict:
    """torch.compile's keyword arguments for a compiled run in `mode` (resolved): LlamaThink with training's inductor
    options (`compile_kwargs`: combo kernels per the run's `combo_kernels`), a peer as torch.compile compiles it
    ({"mode": mode}) unless given `combo_kernels=1` (then training's options)."""
    if run["model"] == "llamathink" or run["combo_kernels"]:
        return compile_kwargs(mode, bool(run["combo_kernels"]))
    return {"mode": mode}


def train_run(run: dict, args, val: np.ndarray, test: np.ndarray, device: torch.device) -> dict:
    """Train one run for `args.steps` steps and return its record (curves, final losses, speed)."""
    from llamathink.train.config import RunConfig
    from llamathink.train.optim import build_optimizer, lr_factor

    seed = int(run.get("seed", args.seed))
    settings = RunConfig(
        optimizer=run["optimizer"],
        muon_lr=float(run.get("muon_lr", args.muon_lr)),
        adamw_lr=float(run.get("adamw_lr", args.adamw_lr)),
        weight_decay=float(run.get("weight_decay", args.weight_decay)),
        max_steps=args.steps,
        warmup_steps=args.warmup,
        grad_clip=args.grad_clip,
        micro_batch_size=args.batch,
        grad_accum=1,
    )
    torch.manual_seed(seed)
    if run["compile"]:
        torch._dynamo.reset()  # no guards or automatic-dynamic shapes left by the previous run
    model = build_model(run, seed).to(device)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = build_optimizer(model, settings, extra_adamw_suffixes=run.get("adamw_suffixes", ()))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, settings))
    step_model = model
    mode, _ = resolve_compile_mode(
        run["compile_mode"],
        device,
        num_processes=1,
        packed=bool(run.get("document_masking")),
        whole_model=not hasattr(model, "compile_layers"),
        mixed_precision="bf16" if device.type == "cuda" else "no",  # `_autocast`
    )
    how = torch_compile_kwargs(run, mode)
    cuda_graphs = run["compile"] and uses_cuda_graphs(how)
    if run["compile"]:  # LlamaThink as `compile: true` trains (`compile_layers`); the peers as one graph
        if hasattr(model, "compile_layers"):
            step_model = model.compile_layers(**how)
        else:
            step_model = torch.compile(model, **how)
    if cuda_graphs:  # as `run_training`: gradients accumulate into tensors kept for the run, never graph outputs
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
    loader = TokenBatchLoader(args.data, args.seq, args.batch, seed=args.data_seed)
    tokens_per_step = args.batch * args.seq
    record = {
        **run,
        "params": n_params,
        "seed": seed,
        "torch_compile_mode": mode if run["compile"] else None,  # what compile_mode "auto" resolved to
        "muon_lr": settings.muon_lr,
        "adamw_lr": settings.adamw_lr,
        "weight_decay": settings.weight_decay,
        "curve": [],
        "train_loss": [],
    }
    print(f"[{run['name']}] {run['model']} {n_params / 1e6:.1f}M params, {settings.optimizer}", flush=True)

    bos_id = load_meta(args.data)["bos_token_id"] if run.get("document_masking") else None

    def point(step: int, seconds: float):
        loss = evaluate(model, val, args.eval_batch, device, bos_id)
        record["curve"].append({"step": step, "tokens": step * tokens_per_step, "seconds": seconds, "val_loss": loss})
        print(
            f"[{run['name']}] step {step} tokens {step * tokens_per_step / 1e6:.1f}M train {seconds:.0f}s "
            f"val {loss:.4f}",
            flush=True,
        )

    train_s, warm_s, window_loss = 0.0, None, []  # training seconds exclude evaluation
    t0 = time.perf_counter()
    for step in range(args.steps):
        input_ids, labels = next(loader)
        extra = {"position_ids": document_position_ids(input_ids, bos_id)} if bos_id is not None else {}
        input_ids, labels = input_ids.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        extra = {k: v.to(device, non_blocking=True) for k, v in extra.items()}
        if run["model"] == "llamathink":
            extra["skip_logits"] = True  # the chunked loss, as in training (the peers: transformers' own loss)
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with _autocast(device):
            loss = step_model(input_ids=input_ids, labels=labels, use_cache=False, **extra).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=not cuda_graphs)
        window_loss.append(loss.detach().clone() if cuda_graphs else loss.detach())
        if step == 0 or step + 1 == args.speed_from:
            _sync(device)
            now = train_s + time.perf_counter() - t0
            if step == 0:
                record["first_step_s"] = now
            if step + 1 == args.speed_from:
                warm_s = now
        last = step + 1 == args.steps
        if (step + 1) % args.eval_every and not last:
            continue
        _sync(device)
        train_s += time.perf_counter() - t0
        if warm_s is not None and step + 1 > args.speed_from:
            record["tokens_per_s"] = (step + 1 - args.speed_from) * tokens_per_step / (train_s - warm_s)
        mean = float(torch.stack(window_loss).float().mean())
        record["train_loss"].append({"step": step + 1, "loss": mean})
        window_loss = []
        if not math.isfinite(mean):
            record["error"] = f"non-finite training loss before step {step + 1}"
            print(f"[{run['name']}] {record['error']}; stopping this run", flush=True)
            break
        point(step + 1, train_s)
        if args.time_limit and train_s > args.time_limit and not last:
            record["error"] = f"stopped at step {step + 1}: over --time-limit {args.time_limit} s"
            print(f"[{run['name']}] {record['error']}", flush=True)
            break
        t0 = time.perf_counter()
    record["train_seconds"] = train_s
    record["steps_done"] = record["curve"][-1]["step"] if record["curve"] else 0
    if record["curve"]:
        record["val_loss"] = record["curve"][-1]["val_loss"]
        record["test_loss"] = evaluate(model, test, args.eval_batch, device, bos_id)
        print(
            f"[{run['name']}] final val {record['val_loss']:.4f} test {record['test_loss']:.4f} "
            f"{record.get('tokens_per_s', float('nan')):,.0f} tok/s",
            flush=True,
        )
    if device.type == "cuda":
        record["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    del model, step_model, optimizer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return record


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_to_loss(record: dict, target: float) -> float | None:
    """Training seconds (first step included) at the first evaluation whose val loss is <= target, linearly
    interpolated between evaluations; None if never reached."""
    prev = None
    for p in record.get("curve", []):
        if p["val_loss"] <= target:
            if prev is None:
                return p["seconds"]
            frac = (prev["val_loss"] - target) / (prev["val_loss"] - p["val_loss"])
            return prev["seconds"] + frac * (p["seconds"] - prev["seconds"])
        prev = p
    return None


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


def merge_results(paths: list[str | Path]) -> dict:
    """The runs of several `quality.json` files as one results dict (settings and versions of the first), for one
    plot; each run records its `file` and `file_index` (1-based, in the order given). Raises ValueError naming the
    file that cannot be read as a results file, or whose steps, batch or sequence length differ from the first's
    (their curves would not share an axis)."""
    merged = None
    for index, path in enumerate(map(Path, paths), start=1):
        try:
            doc = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: cannot be read as a quality.json ({err})") from None
        if not (isinstance(doc, dict) and isinstance(doc.get("settings"), dict) and isinstance(doc.get("runs"), list)):
            raise ValueError(  # noqa: TRY004 (a bad file, reported as every other bad input here)
                f"{path}: not a quality.json (an object with 'settings' and a list of 'runs')"
            )
        if not all(isinstance(run, dict) and isinstance(run.get("name"), str) for run in doc["runs"]):
            raise ValueError(f"{path}: every run must be an object with a 'name'")
        if merged is None:
            first, merged = path, {**doc, "runs": []}
        for key in ("steps", "batch", "seq"):
            if doc["settings"].get(key) != merged["settings"].get(key):
                raise ValueError(
                    f"{path}: {key}={doc['settings'].get(key)} but {first} has {merged['settings'].get(key)}"
                )
        merged["runs"] += [{**run, "file": str(path), "file_index": index} for run in doc["runs"]]
    return merged


def select_runs(results: dict, pattern: str | None = None, labels: list[str] = ()) -> dict:
    """The runs whose name matches `pattern` (a regular expression, whole name; None: all), renamed by each
    `PATTERN=LABEL` of `labels` in turn (`re.sub` on the whole name: `\\1` refers to a group). Raises ValueError
    naming a pattern or label that is not valid, or a pattern that matches no run."""
    try:
        wanted = re.compile(pattern) if pattern is not None else None
    except re.error as err:
        raise ValueError(f"--plot-runs {pattern!r} is not a regular expression: {err}") from None
    runs = [dict(r) for r in results["runs"] if wanted is None or wanted.fullmatch(r["name"])]
    if not runs:
        raise ValueError(f"--plot-runs {pattern!r} matches no run")
    for rule in labels:
        old, eq, label = rule.partition("=")
        if not eq:
            raise ValueError(f"--plot-label {rule!r} is not PATTERN=LABEL")
        try:
            for run in runs:
                if re.fullmatch(old, run["name"]):
                    run["name"] = re.sub(f"^(?:{old})$", label, run["name"])
        except re.error as err:
            raise ValueError(f"--plot-label {rule!r}: {err}") from None
    return {**results, "runs": runs}


def mean_over_seeds(results: dict) -> dict:
    """Runs named `<label>-s<seed>` averaged into one run per label: the mean validation curve over the
    evaluation steps every seed has, and the means of what every seed reports of the final losses, tokens/s and
    seconds; `seeds` counts them. Raises ValueError naming a seed given twice (the same run in two files, say) or a
    run that did not train all `settings["steps"]` (stopped or failed), whose last loss is not comparable."""
    groups: dict[str, dict[str, dict]] = {}
    steps = results["settings"].get("steps")
    for run in results["runs"]:
        where = f"{run['name']!r} ({run.get('file', 'results')})"
        if run.get("error") or not run.get("curve") or (steps is not None and run.get("steps_done", steps) < steps):
            raise ValueError(f"{where} did not train {steps} steps: leave it out with --plot-runs")
        match = re.fullmatch(r"(.*)-(s\d+)", run["name"])
        label, seed = match.groups() if match else (run["name"], "")
        if seed in groups.setdefault(label, {}):
            raise ValueError(f"{where}: {label} {seed or 'without a seed'} is given twice")
        groups[label][seed] = run
    runs = []
    for label, by_seed in groups.items():
        members = list(by_seed.values())
        shared = set.intersection(*({p["step"] for p in r["curve"]} for r in members))
        curve = []
        for step in sorted(shared):
            points = [next(p for p in r["curve"] if p["step"] == step) for r in members]
            curve.append({k: float(np.mean([p[k] for p in points])) for k in ("step", "tokens", "seconds", "val_loss")})
        measured = ("val_loss", "test_loss", "tokens_per_s", "train_seconds", "first_step_s")
        finals = {k: float(np.mean([r[k] for r in members])) for k in measured if all(k in r for r in members)}
        n = len(members)
        name = f"{label} ({n} seed{'s' if n > 1 else ''})"
        runs.append({"name": name, "model": members[0].get("model"), "curve": curve, "seeds": n, **finals})
    return {**results, "runs": runs}


def plot(results: dict, path: str | Path) -> None:
    """Validation loss against tokens and against training seconds, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results["runs"]:
        curve = r.get("curve") or []
        if not curve:
            continue
        label = f"{r['name']} ({r['val_loss']:.3f})"
        axes[0].plot([p["tokens"] / 1e6 for p in curve], [p["val_loss"] for p in curve], label=label)
        axes[1].plot([p["seconds"] for p in curve], [p["val_loss"] for p in curve], label=label)
    axes[0].set_xlabel("training tokens (millions)")
    axes[1].set_xlabel("training seconds (compilation included)")
    for ax in axes:
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        lows = [p["val_loss"] for r in results["runs"] for p in (r.get("curve") or [])]
        if lows:
            ax.set_ylim(min(lows) - 0.05, min(lows) + 1.5)
    s = results["settings"]
    card = results["versions"].get("gpu", "CPU")
    fig.suptitle(f"{s['steps']} steps x {s['batch']} x {s['seq']} tokens, same batches; {card}", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(results: dict) -> str:
    runs = [r for r in results["runs"] if r.get("curve")]
    lines = [f"{'run':<28} {'val':>7} {'test':>7} {'tok/s':>9} {'train s':>8} {'first s':>8}"]
    for r in runs:
        lines.append(
            f"{r['name']:<28} {r['val_loss']:7.4f} {r['test_loss']:7.4f} {r.get('tokens_per_s', 0):9,.0f} "
            f"{r.get('train_seconds', 0):8.0f} {r.get('first_step_s', 0):8.1f}"
        )
    llama = next((r for r in runs if r["model"] == "hf-llama"), None)
    if llama:
        target = llama["val_loss"]
        lines.append(f"time to HF Llama's final val loss {target:.4f}:")
        for r in runs:
            t = time_to_loss(r, target)
            lines.append(f"  {r['name']:<26} {'not reached' if t is None else f'{t:.0f} s'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="a `llamathink.data prepare` folder with more than --val-docs held out")
    parser.add_argument(
        "--run",
        action="append",
        default=None,
        help="NAME:key=value,... (repeat; default: LlamaThink compiled, HF Qwen3.5 eager, HF Llama compiled)",
    )
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--muon-lr", type=float, default=0.02)
    parser.add_argument("--adamw-lr", type=float, default=0.002)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="model init seed")
    parser.add_argument("--data-seed", type=int, default=0, help="batch order seed (the same for every run)")
    parser.add_argument("--val-docs", type=int, default=100, help="held-out documents in the validation set")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--eval-batch", type=int, default=16)
    parser.add_argument("--eval-windows", type=int, default=None, help="use at most this many windows of each set")
    parser.add_argument("--speed-from", type=int, default=20, help="tokens/s counts the steps after this one")
    parser.add_argument("--time-limit", type=float, default=None, help="stop a run after this many training s")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="runs/quality", help="folder for quality.json and quality.png")
    parser.add_argument(
        "--plot",
        metavar="JSON",
        nargs="+",
        help="only draw the PNG (and print the summary) of one JSON, or of several merged (--plot-out names the PNG)",
    )
    parser.add_argument("--plot-out", help="the PNG of --plot (default: the first JSON's name with .png)")
    parser.add_argument("--plot-runs", help="plot only the runs whose whole name matches this regular expression")
    parser.add_argument(
        "--plot-label",
        action="append",
        default=[],
        metavar="PATTERN=LABEL",
        help="rename the plotted runs whose name matches PATTERN (a regular expression) to LABEL (re.sub: \\1 works)",
    )
    parser.add_argument(
        "--plot-mean-seeds", action="store_true", help="one line per run name without its -s<seed> suffix: the mean"
    )
    args = parser.parse_args(argv)
    if args.plot:
        try:
            results = select_runs(merge_results(args.plot), args.plot_runs, args.plot_label)
            if args.plot_mean_seeds:
                results = mean_over_seeds(results)
        except ValueError as err:
            parser.error(str(err))
        names = [r["name"] for r in results["runs"]]
        for run in results["runs"]:  # one name from two files: say which file each line is from
            if names.count(run["name"]) > 1:
                run["name"] += f" [file {run['file_index']}]"
        plot(results, args.plot_out or Path(args.plot[0]).with_suffix(".png"))
        print(summary(results))
        return 0
    if not args.data:
        parser.error("--data is required")
    try:
        runs = [parse_run(s) for s in (args.run or DEFAULT_RUNS)]
    except ValueError as err:
        parser.error(str(err))
    device = torch.device(args.device)
    val, test = (w[: args.eval_windows] for w in heldout_windows(args.data, args.seq, args.val_docs))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("run", "plot")}
    results = {
        "settings": {**settings, "val_windows": len(val), "test_windows": len(test)},
        "versions": versions() if device.type == "cuda" else {"torch": torch.__version__},
        "runs": [],
    }
    print(json.dumps(results["versions"]), f"val {len(val)} windows, test {len(test)} windows", flush=True)
    for run in runs:
        try:
            record = train_run(run, args, val, test, device)
        except Exception as err:  # one failing run (out of memory, a missing kernel) must not hide the others
            record = {**run, "error": f"{type(err).__name__}: {err}"[:800]}
            print(f"[{run['name']}] failed: {record['error']}", flush=True)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        results["runs"].append(record)
        (out / "quality.json").write_text(json.dumps(results, indent=1))  # after every run: a cut call keeps it
    print(summary(results))
    try:
        plot(results, out / "quality.png")
    except ImportError:
        print("matplotlib is not installed: no PNG (redraw elsewhere with --plot)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
