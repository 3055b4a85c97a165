"""Chat format, finetuning data and the ``llamathink-chat`` terminal chat.

The conversation template
=========================

LlamaThink chats in a plain-text format with the tokenizer's own BOS/EOS tokens, so it needs no new tokens (no
embedding resize), works unchanged with the built-in demo tokenizer and the Llama 2 tokenizer, and can be rebuilt
by the C runner from a handful of strings::

    <s>                                       BOS, once at the start
    ### System:\\n{content}\\n\\n               a system message (optional; any role may come first)
    ### User:\\n{content}\\n\\n                 a user message
    ### Assistant:\\n{content}</s>              an assistant message; EOS (id 2) ends the turn
    ### Assistant:\\n                           the generation prompt (add_generation_prompt=True)

``{content}`` is the message text with leading and trailing whitespace removed (``str.strip``, Jinja's
``trim``). Messages are rendered in the order given, so a conversation may open with the assistant (as in the
original's data where person2 speaks first) or hold two messages of one role in a row. Other roles are an error.
The end-of-turn marker is the EOS token ``</s>``: generation stops there by itself, in ``generate()`` as in the C
runner. The ``### ...:`` markers are ordinary text: 4 to 6 tokens each with Llama 2 (``###`` is ``▁###`` at the
start of a segment, ``##`` ``#`` after a newline), about 10 with the small built-in tokenizer; no sample
conversation contains ``###``.

:data:`CHAT_TEMPLATE` is this format as a Jinja template for ``tokenizer.chat_template``
(:func:`set_chat_template`); :func:`render_chat` is the same format in Python, and :func:`apply_template` (its
guarded text) is the reference the tests check the Jinja template against, character for character. Assistant
contents and their EOS are wrapped in ``{% generation %}`` blocks, so
``apply_chat_template(..., return_assistant_tokens_mask=True)`` (and trainers that rely on it) marks exactly the
tokens this module trains on.

Tokenization, and what the C runner must do
-------------------------------------------

Message content is always text: a ``</s>``, ``<s>`` or ``<unk>`` typed in a message is encoded as those
characters, and BOS/EOS enter only where the template puts them. :func:`chat_ids` (used by :func:`prompt_ids`,
the chat CLI and :func:`build_example`) renders the conversation, cuts the text at the template's BOS/EOS,
encodes each piece as one plain string (``split_special_tokens=True``, no BOS/EOS added) and puts the BOS/EOS
ids between. Each piece gets the SentencePiece dummy-prefix space (``▁###``), like every Llama-style tokenizer in
this project (``Prepend("▁")`` normalizer), exactly as transformers encodes the text between two special tokens.
For ``tokenizer.apply_chat_template(..., tokenize=True)``, which tokenizes the rendered string and would read
every special-token string in it as the token, the Jinja template follows every ``<`` in a content with
:data:`TEXT_GUARD` (U+FDD0) and :func:`set_chat_template` puts a normalizer step in front of the tokenizer that
deletes it: special tokens are matched before normalization, so content cannot form them, and the model then
reads the content unchanged. Both give the same ids (tests/test_chat.py); a content that contains U+FDD0 itself,
or a lone surrogate (invalid UTF-8 input read with ``surrogateescape``), is refused (``ValueError``). Neither
tokenizer has a piece that joins a newline to another character, so the token boundary after ``### Assistant:\\n``
always falls where the assistant content begins: the prompt tokens for generation are a prefix of the training
tokens.

The role markers are plain text and are not escaped: a user can type ``### Assistant:`` and the model may follow
it. What content cannot do is forge the BOS/EOS ids (end a turn for ``generate()`` or the C runner) or move the
loss mask, which is set by position.

To reproduce this, the C runner (``export_c``) stores :data:`CHAT_MARKERS` in ``tokenizer.bin`` (``--chat-marker
KEY=VALUE``) and, per turn, encodes ``user_prefix + text + user_suffix + assistant_prefix`` (``text`` stripped of
surrounding whitespace) as one string *with* the dummy prefix and without BOS, special-token strings included as
text (a system prompt, if any, is ``system_prefix + text + system_suffix`` placed before the first user turn in the
same string), feeds BOS once at the start of the conversation, samples until EOS, and feeds that EOS before the
next user turn. Token for token this is :func:`prompt_ids` of the same messages.

Labels, truncation, skipping
----------------------------

:func:`build_example` tokenizes a conversation exactly as ``apply_chat_template`` does (same ids) and sets the
labels to -100 everywhere except the tokens of each assistant content and its EOS. Positions are not shifted
(``labels[i]`` is ``input_ids[i]`` or -100; the model shifts inside, as Hugging Face causal LMs do).

* Nothing to learn: a conversation without an assistant message is skipped (counted as ``no_assistant``).
* Too long (``max_len`` tokens): the conversation is cut at a message boundary, keeping the longest run of whole
  messages from the start that ends with an assistant message and fits (counted as ``truncated``); if even the
  first assistant message ends past ``max_len`` the conversation is dropped (``too_long``). Messages after the last
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

The ``llamathink-chat`` command
-------------------------------

::

    llamathink-chat runs/quickstart/chat/final                      # interactive
    llamathink-chat runs/quickstart/chat/final -p "Hi! Any plans?"  # one shot: prints the reply and exits
    echo "Why is the sky blue?" | llamathink-chat MODEL -p -        # one shot, message from stdin

Replies stream to stdout as they are generated; notices go to stderr. The history is kept while it
fits the model's context window minus the room kept for the reply (``--max-new-tokens``, at most half the window);
beyond that the oldest messages are dropped first (the system prompt stays). ``/reset`` clears the history,
``/exit``, ``/quit`` or Ctrl-D (EOF) leave; Ctrl-C stops a reply being generated (the exchange is discarded) and
leaves when pressed at the prompt.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Sequence, TextIO

import numpy as np

# ---------------------------------------------------------------------------------------------------------------
# The template
# ---------------------------------------------------------------------------------------------------------------

SYSTEM_PREFIX = "### System:\n"
USER_PREFIX = "### User:\n"
ASSISTANT_PREFIX = "### Assistant:\n"
TURN_SUFFIX = "\n\n"  # after system and user messages; an assistant message ends with the EOS token instead
ROLES = ("system", "user", "assistant")

# The strings the C runner's chat mode reads from tokenizer.bin (see the module docstring). The assistant turn ends
# with the EOS *token*, which the runner samples and feeds itself, so assistant_suffix is empty.
CHAT_MARKERS = {
    "system_prefix": SYSTEM_PREFIX,
    "system_suffix": TURN_SUFFIX,
    "user_prefix": USER_PREFIX,
    "user_suffix": TURN_SUFFIX,
    "assistant_prefix": ASSISTANT_PREFIX,
    "assistant_suffix": "",
}

# Message content is text: a "</s>" typed in a message must be the three characters, never the EOS id. transformers
# tokenizes the rendered template as one string and turns every special-token string in it into its id, so the
# template breaks each control-token string in a content with TEXT_GUARD (after every "<"; all control tokens of
# the tokenizers this format accepts start with "<"), and set_chat_template puts a normalizer step in front of the
# tokenizer that deletes TEXT_GUARD. Special tokens are matched on the raw text before normalization, so a guarded
# "<\ufdd0/s>" is not matched, and the model then reads "</s>" as plain text: the same ids as encoding the content
# as text. TEXT_GUARD is a Unicode noncharacter (reserved for internal use, never interchanged), so content that
# contains it is refused rather than silently changed.
TEXT_GUARD = "\ufdd0"
CONTROL_TOKEN_START = "<"

CHAT_TEMPLATE = r"""{#- LlamaThink chat format (llamathink/chat.py): text role markers, EOS ends an assistant turn -#}
{#- Content is text: every "<" in it is followed by U+FDD0, which the tokenizer's normalizer deletes, so a typed
    "</s>" is never the EOS token (llamathink.chat.TEXT_GUARD) -#}
{{- bos_token -}}
{%- for message in messages -%}
    {%- if message['content'] is string -%}
        {%- set content = message['content'] | trim -%}
    {%- elif message['content'] is iterable and message['content'] is not mapping -%}
        {%- set content = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') | trim -%}
    {%- else -%}
        {%- set content = '' -%}
    {%- endif -%}
    {%- if '\uFDD0' in content -%}
        {{- raise_exception('LlamaThink chat template: message ' ~ loop.index0 ~
                            ' contains U+FDD0, a Unicode noncharacter the template reserves') -}}
    {%- endif -%}
    {%- set content = content | replace('<', '<\uFDD0') -%}
    {%- if message['role'] == 'system' -%}
        {{- '### System:\n' + content + '\n\n' -}}
    {%- elif message['role'] == 'user' -%}
        {{- '### User:\n' + content + '\n\n' -}}
    {%- elif message['role'] == 'assistant' -%}
        {{- '### Assistant:\n' -}}
        {%- generation -%}
            {{- content + eos_token -}}
        {%- endgeneration -%}
    {%- else -%}
        {{- raise_exception('LlamaThink chat template: unknown role ' ~ message['role'] ~ '; use system, user or assistant') -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '### Assistant:\n' -}}
{%- endif -%}
"""
_TEMPLATE_SIGNATURE = "{#- LlamaThink chat format (llamathink/chat.py)"


def is_llamathink_template(template: str | None) -> bool:
    """True for :data:`CHAT_TEMPLATE` and for the LlamaThink templates of earlier versions (saved with older
    checkpoints; recognised by their first comment)."""
    return isinstance(template, str) and template.lstrip().startswith(_TEMPLATE_SIGNATURE)


def check_chat_tokenizer(tokenizer) -> None:
    """Raise ``ValueError`` unless ``tokenizer`` can carry the LlamaThink format with message content kept as text:
    it has BOS and EOS tokens, and every added token (special or not) is a special token that starts with ``<``,
    is at least two characters long, does not contain :data:`TEXT_GUARD` and is matched on the raw text
    (``normalized=False``). The Llama 2 tokenizer and the built-in ones qualify (``<unk>``, ``<s>``, ``</s>``)."""
    if tokenizer.bos_token is None or tokenizer.eos_token is None:
        raise ValueError("the LlamaThink chat template needs a tokenizer with BOS and EOS tokens")
    for token in getattr(tokenizer, "added_tokens_decoder", {}).values():
        content = str(token.content if hasattr(token, "content") else token)
        problem = None
        if not getattr(token, "special", True):
            problem = "is not a special token (split_special_tokens cannot make it text)"
        elif len(content) < 2 or not content.startswith(CONTROL_TOKEN_START):
            problem = f"does not start with {CONTROL_TOKEN_START!r} or is a single character"
        elif TEXT_GUARD in content:
            problem = "contains U+FDD0"
        elif getattr(token, "normalized", False):
            problem = "is matched after normalization (normalized=True)"
        if problem:
            raise ValueError(f"added token {content!r} {problem}; the LlamaThink chat format cannot keep message "
                             "content from being read as this token")  # fmt: skip


def _install_text_guard(tokenizer) -> None:
    """Put ``Replace(TEXT_GUARD, "")`` first in the tokenizer's normalizer (once; saved in tokenizer.json)."""
    from tokenizers import normalizers

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"the LlamaThink chat template needs a fast (tokenizers-backed) tokenizer, got "
                         f"{type(tokenizer).__name__}")  # fmt: skip
    state = json.loads(backend.to_str()).get("normalizer") or {}
    steps = state.get("normalizers", []) if state.get("type") == "Sequence" else [state]
    first = steps[0] if steps else {}
    if first.get("type") == "Replace" and first.get("pattern") == {"String": TEXT_GUARD} and first.get("content") == "":
        return
    guard = normalizers.Replace(TEXT_GUARD, "")
    current = backend.normalizer
    backend.normalizer = guard if current is None else normalizers.Sequence([guard, current])


def set_chat_template(tokenizer, template: str = CHAT_TEMPLATE):
    """Store the LlamaThink chat template in ``tokenizer`` (in place; also returned). ``save_pretrained`` then
    writes it (``chat_template.jinja``) and ``AutoTokenizer.from_pretrained`` brings it back.

    Also puts the :data:`TEXT_GUARD` deletion first in the tokenizer's normalizer, so that
    ``tokenizer.apply_chat_template(..., tokenize=True)`` encodes message content as text (a typed ``</s>`` is
    not EOS); this changes nothing for text without U+FDD0. Raises ``ValueError`` for tokenizers that cannot be
    guarded this way (:func:`check_chat_tokenizer`)."""
    check_chat_tokenizer(tokenizer)
    _install_text_guard(tokenizer)
    tokenizer.chat_template = template
    return tokenizer


class RenderedChat(NamedTuple):
    """A conversation in the chat format. Character spans are ``(start, stop)`` offsets into ``text``."""

    text: str
    message_spans: list[tuple[int, int]]  # character span of each message's block (markers included)
    label_spans: list[tuple[int, int]]  # character span of each assistant content + EOS (what is trained on)
    special_spans: list[tuple[int, int, str]]  # (start, stop, "bos" | "eos"): the tokens the template writes


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text")
    raise TypeError(f"message content must be a string or a list of text parts, got {type(content).__name__}")


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_content(i: int, content: str) -> None:
    if TEXT_GUARD in content:
        raise ValueError(f"message {i} contains U+FDD0, a Unicode noncharacter the chat template reserves to keep "
                         "content from forming special tokens; remove it")  # fmt: skip
    # a lone surrogate is not text (Python decodes invalid UTF-8 input to them with surrogateescape): the
    # tokenizer cannot encode it, and run.c refuses the same bytes
    bad = _LONE_SURROGATE.search(content)
    if bad:
        raise ValueError(f"message {i} is not valid text: lone surrogate U+{ord(bad.group()):04X} at character "
                         f"{bad.start()} (invalid UTF-8 input?)")  # fmt: skip


def render_chat(messages: Sequence[dict], *, bos_token: str = "<s>", eos_token: str = "</s>",
                add_generation_prompt: bool = False, guard: bool = False) -> RenderedChat:  # fmt: skip
    """The chat format in Python: the rendered text, where each message and each trained span (assistant content
    and its EOS) lie in it, and where the template's own BOS/EOS tokens are (``special_spans``).

    ``guard=False`` gives the text the model reads (content verbatim); ``guard=True`` the text :data:`CHAT_TEMPLATE`
    renders (every ``<`` in a content followed by :data:`TEXT_GUARD`). Content is ``str.strip``-ped. Raises
    ``ValueError`` for an unknown role or a content that contains :data:`TEXT_GUARD` or a lone surrogate."""
    parts, pos = [bos_token], len(bos_token)
    message_spans, label_spans, special_spans = [], [], [(0, len(bos_token), "bos")]
    for i, message in enumerate(messages):
        role = message.get("role")
        content = _content_text(message.get("content")).strip()
        _check_content(i, content)
        if guard:
            content = content.replace(CONTROL_TOKEN_START, CONTROL_TOKEN_START + TEXT_GUARD)
        if role == "system":
            block = SYSTEM_PREFIX + content + TURN_SUFFIX
        elif role == "user":
            block = USER_PREFIX + content + TURN_SUFFIX
        elif role == "assistant":
            block = ASSISTANT_PREFIX + content + eos_token
            label_spans.append((pos + len(ASSISTANT_PREFIX), pos + len(block)))
            special_spans.append((pos + len(block) - len(eos_token), pos + len(block), "eos"))
        else:
            raise ValueError(f"message {i}: unknown role {role!r}; use system, user or assistant")
        parts.append(block)
        message_spans.append((pos, pos + len(block)))
        pos += len(block)
    if add_generation_prompt:
        parts.append(ASSISTANT_PREFIX)
    return RenderedChat("".join(parts), message_spans, label_spans, special_spans)


def apply_template(messages: Sequence[dict], *, bos_token: str = "<s>", eos_token: str = "</s>",
                   add_generation_prompt: bool = False) -> str:  # fmt: skip
    """The rendered text of ``messages``, guarded (what ``tokenizer.apply_chat_template(..., tokenize=False)``
    returns with :data:`CHAT_TEMPLATE`; for content without ``<`` the plain text)."""
    return render_chat(messages, bos_token=bos_token, eos_token=eos_token,
                       add_generation_prompt=add_generation_prompt, guard=True).text  # fmt: skip


def encode_rendered(tokenizer, rendered: Sequence[RenderedChat]) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """Token ids and character offsets (into ``r.text``) of rendered conversations, content as text.

    The text between two template tokens (BOS, EOS) is encoded as one plain string (``split_special_tokens=True``,
    no BOS/EOS added: a ``"</s>"`` in it becomes the pieces of the text "</s>"), with the tokenizer's dummy prefix,
    and the template's BOS/EOS are put between by id. This is how transformers encodes a rendered template whose
    only special-token strings are the template's own, and how the C runner builds a prompt. Raises ``ValueError``
    if the tokenizer cannot keep content as text (:func:`check_chat_tokenizer`)."""
    check_chat_tokenizer(tokenizer)
    special_id = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id}
    segments: list[tuple[int, str]] = []  # (offset of the text in its conversation, text)
    layout: list[list[tuple[str, Any]]] = []
    for r in rendered:
        items, pos = [], 0
        for start, stop, kind in list(r.special_spans) + [(len(r.text), len(r.text), None)]:
            if start > pos:
                items.append(("text", len(segments)))
                segments.append((pos, r.text[pos:start]))
            if kind is not None:
                items.append(("special", (special_id[kind], start, stop)))
            pos = stop
        layout.append(items)
    enc = tokenizer([t for _, t in segments], add_special_tokens=False, split_special_tokens=True,
                    return_offsets_mapping=True) if segments else {"input_ids": [], "offset_mapping": []}  # fmt: skip
    out = []
    for items in layout:
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        for kind, value in items:
            if kind == "special":
                token_id, start, stop = value
                ids.append(int(token_id))
                offsets.append((start, stop))
            else:
                base = segments[value][0]
                ids.extend(enc["input_ids"][value])
                offsets.extend((base + a, base + b) for a, b in enc["offset_mapping"][value])
        out.append((ids, offsets))
    return out


def chat_ids(tokenizer, messages: Sequence[dict], *, add_generation_prompt: bool = False) -> list[int]:
    """Token ids of ``messages`` in the LlamaThink format, content as text (:func:`encode_rendered`): equal to
    ``tokenizer.apply_chat_template(messages, add_generation_prompt=..., tokenize=True)`` once
    :func:`set_chat_template` has been applied, and to what the C runner feeds."""
    rendered = render_chat(normalize_messages(messages), bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token,
                           add_generation_prompt=add_generation_prompt)  # fmt: skip
    return encode_rendered(tokenizer, [rendered])[0][0]


# ---------------------------------------------------------------------------------------------------------------
# Conversations: formats and loading
# ---------------------------------------------------------------------------------------------------------------

ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant",
                "person1": "user", "person2": "assistant"}  # fmt: skip
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
        _check_content(i, message["content"])
    return messages


def normalize_messages(messages: Iterable[dict]) -> list[dict]:
    """Plain ``{"role", "content"}`` dicts: role aliases resolved (``human``/``gpt``/ShareGPT ``from``/``value``),
    content as text (text parts joined). Unknown roles and malformed messages raise ``ValueError``."""
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"message {i} is a {type(message).__name__}, not a dict")
        role = message.get("role", message.get("from"))
        content = message.get("content", message.get("value"))
        role = ROLE_ALIASES.get(str(role).lower(), str(role).lower()) if role is not None else None
        if role not in ROLES:
            raise ValueError(f"message {i}: unknown role {message.get('role', message.get('from'))!r}")
        try:
            text = _content_text(content)
        except TypeError as err:
            raise ValueError(f"message {i}: {err}") from None
        _check_content(i, text)
        out.append({"role": role, "content": text})
    return out


def row_to_messages(row: dict, data_format: str = "auto") -> list[dict]:
    """One dataset row as a list of messages. ``data_format``: ``auto`` (by the row's keys), ``messages``,
    ``sharegpt`` or ``person``."""
    if data_format == "auto":
        if "messages" in row:
            data_format = "messages"
        elif "conversations" in row:
            data_format = "sharegpt"
        elif "conversation" in row:
            data_format = "person"
        else:
            raise ValueError(f"row has none of the keys messages, conversations, conversation: {sorted(row)}")
    if data_format == "messages":
        return normalize_messages(row["messages"])
    if data_format == "sharegpt":
        return normalize_messages(row["conversations"])
    if data_format == "person":
        return parse_person_conversation(row["conversation"])
    raise ValueError(f"unknown data_format {data_format!r}; use auto, messages, sharegpt or person")


def sample_conversations_path() -> Path:
    from llamathink.tokenizer_utils import sample_data_path

    return sample_data_path("conversations.jsonl")


def _iter_rows(source: str, split: str, config_name: str | None) -> Iterable[dict]:
    path = Path(source).expanduser()
    if source == "sample":
        path = sample_conversations_path()
    if path.is_file() and path.name.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{path}:{lineno}: not valid JSON ({err})") from None
        return
    import datasets

    if path.is_file():
        kind = {".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(path.suffix)
        if kind is None:
            raise ValueError(f"{path}: unsupported file type (use .jsonl, .json, .parquet or .csv)")
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    elif path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"{path}: no split {split!r} (splits: {', '.join(ds)})")
            ds = ds[split]
    else:  # a dataset directory with data files, or a Hub id
        ds = datasets.load_dataset(source, config_name, split=split)
    yield from ds


def load_conversations(source: str, *, split: str = "train", data_format: str = "auto", config_name: str | None = None,
                       limit: int | None = None, stats: Counter | None = None) -> list[list[dict]]:  # fmt: skip
    """Conversations (lists of messages) from ``source``: ``"sample"`` (the bundled conversations), a ``.jsonl``
    file, or anything ``datasets`` loads (file, ``save_to_disk`` directory, Hub id with ``split``/``config_name``).
    Rows that cannot be read as a conversation are skipped and counted in ``stats["invalid"]``."""
    stats = stats if stats is not None else Counter()
    conversations = []
    for row in _iter_rows(source, split, config_name):
        if limit is not None and len(conversations) >= limit:
            break
        try:
            conversations.append(row_to_messages(row, data_format))
        except (ValueError, KeyError, TypeError):
            stats["invalid"] += 1
    return conversations


# ---------------------------------------------------------------------------------------------------------------
# Examples: token ids and labels
# ---------------------------------------------------------------------------------------------------------------

IGNORE_INDEX = -100


class Example(NamedTuple):
    input_ids: list[int]
    labels: list[int]


def _finish(ids: list[int], offsets: list[tuple[int, int]], rendered: RenderedChat, messages: list[dict],
            max_len: int, stats: Counter) -> tuple[np.ndarray, np.ndarray] | None:  # fmt: skip
    """Cut one tokenized conversation by the truncation rule; (ids, trained flags) or None when dropped."""
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    starts, stops = off[:, 0], off[:, 1]
    if len(starts) > 1 and bool((np.diff(starts) < 0).any()):
        raise ValueError("the tokenizer's offsets are not in order; it cannot be used with this chat format")
    spans = np.asarray(rendered.label_spans, dtype=np.int64).reshape(-1, 2)
    # a trained span must start and end on token boundaries (no token reaches across "\n" or "</s>")
    for edge in spans.reshape(-1):
        t = int(np.searchsorted(starts, edge, side="right")) - 1
        if t >= 0 and starts[t] < edge < stops[t]:
            raise ValueError(f"the tokenizer makes a token across the edge of an assistant turn (characters "
                             f"{starts[t]}..{stops[t]}, edge {edge}); it cannot be used with this chat "
                             "format")  # fmt: skip
    # token index where each message ends = the first token that starts at or after its last character
    ends = np.searchsorted(starts, np.asarray([e for _, e in rendered.message_spans], dtype=np.int64), side="left")
    keep = None
    for k in range(len(messages), 0, -1):  # the longest prefix of whole messages ending with an assistant turn
        if messages[k - 1]["role"] == "assistant" and ends[k - 1] <= max_len:
            keep = k
            break
    if keep is None:
        stats["too_long"] += 1
        return None
    if any(m["role"] == "assistant" for m in messages[keep:]):
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
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(ids) for ids, _ in rows])
        ids = np.concatenate([r[0] for r in rows]) if rows else np.zeros(0, dtype=np.int32)
        trained = np.concatenate([r[1] for r in rows]) if rows else np.zeros(0, dtype=bool)
        return cls(ids.astype(np.int32, copy=False), trained.astype(bool, copy=False), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def num_trained_tokens(self) -> int:
        return int(self.trained.sum())

    def __getitem__(self, i: int) -> Example:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i = i % len(self)
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        ids = self.ids[a:b]
        return Example(ids.tolist(), np.where(self.trained[a:b], ids, IGNORE_INDEX).tolist())


def build_examples(tokenizer, conversations: Iterable[Sequence[dict]], max_len: int, *,
                   system_prompt: str | None = None, stats: Counter | None = None,
                   chunk_size: int = 256) -> ChatDataset:  # fmt: skip
    """:func:`build_example` over many conversations (tokenized in batches), as a :class:`ChatDataset`.
    ``system_prompt``, if given, is put first in every conversation that has no system message."""
    stats = stats if stats is not None else Counter()
    if max_len < 2:
        raise ValueError(f"max_len must be at least 2, got {max_len}")
    check_chat_tokenizer(tokenizer)
    bos, eos = tokenizer.bos_token, tokenizer.eos_token
    rows: list[tuple[np.ndarray, np.ndarray]] = []
    chunk: list[tuple[list[dict], RenderedChat]] = []

    def flush():
        if chunk:
            encoded = encode_rendered(tokenizer, [r for _, r in chunk])
            for (messages, rendered), (ids, offsets) in zip(chunk, encoded):
                row = _finish(ids, offsets, rendered, messages, max_len, stats)
                if row is not None:
                    rows.append(row)
            chunk.clear()

    for messages in conversations:
        messages = normalize_messages(messages)
        if system_prompt and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": system_prompt}] + messages
        if not any(m["role"] == "assistant" for m in messages):
            stats["no_assistant"] += 1
            continue
        chunk.append((messages, render_chat(messages, bos_token=bos, eos_token=eos)))
        if len(chunk) >= chunk_size:
            flush()
    flush()
    return ChatDataset.from_arrays(rows)


class ChatCollator:
    """Pads a list of examples (:class:`Example`, or dicts with ``input_ids``/``labels``) on the right: ids with
    ``pad_token_id``, labels with -100, ``attention_mask`` 0 on padding. Returns a dict of [B, T] tensors."""

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
        for i, (ids, lab) in enumerate(rows):
            n = len(ids)
            input_ids[i, :n] = torch.as_tensor(list(ids), dtype=torch.long)
            labels[i, :n] = torch.as_tensor(list(lab), dtype=torch.long)
            attention_mask[i, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


# ---------------------------------------------------------------------------------------------------------------
# Chatting: history within the context window, streaming generation
# ---------------------------------------------------------------------------------------------------------------


class ContextOverflow(ValueError):
    """The newest message alone (with the system prompt) does not fit the context window."""


def prompt_ids(tokenizer, messages: Sequence[dict]) -> list[int]:
    """Token ids of ``messages`` followed by the generation prompt.

    With the LlamaThink template (any version, or none set) these are :func:`chat_ids`: message content is
    encoded as text, BOS/EOS only where the template puts them. A tokenizer with another chat template gets that
    template's ``apply_chat_template`` ids."""
    template = getattr(tokenizer, "chat_template", None)
    if template is None or is_llamathink_template(template):
        return chat_ids(tokenizer, messages, add_generation_prompt=True)
    out = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(out["input_ids"])


def trim_history(tokenizer, messages: Sequence[dict], budget: int) -> tuple[list[dict], int]:
    """Drop the oldest messages (leading system messages stay, and the kept history never starts with an
    assistant reply whose question was dropped) until the prompt is at most ``budget`` tokens.
    Returns ``(messages, number dropped)``; raises :class:`ContextOverflow` if the newest message cannot fit."""
    msgs = list(messages)
    n_system = 0
    while n_system < len(msgs) and msgs[n_system]["role"] == "system":
        n_system += 1
    dropped = 0
    while len(prompt_ids(tokenizer, msgs)) > budget:
        if len(msgs) - n_system <= 1:
            raise ContextOverflow(f"the message is too long for the context window ({len(prompt_ids(tokenizer, msgs))} "
                                  f"tokens with the template; at most {budget} leave room for the reply)")  # fmt: skip
        del msgs[n_system]
        dropped += 1
        while len(msgs) - n_system > 1 and msgs[n_system]["role"] == "assistant":
            del msgs[n_system]
            dropped += 1
    return msgs, dropped


class _StreamPrinter:
    """A ``generate()`` streamer (BaseStreamer interface) that writes the reply as it grows: the reply tokens are
    decoded from the start each time and the new text is written, holding back an incomplete UTF-8 character and
    trailing whitespace, so that what is written is exactly the stripped reply."""

    def __init__(self, tokenizer, out: TextIO):
        self.tokenizer, self.out = tokenizer, out
        self.tokens: list[int] = []
        self.printed = 0
        self.prompt_seen = False

    def _text(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True).lstrip()

    def put(self, value):
        if not self.prompt_seen:  # generate() first hands over the prompt
            self.prompt_seen = True
            return
        self.tokens.extend(value.reshape(-1).tolist())
        text = self._text().rstrip("\ufffd").rstrip()
        if len(text) > self.printed:
            self.out.write(text[self.printed :])
            self.out.flush()
            self.printed = len(text)

    def end(self):
        text = self._text().rstrip()
        if len(text) > self.printed:
            self.out.write(text[self.printed :])
        self.printed = len(text)
        self.out.flush()


@dataclass
class GenerationSettings:
    max_new_tokens: int = 256
    temperature: float = 0.7  # 0: greedy
    top_k: int = 50  # 0: off
    top_p: float = 0.9  # 1.0: off


class ChatSession:
    """A conversation with a model: ``reply(text)`` adds a user message, trims the history to the context window,
    generates (streaming to ``stream`` if given) and records the reply. On any interruption (Ctrl-C included) the
    history is left as it was before the call."""

    def __init__(self, model, tokenizer, *, system: str | None = None, settings: GenerationSettings | None = None,
                 max_context: int | None = None, notices: TextIO | None = None):  # fmt: skip
        self.model, self.tokenizer = model, tokenizer
        self.system = system
        self.settings = settings or GenerationSettings()
        self.max_context = int(max_context or getattr(model.config, "max_position_embeddings", 2048))
        self.notices = notices
        self.messages: list[dict] = []
        self.reset()

    def reset(self):
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    @property
    def reserve(self) -> int:
        """Tokens kept free for the reply: max_new_tokens, at most half of the context window."""
        return max(1, min(self.settings.max_new_tokens, self.max_context // 2))

    def reply(self, text: str, stream: TextIO | None = None) -> str:
        import torch

        before = list(self.messages)
        try:
            msgs, dropped = trim_history(self.tokenizer, before + [{"role": "user", "content": text}],
                                         self.max_context - self.reserve)  # fmt: skip
            if dropped and self.notices is not None:
                self.notices.write(f"[dropped the {dropped} oldest message{'s' if dropped > 1 else ''} to fit the "
                                   f"{self.max_context}-token context window]\n")  # fmt: skip
                self.notices.flush()
            ids = prompt_ids(self.tokenizer, msgs)
            max_new = min(self.settings.max_new_tokens, self.max_context - len(ids))
            device = next(self.model.parameters()).device
            input_ids = torch.tensor([ids], dtype=torch.long, device=device)
            s = self.settings
            kwargs: dict[str, Any] = dict(max_new_tokens=max_new, eos_token_id=self.tokenizer.eos_token_id,
                                          pad_token_id=self.tokenizer.pad_token_id,
                                          attention_mask=torch.ones_like(input_ids))  # fmt: skip
            if s.temperature > 0:
                kwargs.update(do_sample=True, temperature=s.temperature, top_k=max(0, int(s.top_k)),
                              top_p=min(1.0, float(s.top_p)))  # fmt: skip
            else:
                kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
            if stream is not None:
                kwargs["streamer"] = _StreamPrinter(self.tokenizer, stream)
            with torch.no_grad():
                out = self.model.generate(input_ids, **kwargs)
            new = out[0, len(ids) :].tolist()
            answer = self.tokenizer.decode(new, skip_special_tokens=True).strip()
            self.messages = msgs + [{"role": "assistant", "content": answer}]
            return answer
        except BaseException:
            self.messages = before
            raise


# ---------------------------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------------------------

HELP = "/reset clears the history, /exit or Ctrl-D quits, Ctrl-C stops a reply (and quits at the prompt)"


def _read_line(stdin: TextIO, prompt: str) -> str | None:
    """One line of input, or None at EOF. On a terminal ``input()`` gives line editing."""
    if stdin is sys.stdin and stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        try:
            return input(prompt)
        except EOFError:
            return None
    line = stdin.readline()
    return None if line == "" else line


def run_interactive(session: ChatSession, stdin: TextIO | None = None, stdout: TextIO | None = None,
                    stderr: TextIO | None = None) -> int:  # fmt: skip
    """The interactive loop: read a line, stream the reply, repeat until EOF, ``/exit`` or Ctrl-C at the prompt."""
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    tty = stdin is sys.stdin and stdin.isatty()
    stderr.write(f"[{HELP}]\n")
    stderr.flush()
    while True:
        try:
            line = _read_line(stdin, "> " if tty else "")
        except KeyboardInterrupt:
            stderr.write("\n")
            return 0
        if line is None:
            if tty:
                stderr.write("\n")
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            session.reset()
            stderr.write("[history cleared]\n")
            continue
        if text == "/help":
            stderr.write(f"[{HELP}]\n")
            continue
        try:
            session.reply(text, stream=stdout)
            stdout.write("\n")
            stdout.flush()
        except KeyboardInterrupt:
            stdout.write("\n")
            stderr.write("[interrupted; this exchange is not kept]\n")
        except ValueError as err:  # ContextOverflow, or a message the template refuses (U+FDD0)
            stderr.write(f"[{err}]\n")
        stderr.flush()


def load_chat_model(path: str, *, tokenizer: str | None = None, device: str = "auto", dtype: str = "auto",
                    trust_remote_code: bool = False):  # fmt: skip
    """Model (eval mode) and tokenizer for chatting. A tokenizer without a chat template gets LlamaThink's."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    import llamathink  # noqa: F401  (registers LlamaThink with the Auto classes)
    from llamathink.tokenizer_utils import load_tokenizer

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    hf_logging.disable_progress_bar()  # no "Loading weights" bar in front of the chat
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code)
    model.to(device).eval()
    tok = load_tokenizer(tokenizer or path)
    template = getattr(tok, "chat_template", None)
    if not template:
        print(f"[{tokenizer or path}: the tokenizer has no chat template; using LlamaThink's]", file=sys.stderr)
        set_chat_template(tok)
    elif is_llamathink_template(template):
        set_chat_template(tok)  # an older checkpoint's copy of the format: the current one, content guarded
    return model, tok


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="llamathink-chat", description="Chat with a (finetuned) LlamaThink model in "
                                 "the terminal; replies stream as they are generated. " + HELP + ".")  # fmt: skip
    ap.add_argument("model", help="a save_pretrained directory (e.g. runs/quickstart/chat/final) or a Hub id")
    ap.add_argument("-p", "--prompt", help="one-shot: send this message ('-' reads it from stdin), print the reply "
                    "and exit")  # fmt: skip
    ap.add_argument("--system", help="system prompt")
    ap.add_argument("--tokenizer", help="tokenizer (default: the model's)")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.7, help="0 for greedy decoding")
    ap.add_argument("--top-k", type=int, default=50, help="0 turns it off")
    ap.add_argument("--top-p", type=float, default=0.9, help="1.0 turns it off")
    ap.add_argument("--greedy", action="store_true", help="greedy decoding (same as --temperature 0)")
    ap.add_argument("--seed", type=int, help="random seed for sampling")
    ap.add_argument("--max-context", type=int, help="context window in tokens (default: the model's)")
    ap.add_argument("--no-stream", action="store_true", help="print each reply when complete")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    ap.add_argument("--trust-remote-code", action="store_true",
                    help="load the model code stored with the checkpoint (needed only without this package)")
    args = ap.parse_args(argv)
    if args.max_new_tokens < 1:
        ap.error("--max-new-tokens must be at least 1")
    # float() takes "nan" and "inf": a NaN temperature would silently mean greedy decoding
    if not math.isfinite(args.temperature) or args.temperature < 0:
        ap.error(f"--temperature must be a finite number >= 0 (got {args.temperature})")
    if not 0 <= args.top_p <= 1:  # also refuses NaN
        ap.error(f"--top-p must be in [0, 1] (got {args.top_p})")
    if args.top_k < 0:
        ap.error(f"--top-k must be >= 0 (got {args.top_k})")
    if args.max_context is not None and args.max_context < 2:  # 0 would silently mean the model's window
        ap.error(f"--max-context must be at least 2 (got {args.max_context})")
    if hasattr(sys.stdin, "reconfigure"):  # invalid UTF-8 in: a clear refusal per message, not a traceback
        sys.stdin.reconfigure(errors="surrogateescape")

    import torch

    if args.seed is not None:
        torch.manual_seed(args.seed)
    model, tokenizer = load_chat_model(args.model, tokenizer=args.tokenizer, device=args.device, dtype=args.dtype,
                                       trust_remote_code=args.trust_remote_code)  # fmt: skip
    settings = GenerationSettings(args.max_new_tokens, 0.0 if args.greedy else args.temperature, args.top_k,
                                  args.top_p)  # fmt: skip
    session = ChatSession(model, tokenizer, system=args.system, settings=settings, max_context=args.max_context,
                          notices=sys.stderr)  # fmt: skip
    if args.prompt is None:
        return run_interactive(session)
    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    try:
        if args.no_stream:
            print(session.reply(text))
        else:
            session.reply(text, stream=sys.stdout)
            print()
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except ValueError as err:  # ContextOverflow, or a message the template refuses (U+FDD0)
        print(f"error: {err}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # e.g. piped into `head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
