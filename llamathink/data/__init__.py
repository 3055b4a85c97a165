"""Data for LlamaThink: token shards, their preparation and loading (pretraining), and chat data (finetuning).

What lives where:

* :mod:`llamathink.data.shards`: the token-shard file format (header, ``SHARD_MAGIC``), :func:`write_shard`,
  validating and memory-mapping shards (:func:`read_shard_header`, :func:`open_shard`), finding them
  (:func:`find_shards`) and ``meta.json`` (:func:`load_meta`), and the readers for training and evaluation
  (:class:`ShardedTokenDataset`, :class:`TokenBatchLoader`, :func:`val_batches`).
* :mod:`llamathink.data.preparation`: turning documents into shards: the document sources (:class:`LocalSource`,
  :class:`HFSource`, bad-record handling with :class:`BadRecords`, long documents cut into :class:`Piece` s),
  tokenization in worker processes, :func:`prepare` with its :class:`ShardWriter` (shards and the resumable
  ``progress.json``), and the ``llamathink-prepare`` command (:func:`llamathink.data.preparation.main`).
* :mod:`llamathink.data.chat`: conversations (formats, loading), tokenized finetuning examples with their label
  mask, packing, the collator and the resumable batch loader (imported from there, not re-exported here).
* :mod:`llamathink.data.__main__`: ``python -m llamathink.data prepare ...`` / ``... inspect PATH``.

The public names of both modules are re-exported here (``from llamathink.data import TokenBatchLoader, prepare``).
The module is called ``preparation`` rather than ``prepare`` so that ``llamathink.data.prepare`` is one thing, the
function, not a module shadowed by it.
"""

from .preparation import (
    BAD_RECORD_KINDS,
    DEFAULT_HF_CONFIG,
    DEFAULT_HF_DATASET,
    DEFAULT_MAX_DOC_CHARS,
    DEFAULT_SHARD_TOKENS,
    DEFAULT_VAL_DOCS,
    MAX_JSONL_LINE_BYTES,
    PROGRESS_FILE,
    BadRecords,
    HFSource,
    LocalSource,
    Piece,
    ShardWriter,
    prepare,
    tokenizer_fingerprint,
)
from .shards import (
    FORMAT_VERSION,
    HEADER_BYTES,
    HEADER_INTS,
    LEGACY_SHARD_MAGIC,
    MAX_VOCAB,
    META_FILE,
    SHARD_MAGIC,
    TOKEN_DTYPE,
    ShardedTokenDataset,
    TokenBatchLoader,
    check_shards_against_meta,
    check_token_ids,
    check_vocab,
    document_position_ids,
    find_shards,
    load_meta,
    open_shard,
    read_shard_header,
    val_batches,
    write_shard,
)

__all__ = [
    "BAD_RECORD_KINDS",
    "DEFAULT_HF_CONFIG",
    "DEFAULT_HF_DATASET",
    "DEFAULT_MAX_DOC_CHARS",
    "DEFAULT_SHARD_TOKENS",
    "DEFAULT_VAL_DOCS",
    "FORMAT_VERSION",
    "HEADER_BYTES",
    "HEADER_INTS",
    "LEGACY_SHARD_MAGIC",
    "MAX_JSONL_LINE_BYTES",
    "MAX_VOCAB",
    "META_FILE",
    "PROGRESS_FILE",
    "SHARD_MAGIC",
    "TOKEN_DTYPE",
    "BadRecords",
    "HFSource",
    "LocalSource",
    "Piece",
    "ShardWriter",
    "ShardedTokenDataset",
    "TokenBatchLoader",
    "check_shards_against_meta",
    "check_token_ids",
    "check_vocab",
    "document_position_ids",
    "find_shards",
    "load_meta",
    "open_shard",
    "prepare",
    "read_shard_header",
    "tokenizer_fingerprint",
    "val_batches",
    "write_shard",
]
