"""The model card (``README.md``) written next to a finished model by ``llamathink.train.loop.save_final``.

The card states only what the run knows: the architecture and parameter count from the model, the training
settings from the run's config (``llamathink.train.pretrain.TrainConfig`` or ``llamathink.train.finetune.FinetuneConfig``), the tokens seen
and the last evaluation loss from the run's history, and how to load the folder. Its YAML header is Hugging
Face Hub model-card metadata (``huggingface_hub.ModelCardData``: license, library, pipeline tag, base model,
datasets), so the same file serves a local folder and a Hub repository. Nothing here needs the network.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

CARD_FILE = "README.md"
# A Hub repository id ("owner/name"); only such ids may go into the card's base_model / datasets metadata.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _hub_id(value: Any) -> str | None:
    """`value` when it names a Hub repository rather than a local path or a keyword ("sample"), else None."""
    if not isinstance(value, str) or not _HUB_ID.fullmatch(value) or Path(value).exists():
        return None
    return value


def _mixer_layout(mixer_types: list[str]) -> str:
    """``linear, linear, csa, full`` x 4 for a repeated pattern, else the whole list."""
    n = len(mixer_types)
    for period in range(1, n + 1):
        if n % period == 0 and mixer_types == mixer_types[:period] * (n // period):
            pattern = ", ".join(mixer_types[:period])
            return f"`{pattern}` x {n // period}" if n // period > 1 else f"`{pattern}`"
    return f"`{', '.join(mixer_types)}`"


def _count(n: int, noun: str) -> str:
    """``1 step``, ``3 steps``, ``2 micro-batches``."""
    return f"{n:,} {noun}" + ("" if n == 1 else "es" if noun.endswith(("ch", "sh", "s", "x")) else "s")


def _processes(history: dict | None) -> str:
    """``per process`` when the history does not say how many there were, ``on 1 process`` or ``per process, on 2
    processes`` when it does (``num_processes``, written by the training loop)."""
    n = (history or {}).get("num_processes")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        return "per process"
    return "on 1 process" if n == 1 else f"per process, on {n} processes"


def _last_eval(history: dict | None) -> tuple[int, float] | None:
    """(step, loss) of the last evaluation in a run history ({"eval": {step: loss}}; steps may be JSON strings)."""
    evals = (history or {}).get("eval") or {}
    if not evals:
        return None
    step = max(evals, key=int)
    return int(step), float(evals[step])


def _field(container: Any, key: str, kind: type) -> Any:
    """`container[key]` when `container` is a dict and the value is a `kind` (not a bool), else None."""
    value = container.get(key) if isinstance(container, dict) else None
    return value if isinstance(value, kind) and not isinstance(value, bool) else None


def _pretraining_data(cfg) -> tuple[str, list[str]]:
    """A sentence on the pretraining data (from the prepared folder's meta.json) and its Hub dataset ids."""
    meta_path = Path(cfg.data_dir) / "meta.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return f"token shards in `{cfg.data_dir}`", []
    # an edited or foreign meta.json must not break the end of a training run: fields of other types are left out
    source = _field(meta, "source", dict) or {}
    datasets: list[str] = []
    paths = _field(source, "paths", list) or []
    if source.get("type") == "hf" and _field(source, "name", str):
        config = _field(source, "config", str)
        what = f"the Hub dataset `{source['name']}`" + (f" ({config})" if config else "")
        if _hub_id(source["name"]):
            datasets.append(source["name"])
    elif source.get("type") == "local" and paths and all(isinstance(p, str) for p in paths):
        what = (
            "local files ("
            + ", ".join(f"`{Path(p).name}`" for p in paths[:5])
            + (", ..." if len(paths) > 5 else "")
            + ")"
        )
    else:
        what = "a prepared document collection"
    train = _field(meta, "train", dict) or {}
    counts = []
    if _field(train, "num_tokens", int):
        counts.append(f"{train['num_tokens']:,} training tokens")
    if _field(train, "num_docs", int):
        counts.append(f"{train['num_docs']:,} documents")
    detail = f" ({', '.join(counts)})" if counts else ""
    return f"{what}, tokenized whole documents in `{cfg.data_dir}`{detail}", datasets


def model_card_text(
    model, cfg, *, history: dict | None = None, tokens_seen: int | None = None, tokenizer=None, name: str | None = None
) -> str:
    """The model card (Markdown with a YAML metadata header) for a finished LlamaThink run.

    Args:
        model: the trained ``LlamaThinkForCausalLM``; its config gives the architecture, its parameters the count
            (shared tensors, e.g. tied embeddings, counted once).
        cfg: the run's settings: a ``llamathink.train.pretrain.TrainConfig`` (pretraining: has ``data_dir``) or a
            ``llamathink.train.finetune.FinetuneConfig`` (chat finetuning: has ``data`` and ``init_from``).
        history: the run history, ``{"losses": {step: loss}, "eval": {step: loss}}`` (finetuning adds ``"data"``,
            the conversation counts; the training loop adds ``"num_processes"``); the last step trained, the last
            evaluation loss and the number of processes come from it. None: the card says they are not known.
        tokens_seen: tokens consumed by the run (pretraining: every input token; finetuning: the assistant tokens
            the loss was taken on). None: not stated.
        tokenizer: the saved tokenizer, if any (vocabulary size and whether it carries a chat template).
        name: the card's title; default ``cfg.hub_model_id`` or the run's output folder name.

    Returns:
        The card text, ready to be written as ``README.md``.
    """
    from huggingface_hub import ModelCardData

    from llamathink import __version__

    config = model.config
    params = sum(p.numel() for p in model.parameters())
    finetune = hasattr(cfg, "data") and not hasattr(cfg, "data_dir")
    name = name or getattr(cfg, "hub_model_id", None) or Path(cfg.out_dir).name
    if "llamathink" not in name.lower():
        name = f"LlamaThink ({name})"
    losses = (history or {}).get("losses") or {}
    steps = max((int(s) for s in losses), default=cfg.max_steps)
    last_eval = _last_eval(history)
    chat = tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))

    if finetune:
        base_model = _hub_id(cfg.init_from)
        datasets = list(dict.fromkeys(d for d in [_hub_id(cfg.data), _hub_id(getattr(cfg, "eval_data", None))] if d))
        data = (
            "the conversations bundled with LlamaThink (`llamathink/sample_data/conversations.jsonl`)"
            if cfg.data == "sample"
            else f"conversations from `{cfg.data}`"
        )
        counts = (history or {}).get("data") or {}  # llamathink.train.finetune.prepare_data's counts
        if "train_conversations" in counts and "eval_conversations" in counts:
            data += (
                f": {int(counts['train_conversations']):,} for training, {int(counts['eval_conversations']):,} held out"
            )
        origin = f"Chat-finetuned from `{cfg.init_from}` with `finetune_chat.py` (loss on assistant tokens only)"
        batch = f"{_count(cfg.micro_batch_size, 'conversation')} x {_count(cfg.grad_accum, 'micro-batch')}"
        if getattr(cfg, "packing", False):  # each row holds several conversations, each attended alone
            rows, conversations = counts.get("packed_rows"), counts.get("train_conversations")
            per_row = f", {conversations / rows:.1f} conversations a row on average" if rows and conversations else ""
            batch = (
                f"{_count(cfg.micro_batch_size, 'packed row')} (conversations packed up to "
                f"{cfg.max_len or 'the context'} tokens{per_row}) x {_count(cfg.grad_accum, 'micro-batch')}"
            )
        eval_what = "held-out assistant loss (cross-entropy, nats per token)"
        tokens_what = "assistant tokens trained on"
    else:
        base_model = _hub_id(getattr(cfg, "init_from", None))
        data, datasets = _pretraining_data(cfg)
        origin = "Pretrained" + (f" from `{cfg.init_from}`" if getattr(cfg, "init_from", None) else " from scratch")
        origin += " with `train_hf.py` (next-token prediction)"
        batch = (
            f"{_count(cfg.micro_batch_size, 'sequence')} of {cfg.seq_len} tokens x "
            f"{_count(cfg.grad_accum, 'micro-batch')}"
        )
        eval_what = "validation loss on the held-out shard (cross-entropy, nats per token)"
        tokens_what = "training tokens seen"

    metadata = ModelCardData(
        license="mit",
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["llamathink", "gated-deltanet", "hybrid-attention", "custom_code"] + (["chat"] if finetune else []),
        base_model=base_model,
        datasets=datasets or None,
    )
    if cfg.optimizer == "muon":
        optimizer = (
            f"Muon (lr {cfg.muon_lr}) for hidden weight matrices, AdamW (lr {cfg.adamw_lr}, betas "
            f"{tuple(cfg.adamw_betas)}) for embeddings, norms, gates, conv and scalars"
        )
    else:
        optimizer = f"AdamW (lr {cfg.adamw_lr}, betas {tuple(cfg.adamw_betas)})"
    rows = [
        ("parameters", f"{params:,}" + (" (input and output embeddings tied)" if config.tie_word_embeddings else "")),
        (
            "hidden size / layers",
            f"{config.hidden_size} / {config.num_hidden_layers}, mixers {_mixer_layout(config.mixer_types)}",
        ),
        ("mixers", "`linear`: Gated DeltaNet; `csa`: compressed sparse attention; `full`: gated full attention"),
        (
            "attention heads",
            f"{config.num_attention_heads} query, {config.num_key_value_heads} key/value, head_dim {config.head_dim}",
        ),
        ("MLP", f"SwiGLU, {config.intermediate_size}"),
        ("vocabulary / context", f"{config.vocab_size} / {config.max_position_embeddings} tokens"),
    ]
    training = [
        ("run", origin),
        ("data", data),
        ("steps", f"{_count(steps, 'optimizer step')}, each of {batch} {_processes(history)}"),
        (tokens_what, f"{int(tokens_seen):,}" if tokens_seen is not None else "not recorded"),
        ("final " + eval_what, f"{last_eval[1]:.4f} at step {last_eval[0]:,}" if last_eval else "not measured"),
        ("optimizer", optimizer),
        (
            "schedule",
            f"linear warmup over {_count(cfg.warmup_steps, 'step')}, cosine decay to {cfg.min_lr_ratio:g} "
            f"x the peak learning rate; weight decay {cfg.weight_decay:g}; gradient clip {cfg.grad_clip:g}",
        ),
        ("precision / seed", f"{cfg.mixed_precision} / {cfg.seed}"),
    ]

    def cell(text) -> str:  # a "|" ends a Markdown table cell even inside backticks; a newline ends the row
        return " ".join(str(text).split("\n")).replace("|", "\\|")

    def table(pairs):
        return "| | |\n|---|---|\n" + "\n".join(f"| {cell(k)} | {cell(v)} |" for k, v in pairs)

    if chat:
        example = (
            'messages = [{"role": "user", "content": "Why is the sky blue?"}]\n'
            'inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",\n'
            "                                       return_dict=True)\n"
            "out = model.generate(**inputs, max_new_tokens=64, do_sample=True, temperature=0.7, top_p=0.9)\n"
            'print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))'
        )
    else:
        example = (
            'inputs = tokenizer("The history of", return_tensors="pt")\n'
            "out = model.generate(**inputs, max_new_tokens=64, do_sample=True, temperature=0.8, top_p=0.9)\n"
            "print(tokenizer.decode(out[0], skip_special_tokens=True))"
        )
    body = f"""
# {name}

A LlamaThink language model: a hybrid of Gated DeltaNet linear attention, compressed sparse attention and gated
full attention with hyper-connections, {params:,} parameters. {origin}, LlamaThink {__version__}.

## Architecture

{table(rows)}

## Training

{table(training)}

## Use

The folder carries the model's code (`configuration_llamathink.py`, `modeling_llamathink.py`,
`kernels_llamathink.py`); transformers runs it only with `trust_remote_code=True` (read it first). With the
`llamathink` package installed, `import llamathink` registers the classes and `trust_remote_code` is not needed.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO", trust_remote_code=True)
{example}
```

The tokenizer pads on the left (batched generation needs left padding: the recurrent and convolution state must
end at each row's last real token) and its `model_max_length` is the context, {config.max_position_embeddings}
tokens; longer inputs raise a `ValueError` in the model.{" Chat turns use the tokenizer's `chat_template`." if chat else ""}

## Intended use and limitations

For research and teaching on small hybrid-attention language models. At this size the model often states wrong
facts, loses track of long contexts and repeats itself; it reproduces the style and biases of its training data
and has had no safety tuning. Do not use its output where correctness or harm matters. The recurrent state cannot
be rolled back, so assisted (speculative) decoding is not supported.

## License

MIT (the LlamaThink code and these weights). The training data keeps its own license and terms.
"""
    return f"---\n{metadata.to_yaml()}\n---\n{body}"


def write_model_card(save_dir: str | Path, model, cfg, **kwargs) -> Path:
    """Write :func:`model_card_text` (same arguments after `save_dir`) to ``save_dir/README.md``; returns its path."""
    path = Path(save_dir) / CARD_FILE
    path.write_text(model_card_text(model, cfg, **kwargs), encoding="utf-8")
    return path
