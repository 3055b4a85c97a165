"""Pretrain LlamaThink with Hugging Face accelerate and our Muon optimizer.

    accelerate launch [--config_file accelerate_configs/...] train_hf.py --config configuration/train/<preset>.yaml \
        [--key value ...]

Read top to bottom: the run settings (`TrainConfig`, a YAML file plus `--key value` overrides; what it shares with
finetune_chat.py's `FinetuneConfig` is in `RunConfig`), the model and optimizer, the learning-rate schedule,
evaluation and samples, checkpoints (atomic, the last K kept, exact resume: model, optimizer, scheduler, RNG and
data position), then the training loop itself (`train`), which tests call.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llamathink import LlamaThinkConfig, LlamaThinkForCausalLM
from llamathink.data import TokenBatchLoader, check_vocab, find_shards, load_meta, val_batches
from llamathink.muon import Muon, muon_param_groups, summarize_param_groups

# ----------------------------------------------------------------------------------------------------------------
# Run settings
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    """The settings pretraining (`TrainConfig`) and chat finetuning (finetune_chat.py's `FinetuneConfig`) share:
    batch, optimizer, schedule, numerics, evaluation and logging, checkpoints, the Hub. The defaults are the
    pretraining ones; `FinetuneConfig` redeclares the fields whose defaults differ."""

    # batch: micro_batch_size x grad_accum x number of processes sequences (finetuning: conversations) per step
    micro_batch_size: int = 64
    grad_accum: int = 8
    max_steps: int = 10_000
    # optimizer: "muon" (Muon for hidden matrices + AdamW for the rest) or "adamw" (AdamW for everything)
    optimizer: str = "muon"
    muon_lr: float = 0.02
    adamw_lr: float = 0.002
    adamw_betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.01
    muon_adjust_lr: str = "original"
    grad_clip: float = 1.0
    warmup_steps: int = 500
    min_lr_ratio: float = 0.0  # cosine decays to this fraction of the peak
    # numerics
    mixed_precision: str = "bf16"  # "no", "bf16" or "fp16" (passed to accelerate)
    seed: int = 1337
    nonfinite: str = "stop"  # "stop" or "skip" when the loss is NaN/inf
    max_consecutive_skips: int = 10
    # evaluation, samples, logging
    eval_every: int = 250
    sample_every: int = 1000
    sample_prompts: list[str] = field(default_factory=lambda: ["The history of", "Once upon a time"])
    sample_tokens: int = 48
    log_every: int = 10
    wandb_project: str | None = "llamathink"
    wandb_run_name: str | None = None
    wandb_mode: str = "offline"  # "online", "offline" or "disabled"
    progress_bar: bool = True
    # checkpoints and output
    out_dir: str = "runs/llamathink-95m"
    save_every: int = 1000
    keep_last: int = 3
    resume: str = "auto"  # "auto" (latest checkpoint in out_dir, if any), "none", or a checkpoint path
    stop_at_step: int | None = None  # stop (with a checkpoint) at this step, as if interrupted; the schedule
    #                                  still runs to max_steps. For time-boxed jobs and resume tests.
    push_to_hub: bool = False
    hub_model_id: str | None = None

    def __post_init__(self):
        self.check_positive("micro_batch_size", "grad_accum", "max_steps", "eval_every", "log_every", "save_every",
                            "keep_last", "sample_every", "sample_tokens", "max_consecutive_skips")  # fmt: skip
        self.check_positive("stop_at_step", or_null=True)
        if self.optimizer not in ("muon", "adamw"):
            raise ValueError(f"optimizer must be 'muon' or 'adamw', got {self.optimizer!r}")
        if self.nonfinite not in ("stop", "skip"):
            raise ValueError(f"nonfinite must be 'stop' or 'skip', got {self.nonfinite!r}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}")
        if self.wandb_mode not in ("online", "offline", "disabled"):
            raise ValueError(f"wandb_mode must be 'online', 'offline' or 'disabled', got {self.wandb_mode!r}")
        if not 0 <= self.warmup_steps <= self.max_steps:
            raise ValueError(f"warmup_steps must be in [0, max_steps={self.max_steps}], got {self.warmup_steps}")
        self.adamw_betas = tuple(self.adamw_betas)
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("push_to_hub needs hub_model_id")

    def check_positive(self, *names: str, or_null: bool = False):
        """Each named setting must be > 0 (or, with or_null, None: no limit)."""
        for name in names:
            value = getattr(self, name)
            if or_null and value is None:
                continue
            if value <= 0:
                raise ValueError(f"{name} must be positive{' or null' if or_null else ''}, got {value!r}")


@dataclass
class TrainConfig(RunConfig):
    """Pretraining: the model and the token data, plus the shared settings of `RunConfig`."""

    # model: a config.json (as save_pretrained writes it) for a fresh model, or a save_pretrained directory / Hub id
    model_config: str | None = "configuration/models/llamathink-95m.json"
    init_from: str | None = None
    tokenizer: str | None = None  # defaults to the tokenizer recorded in the data's meta.json
    # data: the output directory of `python -m llamathink.data prepare`
    data_dir: str = "data/fineweb"
    seq_len: int = 1024
    # pretraining only: torch.compile, the size of an evaluation, the peak for MFU
    compile: bool = False
    eval_batches: int = 20
    peak_tflops: float | None = 989.0  # per device, for MFU (H100 SXM dense bf16); null to skip MFU

    def __post_init__(self):
        super().__post_init__()
        self.check_positive("seq_len", "eval_batches")
        if (self.model_config is None) == (self.init_from is None):
            raise ValueError("set exactly one of model_config (a fresh model) and init_from (a pretrained one)")


def parse_setting(raw: str, annotation, name: str):
    """Parse a `--name value` override by the dataclass field's type (YAML syntax for lists, null, booleans)."""
    import typing

    import yaml

    value = yaml.safe_load(raw)
    args = typing.get_args(annotation)
    if value is None and (annotation is type(None) or type(None) in args):
        return None
    base = next((a for a in args if a is not type(None)), annotation) if args and type(None) in args else annotation
    origin = typing.get_origin(base) or base
    if origin is bool:
        if not isinstance(value, bool):
            raise ValueError(f"--{name} expects true or false, got {raw!r}")
        return value
    if origin is str:
        return str(raw)
    if origin in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (origin is int and value != int(value)):
            raise ValueError(f"--{name} expects {origin.__name__}, got {raw!r}")
        return origin(value)
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ValueError(f"--{name} expects a list such as [a, b], got {raw!r}")
        return origin(value)
    return value


def load_config(path: str | None = None, overrides: list[str] | None = None, cls: type = None):
    """A `TrainConfig` (or another settings dataclass `cls`, e.g. finetune_chat's) from a YAML file (`path`) and
    `--key value` / `--key=value` overrides. Unknown keys are an error naming the key and the file."""
    import yaml

    cls = cls or TrainConfig
    known = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text()
        loaded = yaml.safe_load(text) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of settings, got {type(loaded).__name__}")
        for key, value in loaded.items():
            if key not in known:
                raise ValueError(f"{path}: unknown setting {key!r}; known settings: {', '.join(sorted(known))}")
            values[key] = value
    overrides = list(overrides or [])
    hints = typing.get_type_hints(cls)
    i = 0
    while i < len(overrides):
        arg = overrides[i]
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}; overrides look like --key value or --key=value")
        key, eq, raw = arg[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            if i + 1 >= len(overrides):
                raise ValueError(f"--{key} needs a value")
            raw, i = overrides[i + 1], i + 1
        if key not in known:
            raise ValueError(f"unknown setting --{key}; known settings: {', '.join(sorted(known))}")
        values[key] = parse_setting(raw, hints[key], key)
        i += 1
    return cls(**values)


# ----------------------------------------------------------------------------------------------------------------
# Model, optimizer, schedule
# ----------------------------------------------------------------------------------------------------------------


def build_model(cfg: TrainConfig) -> LlamaThinkForCausalLM:
    if cfg.init_from is not None:
        return LlamaThinkForCausalLM.from_pretrained(cfg.init_from, dtype=torch.float32)
    path = Path(cfg.model_config)
    if not path.exists():
        raise FileNotFoundError(f"model_config {path} does not exist")
    config = LlamaThinkConfig.from_json_file(str(path)) if path.is_file() else LlamaThinkConfig.from_pretrained(path)
    if cfg.seq_len > config.max_position_embeddings:
        raise ValueError(f"seq_len={cfg.seq_len} exceeds the model's max_position_embeddings="
                         f"{config.max_position_embeddings}")  # fmt: skip
    torch.manual_seed(cfg.seed)
    return LlamaThinkForCausalLM(config)


def build_optimizer(model: torch.nn.Module, cfg: RunConfig) -> Muon:
    """One optimizer object either way, so checkpoints and schedules treat both recipes alike."""
    if cfg.optimizer == "muon":
        groups = muon_param_groups(model, cfg.muon_lr, cfg.adamw_lr, cfg.weight_decay, log=False)
    else:  # the AdamW baseline: the same routing of decay / no-decay, no Muon group
        groups = muon_param_groups(model, cfg.adamw_lr, cfg.adamw_lr, cfg.weight_decay, log=False)
        for group in groups:
            group["use_muon"] = False
    return Muon(groups, lr=cfg.muon_lr, adjust_lr_fn=cfg.muon_adjust_lr, weight_decay=cfg.weight_decay,
                adamw_lr=cfg.adamw_lr, adamw_betas=cfg.adamw_betas)  # fmt: skip


def lr_factor(step: int, cfg: RunConfig) -> float:
    """Linear warmup over `warmup_steps`, then cosine from 1 to `min_lr_ratio` at `max_steps`."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def flops_per_token(config: LlamaThinkConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), the count used for MFU:

    6 x (non-embedding parameters + the output head), plus the sequence-mixing terms, per layer and token:
    full attention 6 * Hq * D * T (QK^T and AV, causal: T/2 keys on average, x2 matmuls, x2 FLOPs/MAC, x3);
    CSA 12 * Hq * D * (min(W, T) + T / (2 * stride)); Gated DeltaNet 12 * Hv * Dk * Dv (state read and write).
    """
    n_params = sum(_param_counts(config).values())  # the embedding lookup costs no FLOPs, the head does
    flops = 6.0 * n_params
    D, Hq = config.head_dim, config.num_attention_heads
    for mixer in config.mixer_types:
        if mixer == "full":
            flops += 6.0 * Hq * D * seq_len
        elif mixer == "csa":
            flops += 12.0 * Hq * D * (min(config.csa_window, seq_len) + seq_len / (2 * config.csa_stride))
        else:
            flops += 12.0 * config.linear_num_value_heads * config.linear_key_head_dim * config.linear_value_head_dim
    return flops


def _param_counts(config: LlamaThinkConfig) -> dict[str, int]:
    with torch.device("meta"):
        model = LlamaThinkForCausalLM(config)
    counts = {"body": sum(p.numel() for n, p in model.named_parameters() if not n.endswith(("embed_tokens.weight", "lm_head.weight")))}
    counts["head"] = config.vocab_size * config.hidden_size
    return counts


# ----------------------------------------------------------------------------------------------------------------
# Evaluation and samples
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, cfg: TrainConfig, accelerator) -> float:
    """Mean loss over the first `eval_batches` validation batches of every rank (the same every call)."""
    model.eval()
    total, count = torch.zeros((), device=accelerator.device), torch.zeros((), device=accelerator.device)
    batches = val_batches(cfg.data_dir, cfg.seq_len, cfg.micro_batch_size, rank=accelerator.process_index,
                          world_size=accelerator.num_processes, max_batches=cfg.eval_batches)  # fmt: skip
    for input_ids, labels in batches:
        with accelerator.autocast():
            loss = model(input_ids=input_ids.to(accelerator.device), labels=labels.to(accelerator.device),
                         use_cache=False).loss  # eval mode would otherwise build a decode cache
        total += loss.float() * input_ids.shape[0]
        count += input_ids.shape[0]
    total, count = accelerator.reduce(total, "sum"), accelerator.reduce(count, "sum")
    model.train()
    return float(total / count) if count > 0 else float("nan")


@torch.no_grad()
def generate_samples(model, tokenizer, cfg: TrainConfig, device) -> list[str]:
    """Greedy continuations of the sample prompts (greedy: comparable from one evaluation to the next)."""
    if tokenizer is None or not cfg.sample_prompts:
        return []
    model.eval()
    texts = []
    for prompt in cfg.sample_prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
        out = model.generate(ids, max_new_tokens=cfg.sample_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
        texts.append(tokenizer.decode(out[0], skip_special_tokens=True))
    model.train()
    return texts


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: step_XXXXXXXX/ directories written to a temporary name and renamed when complete
# ----------------------------------------------------------------------------------------------------------------

CHECKPOINT_PREFIX = "step_"


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first. Temporary directories of interrupted writes are ignored."""
    root = checkpoint_dir(out_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / "state.pt").exists()]  # fmt: skip
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out_dir, step: int, model, optimizer, scheduler, loader, extra: dict, keep_last: int) -> Path:
    """Write `checkpoints/step_<step>/state.pt` atomically (temporary directory + rename), then drop old ones.

    A process killed at any moment leaves either the previous set of checkpoints or the previous set plus the
    new one; never a half-written checkpoint under a final name.
    """
    root = checkpoint_dir(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{CHECKPOINT_PREFIX}{step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    state = {
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "loader": loader.state_dict(),
        "rng": _rng_state(),
        **extra,
    }
    with open(tmp / "state.pt", "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    if os.environ.get("LLAMATHINK_TEST_SLOW_CHECKPOINT"):  # lets a test kill the process in the middle of a save
        time.sleep(float(os.environ["LLAMATHINK_TEST_SLOW_CHECKPOINT"]))
    if final.exists():  # re-saving the same step after a resume: replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    dir_fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    for old in list_checkpoints(out_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> dict:
    try:
        # our own file: optimizer/RNG state holds numpy arrays and tuples, which weights_only refuses
        return torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    except Exception as err:  # a corrupt file must say which one
        raise RuntimeError(f"cannot load checkpoint {path / 'state.pt'}: {err}") from err


def restore_checkpoint(path: Path, model, optimizer, scheduler, loader) -> dict:
    """Load the checkpoint at `path` into the model, optimizer, scheduler and data loader and restore the RNG state
    (an exact resume); returns the checkpoint's contents for the rest (step, history, wandb_run_id, ...)."""
    state = load_checkpoint(path)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    loader.load_state_dict(state["loader"])
    _set_rng_state(state["rng"])
    return state


def resolve_resume(cfg: RunConfig) -> Path | None:
    if cfg.resume == "none":
        return None
    if cfg.resume == "auto":
        found = list_checkpoints(cfg.out_dir)
        return found[-1] if found else None
    path = Path(cfg.resume)
    if not (path / "state.pt").exists():
        raise FileNotFoundError(f"resume={cfg.resume}: no checkpoint (state.pt) there")
    return path


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


def write_history(out_dir: Path, history: dict):
    """`history.json`: per-step training loss, evaluation loss and performance metrics (for plots and reports)."""
    tmp = Path(out_dir) / "history.json.tmp"
    tmp.write_text(json.dumps(history, indent=1, default=float))
    os.replace(tmp, Path(out_dir) / "history.json")


class NonFiniteLoss(RuntimeError):
    pass


def skip_nonfinite_step(cfg: RunConfig, step: int, loss_value: float, grad_norm, skips: int, optimizer,
                        accelerator) -> int:  # fmt: skip
    """A non-finite loss or gradient at `step`: drop the gradients, then stop (NonFiniteLoss) with nonfinite: stop
    or after max_consecutive_skips such steps in a row; else say so and return the new count of skips in a row."""
    optimizer.zero_grad(set_to_none=True)
    message = f"non-finite loss or gradient at step {step} (loss {loss_value}, grad norm {float(grad_norm)})"
    if cfg.nonfinite == "stop":
        raise NonFiniteLoss(message + "; stopping (set nonfinite: skip to skip such steps). The last "
                            f"checkpoint in {checkpoint_dir(cfg.out_dir)} is intact.")  # fmt: skip
    skips += 1
    accelerator.print(message + f"; step skipped ({skips} in a row)")
    if skips >= cfg.max_consecutive_skips:
        raise NonFiniteLoss(f"{skips} consecutive non-finite steps; stopping")
    return skips


def save_final(model, tokenizer, final_dir: Path, cfg: RunConfig):
    """The finished model (and its tokenizer, if any) as a save_pretrained directory; pushed with push_to_hub."""
    model.save_pretrained(final_dir, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(final_dir)
    if cfg.push_to_hub:
        model.push_to_hub(cfg.hub_model_id)
        if tokenizer is not None:
            tokenizer.push_to_hub(cfg.hub_model_id)


def _init_wandb(cfg: RunConfig, run_id: str | None):
    if cfg.wandb_mode == "disabled" or cfg.wandb_project is None:
        return None
    try:
        import wandb
    except ImportError as err:
        raise ImportError("wandb is not installed: pip install wandb, or set wandb_mode: disabled") from err
    return wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, mode=cfg.wandb_mode, id=run_id,
                      resume="allow" if run_id else None, config=dataclasses.asdict(cfg),
                      dir=str(Path(cfg.out_dir)))  # fmt: skip


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) a training run. Returns {"losses": {step: loss}, "eval": {step: loss}, "final_dir": ...}."""
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
    is_main = accelerator.is_main_process
    out_dir = Path(cfg.out_dir)
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))

    # --- data and tokenizer ---------------------------------------------------------------------------------
    meta = load_meta(cfg.data_dir)
    try:
        has_val = bool(find_shards(cfg.data_dir, "val"))
    except FileNotFoundError:
        has_val = False
    if not has_val:
        accelerator.print(f"no validation shard in {cfg.data_dir}: evaluation is skipped")
    tokenizer = None
    tokenizer_name = cfg.tokenizer or meta.get("tokenizer")
    if tokenizer_name:
        from llamathink.tokenizer_utils import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_name)

    # --- model and optimizer --------------------------------------------------------------------------------
    model = build_model(cfg)
    check_vocab(int(meta["vocab_size"]), model.config.vocab_size)
    if tokenizer is not None:
        check_vocab(len(tokenizer), model.config.vocab_size)
    loader = TokenBatchLoader(cfg.data_dir, cfg.seq_len, cfg.micro_batch_size, rank=accelerator.process_index,
                              world_size=accelerator.num_processes, seed=cfg.seed,
                              model_vocab_size=model.config.vocab_size)  # fmt: skip
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))

    start_step, run_id, tokens_seen = 0, None, 0
    history: dict[str, dict[int, float]] = {"losses": {}, "eval": {}}
    resume_from = resolve_resume(cfg)
    if resume_from is not None:
        state = restore_checkpoint(resume_from, model, optimizer, scheduler, loader)
        start_step, run_id = state["step"], state.get("wandb_run_id")
        tokens_seen = state.get("tokens_seen", 0)
        history = state.get("history", history)
        accelerator.print(f"resumed from {resume_from} at step {start_step}")
    else:
        torch.manual_seed(cfg.seed)

    # The optimizer is prepared so accelerate can handle mixed precision; the LR schedule is stepped by us once
    # per optimizer step (accelerate would step a prepared scheduler once per process).
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    if cfg.compile:
        model = torch.compile(model)

    run = _init_wandb(cfg, run_id) if is_main else None
    tokens_per_step = cfg.micro_batch_size * cfg.seq_len * cfg.grad_accum * accelerator.num_processes
    flops_per_step = flops_per_token(raw_model.config, cfg.seq_len) * tokens_per_step
    peak = cfg.peak_tflops * 1e12 * accelerator.num_processes if cfg.peak_tflops else None
    accelerator.print(
        f"{sum(p.numel() for p in raw_model.parameters()):,} parameters; {tokens_per_step:,} tokens per step; "
        f"optimizer {cfg.optimizer}: "
        + ", ".join(f"{k} {v['params']:,}" for k, v in summarize_param_groups(optimizer.param_groups).items())
    )

    progress = None
    if is_main and cfg.progress_bar:
        from tqdm.auto import tqdm

        progress = tqdm(total=cfg.max_steps, initial=start_step, desc="train", dynamic_ncols=True)

    model.train()
    skips = 0
    t_last, tokens_last = time.perf_counter(), tokens_seen
    optimizer_share = None
    step = start_step
    end_step = min(cfg.max_steps, cfg.stop_at_step or cfg.max_steps)
    while step < end_step:
        # --- one optimizer step: grad_accum micro-batches --------------------------------------------------
        # On logging steps the step and the optimizer are timed with device syncs (Muon's share of step time).
        measure = (step + 1) % cfg.log_every == 0
        if measure:
            _sync(accelerator.device)
            t_step = time.perf_counter()
        loss_sum = torch.zeros((), device=accelerator.device)
        for micro in range(cfg.grad_accum):
            input_ids, labels = next(loader)
            input_ids, labels = input_ids.to(accelerator.device), labels.to(accelerator.device)
            sync = micro == cfg.grad_accum - 1
            ctx = accelerator.no_sync(model) if not sync and accelerator.num_processes > 1 else contextlib.nullcontext()
            with ctx, accelerator.autocast():
                loss = model(input_ids=input_ids, labels=labels, use_cache=False).loss
                accelerator.backward(loss / cfg.grad_accum)
            loss_sum += loss.detach().float()
        loss_mean = accelerator.reduce(loss_sum / cfg.grad_accum, "mean")
        loss_value = float(loss_mean)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        finite = math.isfinite(loss_value) and bool(torch.isfinite(torch.as_tensor(grad_norm)))
        if not finite:
            skips = skip_nonfinite_step(cfg, step, loss_value, grad_norm, skips, optimizer, accelerator)
            continue  # the data position advanced; the step counter did not
        skips = 0
        if measure:
            _sync(accelerator.device)
            t_opt = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if measure:
            _sync(accelerator.device)
            now = time.perf_counter()
            optimizer_share = (now - t_opt) / (now - t_step)
        scheduler.step()
        step += 1
        tokens_seen += tokens_per_step
        history["losses"][step] = loss_value

        # --- logging ------------------------------------------------------------------------------------------
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            now = time.perf_counter()
            tok_s = (tokens_seen - tokens_last) / max(now - t_last, 1e-9)
            mfu = tok_s / tokens_per_step * flops_per_step / peak if peak else None
            metrics = {"train/loss": loss_value, "train/lr": scheduler.get_last_lr()[0],
                       "train/grad_norm": float(grad_norm), "perf/tokens_per_s": tok_s,
                       "train/tokens_seen": tokens_seen}  # fmt: skip
            if mfu is not None:
                metrics["perf/mfu"] = mfu
            if optimizer_share is not None:
                metrics["perf/optimizer_share"] = optimizer_share
            history.setdefault("perf", {})[step] = metrics
            if run is not None:
                run.log(metrics, step=step)
            if progress is not None:
                progress.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tok_s:,.0f}",
                                     **({"mfu": f"{100 * mfu:.1f}%"} if mfu is not None else {}))  # fmt: skip
            t_last, tokens_last = now, tokens_seen
        if progress is not None:
            progress.update(1)

        paused = False  # evaluation, samples and checkpoints do not count towards tokens/s
        if (step % cfg.eval_every == 0 or step == cfg.max_steps) and has_val:
            paused = True
            val = evaluate(model, cfg, accelerator)
            history["eval"][step] = val
            accelerator.print(f"step {step}: train loss {loss_value:.4f}, val loss {val:.4f}")
            if run is not None:
                run.log({"eval/loss": val}, step=step)
        if is_main and step % cfg.sample_every == 0:
            paused = True
            for text in generate_samples(raw_model, tokenizer, cfg, accelerator.device):
                accelerator.print(f"[sample] {text!r}")
        if step % cfg.save_every == 0 or step == end_step:
            paused = True
            accelerator.wait_for_everyone()
            if is_main:
                extra = {"tokens_seen": tokens_seen, "history": history, "config": dataclasses.asdict(cfg),
                         "wandb_run_id": run.id if run is not None else run_id}  # fmt: skip
                save_checkpoint(cfg.out_dir, step, raw_model, optimizer, scheduler, loader, extra, cfg.keep_last)
                write_history(out_dir, history)
            accelerator.wait_for_everyone()
        if paused:
            t_last, tokens_last = time.perf_counter(), tokens_seen

    if progress is not None:
        progress.close()
    final_dir = out_dir / "final"
    if is_main:
        write_history(out_dir, history)
    if is_main and step == cfg.max_steps:
        save_final(raw_model, tokenizer, final_dir, cfg)
    if run is not None:
        run.finish()
    accelerator.wait_for_everyone()
    history["final_dir"] = str(final_dir) if step == cfg.max_steps else None
    return history


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Pretrain LlamaThink. Settings come from --config (YAML) and --key value overrides of any "
        "TrainConfig field, e.g. --max_steps 100 --optimizer adamw.",
    )
    parser.add_argument("--config", help="YAML file of TrainConfig settings (configuration/train/*.yaml)")
    args, overrides = parser.parse_known_args(argv)
    cfg = load_config(args.config, overrides)
    train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
