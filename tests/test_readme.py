"""The newcomer path: the README's install and test commands agree with setup.py, its "Use a model" block runs as
written on a saved model (offline, no prompt), and saved models carry a model card and a generation-ready
tokenizer (llamathink.train.loop.save_final, which pretraining and finetuning call)."""

import ast
import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, tiny_config

from llamathink import LlamaThinkForCausalLM
from llamathink.chat_format import set_chat_template
from llamathink.tokenizer_utils import builtin_tokenizer, save_tokenizer_for_model
from llamathink.train import finetune, loop, pretrain

README = REPO_ROOT / "README.md"
PROMPT_TEXT = "Do you wish to run the custom code"


def readme_section(title: str) -> str:
    """The text of the README's `## title` section (up to the next `## ` heading)."""
    text = README.read_text(encoding="utf-8")
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def use_a_model_code() -> str:
    """The first ```python block of the README's "Use a model" section."""
    match = re.search(r"```python\n(.*?)```", readme_section("Use a model"), re.S)
    assert match, "the 'Use a model' section has no python block"
    return match.group(1)


# Runs a README block with print() recording its arguments, then prints them as one JSON line: generated text may
# hold any characters, newlines included, so the block's own output cannot be split reliably.
# The block samples; seeded, so that a tiny quickstart model's occasional end-of-sequence as the first sampled token
# (an empty continuation) cannot fail the check below at random.
_RUNNER = """
import builtins, json, sys, torch
torch.manual_seed(0)
printed, real_print = [], builtins.print
builtins.print = lambda *args, **kwargs: printed.append(args[0] if len(args) == 1 else list(args))
exec(compile(sys.argv[1], "README.md (Use a model)", "exec"), {"__name__": "__main__"})
real_print("README-PRINTED " + json.dumps(printed))
"""


def run_use_a_model(cwd: Path) -> list:
    """Run the README's "Use a model" block in a fresh process in `cwd` (where runs/quickstart/... is), offline and
    with stdin closed, so that a y/N prompt ends the read at once instead of waiting; returns what it printed (one
    item per print call)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", _RUNNER, use_a_model_code()],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert PROMPT_TEXT not in proc.stdout + proc.stderr, "the README block stops at the trust_remote_code prompt"
    line = next(x for x in proc.stdout.splitlines() if x.startswith("README-PRINTED "))
    return json.loads(line[len("README-PRINTED ") :])


def check_use_a_model_output(printed: list):
    """The block prints a continuation of "The river", a chat reply, then a batch of two continuations."""
    assert len(printed) == 3, printed
    assert isinstance(printed[0], str) and printed[0].startswith("The river") and len(printed[0]) > len("The river")
    assert isinstance(printed[1], str), printed[1]
    batch = printed[2]
    assert isinstance(batch, list) and len(batch) == 2 and all(isinstance(t, str) and t for t in batch), batch


def tiny_chat_model(seed: int = 0):
    """A tiny float32 model over the built-in 1024-token vocabulary and that tokenizer with the chat template."""
    torch.manual_seed(seed)
    model = LlamaThinkForCausalLM(tiny_config(vocab_size=1024, pad_token_id=0)).float().eval()
    return model, set_chat_template(builtin_tokenizer())


def finetune_cfg(tmp_path: Path, **overrides) -> finetune.FinetuneConfig:
    return finetune.FinetuneConfig(
        init_from=str(tmp_path / "pretrained"),
        out_dir=str(tmp_path / "chat-run"),
        max_steps=2,
        warmup_steps=1,
        wandb_mode="disabled",
        **overrides,
    )


# ---------------------------------------------------------------------------------------------------------------
# the "Use a model" block
# ---------------------------------------------------------------------------------------------------------------


def test_use_a_model_block_runs_as_written_on_a_saved_chat_model(tmp_path):
    # the folder the quickstart's chat stage writes, made by the same helper (loop.save_final); the full
    # quickstart followed by this block runs in test_quickstart.py
    model, tokenizer = tiny_chat_model()
    final = tmp_path / "runs" / "quickstart" / "chat" / "final"
    history = {"losses": {1: 4.0, 2: 3.5}, "eval": {0: 5.0, 2: 3.6}}
    loop.save_final(model, tokenizer, final, finetune_cfg(tmp_path), history, tokens_seen=1000)
    check_use_a_model_output(run_use_a_model(tmp_path))


# ---------------------------------------------------------------------------------------------------------------
# install and test commands against setup.py
# ---------------------------------------------------------------------------------------------------------------


def _setup_requirements() -> tuple[list[str], dict[str, list[str]]]:
    """install_requires and extras_require, read from setup.py's setup(...) call without running it."""
    tree = ast.parse((REPO_ROOT / "setup.py").read_text(encoding="utf-8"))
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "setup")
    kw = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in ("install_requires", "extras_require")}
    return kw["install_requires"], kw["extras_require"]


def _dist_name(requirement: str) -> str:
    from packaging.requirements import Requirement

    return re.sub(r"[-_.]+", "-", Requirement(requirement).name).lower()


def _installed_closure(names: set[str]) -> set[str]:
    """`names` plus everything their installed distributions require (unconditional requirements, recursively)."""
    from packaging.requirements import Requirement

    seen, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for raw in requires:
            req = Requirement(raw)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(_dist_name(raw))
    return seen


def _readme_pip_extras(text: str) -> list[list[str]]:
    """The extras of each `pip install -e ".[a,b]"` command in `text` ([] for `pip install -e .`)."""
    return [
        [e.strip() for e in m.group(1).split(",")] if m.group(1) else []
        for m in re.finditer(r'pip install -e "?\.(?:\[([^\]]*)\])?"?', text)
    ]


def test_readme_install_and_test_commands_match_setup_extras():
    install_requires, extras = _setup_requirements()
    install, tests, quickstart = readme_section("Install"), readme_section("Tests"), readme_section("Quickstart")
    # every extra the README names exists
    for section in (install, tests):
        for named in _readme_pip_extras(section):
            assert set(named) <= set(extras), f"README installs unknown extras {named}; setup.py has {sorted(extras)}"
    # the first install command (the newcomer's) and the Tests section install the dev extra, which has pytest
    assert "dev" in _readme_pip_extras(install)[0], "the README's first install command lacks the dev extra"
    assert any("dev" in named for named in _readme_pip_extras(tests))
    assert "pytest" in {_dist_name(r) for r in extras["dev"]}
    test_command = "python -m pytest -q tests"
    assert test_command in tests and test_command in quickstart
    ci = (REPO_ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert 'pip install -q -e ".[dev]"' in ci and test_command in ci


def test_every_module_the_tests_import_is_installed_by_the_readme_commands():
    """Third-party modules imported anywhere in tests/ come from install_requires or the dev extra (or what those
    require), or from the gpu/hopper extras (their tests skip without CUDA)."""
    install_requires, extras = _setup_requirements()
    declared = {_dist_name(r) for r in install_requires + extras["dev"]}
    allowed = _installed_closure(declared) | {_dist_name(r) for r in extras["gpu"] + extras["hopper"]}
    local = (
        {p.stem for p in (REPO_ROOT / "tests").glob("*.py")}
        | {p.stem for p in REPO_ROOT.glob("*.py")}
        | {p.stem for p in (REPO_ROOT / "benchmarks").glob("*.py")}  # scripts whose pieces tests check
        | {p.parent.name for p in REPO_ROOT.glob("*/__init__.py")}
    )
    providers = importlib.metadata.packages_distributions()
    missing = {}
    for path in sorted((REPO_ROOT / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top in sys.stdlib_module_names or top in local:
                    continue
                dists = {re.sub(r"[-_.]+", "-", d).lower() for d in providers.get(top, [top])}
                if not dists & allowed:
                    missing.setdefault(top, set()).add(path.name)
    assert not missing, f'tests import modules that `pip install -e ".[dev]"` does not install: {missing}'


# ---------------------------------------------------------------------------------------------------------------
# what save_final writes: the model card and the tokenizer defaults
# ---------------------------------------------------------------------------------------------------------------


def test_save_final_writes_a_model_card_and_a_left_padding_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    model, tokenizer = tiny_chat_model()
    params = sum(p.numel() for p in model.parameters())
    final = tmp_path / "final"
    history = {
        "losses": {"1": 4.0, "2": 3.5},
        "eval": {"0": 5.25, "2": 3.6125},  # keys as JSON strings too
        "data": {"train_conversations": 1234, "eval_conversations": 56},
    }
    loop.save_final(model, tokenizer, final, finetune_cfg(tmp_path), history, tokens_seen=4096)

    card = (final / "README.md").read_text(encoding="utf-8")
    assert card.startswith("---\n") and "license: mit" in card and "pipeline_tag: text-generation" in card
    assert f"| parameters | {params:,} (input and output embeddings tied) |" in card
    assert "trust_remote_code=True" in card and "apply_chat_template" in card
    assert "| assistant tokens trained on | 4,096 |" in card
    assert "3.6125 at step 2" in card and "2 optimizer steps" in card
    assert "(`llamathink/sample_data/conversations.jsonl`): 1,234 for training, 56 held out" in card
    assert f"Chat-finetuned from `{tmp_path / 'pretrained'}`" in card
    assert "base_model" not in card  # a local folder is not a Hub id
    assert "## Intended use and limitations" in card and "## License" in card

    config = json.loads((final / "tokenizer_config.json").read_text())
    assert config["padding_side"] == "left" and config["model_max_length"] == 256
    assert "local_files_only" not in config and "is_local" not in config
    assert tokenizer.padding_side == "right"  # the caller's tokenizer is left as it was
    reloaded = AutoTokenizer.from_pretrained(str(final), trust_remote_code=True)
    assert reloaded.padding_side == "left" and reloaded.model_max_length == model.config.max_position_embeddings
    batch = reloaded(["The river runs", "Hi"], padding=True).input_ids
    short = reloaded("Hi").input_ids
    assert batch[1][-len(short) :] == short and batch[1][0] == reloaded.pad_token_id  # padded on the left
    assert reloaded.chat_template == tokenizer.chat_template


def test_pretraining_card_states_the_data_steps_and_tokens(tmp_path):
    model, tokenizer = tiny_chat_model()
    data = tmp_path / "data"
    data.mkdir()
    (data / "meta.json").write_text(
        json.dumps(
            {
                "source": {"type": "hf", "name": "HuggingFaceFW/fineweb", "config": "sample-10BT"},
                "train": {"num_tokens": 123456, "num_docs": 789},
            }
        )
    )
    cfg = pretrain.TrainConfig(
        data_dir=str(data),
        out_dir=str(tmp_path / "llamathink-tiny"),
        max_steps=3,
        warmup_steps=1,
        micro_batch_size=2,
        grad_accum=1,
        seq_len=64,
    )
    history = {"losses": {1: 7.0, 2: 6.5, 3: 6.0}, "eval": {3: 6.125}}
    loop.save_final(model, None, tmp_path / "final", cfg, history, tokens_seen=384)
    card = (tmp_path / "final" / "README.md").read_text(encoding="utf-8")
    assert card.split("\n---\n", 1)[1].lstrip().startswith("# llamathink-tiny\n")
    assert "datasets:\n- HuggingFaceFW/fineweb" in card
    assert "the Hub dataset `HuggingFaceFW/fineweb` (sample-10BT)" in card and "123,456 training tokens" in card
    assert "| training tokens seen | 384 |" in card and "6.1250 at step 3" in card
    assert "3 optimizer steps, each of 2 sequences of 64 tokens x 1 micro-batch per process |" in card
    for processes, said in (
        (1, "x 1 micro-batch on 1 process |"),
        (4, "x 1 micro-batch per process, on 4 processes |"),
    ):
        loop.save_final(model, None, tmp_path / "final", cfg, {**history, "num_processes": processes}, tokens_seen=384)
        assert said in (tmp_path / "final" / "README.md").read_text(encoding="utf-8")
    assert "Pretrained from scratch" in card and "apply_chat_template" not in card  # no chat template saved
    assert not (tmp_path / "final" / "tokenizer_config.json").exists()


def test_card_without_history_says_so_and_names_a_hub_base_model(tmp_path):
    from llamathink.model_card import model_card_text

    model, tokenizer = tiny_chat_model()
    cfg = finetune.FinetuneConfig(
        init_from="someone/llamathink-95m",
        out_dir=str(tmp_path / "x"),
        hub_model_id="someone/llamathink-95m-chat",
        wandb_mode="disabled",
    )
    card = model_card_text(model, cfg, tokenizer=tokenizer)
    assert "base_model: someone/llamathink-95m\n" in card and "# someone/llamathink-95m-chat\n" in card
    assert "| assistant tokens trained on | not recorded |" in card and "| not measured |" in card
    assert f"{cfg.max_steps:,} optimizer steps" in card


def test_card_metadata_lists_each_dataset_once_and_table_cells_keep_their_pipes(tmp_path):
    """The same Hub dataset for training and evaluation (as configuration/finetune/chat_95m.yaml gives) is listed
    once in the card's metadata; a "|" in a path (which ends a Markdown table cell even inside backticks) is
    escaped, so every table row keeps its two cells."""
    from llamathink.model_card import model_card_text

    model, tokenizer = tiny_chat_model()
    cfg = finetune.FinetuneConfig(
        init_from="org/base",
        data="HuggingFaceTB/smol-smoltalk",
        eval_data="HuggingFaceTB/smol-smoltalk",
        out_dir=str(tmp_path / "x"),
        wandb_mode="disabled",
    )
    card = model_card_text(model, cfg, tokenizer=tokenizer)
    assert card.count("- HuggingFaceTB/smol-smoltalk") == 1
    cfg = finetune.FinetuneConfig(init_from="/models/a|b", data="my|chats.jsonl", out_dir=str(tmp_path / "y"))
    card = model_card_text(model, cfg, tokenizer=tokenizer)
    rows = [line for line in card.splitlines() if line.startswith("| ") and not line.startswith("| |")]
    assert rows and all(line.replace("\\|", "").count("|") == 3 for line in rows), rows
    assert "`my\\|chats.jsonl`" in card and "`/models/a\\|b`" in card


def test_a_packed_finetuning_card_counts_rows_not_conversations(tmp_path):
    """With packing each micro-batch row holds several conversations: the card says rows, their length and how many
    conversations a row held on average (it said "4 conversations", for rows of about 6.6)."""
    from llamathink.model_card import model_card_text

    model, tokenizer = tiny_chat_model()
    cfg = finetune.FinetuneConfig(
        init_from="org/base", packing=True, max_len=256, micro_batch_size=4, out_dir=str(tmp_path / "x")
    )
    history = {"losses": {1: 3.0}, "data": {"train_conversations": 352, "eval_conversations": 8, "packed_rows": 214}}
    card = model_card_text(model, cfg, tokenizer=tokenizer, history=history)
    assert "each of 4 packed rows (conversations packed up to 256 tokens, 1.6 conversations a row on average) x" in card
    assert "4 conversations x" not in card


def test_push_to_hub_uploads_the_saved_folder_with_its_card(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kw: calls.append(("create", repo_id)))
    monkeypatch.setattr(
        huggingface_hub,
        "upload_folder",
        lambda **kw: calls.append(("upload", kw["repo_id"], sorted(os.listdir(kw["folder_path"])))),
    )
    model, tokenizer = tiny_chat_model()
    monkeypatch.setattr(model, "push_to_hub", lambda *a, **k: pytest.fail("model.push_to_hub writes a generic card"))
    cfg = finetune_cfg(tmp_path, push_to_hub=True, hub_model_id="me/tiny-chat")
    loop.save_final(model, tokenizer, tmp_path / "final", cfg)
    assert calls[0] == ("create", "me/tiny-chat") and calls[1][:2] == ("upload", "me/tiny-chat")
    assert {"README.md", "model.safetensors", "tokenizer_config.json", "modeling_llamathink.py"} <= set(calls[1][2])


def test_push_to_hub_checks_the_hub_before_training_and_keeps_the_model_when_the_upload_fails(tmp_path, monkeypatch):
    """No token, or a Hub that does not answer: the run stops before training (`begin_run`), naming the setting; an
    upload that fails after training leaves the saved folder and says where it is and how to retry."""
    import huggingface_hub

    cfg = finetune_cfg(tmp_path, push_to_hub=True, hub_model_id="me/tiny-chat")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(ValueError, match="push_to_hub needs a Hugging Face token"):
        loop.begin_run(cfg)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_dummy")

    def offline(self, *args, **kwargs):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub.HfApi, "whoami", offline)
    with pytest.raises(ValueError, match="the Hub cannot be reached or refuses the token .*Name or service"):
        loop.begin_run(cfg)
    assert not (tmp_path / "chat-run").exists()  # stopped before anything of the run was written
    for role, refused in (("read", True), ("write", False)):
        me = {"name": "me", "auth": {"accessToken": {"role": role}}}
        monkeypatch.setattr(huggingface_hub.HfApi, "whoami", lambda self, *a, _me=me, **k: _me)
        if refused:
            with pytest.raises(ValueError, match="the Hugging Face token is read-only"):
                loop.check_hub_access(cfg)
        else:
            loop.check_hub_access(cfg)
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kw: None)
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kw: offline(None))
    model, tokenizer = tiny_chat_model()
    with pytest.raises(
        loop.HubUploadError, match=f"the model is saved in {tmp_path / 'final'}, but uploading.*hf upload"
    ):
        loop.save_final(model, tokenizer, tmp_path / "final", cfg)
    assert (tmp_path / "final" / "model.safetensors").exists() and (tmp_path / "final" / "README.md").exists()


@pytest.mark.parametrize("bad", [0, -5, 1.5, None, True])
def test_save_tokenizer_for_model_rejects_a_bad_context(tmp_path, bad):
    with pytest.raises(ValueError, match="model_max_length must be a positive integer"):
        save_tokenizer_for_model(builtin_tokenizer(), tmp_path, bad)
    assert not any(tmp_path.iterdir())


def test_every_console_script_loads_and_answers_help(capsys):
    """Each `console_scripts` entry of setup.py names a function that exists (a module moved without updating
    setup.py would only fail on a user's machine) and prints its usage for --help."""
    from importlib.metadata import EntryPoint

    scripts = re.findall(r'"(llamathink-[\w-]+)=([\w.]+:\w+)"', (REPO_ROOT / "setup.py").read_text())
    assert {name for name, _ in scripts} >= {
        "llamathink-prepare",
        "llamathink-pretrain",
        "llamathink-finetune",
        "llamathink-chat",
        "llamathink-export-c",
        "llamathink-quickstart",
    }
    for name, target in scripts:
        main = EntryPoint(name, target, "console_scripts").load()
        with pytest.raises(SystemExit) as exit_info:
            main(["--help"])
        assert exit_info.value.code == 0, name
        assert "usage:" in capsys.readouterr().out, name
