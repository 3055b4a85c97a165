"""Tokenizer helpers for LlamaThink.

Three things live here:

* :func:`load_tokenizer` loads a Hugging Face tokenizer from a directory, a
  ``tokenizer.json`` file, a Hub id, a bare SentencePiece ``tokenizer.model``
  file (such as Llama 2's), or the built-in demo tokenizer (``"builtin"``), and
  checks that the result is usable.
* :func:`train_tokenizer` trains, offline and in well under a second on the
  sample corpus, a small byte-fallback BPE tokenizer with the same structure as
  Llama 2's ``tokenizer.json``.
* :func:`vocab_and_scores` / :func:`greedy_encode` describe such a tokenizer as
  a list of pieces with scores and encode text the way a llama2.c-style C
  encoder does (greedy merging of the best scoring adjacent pair).  They are a
  reference for the C export and are used by the tests to check that the Hugging
  Face tokenizer and a greedy-by-score encoder agree.

Tokenizer structure (both for converted SentencePiece models and for trained
tokenizers)::

    model          BPE(byte_fallback=True, fuse_unk=True, unk_token="<unk>")
    vocabulary     0 <unk>, 1 <s> (BOS), 2 </s> (EOS), 3..258 <0x00>..<0xFF>,
                   then ordinary pieces (for trained tokenizers: single
                   characters first, then merged pieces in the order they were
                   learned)
    merges         every split (left, right) of every ordinary piece whose two
                   halves are ordinary pieces, ordered by the rank of the merged
                   piece (SentencePiece semantics: the best piece wins,
                   whichever pair produced it)
    normalizer     Prepend("▁")
    pre-tokenizer  Metaspace(replacement="▁", prepend_scheme="first", split=False)
    decoder        Replace("▁", " "), ByteFallback, Fuse, Strip(left=1)
    post-processor "<s> $A" (BOS added by ``tokenizer(text)``, no EOS)

The ``Prepend("▁")`` normalizer makes the dummy prefix unconditional, exactly
like SentencePiece (and llama2.c): ``" hello"`` becomes ``"▁▁hello"``.  With
only the Metaspace pre-tokenizer, transformers/tokenizers skip the prefix when
the text already starts with a space, which breaks the round trip of text with
leading spaces and disagrees with SentencePiece; with the normalizer in place
the Metaspace step only replaces spaces.

Padding: ``pad_token`` is ``<unk>`` (id 0), never EOS, so that collators which
mask padding in the labels never mask a real end-of-sequence token.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import os
import string
import sys
import warnings
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from .cli import tolerant_output
from .hub import hub_lookup_failure, offline_variable

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
SPACE = "\u2581"  # "▁", SentencePiece's visible space
BYTE_PIECES = [f"<0x{b:02X}>" for b in range(256)]
NUM_RESERVED = 3 + len(BYTE_PIECES)  # specials + byte pieces = 259
BUILTIN_PREFIX = "builtin"
DEFAULT_BUILTIN_VOCAB = 1024
SAMPLE_DATA_DIR = Path(__file__).resolve().parent / "sample_data"

# Pre-tokenization used only while *training* a tokenizer: a run of newlines is
# one word; a run of spaces is one word except its last space, which starts the
# following word (so "a   b" gives "▁a", "▁▁", "▁b").  Merges therefore never
# cross these boundaries, and the learned pieces stay valid when the final
# tokenizer encodes a whole document as one word (split=False), like Llama 2.
# A word holds at most MAX_TRAIN_WORD_CHARS characters after its space (a
# longer run is cut into words of that length): the BPE trainer's time grows
# with the square of a word's length, and a run without whitespace (minified
# code, a data URI, a line of "=") took minutes for a few hundred thousand
# characters.
MAX_TRAIN_WORD_CHARS = 64
_WORD = "{1,%d}" % MAX_TRAIN_WORD_CHARS
_TRAIN_SPLIT_PATTERN = rf"\n{_WORD}|{SPACE}{_WORD}(?={SPACE})|{SPACE}?[^{SPACE}\n]{_WORD}|{SPACE}{_WORD}"

# Characters that are always part of a trained tokenizer's alphabet, even if the
# training text lacks some of them (everything else falls back to bytes).
_BASE_ALPHABET = sorted(set(string.ascii_letters + string.digits + string.punctuation) | {"\n", SPACE})

# Strings used to check that a loaded tokenizer works.
_PROBE_TEXTS = [
    "Hello world",
    " leading space",
    "multiple   spaces\nnew line\ttab",
    "accents: caf\u00e9 na\u00efve, emoji \U0001f600, CJK \u4e2d\u6587",
    "trailing space ",
]


# ---------------------------------------------------------------------------
# building the Llama-style tokenizer
# ---------------------------------------------------------------------------


def _complete_merges(pieces: Sequence[str], ordinary: Sequence[bool]) -> list[tuple[str, str]]:
    """All (left, right) splits of each ordinary piece whose halves are ordinary
    pieces, ordered by the piece's position in ``pieces`` (best first), then by
    the length of the left half."""
    index = {p: i for i, p in enumerate(pieces) if ordinary[i]}
    merges: list[tuple[str, str]] = []
    for i, piece in enumerate(pieces):
        if not ordinary[i] or len(piece) < 2:
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in index and right in index:
                merges.append((left, right))
    return merges


def _llama_style_tokenizer(
    vocab: dict[str, int],
    merges: list[tuple[str, str]],
    *,
    name: str,
    bos: str = BOS,
    eos: str = EOS,
    unk: str = UNK,
    extra_special: Sequence[str] = (),
):
    """Wrap a vocabulary and merges into a ``PreTrainedTokenizerFast`` with the
    Llama 2 structure described in the module docstring."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    tk.normalizer = normalizers.Prepend(SPACE)
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="first", split=False)
    tk.decoder = decoders.Sequence(
        [
            decoders.Replace(SPACE, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1, right=0),
        ]
    )
    specials = [unk, bos, eos] + [s for s in extra_special if s not in (unk, bos, eos)]
    tk.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        pad_token=unk,
        add_bos_token=True,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
    )
    tok.name_or_path = name
    return tok


def tokenizer_from_sentencepiece(model_file: str | os.PathLike):
    """Convert a SentencePiece BPE model file (e.g. Llama 2's ``tokenizer.model``)
    into a ``PreTrainedTokenizerFast``.

    Uses the ``sentencepiece`` library only (no protobuf needed) and checks that
    the result encodes a few probe strings exactly like SentencePiece does; a
    model that cannot be represented (e.g. a Unigram model or one with text
    normalization) raises ``ValueError``.
    """
    import sentencepiece as spm

    model_file = os.fspath(model_file)
    if not os.path.isfile(model_file):
        raise FileNotFoundError(f"SentencePiece model file not found: {model_file}")
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(model_file)
    except Exception as e:  # sentencepiece raises RuntimeError/OSError with terse messages
        raise ValueError(f"{model_file}: not a valid SentencePiece model ({e})") from e
    n = sp.get_piece_size()
    if n <= 3:
        raise ValueError(f"{model_file}: SentencePiece model has only {n} pieces")
    pieces = [sp.id_to_piece(i) for i in range(n)]
    special_ids = [i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)]
    ordinary = [not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i)) for i in range(n)]
    if len(set(pieces)) != n:
        raise ValueError(f"{model_file}: duplicate pieces in SentencePiece model")
    # Rank ordinary pieces by SentencePiece score (higher first), ties by id.
    order = sorted((i for i in range(n) if ordinary[i]), key=lambda i: (-sp.get_score(i), i))
    ranked = [pieces[i] for i in order]
    merges = _complete_merges(ranked, [True] * len(ranked))
    vocab = {p: i for i, p in enumerate(pieces)}

    def name_of(i: int, default: str) -> str:
        return pieces[i] if i >= 0 else default

    unk = name_of(sp.unk_id(), UNK)
    bos = name_of(sp.bos_id(), BOS)
    eos = name_of(sp.eos_id(), EOS)
    tok = _llama_style_tokenizer(
        vocab, merges, name=model_file, bos=bos, eos=eos, unk=unk, extra_special=[pieces[i] for i in special_ids]
    )
    for text in _PROBE_TEXTS:
        ours = tok.encode(text, add_special_tokens=False, split_special_tokens=True)
        ref = sp.encode(text)
        if ours != ref:
            raise ValueError(
                f"{model_file}: converted tokenizer disagrees with SentencePiece on {text!r} "
                f"({ours} vs {ref}); only byte-fallback BPE models without text normalization "
                "(like Llama 2's) can be converted; use a Hugging Face tokenizer directory instead"
            )
    return tok


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 1024,
    *,
    min_frequency: int = 2,
    max_alphabet: int | None = None,
    name: str = "llamathink-bpe",
):
    """Train a small Llama-2-style byte-fallback BPE tokenizer.

    ``texts`` is any iterable of documents.  The result has at most
    ``vocab_size`` tokens (fewer if the text is too small to learn that many
    merges): ``<unk>``=0, ``<s>``=1, ``</s>``=2, the 256 byte pieces at 3..258,
    then an alphabet of single characters (printable ASCII, newline, "▁", plus
    the most frequent other characters of the text, at most ``max_alphabet``;
    default ``min(256, (vocab_size - 259) // 2)``), then learned merges.  Any
    character outside the alphabet is encoded as UTF-8 bytes, so every string
    round-trips.  Deterministic for the same input.  Raises ValueError for a
    ``vocab_size`` out of range, and for ``texts`` without a document that is
    more than whitespace (nothing to learn from).
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    if vocab_size > 65536:
        raise ValueError(f"vocab_size {vocab_size} is too large (max 65536, ids must fit in uint16)")
    min_size = NUM_RESERVED + len(_BASE_ALPHABET) + 1
    if vocab_size < min_size:
        raise ValueError(
            f"vocab_size {vocab_size} is too small; need at least {min_size} "
            f"({NUM_RESERVED} special and byte pieces plus a {len(_BASE_ALPHABET)}-character alphabet)"
        )
    if max_alphabet is None:
        max_alphabet = min(256, (vocab_size - NUM_RESERVED) // 2)
    max_alphabet = max(max_alphabet, len(_BASE_ALPHABET))

    trainer_tk = Tokenizer(models.BPE())
    trainer_tk.normalizer = normalizers.Prepend(SPACE)
    trainer_tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="never", split=False),
            pre_tokenizers.Split(Regex(_TRAIN_SPLIT_PATTERN), behavior="isolated"),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - NUM_RESERVED,
        min_frequency=min_frequency,
        special_tokens=[],
        limit_alphabet=max_alphabet,
        initial_alphabet=_BASE_ALPHABET,
        show_progress=False,
    )
    counted = [0]

    def documents():
        for t in texts:
            if t and not t.isspace():
                counted[0] += 1
                yield t

    trainer_tk.train_from_iterator(documents(), trainer=trainer)
    if counted[0] == 0:
        raise ValueError("no text to train a tokenizer on (no document holds more than whitespace)")
    learned = [p for p, _ in sorted(trainer_tk.get_vocab().items(), key=lambda kv: kv[1])]
    reserved = [UNK, BOS, EOS] + BYTE_PIECES
    reserved_set = set(reserved)
    # Single characters first (alphabet), then merged pieces in learning order.
    singles = [p for p in learned if len(p) == 1 and p not in reserved_set and p != " "]
    merged = [p for p in learned if len(p) > 1 and p not in reserved_set and " " not in p]
    pieces = reserved + singles + merged
    ordinary = [False] * NUM_RESERVED + [True] * (len(singles) + len(merged))
    merges = _complete_merges(pieces, ordinary)
    vocab = {p: i for i, p in enumerate(pieces)}
    return _llama_style_tokenizer(vocab, merges, name=name)


# ---------------------------------------------------------------------------
# built-in demo tokenizer and sample data
# ---------------------------------------------------------------------------


def sample_data_path(name: str = "prose.jsonl") -> Path:
    """Path of a file in the bundled ``llamathink/sample_data`` folder."""
    path = SAMPLE_DATA_DIR / name
    if not path.exists():
        raise FileNotFoundError(f"sample data file {name!r} not found in {SAMPLE_DATA_DIR}")
    return path


def iter_sample_texts(include_conversations: bool = True) -> Iterator[str]:
    """Documents of the bundled sample corpus: prose, then (optionally) conversations."""
    with open(sample_data_path("prose.jsonl"), encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)["text"]
    if include_conversations:
        with open(sample_data_path("conversations.jsonl"), encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)["conversation"]


@functools.lru_cache(maxsize=4)
def _builtin(vocab_size: int):
    tok = train_tokenizer(iter_sample_texts(), vocab_size=vocab_size, name=f"{BUILTIN_PREFIX}:{vocab_size}")
    return tok


def builtin_tokenizer(vocab_size: int = DEFAULT_BUILTIN_VOCAB):
    """The offline demo tokenizer: :func:`train_tokenizer` on the bundled sample
    corpus (deterministic, a fraction of a second).  ``load_tokenizer("builtin")``
    and ``load_tokenizer("builtin:2048")`` return the same thing."""
    return copy.deepcopy(_builtin(int(vocab_size)))


# ---------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------


def check_tokenizer(tok, source: str = "") -> None:
    """Raise ``ValueError`` unless ``tok`` has a real vocabulary (more than 3 tokens, one id per token), a
    ``model_max_length`` that is a positive integer, encodes a probe string to a non-empty list of valid ids, and
    survives a copy (what saving it next to a model does first: a tokenizer.json whose merges name a token
    that another token's id shadows loads, but cannot be rebuilt)."""
    where = f" loaded from {source}" if source else ""
    n = len(tok)
    if n <= 3:
        raise ValueError(
            f"tokenizer{where} has only {n} tokens; the vocabulary was not loaded.  (With transformers 5, "
            "LlamaTokenizer(vocab_file='tokenizer.model') builds such an empty tokenizer; use "
            "load_tokenizer('path/to/tokenizer.model') instead.)"
        )
    limit = getattr(tok, "model_max_length", None)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
        raise ValueError(f"tokenizer{where}: model_max_length must be a positive integer, got {limit!r}")
    vocab = tok.get_vocab()
    if len(set(vocab.values())) < len(vocab):
        seen, shared = {}, []
        for token, index in sorted(vocab.items(), key=lambda kv: kv[1]):
            if index in seen:
                shared.append(f"{seen[index]!r} and {token!r} (id {index})")
            seen.setdefault(index, token)
        raise ValueError(f"tokenizer{where} gives one id to several tokens: {', '.join(shared[:3])}")
    try:
        ids = tok.encode("Hello world", add_special_tokens=False)
        copy.deepcopy(tok)
    except Exception as err:  # the tokenizers library raises bare Exceptions for an inconsistent vocabulary
        raise ValueError(f"tokenizer{where} is not usable ({type(err).__name__}: {err})") from err
    if not ids:
        raise ValueError(f"tokenizer{where} encodes 'Hello world' to an empty list; the vocabulary is unusable")
    if max(ids) >= n or min(ids) < 0:
        raise ValueError(f"tokenizer{where} produced ids {ids} outside its vocabulary of {n}")


@contextlib.contextmanager
def _names_unreadable_tokenizer(path: Path):
    """A tokenizer file that cannot be parsed (truncated, edited, not a tokenizer) as a ValueError naming `path`:
    the tokenizers library raises a bare Exception ("EOF while parsing ..."), transformers a JSONDecodeError or a
    KeyError, none of which says which file."""
    try:
        yield
    except ImportError:  # a missing optional package: its own message says what to install
        raise
    except Exception as err:  # whatever the parser raised, re-raised with the file's name
        # transformers also reads a model folder's config.json (for the tokenizer's class): its errors come here too
        what = (
            "this tokenizer or the config.json beside it"
            if (Path(path) / "config.json").is_file()
            else "this tokenizer"
        )
        raise ValueError(f"{path}: cannot read {what} ({type(err).__name__}: {err})") from err


def load_tokenizer(name_or_path: str | os.PathLike, *, check: bool = True):
    """Load a tokenizer and check it (see :func:`check_tokenizer`).

    ``name_or_path`` may be:

    * ``"builtin"`` or ``"builtin:VOCAB"`` - the demo tokenizer trained on the
      bundled sample corpus (offline);
    * a SentencePiece ``.model`` file, or a directory that holds only a
      ``tokenizer.model`` - converted with :func:`tokenizer_from_sentencepiece`
      (BOS is added by ``tokenizer(text)`` as in the Hugging Face Llama 2
      tokenizer);
    * a ``tokenizer.json`` file;
    * a directory saved with ``save_pretrained`` or a Hub id (network) -
      ``AutoTokenizer.from_pretrained``.

    If the tokenizer has no pad token, ``pad_token`` is set to ``unk`` (or to
    ``eos`` when there is no unk token).
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    spec = os.fspath(name_or_path)
    path = Path(spec).expanduser()
    if not path.exists() and (spec == BUILTIN_PREFIX or spec.startswith(BUILTIN_PREFIX + ":")):
        size = spec.split(":", 1)[1] if ":" in spec else str(DEFAULT_BUILTIN_VOCAB)
        if not size.isdigit():
            raise ValueError(f"bad built-in tokenizer name {spec!r}; use 'builtin' or 'builtin:<vocab size>'")
        tok = builtin_tokenizer(int(size))
    elif path.is_file() and path.suffix == ".model":
        tok = tokenizer_from_sentencepiece(path)
    elif path.is_file() and path.suffix == ".json":
        with _names_unreadable_tokenizer(path):
            tok = PreTrainedTokenizerFast(tokenizer_file=str(path), clean_up_tokenization_spaces=False)
        vocab = tok.get_vocab()
        for attr, tokname in (("unk_token", UNK), ("bos_token", BOS), ("eos_token", EOS)):
            if getattr(tok, attr) is None and tokname in vocab:
                setattr(tok, attr, tokname)
        tok.name_or_path = str(path)
    elif path.is_dir():
        has_hf = any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
        if not has_hf and (path / "tokenizer.model").is_file():
            tok = tokenizer_from_sentencepiece(path / "tokenizer.model")
        elif has_hf:
            if not (path / "tokenizer.json").exists() and not (path / "tokenizer.model").exists():
                try:
                    tok = AutoTokenizer.from_pretrained(str(path))
                except (OSError, ValueError, ImportError) as err:  # e.g. "install sentencepiece or tiktoken"
                    raise ValueError(
                        f"{path}: transformers cannot load the tokenizer of this folder ({err}); note that it holds "
                        "tokenizer_config.json but neither tokenizer.json nor tokenizer.model: was the vocabulary "
                        "lost?"
                    ) from None
            else:
                with _names_unreadable_tokenizer(path):
                    tok = AutoTokenizer.from_pretrained(str(path))
        else:
            raise FileNotFoundError(
                f"{path}: directory has no tokenizer.json, tokenizer_config.json or tokenizer.model"
            )
    elif path.exists():
        raise ValueError(f"{path}: unsupported tokenizer file (expected a .model or .json file or a directory)")
    else:
        try:
            tok = AutoTokenizer.from_pretrained(spec)
        except Exception as e:
            if offline_variable() is not None:
                raise ValueError(hub_lookup_failure(f"tokenizer {spec!r}", e, spec)) from e
            raise ValueError(
                f"could not load tokenizer {spec!r}: not a local path, not 'builtin', and the "
                f"Hub/cache lookup failed ({type(e).__name__}: {e})"
            ) from e
    if tok.pad_token is None:
        if tok.unk_token is not None:
            tok.pad_token = tok.unk_token
        elif tok.eos_token is not None:
            tok.pad_token = tok.eos_token
    if check:
        check_tokenizer(tok, spec)
    return tok


# Keys transformers records in ``init_kwargs`` about how a tokenizer was *loaded* (``from_pretrained`` sets them
# again on every load); saved, they would describe the saving machine, not the tokenizer.
_LOAD_ONLY_KWARGS = ("is_local", "local_files_only")


def saved_tokenizer(folder: str | os.PathLike):
    """The tokenizer saved in a local model folder (`load_tokenizer`), or None where `folder` is not a local folder,
    holds no tokenizer file, or its tokenizer cannot be loaded (nothing to compare a tokenizer with)."""
    local = Path(folder).expanduser()
    if not (local.is_dir() and any(local.glob("tokenizer*"))):
        return None
    try:
        return load_tokenizer(str(local))
    except (OSError, ValueError, ImportError):
        return None


def pieces_with_other_ids(reference, tokenizer) -> list[str]:
    """The pieces of `reference`'s base vocabulary (its added tokens left out: reserved ones may be renamed at their
    ids) that `tokenizer` gives another id or none; empty where `tokenizer` encodes every piece as `reference` does
    (it may extend it with more ids after them). A model trained on `reference`'s ids reads those pieces as other
    text under `tokenizer`."""
    mine, added = tokenizer.get_vocab(), reference.get_added_vocab()
    return [piece for piece, i in reference.get_vocab().items() if piece not in added and mine.get(piece) != i]


def check_saved_tokenizer_pieces(init_from: str, tokenizer, subject: str, consequence: str) -> None:
    """Raise ValueError where `tokenizer` gives one of the pieces of the tokenizer saved with the model `init_from`
    (`saved_tokenizer`) another id or none (`pieces_with_other_ids`): "{subject} the tokenizer saved with init_from=...:
    N of its M pieces have other ids or none (e.g. ...), so {consequence}". A model without a readable tokenizer of
    its own (a Hub id offline) passes: nothing to compare."""
    saved = saved_tokenizer(init_from)
    moved = pieces_with_other_ids(saved, tokenizer) if saved is not None else []
    if moved:
        raise ValueError(
            f"{subject} the tokenizer saved with init_from={init_from!r}: {len(moved)} of its {len(saved)} pieces "
            f"have other ids or none (e.g. {moved[0]!r}), so {consequence}"
        )


def save_tokenizer_for_model(tok, save_dir: str | os.PathLike, model_max_length: int):
    """Save a copy of ``tok`` next to a model with the defaults that model needs; returns the saved copy.

    * ``padding_side="left"``: batched generation with LlamaThink must be left-padded (its recurrent and conv
      state and the CSA blocks follow each row's own positions; a cache built from right-padded input refuses to
      continue). Training code pads explicitly and does not read this default.
    * ``model_max_length``: the model's context (``config.max_position_embeddings``), so tokenizer warnings and
      ``truncation=True`` use the real limit instead of transformers' "very large" placeholder.

    The saved folder loads (``AutoTokenizer``) with ``tok``'s own text pipeline (normalizer, pre-tokenizer,
    post-processor, decoder): where ``tok``'s class builds its own on loading instead of reading tokenizer.json's
    (transformers 5's ``LlamaTokenizer`` does, from ``add_prefix_space``, and so dropped the chat template's text
    guard, ``llamathink.chat_format.set_chat_template``), tokenizer_config.json names the generic
    ``PreTrainedTokenizerFast``, which reads the file as written.

    ``tok`` itself is not changed. Raises ``ValueError`` if ``model_max_length`` is not a positive integer; warns
    where the saved folder cannot be loaded again, or loads with another pipeline under either class name.
    """
    if isinstance(model_max_length, bool) or not isinstance(model_max_length, int) or model_max_length <= 0:
        raise ValueError(f"model_max_length must be a positive integer, got {model_max_length!r}")
    out = copy.deepcopy(tok)
    out.padding_side = "left"
    out.model_max_length = model_max_length
    # save_pretrained writes the attributes whose names are in init_kwargs (plus model_max_length)
    out.init_kwargs["padding_side"] = "left"
    out.init_kwargs["model_max_length"] = model_max_length
    for key in _LOAD_ONLY_KWARGS:
        out.init_kwargs.pop(key, None)
    out.save_pretrained(os.fspath(save_dir))
    # (a tokenizer without a tokenizers backend, or of a class from outside transformers, whose code the folder
    # names for `trust_remote_code`, is left as saved)
    pipeline = _text_pipeline(out)
    if not pipeline or not type(out).__module__.startswith("transformers."):
        return out
    reloaded, error = _reloaded_pipeline(save_dir)
    if reloaded != pipeline:
        config_path = Path(save_dir) / "tokenizer_config.json"
        written = config_path.read_text(encoding="utf-8")
        config = json.loads(written)
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        reloaded, error = _reloaded_pipeline(save_dir)
        if reloaded != pipeline:
            config_path.write_text(written, encoding="utf-8")
            # (a warning, not an error: this runs as a finished training run saves its model)
            problem = (
                f"cannot be loaded again ({error})"
                if error
                else "loads with another text pipeline (normalizer, pre-tokenizer, post-processor or decoder) than "
                "it was saved with"
            )
            warnings.warn(
                f"{save_dir}: the saved tokenizer ({type(tok).__name__}) {problem}, also as PreTrainedTokenizerFast: "
                "check how the folder encodes before using it",
                stacklevel=2,
            )
    return out


def _reloaded_pipeline(folder: str | os.PathLike) -> tuple[tuple | None, str | None]:
    """`_text_pipeline` of the tokenizer ``AutoTokenizer`` loads from a saved `folder` (no network, no code from the
    folder), and None; (None, why) where it cannot load it."""
    from transformers import AutoTokenizer

    try:
        loaded = AutoTokenizer.from_pretrained(os.fspath(folder), local_files_only=True, trust_remote_code=False)
    except (KeyboardInterrupt, SystemExit):
        raise
    # transformers raises OSError, ValueError, ImportError and others here, and tokenizers a Rust panic as pyo3's
    # PanicException, a BaseException
    except BaseException as err:  # noqa: BLE001
        return None, f"{type(err).__name__}: {err}"
    return _text_pipeline(loaded), None


def _text_pipeline(tok) -> tuple:
    """The normalizer, pre-tokenizer, post-processor and decoder of a fast tokenizer (their tokenizer.json states),
    what decides how it encodes and decodes text beyond its vocabulary; () for a tokenizer without a tokenizers
    backend."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return ()
    state = json.loads(backend.to_str())
    return tuple(state.get(key) for key in ("normalizer", "pre_tokenizer", "post_processor", "decoder"))


# ---------------------------------------------------------------------------
# llama2.c-style view: pieces, scores and a reference greedy encoder
# ---------------------------------------------------------------------------

NO_MERGE_SCORE = -1e30  # below llama2.c's initial best score (-1e10): never chosen as a merge


def vocab_and_scores(tok) -> tuple[list[str], list[float]]:
    """Pieces (as stored, with "▁" for space) and llama2.c-style merge scores.

    A piece that some merge produces gets ``-rank`` of the first such merge
    (so better merges have higher scores).  Every other piece (specials, byte
    pieces, single characters) gets :data:`NO_MERGE_SCORE`, so a greedy encoder
    never creates it by concatenation (e.g. literal text "<s>" or "<0x41>" stays
    ordinary text).  With these scores :func:`greedy_encode` reproduces the
    tokenizer's encoding.
    """
    data = json.loads(tok.backend_tokenizer.to_str())
    model = data["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"expected a BPE tokenizer, got {model.get('type')}")
    vocab: dict[str, int] = model["vocab"]
    ids = list(vocab.values()) + [a["id"] for a in data.get("added_tokens", [])]
    n = max(ids) + 1
    pieces = [""] * n
    for p, i in vocab.items():
        pieces[i] = p
    for added in data.get("added_tokens", []):
        pieces[added["id"]] = added["content"]
    scores = [NO_MERGE_SCORE] * n
    seen = set()
    for rank, m in enumerate(model["merges"]):
        left, right = m.split(" ", 1) if isinstance(m, str) else m
        merged = left + right
        if merged not in seen:
            seen.add(merged)
            scores[vocab[merged]] = -float(rank)
    return pieces, scores


def greedy_encode(text: str, pieces: Sequence[str], scores: Sequence[float]) -> list[int]:
    """Encode like llama2.c: dummy prefix, spaces to "▁", one token per
    character (UTF-8 byte pieces ``<0xNN>`` for characters that are not a
    piece), then repeatedly merge the adjacent pair whose concatenation is a
    piece with the highest score above -1e10 (leftmost on ties).  No BOS/EOS.
    Quadratic time; meant as a reference for tests and the C export."""
    if not text:
        return []
    lookup: dict[str, int] = {}
    for i, p in enumerate(pieces):
        if p:
            lookup.setdefault(p, i)
    norm = SPACE + text.replace(" ", SPACE)
    toks: list[int] = []
    strs: list[str] = []
    for ch in norm:
        if ch in lookup:
            toks.append(lookup[ch])
            strs.append(ch)
        else:
            for b in ch.encode("utf-8"):
                toks.append(lookup[f"<0x{b:02X}>"])
                strs.append(f"<0x{b:02X}>")
    while True:
        best, best_i = -1e10, -1
        for i in range(len(toks) - 1):
            j = lookup.get(strs[i] + strs[i + 1])
            if j is not None and scores[j] > best:
                best, best_i = scores[j], i
        if best_i < 0:
            return toks
        strs[best_i] = strs[best_i] + strs[best_i + 1]
        toks[best_i] = lookup[strs[best_i]]
        del strs[best_i + 1], toks[best_i + 1]


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------


# what save_pretrained writes for a tokenizer: a folder holding only these may be written over by `train --out`
TOKENIZER_FILES = frozenset(
    {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja"}
)


def _check_tokenizer_out(out: Path) -> None:
    """Raise ValueError where `train --out` would write over something that is not an earlier tokenizer: a file,
    or a folder holding other files (a model folder's tokenizer replaced would no longer match its model)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder for the tokenizer's files")
    others = sorted(p.name for p in out.iterdir() if p.name not in TOKENIZER_FILES) if out.is_dir() else []
    if others:
        raise ValueError(
            f"--out {out} holds other files than a tokenizer's ({', '.join(others[:4])}"
            f"{f' and {len(others) - 4} more' if len(others) > 4 else ''}): a model folder's tokenizer replaced would "
            "no longer match its model; give a new or empty folder"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m llamathink.tokenizer_utils train|info ...``"""
    tolerant_output()
    ap = argparse.ArgumentParser(prog="python -m llamathink.tokenizer_utils", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train a small Llama-style tokenizer and save it with save_pretrained")
    tr.add_argument(
        "--input",
        nargs="*",
        default=[],
        help="files, folders or globs of documents, as `llamathink-prepare --input` reads them (.txt: one document "
        "per file, .jsonl, .jsonl.gz, .parquet); default: the bundled sample corpus",
    )
    tr.add_argument("--text-field", default="text")
    tr.add_argument(
        "--skip-bad-records",
        action="store_true",
        help="skip records that cannot be read (not JSON, no text field, not UTF-8...) and count them",
    )
    tr.add_argument("--vocab-size", type=int, default=DEFAULT_BUILTIN_VOCAB)
    tr.add_argument("--out", required=True, help="output folder: new, empty, or holding an earlier tokenizer only")
    info = sub.add_parser("info", help="load a tokenizer and print a summary")
    info.add_argument("name_or_path")
    info.add_argument("--text", default="Hello world")
    args = ap.parse_args(argv)
    try:  # bad input (a missing file, a record that is not JSON, too small a vocabulary): one line naming it
        if args.cmd == "train":
            from .data.preparation import BadRecords, LocalSource  # (the data package's reader, checks and formats)

            _check_tokenizer_out(Path(args.out))  # before the training: a wrong --out is named at once
            bad = BadRecords(args.skip_bad_records)
            source = LocalSource(args.input, text_field=args.text_field) if args.input else None
            tok = train_tokenizer(source.documents(bad) if source else iter_sample_texts(), vocab_size=args.vocab_size)
            if bad.total:
                print(f"skipped {bad.total} bad record(s) {bad.summary()['by_kind']}; first: {bad.examples[0]}")
            try:
                tok.save_pretrained(args.out)
            except OSError as err:  # (a folder that cannot be made or written: its own message names the path)
                raise ValueError(f"cannot write the tokenizer to --out {args.out} ({err})") from None
        else:
            try:
                args.text.encode("utf-8")
            except UnicodeEncodeError as err:  # (bytes that are not UTF-8 reach Python as lone surrogates)
                raise ValueError(
                    f"--text is not UTF-8 text (character {err.start + 1}: invalid UTF-8 input?)"
                ) from None
            tok = load_tokenizer(args.name_or_path)
    except (ValueError, OSError) as err:
        ap.exit(2, f"{ap.prog}: error: {err}\n")
    if args.cmd == "train":
        fewer = f" (of the {args.vocab_size} asked: the text is too small to learn more merges)"
        print(f"saved tokenizer with {len(tok)} tokens to {args.out}{fewer if len(tok) < args.vocab_size else ''}")
    else:
        # as the data, the chat and the C runner encode text: "<s>" typed in it is those characters, not BOS
        ids = tok.encode(args.text, add_special_tokens=False, split_special_tokens=True)
        print(
            json.dumps(
                {
                    "name": tok.name_or_path,
                    "vocab_size": len(tok),
                    "bos_token_id": tok.bos_token_id,
                    "eos_token_id": tok.eos_token_id,
                    "unk_token_id": tok.unk_token_id,
                    "pad_token_id": tok.pad_token_id,
                    "text": args.text,
                    "ids": ids,
                    "pieces": tok.convert_ids_to_tokens(ids),
                },
                ensure_ascii=False,
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    warnings.simplefilter("default")
    sys.exit(main())
