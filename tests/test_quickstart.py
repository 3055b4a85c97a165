"""The README top to bottom, offline: its quickstart command (in the --fast form: a few steps of each stage), then
its "Use a model" block on the quickstart's output (test_readme.py checks the install commands)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT
from test_readme import check_use_a_model_output, readme_section, run_use_a_model


def test_quickstart_fast_runs_every_stage_and_the_readme_block_uses_its_model(tmp_path):
    command = "python -m llamathink.quickstart"
    assert command in readme_section("Quickstart")
    # the README's command, run where a newcomer would (its output goes to ./runs/quickstart), here with a terminal
    # that takes ASCII alone and a prompt that is not (stage 4's child process stopped on it)
    proc = subprocess.run(
        [sys.executable, "-m", "llamathink.quickstart", "--fast", "--prompt", "Any tips \u2014 for reading?"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONIOENCODING": "ascii"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "user: Any tips ? for reading?" in proc.stdout
    for stage in ("1/5", "2/5", "3/5", "4/5", "5/5"):
        assert f"=== {stage}" in proc.stdout
    # stage 4 loaded the saved model's own code, not this package
    assert "loaded transformers_modules." in proc.stdout and "LlamaThinkForCausalLM" in proc.stdout
    out = tmp_path / "runs" / "quickstart"
    summary = json.loads((out / "quickstart.json").read_text())
    for key in ("pretrain", "chat"):
        final = Path(summary[key])
        assert (final / "model.safetensors").exists(), summary[key]
        # every saved model has a model card and a tokenizer set up for generation
        assert "trust_remote_code=True" in (final / "README.md").read_text(encoding="utf-8")
        tokenizer_config = json.loads((final / "tokenizer_config.json").read_text())
        context = json.loads((final / "config.json").read_text())["max_position_embeddings"]
        assert tokenizer_config["padding_side"] == "left" and tokenizer_config["model_max_length"] == context
    assert (out / "c" / "model.bin").stat().st_size > 1_000_000 and (out / "c" / "run").exists()
    assert (out / "chat" / "final" / "chat_template.jinja").exists()

    check_use_a_model_output(run_use_a_model(tmp_path))


def test_quickstart_refuses_a_folder_that_is_not_an_earlier_quickstarts(tmp_path):
    """Its runs start over (overwrite): in a folder holding another run, that run's checkpoints and final model
    would be deleted. Refused before anything is written; a file is refused too."""
    from llamathink import quickstart

    other = tmp_path / "mine"
    (other / "pretrain" / "checkpoints").mkdir(parents=True)
    (other / "pretrain" / "history.json").write_text("{}")
    before = sorted(str(p) for p in other.rglob("*"))
    with pytest.raises(SystemExit, match="not an earlier quickstart's folder"):
        quickstart.main(["--out", str(other), "--fast"])
    assert sorted(str(p) for p in other.rglob("*")) == before
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match="not an earlier quickstart's folder"):
        quickstart.main(["--out", str(tmp_path / "file"), "--fast"])


def test_quickstart_rerun_over_data_prepared_by_another_checkout(tmp_path, monkeypatch):
    """A rerun into an earlier quickstart's folder whose data came from another checkout (another path of the
    sample corpus) prepares the data again: it stopped with prepare's "different preparation ... --overwrite",
    an option the quickstart does not have."""
    import shutil

    from llamathink import quickstart
    from llamathink.data import LocalSource, prepare
    from llamathink.tokenizer_utils import sample_data_path
    from llamathink.train import pretrain

    out = tmp_path / "qs"
    out.mkdir()
    (out / "quickstart.json").write_text('{"status": "done"}')
    elsewhere = tmp_path / "other-checkout" / "prose.jsonl"
    elsewhere.parent.mkdir()
    shutil.copy(sample_data_path("prose.jsonl"), elsewhere)
    prepare(LocalSource([str(elsewhere)]), out / "data", "builtin", val_docs=20, progress=False)

    class Prepared(Exception):
        pass

    def stop(*args, **kwargs):
        raise Prepared

    monkeypatch.setattr(pretrain, "train", stop)
    with pytest.raises(Prepared):
        quickstart.main(["--out", str(out), "--fast"])
    meta = json.loads((out / "data" / "meta.json").read_text())
    assert str(sample_data_path("prose.jsonl")) in json.dumps(meta) and str(elsewhere) not in json.dumps(meta)


@pytest.mark.parametrize(
    "error, status, said",
    [
        (KeyboardInterrupt(), 130, "llamathink-quickstart: interrupted; the same command starts it again"),
        (ValueError("out_dir is locked"), 2, "llamathink-quickstart: error: out_dir is locked"),
        # (a child process ended by the Ctrl-C before this process raised KeyboardInterrupt)
        (subprocess.CalledProcessError(-2, ["python"]), 130, "llamathink-quickstart: interrupted; the same command"),
    ],
)
def test_quickstart_stopped_in_a_stage_says_so_in_one_line(tmp_path, monkeypatch, capsys, error, status, said):
    """Ctrl-C during a stage, or a setting or file a stage refuses, ends the quickstart with one line and the
    training commands' exit status (it printed a traceback from deep inside torch or the stage)."""
    from llamathink import quickstart
    from llamathink.train import pretrain

    def stop(*args, **kwargs):
        raise error

    monkeypatch.setattr(pretrain, "train", stop)
    assert quickstart.main(["--out", str(tmp_path / "qs"), "--fast"]) == status
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err
