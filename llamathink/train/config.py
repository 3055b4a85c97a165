"""Run settings of pretraining and finetuning: the shared `RunConfig` and the YAML / command-line parser.

A run's settings are a dataclass (`llamathink.train.pretrain.TrainConfig`, `llamathink.train.finetune.FinetuneConfig`,
both subclasses of `RunConfig`) filled from a YAML file and `--key value` overrides by `load_config`. Every field is
checked when the dataclass is built (`__post_init__`), so a wrong value fails before any work starts, naming the
setting and the value.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..muon import ADJUST_LR_FNS


@dataclass
class RunConfig:
    """The settings pretraining (`TrainConfig`) and chat finetuning (`FinetuneConfig`) share:
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
    # record Muon's Newton-Schulz step as one CUDA graph when the run has one GPU (fewer host launches; the eager
    # step is the reference: `llamathink.muon`)
    muon_cuda_graph: bool = True
    grad_clip: float = 1.0
    warmup_steps: int = 500
    min_lr_ratio: float = 0.0  # cosine decays to this fraction of the peak
    # numerics
    mixed_precision: str = "bf16"  # "no", "bf16" or "fp16" (passed to accelerate)
    seed: int = 1337
    nonfinite: str = "stop"  # "stop" or "skip" (that update; slower: each update waits for its loss) at NaN/inf
    max_consecutive_skips: int = 10
    # evaluation, samples, logging
    eval_every: int = 250
    eval_at_start: bool = False  # evaluate the starting model too (step 0)
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
        # each value of its field's type, as `load_config` reads them from YAML and the command line: a dataclass
        # built in Python gets no coercion, and a "false" string would be a true bool, 2.5 steps an accumulation
        hints = _type_hints(type(self))
        for f in dataclasses.fields(self):
            expected = _type_problem(getattr(self, f.name), hints[f.name])
            if expected is not None:
                raise ValueError(f"{f.name} must be {expected}, got {getattr(self, f.name)!r}")
        # a leading ~ is the home folder, as in a shell: a YAML file or a quoted argument keeps it as text, and the
        # run would make a folder named "~" (and read files under it)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, str) and (value == "~" or value.startswith("~/")):
                setattr(self, f.name, os.path.expanduser(value))
            # an empty path is the working folder to the file system: a run would write its checkpoints there
            if f.name in PATH_SETTINGS and isinstance(value, str) and not value.strip():
                raise ValueError(f"{f.name} is empty: give a path" + (" (or null)" if f.default is None else ""))
        self.check_positive(
            "micro_batch_size",
            "grad_accum",
            "max_steps",
            "eval_every",
            "log_every",
            "save_every",
            "keep_last",
            "sample_every",
            "sample_tokens",
            "max_consecutive_skips",
        )
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
        if self.wandb_mode != "disabled" and self.wandb_project is not None:
            _check_wandb_project(self.wandb_project)
        if not 0 <= self.seed < 2**32:  # the range every generator seeded from it accepts (NumPy's, torch's)
            raise ValueError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")
        if not 0 <= self.warmup_steps <= self.max_steps:
            raise ValueError(f"warmup_steps must be in [0, max_steps={self.max_steps}], got {self.warmup_steps}")
        self.adamw_betas = tuple(float(b) for b in betas)
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("push_to_hub needs hub_model_id")

    def check_out_dir_apart_from(self, setting: str):
        """Refuse (ValueError) an out_dir that is the folder of the model named by `setting` (init_from), or whose
        own outputs hold it (its final/ and checkpoints/, which the run replaces, rotates away or, with overwrite,
        deletes): the run would write into, replace or delete the model it starts from."""
        source = getattr(self, setting)
        if not source:
            return
        model, out = Path(source).expanduser().resolve(), Path(self.out_dir).expanduser().resolve()
        if model == out:
            raise ValueError(
                f"out_dir {self.out_dir} is the {setting} model's folder: the run would write its checkpoints and "
                "final model into the model it starts from; choose another out_dir"
            )
        if not Path(source).expanduser().exists():  # a Hub id: no local folder to lose
            return
        for own in (out / name for name in RUN_OUTPUT_FOLDERS):
            if model == own or own in model.parents:
                raise ValueError(
                    f"{setting} {source} is in out_dir {self.out_dir}'s {own.name}/, which the run replaces or "
                    "deletes: it would lose the model it starts from; choose another out_dir (or copy the model "
                    "out of it first)"
                )

    def check_positive(self, *names: str, or_null: bool = False):
        """Each named setting must be > 0 (or, with or_null, None: no limit). Raises ValueError naming the setting,
        and for an interval given as 0 (read elsewhere as "off") how to turn that off (`OFF_HINTS`)."""
        for name in names:
            value = getattr(self, name)
            if or_null and value is None:
                continue
            if value <= 0:
                hint = f" ({OFF_HINTS[name]})" if name in OFF_HINTS else ""
                raise ValueError(f"{name} must be positive{' or null' if or_null else ''}, got {value!r}{hint}")


# the folders of out_dir that a run replaces, rotates away or (with overwrite) deletes (the first of
# `checkpoint._OUT_DIR_ENTRIES`, the run's outputs)
RUN_OUTPUT_FOLDERS = ("final", ".final.tmp", ".final.old", "checkpoints")

# how to turn off what an interval setting schedules, for its error where it is given as 0
OFF_HINTS = {
    "sample_every": "no samples: sample_prompts: []",
    "eval_every": "evaluations at the last step only (and at step 0 with eval_at_start): an eval_every above max_steps",
    "save_every": "a checkpoint at the last step only: a save_every above max_steps",
}


# settings that name a file, folder or model (refused when empty; each config class has some of them)
PATH_SETTINGS = (
    "out_dir",
    "data_dir",
    "data",
    "eval_data",
    "init_from",
    "model_config",
    "tokenizer",
    "resume",
    "hub_model_id",
)
_NULL_WORDS = ("null", "none", "~", "")
_TRUE_WORDS, _FALSE_WORDS = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


# W&B's own rule for project names (wandb.sdk.wandb_settings): checked here so that a run stops before any work
WANDB_PROJECT_FORBIDDEN = "/\\#?%:"
WANDB_PROJECT_MAX_LEN = 128


def _check_wandb_project(name: str) -> None:
    """Raise ValueError where W&B would refuse `name` as a project: empty, longer than 128 characters, or holding
    one of / \\ # ? % :."""
    if not name.strip():
        raise ValueError(
            "wandb_project is empty: give a W&B project name, or null (or wandb_mode: disabled) to log none"
        )
    if len(name) > WANDB_PROJECT_MAX_LEN:
        raise ValueError(f"wandb_project is {len(name)} characters long; W&B takes at most {WANDB_PROJECT_MAX_LEN}")
    found = sorted({c for c in name if c in WANDB_PROJECT_FORBIDDEN})
    if found:
        raise ValueError(
            f"wandb_project {name!r} holds {' '.join(found)}; W&B project names cannot contain any of "
            f"{' '.join(WANDB_PROJECT_FORBIDDEN)}"
        )


@functools.cache
def _type_hints(cls: type) -> dict:
    return typing.get_type_hints(cls)


def _type_problem(value, annotation) -> str | None:
    """None where `value` is of the settings type `annotation` (bool, int, float, str, list[str], tuple[...], or
    one of them | None; an int is a float, a bool is neither), else what was expected, in words."""
    args = typing.get_args(annotation)
    if type(None) in args:
        if value is None:
            return None
        (annotation,) = [a for a in args if a is not type(None)]
        expected = _type_problem(value, annotation)
        return None if expected is None else f"{expected} or null"
    origin = typing.get_origin(annotation) or annotation
    if origin is bool:
        return None if isinstance(value, bool) else "true or false"
    if origin is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if origin is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    if origin is str:
        return None if isinstance(value, str) else "text"
    if origin in (list, tuple):
        item_types = [t for t in typing.get_args(annotation) if t is not Ellipsis]
        if not isinstance(value, (list, tuple)):
            return "a list"
        if origin is list and item_types and any(_type_problem(v, item_types[0]) for v in value):
            return f"a list of {_type_problem(object(), item_types[0])}"
        return None  # tuples: their items and length are checked by the field's own rule
    return None


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
        if isinstance(value, str):  # digits are read exactly, however many
            with contextlib.suppress(ValueError):
                return int(value.strip().replace("_", ""))
        number = _as_float(value, label, kind="an integer")
        if not number.is_integer():
            raise ValueError(f"{label} expects an integer, got {value!r}")
        if abs(number) >= 2**53:  # through a float it would be rounded: 1e30 became 1000000000000000019884624838656
            raise ValueError(
                f"{label} expects an integer written exactly, got {value!r}: past 2**53 this form is rounded; "
                "write the integer's digits"
            )
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
        value = yaml.load(raw, Loader=_settings_loader(f"--{name}", lines=False))  # (a SafeLoader subclass)
    except (yaml.YAMLError, RecursionError):  # (RecursionError: nesting past Python's recursion limit)
        value = raw  # e.g. `[0.9, 0.99` : coerce_setting says what was expected
    return coerce_setting(value, annotation, name, where="--")


def _settings_loader(where: str, lines: bool = True):
    """yaml.SafeLoader, refusing the two YAML 1.1 number forms that PyYAML reads where a settings file surely meant
    something else: an integer with a leading zero (`max_steps: 010`, read as the octal 8) and a base-60 number
    (`max_steps: 1:30`, read as 90; `1:30.5` as 90.5). Raises ValueError naming `where` (a file, with the `lines`
    number, or an option), the value and YAML's reading of it."""
    import yaml

    def refuse(node, reading: str, value) -> None:
        text = str(node.value)
        line = f" line {node.start_mark.line + 1}" if lines else ""
        raise ValueError(
            f"{where}{line}: {text} {reading} ({value}): for the number write it in decimal, for text quote it "
            f"('{text}')"
        )

    class SettingsLoader(yaml.SafeLoader):
        def construct_yaml_int(self, node):
            text = str(node.value)
            if re.fullmatch(r"[-+]?0[0-7_]+", text) and text.strip("+-0_"):
                refuse(node, "has a leading zero, which YAML reads as an octal number", int(text.replace("_", ""), 8))
            value = super().construct_yaml_int(node)
            if ":" in text:
                refuse(node, "is a base-60 number to YAML", value)
            return value

        def construct_yaml_float(self, node):
            value = super().construct_yaml_float(node)
            if ":" in str(node.value):
                refuse(node, "is a base-60 number to YAML", value)
            return value

    SettingsLoader.add_constructor("tag:yaml.org,2002:int", SettingsLoader.construct_yaml_int)
    SettingsLoader.add_constructor("tag:yaml.org,2002:float", SettingsLoader.construct_yaml_float)
    return SettingsLoader


def _read_settings_yaml(path) -> Any:
    """The YAML document in `path` (an empty file reads as {}), read with yaml.safe_load's constructors (no Python
    objects). A key written twice in one mapping is an error naming both lines (YAML keeps the last silently), as
    is a syntax error (e.g. a tab used for indentation), several documents or nesting past Python's recursion
    limit: ValueError naming the file."""
    import yaml

    if not Path(path).is_file():
        raise FileNotFoundError(f"settings file {path} (--config) does not exist or is not a file")

    class _UniqueKeyLoader(_settings_loader(str(path))):
        def construct_mapping(self, node, deep=False):
            seen = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: keys written next to it win
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if isinstance(key, typing.Hashable) and key in seen:
                    raise ValueError(f"{path}: key {key!r} is given twice (lines {seen[key]} and {line}); keep one")
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
    except RecursionError:  # (PyYAML builds nested values recursively)
        raise ValueError(f"{path}: a value is nested too deeply to be read (past Python's recursion limit)") from None
    return {} if loaded is None else loaded


def load_config(cls: type, path: str | None = None, overrides: list[str] | None = None):
    """A settings dataclass `cls` (`TrainConfig`, `FinetuneConfig`) from a YAML file (`path`) and `--key value` /
    `--key=value` overrides. Unknown keys are an error naming the key and the file."""

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
