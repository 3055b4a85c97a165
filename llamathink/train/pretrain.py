"""Pretraining of LlamaThink on token shards (`llamathink.data`), with accelerate and Muon.

    llamathink-pretrain --config configuration/train/<preset>.yaml [--key value ...]
    accelerate launch [--config_file accelerate_configs/...] train_hf.py --config ... [--key value ...]

`TrainConfig` (a YAML file plus `--key value` overrides of any field) names the model (a config.json for a fresh
model, or a pretrained folder), the prepared data and the run; `train` builds the model, tokenizer and data loader
and hands them to the shared loop (`llamathink.train.loop.run_training`) with pretraining's evaluation (mean loss
over the first `eval_batches` validation batches), samples (greedy continuations) and final folder.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PretrainedConfig

from ..configuration_llamathink import LlamaThinkConfig
from ..data import (
    ShardedTokenDataset,
    TokenBatchLoader,
    check_shards_against_meta,
    check_token_ids,
    check_vocab,
    document_position_ids,
    find_shards,
    load_meta,
    tokenizer_fingerprint,
    val_batches,
)
from ..modeling_llamathink import CUDA_GRAPH_COMPILE_MODES, LlamaThinkForCausalLM, flops_per_token
from .checkpoint import load_saved_model, own_out_dir
from .config import RunConfig
from .config import load_config as _load_settings
from .loop import (
    TrainingHooks,
    begin_run,
    command_main,
    make_accelerator,
    run_training,
    sample_room,
    save_final,
)

# torch.compile's modes (`compile_mode`), after "auto" (`resolve_compile_mode`)
COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


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
    # with compile: true compiles the decoder layers in runs of the mixer pattern (one graph for the runs of a
    # repeating pattern: a short first step, fast warm restarts; `LlamaThinkForCausalLM.compile_layers`); false
    # compiles the whole model as one graph
    regional_compile: bool = True
    # torch.compile's mode (with compile: true). "auto": "reduce-overhead" for compiled layers in one process on a
    # GPU with windows of one shape, in bf16 or float32 (the path its GPU tests cover), "default" elsewhere
    # (`resolve_compile_mode`; the run prints its choice). "reduce-overhead" replays the compiled layers as CUDA
    # graphs, so the step no longer waits on the host launching their kernels (on the H200 at batch 16 the training
    # loop 1.9x the tokens/s of "default", both with combo kernels, session 26; the same at batch 64, +0.5 GiB;
    # BENCHMARKS.md 1). Also "default", "max-autotune", "max-autotune-no-cudagraphs"
    compile_mode: str = "auto"
    # with compile: true, inductor's combo kernels: independent element-wise and reduction kernels of a compiled
    # layer launched as one. On the H200 (BENCHMARKS.md section 1, sessions 24-25): half the inductor launches, so
    # the host-bound batch-16 step in the default mode trains about 10-14% faster (training loop), batch 64 2%
    # (bench_gpu), at the same peak memory and first-step time; its training is within bf16 kernels' rounding of
    # the inductor defaults' (tests/test_gpu.py). false: without them. No effect without compile: true.
    combo_kernels: bool = True
    # true: each document of a window sees only itself (position ids restart at every BOS). Off by default: on the
    # H200 it costs 3% of the tokens/s compiled but runs at 0.36x eagerly (BENCHMARKS.md 1b, 2b); use it with
    # compile. false: a window is one stream, each document starting with the state the previous one left.
    document_masking: bool = False
    eval_batches: int = 20
    peak_tflops: float | None = 989.0  # per device, for MFU (H100 SXM dense bf16); null to skip MFU

    def __post_init__(self):
        super().__post_init__()
        self.check_positive("seq_len", "eval_batches")
        if self.seq_len < 2:  # a window of one token has no next token to predict
            raise ValueError(f"seq_len must be at least 2 (a token and the next one it predicts), got {self.seq_len}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}")
        if self.compile_mode not in ("auto", "default") and not self.compile:
            raise ValueError(f"compile_mode: {self.compile_mode} has no effect without compile: true; set both")
        if (self.model_config is None) == (self.init_from is None):
            raise ValueError("set exactly one of model_config (a fresh model) and init_from (a pretrained one)")
        self.check_out_dir_apart_from("init_from")
        peak = self.peak_tflops
        if peak is not None and not (isinstance(peak, (int, float)) and 0 < peak < math.inf):
            raise ValueError(f"peak_tflops must be a device's peak TFLOP/s (> 0, for MFU) or null, got {peak!r}")


def load_config(path: str | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """A `TrainConfig` from a YAML file (`path`) and `--key value` / `--key=value` overrides
    (`llamathink.train.config.load_config`: unknown keys and unreadable values are errors naming them)."""
    return _load_settings(TrainConfig, path, overrides)


def build_model(cfg: TrainConfig) -> LlamaThinkForCausalLM:
    """The model of a run: `init_from` (a saved model; `load_saved_model`), else a fresh one of the
    `model_config` JSON (or folder), initialised from `seed`. Raises FileNotFoundError / ValueError naming the
    setting when the path is missing or not a model, `seq_len` is beyond the model's context, or the model it
    describes is more than this machine can allocate (with its parameter count)."""
    if cfg.init_from is not None:
        return load_saved_model(cfg.init_from, "init_from", check_generation=True)
    path = Path(cfg.model_config)
    if not path.exists():
        raise FileNotFoundError(f"model_config {path} does not exist")
    check_config_keys(path / "config.json" if path.is_dir() else path)
    config = LlamaThinkConfig.from_json_file(str(path)) if path.is_file() else LlamaThinkConfig.from_pretrained(path)
    if cfg.seq_len > config.max_position_embeddings:
        raise ValueError(
            f"seq_len={cfg.seq_len} exceeds the model's max_position_embeddings={config.max_position_embeddings}"
        )
    torch.manual_seed(cfg.seed)
    try:
        return LlamaThinkForCausalLM(config)
    except (MemoryError, RuntimeError) as err:
        if not isinstance(err, MemoryError) and "allocate" not in str(err):
            raise
        with torch.device("meta"):  # the sizes alone, nothing allocated
            count = sum(p.numel() for p in LlamaThinkForCausalLM(config).parameters())
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"model_config {path} describes a model of {count:,} parameters ({4 * count / 2**30:,.1f} GiB in float32), "
            f"more than this machine can allocate ({reason})"
        ) from None


# keys that transformers' configs carry or carried (saved by save_pretrained, older versions, generation settings)
_BASE_KEYS = {
    "auto_map",
    "torch_dtype",
    "rope_scaling",
    "rope_parameters",
    "attn_implementation",
    "_attn_implementation_autoset",
    "use_cache",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "tie_word_embeddings",
}


def check_config_keys(path: Path) -> None:
    """Refuse (ValueError naming them) keys of a model config JSON that are no `LlamaThinkConfig` field: transformers
    keeps any key as a plain attribute, so a typo (`num_hidden_layer`) would train the default instead, silently."""
    try:
        keys = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:  # (JSONDecodeError and UnicodeDecodeError are ValueErrors)
        raise ValueError(f"model_config {path} is not a readable JSON file ({err})") from None
    if not isinstance(keys, dict):  # (a bad file, like the JSON errors above: the CLI reports ValueErrors)
        raise ValueError(  # noqa: TRY004
            f"model_config {path} holds a JSON {type(keys).__name__}, not an object of config fields"
        )
    unknown = sorted(set(keys) - set(LlamaThinkConfig().to_dict()) - set(PretrainedConfig().to_dict()) - _BASE_KEYS)
    if unknown:
        raise ValueError(f"model_config {path}: {unknown} are not LlamaThinkConfig fields (a typo?)")
    # a RoPE dict the model would not apply is refused here also where the file reads as a saved model (which loads
    # with it dropped): a new model would train without what the file asks for
    rope = ("rope_parameters", "rope_scaling", "rope_theta", "partial_rotary_factor")
    if "rope_parameters" in keys or "rope_scaling" in keys:
        try:
            LlamaThinkConfig(**{k: keys[k] for k in rope if k in keys})
        except ValueError as err:
            raise ValueError(
                f"model_config {path}: {err} (earlier LlamaThink versions took such a dict and trained without it: "
                "delete it from the file to go on with such a run)"
            ) from None


def check_special_tokens(meta: dict, config, data_dir: str) -> None:
    """The model's BOS / EOS ids must be the data's (`meta.json`, written by `prepare` from the tokenizer): a model
    that starts or ends documents with other ids would generate past the end of every reply. ValueError names both."""
    for key in ("bos_token_id", "eos_token_id"):
        data_id = meta.get(key)
        model_ids = getattr(config, key, None)
        model_ids = model_ids if isinstance(model_ids, (list, tuple)) else [model_ids]
        if data_id is not None and data_id not in model_ids:
            raise ValueError(
                f"the model's {key} is {getattr(config, key, None)!r} but the data's ({Path(data_dir) / 'meta.json'}) "
                f"is {data_id}: set {key} to {data_id} in the model's config, or prepare the data with the model's "
                "tokenizer"
            )


def check_validation_data(cfg: TrainConfig, vocab_size: int) -> None:
    """Raise ValueError (naming the shard) when the validation shards of `cfg.data_dir` hold less than one
    `seq_len` window, a vocabulary larger than the model's `vocab_size`, or a token id outside it (every token is
    read; the split is small)."""
    try:
        val = ShardedTokenDataset(cfg.data_dir, cfg.seq_len, split="val", model_vocab_size=vocab_size)
        for path, tokens in zip(val.paths, val.arrays, strict=True):
            check_token_ids(path, tokens, vocab_size)
    except ValueError as err:
        raise ValueError(f"validation data: {err}") from None


@torch.no_grad()
def evaluate(model, cfg: TrainConfig, accelerator, bos_id: int | None = None) -> float:
    """Mean loss over the first `eval_batches` validation batches of every rank (the same every call), with the
    documents kept apart as in training (`document_masking`, `bos_id`)."""
    model.eval()
    total, count = torch.zeros((), device=accelerator.device), torch.zeros((), device=accelerator.device)
    batches = val_batches(
        cfg.data_dir,
        cfg.seq_len,
        cfg.micro_batch_size,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        max_batches=cfg.eval_batches,
    )
    for input_ids, labels in batches:
        inputs = model_inputs(input_ids, labels, cfg, bos_id)
        with accelerator.autocast():
            # use_cache=False: eval mode would otherwise build a decode cache
            loss = model(**{k: v.to(accelerator.device) for k, v in inputs.items()}, use_cache=False).loss
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
        room = sample_room(model, prompt, ids.shape[1])
        if room == 0:
            continue
        out = model.generate(
            ids,
            max_new_tokens=min(cfg.sample_tokens, room),
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        texts.append(tokenizer.decode(out[0], skip_special_tokens=True))
    model.train()
    return texts


def model_inputs(input_ids: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig, bos_id: int | None) -> dict:
    """The model's inputs for a window batch: with `document_masking` (and a BOS id in the data) also position ids
    that restart at each document (`llamathink.data.document_position_ids`)."""
    inputs = {"input_ids": input_ids, "labels": labels}
    if cfg.document_masking and bos_id is not None:
        inputs["position_ids"] = document_position_ids(input_ids, bos_id)
    return inputs


def resolve_compile_mode(
    mode: str, device: torch.device, *, num_processes: int, packed: bool, whole_model: bool, mixed_precision: str
) -> tuple[str, str]:
    """torch.compile's mode for compiled training: (mode, why). A `mode` other than "auto" is taken as given. "auto"
    gives "reduce-overhead" (the compiled layers replayed as CUDA graphs) for the path the CUDA-graph GPU tests cover
    (`tests/test_gpu.py -k "cuda_graph or default_compiled_pretraining"`: gradients, losses and weights equal to the
    default mode's) with shapes that stay fixed: decoder layers compiled one by one (not `whole_model`), on a CUDA
    `device`, in one process, bf16 autocast or float32 (`mixed_precision` "bf16" or "no"), windows of one shape (not
    `packed`: document-masked batches give each new set of document lengths a shape of its own, and CUDA graphs
    record a new graph for each). Elsewhere it gives "default": on a CPU CUDA graphs replay nothing; with several
    processes DDP's gradient hooks, and with fp16 the loss scaler, have not been tested inside CUDA graphs here; a
    whole-model graph would also serve evaluation and generation, whose shapes vary. A CUDA-graph mode set by name
    ("reduce-overhead", "max-autotune") is taken in those cases too, its reason then beginning with "untested:" and
    naming the case (the run prints it as a warning). Every argument is required, so that a caller cannot leave a
    fact of its run out."""
    cases = [
        reason
        for reason, holds in (
            ("the whole model compiled as one graph (regional_compile: false)", whole_model),
            (f"no CUDA graphs on {device.type}", device.type != "cuda"),
            (f"{num_processes} processes (CUDA graphs are used by one-process runs)", num_processes > 1),
            ("document-masked batches change shape from batch to batch", packed),
            (
                f"mixed_precision {mixed_precision} (CUDA graphs are used with bf16 or no)",
                mixed_precision not in ("bf16", "no"),
            ),
        )
        if holds
    ]
    if mode != "auto":
        if mode in CUDA_GRAPH_COMPILE_MODES and cases:
            return mode, f"untested: set by compile_mode, where auto takes default: {cases[0]}"
        return mode, "set by compile_mode"
    if cases:
        return "default", cases[0]
    return "reduce-overhead", "one process on a GPU, compiled layers, windows of one shape"


def _check_init_from_tokenizer(cfg: TrainConfig, tokenizer, tokenizer_name: str) -> None:
    """Raise ValueError where the data's tokenizer (`tokenizer`, read as `tokenizer_name`) gives one of the pieces
    of the tokenizer saved with init_from another id: the model learned that tokenizer's ids, and would be trained
    on the data's ids as if they meant the same text. An init_from without a tokenizer of its own passes."""
    from ..tokenizer_utils import check_saved_tokenizer_pieces

    check_saved_tokenizer_pieces(
        cfg.init_from,
        tokenizer,
        f"{cfg.data_dir} was tokenized with {tokenizer_name!r}, which is not",
        "the model would learn its ids anew as other text; prepare the data with the model's tokenizer "
        f"(llamathink-prepare --tokenizer {cfg.init_from})",
    )


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) a pretraining run. Returns {"losses": {step: loss}, "eval": {step: loss}, "perf": {step:
    metrics}, "tokens_seen": n, "overflow_steps": n, "final_dir": <out_dir>/final or None when stopped early}. The run
    holds out_dir's lock throughout (`own_out_dir`: OutDirInUse if another run does)."""
    accelerator = make_accelerator(cfg)
    with own_out_dir(cfg.out_dir, accelerator.is_main_process):
        # the main process may have restored a checkpoint under its name (`own_out_dir`): every rank looks for the
        # checkpoint to resume after that
        accelerator.wait_for_everyone()
        return _train(cfg, accelerator)


def _train(cfg: TrainConfig, accelerator) -> dict:
    resume_from, run_id = begin_run(cfg, accelerator)
    meta = load_meta(cfg.data_dir)
    check_shards_against_meta(cfg.data_dir, meta)  # a shard deleted, truncated or added since `prepare`
    try:
        has_val = bool(find_shards(cfg.data_dir, "val"))
    except FileNotFoundError:
        has_val = False
    if not has_val:
        accelerator.print(f"no validation shard in {cfg.data_dir}: evaluation is skipped")
    tokenizer = None
    tokenizer_name = cfg.tokenizer or meta.get("tokenizer")
    if tokenizer_name:
        from ..tokenizer_utils import load_tokenizer

        try:
            tokenizer = load_tokenizer(tokenizer_name)
        except ValueError as err:
            if cfg.tokenizer:
                raise
            # a data folder moved to another machine keeps the tokenizer path of the machine that prepared it
            raise ValueError(
                f"{Path(cfg.data_dir) / 'meta.json'} names the tokenizer {tokenizer_name!r}, which cannot be "
                f"loaded here ({err}); pass --tokenizer with the same tokenizer (the shards hold its token ids)"
            ) from None

    recorded = meta.get("tokenizer_sha256")
    if tokenizer is not None and meta.get("vocab_size") is not None and len(tokenizer) < int(meta["vocab_size"]):
        # a smaller tokenizer cannot be the data's (a larger one may extend it: the fingerprint warning below)
        raise ValueError(
            f"the tokenizer {tokenizer_name!r} has {len(tokenizer)} tokens, but {Path(cfg.data_dir) / 'meta.json'} "
            f"says the shards were made with a tokenizer of {meta['vocab_size']}: "
            + (
                "leave tokenizer unset to use the data's own, or prepare the data with this one"
                if cfg.tokenizer
                else "is the tokenizer file it names edited or replaced? pass --tokenizer with the data's own"
            )
        )
    if tokenizer is not None and cfg.init_from is not None:
        _check_init_from_tokenizer(cfg, tokenizer, tokenizer_name)
    if tokenizer is not None and recorded and tokenizer_fingerprint(tokenizer) not in (None, recorded):
        # (a warning, not an error: another `tokenizers` version may serialise the same tokenizer otherwise)
        accelerator.print(
            f"warning: the tokenizer {tokenizer_name!r} is not the one {Path(cfg.data_dir) / 'meta.json'} says "
            "the shards were made with (its fingerprint differs): if it was edited or replaced, the samples and "
            "the tokenizer saved with the model will not match the data"
        )
    model = build_model(cfg)
    check_vocab(int(meta["vocab_size"]), model.config.vocab_size)
    check_special_tokens(meta, model.config, cfg.data_dir)
    if tokenizer is not None:
        check_vocab(len(tokenizer), model.config.vocab_size)
    if has_val:  # now, not at the first evaluation: its error would lose the steps trained until then
        check_validation_data(cfg, model.config.vocab_size)
    loader = TokenBatchLoader(
        cfg.data_dir,
        cfg.seq_len,
        cfg.micro_batch_size,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        seed=cfg.seed,
        model_vocab_size=model.config.vocab_size,
        grad_accum=cfg.grad_accum,
    )
    bos_id = meta.get("bos_token_id")
    if cfg.document_masking and bos_id is None:
        accelerator.print(
            f"{cfg.data_dir} records no BOS token id: documents cannot be told apart, so document_masking is off"
        )
    batches = (model_inputs(input_ids, labels, cfg, bos_id) for input_ids, labels in loader)
    packed = bool(cfg.document_masking and bos_id is not None)
    compile_mode, why = resolve_compile_mode(
        cfg.compile_mode,
        accelerator.device,
        num_processes=accelerator.num_processes,
        packed=packed,
        whole_model=not cfg.regional_compile,
        mixed_precision=cfg.mixed_precision,
    )
    if cfg.compile:
        warning = "warning: " if why.startswith("untested:") else ""
        accelerator.print(f"{warning}compile_mode {cfg.compile_mode}: {compile_mode} ({why})")
    if cfg.compile and packed and (accelerator.device.type != "cuda" or cfg.mixed_precision not in ("bf16", "fp16")):
        accelerator.print(
            f"warning: document_masking with compile: true on {accelerator.device.type} in "
            f"{cfg.mixed_precision if cfg.mixed_precision != 'no' else 'float32'}: the per-document paths (no "
            "FlexAttention or fla here: a GPU in 16-bit has them) recompile for every new packing, and past "
            "torch.compile's recompile limit the layers run eagerly; compile: false trains faster here"
        )

    def final(raw_model, final_dir: Path, history: dict, on_saved):
        save_final(raw_model, tokenizer, final_dir, cfg, history, tokens_seen=history["tokens_seen"], on_saved=on_saved)
        accelerator.print(f"saved {final_dir}")

    hooks = TrainingHooks(
        save_final=final,
        evaluate=(lambda m: evaluate(m, cfg, accelerator, bos_id)) if has_val else None,
        samples=lambda m: [repr(text) for text in generate_samples(m, tokenizer, cfg, accelerator.device)],
        flops_per_token=flops_per_token(model.config, cfg.seq_len),
        peak_flops=cfg.peak_tflops * 1e12 if cfg.peak_tflops else None,
    )
    return run_training(
        cfg,
        accelerator,
        model,
        loader,
        batches,
        hooks,
        resume_from=resume_from,
        run_id=run_id,
        settings_file="train_config.json",
        compile=("layers" if cfg.regional_compile else "model") if cfg.compile else None,
        compile_mode=compile_mode,
        combo_kernels=cfg.combo_kernels,
        fla_prebuild=(cfg.micro_batch_size, cfg.seq_len, packed),
        desc="train",
    )


def main(argv: list[str] | None = None) -> int:
    """`llamathink-pretrain` / `train_hf.py`: --config YAML plus --key value overrides of any TrainConfig field
    (`llamathink.train.loop.command_main`: one-line errors, exit status 2 for bad settings)."""
    return command_main(
        argv,
        prog="llamathink-pretrain",
        settings=TrainConfig,
        run=train,
        description="Pretrain LlamaThink. Settings come from --config (YAML, e.g. configuration/train/*.yaml) and "
        "--key value overrides of any TrainConfig field, e.g. --max_steps 100 --optimizer adamw.",
    )


if __name__ == "__main__":
    sys.exit(main())
