"""The LlamaThink chat format: role markers, the Jinja chat template and its text guard, rendering and
tokenizing conversations, and fitting a history into the context window.

Used by the finetuning data (:mod:`llamathink.data.chat`), the ``llamathink-chat`` command
(:mod:`llamathink.chat`), chat finetuning (:mod:`llamathink.train.finetune`) and the C exporter (``export_c``).

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
tokens finetuning trains on (:mod:`llamathink.data.chat`).

Tokenization, and what the C runner must do
-------------------------------------------

Message content is always text: a ``</s>``, ``<s>`` or ``<unk>`` typed in a message is encoded as those
characters, and BOS/EOS enter only where the template puts them. :func:`chat_ids` (used by :func:`prompt_ids`,
the chat CLI and :func:`llamathink.data.chat.build_example`) renders the conversation, cuts the text at the template's BOS/EOS,
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
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import sys
import time
from typing import Any, Iterable, NamedTuple, Sequence

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
{#- transformers' continue_final_message appends "CONTINUE_FINAL_MESSAGE_TAG " to the last message and looks for
    its raw text in the render: a guarded one is refused by name -#}
{{- bos_token -}}
{%- for message in messages -%}
    {%- if message['content'] is string -%}
        {%- set content = message['content'] | trim -%}
    {%- elif message['content'] is defined and message['content'] is not none and message['content'] is iterable
            and message['content'] is not mapping -%}
        {%- set i = loop.index0 -%}
        {%- for part in message['content'] -%}
            {%- if part is not mapping or part['type'] != 'text' or part['text'] is not string -%}
                {{- raise_exception('LlamaThink chat template: message ' ~ i ~ ' part ' ~ loop.index0 ~
                                    ' is not a text part {"type": "text", "text": "..."}; this model reads text only') -}}
            {%- endif -%}
        {%- endfor -%}
        {%- set content = message['content'] | map(attribute='text') | join('') | trim -%}
    {%- else -%}
        {{- raise_exception('LlamaThink chat template: message ' ~ loop.index0 ~
                            ' has no text content (missing, null, or not a string or a list of text parts)') -}}
    {%- endif -%}
    {%- if '\uFDD0' in content -%}
        {{- raise_exception('LlamaThink chat template: message ' ~ loop.index0 ~
                            ' contains U+FDD0, a Unicode noncharacter the template reserves') -}}
    {%- endif -%}
    {%- set continued = loop.last and not add_generation_prompt
            and (message['content'] if message['content'] is string
                 else message['content'] | map(attribute='text') | join('')).endswith('CONTINUE_FINAL_MESSAGE_TAG ') -%}
    {%- if continued and content == 'CONTINUE_FINAL_MESSAGE_TAG' -%}
        {#- an empty text to continue: the tag's space kept, so that transformers cuts at the tag exactly instead
            of stripping the role marker's newline -#}
        {%- set content = 'CONTINUE_FINAL_MESSAGE_TAG ' -%}
    {%- endif -%}
    {%- if continued and '<' in content -%}
        {{- raise_exception('LlamaThink chat template: the last message ends with "CONTINUE_FINAL_MESSAGE_TAG ", '
                            ~ "transformers' mark of continue_final_message, and contains \"<\", which the template "
                            ~ 'guards, so transformers would not find its raw text: continue it with '
                            ~ 'llamathink.chat_format.chat_ids(tokenizer, messages, continue_final_message=True)') -}}
    {%- endif -%}
    {%- set content = content | replace('<', '<\uFDD0') -%}
    {%- if message['role'] == 'system' -%}
        {{- '### System:\n' + content + '\n\n' -}}
    {%- elif message['role'] == 'user' -%}
        {{- '### User:\n' + content + '\n\n' -}}
    {%- elif message['role'] == 'assistant' -%}
        {{- '### Assistant:\n' -}}
        {%- if message['weight'] is defined and message['weight'] == 0 -%}
            {{- content + eos_token -}}
        {%- else -%}
            {%- generation -%}
                {{- content + eos_token -}}
            {%- endgeneration -%}
        {%- endif -%}
    {%- else -%}
        {{- raise_exception('LlamaThink chat template: unknown role ' ~ message['role'] ~ '; use system, user or assistant') -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '### Assistant:\n' -}}
{%- endif -%}
"""
# The template's comments name llamathink/chat.py (and llamathink.chat.TEXT_GUARD), where the format lived before
# it moved to this module; the text must stay as it is (saved tokenizers carry it, and is_llamathink_template
# recognises it by its SHA-256 below).
# SHA-256 of every CHAT_TEMPLATE text this project has shipped (oldest first; the last is the current one), each
# taken of `template_key(text)`, so that an editor's trailing-whitespace clean-up does not make it another template.
# A saved tokenizer holding one of them gets the current format; an edited copy is another template, used as written.
SHIPPED_TEMPLATE_SHA256 = (
    "a2dc9548da322eb2f86bbf53c7d8a9204fe0b02659d3f67663def73c041dc654",
    "d67d7a053f08de259b6640594a16e0cb4c4edd2db4660c685f7183d61fa56e5e",
    "5677f5de333253751341b837ef9d26a8e00a34229d823973fa469e9629ea8ee8",
    "2667e2c188813254659f81cf9cccd2355305351c9a621593773c0727b4bf9af5",  # an assistant message's "weight": 0
    "1c60be4aaa79842d9344a20c11510737154fc2525bff644da9b58d84b23178e6",  # session 50's first two forms of
    "f8cc2011c1617e87adb0da155a4241f4bff44415e4e2068353312a873559d8f2",  # continue_final_message (briefly on main)
    "9133e9d9857dbc45ccf888a5dbab88c59514f5595d356276094032f7e4ae7464",  # continue_final_message: "<" refused
)
_TEMPLATE_SIGNATURE = "{#- LlamaThink chat format (llamathink/chat.py)"


def template_key(template: str) -> str:
    """SHA-256 of a template's text without trailing whitespace on its lines and at its ends (what editors and
    pre-commit hooks change): the key of :data:`SHIPPED_TEMPLATE_SHA256`."""
    text = "\n".join(line.rstrip() for line in template.strip().splitlines())
    return hashlib.sha256(text.encode()).hexdigest()


def is_llamathink_template(template: str | None) -> bool:
    """True for :data:`CHAT_TEMPLATE` and for the LlamaThink templates of earlier versions, saved with older
    checkpoints (as shipped, up to trailing whitespace: :data:`SHIPPED_TEMPLATE_SHA256`). An edited copy is not
    one of them."""
    return isinstance(template, str) and template_key(template) in SHIPPED_TEMPLATE_SHA256


def looks_like_llamathink_template(template: str | None) -> bool:
    """True for a template that starts with the LlamaThink format's first comment, shipped or edited."""
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
            raise ValueError(
                f"added token {content!r} {problem}; the LlamaThink chat format cannot keep message "
                "content from being read as this token"
            )


def _install_text_guard(tokenizer) -> None:
    """Put ``Replace(TEXT_GUARD, "")`` first in the tokenizer's normalizer (once; saved in tokenizer.json)."""
    from tokenizers import normalizers

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(
            f"the LlamaThink chat template needs a fast (tokenizers-backed) tokenizer, got {type(tokenizer).__name__}"
        )
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
    """A message's content as text: a string, or a list of `{"type": "text", "text": str}` parts (joined).
    TypeError for anything else, a missing (None) content included: a message without text, or with parts this
    text-only model cannot read, would otherwise train on an empty or made-up ("None") reply."""
    if isinstance(content, str):
        return content
    if content is None:
        raise TypeError("it has no content (missing or null)")
    if isinstance(content, (list, tuple)):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise TypeError(
                    f'content part {j} is not a text part {{"type": "text", "text": "..."}} (got {part!r:.80}); '
                    "this model reads text only"
                )
            texts.append(part["text"])
        return "".join(texts)
    raise TypeError(f"message content must be a string or a list of text parts, got {type(content).__name__}")


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def check_content(i: int, content: str, name: str | None = None) -> None:
    """Refuse the content of message `i` (ValueError naming it, as `name` where given: "your message") when it
    holds U+FDD0 (`TEXT_GUARD`) or a lone surrogate (text that was not valid UTF-8)."""
    name = name or f"message {i}"
    if TEXT_GUARD in content:
        raise ValueError(
            f"{name} contains U+FDD0, a Unicode noncharacter the chat template reserves to keep "
            "content from forming special tokens; remove it"
        )
    # a lone surrogate is not text (Python decodes invalid UTF-8 input to them with surrogateescape): the
    # tokenizer cannot encode it, and run.c refuses the same bytes
    bad = _LONE_SURROGATE.search(content)
    if bad:
        raise ValueError(
            f"{name} is not valid text: lone surrogate U+{ord(bad.group()):04X} at character "
            f"{bad.start()} (invalid UTF-8 input?)"
        )


def storable_text(text: str) -> str:
    """`text` with every character `check_content` refuses (U+FDD0, lone surrogates) replaced by U+FFFD, the
    replacement character: for the model's own replies, which sampling can make of any bytes and which go back
    into the history that every later turn renders."""
    return _LONE_SURROGATE.sub("\ufffd", text.replace(TEXT_GUARD, "\ufffd"))


ROLE_ALIASES = {
    "human": "user",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "person1": "user",
    "person2": "assistant",
}


def _message_weight(i: int, role: str, message: dict) -> int:
    """An assistant message's ``weight`` (OpenAI's fine-tuning format): 1 (trained, the default) or 0 (kept as
    context, not trained). ValueError for another value, or a weight on a message of another role (never trained)."""
    weight = message["weight"]
    if isinstance(weight, bool) or weight not in (0, 1):
        raise ValueError(f"message {i}: weight must be 0 (not trained) or 1 (trained), got {weight!r}")
    if role != "assistant":
        raise ValueError(f"message {i}: weight applies to assistant messages only (a {role} message is never trained)")
    return int(weight)


def is_trained(message: dict) -> bool:
    """Whether finetuning trains on `message`: an assistant message, unless it has ``"weight": 0`` (kept as
    context; `normalize_messages`)."""
    return message.get("role") == "assistant" and message.get("weight", 1) != 0


def normalize_messages(messages: Iterable[dict]) -> list[dict]:
    """Plain ``{"role", "content"}`` dicts: role aliases resolved (``human``/``gpt``/ShareGPT ``from``/``value``),
    content as text (text parts joined). An assistant message's ``"weight": 0`` (OpenAI's fine-tuning format: kept
    as context, not trained) is kept as ``"weight": 0`` (1, the default, is left out). Unknown roles, malformed
    messages, weights other than 0 and 1, and ``messages`` that are not a list (or another sequence) of them raise
    ``ValueError``."""
    if isinstance(messages, (str, bytes, dict)) or not isinstance(messages, Iterable):
        raise ValueError(  # noqa: TRY004
            f"messages must be a list of {{role, content}} objects, got {type(messages).__name__}"
        )
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
        check_content(i, text)
        out.append({"role": role, "content": text})
        # (null is no weight: datasets' struct columns give every message the keys any message of the data has)
        if message.get("weight") is not None and _message_weight(i, role, message) == 0:
            out[-1]["weight"] = 0
    return out


def render_chat(
    messages: Sequence[dict],
    *,
    bos_token: str = "<s>",
    eos_token: str = "</s>",
    add_generation_prompt: bool = False,
    guard: bool = False,
    continue_final_message: bool = False,
) -> RenderedChat:
    """The chat format in Python: the rendered text, where each message and each trained span (assistant content
    and its EOS) lie in it, and where the template's own BOS/EOS tokens are (``special_spans``).

    ``guard=False`` gives the text the model reads (content verbatim); ``guard=True`` the text :data:`CHAT_TEMPLATE`
    renders (every ``<`` in a content followed by :data:`TEXT_GUARD`). Content is ``str.strip``-ped.
    ``continue_final_message`` leaves the last message open, without its end (EOS, or a turn's blank line), for the
    model to continue (an assistant prefill), as transformers' option of that name does. Raises ``ValueError`` for
    an unknown role, a content that contains :data:`TEXT_GUARD` or a lone surrogate, or ``continue_final_message``
    with no message or with ``add_generation_prompt``."""
    if continue_final_message and (add_generation_prompt or not messages):
        raise ValueError(
            "continue_final_message continues the last message: it needs a message, and no add_generation_prompt"
        )
    parts, pos = [bos_token], len(bos_token)
    message_spans, label_spans, special_spans = [], [], [(0, len(bos_token), "bos")]
    for i, message in enumerate(messages):
        role = message.get("role")
        try:
            content = _content_text(message.get("content")).strip()
        except TypeError as err:
            raise ValueError(f"message {i}: {err}") from None
        check_content(i, content)
        if guard:
            content = content.replace(CONTROL_TOKEN_START, CONTROL_TOKEN_START + TEXT_GUARD)
        open_end = continue_final_message and i == len(messages) - 1  # left open: no end of turn
        if role == "system":
            block = SYSTEM_PREFIX + content + ("" if open_end else TURN_SUFFIX)
        elif role == "user":
            block = USER_PREFIX + content + ("" if open_end else TURN_SUFFIX)
        elif role == "assistant":
            block = ASSISTANT_PREFIX + content + ("" if open_end else eos_token)
            if is_trained(message):
                label_spans.append((pos + len(ASSISTANT_PREFIX), pos + len(block)))
            if not open_end:
                special_spans.append((pos + len(block) - len(eos_token), pos + len(block), "eos"))
        else:
            raise ValueError(f"message {i}: unknown role {role!r}; use system, user or assistant")
        parts.append(block)
        message_spans.append((pos, pos + len(block)))
        pos += len(block)
    if add_generation_prompt:
        parts.append(ASSISTANT_PREFIX)
    return RenderedChat("".join(parts), message_spans, label_spans, special_spans)


def apply_template(
    messages: Sequence[dict], *, bos_token: str = "<s>", eos_token: str = "</s>", add_generation_prompt: bool = False
) -> str:
    """The rendered text of ``messages``, guarded (what ``tokenizer.apply_chat_template(..., tokenize=False)``
    returns with :data:`CHAT_TEMPLATE`; for content without ``<`` the plain text)."""
    return render_chat(
        messages, bos_token=bos_token, eos_token=eos_token, add_generation_prompt=add_generation_prompt, guard=True
    ).text


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
    enc = (
        tokenizer(  # verbose=False: no "longer than the maximum" warning; callers check lengths and say what to do
            [t for _, t in segments],
            add_special_tokens=False,
            split_special_tokens=True,
            return_offsets_mapping=True,
            verbose=False,
        )
        if segments
        else {"input_ids": [], "offset_mapping": []}
    )
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


def chat_ids(
    tokenizer, messages: Sequence[dict], *, add_generation_prompt: bool = False, continue_final_message: bool = False
) -> list[int]:
    """Token ids of ``messages`` in the LlamaThink format, content as text (:func:`encode_rendered`): equal to
    ``tokenizer.apply_chat_template(messages, add_generation_prompt=..., tokenize=True)`` once
    :func:`set_chat_template` has been applied, and to what the C runner feeds. ``continue_final_message`` leaves
    the last message open (an assistant prefill: the ids end with its text, no EOS), as transformers' option does,
    also for a text with ``<`` (which :data:`CHAT_TEMPLATE` refuses there, since transformers looks for the raw text
    in the guarded render). ``messages`` may use the aliases and keys :func:`llamathink.data.chat.normalize_messages`
    accepts (``human``/``gpt``, ShareGPT ``from``/``value``). Raises ``ValueError`` as :func:`render_chat`."""
    # imported here: llamathink.data.chat builds on this module, so a module-level import would be circular

    rendered = render_chat(
        normalize_messages(messages),
        bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token,
        add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final_message,
    )
    return encode_rendered(tokenizer, [rendered])[0][0]


# ---------------------------------------------------------------------------------------------------------------
# Chatting: history within the context window
# ---------------------------------------------------------------------------------------------------------------


TEMPLATE_RENDER_LIMIT_S = 10.0  # a chat template that takes longer to render a conversation is stopped
# A chat template's rendering of one conversation longer than this many characters is refused before it is
# tokenized: far beyond what any context window holds (each typed message is checked against the window), it can
# only be a template that prints without end, which would take the tokenizer minutes and gigabytes.
TEMPLATE_OUTPUT_LIMIT_CHARS = 1 << 24


class TemplateRenderTimeout(ValueError):
    """A chat template ran past `TEMPLATE_RENDER_LIMIT_S` rendering one conversation (`render_deadline`)."""


@contextlib.contextmanager
def render_deadline(seconds: float | None = None, what: str = "the tokenizer's chat template"):
    """While the block runs, stop any Jinja template code (the Python that jinja2 compiles a template to, running
    in frames of the file "<template>") after `seconds` (default `TEMPLATE_RENDER_LIMIT_S`), with
    `TemplateRenderTimeout` naming `what`: a template
    that loops without end (jinja2's sandbox caps each `range` at 100,000 items, not loops inside loops) would
    otherwise hang the chat. Only template frames are traced line by line, and only in this thread; the earlier
    trace function (a debugger's, coverage's) is put back after."""
    seconds = TEMPLATE_RENDER_LIMIT_S if seconds is None else seconds
    deadline = time.monotonic() + seconds

    def on_line(frame, event, arg):
        if time.monotonic() > deadline:
            raise TemplateRenderTimeout(
                f"{what} took longer than {seconds:g} s to render the conversation and was stopped (a loop without "
                "end?); use another template, or LlamaThink's (`set_chat_template`)"
            )
        return on_line

    def on_call(frame, event, arg):
        return on_line if frame.f_code.co_filename == "<template>" else None

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        yield
    finally:
        sys.settrace(previous)


class ContextOverflow(ValueError):
    """The newest message alone (with the system prompt) does not fit the context window."""


def prompt_ids(tokenizer, messages: Sequence[dict]) -> list[int]:
    """Token ids of ``messages`` followed by the generation prompt.

    With the LlamaThink template (any version, or none set) these are :func:`chat_ids`: message content is
    encoded as text, BOS/EOS only where the template puts them. A tokenizer with another chat template gets that
    template's ``apply_chat_template`` ids; what that template raises (a role it does not take, a turn order) is a
    ValueError naming the template's own message. Raises ValueError where, with another template, a user or system
    message holds the text of one of the tokenizer's special tokens (that template would encode it as the token),
    or where that template renders the conversation as more than `TEMPLATE_OUTPUT_LIMIT_CHARS` characters;
    `TemplateRenderTimeout` where it takes longer than `TEMPLATE_RENDER_LIMIT_S` (`render_deadline`)."""
    template = getattr(tokenizer, "chat_template", None)
    if template is None or is_llamathink_template(template):
        return chat_ids(tokenizer, messages, add_generation_prompt=True)
    # Another template is rendered to text and tokenized whole, where a special token's text in a typed message (a
    # "</s>") would become that token: refused, since only our template keeps content apart from control tokens.
    # (The model's own replies are not checked: refusing one would refuse every later turn of the session.)
    # (the named special tokens, and every token added as special: TRL's clone_chat_template adds a template's
    # control tokens so, and they are in no special-token list but the one it makes EOS)
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    special_added = {str(t) for t in added.values() if getattr(t, "special", False)}
    controls = sorted((set(tokenizer.all_special_tokens) | special_added) - {""}, key=len, reverse=True)
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") == "assistant":
            continue
        try:  # (a list of text parts as well as a string)
            content = _content_text(message.get("content"))
        except TypeError:  # (refused by the template's own rendering, or by `chat_ids`)
            continue
        found = next((t for t in controls if t in content), None)
        if found is not None:
            raise ValueError(
                f"message {i} contains {found!r}, the text of a special token, which this tokenizer's chat template "
                "(not LlamaThink's) would encode as that token itself; remove it, or use the LlamaThink template "
                "(`set_chat_template`), which keeps typed text as text"
            )

    def render(**kwargs):
        try:
            with render_deadline():
                return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, **kwargs)
        except TemplateRenderTimeout:
            raise
        except Exception as err:  # jinja2's TemplateError (a template's raise_exception: "System role not supported")
            raise ValueError(
                f"the tokenizer's chat template refuses this conversation ({type(err).__name__}: {err})"
            ) from err

    # rendered to text first, so that a template that prints without end is refused before the tokenizer reads it;
    # then as transformers tokenizes it (its options for a rendered chat: no BOS/EOS added, its control tokens)
    text = render(tokenize=False)
    if isinstance(text, str) and len(text) > TEMPLATE_OUTPUT_LIMIT_CHARS:
        raise ValueError(
            f"the tokenizer's chat template renders this conversation as {len(text):,} characters, more than any "
            f"context window holds (at most {TEMPLATE_OUTPUT_LIMIT_CHARS:,}; a template that prints without end?); "
            "use another template, or LlamaThink's (`set_chat_template`)"
        )
    return list(render(tokenize=True, return_dict=True)["input_ids"])


def max_token_chars(tokenizer) -> int:
    """The most characters one token of ``tokenizer`` can stand for: its longest vocabulary piece. A piece is at
    least as long as its text for SentencePiece vocabularies (``▁`` is one space, a byte token ``<0x0A>`` six
    characters for one byte) and byte-level BPE ones (one character per byte). Kept on the tokenizer for its
    vocabulary size (a token added later computes it again)."""
    cached = getattr(tokenizer, "_llamathink_max_token_chars", None)
    if cached is not None and cached[0] == len(tokenizer):
        return cached[1]
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    longest = max(1, max((len(p) for p in pieces if isinstance(p, str)), default=1))
    with contextlib.suppress(AttributeError, TypeError):  # (a tokenizer that takes no attributes computes each time)
        tokenizer._llamathink_max_token_chars = (len(tokenizer), longest)
    return longest


# Text longer than this many times the characters its tokens could hold is refused before it is tokenized: a
# normaliser may shorten text (NFKC composes some pairs), hence the margin; within it the tokenizer decides.
_CHARS_MARGIN = 4


def max_fitting_chars(tokenizer, budget: int) -> int:
    """The most characters a text can have and still fit ``budget`` tokens of ``tokenizer``, as far as its
    characters alone tell: ``_CHARS_MARGIN`` times ``budget`` tokens of ``max_token_chars`` each. A longer text
    certainly does not fit; it is refused or cut without being tokenized (megabytes take the tokenizer minutes
    and gigabytes)."""
    return _CHARS_MARGIN * max(budget, 0) * max_token_chars(tokenizer)


def check_fits(tokenizer, text: str, budget: int, what: str = "the message") -> None:
    """Raise :class:`ContextOverflow` when ``text`` has so many characters that it cannot fit ``budget`` tokens
    (`max_fitting_chars`), without tokenizing it: a pasted file of megabytes would otherwise take the tokenizer
    minutes and gigabytes before the context check."""
    limit = max_fitting_chars(tokenizer, budget)
    template = getattr(tokenizer, "chat_template", None)
    ours = template is None or is_llamathink_template(template)  # (our template strips content: another may not)
    chars = len(text.strip()) if ours else len(text)
    if chars > limit:
        raise ContextOverflow(
            f"{what} is too long for the context window ({chars:,} characters; at most {budget} tokens leave "
            f"room for the reply, which no text over {limit:,} characters fits in with this tokenizer)"
        )


def trim_history(tokenizer, messages: Sequence[dict], budget: int) -> tuple[list[dict], int]:
    """Drop the oldest messages (leading system messages stay, and the kept history never starts with an
    assistant reply whose question was dropped) until the prompt is at most ``budget`` tokens.
    Returns ``(messages, number dropped)``; raises :class:`ContextOverflow` if the newest message cannot fit (at
    once, untokenized, when its characters alone rule it out: `check_fits`)."""
    msgs = list(messages)
    if msgs and isinstance(msgs[-1], dict):
        with contextlib.suppress(TypeError):  # (content that is not text: named where the message is rendered)
            check_fits(tokenizer, _content_text(msgs[-1].get("content")), budget)
    n_system = 0
    while n_system < len(msgs) and msgs[n_system]["role"] == "system":
        n_system += 1
    dropped = 0
    while len(prompt_ids(tokenizer, msgs)) > budget:
        if len(msgs) - n_system <= 1:
            raise ContextOverflow(
                f"the message is too long for the context window ({len(prompt_ids(tokenizer, msgs))} "
                f"tokens with the template; at most {budget} leave room for the reply)"
            )
        del msgs[n_system]
        dropped += 1
        while len(msgs) - n_system > 1 and msgs[n_system]["role"] == "assistant":
            del msgs[n_system]
            dropped += 1
    return msgs, dropped
