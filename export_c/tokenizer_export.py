"""Write tokenizer.bin (read by run.c) from a SentencePiece tokenizer.model or an HF tokenizer.json.

Usage:
    python -m export_c.tokenizer_export <dir> <tokenizer.bin> [--chat-marker KEY=VALUE ...]
                                        [--no-chat-markers] [--sentencepiece | --transformers-rules]

Sources, in order of preference inside <dir> (the file transformers loads from it):
  * tokenizer.json (HF `tokenizers` BPE): scores derived from merge ranks (score of a piece =
    -rank of the first merge producing it; pieces no merge produces are never merge targets).
  * tokenizer.model (SentencePiece; parsed directly from its protobuf, no extra package):
    pieces, scores, piece types (byte pieces <0x00>..<0xFF>), BOS/EOS/UNK ids.
A tokenizer.model is encoded as training read it (llamathink.tokenizer_utils.load_tokenizer): a .model
file, or a folder holding it without a tokenizer_config.json naming LlamaTokenizer, by SentencePiece's
own rules (piece scores, a U+2581 prefix always: --sentencepiece); a folder whose tokenizer_config.json
names LlamaTokenizer like transformers' LlamaTokenizer, which AutoTokenizer loads from it (merges ranked
by piece id, no U+2581 prefix when the text already starts with a space or U+2581, HF Metaspace
prepend_scheme="first": --transformers-rules; add_prefix_space false in that tokenizer_config.json: no prefix).
A tokenizer.json carries its own rules; the two options are refused for it. Its rules, as transformers encodes
with them (for a folder, those of the tokenizer class AutoTokenizer loads), are read by running them (the
tokenizers library) on probe texts (`check_text_rules`): a tokenizer whose rules run.c cannot follow (a
byte-level or lowercasing step, words split before the merges, added tokens that are not special, ...) is refused,
not exported to encode otherwise. So is a tokenizer.model that normalizes text (`_parse_sentencepiece`).

Text guard: a tokenizer that went through llamathink.chat_format.set_chat_template has Replace(U+FDD0, "")
as the first step of its normalizer (tokenizer.json), so it deletes U+FDD0 from every text it encodes;
flag 8 in tokenizer.bin tells run.c to do the same (also for a tokenizer.model whose directory holds
such a tokenizer.json, which is what transformers loads from that directory).

Chat markers: by default tokenizer.bin stores llamathink.chat_format.CHAT_MARKERS (the strings of
the chat template that run.c's chat mode rebuilds; an assistant turn ends with the EOS token, so
assistant_suffix is empty); --chat-marker KEY=VALUE overrides one key (backslash escapes such as \\n
are decoded), --no-chat-markers stores only the --chat-marker ones. A key run.c does not read, or a
non-empty assistant_suffix, is refused (`CHAT_MARKER_KEYS`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import struct
import sys

TK_MAGIC = 0x4B54544C  # b"LTTK"
TK_VERSION = 1
TK_HEADER_SIZE = 64
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
FLAG_DUMMY_PREFIX = 1
FLAG_BYTE_FALLBACK = 2
FLAG_NO_PREFIX_IF_SPACE = 4  # no prefix where the text starts with a space or U+2581 (HF's Metaspace)
FLAG_DROP_TEXT_GUARD = 8  # delete U+FDD0 before anything else (llamathink.chat_format.set_chat_template)
# no prefix either where flag 8 deleted the text's first characters (HF's Metaspace "first": only a word at the
# original text's offset 0 is prefixed; "always" prefixes it)
FLAG_PREFIX_AT_OFFSET_0 = 16
# llamathink.chat_format.TEXT_GUARD (a copy: the exporter also runs without the package)
TEXT_GUARD = "\ufdd0"
NO_MERGE = -1e30


class TokenizerExportError(Exception):
    """A tokenizer file the exporter cannot write for run.c; the message names the file and why."""


def _varint(b: bytes, i: int) -> tuple[int, int]:
    v = shift = 0
    while True:
        if i >= len(b):
            raise TokenizerExportError("truncated protobuf varint")
        c = b[i]
        i += 1
        v |= (c & 0x7F) << shift
        shift += 7
        if not c & 0x80:
            return v, i


def _fields(b: bytes):
    """Yield (field_number, wire_type, value) of a protobuf message."""
    i = 0
    while i < len(b):
        key, i = _varint(b, i)
        fn, wt = key >> 3, key & 7
        if wt == 0:
            v, i = _varint(b, i)
            yield fn, wt, v
            continue
        if wt == 2:
            n, i = _varint(b, i)
        elif wt in (1, 5):
            n = 8 if wt == 1 else 4
        else:
            raise TokenizerExportError(f"unsupported protobuf wire type {wt} at byte {i}")
        if i + n > len(b):
            raise TokenizerExportError(f"truncated protobuf field {fn} ({n} bytes at byte {i} of {len(b)})")
        yield fn, wt, b[i : i + n]
        i += n


def read_sentencepiece(path: str) -> dict:
    """Pieces, scores, types and special ids of a SentencePiece ``.model`` file (its protobuf read directly).
    Raises TokenizerExportError naming the file when it is not a readable SentencePiece model."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return _parse_sentencepiece(data)
    except TokenizerExportError as err:
        raise TokenizerExportError(f"{path}: not a readable SentencePiece model ({err})") from None


def _parse_sentencepiece(data: bytes) -> dict:
    pieces, scores, types = [], [], []
    trainer, normalizer = {}, {}
    for fn, wt, v in _fields(data):
        if fn == 1 and wt == 2:
            piece, score, typ = b"", 0.0, NORMAL
            for f2, w2, v2 in _fields(v):  # (a field of another wire type than the schema's is ignored)
                if f2 == 1 and w2 == 2:
                    piece = bytes(v2)
                elif f2 == 2 and w2 == 5:
                    score = struct.unpack("<f", v2)[0]
                elif f2 == 3 and w2 == 0:
                    typ = v2
            pieces.append(piece)
            scores.append(score)
            types.append(typ)
        elif fn == 2 and wt == 2:  # the integer settings only (special ids, byte_fallback)
            trainer = {f2: v2 for f2, w2, v2 in _fields(v) if w2 == 0}
        elif fn == 3 and wt == 2:  # NormalizerSpec: 1 name, 2 precompiled_charsmap, 3-5 flags
            normalizer = {f2: (bytes(v2) if w2 == 2 else v2) for f2, w2, v2 in _fields(v) if w2 in (0, 2)}
    if not pieces:
        raise TokenizerExportError("no pieces")
    # run.c turns spaces into U+2581 and changes nothing else: a model that maps characters (a precompiled charsmap,
    # e.g. SentencePiece's default nmt_nfkc), removes extra whitespace (the proto's default: true) or keeps spaces
    # as they are would encode otherwise in SentencePiece (Llama 2's: "identity", no charsmap, removal off)
    changes = [
        what
        for what, applies in (
            (
                f"normalizes characters ({normalizer.get(1, b'').decode('utf-8', 'replace') or 'a charsmap'})",
                bool(normalizer.get(2)),
            ),
            ("removes extra whitespace (remove_extra_whitespaces)", bool(normalizer.get(4, 1))),
            ("keeps spaces unescaped (escape_whitespaces false)", not normalizer.get(5, 1)),
        )
        if applies
    ]
    if changes:
        raise TokenizerExportError(
            f"its normalizer {' and '.join(changes)}, which run.c's tokenizer does not: only models without text "
            "normalization (like Llama 2's) can be exported"
        )

    def sid(field, default):
        v = trainer.get(field, default)
        return v - (1 << 64) if isinstance(v, int) and v >= 1 << 63 else v

    bad_type = next((i for i, t in enumerate(types) if not NORMAL <= t <= BYTE), None)
    if bad_type is not None:
        raise TokenizerExportError(f"piece {bad_type} has type {types[bad_type]}, not a SentencePiece piece type (1-6)")
    ids = {"unk_id": sid(40, 0), "bos_id": sid(41, 1), "eos_id": sid(42, 2)}
    for name, value in ids.items():  # -1: the model has no such token
        if not -1 <= value < len(pieces):
            raise TokenizerExportError(f"{name} {value} is not -1 or the id of one of its {len(pieces)} pieces")
    return dict(
        pieces=pieces,
        scores=scores,
        types=types,
        unk=ids["unk_id"],
        bos=ids["bos_id"],
        eos=ids["eos_id"],
        byte_fallback=bool(trainer.get(35, 0)),
        add_dummy_prefix=bool(normalizer.get(3, 1)),
    )


def _is_text_guard(step: dict) -> bool:
    return step.get("type") == "Replace" and step.get("pattern") == {"String": TEXT_GUARD} and step.get("content") == ""


def text_guard_flag(j: dict, path: str) -> int:
    """FLAG_DROP_TEXT_GUARD when the tokenizer.json state ``j`` deletes U+FDD0 first thing, as
    ``llamathink.chat_format.set_chat_template`` installs it (``Replace(U+FDD0, "")`` as the first normalizer
    step, or the whole normalizer); else 0. Raises TokenizerExportError for any other step that
    replaces U+FDD0: run.c only knows the deletion before every other rule."""
    steps = _flat_steps(j.get("normalizer"))
    if steps and _is_text_guard(steps[0]):
        return FLAG_DROP_TEXT_GUARD
    for step in steps:
        pattern = step.get("pattern") if step.get("type") == "Replace" else None
        if isinstance(pattern, dict) and TEXT_GUARD in str(pattern.get("String", pattern.get("Regex", ""))):
            raise TokenizerExportError(
                f"{path}: a normalizer step replaces U+FDD0 but is not the text guard "
                "(Replace(U+FDD0, '') as the first step, as llamathink.chat_format."
                "set_chat_template installs it); run.c cannot encode it exactly"
            )
    return 0


def read_text_guard_flag(path: str) -> int:
    """text_guard_flag of the tokenizer.json file at path (0 if there is none). Raises
    TokenizerExportError when it cannot be read: whether U+FDD0 is deleted would be unknown."""
    if not os.path.isfile(path):
        return 0
    try:
        with open(path, encoding="utf-8") as f:
            j = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise TokenizerExportError(f"{path}: cannot read it to check its normalizer ({e})") from e
    if not isinstance(j, dict):
        raise TokenizerExportError(f"{path}: not a tokenizer.json (not a JSON object)")
    return text_guard_flag(j, path)


SPACE = "\u2581"  # SentencePiece's space piece character, run.c's stand-in for " "
# texts whose normalized form (normalizer, then pre-tokenizer) tells run.c's rules apart: the prefix at the start
# (plain, after a space, after a literal U+2581, after a newline), spaces inside and at the end, and characters that
# a lowercasing, Unicode-normalizing, stripping or byte-level step would change; `_probes` adds each printable ASCII
# character and the strings the file's own Replace steps match
_RULE_PROBES = (
    "",
    "x",
    " x",
    "  x",
    SPACE + "x",
    SPACE + " x",
    "\nx y",
    "x  y ",
    "\tA",
    "a\r\nb\r",
    "don't 12345 x-y",
    "Caf\u00e9 e\u0301 \ufb01 \u00a0x \u3000",
    TEXT_GUARD + " x",
    TEXT_GUARD + "x",
    TEXT_GUARD + TEXT_GUARD + "Hello",
    "x" + TEXT_GUARD + "y",
    "\u4e2d\u6587 \U0001f600",
)
# normalizer Replace steps by regular expression that run.c follows (their effect the probes check): the generic
# Llama 2 conversion's doubled leading U+2581, and the text guard written as a regex
_KNOWN_REGEX_REPLACES = {("\\A" + SPACE, SPACE + SPACE), ("^" + SPACE, SPACE + SPACE), (TEXT_GUARD, "")}


def run_c_normalized(text: str, flags: int) -> str:
    """The string run.c's `encode` merges for `text` under tokenizer `flags` (its normalization, in Python): U+FDD0
    deleted (flag 8), a U+2581 prefix (flag 1) unless the text starts with a space or U+2581 (flag 4) or with a
    U+FDD0 that was deleted (flag 16: HF's Metaspace "first", which prefixes only a word at the original text's
    offset 0), every space made U+2581. The empty text stays empty."""
    guarded_start = False
    if flags & FLAG_DROP_TEXT_GUARD:
        guarded_start = text.startswith(TEXT_GUARD)
        text = text.replace(TEXT_GUARD, "")
    if not text:
        return ""
    no_prefix = (flags & FLAG_NO_PREFIX_IF_SPACE and text[0] in (" ", SPACE)) or (
        flags & FLAG_PREFIX_AT_OFFSET_0 and guarded_start
    )
    prefix = flags & FLAG_DUMMY_PREFIX and not no_prefix
    return (SPACE if prefix else "") + text.replace(" ", SPACE)


def run_c_decoded(t: dict, ids: list[int]) -> str:
    """The text run.c's decoding prints for token `ids` of tokenizer `t` (`load_tokenizer`'s dict), in Python:
    control, unknown and unused pieces dropped, byte pieces as their byte, U+2581 as a space, and with flag 1 one
    leading space of the first printed piece dropped. Invalid UTF-8 shows as U+FFFD."""
    out, first = bytearray(), True
    for i in ids:
        kind, piece = t["types"][i], t["pieces"][i]
        if kind in (CONTROL, UNKNOWN, UNUSED):
            continue
        if kind == BYTE:
            out.append(i - t["byte0"])
            first = False
            continue
        k = 0
        while k < len(piece):
            if piece[k : k + 3] == SPACE_BYTES:
                if not (first and t["flags"] & FLAG_DUMMY_PREFIX):
                    out += b" "
                k += 3
            else:
                out.append(piece[k])
                k += 1
            first = False
    return out.decode("utf-8", "replace")


SPACE_BYTES = SPACE.encode("utf-8")


def _flat_steps(state) -> list:
    """The steps of a normalizer or pre-tokenizer state (tokenizer.json), nested Sequences flattened."""
    if not isinstance(state, dict):
        return []
    if state.get("type") != "Sequence":
        return [state]
    inner = state.get("normalizers", state.get("pretokenizers", []))
    return [step for part in (inner if isinstance(inner, list) else []) for step in _flat_steps(part)]


def _unfollowed_step(state: dict, pieces) -> str | None:
    """The first step of tokenizer.json state `state` that run.c has no counterpart for, described; None where it
    follows every one (the probes then check how). run.c follows normalizer `Replace` of a string (or of the
    regular expressions in `_KNOWN_REGEX_REPLACES`) and `Prepend`; the `Metaspace` pre-tokenizer with U+2581, which
    splits words apart only where no piece has U+2581 after its first character (`split: true`; else run.c's
    merges across words would differ); a BPE model without dropout, subword prefix or suffix, and with byte
    fallback where it fuses unknown characters into one `<unk>` (run.c gives one per character)."""
    for step in _flat_steps(state.get("normalizer")):
        kind = step.get("type")
        pattern = step.get("pattern") if isinstance(step.get("pattern"), dict) else {}
        if kind == "Prepend" or (kind == "Replace" and "String" in pattern):
            continue
        if kind == "Replace" and (pattern.get("Regex"), step.get("content")) in _KNOWN_REGEX_REPLACES:
            continue
        what = f"Replace(Regex {pattern.get('Regex')!r} -> {step.get('content')!r})" if kind == "Replace" else kind
        return f"normalizer step {what}"
    for step in _flat_steps(state.get("pre_tokenizer")):
        if step.get("type") != "Metaspace" or step.get("replacement", SPACE) != SPACE:
            return f"pre-tokenizer {step.get('type')}" + (
                " (another replacement than U+2581)" * (step.get("type") == "Metaspace")
            )
        if step.get("split", True) and any(SPACE_BYTES in p[1:] for p in pieces):
            return "pre-tokenizer Metaspace with split: true (words merged apart) and pieces with U+2581 inside"
    model = state.get("model") or {}
    for option in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(option):
            return f"BPE option {option}={model[option]!r}"
    if model.get("fuse_unk") and not model.get("byte_fallback"):
        return "BPE option fuse_unk without byte_fallback (unknown characters fused into one <unk>)"
    return None


def _probes(state: dict) -> list[str]:
    """`_RULE_PROBES`, each printable ASCII character, and texts holding each string the normalizer's Replace and
    Prepend steps of tokenizer.json state `state` match or add."""
    texts = [*_RULE_PROBES, "".join(map(chr, range(33, 127))), " ".join(map(chr, range(33, 127)))]
    for step in _flat_steps(state.get("normalizer")):
        found = step.get("pattern", {}).get("String") if isinstance(step.get("pattern"), dict) else None
        for part in (found, step.get("prepend"), step.get("content")):
            if isinstance(part, str) and part:
                texts += [part + "x", "x" + part + "y", "x" + part, " " + part]
    return texts


def _backend_tokenizer(path: str, folder: str | None):
    """The `tokenizers.Tokenizer` that transformers encodes with for `folder` (`AutoTokenizer`, whose tokenizer
    class may replace the file's normalizer and pre-tokenizer by its own: transformers 5's LlamaTokenizer does),
    else, for a tokenizer.json file or where transformers is not installed, the file at `path` itself. Raises
    TokenizerExportError where neither can be read."""
    try:
        from tokenizers import Tokenizer
    except ImportError as e:
        raise TokenizerExportError(
            f"{path}: reading a tokenizer.json's text rules needs the tokenizers package (pip install tokenizers)"
        ) from e
    try:
        if folder is not None:
            try:
                from transformers import AutoTokenizer
            except ImportError:
                folder = None
        if folder is None:
            return Tokenizer.from_file(path)
        from transformers.utils import logging as transformers_logging

        verbosity = transformers_logging.get_verbosity()
        transformers_logging.set_verbosity_error()  # (a checkpoint's "model of type llamathink" notice)
        try:  # never code from the folder: refused at once rather than asked on the terminal
            loaded = AutoTokenizer.from_pretrained(folder, trust_remote_code=False, local_files_only=True)
        finally:
            transformers_logging.set_verbosity(verbosity)
        backend = getattr(loaded, "backend_tokenizer", None)
        if backend is None:
            raise TokenizerExportError(f"{folder}: transformers loads a tokenizer without a tokenizers backend there")
        return Tokenizer.from_str(backend.to_str())  # (a copy: the guard may be put in below)
    except (KeyboardInterrupt, SystemExit, TokenizerExportError):
        raise
    # tokenizers raises Exception for a file it cannot parse, and a Rust panic as pyo3's PanicException, a
    # BaseException; transformers raises OSError, ValueError and others for a folder it cannot load
    except BaseException as e:
        where = (
            f"{path}: transformers cannot load the tokenizer of its folder (the exporter runs no code from it)"
            if folder
            else f"{path}: the tokenizers library cannot read it"
        )
        raise TokenizerExportError(f"{where} ({type(e).__name__}: {e})") from e


def check_text_rules(t: dict, path: str, folder: str | None = None) -> int:
    """run.c's prefix flags (`FLAG_DUMMY_PREFIX`, `FLAG_NO_PREFIX_IF_SPACE`, `FLAG_PREFIX_AT_OFFSET_0`, or none)
    for tokenizer `t` read from
    the tokenizer.json at `path` (`folder`: the folder it was named by, which transformers loads through its
    tokenizer class), found by running transformers' normalizer and pre-tokenizer for it (`_backend_tokenizer`) on
    probe texts (`_probes`) and taking the flags under which `run_c_normalized` gives the same strings; and a check
    that run.c decodes each probe's tokens as transformers does (`run_c_decoded`). `t["flags"]` holds the text guard
    flag already (`text_guard_flag`: the project's chat and finetuning put the guard back where a tokenizer class
    dropped it).

    Raises TokenizerExportError naming the file (and a probe text where one differs) for a step run.c has no
    counterpart for (`_unfollowed_step`: a byte-level, lowercasing, Unicode-normalizing or digit-splitting step,
    BPE dropout, ...), for rules no flags reproduce, and for a decoder that prints otherwise than run.c."""
    from tokenizers import normalizers

    backend = _backend_tokenizer(path, folder)
    guard = t["flags"] & FLAG_DROP_TEXT_GUARD
    state = json.loads(backend.to_str())
    if guard and not text_guard_flag(state, path):  # (a tokenizer class that drops the file's normalizer)
        backend.normalizer = normalizers.Sequence(
            [normalizers.Replace(TEXT_GUARD, ""), *([backend.normalizer] if backend.normalizer else [])]
        )
        state = json.loads(backend.to_str())
    named = {piece for piece, kind in zip(t["pieces"], t["types"]) if kind in (CONTROL, UNKNOWN)}
    extra = [a["content"] for a in state.get("added_tokens", []) if a["content"].encode("utf-8") not in named]
    if extra:  # (tokenizer_config.json's extra special tokens, or a tokenizer class's own)
        raise TokenizerExportError(
            f"{path}: transformers loads it with added tokens that tokenizer.json does not mark special "
            f"({', '.join(map(repr, extra[:3]))}): transformers matches them in the text before the merges, run.c "
            "does not"
        )
    problem = _unfollowed_step(state, t["pieces"])
    if problem:
        raise TokenizerExportError(
            f"{path}: its {problem} has no counterpart in run.c's tokenizer, which would encode otherwise than transformers"
        )

    unk = backend.token_to_id(state.get("model", {}).get("unk_token") or "") if state.get("model") else None

    def normalized(text: str, encoding) -> str:
        # the string the merges saw: `text`'s encoding's tokens joined (byte pieces as their bytes, an unknown token
        # as the original characters it stands for, which the accepted steps leave as they are), which keeps what
        # the pipeline does by offset into the original text (Metaspace "first" adds no prefix once a normalizer
        # step deleted the text's first characters)
        joined = bytearray()
        for token, token_id, (start, stop) in zip(encoding.tokens, encoding.ids, encoding.offsets):
            byte = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", token)
            piece = text[start:stop] if token_id == unk else token
            joined += bytes([int(byte.group(1), 16)]) if byte and token_id != unk else piece.encode("utf-8")
        return joined.decode("utf-8", "replace")

    probes = _probes(state)
    try:
        encodings = [backend.encode(text, add_special_tokens=False) for text in probes]
        wanted = [normalized(text, encoding) for text, encoding in zip(probes, encodings)]
        ids = [encoding.ids for encoding in encodings]
        decoded = [backend.decode(x, skip_special_tokens=True) for x in ids]
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # (as in _backend_tokenizer)
        raise TokenizerExportError(
            f"{path}: its normalizer, pre-tokenizer or decoder failed ({type(e).__name__}: {e})"
        ) from e
    # (flag 16 only where it is needed: a runner older than it refuses a file that has it)
    first = FLAG_DUMMY_PREFIX | FLAG_NO_PREFIX_IF_SPACE
    candidates = (first, first | FLAG_PREFIX_AT_OFFSET_0, FLAG_DUMMY_PREFIX, 0)
    flags = next(
        (f for f in candidates if all(run_c_normalized(x, guard | f) == w for x, w in zip(probes, wanted))), None
    )
    if flags is None:
        # the probe the nearest rules (fewest differences) get wrong, for the message
        best = min(candidates, key=lambda f: sum(run_c_normalized(x, guard | f) != w for x, w in zip(probes, wanted)))
        text, want = next((x, w) for x, w in zip(probes, wanted) if run_c_normalized(x, guard | best) != w)
        raise TokenizerExportError(
            f"{path}: its normalizer and pre-tokenizer turn {text!r} into {want!r}, and run.c's rules (spaces as "
            f"U+2581, a U+2581 prefix always, never or unless the text starts with one) give "
            f"{run_c_normalized(text, guard | best)!r} at best: run.c would encode such texts otherwise than transformers"
        )
    decoding = {**t, "flags": t["flags"] | flags}
    for text, x, want in zip(probes, ids, decoded):
        # (an unknown piece prints nothing in run.c by design, whatever the decoder makes of it)
        if max(x, default=-1) < len(t["pieces"]) and unk not in x and run_c_decoded(decoding, x) != want:
            raise TokenizerExportError(
                f"{path}: its decoder prints the tokens of {text!r} as {want!r}, run.c as "
                f"{run_c_decoded(decoding, x)!r}: run.c decodes U+2581 as a space and drops one leading space where "
                "it adds the prefix"
            )
    return flags


def read_hf_json(path: str) -> dict:
    """The run.c tokenizer of an HF tokenizer.json (BPE) at `path`, with bos/eos from the tokenizer_config.json
    beside it. Raises TokenizerExportError naming the file when either is not valid JSON of the expected shape."""
    try:
        return _read_hf_json(path)
    # (JSONDecodeError is a ValueError; RecursionError: nesting too deep)
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError) as e:
        raise TokenizerExportError(
            f"{path} (or the tokenizer_config.json beside it): not a readable tokenizer file ({type(e).__name__}: {e})"
        ) from e


def _read_hf_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        j = json.load(f)
    model = j.get("model", {})
    if model.get("type") != "BPE":
        raise TokenizerExportError(f"{path}: only BPE tokenizers are supported (got {model.get('type')})")
    vocab = model["vocab"]
    if not vocab or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in vocab.values()):
        raise TokenizerExportError(f"{path}: model.vocab must map pieces to ids >= 0")
    n = max(vocab.values()) + 1
    for t in j.get("added_tokens", []):
        n = max(n, t["id"] + 1)
    added = {t["id"] for t in j.get("added_tokens", [])}
    if len(set(vocab.values())) < len(vocab):
        raise TokenizerExportError(f"{path}: model.vocab gives one id to several pieces")
    named = set(vocab.values()) | added
    if len(named) < n:  # run.c would hold empty pieces there (counted first: an id of 10**10 names no range)
        missing = sorted(set(range(n)) - named)[:5] if n <= 4 * len(named) + 1024 else "far beyond the pieces"
        raise TokenizerExportError(f"{path}: ids {missing} of 0..{n - 1} have no piece (the ids have gaps)")
    plain_added = [t["content"] for t in j.get("added_tokens", []) if not t.get("special", False)]
    if plain_added:
        raise TokenizerExportError(
            f"{path}: added tokens that are not special ({', '.join(map(repr, plain_added[:3]))}): transformers "
            "matches them in the text before the merges, run.c does not"
        )
    pieces = [b""] * n
    types = [UNUSED] * n
    for p, i in vocab.items():
        pieces[i] = p.encode("utf-8")
        types[i] = NORMAL
    scores = [NO_MERGE] * n
    for i, p in enumerate(pieces):
        if len(p.decode("utf-8", "replace")) == 1:
            scores[i] = 0.0
    for rank, m in enumerate(model.get("merges", [])):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        if a not in vocab or b not in vocab or a + b not in vocab:
            raise TokenizerExportError(f"{path}: merge {rank} ({a!r} + {b!r}) names a piece not in model.vocab")
        i = vocab.get(a + b)
        if i is not None and scores[i] == NO_MERGE:
            scores[i] = -float(rank)
    for i, p in enumerate(pieces):
        if len(p) == 6 and p.startswith(b"<0x") and p.endswith(b">"):
            types[i] = BYTE
    unk = vocab.get(model.get("unk_token") or "", -1)
    for t in j.get("added_tokens", []):  # (special ones only: the others were refused above)
        pieces[t["id"]] = t["content"].encode("utf-8")
        types[t["id"]] = CONTROL
        scores[t["id"]] = NO_MERGE
    if 0 <= unk < n:
        types[unk] = UNKNOWN
    flags = text_guard_flag(j, path)  # (the prefix flags: `check_text_rules`, once the pieces are all known)
    bos = eos = None
    cfg_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
    if os.path.exists(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
            tc = json.load(f)

        def tok_id(v):
            if isinstance(v, dict):
                v = v.get("content")
            if isinstance(v, str):
                for i, p in enumerate(pieces):
                    if p == v.encode("utf-8"):
                        return i
            return None

        bos, eos = tok_id(tc.get("bos_token")), tok_id(tc.get("eos_token"))
    if bos is None:
        bos = next((i for i, p in enumerate(pieces) if p == b"<s>"), -1)
    if eos is None:
        eos = next((i for i, p in enumerate(pieces) if p == b"</s>"), -1)
    if eos < 0:
        raise TokenizerExportError(
            f"{path}: no end-of-sequence token (tokenizer_config.json's eos_token, or a piece '</s>'): run.c would "
            "never end a reply"
        )
    return dict(
        pieces=pieces,
        scores=scores,
        types=types,
        unk=unk,
        bos=bos,
        eos=eos,
        byte_fallback=bool(model.get("byte_fallback")),
        flags=flags,
    )


def sentencepiece_rules_by_default(src: str) -> bool:
    """Whether a tokenizer.model source is encoded by SentencePiece's own rules unless told otherwise: as
    `llamathink.tokenizer_utils.load_tokenizer` reads it, which is how training tokenized its data. A .model file,
    or a folder holding it without a tokenizer_config.json that names a Llama tokenizer class: SentencePiece's
    rules (`AutoTokenizer` converts it so too). A folder whose tokenizer_config.json names (Code)LlamaTokenizer
    (Fast): transformers' LlamaTokenizer's. (A folder with a tokenizer.json is read from that file, `load_tokenizer`.)"""
    return _tokenizer_config(src).get("tokenizer_class") not in _LLAMA_RULE_CLASSES


def _tokenizer_config(src: str) -> dict:
    """The tokenizer_config.json of folder `src` as a dict; {} for a file, a folder without one, or a file that is
    not a JSON object (as AutoTokenizer reads such a folder: with no settings from it)."""
    if not os.path.isdir(src):
        return {}
    try:
        with open(os.path.join(src, "tokenizer_config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


# the tokenizer classes transformers reads a tokenizer.model with by LlamaTokenizer's rules (another name, or none:
# its generic conversion, by SentencePiece's)
_LLAMA_RULE_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast", "CodeLlamaTokenizer", "CodeLlamaTokenizerFast")


def load_tokenizer(src: str, sentencepiece_rules: bool | None = None) -> dict:
    """The vocabulary, merge ranks and flags run.c's tokenizer needs, from a SentencePiece `tokenizer.model` or a
    transformers `tokenizer.json` (`src`: the file or its folder). With a .model file merges are ranked by
    SentencePiece's own scores when `sentencepiece_rules`, as transformers' LlamaTokenizer ranks them when False;
    None: as the project's training read `src` (`sentencepiece_rules_by_default`). Raises TokenizerExportError for
    a missing or unusable file."""
    # in a folder, the file transformers loads: tokenizer.json where there is one (it carries its own rules)
    folder_json = os.path.isdir(src) and os.path.isfile(os.path.join(src, "tokenizer.json"))
    sp = os.path.join(src, "tokenizer.model") if os.path.isdir(src) else src
    if not folder_json and os.path.isfile(sp) and sp.endswith(".model"):
        if sentencepiece_rules is None:
            sentencepiece_rules = sentencepiece_rules_by_default(src)
        t = read_sentencepiece(sp)
        if not sentencepiece_rules:
            # transformers' LlamaTokenizer (v5) converts a SentencePiece BPE model into merges
            # ranked by the merged piece's id, not by its score (they differ for e.g.
            # "\u2581\u2581": score -1e9, id 259); rank by id so that encodings match it exactly.
            t["scores"] = [-float(i) if ty in (NORMAL, USER_DEFINED) else 0.0 for i, ty in enumerate(t["types"])]
        flags = 0
        # transformers' LlamaTokenizer takes tokenizer_config.json's add_prefix_space: False is no prefix at all
        # (Metaspace prepend_scheme "never"); its generic conversion (SentencePiece's rules) ignores it
        no_prefix = not sentencepiece_rules and _tokenizer_config(src).get("add_prefix_space") is False
        if t["add_dummy_prefix"] and not no_prefix:
            flags |= FLAG_DUMMY_PREFIX
            if not sentencepiece_rules:
                flags |= FLAG_NO_PREFIX_IF_SPACE
        # transformers loads a directory's tokenizer.json when there is one: its text guard applies (before
        # LlamaTokenizer's Metaspace "first", which then prefixes no text whose first characters it deleted)
        guard = read_text_guard_flag(os.path.join(os.path.dirname(sp) or ".", "tokenizer.json"))
        if guard and flags & FLAG_NO_PREFIX_IF_SPACE:
            flags |= FLAG_PREFIX_AT_OFFSET_0
        t["flags"] = flags | guard
    else:
        js = os.path.join(src, "tokenizer.json") if os.path.isdir(src) else src
        if not os.path.isfile(js):
            raise TokenizerExportError(f"no tokenizer.model or tokenizer.json in {src}")
        if sentencepiece_rules is not None:  # (a tokenizer.json carries its own rules)
            raise TokenizerExportError(
                f"the SentencePiece / transformers rule options apply to a tokenizer.model; {js} is read instead "
                "(a folder is read from its tokenizer.json, as transformers reads it): leave the option out, or "
                "name the .model file"
            )
        t = read_hf_json(js)
        t["json"] = (js, src if os.path.isdir(src) else None)
    if t["byte_fallback"]:
        t["flags"] |= FLAG_BYTE_FALLBACK
    # byte pieces must be contiguous <0x00>..<0xFF>
    byte0 = -1
    for i, p in enumerate(t["pieces"]):
        if p == b"<0x00>" and t["types"][i] == BYTE:
            byte0 = i
            break
    if byte0 >= 0:
        for b in range(256):
            i = byte0 + b
            if i >= len(t["pieces"]) or t["pieces"][i] != f"<0x{b:02X}>".encode():
                raise TokenizerExportError("byte pieces <0x00>..<0xFF> are not contiguous")
    elif t["byte_fallback"]:
        raise TokenizerExportError("byte_fallback set but no <0x00> piece")
    t["byte0"] = byte0
    if "json" in t:
        t["flags"] |= check_text_rules(t, *t.pop("json"))
    return t


MAX_MARKER_BYTES = 65536  # run.c's limit on a chat marker's key or value (UTF-8 bytes)
# The keys of llamathink.chat_format.CHAT_MARKERS (the exporter runs without the package; a test keeps them equal):
# run.c's chat mode reads the first five; an assistant turn ends with the EOS token, so assistant_suffix stays empty
CHAT_MARKER_KEYS = ("system_prefix", "system_suffix", "user_prefix", "user_suffix", "assistant_prefix")
EMPTY_CHAT_MARKER_KEYS = ("assistant_suffix",)


def parse_markers(items) -> dict:
    """KEY=VALUE chat markers (backslash escapes in the value as in a Python string) -> {key: value}. Raises
    TokenizerExportError for an item without "=", a key that run.c does not read (`CHAT_MARKER_KEYS`; a mistyped
    key would be stored and silently unused), a non-empty `assistant_suffix` (run.c ends an assistant turn with
    the EOS token), a bad escape, or a key or value over `MAX_MARKER_BYTES` bytes (run.c would refuse the whole
    tokenizer.bin)."""
    out = {}
    for it in items or []:
        if "=" not in it:
            raise TokenizerExportError(f"chat marker {it!r} is not KEY=VALUE")
        k, v = it.split("=", 1)
        if k not in CHAT_MARKER_KEYS + EMPTY_CHAT_MARKER_KEYS:
            raise TokenizerExportError(
                f"chat marker {it[:60]!r}: run.c's chat mode reads no key {k[:40]!r}; the keys are "
                f"{', '.join(CHAT_MARKER_KEYS + EMPTY_CHAT_MARKER_KEYS)}"
            )
        if k in EMPTY_CHAT_MARKER_KEYS and v:
            raise TokenizerExportError(
                f"chat marker {it[:60]!r}: {k} must be empty; run.c ends an assistant turn with the EOS token and "
                "feeds nothing after it"
            )
        try:  # backslash escapes (\\n, \\t, \\xNN) as in a Python string; the rest as typed (UTF-8)
            out[k] = v.encode("utf-8").decode("unicode_escape").encode("latin-1").decode("utf-8")
        except (UnicodeDecodeError, UnicodeEncodeError) as e:
            raise TokenizerExportError(
                f"chat marker {it!r}: a bad backslash escape or byte sequence in its value ({e.reason})"
            ) from None
        for what, text in (("key", k), ("value", out[k])):
            if len(text.encode("utf-8")) > MAX_MARKER_BYTES:
                raise TokenizerExportError(
                    f"chat marker {k[:40]!r}: its {what} has {len(text.encode('utf-8'))} bytes; run.c takes at most "
                    f"{MAX_MARKER_BYTES}"
                )
    return out


def default_chat_markers() -> dict:
    """llamathink.chat_format.CHAT_MARKERS (imported here, so that the exporter also runs without the
    package: then no markers are stored and run.c falls back to its copy of LlamaThink's)."""
    try:
        from llamathink.chat_format import CHAT_MARKERS
    except ImportError as e:
        print(
            f"warning: llamathink.chat_format is not importable ({e}); tokenizer.bin gets no chat "
            "markers (run.c's chat mode then uses its built-in copy of LlamaThink's)",
            file=sys.stderr,
        )
        return {}
    return dict(CHAT_MARKERS)


def chat_markers(overrides=(), defaults: bool = True, src: str | None = None) -> dict:
    """The markers to store: CHAT_MARKERS (unless defaults=False) updated by KEY=VALUE items. With `src` (the
    tokenizer's folder or file), LlamaThink's markers stored for a tokenizer whose chat template is another one (an
    edited copy, another model's) come with a note on stderr: run.c would chat in LlamaThink's format while
    llamathink-chat uses the template as written."""
    out = default_chat_markers() if defaults else {}
    out.update(parse_markers(overrides))
    if src is not None and defaults and not overrides:
        template = _chat_template_text(src)
        try:
            from llamathink.chat_format import is_llamathink_template
        except ImportError:
            template = None  # (default_chat_markers has said so)
        if template and not is_llamathink_template(template):
            print(
                f"note: the chat template with {src} is not LlamaThink's (an edited copy or another model's); "
                "tokenizer.bin gets LlamaThink's chat markers, so run.c's chat mode would not follow it: set them "
                "with --chat-marker KEY=VALUE, or store none with --no-chat-markers",
                file=sys.stderr,
            )
    return out


def _chat_template_text(src: str) -> str | None:
    """The chat template saved with a tokenizer (chat_template.jinja, else tokenizer_config.json's
    "chat_template" text), or None."""
    folder = src if os.path.isdir(src) else os.path.dirname(src) or "."
    try:
        with open(os.path.join(folder, "chat_template.jinja"), encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        pass
    try:
        with open(os.path.join(folder, "tokenizer_config.json"), encoding="utf-8") as f:
            value = json.load(f).get("chat_template")
    except (OSError, ValueError, AttributeError, RecursionError):
        return None
    return value if isinstance(value, str) else None


def write_tokenizer_bin(t: dict, out_path: str, markers: dict | None = None, commit: bool = True) -> str | None:
    """Write the tokenizer `t` (from `load_tokenizer`) with chat `markers` as run.c's tokenizer.bin at `out_path`:
    into a new temporary file beside it, renamed over `out_path` once written (a failure leaves no partial file and
    the earlier file as it was); with `commit` False, left under that name, which is returned, for the caller to
    rename (`os.replace`) or remove."""
    from .export import write_beside

    markers = markers or {}
    n = len(t["pieces"])
    max_len = max(1, max(len(p) for p in t["pieces"]))
    hdr = bytearray(TK_HEADER_SIZE)
    struct.pack_into(
        "<3I8i",
        hdr,
        0,
        TK_MAGIC,
        TK_VERSION,
        TK_HEADER_SIZE,
        n,
        max_len,
        t["bos"],
        t["eos"],
        t["unk"],
        t["byte0"],
        t["flags"],
        len(markers),
    )
    body = bytearray()
    for p, s, ty in zip(t["pieces"], t["scores"], t["types"]):
        body += struct.pack("<fIB", s, len(p), ty) + p
    for k, v in markers.items():
        kb, vb = k.encode("utf-8"), v.encode("utf-8")
        body += struct.pack("<I", len(kb)) + kb + struct.pack("<I", len(vb)) + vb
    tmp = write_beside(out_path, lambda f: f.write(bytes(hdr) + bytes(body)))
    if not commit:
        return tmp
    os.replace(tmp, out_path)
    return None


def export_tokenizer(
    src: str, out_path: str, markers: dict | None = None, sentencepiece_rules: bool | None = None
) -> dict:
    """Write tokenizer.bin; markers=None stores the default chat markers (CHAT_MARKERS), a dict
    stores exactly those ({} for none); `sentencepiece_rules` as in `load_tokenizer`."""
    from .export import check_output

    check_output(out_path, TK_MAGIC, "run.c tokenizer")
    t = load_tokenizer(src, sentencepiece_rules)
    write_tokenizer(t, out_path, markers)
    return t


def write_tokenizer(t: dict, out_path: str, markers: dict | None = None, commit: bool = True) -> str | None:
    """Write the tokenizer `t` (from `load_tokenizer`) as tokenizer.bin and say so on stderr (once renamed into
    place: with `commit` False the caller says it, `tokenizer_written`); markers as in `export_tokenizer`, `commit`
    (and what is returned) as in `write_tokenizer_bin`."""
    if markers is None:
        markers = default_chat_markers()
    tmp = write_tokenizer_bin(t, out_path, markers, commit)
    if commit:
        print(tokenizer_written(t, out_path, markers), file=sys.stderr)
    return tmp


def tokenizer_written(t: dict, out_path: str, markers: dict | None) -> str:
    """What `write_tokenizer` says of a tokenizer.bin it wrote (`markers` None: the default chat markers)."""
    n = len(default_chat_markers() if markers is None else markers)
    return f"wrote {out_path}: {len(t['pieces'])} pieces, bos {t['bos']} eos {t['eos']}, {n} chat markers"


def main(argv=None) -> int:
    """The tokenizer exporter's command line; returns the exit status."""
    ap = argparse.ArgumentParser(prog="python -m export_c.tokenizer_export")
    ap.add_argument("src", help="directory with tokenizer.model or tokenizer.json (or the file)")
    ap.add_argument("out")
    ap.add_argument(
        "--chat-marker",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set one chat-template marker (repeatable; default: llamathink.chat_format.CHAT_MARKERS)",
    )
    ap.add_argument(
        "--no-chat-markers", action="store_true", help="store no default chat markers (only --chat-marker ones)"
    )
    rules = ap.add_mutually_exclusive_group()
    rules.add_argument(
        "--sentencepiece",
        dest="sentencepiece",
        action="store_const",
        const=True,
        help="tokenizer.model only: encode like SentencePiece itself (and like llamathink.tokenizer_utils): merges "
        "by piece score, dummy prefix always; the default for a .model file or a folder without a "
        "tokenizer_config.json naming LlamaTokenizer, which is how training read it",
    )
    rules.add_argument(
        "--transformers-rules",
        dest="sentencepiece",
        action="store_const",
        const=False,
        help="tokenizer.model only: encode like transformers' LlamaTokenizer (merges by piece id, no prefix when "
        "the text starts with a space); the default for a folder whose tokenizer_config.json names LlamaTokenizer",
    )
    a = ap.parse_args(argv)
    from .export import ExportError

    try:
        export_tokenizer(a.src, a.out, chat_markers(a.chat_marker, not a.no_chat_markers, a.src), a.sentencepiece)
    except (TokenizerExportError, ExportError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
