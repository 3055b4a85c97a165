"""Chat finetuning of a pretrained LlamaThink model (assistant-only loss), with accelerate and Muon or AdamW.

    llamathink-finetune --config configuration/finetune/<preset>.yaml [--key value ...]
    accelerate launch [--config_file accelerate_configs/...] finetune_chat.py --config ... [--key value ...]

The conversation format is in `llamathink.chat_format`; the data (conversations -> examples with the label mask
-100 everywhere except assistant contents and their EOS, truncation at a turn, the resumable batch loader) in
`llamathink.data.chat`. This module: the run settings (`FinetuneConfig`), reading the data with a held-out share,
evaluation (loss per held-out assistant token), samples (greedy replies) and `finetune`, which hands them to the
loop shared with pretraining (`llamathink.train.loop.run_training`). The model starts from a `save_pretrained`
directory or Hub id (`init_from`); the result, `<out_dir>/final`, is a `save_pretrained` folder whose tokenizer
carries the chat template, ready for `llamathink-chat <out_dir>/final`.

Loss: the mean cross-entropy over all trained (assistant) tokens of an optimizer step - every token weighs the
same whatever the length of its conversation, over micro-batches and processes.
"""

from __future__ import annotations

import shlex
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..chat_format import check_content, prompt_ids, set_chat_template
from ..data import check_vocab
from ..data.chat import (
    ChatBatchLoader,
    ChatCollator,
    ChatDataset,
    PackedChatDataset,
    build_examples,
    load_conversations,
    split_held_out,
    trained_tokens,
)
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

# ----------------------------------------------------------------------------------------------------------------
# Run settings
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class FinetuneConfig(RunConfig):
    """Chat finetuning: the pretrained model and the conversations, plus the shared settings of `RunConfig`, some
    of them with finetuning defaults (below)."""

    # model and tokenizer: a save_pretrained directory or Hub id; the tokenizer defaults to the one saved with it
    init_from: str = "runs/llamathink-95m/final"
    tokenizer: str | None = None
    # data: "sample" (the bundled conversations), a .jsonl/.json/.parquet file, a save_to_disk dir or a Hub id
    data: str = "sample"
    data_split: str = "train"
    data_config: str | None = None  # the Hub dataset's configuration name, if it has several
    data_format: str = "auto"  # "auto" (by each row's keys), "messages", "sharegpt" or "person"
    max_conversations: int | None = None  # read at most this many conversations
    system_prompt: str | None = None  # put first in every conversation that has no system message
    max_len: int | None = None  # tokens per conversation (longer ones are cut at a turn); default: the model's context
    # held-out conversations for evaluation: a separate source, or a random eval_fraction of `data`
    eval_data: str | None = None
    eval_split: str = "test"
    eval_fraction: float = 0.05
    max_eval_conversations: int | None = 1000
    eval_at_start: bool = True  # evaluate the starting model too (step 0)
    group_by_length: bool = True  # batch conversations of similar length together (less padding)
    # pack several conversations into each row of up to max_len tokens (position ids restart at each, so the model
    # keeps them apart: the loss is that of the conversations one by one, with less padding); a micro batch is then
    # micro_batch_size packed rows
    packing: bool = False
    # RunConfig settings with finetuning defaults: smaller batches (of conversations), fewer steps, lower learning
    # rates, no weight decay, more frequent evaluation and checkpoints
    micro_batch_size: int = 16
    grad_accum: int = 1
    max_steps: int = 1000
    muon_lr: float = 0.005
    adamw_lr: float = 0.0005
    weight_decay: float = 0.0
    warmup_steps: int = 50
    eval_every: int = 100
    sample_every: int = 500
    sample_prompts: list[str] = field(
        default_factory=lambda: ["Hi! Can you recommend something to read?", "Why is the sky blue?"]
    )
    sample_tokens: int = 64
    wandb_project: str | None = "llamathink-chat"
    out_dir: str = "runs/llamathink-95m-chat"
    save_every: int = 500
    keep_last: int = 2

    def __post_init__(self):
        super().__post_init__()
        self.check_positive("max_len", "max_conversations", "max_eval_conversations", or_null=True)
        if not self.init_from:
            raise ValueError("init_from must name a pretrained model (a save_pretrained directory or a Hub id)")
        self.check_out_dir_apart_from("init_from")
        if self.data_format not in ("auto", "messages", "sharegpt", "person"):
            raise ValueError(f"data_format must be auto, messages, sharegpt or person, got {self.data_format!r}")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            raise ValueError(f"system_prompt must be text or null, got {self.system_prompt!r}")
        if self.system_prompt is not None and not self.system_prompt.strip():
            raise ValueError(
                "system_prompt is blank: the template would render an empty system block; use null for none"
            )
        if self.system_prompt is not None:  # now, not after the model has loaded, and by its own name
            check_content(0, self.system_prompt, name="system_prompt")
        if self.max_len is not None and self.max_len < 2:
            raise ValueError(f"max_len must be at least 2 (a token and the next one it predicts), got {self.max_len}")


def load_config(path: str | None = None, overrides: list[str] | None = None) -> FinetuneConfig:
    """A `FinetuneConfig` from a YAML file (`path`) and `--key value` / `--key=value` overrides
    (`llamathink.train.config.load_config`: unknown keys and unreadable values are errors naming them)."""
    return _load_settings(FinetuneConfig, path, overrides)


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


def prepare_data(cfg: FinetuneConfig, tokenizer, max_len: int) -> tuple[ChatDataset, ChatDataset, dict]:
    """Training and held-out examples, and counts of what was read, kept, truncated and skipped."""
    read, skipped = Counter(), []
    conversations = load_conversations(
        cfg.data,
        split=cfg.data_split,
        data_format=cfg.data_format,
        config_name=cfg.data_config,
        limit=cfg.max_conversations,
        stats=read,
        skipped=skipped,
    )
    data_invalid, data_skipped = read["invalid"], list(skipped)  # the training file's alone (eval_data adds to both)
    if cfg.eval_data:
        train_convs = conversations
        eval_convs = load_conversations(
            cfg.eval_data,
            split=cfg.eval_split,
            data_format=cfg.data_format,
            config_name=cfg.data_config,
            limit=cfg.max_eval_conversations,
            stats=read,
            skipped=skipped,
        )
    else:
        train_convs, eval_convs = split_held_out(conversations, cfg.eval_fraction, cfg.seed, cfg.max_eval_conversations)
    train_stats, eval_stats = Counter(), Counter()
    train = build_examples(tokenizer, train_convs, max_len, system_prompt=cfg.system_prompt, stats=train_stats)
    held = build_examples(tokenizer, eval_convs, max_len, system_prompt=cfg.system_prompt, stats=eval_stats)
    stats = {
        "invalid_rows": read["invalid"],
        "invalid_row_examples": skipped,
        "data_invalid_rows": data_invalid,
        "data_invalid_row_examples": data_skipped,
        "train_conversations": len(train_convs),
        "eval_conversations": len(eval_convs),
        "train": dict(train_stats),
        "eval": dict(eval_stats),
        "train_trained_tokens": train.num_trained_tokens(),
        "train_tokens": int(train.lengths.sum()),
    }
    return train, held, stats


def _describe(stats: dict) -> str:
    t, e = stats["train"], stats["eval"]
    return (
        f"conversations: {stats['train_conversations']} train, {stats['eval_conversations']} held out, "
        f"{stats['invalid_rows']} invalid rows skipped; train examples: {t.get('kept', 0)} kept "
        f"({t.get('truncated', 0)} truncated at a turn), {t.get('too_long', 0)} dropped as too long, "
        f"{t.get('no_assistant', 0)} skipped with nothing to learn; held-out examples: {e.get('kept', 0)}; "
        f"{stats['train_trained_tokens']:,} of {stats['train_tokens']:,} training tokens are "
        "trained on"
        + "".join(f"\n  skipped: {why}" for why in stats.get("invalid_row_examples", ()))
        + ("" if e.get("kept", 0) else f"\n  no held-out loss in this run: {_why_no_eval(stats)}")
    )


def _why_no_training(stats: dict) -> str:
    """Why no training example was kept, from `prepare_data`'s counts of the `data` file alone (a held-out share
    always leaves it one conversation to train on, so held-out settings are never the reason)."""
    t, invalid = stats["train"], stats["data_invalid_rows"]
    if not stats["train_conversations"]:
        if not invalid:
            return "it holds no conversations"
        first = stats["data_invalid_row_examples"] or ["?"]
        return f"all {invalid} of its rows are invalid, the first: {first[0]}"
    return (
        f"of its {stats['train_conversations']} training conversations, too long for max_len: "
        f"{t.get('too_long', 0)}, without an assistant turn to learn: {t.get('no_assistant', 0)}"
    )


def _why_no_eval(stats: dict) -> str:
    """Why no held-out example was kept, from `prepare_data`'s counts."""
    e = stats["eval"]
    if not stats["eval_conversations"]:
        return "no conversation is held out (eval_fraction, eval_data)"
    return (
        f"of its {stats['eval_conversations']} held-out conversations, too long for max_len: {e.get('too_long', 0)}, "
        f"without an assistant turn to score: {e.get('no_assistant', 0)}"
    )


# ----------------------------------------------------------------------------------------------------------------
# Evaluation and samples
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, dataset: ChatDataset, batch_size: int, accelerator, pad_token_id: int) -> float:
    """Mean loss per trained (assistant) token over the held-out examples, shared out between processes.
    `model` is the unwrapped model (each process runs its own number of batches)."""
    was_training = model.training
    model.eval()
    device = accelerator.device
    total = torch.zeros((), device=device, dtype=torch.float64)
    count = torch.zeros((), device=device, dtype=torch.float64)
    order = np.argsort(dataset.lengths, kind="stable")[accelerator.process_index :: accelerator.num_processes]
    collate = ChatCollator(pad_token_id)
    for start in range(0, len(order), batch_size):
        batch = collate([dataset[int(i)] for i in order[start : start + batch_size]])
        n = trained_tokens(batch["labels"])
        if n == 0:
            continue
        with accelerator.autocast():
            ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
            loss = model(input_ids=ids, labels=labels, use_cache=False).loss
        total += loss.double() * n
        count += n
    total, count = accelerator.reduce(total, "sum"), accelerator.reduce(count, "sum")
    model.train(was_training)
    return float(total / count) if count > 0 else float("nan")


def sample_conversation(cfg: FinetuneConfig, prompt: str) -> list[dict]:
    """The conversation a sample prompt is asked as: the system prompt if set, then the prompt as a user message."""
    messages = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    return messages + [{"role": "user", "content": prompt}]


@torch.no_grad()
def generate_samples(model, tokenizer, cfg: FinetuneConfig, device) -> list[tuple[str, str]]:
    """Greedy replies to the sample prompts (each a one-message conversation, plus the system prompt if set). A
    prompt that fills the model's context is skipped, with a printed note (`sample_room`)."""
    was_training = model.training
    model.eval()
    out = []
    for prompt in cfg.sample_prompts:
        ids = prompt_ids(tokenizer, sample_conversation(cfg, prompt))
        room = sample_room(model, prompt, len(ids))  # (the prompt's tokens: in the chat template)
        if room == 0:
            continue
        x = torch.tensor([ids], device=device)
        y = model.generate(
            x,
            max_new_tokens=min(cfg.sample_tokens, room),
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        out.append((prompt, tokenizer.decode(y[0, len(ids) :], skip_special_tokens=True).strip()))
    model.train(was_training)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Finetuning
# ----------------------------------------------------------------------------------------------------------------


def load_chat_tokenizer(cfg: FinetuneConfig):
    """The tokenizer (`tokenizer`, else the one saved with `init_from`) with the chat template set."""
    from ..tokenizer_utils import load_tokenizer

    source = cfg.tokenizer or cfg.init_from
    choose = "set tokenizer: (e.g. builtin, or /path/to/llama2-tokenizer.model)"
    try:
        tokenizer = load_tokenizer(source)
    except (OSError, ValueError) as err:
        if cfg.tokenizer:
            raise
        raise ValueError(f"no usable tokenizer saved with init_from={cfg.init_from!r} ({err}); {choose}") from err
    if cfg.tokenizer:
        _check_same_pieces(cfg, tokenizer)
    try:
        return set_chat_template(tokenizer)
    except ValueError as err:  # e.g. a folder whose tokenizer_config.json (which names BOS and EOS) was lost
        if cfg.tokenizer:
            raise ValueError(f"tokenizer={cfg.tokenizer!r} cannot carry the chat format: {err}") from err
        raise ValueError(
            f"the tokenizer saved with init_from={cfg.init_from!r} cannot carry the chat format: {err} (is its "
            f"tokenizer_config.json missing or edited?); {choose}"
        ) from err


def _check_same_pieces(cfg: FinetuneConfig, tokenizer) -> None:
    """Raise ValueError where `tokenizer` (the `tokenizer` setting) gives one of the pieces of the tokenizer saved
    with init_from another id: the model learned its ids from that one, so every such id would mean another piece.
    A tokenizer that extends it (the same ids, more after them) or renames its added tokens passes; so does an
    init_from folder without a tokenizer of its own, or a Hub id that cannot be read offline (nothing to compare)."""
    from ..tokenizer_utils import check_saved_tokenizer_pieces

    check_saved_tokenizer_pieces(
        cfg.init_from,
        tokenizer,
        f"tokenizer={cfg.tokenizer!r} is not",
        "the ids the model learned would mean other text; leave tokenizer unset to finetune with the model's own",
    )


def finetune(cfg: FinetuneConfig) -> dict:
    """Run (or resume) a finetuning run. Returns {"losses": {step: loss}, "eval": {step: loss}, "perf": {step:
    metrics}, "data": counts, "tokens_seen": input positions, "trained_tokens": assistant tokens trained on,
    "overflow_steps": fp16 loss-scale overflows, "final_dir": <out_dir>/final or None when stopped early}. The run
    holds out_dir's lock throughout (`own_out_dir`: OutDirInUse if another run does)."""
    accelerator = make_accelerator(cfg)
    with own_out_dir(cfg.out_dir, accelerator.is_main_process):
        # the main process may have restored a checkpoint under its name (`own_out_dir`): every rank looks for the
        # checkpoint to resume after that
        accelerator.wait_for_everyone()
        return _finetune(cfg, accelerator)


def _finetune(cfg: FinetuneConfig, accelerator) -> dict:
    resume_from, run_id = begin_run(cfg, accelerator)
    model = load_saved_model(
        cfg.init_from, "init_from", check_generation=True
    )  # first: a model that cannot be had is the error to see
    tokenizer = load_chat_tokenizer(cfg)
    check_vocab(len(tokenizer), model.config.vocab_size)
    for i, prompt in enumerate(cfg.sample_prompts):  # rendered now, not first at the sample step after training
        try:
            prompt_ids(tokenizer, sample_conversation(cfg, prompt))
        except ValueError as err:
            raise ValueError(f"sample_prompts[{i}] cannot be a chat message: {err}") from None
    context = model.config.max_position_embeddings
    max_len = cfg.max_len or context
    if max_len > context:
        raise ValueError(f"max_len={max_len} exceeds the model's max_position_embeddings={context}")
    train_set, eval_set, data_stats = prepare_data(cfg, tokenizer, max_len)
    accelerator.print(_describe(data_stats))
    if len(train_set) == 0:
        raise ValueError(f"no training examples in {cfg.data!r}: {_why_no_training(data_stats)}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if cfg.packing:
        train_set = PackedChatDataset(train_set, max_len)
        data_stats["packed_rows"] = len(train_set)
        fill = train_set.lengths.sum() / (len(train_set) * max_len)
        accelerator.print(f"packed into {len(train_set)} rows of up to {max_len} tokens ({100 * fill:.0f}% filled)")
    loader = ChatBatchLoader(
        train_set,
        cfg.micro_batch_size,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        seed=cfg.seed,
        pad_token_id=pad_id,
        group_by_length=cfg.group_by_length,
        grad_accum=cfg.grad_accum,
    )

    def final(raw_model, final_dir: Path, history: dict, on_saved):
        raw_model.generation_config.eos_token_id = tokenizer.eos_token_id
        raw_model.generation_config.pad_token_id = pad_id
        # the tokenizer with the chat template (chat_template.jinja); the card counts the assistant tokens trained on
        save_final(
            raw_model, tokenizer, final_dir, cfg, history, tokens_seen=history["trained_tokens"], on_saved=on_saved
        )
        accelerator.print(f"saved {final_dir}; chat with: llamathink-chat {shlex.quote(str(final_dir))}")

    def samples(raw_model) -> list[str]:
        pairs = generate_samples(raw_model, tokenizer, cfg, accelerator.device)
        return [f"user: {prompt!r} -> assistant: {reply!r}" for prompt, reply in pairs]

    hooks = TrainingHooks(
        save_final=final,
        # the unwrapped model: each process runs its own number of held-out batches (no DDP collectives)
        evaluate=(lambda m: evaluate(accelerator.unwrap_model(m), eval_set, cfg.micro_batch_size, accelerator, pad_id))
        if len(eval_set)
        else None,
        eval_name="held-out assistant loss",
        samples=samples,
        extra_metrics=lambda: {"train/epoch": loader.epoch},
        summary={f"data/{k}": v for k, v in data_stats.items()},
    )
    return run_training(
        cfg,
        accelerator,
        model,
        loader,
        loader,
        hooks,
        resume_from=resume_from,
        run_id=run_id,
        history={"data": data_stats},
        settings_file="finetune_config.json",
        desc="finetune",
    )


def main(argv: list[str] | None = None) -> int:
    """`llamathink-finetune` / `finetune_chat.py`: --config YAML plus --key value overrides of any FinetuneConfig
    field (`llamathink.train.loop.command_main`: one-line errors, exit status 2 for bad settings)."""
    return command_main(
        argv,
        prog="llamathink-finetune",
        settings=FinetuneConfig,
        run=finetune,
        description="Chat-finetune LlamaThink (assistant-only loss). Settings come from --config (YAML, e.g. "
        "configuration/finetune/*.yaml) and --key value overrides of any FinetuneConfig field, e.g. --max_steps 100.",
    )


if __name__ == "__main__":
    sys.exit(main())
