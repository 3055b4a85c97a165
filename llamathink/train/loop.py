"""The training loop shared by pretraining and chat finetuning, with accelerate (one to many processes).

`run_training` is the loop: one optimizer step = `grad_accum` micro-batches per process, the loss of the step the
mean over every trained token of the step (each token weighs the same, whatever its micro-batch or process),
gradient clipping, the optimizer step (non-finite losses and fp16 loss-scale overflows handled by
`optimizer_step`, or read a step or two late where no update depends on them, `StepValues`), the learning-rate
schedule, logging (progress bar, Weights & Biases, `history.json`), evaluation, samples, checkpoints
(`llamathink.train.checkpoint`) and the final `save_pretrained` folder. What
differs between pretraining and finetuning comes in as plain callables and values: how many loss terms a batch
has, how to evaluate, what samples to print, extra metrics, and how to write the final folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..cli import tolerant_output
from ..data.chat import trained_tokens as count_trained_tokens
from ..modeling_llamathink import check_token_values, inputs_checked_by_caller, uses_cuda_graphs
from .checkpoint import (
    CheckpointError,
    OutDirInUse,
    ResumeSettingsError,
    check_inputs_unchanged,
    checkpoint_dir,
    checkpoint_meta,
    claim_checkpoints,
    holds_checkpoint_of,
    input_fingerprints,
    latest_checkpoint,
    list_checkpoints,
    resolve_resume,
    restore_checkpoint,
    save_checkpoint,
    set_aside_earlier_checkpoints,
    settle_set_aside,
    state_run_id,
)
from .config import RunConfig, load_config
from .optim import build_optimizer, lr_factor, summarize_param_groups

# ----------------------------------------------------------------------------------------------------------------
# The optimizer step, non-finite losses, the accelerator, history and the final folder
# ----------------------------------------------------------------------------------------------------------------


class OutputWriteError(ValueError):
    """The run's history or finished model could not be written (full disk, permissions); the message says what
    is intact and how to go on."""


def _output_write_error(target, err: BaseException, intact: str, then: str) -> OutputWriteError:
    """The error for an output the run could not write (a full disk, permissions): what failed, what is still
    safe, and how to go on."""
    if isinstance(err, OSError) and err.strerror:  # (a failed rename names both of its paths)
        paths = " -> ".join(str(p) for p in (err.filename, err.filename2) if p)
        detail = f"{err.strerror}: {paths}" if paths else err.strerror
    else:
        detail = f"{type(err).__name__}: {err}"
    return OutputWriteError(
        f"cannot write {target} ({detail}); {intact} intact: free space, fix the permissions or move what is in "
        f"the way, then {then}"
    )


def _write_json(path: Path, text: str, then: str):
    """`text` (JSON) at `path` in out_dir through `<path>.tmp` and a rename, so the earlier file stays whole if the
    write fails; OutputWriteError naming it, with `then` (how to go on), when it cannot be written."""
    tmp = path.with_name(f"{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise _output_write_error(path, err, f"the checkpoints in {checkpoint_dir(path.parent)} are", then) from err


def write_history(out_dir: Path, history: dict):
    """`history.json`: per-step training loss, evaluation loss and performance metrics (for plots and reports).
    Raises OutputWriteError when it cannot be written (the earlier history.json stays whole)."""
    text = json.dumps(history, indent=1, default=float)
    _write_json(Path(out_dir) / "history.json", text, "go on from the last one with --resume auto --overwrite false")


def write_settings(path: Path, cfg) -> None:
    """A run's settings (a dataclass) as JSON at `path` (its record in out_dir), written as `write_history` writes.
    Raises OutputWriteError naming the file (e.g. a folder in the way, a full disk)."""
    _write_json(Path(path), json.dumps(dataclasses.asdict(cfg), indent=2, default=str), "start the run again")


class StagedSettings:
    """A run's record of its settings (`write_settings`) that takes the place of out_dir's earlier one only with the
    run's first output: written to `<path>.staged` at `stage` (a failure there moves nothing), then moved over `path`
    by `settle(True)` once a first checkpoint or history of the run is in out_dir, or removed by `settle(False)`. A
    run whose first save fails (a full disk) thus leaves the earlier run's record beside the earlier run's outputs,
    not one naming settings that nothing in out_dir trained with. Raises OutputWriteError naming the file."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.staged = self.path.with_name(f"{self.path.name}.staged")
        self.pending = False

    def stage(self, cfg) -> None:
        """Write the settings `cfg` (a dataclass) to `<path>.staged`."""
        write_settings(self.staged, cfg)
        self.pending = True

    def settle(self, in_place: bool) -> None:
        """Move the staged settings over `path` (`in_place`: the run's first output is in out_dir) or drop them."""
        if not self.pending:
            return
        self.pending = False
        self._move_or_drop(in_place)

    def recover(self) -> None:
        """At a run's start: settings a killed run left staged are moved over `path` where out_dir's last saved
        checkpoint trained with them (its meta.json's config: the run was killed between that checkpoint and the
        move), else dropped. Raises ValueError where `path` or the staged name is not a file (a folder in the way:
        the steps until the first save would be lost)."""
        # (and the temporary names they are written through, `_write_json`)
        names = (self.path, self.staged, self.staged.with_name(f"{self.staged.name}.tmp"))
        for path in names:
            if (path.is_symlink() or path.exists()) and not path.is_file():
                raise ValueError(  # now, not at the first checkpoint: the steps until then would be lost
                    f"{path}, where the run records its settings, is not a file: move it out of the way"
                )
        if not self.staged.exists():
            return
        try:
            staged = json.loads(self.staged.read_text())
        except (OSError, ValueError, UnicodeDecodeError):  # (cut short by the kill: not the newest checkpoint's)
            staged = None
        try:  # (the last saved: a resumed run's may be of a lower step)
            newest = latest_checkpoint(self.path.parent)
            trained = checkpoint_meta(newest).get("config") if newest is not None else None
        except CheckpointError:  # (a damaged meta.json: the resume names it, or passes over it)
            trained = None
        self._move_or_drop(staged is not None and staged == trained)

    def _move_or_drop(self, in_place: bool) -> None:
        try:
            if in_place:
                os.replace(self.staged, self.path)
            else:
                self.staged.unlink(missing_ok=True)
        except OSError as err:
            raise _output_write_error(
                self.path, err, f"the checkpoints in {checkpoint_dir(self.path.parent)} are", "start the run again"
            ) from err


class NonFiniteLoss(RuntimeError):
    """A non-finite loss or gradient stopped the run (`nonfinite: stop`, or too many such steps in a row)."""


class StepValues:
    """Each optimizer step's mean loss and gradient norm, read on the host without waiting for the GPU.

    Reading a step's values as soon as it is launched (`.tolist()`) waits for the GPU to finish the step, which
    then sits idle while the host launches the next one. `add` instead starts a copy of a step's values [2] (a
    float32 device tensor: loss, gradient norm) to pinned host memory and records a CUDA event after it; `ready`
    hands back, oldest first, the values of all but the last `max_lag` steps added (which keeps the host at most
    about `max_lag` steps ahead of the GPU, and a non-finite step's report at most as many steps late); `drain`
    those of all. On a CPU device the values are kept as they are (already computed)."""

    def __init__(self, max_lag: int = 2):
        self.max_lag = max_lag
        self._pending: list[tuple[int, torch.Tensor, torch.cuda.Event | None]] = []

    def add(self, step: int, values: torch.Tensor) -> None:
        """Start reading `values` [2] of optimizer step `step` (its number as the log names it)."""
        if values.device.type != "cuda":
            self._pending.append((step, values.detach().clone(), None))
            return
        host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
        host.copy_(values.detach(), non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(values.device))  # (the stream of the copy, whatever the current device)
        self._pending.append((step, host, event))

    def ready(self) -> list[tuple[int, float, float]]:
        """(step, loss, gradient norm) of the steps added before the last `max_lag`, oldest first, waiting for their
        copies (which the GPU has made by then, as a rule: it is working on a later step). Which steps come back
        depends only on how many were added, so that every process of a run reads the same steps at the same time."""
        n = max(0, len(self._pending) - self.max_lag)
        out = [self._read(entry) for entry in self._pending[:n]]
        del self._pending[:n]
        return out

    def drain(self) -> list[tuple[int, float, float]]:
        """(step, loss, gradient norm) of every step added and not yet handed back, waiting for the GPU."""
        out = [self._read(entry) for entry in self._pending]
        self._pending.clear()
        return out

    @staticmethod
    def _read(entry: tuple[int, torch.Tensor, torch.cuda.Event | None]) -> tuple[int, float, float]:
        step, host, event = entry
        if event is not None:
            event.synchronize()
        loss, grad_norm = host.tolist()
        return step, loss, grad_norm


@dataclass
class StepCounters:
    """What `optimizer_step` counts: non-finite steps in a row (reset by an update) and loss-scale overflow steps
    (fp16 with a GradScaler) over the run."""

    skips: int = 0
    overflows: int = 0


def optimizer_step(
    cfg: RunConfig,
    step: int,
    loss_value: float,
    grad_norm,
    optimizer,
    accelerator,
    counters: StepCounters,
    scaler=None,
    set_to_none: bool = True,
) -> bool:
    """Update the weights with the accumulated gradients, or skip the update; True when the weights changed.
    `step` names the step in messages: the one this update would complete (1 for the first).

    Call once per optimizer step after the gradients were unscaled and clipped (accelerator.clip_grad_norm_ does
    both). Without a loss scaler, a non-finite loss or gradient norm goes to `skip_nonfinite_step` (stop, or skip
    with nonfinite: skip). With one (`scaler`, e.g. accelerate's GradScaler for fp16), only the loss value decides
    that: non-finite gradients with a finite loss are a loss-scale overflow, which the scaler handles (its step
    skips the update and its update halves the scale); the overflow is counted in `counters.overflows` and
    printed. Only when the scale has fallen below 1, so the gradients overflow without any scaling, is the step
    treated as non-finite. Every path ends the scaler's step (`update`), so the next step may unscale again.
    `optimizer` may be accelerate's AcceleratedOptimizer built with `scaler` (its step calls scaler.step and
    scaler.update) or a plain optimizer (then they are called here). `set_to_none`: how the gradients are cleared
    afterwards (`zero_grad`); False keeps the `.grad` tensors (CUDA-graph training accumulates into them)."""
    if scaler is not None and not math.isfinite(loss_value):
        scaler.update()  # ends this step (the gradients were unscaled), so the next unscale_ is allowed
    if not math.isfinite(loss_value) or (scaler is None and not bool(torch.isfinite(torch.as_tensor(grad_norm)))):
        counters.skips = skip_nonfinite_step(
            cfg, step, loss_value, grad_norm, counters.skips, optimizer, accelerator, set_to_none
        )
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
            optimizer.zero_grad(set_to_none=set_to_none)
            counters.overflows += 1
            accelerator.print(
                f"loss-scale overflow at step {step} (grad norm {float(grad_norm)}): update skipped, "
                f"scale {scale:g} -> {new_scale:g} ({counters.overflows} overflow steps so far)"
            )
            if new_scale < 1.0:
                counters.skips = skip_nonfinite_step(
                    cfg, step, loss_value, grad_norm, counters.skips, optimizer, accelerator, set_to_none
                )
            return False
    optimizer.zero_grad(set_to_none=set_to_none)
    counters.skips = 0
    return True


def make_accelerator(cfg: RunConfig):
    """The accelerate Accelerator of a run (mixed precision from `cfg`; on CUDA with fp16 it owns a GradScaler).
    Raises ValueError for fp16 without CUDA: accelerate would train in fp32 there, while the run records fp16.
    The run config's precision is the one trained with; where `accelerate launch` asked for another (its config
    file's `mixed_precision` or `--mixed_precision`, passed on in ACCELERATE_MIXED_PRECISION), a warning says so."""
    from accelerate import Accelerator

    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ValueError(
            "mixed_precision: fp16 needs a CUDA GPU (on the CPU accelerate trains in fp32 without a word); use bf16 "
            "or no"
        )
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if launched is not None and launched != cfg.mixed_precision:
        warnings.warn(
            f"accelerate launch asked for mixed precision {launched!r} (its config file or --mixed_precision); this "
            f"run trains with its own mixed_precision: {cfg.mixed_precision!r} (the run config or --mixed_precision "
            "of the training command): set that one to change it",
            stacklevel=2,
        )
    return Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())


def skip_nonfinite_step(
    cfg: RunConfig,
    step: int,
    loss_value: float,
    grad_norm,
    skips: int,
    optimizer,
    accelerator,
    set_to_none: bool = True,
) -> int:
    """A non-finite loss or gradient at `step`: drop the gradients, then stop (NonFiniteLoss) with nonfinite: stop
    or after max_consecutive_skips such steps in a row; else say so and return the new count of skips in a row."""
    optimizer.zero_grad(set_to_none=set_to_none)
    message = f"non-finite loss or gradient at step {step} (loss {loss_value}, grad norm {float(grad_norm)})"
    if cfg.nonfinite == "stop":
        saved = list_checkpoints(cfg.out_dir)
        kept = f"The last checkpoint, {saved[-1]}, is intact." if saved else "No checkpoint had been written yet."
        raise NonFiniteLoss(message + f"; stopping (set nonfinite: skip to skip such steps). {kept}")
    skips += 1
    accelerator.print(message + f"; step skipped ({skips} in a row)")
    if skips >= cfg.max_consecutive_skips:
        raise NonFiniteLoss(f"{skips} consecutive non-finite steps; stopping")
    return skips


def save_final(
    model,
    tokenizer,
    final_dir: Path,
    cfg: RunConfig,
    history: dict | None = None,
    tokens_seen: int | None = None,
    on_saved: Callable[[], None] | None = None,
):
    """The finished model as a save_pretrained directory: weights, config and model code, the tokenizer (if any)
    with generation defaults (left padding, `model_max_length` = the model's context; see
    `llamathink.tokenizer_utils.save_tokenizer_for_model`) and a model card `README.md` built from `cfg`, the run
    `history` ({"losses": {step: loss}, "eval": {step: loss}}) and `tokens_seen` (`llamathink.model_card`).
    With `cfg.push_to_hub` the folder, card included, is uploaded as it is to `cfg.hub_model_id`, after
    `on_saved()` (called once the folder is in place: what a kill during the upload must not undo)."""
    from ..model_card import write_model_card
    from ..tokenizer_utils import save_tokenizer_for_model

    final_dir = Path(final_dir)
    try:  # (a link to a folder still to be made is written through: there)
        final_dir = final_dir.resolve()
    except RuntimeError:  # a link that loops holds nothing: it goes, as `save_checkpoint` replaces one
        print(f"note: replacing {final_dir}, a symbolic link that leads nowhere (a loop)")
        final_dir.unlink()
        final_dir = final_dir.resolve()
    # written next to its place and renamed: a failure (full disk, Ctrl-C) leaves the earlier folder, if any, whole
    tmp, old = final_dir.with_name(f".{final_dir.name}.tmp"), final_dir.with_name(f".{final_dir.name}.old")
    if old.exists() and not final_dir.exists():  # killed between the two renames below: the earlier folder back
        os.replace(old, final_dir)
    for path in (tmp, old):
        shutil.rmtree(path, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer = save_tokenizer_for_model(tokenizer, tmp, model.config.max_position_embeddings)
        write_model_card(tmp, model, cfg, history=history, tokens_seen=tokens_seen, tokenizer=tokenizer)
        if final_dir.exists():
            os.replace(final_dir, old)
        os.replace(tmp, final_dir)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not final_dir.exists():
            os.replace(old, final_dir)
        from safetensors import SafetensorError

        if isinstance(err, (OSError, SafetensorError)):  # a full disk, permissions (not other failures: bugs)
            raise _output_write_error(
                f"the finished model to {final_dir}",
                err,
                "the run's last checkpoint is",
                "rerun with --resume auto --overwrite false, which saves the finished model again",
            ) from err
        raise
    shutil.rmtree(old, ignore_errors=True)
    if on_saved is not None:
        on_saved()
    if cfg.push_to_hub:
        # push_to_hub of the model would write transformers' generic card over ours; upload the folder instead
        import huggingface_hub

        try:
            huggingface_hub.create_repo(cfg.hub_model_id, exist_ok=True)
            huggingface_hub.upload_folder(
                repo_id=cfg.hub_model_id, folder_path=str(final_dir), commit_message="Upload LlamaThink model"
            )
        except Exception as err:  # network, token, permissions: the trained model is safe on disk either way
            raise HubUploadError(
                f"the model is saved in {final_dir}, but uploading it to the Hub as {cfg.hub_model_id} failed "
                f"({type(err).__name__}: {err}); upload it with `hf upload {cfg.hub_model_id} {final_dir}`, or rerun "
                "the same command (with resume: auto it goes straight to the upload)"
            ) from err


class HubUploadError(ValueError):
    """`push_to_hub` failed after the finished model was saved locally (the message names the folder)."""


def check_hub_access(cfg: RunConfig) -> None:
    """With `push_to_hub`, ask the Hub who the token belongs to before any training: a missing token, a refused one
    or no network then stops the run in seconds (ValueError), not after it has trained for hours."""
    if not cfg.push_to_hub:
        return
    import huggingface_hub

    if huggingface_hub.get_token() is None:
        raise ValueError(
            "push_to_hub needs a Hugging Face token (`hf auth login` or `huggingface-cli login`, or the HF_TOKEN "
            "environment variable); or set push_to_hub: false and upload the final folder later"
        )
    try:
        me = huggingface_hub.HfApi().whoami()
    except Exception as err:  # offline mode, no network, an invalid token
        raise ValueError(
            f"push_to_hub: the Hub cannot be reached or refuses the token ({type(err).__name__}: {err}); or set "
            "push_to_hub: false and upload the final folder later"
        ) from err
    role = ((me.get("auth") or {}).get("accessToken") or {}).get("role") if isinstance(me, dict) else None
    if role == "read":
        raise ValueError(
            "push_to_hub: the Hugging Face token is read-only; log in with a token that can write, or set "
            "push_to_hub: false and upload the final folder later"
        )


def _init_wandb(cfg: RunConfig, run_id: str | None):
    if cfg.wandb_mode == "disabled" or cfg.wandb_project is None:
        return None
    try:
        import wandb
    except ImportError as err:
        raise ImportError("wandb is not installed: pip install wandb, or set wandb_mode: disabled") from err
    folder = Path(cfg.out_dir) / "wandb"  # where W&B writes its run files (`dir`)
    made = not (folder.exists() or folder.is_symlink())
    try:
        return wandb.init(
            project=cfg.wandb_project,
            name=cfg.wandb_run_name,
            mode=cfg.wandb_mode,
            id=run_id,
            resume="allow" if run_id else None,
            config=dataclasses.asdict(cfg),
            dir=str(Path(cfg.out_dir)),
        )
    except Exception as err:  # no API key, no network, a setting W&B refuses (before the first step: nothing is lost)
        if made:  # the files of the run that did not start: a failed start leaves out_dir as it found it
            shutil.rmtree(folder, ignore_errors=True)
        if cfg.wandb_mode == "online":
            hint = "log in (`wandb login`), or set wandb_mode: offline (sync later) or disabled"
        else:  # an offline run needs no login or network: a setting or its folder is the cause
            hint = (
                f"check wandb_project, wandb_run_name and that {cfg.out_dir} is writable, or set wandb_mode: disabled"
            )
        raise ValueError(
            f"wandb_mode={cfg.wandb_mode}: W&B could not start the run ({type(err).__name__}: {err}); {hint}"
        ) from err


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sample_room(model, prompt: str, prompt_tokens: int) -> int:
    """How many tokens a sample may generate after its prompt of `prompt_tokens` tokens, in the model's context
    (`max_position_embeddings`); 0, with a printed note naming the prompt, where the prompt fills the context: the
    training run's samples skip it rather than stop the run."""
    room = model.config.max_position_embeddings - prompt_tokens
    if room <= 0:
        print(
            f"sample prompt skipped: its {prompt_tokens} tokens fill the model's context "
            f"(max_position_embeddings={model.config.max_position_embeddings}): {prompt[:40]!r}..."
        )
    return max(room, 0)


def on_main_for_all(accelerator, fn: Callable, share_result: bool = False):
    """`fn()` on the main process alone, its outcome reaching every process: an error it raises is raised on every
    process (same type and message), so that no process goes on into a collective (DDP's setup, a barrier) that the
    stopped main process never joins: gloo then fails with a traceback of its own, NCCL waits until its timeout.
    Returns fn's result on the main process, and on the others too with `share_result` (it must pickle), else None
    there. Without several processes (`accelerator` None or of one process) it is `fn()`."""
    if accelerator is None or accelerator.num_processes == 1:
        return fn()
    from accelerate.utils import broadcast_object_list

    outcome, error = [None, None], None
    if accelerator.is_main_process:
        try:
            result = fn()
            outcome = [None, result if share_result else None]
        except Exception as err:  # noqa: BLE001 - raised again below, here and on every other process
            error, outcome = err, [(type(err), str(err)), None]
    failure, shared = broadcast_object_list(outcome)
    if failure is not None:
        if error is None:
            kind, message = failure
            try:
                error = kind(message)
            except Exception:  # noqa: BLE001 - an error type that takes other arguments: its message all the same
                error = RuntimeError(message)
        error.on_every_process = True  # (every process stops here: `command_main` may end the process group)
        raise error
    return result if accelerator.is_main_process else shared


def begin_run(cfg: RunConfig, accelerator=None) -> tuple[Path | None, str]:
    """(the checkpoint to resume or None, this run's id), checked before any data or model is loaded: a resume that
    cannot work, an out_dir holding another run's checkpoints, or a `push_to_hub` the Hub will not take, fails in
    seconds rather than after the data is read or the model trained (`resolve_resume`, `claim_checkpoints`,
    `check_hub_access`, `check_inputs_unchanged`). The checks of the main process alone (`on_main_for_all`) stop
    every process of a multi-process run, and its run id is every process's."""
    is_main = accelerator is None or accelerator.is_main_process
    on_main_for_all(accelerator, lambda: check_hub_access(cfg))
    resume_from = resolve_resume(cfg, log=print if is_main else lambda message: None)  # its notes once, not per rank
    meta = checkpoint_meta(resume_from) if resume_from is not None else {}
    if resume_from is not None and meta.get("run_id") is None:  # meta.json lost (or an older format)
        saved_id = state_run_id(resume_from)
        if saved_id is not None:
            if is_main:
                print(f"note: {resume_from} has no meta.json; going on with its run {saved_id} (state.pt)")
            meta = {**meta, "run_id": saved_id}

    def main_checks() -> str:
        if resume_from is not None:  # inputs edited in place since the run started
            fingerprints = dict(meta.get("input_fingerprints") or {})
            if meta.get("model_architecture") is not None:  # the model it builds is compared instead, as built
                fingerprints.pop("model_config", None)  # (`check_model_unchanged`): an edit that restores it resumes
            check_inputs_unchanged(fingerprints, cfg, str(resume_from), meta.get("config"))
        return claim_checkpoints(cfg, resume_from, meta.get("run_id"))

    return resume_from, on_main_for_all(accelerator, main_checks, share_result=True)


# Batch keys the loop passes to the model when a batch has them (a loader may add others, e.g. the attention_mask of
# right padding, which causal mixers do not need: padding after the last real token never reaches it).
# position_ids that restart at 0 mark packed documents, which the model keeps apart.
MODEL_INPUTS = ("input_ids", "labels", "position_ids")


def check_batch_on_host(batch: dict, raw_model):
    """Check a batch's `input_ids` and `labels` (`check_token_values`: ValueError naming a token id outside the
    vocabulary or a label that is neither -100 nor one) and return the context to run its forward in:
    `inputs_checked_by_caller(raw_model)` where they are CPU tensors, whose check needs no device sync, so that the
    forward skips its own check, which would wait for the GPU to finish the previous step and then leave it idle
    while the host launches the next (with the copies of `to_device`, which do not wait either); else a plain
    context, the forward checking them where they lie."""
    given = {k: batch[k] for k in ("input_ids", "labels") if k in batch}
    if not given or any(t.device.type != "cpu" for t in given.values()):
        return contextlib.nullcontext()
    check_token_values(raw_model.config.vocab_size, **given)
    return inputs_checked_by_caller(raw_model)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device`. A CPU tensor goes to a CUDA device through a contiguous pinned copy without the host
    waiting: a plain copy from pageable memory synchronises the stream, which drains the GPU's queue of the previous
    step's work (PyTorch's caching host allocator keeps the pinned buffer until the copy has run). The pinned copy
    is contiguous whatever `t`'s strides (an expanded or sliced batch tensor): CUDA copies other layouts through
    pageable memory."""
    if device.type == "cuda" and t.device.type == "cpu":
        pinned = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return pinned.copy_(t).to(device, non_blocking=True)
    return t.to(device)


@dataclass
class TrainingHooks:
    """What differs between pretraining and finetuning, as plain callables and values (see `run_training`).

    * `evaluate(model) -> float`: the held-out loss (`model` as prepared by accelerate, maybe compiled); None: no
      evaluation. `eval_name` labels it in the printed line.
    * `samples(raw_model) -> list[str]`: lines to print every `sample_every` steps (main process only).
    * `extra_metrics() -> dict`: metrics logged beside the loop's own (e.g. the epoch).
    * `save_final(raw_model, final_dir, history, on_saved)`: writes the finished model's folder (main process
      only), calling `on_saved()` once it is in place, before any upload (`save_final`).
    * `summary`: values recorded once in the W&B run summary of a fresh run (e.g. data counts).
    * `flops_per_token`: training FLOPs per input token and `peak_flops`: the peak FLOP/s of one device, for MFU;
      either None: no MFU.
    """

    save_final: Callable[[torch.nn.Module, Path, dict, Callable[[], None]], None]
    evaluate: Callable[[torch.nn.Module], float] | None = None
    eval_name: str = "val loss"
    samples: Callable[[torch.nn.Module], list[str]] | None = None
    extra_metrics: Callable[[], dict] | None = None
    summary: dict | None = None
    flops_per_token: float | None = None
    peak_flops: float | None = None


def _start_fla_prebuild(
    raw_model, shape: tuple[int, int, bool], dtype: torch.dtype, out_dir: Path, is_main: bool, is_local_main: bool
):
    """Start the child that builds fla's kernels (`start_fla_prebuild`): beside each process, for its own GPU, where
    each GPU's compiled kernels go to a Triton cache folder of their own (inductor's default), and beside the
    machine's first process alone where TRITON_CACHE_DIR names one folder for all; the main process logs its child to
    out_dir/fla_prebuild.log. Only an optimisation: a child that cannot be started is reported and training goes
    on."""
    if not hasattr(raw_model, "start_fla_prebuild"):
        return
    if os.environ.get("TRITON_CACHE_DIR") is not None and not is_local_main:
        return
    try:
        raw_model.start_fla_prebuild(*shape, dtype=dtype, log_path=out_dir / "fla_prebuild.log" if is_main else None)
    except Exception as err:  # noqa: BLE001 - an optimisation must never stop a run
        print(f"warning: fla's kernels are not prebuilt ({type(err).__name__}: {err}); the first step builds them")


def _choose_gdn_kernels(
    raw_model, accelerator, shape: tuple[int, int, bool], dtype: torch.dtype, resumed: str | None
) -> str | None:
    """The Gated DeltaNet kernels this compiled run trains with (`choose_training_kernels`): what a resumed run's
    checkpoint says it trained with, else the main process's choice, given to every process so that all run the
    same kernels. Printed where it is FlashQLA's or fla's."""
    if not hasattr(raw_model, "choose_training_kernels"):
        return None
    choice = resumed  # ("fla" or "flash_qla": `_check_run_records` refuses any other record)
    if choice is None and accelerator.num_processes > 1:
        choice = on_main_for_all(
            accelerator, lambda: raw_model.choose_training_kernels(*shape, dtype=dtype), share_result=True
        )
        choice = choice if choice in ("fla", "flash_qla") else None  # (others: every process finds the same)
    kernels = raw_model.choose_training_kernels(*shape, dtype=dtype, kernels=choice)
    if kernels == "flash_qla":
        how = "as the run trained with before" if resumed else "built on this machine for this batch shape"
        accelerator.print(f"Gated DeltaNet kernels: FlashQLA's ({how})")
    elif kernels == "fla" and resumed == "fla":
        accelerator.print("Gated DeltaNet kernels: fla's (as the run trained with before)")
    return kernels


def _start_flash_qla_build(raw_model, shape: tuple[int, int, bool], dtype: torch.dtype, log_path: Path | None, log):
    """Start building FlashQLA's kernels for later runs (`start_flash_qla_build`; its output in `log_path`, the main
    process's out_dir/flash_qla_build.log) and say so. Only an optimisation: a child that cannot be started is
    reported and training goes on."""
    try:
        child = raw_model.start_flash_qla_build(*shape, dtype=dtype, log_path=log_path)
    except Exception as err:  # noqa: BLE001 - an optimisation must never stop a run
        log(f"warning: FlashQLA's kernels are not being built ({type(err).__name__}: {err})")
        return
    if child is not None:
        log(
            "Gated DeltaNet kernels: fla's; FlashQLA's faster ones are being built in the background for later "
            f"runs of this shape on this machine{f' ({log_path})' if log_path is not None else ''}"
        )


def inductor_has_combo_kernels() -> bool:
    """Whether this torch's inductor has the `combo_kernels` option (`torch._inductor.config`)."""
    import torch._inductor.config as inductor_config

    return hasattr(inductor_config, "combo_kernels")


# Inductor options of the compiled layers (or model) in training, not run settings (the chunked loss compiles
# without them). `inplace_buffers=False`: inductor never writes a kernel's output into the memory of one of its
# inputs. Its autotuner clones such an in-place argument inside every timed launch of a candidate configuration
# (torch's `CachingAutotuner.bench`). With in-place buffers the six candidates of the q/k L2 norms' reduction
# (which writes its 1/rms factors in place) timed at 200-370 us each, often within 10% of one another, while in the
# step they run at 33-213 us a launch; so processes compiling the same code kept different ones (one step's kernels
# 49.7 against 48.4 ms), and inductor's on-disk cache keeps a bad pick for later runs. Without, that kernel's
# candidates time 36-215 us, as they run, and two processes both kept the fastest; kernels whose candidates run
# within a few percent of each other may still differ between processes (a few hundredths of a millisecond). Peak
# memory unchanged at batch 16 (BENCHMARKS.md section 1, session 34).
TRAINING_INDUCTOR_OPTIONS = {"inplace_buffers": False}


def compile_kwargs(mode: str = "default", combo_kernels: bool = False) -> dict:
    """torch.compile's keyword arguments for the run settings `compile_mode` and `combo_kernels`:
    {"options": inductor's options for the mode (`torch._inductor.list_mode_options`) plus
    `TRAINING_INDUCTOR_OPTIONS`, and `combo_kernels=True` with `combo_kernels`} (torch.compile takes a mode or
    options, not both). Combo kernels are inductor's horizontal fusion: independent element-wise and reduction
    kernels of one graph are emitted as one Triton kernel that dispatches on its program id, so the same per-element
    code runs in fewer launches (what a host-bound step waits on; BENCHMARKS.md section 1, sessions 24-25). Where
    this torch's inductor lacks an option, warns for `combo_kernels` and leaves it out. Raises ValueError for a mode
    torch.compile does not have, and for the run setting's "auto" (resolve it first:
    `llamathink.train.pretrain.resolve_compile_mode`)."""
    import torch._inductor.config as inductor_config
    from torch._inductor import list_mode_options

    if mode == "auto":  # a run setting, not a torch.compile mode
        raise ValueError(
            "compile_mode 'auto' is resolved by resolve_compile_mode (llamathink.train.pretrain) before compiling"
        )
    if combo_kernels and not inductor_has_combo_kernels():
        warnings.warn(
            f"combo_kernels: this torch ({torch.__version__}) has no inductor option combo_kernels; the layers "
            f"compile without combo kernels for compile_mode {mode!r}",
            stacklevel=2,
        )
        combo_kernels = False
    try:
        options = dict(list_mode_options(mode))
    except RuntimeError as err:  # torch names the modes it has
        raise ValueError(f"compile_mode {mode!r}: {err}") from None
    options.update({key: value for key, value in TRAINING_INDUCTOR_OPTIONS.items() if hasattr(inductor_config, key)})
    if combo_kernels:
        options["combo_kernels"] = True
    return {"options": options}


def run_training(
    cfg: RunConfig,
    accelerator,
    model: torch.nn.Module,
    loader,
    batches: Iterator[dict],
    hooks: TrainingHooks,
    *,
    resume_from: Path | None,
    run_id: str,
    settings_file: str,
    history: dict | None = None,
    compile: str | None = None,
    compile_mode: str = "default",
    combo_kernels: bool = True,
    fla_prebuild: tuple[int, int, bool] | None = None,
    desc: str = "train",
) -> dict:
    """Train `model` for `cfg.max_steps` optimizer steps (or to `cfg.stop_at_step`), resuming from `resume_from`.

    `batches` yields dicts with `input_ids` and `labels` [B, T] (long, CPU; -100 = no loss) and draws from
    `loader`, whose `state_dict()` / `load_state_dict()` make the data position part of the checkpoints. Each
    process takes `cfg.grad_accum` batches per step; a batch's loss is weighted by its number of loss terms
    (`llamathink.data.chat.trained_tokens`) over the step's total on all processes, so the step's loss is the mean over every trained
    token. `history` starts the record (e.g. data counts); the loop adds {"losses": {step: loss}, "eval": {step:
    loss}, "perf": {step: metrics}}, writes it to `<out_dir>/history.json` at every checkpoint and at the end, and
    keeps it in the checkpoints with the tokens seen. `settings_file` (in out_dir) receives the settings with the
    run's first output there, its first whole checkpoint or its history (`StagedSettings`).
    `compile`: None (eager), "layers" (the decoder layers compiled in place, in runs of the mixer pattern: the
    model's `compile_layers`) or "model" (the prepared model wrapped in one torch.compile); `compile_mode` is
    torch.compile's `mode`; `combo_kernels` turns on inductor's combo kernels (`compile_kwargs`). `fla_prebuild` (batch size,
    sequence length, packed), for batches of that one shape: when compiling in 16-bit, a child process builds fla's
    kernels for them while the first step compiles (`_start_fla_prebuild`).
    With a CUDA-graph mode ("reduce-overhead", "max-autotune") each micro-batch begins a new cudagraph-trees step,
    and gradients accumulate into `.grad` tensors that live for the whole run (zeroed, never set to None), so that
    no `.grad` is a graph output that the next replay overwrites.

    Returns the history plus "tokens_seen" (input positions processed), "trained_tokens" (loss terms),
    "overflow_steps" (fp16 loss-scale overflows) and "final_dir" (`<out_dir>/final`, or None when the run stopped
    before max_steps). Raises NonFiniteLoss (see `optimizer_step`), CheckpointError, ResumeSettingsError.

    With `nonfinite: stop` and no loss scaler (bf16, fp32) each update is applied without waiting for its step's
    loss and gradient norm, which are read up to two steps later, and at the first and last steps and every log
    line, evaluation, sample and checkpoint (`StepValues`), so the host keeps the GPU's queue full; a non-finite
    step then stops the run, named by that step, before any later step is logged, evaluated, sampled or saved (also
    when a later step fails first). `nonfinite: skip` and fp16's loss scaler read them before each update, which
    depends on them.
    """
    is_main = accelerator.is_main_process
    world = accelerator.num_processes
    out_dir = Path(cfg.out_dir)
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))

    own = dict(history or {})  # this run's own records (e.g. the data counts): kept over a checkpoint's
    history = {"losses": {}, "eval": {}, **own}
    start_step, wandb_id, tokens_seen, trained_tokens = 0, None, 0, 0
    counters = StepCounters()
    if resume_from is not None:
        state = restore_checkpoint(
            resume_from, model, optimizer, scheduler, loader, cfg, world_size=world, log=accelerator.print
        )
        start_step, wandb_id = state["step"], state.get("wandb_run_id")
        # counts a checkpoint of an older version did not keep are unknown (None), not restarted from 0: the
        # model card then leaves them out rather than understate them
        tokens_seen = int(state["tokens_seen"]) if "tokens_seen" in state else None
        trained_tokens = int(state["trained_tokens"]) if "trained_tokens" in state else None
        history = {**history, **state.get("history", {}), **own}
        counters.overflows = int(state.get("overflow_steps", 0))
        accelerator.print(f"resumed from {resume_from} at step {start_step} (run {run_id})")
    else:
        torch.manual_seed(cfg.seed)
    # what the run's input files held at its start, kept in every checkpoint (`check_inputs_unchanged`); the main
    # process alone reads them (it alone saves)
    fingerprints = None
    if is_main and resume_from is not None:
        fingerprints = state.get("input_fingerprints")
    if is_main and fingerprints is None:
        fingerprints = input_fingerprints(cfg)
    history["run_id"] = run_id  # history.json says whose it is (`claim_checkpoints`)
    settings_path = out_dir / settings_file

    settings = StagedSettings(settings_path)
    on_main_for_all(accelerator, settings.recover)
    claimed, set_aside = False, []

    def claim_out_dir():
        """(main process) Before this run first writes to out_dir (a checkpoint, history.json, the final model):
        this run's settings staged and the earlier run's checkpoints moved aside (overwrite: true), to be deleted
        by `settle_overwrite` once this run's first checkpoint is whole. A run that stops before then (a refused
        resume, W&B, the compilation, an evaluation, the first steps, its first save) leaves out_dir as it was."""
        nonlocal claimed
        if not claimed:
            settings.stage(cfg)  # first: a failure to write it moves nothing
            set_aside.extend(set_aside_earlier_checkpoints(cfg, resume_from, run_id))
            claimed = True

    def settle_overwrite(whole: bool | None = None):
        """(main process) After this run's first save: the earlier run's checkpoints it moved aside are deleted and
        its settings recorded if its output is whole (None: a whole checkpoint of this run is in out_dir), else the
        checkpoints are put back (`settle_set_aside`) and the staged settings dropped."""
        if not set_aside and not settings.pending:  # (settled at the first save)
            return
        if whole is None:
            whole = holds_checkpoint_of(out_dir, run_id)
        settings.settle(whole)  # first: deleting the earlier checkpoints may take a while (a kill there)
        settle_set_aside(set_aside, run_id, whole)
        set_aside.clear()

    # The optimizer is prepared so accelerate can handle mixed precision; the LR schedule is stepped by us once
    # per optimizer step (accelerate would step a prepared scheduler once per process).
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    if compile not in (None, "layers", "model"):
        raise ValueError(f"compile must be None, 'layers' or 'model', got {compile!r}")
    how = compile_kwargs(compile_mode, combo_kernels) if compile is not None else {}
    if compile == "layers":
        raw_model.compile_layers(**how)  # in place: the prepared (maybe DDP) wrapper stays as it is
    elif compile == "model":
        model = torch.compile(model, **how)
    prebuild_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)
    gdn_kernels, build_flash_qla = None, False
    if compile is not None and fla_prebuild is not None and prebuild_dtype is not None:
        resumed_kernels = state.get("gdn_kernels") if resume_from is not None else None
        gdn_kernels = _choose_gdn_kernels(raw_model, accelerator, fla_prebuild, prebuild_dtype, resumed_kernels)
        _start_fla_prebuild(
            raw_model, fla_prebuild, prebuild_dtype, out_dir, is_main, accelerator.is_local_main_process
        )
        build_flash_qla = gdn_kernels == "fla" and accelerator.is_local_main_process
    cuda_graphs = compile is not None and uses_cuda_graphs(how)
    if cuda_graphs:  # gradients accumulate into tensors of their own (see the docstring)
        for p in raw_model.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)

    run = on_main_for_all(accelerator, lambda: _init_wandb(cfg, wandb_id))  # (None on the other processes)
    if run is not None and resume_from is None and hooks.summary:
        run.summary.update({k: v for k, v in hooks.summary.items() if not isinstance(v, dict)})
    peak = hooks.peak_flops * world if hooks.flops_per_token and hooks.peak_flops else None
    accelerator.print(
        f"{sum(p.numel() for p in raw_model.parameters()):,} parameters; "
        f"{cfg.micro_batch_size} x {cfg.grad_accum} x {world} sequences per step; optimizer {cfg.optimizer}: "
        + ", ".join(f"{k} {v['params']:,}" for k, v in summarize_param_groups(optimizer.param_groups).items())
    )

    def evaluate(step: int):
        val = hooks.evaluate(model)
        history["eval"][step] = val
        train = f"train loss {history['losses'][step]:.4f}, " if step in history["losses"] else ""
        accelerator.print(f"step {step}: {train}{hooks.eval_name} {val:.4f}")
        if run is not None:
            run.log({"eval/loss": val}, step=step)

    def print_samples():  # (on the main process: `on_main_for_all`)
        for line in hooks.samples(raw_model):
            accelerator.print(f"[sample] {line}")

    def save(step: int, tokens_seen: int | None, trained_tokens: int | None):
        """A checkpoint of `step` and the history, written by the main process (`on_main_for_all`: a failure to
        write them stops every process with its message: the others would wait at the next barrier)."""
        extra = {
            "history": history,
            "config": dataclasses.asdict(cfg),
            "wandb_run_id": run.id if run is not None else wandb_id,
            "run_id": run_id,
            "overflow_steps": counters.overflows,
            "input_fingerprints": fingerprints,
        }
        if gdn_kernels in ("fla", "flash_qla"):  # a resumed run goes on with the same kernels
            extra["gdn_kernels"] = gdn_kernels
        for name, count in (("tokens_seen", tokens_seen), ("trained_tokens", trained_tokens)):
            if count is not None:  # an unknown count stays unknown in later checkpoints too
                extra[name] = count
        claim_out_dir()
        try:  # (settled from what is on disk: the save may raise after its checkpoint is in place)
            save_checkpoint(
                cfg.out_dir,
                step,
                raw_model,
                optimizer,
                scheduler,
                loader,
                extra,
                cfg.keep_last,
                run_id=run_id,
                world_size=world,
            )
        finally:
            settle_overwrite()
        write_history(out_dir, history)

    if hooks.evaluate is not None and cfg.eval_at_start and resume_from is None:
        evaluate(0)

    progress = None
    if is_main and cfg.progress_bar:
        from tqdm.auto import tqdm

        progress = tqdm(total=cfg.max_steps, initial=start_step, desc=desc, dynamic_ncols=True)

    # With nonfinite: stop and no loss scaler, no update depends on its step's loss: the update is applied at once
    # and the step's values are read a step or two later (`StepValues`), so the host never waits for the GPU to
    # finish a step before launching the next (the run stops at the first non-finite step, before any later save).
    # Otherwise (nonfinite: skip, fp16's loss scaler) each update waits for its values (`optimizer_step`).
    read_later = cfg.nonfinite == "stop" and accelerator.scaler is None
    step_values = StepValues()

    def record_read(read: list[tuple[int, float, float]]) -> None:
        """The losses of steps read late (`StepValues`) into the history; NonFiniteLoss (nonfinite: stop) naming
        the first non-finite step: the weights its update spoiled are never saved."""
        for done, loss, norm in read:
            if not (math.isfinite(loss) and math.isfinite(norm)):
                skip_nonfinite_step(cfg, done, loss, norm, 0, optimizer, accelerator, not cuda_graphs)
            history["losses"][done] = loss

    try:
        model.train()
        processed = 0  # input positions of this process's run (for tokens/s, whatever the saved counts)
        t_last, tokens_last = time.perf_counter(), processed
        optimizer_share = None
        step = start_step
        end_step = min(cfg.max_steps, cfg.stop_at_step or cfg.max_steps)
        if step >= end_step and step < cfg.max_steps:  # (a finished run resumed just saves its final model again)
            accelerator.print(
                f"note: stop_at_step {cfg.stop_at_step} is not after the resumed step {step}: no step to train"
            )
        while step < end_step:
            # --- one optimizer step: grad_accum micro-batches, every trained token weighted alike --------------------
            # On logging steps the step and the optimizer are timed with device syncs (the optimizer's share of a step).
            measure = (step + 1) % cfg.log_every == 0
            if measure:
                _sync(accelerator.device)
                t_step = time.perf_counter()
            micro_batches = [next(batches) for _ in range(cfg.grad_accum)]
            counts = [count_trained_tokens(b["labels"]) for b in micro_batches]
            n_step, positions = sum(counts), sum(b["input_ids"].numel() for b in micro_batches)
            if world > 1:  # one reduction gives the step's loss terms and input positions over all processes
                totals = torch.tensor([float(n_step), float(positions)], device=accelerator.device)
                n_step, positions = (int(v) for v in accelerator.reduce(totals, "sum").tolist())
            if n_step == 0:
                raise ValueError(f"step {step + 1}: no token of the step's batches has a label; nothing to train on")
            loss_sum = torch.zeros((), device=accelerator.device)
            for micro, (batch, n) in enumerate(zip(micro_batches, counts)):
                checked = check_batch_on_host(batch, raw_model)
                inputs = {k: to_device(batch[k], accelerator.device) for k in MODEL_INPUTS if k in batch}
                sync = micro == cfg.grad_accum - 1
                ctx = accelerator.no_sync(model) if not sync and world > 1 else contextlib.nullcontext()
                if cuda_graphs:
                    torch.compiler.cudagraph_mark_step_begin()
                with ctx, checked, accelerator.autocast():
                    if n > 0:
                        loss = model(**inputs, use_cache=False, skip_logits=True).loss  # chunked loss, no logits
                    else:  # nothing to learn in this slice; every process must still run backward for DDP
                        loss = sum(p.sum() for p in model.parameters()) * 0.0
                    accelerator.backward(loss * (n * world / n_step))  # DDP averages gradients over processes
                loss_sum += loss.detach().float() * n
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)  # unscales fp16 gradients
            values = torch.stack(  # [2]: the step's mean loss and its gradients' norm
                [
                    accelerator.reduce(loss_sum, "sum") / n_step,
                    torch.as_tensor(grad_norm, device=loss_sum.device).float(),
                ]
            )
            if measure:
                _sync(accelerator.device)
                t_opt = time.perf_counter()
            if read_later:  # (named by the step it completes, as the log names steps)
                step_values.add(step + 1, values)
                optimizer.step()
                optimizer.zero_grad(set_to_none=not cuda_graphs)
            else:  # the update depends on the values: wait for them
                loss_value, grad_norm = values.tolist()
                if not optimizer_step(
                    cfg,
                    step + 1,
                    loss_value,
                    grad_norm,
                    optimizer,
                    accelerator,
                    counters,
                    accelerator.scaler,
                    not cuda_graphs,
                ):
                    continue  # the data position advanced; the step counter did not
            if measure:
                _sync(accelerator.device)
                now = time.perf_counter()
                optimizer_share = (now - t_opt) / (now - t_step)
            step_lr = scheduler.get_last_lr()[0]  # the rate this update used (the log names it by this step)
            scheduler.step()
            step += 1
            processed += positions
            if tokens_seen is not None:
                tokens_seen += positions
            if trained_tokens is not None:
                trained_tokens += n_step
            if read_later:  # every step's values before a log line, evaluation, sample or checkpoint, and the
                # first step's before FlashQLA's background build starts (on the same steps in every process, so
                # that all stop at one non-finite step)
                pause = step in (start_step + 1, end_step) or any(
                    step % every == 0 for every in (cfg.log_every, cfg.save_every, cfg.eval_every, cfg.sample_every)
                )
                read = step_values.drain() if pause else step_values.ready()
                record_read(read)
                if pause:  # (this step's values, for its log line)
                    _, loss_value, grad_norm = read[-1]
            else:
                history["losses"][step] = loss_value
            if build_flash_qla:  # after the first step: never beside its compilation
                build_flash_qla = False
                log_path = out_dir / "flash_qla_build.log" if is_main else None
                _start_flash_qla_build(raw_model, fla_prebuild, prebuild_dtype, log_path, accelerator.print)

            # --- logging ----------------------------------------------------------------------------------------------
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                now = time.perf_counter()
                tok_s = (processed - tokens_last) / max(now - t_last, 1e-9)
                metrics = {
                    "train/loss": loss_value,
                    "train/lr": step_lr,
                    "train/grad_norm": float(grad_norm),
                    "perf/tokens_per_s": tok_s,
                    "train/overflow_steps": counters.overflows,
                }
                if tokens_seen is not None:
                    metrics["train/tokens_seen"] = tokens_seen
                if trained_tokens is not None:
                    metrics["train/trained_tokens"] = trained_tokens
                if peak:
                    metrics["perf/mfu"] = tok_s * hooks.flops_per_token / peak
                if optimizer_share is not None:
                    metrics["perf/optimizer_share"] = optimizer_share
                if accelerator.device.type == "cuda":  # this process's high-water mark so far (allocated, not reserved)
                    metrics["perf/peak_memory_gib"] = torch.cuda.max_memory_allocated(accelerator.device) / 2**30
                if hooks.extra_metrics is not None:
                    metrics.update(hooks.extra_metrics())
                history.setdefault("perf", {})[step] = metrics
                if run is not None:
                    run.log(metrics, step=step)
                if progress is not None:
                    mfu = metrics.get("perf/mfu")
                    progress.set_postfix(
                        loss=f"{loss_value:.3f}",
                        tok_s=f"{tok_s:,.0f}",
                        **({"mfu": f"{100 * mfu:.1f}%"} if mfu is not None else {}),
                    )
                else:
                    memory = metrics.get("perf/peak_memory_gib")
                    accelerator.print(
                        f"step {step}: loss {loss_value:.4f}, lr {metrics['train/lr']:.2e}, {tok_s:,.0f} tokens/s"
                        + (f", peak memory {memory:.1f} GiB" if memory is not None else "")
                    )
                t_last, tokens_last = now, processed
            if progress is not None:
                progress.update(1)

            paused = False  # evaluation, samples and checkpoints do not count towards tokens/s
            if hooks.evaluate is not None and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                paused = True
                evaluate(step)
            if hooks.samples is not None and step % cfg.sample_every == 0:
                paused = True
                on_main_for_all(accelerator, print_samples)
            if step % cfg.save_every == 0 or step == end_step:
                paused = True
                accelerator.wait_for_everyone()
                on_main_for_all(accelerator, functools.partial(save, step, tokens_seen, trained_tokens))
            if paused:
                t_last, tokens_last = time.perf_counter(), processed
    except Exception as err:
        # A later step's error must not hide an earlier non-finite step whose values were still to be read: the run
        # went wrong there. (A CUDA error may have made them unreadable: then the error stands as it is.)
        if read_later and not isinstance(err, NonFiniteLoss):
            try:
                unread = step_values.drain()
            except Exception:  # noqa: BLE001
                unread = []
            try:
                record_read(unread)
            except NonFiniteLoss as stop:
                raise NonFiniteLoss(f"{stop} (a later step then failed: {type(err).__name__}: {err})") from err
        raise
    finally:  # also when the loop stops on an error: its one-line message then starts on a line of its own
        if progress is not None:
            progress.close()

    final_dir = out_dir / "final"
    final_saved = False

    def write_run_history():
        claim_out_dir()  # (a run of no step saved no checkpoint: its history and final model are its first output)
        write_history(out_dir, history)
        settings.settle(True)  # (this run's history now stands in out_dir)

    def final_in_place():
        # the finished model is this run's output: an overwrite settles now, before a Hub upload that may be killed
        # (a run of no step saved no checkpoint, so its earlier run's checkpoints would come back beside it)
        nonlocal final_saved
        final_saved = True
        settle_overwrite(whole=True)

    try:  # (written by the main process; a failure stops every process: `on_main_for_all`)
        on_main_for_all(accelerator, write_run_history)
        if start_step < step < cfg.max_steps:  # stop_at_step: paused, not done (a run of no step said so above)
            accelerator.print(
                f"stopped at step {step} of {cfg.max_steps} (stop_at_step), checkpoint in {out_dir / 'checkpoints'}:"
                " to go on, rerun with resume: auto (the default) and a later stop_at_step or none"
            )
        if step == cfg.max_steps:
            record = {**history, "tokens_seen": tokens_seen, "trained_tokens": trained_tokens, "num_processes": world}
            on_main_for_all(accelerator, lambda: hooks.save_final(raw_model, final_dir, record, final_in_place))
    finally:
        if is_main:  # (a run that saved a checkpoint has settled already)
            settle_overwrite(whole=final_saved)
        if run is not None:  # (a failed Hub upload still ends the W&B run as finished: the training did)
            run.finish()
    accelerator.wait_for_everyone()
    return {
        **history,
        "tokens_seen": tokens_seen,
        "trained_tokens": trained_tokens,
        "final_dir": str(final_dir) if step == cfg.max_steps else None,
        "overflow_steps": counters.overflows,
    }


# What a command reports in one line (`prog: error: ...`): wrong settings, missing or unusable files and folders,
# refused resumes, an out_dir in use, a run stopped by non-finite losses. Anything else is a bug: its traceback stays.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, CheckpointError, OutDirInUse, ResumeSettingsError)


def command_main(argv: list[str] | None, *, prog: str, settings: type, run: Callable, description: str) -> int:
    """The command line of a training command (`llamathink-pretrain`, `llamathink-finetune`): `--config` YAML plus
    `--key value` overrides of any field of the `settings` dataclass, then `run(settings)`. Returns the exit status:
    0 when done; 2 with a one-line `prog: error: ...` on stderr for bad settings or inputs (`USER_ERRORS`), 1 for a
    run stopped by non-finite losses, 130 for Ctrl-C (the last checkpoint is intact either way)."""
    import argparse
    import sys

    tolerant_output()  # (a generated sample the terminal's encoding cannot hold stopped the run)
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", help=f"YAML file of {settings.__name__} settings")
    args, overrides = parser.parse_known_args(argv)
    out_dir, finished, together = None, False, False
    try:
        cfg = load_config(settings, args.config, overrides)
        out_dir = cfg.out_dir
        run(cfg)
        finished = True
    except NonFiniteLoss as err:
        print(f"{prog}: stopped: {err}", file=sys.stderr)
        return 1
    except USER_ERRORS as err:
        together = getattr(err, "on_every_process", False)  # (`on_main_for_all`: no peer waits in a collective)
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        where = ""
        if out_dir:
            saved = list_checkpoints(out_dir)
            where = (
                f"; the last checkpoint in {checkpoint_dir(out_dir)} is intact"
                if saved
                else "; no checkpoint had been written yet"
            )
        print(f"{prog}: interrupted{where}", file=sys.stderr)
        return 130
    finally:
        # After a run that went well, before the interpreter exits: a gloo or NCCL process group left to be torn
        # down at exit can abort the process ("terminate called without an active exception"). Not after an error
        # of one process: peers may still wait in a collective, and the launcher ends them.
        if (finished or together) and torch.distributed.is_available() and torch.distributed.is_initialized():
            with contextlib.suppress(Exception):
                torch.distributed.destroy_process_group()
    return 0
