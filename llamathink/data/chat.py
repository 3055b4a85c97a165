"""Chat finetuning data: conversations from files or ``datasets`` sources, tokenized examples with an
assistant-only label mask, and the batches chat finetuning (:mod:`llamathink.train.finetune`) trains on.

The conversation format itself (markers, template, tokenization with content kept as text) is
:mod:`llamathink.chat_format`; every example here is token for token that format's ``apply_chat_template``.

Labels, truncation, skipping
----------------------------

:func:`build_example` tokenizes a conversation exactly as ``apply_chat_template`` does (same ids) and sets the
labels to -100 everywhere except the tokens of each assistant content and its EOS. Positions are not shifted
(``labels[i]`` is ``input_ids[i]`` or -100; the model shifts inside, as Hugging Face causal LMs do).

* An assistant message with ``"weight": 0`` (OpenAI's fine-tuning format) stays in the conversation as context
  but is not trained (its labels are -100); ``"weight": 1`` is the default.
* Nothing to learn: a conversation without a trained assistant message is skipped (counted as ``no_assistant``).
* Too long (``max_len`` tokens): the conversation is cut at a message boundary, keeping the longest run of whole
  messages from the start that ends with a trained assistant message and fits (counted as ``truncated``); if even
  the first one ends past ``max_len`` the conversation is dropped (``too_long``). Messages after the last trained
  assistant message are never kept (they would carry no labels). A truncated example is token for token
  ``apply_chat_template`` of the kept messages.

Data formats
------------

:func:`load_conversations` reads JSONL (or any ``datasets`` source: a Hub id, a ``save_to_disk`` directory,
JSON/Parquet/CSV files) in these row formats, detected per row:

* ``{"messages": [{"role": "user", "content": "..."}, ...]}`` - the common chat format (``content`` may also be a
  list of ``{"type": "text", "text": ...}`` parts); roles ``system``/``user``/``assistant`` (``human``, ``gpt``,
  ``bot``, ``model`` are accepted as aliases);
* ``{"conversations": [{"from": "human", "value": "..."}, ...]}`` - ShareGPT;
* ``{"conversation": "<person1> ... <person2> ..."}`` - the original project's format: ``<person1>`` is the user,
  ``<person2>`` the assistant, and whoever speaks first stays first. Turns may be separated by blank lines,
  single newlines or nothing at all (run on in one line).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, NamedTuple, Sequence

import numpy as np

from ..chat_format import (
    RenderedChat,
    check_chat_tokenizer,
    check_content,
    encode_rendered,
    is_trained,
    max_fitting_chars,
    normalize_messages,
    render_chat,
)
from .shards import saved_count

if TYPE_CHECKING:
    import torch

# ---------------------------------------------------------------------------------------------------------------
# Conversations: formats and loading
# ---------------------------------------------------------------------------------------------------------------

PERSON_ROLES = {"1": "user", "2": "assistant"}
_PERSON_TAG = re.compile(r"<person([12])>")


def parse_person_conversation(text: str) -> list[dict]:
    """``"<person1> hi <person2> hello"`` -> ``[{"role": "user", ...}, {"role": "assistant", ...}]``.

    person1 is the user, person2 the assistant; the order of turns (whoever speaks first) is kept. Turns may be
    separated by blank lines, newlines or only spaces. Text before the first tag is an error."""
    if not isinstance(text, str):
        raise ValueError(f"conversation must be a string, got {type(text).__name__}")
    pieces = _PERSON_TAG.split(text)
    if len(pieces) < 3:
        raise ValueError("no <person1>/<person2> tags in the conversation")
    if pieces[0].strip():
        raise ValueError(f"text before the first <personN> tag: {pieces[0].strip()[:40]!r}")
    messages = [{"role": PERSON_ROLES[pieces[i]], "content": pieces[i + 1].strip()} for i in range(1, len(pieces), 2)]
    for i, message in enumerate(messages):
        check_content(i, message["content"])
    return messages


def _json_kind(value) -> str:
    """The JSON name of a parsed value's type ("string", "number", "null", ...)."""
    kinds = {str: "string", bool: "boolean", int: "number", float: "number", list: "array", dict: "object"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def row_to_messages(row: dict, data_format: str = "auto") -> list[dict]:
    """One dataset row as a list of messages. ``data_format``: ``auto`` (by the row's keys: the first of messages,
    conversations, conversation that is not null), ``messages``, ``sharegpt`` or ``person``. Raises ValueError for a
    row that is not a JSON object or does not hold messages."""
    if not isinstance(row, Mapping):
        raise ValueError(f"row is a JSON {_json_kind(row)}, not an object with a messages list")  # noqa: TRY004
    if data_format == "auto":
        # A null key counts as absent: datasets reads a .json/.parquet file of mixed formats as one table, and
        # fills each row's missing columns with null (a ShareGPT row gains "messages": null)
        found = [key for key in ("messages", "conversations", "conversation") if row.get(key) is not None]
        if not found:
            raise ValueError(
                f"row has none of the keys messages, conversations, conversation (that is not null): {sorted(row)}"
            )
        data_format = {"messages": "messages", "conversations": "sharegpt", "conversation": "person"}[found[0]]
    if data_format == "messages":
        messages = normalize_messages(row["messages"])
    elif data_format == "sharegpt":
        messages = normalize_messages(row["conversations"])
    elif data_format == "person":
        messages = parse_person_conversation(row["conversation"])
    else:
        raise ValueError(f"unknown data_format {data_format!r}; use auto, messages, sharegpt or person")
    for i, message in enumerate(messages):
        # the template strips content: a blank reply would train the model to end its turn at once
        if message["role"] == "assistant" and not message["content"].strip():
            raise ValueError(f"message {i}: the assistant's reply is empty (or only whitespace)")
    # a blank system message says nothing, and would render an empty system block that chat never writes
    return [m for m in messages if m["role"] != "system" or m["content"].strip()]


def sample_conversations_path() -> Path:
    """The bundled sample conversations (``llamathink/sample_data/conversations.jsonl``; ``source="sample"``)."""
    from llamathink.tokenizer_utils import sample_data_path

    return sample_data_path("conversations.jsonl")


def _jsonl_rows(path: Path) -> Iterable:
    """The records of a .jsonl file, or ValueError naming the file and line of the first that is not UTF-8 text or
    not JSON. Bad bytes become lone surrogates, found line by line so that the error names the line (universal
    newlines); utf-8-sig: a byte-order mark before the first record (Windows editors write one) is dropped."""
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:
        for lineno, line in enumerate(f, 1):
            try:
                line.encode("utf-8")
            except UnicodeEncodeError as err:
                bad = line[err.start].encode("utf-8", "surrogateescape")
                raise ValueError(f"{path}:{lineno}: not UTF-8 text (byte {bad!r} at column {err.start + 1})") from None
            if line.strip():
                try:
                    yield json.loads(line)
                except (ValueError, RecursionError) as err:  # (also >4300-digit numbers, too deep nesting)
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({err})") from None


def _folder_problem(path: Path) -> str | None:
    """Why `datasets` could not read the .jsonl files of the folder `path` as one table, where our reader can tell:
    "<file>:<line>: ..." for a line that is not UTF-8 or JSON, or for a record that is not a JSON object (a
    folder's rows form one table: every row must be an object). None where none of its .jsonl files shows it."""
    for file in sorted(path.rglob("*.jsonl")):
        try:
            for lineno, row in enumerate(_jsonl_rows(file), 1):
                if not isinstance(row, dict):
                    return (
                        f"{file}: record {lineno} is a JSON {_json_kind(row)}, not an object (the rows of a folder are "
                        "read as one table; give the file itself to have such rows skipped and counted)"
                    )
        except ValueError as err:
            return str(err)
    return None


def _iter_rows(source: str, split: str, config_name: str | None) -> Iterable[dict]:
    path = Path(source).expanduser()
    if source == "sample":
        path = sample_conversations_path()
    if path.is_file() and path.name.endswith(".jsonl"):
        yield from _jsonl_rows(path)
        return
    import datasets

    if path.is_file():
        kind = {".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(path.suffix)
        if kind is None:
            raise ValueError(f"{path}: unsupported file type (use .jsonl, .json, .parquet or .csv)")
        try:
            ds = datasets.load_dataset(kind, data_files=str(path), split="train")
        except (datasets.exceptions.DatasetGenerationError, ValueError, OSError) as err:  # a parse error, wrapped
            cause = err.__cause__ or err
            raise ValueError(f"{path}: cannot be read as {kind} ({type(cause).__name__}: {cause})") from None
    elif path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"{path}: no split {split!r} (splits: {', '.join(ds)})")
            ds = ds[split]
    else:  # a dataset directory with data files, or a Hub id
        if not path.exists() and (
            path.suffix in (".jsonl", ".json", ".parquet", ".csv") or source.startswith((".", "/", "~"))
        ):
            raise ValueError(f"{source}: no such file (a local path; a Hub dataset id has no file extension)")
        try:
            ds = datasets.load_dataset(str(path) if path.is_dir() else source, config_name, split=split)
        except Exception as err:  # noqa: BLE001  (a parse error, no such split, an unreachable Hub: name the source)
            unreadable = isinstance(err, datasets.exceptions.DatasetGenerationError)  # (a file's records failed)
            cause = err.__cause__ if unreadable and err.__cause__ else err
            where = "data folder" if path.is_dir() else "Hub dataset (offline, misspelt or private?)"
            problem = _folder_problem(path) if path.is_dir() and unreadable else None
            raise ValueError(
                f"{source}: cannot be read as a {where}: {problem or f'{type(cause).__name__}: {cause}'}"
            ) from None
    yield from ds


# how many skipped rows `load_conversations` describes
SKIPPED_EXAMPLES = 3


def load_conversations(
    source: str,
    *,
    split: str = "train",
    data_format: str = "auto",
    config_name: str | None = None,
    limit: int | None = None,
    stats: Counter | None = None,
    skipped: list[str] | None = None,
) -> list[list[dict]]:
    """Conversations (lists of messages) from ``source``: ``"sample"`` (the bundled conversations), a ``.jsonl``
    file, or anything ``datasets`` loads (file, ``save_to_disk`` directory, Hub id with ``split``/``config_name``).
    Rows that cannot be read as a conversation are skipped and counted in ``stats["invalid"]``; the first few are
    described in ``skipped`` ("<source> row N: why"; rows numbered from 1, blank lines of a .jsonl not counted)."""
    stats = stats if stats is not None else Counter()
    conversations = []
    for number, row in enumerate(_iter_rows(source, split, config_name), 1):
        if limit is not None and len(conversations) >= limit:
            break
        try:
            conversations.append(row_to_messages(row, data_format))
        except (ValueError, KeyError, TypeError) as err:
            stats["invalid"] += 1
            if skipped is not None and len(skipped) < SKIPPED_EXAMPLES:
                why = f"no field {err}" if isinstance(err, KeyError) else str(err)
                skipped.append(f"{source} row {number}: {why}"[:300])
    return conversations


# ---------------------------------------------------------------------------------------------------------------
# Examples: token ids and labels
# ---------------------------------------------------------------------------------------------------------------

IGNORE_INDEX = -100


class Example(NamedTuple):
    """One tokenized conversation: ``input_ids`` and ``labels`` of the same length, labels -100 where not trained."""

    input_ids: list[int]
    labels: list[int]


def _finish(
    ids: list[int],
    offsets: list[tuple[int, int]],
    rendered: RenderedChat,
    messages: list[dict],
    max_len: int,
    stats: Counter,
    cut_trained: bool = False,
) -> tuple[np.ndarray, np.ndarray] | None:
    """Cut one tokenized conversation by the truncation rule; (ids, trained flags) or None when dropped.
    `cut_trained`: trained messages were cut off the conversation before it was tokenized (it counts as
    truncated)."""
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    starts, stops = off[:, 0], off[:, 1]
    if len(starts) > 1 and bool((np.diff(starts) < 0).any()):
        raise ValueError("the tokenizer's offsets are not in order; it cannot be used with this chat format")
    spans = np.asarray(rendered.label_spans, dtype=np.int64).reshape(-1, 2)
    # a trained span must start and end on token boundaries (no token reaches across "\n" or "</s>")
    for edge in spans.reshape(-1):
        t = int(np.searchsorted(starts, edge, side="right")) - 1
        if t >= 0 and starts[t] < edge < stops[t]:
            raise ValueError(
                f"the tokenizer makes a token across the edge of an assistant turn (characters "
                f"{starts[t]}..{stops[t]}, edge {edge}); it cannot be used with this chat "
                "format"
            )
    # token index where each message ends = the first token that starts at or after its last character
    ends = np.searchsorted(starts, np.asarray([e for _, e in rendered.message_spans], dtype=np.int64), side="left")
    keep = None
    for k in range(len(messages), 0, -1):  # the longest prefix of whole messages ending with a trained assistant turn
        if is_trained(messages[k - 1]) and ends[k - 1] <= max_len:
            keep = k
            break
    if keep is None:
        stats["too_long"] += 1
        return None
    if cut_trained or any(is_trained(m) for m in messages[keep:]):
        stats["truncated"] += 1
    cut = int(ends[keep - 1])
    trained = np.zeros(len(starts), dtype=bool)
    first, after = np.searchsorted(starts, spans[:, 0], side="left"), np.searchsorted(starts, spans[:, 1], side="left")
    for a, b in zip(first, after):
        trained[a:b] = True  # the tokens that start inside the span
    stats["kept"] += 1
    return np.asarray(ids[:cut], dtype=np.int32), trained[:cut]


def build_example(tokenizer, messages: Sequence[dict], max_len: int, stats: Counter | None = None) -> Example | None:
    """``(input_ids, labels)`` for one conversation, or ``None`` when it is skipped (no assistant message) or dropped
    (too long even when cut after its first assistant message); ``stats`` (a ``Counter``) counts ``kept``,
    ``truncated``, ``too_long`` and ``no_assistant``. ``input_ids`` equal ``tokenizer.apply_chat_template`` of the
    kept messages; see the module docstring for the labels and the truncation rule."""
    out = build_examples(tokenizer, [messages], max_len, stats=stats)
    return out[0] if len(out) else None


class ChatDataset:
    """Tokenized examples stored compactly (one flat int32 array of ids and one of label flags), for datasets of
    any size. ``dataset[i]`` is an :class:`Example`; ``lengths`` holds every example's length."""

    def __init__(self, ids: np.ndarray, trained: np.ndarray, offsets: np.ndarray):
        self.ids, self.trained, self.offsets = ids, trained, offsets

    @classmethod
    def from_arrays(cls, rows: Sequence[tuple[np.ndarray, np.ndarray]]) -> "ChatDataset":
        """A dataset of (token ids, trained flags) pairs, one per example."""
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(ids) for ids, _ in rows])
        ids = np.concatenate([r[0] for r in rows]) if rows else np.zeros(0, dtype=np.int32)
        trained = np.concatenate([r[1] for r in rows]) if rows else np.zeros(0, dtype=bool)
        return cls(ids.astype(np.int32, copy=False), trained.astype(bool, copy=False), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        """[N] int64: every example's length in tokens."""
        return np.diff(self.offsets)

    def num_trained_tokens(self) -> int:
        """Tokens with a label (assistant content and its EOS), over all examples."""
        return int(self.trained.sum())

    def __getitem__(self, i: int) -> Example:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i = i % len(self)
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        ids = self.ids[a:b]
        return Example(ids.tolist(), np.where(self.trained[a:b], ids, IGNORE_INDEX).tolist())


def build_examples(
    tokenizer,
    conversations: Iterable[Sequence[dict]],
    max_len: int,
    *,
    system_prompt: str | None = None,
    stats: Counter | None = None,
    chunk_size: int = 256,
) -> ChatDataset:
    """:func:`build_example` over many conversations (tokenized in batches), as a :class:`ChatDataset`.
    ``system_prompt``, if given, is put first in every conversation that has no system message."""
    stats = stats if stats is not None else Counter()
    if max_len < 2:
        raise ValueError(f"max_len must be at least 2, got {max_len}")
    check_chat_tokenizer(tokenizer)
    bos, eos = tokenizer.bos_token, tokenizer.eos_token
    # A message of more characters than this holds more than max_len tokens: it and every message after it are cut
    # before tokenizing, as the truncation rule would cut them after, so that a huge one (megabytes) is never
    # tokenized.
    limit_chars = max_fitting_chars(tokenizer, max_len)
    rows: list[tuple[np.ndarray, np.ndarray]] = []
    chunk: list[tuple[list[dict], RenderedChat, bool]] = []

    def flush():
        if chunk:
            encoded = encode_rendered(tokenizer, [r for _, r, _ in chunk])
            for (messages, rendered, cut_trained), (ids, offsets) in zip(chunk, encoded):
                row = _finish(ids, offsets, rendered, messages, max_len, stats, cut_trained)
                if row is not None:
                    rows.append(row)
            chunk.clear()

    for messages in conversations:
        messages = normalize_messages(messages)
        if system_prompt and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": system_prompt}] + messages
        if not any(is_trained(m) for m in messages):
            stats["no_assistant"] += 1
            continue
        # (the template strips content: surrounding whitespace takes no tokens)
        huge = next((i for i, m in enumerate(messages) if len(m["content"].strip()) > limit_chars), None)
        cut_trained = huge is not None and any(is_trained(m) for m in messages[huge:])
        if huge is not None:
            messages = messages[:huge]
            if not any(is_trained(m) for m in messages):  # (what _finish says of a first turn past max_len)
                stats["too_long"] += 1
                continue
        chunk.append((messages, render_chat(messages, bos_token=bos, eos_token=eos), cut_trained))
        if len(chunk) >= chunk_size:
            flush()
    flush()
    return ChatDataset.from_arrays(rows)


def pack_examples(lengths: np.ndarray, max_len: int) -> list[list[int]]:
    """Rows of example indices whose lengths add up to at most ``max_len`` each: best-fit decreasing bin packing
    (longest example first, into the fullest row it still fits), deterministic. Every example is in one row; rows
    keep their examples in the order they were placed. Raises ``ValueError`` for an example longer than
    ``max_len``."""
    import bisect

    lengths = np.asarray(lengths)
    if len(lengths) and int(lengths.max()) > max_len:
        raise ValueError(f"an example of {int(lengths.max())} tokens does not fit a packed row of {max_len}")
    rows: list[list[int]] = []
    rooms: list[tuple[int, int]] = []  # (room left, row index), sorted
    for i in np.argsort(-lengths, kind="stable").tolist():
        n = int(lengths[i])
        at = bisect.bisect_left(rooms, (n, -1))
        if at < len(rooms):
            room, row = rooms.pop(at)
        else:
            room, row = max_len, len(rows)
            rows.append([])
        rows[row].append(i)
        bisect.insort(rooms, (room - n, row))
    return rows


class PackedChatDataset:
    """The examples of a :class:`ChatDataset` packed into rows of at most ``max_len`` tokens (:func:`pack_examples`).

    ``dataset[i]`` is a dict of ``input_ids``, ``labels`` and ``position_ids`` (restarting at 0 for each example): the
    packed-sequence input of ``LlamaThinkForCausalLM``, which keeps the examples of a row apart, so a packed row
    trains exactly as its examples would one by one, with less padding. ``lengths`` holds the rows' lengths."""

    def __init__(self, dataset: ChatDataset, max_len: int):
        self.dataset, self.max_len = dataset, max_len
        self.rows = pack_examples(dataset.lengths, max_len)
        member_lengths = dataset.lengths
        self._lengths = np.array([int(member_lengths[r].sum()) for r in self.rows], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def lengths(self) -> np.ndarray:
        """[rows] int64: every packed row's length in tokens."""
        return self._lengths

    def num_trained_tokens(self) -> int:
        """Tokens with a label, over all rows (those of the packed dataset)."""
        return self.dataset.num_trained_tokens()

    def __getitem__(self, i: int) -> dict:
        ids, labels, positions = [], [], []
        for j in self.rows[i]:
            example = self.dataset[j]
            ids += example.input_ids
            labels += example.labels
            positions += range(len(example.input_ids))
        return {"input_ids": ids, "labels": labels, "position_ids": positions}


class ChatCollator:
    """Pads a list of examples (:class:`Example`, or dicts with ``input_ids``/``labels``) on the right: ids with
    ``pad_token_id``, labels with -100, ``attention_mask`` 0 on padding. Returns a dict of [B, T] tensors. Packed
    rows (dicts with ``position_ids``, :class:`PackedChatDataset`) also get ``position_ids``; a row's padding
    counts as one more sequence (positions from 0), so it never touches the row's examples."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: Sequence[Example | dict]) -> dict:
        import torch

        rows = [(e["input_ids"], e["labels"]) if isinstance(e, dict) else (e[0], e[1]) for e in examples]
        T = max(len(ids) for ids, _ in rows)
        if self.pad_to_multiple_of:
            T = -(-T // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), T), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), T), dtype=torch.long)
        kinds = {isinstance(e, dict) and "position_ids" in e for e in examples}
        if len(kinds) > 1:  # without position_ids the packed rows would train as one stream each
            raise ValueError("a batch mixes packed rows (with position_ids) and plain examples; collate them apart")
        packed = kinds == {True}
        position_ids = torch.arange(T).repeat(len(rows), 1) if packed else None
        for i, (ids, lab) in enumerate(rows):
            n = len(ids)
            input_ids[i, :n] = torch.as_tensor(list(ids), dtype=torch.long)
            labels[i, :n] = torch.as_tensor(list(lab), dtype=torch.long)
            attention_mask[i, :n] = 1
            if packed:
                position_ids[i, :n] = torch.as_tensor(list(examples[i]["position_ids"]), dtype=torch.long)
                position_ids[i, n:] = torch.arange(T - n)
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
        if packed:
            batch["position_ids"] = position_ids
        return batch


# ---------------------------------------------------------------------------------------------------------------
# Training: held-out split and batches
# ---------------------------------------------------------------------------------------------------------------


def split_held_out(conversations: list, fraction: float, seed: int, max_eval: int | None = None) -> tuple[list, list]:
    """(train, held-out): a random `fraction` of the conversations (at least one when fraction > 0 and there are two
    or more, at most `max_eval`), chosen by `seed`; both keep the original order."""
    n = len(conversations)
    n_eval = 0
    if fraction > 0 and n >= 2:
        n_eval = min(max(1, round(n * fraction)), n - 1, max_eval or n)
    held = set(np.random.default_rng(seed).permutation(n)[:n_eval].tolist())
    return (
        [c for i, c in enumerate(conversations) if i not in held],
        [c for i, c in enumerate(conversations) if i in held],
    )


class ChatBatchLoader:
    """Endless right-padded batches of a `ChatDataset`, epoch after epoch, in an order fixed by (seed, epoch).

    The order is planned by optimizer step: each step takes `batch_size x world_size x grad_accum` examples (its
    step batch; an epoch's last partial one is skipped and the next epoch reshuffles), split into `grad_accum`
    micro-steps of `batch_size x world_size`, of which process `rank` gets its `batch_size` rows. With
    `group_by_length`, examples are sorted by length (longest first) within windows of 32 step batches before they
    are cut into step batches, and the step batches are then shuffled, so that each micro batch pads little. Every
    split of the same step batch (micro batch, accumulation, processes) gives each optimizer step the same examples,
    so a resume may change the split. `state_dict()` / `load_state_dict()` make the sequence resumable exactly.

    Raises ValueError where the dataset holds fewer examples than one step batch, or a count is not positive."""

    def __init__(
        self,
        dataset: ChatDataset,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        pad_token_id: int = 0,
        group_by_length: bool = True,
        grad_accum: int = 1,
    ):
        if min(batch_size, world_size, grad_accum) < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need batch_size, world_size and grad_accum >= 1 and 0 <= rank < world_size, got {batch_size}, "
                f"{world_size}, {grad_accum} and rank {rank}"
            )
        self.dataset, self.batch_size, self.rank, self.world_size = dataset, batch_size, rank, world_size
        self.seed, self.group_by_length, self.grad_accum = seed, group_by_length, grad_accum
        self.global_batch = batch_size * world_size  # one micro-step's examples on all processes
        self.step_batch = self.global_batch * grad_accum  # one optimizer step's
        # micro-steps per planned batch: grad_accum, or 1 to continue a run whose order was planned by micro-step
        # (`load_state_dict`)
        self._plan_accum = grad_accum
        if len(dataset) < self.step_batch:
            packed = isinstance(dataset, PackedChatDataset)
            what = (
                f"{len(dataset)} packed rows (of {len(dataset.dataset)} conversations)"
                if packed
                else f"{len(dataset)} training examples"
            )
            raise ValueError(
                f"{what} are fewer than one optimizer step's batch ({batch_size} x {grad_accum} x {world_size}: "
                "micro_batch_size x grad_accum x processes); lower micro_batch_size or grad_accum"
                + (", or max_len, or set packing: false" if packed else "")
            )
        self.collate = ChatCollator(pad_token_id)
        self.epoch, self.position = 0, 0  # position: micro-steps of the epoch already taken
        self._plan: tuple[int, list[np.ndarray]] | None = None

    def _batches(self, epoch: int) -> list[np.ndarray]:
        """The planned batches of `epoch` (each of `_plan_accum` micro-steps), as example indices."""
        if self._plan is None or self._plan[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            n, unit = len(self.dataset), self.global_batch * self._plan_accum
            order = rng.permutation(n)
            nb = n // unit
            if self.group_by_length:
                lengths = self.dataset.lengths
                window = unit * 32
                order = np.concatenate(
                    [
                        chunk[np.argsort(-lengths[chunk], kind="stable")]
                        for chunk in np.array_split(order, range(window, n, window))
                    ]
                )
                batches = [order[i * unit : (i + 1) * unit] for i in range(nb)]
                batches = [batches[i] for i in rng.permutation(nb)]
            else:
                batches = [order[i * unit : (i + 1) * unit] for i in range(nb)]
            self._plan = (epoch, batches)
        return self._plan[1]

    def __len__(self) -> int:
        """Micro-steps in an epoch."""
        return len(self._batches(self.epoch)) * self._plan_accum

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batches = self._batches(self.epoch)
        if self.position >= len(batches) * self._plan_accum:
            self.epoch, self.position = self.epoch + 1, 0
            batches = self._batches(self.epoch)
        planned, micro = divmod(self.position, self._plan_accum)
        start = micro * self.global_batch + self.rank * self.batch_size
        rows = batches[planned][start : start + self.batch_size]
        self.position += 1
        return self.collate([self.dataset[int(i)] for i in rows])

    def state_dict(self) -> dict:
        """The data position (epoch, micro-step) and what it depends on (seed, data size, batches, grouping)."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "size": len(self.dataset),
            "global_batch": self.global_batch,
            "step_batch": self.step_batch,
            "grad_accum": self.grad_accum,
            "planned_by": "step" if self._plan_accum == self.grad_accum else "micro-step",
            "group_by_length": self.group_by_length,
        }

    def load_state_dict(self, state: dict):
        """Continue from a `state_dict`, also of another split of the same step batch (micro batch, accumulation,
        processes): the position, taken at an optimizer step's end, is converted to this split's micro-steps.

        A state planned by micro-step (written before the order was planned by optimizer step, without
        "step_batch", "grad_accum" and "planned_by", or by a run resumed from one) planned each micro-step's
        `global_batch` examples alone; the run goes on in that plan, which needs the same micro batch x processes.
        Raises ValueError naming the setting when the data, seed, grouping or batch changed, and naming the entry
        when the state is damaged: a count that is not a non-negative integer (a positive one for batches), a
        step batch that is not its global batch x accumulation, a position past its epoch's end or, for another
        split, not at an optimizer step's end."""

        def damaged(why: str) -> ValueError:
            return ValueError(f"cannot resume the data position: the checkpoint's loader state is damaged ({why})")

        if not isinstance(state, dict):
            raise damaged(f"a {type(state).__name__}, not a dict")
        new_keys = [key for key in ("step_batch", "grad_accum", "planned_by") if key in state]
        planned_by = state.get("planned_by", "micro-step" if not new_keys else None)  # none: an earlier version's
        if planned_by not in ("step", "micro-step"):
            raise damaged(f"planned_by is {planned_by!r}, not 'step' or 'micro-step'")
        by_micro_step = planned_by == "micro-step"
        seed, size, global_batch = (
            saved_count(state, "seed"),
            saved_count(state, "size"),
            saved_count(state, "global_batch", 1),
        )
        if not isinstance(state.get("group_by_length"), bool):
            raise damaged(f"group_by_length is {state.get('group_by_length')!r}, not true or false")
        saved_accum = 1 if not new_keys else saved_count(state, "grad_accum", 1)
        step_batch = global_batch if not new_keys else saved_count(state, "step_batch", 1)
        if step_batch != global_batch * saved_accum:
            raise damaged(f"step_batch {step_batch} is not global_batch {global_batch} x grad_accum {saved_accum}")
        saved = {"seed": seed, "size": size, "group_by_length": state["group_by_length"]}
        saved["global_batch" if by_micro_step else "step_batch"] = global_batch if by_micro_step else step_batch
        mine = self.state_dict()
        for key, value in saved.items():
            if value != mine[key]:
                why = "the data or batch settings changed"
                if key == "global_batch":
                    why = (
                        "its order was planned by micro-step, micro_batch_size x processes conversations grouped "
                        "and shuffled as such, as earlier LlamaThink versions did: keep that product"
                    )
                raise ValueError(
                    f"cannot resume the data position: {key} was {value!r} in the checkpoint and is {mine[key]!r} "
                    f"now ({why})"
                )
        epoch, position = saved_count(state, "epoch"), saved_count(state, "position")
        # micro-steps in an epoch of the saved plan: its batches (each of micro-steps planned alone, or of steps)
        per_epoch = size // global_batch if by_micro_step else size // step_batch * saved_accum
        if position > per_epoch:
            raise damaged(f"position {position} is past the end of an epoch of {per_epoch} micro-steps")
        if by_micro_step:
            self._plan_accum, self._plan = 1, None
        elif saved_accum != self.grad_accum:
            steps, rest = divmod(position, saved_accum)
            if rest:
                raise ValueError(
                    f"cannot resume the data position: micro-step {position} of its epoch is not at the end of an "
                    f"optimizer step of {saved_accum} micro-steps, so another split of its batch cannot continue it"
                )
            position = steps * self.grad_accum
        self.epoch, self.position = epoch, position


def trained_tokens(labels: torch.Tensor) -> int:
    """Tokens the loss counts: labels after the causal shift that are not -100."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
