"""Training checkpoints: atomic, weights-only, owned by one run, exactly resumable.

A run in `out_dir` writes `out_dir/checkpoints/step_XXXXXXXX/` folders (state.pt: model, optimizer, scheduler, data
loader position, RNG states and the run's history; meta.json: run id, step, save time, world size, settings),
each to a temporary name first and renamed when complete. The run holds an exclusive lock on the folder for its
whole life, rotates (keep_last) only its own checkpoints, and on resume compares the saved settings with the
current ones: settings that cannot change within a run are refused, the others applied and reported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import inspect
import json
import math
import os
import random
import shutil
import socket
import time
import uuid
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..hub import hub_lookup_failure
from .config import RUN_OUTPUT_FOLDERS, RunConfig
from .optim import lr_factor

# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: step_XXXXXXXX/ directories written to a temporary name and renamed when complete
#
# A run owns its out_dir: it holds an exclusive lock on <out_dir>/.lock for its whole life, writes its run id into
# every checkpoint's meta.json, and rotates (keep_last) only its own checkpoints. state.pt holds only tensors and
# plain containers, so it is read with torch.load(weights_only=True): a shared checkpoint folder cannot run code.
# ----------------------------------------------------------------------------------------------------------------

CHECKPOINT_PREFIX = "step_"
TMP_PREFIX = ".tmp-"  # checkpoints being written (and replaced ones being removed); never listed as complete
# an earlier run's checkpoints that an `overwrite: true` run has moved aside until its own first checkpoint is whole
SET_ASIDE_PREFIX = ".overwritten-"
STATE_FILE, META_FILE, LOCK_FILE = "state.pt", "meta.json", ".lock"
CHECKPOINT_FORMAT = 2  # 1: no meta.json, numpy arrays in the RNG state; 2: meta.json, weights-only state.pt


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read, or must not be trusted; the message says which and why."""


class OutDirInUse(RuntimeError):
    """The out_dir belongs to another run: one running now (its lock), or earlier runs' checkpoints."""


# The settings a finished run's records (model card, train_config.json) name as what the model trained with: changed
# on a resume that trains no step, they would be recorded without having trained anything (`restore_checkpoint`)
TRAINING_RECORD_SETTINGS = (
    "optimizer",
    "muon_lr",
    "adamw_lr",
    "adamw_betas",
    "weight_decay",
    "muon_adjust_lr",
    "grad_clip",
    "warmup_steps",
    "min_lr_ratio",
)


class ResumeSettingsError(ValueError):
    """Settings that must not change within a run differ between the checkpoint and this run."""


def check_saved_model_path(path: str, setting: str) -> None:
    """Refuse, with a ValueError naming `setting`, a `path` given where a saved model (a `save_pretrained` folder or
    a Hub id) belongs but which is a training checkpoint (`<out_dir>/checkpoints/step_*`), a run's out_dir, a folder
    or file that is not a saved model; and, with FileNotFoundError, a local path (starting with `/`, `.` or `~`,
    or with more than one `/`) that does not exist, which transformers would otherwise look up on the Hub."""
    p = Path(path).expanduser()
    if p.is_dir():
        if (p / STATE_FILE).exists():
            raise ValueError(
                f"{setting}={path} is a training checkpoint (it holds {STATE_FILE}), not a saved model: use the run's "
                f"final folder (<out_dir>/final), or resume: {path} to continue that run"
            )
        # (an empty checkpoints/ alone is what a run that failed at its start left in an existing folder)
        checkpoints = checkpoint_dir(p)
        if (p / "final").is_dir() or (checkpoints.is_dir() and any(checkpoints.iterdir())):
            final = p / "final"
            hint = str(final) if (final / "config.json").exists() else "<out_dir>/final, written when the run finishes"
            raise ValueError(f"{setting}={path} is a training run's folder, not a saved model: use {hint}")
        if (p / "config.json").is_symlink() and not (p / "config.json").exists():
            raise ValueError(
                f"{setting}={path}: its config.json is a symbolic link that leads nowhere (a loop, or a target that is gone)"
            )
        if (p / "config.json").is_dir():
            raise ValueError(f"{setting}={path}: its config.json is a folder, not a config file")
        if not (p / "config.json").exists() and (p / "adapter_config.json").exists():
            raise ValueError(
                f"{setting}={path} is a PEFT adapter (adapter_config.json), not a whole model: load it on its base "
                "model with peft, then save_pretrained the model that merge_and_unload() returns"
            )
        if not (p / "config.json").exists():
            raise ValueError(f"{setting}={path} is a folder without config.json, not a saved model")
    elif p.exists():
        raise ValueError(f"{setting}={path} is a file; expected a save_pretrained folder or a Hub model id")
    elif path.startswith(("/", ".", "~")) or path.count("/") > 1:
        raise FileNotFoundError(f"{setting}={path}: no such folder")


def _weights_index_problem(folder: Path, where: str) -> str | None:
    """Why `folder`'s model.safetensors.index.json (sharded weights) cannot be loaded, as a message beginning with
    `where`, or None where there is no index or it is sound. Read once, checked in this order: a model.safetensors
    beside an index that does not name it (one of them stale: transformers loads the single file, the C exporter,
    as sharded saves mean, the index's shards; an unreadable index names nothing); then the index's own form, which
    transformers reads without checking and fails deep inside on: not JSON, no `weight_map` object of tensor names
    to shard file names, an empty one, no `metadata` object."""
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return None
    try:
        data, unreadable = json.loads(index.read_text()), None
    except (OSError, ValueError, RecursionError) as err:  # (UnicodeDecodeError is a ValueError)
        data, unreadable = None, f"{index.name} cannot be read as JSON ({type(err).__name__}: {err})"
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    names_single = isinstance(weight_map, dict) and "model.safetensors" in weight_map.values()
    if (folder / "model.safetensors").is_file() and not names_single:
        return (
            f"{where} holds both model.safetensors and model.safetensors.index.json (sharded weights): one of them is "
            "left from an earlier save, and loaders disagree on which to read; remove the stale one"
        )
    if unreadable is not None:
        problem = unreadable
    elif not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        problem = (
            f"{index.name} has no weight_map object of tensor names to shard files (got {type(weight_map).__name__})"
        )
    elif not weight_map:
        problem = f"{index.name} maps no tensors (an empty weight_map)"
    elif not isinstance(data.get("metadata"), dict):  # transformers reads its total size from there
        problem = f"{index.name} has no metadata object (got {type(data.get('metadata')).__name__})"
    else:
        return None
    return f"{where}: its {problem}; is the folder's save complete?"


def load_saved_model(
    path: str | os.PathLike,
    setting: str,
    dtype: torch.dtype = torch.float32,
    auto: bool = False,
    check_generation: bool = False,
    **kwargs,
):
    """The saved model at `path` (`from_pretrained`; with `auto`, through `AutoModelForCausalLM`, which takes
    `trust_remote_code` in `kwargs`), strictly: transformers fills a tensor missing from the weights with fresh random
    values and skips an unknown one, reporting both only in a log line; a training or chat command would then go on
    with a partly random model. Raises, naming `setting` and `path`: what `check_saved_model_path` raises; ValueError
    for missing, unexpected or misshapen tensors (against the model its config.json describes); for an unreadable
    (truncated, corrupt) weights file; without `auto`, for a local folder whose config.json names another model
    type; for a tensor stored in a dtype that is not floating point (an integer or bool tensor would be cast to
    floats without a word); for an `lm_head.weight` that differs from the embeddings where config.json says
    they are tied (transformers then unties them, with a log line); for weights with NaN or infinite values in
    `dtype`; for a sharded weights index that is stale, not JSON or lacks its weight map (`_weights_index_problem`); and
    with `check_generation` (the trainers, whose finished model saves the generation config it loaded),
    for a generation_config.json that `check_generation_config` refuses; TypeError for a `path` that is neither a
    string nor an `os.PathLike`."""
    from safetensors import SafetensorError

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{setting}: a saved model's folder or Hub id is a string or path, got {type(path).__name__}")
    path = os.fspath(path)
    if path.startswith("~"):  # (as a shell would; a quoted "~/x" reached here as it is and was looked up on the Hub)
        path = str(Path(path).expanduser())
    check_saved_model_path(path, setting)
    folder = Path(path).expanduser()
    index_problem = _weights_index_problem(folder, f"{setting}={path}")
    if index_problem is not None:
        raise ValueError(index_problem)
    config_file = folder / "config.json"
    try:  # a local folder's config (None: a Hub id; not an object: transformers names it)
        raw = json.loads(config_file.read_text()) if config_file.is_file() else None
    # (transformers' own reading names a syntax error only: a number past 4300 digits or nesting past the recursion
    # limit would come from deep inside it)
    except (OSError, ValueError, RecursionError) as err:  # (UnicodeDecodeError is a ValueError)
        raise ValueError(
            f"{setting}={path}: its config.json cannot be read as JSON ({type(err).__name__}: {err})"
        ) from None
    raw = raw if isinstance(raw, dict) else None
    if auto:
        from transformers import AutoModelForCausalLM as loader

        # (transformers' message for it asks for trust_remote_code, which would not help)
        if raw is not None and "model_type" not in raw and "auto_map" not in raw:
            raise ValueError(
                f"{setting}={path}: its config.json gives no model_type, so no model class can be chosen for it "
                "(a LlamaThink model's is 'llamathink': add it)"
            )
    else:
        from ..modeling_llamathink import LlamaThinkForCausalLM as loader

        # another architecture would otherwise be named by its every tensor, as "missing"
        model_type = raw.get("model_type", "none given") if raw is not None else None
        if model_type is not None and model_type != "llamathink":
            raise ValueError(
                f"{setting}={path} is not a LlamaThink model: its config.json gives model_type {model_type!r} "
                "(a LlamaThink model's is 'llamathink')"
            )
    # The generation config: a local folder's read here first for the trainers (transformers raises a bare
    # TypeError for some damaged files; a Hub id's is read by transformers), not read at all for the chat (it
    # generates with its own settings alone)
    from transformers import GenerationConfig

    generation = _read_generation_config(folder, setting, path) if check_generation else GenerationConfig()
    if generation is not None:
        kwargs["generation_config"] = generation
    try:  # (a misshapen tensor is loaded as a fresh one and listed, to be named below)
        model, info = loader.from_pretrained(
            path, dtype=dtype, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
        )
    except SafetensorError as err:
        raise ValueError(
            f"{setting}={path}: a weights file cannot be read ({err}); is it truncated or corrupt?"
        ) from None
    except OSError as err:  # a Hub id without network or access (or offline), an unreadable file
        if folder.exists():
            raise ValueError(f"{setting}={path}: cannot be loaded ({type(err).__name__}: {err})") from err
        raise ValueError(hub_lookup_failure(f"{setting}={path}", err, path)) from err
    except ValueError as err:  # the model's own refusals (its config, its weights): named by the setting too
        text = str(err)
        raise ValueError(f"{setting}={text}" if text.startswith(f"{path}:") else f"{setting}={path}: {text}") from err
    from ..modeling_llamathink import (  # (_some: a few names of each kind and how many more, not every tensor)
        LlamaThinkPreTrainedModel,
        _some,
        _weights_files,
        unusable_weights,
    )

    problems = [
        f"{what} {_some(sorted(info[key]))}"
        for key, what in (("missing_keys", "missing"), ("unexpected_keys", "unexpected"))
        if info.get(key)
    ]
    misshapen = sorted(info.get("mismatched_keys") or [])  # (name, saved shape, shape config.json makes)
    if misshapen:
        shapes = [f"{name} {tuple(saved)} for {tuple(wanted)}" for name, saved, wanted in misshapen]
        problems.append(f"misshapen {_some(shapes)}")
    if problems:
        raise ValueError(
            f"{setting}={path}: its weights do not match the model its config.json describes ({'; '.join(problems)}); "
            "refusing to go on with those tensors random or dropped"
        )
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if (
        getattr(model.config, "tie_word_embeddings", False)
        and head is not None
        and head.weight is not embeddings.weight
    ):
        raise ValueError(
            f"{setting}={path}: config.json says tie_word_embeddings: true, but its weights hold an lm_head.weight "
            "that differs from the embeddings; set tie_word_embeddings to false if the head is trained apart, or "
            "remove lm_head.weight from the weights"
        )
    # (this package's LlamaThink classes refused such weights in from_pretrained; another architecture's, or a saved
    # folder's own copy of the modeling code through `auto`, may not)
    problem = (
        None if isinstance(model, LlamaThinkPreTrainedModel) else unusable_weights(model, _weights_files(path, kwargs))
    )
    if problem is not None:
        raise ValueError(f"{setting}={path}: {problem}")
    if check_generation:
        check_generation_config(model, setting, path)
    return model


GENERATION_TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
# (field, smallest value): counts and lengths that generate() takes as Python ints
GENERATION_COUNT_FIELDS = (
    ("max_length", 1),
    ("max_new_tokens", 1),
    ("min_length", 0),
    ("min_new_tokens", 0),
    ("num_beams", 1),
    ("num_beam_groups", 1),
    ("num_return_sequences", 1),
    ("top_k", 0),
    ("no_repeat_ngram_size", 0),
)
MAX_GENERATION_BEAMS = 1024  # beams and returned sequences: past this, generate() would allocate them all at once
# (field, test, what it must be): real-valued settings
GENERATION_REAL_FIELDS = (
    ("temperature", lambda v: 0 <= v < float("inf"), "a finite number >= 0"),
    ("top_p", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("min_p", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("typical_p", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("repetition_penalty", lambda v: 0 < v < float("inf"), "a finite number > 0"),
    ("length_penalty", lambda v: -float("inf") < v < float("inf"), "a finite number"),
)


def _read_generation_config(folder: Path, setting: str, path: str):
    """The `GenerationConfig` of a local folder's generation_config.json, or None (no such file, or a Hub id: then
    transformers reads the Hub's, or makes one from the model's config). Raises ValueError naming the file where it
    is not a JSON object or transformers refuses its values."""
    from transformers import GenerationConfig

    file = folder / "generation_config.json"
    if not file.is_file():
        return None
    where = f"{setting}={path}: its generation_config.json"
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError, RecursionError) as err:  # (UnicodeDecodeError is a ValueError)
        raise ValueError(f"{where} cannot be read as JSON ({type(err).__name__}: {err}); fix or remove it") from None
    if not isinstance(data, dict):
        raise ValueError(  # noqa: TRY004 - a file error, ValueError like every other refusal here
            f"{where} holds a {type(data).__name__}, not a JSON object of settings; fix or remove it"
        )
    try:
        return GenerationConfig.from_dict(data)
    except Exception as err:  # noqa: BLE001 - transformers' refusals (ValueError, TypeError for mistyped fields)
        raise ValueError(
            f"{where} is refused by transformers ({type(err).__name__}: {err}); fix or remove it"
        ) from None


def check_generation_config(model, setting: str, path: str) -> None:
    """Refuse, with a ValueError naming `setting`, `path`, the file and the field, a loaded model's generation
    config (its folder's generation_config.json) that generate() could not use, or that would make it allocate
    without bound: token ids (BOS, EOS, pad, decoder start) that are not ids of the model's vocabulary (EOS may be a
    list of them), counts and lengths that are not integers at or above their least value (max_length 1, num_beams
    1, min_length 0, ...), more than `MAX_GENERATION_BEAMS` beams or returned sequences, real-valued settings out
    of range (temperature, top_p, repetition_penalty, ...), and settings with which a two-token generate() on the
    loaded model fails (an integer penalty, a forced token outside the vocabulary, ...). transformers loads such
    files as they are (its own `GenerationConfig.validate`, run as it loads them, checks how settings combine,
    not these), and `save_pretrained` writes them into the finished model, so a training run would hand them on."""
    gen = getattr(model, "generation_config", None)
    if gen is None:
        return
    vocab = model.config.vocab_size
    where = f"{setting}={path}: its generation_config.json"
    hint = "fix the field or remove it (or the file: the model's config then gives the token ids)"

    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    for field in GENERATION_TOKEN_FIELDS:
        value = getattr(gen, field, None)
        ids = value if field == "eos_token_id" and isinstance(value, list) and value else [value]
        if value is not None and not all(is_int(i) and 0 <= i < vocab for i in ids):
            raise ValueError(f"{where} has {field}={value!r}, not a token id of the model (0 .. {vocab - 1}); {hint}")
    for field, least in GENERATION_COUNT_FIELDS:
        value = getattr(gen, field, None)
        if value is not None and not (is_int(value) and value >= least):
            raise ValueError(f"{where} has {field}={value!r}: it must be an integer >= {least}; {hint}")
    for field in ("num_beams", "num_return_sequences"):
        value = getattr(gen, field, None)
        if value is not None and value > MAX_GENERATION_BEAMS:
            raise ValueError(f"{where} has {field}={value}, past the {MAX_GENERATION_BEAMS} this package takes; {hint}")
    for field, test, what in GENERATION_REAL_FIELDS:
        value = getattr(gen, field, None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not test(value):
            raise ValueError(f"{where} has {field}={value!r}: it must be {what}; {hint}")
    # What the fields above do not cover (settings transformers checks only as it generates: an integer penalty, a
    # forced or banned token outside the vocabulary, ...): two tokens generated with these settings, on the CPU
    # weights as loaded, the random state kept as it was (a run's draws do not depend on this probe)
    config = model.config
    first = config.bos_token_id if isinstance(config.bos_token_id, int) else 0
    ids = torch.tensor([[first]], device=next(model.parameters()).device)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        try:
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, min_new_tokens=0)
        except Exception as err:  # noqa: BLE001 - whatever generate() raises for these settings
            raise ValueError(
                f"{where} makes generate() fail ({type(err).__name__}: {str(err)[:300]}); {hint}"
            ) from None


def checkpoint_dir(out_dir: str | Path) -> Path:
    """Where a run in `out_dir` writes its step_XXXXXXXX checkpoint folders."""
    return Path(out_dir) / "checkpoints"


def checkpoint_step(path: str | Path) -> int | None:
    """The step a checkpoint folder's name says (``step_00000042`` -> 42), or None for another name."""
    digits = Path(path).name[len(CHECKPOINT_PREFIX) :]
    return int(digits) if Path(path).name.startswith(CHECKPOINT_PREFIX) and digits.isdigit() else None


def _checkpoint_folders(out_dir: str | Path) -> list[Path]:
    """Folders in out_dir's checkpoints/ named like a checkpoint, complete or not (symbolic links included)."""
    root = checkpoint_dir(out_dir)
    if not root.is_dir():
        return []
    return [p for p in root.iterdir() if p.is_dir() and checkpoint_step(p) is not None]


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints of every run in out_dir, by step (lowest first). Temporary directories of interrupted
    writes are ignored, and so are symbolic links: a link may point anywhere, and rotation must never delete (nor
    `resume: auto` pick) a folder outside out_dir."""
    found = [p for p in _checkpoint_folders(out_dir) if not p.is_symlink() and (p / STATE_FILE).exists()]
    return sorted(found, key=checkpoint_step)


def checkpoint_meta(path: str | Path) -> dict:
    """A checkpoint's meta.json: {"format", "run_id", "step", "saved_at" (Unix time), "save_index" (the run's saves
    counted; absent before this version), "world_size", "config"}.
    Checkpoints written before run ids (no meta.json) read as run_id None, saved when their state.pt was written
    (its mtime; the folder's changes whenever a file in it is added or removed).
    Raises CheckpointError when meta.json is not valid JSON or its fields have the wrong types."""
    path = Path(path)
    file = path / META_FILE
    step = checkpoint_step(path)
    if not file.exists():
        return {
            "format": 1,
            "run_id": None,
            "step": step,
            "saved_at": (path / STATE_FILE).stat().st_mtime if (path / STATE_FILE).exists() else path.stat().st_mtime,
            "world_size": None,
            "config": None,
        }
    try:
        meta = json.loads(file.read_text())
    except (OSError, ValueError, RecursionError) as err:
        raise CheckpointError(f"cannot read {file}: {err}") from err
    if not isinstance(meta, dict):
        raise CheckpointError(f"{file} is not a checkpoint's meta.json (a JSON object of run_id, step, saved_at, ...)")
    # the fields read later (the optional ones may be missing): a wrong type is named here, not met deep inside
    types = {"run_id": (str, type(None)), "step": int, "saved_at": (int, float), "config": (dict, type(None))}
    optional = {
        "save_index": int,
        "world_size": int,
        "input_fingerprints": dict,
        "model_architecture": dict,
    }
    bad = [k for k, t in types.items() if not isinstance(meta.get(k), t) or isinstance(meta.get(k), bool)]
    bad += [k for k, t in optional.items() if meta.get(k) is not None and not isinstance(meta[k], t)]
    if "saved_at" not in bad and not _is_finite(meta["saved_at"]):
        bad.append("saved_at")
    if bad:
        shown = ", ".join(f"{k} {meta.get(k)!r}"[:80] for k in bad)
        raise CheckpointError(f"{file} is not a checkpoint's meta.json: wrong or missing {shown}")
    if step is not None and meta["step"] != step:
        raise CheckpointError(
            f"{file} says step {meta['step']} but the folder is {path.name}: the checkpoint was "
            "renamed or edited, so it is not trusted"
        )
    return meta


def _is_finite(number: float) -> bool:
    """False for NaN, an infinity, or an integer beyond float's range (a JSON file can hold one)."""
    try:
        return math.isfinite(number)
    except OverflowError:
        return False


def save_order(paths: list[Path], log=print, metas: dict[Path, dict] | None = None) -> list[Path]:
    """Checkpoint folders oldest first. A run resumed from one of its earlier checkpoints continues from there, so
    its newest checkpoint is the last one saved, not the highest step: checkpoints of one run are ordered by the
    save count in their meta.json (`save_index`, a counter of the run's saves, which no clock can reorder). Others
    (several runs, checkpoints of earlier versions without the count) go by save time then step, unless one says it
    was saved after the present (a clock that moved back, an edited meta.json): then by step, with a note through
    `log`. `metas`: the folders' `checkpoint_meta`, where the caller has read them already."""

    step = checkpoint_step
    metas = {p: metas[p] if metas is not None and p in metas else checkpoint_meta(p) for p in paths}
    counts = [m.get("save_index") for m in metas.values()]
    if len({m["run_id"] for m in metas.values()}) == 1 and all(isinstance(c, int) for c in counts):
        if len(set(counts)) == len(counts):
            return sorted(paths, key=lambda p: (metas[p]["save_index"], step(p)))
        # two saves cannot share a count: an edited or copied meta.json; the save times decide, as for other runs
        log(
            f"note: checkpoints in {paths[0].parent} share a save count (an edited or copied meta.json): they are "
            "ordered by save time"
        )
    future = [p.name for p, m in metas.items() if m["saved_at"] > time.time()]
    if future:
        log(
            f"note: {', '.join(future)} in {paths[0].parent} {'says it was' if len(future) == 1 else 'say they were'} "
            "saved after the present (a clock that moved back, or an edited meta.json): checkpoints are ordered by step"
        )
        return sorted(paths, key=step)
    return sorted(paths, key=lambda p: (metas[p]["saved_at"], step(p)))


def _read_metas(out_dir: str | Path) -> tuple[dict[Path, dict], dict[Path, CheckpointError]]:
    """out_dir's checkpoints read once: ({folder: checkpoint_meta}, {folder whose meta.json cannot be read: why})."""
    metas, unreadable = {}, {}
    for path in list_checkpoints(out_dir):
        try:
            metas[path] = checkpoint_meta(path)
        except CheckpointError as err:
            unreadable[path] = err
    return metas, unreadable


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The most recently saved complete checkpoint in out_dir (`save_order`), whatever its run."""
    found = list_checkpoints(out_dir)
    return save_order(found)[-1] if found else None


@contextlib.contextmanager
def own_out_dir(out_dir: str | Path, is_main: bool = True):
    """Hold an exclusive lock on `out_dir` (fcntl.flock on <out_dir>/.lock, released when the block ends or the
    process dies), finish a re-save of a step that was killed between its renames (`_finish_interrupted_replacements`)
    and remove temporary checkpoint folders that an interrupted save left behind. Only the main
    process locks (it alone writes). Raises OutDirInUse naming the holder (pid, host, start time) when another
    process holds the lock, ValueError when out_dir cannot be created or written (a file in the way, no
    permission). flock is advisory and per host: runs on different machines sharing out_dir over a network file
    system may not see each other's lock."""
    if not is_main:
        yield
        return
    import fcntl

    out_dir = Path(out_dir)
    # what this run adds, removed again if it fails before writing anything else (a bad data path, ...): an empty
    # checkpoints/ left in a saved model's folder would make every loader take it for a training run's
    created = [p for p in (out_dir, checkpoint_dir(out_dir), out_dir / LOCK_FILE) if not p.exists()]
    # and the folders above it that `mkdir(parents=True)` makes (outermost first: removed last)
    missing_parents = [] if out_dir.exists() else [p for p in out_dir.absolute().parents if not p.exists()]
    created = missing_parents[::-1] + created
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        checkpoint_dir(out_dir).mkdir(exist_ok=True)  # now, not at the first save after hours of training
        fd = os.open(out_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        for folder in (out_dir, checkpoint_dir(out_dir)):  # an existing .lock opens in a folder made read-only
            probe = folder / f".write-test-{os.getpid()}"
            probe.touch()
            probe.unlink()
    except OSError as err:  # a file in the way, no write permission, a read-only file system
        in_the_way = next((p for p in (out_dir, checkpoint_dir(out_dir)) if p.exists() and not p.is_dir()), None)
        nowhere = next((p for p in (out_dir, checkpoint_dir(out_dir)) if p.is_symlink() and not p.exists()), None)
        if in_the_way:
            problem = f"{in_the_way} is a file, not a folder"
        elif nowhere:
            problem = f"{nowhere} is a symbolic link that leads nowhere (a loop, or a target that is gone)"
        else:
            problem = err.strerror
        raise ValueError(f"out_dir {out_dir} cannot hold this run's checkpoints: {problem} ({err})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        holder = os.read(fd, 4096).decode(errors="replace").strip() or "a process that has not written its name yet"
        os.close(fd)
        raise OutDirInUse(
            f"out_dir {out_dir} is in use by another run ({holder}); wait for it to finish, stop it, "
            f"or use another out_dir"
        ) from err
    try:
        os.ftruncate(fd, 0)
        os.write(
            fd,
            f"pid {os.getpid()} on host {socket.gethostname()}, started "
            f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n".encode(),
        )
        root = checkpoint_dir(out_dir)
        for name in _finish_interrupted_replacements(root):
            print(f"restored the checkpoint {name} in {root}: a save that replaced it was interrupted")
        restored = _settle_set_aside(root)
        if restored:
            print(
                f"restored the earlier run's checkpoints {', '.join(restored)} in {root}: the overwrite: true run that "
                "moved them aside stopped before its first checkpoint was whole"
            )
        leftovers = [p for p in root.iterdir() if p.name.startswith(TMP_PREFIX)] if root.is_dir() else []
        for path in leftovers:
            with contextlib.suppress(OSError):
                _remove_folder_or_link(path) if path.is_dir() else path.unlink(missing_ok=True)
        stuck = [p.name for p in leftovers if p.exists()]
        if len(leftovers) > len(stuck):
            print(
                f"removed {len(leftovers) - len(stuck)} temporary checkpoint folder(s) left by an interrupted save "
                f"or removal in {root}"
            )
        if stuck:
            print(
                f"could not remove {', '.join(stuck)} in {root} (permissions?): delete them by hand to free the space"
            )
        yield
    except BaseException:
        root = checkpoint_dir(out_dir)
        if not (root.is_dir() and any(root.iterdir())):  # no checkpoint written: .lock, then the empty folders
            for path in reversed(created):
                with contextlib.suppress(OSError):
                    path.unlink() if path.name == LOCK_FILE else path.rmdir()
        raise
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race with a waiting run)


# what a finished run leaves in out_dir besides its checkpoints (the settings files are replaced by every run's first
# output)
RUN_OUTPUTS = ("final", "history.json")


def claim_checkpoints(cfg: RunConfig, resume_from: Path | None, run_id: str | None, is_main: bool = True) -> str:
    """This run's id (the resumed checkpoint's run id, else a new uuid4 hex) after checking that out_dir's
    checkpoints may be mixed with this run's.

    A fresh run (`resume: none`, or `resume: auto` with nothing to resume), or a run resumed from a checkpoint
    outside this out_dir, must not share out_dir with another run's checkpoints: later rotation and `resume: auto`
    would mix the runs. It raises OutDirInUse listing them, unless `overwrite: true`: this run then moves them aside
    just before it first writes to out_dir and deletes them once its own first checkpoint is whole
    (`set_aside_earlier_checkpoints`); a run that stops before then (a setting or file error, W&B, its first steps,
    the first save) leaves them. Such a run also must not replace another run's finished model (`final/`) or
    `history.json` (RUN_OUTPUTS): OutDirInUse unless `overwrite: true` (they are then replaced when this run writes
    its own). A run resumed from this out_dir's own checkpoints leaves other runs' checkpoints untouched."""
    run_id = run_id or uuid.uuid4().hex
    if not is_main:
        return run_id
    foreign = _earlier_checkpoints(cfg, resume_from, run_id)
    if foreign is None:  # resumed from out_dir's own checkpoints: other runs' stay, so none may be written over
        step = checkpoint_step(resume_from) or 0
        ahead = [
            p.name
            for p in list_checkpoints(cfg.out_dir)
            if checkpoint_step(p) > step and _run_id_or_none(p) not in (None, run_id)
        ]
        if ahead:
            raise OutDirInUse(
                f"out_dir {cfg.out_dir} holds another run's checkpoints after step {step} ({', '.join(ahead)}), which "
                "this run's saves would replace: move them out of the folder, or resume in another out_dir"
            )
        return run_id
    names = ", ".join(p.name for p in foreign)
    if foreign and not cfg.overwrite:
        raise OutDirInUse(
            f"out_dir {cfg.out_dir} holds checkpoints of another run ({names}); resume it with "
            "resume: auto, use another out_dir, or set overwrite: true to delete them"
        )
    if foreign:
        print(
            f"overwrite: the earlier run's checkpoints in {checkpoint_dir(cfg.out_dir)} ({names}) are moved "
            "aside just before this run writes its first checkpoint, and deleted once that is whole"
        )
    finished = [name for name in RUN_OUTPUTS if (Path(cfg.out_dir) / name).exists()]
    if finished and _history_run_id(cfg.out_dir) == run_id:
        finished = []  # this run's own (resumed from a copy of one of its checkpoints kept elsewhere)
    if finished and not cfg.overwrite:  # a finished model and its record are replaced only when asked
        raise OutDirInUse(
            f"out_dir {cfg.out_dir} holds another run's {' and '.join(finished)}, which this run would replace; use "
            "another out_dir, or set overwrite: true to replace them when this run writes its own"
        )
    if finished:  # overwrite: true; say what stays until this run writes its own
        print(
            f"overwrite: the earlier run's {' and '.join(finished)} in {cfg.out_dir} "
            f"{'stay' if len(finished) > 1 else 'stays'} until this run writes its own (history.json at its first "
            f"checkpoint, final at its end); should it stop before, {'they are' if len(finished) > 1 else 'it is'} "
            "still the earlier run's"
        )
    return run_id


def _earlier_checkpoints(cfg: RunConfig, resume_from: Path | None, run_id: str) -> list[Path] | None:
    """out_dir's checkpoints of other runs than `run_id`; None for a run resumed from out_dir's own checkpoints
    (which leaves other runs' checkpoints alone)."""
    inside = resume_from is not None and Path(resume_from).resolve().parent == checkpoint_dir(cfg.out_dir).resolve()
    if inside:
        return None
    return [p for p in list_checkpoints(cfg.out_dir) if _run_id_or_none(p) != run_id]


def set_aside_earlier_checkpoints(cfg: RunConfig, resume_from: Path | None, run_id: str) -> list[Path]:
    """With `overwrite: true`, move out_dir's checkpoints of other runs (`claim_checkpoints` allowed them) aside,
    renamed `.overwritten-<run_id>-step_N` (no copy, no space; `run_id`: this run's), and return their new paths.
    The main process calls it just before the run first writes to out_dir (`run_training`), so a run that stops
    before then (a setting or file error, W&B, its first steps) leaves them as they were. Once the run's first save
    is over, `settle_set_aside` deletes them if a whole checkpoint of this run is in out_dir, else puts them back;
    after a kill the next start does the same (`own_out_dir`). Raises ValueError, with every one put back, when one
    cannot be moved (an interrupt also puts them back)."""
    foreign = _earlier_checkpoints(cfg, resume_from, run_id)
    if not cfg.overwrite or not foreign:
        return []
    moved = []
    try:
        for path in foreign:
            aside = path.parent / f"{SET_ASIDE_PREFIX}{run_id}-{path.name}"
            try:
                os.replace(path, aside)  # (refused where `aside` is a folder already: not overwritten)
            except OSError as err:
                raise ValueError(f"overwrite: cannot move the earlier run's checkpoint {path} aside: {err}") from err
            moved.append(aside)
    except BaseException:
        _put_back(moved)
        raise
    return moved


def _set_aside_parts(path: Path) -> tuple[str, str] | None:
    """(the overwriting run's id, the checkpoint's own name) of a folder `set_aside_earlier_checkpoints` named."""
    if not path.name.startswith(SET_ASIDE_PREFIX):
        return None
    run_id, sep, step = path.name[len(SET_ASIDE_PREFIX) :].rpartition(f"-{CHECKPOINT_PREFIX}")
    return (run_id, f"{CHECKPOINT_PREFIX}{step}") if sep and run_id else None


def _put_back(aside: list[Path]) -> list[str]:
    """Rename set-aside checkpoints back to their own names (each whose name is free); the names put back."""
    restored = []
    for path in aside:
        parts = _set_aside_parts(path)
        name = path.parent / parts[1] if parts else None
        if name is None or name.exists() or name.is_symlink():
            continue
        with contextlib.suppress(OSError):
            os.replace(path, name)
            restored.append(name.name)
    return restored


def holds_checkpoint_of(out_dir, run_id: str) -> bool:
    """Whether out_dir holds a whole checkpoint of run `run_id`."""
    return any(_run_id_or_none(p) == run_id for p in list_checkpoints(out_dir))


def settle_set_aside(aside: list[Path], run_id: str, whole: bool | None = None) -> None:
    """After an `overwrite: true` run's first save (a checkpoint, or a final model where the run saved none): the
    earlier run's checkpoints it moved aside (`set_aside_earlier_checkpoints`) are deleted when the run's output is
    `whole`, else put back under their names. `whole` None: whether out_dir now holds a whole checkpoint of run
    `run_id` (what is on disk, not whether the save raised: it may raise after its checkpoint is in place). A
    deletion that fails says where the space went (the next start tries again)."""
    if not aside:
        return
    root = aside[0].parent
    if whole is None:
        whole = holds_checkpoint_of(root.parent, run_id)
    if not whole:
        _put_back(aside)
        return
    for path in aside:
        try:
            _remove_folder_or_link(path)
        except OSError as err:
            print(f"overwrite: could not free all the space of the earlier run's {path.name}: {err}")
    names = ", ".join(parts[1] for parts in map(_set_aside_parts, aside) if parts)
    print(f"overwrite: deleted the earlier run's checkpoints in {root} ({names})")


def _settle_set_aside(root: Path) -> list[str]:
    """At a run's start, the checkpoints an `overwrite: true` run moved aside and neither deleted nor put back (it
    was killed): deleted where that run (the id in their names) left a whole checkpoint of its own in out_dir (the
    overwrite took place), else put back under their names. Returns the names put back."""
    by_run: dict[str, list[Path]] = {}
    for path in sorted(root.glob(f"{SET_ASIDE_PREFIX}*")) if root.is_dir() else []:
        parts = _set_aside_parts(path)
        if parts is not None:
            by_run.setdefault(parts[0], []).append(path)
    restored = []
    for run_id, aside in by_run.items():
        if holds_checkpoint_of(root.parent, run_id):
            settle_set_aside(aside, run_id, whole=True)
        else:
            restored += _put_back(aside)
    return restored


def _history_run_id(out_dir) -> str | None:
    """The run id in out_dir's history.json (written by `run_training` since the ids were recorded), else None."""
    try:
        with open(Path(out_dir) / "history.json", encoding="utf-8") as f:
            history = json.load(f)
    except (OSError, ValueError, RecursionError):
        return None
    return history.get("run_id") if isinstance(history, dict) else None


def _run_id_or_none(path: Path) -> str | None:
    try:
        return checkpoint_meta(path)["run_id"]
    except CheckpointError:
        return None  # an unreadable meta.json is nobody's: never deleted by rotation, counted as foreign


def _rng_state() -> dict:
    """Python, NumPy, torch (and CUDA) generator states as tensors, ints and tuples (weights-only loadable)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
    }
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


def _file_size_limit() -> int | None:
    """The process's limit on the size of a file it writes (RLIMIT_FSIZE) in bytes, or None: no limit (or no such
    limit on this system)."""
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    except (ImportError, AttributeError, OSError, ValueError):
        return None
    return None if limit == resource.RLIM_INFINITY else limit


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
    elif code == errno.EFBIG or (code is None and "unexpected pos" in str(err)):  # (torch's word for a short write)
        limit = _file_size_limit()
        cause = f"this process's file-size limit (ulimit -f) of {limit:,} bytes" if limit else "a full disk or a quota"
        what = f"a write was cut short while writing {where} ({cause}; about {needed:,} bytes needed)"
    else:
        what = f"could not write {where}: {type(err).__name__}: {err}"
    kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint of this run exists"
    return f"{what}; {kept} and the partial checkpoint was removed"


def _remove_folder_or_link(path: Path, ignore_errors: bool = False) -> None:
    """Remove a checkpoint folder (shutil.rmtree, with its `ignore_errors`), or only the link where `path` is a
    symbolic link, never what it points to."""
    if path.is_symlink():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=ignore_errors)


def _finish_interrupted_replacements(root: Path) -> list[str]:
    """Finish re-saves of a step that a kill stopped between `save_checkpoint`'s two renames, when the step has no
    folder under its own name: the new checkpoint (`.tmp-step_N-PID`, complete: the earlier one is moved aside
    only once the new one is written and synced) goes under the name, else the earlier one
    (`.tmp-replaced-step_N-PID`) goes back. Returns the names restored (what cannot be renamed is then removed
    with the other leftovers)."""
    restored = []
    marker = f"{TMP_PREFIX}replaced-"
    for old in sorted(root.glob(f"{marker}{CHECKPOINT_PREFIX}*")) if root.is_dir() else []:
        name, _, pid = old.name[len(marker) :].rpartition("-")
        final, new = root / name, root / f"{TMP_PREFIX}{name}-{pid}"
        if final.exists() or final.is_symlink():
            continue
        complete = not new.is_symlink() and (new / STATE_FILE).is_file() and (new / META_FILE).is_file()
        source = new if complete else old
        if not complete and (old.is_symlink() or not old.is_dir()):  # nothing whole to put back
            continue
        try:
            os.replace(source, final)
        except OSError:
            continue
        restored.append(name)
    return restored


def save_checkpoint(
    out_dir,
    step: int,
    model,
    optimizer,
    scheduler,
    loader,
    extra: dict,
    keep_last: int,
    run_id: str | None = None,
    world_size: int = 1,
) -> Path:
    """Write `checkpoints/step_<step>/` (state.pt: model, optimizer, scheduler, loader, RNG, the model's
    `model_architecture` and `extra`; meta.json: run id, step, save time, world size, `extra["config"]`, the input
    fingerprints and the model's architecture) atomically (temporary directory + rename), then delete
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
    metas, _ = _read_metas(out_dir)  # an unreadable meta.json is nobody's: never rotated away, never counted
    mine = save_order([p for p, m in metas.items() if m["run_id"] == run_id and p != final], metas=metas)
    previous = mine[-1] if mine else None
    counts = [metas[p].get("save_index") for p in mine]
    save_index = 1 + max((c for c in counts if isinstance(c, int)), default=0)
    state = {
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "loader": _plain(loader.state_dict()),
        "rng": _rng_state(),
        "model_architecture": model_architecture(model),
        **_plain(extra),
    }
    meta = {
        "format": CHECKPOINT_FORMAT,
        "run_id": run_id,
        "step": step,
        "saved_at": time.time(),
        "save_index": save_index,  # this run's saves counted: the order of its checkpoints whatever the clock says
        "world_size": world_size,
        "config": json.loads(json.dumps(extra.get("config"), default=str)),
        "input_fingerprints": extra.get("input_fingerprints"),
        "model_architecture": model_architecture(model),
    }
    interrupts: list[int] = []
    try:
        for path in (tmp, old):
            if path.is_symlink() or path.exists():
                _remove_folder_or_link(path)
        tmp.mkdir()
        with open(tmp / STATE_FILE, "wb") as f, _noting_interrupts(interrupts):
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        with open(tmp / META_FILE, "w") as f:
            f.write(json.dumps(meta, indent=1))
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # re-saving the same step after a resume: replace it
            print(f"note: replacing the checkpoint {final.name} saved before (the run went on from an earlier step)")
            os.replace(final, old)
        elif final.is_symlink():  # a link that leads nowhere holds nothing: moved aside like a replaced checkpoint
            print(f"note: replacing {final}, a symbolic link that leads nowhere (a loop, or a target that is gone)")
            os.replace(final, old)
        os.replace(tmp, final)
    except BaseException as err:  # also Ctrl-C: never leave a partial folder or a moved-away checkpoint behind
        shutil.rmtree(tmp, ignore_errors=True)
        if (old.exists() or old.is_symlink()) and not (final.exists() or final.is_symlink()):
            os.replace(old, final)
        if interrupts and not isinstance(err, KeyboardInterrupt):  # Ctrl-C inside torch.save's writes: it comes
            raise KeyboardInterrupt from err  # back as torch's RuntimeError, which is no write failure
        if isinstance(err, (OSError, RuntimeError)):
            raise CheckpointError(_save_error_message(err, step, final, _nbytes(state), previous)) from err
        raise
    _remove_folder_or_link(old, ignore_errors=True)  # (a linked-in folder replaced: the link goes)
    # the rename made durable where the file system can: some refuse a folder's fsync (EINVAL), and the checkpoint
    # is in place either way
    with contextlib.suppress(OSError):
        dir_fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    # the checkpoint just written is always kept; of the run's others, the newest keep_last - 1
    for stale in mine[: max(0, len(mine) - (keep_last - 1))]:
        try:
            remove_checkpoint(stale)
        except OSError as err:  # the new checkpoint is saved; an old one left behind must not stop the run
            print(f"could not remove the old checkpoint {stale} (keep_last={keep_last}): {err}")
    return final


@contextlib.contextmanager
def _noting_interrupts(interrupts: list):
    """Within the block, SIGINT (Ctrl-C) still raises KeyboardInterrupt, and is also noted in `interrupts`: torch.save
    writing to a Python file turns an exception raised in its write callback into a RuntimeError, which would
    otherwise read as a failed write. Only in the main thread (where Python handles signals); elsewhere a no-op."""
    import signal
    import threading

    previous = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    if not callable(previous):  # not the main thread, or SIGINT ignored / left to the system
        yield
        return

    def note(signum, frame):
        interrupts.append(signum)
        previous(signum, frame)  # (Python's default raises KeyboardInterrupt)

    signal.signal(signal.SIGINT, note)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def remove_checkpoint(path: Path):
    """Delete a checkpoint folder: first renamed to a temporary name (atomic), then removed. A deletion stopped
    half-way (Ctrl-C, a kill) thus never leaves a partial checkpoint under its final name, where `resume: auto`
    could pick it (e.g. state.pt left without meta.json reads as a checkpoint saved just now); the temporary
    folder is removed by the next run's `own_out_dir`."""
    path = Path(path)
    doomed = path.parent / f"{TMP_PREFIX}removing-{path.name}-{os.getpid()}"
    shutil.rmtree(doomed, ignore_errors=True)  # left by an earlier removal stopped half-way
    os.replace(path, doomed)
    try:
        shutil.rmtree(doomed)
    except OSError as err:  # e.g. read-only files: say where the space went (the next run tries again)
        raise OSError(err.errno, f"{err.strerror}; what is left of it is in {doomed}") from err


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
    Python object (which could run code when unpickled) is refused with CheckpointError, as is a corrupt one (the
    archive's CRCs are checked first)."""
    import pickle

    file = Path(path) / STATE_FILE
    try:  # torch.load does not check the archive's CRCs: a flipped byte inside a tensor would load as a weight
        with zipfile.ZipFile(file) as archive:
            damaged = archive.testzip()
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        damaged = None  # not a readable zip archive: an empty or cut-short file is named as such, else torch.load
        #                 below says what it is
        size = file.stat().st_size if file.is_file() else None
        if size == 0 or (size is not None and isinstance(err, zipfile.BadZipFile)):
            what = "empty (0 bytes)" if size == 0 else f"cut short or damaged ({size:,} bytes, not a whole archive)"
            raise CheckpointError(
                f"cannot load checkpoint {file}: it is {what}, as a crash or a full disk during its save leaves it; "
                "resume from an earlier checkpoint (resume: <its folder>) or delete this one"
            ) from None
    if damaged is not None:
        raise CheckpointError(
            f"cannot load checkpoint {file}: it is damaged ({damaged} inside it fails its CRC check); resume from "
            "an earlier checkpoint (resume: <its folder>) or delete this one"
        )
    try:
        with torch.serialization.safe_globals(_legacy_numpy_globals()):
            state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        detail = next(
            (
                line.strip()
                for line in str(err).splitlines()
                if "Unsupported global" in line or "Unsupported operand" in line
            ),
            "objects other than tensors and plain containers",
        )
        raise CheckpointError(
            f"refusing to load {file}: it is not a weights-only checkpoint ({detail}); loading it "
            "could run code stored in it. Only checkpoints written by this trainer are loaded."
        ) from None
    except Exception as err:  # a corrupt file must say which one
        raise CheckpointError(
            f"cannot load checkpoint {file}: {type(err).__name__}: {err}; resume from an earlier checkpoint "
            "(resume: <its folder>) or delete this one"
        ) from err
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
RESUME_FIXED = (
    "optimizer",
    "model_config",
    "init_from",
    "tokenizer",
    "seq_len",
    "data_dir",
    "seed",
    "data",
    "data_split",
    "data_config",
    "data_format",
    "max_conversations",
    "system_prompt",
    "max_len",
    "eval_fraction",
    "group_by_length",
    "packing",
)
# Settings applied from the current run when resuming (through the rebuilt optimizer's groups, the schedule, or
# read where used). A setting in neither tuple (a field added without deciding) is treated as fixed.
RESUME_APPLIED = (
    "micro_batch_size",
    "grad_accum",
    "max_steps",
    "muon_lr",
    "adamw_lr",
    "adamw_betas",
    "weight_decay",
    "muon_adjust_lr",
    "muon_cuda_graph",
    "grad_clip",
    "warmup_steps",
    "min_lr_ratio",
    "mixed_precision",
    "nonfinite",
    "max_consecutive_skips",
    "eval_every",
    "sample_every",
    "sample_prompts",
    "sample_tokens",
    "log_every",
    "wandb_project",
    "wandb_run_name",
    "wandb_mode",
    "progress_bar",
    "out_dir",
    "save_every",
    "keep_last",
    "stop_at_step",
    "push_to_hub",
    "hub_model_id",
    "compile",
    "regional_compile",
    "compile_mode",
    "combo_kernels",
    "eval_batches",
    "document_masking",
    "peak_tflops",
    "eval_data",
    "eval_split",
    "max_eval_conversations",
    "eval_at_start",
)
_NOT_COMPARED = ("resume", "overwrite")
# finetuning settings that may change on resume where an eval_data file holds the held-out conversations, but that
# choose the training conversations where they are split off the training data (`split_held_out`)
_SPLIT_TRAINING_DATA = ("eval_data", "max_eval_conversations")


def _splits_nothing(saved: dict, current: dict) -> bool:
    """Whether finetuning settings `saved` and `current` both hold no conversations out of the training data
    (`eval_fraction` 0: `split_held_out` then keeps them all), so that the held-out settings cannot change it."""
    fractions = [d.get("eval_fraction") for d in (saved, current)]
    return all(isinstance(f, (int, float)) and not isinstance(f, bool) and f <= 0 for f in fractions)


# Settings that name files or folders: a resumed run must find their contents as the run found them at its start
# (the names alone are compared by `compare_resume_settings`; an edited model config would change the architecture,
# an edited data file the examples, silently).
# (Settings that may change on resume, such as eval_data, are not fingerprinted.)
INPUT_SETTINGS = ("model_config", "init_from", "tokenizer", "data_dir", "data")
# files of a folder up to this size are read (configs, tokenizers); larger ones (data shards, weights) go by size
_CONTENT_LIMIT = 64 << 20


def input_fingerprints(cfg) -> dict[str, str]:
    """{setting: sha256 hex} for each of INPUT_SETTINGS that names a local file or folder (Hub ids and built-in
    names are left out). A file: its bytes. A folder: every file's relative name and size, and the bytes of those
    up to 64 MiB (config.json, meta.json, tokenizer files), so a folder of GBs of shards is stat-ed, not read; the
    outputs of a run folder inside it (this run's out_dir, or any folder holding a run's lock file or checkpoints)
    are left out."""
    out = {}
    own = _own_outputs(getattr(cfg, "out_dir", None))
    for name in INPUT_SETTINGS:
        value = getattr(cfg, name, None)
        if isinstance(value, str) and value and os.path.exists(value):
            out[name] = _fingerprint(Path(value), own)
    return out


# what a run writes in its out_dir: left out of an input folder's fingerprint when out_dir lies in that folder (or
# is it), or every checkpoint would make the input look edited
_OUT_DIR_ENTRIES = (
    *RUN_OUTPUT_FOLDERS,  # checkpoints/ and final/ (with final/'s temporary names)
    "history.json",
    "history.json.tmp",
    "train_config.json",
    "train_config.json.tmp",
    "train_config.json.staged",
    "train_config.json.staged.tmp",
    "finetune_config.json",
    "finetune_config.json.tmp",
    "finetune_config.json.staged",
    "finetune_config.json.staged.tmp",
    LOCK_FILE,
    "wandb",
    "fla_prebuild.log",
    "flash_qla_build.log",
)


def _own_outputs(out_dir) -> tuple[Path, ...]:
    if not out_dir:
        return ()
    root = Path(out_dir).resolve()
    return tuple(root / entry for entry in _OUT_DIR_ENTRIES)


def _fingerprint(path: Path, exclude: tuple[Path, ...] = ()) -> str:
    digest = hashlib.sha256()
    if path.is_file():
        files = [path]
    else:
        entries = sorted(path.rglob("*"))
        # any run's out_dir inside the folder (one holding a run's lock file or checkpoints folder): its outputs are
        # not input, or two runs writing in one data folder would each see the other's checkpoints as a data edit
        runs = {e.parent for e in entries if e.name == LOCK_FILE or (e == checkpoint_dir(e.parent) and e.is_dir())}
        exclude = (*exclude, *(out for run in runs for out in _own_outputs(run)))
        from ..data.preparation import LOCK_FILE as PREPARATION_LOCK

        # (a data folder's preparation lock holds the pid of the last `prepare`, which a rerun on a finished folder
        # also takes: no edit of the data)
        files = [e for e in entries if e.is_file() and e.name != PREPARATION_LOCK]
        if exclude:
            files = [f for f in files if not any(f.resolve().is_relative_to(e) for e in exclude)]
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.relative_to(path) if file != path else ''}\0{size}\0".encode("utf-8", "surrogateescape"))
        if file == path or size <= _CONTENT_LIMIT:
            with open(file, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def _data_tokenizer(data_dir) -> str | None:
    """The tokenizer a prepared data folder's meta.json names (what a pretraining run's `tokenizer: null` loads),
    or None where there is no such folder or name."""
    from ..data import load_meta

    if not isinstance(data_dir, str) or not data_dir:
        return None
    try:
        name = load_meta(data_dir).get("tokenizer")
    except (OSError, ValueError):  # missing or not prepare's: nothing implied
        return None
    return name if isinstance(name, str) and name else None


def same_setting(saved, value) -> bool:
    """Whether a saved setting and the current one are the same: equal as JSON values, or two names of one existing
    file or folder (`runs/data` and `/home/me/runs/data` from the same working directory)."""
    if _json_value(saved) == _json_value(value):
        return True
    if not (isinstance(saved, str) and isinstance(value, str) and saved and value):
        return False
    try:
        return os.path.samefile(os.path.expanduser(saved), os.path.expanduser(value))
    except OSError:  # either is missing or unreadable: not known to be the same
        return False


def check_inputs_unchanged(saved: dict | None, cfg, where: str, saved_settings: dict | None = None) -> None:
    """Raise ResumeSettingsError naming each of `saved`'s inputs ({setting: fingerprint}, from the run's start)
    whose file or folder, under the name it had in `saved_settings` (the run's saved settings), now holds other
    contents (a renamed input is `compare_resume_settings`' business)."""
    if not isinstance(saved, dict) or not saved:
        return
    same = {
        name
        for name in saved
        if saved_settings is None or same_setting(saved_settings.get(name), getattr(cfg, name, None))
    }
    current = input_fingerprints(cfg)
    changed = [
        f"{name} {getattr(cfg, name)}"
        for name, value in saved.items()
        if name in same and name in current and current[name] != value
    ]
    if changed:
        raise ResumeSettingsError(
            f"cannot resume from {where}: the contents of {', '.join(changed)} changed since the run started (a "
            "resumed run must read the same model config, tokenizer and data). Restore them, or start a new run "
            "(another out_dir, or resume: none with overwrite: true)."
        )


def _json_value(value):
    return json.loads(json.dumps(value, default=str))


def _run_kind(settings: dict) -> str | None:
    """ "pretraining" or "finetuning" from the fields of saved settings (None for plain RunConfig settings)."""
    return "finetuning" if "data_format" in settings else "pretraining" if "data_dir" in settings else None


def compare_resume_settings(
    saved: dict | None,
    cfg: RunConfig,
    saved_world: int | None,
    world_size: int,
    where: str = "the checkpoint",
    saved_fingerprints: dict | None = None,
) -> list[str]:
    """The differences between the settings saved in a checkpoint (`saved`, dataclasses.asdict of the run's
    config; `saved_world` processes) and `cfg` (`world_size` processes), as "name: old -> new" lines for the
    settings that may change (RESUME_APPLIED; the caller applies them). An input file or folder (INPUT_SETTINGS)
    under another name whose fingerprint equals the run's start (`saved_fingerprints`, `input_fingerprints`) was
    moved or copied, not changed: it is such a line too, marked "(moved: same contents)". Raises ResumeSettingsError
    listing every difference in any other setting (RESUME_FIXED, or one classified in neither) or in the global
    batch. Fields missing from `saved` (an older version) are not compared."""
    if saved is None:
        return []
    saved_kind, current_kind = _run_kind(saved), _run_kind(dataclasses.asdict(cfg))
    if saved_kind and current_kind and saved_kind != current_kind:
        raise ResumeSettingsError(
            f"cannot resume from {where}: it is a {saved_kind} checkpoint and this is a {current_kind} run; use "
            "another out_dir (or resume: none with overwrite: true to replace that run)"
        )
    current = dataclasses.asdict(cfg)
    fixed, changed = [], []
    prints = saved_fingerprints if isinstance(saved_fingerprints, dict) else {}
    now = None  # the current inputs' fingerprints, computed once, only where an input has another name
    # what `tokenizer: null` loads, on the saved side and now: in pretraining the tokenizer the data's meta.json
    # names, in finetuning the one saved with init_from
    if current_kind == "finetuning":
        implied_saved, implied_now = saved.get("init_from"), current.get("init_from")
    else:
        implied_saved = implied_now = _data_tokenizer(current.get("data_dir"))
    for name, value in current.items():
        if name in _NOT_COMPARED or name not in saved or same_setting(saved[name], value):
            continue
        if (
            name == "tokenizer"
            and (saved[name] or implied_saved)
            and (value or implied_now)
            and same_setting(saved[name] or implied_saved, value or implied_now)
        ):
            continue  # null and the tokenizer it loads are one tokenizer
        line = f"{name}: {saved[name]!r} -> {value!r}"
        if name in INPUT_SETTINGS and isinstance(prints.get(name), str):
            now = input_fingerprints(cfg) if now is None else now
            if now.get(name) == prints[name]:
                changed.append(f"{line} (moved: same contents)")
                continue
        applied = name in RESUME_APPLIED
        if (
            name in _SPLIT_TRAINING_DATA
            and not (saved.get("eval_data") and current.get("eval_data"))
            and not _splits_nothing(saved, current)
        ):
            # without an eval_data file the held-out conversations are split off the training data: these settings
            # then change which conversations the run trains on
            applied = False
            line += " (without eval_data it changes the training split)"
        (changed if applied else fixed).append(line)
    if saved_world is not None and all(k in saved for k in ("micro_batch_size", "grad_accum")):
        factors = (saved["micro_batch_size"], saved["grad_accum"], saved_world)
        if not all(isinstance(f, int) and not isinstance(f, bool) and f > 0 for f in factors):
            raise ResumeSettingsError(
                f"cannot resume from {where}: its saved batch (micro_batch_size x grad_accum "
                f"x processes = {' x '.join(map(repr, factors))}) is not made of positive "
                "integers; the checkpoint was edited or damaged"
            )
        old = saved["micro_batch_size"] * saved["grad_accum"] * saved_world
        new = cfg.micro_batch_size * cfg.grad_accum * world_size
        if old != new:
            fixed.append(
                f"global batch (micro_batch_size x grad_accum x processes): {saved['micro_batch_size']} x "
                f"{saved['grad_accum']} x {saved_world} = {old} -> {cfg.micro_batch_size} x "
                f"{cfg.grad_accum} x {world_size} = {new}"
            )
        # pretraining evaluates the first eval_batches x micro_batch_size x processes validation windows
        saved_evals = saved.get("eval_batches")
        if _run_kind(saved) == "pretraining" and isinstance(saved_evals, int) and not fixed:
            before = saved_evals * saved["micro_batch_size"] * saved_world
            after = getattr(cfg, "eval_batches", saved_evals) * cfg.micro_batch_size * world_size
            if before != after:
                changed.append(
                    f"evaluation: {before} -> {after} validation windows (eval_batches x micro_batch_size x "
                    "processes): evaluation losses before and after this step are of different sets"
                )
    if fixed:
        raise ResumeSettingsError(
            f"cannot resume from {where}: settings that must stay the same within a run "
            f"differ: {'; '.join(fixed)}. Restore them, or start a new run (another out_dir, "
            "or resume: none with overwrite: true)."
        )
    return changed


# config fields that leave what the weights compute unchanged: runtime switches, and fresh-model init (a resumed
# model's weights come from the checkpoint)
_NOT_ARCHITECTURE = (
    "gdn_backend",
    "gdn_chunk_size",
    "decode_cuda_graphs",
    "use_cache",
    "initializer_range",
    "zero_init_residual",
    "rescale_prenorm_residual",
    "A_init_range",
    "dt_init_range",
)
# defaults of config fields without weights of their own, as they were before checkpoints kept the model's config
# (a checkpoint without it, resumed with a model_config file that does not set them, would change them unseen):
# every value the default took in those versions (the seed's, then session 12's), since the checkpoint does not say
# which version wrote it
_DEFAULTS_BEFORE_MODEL_IN_CHECKPOINT = {"csa_window": (64, 256), "csa_blend_bias": (None, -4.0)}


def model_architecture(model) -> dict | None:
    """{field: value} of the model's config that define its function (every `__init__` field of its config class
    but `_NOT_ARCHITECTURE`), JSON values; None for a model without a transformers config. Kept in each
    checkpoint so that a resume builds the model the run trained (`check_model_unchanged`)."""
    while hasattr(model, "module"):  # DDP / accelerate wrappers
        model = model.module
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return None
    names = set(inspect.signature(type(config).__init__).parameters) - {"self", "kwargs"} - set(_NOT_ARCHITECTURE)
    return {name: _json_value(getattr(config, name, None)) for name in sorted(names)}


def check_model_unchanged(saved: dict | None, model, cfg, where: str) -> None:
    """Raise ResumeSettingsError when the model built for a resume differs from the one the checkpoint trained:
    `saved` is the checkpoint's `model_architecture`. This is what matters of the model config file (its bytes are
    then not compared: an edit that restores the trained model resumes), and it also catches what the file cannot
    show: a default of this version that differs from the version that wrote the checkpoint, for a field the file
    leaves out. For a checkpoint without `saved` (an older version, whose model_config is fingerprinted instead)
    the fields whose default changed since are looked up in a hand-written model_config file."""
    current = model_architecture(model)
    if current is None:
        return
    if isinstance(saved, dict):
        changed = [
            f"{name}: {saved[name]!r} -> {current[name]!r}"
            for name in sorted(set(saved) & set(current))
            if saved[name] != current[name]
        ]
    else:
        path = getattr(cfg, "model_config", None)
        try:
            written = json.loads(Path(path).read_text()) if path and Path(path).is_file() else None
        except (OSError, ValueError, RecursionError):
            written = None
        if not isinstance(written, dict) or "transformers_version" in written:
            return  # a saved config lists every field; a folder is read by from_pretrained the same way
        changed = [
            f"{name}: {' or '.join(map(repr, olds))} (the default then, by version) -> {current[name]!r} "
            "(the default now)"
            for name, olds in _DEFAULTS_BEFORE_MODEL_IN_CHECKPOINT.items()
            if name not in written and name in current and any(current[name] != old for old in olds)
        ]
        if changed:
            raise ResumeSettingsError(
                f"cannot resume from {where}: it was written by an older LlamaThink, and model_config {path} "
                f"leaves out fields whose default has changed since ({'; '.join(changed)}), so the model built "
                "now is not the one the checkpoint trained. Start a new run with those fields set, or resume with "
                "the LlamaThink version that started the run."
            )
        return
    if changed:
        raise ResumeSettingsError(
            f"cannot resume from {where}: the model built now differs from the one the checkpoint trained "
            f"({'; '.join(changed)}). Restore those values in the model config (a field it leaves out takes "
            "this LlamaThink version's default), or start a new run."
        )


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


def state_run_id(path: str | Path) -> str | None:
    """The run id a checkpoint's state.pt keeps (for one whose meta.json was lost), read through a memory map (the
    tensors are not read); None where there is none or the file cannot be read (its loading names the fault)."""
    import pickle

    try:
        with torch.serialization.safe_globals(_legacy_numpy_globals()):
            state = torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=True, mmap=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile):
        return None
    run_id = state.get("run_id") if isinstance(state, dict) else None
    return run_id if isinstance(run_id, str) else None


def restore_checkpoint(
    path: Path, model, optimizer, scheduler, loader, cfg: RunConfig | None = None, world_size: int = 1, log=print
) -> dict:
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
        raise CheckpointError(
            f"{path}: state.pt is at step {state['step']} but meta.json says step {meta['step']}: "
            "the files do not belong together, so the checkpoint is not trusted; resume an earlier checkpoint, or "
            "delete this one"
        )
    saved_run = state.get("run_id")
    if isinstance(saved_run, str) and meta.get("run_id") is not None and saved_run != meta["run_id"]:
        raise CheckpointError(
            f"{path}: state.pt is run {saved_run}'s but meta.json says run {meta['run_id']}: the files do not belong "
            "together (another checkpoint's state.pt was put there), so the checkpoint is not trusted; resume an "
            "earlier checkpoint, or delete this one"
        )
    if meta.get("format") == 1 and checkpoint_step(path) not in (None, state["step"]):  # no meta.json to compare
        raise CheckpointError(
            f"{path}: state.pt is at step {state['step']} but the folder is {path.name}: it was renamed or another "
            "checkpoint's state.pt was put there, so the checkpoint is not trusted; resume an earlier checkpoint, or "
            "delete this one"
        )
    _check_run_records(path, state, log)
    changes = []
    if cfg is not None:  # (a checkpoint of another kind of run or model is named before its step: no step fixes it)
        saved = meta.get("config") or state.get("config")
        fingerprints = meta.get("input_fingerprints") or state.get("input_fingerprints")
        changes = compare_resume_settings(
            saved, cfg, _saved_world_size(state, meta), world_size, where=str(path), saved_fingerprints=fingerprints
        )
        check_model_unchanged(state.get("model_architecture"), model, cfg, where=str(path))
    if cfg is not None and state["step"] > cfg.max_steps:
        raise ResumeSettingsError(
            f"cannot resume from {path}: it is at step {state['step']}, beyond max_steps="
            f"{cfg.max_steps}; set max_steps to at least {state['step']}"
        )
    claimed = [c for c in changes if c.split(":", 1)[0] in TRAINING_RECORD_SETTINGS]
    if cfg is not None and state["step"] == cfg.max_steps and claimed:
        # nothing is left to train: the changed optimizer settings would reach only the final folder's model card
        # and train_config.json, which would then name settings the model never trained with (other changes, an
        # out_dir, cadences, a Hub upload, max_steps lowered to this step, describe no training and pass)
        raise ResumeSettingsError(
            f"the run of {path} ended there (step {state['step']} = max_steps), so these changed settings would "
            f"train nothing, only rewrite the final model's records: {'; '.join(claimed)}. Raise max_steps to "
            "train on with them, or start a fresh run (resume: none, with overwrite: true to replace this one's "
            "checkpoints)"
        )
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
        raise CheckpointError(
            f"cannot resume from {path}: its {part} state does not fit this run ({type(err).__name__}: {err})"
        ) from err
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
    state["run_id"] = meta.get("run_id") or (saved_run if isinstance(saved_run, str) else None)  # meta.json lost
    state["settings_changed"] = changes
    return state


def _check_run_records(path: Path, state: dict, log=print) -> None:
    """Refuse (CheckpointError) a checkpoint whose run records a resume would carry on from are damaged: the history
    (the losses so far, which the resumed run writes to history.json over the earlier file: a missing one lost
    them), the counts of tokens and overflow steps, the W&B run id, the Gated DeltaNet kernels it trained with
    (`gdn_kernels`, kept by compiled runs). Parameters without optimizer moments after the
    first step (Muon's momentum and AdamW's averages then restart from zero) get a note through `log`: a
    parameter that never had a gradient has none, and neither do all of them in a damaged file."""

    def damaged(what: str):
        raise CheckpointError(
            f"cannot resume from {path}: its {what}; the checkpoint is damaged. Resume an earlier checkpoint "
            "(resume: <its folder>) or delete this one"
        )

    history = state.get("history")
    if history is None:
        damaged("history (the run's losses so far) is missing")
    if not isinstance(history, dict):
        damaged(f"history is a {type(history).__name__}, not a mapping")
    bad = [k for k in ("losses", "eval") if k in history and not isinstance(history[k], dict)]
    if bad:
        damaged(f"history's {', '.join(bad)} {'is not a mapping' if len(bad) == 1 else 'are not mappings'}")
    for key in ("tokens_seen", "trained_tokens", "overflow_steps"):
        value = state.get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            damaged(f"{key} is {value!r}, not a count")
    if not isinstance(state.get("wandb_run_id"), (str, type(None))):
        damaged(f"wandb_run_id is {state['wandb_run_id']!r}, not a run id")
    if state.get("gdn_kernels", "fla") not in ("fla", "flash_qla"):
        damaged(f"gdn_kernels is {state['gdn_kernels']!r}, not 'fla' or 'flash_qla'")
    moments = state["optimizer"].get("state")
    params = [i for group in state["optimizer"].get("param_groups", []) for i in group.get("params", [])]
    if state["step"] > 0 and isinstance(moments, dict) and params:
        without = [i for i in params if i not in moments]
        if without:
            log(
                f"note: {path} is at step {state['step']}, but its optimizer state has no moments for "
                f"{len(without)} of {len(params)} parameters (Muon's momentum, AdamW's averages): "
                f"{'a damaged file, or ' if len(without) == len(params) else ''}parameters that had no gradient yet; "
                "they start from zero"
            )


def resolve_resume(cfg: RunConfig, log=print) -> Path | None:
    """The checkpoint to resume: none for `resume: none`; for `resume: auto` the most recently saved checkpoint
    in out_dir (`save_order`), if any; else the named checkpoint folder (FileNotFoundError when it holds no
    state.pt). Notes (a save time in the future, a newer folder without state.pt, an older folder whose meta.json
    cannot be read, passed over) go through `log`. Raises CheckpointError when a folder whose meta.json cannot be
    read is at the highest step of out_dir's checkpoints: it may be where the run stopped, so `resume: auto` does
    not guess (the message says how to go on)."""
    if cfg.resume == "none":
        return None
    if cfg.resume == "auto":
        metas, unreadable = _read_metas(cfg.out_dir)
        latest = save_order(list(metas), log, metas=metas)[-1] if metas else None
        highest = max(map(checkpoint_step, metas), default=-1)
        top = max(unreadable, key=checkpoint_step, default=None)
        if top is not None and checkpoint_step(top) >= highest:
            raise CheckpointError(
                f"{unreadable[top]}; it is the checkpoint of the highest step in {checkpoint_dir(cfg.out_dir)}, so "
                f"resume: auto cannot tell where the run stopped: repair its meta.json or move {top.name} out of the "
                "folder, or name the checkpoint to go on from (--resume PATH)"
            )
        if unreadable:
            names = ", ".join(p.name for p in unreadable)
            log(
                f"note: passing over {names} in {checkpoint_dir(cfg.out_dir)} (meta.json cannot be read: "
                f"{next(iter(unreadable.values()))}); resuming {latest.name}"
            )
        newest = checkpoint_step(latest) if latest else -1
        incomplete = sorted(
            p.name
            for p in _checkpoint_folders(cfg.out_dir)
            if checkpoint_step(p) > newest and not (p / STATE_FILE).exists()
        )
        links = sorted(p.name for p in _checkpoint_folders(cfg.out_dir) if p.is_symlink())
        if links:  # never resumed nor rotated (`list_checkpoints`): say so, or a linked-in checkpoint seems lost
            log(
                f"note: {', '.join(links)} in {checkpoint_dir(cfg.out_dir)} "
                f"{'is a symbolic link' if len(links) == 1 else 'are symbolic links'}, which resume: auto passes over "
                "(a link may point outside out_dir, where rotation must not delete); name the checkpoint "
                "(--resume PATH) to go on from it; "
                + (f"resuming {latest.name}" if latest else "starting from scratch")
            )
        if incomplete:  # a checkpoint folder that lost its state.pt: say that it is passed over
            log(
                f"note: {', '.join(incomplete)} in {checkpoint_dir(cfg.out_dir)} hold{'s' if len(incomplete) == 1 else ''} no {STATE_FILE} "
                f"and {'is' if len(incomplete) == 1 else 'are'} not a checkpoint; "
                + (f"resuming {latest.name}" if latest else "starting from scratch")
            )
        return latest
    path = Path(cfg.resume)
    if not (path / STATE_FILE).exists():
        run = path.parent if path.name == checkpoint_dir(path.parent).name else path  # out_dir or its checkpoints/
        if path.name == STATE_FILE and path.is_file():
            hint = f"name its folder: resume: {path.parent}"
        elif path.is_dir() and list_checkpoints(run):
            hint = (
                f"that is a run's folder: name one of its {CHECKPOINT_PREFIX}* checkpoints, or use resume: auto "
                f"with out_dir: {run}"
            )
        else:
            hint = f"resume takes auto, none or a checkpoint folder ({CHECKPOINT_PREFIX}*) holding {STATE_FILE}"
        raise FileNotFoundError(f"resume={cfg.resume}: no checkpoint ({STATE_FILE}) there; {hint}")
    return path
