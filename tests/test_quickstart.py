"""The README's quickstart runs end to end (in its --fast form: a few steps of each stage)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO_ROOT


def test_quickstart_fast_runs_every_stage(tmp_path):
    out = tmp_path / "qs"
    proc = subprocess.run([sys.executable, "-m", "llamathink.quickstart", "--out", str(out), "--fast"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in ("1/5", "2/5", "3/5", "4/5", "5/5"):
        assert f"=== {stage}" in proc.stdout
    # stage 4 loaded the saved model's own code, not this package
    assert "loaded transformers_modules." in proc.stdout and "LlamaThinkForCausalLM" in proc.stdout
    summary = json.loads((out / "quickstart.json").read_text())
    for key in ("pretrain", "chat"):
        assert (Path(summary[key]) / "model.safetensors").exists(), summary[key]
    assert (out / "c" / "model.bin").stat().st_size > 1_000_000 and (out / "c" / "run").exists()
    assert (out / "chat" / "final" / "chat_template.jinja").exists()
