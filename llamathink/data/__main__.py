"""``python -m llamathink.data``: the command line of the data tools.

    python -m llamathink.data prepare --input PATH... --tokenizer TOK --out DIR [options]
    python -m llamathink.data inspect DIR_OR_SHARD

``prepare`` takes the options of the ``llamathink-prepare`` script (:func:`llamathink.data.preparation.main`);
``inspect`` validates shards (:func:`~llamathink.data.shards.read_shard_header`; a folder's against its meta.json,
every token id included) and prints their headers and
the folder's meta.json as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from ..cli import tolerant_output
from .preparation import _PREPARE_DESCRIPTION, _add_prepare_arguments, _run_cli
from .shards import (
    _SHARD_RE,
    META_FILE,
    check_shards_against_meta,
    check_token_ids,
    load_meta,
    open_shard,
    read_shard_header,
)


def _build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m llamathink.data", description="LlamaThink pretraining data tools")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="tokenize documents into uint16 shards", description=_PREPARE_DESCRIPTION)
    _add_prepare_arguments(p)
    ins = sub.add_parser("inspect", help="validate shards and print a summary")
    ins.add_argument("path", help="a prepare output directory or a .bin shard")
    return ap


def _inspect(path: str) -> int:
    """Print the headers of the shards at ``path`` (a folder's ``train_*``/``val_*`` shards, or one file; a folder's
    meta.json stands for the folder) and the
    folder's meta.json as JSON; raises ``FileNotFoundError`` when there are none, ``ValueError`` for a bad shard.
    A folder's shards are also checked against its meta.json (`_check_against_meta`), a shard without one against
    its own header (every token id inside its vocabulary)."""
    p = Path(path)
    if p.name == META_FILE and p.is_file():  # the folder's description: inspect the folder it describes
        p = p.parent
    files = [p] if p.is_file() else sorted(q for q in p.glob("*.bin") if _SHARD_RE.match(q.name))
    if not files:
        raise FileNotFoundError(f"no shards at {p}")
    summary = {"shards": {str(f.name): read_shard_header(f) for f in files}}
    if p.is_dir() and (p / META_FILE).exists():
        summary["meta"] = load_meta(p)
        _check_against_meta(p, summary["meta"])
    else:  # one shard, or a folder without meta.json: every token against the shard's own header
        for f in files:
            check_token_ids(f, open_shard(f), summary["shards"][f.name]["vocab_size"])
    print(json.dumps(summary, indent=2))
    return 0


def _check_against_meta(folder: Path, meta: dict) -> None:
    """ValueError naming the shard when one that meta.json lists is missing or holds another token count, or when a
    shard's header vocabulary differs from meta.json's or a token id is outside it (every token is read)."""
    vocab = meta["vocab_size"]
    for name, header in check_shards_against_meta(folder, meta).items():
        if header["vocab_size"] != vocab:
            raise ValueError(f"{folder / name}: vocabulary {header['vocab_size']}, {META_FILE} says {vocab}")
        check_token_ids(folder / name, open_shard(folder / name), vocab)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``python -m llamathink.data SUBCOMMAND ...`` (``argv`` without the program name); return the exit status."""
    tolerant_output()
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.cmd == "inspect":
        try:
            return _inspect(args.path)
        except (OSError, ValueError) as err:  # no shards there, not a shard, unreadable
            parser.exit(2, f"{parser.prog} inspect: error: {err}\n")
    return _run_cli(args)


if __name__ == "__main__":
    sys.exit(main())
