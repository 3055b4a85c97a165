"""Pretraining loop tests on CPU: settings, schedule, a short run whose loss falls, exact resume, atomic
checkpoints under SIGKILL, non-finite losses, vocabulary checks, and a 2-process DDP (gloo) run."""

import dataclasses
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, tiny_model

from llamathink import LlamaThinkConfig, LlamaThinkForCausalLM
from llamathink.data import LocalSource, TokenBatchLoader, prepare, val_batches
from llamathink.hub import OFFLINE_VARIABLES
from llamathink.modeling_llamathink import flops_per_token
from llamathink.tokenizer_utils import sample_data_path
from llamathink.train import checkpoint as ckpt
from llamathink.train import config as run_config
from llamathink.train import loop, optim, pretrain


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    prepare(
        LocalSource([str(sample_data_path("prose.jsonl"))]),
        out,
        "builtin",
        shard_tokens=40_000,
        val_docs=20,
        num_workers=1,
        progress=False,
    )
    return out


@pytest.fixture(scope="session")
def model_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "config.json"
    LlamaThinkConfig(
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=2,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        max_position_embeddings=128,
        csa_window=16,
        gdn_chunk_size=16,
    ).to_json_file(path)
    return path


def _cfg(sample_data, model_json, out_dir, **overrides):
    settings = dict(
        model_config=str(model_json),
        data_dir=str(sample_data),
        out_dir=str(out_dir),
        seq_len=64,
        micro_batch_size=8,
        grad_accum=2,
        max_steps=12,
        warmup_steps=2,
        mixed_precision="no",
        eval_every=6,
        eval_batches=2,
        sample_every=10_000,
        log_every=3,
        save_every=6,
        keep_last=2,
        peak_tflops=None,
        wandb_mode="disabled",
        progress_bar=False,
        seed=3,
    )
    settings.update(overrides)
    return pretrain.TrainConfig(**settings)


# ---------------------------------------------------------------------------------------------------------------
# settings and schedule
# ---------------------------------------------------------------------------------------------------------------


def test_yaml_and_cli_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("max_steps: 30\nwarmup_steps: 3\noptimizer: adamw\nsample_prompts: [a, b]\n")
    cfg = pretrain.load_config(
        str(path), ["--max_steps", "40", "--muon_lr=0.01", "--compile", "true", "--wandb_run_name", "123"]
    )
    assert (cfg.max_steps, cfg.warmup_steps, cfg.optimizer, cfg.muon_lr, cfg.compile) == (40, 3, "adamw", 0.01, True)
    assert cfg.sample_prompts == ["a", "b"] and cfg.wandb_run_name == "123"


def test_unknown_and_bad_settings_are_named(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("max_step: 30\n")
    with pytest.raises(ValueError, match=r"run.yaml: unknown setting 'max_step'"):
        pretrain.load_config(str(path))
    with pytest.raises(ValueError, match="unknown setting --lr"):
        pretrain.load_config(None, ["--lr", "0.1"])
    with pytest.raises(ValueError, match="optimizer must be 'muon' or 'adamw'"):
        pretrain.load_config(None, ["--optimizer", "sgd"])
    with pytest.raises(ValueError, match="expects true or false"):
        pretrain.load_config(None, ["--compile", "maybe"])
    with pytest.raises(ValueError, match="warmup_steps"):
        pretrain.load_config(None, ["--max_steps", "10", "--warmup_steps", "20"])
    # an interval of 0, elsewhere often "off", is refused with how to get what it would mean
    for name, hint in (
        ("sample_every", r"\(no samples: sample_prompts: \[\]\)"),
        (
            "eval_every",
            r"\(evaluations at the last step only \(and at step 0 with eval_at_start\): an eval_every above max_steps\)",
        ),
        ("save_every", r"\(a checkpoint at the last step only: a save_every above max_steps\)"),
    ):
        with pytest.raises(ValueError, match=rf"^{name} must be positive, got 0 {hint}$"):
            pretrain.load_config(None, [f"--{name}", "0"])
    assert pretrain.load_config(None, ["--sample_prompts", "[]"]).sample_prompts == []


@pytest.mark.parametrize(
    "written, value",
    [
        ("1e-3", 0.001),
        ("3e-4", 3e-4),
        (".5", 0.5),
        ("1E-3", 0.001),
        ("2", 2.0),
        ("0.002", 0.002),
        ("2.5e+1", 25.0),
        ("-0", 0.0),
    ],
)
def test_every_way_to_write_a_float_reads_as_that_float(tmp_path, written, value):
    path = tmp_path / "run.yaml"
    path.write_text(f"adamw_lr: {written}\nweight_decay: {written}\n")  # PyYAML reads 1e-3 as a string
    for cfg in (
        pretrain.load_config(str(path)),
        pretrain.load_config(None, [f"--adamw_lr={written}", "--weight_decay", written]),
    ):
        assert type(cfg.adamw_lr) is float and cfg.adamw_lr == value and cfg.weight_decay == value


def test_settings_of_every_type_parse_from_yaml_and_the_command_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "max_steps: 1e4\nwarmup_steps: 10_000\ncompile: yes\nprogress_bar: 0\nwandb_project: null\n"
        "adamw_betas: [0.9, 0.95]\npeak_tflops: 312\nstop_at_step: none\nwandb_run_name: 123\n"
        "resume: none\n"
    )
    cfg = pretrain.load_config(str(path))
    assert (cfg.max_steps, cfg.warmup_steps, cfg.compile, cfg.progress_bar) == (10_000, 10_000, True, False)
    assert cfg.wandb_project is None and cfg.stop_at_step is None and cfg.resume == "none"
    assert cfg.adamw_betas == (0.9, 0.95) and cfg.peak_tflops == 312.0 and type(cfg.peak_tflops) is float
    assert cfg.wandb_run_name == "123"
    cli = pretrain.load_config(
        None,
        [
            "--adamw_betas",
            "0.8,0.9",
            "--compile=FALSE",
            "--peak_tflops",
            "null",
            "--wandb_project",
            "none",
            "--sample_prompts",
            "[Hello, 'a, b']",
            "--max_steps",
            "2e3",
            "--warmup_steps",
            "10",
        ],
    )
    assert cli.adamw_betas == (0.8, 0.9) and cli.compile is False and cli.peak_tflops is None
    assert cli.wandb_project is None and cli.sample_prompts == ["Hello", "a, b"] and cli.max_steps == 2000
    assert pretrain.load_config(None, ["--adamw_betas", "(0.5, 0.6)"]).adamw_betas == (0.5, 0.6)
    quoted = tmp_path / "quoted.yaml"
    quoted.write_text('max_steps: "9007199254740993"\n')  # digits as text are read exactly, not through a float
    assert pretrain.load_config(str(quoted)).max_steps == 2**53 + 1


@pytest.mark.parametrize(
    "setting, written, named",
    [
        ("adamw_lr", "fast", r"adamw_lr expects a number, got 'fast'"),
        ("adamw_lr", "nan", r"adamw_lr expects a number, got NaN"),
        ("adamw_lr", "true", r"adamw_lr expects a number, got True"),
        ("max_steps", "1.5", r"max_steps expects an integer, got 1.5"),
        ("max_steps", "ten", r"max_steps expects an integer, got 'ten'"),
        ("max_steps", "1e30", r"max_steps expects an integer written exactly, got '1e30'"),
        ("compile", "maybe", r"compile expects true or false, got 'maybe'"),
        ("adamw_betas", "0.9,0.95,0.99", r"adamw_betas expects 2 values, got 3"),
        ("adamw_betas", "0.9,x", r"adamw_betas\[1\] expects a number, got 'x'"),
        ("sample_prompts", "Hello", r"sample_prompts expects a list such as \[a, b\], got 'Hello'"),
        ("muon_lr", "null", r"muon_lr: a value is required"),
        ("adamw_lr", "-1e-3", r"adamw_lr must be a finite number >= 0, got -0.001"),
        ("adamw_betas", "[0.9, 1.5]", r"adamw_betas must be two numbers in \[0, 1\)"),
    ],
)
def test_a_value_that_cannot_be_read_as_its_type_is_an_error_naming_the_field(tmp_path, setting, written, named):
    with pytest.raises(ValueError, match=named):
        pretrain.load_config(None, [f"--{setting}", written])
    path = tmp_path / "run.yaml"
    path.write_text(f"{setting}: {written}\n")
    with pytest.raises(ValueError, match=named.replace(f"{setting}", f"(run.yaml: )?{setting}", 1)):
        pretrain.load_config(str(path))


@pytest.mark.parametrize(
    "cls, values, named",
    [
        ("TrainConfig", {"document_masking": "false"}, r"document_masking must be true or false, got 'false'"),
        ("TrainConfig", {"compile": "no"}, r"compile must be true or false, got 'no'"),
        ("TrainConfig", {"grad_accum": 2.5}, r"grad_accum must be an integer, got 2.5"),
        ("TrainConfig", {"micro_batch_size": "4"}, r"micro_batch_size must be an integer, got '4'"),
        ("TrainConfig", {"seq_len": True}, r"seq_len must be an integer, got True"),
        ("TrainConfig", {"seq_len": 1}, r"seq_len must be at least 2 \(a token and the next one it predicts\), got 1"),
        ("FinetuneConfig", {"max_len": 1}, r"max_len must be at least 2 \(a token and the next one it predicts\)"),
        ("TrainConfig", {"muon_cuda_graph": "yes"}, r"muon_cuda_graph must be true or false, got 'yes'"),
        ("TrainConfig", {"peak_tflops": "989"}, r"peak_tflops must be a number or null, got '989'"),
        ("TrainConfig", {"sample_prompts": ["a", 3]}, r"sample_prompts must be a list of text, got \['a', 3\]"),
        ("TrainConfig", {"adamw_betas": 0.9}, r"adamw_betas must be a list, got 0.9"),
        ("TrainConfig", {"out_dir": Path("runs/x")}, r"out_dir must be text, got PosixPath"),
        ("FinetuneConfig", {"packing": 1}, r"packing must be true or false, got 1"),
        ("FinetuneConfig", {"max_len": 512.0}, r"max_len must be an integer or null, got 512.0"),
    ],
)
def test_settings_built_in_python_are_checked_against_their_types(cls, values, named):
    """A settings dataclass built in Python gets no coercion (`load_config` gives each value its field's type): a
    value of another type is refused, naming the field, rather than read as something else ("false" as true)."""
    from llamathink.train.finetune import FinetuneConfig

    config_cls = {"TrainConfig": pretrain.TrainConfig, "FinetuneConfig": FinetuneConfig}[cls]
    with pytest.raises(ValueError, match=named):
        config_cls(**values)
    # what the types allow: an int where a number is asked, a list or tuple of two for the betas, null where optional
    assert pretrain.TrainConfig(muon_lr=1, adamw_betas=[0.9, 0.95], peak_tflops=None).adamw_betas == (0.9, 0.95)


def test_a_model_config_past_what_the_machine_can_allocate_is_named_with_its_size(
    sample_data, model_json, tmp_path, monkeypatch
):
    """A model JSON whose widths ask for more memory than the machine has is a ValueError naming the file and the
    parameter count, not the allocator's error from inside a layer (the allocator's refusal stood in for: within
    the config's limits it depends on the machine). Widths past run.c's limits (a vocabulary of 2^40) are refused
    by the config itself, before anything is allocated."""
    config = json.loads(model_json.read_text())
    huge = tmp_path / "huge.json"
    huge.write_text(json.dumps({**config, "vocab_size": 2**40}))
    with pytest.raises(ValueError, match=r"vocab_size=1099511627776 is past the 4,194,304"):
        pretrain.build_model(_cfg(sample_data, huge, tmp_path / "out"))
    real = pretrain.LlamaThinkForCausalLM

    def allocator_refuses(config):
        if torch.get_default_device().type != "meta":
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
        return real(config)

    monkeypatch.setattr(pretrain, "LlamaThinkForCausalLM", allocator_refuses)
    with pytest.raises(
        ValueError, match=rf"model_config {model_json} describes a model of [\d,]+ parameters .* allocate"
    ):
        pretrain.build_model(_cfg(sample_data, model_json, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_presets_load():
    for path in sorted((REPO_ROOT / "configuration" / "train").glob("*.yaml")):
        cfg = pretrain.load_config(str(path))
        config = LlamaThinkConfig.from_json_file(str(REPO_ROOT / cfg.model_config))
        assert cfg.seq_len <= config.max_position_embeddings, path
    original = pretrain.load_config(str(REPO_ROOT / "configuration/train/fineweb_95m_4gpu.yaml"))
    # the original recipe: 64 x 1024 x 8 accumulation x 4 GPUs = 2,097,152 tokens per step
    assert original.micro_batch_size * original.seq_len * original.grad_accum * 4 == 2_097_152
    assert (original.max_steps, original.warmup_steps, original.muon_lr, original.adamw_lr) == (
        10_000,
        500,
        0.02,
        0.002,
    )


def test_warmup_then_cosine_to_zero():
    cfg = pretrain.TrainConfig(max_steps=100, warmup_steps=10)
    factors = [optim.lr_factor(s, cfg) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[55] == pytest.approx(0.5)
    assert optim.lr_factor(100, cfg) == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))


def test_flops_per_token_counts_params_and_mixers():
    config = LlamaThinkConfig()
    n = 95_717_712  # tied: the embedding matrix is counted once, as the output head
    T = 1024
    attention = 4 * 6 * 9 * 64 * T  # 4 full layers
    attention += 4 * 12 * 9 * 64 * (512 + T / 8)  # 4 CSA layers: window + compressed blocks
    attention += 8 * 12 * 9 * 112 * 112  # 8 Gated DeltaNet layers
    assert flops_per_token(config, T) == pytest.approx(6 * n + attention)


# ---------------------------------------------------------------------------------------------------------------
# training runs
# ---------------------------------------------------------------------------------------------------------------


def _tiny_run_val_loss(sample_data, model_json, old_init: bool, steps: int = 60) -> float:
    """Train the tiny model `steps` Muon steps and return its validation loss; `old_init` rebuilds the init used
    before the equal-token benchmark (residual projections / sqrt(2L), PyTorch's uniform conv, A in [1, 16])."""
    overrides = dict(zero_init_residual=False, rescale_prenorm_residual=True, A_init_range=[1, 16]) if old_init else {}
    config = LlamaThinkConfig.from_json_file(str(model_json))
    config.update(overrides)
    torch.manual_seed(0)
    model = LlamaThinkForCausalLM(LlamaThinkConfig(**config.to_dict()))
    if old_init:
        with torch.no_grad():
            for name, module in model.named_modules():
                if name.endswith("conv1d"):
                    module.weight.uniform_(-0.5, 0.5)  # 1 / sqrt(kernel 4)
    settings = run_config.RunConfig(max_steps=steps, warmup_steps=5, micro_batch_size=16, grad_accum=1)
    optimizer = optim.build_optimizer(model, settings)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: optim.lr_factor(k, settings))
    loader = TokenBatchLoader(sample_data, 64, 16, seed=0)
    for _ in range(steps):
        input_ids, labels = next(loader)
        model(input_ids=input_ids, labels=labels, use_cache=False).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        losses = [
            model(input_ids=x, labels=y, use_cache=False).loss.item()
            for x, y in val_batches(sample_data, 64, 16, max_batches=4)
        ]
    return sum(losses) / len(losses)


def test_default_init_learns_more_per_token_than_the_old_init(sample_data, model_json):
    """The init chosen by the equal-token benchmark beats the previous one on the same batches (by 0.066 to 0.088
    over seeds 0-2 with the zero residual start; seed noise is about 0.03). The zero start's own gain over
    N(0, 0.02) (0.020 nats on the 95M model at 800 steps) is within this tiny model's seed noise (-0.020 to +0.016
    over seeds 0-2 at 60 steps), so it has no threshold test here; `test_fresh_init_values` checks the start."""
    new = _tiny_run_val_loss(sample_data, model_json, old_init=False)
    old = _tiny_run_val_loss(sample_data, model_json, old_init=True)
    assert new < old - 0.04, (new, old)


def test_short_run_lowers_the_loss_and_saves_a_loadable_model(sample_data, model_json, tmp_path):
    cfg = _cfg(sample_data, model_json, tmp_path / "run", max_steps=30, eval_every=15, save_every=30, adamw_lr=0.004)
    history = pretrain.train(cfg)
    losses = history["losses"]
    assert len(losses) == 30
    first, last = sum(losses[s] for s in (1, 2, 3)) / 3, sum(losses[s] for s in (28, 29, 30)) / 3
    assert last < first - 1.0, (first, last)  # ln(1024) = 6.9 at the start
    assert history["eval"][30] < history["eval"][15]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(history["final_dir"], trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(history["final_dir"])
    ids = tokenizer("The river", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=5, do_sample=False).shape[1] == ids.shape[1] + 5


def test_resume_reproduces_the_uninterrupted_run_exactly(sample_data, model_json, tmp_path, capsys):
    full = pretrain.train(_cfg(sample_data, model_json, tmp_path / "full"))
    assert "stopped at step" not in capsys.readouterr().out
    interrupted = pretrain.train(_cfg(sample_data, model_json, tmp_path / "resumed", stop_at_step=6))
    assert interrupted["final_dir"] is None and sorted(interrupted["losses"]) == list(range(1, 7))
    said = capsys.readouterr().out
    assert f"stopped at step 6 of 12 (stop_at_step), checkpoint in {tmp_path / 'resumed' / 'checkpoints'}:" in said
    assert "rerun with resume: auto (the default) and a later stop_at_step or none" in said
    again = pretrain.train(_cfg(sample_data, model_json, tmp_path / "resumed", stop_at_step=6))  # trains no step
    said = capsys.readouterr().out
    assert sorted(again["losses"]) == list(range(1, 7))
    assert "stop_at_step 6 is not after the resumed step 6" in said and "stopped at step" not in said, said
    resumed = pretrain.train(_cfg(sample_data, model_json, tmp_path / "resumed"))
    assert sorted(resumed["losses"]) == list(range(1, 13))
    for step in range(1, 13):
        assert resumed["losses"][step] == full["losses"][step], step  # bitwise: same data, state and RNG
    a = ckpt.load_checkpoint(tmp_path / "full/checkpoints/step_00000012")["model"]
    b = ckpt.load_checkpoint(tmp_path / "resumed/checkpoints/step_00000012")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_sample_the_terminal_cannot_encode_does_not_stop_the_run(sample_data, model_json, tmp_path, monkeypatch):
    """stdout in an encoding without a sample's characters (a non-UTF-8 locale, PYTHONIOENCODING=ascii): the run
    stopped at its first sample with a UnicodeEncodeError (and, before its first checkpoint, removed its out_dir);
    the sample is printed with replacement marks and the run goes on."""
    import io

    out = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    monkeypatch.setattr("sys.stdout", out)
    settings = dict(micro_batch_size=2, grad_accum=1, max_steps=2, warmup_steps=1, sample_every=1, sample_tokens=2)
    cfg = _cfg(sample_data, model_json, tmp_path / "run", sample_prompts=["Caf\u00e9 \u2615"], **settings)
    loop.write_settings(tmp_path / "run.yaml", cfg)  # (JSON: YAML reads it)
    assert pretrain.main(["--config", str(tmp_path / "run.yaml")]) == 0
    out.flush()
    assert "[sample] 'Caf? ?" in out.buffer.getvalue().decode("ascii")
    assert (tmp_path / "run" / "final" / "config.json").exists()


def test_adamw_only_run(sample_data, model_json, tmp_path, capsys):
    history = pretrain.train(
        _cfg(sample_data, model_json, tmp_path / "adamw", optimizer="adamw", max_steps=6, eval_every=100)
    )
    assert len(history["losses"]) == 6 and all(math.isfinite(v) for v in history["losses"].values())
    started = next(line for line in capsys.readouterr().out.splitlines() if "optimizer adamw: " in line)
    assert "adamw_matrices " in started and "muon" not in started.split("optimizer adamw: ")[1]  # (said "muon")


def test_keep_last_checkpoints(sample_data, model_json, tmp_path):
    pretrain.train(_cfg(sample_data, model_json, tmp_path / "k", max_steps=8, save_every=2, keep_last=2))
    names = [p.name for p in ckpt.list_checkpoints(tmp_path / "k")]
    assert names == ["step_00000006", "step_00000008"]


def poison_first_step(patch) -> None:
    """Through `patch` (pytest's monkeypatch), pretraining builds models whose final norm weight is NaN: every
    loss is NaN, from the first step on."""
    real_build = pretrain.build_model

    def poisoned(cfg):
        model = real_build(cfg)
        model.model.norm.weight.data.fill_(float("nan"))
        return model

    patch.setattr(pretrain, "build_model", poisoned)


def test_nonfinite_loss_stops_or_skips_and_keeps_checkpoints(sample_data, model_json, tmp_path, monkeypatch):
    out = tmp_path / "nan"
    pretrain.train(_cfg(sample_data, model_json, out, max_steps=12, stop_at_step=2, save_every=2))
    poison_first_step(monkeypatch)
    # named by the step that failed, the first (it said "step 0", the count of steps done)
    with pytest.raises(loop.NonFiniteLoss, match="non-finite loss or gradient at step 1 .*No checkpoint had been"):
        pretrain.train(_cfg(sample_data, model_json, tmp_path / "nan2", max_steps=12))
    with pytest.raises(loop.NonFiniteLoss, match=r"The last checkpoint, .*step_00000002, is intact"):
        loop.skip_nonfinite_step(
            _cfg(sample_data, model_json, out),
            3,
            float("nan"),
            1.0,
            0,
            torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1),
            None,
        )
    # resuming loads the good checkpoint weights over the poisoned init, so this run is healthy
    history = pretrain.train(_cfg(sample_data, model_json, out, max_steps=12, stop_at_step=3))
    assert 3 in history["losses"] and math.isfinite(history["losses"][3])
    with pytest.raises(loop.NonFiniteLoss, match="3 consecutive non-finite steps"):
        pretrain.train(_cfg(sample_data, model_json, tmp_path / "nan3", nonfinite="skip", max_consecutive_skips=3))
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step_00000002", "step_00000003"]


def test_step_values_are_read_two_steps_late_and_all_at_a_pause():
    """`StepValues`: `ready` hands back, oldest first, every step but the last two added (the same steps whatever
    the timing, as every process of a run must), `drain` the rest; the values are those added."""
    values = loop.StepValues(max_lag=2)
    for step in (1, 2):
        values.add(step, torch.tensor([float(step), 10.0 * step]))
        assert values.ready() == []
    values.add(3, torch.tensor([3.0, float("nan")]))
    assert values.ready() == [(1, 1.0, 10.0)]
    values.add(4, torch.tensor([4.0, 40.0]))
    values.add(5, torch.tensor([5.0, 50.0]))
    step, loss, grad_norm = values.ready()[1]
    assert (step, loss) == (3, 3.0) and math.isnan(grad_norm)
    assert values.drain() == [(4, 4.0, 40.0), (5, 5.0, 50.0)] and values.drain() == []


def test_the_logged_learning_rate_is_the_one_each_logged_step_trained_with(sample_data, model_json, tmp_path):
    """`train/lr` of step k is the rate its update used, `lr_factor(k - 1)` times the peak (the schedule moves on
    after the update): the first warmup step's partial rate, not the next one's, and the last step's rate, not the
    zero that follows it. Each update's rate is read from the optimizer when the schedule moves on after it."""
    cfg = _cfg(sample_data, model_json, tmp_path / "out", max_steps=5, warmup_steps=2, log_every=1, eval_every=100)
    used = []
    real_step = torch.optim.lr_scheduler.LambdaLR.step

    def step(self, *args, **kwargs):
        if hasattr(self, "_last_lr"):  # (not the step LambdaLR takes when it is made)
            used.append(self.optimizer.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.optim.lr_scheduler.LambdaLR, "step", step)
        perf = pretrain.train(cfg)["perf"]
    logged = [perf[k]["train/lr"] for k in range(1, 6)]
    assert logged == used
    factors = [optim.lr_factor(k - 1, cfg) for k in range(1, 6)]
    assert factors[0] == 0.5 and factors[-1] > 0
    torch.testing.assert_close(torch.tensor(logged), logged[1] * torch.tensor(factors), rtol=1e-12, atol=0)


def test_losses_read_late_are_those_of_their_steps(sample_data, model_json, tmp_path):
    """With nonfinite: stop (no update depends on its step's loss) the loop reads each step's loss and gradient
    norm late (`StepValues`); the history, the log lines and the checkpoints get the same values at the same
    steps as a run that waits for them before each update (nonfinite: skip), and the same weights."""
    runs = {}
    for policy in ("stop", "skip"):
        runs[policy] = pretrain.train(
            _cfg(sample_data, model_json, tmp_path / policy, nonfinite=policy, max_steps=8, log_every=3, save_every=4)
        )
    late, waited = runs["stop"], runs["skip"]
    assert sorted(late["losses"]) == list(range(1, 9))
    assert late["losses"] == waited["losses"]  # bitwise: the same computations
    assert {s: m["train/loss"] for s, m in late["perf"].items()} == {s: late["losses"][s] for s in (3, 6, 8)}
    assert {s: m["train/grad_norm"] for s, m in late["perf"].items()} == {
        s: m["train/grad_norm"] for s, m in waited["perf"].items()
    }
    saved = ckpt.load_checkpoint(tmp_path / "stop/checkpoints/step_00000004")
    assert saved["history"]["losses"] == {s: late["losses"][s] for s in range(1, 5)}
    a, b = saved["model"], ckpt.load_checkpoint(tmp_path / "skip/checkpoints/step_00000004")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def poison_step(patch, bad_step: int, grad_accum: int = 2) -> list:
    """Through `patch`, pretraining builds models whose training forwards of optimizer step `bad_step` (its
    `grad_accum` micro-batches) give NaN; returns the list that counts the training forwards."""
    real_build = pretrain.build_model
    calls = []

    def poisoned(cfg):
        model = real_build(cfg)

        def hook(module, args, output):
            if not module.training:  # (evaluations and samples)
                return output
            calls.append(1)
            return output * float("nan") if (len(calls) - 1) // grad_accum + 1 == bad_step else output

        model.model.norm.register_forward_hook(hook)
        return model

    patch.setattr(pretrain, "build_model", poisoned)
    return calls


QUIET = {"log_every": 100, "save_every": 100, "eval_every": 100, "keep_last": 5}


@pytest.mark.parametrize(
    "bad, settings, saved",
    [
        (4, dict(QUIET, save_every=3), ["step_00000003"]),  # read two steps late, at the next checkpoint
        (4, dict(QUIET, eval_every=5), []),  # before an evaluation
        (4, dict(QUIET, log_every=5), []),  # before a log line
        (4, dict(QUIET, sample_every=5), []),  # before samples
        (5, dict(QUIET, stop_at_step=5), []),  # the run's last step (its checkpoint)
        (11, dict(QUIET, max_steps=11), []),  # the last step (the final model)
        (1, dict(QUIET), []),  # the first step
    ],
)
def test_a_nonfinite_step_read_late_stops_the_run_before_anything_after_it(
    sample_data, model_json, tmp_path, monkeypatch, bad, settings, saved
):
    """With nonfinite: stop a step's update is applied before its loss is read (`StepValues`), but a step that goes
    non-finite stops the run, naming that step, before any later log line, evaluation, sample, checkpoint or final
    model: the checkpoints on disk are the good ones, though up to two more updates ran."""
    calls = poison_step(monkeypatch, bad)
    evaluated, sampled = [], []
    monkeypatch.setattr(pretrain, "evaluate", lambda *args: evaluated.append(1) or 1.0)
    real_samples = pretrain.generate_samples
    monkeypatch.setattr(pretrain, "generate_samples", lambda *a, **k: sampled.append(1) or real_samples(*a, **k))
    out = tmp_path / "run"
    settings = {"max_steps": 12, **settings}
    with pytest.raises(loop.NonFiniteLoss, match=rf"at step {bad} \(loss nan"):
        pretrain.train(_cfg(sample_data, model_json, out, **settings))
    assert (evaluated, sampled) == ([], [])
    assert not (out / "final").exists()
    assert [p.name for p in ckpt.list_checkpoints(out)] == saved
    if saved:  # (history.json as the checkpoint wrote it)
        assert len(calls) > 2 * bad  # the next step ran before the bad one's loss was read
        state = ckpt.load_checkpoint(out / "checkpoints" / saved[-1])
        assert all(torch.isfinite(t).all() for t in state["model"].values())
        assert sorted(state["history"]["losses"]) == [1, 2, 3]
        assert sorted(json.loads((out / "history.json").read_text())["losses"], key=int) == ["1", "2", "3"]
    else:
        assert not (out / "history.json").exists()


def test_a_later_error_does_not_hide_a_nonfinite_step_still_to_be_read(sample_data, model_json, tmp_path, monkeypatch):
    """A step that fails (here: step 5's batches have no label) before an earlier step's non-finite loss was read
    stops the run as that step's NonFiniteLoss (exit status 1), the later error named in its message."""
    poison_step(monkeypatch, 4)
    real_count = loop.count_trained_tokens
    counted = []

    def count(labels):
        counted.append(1)
        return 0 if len(counted) in (9, 10) else real_count(labels)  # step 5's two micro-batches

    monkeypatch.setattr(loop, "count_trained_tokens", count)
    with pytest.raises(loop.NonFiniteLoss, match=r"at step 4 \(loss nan.*a later step then failed: ValueError: step 5"):
        pretrain.train(_cfg(sample_data, model_json, tmp_path / "run", max_steps=12, **QUIET))


def test_validation_data_that_cannot_be_evaluated_is_refused_before_the_first_step(
    sample_data, model_json, tmp_path, monkeypatch
):
    """A validation split shorter than one window, or holding a token id outside the vocabulary, used to fail at the
    first evaluation, losing every step trained until then (250 by default); it is refused before training."""
    from llamathink.data import HEADER_BYTES, open_shard, read_shard_header, write_shard

    monkeypatch.setattr(pretrain, "run_training", lambda *args, **kwargs: pytest.fail("training started"))
    short, bad_id = tmp_path / "short", tmp_path / "bad_id"
    for data in (short, bad_id):
        shutil.copytree(sample_data, data)
    val = sorted(short.glob("val_*.bin"))[0]
    header = read_shard_header(val)
    write_shard(val, open_shard(val)[:40], header["vocab_size"], bos_id=header["bos_id"], eos_id=header["eos_id"])
    meta = json.loads((short / "meta.json").read_text())
    meta["val"]["shards"] = [dict(e, tokens=40) if e["file"] == val.name else e for e in meta["val"]["shards"]]
    (short / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=rf"validation data: seq_len 64 is longer than the data: .*{val.name} hold"):
        pretrain.train(_cfg(short, model_json, tmp_path / "out_short"))
    val = sorted(bad_id.glob("val_*.bin"))[0]
    raw = bytearray(val.read_bytes())
    raw[HEADER_BYTES + 10 : HEADER_BYTES + 12] = (4000).to_bytes(2, "little")  # the shard's header says 1024 ids
    val.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=rf"validation data: .*{val.name}: token id 4000 is outside the vocabulary"):
        pretrain.train(_cfg(bad_id, model_json, tmp_path / "out_bad_id"))


def test_vocabulary_mismatch_is_named(sample_data, tmp_path):
    small = tmp_path / "small.json"
    LlamaThinkConfig(
        vocab_size=512,
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
        max_position_embeddings=128,
    ).to_json_file(small)
    with pytest.raises(ValueError, match="1024.*512|512.*1024"):
        pretrain.train(_cfg(sample_data, small, tmp_path / "v"))


def test_corrupt_shard_is_named(sample_data, model_json, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(sample_data, data)
    shard = sorted(data.glob("train_*.bin"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated
    with pytest.raises(ValueError, match=shard.name):
        pretrain.train(_cfg(data, model_json, tmp_path / "c"))


# Pretraining whose checkpoint saves wait 60 s between writing the temporary folder and renaming it into place,
# so that a test can kill the process in the middle of a save.
_SLOW_SAVE = """
import os, sys, time
real_replace = os.replace
def slow_replace(src, dst, *args, **kwargs):
    if os.path.basename(str(src)).startswith(".tmp-step_"):
        time.sleep(60)
    return real_replace(src, dst, *args, **kwargs)
os.replace = slow_replace
from llamathink.train.pretrain import main
sys.exit(main(sys.argv[1:]))
"""


def _kill_during_checkpoint(args, env, root, step: int):
    """Start training in a subprocess, wait until checkpoint `step` is being written (its temporary directory
    exists; `_SLOW_SAVE` holds it there), then SIGKILL the process."""
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        prefix = f".tmp-step_{step:08d}"
        while time.time() < deadline and not any(
            p.name.startswith(prefix) for p in (root.iterdir() if root.exists() else [])
        ):
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_sigkill_during_checkpoint_write_leaves_the_previous_checkpoint_loadable(sample_data, model_json, tmp_path):
    out = tmp_path / "killed"
    args = [
        sys.executable,
        "-c",
        _SLOW_SAVE,
        "--model_config",
        str(model_json),
        "--data_dir",
        str(sample_data),
        "--out_dir",
        str(out),
        "--seq_len",
        "64",
        "--micro_batch_size",
        "4",
        "--grad_accum",
        "1",
        "--max_steps",
        "20",
        "--warmup_steps",
        "1",
        "--mixed_precision",
        "no",
        "--eval_every",
        "100",
        "--save_every",
        "2",
        "--peak_tflops",
        "null",
        "--wandb_mode",
        "disabled",
        "--progress_bar",
        "false",
        "--seed",
        "3",
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    root = out / "checkpoints"
    # the first save (step 2) sleeps before its rename: kill the process while it waits
    _kill_during_checkpoint(args, env, root, step=2)
    assert ckpt.list_checkpoints(out) == []  # the half-written one is not listed
    # a second run: its first checkpoint completes; kill during the second one (step 4)
    pretrain.train(
        _cfg(
            sample_data,
            model_json,
            out,
            micro_batch_size=4,
            grad_accum=1,
            max_steps=20,
            save_every=2,
            stop_at_step=2,
            eval_every=100,
        )
    )
    _kill_during_checkpoint(args, env, root, step=4)
    found = ckpt.list_checkpoints(out)
    assert [p.name for p in found] == ["step_00000002"]
    state = ckpt.load_checkpoint(found[0])
    assert state["step"] == 2 and "model" in state and "optimizer" in state
    history = pretrain.train(
        _cfg(
            sample_data,
            model_json,
            out,
            micro_batch_size=4,
            grad_accum=1,
            max_steps=20,
            save_every=2,
            stop_at_step=4,
            eval_every=100,
        )
    )
    assert sorted(history["losses"]) == [1, 2, 3, 4]


def test_wandb_offline_logging(sample_data, model_json, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "wb"
    pretrain.train(
        _cfg(
            sample_data,
            model_json,
            out,
            max_steps=3,
            log_every=1,
            eval_every=3,
            save_every=3,
            wandb_mode="offline",
            wandb_project="llamathink-test",
        )
    )
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))
    # the run id is kept in the checkpoint so a resumed run continues the same W&B run
    state = ckpt.load_checkpoint(ckpt.list_checkpoints(out)[-1])
    assert state["wandb_run_id"] and state["wandb_run_id"] in runs[0].name


def test_a_number_with_a_leading_zero_is_refused_not_read_as_octal(tmp_path):
    """YAML 1.1 (PyYAML) reads 010 as the octal 8: a settings file's or an option's integer with a leading zero is
    a ValueError naming it, the option and the octal reading; quoted, or 0 itself, or 0x1F, it is read as written."""
    with pytest.raises(
        ValueError, match=r"--warmup_steps: 010 has a leading zero, which YAML reads as an octal .*\(8\)"
    ):
        pretrain.load_config(None, ["--warmup_steps", "010"])
    path = tmp_path / "run.yaml"
    path.write_text("warmup_steps: '010'\nmax_steps: 0x1F\nseed: 0\n")
    cfg = pretrain.load_config(str(path), ["--eval_every", "1_000"])
    assert (cfg.warmup_steps, cfg.max_steps, cfg.seed, cfg.eval_every) == (10, 31, 0, 1000)


@pytest.mark.parametrize(
    "text, override, named",
    [
        ("max_steps: 1:30\n", [], r"run.yaml line 1: 1:30 is a base-60 number to YAML \(90\)"),
        ("seed: 1\nmin_lr_ratio: 0:0.5\n", [], r"run.yaml line 2: 0:0.5 is a base-60 number to YAML \(0.5\)"),
        ("wandb_run_name: 1:30\n", [], r"run.yaml line 1: 1:30 is a base-60 number to YAML \(90\)"),
        ("seed: 1\n", ["--max_steps", "1:30"], r"--max_steps: 1:30 is a base-60 number to YAML \(90\)"),
        ("seed: 1\n", ["--muon_lr=-1:30.5"], r"--muon_lr: -1:30.5 is a base-60 number to YAML \(-90.5\)"),
    ],
)
def test_a_base_60_number_is_refused_not_read_as_seconds(tmp_path, text, override, named):
    """YAML 1.1 (PyYAML) reads 1:30 as 90 and 1:30.5 as 90.5 (base 60): refused in a settings file and in a number
    option, naming it and YAML's reading; in a file quoted, and in a text option as written, it is the text."""
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=named + r": for the number write it in decimal, for text quote it"):
        pretrain.load_config(str(path), override)
    path.write_text("wandb_run_name: '1:30'\n")
    cfg = pretrain.load_config(str(path), ["--out_dir", "2:45"])
    assert (cfg.wandb_run_name, cfg.out_dir) == ("1:30", "2:45")


@pytest.mark.parametrize(
    "text, named",
    [
        (
            "max_steps: 5\nwarmup_steps: 1\nmax_steps: 7\n",
            r"run.yaml: key 'max_steps' is given twice \(lines 1 and 3\)",
        ),
        ("max_steps:\t5\n", r"(?s)run.yaml is not valid YAML: .*found character '\\t'.*line 1, column 11"),
        ("max_steps: 5\n---\nmax_steps: 6\n", r"run.yaml is not valid YAML: expected a single document"),
        (
            "!!python/object/apply:os.system ['echo hi']\n",
            r"run.yaml is not valid YAML: could not determine a constructor",
        ),
        ("- max_steps: 5\n", r"run.yaml: expected a mapping of settings, got list"),
        pytest.param(
            "max_steps: " + "[" * 100_000 + "]" * 100_000 + "\n", r"run.yaml: a value is nested too deeply", id="deep"
        ),
        ("0\n", r"run.yaml: expected a mapping of settings, got int"),
        (  # YAML 1.1 reads 010 as 8
            "warmup_steps: 1\nmax_steps: 010\n",
            r"run.yaml line 2: 010 has a leading zero, which YAML reads as an octal number \(8\)",
        ),
    ],
)
def test_a_settings_file_that_is_not_one_mapping_of_distinct_settings_is_named(tmp_path, text, named):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=named):
        pretrain.load_config(str(path))
    path.write_bytes(b"max_steps: \xff\xfe\n")
    with pytest.raises(ValueError, match=r"run.yaml is not a UTF-8 text \(YAML\) file"):
        pretrain.load_config(str(path))
    path.write_text("<<: {max_steps: 5, warmup_steps: 1}\nmax_steps: 6\n")  # a merge is no repeat: max_steps wins
    assert pretrain.load_config(str(path)).max_steps == 6
    path.write_text("# only a comment\n")  # an empty file: the defaults
    assert pretrain.load_config(str(path)).max_steps == pretrain.TrainConfig().max_steps


def test_a_command_line_value_nested_past_the_recursion_limit_is_named_as_the_wrong_type():
    with pytest.raises(ValueError, match=r"max_steps expects an integer, got '\[\[\["):
        pretrain.load_config(None, ["--max_steps", "[" * 100_000 + "]" * 100_000])


@pytest.mark.parametrize(
    "setting, written, named",
    [
        ("seed", "-5", r"seed must be an integer in \[0, 2\*\*32\), got -5"),
        ("seed", "1e10", r"seed must be an integer in \[0, 2\*\*32\), got 10000000000"),
        ("seed", "1e30", r"seed expects an integer written exactly, got '1e30'"),  # not its rounded float
        ("muon_adjust_lr", "moonlight", r"muon_adjust_lr must be one of original, match_rms_adamw, got 'moonlight'"),
    ],
)
def test_a_seed_or_lr_rule_no_generator_or_optimizer_accepts_is_refused_at_parse_time(setting, written, named):
    with pytest.raises(ValueError, match=named):
        pretrain.load_config(None, [f"--{setting}", written])
    assert pretrain.load_config(None, ["--seed", str(2**32 - 1)]).seed == 2**32 - 1


@pytest.mark.parametrize(
    "text, named",
    [
        ("{not json", r"meta.json is not a valid meta.json \(Expecting property name"),
        pytest.param(
            '{"vocab_size": ' + "9" * 5000 + "}",
            r"meta.json is not a valid meta.json \(Exceeds the limit \(4300 digits",
            id="long_number",
        ),
        pytest.param(
            "[" * 100_000 + "]" * 100_000, r"meta.json is not a valid meta.json \(maximum recursion", id="deep"
        ),
        ("[1, 2]", r"meta.json is not a meta.json written by prepare \(expected an object .*got list\)"),
        ('{"vocab_size": "1024"}', r"got dict with vocab_size '1024'"),
        ('{"tokenizer": "builtin"}', r"meta.json is not a meta.json written by prepare .*got dict\)"),
    ],
)
def test_a_broken_data_meta_json_is_named_before_training(model_json, tmp_path, text, named):
    from llamathink.data import load_meta

    data = tmp_path / "data"
    data.mkdir()
    (data / "meta.json").write_text(text)
    with pytest.raises(ValueError, match=named):
        load_meta(data)
    with pytest.raises(ValueError, match=named):
        pretrain.train(_cfg(data, model_json, tmp_path / "out", max_steps=2))
    assert not ckpt.list_checkpoints(tmp_path / "out")


def test_the_model_card_survives_a_meta_json_of_unexpected_types(sample_data, model_json, tmp_path):
    from llamathink.model_card import model_card_text

    data = tmp_path / "data"
    data.mkdir()
    model = LlamaThinkForCausalLM(LlamaThinkConfig.from_json_file(str(model_json)))
    for meta in (
        {"vocab_size": 1024, "source": "fineweb", "train": [1]},
        {"vocab_size": 1024, "source": {"type": "local", "paths": "a.txt"}, "train": {"num_tokens": "many"}},
        {"vocab_size": 1024, "source": {"type": "hf", "name": ["x"], "config": 3}, "train": {"num_docs": True}},
        {"vocab_size": 1024, "source": {"type": "local", "paths": [1, 2]}},
    ):
        (data / "meta.json").write_text(json.dumps(meta))
        card = model_card_text(model, _cfg(data, model_json, tmp_path / "out"))
        assert f"a prepared document collection, tokenized whole documents in `{data}`" in card
    (data / "meta.json").write_text(
        json.dumps(
            {"vocab_size": 1024, "train": {"num_tokens": 12345}, "source": {"type": "local", "paths": ["/x/a.txt"]}}
        )
    )
    card = model_card_text(model, _cfg(data, model_json, tmp_path / "out", grad_accum=2))
    assert f"local files (`a.txt`), tokenized whole documents in `{data}` (12,345 training tokens)" in card
    assert " x 2 micro-batches per process" in card  # (it wrote "micro-batchs")


def test_a_sample_prompt_longer_than_the_context_is_skipped_not_fatal(sample_data, model_json, tmp_path, capsys):
    import warnings

    from llamathink.tokenizer_utils import load_tokenizer

    tokenizer = load_tokenizer("builtin")
    torch.manual_seed(0)
    model = LlamaThinkForCausalLM(LlamaThinkConfig.from_json_file(str(model_json)))  # 128 positions
    long_prompt = "the history of " * 100
    assert len(tokenizer(long_prompt).input_ids) > 128
    cfg = _cfg(sample_data, model_json, tmp_path, sample_prompts=[long_prompt, "Once upon"], sample_tokens=500)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nor a warning about capping: the length fits the context
        texts = pretrain.generate_samples(model, tokenizer, cfg, torch.device("cpu"))
    assert len(texts) == 1 and texts[0].startswith("Once upon")
    assert "sample prompt skipped: its " in capsys.readouterr().out
    assert model.training


def test_document_masking_restarts_positions_at_every_bos(sample_data, model_json, tmp_path):  # noqa: F811
    """document_masking gives the model position ids that restart at each BOS of a window (each document then
    trains only on itself); off (the default), the window is one stream. A run trains either way."""
    from llamathink.data import document_position_ids

    ids = torch.tensor([[5, 6, 1, 7, 8, 2, 1, 9], [1, 3, 4, 2, 1, 1, 5, 6]])
    assert document_position_ids(ids, 1).tolist() == [[0, 1, 0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 0, 0, 1, 2]]
    on = _cfg(sample_data, model_json, tmp_path / "on", max_steps=2, save_every=2, eval_every=2, document_masking=True)
    off = _cfg(
        sample_data, model_json, tmp_path / "off", max_steps=2, save_every=2, eval_every=2, document_masking=False
    )
    assert not pretrain.TrainConfig().document_masking  # off by default (its GPU cost, BENCHMARKS.md)
    assert "position_ids" in pretrain.model_inputs(ids, ids, on, 1)
    assert "position_ids" not in pretrain.model_inputs(ids, ids, off, 1)
    assert "position_ids" not in pretrain.model_inputs(ids, ids, on, None)  # data without a BOS id
    losses_on, losses_off = pretrain.train(on)["losses"], pretrain.train(off)["losses"]
    # step 1 is the embedding's loss alone (every layer starts as the identity: zero residual projections), the
    # same either way; from step 2 the attention layers, which see the positions, reach the loss
    assert losses_on[2] != losses_off[2] and all(map(math.isfinite, [*losses_on.values(), *losses_off.values()]))


def test_commands_report_bad_input_in_one_line(sample_data, model_json, tmp_path, capsys):  # noqa: F811
    """llamathink-pretrain / -finetune (train_hf.py, finetune_chat.py): a wrong setting, a missing file or folder,
    a checkpoint given as a model, a resume of the other kind of run: exit status 2 and one line
    `prog: error: ...` naming the problem, no traceback; a run that fails before writing leaves no empty out_dir."""
    from llamathink.train import finetune

    base = [
        "--model_config",
        str(model_json),
        "--data_dir",
        str(sample_data),
        "--seq_len",
        "64",
        "--micro_batch_size",
        "4",
        "--grad_accum",
        "1",
        "--mixed_precision",
        "no",
        "--progress_bar",
        "false",
        "--wandb_mode",
        "disabled",
        "--peak_tflops",
        "null",
    ]
    out = tmp_path / "run"
    fields = json.loads(model_json.read_text())
    typo, other_eos, listed, scaled = (tmp_path / f"{name}.json" for name in ("typo", "eos", "list", "scaled"))
    typo.write_text(json.dumps({**fields, "num_hidden_layer": 2}))
    scaled.write_text(json.dumps({**fields, "rope_scaling": {"rope_type": "linear", "factor": 4.0}}))
    other_eos.write_text(json.dumps({**fields, "eos_token_id": 3}))
    listed.write_text("[1, 2]")
    cases = [
        (pretrain.main, ["--model_config", str(typo)], r"\['num_hidden_layer'\] are not LlamaThinkConfig fields"),
        (pretrain.main, ["--model_config", str(listed)], "holds a JSON list, not an object"),
        (pretrain.main, ["--model_config", str(scaled)], r"rope_scaling=.*'linear'.*no RoPE scaling"),
        (pretrain.main, ["--model_config", str(other_eos)], "the model's eos_token_id is 3 but the data's .* is 2"),
        (pretrain.main, ["--max_steps", "6", "--warmup_steps", "15"], "llamathink-pretrain: error: warmup_steps"),
        (pretrain.main, ["--config", str(tmp_path / "nope.yaml")], "settings file .*nope.yaml \\(--config\\) does"),
        (pretrain.main, ["--max_stepz", "3"], "unknown setting --max_stepz"),
        (pretrain.main, ["--data_dir", str(tmp_path / "missing"), "--out_dir", str(tmp_path / "fresh")], "missing"),
    ]
    for main, args, message in cases:
        assert main([*base, "--out_dir", str(out), *args]) == 2, args
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and re.search(message, err), (args, err)
    assert not (tmp_path / "fresh").exists()  # the failed run left no empty folder behind
    assert (
        pretrain.main([*base, "--out_dir", str(out), "--max_steps", "2", "--warmup_steps", "1", "--save_every", "2"])
        == 0
    )
    capsys.readouterr()
    checkpoint = out / "checkpoints" / "step_00000002"
    chat = [
        "--out_dir",
        str(tmp_path / "chat"),
        "--wandb_mode",
        "disabled",
        "--progress_bar",
        "false",
        "--mixed_precision",
        "no",
    ]
    for init_from, message in (
        (checkpoint, "is a training checkpoint"),
        (out, "is a training run's folder, not a saved model: use "),
    ):
        assert finetune.main(["--init_from", str(init_from), *chat]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    # a finetuning run in a pretraining run's folder: named as such, not as a changed init_from (the model a copy of
    # the run's final/: from final/ itself the run would replace the model it starts from, refused as that)
    shutil.copytree(out / "final", tmp_path / "pretrained")
    args = [
        "--init_from",
        str(tmp_path / "pretrained"),
        "--out_dir",
        str(out),
        "--wandb_mode",
        "disabled",
        "--progress_bar",
        "false",
        "--tokenizer",
        "builtin",
        "--max_steps",
        "4",
        "--warmup_steps",
        "1",
        "--mixed_precision",
        "no",
    ]
    assert finetune.main(args) == 2
    assert "it is a pretraining checkpoint and this is a finetuning run" in capsys.readouterr().err
    args[1] = str(out / "final")
    assert finetune.main(args) == 2
    assert f"init_from {out / 'final'} is in out_dir {out}'s final/, which the run replaces" in capsys.readouterr().err


def test_pretraining_refuses_a_tokenizer_that_is_not_the_datas_or_the_models(sample_data, model_json, tmp_path):
    """The shards hold one tokenizer's ids. Continued pretraining (init_from) on data of a tokenizer that gives the
    pieces of the model's saved tokenizer other ids or none would train the model on them as if they meant its own
    text: refused, naming both, before the model is built (a model whose tokenizer the data's extends passes). A
    `tokenizer` setting smaller than the data's meta.json records cannot be the data's: refused too."""
    from llamathink.tokenizer_utils import load_tokenizer

    small = tmp_path / "data512"
    prepare(LocalSource([str(sample_data_path("prose.jsonl"))]), small, "builtin:512", val_docs=20, progress=False)
    base = tmp_path / "base"
    LlamaThinkForCausalLM(LlamaThinkConfig.from_json_file(model_json)).save_pretrained(base)
    load_tokenizer("builtin").save_pretrained(base)  # the model's: 1024 pieces; the data's: the first 512 of them
    cfg = _cfg(small, None, tmp_path / "out", model_config=None, init_from=str(base), data_dir=str(small))
    with pytest.raises(
        ValueError,
        match=rf"{small} was tokenized with 'builtin:512', which is not the tokenizer saved with init_from="
        r"'.*base': 512 of its 1024 pieces have other ids or none .*\(llamathink-prepare --tokenizer",
    ):
        pretrain.train(cfg)
    assert not (tmp_path / "out" / "checkpoints").exists()
    load_tokenizer("builtin:512").save_pretrained(base)  # the data's own tokenizer (more ids in the model): passes
    pretrain.train(dataclasses.replace(cfg, max_steps=1, warmup_steps=0, eval_every=1, save_every=1))
    with pytest.raises(
        ValueError,
        match=r"the tokenizer 'builtin:512' has 512 tokens, but .*meta.json says the shards"
        r" were made with a tokenizer of 1024: leave tokenizer unset",
    ):
        pretrain.train(_cfg(sample_data, model_json, tmp_path / "out2", tokenizer="builtin:512"))


def test_wandb_that_cannot_start_stops_the_run_with_one_named_error(tmp_path, monkeypatch):
    import wandb

    def no_key(**kwargs):
        (Path(kwargs["dir"]) / "wandb" / "run-x").mkdir(parents=True)  # (as W&B makes its folder, then fails)
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setattr(wandb, "init", no_key)
    cfg = run_config.RunConfig(out_dir=str(tmp_path), wandb_mode="online", wandb_project="p")
    with pytest.raises(ValueError, match=r"wandb_mode=online: W&B could not start the run \(UsageError: No API key"):
        loop._init_wandb(cfg, None)
    with pytest.raises(ValueError, match=r"\(UsageError: No API key.*\); log in \(`wandb login`\)"):
        loop._init_wandb(cfg, None)
    assert not (tmp_path / "wandb").exists()  # the failed start's folder is removed (it was left behind)
    (tmp_path / "wandb").mkdir()
    (tmp_path / "wandb" / "earlier-run").write_text("kept")
    with pytest.raises(ValueError, match=r"W&B could not start the run"):
        loop._init_wandb(cfg, None)
    assert (tmp_path / "wandb" / "earlier-run").read_text() == "kept"  # one it found is not touched
    # offline, W&B needs no login: the hint names the settings and the folder instead
    cfg = run_config.RunConfig(out_dir=str(tmp_path), wandb_mode="offline", wandb_project="p")
    monkeypatch.setattr(wandb, "init", lambda **kw: (_ for _ in ()).throw(PermissionError("read-only file system")))
    with pytest.raises(ValueError, match=r"offline: .*read-only file system\); check wandb_project") as err:
        loop._init_wandb(cfg, None)
    assert "login" not in str(err.value)


@pytest.mark.parametrize(
    "project, message",
    [
        ("me/llamathink", r"wandb_project 'me/llamathink' holds /; W&B project names cannot contain"),
        ("runs: 95M?", r"holds : \?;"),
        ("x" * 129, r"wandb_project is 129 characters long; W&B takes at most 128"),
        (" ", r"wandb_project is empty"),
    ],
)
def test_a_wandb_project_name_that_wandb_refuses_stops_the_run_before_any_work(project, message):
    """W&B's own rule for project names (at most 128 characters, none of / \\ # ? % :), checked with the other
    settings: wandb.init would refuse the name only once the model is built and the data read. A run that logs
    nothing (wandb_mode: disabled) is not held to it; the rule's limits pass."""
    with pytest.raises(ValueError, match=message):
        run_config.RunConfig(wandb_project=project)
    assert run_config.RunConfig(wandb_project=project, wandb_mode="disabled").wandb_mode == "disabled"
    assert run_config.RunConfig(wandb_project="x" * 128 + "").wandb_project == "x" * 128
    assert run_config.RunConfig(wandb_project="llamathink-95m_v2.1 (ablation)").wandb_project


def test_a_saved_model_whose_weights_do_not_fit_is_refused_by_name(tmp_path, capsys, monkeypatch):
    """`load_saved_model` (what pretraining's and finetuning's init_from and the chat command load with): a folder
    loads bit for bit; a missing, an unknown or a misshapen tensor, a truncated weights file, integer or bool
    tensors, or a head that differs from the embeddings it is tied to, is a ValueError naming the setting and the
    tensor, where transformers alone would fill in random values, cast, or untie, and go on."""
    from safetensors.torch import load_file, save_file

    from llamathink import chat

    good = tmp_path / "good"
    tiny_model(dtype=torch.float32).save_pretrained(good)
    loaded = ckpt.load_saved_model(str(good), "init_from")
    pretrain.check_config_keys(good / "config.json")  # what save_pretrained writes passes as a model_config
    for name, tensor in load_file(good / "model.safetensors").items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    weights = load_file(good / "model.safetensors")
    missing, extra, shape, integer, head, same_head = (dict(weights) for _ in range(6))
    del missing["model.layers.0.mlp.down_proj.weight"]
    extra["model.layers.0.mlp.extra.weight"] = torch.zeros(3)
    shape["model.layers.1.mlp.up_proj.weight"] = shape["model.layers.1.mlp.up_proj.weight"][:-1]
    integer["model.norm.weight"] = (integer["model.norm.weight"] * 1000).to(torch.int32)
    integer["model.layers.0.mlp.up_proj.weight"] = integer["model.layers.0.mlp.up_proj.weight"] > 0
    # the config ties the head to the embeddings: transformers unties them for a head of other values
    head["lm_head.weight"] = torch.randn_like(weights["model.embed_tokens.weight"])
    same_head["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    cases = {
        "missing": (missing, r"missing model.layers.0.mlp.down_proj.weight\)"),
        "extra": (extra, r"unexpected model.layers.0.mlp.extra.weight\)"),
        "shape": (shape, r"misshapen model.layers.1.mlp.up_proj.weight \(95, 48\) for \(96, 48\)"),
        "integer": (
            integer,
            r"weights must be floating point \(BF16, F16, F32, F64\); model.layers.0.mlp.up_proj.weight \(BOOL\), "
            r"model.norm.weight \(I32\) would be cast",
        ),
        "head": (head, "tie_word_embeddings: true, but its weights hold an lm_head.weight that differs"),
        "same_head": (same_head, None),  # one matrix twice: tied as the config says, and loaded
    }
    for case, (tensors, message) in cases.items():
        folder = tmp_path / case
        folder.mkdir()
        (folder / "config.json").write_bytes((good / "config.json").read_bytes())
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        if message is None:
            model = ckpt.load_saved_model(str(folder), "init_from")
            assert model.lm_head.weight is model.model.embed_tokens.weight
            assert torch.equal(model.lm_head.weight, weights["model.embed_tokens.weight"])
            continue
        with pytest.raises(ValueError, match=f"init_from={folder}: .*{message}"):
            ckpt.load_saved_model(str(folder), "init_from")
    truncated = tmp_path / "missing" / "model.safetensors"
    truncated.write_bytes((good / "model.safetensors").read_bytes()[:5000])
    with pytest.raises(ValueError, match="a weights file cannot be read .* truncated or corrupt"):
        ckpt.load_saved_model(str(truncated.parent), "init_from")

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(LlamaThinkForCausalLM, "from_pretrained", offline)
    for variable in OFFLINE_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    with pytest.raises(ValueError, match="init_from=someone/model: cannot be loaded \\(OSError: We couldn't connect"):
        ckpt.load_saved_model("someone/model", "init_from")
    # offline mode: the id is not in the cache, and transformers' "check your internet connection" is not the cause
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ValueError, match="init_from=someone/model: not a local path, and not in the local Hugging Fa"):
        ckpt.load_saved_model("someone/model", "init_from")
    # some of it in the cache (a file damaged or missing there): the library's own error, not "not in the cache"
    (tmp_path / "hub" / "models--someone--model").mkdir(parents=True)
    with pytest.raises(
        ValueError, match=r"cannot be loaded \(OSError: We couldn't .*TRANSFORMERS_OFFLINE is set: only"
    ):
        ckpt.load_saved_model("someone/model", "init_from")
    monkeypatch.undo()
    capsys.readouterr()
    assert chat.main([str(tmp_path / "extra"), "-p", "hi", "--tokenizer", "builtin"]) == 2
    err = capsys.readouterr().err
    assert "cannot load" in err and "unexpected model.layers.0.mlp.extra.weight)" in err, err
    # a config.json of twice the width: every tensor misshapen, four named and how many more (not a 5 KB line)
    wide = tmp_path / "wide"
    wide.mkdir()
    config = json.loads((good / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps(dict(config, hidden_size=2 * config["hidden_size"])))
    (wide / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"\(misshapen model\.embed_tokens\.weight \(96, 48\) for \(96, 96\), ") as err:
        ckpt.load_saved_model(str(wide), "init_from")
    named = str(err.value).split("(misshapen ", 1)[1]
    assert named.count(" for (") == 4 and re.search(r"\) and \d+ more\); refusing", named), named
    # the model's own refusal (a CSA layer moved: from_pretrained names the tensors) is named by the setting too
    moved = tmp_path / "moved"
    moved.mkdir()
    assert config["mixer_types"] == ["linear", "csa", "full", "linear"]
    (moved / "config.json").write_text(json.dumps(dict(config, mixer_types=["linear", "full", "csa", "linear"])))
    (moved / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=rf"^init_from={re.escape(str(moved))}: its weights do not match the config"):
        ckpt.load_saved_model(str(moved), "init_from")


def test_wrong_position_ids_are_named(model_json):  # noqa: F811
    model = LlamaThinkForCausalLM(LlamaThinkConfig.from_json_file(str(model_json)))
    ids = torch.randint(0, 100, (2, 6))
    for bad in (
        torch.tensor([[0, 1, 2, 0]]),
        torch.zeros(3, 1, 6, dtype=torch.long),
        torch.zeros(3, 6, dtype=torch.long),
    ):
        with pytest.raises(ValueError, match=r"position_ids has shape"):
            model(input_ids=ids, position_ids=bad, use_cache=False)
    with pytest.raises(ValueError, match="position_ids must be an integer tensor"):
        model(input_ids=ids, position_ids=torch.arange(6.0)[None], use_cache=False)


def test_cuda_graph_compile_mode_accumulates_into_kept_gradients(sample_data, model_json, tmp_path, monkeypatch):
    """`compile_mode: reduce-overhead` reaches `compile_layers`, begins a cudagraph-trees step before every
    micro-batch, and accumulates gradients into `.grad` tensors kept for the whole run (zeroed in place, never a
    graph output that a replay overwrites): with grad_accum 2 the losses equal the eager run's. dynamo's "eager"
    backend stands in for inductor, which has no CUDA graphs on the CPU (the replay itself: tests/test_gpu.py)."""
    from llamathink.modeling_llamathink import LlamaThinkPreTrainedModel

    modes, models, marks = [], [], []
    compile_layers = LlamaThinkPreTrainedModel.compile_layers

    def fake_compile_layers(self, **kw):
        modes.append(kw)
        models.append(self)
        return compile_layers(self, backend="eager")

    monkeypatch.setattr(LlamaThinkPreTrainedModel, "compile_layers", fake_compile_layers)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    zero_grad_calls = []
    real_zero_grad = torch.optim.Optimizer.zero_grad
    monkeypatch.setattr(
        torch.optim.Optimizer,
        "zero_grad",
        lambda self, set_to_none=True: zero_grad_calls.append(set_to_none) or real_zero_grad(self, set_to_none),
    )
    eager = pretrain.train(_cfg(sample_data, model_json, tmp_path / "eager", max_steps=4, save_every=4, eval_every=4))
    assert marks == [] and set(zero_grad_calls) == {True}
    zero_grad_calls.clear()
    torch._dynamo.reset()
    cfg = _cfg(
        sample_data,
        model_json,
        tmp_path / "graphs",
        max_steps=4,
        save_every=4,
        eval_every=4,
        compile=True,
        compile_mode="reduce-overhead",
    )
    graphs = pretrain.train(cfg)
    # the mode's inductor options (CUDA graphs) plus the default combo kernels
    assert (
        modes == [{"options": {"triton.cudagraphs": True, "inplace_buffers": False, "combo_kernels": True}}]
        and len(marks) == 4 * cfg.grad_accum
    )
    assert set(zero_grad_calls) == {False}
    assert all(p.grad is not None for p in models[0].parameters())  # kept, zeroed after the last step
    assert all(not p.grad.any() for p in models[0].parameters())
    for step, loss in eager["losses"].items():
        assert abs(graphs["losses"][step] - loss) < 1e-5 * abs(loss), (step, graphs["losses"][step], loss)
    with pytest.raises(ValueError, match="compile_mode must be one of auto, default, reduce-overhead"):
        _cfg(sample_data, model_json, tmp_path / "bad", compile=True, compile_mode="fast")
    with pytest.raises(ValueError, match="compile_mode: reduce-overhead has no effect without compile: true"):
        _cfg(sample_data, model_json, tmp_path / "bad", compile_mode="reduce-overhead")


def test_compile_mode_auto_gives_cuda_graphs_only_to_one_gpu_process_of_fixed_shapes(
    sample_data, model_json, tmp_path, monkeypatch, capsys
):
    """`compile_mode: auto` (the default) resolves to "reduce-overhead" for compiled layers in one process on a GPU
    with windows of one shape in bf16 or float32, and to "default" for each other case (a CPU, several processes,
    document-masked batches, a whole-model graph, fp16); a mode set by name is kept. The run's facts reach the
    resolution (each a required argument), and the resolved mode is what the layers compile with: the runs below
    resolve as on a GPU (the device is the only thing faked); plain windows get the CUDA-graph options, a
    cudagraph-trees step per micro-batch and the eager run's losses; document-masked windows and a whole-model
    graph hand the loop the default mode. (The run's mixed_precision reaches it too, "no" here: a process cannot
    switch accelerate's precision, and fp16 needs a GPU.)"""
    from llamathink.modeling_llamathink import LlamaThinkPreTrainedModel
    from llamathink.train.loop import compile_kwargs

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    cfg = _cfg(sample_data, model_json, tmp_path / "auto", max_steps=2, save_every=2, eval_every=2, compile=True)
    assert cfg.compile_mode == "auto"
    real_resolve = pretrain.resolve_compile_mode
    facts = {"num_processes": 1, "packed": False, "whole_model": False, "mixed_precision": "bf16"}

    def resolve(mode, device, **kw):
        return real_resolve(mode, device, **{**facts, **kw})

    assert resolve("auto", cuda)[0] == "reduce-overhead"
    assert resolve("auto", cuda, mixed_precision="no")[0] == "reduce-overhead"
    for case, kwargs, why in (
        ("cpu", {"device": cpu}, "no CUDA graphs on cpu"),
        ("ddp", {"device": cuda, "num_processes": 2}, "2 processes"),
        ("packed", {"device": cuda, "packed": True}, "document-masked batches"),
        ("whole", {"device": cuda, "whole_model": True}, "regional_compile: false"),
        ("fp16", {"device": cuda, "mixed_precision": "fp16"}, "mixed_precision fp16"),
    ):
        mode, reason = resolve("auto", **kwargs)
        assert mode == "default" and why in reason, (case, mode, reason)
        # a CUDA-graph mode set by name is taken, and its reason says that auto would not
        for named in ("reduce-overhead", "max-autotune"):
            mode, reason = resolve(named, **kwargs)
            assert mode == named and reason.startswith("untested: set by compile_mode") and why in reason, reason
        assert resolve("default", **kwargs) == ("default", "set by compile_mode")
    assert resolve("reduce-overhead", cuda) == ("reduce-overhead", "set by compile_mode")
    assert resolve("default", cuda) == ("default", "set by compile_mode")
    assert resolve("max-autotune", cpu, num_processes=4, packed=True)[0] == "max-autotune"
    with pytest.raises(TypeError):  # no fact of the run has a default
        real_resolve("auto", cuda, num_processes=1, packed=False, whole_model=False)
    with pytest.raises(ValueError, match="compile_mode 'auto' is resolved by resolve_compile_mode"):
        compile_kwargs("auto")
    # compile: false keeps the default setting; a named mode other than default needs compile: true
    assert _cfg(sample_data, model_json, tmp_path / "e").compile_mode == "auto"

    modes, marks, seen = [], [], []
    compile_layers = LlamaThinkPreTrainedModel.compile_layers
    monkeypatch.setattr(
        LlamaThinkPreTrainedModel,
        "compile_layers",
        lambda self, **kw: modes.append(kw) or compile_layers(self, backend="eager"),
    )
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    monkeypatch.setattr(
        pretrain, "resolve_compile_mode", lambda mode, device, **kw: seen.append(kw) or real_resolve(mode, cuda, **kw)
    )
    eager = pretrain.train(_cfg(sample_data, model_json, tmp_path / "eager", max_steps=2, save_every=2, eval_every=2))
    torch._dynamo.reset()
    capsys.readouterr()
    graphs = pretrain.train(cfg)
    assert "compile_mode auto: reduce-overhead (one process on a GPU" in capsys.readouterr().out
    assert modes == [{"options": {"triton.cudagraphs": True, "inplace_buffers": False, "combo_kernels": True}}]
    assert len(marks) == 2 * cfg.grad_accum
    for step, loss in eager["losses"].items():
        assert abs(graphs["losses"][step] - loss) < 1e-5 * abs(loss), (step, graphs["losses"][step], loss)
    plain_facts = {"num_processes": 1, "packed": False, "whole_model": False, "mixed_precision": "no"}
    assert seen[-1] == plain_facts
    # the other facts of a run reach the resolution, and its answer reaches the loop (which compiles with it, as
    # above), without compiling again here
    handed = []
    monkeypatch.setattr(pretrain, "run_training", lambda *args, **kw: handed.append(kw) or {})
    for name, change, facts_now, compiled, mode in (
        ("masked", {"document_masking": True}, {"packed": True}, "layers", "default"),
        ("whole", {"regional_compile": False}, {"whole_model": True}, "model", "default"),
    ):
        pretrain.train(dataclasses.replace(cfg, out_dir=str(tmp_path / name), **change))
        assert seen[-1] == {**plain_facts, **facts_now}, name
        assert (handed[-1]["compile"], handed[-1]["compile_mode"]) == (compiled, mode), name
        out = capsys.readouterr().out
        assert f"compile_mode auto: {mode} (" in out
        # on this CPU in float32 the masked run's per-document paths recompile per packing: said (a run crawled at a
        # recompile per step without a word)
        assert ("warning: document_masking with compile: true on cpu in float32" in out) == (name == "masked"), out
    # CUDA graphs set by name where auto would not take them: taken, with a warning that names the case
    named = {"out_dir": str(tmp_path / "named"), "compile_mode": "reduce-overhead", "document_masking": True}
    pretrain.train(dataclasses.replace(cfg, **named))
    assert handed[-1]["compile_mode"] == "reduce-overhead"
    out = capsys.readouterr().out
    assert "warning: compile_mode reduce-overhead: reduce-overhead (untested: set by compile_mode, where auto " in out
    assert "document-masked batches" in out


def test_combo_kernels_reach_torch_compile_as_inductor_options(sample_data, model_json, tmp_path, monkeypatch):
    """`combo_kernels: true` (the default) compiles the layers with inductor's options for the run's `compile_mode`
    plus `combo_kernels` (torch.compile takes a mode or options, not both): a CUDA-graph mode keeps its CUDA graphs;
    `combo_kernels: false` leaves combo kernels out; every compiled run takes `TRAINING_INDUCTOR_OPTIONS` (in-place
    buffers off, for the autotuner's timings); a mode torch.compile lacks is an error naming it; without
    `compile: true` the setting is not used. (Whether combo kernels train like compiling without them:
    tests/test_gpu.py; inductor has no combo kernels on the CPU.)"""
    from llamathink.modeling_llamathink import LlamaThinkPreTrainedModel, uses_cuda_graphs
    from llamathink.train.loop import TRAINING_INDUCTOR_OPTIONS, compile_kwargs

    assert TRAINING_INDUCTOR_OPTIONS == {"inplace_buffers": False}
    assert compile_kwargs("default") == {"options": {"inplace_buffers": False}}
    assert compile_kwargs("default", combo_kernels=True) == {
        "options": {"inplace_buffers": False, "combo_kernels": True}
    }
    graphs = compile_kwargs("reduce-overhead", combo_kernels=True)
    assert graphs == {"options": {"triton.cudagraphs": True, "inplace_buffers": False, "combo_kernels": True}}
    assert uses_cuda_graphs(graphs)
    assert not uses_cuda_graphs(compile_kwargs("max-autotune-no-cudagraphs", combo_kernels=True))
    assert compile_kwargs("max-autotune-no-cudagraphs")["options"]["max_autotune"] is True  # the mode's own options
    with pytest.raises(ValueError, match="compile_mode 'fast'"):
        compile_kwargs("fast", combo_kernels=True)
    with monkeypatch.context() as patch:  # a torch whose inductor lacks the option: left out, with a warning
        patch.setattr(loop, "inductor_has_combo_kernels", lambda: False)
        with pytest.warns(UserWarning, match="no inductor option combo_kernels; the layers compile without combo"):
            assert compile_kwargs("reduce-overhead", combo_kernels=True) == {
                "options": {"triton.cudagraphs": True, "inplace_buffers": False}
            }
    # every option compile_kwargs passes is one torch.compile accepts (it refuses unknown inductor options)
    torch.compile(torch.nn.Linear(2, 2), **compile_kwargs("default", combo_kernels=True))(torch.ones(1, 2))

    calls = []
    compile_layers = LlamaThinkPreTrainedModel.compile_layers

    def fake_compile_layers(self, **kw):
        calls.append(kw)
        return compile_layers(self, backend="eager")

    monkeypatch.setattr(LlamaThinkPreTrainedModel, "compile_layers", fake_compile_layers)
    cfg = _cfg(sample_data, model_json, tmp_path / "combo", max_steps=2, save_every=2, eval_every=2, compile=True)
    assert cfg.combo_kernels is True  # the default
    pretrain.train(cfg)
    pretrain.train(dataclasses.replace(cfg, out_dir=str(tmp_path / "plain"), combo_kernels=False))
    assert calls == [
        {"options": {"inplace_buffers": False, "combo_kernels": True}},
        {"options": {"inplace_buffers": False}},
    ]
    eager = _cfg(sample_data, model_json, tmp_path / "eager", max_steps=1, warmup_steps=0, save_every=1, eval_every=1)
    assert not eager.compile and eager.combo_kernels  # accepted, not used: nothing is compiled
    monkeypatch.setattr(loop, "inductor_has_combo_kernels", lambda: False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pretrain.train(eager)
    assert len(calls) == 2
    assert not [w for w in caught if "combo_kernels" in str(w.message)]  # nothing compiled, nothing to warn about


def test_compile_true_trains_layer_by_layer_and_saves_plain_checkpoints(sample_data, model_json, tmp_path, monkeypatch):
    """`compile: true` compiles the decoder layers in place (`compile_layers`; `regional_compile: false`: the whole
    model): the run's losses equal the eager run's, and checkpoints and the final model keep the plain parameter
    names. dynamo's "eager" backend stands in for inductor (same graphs, no code generation on the CPU runner)."""
    from llamathink.modeling_llamathink import LlamaThinkPreTrainedModel

    scopes = []
    compile_layers = LlamaThinkPreTrainedModel.compile_layers
    monkeypatch.setattr(
        LlamaThinkPreTrainedModel,
        "compile_layers",
        lambda self, **kw: scopes.append(("layers", kw)) or compile_layers(self, backend="eager"),
    )
    real_compile = torch.compile

    def compile_whole(model=None, **kwargs):  # (nn.Module.compile passes the layer's bound _call_impl, not a Module)
        if isinstance(model, torch.nn.Module):
            scopes.append(("model", kwargs))
        return real_compile(model, backend="eager")

    monkeypatch.setattr(torch, "compile", compile_whole)
    eager = pretrain.train(_cfg(sample_data, model_json, tmp_path / "eager", max_steps=4, save_every=4, eval_every=4))
    torch._dynamo.reset()
    layers = pretrain.train(
        _cfg(sample_data, model_json, tmp_path / "layers", max_steps=4, save_every=4, eval_every=4, compile=True)
    )
    # the run settings' defaults: compile_mode auto (inductor's default mode on a CPU), combo kernels
    combo = {"options": {"inplace_buffers": False, "combo_kernels": True}}
    assert scopes == [("layers", combo)]
    whole = pretrain.train(
        _cfg(
            sample_data,
            model_json,
            tmp_path / "whole",
            max_steps=4,
            save_every=4,
            eval_every=4,
            compile=True,
            regional_compile=False,
        )
    )
    assert scopes == [("layers", combo), ("model", combo)]
    for run in (layers, whole):
        for step, loss in eager["losses"].items():
            assert abs(run["losses"][step] - loss) < 1e-5 * abs(loss), (step, run["losses"][step], loss)
    names = set(ckpt.load_checkpoint(tmp_path / "layers/checkpoints/step_00000004")["model"])
    assert names == set(ckpt.load_checkpoint(tmp_path / "eager/checkpoints/step_00000004")["model"])
    assert not any("_orig_mod" in n for n in names)


def test_compiled_pretraining_chooses_its_gdn_kernels_once_builds_flash_qla_after_step_one_and_resumes_alike(
    sample_data, model_json, tmp_path, monkeypatch, capsys
):
    """Compiled 16-bit pretraining asks the model once, before its first step, which Gated DeltaNet kernels to train
    with (`choose_training_kernels`, at its micro-batch shape); where that is fla's, it starts FlashQLA's build for
    later runs (`start_flash_qla_build`) after its first step, never beside the first step's compilation, its output
    in out_dir/flash_qla_build.log. Its checkpoints keep the choice (`gdn_kernels`), and a resumed run is given it,
    so that it goes on with the kernels it trained with. (The model's side is stood in for here: no GPU.)"""
    from accelerate.state import AcceleratorState

    from llamathink.modeling_llamathink import LlamaThinkForCausalLM, LlamaThinkPreTrainedModel
    from llamathink.train.checkpoint import CheckpointError, list_checkpoints

    calls, choice = [], {"kernels": "fla"}

    def choose(self, batch_size, seq_len, packed=False, dtype=None, kernels=None):
        calls.append(("choose", batch_size, seq_len, packed, dtype, kernels))
        return kernels or choice["kernels"]

    def build(self, batch_size, seq_len, packed=False, dtype=None, log_path=None):
        calls.append(("build", batch_size, seq_len, packed, dtype, log_path))
        return object()

    forward = LlamaThinkForCausalLM.forward

    def counted(self, *args, **kwargs):
        if self.training:
            calls.append("step")
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(LlamaThinkPreTrainedModel, "choose_training_kernels", choose)
    monkeypatch.setattr(LlamaThinkPreTrainedModel, "start_flash_qla_build", build)
    monkeypatch.setattr(LlamaThinkForCausalLM, "forward", counted)
    compile_layers = LlamaThinkPreTrainedModel.compile_layers
    monkeypatch.setattr(
        LlamaThinkPreTrainedModel, "compile_layers", lambda self, **kw: compile_layers(self, backend="eager")
    )
    settings = {"max_steps": 3, "warmup_steps": 1, "eval_every": 10, "save_every": 2, "grad_accum": 1}
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        out = tmp_path / "run"
        cfg = _cfg(sample_data, model_json, out, compile=True, mixed_precision="bf16", **settings)
        torch._dynamo.reset()
        pretrain.train(dataclasses.replace(cfg, stop_at_step=2))
        assert calls == [
            ("choose", 8, 64, False, torch.bfloat16, None),
            "step",
            ("build", 8, 64, False, torch.bfloat16, out / "flash_qla_build.log"),
            "step",
        ], calls
        assert "FlashQLA's faster ones are being built in the background" in capsys.readouterr().out
        state = torch.load(list_checkpoints(out)[-1] / "state.pt", weights_only=False)
        assert state["gdn_kernels"] == "fla"
        calls.clear()
        choice["kernels"] = "flash_qla"  # built since: the resumed run still goes on with fla's
        torch._dynamo.reset()
        pretrain.train(dataclasses.replace(cfg, resume="auto"))
        assert calls[0] == ("choose", 8, 64, False, torch.bfloat16, "fla") and calls.count("step") == 1, calls
        assert "Gated DeltaNet kernels: fla's (as the run trained with before)" in capsys.readouterr().out
        # a new run takes the built FlashQLA kernels, keeps that in its checkpoints and builds nothing
        calls.clear()
        torch._dynamo.reset()
        pretrain.train(dataclasses.replace(cfg, out_dir=str(tmp_path / "second")))
        assert [c for c in calls if c != "step"] == [("choose", 8, 64, False, torch.bfloat16, None)], calls
        assert "Gated DeltaNet kernels: FlashQLA's (built on this machine" in capsys.readouterr().out
        last = list_checkpoints(tmp_path / "second")[-1]
        state = torch.load(last / "state.pt", weights_only=False)
        assert state["gdn_kernels"] == "flash_qla"
        state["gdn_kernels"] = "flashqla"  # a damaged record is refused by name
        torch.save(state, last / "state.pt")
        with pytest.raises(CheckpointError, match="gdn_kernels is 'flashqla', not 'fla' or 'flash_qla'"):
            pretrain.train(dataclasses.replace(cfg, out_dir=str(tmp_path / "second"), resume="auto", max_steps=4))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("document_masking", [False, True])
def test_compiled_pretraining_starts_the_fla_prebuild_at_its_batch_shape(
    sample_data, model_json, tmp_path, monkeypatch, capsys, document_masking
):
    """Compiled 16-bit pretraining asks the model, once and before its first step, to build fla's kernels beside
    that step (`start_fla_prebuild`) at its micro-batch shape, packed when documents are masked; eager or float32
    runs, which do not use it, never ask. (On this CPU the model's answer is None: no fla; the child itself:
    tests/test_gpu.py.) The compiled bf16 run stops where it asks; a child that cannot be started (OSError) is
    reported and the run trains on."""
    from accelerate.state import AcceleratorState

    from llamathink.modeling_llamathink import LlamaThinkForCausalLM, LlamaThinkPreTrainedModel

    class Asked(BaseException):  # not an Exception: the loop reports those and goes on
        pass

    def asking(self, *args, **kwargs):
        raise Asked(args, kwargs)

    def first_step(*args, **kwargs):
        raise AssertionError("a training step ran before the prebuild was asked for")

    def _raise(error):
        raise error

    start = LlamaThinkPreTrainedModel.start_fla_prebuild
    monkeypatch.setattr(LlamaThinkPreTrainedModel, "start_fla_prebuild", asking)
    compile_layers = LlamaThinkPreTrainedModel.compile_layers
    monkeypatch.setattr(
        LlamaThinkPreTrainedModel, "compile_layers", lambda self, **kw: compile_layers(self, backend="eager")
    )
    settings = {"max_steps": 1, "warmup_steps": 1, "eval_every": 1, "save_every": 1}
    if not document_masking:  # (packed runs of a step cost a minute on this CPU: the question is the same)
        pretrain.train(_cfg(sample_data, model_json, tmp_path / "fp32", compile=True, **settings))
    # accelerate keeps one mixed-precision setting per process: the bf16 runs get a state of their own
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        if not document_masking:
            pretrain.train(_cfg(sample_data, model_json, tmp_path / "eager", mixed_precision="bf16", **settings))
            with monkeypatch.context() as patch:  # a child that cannot be started: reported, and the run trains
                patch.setattr(LlamaThinkPreTrainedModel, "start_fla_prebuild", lambda *a, **k: _raise(OSError("fork")))
                torch._dynamo.reset()
                cfg = _cfg(sample_data, model_json, tmp_path / "oserror", compile=True, mixed_precision="bf16")
                run = pretrain.train(dataclasses.replace(cfg, **settings))
            assert (
                run["final_dir"] is not None
                and "fla's kernels are not prebuilt (OSError: fork)" in capsys.readouterr().out
            )
        torch._dynamo.reset()
        monkeypatch.setattr(LlamaThinkForCausalLM, "forward", first_step)
        cfg = _cfg(
            sample_data,
            model_json,
            tmp_path / "bf16",
            compile=True,
            mixed_precision="bf16",
            document_masking=document_masking,
            **settings,
        )
        with pytest.raises(Asked) as asked:
            pretrain.train(cfg)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    log = tmp_path / "bf16" / "fla_prebuild.log"  # the main process keeps the child's output
    assert asked.value.args == ((8, 64, document_masking), {"dtype": torch.bfloat16, "log_path": log})
    assert start(pretrain.build_model(_cfg(sample_data, model_json, tmp_path / "x")), 8, 64) is None  # CPU


@pytest.mark.parametrize("mixers", [None, ["linear", "full", "linear", "full"]], ids=["layers", "pattern-runs"])
def test_two_process_ddp_with_compiled_layers_matches_one_process(
    sample_data, model_json, tmp_path, monkeypatch, mixers
):
    """`compile: true` under DDP (what the FineWeb recipes run): two processes of 4 rows each, with gradient
    accumulation (DDP's `no_sync` on the first micro-batch), give the one-process run's losses for the same global
    batch, and each process trains its compiled layers (no eager fallback): one graph per mixer type and the loss's
    for a mixer pattern that does not repeat, one for the runs of a repeating pattern (`compile_layers`' runs of
    layers, here two runs of linear, full) and the loss's. dynamo's "aot_eager" backend stands in for inductor in
    both runs (tests/_compiled_pretrain_worker.py)."""
    import _compiled_pretrain_worker as worker

    from llamathink.modeling_llamathink import LlamaThinkPreTrainedModel

    monkeypatch.setattr(LlamaThinkPreTrainedModel, "compile_layers", worker.compile_layers)  # as the workers run
    config = LlamaThinkConfig.from_json_file(str(model_json))
    if mixers is not None:
        config.mixer_types = mixers
        model_json = tmp_path / "config.json"
        config.to_json_file(model_json)
    settings = {"max_steps": 3, "warmup_steps": 1, "eval_every": 3, "save_every": 3, "log_every": 1, "compile": True}
    torch._dynamo.reset()
    one = pretrain.train(_cfg(sample_data, model_json, tmp_path / "one", **settings))
    two_cfg = _cfg(sample_data, model_json, tmp_path / "two", micro_batch_size=4, **settings)
    args = [f"--{k}={v}" for k, v in dataclasses.asdict(two_cfg).items() if v is not None]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [str(REPO_ROOT / "tests" / "_compiled_pretrain_worker.py"), *args]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    layer_graphs = 1 if mixers is not None else len(set(config.mixer_types))
    graphs = dict(re.findall(r"^rank (\d) graphs (\d+)$", proc.stdout, re.MULTILINE))
    assert graphs == {"0": str(layer_graphs + 1), "1": str(layer_graphs + 1)}, proc.stdout[-2000:]
    two = json.loads((tmp_path / "two" / "history.json").read_text())
    for step, loss in one["losses"].items():
        assert two["losses"][str(step)] == pytest.approx(loss, rel=1e-5), step
    assert two["eval"]["3"] == pytest.approx(one["eval"][3], rel=1e-5)


def test_a_data_folder_whose_recorded_tokenizer_is_not_here_names_meta_json_and_the_fix(
    sample_data, model_json, tmp_path
):
    """A data folder moved to another machine keeps meta.json's tokenizer path from the machine that prepared it:
    the run stops before training with an error naming meta.json and `--tokenizer`; given `--tokenizer`, it trains."""
    import json
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(sample_data, moved)
    meta = json.loads((moved / "meta.json").read_text())
    meta["tokenizer"] = str(tmp_path / "elsewhere" / "tokenizer.model")
    (moved / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"meta.json names the tokenizer .*elsewhere.*pass --tokenizer"):
        pretrain.train(_cfg(moved, model_json, tmp_path / "out", max_steps=2))
    assert not ckpt.list_checkpoints(tmp_path / "out")
    history = pretrain.train(_cfg(moved, model_json, tmp_path / "out2", max_steps=2, tokenizer="builtin"))
    assert len(history["losses"]) == 2


def test_a_tokenizer_other_than_the_datas_is_named_in_a_warning(sample_data, model_json, tmp_path, capsys):  # noqa: F811
    """meta.json records the fingerprint of the tokenizer that made the shards; training with another one (an
    edited local tokenizer, say) would sample and save a tokenizer that does not match the data: a warning says so."""
    meta = json.loads((Path(sample_data) / "meta.json").read_text())
    assert meta["tokenizer_sha256"]
    pretrain.train(
        _cfg(sample_data, model_json, tmp_path / "a", max_steps=1, save_every=1, eval_every=1, warmup_steps=0)
    )
    assert "is not the one" not in capsys.readouterr().out
    data = tmp_path / "data"
    shutil.copytree(sample_data, data)
    (data / "meta.json").write_text(json.dumps({**meta, "tokenizer_sha256": "0" * 64}))
    pretrain.train(_cfg(data, model_json, tmp_path / "b", max_steps=1, save_every=1, eval_every=1, warmup_steps=0))
    assert "is not the one" in capsys.readouterr().out


def test_resume_takes_the_same_inputs_spelled_another_way(sample_data, model_json, tmp_path, monkeypatch):
    """A run started with relative paths resumes with the absolute names of the same files (and back); the
    contents are still checked under the new spelling, and another folder with other contents is still refused (one
    with the same contents is a moved input: test_checkpoint's test_resume_accepts_a_moved_input...)."""
    monkeypatch.chdir(sample_data.parent)
    out = tmp_path / "run"
    relative = _cfg(sample_data.name, os.path.relpath(model_json), out, max_steps=4, stop_at_step=2, save_every=2)
    pretrain.train(relative)
    history = pretrain.train(_cfg(sample_data.resolve(), model_json.resolve(), out, max_steps=4, save_every=2))
    assert sorted(history["losses"]) == [1, 2, 3, 4]
    other = tmp_path / "other_data"
    shutil.copytree(sample_data, other)
    meta = json.loads((other / "meta.json").read_text())
    (other / "meta.json").write_text(json.dumps({**meta, "note": "other contents"}))
    with pytest.raises(ckpt.ResumeSettingsError, match="data_dir"):
        pretrain.train(_cfg(other, model_json, out, max_steps=6, save_every=2))


def test_a_leading_tilde_in_a_path_setting_is_the_home_folder(tmp_path, monkeypatch):
    """`out_dir: ~/runs/x` in a YAML file (or a quoted argument) made a folder named "~" in the working directory;
    every setting holding a path takes ~ as the home folder, as a shell does."""
    monkeypatch.setenv("HOME", str(tmp_path))
    path = tmp_path / "run.yaml"
    path.write_text("out_dir: ~/runs/x\ndata_dir: ~/data\nmodel_config: ~/m.json\n")  # (a bare ~ is YAML's null)
    cfg = pretrain.load_config(str(path), ["--tokenizer", "~/tok.model"])
    assert (cfg.out_dir, cfg.data_dir, cfg.model_config, cfg.tokenizer) == (
        f"{tmp_path}/runs/x",
        f"{tmp_path}/data",
        f"{tmp_path}/m.json",
        f"{tmp_path}/tok.model",
    )
    from llamathink.train.finetune import FinetuneConfig

    tuned = FinetuneConfig(data="~/chats.jsonl", init_from="~")
    assert (tuned.data, tuned.init_from) == (f"{tmp_path}/chats.jsonl", str(tmp_path))
    # the chat's model path (`load_saved_model`, a quoted "~/m" on its command line) too: it was a Hub lookup
    tiny_model(torch.float32).save_pretrained(tmp_path / "m")
    assert isinstance(ckpt.load_saved_model("~/m", "model"), LlamaThinkForCausalLM)


def test_the_loop_checks_batches_on_the_host_and_the_forward_then_skips_its_own_check(monkeypatch):
    """`check_batch_on_host`: a CPU batch's ids and labels are checked there (no device sync), a bad label named
    before any forward, and the forward then runs inside `inputs_checked_by_caller` (no check of its own, whose
    host sync would drain the GPU's queue every step); a batch already on a device keeps the forward's check."""
    from llamathink import modeling_llamathink as modeling
    from llamathink.train.loop import check_batch_on_host

    model = tiny_model(torch.float32)
    ids = torch.randint(3, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=f"labels contains {model.config.vocab_size}: neither -100"):
        check_batch_on_host({"input_ids": ids, "labels": torch.full_like(ids, model.config.vocab_size)}, model)
    calls = []
    monkeypatch.setattr(modeling, "check_token_values", lambda *a, **k: calls.append(k) or None)
    with check_batch_on_host({"input_ids": ids, "labels": ids}, model):
        assert modeling._inputs_checked_by_caller(model) and modeling._inputs_checked_by_caller(model.model)
        loss = model(input_ids=ids, labels=ids).loss
    assert calls == [] and torch.isfinite(loss)
    assert not modeling._inputs_checked_by_caller(model)
    on_device = {"input_ids": ids.to("meta"), "labels": ids.to("meta")}
    with check_batch_on_host(on_device, model):
        assert not modeling._inputs_checked_by_caller(model)
