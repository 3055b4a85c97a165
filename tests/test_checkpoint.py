"""The checkpoint folder and the optimizer step, on CPU: no load path runs pickled code, a run owns its out_dir
(a lock, a run id in every checkpoint, rotation within the run, no mixing with another run's checkpoints), save
failures say what happened and keep the previous checkpoint, resumes apply or refuse changed settings, and fp16
loss-scale overflows are skipped by the GradScaler and counted rather than stopping training."""

import copy
import dataclasses
import errno
import json
import os
import random
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import torch_threads
from test_train import _cfg, model_json, poison_first_step, sample_data  # noqa: F401  (session fixtures)

from llamathink import LlamaThinkConfig, LlamaThinkForCausalLM
from llamathink.data import chat as data_chat
from llamathink.muon import Muon
from llamathink.train import checkpoint as ckpt
from llamathink.train import config as run_config
from llamathink.train import finetune, loop, optim, pretrain


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


class _Loader:
    """A data loader stand-in: only its resumable position matters to checkpoints."""

    def __init__(self, position=0):
        self.position = position

    def state_dict(self):
        return {"position": self.position, "world_size": 1, "seed": 3}

    def load_state_dict(self, state):
        self.position = state["position"]


def _parts(model_json, settings, seed=0):  # noqa: F811
    torch.manual_seed(seed)
    model = LlamaThinkForCausalLM(LlamaThinkConfig.from_json_file(str(model_json)))
    optimizer = optim.build_optimizer(model, settings)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: optim.lr_factor(k, settings))
    return model, optimizer, scheduler, _Loader()


def _settings(**overrides):
    values = dict(max_steps=12, warmup_steps=2, micro_batch_size=8, grad_accum=2, wandb_mode="disabled")
    values.update(overrides)
    return run_config.RunConfig(**values)


def _save(out, step, parts, settings, run_id="run-a", keep_last=3):
    model, optimizer, scheduler, loader = parts
    extra = {"config": dataclasses.asdict(settings), "history": {"losses": {step: 1.0}}}
    return ckpt.save_checkpoint(out, step, model, optimizer, scheduler, loader, extra, keep_last, run_id=run_id)


def _names(paths):
    return [p.name for p in paths]


# ---------------------------------------------------------------------------------------------------------------
# no load path runs pickled code
# ---------------------------------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this creates `marker`: what a hostile checkpoint would do instead (run any code)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_checkpoint_with_pickled_code_is_refused_and_never_run(sample_data, model_json, tmp_path):  # noqa: F811
    out = tmp_path / "shared"
    marker = tmp_path / "pwned"
    folder = ckpt.checkpoint_dir(out) / "step_00000002"
    folder.mkdir(parents=True)
    torch.save(
        {"step": 2, "model": {}, "optimizer": {}, "scheduler": {}, "loader": {}, "rng": _Payload(marker)},
        folder / "state.pt",
    )
    with pytest.raises(ckpt.CheckpointError, match=r"refusing to load .*state.pt: it is not a weights-only"):
        ckpt.load_checkpoint(folder)
    assert not marker.exists()
    # the same folder resumed by a run (resume: auto finds it)
    with pytest.raises(ckpt.CheckpointError, match="refusing to load"):
        pretrain.train(_cfg(sample_data, model_json, out, max_steps=2))
    assert not marker.exists()


def test_checkpoints_are_weights_only_and_old_numpy_rng_checkpoints_still_load(model_json, tmp_path):  # noqa: F811
    settings = _settings()
    parts = _parts(model_json, settings)
    path = _save(tmp_path / "run", 2, parts, settings)
    state = torch.load(path / "state.pt", weights_only=True)  # no allow-list needed for what we write now
    assert state["step"] == 2 and isinstance(state["rng"]["numpy"][1], torch.Tensor)
    meta = ckpt.checkpoint_meta(path)
    assert meta["run_id"] == "run-a" and meta["step"] == 2 and meta["config"]["max_steps"] == 12

    # format 1 (before run ids): the RNG state held NumPy's ndarray; it loads weights-only through the allow-list
    np.random.seed(5)
    legacy_rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    expected = np.random.rand(3)
    legacy = tmp_path / "old" / "checkpoints" / "step_00000004"
    legacy.mkdir(parents=True)
    state.update(step=4, rng=legacy_rng, history={"losses": {4: np.float64(2.5)}})
    torch.save(state, legacy / "state.pt")
    loaded = ckpt.restore_checkpoint(legacy, *_parts(model_json, settings))
    assert loaded["step"] == 4 and loaded["history"]["losses"][4] == 2.5 and loaded["run_id"] is None
    assert np.array_equal(np.random.rand(3), expected)  # the NumPy generator continues where it was saved


def test_damaged_run_records_are_refused_before_anything_is_loaded(model_json, tmp_path):  # noqa: F811
    """The records a resume carries on from: a history that is missing (the resumed run rewrote history.json with its
    new steps only, losing the earlier ones on disk) or not a mapping (a TypeError from deep in the loop), counts
    that are not counts, a W&B id that is not one: each refused by name, the model untouched. Optimizer moments
    missing after the first step get a note naming how many."""
    settings = _settings()
    parts = _parts(model_json, settings)
    path = _save(tmp_path / "run", 4, parts, settings)
    good = torch.load(path / "state.pt", weights_only=True)
    for edit, named in [
        (lambda s: s.pop("history"), r"its history \(the run's losses so far\) is missing"),
        (lambda s: s.update(history="x"), "its history is a str, not a mapping"),
        (lambda s: s.update(history={"losses": [1.0]}), "its history's losses is not a mapping"),
        (lambda s: s.update(tokens_seen="many"), "its tokens_seen is 'many', not a count"),
        (lambda s: s.update(overflow_steps=-1), "its overflow_steps is -1, not a count"),
        (lambda s: s.update(trained_tokens=True), "its trained_tokens is True, not a count"),
        (lambda s: s.update(wandb_run_id=7), "its wandb_run_id is 7, not a run id"),
    ]:
        state = copy.deepcopy(good)
        edit(state)
        torch.save(state, path / "state.pt")
        fresh = _parts(model_json, settings, seed=1)
        before = {k: v.clone() for k, v in fresh[0].state_dict().items()}
        with pytest.raises(ckpt.CheckpointError, match=named + ".*the checkpoint is damaged"):
            ckpt.restore_checkpoint(path, *fresh, settings)
        assert all(torch.equal(before[k], v) for k, v in fresh[0].state_dict().items())
    # moments for some parameters only: a note, and the resume goes on
    model, optimizer = parts[0], parts[1]
    for p in model.parameters():
        p.grad = torch.ones_like(p) if p.dim() == 1 else None  # the 1-D ones (AdamW's) step, the matrices do not
    optimizer.step()
    path = _save(tmp_path / "run2", 4, parts, settings)
    logged = []
    ckpt.restore_checkpoint(path, *_parts(model_json, settings, seed=1), settings, log=logged.append)
    n_all = sum(1 for _ in model.parameters())
    n_without = sum(1 for p in model.parameters() if p.dim() != 1)
    assert any(f"no moments for {n_without} of {n_all} parameters" in m for m in logged), logged
    assert not any("a damaged file" in m for m in logged)


def test_a_corrupt_checkpoint_or_meta_is_named(model_json, tmp_path):  # noqa: F811
    settings = _settings()
    path = _save(tmp_path / "run", 2, _parts(model_json, settings), settings)
    (path / "meta.json").write_text('{"run_id": 3, "step": "x"}')
    with pytest.raises(ckpt.CheckpointError, match="meta.json is not a checkpoint's meta.json"):
        ckpt.checkpoint_meta(path)
    whole = (path / "state.pt").read_bytes()
    (path / "state.pt").write_bytes(whole[:1000])  # cut short, as a crash during the save leaves it
    with pytest.raises(ckpt.CheckpointError, match=r"state.pt: it is cut short or damaged \(1,000 bytes, not a whole"):
        ckpt.load_checkpoint(path)
    (path / "state.pt").write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError, match=r"cannot load checkpoint .*state.pt: it is empty \(0 bytes\)"):
        ckpt.load_checkpoint(path)


# ---------------------------------------------------------------------------------------------------------------
# a run owns its out_dir
# ---------------------------------------------------------------------------------------------------------------


def test_a_second_run_on_a_locked_out_dir_fails_at_start_naming_the_holder(sample_data, model_json, tmp_path):  # noqa: F811
    out = tmp_path / "busy"
    with ckpt.own_out_dir(out):
        with pytest.raises(ckpt.OutDirInUse, match=rf"in use by another run \(pid {os.getpid()} on host "):
            pretrain.train(_cfg(sample_data, model_json, out, max_steps=2))
        with pytest.raises(ckpt.OutDirInUse, match=f"pid {os.getpid()}"):
            with ckpt.own_out_dir(out):
                pass
    assert not (out / "train_config.json").exists()  # the refused run wrote nothing
    with ckpt.own_out_dir(out):  # released at the end of the block
        pass


def test_leftover_temporary_checkpoints_are_removed_by_the_lock_owner(tmp_path):
    root = ckpt.checkpoint_dir(tmp_path / "run")
    leftover = root / ".tmp-step_00000004-12345"
    leftover.mkdir(parents=True)
    (leftover / "state.pt").write_bytes(b"x" * 1000)
    (root / "step_00000002").mkdir()
    with ckpt.own_out_dir(tmp_path / "run", is_main=False):  # only the main process cleans
        assert leftover.exists()
    with ckpt.own_out_dir(tmp_path / "run"):
        assert not leftover.exists() and (root / "step_00000002").exists()


def test_a_checkpoint_that_lost_its_meta_json_resumes_its_own_run(sample_data, model_json, tmp_path, capsys):  # noqa: F811
    """resume: auto of a checkpoint whose meta.json is gone goes on under the run id its state.pt keeps (it became
    a new run, so keep_last never rotated the earlier checkpoints away). The folder without meta.json is nobody's
    to rotation, which never deletes what it cannot attribute."""
    out = tmp_path / "run"
    pretrain.train(_cfg(sample_data, model_json, out, max_steps=12, save_every=2, keep_last=2, stop_at_step=6))
    root = ckpt.checkpoint_dir(out)
    old_id = ckpt.checkpoint_meta(root / "step_00000006")["run_id"]
    (root / "step_00000006" / "meta.json").unlink()
    pretrain.train(_cfg(sample_data, model_json, out, max_steps=12, save_every=2, keep_last=2))
    assert "has no meta.json; going on with its run" in capsys.readouterr().out
    found = ckpt.list_checkpoints(out)
    assert _names(found) == ["step_00000006", "step_00000010", "step_00000012"]  # steps 4 and 8 rotated away
    assert {ckpt.checkpoint_meta(p)["run_id"] for p in found[1:]} == {old_id}


def test_a_resave_killed_between_its_renames_keeps_the_step(model_json, tmp_path):  # noqa: F811
    """`save_checkpoint` re-saving a step moves the earlier folder aside, then renames the new one into place. A kill
    between the two leaves the step under no name; the next lock owner puts the new, complete checkpoint under it,
    or the earlier one back when the new one is gone, rather than deleting both as leftovers."""
    settings = _settings()
    parts = _parts(model_json, settings)
    out = tmp_path / "run"
    _save(out, 4, parts, settings, run_id="r", keep_last=3)
    _save(out, 6, parts, settings, run_id="r", keep_last=3)
    root = ckpt.checkpoint_dir(out)
    step6 = root / "step_00000006"
    earlier = ckpt.checkpoint_meta(step6)["saved_at"]
    # the re-save of step 6 after a resume from step 4, killed after its first rename
    _save(tmp_path / "scratch", 6, parts, settings, run_id="r", keep_last=3)
    os.replace(step6, root / ".tmp-replaced-step_00000006-4321")
    os.replace(ckpt.checkpoint_dir(tmp_path / "scratch") / "step_00000006", root / ".tmp-step_00000006-4321")
    with ckpt.own_out_dir(out):
        assert ckpt.checkpoint_meta(step6)["saved_at"] > earlier  # the new one
        assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]
    # killed the same way, with the new folder lost: the earlier one comes back
    os.replace(step6, root / ".tmp-replaced-step_00000006-99")
    with ckpt.own_out_dir(out):
        assert ckpt.checkpoint_meta(step6)["step"] == 6
        assert ckpt.resolve_resume(_settings(out_dir=str(out))) == step6


def test_rotation_keeps_other_runs_checkpoints_and_auto_resumes_the_newest_run(model_json, tmp_path):  # noqa: F811
    out = tmp_path / "reused"
    settings = _settings()
    parts = _parts(model_json, settings)
    for step in (10, 12):
        _save(out, step, parts, settings, run_id="old", keep_last=2)
    for step in (2, 4, 6):  # a newer run, lower step numbers
        _save(out, step, parts, settings, run_id="new", keep_last=2)
        assert (ckpt.checkpoint_dir(out) / f"step_{step:08d}").exists()  # never deletes its own newest
    assert _names(ckpt.list_checkpoints(out)) == ["step_00000004", "step_00000006", "step_00000010", "step_00000012"]
    assert ckpt.latest_checkpoint(out).name == "step_00000006"  # newest by save time, not by step number
    assert ckpt.resolve_resume(_settings(out_dir=str(out))).name == "step_00000006"


def test_a_fresh_run_refuses_an_out_dir_with_another_runs_checkpoints(sample_data, model_json, tmp_path, monkeypatch):  # noqa: F811
    out = tmp_path / "run"
    first = pretrain.train(_cfg(sample_data, model_json, out, max_steps=4, save_every=2, stop_at_step=2))
    assert sorted(first["losses"]) == [1, 2]
    old_id = ckpt.checkpoint_meta(ckpt.list_checkpoints(out)[0])["run_id"]
    with pytest.raises(ckpt.OutDirInUse, match=r"holds checkpoints of another run \(step_00000002\).*overwrite"):
        pretrain.train(_cfg(sample_data, model_json, out, max_steps=4, save_every=2, resume="none"))
    assert ckpt.checkpoint_meta(ckpt.list_checkpoints(out)[0])["run_id"] == old_id  # untouched
    # resume: auto continues the run and its id; overwrite: true starts a new run and deletes the old checkpoints
    pretrain.train(_cfg(sample_data, model_json, out, max_steps=4, save_every=2, stop_at_step=3))
    ids = {ckpt.checkpoint_meta(p)["run_id"] for p in ckpt.list_checkpoints(out)}
    assert ids == {old_id}
    # a run with overwrite: true that stops on a file or setting error deletes nothing (it deleted them before
    # loading its inputs): a data_dir typo, a refused resume of another run's checkpoint
    earlier = _names(ckpt.list_checkpoints(out))
    with pytest.raises(FileNotFoundError, match=r"typo"):
        pretrain.train(
            _cfg(sample_data, model_json, out, data_dir=str(tmp_path / "typo"), resume="none", overwrite=True)
        )
    other = pretrain.train(_cfg(sample_data, model_json, tmp_path / "other", max_steps=4, save_every=2, stop_at_step=2))
    assert sorted(other["losses"]) == [1, 2]
    elsewhere = str(ckpt.list_checkpoints(tmp_path / "other")[-1])
    with pytest.raises(ckpt.ResumeSettingsError, match=r"seed: 3 -> 4"):
        pretrain.train(_cfg(sample_data, model_json, out, max_steps=4, seed=4, resume=elsewhere, overwrite=True))
    assert _names(ckpt.list_checkpoints(out)) == earlier
    assert {ckpt.checkpoint_meta(p)["run_id"] for p in ckpt.list_checkpoints(out)} == {old_id}
    # nor does one that stops after its inputs are loaded but before it writes: W&B refusing, a first step failing
    settings = (out / "train_config.json").read_text()
    with monkeypatch.context() as patch:
        patch.setattr(loop, "_init_wandb", lambda *a: (_ for _ in ()).throw(ValueError("W&B could not start")))
        with pytest.raises(ValueError, match="W&B could not start"):
            pretrain.train(_cfg(sample_data, model_json, out, max_steps=2, save_every=1, resume="none", overwrite=True))
    with monkeypatch.context() as patch:
        poison_first_step(patch)
        with pytest.raises(loop.NonFiniteLoss, match="at step 1"):
            pretrain.train(_cfg(sample_data, model_json, out, max_steps=2, save_every=1, resume="none", overwrite=True))
    assert _names(ckpt.list_checkpoints(out)) == earlier
    assert {ckpt.checkpoint_meta(p)["run_id"] for p in ckpt.list_checkpoints(out)} == {old_id}
    assert (out / "train_config.json").read_text() == settings  # the earlier run's record of its settings
    # nor one that cannot write its record of the settings (a folder in the way): a one-line error naming it
    (out / "train_config.json").unlink()
    (out / "train_config.json").mkdir()
    with pytest.raises(ValueError, match=r"train_config.json, where the run records its settings, is not a file"):
        pretrain.train(_cfg(sample_data, model_json, out, max_steps=2, save_every=1, resume="none", overwrite=True))
    assert _names(ckpt.list_checkpoints(out)) == earlier
    (out / "train_config.json").rmdir()
    for name in ("train_config.json.staged", "train_config.json.staged.tmp"):  # (the names it is written through)
        (out / name).mkdir()
        with pytest.raises(ValueError, match=rf"{name}, where the run records its settings, is not a file"):
            pretrain.train(_cfg(sample_data, model_json, out, max_steps=2, save_every=1, resume="none", overwrite=True))
        (out / name).rmdir()
    fresh = pretrain.train(_cfg(sample_data, model_json, out, max_steps=2, save_every=1, resume="none", overwrite=True))
    assert sorted(fresh["losses"]) == [1, 2]
    found = ckpt.list_checkpoints(out)
    assert _names(found) == ["step_00000001", "step_00000002"]
    assert len({ckpt.checkpoint_meta(p)["run_id"] for p in found} | {old_id}) == 2


def test_an_overwrite_whose_first_save_fails_or_is_killed_gives_the_earlier_checkpoints_back(
    sample_data,  # noqa: F811
    model_json,  # noqa: F811
    tmp_path,
    monkeypatch,
    capsys,
):
    """`overwrite: true` moves the earlier run's checkpoints aside (named with the new run's id) just before its own
    first checkpoint, and afterwards decides from the disk: deleted if a whole checkpoint of the new run is there,
    else put back under their names. So a first save that fails (a full disk) puts them back; one interrupted after
    its checkpoint is in place deletes them, and the two runs never share out_dir;
    the next start after a kill puts them back when the new run left no whole checkpoint (mid-save, or between the
    renames that move them aside) and deletes them when it did. (They were deleted before the first save: a failure
    or a kill there left neither run's checkpoints.)"""
    out = tmp_path / "run"
    pretrain.train(_cfg(sample_data, model_json, out, max_steps=4, save_every=2, stop_at_step=4))
    root = ckpt.checkpoint_dir(out)
    earlier = _names(ckpt.list_checkpoints(out))
    assert earlier == ["step_00000002", "step_00000004"]
    old_id = ckpt.checkpoint_meta(root / earlier[-1])["run_id"]

    def unchanged():
        assert _names(ckpt.list_checkpoints(out)) == earlier
        assert {ckpt.checkpoint_meta(p)["run_id"] for p in ckpt.list_checkpoints(out)} == {old_id}
        assert not [p.name for p in root.iterdir() if p.name.startswith(".")]

    def full_disk(obj, f, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    overwrite = _cfg(sample_data, model_json, out, max_steps=2, save_every=2, resume="none", overwrite=True)
    recorded = (out / "train_config.json").read_text()
    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", full_disk)
        with pytest.raises(ckpt.CheckpointError, match="disk full while writing checkpoint step 2"):
            pretrain.train(overwrite)
        # the record of the settings stays the earlier run's, which the checkpoints beside it trained with (and a
        # new out_dir is left without one)
        with pytest.raises(ckpt.CheckpointError, match="disk full"):
            pretrain.train(dataclasses.replace(overwrite, out_dir=str(tmp_path / "new")))
    unchanged()
    assert (out / "train_config.json").read_text() == recorded and json.loads(recorded)["max_steps"] == 4
    assert not (tmp_path / "new" / "train_config.json").exists()

    # kills: the earlier checkpoints moved aside by a run (of id `new`) that left no whole checkpoint, all of them
    # (the new one half-written) or one of two (killed between the renames): the next start puts them back
    new = "f" * 32
    for moved in (earlier, earlier[:1]):
        for name in moved:
            os.replace(root / name, root / f"{ckpt.SET_ASIDE_PREFIX}{new}-{name}")
        (root / ".tmp-step_00000002-99999").mkdir()
        capsys.readouterr()
        with ckpt.own_out_dir(out):
            pass
        assert f"restored the earlier run's checkpoints {', '.join(moved)}" in capsys.readouterr().out
        unchanged()

    # a first save interrupted (Ctrl-C) after its checkpoint is in place, at the folder's fsync: the new run's
    # checkpoint is whole, so the earlier ones go (put back, they would share out_dir with it, and step 2 of one run
    # would hide the other's)
    real_fsync = os.fsync

    def on_folders(error):
        def fsync(fd):
            if os.path.isdir(f"/proc/self/fd/{fd}"):
                raise error
            return real_fsync(fd)

        return fsync

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", on_folders(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            pretrain.train(overwrite)
    found = ckpt.list_checkpoints(out)
    new_ids = {ckpt.checkpoint_meta(p)["run_id"] for p in found}
    assert _names(found) == ["step_00000002"] and old_id not in new_ids
    assert json.loads((out / "train_config.json").read_text())["max_steps"] == 2  # its checkpoint stands
    # interrupted after its first whole checkpoint, while deleting the earlier ones: its settings are in place
    # (they were moved after the deletion); killed between that checkpoint and the move, the next start moves them
    # (the newest checkpoint trained with them), and drops staged settings no checkpoint trained with
    o2 = tmp_path / "o2"
    pretrain.train(_cfg(sample_data, model_json, o2, max_steps=4, save_every=2, stop_at_step=4))
    recorded = (o2 / "train_config.json").read_text()
    real_remove = ckpt._remove_folder_or_link

    def interrupted(path):
        real_remove(path)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(ckpt, "_remove_folder_or_link", interrupted)
        with pytest.raises(KeyboardInterrupt):
            pretrain.train(dataclasses.replace(overwrite, out_dir=str(o2)))
    assert json.loads((o2 / "train_config.json").read_text())["max_steps"] == 2
    staged = loop.StagedSettings(o2 / "train_config.json")
    newest_config = ckpt.checkpoint_meta(ckpt.list_checkpoints(o2)[-1])["config"]
    for content, moved in ((newest_config, True), ({**newest_config, "seed": 99}, False), ("{cut", False)):
        (o2 / "train_config.json").write_text(recorded)
        staged.staged.write_text(content if isinstance(content, str) else json.dumps(content))
        staged.recover()
        assert not staged.staged.exists()
        assert json.loads((o2 / "train_config.json").read_text()) == (newest_config if moved else json.loads(recorded))
    assert not [p.name for p in root.iterdir() if p.name.startswith(ckpt.SET_ASIDE_PREFIX)]

    # a kill after the new run's first whole checkpoint, before it deleted the earlier ones: the next start does
    (new_id,) = new_ids
    shutil.copytree(root / "step_00000002", root / f"{ckpt.SET_ASIDE_PREFIX}{new_id}-step_00000004")  # (stands in)
    capsys.readouterr()
    with ckpt.own_out_dir(out):
        pass
    assert "overwrite: deleted the earlier run's checkpoints" in capsys.readouterr().out
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002"]
    # a file system that refuses a folder's fsync (EINVAL) still saves: the checkpoint is in place
    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", on_folders(OSError(errno.EINVAL, "Invalid argument")))
        again = pretrain.train(dataclasses.replace(overwrite, out_dir=str(tmp_path / "nfs")))
    assert sorted(again["losses"]) == [1, 2] and _names(ckpt.list_checkpoints(tmp_path / "nfs")) == ["step_00000002"]


def test_a_zero_step_overwrite_run_settles_on_its_final_model_before_its_hub_upload(
    sample_data,  # noqa: F811
    model_json,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    """An `overwrite: true` run with no step to train (resumed from another folder's checkpoint at max_steps) saves
    no checkpoint: its final model is its first output. The earlier run's checkpoints go once that folder is in
    place, before the Hub upload, so an upload that is interrupted or killed leaves this run's output alone in
    out_dir, and the next start has nothing to put back (the settling used to come after the upload: a kill there
    brought the earlier run's checkpoints back beside the new final model)."""
    import huggingface_hub

    out, other = tmp_path / "run", tmp_path / "other"
    pretrain.train(_cfg(sample_data, model_json, out, max_steps=4, save_every=2, stop_at_step=2))  # the earlier run
    pretrain.train(_cfg(sample_data, model_json, other, max_steps=4, save_every=2))
    finished = str(ckpt.list_checkpoints(other)[-1])  # step 4 of 4: nothing left to train
    root = ckpt.checkpoint_dir(out)
    at_upload = []

    def upload_folder(**kwargs):
        at_upload.append(sorted(p.name for p in root.iterdir()))
        raise KeyboardInterrupt  # stands in for a kill during the upload

    monkeypatch.setattr(loop, "check_hub_access", lambda cfg: None)
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kwargs: None)
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    cfg = _cfg(sample_data, model_json, out, max_steps=4, resume=finished, overwrite=True)
    with pytest.raises(KeyboardInterrupt):
        pretrain.train(dataclasses.replace(cfg, push_to_hub=True, hub_model_id="me/tiny"))
    assert at_upload == [[]]  # the earlier checkpoints were already deleted, none set aside
    assert (out / "final" / "model.safetensors").exists()
    with ckpt.own_out_dir(out):  # the next start
        pass
    assert not ckpt.list_checkpoints(out) and not list(root.iterdir())


# ---------------------------------------------------------------------------------------------------------------
# save failures
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "failure, message",
    [
        (
            OSError(errno.ENOSPC, "No space left on device"),
            r"disk full while writing checkpoint step 4 to .*step_00000004 "
            r"\([\d,]+ bytes free, about [\d,]+ needed\); the previous checkpoint .*step_00000002 is intact",
        ),
        (
            RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 2752 vs 2648"),
            r"disk full while writing checkpoint step 4 .*\(1,000 bytes free",
        ),
        (
            PermissionError(errno.EACCES, "Permission denied", "/x/state.pt"),
            r"permission denied while writing checkpoint step 4 to .*step_00000004 \(/x/state.pt\); the previous",
        ),
    ],
)
def test_a_failed_save_says_why_and_keeps_the_previous_checkpoint(model_json, tmp_path, monkeypatch, failure, message):  # noqa: F811
    out = tmp_path / "full"
    settings = _settings()
    parts = _parts(model_json, settings)
    _save(out, 2, parts, settings)
    real_save, real_usage = torch.save, shutil.disk_usage

    def failing_save(obj, f, *args, **kwargs):
        real_save({"partial": torch.zeros(100)}, f)  # something was written before the failure
        raise failure

    monkeypatch.setattr(torch, "save", failing_save)
    if isinstance(failure, RuntimeError):  # torch's own words do not say "disk full": the free space does
        monkeypatch.setattr(shutil, "disk_usage", lambda p: real_usage(p)._replace(free=1000))
    with pytest.raises(ckpt.CheckpointError, match=message):
        _save(out, 4, parts, settings)
    monkeypatch.setattr(torch, "save", real_save)
    root = ckpt.checkpoint_dir(out)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002"]  # no partial or temporary folder left
    assert ckpt.load_checkpoint(root / "step_00000002")["step"] == 2


def test_ctrl_c_inside_torch_save_is_an_interruption_not_a_failed_write(model_json, tmp_path, monkeypatch):  # noqa: F811
    """Ctrl-C while torch.save writes state.pt: torch's writer turns the KeyboardInterrupt raised in its write
    callback into a RuntimeError ("unexpected pos"), which read as a failed write (CheckpointError, exit status 2).
    It is a KeyboardInterrupt (the command's "interrupted", status 130), and the previous checkpoint is intact."""
    import signal

    out = tmp_path / "interrupted"
    settings = _settings()
    parts = _parts(model_json, settings)
    _save(out, 2, parts, settings)
    real_save = torch.save

    def interrupted_save(obj, f, *args, **kwargs):
        real_save({"partial": torch.zeros(100)}, f)
        try:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C: its handler raises inside the writer
        except KeyboardInterrupt:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2752 vs 2648") from None

    monkeypatch.setattr(torch, "save", interrupted_save)
    # Ctrl-C as an interactive run has it: a test runner started in the background of a shell without job control
    # inherits SIGINT ignored, where Ctrl-C interrupts nothing
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            _save(out, 4, parts, settings)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is given back
    finally:
        signal.signal(signal.SIGINT, previous)
    monkeypatch.setattr(torch, "save", real_save)
    root = ckpt.checkpoint_dir(out)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002"]
    assert ckpt.load_checkpoint(root / "step_00000002")["step"] == 2


def test_resaving_a_step_replaces_it_and_a_failure_then_keeps_the_old_one(model_json, tmp_path, monkeypatch):  # noqa: F811
    out = tmp_path / "again"
    settings = _settings()
    parts = _parts(model_json, settings)
    _save(out, 2, parts, settings)
    monkeypatch.setattr(os, "replace", _fail_on_tmp_rename(os.replace))
    with pytest.raises(ckpt.CheckpointError, match="could not write checkpoint step 2"):
        _save(out, 2, parts, settings)
    monkeypatch.undo()
    root = ckpt.checkpoint_dir(out)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002"]
    assert ckpt.load_checkpoint(root / "step_00000002")["step"] == 2


def _fail_on_tmp_rename(real):
    def replace(src, dst):
        if Path(src).name.startswith(".tmp-step_"):
            raise OSError(errno.EIO, "Input/output error")
        return real(src, dst)

    return replace


# ---------------------------------------------------------------------------------------------------------------
# resuming with changed settings
# ---------------------------------------------------------------------------------------------------------------


def test_resume_applies_changed_learning_rates_and_schedule_from_the_first_step(model_json, tmp_path):  # noqa: F811
    before = _settings(optimizer="muon", muon_lr=0.02, adamw_lr=0.002, weight_decay=0.01, max_steps=12)
    parts = _parts(model_json, before)
    model, optimizer, scheduler, _ = parts
    for _ in range(6):
        optimizer.step()  # no gradients: nothing changes, but the scheduler sees the usual order
        scheduler.step()
    saved_lrs = [g["lr"] for g in optimizer.param_groups]
    path = _save(tmp_path / "run", 6, parts, before)

    same = _parts(model_json, before, seed=1)
    ckpt.restore_checkpoint(path, *same, before)
    assert [g["lr"] for g in same[1].param_groups] == saved_lrs  # unchanged settings: bit-for-bit the saved lrs

    after = _settings(optimizer="muon", muon_lr=0.01, adamw_lr=0.001, weight_decay=0.05, max_steps=20)
    logged = []
    resumed = _parts(model_json, after, seed=1)
    state = ckpt.restore_checkpoint(path, *resumed, after, log=logged.append)
    assert state["settings_changed"] == [
        "max_steps: 12 -> 20",
        "muon_lr: 0.02 -> 0.01",
        "adamw_lr: 0.002 -> 0.001",
        "weight_decay: 0.01 -> 0.05",
    ]
    # (a note first: this optimizer stepped without gradients, so it has no moments to restore)
    assert logged[0].startswith("note: ") and "no moments for 72 of 72 parameters" in logged[0], logged
    assert "changed settings" in logged[1] and "adamw_lr: 0.002 -> 0.001" in logged[1]
    optimizer, scheduler = resumed[1], resumed[2]
    factor = optim.lr_factor(6, after)  # the new schedule at the saved step (max_steps 20, not 12)
    assert factor != optim.lr_factor(6, before)
    for group in optimizer.param_groups:
        peak = 0.01 if group["use_muon"] else 0.001
        assert group["initial_lr"] == peak and group["lr"] == pytest.approx(peak * factor, rel=1e-12)
        assert group["weight_decay"] in (0.0, 0.05)
    assert any(g["weight_decay"] == 0.05 for g in optimizer.param_groups)
    optimizer.step()
    scheduler.step()  # and the schedule goes on from the new peaks
    for group in optimizer.param_groups:
        peak = 0.01 if group["use_muon"] else 0.001
        assert group["lr"] == pytest.approx(peak * optim.lr_factor(7, after), rel=1e-12)


def test_a_finished_run_rerun_with_changed_settings_is_refused(sample_data, model_json, tmp_path):  # noqa: F811
    """Rerunning a finished run (its last checkpoint at max_steps) trains nothing: changed settings would reach only
    final/'s model card and train_config.json, which would name rates the model never trained with. Refused by name,
    final/ untouched; the same settings rerun as before (final/ saved again, equal), as do changes that claim no
    training (a cadence), and a larger max_steps trains on."""
    out = tmp_path / "run"
    pretrain.train(_cfg(sample_data, model_json, out, max_steps=4, save_every=2))
    card = (out / "final" / "README.md").read_text()
    weights = (out / "final" / "model.safetensors").read_bytes()
    with pytest.raises(
        ckpt.ResumeSettingsError,
        match=r"ended there \(step 4 = max_steps\), so these changed settings would train nothing.*muon_lr: 0.02 -> "
        r"0.005.*Raise max_steps",
    ):
        pretrain.train(_cfg(sample_data, model_json, out, max_steps=4, save_every=2, muon_lr=0.005))
    assert (out / "final" / "README.md").read_text() == card
    pretrain.train(_cfg(sample_data, model_json, out, max_steps=4, save_every=2))
    assert (out / "final" / "model.safetensors").read_bytes() == weights
    pretrain.train(_cfg(sample_data, model_json, out, max_steps=4, save_every=2, log_every=1))  # no training claim
    result = pretrain.train(_cfg(sample_data, model_json, out, max_steps=6, save_every=2, muon_lr=0.005))
    assert sorted(result["losses"]) == [1, 2, 3, 4, 5, 6] and "0.005" in (out / "final" / "README.md").read_text()


def test_a_resumed_training_run_steps_with_the_changed_learning_rate(sample_data, model_json, tmp_path, monkeypatch):  # noqa: F811
    out = tmp_path / "run"
    pretrain.train(_cfg(sample_data, model_json, out, max_steps=4, save_every=2, stop_at_step=2, adamw_lr=0.004))
    seen = []
    real_step = Muon.step

    def recording_step(optimizer, *args, **kwargs):
        seen.append([(g["use_muon"], g["lr"]) for g in optimizer.param_groups])
        return real_step(optimizer, *args, **kwargs)

    monkeypatch.setattr(Muon, "step", recording_step)
    cfg = _cfg(sample_data, model_json, out, max_steps=4, save_every=2, stop_at_step=3, adamw_lr=0.001)
    pretrain.train(cfg)
    assert len(seen) == 1  # step 3 alone: 2 were done; its rate is the schedule's after 2 steps
    for use_muon, lr in seen[0]:
        peak = cfg.muon_lr if use_muon else 0.001
        assert lr == pytest.approx(peak * optim.lr_factor(2, cfg), rel=1e-12)


@pytest.mark.parametrize(
    "change, named",
    [
        (dict(optimizer="adamw"), r"optimizer: 'muon' -> 'adamw'"),
        (
            dict(grad_accum=4),
            r"global batch \(micro_batch_size x grad_accum x processes\): 8 x 2 x 1 = 16 -> 8 x 4 x 1 = 32",
        ),
        (dict(seed=4, seq_len=128), r"seed: 1337 -> 4"),
    ],
)
def test_resume_refuses_a_changed_fixed_setting_naming_it(model_json, tmp_path, change, named):  # noqa: F811
    before = _settings()
    path = _save(tmp_path / "run", 6, _parts(model_json, before), before)
    after = _settings(**{k: v for k, v in change.items() if k != "seq_len"})
    model, optimizer, scheduler, loader = _parts(model_json, after, seed=1)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ckpt.ResumeSettingsError, match=rf"cannot resume from .*step_00000006: .*{named}"):
        ckpt.restore_checkpoint(path, model, optimizer, scheduler, loader, after)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())  # nothing was loaded
    # the same global batch from other factors (e.g. 2 processes x 4 sequences x 2) is accepted
    assert ckpt.compare_resume_settings(dataclasses.asdict(before), _settings(micro_batch_size=4), 1, 2) == [
        "micro_batch_size: 8 -> 4"
    ]


# ---------------------------------------------------------------------------------------------------------------
# fp16: loss-scale overflows are the GradScaler's business
# ---------------------------------------------------------------------------------------------------------------


class _Printer:
    def __init__(self):
        self.lines = []

    def print(self, *args):
        self.lines.append(" ".join(map(str, args)))


def test_an_overflow_step_is_skipped_by_the_scaler_counted_and_training_goes_on():
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    cfg, counters, printer = _settings(nonfinite="stop"), loop.StepCounters(), _Printer()

    def backward(inject_inf: bool) -> tuple[float, float]:
        loss = layer(torch.ones(2, 4)).pow(2).mean()
        scaler.scale(loss).backward()
        if inject_inf:
            layer.weight.grad[0, 0] = float("inf")
        scaler.unscale_(optimizer)  # what accelerator.clip_grad_norm_ does first
        return loss.item(), torch.nn.utils.clip_grad_norm_(layer.parameters(), 1.0)

    weight = layer.weight.detach().clone()
    loss, norm = backward(inject_inf=True)
    assert not torch.isfinite(norm)
    took = loop.optimizer_step(cfg, 0, loss, norm, optimizer, printer, counters, scaler)  # no NonFiniteLoss
    assert not took and torch.equal(layer.weight, weight)  # skipped
    assert scaler.get_scale() == 512.0 and counters.overflows == 1 and counters.skips == 0
    assert "loss-scale overflow at step 0" in printer.lines[0] and "scale 1024 -> 512" in printer.lines[0]
    loss, norm = backward(inject_inf=False)  # the next step unscales again without "unscale_() has already been called"
    assert loop.optimizer_step(cfg, 0, loss, norm, optimizer, printer, counters, scaler)
    assert not torch.equal(layer.weight, weight) and scaler.get_scale() == 512.0 and counters.overflows == 1

    # a non-finite loss is still a non-finite step (here: stop), judged by the loss value alone
    loss, norm = backward(inject_inf=False)
    with pytest.raises(loop.NonFiniteLoss, match="non-finite loss"):
        loop.optimizer_step(cfg, 1, float("nan"), norm, optimizer, printer, counters, scaler)
    # with nonfinite: skip the scaler's step is ended, so the following step runs normally
    skip_cfg = _settings(nonfinite="skip")
    backward(inject_inf=False)
    assert not loop.optimizer_step(skip_cfg, 1, float("inf"), norm, optimizer, printer, counters, scaler)
    loss, norm = backward(inject_inf=False)
    assert loop.optimizer_step(skip_cfg, 1, loss, norm, optimizer, printer, counters, scaler)

    # gradients that overflow even at a scale below 1 are non-finite gradients after all
    scaler.update(new_scale=1.0)
    loss, norm = backward(inject_inf=True)
    with pytest.raises(loop.NonFiniteLoss, match="non-finite loss or gradient at step 2"):
        loop.optimizer_step(cfg, 2, loss, norm, optimizer, printer, counters, scaler)


def _fp16_cpu_accelerator(monkeypatch, init_scale):
    """accelerate's fp16 setup as on CUDA (its GradScaler: scaled backward, unscale in clip_grad_norm_, step and
    update in the prepared optimizer), with a CPU GradScaler and fp32 compute: a scale near the float32 limit makes
    the first steps overflow like fp16 ones."""
    from accelerate import Accelerator

    def make(cfg):
        accelerator = Accelerator(cpu=True, mixed_precision="no")
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
        accelerator.native_amp = True
        made.append(accelerator)
        return accelerator

    made = []
    monkeypatch.setattr(Accelerator, "mixed_precision", property(lambda self: "fp16"))  # unscale_gradients' check
    monkeypatch.setattr(pretrain, "make_accelerator", make)
    monkeypatch.setattr(finetune, "make_accelerator", make)
    return made


def test_fp16_overflow_steps_do_not_stop_pretraining(sample_data, model_json, tmp_path, monkeypatch):  # noqa: F811
    made = _fp16_cpu_accelerator(monkeypatch, init_scale=2.0**127)
    history = pretrain.train(
        _cfg(sample_data, model_json, tmp_path / "fp16", max_steps=4, save_every=4, eval_every=100, nonfinite="stop")
    )
    overflows = history["overflow_steps"]
    assert overflows >= 1 and sorted(history["losses"]) == [1, 2, 3, 4]
    assert made[0].scaler.get_scale() == 2.0**127 / 2**overflows  # halved once per overflow, never grown
    state = ckpt.load_checkpoint(ckpt.list_checkpoints(tmp_path / "fp16")[-1])
    assert state["overflow_steps"] == overflows


def test_fp16_overflow_steps_do_not_stop_finetuning(tmp_path, monkeypatch):
    from llamathink.chat_format import set_chat_template
    from llamathink.tokenizer_utils import builtin_tokenizer

    torch.manual_seed(0)
    config = LlamaThinkConfig(
        vocab_size=1024,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        linear_num_key_heads=1,
        linear_num_value_heads=1,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        max_position_embeddings=160,
        csa_window=16,
        gdn_chunk_size=16,
        pad_token_id=0,
    )
    LlamaThinkForCausalLM(config).save_pretrained(tmp_path / "base")
    set_chat_template(builtin_tokenizer()).save_pretrained(tmp_path / "base")
    made = _fp16_cpu_accelerator(monkeypatch, init_scale=2.0**127)
    cfg = finetune.FinetuneConfig(
        init_from=str(tmp_path / "base"),
        out_dir=str(tmp_path / "chat"),
        max_len=96,
        max_conversations=40,
        micro_batch_size=4,
        max_steps=3,
        warmup_steps=1,
        eval_at_start=False,
        eval_every=100,
        save_every=3,
        sample_every=100,
        wandb_mode="disabled",
        progress_bar=False,
        mixed_precision="no",
    )
    history = finetune.finetune(cfg)
    assert history["overflow_steps"] >= 1 and sorted(history["losses"]) == [1, 2, 3]
    assert made[0].scaler.get_scale() == 2.0**127 / 2 ** history["overflow_steps"]


def test_pretraining_and_finetuning_keep_the_same_records(sample_data, model_json, tmp_path):  # noqa: F811
    """One loop for both: history.json with the same sections and metrics, checkpoints with the same contents, and
    the counts of tokens seen and trained on kept across a resume (the model card of a resumed run has them)."""
    steps = dict(max_steps=4, warmup_steps=1, save_every=2, log_every=2, eval_every=2, micro_batch_size=4, grad_accum=2)
    pre = pretrain.train(_cfg(sample_data, model_json, tmp_path / "pre", **steps))

    def chat_cfg(out, **overrides):
        return finetune.FinetuneConfig(
            init_from=pre["final_dir"],
            out_dir=str(tmp_path / out),
            max_len=96,
            max_conversations=40,
            eval_at_start=False,
            sample_every=100,
            wandb_mode="disabled",
            progress_bar=False,
            mixed_precision="no",
            **steps,
            **overrides,
        )

    chat = finetune.finetune(chat_cfg("chat"))
    finetune.finetune(chat_cfg("resumed", stop_at_step=2))
    resumed = finetune.finetune(chat_cfg("resumed"))
    records = {}
    for name in ("pre", "chat", "resumed"):
        out = tmp_path / name
        history = json.loads((out / "history.json").read_text())
        assert sorted(map(int, history["losses"])) == [1, 2, 3, 4] and sorted(map(int, history["eval"])) == [2, 4]
        assert sorted(map(int, history["perf"])) == [2, 4]
        last = ckpt.list_checkpoints(out)[-1]
        state, meta = ckpt.load_checkpoint(last), ckpt.checkpoint_meta(last)
        records[name] = (set(history), set(history["perf"]["4"]), set(state), set(meta), state)
    pre_rec, chat_rec = records["pre"], records["chat"]
    assert pre_rec[0] | {"data"} == chat_rec[0]  # finetuning also records what it read
    assert pre_rec[1] - {"perf/mfu"} == chat_rec[1] - {"train/epoch"}
    assert pre_rec[2] == chat_rec[2] and pre_rec[3] == chat_rec[3]
    assert {"tokens_seen", "trained_tokens", "history", "run_id", "overflow_steps"} <= pre_rec[2]
    # pretraining: every position is an input, every position after the first a loss term
    assert pre_rec[4]["tokens_seen"] == pre["tokens_seen"] == 4 * 4 * 2 * 64
    assert pre_rec[4]["trained_tokens"] == pre["trained_tokens"] == 4 * 4 * 2 * 63
    # finetuning: the assistant tokens only; the same after a resume, and written into the resumed run's card
    assert 0 < chat["trained_tokens"] < chat["tokens_seen"]
    assert resumed["trained_tokens"] == chat["trained_tokens"] and resumed["losses"] == chat["losses"]
    card = (Path(resumed["final_dir"]) / "README.md").read_text()
    assert f"{chat['trained_tokens']:,}" in card


# ---------------------------------------------------------------------------------------------------------------
# hostile or careless checkpoint folders and out_dirs
# ---------------------------------------------------------------------------------------------------------------


def test_an_out_dir_that_cannot_hold_checkpoints_is_named(tmp_path, monkeypatch):
    in_the_way = tmp_path / "notes.txt"
    in_the_way.write_text("keep me")
    with pytest.raises(
        ValueError,
        match=r"out_dir .*notes.txt cannot hold this run's checkpoints: .*notes.txt is a "
        r"file, not a folder",
    ):
        with ckpt.own_out_dir(in_the_way):
            pass
    with pytest.raises(ValueError, match=r"out_dir .*notes.txt/run cannot hold .*: Not a directory"):
        with ckpt.own_out_dir(in_the_way / "run"):
            pass
    assert in_the_way.read_text() == "keep me"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("a file where the checkpoints go")  # found at start, not at a save
    with pytest.raises(ValueError, match=r"out_dir .*run cannot hold .*run/checkpoints is a file, not a folder"):
        with ckpt.own_out_dir(tmp_path / "run"):
            pass
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")  # a loop of links, and a link whose target is gone
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    (tmp_path / "gone").symlink_to(tmp_path / "removed-run")
    for link in ("loop1", "gone"):
        nowhere = rf"{link} is a symbolic link that leads nowhere \(a loop, or a target"
        with pytest.raises(ValueError, match=nowhere), ckpt.own_out_dir(tmp_path / link):
            pass

    def denied(path, *args):  # a read-only out_dir (tests may run as root, which chmod does not stop)
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(ValueError, match=r"out_dir .*readonly cannot hold this run's checkpoints: Permission denied"):
        with ckpt.own_out_dir(tmp_path / "readonly"):
            pass


def test_a_run_that_fails_at_its_start_leaves_an_existing_folder_as_it_was(sample_data, model_json, tmp_path):  # noqa: F811
    """A run that fails before training, in a folder that already held something (a saved model), removes the lock
    file and the empty checkpoints/ it added: they made every loader take the model for a training run's folder.
    An empty checkpoints/ left by an earlier version does not either. Training in place (out_dir = init_from) is
    refused by name before anything is written, and so is a model in the run's own final/ or checkpoints/ (with
    overwrite, the run deleted it)."""
    model = tmp_path / "model"
    LlamaThinkForCausalLM(LlamaThinkConfig.from_json_file(str(model_json))).save_pretrained(model)
    before = sorted(p.name for p in model.iterdir())
    with pytest.raises(FileNotFoundError):
        pretrain.train(_cfg(tmp_path / "no_data", model_json, model))
    assert sorted(p.name for p in model.iterdir()) == before
    assert isinstance(ckpt.load_saved_model(str(model), "init_from"), LlamaThinkForCausalLM)
    # a new out_dir deep under folders that did not exist: all of them go again (a relative preset path run from
    # another working folder left runs/<name>/ behind)
    with pytest.raises(FileNotFoundError):
        pretrain.train(_cfg(tmp_path / "no_data", model_json, tmp_path / "new" / "runs" / "x"))
    assert not (tmp_path / "new").exists()
    ckpt.checkpoint_dir(model).mkdir()
    assert isinstance(ckpt.load_saved_model(str(model), "init_from"), LlamaThinkForCausalLM)
    ckpt.checkpoint_dir(model).rmdir()
    for settings in (dict(model_config=None, init_from=str(model)), dict(out_dir=str(model))):
        with pytest.raises(ValueError, match=r"out_dir .*model is the init_from model's folder: the run would write"):
            if "out_dir" in settings:
                finetune.FinetuneConfig(init_from=str(model) + "/", **settings)
            else:
                _cfg(sample_data, model_json, model, **settings)
    # a model in out_dir's final/ or checkpoints/ (which the run replaces, rotates away or, with overwrite, deletes)
    for inside in ("final", "checkpoints/step_00000010", ".final.old"):
        (tmp_path / inside).mkdir(parents=True)
        for overwrite in (False, True):
            with pytest.raises(ValueError, match=rf"init_from .* is in out_dir {tmp_path}'s {inside.split('/')[0]}/"):
                finetune.FinetuneConfig(init_from=str(tmp_path / inside), out_dir=str(tmp_path), overwrite=overwrite)
    finetune.FinetuneConfig(init_from=str(tmp_path / "pretrain" / "final"), out_dir=str(tmp_path))  # beside: fine
    finetune.FinetuneConfig(init_from="org/final", out_dir="org")  # a Hub id, not a folder of out_dir


def test_run_settings_that_would_mislead_are_refused(sample_data, model_json, tmp_path, monkeypatch):  # noqa: F811
    """An empty path from a YAML file (the working folder to the file system: a run wrote its checkpoints there), a
    peak_tflops that is not a positive number, fp16 without CUDA (accelerate trains in fp32 then, while the run records fp16), and a saved model of another
    architecture given as init_from (named by each of its tensors as missing before) are refused by name."""
    config = tmp_path / "run.yaml"
    for key in ("out_dir", "data_dir", "init_from"):
        config.write_text(f"{key}: ''\n")
        loader = finetune.load_config if key == "init_from" else pretrain.load_config
        with pytest.raises(ValueError, match=f"{key} is empty: give a path"):
            loader(str(config))
    for peak in (-5, 0, float("nan")):  # a negative MFU, or MFU silently off
        with pytest.raises(ValueError, match="peak_tflops must be a device's peak TFLOP/s"):
            _cfg(sample_data, model_json, tmp_path / "mfu", peak_tflops=peak)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="mixed_precision: fp16 needs a CUDA GPU"):
            loop.make_accelerator(_cfg(sample_data, model_json, tmp_path / "fp16", mixed_precision="fp16"))
    # `accelerate launch` with another precision (its config file's, or --mixed_precision) than the run's: the run's
    # is the one trained with, and a warning says so (it was silent, also for fp16 on the CPU)
    plain = _cfg(sample_data, model_json, tmp_path / "mp", mixed_precision="no")
    for launched, warned in (("fp16", True), ("bf16", True), ("no", False)):
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launched)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            accelerator = loop.make_accelerator(plain)
        assert accelerator.mixed_precision == "no"
        said = [str(w.message) for w in caught if "accelerate launch asked for" in str(w.message)]
        assert len(said) == warned and (not warned or f"{launched!r}" in said[0]), said
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(ValueError, match=r"init_from=.*llama is not a LlamaThink model: its config.json gives "):
        ckpt.load_saved_model(str(other), "init_from")


def test_symlinked_checkpoint_folders_are_never_listed_resumed_or_deleted(model_json, tmp_path):  # noqa: F811
    settings = _settings()
    parts = _parts(model_json, settings)
    elsewhere = _save(tmp_path / "elsewhere", 9, parts, settings, run_id="run-a")  # the same run id, outside
    out = tmp_path / "run"
    _save(out, 2, parts, settings, run_id="run-a")
    root = ckpt.checkpoint_dir(out)
    (root / "step_00000001").symlink_to(elsewhere, target_is_directory=True)
    (root / ".tmp-step_00000003-1").symlink_to(elsewhere, target_is_directory=True)
    assert _names(ckpt.list_checkpoints(out)) == ["step_00000002"]
    assert ckpt.latest_checkpoint(out).name == "step_00000002"
    for step in (4, 6):
        _save(out, step, parts, settings, run_id="run-a", keep_last=1)
    with ckpt.own_out_dir(out):  # removes leftover temporary names, never what a link points to
        pass
    assert _names(ckpt.list_checkpoints(out)) == ["step_00000006"]
    assert ckpt.load_checkpoint(elsewhere)["step"] == 9  # the linked folder is untouched
    # resume: auto says it passes over a link (it did so silently), and a save of the link's step replaces the
    # link alone, leaving no temporary name behind
    (root / "step_00000008").symlink_to(elsewhere, target_is_directory=True)
    notes = []
    assert ckpt.resolve_resume(_settings(out_dir=str(out)), log=notes.append).name == "step_00000006"
    assert any("step_00000008" in n and "symbolic link" in n and "--resume PATH" in n for n in notes), notes
    _save(out, 8, parts, settings, run_id="run-a", keep_last=1)
    assert not (root / "step_00000008").is_symlink() and ckpt.checkpoint_meta(root / "step_00000008")["step"] == 8
    assert not [p.name for p in root.iterdir() if p.name.startswith(".tmp-")]
    assert ckpt.load_checkpoint(elsewhere)["step"] == 9
    # a link that leads nowhere (a target that is gone, a loop) under the name of a step to save: replaced too (the
    # save failed with NotADirectoryError after the training up to it)
    (root / "step_00000010").symlink_to(tmp_path / "gone", target_is_directory=True)
    (root / "step_00000012").symlink_to(root / "step_00000012")
    for step in (10, 12):
        _save(out, step, parts, settings, run_id="run-a", keep_last=3)
        assert ckpt.checkpoint_meta(root / f"step_{step:08d}")["step"] == step
    assert _names(ckpt.list_checkpoints(out)) == ["step_00000008", "step_00000010", "step_00000012"]
    assert not [p.name for p in root.iterdir() if p.name.startswith(".tmp-")]


def test_a_checkpoint_whose_step_does_not_match_is_not_trusted(model_json, tmp_path):  # noqa: F811
    settings = _settings()
    path = _save(tmp_path / "run", 4, _parts(model_json, settings), settings)
    meta = json.loads((path / "meta.json").read_text())
    for bad, named in [
        (dict(step=7), r"says step 7 but the folder is step_00000004"),
        (dict(step=True), r"is not a checkpoint's meta.json: wrong or missing step True"),
        (dict(saved_at=float("nan")), r"is not a checkpoint's meta.json: wrong or missing saved_at nan"),
        ({"saved_at": 10**400}, r"is not a checkpoint's meta.json: wrong or missing saved_at 1000000"),  # > float
        (dict(run_id=["run-a"]), r"is not a checkpoint's meta.json: wrong or missing run_id \['run-a'\]"),
        # optional fields read later (a traceback from deep inside the resume before)
        ({"input_fingerprints": [1, 2]}, r"wrong or missing input_fingerprints \[1, 2\]"),
        (
            {"input_fingerprints": "abc", "save_index": "2"},
            r"wrong or missing save_index '2', input_fingerprints 'abc'",
        ),
        ({"model_architecture": []}, r"wrong or missing model_architecture \[\]"),
    ]:
        (path / "meta.json").write_text(json.dumps({**meta, **bad}))
        with pytest.raises(ckpt.CheckpointError, match=named):
            ckpt.checkpoint_meta(path)
    # the folder copied under another name: meta.json is consistent, but state.pt is another step's
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    (copy / "meta.json").write_text(json.dumps({**meta, "step": 8}))
    with pytest.raises(ckpt.CheckpointError, match=r"state.pt is at step 4 but meta.json says step 8"):
        ckpt.restore_checkpoint(copy, *_parts(model_json, settings), settings)
    # another run's state.pt of the same step put in the folder: the run ids differ (it was accepted silently)
    swapped = tmp_path / "swapped"
    shutil.copytree(path, swapped)
    state = torch.load(swapped / "state.pt", weights_only=True)
    torch.save({**state, "run_id": "run-b"}, swapped / "state.pt")
    (swapped / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ckpt.CheckpointError, match=r"state.pt is run run-b's but meta.json says run run-a"):
        ckpt.restore_checkpoint(swapped, *_parts(model_json, settings), settings)
    # a checkpoint of the format without meta.json, under another step's name: the folder name is what it says
    # (it resumed step 4's state as step 6 silently)
    renamed = tmp_path / "run" / "checkpoints" / "step_00000006"
    shutil.copytree(path, renamed)
    (renamed / "meta.json").unlink()
    with pytest.raises(ckpt.CheckpointError, match=r"state.pt is at step 4 but the folder is step_00000006"):
        ckpt.restore_checkpoint(renamed, *_parts(model_json, settings), settings)


def test_save_times_in_the_future_or_lost_do_not_make_a_run_delete_its_new_checkpoints(model_json, tmp_path, capsys):  # noqa: F811
    """A checkpoint whose meta.json says it was saved in the future (a clock that moved back, even by seconds, or
    an edit) made `resume: auto` rewind to it and keep_last delete every checkpoint written after it, the new one
    included; a meta.json deleted from an old checkpoint made it read as saved just now (the folder's mtime). Now a
    run's checkpoints are ordered by their save count, the just-written one is always kept, checkpoints without
    the count (earlier versions) with a save time in the future are ordered by step with a note, and a checkpoint
    without meta.json is as old as its state.pt."""
    out = tmp_path / "run"
    settings = _settings()
    parts = _parts(model_json, settings)
    root = ckpt.checkpoint_dir(out)

    def edit_meta(step, **changes):
        file = root / f"step_{step:08d}" / "meta.json"
        meta = {**json.loads(file.read_text()), **changes}
        file.write_text(json.dumps({k: v for k, v in meta.items() if v is not None}))

    for step in (2, 4, 6):
        _save(out, step, parts, settings, keep_last=3)
    edit_meta(2, saved_at=time.time() + 250)
    assert ckpt.latest_checkpoint(out).name == "step_00000006"
    _save(out, 8, parts, settings, keep_last=2)
    assert _names(ckpt.list_checkpoints(out)) == ["step_00000006", "step_00000008"]
    for step in (6, 8):  # as checkpoints of earlier versions (no save count)
        edit_meta(step, save_index=None)
    edit_meta(6, saved_at=time.time() + 3600)
    assert ckpt.latest_checkpoint(out).name == "step_00000008"
    assert "note: step_00000006 in" in capsys.readouterr().out
    assert _save(out, 10, parts, settings, keep_last=1).exists()
    assert _names(ckpt.list_checkpoints(out)) == ["step_00000010"]
    for step in (12, 14):
        _save(out, step, parts, settings, keep_last=3)
    os.utime(root / "step_00000012" / "state.pt", (time.time() - 60, time.time() - 60))
    (root / "step_00000012" / "meta.json").unlink()  # the folder's mtime is now
    assert ckpt.latest_checkpoint(out).name == "step_00000014"


@pytest.mark.parametrize("run_id", ["run-a", None])
def test_a_save_passes_over_a_checkpoint_whose_meta_json_is_unreadable(model_json, tmp_path, run_id):  # noqa: F811
    """A checkpoint folder whose meta.json does not parse belongs to no run: a later save (whatever its run id,
    None included) neither fails on it nor rotates it away, and counts its own saves without it."""
    out = tmp_path / "run"
    settings = _settings()
    parts = _parts(model_json, settings)
    _save(out, 2, parts, settings, run_id=run_id)
    (ckpt.checkpoint_dir(out) / "step_00000002" / ckpt.META_FILE).write_text("{not json")
    for step in (4, 6):
        _save(out, step, parts, settings, run_id=run_id, keep_last=1)
    assert _names(ckpt.list_checkpoints(out)) == ["step_00000002", "step_00000006"]
    assert ckpt.checkpoint_meta(ckpt.checkpoint_dir(out) / "step_00000006")["save_index"] == 2


def test_resume_auto_passes_over_an_older_unreadable_meta_json_and_stops_at_the_highest(model_json, tmp_path):  # noqa: F811
    """`resume: auto` with a checkpoint whose meta.json cannot be read: an older one is passed over with a note
    naming it; at the highest step it may be where the run stopped, so the run stops with a message saying how to
    go on (it stopped on any unreadable folder, old ones included, without saying what to do)."""
    out = tmp_path / "run"
    settings = _settings()
    parts = _parts(model_json, settings)
    for step in (2, 4):
        _save(out, step, parts, settings)
    root = ckpt.checkpoint_dir(out)
    (root / "step_00000002" / ckpt.META_FILE).write_text("{not json")
    notes = []
    assert ckpt.resolve_resume(_settings(out_dir=str(out)), notes.append).name == "step_00000004"
    assert notes and "passing over step_00000002" in notes[0] and "resuming step_00000004" in notes[0], notes
    (root / "step_00000004" / ckpt.META_FILE).write_text("[]")
    with pytest.raises(ckpt.CheckpointError, match=r"step_00000004.*highest step.*move step_00000004 out.*--resume"):
        ckpt.resolve_resume(_settings(out_dir=str(out)), notes.append)


def test_resume_auto_says_which_checkpoint_folder_it_passes_over(model_json, tmp_path, capsys):  # noqa: F811
    """The newest checkpoint folder without its state.pt is not a checkpoint: `resume: auto` goes on from the one
    before and says so (it did silently); a truncated state.pt names the file and how to go on."""
    out = tmp_path / "run"
    settings = _settings()
    parts = _parts(model_json, settings)
    for step in (2, 4):
        _save(out, step, parts, settings)
    state = ckpt.checkpoint_dir(out) / "step_00000004" / ckpt.STATE_FILE
    data = state.read_bytes()
    state.write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match=r"cannot load checkpoint .*state.pt: .*resume from an earlier"):
        ckpt.load_checkpoint(state.parent)
    state.unlink()
    assert ckpt.resolve_resume(_settings(out_dir=str(out))).name == "step_00000002"
    assert "note: step_00000004 in" in capsys.readouterr().out


def test_unwritable_out_dir_and_undeletable_checkpoints_are_reported(model_json, tmp_path, monkeypatch, capsys):  # noqa: F811
    """An out_dir made read-only after a first run (its .lock still opens) is refused at start, not after training
    when history.json cannot be written; a stale checkpoint that cannot be deleted (read-only files) is reported
    with where its space went, and the next run's cleanup says what it could not remove (it said "removed")."""
    out = tmp_path / "run"
    with ckpt.own_out_dir(out):
        pass
    real_touch = Path.touch

    def read_only(self, *args, **kwargs):
        if self.name.startswith(".write-test") and self.parent == out:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_touch(self, *args, **kwargs)

    monkeypatch.setattr(Path, "touch", read_only)
    refused = pytest.raises(ValueError, match=r"out_dir .*run cannot hold this run's checkpoints: Permission denied")
    with refused, ckpt.own_out_dir(out):
        pass
    monkeypatch.undo()
    settings = _settings()
    parts = _parts(model_json, settings)
    _save(out, 2, parts, settings, keep_last=1)
    real_rmtree = shutil.rmtree

    def refuse(path, *args, **kwargs):
        if not kwargs.get("ignore_errors"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", refuse)
    _save(out, 4, parts, settings, keep_last=1)
    printed = capsys.readouterr().out
    assert "could not remove the old checkpoint" in printed and "what is left of it is in" in printed
    with ckpt.own_out_dir(out):
        pass
    printed = capsys.readouterr().out
    assert "could not remove .tmp-removing-step_00000002" in printed and "removed" not in printed.split("could")[0]
    monkeypatch.undo()
    with ckpt.own_out_dir(out):
        pass
    assert "removed 1 temporary" in capsys.readouterr().out
    assert sorted(p.name for p in ckpt.checkpoint_dir(out).iterdir()) == ["step_00000004"]


def test_a_rotation_stopped_half_way_leaves_no_partial_checkpoint_to_resume(model_json, tmp_path, monkeypatch):  # noqa: F811
    out = tmp_path / "run"
    settings = _settings()
    parts = _parts(model_json, settings)
    for step in (2, 4):
        _save(out, step, parts, settings, keep_last=2)
    real_rmtree = shutil.rmtree

    def interrupted(path, *args, **kwargs):  # Ctrl-C after the first file of the stale checkpoint went
        if (Path(path) / "meta.json").exists():
            (Path(path) / "meta.json").unlink()
            raise KeyboardInterrupt
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _save(out, 6, parts, settings, keep_last=2)
    monkeypatch.undo()
    # step 2 (the stale one) without meta.json would read as saved just now and be resumed by resume: auto
    assert _names(ckpt.list_checkpoints(out)) == ["step_00000004", "step_00000006"]
    assert ckpt.latest_checkpoint(out).name == "step_00000006"
    with ckpt.own_out_dir(out):  # the next run removes the rest
        pass
    assert sorted(p.name for p in ckpt.checkpoint_dir(out).iterdir()) == ["step_00000004", "step_00000006"]


def test_every_setting_is_either_applied_or_refused_when_resuming():
    fields = {f.name for cls in (pretrain.TrainConfig, finetune.FinetuneConfig) for f in dataclasses.fields(cls)}
    classified = set(ckpt.RESUME_FIXED) | set(ckpt.RESUME_APPLIED) | set(ckpt._NOT_COMPARED)
    assert fields - classified == set()
    assert set(ckpt.RESUME_FIXED) & set(ckpt.RESUME_APPLIED) == set()
    # a setting added later without a decision is refused, not silently taken over
    saved = {**dataclasses.asdict(_settings()), "grad_clip": 0.5, "new_knob": 1}
    current = dataclasses.make_dataclass("Later", [("new_knob", int, 2)], bases=(run_config.RunConfig,))(
        max_steps=12, warmup_steps=2, micro_batch_size=8, grad_accum=2, wandb_mode="disabled"
    )
    with pytest.raises(ckpt.ResumeSettingsError, match=r"differ: new_knob: 1 -> 2\. "):
        ckpt.compare_resume_settings(saved, current, 1, 1)
    saved["new_knob"] = 2
    assert ckpt.compare_resume_settings(saved, current, 1, 1) == ["grad_clip: 0.5 -> 1.0"]


def test_ctrl_c_in_the_middle_of_a_save_keeps_the_previous_checkpoint_and_no_partial_one(
    model_json, tmp_path, monkeypatch
):  # noqa: F811
    out = tmp_path / "run"
    settings = _settings()
    parts = _parts(model_json, settings)
    _save(out, 2, parts, settings)
    real_save = torch.save

    def interrupted(obj, f, *args, **kwargs):
        real_save({"partial": torch.zeros(10)}, f)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    for step in (4, 2):  # a new step, and re-saving the existing one (which is first moved aside)
        with pytest.raises(KeyboardInterrupt):
            _save(out, step, parts, settings)
        assert sorted(p.name for p in ckpt.checkpoint_dir(out).iterdir()) == ["step_00000002"]
    monkeypatch.undo()
    assert ckpt.load_checkpoint(ckpt.checkpoint_dir(out) / "step_00000002")["step"] == 2


def test_resuming_a_checkpoint_beyond_max_steps_is_refused(model_json, tmp_path):  # noqa: F811
    before = _settings(max_steps=12)
    path = _save(tmp_path / "run", 8, _parts(model_json, before), before)
    after = _settings(max_steps=6)
    with pytest.raises(
        ckpt.ResumeSettingsError,
        match=r"at step 8, beyond max_steps=6; set max_steps to at "
        r"least 8",
    ):
        ckpt.restore_checkpoint(path, *_parts(model_json, after), after)
    assert (
        ckpt.restore_checkpoint(path, *_parts(model_json, _settings(max_steps=8)), _settings(max_steps=8))["step"] == 8
    )
    # a setting that can never change (another seed, model, kind of run) is named first: raising max_steps, what
    # the step's message asks for, would only lead to it
    other = _settings(max_steps=6, seed=99)
    with pytest.raises(ckpt.ResumeSettingsError, match="seed") as refused:
        ckpt.restore_checkpoint(path, *_parts(model_json, other), other)
    assert "max_steps" not in str(refused.value)


def test_a_checkpoint_of_wrong_shapes_or_types_is_named_not_a_deep_traceback(model_json, tmp_path):  # noqa: F811
    settings = _settings()
    path = _save(tmp_path / "run", 4, _parts(model_json, settings), settings)
    state = torch.load(path / "state.pt", weights_only=True)
    # another model's weights (here: one hidden size larger), as after editing the model's config.json
    other = LlamaThinkConfig.from_json_file(str(model_json))
    other.intermediate_size += 16
    torch.manual_seed(0)
    bigger = LlamaThinkForCausalLM(other)
    parts = (bigger, optim.build_optimizer(bigger, settings), *_parts(model_json, settings)[2:])
    with pytest.raises(ckpt.ResumeSettingsError, match=r"differs from the one the checkpoint trained .*160 -> 176"):
        ckpt.restore_checkpoint(path, *parts, settings)  # named from the architecture the checkpoint keeps
    torch.save({k: v for k, v in state.items() if k != "model_architecture"}, path / "state.pt")  # an older one
    named = r"(?s)cannot resume from .*step_00000004: its model state does not fit this run \(RuntimeError: .*size m"
    with pytest.raises(ckpt.CheckpointError, match=named):
        ckpt.restore_checkpoint(path, *parts, settings)
    for bad, named in [
        (dict(step="4"), r"its step is '4', not a count of steps"),
        (dict(step=-1), r"its step is -1"),
        (dict(model=[1], loader="x"), r"model, loader should be dictionaries"),
    ]:
        torch.save({**state, **bad}, path / "state.pt")
        with pytest.raises(ckpt.CheckpointError, match=rf"state.pt is not a training checkpoint: {named}"):
            ckpt.load_checkpoint(path)
    torch.save({**state, "loader": {"position": 1}}, path / "state.pt")  # a loader state without its keys
    with pytest.raises(ckpt.CheckpointError, match=r"its data loader state does not fit this run \(KeyError"):
        ckpt.restore_checkpoint(path, *_parts(model_json, settings)[:3], _StrictLoader(), settings)


class _StrictLoader(_Loader):
    def load_state_dict(self, state):
        self.position = state["epoch"], state["position"]


def test_a_stale_checkpoint_that_cannot_be_removed_does_not_fail_the_save(model_json, tmp_path, monkeypatch, capsys):  # noqa: F811
    out = tmp_path / "run"
    settings = _settings()
    parts = _parts(model_json, settings)
    _save(out, 2, parts, settings, keep_last=1)
    real_replace = os.replace

    def no_rename(src, dst):
        if ".tmp-removing-" in str(dst):
            raise PermissionError(errno.EACCES, "Permission denied", str(src))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", no_rename)
    assert _save(out, 4, parts, settings, keep_last=1).name == "step_00000004"
    assert _names(ckpt.list_checkpoints(out)) == ["step_00000002", "step_00000004"]
    assert "could not remove the old checkpoint " in capsys.readouterr().out


def test_the_chat_loader_refuses_a_negative_saved_position():
    loader = data_chat.ChatBatchLoader(list(range(8)), 2, seed=1, group_by_length=False)
    good = loader.state_dict()
    for bad in (dict(position=-1), dict(epoch=-2), dict(grad_accum=0, step_batch=0)):
        key, value = next(iter(bad.items()))
        with pytest.raises(
            ValueError,
            match=rf"cannot resume the data position: the checkpoint's loader state is damaged \({key} is {value}, "
            r"not an integer >= [01]\)",
        ):
            loader.load_state_dict({**good, **bad})
        assert (loader.epoch, loader.position) == (0, 0)
    loader.load_state_dict({**good, "epoch": 1, "position": 3})
    assert (loader.epoch, loader.position) == (1, 3)


@pytest.mark.parametrize(
    "edit, shown",
    [
        (dict(config={"micro_batch_size": "x"}), r"'x' x 2 x 1"),
        (dict(config={"grad_accum": None}), r"8 x None x 1"),
        (dict(world_size=0), r"8 x 2 x 0"),
        (dict(world_size=True, loader={"world_size": "many"}), r"8 x 2 x 0"),
    ],
)
def test_a_damaged_saved_batch_is_refused_by_name(model_json, tmp_path, edit, shown):  # noqa: F811
    settings = _settings()
    path = _save(tmp_path / "run", 4, _parts(model_json, settings), settings)
    meta = json.loads((path / "meta.json").read_text())
    meta["config"].update(edit.get("config", {}))
    meta.update({k: v for k, v in edit.items() if k not in ("config", "loader")})
    (path / "meta.json").write_text(json.dumps(meta))
    if "loader" in edit:
        state = torch.load(path / "state.pt", weights_only=True)
        torch.save({**state, "loader": edit["loader"]}, path / "state.pt")
    named = rf"its saved batch \(micro_batch_size x grad_accum x processes = {shown}\) is not made of positive integers"
    with pytest.raises(ckpt.ResumeSettingsError, match=named):
        ckpt.restore_checkpoint(path, *_parts(model_json, settings), settings)


def test_a_refused_resume_keeps_the_runs_record_of_its_settings(sample_data, model_json, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    pretrain.train(_cfg(sample_data, model_json, out, max_steps=4, save_every=2, stop_at_step=2))
    recorded = (out / "train_config.json").read_text()
    assert json.loads(recorded)["seed"] == 3
    with pytest.raises(ckpt.ResumeSettingsError, match=r"seed: 3 -> 4"):
        pretrain.train(_cfg(sample_data, model_json, out, max_steps=4, save_every=2, seed=4))
    assert (out / "train_config.json").read_text() == recorded


# ---------------------------------------------------------------------------------------------------------------
# What a resumed run reads, and what a fresh run would replace
# ---------------------------------------------------------------------------------------------------------------


def test_resume_refuses_a_model_config_or_data_edited_in_place(sample_data, model_json, tmp_path):  # noqa: F811
    """The same path with other contents is another run: an edited model config would change the architecture
    (a csa_window keeps every weight's shape, so the weights would load), edited data other examples. Both are
    refused by name before anything is loaded; the restored file resumes exactly as before."""
    config = tmp_path / "model.json"
    shutil.copy(model_json, config)
    data = tmp_path / "data"
    shutil.copytree(sample_data, data)
    out = tmp_path / "run"
    pretrain.train(_cfg(data, config, out, max_steps=4, save_every=2, stop_at_step=2))
    original = config.read_text()
    edited = json.loads(original)
    edited["csa_window"] = 8
    config.write_text(json.dumps(edited))
    with pytest.raises(ckpt.ResumeSettingsError, match=r"the model built now differs .*csa_window: 16 -> 8"):
        pretrain.train(_cfg(data, config, out, max_steps=4, save_every=2))
    config.write_text(original)
    meta = (data / "meta.json").read_text()
    (data / "meta.json").write_text(meta.replace('"num_docs"', '"num_docs" ', 1))  # same values, other bytes
    with pytest.raises(ckpt.ResumeSettingsError, match=rf"the contents of data_dir {data} changed"):
        pretrain.train(_cfg(data, config, out, max_steps=4, save_every=2))
    (data / "meta.json").write_text(meta)
    resumed = pretrain.train(_cfg(data, config, out, max_steps=4, save_every=2))
    assert sorted(resumed["losses"]) == [1, 2, 3, 4]


@pytest.mark.parametrize("where", ["inside", "same"])
def test_a_run_writing_into_its_data_folder_resumes(sample_data, model_json, tmp_path, where):  # noqa: F811
    """An out_dir in the data folder (or the data folder itself): the run's own checkpoints, lock and records are
    left out of the data's fingerprint, so they do not make the data look edited; an edit to the data still does."""
    data = tmp_path / "data"
    shutil.copytree(sample_data, data)
    out = data / "run" if where == "inside" else data
    pretrain.train(_cfg(data, model_json, out, max_steps=4, save_every=2, stop_at_step=2))
    resumed = pretrain.train(_cfg(data, model_json, out, max_steps=4, save_every=2, stop_at_step=3))
    assert sorted(resumed["losses"]) == [1, 2, 3]
    meta = (data / "meta.json").read_text()
    (data / "meta.json").write_text(meta.replace('"num_docs"', '"num_docs" ', 1))
    with pytest.raises(ckpt.ResumeSettingsError, match=rf"the contents of data_dir {data} changed"):
        pretrain.train(_cfg(data, model_json, out, max_steps=4, save_every=2))


def _rewrite_checkpoint(path, edit):
    """Apply `edit(state, meta)` to a checkpoint's state.pt and meta.json (as another LlamaThink version wrote it)."""
    state = torch.load(path / "state.pt", weights_only=True)
    meta = json.loads((path / "meta.json").read_text())
    edit(state, meta)
    torch.save(state, path / "state.pt")
    (path / "meta.json").write_text(json.dumps(meta))


def test_resume_refuses_a_model_changed_by_a_default_the_config_file_leaves_out(sample_data, model_json, tmp_path):  # noqa: F811
    """A hand-written model config without csa_window builds the version's default window. A checkpoint keeps the
    model it trained (`model_architecture`); resumed by a version whose default differs, the model built is
    compared with it and refused by name (the window has no weights: it would load and train another model).
    Writing the trained value into the file then resumes (its bytes are not compared, its model is)."""
    config = tmp_path / "model.json"
    raw = json.loads(model_json.read_text())
    for key in ("csa_window", "transformers_version"):
        raw.pop(key)
    config.write_text(json.dumps(raw))
    out = tmp_path / "run"
    pretrain.train(_cfg(sample_data, config, out, max_steps=4, save_every=2, stop_at_step=2))
    step = out / "checkpoints" / "step_00000002"
    assert json.loads((step / "meta.json").read_text())["model_architecture"]["csa_window"] == 512

    def trained_with_window_64(state, meta):  # as a version whose default was 64 wrote it
        state["model_architecture"]["csa_window"] = meta["model_architecture"]["csa_window"] = 64

    _rewrite_checkpoint(step, trained_with_window_64)
    with pytest.raises(
        ckpt.ResumeSettingsError, match=r"differs from the one the checkpoint trained \(csa_window: 64 -> 512\)"
    ):
        pretrain.train(_cfg(sample_data, config, out, max_steps=4, save_every=2))
    config.write_text(json.dumps(dict(raw, csa_window=64)))
    resumed = pretrain.train(_cfg(sample_data, config, out, max_steps=4, save_every=2))
    assert sorted(resumed["losses"]) == [1, 2, 3, 4]
    assert json.loads((out / "final" / "config.json").read_text())["csa_window"] == 64


def test_an_older_checkpoint_with_a_config_without_a_changed_default_is_refused(sample_data, model_json, tmp_path):  # noqa: F811
    """A checkpoint of a version that kept no model architecture, whose hand-written model config leaves out
    csa_window (then 64 or 256 by default, by version; now 512): refused by name; a saved config (every field,
    transformers_version) resumes."""
    config = tmp_path / "model.json"
    raw = json.loads(model_json.read_text())
    config.write_text(json.dumps({k: v for k, v in raw.items() if k not in ("csa_window", "transformers_version")}))
    out = tmp_path / "run"
    pretrain.train(_cfg(sample_data, config, out, max_steps=4, save_every=2, stop_at_step=2))

    def older_version(state, meta):
        del state["model_architecture"], meta["model_architecture"]

    _rewrite_checkpoint(out / "checkpoints" / "step_00000002", older_version)
    with pytest.raises(
        ckpt.ResumeSettingsError,
        match=r"older LlamaThink.*csa_window: 64 or 256 \(the default then, by version\) -> 512",
    ):
        pretrain.train(_cfg(sample_data, config, out, max_steps=4, save_every=2))
    saved_style = tmp_path / "saved"
    pretrain.train(_cfg(sample_data, model_json, saved_style, max_steps=4, save_every=2, stop_at_step=2))
    _rewrite_checkpoint(saved_style / "checkpoints" / "step_00000002", older_version)
    resumed = pretrain.train(_cfg(sample_data, model_json, saved_style, max_steps=4, save_every=2))
    assert sorted(resumed["losses"]) == [1, 2, 3, 4]


def test_a_fresh_run_refuses_to_replace_another_runs_finished_model(sample_data, model_json, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    pretrain.train(_cfg(sample_data, model_json, out, max_steps=2, save_every=2))
    weights = (out / "final" / "model.safetensors").read_bytes()
    shutil.rmtree(out / "checkpoints")  # "keep the model, drop the checkpoints", then a new run in the same place
    with pytest.raises(ckpt.OutDirInUse, match=r"holds another run's final and history\.json.*overwrite: true"):
        pretrain.train(_cfg(sample_data, model_json, out, max_steps=2, save_every=2, resume="none", seed=4))
    assert (out / "final" / "model.safetensors").read_bytes() == weights
    capsys.readouterr()
    pretrain.train(_cfg(sample_data, model_json, out, max_steps=2, save_every=2, resume="none", seed=4, overwrite=True))
    assert "final and history.json in" in capsys.readouterr().out  # said to stay until this run writes its own
    assert (out / "final" / "model.safetensors").read_bytes() != weights
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".final")) == []
    # the same run resumed from a copy of one of its checkpoints kept elsewhere is its own: not refused
    pretrain.train(
        _cfg(sample_data, model_json, out, max_steps=4, save_every=2, seed=4, overwrite=True, stop_at_step=2)
    )
    backup = tmp_path / "backup" / "step_00000002"
    shutil.copytree(out / "checkpoints" / "step_00000002", backup)
    resumed = pretrain.train(_cfg(sample_data, model_json, out, max_steps=4, save_every=2, seed=4, resume=str(backup)))
    assert sorted(resumed["losses"]) == [1, 2, 3, 4]


def test_a_failed_final_save_leaves_the_earlier_final_folder_whole(sample_data, model_json, tmp_path, monkeypatch):  # noqa: F811
    final, cfg = tmp_path / "final", _cfg(sample_data, model_json, tmp_path)
    model = LlamaThinkForCausalLM(LlamaThinkConfig.from_json_file(str(model_json)))
    loop.save_final(model, None, final, cfg)
    before = {p.name: p.read_bytes() for p in final.iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("llamathink.model_card.write_model_card", disk_full)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    message = "cannot write the finished model to .*No space left on device.*last checkpoint is intact"
    with pytest.raises(loop.OutputWriteError, match=message):  # a one-line error of the command (was a traceback)
        loop.save_final(model, None, final, cfg)
    assert {p.name: p.read_bytes() for p in final.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # no temporary folder left
    # killed between moving the earlier folder aside and renaming the new one in: the next save puts it back first
    final.rename(tmp_path / ".final.old")
    with pytest.raises(loop.OutputWriteError, match=message):
        loop.save_final(model, None, final, cfg)
    assert {p.name: p.read_bytes() for p in final.iterdir()} == before
    # a link that loops at the final folder's name (a RuntimeError from Path.resolve after the whole run): replaced
    looped = tmp_path / "looped" / "final"
    looped.parent.mkdir()
    looped.symlink_to(looped)
    monkeypatch.undo()
    loop.save_final(model, None, looped, cfg)
    assert not looped.is_symlink() and (looped / "config.json").is_file()
    monkeypatch.setattr("llamathink.model_card.write_model_card", disk_full)
    # history.json the same way: the earlier one whole, no temporary file left
    loop.write_history(tmp_path, {"losses": {1: 2.0}})
    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(loop.OutputWriteError, match=r"cannot write .*history.json \(No space left on device\)"):
        loop.write_history(tmp_path, {"losses": {1: 2.0, 2: 1.0}})
    monkeypatch.undo()
    assert json.loads((tmp_path / "history.json").read_text()) == {"losses": {"1": 2.0}}
    assert not (tmp_path / "history.json.tmp").exists()
    # a folder in the way: the failed rename names both of its paths (it named only the temporary file)
    in_the_way = tmp_path / "blocked"
    (in_the_way / "history.json").mkdir(parents=True)
    with pytest.raises(loop.OutputWriteError, match=r"history.json.tmp -> .*blocked/history.json\); .*move what is"):
        loop.write_history(in_the_way, {"losses": {1: 2.0}})


def test_a_run_stopped_by_a_write_error_closes_its_progress_bar(sample_data, model_json, tmp_path, monkeypatch, capsys):  # noqa: F811
    """history.json cannot be written at the first save: the command stops with its one-line error (naming the
    file it could not write), the checkpoint of that step saved, and the progress bar closed before the error is
    printed, so the error starts on a line of its own (it was printed after the bar's unfinished line)."""
    real_write_text = Path.write_text

    def history_disk_full(self, *args, **kwargs):
        if self.name == "history.json.tmp":
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", history_disk_full)
    out = tmp_path / "run"
    argv = ["--model_config", str(model_json), "--data_dir", str(sample_data), "--out_dir", str(out)]
    argv += ["--seq_len", "64", "--micro_batch_size", "4", "--max_steps", "4", "--warmup_steps", "1"]
    argv += ["--save_every", "2", "--eval_every", "100", "--sample_every", "100", "--wandb_mode", "disabled"]
    argv += ["--mixed_precision", "no"]  # as every in-process run of these tests (accelerate keeps one state)
    assert pretrain.main([*argv, "--progress_bar", "true"]) == 2
    err = capsys.readouterr().err
    error = "llamathink-pretrain: error: cannot write"
    assert f"\n{error} {out}/history.json (No space left on device: {out}/history.json.tmp)" in err, err[-500:]
    assert _names(ckpt.list_checkpoints(out)) == ["step_00000002"]


def test_a_resume_refuses_to_write_over_another_runs_later_checkpoints(sample_data, model_json, tmp_path):  # noqa: F811
    """Another run's checkpoint put into out_dir and resumed by path: that run's saves would replace the first
    run's checkpoints of the same steps (a re-save replaces a folder), which no run may touch: refused at start."""
    out, other = tmp_path / "run", tmp_path / "other"
    pretrain.train(_cfg(sample_data, model_json, out, max_steps=6, save_every=2, keep_last=3, stop_at_step=6))
    pretrain.train(_cfg(sample_data, model_json, other, max_steps=6, save_every=1, keep_last=3, stop_at_step=1))
    moved = ckpt.checkpoint_dir(out) / "step_00000001"
    shutil.copytree(ckpt.list_checkpoints(other)[0], moved)
    with pytest.raises(ckpt.OutDirInUse, match=r"another run's checkpoints after step 1 \(step_00000002, step_0"):
        pretrain.train(_cfg(sample_data, model_json, out, max_steps=6, save_every=1, resume=str(moved)))
    assert _names(ckpt.list_checkpoints(out)) == ["step_00000001", "step_00000002", "step_00000004", "step_00000006"]


def test_resume_naming_something_other_than_a_checkpoint_says_what_to_name(model_json, tmp_path):  # noqa: F811
    """resume: given the run's out_dir, its checkpoints/ folder, a state.pt file or a word: the error says what
    resume takes there (it said only "no checkpoint (state.pt) there")."""
    out = tmp_path / "run"
    settings = _settings()
    path = _save(out, 2, _parts(model_json, settings), settings)
    for given, named in [
        (
            out,
            rf"that is a run's folder: name one of its step_\* checkpoints, or use resume: auto with out_dir: {out}$",
        ),
        (out / "checkpoints", rf"that is a run's folder: .* with out_dir: {out}$"),
        (path / "state.pt", rf"name its folder: resume: {path}$"),
        ("latest", r"resume takes auto, none or a checkpoint folder \(step_\*\) holding state.pt$"),
    ]:
        with pytest.raises(FileNotFoundError, match=rf"resume={given}: no checkpoint \(state.pt\) there; {named}"):
            ckpt.resolve_resume(_settings(out_dir=str(out), resume=str(given)))


def test_resume_with_stop_at_step_not_after_it_trains_nothing_and_says_so(sample_data, model_json, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    pretrain.train(_cfg(sample_data, model_json, out, max_steps=4, save_every=2, stop_at_step=2))
    capsys.readouterr()
    again = pretrain.train(_cfg(sample_data, model_json, out, max_steps=4, save_every=2, stop_at_step=2))
    assert sorted(again["losses"]) == [1, 2]  # the run's history, no step more
    assert "note: stop_at_step 2 is not after the resumed step 2: no step to train" in capsys.readouterr().out


def test_checkpoints_that_share_a_save_count_are_ordered_by_save_time(model_json, tmp_path):  # noqa: F811
    """Two checkpoints of one run with the same save count (an edited or copied meta.json): the count cannot order
    them, so the save times do, with a note (the count was trusted: resume: auto went back to step 4)."""
    out = tmp_path / "run"
    settings = _settings()
    parts = _parts(model_json, settings)
    for step in (2, 4, 6):
        _save(out, step, parts, settings)
    file = ckpt.checkpoint_dir(out) / "step_00000006" / ckpt.META_FILE
    file.write_text(json.dumps({**json.loads(file.read_text()), "save_index": 1}))  # step 2's count
    notes = []
    assert ckpt.resolve_resume(_settings(out_dir=str(out)), notes.append).name == "step_00000006"
    assert any("share a save count" in note for note in notes), notes


def test_a_checkpoint_with_a_damaged_tensor_is_refused(model_json, tmp_path):  # noqa: F811
    """torch.load does not check the archive's CRCs: bytes overwritten inside a tensor (same length) would load
    as weights and train on; the CRC check names the damaged member."""
    settings = _settings()
    path = _save(tmp_path / "run", 2, _parts(model_json, settings), settings)
    state = path / ckpt.STATE_FILE
    data = bytearray(state.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 400] = bytes(400)
    state.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match=r"damaged \(.* fails its CRC check\)"):
        ckpt.load_checkpoint(path)


def test_ctrl_c_before_the_first_checkpoint_says_none_was_written(tmp_path, capsys):
    def interrupted(cfg):
        raise KeyboardInterrupt

    status = loop.command_main(
        ["--out_dir", str(tmp_path / "run")], prog="p", settings=run_config.RunConfig, run=interrupted, description=""
    )
    assert status == 130
    assert "no checkpoint had been written yet" in capsys.readouterr().err


def test_input_fingerprints_cover_the_fixed_inputs_by_content_and_leave_renames_to_the_settings_check(tmp_path):
    from types import SimpleNamespace

    config, evals = tmp_path / "model.json", tmp_path / "eval.jsonl"
    config.write_text('{"hidden_size": 64}')
    evals.write_text("{}\n")
    cfg = SimpleNamespace(model_config=str(config), tokenizer="builtin", data="sample", eval_data=str(evals))
    saved = ckpt.input_fingerprints(cfg)
    assert set(saved) == {"model_config"}  # eval_data may change on resume; names that are no local path skipped
    settings = {"model_config": str(config)}
    ckpt.check_inputs_unchanged(saved, cfg, "ck", settings)
    config.write_text('{"hidden_size": 65}')
    with pytest.raises(ckpt.ResumeSettingsError, match=rf"the contents of model_config {config} changed"):
        ckpt.check_inputs_unchanged(saved, cfg, "ck", settings)
    other = tmp_path / "other.json"
    other.write_text("{}")
    cfg.model_config = str(other)  # another name: compare_resume_settings names that change, not this check
    ckpt.check_inputs_unchanged(saved, cfg, "ck", settings)


def test_another_runs_outputs_inside_an_input_folder_are_not_a_change_of_it(tmp_path):
    """Two runs with their out_dirs in one data folder: each one's checkpoints, lock and records are no edit of the
    data for the other (its own were already left out); a data file added or edited still is. (A breaking helper
    found run A's resume refused once run B had written in the folder.)"""
    from types import SimpleNamespace

    data = tmp_path / "data"
    data.mkdir()
    (data / "train_000.bin").write_bytes(b"tokens")
    cfg = SimpleNamespace(data_dir=str(data), out_dir=str(data / "runA"))
    saved = ckpt.input_fingerprints(cfg)
    settings = {"data_dir": str(data)}
    run_b = data / "runB"
    (run_b / "checkpoints" / "step_00000002").mkdir(parents=True)
    (run_b / "checkpoints" / "step_00000002" / "state.pt").write_bytes(b"x" * 100)
    (run_b / ckpt.LOCK_FILE).write_text("123")
    for record in ("history.json", "train_config.json"):
        (run_b / record).write_text("{}")
    (run_b / "final").mkdir()
    (run_b / "final" / "model.safetensors").write_bytes(b"w")
    ckpt.check_inputs_unchanged(saved, cfg, "ck", settings)
    (run_b / ckpt.LOCK_FILE).unlink()  # a finished run: its checkpoints folder still marks it
    ckpt.check_inputs_unchanged(saved, cfg, "ck", settings)
    (data / "train_001.bin").write_bytes(b"more tokens")
    with pytest.raises(ckpt.ResumeSettingsError, match=rf"the contents of data_dir {data} changed"):
        ckpt.check_inputs_unchanged(saved, cfg, "ck", settings)


def test_resume_accepts_a_moved_input_with_the_same_contents_and_refuses_a_changed_one(
    sample_data,  # noqa: F811
    model_json,  # noqa: F811
    tmp_path,
    capsys,
):
    """An input folder or file moved or copied to another name (data to a faster disk, a config next to the run)
    resumes, with the change named: its fingerprint is the run's start's. Renamed and edited, it is refused by name
    (before: any other name was refused, and "restore them" was the only advice)."""
    out = tmp_path / "out"
    with torch_threads(1):
        pretrain.train(_cfg(sample_data, model_json, out, max_steps=2, save_every=2, eval_every=100))
    data, config = tmp_path / "fast_disk" / "data", tmp_path / "model.json"
    shutil.copytree(sample_data, data)
    shutil.copy(model_json, config)
    capsys.readouterr()
    edited = tmp_path / "edited"
    shutil.copytree(sample_data, edited)
    meta = json.loads((edited / "meta.json").read_text())
    (edited / "meta.json").write_text(json.dumps({**meta, "note": "edited"}))
    with pytest.raises(ckpt.ResumeSettingsError, match=rf"differ: data_dir: '{sample_data}' -> '{edited}'"):
        pretrain.train(_cfg(edited, config, out, max_steps=3, save_every=3, eval_every=100, resume="auto"))
    with torch_threads(1):
        history = pretrain.train(_cfg(data, config, out, max_steps=4, save_every=4, eval_every=100, resume="auto"))
    printed = capsys.readouterr().out
    assert f"data_dir: '{sample_data}' -> '{data}' (moved: same contents)" in printed
    assert f"model_config: '{model_json}' -> '{config}' (moved: same contents)" in printed
    assert "resumed from" in printed and sorted(map(int, history["losses"])) == [1, 2, 3, 4]


def test_held_out_settings_that_split_the_training_data_are_fixed_without_an_eval_data_file(tmp_path):
    """`max_eval_conversations` and `eval_data` may change on resume where an eval_data file holds the held-out
    conversations (the evaluation set alone changes). Without one, the held-out conversations are split off the
    training data, so either changes which conversations the run trains on: refused by name (it failed later as a
    changed example count that named no setting), unless eval_fraction is 0 (nothing split off) before and now."""

    def cfg(**kw):
        return finetune.FinetuneConfig(init_from="x", out_dir=str(tmp_path / "ft"), data="d.jsonl", **kw)

    with pytest.raises(ckpt.ResumeSettingsError, match=r"max_eval_conversations: 100 -> 50 \(without eval_data it "):
        ckpt.compare_resume_settings(
            dataclasses.asdict(cfg(max_eval_conversations=100)), cfg(max_eval_conversations=50), 1, 1
        )
    with pytest.raises(ckpt.ResumeSettingsError, match=r"eval_data: None -> 'e.jsonl' \(without eval_data"):
        ckpt.compare_resume_settings(dataclasses.asdict(cfg()), cfg(eval_data="e.jsonl"), 1, 1)
    saved = dataclasses.asdict(cfg(eval_data="e.jsonl", max_eval_conversations=100))
    assert ckpt.compare_resume_settings(saved, cfg(eval_data="f.jsonl", max_eval_conversations=50), 1, 1) == [
        "eval_data: 'e.jsonl' -> 'f.jsonl'",
        "max_eval_conversations: 100 -> 50",
    ]
    # with eval_fraction 0 nothing is split off the training data: both may change
    saved = dataclasses.asdict(cfg(eval_fraction=0.0, max_eval_conversations=100))
    assert ckpt.compare_resume_settings(saved, cfg(eval_fraction=0.0, eval_data="e.jsonl"), 1, 1) == [
        "eval_data: None -> 'e.jsonl'",
        "max_eval_conversations: 100 -> 1000",
    ]
    with pytest.raises(ckpt.ResumeSettingsError, match=r"eval_fraction: 0.0 -> 0.05"):
        ckpt.compare_resume_settings(saved, cfg(max_eval_conversations=50), 1, 1)


def test_a_null_tokenizer_and_the_one_the_data_names_are_one_setting(sample_data, model_json, tmp_path):  # noqa: F811
    """In pretraining, `tokenizer: null` loads the tokenizer the data's meta.json names: resuming with that name
    given (or given before and left out now) is no change (it was refused as one); another tokenizer still is."""
    assert json.loads((sample_data / "meta.json").read_text())["tokenizer"] == "builtin"
    implied = dataclasses.asdict(_cfg(sample_data, model_json, tmp_path / "r"))
    named = _cfg(sample_data, model_json, tmp_path / "r", tokenizer="builtin")
    assert implied["tokenizer"] is None
    assert ckpt.compare_resume_settings(implied, named, 1, 1) == []
    assert (
        ckpt.compare_resume_settings(dataclasses.asdict(named), _cfg(sample_data, model_json, tmp_path / "r"), 1, 1)
        == []
    )
    other = _cfg(sample_data, model_json, tmp_path / "r", tokenizer=str(tmp_path / "other.model"))
    with pytest.raises(ckpt.ResumeSettingsError, match=r"tokenizer: None -> '.*other.model'"):
        ckpt.compare_resume_settings(implied, other, 1, 1)


def test_a_null_finetuning_tokenizer_and_init_froms_are_one_setting(tmp_path):
    """In finetuning, `tokenizer: null` loads the tokenizer saved with init_from: resuming with that folder named
    (or named before and left out now, or under another name of the same folder) is no change; another tokenizer,
    or null with another init_from, still is one."""
    base, other = tmp_path / "base", tmp_path / "other"
    base.mkdir()
    other.mkdir()

    def cfg(**kw):
        return finetune.FinetuneConfig(**{"init_from": str(base), "out_dir": str(tmp_path / "chat"), **kw})

    implied = dataclasses.asdict(cfg())
    assert implied["tokenizer"] is None
    assert ckpt.compare_resume_settings(implied, cfg(tokenizer=str(base)), 1, 1) == []
    assert ckpt.compare_resume_settings(implied, cfg(tokenizer=str(base) + "/"), 1, 1) == []
    assert ckpt.compare_resume_settings(dataclasses.asdict(cfg(tokenizer=str(base))), cfg(), 1, 1) == []
    with pytest.raises(ckpt.ResumeSettingsError, match=r"tokenizer: None -> 'builtin'"):
        ckpt.compare_resume_settings(implied, cfg(tokenizer="builtin"), 1, 1)
    with pytest.raises(ckpt.ResumeSettingsError, match=r"tokenizer: None -> '.*other'"):
        ckpt.compare_resume_settings(implied, cfg(tokenizer=str(other)), 1, 1)
    # null with another init_from loads another tokenizer: the change is named (with init_from's)
    with pytest.raises(ckpt.ResumeSettingsError, match=r"init_from: '.*base' -> '.*other'") as err:
        ckpt.compare_resume_settings(dataclasses.asdict(cfg(tokenizer=str(base))), cfg(init_from=str(other)), 1, 1)
    assert "tokenizer:" in str(err.value)


def test_a_resume_that_changes_the_validation_set_says_so(sample_data, model_json, tmp_path):  # noqa: F811
    """Pretraining evaluates eval_batches x micro_batch_size x processes validation windows: a resume that splits the
    global batch otherwise changes that set, which the resume's notes now say (only micro_batch_size was named)."""
    saved = dataclasses.asdict(_cfg(sample_data, model_json, tmp_path / "r"))  # 8 x 2, 2 evaluation batches
    same = _cfg(sample_data, model_json, tmp_path / "r", micro_batch_size=4, grad_accum=4, eval_batches=4)
    assert not any(line.startswith("evaluation:") for line in ckpt.compare_resume_settings(saved, same, 1, 1))
    halved = _cfg(sample_data, model_json, tmp_path / "r", micro_batch_size=4, grad_accum=4)
    lines = ckpt.compare_resume_settings(saved, halved, 1, 1)
    assert "micro_batch_size: 8 -> 4" in lines
    assert any(line.startswith("evaluation: 16 -> 8 validation windows") for line in lines), lines


def test_a_saved_model_with_nan_weights_is_refused_where_a_run_or_chat_loads_it(model_json, tmp_path):  # noqa: F811
    """`load_saved_model` (init_from of pretraining and finetuning, the chat) refuses weights with NaN or infinite
    values by setting and tensor: a run from them stopped at its first step with advice (nonfinite: skip) that only
    skipped ten more steps."""
    from safetensors.torch import load_file, save_file

    LlamaThinkForCausalLM(LlamaThinkConfig.from_json_file(str(model_json))).save_pretrained(tmp_path / "m")
    weights = load_file(tmp_path / "m" / "model.safetensors")
    assert isinstance(ckpt.load_saved_model(str(tmp_path / "m"), "init_from"), LlamaThinkForCausalLM)
    assert isinstance(ckpt.load_saved_model(tmp_path / "m", "init_from"), LlamaThinkForCausalLM)  # a Path too
    with pytest.raises(TypeError, match="init_from: a saved model's folder or Hub id is a string or path, got int"):
        ckpt.load_saved_model(7, "init_from")
    weights["model.norm.weight"][0] = float("nan")
    save_file(weights, tmp_path / "m" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        ValueError, match=r"init_from=.*m: its weights hold NaN or infinite values \(model\.norm\.weight\)"
    ):
        ckpt.load_saved_model(str(tmp_path / "m"), "init_from")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"eos_token_id": "x"}, r"eos_token_id='x', not a token id of the model \(0 \.\. 127\)"),
        ({"eos_token_id": [2, 4096]}, r"eos_token_id=\[2, 4096\], not a token id"),
        ({"pad_token_id": True}, r"pad_token_id=True, not a token id"),
        ({"max_length": "ten"}, r"max_length='ten': it must be an integer >= 1"),
        ({"min_new_tokens": -1}, r"min_new_tokens=-1: it must be an integer >= 0"),
        ({"num_beams": 10**9}, r"num_beams=1000000000, past the 1024"),
        ({"top_p": 1.5}, r"top_p=1.5: it must be in \[0, 1\]"),
        ({"temperature": float("nan")}, r"temperature=nan: it must be a finite number >= 0"),
        ({"repetition_penalty": 0}, r"repetition_penalty=0: it must be a finite number > 0"),
        ({"top_k": 2.5}, r"top_k=2.5: it must be an integer >= 0"),
    ],
)
def test_trainers_refuse_an_init_from_generation_config_that_generate_could_not_use(
    settings,
    message,
    model_json,  # noqa: F811
    tmp_path,
):
    """transformers loads a generation_config.json as it is (a string EOS, beams by the billion) and
    `save_pretrained` writes it into the finished model: `load_saved_model(check_generation=True)`, what pretraining
    and finetuning load `init_from` with, refuses it by file and field before a run starts; a sane one (sampling
    settings, several EOS ids) passes, and without the check (the chat, which generates with its own settings)
    the damaged one loads."""
    from llamathink.train import pretrain

    config = json.loads(Path(model_json).read_text())
    folder = tmp_path / "m"
    LlamaThinkForCausalLM(LlamaThinkConfig(**{**config, "vocab_size": 128})).save_pretrained(folder)
    sane = {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 50, "eos_token_id": [2, 3], "max_length": 64}
    (folder / "generation_config.json").write_text(json.dumps(sane))
    model = ckpt.load_saved_model(str(folder), "init_from", check_generation=True)
    assert model.generation_config.eos_token_id == [2, 3]
    (folder / "generation_config.json").write_text(json.dumps(settings))
    assert isinstance(ckpt.load_saved_model(str(folder), "model"), LlamaThinkForCausalLM)
    with pytest.raises(ValueError, match=rf"init_from=.*m: its generation_config.json (has )?{message}"):
        ckpt.load_saved_model(str(folder), "init_from", check_generation=True)
    cfg = _cfg(None, model_json, tmp_path / "run", model_config=None, init_from=str(folder))
    with pytest.raises(ValueError, match="its generation_config.json"):
        pretrain.build_model(cfg)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("{broken", r"JSONDecodeError: Expecting property name"),
        ('{"vocab_size": ' + "9" * 5000 + "}", r"ValueError: Exceeds the limit \(4300 digits\)"),
        ('{"x": ' + "[" * 100_000 + "]" * 100_000 + "}", r"RecursionError: maximum recursion depth"),
    ],
    ids=["syntax", "long_number", "deep"],
)
def test_a_config_json_that_python_cannot_read_is_named_by_every_loader(text, error, tmp_path):
    """A config.json that is not JSON, or is JSON past Python's own limits (a number of more than 4300 digits,
    nesting past the recursion limit), is named by file: where a run or the chat loads a model, where a fresh run
    reads its model_config, and in bare `from_pretrained`. transformers names only the syntax error; the other two
    came from deep inside it, naming no file."""
    from conftest import tiny_model

    folder = tmp_path / "m"
    tiny_model(dtype=torch.float32).save_pretrained(folder)
    (folder / "config.json").write_text(text)
    with pytest.raises(ValueError, match=rf"init_from=.*m: its config.json cannot be read as JSON \({error}"):
        ckpt.load_saved_model(str(folder), "init_from")
    with pytest.raises(OSError, match=rf"config file .*m/config.json cannot be read as JSON \({error}"):
        LlamaThinkForCausalLM.from_pretrained(folder)
    with pytest.raises(ValueError, match=r"model_config .*m/config.json is not a readable JSON file \("):
        pretrain.check_config_keys(folder / "config.json")


@pytest.mark.parametrize(
    ("index", "message"),
    [
        (
            "{broken",
            r"its model\.safetensors\.index\.json cannot be read as JSON \(JSONDecodeError: Expecting property",
        ),
        (
            json.dumps({"weight_map": [1, 2]}),
            r"its model\.safetensors\.index\.json has no weight_map object .* \(got list\)",
        ),
        (json.dumps([1]), r"its model\.safetensors\.index\.json has no weight_map object .* \(got NoneType\)"),
        (
            json.dumps({"weight_map": {"model.norm.weight": 7}}),
            r"its .*index\.json has no weight_map object .* \(got dict\)",
        ),
        (json.dumps({"weight_map": {}, "metadata": {}}), r"its .*index\.json maps no tensors"),
        pytest.param(
            "[" * 100000 + "]" * 100000, r"its .*index\.json cannot be read as JSON \(RecursionError", id="deep"
        ),
        ("no-metadata", r"its .*index\.json has no metadata object \(got NoneType\)"),
    ],
)
def test_a_damaged_sharded_weights_index_is_named_where_a_run_or_chat_loads_it(index, message, tmp_path):
    """A model.safetensors.index.json that is not JSON, or has no weight map of tensor names to shard files, is
    refused by file before transformers reads it: it raised a bare JSON message without the file's name, or an
    AttributeError from inside its loader (a list for the weight map)."""
    from conftest import tiny_model

    folder = tmp_path / "m"
    tiny_model(dtype=torch.float32).save_pretrained(folder, max_shard_size="20KB")
    assert isinstance(ckpt.load_saved_model(str(folder), "init_from"), LlamaThinkForCausalLM)
    if index == "no-metadata":  # the real index without its metadata
        index = json.dumps(
            {"weight_map": json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]}
        )
    (folder / "model.safetensors.index.json").write_text(index)
    with pytest.raises(ValueError, match=rf"init_from=.*m: {message}"):
        ckpt.load_saved_model(str(folder), "init_from")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[]", r"holds a list, not a JSON object of settings"),
        ("null", r"holds a NoneType, not a JSON object"),
        ("{broken", r"cannot be read as JSON \(JSONDecodeError"),
        (json.dumps({"pad_token_id": "0"}), r"is refused by transformers \(TypeError"),
        (json.dumps({"num_return_sequences": 2}), r"is refused by transformers \(ValueError: Greedy methods"),
        (json.dumps({"repetition_penalty": 2}), r"makes generate\(\) fail \(ValueError: .*penalty"),
        (json.dumps({"forced_eos_token_id": 100000}), r"makes generate\(\) fail \(IndexError"),
        (json.dumps({"do_sample": True, "temperature": 2}), r"makes generate\(\) fail \(ValueError: .*temperature"),
    ],
)
def test_trainers_name_a_generation_config_that_transformers_or_generate_refuse_and_the_chat_skips_it(
    text,
    message,
    model_json,  # noqa: F811
    tmp_path,
):
    """A generation_config.json that is no JSON object, that transformers refuses (a bare TypeError or a message
    without the file's name from inside `from_pretrained` before), or with which generate() fails at its first
    tokens (an integer penalty, a forced token outside the vocabulary: the trainers' sample steps failed mid-run):
    refused by file where the trainers load `init_from`; the chat, which generates with its own settings, loads
    the folder without reading it. The probe generate() leaves torch's random state as it was."""
    config = json.loads(Path(model_json).read_text())
    folder = tmp_path / "m"
    LlamaThinkForCausalLM(LlamaThinkConfig(**{**config, "vocab_size": 128})).save_pretrained(folder)
    (folder / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.7}))
    state = torch.random.get_rng_state()
    ckpt.load_saved_model(str(folder), "init_from", check_generation=True)  # sampling in the probe
    assert torch.equal(torch.random.get_rng_state(), state)
    (folder / "generation_config.json").write_text(text)
    with pytest.raises(ValueError, match=rf"init_from=.*m: its generation_config.json {message}"):
        ckpt.load_saved_model(str(folder), "init_from", check_generation=True)
    from transformers import GenerationConfig

    model = ckpt.load_saved_model(str(folder), "model")  # the file not read: transformers' defaults
    assert model.generation_config.to_json_string() == GenerationConfig().to_json_string()


def test_staged_settings_follow_the_last_saved_checkpoint_not_the_highest_step(
    sample_data,  # noqa: F811
    model_json,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    """A run resumed from an earlier checkpoint of its folder, killed between its first checkpoint and moving its
    settings in place: the next start compares them with the checkpoint saved last (the resumed run's step 3),
    not the highest step (the first run's step 4), and moves them in place (they were dropped)."""
    out = tmp_path / "run"
    pretrain.train(_cfg(sample_data, model_json, out, max_steps=4, save_every=2, keep_last=3))
    step2 = str(ckpt.list_checkpoints(out)[0])

    def killed(self, in_place):  # (stands in for a kill between the checkpoint and the move)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(loop.StagedSettings, "settle", killed)
        with pytest.raises(KeyboardInterrupt):
            pretrain.train(_cfg(sample_data, model_json, out, max_steps=4, save_every=1, keep_last=3, resume=step2))
    assert ckpt.latest_checkpoint(out).name == "step_00000003" and ckpt.list_checkpoints(out)[-1].name.endswith("4")
    assert json.loads((out / "train_config.json").read_text())["save_every"] == 2
    loop.StagedSettings(out / "train_config.json").recover()
    assert json.loads((out / "train_config.json").read_text())["save_every"] == 1
    # a damaged meta.json among the checkpoints does not stop the start here (the resume names it or passes it)
    (ckpt.list_checkpoints(out)[0] / ckpt.META_FILE).write_text("{")
    (out / "train_config.json.staged").write_text("{}")
    loop.StagedSettings(out / "train_config.json").recover()
    assert not (out / "train_config.json.staged").exists()
