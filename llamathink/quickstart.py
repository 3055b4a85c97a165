"""The whole pipeline on a tiny model, offline, on CPU, in a few minutes:

    python -m llamathink.quickstart [--out runs/quickstart] [--fast]

1. tokenize the bundled sample corpus with the built-in tokenizer (`llamathink.data prepare`),
2. pretrain a tiny LlamaThink with Muon (`llamathink.train.pretrain`, configuration/train/tiny_cpu.yaml),
3. chat-finetune it on the bundled conversations (`llamathink.train.finetune`, configuration/finetune/tiny_cpu.yaml),
4. reload the result through `AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)` and chat,
5. export it to C (`export_c`), build `run.c` and chat with the same model natively.

Run it from a checkout of the repository (the presets live in configuration/).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from .cli import tolerant_output

REPO_ROOT = Path(__file__).resolve().parents[1]


def _step(title: str):
    print(f"\n=== {title} ===", flush=True)


def main(argv: list[str] | None = None) -> int:
    """`llamathink-quickstart`: the module docstring's stages, in order, under `--out`; returns the exit status: 0
    when done, 2 with a one-line `llamathink-quickstart: error: ...` for a setting or file a stage refuses (the
    training commands' `USER_ERRORS`), 130 with one line for Ctrl-C."""
    tolerant_output()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/quickstart", help="output folder (default: runs/quickstart)")
    parser.add_argument("--fast", action="store_true", help="a few steps only (a smoke test of the pipeline)")
    parser.add_argument("--prompt", default="Hi! Can you recommend something to read?")
    args = parser.parse_args(argv)
    from .train.loop import USER_ERRORS

    interrupted = "\nllamathink-quickstart: interrupted; the same command starts it again (its runs start over)"
    try:
        return _run(args)
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
    except subprocess.CalledProcessError as err:
        if err.returncode != -signal.SIGINT:  # (a child that failed otherwise: its own output says how)
            raise
        print(interrupted, file=sys.stderr)  # (the child ended by Ctrl-C before this process saw it)
        return 130
    except USER_ERRORS as err:
        print(f"llamathink-quickstart: error: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    presets = REPO_ROOT / "configuration"
    if not (presets / "train" / "tiny_cpu.yaml").exists():
        raise SystemExit(f"the presets are missing under {presets}: run the quickstart from a repository checkout")
    from .data import LocalSource, prepare
    from .tokenizer_utils import sample_data_path
    from .train import finetune, pretrain

    out = Path(args.out).resolve()
    marker = out / "quickstart.json"
    # a rerun starts its runs over (overwrite), so the folder must be an earlier quickstart's: another run's
    # checkpoints and final model there would be deleted
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not marker.is_file())):
        raise SystemExit(
            f"--out {out} is not empty and is not an earlier quickstart's folder (no quickstart.json): the "
            "quickstart replaces its runs; give an empty or new folder"
        )
    out.mkdir(parents=True, exist_ok=True)
    if not marker.is_file():  # written first, so a rerun after a stop is recognised as this quickstart's
        marker.write_text(json.dumps({"status": "started"}, indent=2))
    started = time.time()

    _step("1/5 tokenize the bundled sample corpus")
    data = out / "data"
    # overwrite: this folder is the quickstart's (above), and an earlier run's data may come from another checkout
    prepare(
        LocalSource([str(sample_data_path("prose.jsonl"))]),
        data,
        "builtin",
        val_docs=20,
        progress=False,
        overwrite=True,
    )

    _step("2/5 pretrain a tiny model (Muon)")
    overrides = [
        "--data_dir",
        str(data),
        "--out_dir",
        str(out / "pretrain"),
        "--model_config",
        str(presets / "models" / "llamathink-tiny.json"),
        "--resume",
        "none",
        "--overwrite",
        "true",
        "--progress_bar",
        "false",
    ]  # a rerun starts over: overwrite replaces the last run's checkpoints
    if args.fast:
        overrides += [
            "--max_steps",
            "6",
            "--warmup_steps",
            "1",
            "--eval_every",
            "3",
            "--save_every",
            "6",
            "--sample_every",
            "6",
        ]
    history = pretrain.train(pretrain.load_config(str(presets / "train" / "tiny_cpu.yaml"), overrides))
    losses = history["losses"]
    print(
        f"training loss {losses[min(losses)]:.2f} -> {losses[max(losses)]:.2f}; validation "
        + " -> ".join(f"{v:.2f}" for v in history["eval"].values())
    )

    _step("3/5 chat-finetune on the bundled conversations")
    overrides = [
        "--init_from",
        history["final_dir"],
        "--out_dir",
        str(out / "chat"),
        "--resume",
        "none",
        "--overwrite",
        "true",
        "--progress_bar",
        "false",
    ]
    if args.fast:
        overrides += [
            "--max_steps",
            "4",
            "--warmup_steps",
            "1",
            "--eval_every",
            "2",
            "--save_every",
            "4",
            "--sample_every",
            "4",
        ]
    chat_history = finetune.finetune(finetune.load_config(str(presets / "finetune" / "tiny_cpu.yaml"), overrides))
    final = Path(chat_history["final_dir"])

    _step("4/5 reload through trust_remote_code (in a process where llamathink is not importable) and chat")
    # The saved folder carries its own model code: load it the way a user without this package would.
    script = (
        "import signal; signal.signal(signal.SIGINT, signal.SIG_DFL)  # (Ctrl-C: ended at once; the parent says so)\n"
        "import sys; sys.modules['llamathink'] = None\n"
        "sys.stdout.reconfigure(errors='replace')  # (a reply the terminal's encoding cannot hold: '?')\n"
        "import torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"path, prompt = {str(final)!r}, {args.prompt!r}\n"
        "model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)\n"
        "tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)\n"
        "print('loaded', type(model).__module__ + '.' + type(model).__name__)\n"
        "ids = tokenizer.apply_chat_template([{'role': 'user', 'content': prompt}], add_generation_prompt=True,\n"
        "                                    return_tensors='pt', return_dict=True)['input_ids']\n"
        "out = model.generate(ids, max_new_tokens=48, do_sample=False, pad_token_id=tokenizer.pad_token_id)\n"
        "print('user:', prompt)\n"
        "print('assistant:', tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", script], check=True, cwd=out, env=env)

    _step("5/5 export to C and chat natively")
    from export_c.export import main as export_main

    c_dir = out / "c"
    c_dir.mkdir(parents=True, exist_ok=True)
    export_main(
        [str(final), str(c_dir / "model.bin"), "--dtype", "fp32", "--tokenizer-out", str(c_dir / "tokenizer.bin")]
    )
    source = REPO_ROOT / "export_c" / "run.c"
    binary = c_dir / "run"
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        raise SystemExit("no C compiler (cc, gcc or clang) found to build export_c/run.c")
    subprocess.run([compiler, "-O3", "-march=native", "-o", str(binary), str(source), "-lm"], check=True)
    cmd = [
        str(binary),
        str(c_dir / "model.bin"),
        "-z",
        str(c_dir / "tokenizer.bin"),
        "-m",
        "chat",
        "-i",
        args.prompt,
        "-n",
        "48",
        "-t",
        "0",
    ]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL)
    print(f"\ndone in {time.time() - started:.0f} s; everything is under {out}")
    (out / "quickstart.json").write_text(
        json.dumps(
            {"pretrain": history["final_dir"], "chat": str(final), "c_model": str(c_dir / "model.bin")}, indent=2
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
