"""Pretrain LlamaThink with Hugging Face accelerate and our Muon optimizer.

    accelerate launch [--config_file accelerate_configs/...] train_hf.py --config configuration/train/<preset>.yaml \
        [--key value ...]

Read top to bottom: the run settings (`TrainConfig`, a YAML file plus `--key value` overrides; what it shares with
finetune_chat.py's `FinetuneConfig` is in `RunConfig`), the model and optimizer, the learning-rate schedule,
evaluation and samples, checkpoints (atomic, weights-only, owned by one run through a lock and a run id, the last K
of the run kept, exact resume: model, optimizer, scheduler, RNG and data position, with changed settings applied or
refused), then the optimizer step (fp16 loss-scale overflows left to the GradScaler) and the training loop itself
(`train`), which tests call.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import math
import os
import random
import shutil
import socket
import sys
import time
import typing
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llamathink import LlamaThinkConfig, LlamaThinkForCausalLM
from llamathink.data import TokenBatchLoader, check_vocab, find_shards, load_meta, val_batches
from llamathink.muon import ADJUST_LR_FNS, Muon, muon_param_groups, summarize_param_groups

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
    # a fresh run (resume: none, or resuming another folder's checkpoint) in an out_dir that holds checkpoints of
    # another run is refused unless overwrite: true, which deletes those checkpoints first
    overwrite: bool = False
    push_to_hub: bool = False
    hub_model_id: str | None = None

    def __post_init__(self):
        self.check_positive("micro_batch_size", "grad_accum", "max_steps", "eval_every", "log_every", "save_every",
                            "keep_last", "sample_every", "sample_tokens", "max_consecutive_skips")  # fmt: skip
        self.check_positive("stop_at_step", or_null=True)
        for name in ("muon_lr", "adamw_lr", "weight_decay"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not (isinstance(self.grad_clip, (int, float)) and self.grad_clip > 0):  # inf: no clipping
            raise ValueError(f"grad_clip must be a number > 0 (inf for no clipping), got {self.grad_clip!r}")
        if not (isinstance(self.min_lr_ratio, (int, float)) and 0 <= self.min_lr_ratio <= 1):
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        betas = tuple(self.adamw_betas) if isinstance(self.adamw_betas, (list, tuple)) else ()
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
            raise ValueError(f"adamw_betas must be two numbers in [0, 1), got {self.adamw_betas!r}")
        if self.optimizer not in ("muon", "adamw"):
            raise ValueError(f"optimizer must be 'muon' or 'adamw', got {self.optimizer!r}")
        if self.muon_adjust_lr not in ADJUST_LR_FNS:
            raise ValueError(f"muon_adjust_lr must be one of {', '.join(ADJUST_LR_FNS)}, got {self.muon_adjust_lr!r}")
        if self.nonfinite not in ("stop", "skip"):
            raise ValueError(f"nonfinite must be 'stop' or 'skip', got {self.nonfinite!r}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}")
        if self.wandb_mode not in ("online", "offline", "disabled"):
            raise ValueError(f"wandb_mode must be 'online', 'offline' or 'disabled', got {self.wandb_mode!r}")
        if not 0 <= self.seed < 2**32:  # the range every generator seeded from it accepts (NumPy's, torch's)
            raise ValueError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")
        if not 0 <= self.warmup_steps <= self.max_steps:
            raise ValueError(f"warmup_steps must be in [0, max_steps={self.max_steps}], got {self.warmup_steps}")
        self.adamw_betas = tuple(float(b) for b in betas)
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


_NULL_WORDS = ("null", "none", "~", "")
_TRUE_WORDS, _FALSE_WORDS = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def coerce_setting(value, annotation, name: str, where: str = ""):
    """`value` (from YAML, or a command-line string) as the settings field `name` of type `annotation` needs it.

    Accepted, by type: float - any number YAML or Python reads (`1e-3`, `3E-4`, `.5`, `2`, `0.002`, `inf`; PyYAML
    reads `1e-3` as a string, so strings go through `float()`), never a bool or NaN; int - an integer, or a float or
    numeric string with an integral value (`1e4`, `10_000`); bool - true/false, yes/no, on/off, 1/0 (any case);
    optional fields - null, none or ~ for None; str - text (a YAML number becomes its text); list[str] - a list;
    tuple[float, float] - a list `[0.9, 0.99]` or a comma-separated string `0.9,0.99` with exactly as many items.
    `where` prefixes errors (the YAML file, or `--` for the command line). Raises ValueError naming the field and
    the value when the value cannot be read as the type."""
    label = f"{where}{name}"
    args = typing.get_args(annotation)
    optional = type(None) in args
    if optional:
        if value is None or (isinstance(value, str) and value.strip().lower() in _NULL_WORDS):
            return None
        rest = [a for a in args if a is not type(None)]
        annotation = rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]
    elif value is None:
        raise ValueError(f"{label}: a value is required (null is not allowed for this setting)")
    origin = typing.get_origin(annotation) or annotation
    if origin is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        word = str(value).strip().lower() if isinstance(value, str) else None
        if word in _TRUE_WORDS or word in _FALSE_WORDS:
            return word in _TRUE_WORDS
        raise ValueError(f"{label} expects true or false, got {value!r}")
    if origin is float:
        return _as_float(value, label)
    if origin is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        number = _as_float(value, label, kind="an integer")
        if not number.is_integer():
            raise ValueError(f"{label} expects an integer, got {value!r}")
        return int(number)
    if origin is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"{label} expects text, got {value!r} (quote it if it is meant as text)")
    if origin in (list, tuple):
        items = value
        item_types = typing.get_args(annotation)
        if isinstance(value, str) and str not in item_types:  # numbers, comma-separated: 0.9,0.99 or (0.9, 0.99)
            text = value.strip()
            if text[:1] in "[(" and text[-1:] in "])":
                text = text[1:-1]
            items = [part.strip() for part in text.split(",")] if text.strip() else []
        if not isinstance(items, (list, tuple)):
            raise ValueError(f"{label} expects a list such as [a, b], got {value!r}")
        if origin is tuple and item_types and item_types[-1] is not Ellipsis:
            if len(items) != len(item_types):
                raise ValueError(f"{label} expects {len(item_types)} values, got {len(items)}: {value!r}")
            return tuple(coerce_setting(v, t, f"{name}[{i}]", where) for i, (v, t) in enumerate(zip(items, item_types)))
        item_type = item_types[0] if item_types else None
        parsed = [coerce_setting(v, item_type, f"{name}[{i}]", where) if item_type else v for i, v in enumerate(items)]
        return origin(parsed)
    return value


def _as_float(value, label: str, kind: str = "a number") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{label} expects {kind}, got {value!r}")
    try:
        number = float(value.strip().replace("_", "") if isinstance(value, str) else value)
    except ValueError:
        raise ValueError(f"{label} expects {kind}, got {value!r}") from None
    if math.isnan(number):
        raise ValueError(f"{label} expects {kind}, got NaN")
    return number


def parse_setting(raw: str, annotation, name: str):
    """A `--name value` command-line override as the dataclass field's type (`coerce_setting`). The string is read
    as YAML first (lists, null, booleans); a text field keeps the string exactly as written. Raises ValueError
    naming the field and the value."""
    import yaml

    args = typing.get_args(annotation)
    is_text = annotation is str or (type(None) in args and [a for a in args if a is not type(None)] == [str])
    if is_text and raw.strip().lower() not in _NULL_WORDS:
        return raw
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw  # e.g. `[0.9, 0.99` : coerce_setting says what was expected
    return coerce_setting(value, annotation, name, where="--")


def _read_settings_yaml(path) -> Any:
    """The YAML document in `path` (an empty file reads as {}), read with yaml.safe_load's constructors (no Python
    objects). A key written twice in one mapping is an error naming both lines (YAML keeps the last silently), as
    is a syntax error (e.g. a tab used for indentation) or several documents: ValueError naming the file."""
    import yaml

    class _UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: keys written next to it win
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if isinstance(key, typing.Hashable) and key in seen:
                    raise ValueError(f"{path}: key {key!r} is given twice (lines {seen[key]} and {line}); "
                                     "keep one")  # fmt: skip
                if isinstance(key, typing.Hashable):
                    seen[key] = line
            return super().construct_mapping(node, deep=deep)

    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not a UTF-8 text (YAML) file: {err}") from None
    try:
        loaded = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {err}") from None
    return {} if loaded is None else loaded


def load_config(path: str | None = None, overrides: list[str] | None = None, cls: type = None):
    """A `TrainConfig` (or another settings dataclass `cls`, e.g. finetune_chat's) from a YAML file (`path`) and
    `--key value` / `--key=value` overrides. Unknown keys are an error naming the key and the file."""
    import yaml

    cls = cls or TrainConfig
    known = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    if path is not None:
        loaded = _read_settings_yaml(path)
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of settings, got {type(loaded).__name__}")
        for key, value in loaded.items():
            if key not in known:
                raise ValueError(f"{path}: unknown setting {key!r}; known settings: {', '.join(sorted(known))}")
            values[key] = coerce_setting(value, hints[key], key, where=f"{path}: ")
    overrides = list(overrides or [])
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
    """Greedy continuations of the sample prompts (greedy: comparable from one evaluation to the next). A prompt
    that fills the model's context is skipped (with a printed note) rather than stopping the training run; the
    continuation is cut where the context ends."""
    if tokenizer is None or not cfg.sample_prompts:
        return []
    model.eval()
    texts = []
    for prompt in cfg.sample_prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
        room = model.config.max_position_embeddings - ids.shape[1]
        if room <= 0:
            print(f"sample prompt skipped: its {ids.shape[1]} tokens fill the model's context "
                  f"(max_position_embeddings={model.config.max_position_embeddings}): {prompt[:40]!r}...")  # fmt: skip
            continue
        out = model.generate(ids, max_new_tokens=min(cfg.sample_tokens, room), do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
        texts.append(tokenizer.decode(out[0], skip_special_tokens=True))
    model.train()
    return texts


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: step_XXXXXXXX/ directories written to a temporary name and renamed when complete
#
# A run owns its out_dir: it holds an exclusive lock on <out_dir>/.lock for its whole life, writes its run id into
# every checkpoint's meta.json, and rotates (keep_last) only its own checkpoints. state.pt holds only tensors and
# plain containers, so it is read with torch.load(weights_only=True): a shared checkpoint folder cannot run code.
# ----------------------------------------------------------------------------------------------------------------

CHECKPOINT_PREFIX = "step_"
TMP_PREFIX = ".tmp-"  # checkpoints being written (and replaced ones being removed); never listed as complete
STATE_FILE, META_FILE, LOCK_FILE = "state.pt", "meta.json", ".lock"
CHECKPOINT_FORMAT = 2  # 1: no meta.json, numpy arrays in the RNG state; 2: meta.json, weights-only state.pt


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read, or must not be trusted; the message says which and why."""


class OutDirInUse(RuntimeError):
    """The out_dir belongs to another run: one running now (its lock), or earlier runs' checkpoints."""


class ResumeSettingsError(ValueError):
    """Settings that must not change within a run differ between the checkpoint and this run."""


def checkpoint_dir(out_dir: str | Path) -> Path:
    """Where a run in `out_dir` writes its step_XXXXXXXX checkpoint folders."""
    return Path(out_dir) / "checkpoints"


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints of every run in out_dir, by step (lowest first). Temporary directories of interrupted
    writes are ignored, and so are symbolic links: a link may point anywhere, and rotation must never delete (nor
    `resume: auto` pick) a folder outside out_dir."""
    root = checkpoint_dir(out_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and not p.is_symlink() and p.name.startswith(CHECKPOINT_PREFIX)
             and p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / STATE_FILE).exists()]  # fmt: skip
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def checkpoint_meta(path: str | Path) -> dict:
    """A checkpoint's meta.json: {"format", "run_id", "step", "saved_at" (Unix time), "world_size", "config"}.
    Checkpoints written before run ids (no meta.json) read as run_id None, saved at the folder's mtime.
    Raises CheckpointError when meta.json is not valid JSON or its fields have the wrong types."""
    path = Path(path)
    file = path / META_FILE
    step = int(path.name[len(CHECKPOINT_PREFIX) :]) if path.name[len(CHECKPOINT_PREFIX) :].isdigit() else None
    if not file.exists():
        return {"format": 1, "run_id": None, "step": step, "saved_at": path.stat().st_mtime, "world_size": None,
                "config": None}  # fmt: skip
    try:
        meta = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {file}: {err}") from err
    types = {"run_id": (str, type(None)), "step": int, "saved_at": (int, float), "config": (dict, type(None))}
    if (not isinstance(meta, dict) or any(not isinstance(meta.get(k), t) for k, t in types.items())
            or isinstance(meta["step"], bool) or not math.isfinite(meta["saved_at"])):  # fmt: skip
        raise CheckpointError(f"{file} is not a checkpoint's meta.json (expected run_id, step, saved_at, config)")
    if step is not None and meta["step"] != step:
        raise CheckpointError(f"{file} says step {meta['step']} but the folder is {path.name}: the checkpoint was "
                              "renamed or edited, so it is not trusted")  # fmt: skip
    return meta


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The most recently saved complete checkpoint in out_dir (by its save time, then step), whatever its run."""
    found = list_checkpoints(out_dir)
    if not found:
        return None
    return max(found, key=lambda p: (checkpoint_meta(p)["saved_at"], int(p.name[len(CHECKPOINT_PREFIX) :])))


@contextlib.contextmanager
def own_out_dir(out_dir: str | Path, is_main: bool = True):
    """Hold an exclusive lock on `out_dir` (fcntl.flock on <out_dir>/.lock, released when the block ends or the
    process dies) and remove temporary checkpoint folders that an interrupted save left behind. Only the main
    process locks (it alone writes). Raises OutDirInUse naming the holder (pid, host, start time) when another
    process holds the lock, ValueError when out_dir cannot be created or written (a file in the way, no
    permission). flock is advisory and per host: runs on different machines sharing out_dir over a network file
    system may not see each other's lock."""
    if not is_main:
        yield
        return
    import fcntl

    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        checkpoint_dir(out_dir).mkdir(exist_ok=True)  # now, not at the first save after hours of training
        fd = os.open(out_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:  # a file in the way, no write permission, a read-only file system
        in_the_way = next((p for p in (out_dir, checkpoint_dir(out_dir)) if p.exists() and not p.is_dir()), None)
        problem = f"{in_the_way} is a file, not a folder" if in_the_way else err.strerror
        raise ValueError(f"out_dir {out_dir} cannot hold this run's checkpoints: {problem} ({err})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        holder = os.read(fd, 4096).decode(errors="replace").strip() or "a process that has not written its name yet"
        os.close(fd)
        raise OutDirInUse(f"out_dir {out_dir} is in use by another run ({holder}); wait for it to finish, stop it, "
                          f"or use another out_dir") from err  # fmt: skip
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}, started "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n".encode())  # fmt: skip
        root = checkpoint_dir(out_dir)
        leftovers = [p for p in root.iterdir() if p.name.startswith(TMP_PREFIX)] if root.is_dir() else []
        for path in leftovers:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        if leftovers:
            print(f"removed {len(leftovers)} temporary checkpoint folder(s) left by an interrupted save in {root}")
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race with a waiting run)


def claim_checkpoints(cfg: RunConfig, resume_from: Path | None, run_id: str | None, is_main: bool = True) -> str:
    """This run's id (the resumed checkpoint's run id, else a new uuid4 hex) after checking that out_dir's
    checkpoints may be mixed with this run's.

    A fresh run (`resume: none`, or `resume: auto` with nothing to resume), or a run resumed from a checkpoint
    outside this out_dir, must not share out_dir with another run's checkpoints: later rotation and `resume: auto`
    would mix the runs. It raises OutDirInUse listing them, unless `overwrite: true`, which deletes them. A run
    resumed from this out_dir's own checkpoints leaves other runs' checkpoints untouched."""
    run_id = run_id or uuid.uuid4().hex
    if not is_main:
        return run_id
    inside = resume_from is not None and Path(resume_from).resolve().parent == checkpoint_dir(cfg.out_dir).resolve()
    if inside:
        return run_id
    foreign = [p for p in list_checkpoints(cfg.out_dir) if _run_id_or_none(p) != run_id]
    if not foreign:
        return run_id
    names = ", ".join(p.name for p in foreign)
    if not cfg.overwrite:
        raise OutDirInUse(f"out_dir {cfg.out_dir} holds checkpoints of another run ({names}); resume it with "
                          "resume: auto, use another out_dir, or set overwrite: true to delete them")  # fmt: skip
    for path in foreign:
        remove_checkpoint(path)
    print(f"overwrite: deleted the earlier run's checkpoints in {checkpoint_dir(cfg.out_dir)} ({names})")
    return run_id


def _run_id_or_none(path: Path) -> str | None:
    try:
        return checkpoint_meta(path)["run_id"]
    except CheckpointError:
        return None  # an unreadable meta.json is nobody's: never deleted by rotation, counted as foreign


def _rng_state() -> dict:
    """Python, NumPy, torch (and CUDA) generator states as tensors, ints and tuples (weights-only loadable)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))}  # fmt: skip
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict):
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)  # format 1 stored an ndarray
    np.random.set_state((kind, keys.astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _plain(obj):
    """`obj` with NumPy scalars and arrays turned into Python numbers and tensors (weights-only loadable)."""
    if isinstance(obj, dict):
        return {_plain(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    return obj


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def _save_error_message(err: BaseException, step: int, final: Path, needed: int, previous: Path | None) -> str:
    """What went wrong while writing a checkpoint, in words (torch reports a full disk as e.g.
    'inline_container.cc ... unexpected pos'), and what is still safe."""
    try:
        free = shutil.disk_usage(final.parent).free
    except OSError:
        free = None
    code = getattr(err, "errno", None)
    where = f"checkpoint step {step} to {final}"
    if code in (errno.ENOSPC, errno.EDQUOT) or (code is None and free is not None and free < needed):
        what = f"disk full while writing {where} ({free:,} bytes free, about {needed:,} needed)"
    elif code in (errno.EACCES, errno.EPERM):
        what = f"permission denied while writing {where} ({getattr(err, 'filename', None) or final.parent})"
    elif code == errno.EROFS:
        what = f"read-only file system: cannot write {where}"
    else:
        what = f"could not write {where}: {type(err).__name__}: {err}"
    kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint of this run exists"
    return f"{what}; {kept} and the partial checkpoint was removed"


def save_checkpoint(out_dir, step: int, model, optimizer, scheduler, loader, extra: dict, keep_last: int,
                    run_id: str | None = None, world_size: int = 1) -> Path:  # fmt: skip
    """Write `checkpoints/step_<step>/` (state.pt: model, optimizer, scheduler, loader, RNG and `extra`; meta.json:
    run id, step, save time, world size, `extra["config"]`) atomically (temporary directory + rename), then delete
    this run's (`run_id`'s) checkpoints beyond the newest `keep_last`; other runs' checkpoints are never touched.

    A process killed at any moment leaves either the previous set of checkpoints or the previous set plus the
    new one; never a half-written checkpoint under a final name. A failed write (full disk, permissions) removes
    the partial folder and raises CheckpointError saying what happened; earlier checkpoints are intact.
    """
    root = checkpoint_dir(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{CHECKPOINT_PREFIX}{step:08d}"
    tmp = root / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    old = root / f"{TMP_PREFIX}replaced-{final.name}-{os.getpid()}"
    mine = [p for p in list_checkpoints(out_dir) if _run_id_or_none(p) == run_id and p != final]
    previous = max(mine, key=lambda p: checkpoint_meta(p)["saved_at"]) if mine else None
    state = {
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "loader": _plain(loader.state_dict()),
        "rng": _rng_state(),
        **_plain(extra),
    }
    meta = {"format": CHECKPOINT_FORMAT, "run_id": run_id, "step": step, "saved_at": time.time(),
            "world_size": world_size, "config": json.loads(json.dumps(extra.get("config"), default=str))}  # fmt: skip
    try:
        for path in (tmp, old):
            if path.exists():
                shutil.rmtree(path)
        tmp.mkdir()
        with open(tmp / STATE_FILE, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        with open(tmp / META_FILE, "w") as f:
            f.write(json.dumps(meta, indent=1))
            f.flush()
            os.fsync(f.fileno())
        if os.environ.get("LLAMATHINK_TEST_SLOW_CHECKPOINT"):  # lets a test kill the process in the middle of a save
            time.sleep(float(os.environ["LLAMATHINK_TEST_SLOW_CHECKPOINT"]))
        if final.exists():  # re-saving the same step after a resume: replace it
            os.replace(final, old)
        os.replace(tmp, final)
    except BaseException as err:  # also Ctrl-C: never leave a partial folder or a moved-away checkpoint behind
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not final.exists():
            os.replace(old, final)
        if isinstance(err, (OSError, RuntimeError)):
            raise CheckpointError(_save_error_message(err, step, final, _nbytes(state), previous)) from err
        raise
    shutil.rmtree(old, ignore_errors=True)
    dir_fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    mine = sorted(mine + [final], key=lambda p: (checkpoint_meta(p)["saved_at"], int(p.name[len(CHECKPOINT_PREFIX):])))
    for stale in mine[:-keep_last]:
        try:
            remove_checkpoint(stale)
        except OSError as err:  # the new checkpoint is saved; an old one left behind must not stop the run
            print(f"could not remove the old checkpoint {stale} (keep_last={keep_last}): {err}")
    return final


def remove_checkpoint(path: Path):
    """Delete a checkpoint folder: first renamed to a temporary name (atomic), then removed. A deletion stopped
    half-way (Ctrl-C, a kill) thus never leaves a partial checkpoint under its final name, where `resume: auto`
    could pick it (e.g. state.pt left without meta.json reads as a checkpoint saved just now); the temporary
    folder is removed by the next run's `own_out_dir`."""
    path = Path(path)
    doomed = path.parent / f"{TMP_PREFIX}removing-{path.name}-{os.getpid()}"
    shutil.rmtree(doomed, ignore_errors=True)  # left by an earlier removal stopped half-way
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _legacy_numpy_globals() -> list:
    """What format-1 checkpoints need beyond weights-only defaults: NumPy's ndarray and scalar reconstruction for
    plain numeric dtypes (the RNG key array, NumPy numbers). None of these can call arbitrary code."""
    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # NumPy 1.x
        from numpy.core.multiarray import _reconstruct, scalar

    dtypes = [type(np.dtype(t)) for t in ("uint32", "int64", "int32", "float64", "float32", "bool")]
    return [_reconstruct, scalar, np.ndarray, np.dtype, *dtypes]


def load_checkpoint(path: str | Path) -> dict:
    """The contents of `<path>/state.pt`, loaded with torch.load(weights_only=True): tensors, numbers, strings and
    containers only (plus NumPy arrays of plain dtypes, for checkpoints of format 1). A file that holds any other
    Python object (which could run code when unpickled) is refused with CheckpointError, as is a corrupt one."""
    import pickle

    file = Path(path) / STATE_FILE
    try:
        with torch.serialization.safe_globals(_legacy_numpy_globals()):
            state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        detail = next((line.strip() for line in str(err).splitlines() if "Unsupported global" in line
                       or "Unsupported operand" in line), "objects other than tensors and plain containers")  # fmt: skip
        raise CheckpointError(f"refusing to load {file}: it is not a weights-only checkpoint ({detail}); loading it "
                              "could run code stored in it. Only checkpoints written by this trainer are loaded."
                              ) from None  # fmt: skip
    except Exception as err:  # a corrupt file must say which one
        raise CheckpointError(f"cannot load checkpoint {file}: {type(err).__name__}: {err}") from err
    required = ("step", "model", "optimizer", "scheduler", "loader", "rng")
    if not isinstance(state, dict) or any(k not in state for k in required):
        raise CheckpointError(f"{file} is not a training checkpoint (expected the keys {', '.join(required)})")
    step = state["step"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"{file} is not a training checkpoint: its step is {step!r}, not a count of steps")
    wrong = [k for k in required[1:] if not isinstance(state[k], dict)]
    if wrong:
        raise CheckpointError(f"{file} is not a training checkpoint: {', '.join(wrong)} should be dictionaries")
    return state


# Settings that cannot change within a run: the optimizer's kind and state, the model, the data and its order.
# Everything else (learning rates, weight decay, betas, schedule length, clipping, cadences, logging, ...) is
# applied from the current settings when resuming, and each change is printed. The global batch
# (micro_batch_size x grad_accum x processes) is checked separately: its factors may change, its product not.
RESUME_FIXED = ("optimizer", "model_config", "init_from", "tokenizer", "seq_len", "data_dir", "seed", "data",
                "data_split", "data_config", "data_format", "max_conversations", "system_prompt", "max_len",
                "eval_fraction", "group_by_length")  # fmt: skip
# Settings applied from the current run when resuming (through the rebuilt optimizer's groups, the schedule, or
# read where used). A setting in neither tuple (a field added without deciding) is treated as fixed.
RESUME_APPLIED = ("micro_batch_size", "grad_accum", "max_steps", "muon_lr", "adamw_lr", "adamw_betas",
                  "weight_decay", "muon_adjust_lr", "grad_clip", "warmup_steps", "min_lr_ratio", "mixed_precision",
                  "nonfinite", "max_consecutive_skips", "eval_every", "sample_every", "sample_prompts",
                  "sample_tokens", "log_every", "wandb_project", "wandb_run_name", "wandb_mode", "progress_bar",
                  "out_dir", "save_every", "keep_last", "stop_at_step", "push_to_hub", "hub_model_id", "compile",
                  "eval_batches", "peak_tflops", "eval_data", "eval_split", "max_eval_conversations",
                  "eval_at_start")  # fmt: skip
_NOT_COMPARED = ("resume", "overwrite")


def _json_value(value):
    return json.loads(json.dumps(value, default=str))


def compare_resume_settings(saved: dict | None, cfg: RunConfig, saved_world: int | None, world_size: int,
                            where: str = "the checkpoint") -> list[str]:  # fmt: skip
    """The differences between the settings saved in a checkpoint (`saved`, dataclasses.asdict of the run's
    config; `saved_world` processes) and `cfg` (`world_size` processes), as "name: old -> new" lines for the
    settings that may change (RESUME_APPLIED; the caller applies them). Raises ResumeSettingsError listing every
    difference in any other setting (RESUME_FIXED, or one classified in neither) or in the global batch. Fields
    missing from `saved` (an older version) are not compared."""
    if saved is None:
        return []
    current = dataclasses.asdict(cfg)
    fixed, changed = [], []
    for name, value in current.items():
        if name in _NOT_COMPARED or name not in saved or _json_value(saved[name]) == _json_value(value):
            continue
        line = f"{name}: {saved[name]!r} -> {value!r}"
        (changed if name in RESUME_APPLIED else fixed).append(line)
    if saved_world is not None and all(k in saved for k in ("micro_batch_size", "grad_accum")):
        factors = (saved["micro_batch_size"], saved["grad_accum"], saved_world)
        if not all(isinstance(f, int) and not isinstance(f, bool) and f > 0 for f in factors):
            raise ResumeSettingsError(f"cannot resume from {where}: its saved batch (micro_batch_size x grad_accum "
                                      f"x processes = {' x '.join(map(repr, factors))}) is not made of positive "
                                      "integers; the checkpoint was edited or damaged")  # fmt: skip
        old = saved["micro_batch_size"] * saved["grad_accum"] * saved_world
        new = cfg.micro_batch_size * cfg.grad_accum * world_size
        if old != new:
            fixed.append(f"global batch (micro_batch_size x grad_accum x processes): {saved['micro_batch_size']} x "
                         f"{saved['grad_accum']} x {saved_world} = {old} -> {cfg.micro_batch_size} x "
                         f"{cfg.grad_accum} x {world_size} = {new}")  # fmt: skip
    if fixed:
        raise ResumeSettingsError(f"cannot resume from {where}: settings that must stay the same within a run "
                                  f"differ: {'; '.join(fixed)}. Restore them, or start a new run (another out_dir, "
                                  "or resume: none with overwrite: true).")  # fmt: skip
    return changed


def _saved_world_size(state: dict, meta: dict) -> int | None:
    if isinstance(meta.get("world_size"), int) and not isinstance(meta["world_size"], bool):
        return meta["world_size"]
    loader, config = state.get("loader") or {}, state.get("config") or {}
    try:
        if "world_size" in loader:  # TokenBatchLoader
            return int(loader["world_size"])
        if "global_batch" in loader and config.get("micro_batch_size"):  # ChatBatchLoader
            return int(loader["global_batch"]) // int(config["micro_batch_size"])
    except (TypeError, ValueError, ZeroDivisionError):
        return 0  # not a count: compare_resume_settings refuses it
    return None


def restore_checkpoint(path: Path, model, optimizer, scheduler, loader, cfg: RunConfig | None = None,
                       world_size: int = 1, log=print) -> dict:  # fmt: skip
    """Load the checkpoint at `path` into the model, optimizer, scheduler and data loader and restore the RNG state
    (an exact resume); returns the checkpoint's contents for the rest (step, history, run_id, wandb_run_id, ...).

    With `cfg` (the current settings; `world_size` processes), the saved settings are compared first
    (`compare_resume_settings`: a changed fixed setting raises ResumeSettingsError before anything is loaded).
    The optimizer's hyperparameters (peak learning rates, weight decay, betas, ...) are then taken from the
    optimizer as built from `cfg` rather than from the checkpoint, and the current learning rates recomputed from
    the schedule of `cfg` at the saved step, so a changed setting applies from the first resumed step; each
    change is reported through `log`. `optimizer` and `scheduler` must be freshly built from `cfg`."""
    path = Path(path)
    state = load_checkpoint(path)
    meta = checkpoint_meta(path)
    if meta.get("format") != 1 and state["step"] != meta["step"]:
        raise CheckpointError(f"{path}: state.pt is at step {state['step']} but meta.json says step {meta['step']}: "
                              "the files do not belong together, so the checkpoint is not trusted")  # fmt: skip
    changes = []
    if cfg is not None and state["step"] > cfg.max_steps:
        raise ResumeSettingsError(f"cannot resume from {path}: it is at step {state['step']}, beyond max_steps="
                                  f"{cfg.max_steps}; set max_steps to at least {state['step']}")  # fmt: skip
    if cfg is not None:
        saved = meta.get("config") or state.get("config")
        changes = compare_resume_settings(saved, cfg, _saved_world_size(state, meta), world_size, where=str(path))
    fresh = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    part = "model"
    try:  # a checkpoint of another model shape, optimizer recipe or data must say so, naming the part and folder
        model.load_state_dict(state["model"])
        part = "optimizer"
        optimizer.load_state_dict(state["optimizer"])
        part = "scheduler"
        scheduler.load_state_dict(state["scheduler"])
        part = "data loader"
        loader.load_state_dict(state["loader"])
        part = "RNG"
        _set_rng_state(state["rng"])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as err:
        raise CheckpointError(f"cannot resume from {path}: its {part} state does not fit this run "
                              f"({type(err).__name__}: {err})") from err  # fmt: skip
    if cfg is not None:
        for group, built in zip(optimizer.param_groups, fresh, strict=True):
            group.update({k: v for k, v in built.items() if k not in ("lr", "initial_lr")})
            group["initial_lr"] = built["initial_lr"]
        scheduler.base_lrs = [built["initial_lr"] for built in fresh]
        factor = lr_factor(scheduler.last_epoch, cfg)
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base * factor  # what LambdaLR computes: base_lr * lr_lambda(last_epoch)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
        if changes:
            log(f"resuming {path} with changed settings (applied from this step on): {'; '.join(changes)}")
    state["run_id"] = meta.get("run_id")
    state["settings_changed"] = changes
    return state


def resolve_resume(cfg: RunConfig) -> Path | None:
    """The checkpoint to resume: none for `resume: none`; for `resume: auto` the most recently saved checkpoint
    in out_dir, if any; else the named checkpoint folder (FileNotFoundError when it holds no state.pt)."""
    if cfg.resume == "none":
        return None
    if cfg.resume == "auto":
        return latest_checkpoint(cfg.out_dir)
    path = Path(cfg.resume)
    if not (path / STATE_FILE).exists():
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


@dataclass
class StepCounters:
    """What `optimizer_step` counts: non-finite steps in a row (reset by an update) and loss-scale overflow steps
    (fp16 with a GradScaler) over the run."""

    skips: int = 0
    overflows: int = 0


def optimizer_step(cfg: RunConfig, step: int, loss_value: float, grad_norm, optimizer, accelerator,
                   counters: StepCounters, scaler=None) -> bool:  # fmt: skip
    """Update the weights with the accumulated gradients, or skip the update; True when the weights changed.

    Call once per optimizer step after the gradients were unscaled and clipped (accelerator.clip_grad_norm_ does
    both). Without a loss scaler, a non-finite loss or gradient norm goes to `skip_nonfinite_step` (stop, or skip
    with nonfinite: skip). With one (`scaler`, e.g. accelerate's GradScaler for fp16), only the loss value decides
    that: non-finite gradients with a finite loss are a loss-scale overflow, which the scaler handles (its step
    skips the update and its update halves the scale); the overflow is counted in `counters.overflows` and
    printed. Only when the scale has fallen below 1, so the gradients overflow without any scaling, is the step
    treated as non-finite. Every path ends the scaler's step (`update`), so the next step may unscale again.
    `optimizer` may be accelerate's AcceleratedOptimizer built with `scaler` (its step calls scaler.step and
    scaler.update) or a plain optimizer (then they are called here)."""
    if scaler is not None and not math.isfinite(loss_value):
        scaler.update()  # ends this step (the gradients were unscaled), so the next unscale_ is allowed
    if not math.isfinite(loss_value) or (scaler is None and not bool(torch.isfinite(torch.as_tensor(grad_norm)))):
        counters.skips = skip_nonfinite_step(cfg, step, loss_value, grad_norm, counters.skips, optimizer, accelerator)
        return False
    if scaler is None:
        optimizer.step()
    else:
        scale = scaler.get_scale()
        if getattr(optimizer, "scaler", None) is scaler:
            optimizer.step()
            skipped = bool(optimizer.step_was_skipped)
        else:  # a plain optimizer: the scaler backs off exactly when it found inf/NaN gradients and skipped
            scaler.step(optimizer)
            scaler.update()
            skipped = scaler.get_scale() < scale
        new_scale = scaler.get_scale()
        if skipped:  # the scaler found inf/NaN gradients: it skipped the update and backed off
            optimizer.zero_grad(set_to_none=True)
            counters.overflows += 1
            accelerator.print(f"loss-scale overflow at step {step} (grad norm {float(grad_norm)}): update skipped, "
                              f"scale {scale:g} -> {new_scale:g} ({counters.overflows} overflow steps so far)")  # fmt: skip
            if new_scale < 1.0:
                counters.skips = skip_nonfinite_step(cfg, step, loss_value, grad_norm, counters.skips, optimizer,
                                                     accelerator)  # fmt: skip
            return False
    optimizer.zero_grad(set_to_none=True)
    counters.skips = 0
    return True


def make_accelerator(cfg: RunConfig):
    """The accelerate Accelerator of a run (mixed precision from `cfg`; on CUDA with fp16 it owns a GradScaler)."""
    from accelerate import Accelerator

    return Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())


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


def save_final(model, tokenizer, final_dir: Path, cfg: RunConfig, history: dict | None = None,
               tokens_seen: int | None = None):
    """The finished model as a save_pretrained directory: weights, config and model code, the tokenizer (if any)
    with generation defaults (left padding, `model_max_length` = the model's context; see
    `llamathink.tokenizer_utils.save_tokenizer_for_model`) and a model card `README.md` built from `cfg`, the run
    `history` ({"losses": {step: loss}, "eval": {step: loss}}) and `tokens_seen` (`llamathink.model_card`).
    With `cfg.push_to_hub` the folder, card included, is uploaded as it is to `cfg.hub_model_id`."""
    from llamathink.model_card import write_model_card
    from llamathink.tokenizer_utils import save_tokenizer_for_model

    final_dir = Path(final_dir)
    model.save_pretrained(final_dir, safe_serialization=True)
    if tokenizer is not None:
        tokenizer = save_tokenizer_for_model(tokenizer, final_dir, model.config.max_position_embeddings)
    write_model_card(final_dir, model, cfg, history=history, tokens_seen=tokens_seen, tokenizer=tokenizer)
    if cfg.push_to_hub:
        # push_to_hub of the model would write transformers' generic card over ours; upload the folder instead
        from huggingface_hub import create_repo, upload_folder

        create_repo(cfg.hub_model_id, exist_ok=True)
        upload_folder(repo_id=cfg.hub_model_id, folder_path=str(final_dir), commit_message="Upload LlamaThink model")


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
    """Run (or resume) a training run. Returns {"losses": {step: loss}, "eval": {step: loss}, "overflow_steps": n,
    "final_dir": ...}. The run holds out_dir's lock throughout (`own_out_dir`: OutDirInUse if another run does)."""
    accelerator = make_accelerator(cfg)
    with own_out_dir(cfg.out_dir, accelerator.is_main_process):
        return _train(cfg, accelerator)


def _train(cfg: TrainConfig, accelerator) -> dict:
    is_main = accelerator.is_main_process
    out_dir = Path(cfg.out_dir)
    resume_from = resolve_resume(cfg)
    saved_run_id = checkpoint_meta(resume_from)["run_id"] if resume_from is not None else None
    run_id = claim_checkpoints(cfg, resume_from, saved_run_id, is_main)

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

    start_step, wandb_id, tokens_seen = 0, None, 0
    history: dict[str, dict[int, float]] = {"losses": {}, "eval": {}}
    counters = StepCounters()
    if resume_from is not None:
        state = restore_checkpoint(resume_from, model, optimizer, scheduler, loader, cfg,
                                   world_size=accelerator.num_processes, log=accelerator.print)  # fmt: skip
        start_step, wandb_id = state["step"], state.get("wandb_run_id")
        tokens_seen = state.get("tokens_seen", 0)
        history = state.get("history", history)
        counters.overflows = int(state.get("overflow_steps", 0))
        accelerator.print(f"resumed from {resume_from} at step {start_step} (run {run_id})")
    else:
        torch.manual_seed(cfg.seed)
    if is_main:  # only once a resume is accepted: a refused one must not replace the run's record of its settings
        (out_dir / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))

    # The optimizer is prepared so accelerate can handle mixed precision; the LR schedule is stepped by us once
    # per optimizer step (accelerate would step a prepared scheduler once per process).
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    if cfg.compile:
        model = torch.compile(model)

    run = _init_wandb(cfg, wandb_id) if is_main else None
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
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)  # unscales fp16 gradients
        if measure:
            _sync(accelerator.device)
            t_opt = time.perf_counter()
        if not optimizer_step(cfg, step, loss_value, grad_norm, optimizer, accelerator, counters, accelerator.scaler):
            continue  # the data position advanced; the step counter did not
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
                       "train/tokens_seen": tokens_seen, "train/overflow_steps": counters.overflows}  # fmt: skip
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
                         "wandb_run_id": run.id if run is not None else wandb_id, "run_id": run_id,
                         "overflow_steps": counters.overflows}  # fmt: skip
                save_checkpoint(cfg.out_dir, step, raw_model, optimizer, scheduler, loader, extra, cfg.keep_last,
                                run_id=run_id, world_size=accelerator.num_processes)  # fmt: skip
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
        save_final(raw_model, tokenizer, final_dir, cfg, history, tokens_seen=tokens_seen)
    if run is not None:
        run.finish()
    accelerator.wait_for_everyone()
    history["final_dir"] = str(final_dir) if step == cfg.max_steps else None
    history["overflow_steps"] = counters.overflows
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
