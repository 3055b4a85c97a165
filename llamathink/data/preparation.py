"""Preparing token shards: document sources, tokenization in worker processes, :func:`prepare` and its CLI.

Preparation (``python -m llamathink.data prepare ...``, ``llamathink-prepare ...`` or :func:`prepare`)
reads documents from local files or a Hugging Face ``datasets`` dataset,
tokenizes each WHOLE document (newlines are kept; nothing is split into
lines) as ``[BOS] + tokens + [EOS]`` in worker processes (documents longer
than ``max_doc_chars`` are tokenized in pieces that join into one document,
so memory stays bounded; bad records stop the run naming file and line, or
are skipped and counted with ``skip_bad_records``), and concatenates the
documents into shards of exactly ``shard_tokens`` tokens
(``train_000000.bin``, ``train_000001.bin``, ...; the last one may be shorter;
documents may span shard boundaries).  The FIRST ``val_docs`` documents of the
source go to one held-out shard ``val_000000.bin``.  ``meta.json`` describes
the result.  The run is restartable: after every shard, ``progress.json``
(written atomically) records the shards written, how many documents they
consumed and how many tokens of the next document they already hold; a rerun
skips those documents and produces output byte-identical to an uninterrupted
run.  The shard format and the readers are in :mod:`llamathink.data.shards`.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import glob
import gzip
import hashlib
import json
import multiprocessing.context as _mp_context
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from ..cli import tolerant_output
from .shards import (
    _SHARD_RE,
    FORMAT_VERSION,
    HEADER_BYTES,
    MAX_VOCAB,
    META_FILE,
    TOKEN_DTYPE,
    _atomic_write_json,
    _shard_name,
    load_meta,
    read_shard_header,
    write_shard,
)

DEFAULT_HF_DATASET = "HuggingFaceFW/fineweb"
DEFAULT_HF_CONFIG = "sample-10BT"
DEFAULT_SHARD_TOKENS = 100_000_000
DEFAULT_VAL_DOCS = 500
PROGRESS_FILE = "progress.json"
# Temporary files of shards.py's atomic writes ("{name}.tmp.{pid}") that a killed run left behind.
_TMP_RE = re.compile(r"^((train|val)_\d{6}\.bin|progress\.json|meta\.json)\.tmp\.\d+$")


# ---------------------------------------------------------------------------
# document sources
# ---------------------------------------------------------------------------

_LOCAL_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")
DEFAULT_MAX_DOC_CHARS = 1_000_000
_READ_CHUNK_BYTES = 1 << 20  # .txt files are read and validated in pieces of this size
_SURROGATE_RE = re.compile("[\ud800-\udfff]")
_BLANK_LINE_RE = re.compile(r"[ \t]*\n?")

# Kinds of bad record, as counted in meta.json's "bad_records".
BAD_RECORD_KINDS = (
    "invalid_utf8",
    "lone_surrogate",
    "invalid_json",
    "missing_field",
    "not_a_string",
    "nul_only",
    "corrupt_file",
    "unreadable_file",
    "line_too_long",
)
# A JSON Lines record is parsed whole, so a line is read whole: this bounds the memory of one (a binary or
# one-line file named .jsonl would otherwise be read into memory entirely). Far above any real document line.
MAX_JSONL_LINE_BYTES = 1 << 30


def _has_suffix(p: Path) -> bool:
    return any(p.name.endswith(s) for s in _LOCAL_SUFFIXES)


class BadRecords:
    """What to do with a bad input record: stop with a ``ValueError`` naming it
    (``skip=False``, the default) or skip it and count it by kind.

    Kinds (:data:`BAD_RECORD_KINDS`): ``invalid_utf8`` (bytes that are not
    UTF-8), ``lone_surrogate`` (text with an unpaired UTF-16 surrogate such as
    JSON ``"\\ud800"``: not valid Unicode, no tokenizer can encode it),
    ``invalid_json``, ``missing_field`` (no ``text_field`` in the record),
    ``not_a_string`` (the field is null, a number, a list...), ``nul_only``
    (text made only of NUL characters and whitespace: a zero-filled or binary
    file), ``corrupt_file`` (truncated or corrupt gzip / parquet data: the rest
    of that file is skipped), ``unreadable_file`` (the file cannot be opened
    or read) and ``line_too_long`` (a JSON Lines line over
    :data:`MAX_JSONL_LINE_BYTES`, skipped without being held in memory).
    ``where`` names the file and line (``path:line``) or the dataset row.
    """

    max_examples = 10

    def __init__(self, skip: bool = False):
        self.skip = bool(skip)
        self.counts: dict[str, int] = {}
        self.examples: list[str] = []

    def __call__(self, kind: str, where: Any, problem: str) -> None:
        """Report one bad record; raises ``ValueError`` unless skipping."""
        assert kind in BAD_RECORD_KINDS, kind
        msg = f"{where}: {problem}"
        if not self.skip:
            raise ValueError(
                f"{msg} [bad record: {kind}]; fix the input, or pass --skip-bad-records "
                "(prepare(skip_bad_records=True)) to skip such records and count them"
            )
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if len(self.examples) < self.max_examples:
            self.examples.append(msg)

    @property
    def total(self) -> int:
        """Bad records of every kind."""
        return sum(self.counts.values())

    def summary(self) -> dict:
        """``{"skipped": total, "by_kind": {kind: count}, "examples": [first messages]}``."""
        return {"skipped": self.total, "by_kind": dict(sorted(self.counts.items())), "examples": list(self.examples)}


class Piece(NamedTuple):
    """One piece of a document.

    A document longer than ``max_doc_chars`` is cut into several pieces
    (:class:`_Splitter`); ``first``/``last`` mark the document's start and end
    (BOS goes before the first piece, EOS after the last one) and ``context``
    is the character just before the piece in the document ("" for the first
    piece), used to tokenize the piece as it would be inside the whole document
    (see :func:`_encode_with`).
    """

    text: str
    first: bool = True
    last: bool = True
    context: str = ""


def _cut_point(buf: str, pos: int, hi: int) -> int:
    """Where to end a piece that starts at ``buf[pos]`` and may not go past
    ``hi``: the last paragraph start (after a blank line) in the second half of
    the window, else the last line start, else just before the last space or
    tab, else ``hi``."""
    lo = pos + (hi - pos) // 2
    j = buf.rfind("\n\n", lo, hi)
    if j >= 0:
        cut = j + 2
        while cut < hi and buf[cut] == "\n":  # keep a run of newlines in one piece
            cut += 1
        return cut
    j = buf.rfind("\n", lo, hi)
    if j >= 0:
        return j + 1
    j = max(buf.rfind(" ", lo, hi), buf.rfind("\t", lo, hi))
    if j > pos:
        return j
    return hi


class _Splitter:
    """Cut one document, fed as text in any number of parts, into
    :class:`Piece` s of at most ``max_chars`` characters (``None``: never cut).
    Memory is bounded by ``max_chars`` plus the part being fed."""

    def __init__(self, max_chars: int | None):
        self.max = max_chars
        self.buf = ""
        self.pos = 0
        self.first = True
        self.context = ""

    def feed(self, text: str) -> Iterator[Piece]:
        if self.pos:
            self.buf = self.buf[self.pos :] + text
            self.pos = 0
        else:
            self.buf += text  # "" + text is text itself: a whole document is not copied
        if self.max is None:
            return
        while len(self.buf) - self.pos > self.max:
            cut = _cut_point(self.buf, self.pos, self.pos + self.max)
            yield Piece(self.buf[self.pos : cut], self.first, False, self.context)
            self.first, self.context, self.pos = False, self.buf[cut - 1], cut

    def finish(self) -> Iterator[Piece]:
        yield Piece(self.buf[self.pos :], self.first, True, self.context)
        self.buf, self.pos, self.first, self.context = "", 0, True, ""


def _text_problem(text: str) -> tuple[str, str] | None:
    """``(kind, problem)`` if ``text`` is a bad record, else None."""
    m = _SURROGATE_RE.search(text)
    if m:
        return "lone_surrogate", (
            f"text contains a lone surrogate U+{ord(m.group()):04X} at character {m.start()} "
            "(not valid Unicode, cannot be tokenized)"
        )
    if "\0" in text and not text.replace("\0", "").strip():
        return "nul_only", "text is only NUL characters (a zero-filled or binary file?)"
    return None


def _document_pieces(
    text: Any, where: Any, bad: BadRecords, max_chars: int | None, field_name: str | None = None
) -> Iterator[Piece]:
    """Check one in-memory document and cut it into pieces; empty or
    whitespace-only documents give nothing."""
    if not isinstance(text, str):
        what = f"field {field_name!r}" if field_name else "document"
        bad("not_a_string", where, f"{what} is {type(text).__name__}, not a string")
        return
    if not text.strip():
        return
    problem = _text_problem(text)
    if problem:
        bad(problem[0], where, problem[1])
        return
    sp = _Splitter(max_chars)
    yield from sp.feed(text)
    yield from sp.finish()


def _row_pieces(row: Any, field_name: str, where: Any, bad: BadRecords, max_chars: int | None) -> Iterator[Piece]:
    if not isinstance(row, dict):
        kind = "null" if row is None else type(row).__name__
        bad("missing_field", where, f"record is a JSON {kind}, not an object with a field {field_name!r}")
        return
    if field_name not in row:
        keys = list(row)  # (a few of them: a record may have thousands)
        shown = ", ".join(map(repr, keys[:8])) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
        bad("missing_field", where, f"record has no field {field_name!r} (fields: {shown or 'none'}); use --text-field")
        return
    yield from _document_pieces(row[field_name], where, bad, max_chars, field_name)


def _join_pieces(pieces: Iterable[Piece]) -> Iterator[str]:
    parts: list[str] = []
    for p in pieces:
        parts.append(p.text)
        if p.last:
            yield "".join(parts)
            parts = []


def _scan_txt(path: Path) -> tuple[str, str, str] | None:
    """Read a .txt file once, in chunks of bounded size, and return ``(kind,
    where, problem)`` if it is not valid UTF-8 (``where`` names the line) or is
    only NUL characters and whitespace (``nul_only``); ``("empty", ...)`` if it
    is empty or only whitespace; None if it is a good document."""
    offset = 0  # file offset of data[0]
    lines = 0  # newlines before data[0]
    line_start = 0  # file offset where the line holding data[0] starts
    pending = b""
    has_text = has_real = False
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_READ_CHUNK_BYTES)
            final = not chunk
            data = pending + chunk
            try:
                text, pending = data.decode("utf-8"), b""
            except UnicodeDecodeError as e:
                if not final and e.reason == "unexpected end of data" and len(data) - e.start < 4:
                    text, pending = data[: e.start].decode("utf-8"), data[e.start :]  # a character cut by the chunk
                else:
                    head = data[: e.start]
                    nl = head.rfind(b"\n")
                    col = e.start - nl if nl >= 0 else offset + e.start - line_start + 1
                    line = lines + head.count(b"\n") + 1
                    return (
                        "invalid_utf8",
                        f"{path}:{line}",
                        f"invalid UTF-8: byte(s) {data[e.start : e.end].hex(' ')} at column {col} "
                        f"(byte offset {offset + e.start} of the file): {e.reason}",
                    )
            if offset == 0 and text.startswith("\ufeff"):  # a byte-order mark is not text (read as utf-8-sig)
                text = text[1:]
            has_text = has_text or bool(text.strip())
            has_real = has_real or bool(text.replace("\0", "").strip())
            used = data[: len(data) - len(pending)]
            nl = used.rfind(b"\n")
            if nl >= 0:
                line_start = offset + nl + 1
            lines += used.count(b"\n")
            offset += len(used)
            if final:
                break
    if not has_text:
        return "empty", str(path), ""
    if not has_real:
        return "nul_only", str(path), "text is only NUL characters (a zero-filled or binary file?)"
    return None


def _files_named_by(spec: str) -> list[Path]:
    """The input files one of LocalSource's paths names: the file, the supported files under a folder (sorted), a
    `datasets.save_to_disk` folder, or a glob's matches (sorted)."""
    p = Path(spec)
    if p.is_dir():
        if (p / "state.json").is_file() and (p / "dataset_info.json").is_file():
            return [p]  # datasets.save_to_disk directory
        if (p / "dataset_dict.json").is_file():  # a DatasetDict's save_to_disk: one folder per split
            splits = sorted(q.name for q in p.iterdir() if (q / "state.json").is_file())
            raise ValueError(
                f"{p} is a saved DatasetDict (splits: {', '.join(splits) or 'none'}): give one split's folder, "
                f"e.g. {p / ('train' if 'train' in splits or not splits else splits[0])}"
            )
        found = sorted(q for q in p.rglob("*") if (q.is_file() or q.is_symlink()) and _has_suffix(q))
        if not found:
            raise FileNotFoundError(f"no {', '.join(_LOCAL_SUFFIXES)} files under {p}")
        return found
    if p.is_file():
        if not _has_suffix(p):
            raise ValueError(f"{p}: unsupported input file type (expected one of {', '.join(_LOCAL_SUFFIXES)})")
        return [p]
    matches = sorted(Path(m) for m in glob.glob(spec, recursive=True) if _has_suffix(Path(m)))
    if not matches:
        raise FileNotFoundError(f"input {spec} does not exist")
    return matches


@dataclass
class LocalSource:
    """Documents from local files, in sorted path order (each file once: see `files`).

    ``paths`` may be files, directories (searched recursively for ``.txt``,
    ``.jsonl``, ``.jsonl.gz`` and ``.parquet`` files), glob patterns, or a
    directory written by ``datasets.Dataset.save_to_disk``.

    * ``.txt``: ``txt_split="file"`` (default) makes each file ONE document;
      ``"paragraph"`` makes each block of text between blank lines (lines of
      only spaces and tabs) a document.  Files must be UTF-8; newlines are
      universal (``\r\n`` and ``\r`` become ``\n``).  Files are streamed: a
      first pass checks the encoding in 1 MiB chunks, a second one cuts the
      text into pieces (see :meth:`pieces`), so a file of any size needs
      bounded memory (in paragraph mode one line is held whole).
    * ``.jsonl`` / ``.jsonl.gz``: one JSON object per line, text in
      ``text_field``.
    * ``.parquet``: column ``text_field``.

    Empty or whitespace-only documents are skipped.  Bad records (see
    :class:`BadRecords`) raise ``ValueError`` naming the file and line (the row
    for parquet and save_to_disk data), or are skipped and counted.  A .txt
    file with invalid UTF-8 is one bad record, skipped whole in either split
    mode (it is checked before any of it is used).

    Iterating (or :meth:`documents`) yields whole documents (strings);
    :func:`prepare` uses :meth:`pieces`.
    """

    paths: Sequence[str]
    text_field: str = "text"
    txt_split: str = "file"

    def __post_init__(self):
        if self.txt_split not in ("file", "paragraph"):
            raise ValueError(f"txt_split must be 'file' or 'paragraph', got {self.txt_split!r}")

    def files(self) -> list[Path]:
        """The input files the paths, folders and globs name, in order, each once: a file that two of them name (or
        that two names link to) is read where it is first named, since its documents would otherwise be trained on
        twice (`repeated_files` says which). FileNotFoundError for a name that matches no file, ValueError for a
        file of an unsupported type."""
        return [path for path, _ in self._distinct_files()[0].values()]

    def repeated_files(self) -> list[tuple[Path, str, str]]:
        """(file, the input that named it first, the input that names it again) for each input file named again
        (see `files`)."""
        return self._distinct_files()[1]

    def _distinct_files(self) -> tuple[dict[str, tuple[Path, str]], list[tuple[Path, str, str]]]:
        first: dict[str, tuple[Path, str]] = {}  # real path -> (the name it was first found by, its input)
        again = []
        for spec in self.paths:
            for path in _files_named_by(spec):
                key = os.path.realpath(path)  # (a link loop stays a name: read, it is a bad record)
                if key in first:
                    again.append((path, first[key][1], spec))
                else:
                    first[key] = (path, spec)
        return first, again

    def describe(self) -> dict:
        """What the source is, for meta.json (``source``) and the model card."""
        return {
            "type": "local",
            "paths": [str(p) for p in self.paths],
            "text_field": self.text_field,
            "txt_split": self.txt_split,
        }

    def __iter__(self) -> Iterator[str]:
        return self.documents()

    def documents(self, bad: BadRecords | None = None) -> Iterator[str]:
        """The documents, whole, reporting bad records to ``bad`` (default: raise on the first one)."""
        return _join_pieces(self.pieces(None, bad))

    def pieces(
        self, max_doc_chars: int | None = DEFAULT_MAX_DOC_CHARS, bad: BadRecords | None = None
    ) -> Iterator[Piece]:
        """The documents as :class:`Piece` s of at most ``max_doc_chars``
        characters (``None``: one piece per document), reporting bad records to
        ``bad`` (default: raise on the first one)."""
        bad = BadRecords() if bad is None else bad
        for path in self.files():
            yield from self._file_pieces(path, max_doc_chars, bad)

    def _file_pieces(self, path: Path, max_chars: int | None, bad: BadRecords) -> Iterator[Piece]:
        name = path.name
        if path.is_dir() and (path / "state.json").is_file():
            import datasets

            try:  # a saved split of no rows has no data files, and datasets 5.2 cannot load it (an IndexError)
                empty = json.loads((path / "state.json").read_text()).get("_data_files") == []
            except (OSError, ValueError, AttributeError, RecursionError):
                empty = False  # (load_from_disk names what is wrong with the folder)
            if empty:
                return
            ds = datasets.load_from_disk(str(path))
            for i, row in enumerate(ds):
                yield from _row_pieces(row, self.text_field, f"{path} row {i}", bad, max_chars)
            return
        if name.endswith(".txt"):
            gen = self._txt_pieces(path, max_chars, bad)
        elif name.endswith(".parquet"):
            gen = self._parquet_pieces(path, max_chars, bad)
        else:
            gen = self._jsonl_pieces(path, max_chars, bad)
        in_doc = False  # a document has started but not ended: a read error now cannot be skipped cleanly
        try:
            for p in gen:
                in_doc = not p.last
                yield p
        except OSError as e:
            problem = f"cannot read file ({e.strerror or e})"
            if in_doc:
                raise ValueError(f"{path}: {problem} in the middle of a document") from e
            bad("unreadable_file", path, problem)

    def _txt_pieces(self, path: Path, max_chars: int | None, bad: BadRecords) -> Iterator[Piece]:
        found = _scan_txt(path)
        if found is not None:
            if found[0] != "empty":
                bad(*found)
            return
        try:  # utf-8-sig: a leading byte-order mark (Windows editors write one) is dropped, not tokenized
            with open(path, encoding="utf-8-sig", errors="strict") as f:
                if self.txt_split == "file":
                    sp = _Splitter(max_chars)
                    while chunk := f.read(_READ_CHUNK_BYTES):
                        yield from sp.feed(chunk)
                    yield from sp.finish()
                    return
                sp, para_line, has_real = None, 0, False
                for lineno, line in enumerate(f, 1):
                    if _BLANK_LINE_RE.fullmatch(line):
                        if sp is not None:
                            yield from _end_paragraph(sp, has_real, f"{path}:{para_line}", bad)
                            sp = None
                        continue
                    text = line[:-1] if line.endswith("\n") else line
                    if sp is None:
                        sp, para_line, has_real = _Splitter(max_chars), lineno, False
                        yield from sp.feed(text)
                    else:
                        yield from sp.feed("\n" + text)
                    has_real = has_real or bool(text.replace("\0", "").strip())
                if sp is not None:
                    yield from _end_paragraph(sp, has_real, f"{path}:{para_line}", bad)
        except UnicodeDecodeError as e:  # the file changed after it was checked
            raise ValueError(f"{path}: invalid UTF-8 ({e}); did the file change during preparation?") from e

    def _jsonl_pieces(self, path: Path, max_chars: int | None, bad: BadRecords) -> Iterator[Piece]:
        import zlib

        gz = path.name.endswith(".gz")
        lineno = 0
        try:
            with gzip.open(path, "rb") if gz else open(path, "rb") as f:
                limit = MAX_JSONL_LINE_BYTES
                while raw := f.readline(limit + 1):
                    lineno += 1
                    where = f"{path}:{lineno}"
                    if len(raw) > limit:  # read on to the end of the line in bounded pieces, keeping none
                        while not raw.endswith(b"\n") and (raw := f.readline(_READ_CHUNK_BYTES)):
                            pass
                        bad(
                            "line_too_long",
                            where,
                            f"line longer than {limit:,} bytes (JSON Lines holds one "
                            "record per line; is this a JSON Lines file?)",
                        )
                        continue
                    try:  # a byte-order mark before the first record (Windows editors write one) is not text
                        line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                    except UnicodeDecodeError as e:
                        bad(
                            "invalid_utf8",
                            where,
                            f"invalid UTF-8: byte(s) {raw[e.start : e.end].hex(' ')} at "
                            f"byte {e.start + 1} of the line: {e.reason}",
                        )
                        continue
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    # (also a number of more than 4300 digits, nesting past the recursion limit)
                    except (ValueError, RecursionError) as e:
                        bad("invalid_json", where, f"invalid JSON ({e})")
                        continue
                    yield from _row_pieces(row, self.text_field, where, bad, max_chars)
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:
            bad(
                "corrupt_file",
                f"{path}:{lineno + 1}",
                f"corrupt or truncated {'gzip ' if gz else ''}data after line {lineno} ({e}); "
                "the rest of the file is lost",
            )

    def _parquet_pieces(self, path: Path, max_chars: int | None, bad: BadRecords) -> Iterator[Piece]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        row = 0
        try:
            pf = pq.ParquetFile(path)
            if self.text_field not in pf.schema_arrow.names:
                raise ValueError(
                    f"{path}: no column {self.text_field!r} (columns: {pf.schema_arrow.names}); use --text-field"
                )
            for batch in pf.iter_batches(columns=[self.text_field], batch_size=1024):
                for text in batch.column(0).to_pylist():
                    yield from _document_pieces(text, f"{path} row {row}", bad, max_chars, self.text_field)
                    row += 1
        except pa.ArrowException as e:
            bad("corrupt_file", f"{path} row {row}", f"corrupt parquet data ({e}); the rest of the file is lost")


def _end_paragraph(sp: _Splitter, has_real: bool, where: str, bad: BadRecords) -> Iterator[Piece]:
    if not has_real and sp.first:  # nothing of it has gone out yet, so it can still be dropped whole
        bad("nul_only", where, "paragraph is only NUL characters (binary data?)")
        return
    yield from sp.finish()


@dataclass
class HFSource:
    """Documents from a Hugging Face ``datasets`` dataset (``load_dataset``).

    Defaults to FineWeb's 10B-token sample, streamed.  This is the only source
    that may use the network.  ``data_files`` is passed through, so builders such
    as ``"json"`` or ``"parquet"`` with local files also work offline.  Bad
    records (see :class:`BadRecords`) are named by row number.
    """

    name: str = DEFAULT_HF_DATASET
    config: str | None = None
    split: str = "train"
    streaming: bool = True
    text_field: str = "text"
    data_files: Any = None

    def __post_init__(self):
        if self.config is None and self.name == DEFAULT_HF_DATASET:
            self.config = DEFAULT_HF_CONFIG

    def describe(self) -> dict:
        """What the source is, for meta.json (``source``) and the model card."""
        return {
            "type": "hf",
            "name": self.name,
            "config": self.config,
            "split": self.split,
            "streaming": self.streaming,
            "text_field": self.text_field,
            "data_files": self.data_files
            if isinstance(self.data_files, (str, list, dict, type(None)))
            else str(self.data_files),
        }

    def __iter__(self) -> Iterator[str]:
        return _join_pieces(self.pieces(None))

    def pieces(
        self, max_doc_chars: int | None = DEFAULT_MAX_DOC_CHARS, bad: BadRecords | None = None
    ) -> Iterator[Piece]:
        """Like :meth:`LocalSource.pieces`."""
        import datasets

        bad = BadRecords() if bad is None else bad
        kwargs = {"split": self.split, "streaming": self.streaming}
        if self.data_files is not None:
            kwargs["data_files"] = self.data_files
        ds = (
            datasets.load_dataset(self.name, self.config, **kwargs)
            if self.config
            else datasets.load_dataset(self.name, **kwargs)
        )
        for i, row in enumerate(ds):
            yield from _row_pieces(row, self.text_field, f"{self.name} row {i}", bad, max_doc_chars)


def _source_pieces(source, max_doc_chars: int | None, bad: BadRecords) -> Iterator[Piece]:
    """Pieces of any source: a :class:`LocalSource` / :class:`HFSource` (or
    anything with a ``pieces`` method) or an iterable of strings."""
    if hasattr(source, "pieces"):
        yield from source.pieces(max_doc_chars, bad)
        return
    for i, text in enumerate(source):
        yield from _document_pieces(text, f"document {i}", bad, max_doc_chars)


# ---------------------------------------------------------------------------
# tokenization workers
# ---------------------------------------------------------------------------

_W: dict = {}


def _init_worker(kind: str, payload: Any, bos_id: int, eos_id: int, inherited: Sequence[int] = ()) -> None:
    """A tokenizer worker's start: its encoder, Ctrl-C left to the parent, the parent's descriptors in `inherited`
    (a forked worker's copy of the output folder's lock) closed, and an exit of its own once its parent is gone
    (a killed preparation: an orphan waits on its task queue forever, and a forked one held the lock). The parent
    is the preparation (fork, spawn) or multiprocessing's fork server, which ends with it."""
    # Ctrl-C reaches the whole process group: the parent alone handles it (stops feeding, lets the running batches
    # finish, keeps the shards written); a worker interrupted mid-task would die holding the task queue.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for fd in inherited:
        with contextlib.suppress(OSError):  # (not inherited: a spawned worker)
            os.close(fd)
    parent = os.getppid()
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True, name="exit-with-parent").start()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _W.clear()
    _W.update(_make_encoder(kind, payload, bos_id, eos_id))


class _StartsIgnoringInterrupt:
    """(mixin for a multiprocessing Process class) `start` with Ctrl-C (SIGINT) ignored by this process while the
    child is forked, or forked and executed (spawn, the fork server): a disposition the child keeps across exec
    and that Python leaves in place at its start. A Ctrl-C in those few milliseconds is lost (pressed again, it
    stops the preparation as any other)."""

    def start(self):
        if threading.current_thread() is not threading.main_thread():  # (signal handlers: main thread only)
            return super().start()
        handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            return super().start()
        finally:
            signal.signal(signal.SIGINT, handler)


# one per start method, at module level: a spawned worker's Process object is pickled by its class's name
class _SpawnWorker(_StartsIgnoringInterrupt, _mp_context.SpawnProcess):
    pass


_WORKER_CLASSES: dict[str, type] = {"spawn": _SpawnWorker}
if sys.platform != "win32":  # (multiprocessing has fork and the fork server on POSIX systems only)

    class _ForkWorker(_StartsIgnoringInterrupt, _mp_context.ForkProcess):
        pass

    class _ForkServerWorker(_StartsIgnoringInterrupt, _mp_context.ForkServerProcess):
        pass

    _WORKER_CLASSES.update(fork=_ForkWorker, forkserver=_ForkServerWorker)


class _WorkersIgnoreInterrupt:
    """A multiprocessing context (`ctx`'s, attribute for attribute) whose processes start with Ctrl-C ignored
    (`_StartsIgnoringInterrupt`). `_init_worker` ignores it too, but only after a spawned worker has imported this
    package: a Ctrl-C in that second printed a KeyboardInterrupt traceback per worker."""

    def __init__(self, ctx):
        self._ctx = ctx
        self.Process = _WORKER_CLASSES.get(ctx.get_start_method(), ctx.Process)

    def __getattr__(self, name):
        return getattr(self._ctx, name)


def _exit_with_parent(parent: int, every_s: float = 1.0) -> None:
    """End this process once its parent is no longer `parent` (the parent died, and the process was adopted)."""
    while os.getppid() == parent:
        time.sleep(every_s)
    os._exit(1)


def _make_encoder(kind: str, payload: Any, bos_id: int, eos_id: int) -> dict:
    if kind == "backend":
        from tokenizers import Tokenizer

        tk = Tokenizer.from_str(payload)
        tk.no_padding()
        tk.no_truncation()
        tk.encode_special_tokens = True  # text like "</s>" inside a document is plain text
        return {"kind": kind, "tk": tk, "bos": bos_id, "eos": eos_id}
    return {"kind": kind, "tok": payload, "bos": bos_id, "eos": eos_id}


def _encode_docs(pieces: list[Piece]) -> list[tuple[np.ndarray, bool]]:
    return _encode_flagged(_W, pieces)


def _encode_flagged(enc: dict, pieces: list[Piece]) -> list[tuple[np.ndarray, bool]]:
    """``(tokens, piece ends its document)`` for each piece."""
    return list(zip(_encode_with(enc, pieces), (p.last for p in pieces), strict=True))


def _encode_texts(enc: dict, texts: list[str]) -> list[list[int]]:
    if enc["kind"] == "backend":
        return [e.ids for e in enc["tk"].encode_batch(texts, add_special_tokens=False)]
    return enc["tok"](texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]


# Characters to tokenize a piece after where its own context merges across the cut: SentencePiece-style vocabularies
# (Llama 2's, the builtin one) merge a newline with nothing but newlines, and a letter never with a newline.
_NEUTRAL_CONTEXTS = ("\n", "a")


def _without_context(enc: dict, context: str, ids) -> Any:
    """``ids`` (the tokens of ``context`` + a piece) without the tokens of ``context`` alone, or None where those
    are not a prefix of them (a merge across the cut)."""
    cache = enc.setdefault("context_ids", {})
    ctx = cache.get(context)
    if ctx is None:
        ctx = cache[context] = list(_encode_texts(enc, [context])[0])
    return ids[len(ctx) :] if list(ids[: len(ctx)]) == ctx else None


def _encode_with(enc: dict, pieces: list[Piece]) -> list[np.ndarray]:
    """Token arrays (uint16) of document pieces: ``[BOS]`` before a first
    piece, ``[EOS]`` after a last one.

    A piece that does not start its document is tokenized with the character
    before it (``piece.context``) prepended, and that character's own tokens
    are dropped from the front: then a tokenizer that treats the start of its
    input specially (SentencePiece's dummy-prefix space, Llama 2 and the
    builtin tokenizer) tokenizes the piece as it would inside the whole
    document.  Where the context's tokens are not a prefix of the result (a
    merge across the cut, as in a run of one character cut in two), the piece
    is tokenized after a character that no merge crosses
    (:data:`_NEUTRAL_CONTEXTS`) in the same way: the stream then differs from
    tokenizing the whole document in the tokens at the cut, never in the text
    (tokenized alone, the piece would start with the dummy prefix: a space
    that is not in the document).  Only where none of them serves is the piece
    tokenized alone.
    """
    pieces = [p if isinstance(p, Piece) else Piece(p) for p in pieces]
    ids_list = _encode_texts(enc, [p.context + p.text if p.context else p.text for p in pieces])
    out = []
    for p, ids in zip(pieces, ids_list, strict=True):
        if p.context:
            after = _without_context(enc, p.context, ids)
            for neutral in _NEUTRAL_CONTEXTS:
                if after is not None:
                    break
                after = _without_context(enc, neutral, _encode_texts(enc, [neutral + p.text])[0])
            ids = after if after is not None else _encode_texts(enc, [p.text])[0]
        a = np.empty(len(ids) + p.first + p.last, dtype=TOKEN_DTYPE)
        if p.first:
            a[0] = enc["bos"]
        a[int(p.first) : len(a) - int(p.last)] = ids
        if p.last:
            a[-1] = enc["eos"]
        out.append(a)
    return out


def _tokenizer_payload(tok) -> tuple[str, Any]:
    bt = getattr(tok, "backend_tokenizer", None)
    if bt is not None:
        return "backend", bt.to_str()
    return "python", tok


def _batched(pieces: Iterable[Piece], n: int, max_chars: int | None) -> Iterator[list[Piece]]:
    """Groups of at most ``n`` pieces that together hold at most about
    ``max_chars`` characters (a group closes once it reaches ``max_chars``), so
    the text in flight to the workers stays bounded whatever the documents'
    lengths."""
    group: list[Piece] = []
    chars = 0
    for p in pieces:
        group.append(p)
        chars += len(p.text)
        if len(group) >= n or (max_chars is not None and chars >= max_chars):
            yield group
            group, chars = [], 0
    if group:
        yield group


class DocumentDigests:
    """Running SHA-256 of the source's documents in order: `at[n]` is the digest of the first n documents' text.
    A preparation records the digest of the documents its written shards hold (`progress.json` "docs_sha256"); a
    rerun that continues it recomputes the digest while it reads past them, and refuses an input whose first
    documents changed (lines added at the front would otherwise shift every document: duplicates and losses). An
    edit after those documents, such as fixing the bad record that stopped a run, continues as before."""

    def __init__(self):
        self.hash = hashlib.sha256()
        self.count = 0
        self.at = {0: self.hash.hexdigest()}

    def wrap(self, pieces: Iterable[Piece]) -> Iterator[Piece]:
        """Yield `pieces` unchanged, adding each one's text to the digest as it passes (a document's last piece
        closes it)."""
        for piece in pieces:
            self.hash.update(piece.text.encode("utf-8", "surrogatepass"))
            if piece.last:
                self.hash.update(b"\0")  # document boundaries count
                self.count += 1
                self.at[self.count] = self.hash.hexdigest()
            yield piece

    def take(self, n: int) -> str | None:
        """The digest of the first `n` documents, forgetting those of fewer (the writer only moves forward)."""
        for k in [k for k in list(self.at) if k < n]:  # (a snapshot: the reader may run ahead in another thread)
            self.at.pop(k, None)
        return self.at.get(n)


def _skip_docs(pieces: Iterator[Piece], n: int) -> int:
    """Consume the pieces of the next ``n`` documents; return how many documents
    were there."""
    done = 0
    if n <= 0:
        return 0
    for p in pieces:
        if p.last:
            done += 1
            if done == n:
                break
    return done


def _limit_docs(pieces: Iterable[Piece], n: int | None) -> Iterator[Piece]:
    """The pieces of the first ``n`` documents (all when ``n`` is None)."""
    if n is None:
        yield from pieces
        return
    done = 0
    if n <= 0:
        return
    for p in pieces:
        yield p
        if p.last:
            done += 1
            if done >= n:
                return


def _ordered_imap(pool, fn, batches: Iterable, max_in_flight: int) -> Iterator:
    """Like ``pool.map(fn, batches)`` of a ``concurrent.futures`` executor (ordered results) but reads at most
    ``max_in_flight`` batches ahead, so an endless streaming source is not pulled into memory."""
    pending: collections.deque = collections.deque()
    for b in batches:
        pending.append(pool.submit(fn, b))
        while len(pending) >= max_in_flight:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


# ---------------------------------------------------------------------------
# prepare
# ---------------------------------------------------------------------------


def _tokenizer_fingerprint(kind: str, payload: Any) -> str | None:
    if kind == "backend":
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()
    return None


def tokenizer_fingerprint(tok) -> str | None:
    """SHA-256 of a tokenizer's serialisation (`backend_tokenizer.to_str()`), as meta.json's ``tokenizer_sha256``
    records it; None for a tokenizer without a `tokenizers` backend."""
    return _tokenizer_fingerprint(*_tokenizer_payload(tok))


MAX_WORKERS_PER_CPU = 4  # tokenizer processes past this many per CPU only cost memory (a typo's thousands: gigabytes)


def _check_settings(
    shard_tokens: int,
    val_docs: int,
    max_doc_chars: int | None,
    batch_docs: int,
    max_docs: int | None = None,
    stop_after_shards: int | None = None,
    num_workers: int | None = None,
) -> None:
    """Raise ``ValueError`` naming the first setting of :func:`prepare` that is out of range."""
    most = MAX_WORKERS_PER_CPU * (os.cpu_count() or 1)
    if num_workers is not None and not 0 <= num_workers <= most:  # (each worker is a process holding a tokenizer)
        raise ValueError(
            f"num_workers (--workers) must be in [0, {most}] ({MAX_WORKERS_PER_CPU} per CPU of this machine; 0 or 1: "
            f"tokenize in this process), got {num_workers}"
        )
    if stop_after_shards is not None and stop_after_shards < 1:
        raise ValueError(f"stop_after_shards must be >= 1 or None (no stop), got {stop_after_shards}")
    if max_docs is not None and max_docs < 1:
        raise ValueError(f"max_docs must be >= 1 or None (no limit), got {max_docs}")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
    if val_docs < 0:
        raise ValueError(f"val_docs must be >= 0, got {val_docs}")
    if max_doc_chars is not None and (not isinstance(max_doc_chars, (int, np.integer)) or max_doc_chars < 2):
        raise ValueError(f"max_doc_chars must be an integer >= 2 or None, got {max_doc_chars!r}")
    if batch_docs < 1:
        raise ValueError(f"batch_docs must be >= 1, got {batch_docs}")


def _resolve_tokenizer(tokenizer) -> tuple[Any, str]:
    """``(tokenizer object, the name meta.json records)`` for a tokenizer object or anything
    :func:`~llamathink.tokenizer_utils.load_tokenizer` accepts (a local tokenizer is named by its absolute path)."""
    if isinstance(tokenizer, (str, os.PathLike)):
        from ..tokenizer_utils import load_tokenizer  # imports transformers: only when a name is given

        tok = load_tokenizer(tokenizer)
        tok_name = os.fspath(tokenizer)
        if os.path.exists(tok_name):  # record local tokenizers by absolute path (meta.json is read elsewhere)
            tok_name = os.path.abspath(tok_name)
        return tok, tok_name
    return tokenizer, str(getattr(tokenizer, "name_or_path", ""))


def _shard_token_ids(tok, tok_name: str) -> tuple[int, int, int]:
    """``(vocab_size, bos_id, eos_id)`` of a tokenizer; ``ValueError`` when its ids do not fit uint16 shards or it
    lacks a BOS or an EOS token."""
    vocab_size = len(tok)
    if vocab_size > MAX_VOCAB:
        raise ValueError(f"tokenizer {tok_name!r} has {vocab_size} tokens; uint16 shards hold at most {MAX_VOCAB}")
    bos_id, eos_id = tok.bos_token_id, tok.eos_token_id
    if bos_id is None or eos_id is None:
        raise ValueError(f"tokenizer {tok_name!r} needs both a BOS and an EOS token (bos={bos_id}, eos={eos_id})")
    return vocab_size, bos_id, eos_id


def _check_resumable(out: Path, state: dict) -> None:
    """Refuse (ValueError naming the shard and saying --overwrite) to continue a preparation that is not complete
    when a shard it wrote is missing or altered: the continued output would silently lack or mangle its tokens."""
    if state.get("complete"):
        return
    written = list(state.get("train_shards") or []) + ([state["val"]] if state.get("val") else [])
    for entry in written:
        path = out / entry["file"]
        try:
            tokens = read_shard_header(path)["num_tokens"]
        except (OSError, ValueError) as err:
            raise ValueError(
                f"{path}: written by the interrupted preparation, now unreadable ({err}); it cannot be continued: "
                "rerun with --overwrite"
            ) from None
        if tokens != entry["tokens"]:
            raise ValueError(
                f"{path}: holds {tokens} tokens, the interrupted preparation wrote {entry['tokens']}; it cannot be "
                "continued: rerun with --overwrite"
            )


def _same_local_files(saved: dict | None, current: dict, saved_cwd: str | None = None) -> bool:
    """Whether two local sources (``LocalSource.describe``) read the same files in the same order, however they are
    named (relative or absolute, through a link, a folder or a glob of its files), with the same reading settings:
    the saved names read from the directory they were given in (``saved_cwd``; the current one for a preparation
    that did not record it), the rerun's from the current one. False where that is not known (a saved name that
    matches nothing any more)."""
    if not isinstance(saved, dict) or saved.get("type") != "local" or current.get("type") != "local":
        return False
    if {k: v for k, v in saved.items() if k != "paths"} != {k: v for k, v in current.items() if k != "paths"}:
        return False
    if saved == current and saved_cwd in (None, os.getcwd()):  # (the same names from the same place: not listed)
        return True
    paths = saved.get("paths")
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        return False
    try:
        was = LocalSource([os.path.join(saved_cwd or os.curdir, p) for p in paths]).files()
        now = LocalSource(current["paths"]).files()
    except (OSError, TypeError, ValueError):  # a name that is not there any more: not known to be the same
        return False
    return [os.path.realpath(p) for p in was] == [os.path.realpath(p) for p in now]


def _local_input_files(source) -> list[Path] | None:
    """The local files or folders a source reads: a `LocalSource`'s files; the local ``data_files`` (globs
    expanded) or local dataset folder of an `HFSource` (``--hf-dataset json --hf-data-files x.jsonl``). None for
    a source of nothing local (a Hub dataset)."""
    if isinstance(source, LocalSource):
        return source.files()
    if not isinstance(source, HFSource):
        return None
    specs, pending = [], [source.data_files, source.name]
    while pending:
        item = pending.pop(0)
        if isinstance(item, str):
            specs.append(item)
        elif isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
    found = []
    for spec in specs:
        path = Path(spec).expanduser()
        found.extend([path] if path.exists() else sorted(Path(m) for m in glob.glob(str(path), recursive=True)))
    return found or None


def _input_stamps(source) -> dict[str, list[int]] | None:
    """{file (resolved path): [size in bytes, modification time in ns]} of a source's local input files, every
    file of a folder included (`_local_input_files`); None for a source of nothing local. Recorded in
    progress.json by each run that reads the input, so that a rerun of the finished preparation sees an input
    changed since (`_check_input_unchanged`)."""
    paths = _local_input_files(source)
    if paths is None:
        return None
    stamps = {}
    for path in paths:
        for file in sorted(q for q in path.rglob("*") if q.is_file()) if path.is_dir() else [path]:
            try:
                info = file.stat()
            except OSError:  # (gone since the listing: read as such below)
                continue
            stamps[str(file.resolve())] = [info.st_size, info.st_mtime_ns]
    return stamps


def _is_stamp(value) -> bool:
    """Whether `value` is an input file's stamp as `_input_stamps` records it: [size in bytes, mtime in ns]."""
    return isinstance(value, list) and len(value) == 2 and all(type(x) is int for x in value)


def _check_input_unchanged(
    out: Path, recorded: dict | None, now: dict | None, same_documents: Callable[[], bool]
) -> bool:
    """ValueError where the input files of a finished preparation in `out` are not those it read (`recorded`,
    `_input_stamps`): a file added, gone, or of another size; a rerun would otherwise report the old result as
    written from the new input. Where only modification times differ (a `touch`, a copy), or files of the same
    sizes have other names (the input moved or copied), `same_documents()` decides (the input read again,
    untokenized, against the digest of the documents written): True is returned for the caller to record the new
    stamps. Nothing to compare (a Hub source, a folder prepared before the
    record existed): passes."""
    if not isinstance(recorded, dict) or now is None or recorded == now:
        return False
    if not all(_is_stamp(v) for v in recorded.values()):
        raise ValueError(
            f"{out / PROGRESS_FILE}: its record of the input files (input_files) is not {{file: [size, mtime_ns]}}: "
            "was it edited? Rerun with --overwrite to prepare the input afresh"
        )
    changes = []
    for name in sorted(set(recorded) | set(now)):
        then, current = recorded.get(name), now.get(name)
        if then == current:
            continue
        if then is None:
            changes.append((name, "a file it did not read"))
        elif current is None:
            changes.append((name, "no longer among the inputs" if os.path.exists(name) else "gone since"))
        elif then[0] != current[0]:
            changes.append((name, f"{current[0]:,} bytes now, {then[0]:,} then"))
        else:
            changes.append((name, "modified since, with other documents (the same size)"))
    touched = all(change.startswith("modified since") for _, change in changes)
    # files of the same sizes under other names: the input moved or copied (another checkout of a project)
    moved = sorted(v[0] for v in recorded.values()) == sorted(v[0] for v in now.values())
    if (touched or moved) and same_documents():
        return True
    name, change = changes[0]
    raise ValueError(
        f"{out} was prepared from input that has changed ({name}: {change}); its shards hold the input as it "
        "was: rerun with --overwrite to prepare it afresh, or use another --out"
    )


LOCK_FILE = ".prepare.lock"


def _process_exists(pid: int) -> bool:
    """Whether a process `pid` runs on this machine (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # (not ours to signal: it exists)
        return True
    return True


@contextlib.contextmanager
def _preparation_lock(out: Path):
    """Hold an exclusive lock on the output folder `out` (fcntl.flock on <out>/.prepare.lock, released when the
    block ends or the process dies), so that a second preparation of the same folder (an `--overwrite` would delete
    the first one's shards under it) is refused at once. Yields the lock's file descriptor (forked tokenizer
    workers close their copy: `_init_worker`). Raises ValueError naming the holder's pid, or where `out` cannot be
    made or written."""
    import fcntl

    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        problem = "is a file, not a folder" if out.exists() and not out.is_dir() else f"cannot be written ({err})"
        raise ValueError(f"--out {out} {problem}") from err
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            gone = holder.isdigit() and not _process_exists(int(holder))
            raise ValueError(
                f"{out} is being written by another preparation (pid {holder}"
                f"{', no longer running: a process it started holds the folder still' if gone else ''}); wait for "
                "it to end, or use another output folder"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def _unstarted_removed_on_error(out: Path):
    """A preparation that fails before it has written a shard (a source that cannot be reached or read, a bad
    first record, Ctrl-C) removes the fresh `progress.json` it recorded, so that the next preparation into `out`
    (of another input, say) is not refused as "a different preparation". Yields `started(flag)`, to be called
    once this run's progress state is in place, with whether it holds progress to keep (a resumed run's); before
    that call an error leaves everything as it is. A shard file in `out` keeps the record too (one written before
    the record of it failed: the next run sorts it out). The folder and its lock file stay: removing the lock file
    under a run that has opened it would let two runs lock the folder at once."""
    resumed = [True]

    def started(flag: bool) -> None:
        resumed[0] = flag

    try:
        yield started
    except BaseException:
        if not resumed[0]:
            progress = out / PROGRESS_FILE
            with contextlib.suppress(OSError, ValueError, AttributeError, RecursionError):
                state = json.loads(progress.read_text(encoding="utf-8"))
                shards = any(_SHARD_RE.match(p.name) for p in out.iterdir())
                fresh = state.get("docs_done") == 0 and not state.get("train_shards") and state.get("val") is None
                if fresh and not shards:
                    progress.unlink()
        raise


def _read_progress(path: Path, overwrite: bool) -> dict | None:
    """The state in a `progress.json`; None for an unreadable one with ``overwrite`` (the preparation starts
    afresh). Raises ValueError naming the file when it cannot be read (truncated, edited, not JSON, no object with a
    ``config`` object) and ``overwrite`` is not set: the shards beside it cannot be trusted without it."""
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        problem = None if isinstance(state, dict) and isinstance(state.get("config"), dict) else "no config object"
    except (OSError, ValueError, RecursionError) as err:  # (JSONDecodeError and UnicodeDecodeError are ValueErrors)
        state, problem = None, f"{type(err).__name__}: {err}"
    if problem is None:
        return state
    if overwrite:
        return None
    raise ValueError(
        f"{path} cannot be read as a preparation's progress ({problem}), so the shards beside it cannot be "
        "resumed; use another --out or --overwrite"
    )


def _check_repeated_inputs(out: Path, again: list[tuple[Path, str, str]], state: dict) -> None:
    """Input files named more than once (`again`: `LocalSource.repeated_files`) are read once, said on stderr. A
    preparation begun before they were (no ``inputs_read_once`` in its progress.json) whose inputs named a file
    twice read it once per name: a finished one is reported as it is, with a note that it holds those documents
    more than once; a stopped one that wrote documents is refused (ValueError: they were counted in that other
    order)."""

    def named(again):
        name, by, also = again[0]
        return f"{len(again)} input file(s) named more than once (first: {name}, named by {by!r} and again by {also!r})"

    earlier = []
    if not state.get("inputs_read_once"):
        saved = state["config"].get("source")
        try:
            cwd = state.get("source_cwd") or os.curdir
            earlier = LocalSource([os.path.join(cwd, p) for p in saved["paths"]]).repeated_files()
        except (KeyError, TypeError, ValueError, OSError):  # (names that match nothing now: not known)
            earlier = []
    if earlier and state.get("complete"):
        print(
            f"prepare: {out} was prepared before inputs named twice were read once: it holds the documents of "
            f"{named(earlier)} once per name; --overwrite prepares it again with each file once",
            file=sys.stderr,
        )
        return
    if earlier and state["docs_done"]:
        raise ValueError(
            f"{out} was begun before inputs named twice were read once, and has read {named(earlier)} once per "
            "name: its documents would be counted in two orders; --overwrite prepares it again with each file once"
        )
    if again:
        print(f"prepare: {named(again)} are read once", file=sys.stderr)
    if not state.get("complete"):
        state["inputs_read_once"] = True  # (recorded with the next shard)


def _start_or_resume(out: Path, config: dict, val_docs: int, overwrite: bool) -> dict:
    """The progress state (``progress.json``) of a preparation ``config`` in ``out``.

    Creates ``out`` and removes temporary files a killed run left.  A saved state of the same ``config`` is
    returned as it is (the run resumes, or is already ``complete``); otherwise a fresh state is written, after
    deleting an earlier preparation's shards, meta.json and progress.json when ``overwrite`` is set.  Raises
    ``ValueError`` when ``out`` holds a different preparation, or shards without a matching progress.json, and
    ``overwrite`` is not set.
    """
    out.mkdir(parents=True, exist_ok=True)
    prog_path, meta_path = out / PROGRESS_FILE, out / META_FILE
    for p in out.iterdir():  # temporary files left by a run that was killed mid-write
        if _TMP_RE.match(p.name):
            p.unlink()
    state = _read_progress(prog_path, overwrite) if prog_path.exists() else None
    if state is not None:
        saved = dict(state["config"])
        if "max_doc_chars" not in saved:  # written before long documents were cut: they were tokenized whole
            saved["max_doc_chars"] = config["max_doc_chars"] if state.get("complete") else None
        # one input, named another way (./x, /abs/x, a folder or its files) or from another directory (where the
        # same relative names for other files pass here as before: the documents' digests are checked next)
        if _same_local_files(saved.get("source"), config["source"], state.get("source_cwd")):
            saved["source"] = config["source"]
        if not overwrite and saved == config:
            _check_resumable(out, state)
            return state
        if not overwrite:
            diff = sorted(k for k in set(config) | set(saved) if config.get(k) != saved.get(k))
            raise ValueError(
                f"{out} holds a different preparation (differs in: {', '.join(diff)}); "
                "use another --out or --overwrite"
            )
    existing = [p for p in out.iterdir() if _SHARD_RE.match(p.name)] + [p for p in (meta_path,) if p.exists()]
    if existing and not overwrite:
        raise ValueError(
            f"{out} already contains shards but no matching {PROGRESS_FILE}; "
            "use another --out or --overwrite"
        )
    for p in existing:
        p.unlink()
    if prog_path.exists():
        prog_path.unlink()
    state = {
        "config": config,
        "source_cwd": os.getcwd(),  # where a local source's relative names are read from (`_same_local_files`)
        "inputs_read_once": True,  # (`_note_repeated_inputs`)
        "complete": False,
        "val_done": val_docs == 0,
        "val": None,
        "docs_done": 0,
        "skip_tokens": 0,
        "train_shards": [],
    }
    _atomic_write_json(prog_path, state)
    return state


def _remaining_pieces(
    source,
    done: int,
    max_docs: int | None,
    max_doc_chars: int | None,
    bad: BadRecords,
    digests: DocumentDigests | None = None,
    expected: str | None = None,
) -> Iterator[Piece]:
    """The pieces of the documents of ``source`` after its first ``done`` ones (which earlier runs wrote), up to
    ``max_docs`` documents counted from the source's start, each seen by ``digests``.  The ``done`` documents are
    read past now: raises ``ValueError`` when the source no longer has that many, or when their digest is not
    ``expected`` (the earlier run's; None: not recorded)."""
    pieces = iter(_source_pieces(source, max_doc_chars, bad))
    if digests is not None:
        pieces = digests.wrap(pieces)
    if done:
        skipped = _skip_docs(pieces, done)
        if skipped < done:
            raise ValueError(
                f"source now has only {skipped} documents but {done} were already processed; has the input changed?"
            )
        if digests is not None and expected is not None and digests.take(done) != expected:
            raise ValueError(
                f"the first {done} documents of the input are not those the interrupted preparation wrote (was the "
                "input edited before them?); continuing would mix two versions of it: rerun with --overwrite"
            )
    limit = None if max_docs is None else max(0, max_docs - done)
    return _limit_docs(pieces, limit)


@contextlib.contextmanager
def _tokenized(
    batches: Iterable[list[Piece]],
    kind: str,
    payload: Any,
    bos_id: int,
    eos_id: int,
    num_workers: int,
    mp_context: str | None,
    parent_fds: Sequence[int] = (),
) -> Iterator[Iterator[list[tuple[np.ndarray, bool]]]]:
    """Context giving the batches tokenized in order (see :func:`_encode_flagged`): by ``num_workers`` worker
    processes when that is more than one, else in this process.  Leaving it shuts the workers down; after an
    error or a stop only the few batches already running finish.  The workers close their copies of
    ``parent_fds`` (the output folder's lock) and exit when this process dies (`_init_worker`)."""
    if num_workers <= 1:
        enc = _make_encoder(kind, payload, bos_id, eos_id)
        yield (_encode_flagged(enc, b) for b in batches)
        return
    import multiprocessing as mp

    if mp_context is None:
        mp_context = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    from concurrent.futures import ProcessPoolExecutor

    # concurrent.futures rather than multiprocessing.Pool: Pool.terminate() after an interrupt can wait forever on
    # a queue lock held by a worker; an executor's shutdown cancels what has not started and survives dead workers
    pool = ProcessPoolExecutor(
        num_workers,
        mp_context=_WorkersIgnoreInterrupt(mp.get_context(mp_context)),
        initializer=_init_worker,
        # (only a forked worker holds copies of this process's descriptors; in a spawned one the numbers are others')
        initargs=(kind, payload, bos_id, eos_id, tuple(parent_fds) if mp_context == "fork" else ()),
    )
    try:
        yield _ordered_imap(pool, _encode_docs, batches, max_in_flight=2 * num_workers)
    finally:
        # When every result was read nothing is pending and cancelling changes nothing; after an error or a stop
        # it drops the batches that have not started.
        pool.shutdown(wait=True, cancel_futures=True)


class ShardWriter:
    """Writes the shards of one :func:`prepare` run into ``out`` and keeps its ``progress.json`` (``state``).

    The tokens of the source's document pieces arrive in order through :meth:`add`, starting with document
    ``state["docs_done"]``.  Until ``state["val_done"]``, whole documents are gathered for ``val_000000.bin``
    (written once ``val_docs`` documents are in); after that tokens are buffered and cut into train shards of
    exactly ``shard_tokens`` tokens (:meth:`finish` writes the shorter last one).  Every shard is written atomically
    (:func:`~llamathink.data.shards.write_shard`) and then recorded in ``progress.json``, written atomically too,
    with the point to resume from: the documents the written shards hold whole (``docs_done``) and the tokens of
    the next document they already hold (``skip_tokens``).  A writer started from a saved state drops those
    tokens again, so an interrupted and resumed run writes the same bytes as an uninterrupted one.

    ``max_new_shards``: :meth:`add` reports a stop once this many new train shards are written (None: never).
    """

    def __init__(
        self,
        out: Path,
        state: dict,
        *,
        shard_tokens: int,
        val_docs: int,
        vocab_size: int,
        bos_id: int,
        eos_id: int,
        max_new_shards: int | None = None,
        digests: DocumentDigests | None = None,
    ):
        self.out, self.state, self.digests = out, state, digests
        self.shard_tokens, self.val_docs, self.max_new_shards = shard_tokens, val_docs, max_new_shards
        self.vocab_size, self.bos_id, self.eos_id = vocab_size, bos_id, eos_id
        self.start = self.doc_index = state["docs_done"]  # documents of the source before the current one
        self.doc_tokens = 0  # tokens of the current document so far (all its pieces up to this one, untrimmed)
        self.skip_tokens = state["skip_tokens"]  # tokens of document `start` that an earlier run already wrote
        self.val_parts: list[np.ndarray] = []
        self.buf: list[np.ndarray] = []
        self.buffered = 0  # tokens in buf
        self.new_shards = 0
        self.train_tokens = sum(s["tokens"] for s in state["train_shards"])  # tokens in the written train shards

    def save(self) -> None:
        """Write ``progress.json`` (the state) atomically, with the digest of the documents it counts as done."""
        if self.digests is not None:
            self.state["docs_sha256"] = self.digests.take(self.state["docs_done"])
        _atomic_write_json(self.out / PROGRESS_FILE, self.state)

    def add(self, toks: np.ndarray, doc_last: bool) -> bool:
        """Take the tokens of the next piece of the current document (``doc_last``: the piece ends it) and write
        each shard it fills; return True when ``max_new_shards`` new train shards have been written (stop now: a
        rerun continues from the saved progress)."""
        i = self.doc_index
        self.doc_tokens += len(toks)
        if doc_last:
            self.doc_index += 1
        if not self.state["val_done"]:
            self.val_parts.append(toks)
            if doc_last:
                self.doc_tokens = 0
                if self.doc_index == self.val_docs:
                    self.write_val()
            return False
        if self.skip_tokens:  # tokens of document i that an earlier run already wrote
            drop = min(self.skip_tokens, len(toks))
            toks = toks[drop:]
            self.skip_tokens -= drop
        self.buf.append(toks)
        self.buffered += len(toks)
        stop = False
        while self.buffered >= self.shard_tokens:
            self._write_train(self.shard_tokens)
            # Everything left in the buffer is a suffix of this piece, so of document i.
            if self.buffered or not doc_last:
                self.state["docs_done"], self.state["skip_tokens"] = i, self.doc_tokens - self.buffered
            else:
                self.state["docs_done"], self.state["skip_tokens"] = i + 1, 0
            self.save()
            self.new_shards += 1
            if self.max_new_shards is not None and self.new_shards >= self.max_new_shards:
                stop = True
                break
        if doc_last:
            self.doc_tokens = 0
        return stop

    def _write_train(self, n: int) -> None:
        """Write the first ``n`` buffered tokens as the next train shard; the rest stay buffered."""
        joined = np.concatenate(self.buf) if len(self.buf) > 1 else self.buf[0]
        name = _shard_name("train", len(self.state["train_shards"]))
        write_shard(self.out / name, joined[:n], self.vocab_size, bos_id=self.bos_id, eos_id=self.eos_id)
        self.state["train_shards"].append({"file": name, "tokens": int(n)})
        rest = joined[n:]
        self.buf = [rest] if rest.size else []
        self.buffered -= n
        self.train_tokens += n

    def write_val(self) -> None:
        """Write the documents gathered so far as ``val_000000.bin`` and save the progress (they are all done)."""
        arr = np.concatenate(self.val_parts) if self.val_parts else np.zeros(0, dtype=TOKEN_DTYPE)
        name = _shard_name("val", 0)
        write_shard(self.out / name, arr, self.vocab_size, bos_id=self.bos_id, eos_id=self.eos_id)
        self.val_parts = []
        self.state["val_done"] = True
        self.state["val"] = {"file": name, "tokens": int(arr.size), "docs": int(self.doc_index)}
        self.state["docs_done"], self.state["skip_tokens"] = self.doc_index, 0
        self.save()

    def finish(self) -> None:
        """After the source's last piece: write the buffered tokens as the last, shorter train shard and mark every
        document done (saved by :meth:`complete`).

        Raises ``ValueError`` when the source ended within the validation documents (what there is is written as
        the val shard first) or left no training documents."""
        if not self.state["val_done"]:
            if self.val_parts or self.doc_index > self.start:
                self.write_val()
            raise ValueError(
                f"the source has only {self.doc_index} documents and all of them went to the validation "
                f"split (val_docs={self.val_docs}); lower --val-docs or add data, and add --overwrite to replace "
                "this unfinishable preparation"
            )
        if self.buffered:
            self._write_train(self.buffered)
        self.state["docs_done"], self.state["skip_tokens"] = self.doc_index, 0
        if not self.state["train_shards"]:
            raise ValueError(
                f"no training documents: the source produced {self.doc_index} documents "
                f"and val_docs={self.val_docs} of them are held out (lower --val-docs or add data, and add "
                "--overwrite to replace this unfinishable preparation)"
            )

    def complete(self, meta: dict) -> None:
        """Write ``meta.json`` (atomically), then mark the progress complete."""
        _atomic_write_json(self.out / META_FILE, meta)
        self.state["complete"] = True
        self.save()


def _write_all(writer: ShardWriter, results: Iterable[list[tuple[np.ndarray, bool]]], bar) -> bool:
    """Hand the tokenized pieces to ``writer`` in order, counting documents on the progress ``bar``; return True
    when the writer asked to stop."""
    for batch in results:
        for toks, doc_last in batch:
            # toks: the tokens of one piece of a document; doc_last: the piece ends the document.
            if doc_last:
                bar.update(1)
            if writer.add(toks, doc_last):
                return True
        bar.set_postfix(train_tokens=writer.train_tokens + writer.buffered, refresh=False)
    return False


def _meta(
    config: dict,
    state: dict,
    *,
    num_docs: int,
    train_tokens: int,
    val_docs: int,
    skip_bad_records: bool,
    bad: BadRecords,
) -> dict:
    """The ``meta.json`` of a finished preparation (see :func:`~llamathink.data.shards.load_meta`)."""
    val = state["val"] or {"file": None, "tokens": 0, "docs": 0}
    return {
        **{
            k: config[k]
            for k in (
                "format_version",
                "tokenizer",
                "tokenizer_sha256",
                "vocab_size",
                "bos_token_id",
                "eos_token_id",
                "source",
                "shard_tokens",
                "max_docs",
                "max_doc_chars",
            )
        },
        "dtype": "uint16",
        "header_bytes": HEADER_BYTES,
        "skip_bad_records": bool(skip_bad_records),
        "bad_records": bad.summary(),
        "val_docs_requested": val_docs,
        "num_docs": num_docs,
        "train": {"num_docs": num_docs - val["docs"], "num_tokens": int(train_tokens), "shards": state["train_shards"]},
        "val": {
            "num_docs": val["docs"],
            "num_tokens": val["tokens"],
            "shards": [{"file": val["file"], "tokens": val["tokens"]}] if val["file"] else [],
        },
    }


def prepare(
    source: LocalSource | HFSource | Iterable[str],
    out_dir: str | os.PathLike,
    tokenizer,
    *,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    val_docs: int = DEFAULT_VAL_DOCS,
    num_workers: int | None = None,
    batch_docs: int = 64,
    max_docs: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    stop_after_shards: int | None = None,
    mp_context: str | None = None,
    source_description: dict | None = None,
    skip_bad_records: bool = False,
    max_doc_chars: int | None = DEFAULT_MAX_DOC_CHARS,
) -> dict:
    """Tokenize a document source into shards in ``out_dir`` (see module docstring).

    ``tokenizer`` is a tokenizer object or anything :func:`~llamathink.tokenizer_utils.load_tokenizer`
    accepts.  ``source`` is a :class:`LocalSource`, an :class:`HFSource` or any
    re-iterable of strings (then pass ``source_description`` for meta.json).
    ``val_docs`` is the number of leading documents held out for validation (0
    for none).  ``num_workers`` worker processes (default: CPU count; 0 or 1
    tokenizes in this process) each tokenize ``batch_docs`` documents at a time.
    ``max_docs`` limits the number of documents read (validation included).
    ``stop_after_shards`` stops after writing that many NEW train shards (the
    run can be continued later by calling again).  ``mp_context`` is the
    multiprocessing start method; the default is "fork" where available,
    because "spawn"/"forkserver" workers re-import the ``llamathink`` package,
    which imports torch and transformers (seconds per worker); the workers only
    use the ``tokenizers`` library and set ``TOKENIZERS_PARALLELISM=false``.

    Bad records (invalid UTF-8, lone surrogates, invalid JSON, a missing or
    non-string text field, NUL-only text, corrupt gzip/parquet data, unreadable
    files; see :class:`BadRecords`) raise ``ValueError`` naming the file and
    line (or row); the shards written so far stay and a rerun continues after
    them.  With ``skip_bad_records=True`` they are skipped instead, and
    counted by kind in meta.json's ``"bad_records"`` (also printed to stderr).

    Documents longer than ``max_doc_chars`` characters (``None``: no limit) are
    cut into pieces of at most that many characters, at a paragraph start, a
    line start or a space near the limit (see :func:`_cut_point`); the pieces
    are tokenized separately (each one with the character before it as context,
    see :func:`_encode_with`) and concatenated into ONE document ``[BOS] piece1
    piece2 ... [EOS]``, so tokenizer memory (about 100 bytes per character for
    the ``tokenizers`` library) stays bounded; the tokens equal those of the
    whole document except, rarely, at a cut.  Together with streamed .txt
    reading and batches of at most ``max_doc_chars`` characters, the memory of
    a run does not grow with the document length.

    Errors name the settings as ``llamathink-prepare`` spells them, like the
    command's own messages: ``--overwrite`` is ``overwrite=True`` here,
    ``--out`` is ``out_dir``, ``--val-docs`` is ``val_docs``.

    Returns the meta dict (also written to ``meta.json``); when stopped early it
    returns ``{"complete": False, ...progress...}``.
    """
    _check_settings(shard_tokens, val_docs, max_doc_chars, batch_docs, max_docs, stop_after_shards, num_workers)
    tok, tok_name = _resolve_tokenizer(tokenizer)
    vocab_size, bos_id, eos_id = _shard_token_ids(tok, tok_name)
    kind, payload = _tokenizer_payload(tok)

    if isinstance(source, (LocalSource, HFSource)):
        src_desc = source.describe()
    else:
        src_desc = source_description or {"type": "iterable"}
    # A rerun with the same config continues the preparation in out_dir; one with another config is refused.
    config = {
        "format_version": FORMAT_VERSION,
        "tokenizer": tok_name,
        "tokenizer_sha256": _tokenizer_fingerprint(kind, payload),
        "vocab_size": vocab_size,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "source": src_desc,
        "shard_tokens": int(shard_tokens),
        "val_docs": int(val_docs),
        "max_docs": max_docs,
        "max_doc_chars": max_doc_chars,
    }
    again = None  # (one listing of the inputs: it also fails for an input that is not there, before out_dir is
    # claimed or written)
    if isinstance(source, LocalSource):
        again = source.repeated_files()
    out = Path(out_dir)
    with _preparation_lock(out) as lock_fd, _unstarted_removed_on_error(out) as started:
        state = _start_or_resume(out, config, val_docs, overwrite)
        started(state["docs_done"] > 0 or bool(state["train_shards"]) or state.get("val") is not None)
        if again is not None:
            _check_repeated_inputs(out, again, state)
        stamps = _input_stamps(source)
        if state.get("complete") and (out / META_FILE).exists():  # finished by an earlier run

            def same_documents() -> bool:
                digests = DocumentDigests()
                read = _remaining_pieces(source, 0, max_docs, max_doc_chars, BadRecords(skip_bad_records), digests)
                for _ in read:
                    pass
                expected = state.get("docs_sha256")
                return (
                    expected is not None
                    and digests.count == state["docs_done"]
                    and digests.take(state["docs_done"]) == expected
                )

            if _check_input_unchanged(out, state.get("input_files"), stamps, same_documents):
                _atomic_write_json(out / PROGRESS_FILE, {**state, "input_files": stamps})
            return load_meta(out)  # (a damaged one is named, with what to do)
        if stamps is not None:  # (written with the progress: the input this run reads, its digest checked below)
            state["input_files"] = stamps

        num_workers = (os.cpu_count() or 1) if num_workers is None else int(num_workers)
        bad = BadRecords(skip_bad_records)
        digests = DocumentDigests()
        batches = _batched(
            _remaining_pieces(
                source, state["docs_done"], max_docs, max_doc_chars, bad, digests, state.get("docs_sha256")
            ),
            batch_docs,
            max_doc_chars,
        )
        writer = ShardWriter(
            out,
            state,
            digests=digests,
            shard_tokens=shard_tokens,
            val_docs=val_docs,
            vocab_size=vocab_size,
            bos_id=bos_id,
            eos_id=eos_id,
            max_new_shards=stop_after_shards,
        )
        from tqdm.auto import tqdm

        # The bar closes before the workers are shut down (contexts are left in reverse order).
        with (
            _tokenized(batches, kind, payload, bos_id, eos_id, num_workers, mp_context, (lock_fd,)) as results,
            tqdm(
                total=max_docs,
                initial=writer.start,
                unit="doc",
                desc="tokenizing",
                disable=not progress,
                dynamic_ncols=True,
            ) as bar,
        ):
            stopped = _write_all(writer, results, bar)

        _report_bad(bad)
        if stopped:
            return {
                "complete": False,
                **{k: state[k] for k in ("docs_done", "skip_tokens", "train_shards")},
                "bad_records": bad.summary(),
            }
        writer.finish()
        meta = _meta(
            config,
            state,
            num_docs=writer.doc_index,
            train_tokens=writer.train_tokens,
            val_docs=val_docs,
            skip_bad_records=skip_bad_records,
            bad=bad,
        )
        writer.complete(meta)
        return meta


def _report_bad(bad: BadRecords) -> None:
    if bad.total:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(bad.counts.items()))
        print(f"prepare: skipped {bad.total} bad record(s) ({kinds}); first: {bad.examples[0]}", file=sys.stderr)


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------

_PREPARE_DESCRIPTION = (
    "Tokenize whole documents ([BOS] doc [EOS]) into train_*.bin shards, a val_000000.bin "
    "shard (the first --val-docs documents) and meta.json.  Rerunning the same command after an "
    "interruption continues where it stopped."
)


def _add_prepare_arguments(p: argparse.ArgumentParser) -> None:
    """The options of the prepare command, shared by ``llamathink-prepare`` (:func:`main`) and
    ``python -m llamathink.data prepare`` (:mod:`llamathink.data.__main__`)."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--input",
        nargs="+",
        metavar="PATH",
        help="local .txt/.jsonl/.jsonl.gz/.parquet files, directories, globs, or a save_to_disk dataset",
    )
    src.add_argument(
        "--hf-dataset",
        nargs="?",
        const=DEFAULT_HF_DATASET,
        metavar="NAME",
        help=f"Hugging Face dataset (network); without NAME: {DEFAULT_HF_DATASET} (config {DEFAULT_HF_CONFIG})",
    )
    src.add_argument(
        "--sample", action="store_true", help="the bundled sample corpus (llamathink/sample_data/prose.jsonl)"
    )
    p.add_argument("--hf-config", default=None, help="dataset config (default for FineWeb: sample-10BT)")
    p.add_argument("--hf-split", default="train")
    p.add_argument("--hf-data-files", nargs="+", default=None, help="data_files for builders such as json/parquet")
    p.add_argument(
        "--streaming",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="stream the HF dataset instead of downloading it first (default: on)",
    )
    p.add_argument("--text-field", default="text", help="JSON field / column holding the text (default: text)")
    p.add_argument(
        "--txt-split",
        choices=["file", "paragraph"],
        default="file",
        help=".txt files: one document per file (default) or per blank-line-separated paragraph",
    )
    p.add_argument(
        "--tokenizer",
        required=True,
        help="'builtin', a tokenizer.model file, a tokenizer directory / tokenizer.json, or a Hub id",
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per train shard")
    p.add_argument(
        "--val-docs",
        type=int,
        default=DEFAULT_VAL_DOCS,
        help="number of leading documents held out in val_000000.bin (0: none)",
    )
    p.add_argument("--max-docs", type=int, default=None, help="read at most this many documents (val included)")
    p.add_argument(
        "--workers", type=int, default=None, help="tokenizer processes (default: CPU count; at most 4 per CPU)"
    )
    p.add_argument("--batch-docs", type=int, default=64, help="documents per worker task")
    p.add_argument(
        "--mp-context",
        default=None,
        choices=["spawn", "forkserver", "fork"],
        help="multiprocessing start method (default: fork where available)",
    )
    p.add_argument(
        "--stop-after-shards",
        type=int,
        default=None,
        help="stop after writing this many new train shards (rerun to continue)",
    )
    p.add_argument("--overwrite", action="store_true", help="delete an existing different preparation in --out")
    p.add_argument(
        "--skip-bad-records",
        action="store_true",
        help="skip bad records (invalid UTF-8 or JSON, lone surrogates, a missing or non-string text "
        "field, NUL-only text, corrupt gzip/parquet data, unreadable files) and count them in "
        "meta.json, instead of stopping at the first one",
    )
    p.add_argument(
        "--max-doc-chars",
        type=int,
        default=DEFAULT_MAX_DOC_CHARS,
        help="tokenize longer documents in pieces of at most this many characters, cut at a paragraph, "
        f"line or space, as one document (bounds memory; default {DEFAULT_MAX_DOC_CHARS}; 0: no limit)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _build_parser(prog: str = "llamathink-prepare") -> argparse.ArgumentParser:
    """The parser of the prepare command on its own (no subcommand), as the ``llamathink-prepare`` script."""
    p = argparse.ArgumentParser(prog=prog, description=_PREPARE_DESCRIPTION)
    _add_prepare_arguments(p)
    return p


def _run_cli(args: argparse.Namespace) -> int:
    """Run the prepare command for parsed options (see :func:`_add_prepare_arguments`); return the exit status:
    0, or 130 after Ctrl-C (the shards written so far stay).  Bad input (``ValueError`` / ``OSError``) exits
    through ``SystemExit`` with one line, ``prepare: error: ...``, rather than a traceback."""
    if args.sample and (args.text_field != "text" or args.txt_split != "file"):  # the sample's own layout is fixed
        raise SystemExit("prepare: error: --sample reads the bundled sample; --text-field and --txt-split do not apply")
    if args.sample:
        from ..tokenizer_utils import sample_data_path

        source: LocalSource | HFSource = LocalSource([str(sample_data_path("prose.jsonl"))])
    elif args.input:
        source = LocalSource(args.input, text_field=args.text_field, txt_split=args.txt_split)
    else:
        source = HFSource(
            args.hf_dataset, args.hf_config, args.hf_split, args.streaming, args.text_field, args.hf_data_files
        )
    try:
        meta = prepare(
            source,
            args.out,
            args.tokenizer,
            shard_tokens=args.shard_tokens,
            val_docs=args.val_docs,
            num_workers=args.workers,
            batch_docs=args.batch_docs,
            max_docs=args.max_docs,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            stop_after_shards=args.stop_after_shards,
            mp_context=args.mp_context,
            skip_bad_records=args.skip_bad_records,
            max_doc_chars=args.max_doc_chars or None,
        )
    except (ValueError, OSError) as e:
        # Bad input is the user's to fix: one line, not a traceback.  Shards already written stay in --out.
        raise SystemExit(f"prepare: error: {e}") from None
    except KeyboardInterrupt:
        print(
            f"prepare: interrupted; the shards written so far stay in {args.out}: rerun the same command to continue",
            file=sys.stderr,
        )
        return 130
    if meta.get("complete") is False:
        print(f"stopped after {len(meta['train_shards'])} train shards; rerun the same command to continue")
    else:
        print(
            f"wrote {len(meta['train']['shards'])} train shards ({meta['train']['num_tokens']} tokens, "
            f"{meta['train']['num_docs']} docs) and {meta['val']['num_tokens']} val tokens "
            f"({meta['val']['num_docs']} docs) to {args.out}"
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The ``llamathink-prepare`` console script: ``llamathink-prepare --input PATH... --tokenizer TOK --out DIR
    [options]``, the options of ``python -m llamathink.data prepare`` without the subcommand.  Returns the exit
    status (see :func:`_run_cli`)."""
    tolerant_output()
    return _run_cli(_build_parser().parse_args(argv))
