"""Token shards: the file format, writing one, and reading shards for training and evaluation.

Shard format (``*.bin``, little-endian)::

    header   256 x int32 (1024 bytes)
             [0] magic 0x4853544C (the bytes b"LTSH", "LlamaThink shard"); shards written before it had their own
                 magic carry 0x4B48544C (b"LTHK", shared with the C model file of export_c) and are still read
             [1] format version (1)
             [2] bytes per token (2)
             [3] vocabulary size of the tokenizer that produced the tokens
             [4:6] number of tokens, as one int64
             [6] BOS id, [7] EOS id (-1 if unknown); the rest is zero
    tokens   uint16 x number of tokens

A prepared folder (see :mod:`llamathink.data.preparation`) holds ``train_000000.bin``, ``train_000001.bin``, ...,
optionally ``val_000000.bin``, and ``meta.json`` (:func:`load_meta`).

Loading for training (:class:`TokenBatchLoader`) memory-maps the shards and
cuts their concatenation into non-overlapping windows of ``seq_len`` tokens.
Each epoch visits the windows in a permutation seeded by ``(seed, epoch)``;
consecutive groups of ``batch_size`` windows form global batches and rank ``r``
of ``world_size`` takes global batches ``r, r + world_size, ...``, so ranks
never share a window and nothing is sampled with replacement (windows that do
not fill a whole optimizer step, ``batch_size x world_size x grad_accum``
windows, are skipped for that epoch; a different permutation the next epoch
includes them).  Batches are ``(input_ids,
labels)``, both ``torch.int64`` of shape ``[batch_size, seq_len]`` with
``labels`` equal to ``input_ids``: the model shifts labels internally, the
Hugging Face way.  ``state_dict()``/``load_state_dict()`` resume exactly.
:func:`val_batches` gives the deterministic evaluation batches.
"""

from __future__ import annotations

import bisect
import json
import os
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch

# Shards and the C model file (export_c/export.py) used to share b"LTHK"; shards now have their own magic.  The C
# tokenizer file (export_c/tokenizer_export.py) uses b"LTTK", so that one is not free either.
SHARD_MAGIC = 0x4853544C  # b"LTSH" ("LlamaThink shard") read as a little-endian int32
LEGACY_SHARD_MAGIC = 0x4B48544C  # b"LTHK": shards written before SHARD_MAGIC; read, never written
FORMAT_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")
MAX_VOCAB = 65536  # token ids must fit in uint16 (0..65535)

META_FILE = "meta.json"
_SHARD_RE = re.compile(r"^(train|val)_\d{6}\.bin$")

# Other LlamaThink binary files, named in the error when one is passed as a shard.
_OTHER_MAGICS = {0x4B54544C: "a LlamaThink C tokenizer file (export_c/tokenizer_export.py)"}


def _magic_bytes(magic: int) -> bytes:
    return (magic & 0xFFFFFFFF).to_bytes(4, "little")


# ---------------------------------------------------------------------------
# shard files
# ---------------------------------------------------------------------------


def _atomic_write_bytes(path: str | os.PathLike, chunks: Iterable[bytes]) -> None:
    """Write ``chunks`` to ``path`` through ``{path}.tmp.{pid}`` + fsync + ``os.replace``, so a reader (or a run
    killed mid-write) never sees a partial file; the temporary file is removed on any error."""
    path = os.fspath(path)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            for c in chunks:
                f.write(c)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """``obj`` as indented, key-sorted JSON (plus a newline), written atomically (see :func:`_atomic_write_bytes`)."""
    _atomic_write_bytes(path, [(json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")])


def _shard_name(split: str, i: int) -> str:
    """File name of shard ``i`` of ``split`` ("train" or "val"): ``train_000000.bin``, ..."""
    return f"{split}_{i:06d}.bin"


def write_shard(path: str | os.PathLike, tokens, vocab_size: int, *, bos_id: int = -1, eos_id: int = -1) -> None:
    """Write ``tokens`` (any integer array-like) as a shard with :data:`SHARD_MAGIC`, atomically
    (temporary file + ``os.replace``).  Raises ``ValueError`` if the vocabulary
    does not fit uint16 or a token is outside ``[0, vocab_size)``."""
    vocab_size = int(vocab_size)
    if vocab_size > MAX_VOCAB:
        raise ValueError(
            f"vocabulary of {vocab_size} tokens is too large for uint16 shards "
            f"(token ids must be <= 65535, so at most {MAX_VOCAB} tokens)"
        )
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    if arr.size:
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"tokens must be integers, got dtype {arr.dtype}")
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"{path}: token ids must be in [0, {vocab_size}), got range [{lo}, {hi}]")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0] = SHARD_MAGIC
    header[1] = FORMAT_VERSION
    header[2] = TOKEN_DTYPE.itemsize
    header[3] = vocab_size
    header[4:6] = np.array([arr.size], dtype="<i8").view("<i4")
    header[6] = bos_id
    header[7] = eos_id
    _atomic_write_bytes(path, [header.tobytes(), arr.astype(TOKEN_DTYPE, copy=False).tobytes()])


def read_shard_header(path: str | os.PathLike) -> dict:
    """Validate a shard's header and size; return its fields.

    Both :data:`SHARD_MAGIC` and :data:`LEGACY_SHARD_MAGIC` are accepted.  Raises ``FileNotFoundError`` for a
    missing file and ``ValueError`` (naming the file and the problem) for a bad magic number (a C model file, which
    shares the legacy magic, is recognised by its header and refused too), an unsupported version or token size,
    or a file whose length does not match the token count.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"shard file not found: {path}")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    # The magic number first: a short file that is not a shard at all (a meta.json, a text file) is named as such,
    # not as a truncated shard.
    magic = int.from_bytes(head[:4].ljust(4, b"\0"), "little")
    cut_in_magic = len(head) < 4 and any(_magic_bytes(m).startswith(head) for m in (SHARD_MAGIC, LEGACY_SHARD_MAGIC))
    if magic not in (SHARD_MAGIC, LEGACY_SHARD_MAGIC) and not cut_in_magic:
        other = _OTHER_MAGICS.get(magic)
        raise ValueError(
            f"{path}: not a LlamaThink token shard (bad magic number 0x{magic:08X} "
            f"{_magic_bytes(magic)!r}, expected 0x{SHARD_MAGIC:08X} {_magic_bytes(SHARD_MAGIC)!r}"
            f"{f'; it looks like {other}' if other else ''})"
        )
    if size < HEADER_BYTES:
        raise ValueError(f"{path}: truncated shard: {size} bytes is smaller than the {HEADER_BYTES}-byte header")
    header = np.frombuffer(head, dtype="<i4", count=HEADER_INTS)
    version = int(header[1])
    token_bytes = int(header[2])
    if magic == LEGACY_SHARD_MAGIC and (version, token_bytes) != (FORMAT_VERSION, TOKEN_DTYPE.itemsize):
        # Every shard with the legacy magic is version 1 with 2-byte tokens; a C model file has its header size
        # (1024) where a shard has its token size.
        raise ValueError(
            f"{path}: not a LlamaThink token shard (bad magic number 0x{magic:08X} "
            f"{_magic_bytes(magic)!r}: the C model file's magic, which old shards shared, but the "
            f"header is not a shard's: version {version}, token size {token_bytes}; a model.bin "
            "written by export_c?)"
        )
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path}: unsupported shard format version {version} (this code reads version {FORMAT_VERSION})"
        )
    if token_bytes != TOKEN_DTYPE.itemsize:
        raise ValueError(f"{path}: unsupported token size of {token_bytes} bytes (expected {TOKEN_DTYPE.itemsize})")
    num_tokens = int(header[4:6].view("<i8")[0])
    if num_tokens < 0:
        raise ValueError(f"{path}: corrupt header: negative token count {num_tokens}")
    expected = HEADER_BYTES + num_tokens * token_bytes
    if size < expected:
        raise ValueError(
            f"{path}: truncated shard: header says {num_tokens} tokens ({expected} bytes) "
            f"but the file has only {size} bytes"
        )
    if size > expected:
        raise ValueError(
            f"{path}: corrupt shard: header says {num_tokens} tokens ({expected} bytes) but the file has {size} bytes"
        )
    return {
        "version": version,
        "token_bytes": token_bytes,
        "vocab_size": int(header[3]),
        "num_tokens": num_tokens,
        "bos_id": int(header[6]),
        "eos_id": int(header[7]),
    }


def open_shard(path: str | os.PathLike) -> np.ndarray:
    """Validate a shard (see :func:`read_shard_header`) and return its tokens as a
    read-only ``np.memmap`` of dtype uint16 (an empty read-only array for an
    empty shard)."""
    info = read_shard_header(path)
    n = info["num_tokens"]
    if n == 0:
        arr = np.zeros(0, dtype=TOKEN_DTYPE)
        arr.flags.writeable = False
        return arr
    return np.memmap(os.fspath(path), dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(n,))


def find_shards(data_dir: str | os.PathLike, split: str = "train") -> list[Path]:
    """Sorted ``{split}_*.bin`` files in ``data_dir``; ``FileNotFoundError`` with
    a clear message if the directory is missing or holds no such shards."""
    d = Path(data_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"shard directory {d} does not exist (run `python -m llamathink.data prepare` first)")
    shards = sorted(p for p in d.glob(f"{split}_*.bin") if _SHARD_RE.match(p.name))
    if not shards:
        raise FileNotFoundError(f"no {split}_*.bin shards in {d} (run `python -m llamathink.data prepare` first)")
    return shards


def check_shards_against_meta(data_dir: str | os.PathLike, meta: dict) -> dict[str, dict]:
    """The headers ({file name: read_shard_header}) of the shards in ``data_dir``, after checking them against its
    ``meta`` (:func:`load_meta`): every shard meta.json lists exists with the token count it lists, and no shard
    is there that it does not list. ``FileNotFoundError`` / ``ValueError`` naming the shard otherwise (a folder
    whose shards were deleted, truncated or added by hand would train on other data than it says). Reads headers
    only; ``python -m llamathink.data inspect`` also reads every token."""
    folder = Path(data_dir)
    headers = {p.name: read_shard_header(p) for p in sorted(folder.glob("*.bin")) if _SHARD_RE.match(p.name)}
    listed = set()
    for split in ("train", "val"):
        part = meta.get(split) or {}
        entries = part.get("shards", []) if isinstance(part, dict) else None
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise ValueError(
                f'{folder / META_FILE}: its {split!r} entry is not {{"shards": [{{"file", "tokens"}}, ...]}}; '
                f"prepare {folder} again"
            )
        for entry in entries:
            name = entry.get("file")
            listed.add(name)
            if name not in headers:
                raise FileNotFoundError(f"{folder / str(name)}: listed in {META_FILE} ({split}) but missing")
            if headers[name]["num_tokens"] != entry.get("tokens"):
                raise ValueError(
                    f"{folder / name}: {headers[name]['num_tokens']} tokens, {META_FILE} says {entry.get('tokens')}"
                )
    if any(meta.get(split) for split in ("train", "val")):
        unlisted = sorted(set(headers) - listed)
        if unlisted:
            raise ValueError(
                f"{folder}: {', '.join(unlisted)} not listed in {META_FILE}: the folder holds shards of another "
                "preparation (prepare it again with --overwrite, or remove them)"
            )
    return headers


def load_meta(data_dir: str | os.PathLike) -> dict:
    """The ``meta.json`` written by :func:`~llamathink.data.prepare`: a JSON object with an integer
    ``vocab_size``.  Raises ``FileNotFoundError`` when it is missing and ``ValueError`` naming the file when it is
    not valid JSON / UTF-8, not an object, or has no such ``vocab_size``."""
    p = Path(data_dir) / META_FILE
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found; is {data_dir} a finished `prepare` output directory?")
    try:
        with open(p, encoding="utf-8") as f:
            meta = json.load(f)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, nesting too deep
        raise ValueError(f"{p} is not a valid meta.json ({e}); prepare {data_dir} again (--overwrite)") from None
    vocab = meta.get("vocab_size") if isinstance(meta, dict) else None
    if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab <= 0:
        raise ValueError(
            f"{p} is not a meta.json written by prepare (expected an object with a positive integer "
            f"vocab_size, got {type(meta).__name__}{f' with vocab_size {vocab!r}' if vocab else ''})"
        )
    return meta


def check_vocab(tokenizer_vocab_size: int, model_vocab_size: int) -> None:
    """Raise ``ValueError`` if the tokenizer (or data) vocabulary is larger than
    the model's embedding table."""
    if int(tokenizer_vocab_size) > int(model_vocab_size):
        raise ValueError(
            f"tokenizer vocabulary size {tokenizer_vocab_size} is larger than the model vocab_size "
            f"{model_vocab_size}: token ids up to {int(tokenizer_vocab_size) - 1} would index past the "
            "embedding table; raise the model's vocab_size or use a smaller tokenizer"
        )


# ---------------------------------------------------------------------------
# training-side reading
# ---------------------------------------------------------------------------


def _resolve_paths(shards: str | os.PathLike | Sequence[str | os.PathLike], split: str) -> list[Path]:
    """Shard files from a directory (its ``{split}_*.bin``, see :func:`find_shards`), one file, or a list of
    files; ``FileNotFoundError`` for an empty list."""
    if isinstance(shards, (str, os.PathLike)):
        p = Path(shards)
        if p.is_dir() or not p.suffix:
            return find_shards(p, split)
        return [p]
    paths = [Path(s) for s in shards]
    if not paths:
        raise FileNotFoundError(f"no {split} shard paths given")
    return paths


class ShardedTokenDataset:
    """Random access to non-overlapping ``seq_len``-token windows of the
    concatenation of some shards (memory-mapped; windows may span shards).

    ``shards`` is a list of shard files or a directory (then its
    ``{split}_*.bin`` files are used).  If ``model_vocab_size`` is given, every
    shard's vocabulary size is checked against it with :func:`check_vocab`, and
    every window read is checked to hold token ids below it: a ValueError names
    the shard, the token's place in it and its value (a damaged shard, or one
    written by another tokenizer), where the model would otherwise stop on its
    labels mid-run without saying where they came from.
    """

    def __init__(self, shards, seq_len: int, *, split: str = "train", model_vocab_size: int | None = None):
        if int(seq_len) < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.seq_len = int(seq_len)
        self.model_vocab_size = model_vocab_size
        self.paths = _resolve_paths(shards, split)
        self.headers = [read_shard_header(p) for p in self.paths]
        if model_vocab_size is not None:
            for p, h in zip(self.paths, self.headers, strict=True):
                try:
                    check_vocab(h["vocab_size"], model_vocab_size)
                except ValueError as e:
                    raise ValueError(f"{p}: {e}") from None
        self.arrays = [open_shard(p) for p in self.paths]
        lengths = [len(a) for a in self.arrays]
        self.starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.total_tokens = int(self.starts[-1])
        if self.total_tokens < self.seq_len:
            where = self.paths[0] if len(self.paths) == 1 else f"{len(self.paths)} shards in {self.paths[0].parent}"
            raise ValueError(
                f"seq_len {self.seq_len} is longer than the data: {where} hold(s) only {self.total_tokens} tokens"
            )
        self.num_windows = self.total_tokens // self.seq_len
        self.vocab_size = max(h["vocab_size"] for h in self.headers)

    def __len__(self) -> int:
        return self.num_windows

    def _read(self, start: int, n: int, out: np.ndarray) -> None:
        k = bisect.bisect_right(self.starts, start) - 1
        done = 0
        while done < n:
            a = self.arrays[k]
            lo = start + done - int(self.starts[k])
            take = min(n - done, len(a) - lo)
            out[done : done + take] = a[lo : lo + take]
            done += take
            k += 1

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.num_windows:
            raise IndexError(f"window {i} out of range [0, {self.num_windows})")
        return self.windows([i])[0]

    def windows(self, indices: Sequence[int]) -> np.ndarray:
        """The windows ``indices`` as one int64 array ``[len(indices), seq_len]``. Raises ValueError where one holds
        a token id outside the model's vocabulary (see the class docstring)."""
        out = np.empty((len(indices), self.seq_len), dtype=np.int64)
        for r, i in enumerate(indices):
            self._read(int(i) * self.seq_len, self.seq_len, out[r])
        if self.model_vocab_size is not None and out.size and int(out.max()) >= self.model_vocab_size:
            r, c = (int(x) for x in np.argwhere(out >= self.model_vocab_size)[0])
            where = int(indices[r]) * self.seq_len + c  # in the concatenation of the shards
            k = bisect.bisect_right(self.starts, where) - 1
            raise ValueError(
                f"{self.paths[k]}: token {where - int(self.starts[k]):,} (0-based, after the header) is {out[r, c]}, "
                f"outside the model's vocabulary [0, {self.model_vocab_size}): the shard is damaged or was written "
                "with another tokenizer; prepare the data again"
            )
        return out


def saved_count(state: dict, key: str, least: int | None = 0, default: int | None = None) -> int:
    """`state[key]` of a data loader's saved state (`default` where it is missing and `default` is given) as an int.
    Raises ValueError naming the entry as damaged where it is not an integer (a bool, a float, inf, a string, a
    tensor: read with int() each would become another position, or fail deep inside) or is below `least` (None: no
    bound here, the caller checks the range)."""
    value = state.get(key, default) if isinstance(state, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or (least is not None and value < least):
        bound = f" >= {least}" if least is not None else ""
        raise ValueError(
            f"cannot resume the data position: the checkpoint's loader state is damaged ({key} is {value!r}, not an "
            f"integer{bound})"
        )
    return int(value)


def _to_batch(arr: np.ndarray):
    """``(input_ids, labels)`` from an int64 ``[batch, seq_len]`` array: a tensor sharing its memory and a copy."""
    import torch  # only the loaders need torch: preparing data does not import it

    x = torch.from_numpy(arr)
    return x, x.clone()


class TokenBatchLoader:
    """Endless, deterministic, resumable batches for one rank (see module docstring).

    ``next(loader)`` returns ``(input_ids, labels)``, both ``torch.int64``
    ``[batch_size, seq_len]``, ``labels == input_ids``.  One epoch is
    ``len(loader)`` batches per rank: the windows of as many whole optimizer steps
    (``batch_size x world_size x grad_accum`` windows each) as the data holds, so
    that the same global batch split otherwise (micro batch, accumulation,
    processes) gives every step the same windows, across epochs too; after that
    the next epoch starts with a new permutation.  ``state_dict()`` / ``load_state_dict()`` hold ``epoch`` and
    ``position`` (batches of the current epoch already returned by this rank);
    since ranks move in lockstep, every rank may load rank 0's state.
    """

    def __init__(
        self,
        shard_paths,
        seq_len: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        *,
        model_vocab_size: int | None = None,
        grad_accum: int = 1,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if batch_size < 1 or grad_accum < 1:
            raise ValueError(f"batch_size and grad_accum must be >= 1, got {batch_size} and {grad_accum}")
        self.dataset = ShardedTokenDataset(shard_paths, seq_len, split="train", model_vocab_size=model_vocab_size)
        self.seq_len, self.batch_size = int(seq_len), int(batch_size)
        self.rank, self.world_size, self.seed = int(rank), int(world_size), int(seed)
        self.grad_accum = int(grad_accum)
        step_windows = self.batch_size * self.world_size * self.grad_accum
        self.batches_per_epoch = self.dataset.num_windows // step_windows * self.grad_accum
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"not enough data: {self.dataset.num_windows} windows of {self.seq_len} tokens "
                f"({self.dataset.total_tokens} tokens) cannot fill one optimizer step of {self.batch_size} x "
                f"{self.grad_accum} (micro batch x accumulation) on each of {self.world_size} rank(s)"
            )
        self.epoch = 0
        self.position = 0
        self._perm_epoch = None
        self._perm = None

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self):
        return self

    def permutation(self, epoch: int) -> np.ndarray:
        """The window order of ``epoch`` (shared by all ranks)."""
        if self._perm_epoch != epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.dataset.num_windows)
            self._perm_epoch = epoch
        return self._perm

    def batch_windows(self, epoch: int, position: int) -> np.ndarray:
        """Window indices of this rank's batch number ``position`` in ``epoch``."""
        g = position * self.world_size + self.rank
        return self.permutation(epoch)[g * self.batch_size : (g + 1) * self.batch_size]

    def __next__(self):
        if self.position >= self.batches_per_epoch:
            self.epoch += 1
            self.position = 0
        idx = self.batch_windows(self.epoch, self.position)
        self.position += 1
        return _to_batch(self.dataset.windows(idx))

    def state_dict(self) -> dict:
        """Position (``epoch``, ``position``) plus the settings :meth:`load_state_dict` checks or converts."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "grad_accum": self.grad_accum,
            "rank": self.rank,
            "num_windows": self.dataset.num_windows,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at the saved position. The world size, per-rank batch size and accumulation may change as long as
        an optimizer step's windows (world_size x batch_size x grad_accum) stay as many: step n then holds the same
        windows, in every epoch.
        Raises ValueError when the saved seed, seq_len or data size differ, or a saved count is negative (or a
        size is zero), not an integer (`saved_count`) or a position past its epoch's end."""
        mine = {"seed": self.seed, "seq_len": self.seq_len, "num_windows": self.dataset.num_windows}
        for k, v in mine.items():
            if k in state and saved_count(state, k, least=None) != v:
                raise ValueError(f"cannot resume data loader: saved {k}={state[k]} but this loader has {k}={v}")
        epoch, position = saved_count(state, "epoch", None), saved_count(state, "position", None)
        saved_ws = saved_count(state, "world_size", None, default=self.world_size)
        saved_bs = saved_count(state, "batch_size", None, default=self.batch_size)
        saved_accum = saved_count(state, "grad_accum", 1, default=1)
        # a negative position would index the permutation from its end: other data, silently
        if min(epoch, position) < 0 or min(saved_ws, saved_bs) < 1:
            raise ValueError(
                f"cannot resume data loader: saved epoch={epoch}, position={position}, "
                f"world_size={saved_ws}, batch_size={saved_bs} are not valid counts"
            )
        # batches in an epoch of the saved layout (a state without grad_accum: epochs of whole micro-steps)
        per_epoch = self.dataset.num_windows // (saved_ws * saved_bs * saved_accum) * saved_accum
        if position > per_epoch:
            raise ValueError(
                f"cannot resume the data position: the checkpoint's loader state is damaged (position {position} is "
                f"past the end of an epoch of {per_epoch} batches of {saved_ws} x {saved_bs} windows)"
            )
        if (saved_ws, saved_bs) != (self.world_size, self.batch_size):
            consumed = position * saved_ws * saved_bs  # windows of this epoch already used by all ranks
            per_round = self.world_size * self.batch_size
            if saved_ws * saved_bs != per_round or consumed % per_round:
                warnings.warn(
                    f"data loader resumed with world_size x batch_size = {self.world_size} x {self.batch_size} "
                    f"instead of {saved_ws} x {saved_bs}; continuing after window {consumed} of epoch {epoch} "
                    "(each optimizer step still gets the windows it would have had when micro_batch_size x "
                    "grad_accum x processes is unchanged)"
                )
            position = -(-consumed // per_round)
        if "grad_accum" not in state and self.grad_accum > 1:  # saved before epochs were whole optimizer steps
            before = self.dataset.num_windows // (saved_ws * saved_bs) * saved_ws * saved_bs
            now = self.batches_per_epoch * self.world_size * self.batch_size
            if before != now:
                warnings.warn(
                    f"data loader: the checkpoint is of a version whose epochs held {before} windows; they now hold "
                    f"{now} (whole optimizer steps of {self.world_size} x {self.batch_size} x {self.grad_accum}), "
                    f"so from epoch {epoch + 1} on the windows differ from what that version would have given"
                )
        self.epoch, self.position = epoch, position


def check_token_ids(path, tokens: np.ndarray, vocab_size: int) -> None:
    """Raise ValueError naming the shard `path` when a token id in `tokens` (its memory map) is `vocab_size` or
    more; reads every token, 64 Mi at a time."""
    for start in range(0, len(tokens), 1 << 26):
        top = int(tokens[start : start + (1 << 26)].max())
        if top >= vocab_size:
            raise ValueError(f"{path}: token id {top} is outside the vocabulary of {vocab_size}")


def val_batches(
    shards,
    seq_len: int,
    batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    max_batches: int | None = None,
    model_vocab_size: int | None = None,
):
    """Deterministic evaluation batches (same every call): consecutive
    ``seq_len`` windows of the validation shard(s) in order, grouped into
    batches of ``batch_size`` (the last one may be smaller); rank ``r`` takes
    batches ``r, r + world_size, ...``; at most ``max_batches`` per rank.
    ``shards`` is a directory (its ``val_*.bin`` files) or a list of files.
    Yields ``(input_ids, labels)`` like :class:`TokenBatchLoader`."""
    ds = ShardedTokenDataset(shards, seq_len, split="val", model_vocab_size=model_vocab_size)
    n_batches = -(-ds.num_windows // batch_size)
    count = 0
    for b in range(rank, n_batches, world_size):
        if max_batches is not None and count >= max_batches:
            return
        idx = range(b * batch_size, min((b + 1) * batch_size, ds.num_windows))
        yield _to_batch(ds.windows(idx))
        count += 1


def document_position_ids(input_ids: "torch.Tensor", bos_id: int) -> "torch.Tensor":
    """Position ids [B, T] that restart at 0 at every `bos_id` token of `input_ids` [B, T] (and at the start of each
    row): the packed-documents form the model reads as separate sequences (`LlamaThinkModel.forward`), so that a
    window holding the end of one document and the start of others trains each only on itself. Shards hold
    `[BOS] doc [EOS]` documents back to back, so each BOS starts a document."""
    import torch

    T = input_ids.shape[1]
    starts = input_ids == bos_id
    starts[:, 0] = True
    index = torch.arange(T, device=input_ids.device).expand_as(input_ids)
    return index - torch.where(starts, index, torch.zeros_like(index)).cummax(1).values
