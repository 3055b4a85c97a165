"""Chat finetuning of a pretrained LlamaThink model (assistant-only loss) with accelerate and Muon or AdamW.

    accelerate launch [--config_file accelerate_configs/...] finetune_chat.py \
        --config configuration/finetune/<preset>.yaml [--key value ...]

The conversation format, the label mask (-100 everywhere except assistant contents and their EOS) and the
truncation rule are in `llamathink/chat.py`. This file: the run settings (`FinetuneConfig`, a YAML file plus
`--key value` overrides), the data (conversations -> examples, a held-out share for evaluation), a resumable batch
loader, evaluation, and the loop (`finetune`). From `train_hf.py` it reuses the settings shared with pretraining
(`RunConfig`) and the optimizer, schedule, checkpoint, non-finite-step and final-save functions. The model starts
from a `save_pretrained` directory or Hub id (`init_from`); the result, `<out_dir>/final`, is a `save_pretrained`
checkpoint whose tokenizer carries the chat template, ready for `llamathink-chat <out_dir>/final`.

Loss: the mean cross-entropy over all trained (assistant) tokens of an optimizer step - every token weighs the
same whatever the length of its conversation, over micro-batches and processes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llamathink import LlamaThinkForCausalLM
from llamathink.chat import ChatCollator, ChatDataset, build_examples, load_conversations, prompt_ids, set_chat_template
from llamathink.data import check_vocab
import train_hf
from train_hf import (
    RunConfig,
    StepCounters,
    _init_wandb,
    build_optimizer,
    checkpoint_meta,
    claim_checkpoints,
    load_checkpoint,  # noqa: F401 (re-exported: tests read finetuning checkpoints through finetune_chat)
    lr_factor,
    make_accelerator,
    optimizer_step,
    own_out_dir,
    resolve_resume,
    restore_checkpoint,
    save_checkpoint,
    save_final,
)

# ----------------------------------------------------------------------------------------------------------------
# Run settings
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class FinetuneConfig(RunConfig):
    """Chat finetuning: the pretrained model and the conversations, plus the shared settings of train_hf.py's
    `RunConfig`, some of them with finetuning defaults (below)."""

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
    sample_prompts: list[str] = field(default_factory=lambda: ["Hi! Can you recommend something to read?",
                                                               "Why is the sky blue?"])  # fmt: skip
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
        if self.data_format not in ("auto", "messages", "sharegpt", "person"):
            raise ValueError(f"data_format must be auto, messages, sharegpt or person, got {self.data_format!r}")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")


def load_config(path: str | None = None, overrides: list[str] | None = None) -> FinetuneConfig:
    """A `FinetuneConfig` from a YAML file (`path`) and `--key value` / `--key=value` overrides (the parser of
    train_hf.py; unknown keys are an error naming the key and the file)."""
    return train_hf.load_config(path, overrides, cls=FinetuneConfig)


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


def split_held_out(conversations: list, fraction: float, seed: int, max_eval: int | None = None) -> tuple[list, list]:
    """(train, held-out): a random `fraction` of the conversations (at least one when fraction > 0 and there are two
    or more, at most `max_eval`), chosen by `seed`; both keep the original order."""
    n = len(conversations)
    n_eval = 0
    if fraction > 0 and n >= 2:
        n_eval = min(max(1, round(n * fraction)), n - 1, max_eval or n)
    held = set(np.random.default_rng(seed).permutation(n)[:n_eval].tolist())
    return ([c for i, c in enumerate(conversations) if i not in held],
            [c for i, c in enumerate(conversations) if i in held])  # fmt: skip


def prepare_data(cfg: FinetuneConfig, tokenizer, max_len: int) -> tuple[ChatDataset, ChatDataset, dict]:
    """Training and held-out examples, and counts of what was read, kept, truncated and skipped."""
    read = Counter()
    conversations = load_conversations(cfg.data, split=cfg.data_split, data_format=cfg.data_format,
                                       config_name=cfg.data_config, limit=cfg.max_conversations,
                                       stats=read)  # fmt: skip
    if cfg.eval_data:
        train_convs = conversations
        eval_convs = load_conversations(cfg.eval_data, split=cfg.eval_split, data_format=cfg.data_format,
                                        config_name=cfg.data_config, limit=cfg.max_eval_conversations,
                                        stats=read)  # fmt: skip
    else:
        train_convs, eval_convs = split_held_out(conversations, cfg.eval_fraction, cfg.seed, cfg.max_eval_conversations)
    train_stats, eval_stats = Counter(), Counter()
    train = build_examples(tokenizer, train_convs, max_len, system_prompt=cfg.system_prompt, stats=train_stats)
    held = build_examples(tokenizer, eval_convs, max_len, system_prompt=cfg.system_prompt, stats=eval_stats)
    stats = {"invalid_rows": read["invalid"], "train_conversations": len(train_convs),
             "eval_conversations": len(eval_convs), "train": dict(train_stats), "eval": dict(eval_stats),
             "train_trained_tokens": train.num_trained_tokens(), "train_tokens": int(train.lengths.sum())}  # fmt: skip
    return train, held, stats


def _describe(stats: dict) -> str:
    t, e = stats["train"], stats["eval"]
    return (f"conversations: {stats['train_conversations']} train, {stats['eval_conversations']} held out, "
            f"{stats['invalid_rows']} invalid rows skipped; train examples: {t.get('kept', 0)} kept "
            f"({t.get('truncated', 0)} truncated at a turn), {t.get('too_long', 0)} dropped as too long, "
            f"{t.get('no_assistant', 0)} skipped with nothing to learn; held-out examples: {e.get('kept', 0)}; "
            f"{stats['train_trained_tokens']:,} of {stats['train_tokens']:,} training tokens are "
            "trained on")  # fmt: skip


class ChatBatchLoader:
    """Endless right-padded batches of a `ChatDataset`, epoch after epoch, in an order fixed by (seed, epoch).

    Each optimizer micro-step takes one global batch of micro_batch_size x world_size examples (the last partial
    one of an epoch is skipped; the next epoch reshuffles); process `rank` gets its slice. With `group_by_length`,
    examples are sorted by length within windows of 32 global batches before batching, and the batches are then
    shuffled. `state_dict()` / `load_state_dict()` make the sequence resumable exactly."""

    def __init__(self, dataset: ChatDataset, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 pad_token_id: int = 0, group_by_length: bool = True):  # fmt: skip
        self.dataset, self.batch_size, self.rank, self.world_size = dataset, batch_size, rank, world_size
        self.seed, self.group_by_length = seed, group_by_length
        self.global_batch = batch_size * world_size
        if len(dataset) < self.global_batch:
            raise ValueError(f"{len(dataset)} training examples are fewer than one global batch "
                             f"({batch_size} x {world_size} processes); lower micro_batch_size")  # fmt: skip
        self.collate = ChatCollator(pad_token_id)
        self.epoch, self.position = 0, 0
        self._plan: tuple[int, list[np.ndarray]] | None = None

    def _batches(self, epoch: int) -> list[np.ndarray]:
        if self._plan is None or self._plan[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            n, gb = len(self.dataset), self.global_batch
            order = rng.permutation(n)
            nb = n // gb
            if self.group_by_length:
                lengths = self.dataset.lengths
                window = gb * 32
                order = np.concatenate([chunk[np.argsort(-lengths[chunk], kind="stable")]
                                        for chunk in np.array_split(order, range(window, n, window))])  # fmt: skip
                batches = [order[i * gb : (i + 1) * gb] for i in range(nb)]
                batches = [batches[i] for i in rng.permutation(nb)]
            else:
                batches = [order[i * gb : (i + 1) * gb] for i in range(nb)]
            self._plan = (epoch, batches)
        return self._plan[1]

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batches = self._batches(self.epoch)
        if self.position >= len(batches):
            self.epoch, self.position = self.epoch + 1, 0
            batches = self._batches(self.epoch)
        rows = batches[self.position][self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        self.position += 1
        return self.collate([self.dataset[int(i)] for i in rows])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "size": len(self.dataset),
                "global_batch": self.global_batch, "group_by_length": self.group_by_length}  # fmt: skip

    def load_state_dict(self, state: dict):
        mine = self.state_dict()
        for key in ("seed", "size", "global_batch", "group_by_length"):
            if state.get(key) != mine[key]:
                raise ValueError(f"cannot resume the data position: {key} was {state.get(key)!r} in the checkpoint "
                                 f"and is {mine[key]!r} now (the data or batch settings changed)")  # fmt: skip
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or position < 0:  # a negative position would index the epoch's batches from the end
            raise ValueError(f"cannot resume the data position: epoch {epoch}, position {position} in the "
                             "checkpoint are not valid counts")  # fmt: skip
        self.epoch, self.position = epoch, position


def trained_tokens(labels: torch.Tensor) -> int:
    """Tokens the loss counts: labels after the causal shift that are not -100."""
    return int((labels[:, 1:] != -100).sum())


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


@torch.no_grad()
def generate_samples(model, tokenizer, cfg: FinetuneConfig, device) -> list[tuple[str, str]]:
    """Greedy replies to the sample prompts (each a one-message conversation, plus the system prompt if set)."""
    was_training = model.training
    model.eval()
    out = []
    for prompt in cfg.sample_prompts:
        messages = ([{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else [])
        ids = prompt_ids(tokenizer, messages + [{"role": "user", "content": prompt}])
        room = model.config.max_position_embeddings - len(ids)
        if room <= 0:
            continue
        x = torch.tensor([ids], device=device)
        y = model.generate(x, max_new_tokens=min(cfg.sample_tokens, room), do_sample=False,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        out.append((prompt, tokenizer.decode(y[0, len(ids) :], skip_special_tokens=True).strip()))
    model.train(was_training)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Finetuning
# ----------------------------------------------------------------------------------------------------------------


def load_chat_tokenizer(cfg: FinetuneConfig):
    """The tokenizer (`tokenizer`, else the one saved with `init_from`) with the chat template set."""
    from llamathink.tokenizer_utils import load_tokenizer

    source = cfg.tokenizer or cfg.init_from
    try:
        tokenizer = load_tokenizer(source)
    except (OSError, ValueError) as err:
        if cfg.tokenizer:
            raise
        raise ValueError(f"no usable tokenizer saved with init_from={cfg.init_from!r} ({err}); set tokenizer: "
                         "(e.g. builtin, or /path/to/llama2-tokenizer.model)") from err  # fmt: skip
    return set_chat_template(tokenizer)


def finetune(cfg: FinetuneConfig) -> dict:
    """Run (or resume) a finetuning run. Returns {"losses": {step: loss}, "eval": {step: loss}, "data": counts,
    "overflow_steps": fp16 loss-scale overflows, "final_dir": <out_dir>/final or None when stopped early}. The run
    holds out_dir's lock throughout (train_hf.own_out_dir: OutDirInUse if another run does)."""
    accelerator = make_accelerator(cfg)
    with own_out_dir(cfg.out_dir, accelerator.is_main_process):
        return _finetune(cfg, accelerator)


def _finetune(cfg: FinetuneConfig, accelerator) -> dict:
    is_main = accelerator.is_main_process
    out_dir = Path(cfg.out_dir)
    resume_from = resolve_resume(cfg)
    saved_run_id = checkpoint_meta(resume_from)["run_id"] if resume_from is not None else None
    run_id = claim_checkpoints(cfg, resume_from, saved_run_id, is_main)

    # --- tokenizer, model, data -----------------------------------------------------------------------------
    tokenizer = load_chat_tokenizer(cfg)
    model = LlamaThinkForCausalLM.from_pretrained(cfg.init_from, dtype=torch.float32)
    check_vocab(len(tokenizer), model.config.vocab_size)
    context = model.config.max_position_embeddings
    max_len = cfg.max_len or context
    if max_len > context:
        raise ValueError(f"max_len={max_len} exceeds the model's max_position_embeddings={context}")
    train_set, eval_set, data_stats = prepare_data(cfg, tokenizer, max_len)
    accelerator.print(_describe(data_stats))
    if len(train_set) == 0:
        raise ValueError(f"no training examples in {cfg.data!r} ({data_stats})")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    loader = ChatBatchLoader(train_set, cfg.micro_batch_size, rank=accelerator.process_index,
                             world_size=accelerator.num_processes, seed=cfg.seed, pad_token_id=pad_id,
                             group_by_length=cfg.group_by_length)  # fmt: skip
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))

    start_step, wandb_id = 0, None
    history: dict[str, Any] = {"losses": {}, "eval": {}}
    counters = StepCounters()
    if resume_from is not None:
        state = restore_checkpoint(resume_from, model, optimizer, scheduler, loader, cfg,
                                   world_size=accelerator.num_processes, log=accelerator.print)  # fmt: skip
        start_step, wandb_id = state["step"], state.get("wandb_run_id")
        history = state.get("history", history)
        counters.overflows = int(state.get("overflow_steps", 0))
        accelerator.print(f"resumed from {resume_from} at step {start_step}")
    else:
        torch.manual_seed(cfg.seed)
    if is_main:  # only once a resume is accepted: a refused one must not replace the run's record of its settings
        (out_dir / "finetune_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    history["data"] = data_stats

    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    run = _init_wandb(cfg, wandb_id) if is_main else None
    if run is not None and resume_from is None:
        run.summary.update({f"data/{k}": v for k, v in data_stats.items() if not isinstance(v, dict)})
    world = accelerator.num_processes
    has_eval = len(eval_set) > 0

    def run_eval(step: int):
        val = evaluate(raw_model, eval_set, cfg.micro_batch_size, accelerator, pad_id)
        history["eval"][step] = val
        accelerator.print(f"step {step}: held-out assistant loss {val:.4f}")
        if run is not None:
            run.log({"eval/loss": val}, step=step)

    if has_eval and cfg.eval_at_start and resume_from is None:
        run_eval(0)

    progress = None
    if is_main and cfg.progress_bar:
        from tqdm.auto import tqdm

        progress = tqdm(total=cfg.max_steps, initial=start_step, desc="finetune", dynamic_ncols=True)

    model.train()
    step = start_step
    end_step = min(cfg.max_steps, cfg.stop_at_step or cfg.max_steps)
    t_last, tokens_last, tokens_seen = time.perf_counter(), 0, 0
    while step < end_step:
        # --- one optimizer step: grad_accum micro-batches, every trained token weighted alike -----------------
        batches = [next(loader) for _ in range(cfg.grad_accum)]
        counts = [trained_tokens(b["labels"]) for b in batches]
        n_step = accelerator.reduce(torch.tensor(float(sum(counts)), device=accelerator.device), "sum")
        loss_sum = torch.zeros((), device=accelerator.device)
        for micro, (batch, n) in enumerate(zip(batches, counts)):
            input_ids, labels = batch["input_ids"].to(accelerator.device), batch["labels"].to(accelerator.device)
            sync = micro == cfg.grad_accum - 1
            ctx = accelerator.no_sync(model) if not sync and world > 1 else contextlib.nullcontext()
            # right padding and causal mixers: padding never reaches a real token, so no attention_mask is needed
            with ctx, accelerator.autocast():
                loss = model(input_ids=input_ids, labels=labels, use_cache=False).loss if n > 0 else None
                if loss is None:  # nothing trained in this slice (cannot happen with build_examples' data)
                    loss = sum(p.sum() for p in model.parameters()) * 0.0
                accelerator.backward(loss * (n * world / n_step))  # DDP averages over processes
            loss_sum += loss.detach().float() * n
        loss_value = float(accelerator.reduce(loss_sum, "sum") / n_step)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)  # unscales fp16 gradients
        if not optimizer_step(cfg, step, loss_value, grad_norm, optimizer, accelerator, counters, accelerator.scaler):
            continue  # the data position advanced; the step counter did not
        scheduler.step()
        step += 1
        tokens_seen += int(n_step)
        history["losses"][step] = loss_value

        if step % cfg.log_every == 0 or step == cfg.max_steps:
            now = time.perf_counter()
            tok_s = (tokens_seen - tokens_last) / max(now - t_last, 1e-9)
            metrics = {"train/loss": loss_value, "train/lr": scheduler.get_last_lr()[0],
                       "train/grad_norm": float(grad_norm), "train/epoch": loader.epoch,
                       "perf/trained_tokens_per_s": tok_s, "train/overflow_steps": counters.overflows}  # fmt: skip
            if run is not None:
                run.log(metrics, step=step)
            if progress is not None:
                progress.set_postfix(loss=f"{loss_value:.3f}", epoch=loader.epoch)
            elif is_main:
                accelerator.print(f"step {step}: loss {loss_value:.4f}, lr {metrics['train/lr']:.2e}")
            t_last, tokens_last = now, tokens_seen
        if progress is not None:
            progress.update(1)

        if has_eval and (step % cfg.eval_every == 0 or step == cfg.max_steps):
            run_eval(step)
        if is_main and step % cfg.sample_every == 0:
            for prompt, reply in generate_samples(raw_model, tokenizer, cfg, accelerator.device):
                accelerator.print(f"[sample] user: {prompt!r} -> assistant: {reply!r}")
        if step % cfg.save_every == 0 or step == end_step:
            accelerator.wait_for_everyone()
            if is_main:
                extra = {"history": history, "config": dataclasses.asdict(cfg),
                         "wandb_run_id": run.id if run is not None else wandb_id, "run_id": run_id,
                         "overflow_steps": counters.overflows}  # fmt: skip
                save_checkpoint(cfg.out_dir, step, raw_model, optimizer, scheduler, loader, extra, cfg.keep_last,
                                run_id=run_id, world_size=world)  # fmt: skip
            accelerator.wait_for_everyone()
        if step % cfg.eval_every == 0 or step % cfg.save_every == 0:
            t_last, tokens_last = time.perf_counter(), tokens_seen

    if progress is not None:
        progress.close()
    final_dir = out_dir / "final"
    if is_main and step == cfg.max_steps:
        raw_model.generation_config.eos_token_id = tokenizer.eos_token_id
        raw_model.generation_config.pad_token_id = pad_id
        # the tokenizer with the chat template (chat_template.jinja); tokens_seen restarts at 0 on resume, so a
        # resumed run's card leaves the count out rather than understate it
        save_final(raw_model, tokenizer, final_dir, cfg, history,
                   tokens_seen=tokens_seen if resume_from is None else None)
        accelerator.print(f"saved {final_dir}; chat with: llamathink-chat {final_dir}")
    if run is not None:
        run.finish()
    accelerator.wait_for_everyone()
    history["final_dir"] = str(final_dir) if step == cfg.max_steps else None
    history["overflow_steps"] = counters.overflows
    return history


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Chat-finetune LlamaThink (assistant-only loss). Settings come from --config (YAML) and --key "
        "value overrides of any FinetuneConfig field, e.g. --max_steps 100 --optimizer adamw.",
    )
    parser.add_argument("--config", help="YAML file of FinetuneConfig settings (configuration/finetune/*.yaml)")
    args, overrides = parser.parse_known_args(argv)
    cfg = load_config(args.config, overrides)
    finetune(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
