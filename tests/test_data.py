"""Tests for llamathink.data: shard format, prepare (sources, BOS/EOS, restart)
and the training/validation readers."""

import gzip
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT, llama2_model_path
from llamathink import data as D
from llamathink.data import (
    HEADER_BYTES,
    LEGACY_SHARD_MAGIC,
    SHARD_MAGIC,
    HFSource,
    LocalSource,
    ShardedTokenDataset,
    TokenBatchLoader,
    check_vocab,
    find_shards,
    load_meta,
    open_shard,
    prepare,
    read_shard_header,
    val_batches,
    write_shard,
)
from llamathink.data.__main__ import main
from llamathink.tokenizer_utils import builtin_tokenizer, iter_sample_texts, load_tokenizer

# The module of prepare and its private helpers.
P = importlib.import_module("llamathink.data.preparation")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_tok():
    return builtin_tokenizer(1024)


@pytest.fixture(scope="module")
def docs():
    return list(iter_sample_texts(include_conversations=False))[:120]


def write_jsonl(path, texts, field="text"):
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({field: t}) + "\n")
    return path


def read_dir(d):
    return {p.name: p.read_bytes() for p in sorted(Path(d).iterdir())}


def all_train_tokens(out):
    return np.concatenate([np.asarray(open_shard(p)) for p in find_shards(out, "train")])


# ---------------------------------------------------------------- shard format


def test_shard_round_trip(tmp_path):
    toks = np.array([1, 15043, 3186, 2, 0, 31999], dtype=np.int64)
    p = tmp_path / "s.bin"
    write_shard(p, toks, 32000, bos_id=1, eos_id=2)
    assert p.stat().st_size == HEADER_BYTES + 2 * len(toks)
    raw = np.fromfile(p, dtype="<i4", count=8)
    assert raw[0] == SHARD_MAGIC == 0x4853544C and bytes(raw[:1].tobytes()) == b"LTSH"
    assert list(raw[1:4]) == [1, 2, 32000]
    assert read_shard_header(p) == {
        "version": 1,
        "token_bytes": 2,
        "vocab_size": 32000,
        "num_tokens": 6,
        "bos_id": 1,
        "eos_id": 2,
    }
    arr = open_shard(p)
    assert isinstance(arr, np.memmap) and arr.dtype == np.uint16
    assert arr.tolist() == toks.tolist()
    with pytest.raises(ValueError):
        arr[0] = 5  # read-only
    assert [f for f in os.listdir(tmp_path) if "tmp" in f] == []
    # Overwrite atomically with different content; empty shards are allowed.
    write_shard(p, [], 10)
    assert read_shard_header(p)["num_tokens"] == 0 and len(open_shard(p)) == 0
    # Full uint16 range.
    write_shard(p, [0, 65535], 65536)
    assert open_shard(p).tolist() == [0, 65535]


def _legacy_shard_bytes(tokens, vocab_size, bos_id=-1, eos_id=-1):
    """A shard as written before shards had their own magic, built by hand: b"LTHK", version 1, 2-byte tokens."""
    header = np.zeros(256, dtype="<i4")
    header[:4] = [0x4B48544C, 1, 2, vocab_size]
    header[4:6] = np.array([len(tokens)], dtype="<i8").view("<i4")
    header[6:8] = [bos_id, eos_id]
    return header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes()


def test_shards_have_their_own_magic_and_old_shards_still_read(tmp_path):
    """Shards are written with SHARD_MAGIC (b"LTSH"), no longer with b"LTHK", which they shared with the C model
    file; a shard with the old magic reads exactly like the same shard written now."""
    assert SHARD_MAGIC.to_bytes(4, "little") == b"LTSH" and LEGACY_SHARD_MAGIC.to_bytes(4, "little") == b"LTHK"
    toks = [1, 15043, 3186, 2, 0, 31999]
    new, old = tmp_path / "new.bin", tmp_path / "old.bin"
    write_shard(new, toks, 32000, bos_id=1, eos_id=2)
    old.write_bytes(_legacy_shard_bytes(toks, 32000, bos_id=1, eos_id=2))
    assert new.read_bytes()[:4] == b"LTSH" and new.read_bytes()[4:] == old.read_bytes()[4:]
    assert read_shard_header(old) == read_shard_header(new)
    assert open_shard(old).tolist() == open_shard(new).tolist() == toks
    # An old prepared folder (train and val shards with the old magic) feeds the loaders as before.
    for d, write in (
        ("new_dir", lambda p, t: write_shard(p, t, 1000)),
        ("old_dir", lambda p, t: p.write_bytes(_legacy_shard_bytes(t, 1000))),
    ):
        (tmp_path / d).mkdir()
        write(tmp_path / d / "train_000000.bin", np.arange(700) % 1000)
        write(tmp_path / d / "val_000000.bin", np.arange(300, 0, -1))
    a, b = TokenBatchLoader(tmp_path / "new_dir", 10, 4, seed=3), TokenBatchLoader(tmp_path / "old_dir", 10, 4, seed=3)
    for _ in range(5):
        assert torch.equal(next(a)[0], next(b)[0])
    va = [x for x, _ in val_batches(tmp_path / "new_dir", 10, 4)]
    vb = [x for x, _ in val_batches(tmp_path / "old_dir", 10, 4)]
    assert len(va) == len(vb) == 8 and all(torch.equal(x, y) for x, y in zip(va, vb, strict=True))


def test_other_files_are_refused_as_shards(tmp_path):
    """A C model file (it has the old shards' magic, but a model header), a C tokenizer file and garbage are
    refused with a ValueError naming the file."""
    import struct

    model = bytearray(2048)  # export_c's model.bin header: magic, version, header size, dtype, group, alignment
    struct.pack_into("<6I", model, 0, 0x4B48544C, 1, 1024, 0, 64, 64)
    (tmp_path / "model.bin").write_bytes(bytes(model))
    with pytest.raises(ValueError, match=r"model\.bin: not a LlamaThink token shard .*C model file"):
        open_shard(tmp_path / "model.bin")
    tok = bytearray(1024 + 64)  # export_c's tokenizer.bin header: b"LTTK", version, header size, ...
    struct.pack_into("<3I", tok, 0, 0x4B54544C, 1, 64)
    (tmp_path / "tokenizer.bin").write_bytes(bytes(tok))
    with pytest.raises(ValueError, match=r"tokenizer\.bin: not a LlamaThink token shard \(bad magic .*C tokenizer"):
        read_shard_header(tmp_path / "tokenizer.bin")
    (tmp_path / "garbage.bin").write_bytes(bytes(range(256)) * 8)
    with pytest.raises(
        ValueError,
        match=r"garbage\.bin: not a LlamaThink token shard \(bad magic number "
        r"0x03020100 .*expected 0x4853544C b'LTSH'\)",
    ):
        open_shard(tmp_path / "garbage.bin")
    # In a prepared folder too: the loaders name the file.
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train_000000.bin").write_bytes(bytes(model))
    with pytest.raises(ValueError, match=r"train_000000\.bin: not a LlamaThink token shard"):
        TokenBatchLoader(tmp_path / "d", 10, 4)


def test_write_shard_errors(tmp_path):
    with pytest.raises(ValueError, match="too large for uint16"):
        write_shard(tmp_path / "a.bin", [1, 2], 70000)
    with pytest.raises(ValueError, match=r"\[0, 100\)"):
        write_shard(tmp_path / "a.bin", [1, 100], 100)
    with pytest.raises(ValueError, match=r"\[0, 100\)"):
        write_shard(tmp_path / "a.bin", [-1, 3], 100)
    assert not (tmp_path / "a.bin").exists()


def test_corrupt_shards(tmp_path):
    good = tmp_path / "good.bin"
    write_shard(good, np.arange(100), 1000)
    body = good.read_bytes()

    bad_magic = tmp_path / "bad_magic.bin"
    bad_magic.write_bytes(b"XXXX" + body[4:])
    with pytest.raises(ValueError, match=r"bad_magic\.bin.*bad magic"):
        open_shard(bad_magic)

    bad_version = tmp_path / "bad_version.bin"
    bad_version.write_bytes(body[:4] + np.array([7], "<i4").tobytes() + body[8:])
    with pytest.raises(ValueError, match=r"bad_version\.bin.*version 7"):
        open_shard(bad_version)

    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(body[:-3])
    with pytest.raises(ValueError, match=r"truncated\.bin.*truncated.*100 tokens"):
        open_shard(truncated)

    tiny = tmp_path / "tiny.bin"
    tiny.write_bytes(body[:100])
    with pytest.raises(ValueError, match=r"tiny\.bin.*smaller than the 1024-byte header"):
        open_shard(tiny)

    extra = tmp_path / "extra.bin"
    extra.write_bytes(body + b"\0\0")
    with pytest.raises(ValueError, match=r"extra\.bin.*corrupt"):
        open_shard(extra)

    with pytest.raises(FileNotFoundError):
        open_shard(tmp_path / "missing.bin")
    with pytest.raises(ValueError, match="truncated"):
        ShardedTokenDataset([good, truncated], 8)


def test_find_shards_and_check_vocab(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_shards(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no train_"):
        find_shards(tmp_path)
    with pytest.raises(FileNotFoundError, match="no train_"):
        TokenBatchLoader(tmp_path, 8, 2)
    for i in (1, 0):
        write_shard(tmp_path / f"train_{i:06d}.bin", [1, 2, 3], 10)
    assert [p.name for p in find_shards(tmp_path)] == ["train_000000.bin", "train_000001.bin"]
    check_vocab(32000, 32000)
    with pytest.raises(ValueError, match="32001.*32000"):
        check_vocab(32001, 32000)


def test_a_token_outside_the_models_vocabulary_is_named_by_shard_and_place(tmp_path):
    """A shard whose header passes the vocabulary check but whose tokens do not (a damaged file, or one written by
    another tokenizer and its header edited): the window that reads the token raises ValueError naming the shard,
    the token's place in it and its value, for windows that span two shards too; other windows, and readers
    without a model vocabulary, read as before."""
    write_shard(tmp_path / "train_000000.bin", list(range(10, 30)), 500)
    write_shard(tmp_path / "train_000001.bin", [5] * 20, 500)
    open_shard(tmp_path / "train_000001.bin")  # a valid shard, then damaged in place
    tokens = np.memmap(tmp_path / "train_000001.bin", dtype=np.uint16, mode="r+", offset=HEADER_BYTES)
    tokens[7] = 999
    tokens.flush()
    del tokens
    data = ShardedTokenDataset(tmp_path, 8, model_vocab_size=500)
    assert data[0].tolist() == list(range(10, 18))
    data.windows([2])  # shard 0's last 4 tokens and shard 1's first 4: in the vocabulary
    with pytest.raises(ValueError, match=r"train_000001\.bin: token 7 \(0-based, after the header\) is 999, outside"):
        data.windows([1, 3])  # window 3 holds shard 1's tokens 4..11
    with pytest.raises(ValueError, match=r"train_000001\.bin: token 7 "):
        data[3]
    assert ShardedTokenDataset(tmp_path, 8).windows([3]).max() == 999  # no model vocabulary: nothing to check
    loader = TokenBatchLoader(tmp_path, 8, 5, model_vocab_size=500)  # every window of the data in its one batch
    with pytest.raises(ValueError, match="another tokenizer"):
        next(loader)


# ---------------------------------------------------------------- prepare


def test_llama2_bos_eos_and_newlines(tmp_path):
    model = llama2_model_path()
    texts = ["Hello world", "First line\nsecond line\n\nNew paragraph.\n", "  indented\tand </s> literal"]
    src = write_jsonl(tmp_path / "d.jsonl", texts)
    meta = prepare(
        LocalSource([str(src)]),
        tmp_path / "out",
        str(model),
        shard_tokens=1000,
        val_docs=0,
        num_workers=1,
        progress=False,
    )
    assert meta["vocab_size"] == 32000 and (meta["bos_token_id"], meta["eos_token_id"]) == (1, 2)
    toks = all_train_tokens(tmp_path / "out").tolist()
    assert toks[:4] == [1, 15043, 3186, 2]
    tok = load_tokenizer(model)
    # Split the stream back into documents at BOS ... EOS and decode each one.
    docs, cur = [], None
    for t in toks:
        if t == 1:
            cur = []
        elif t == 2:
            docs.append(cur)
            cur = None
        else:
            cur.append(t)
    assert [tok.decode(d) for d in docs] == texts
    second = docs[1]
    assert second.count(13) == 4  # the four "\n" (<0x0A>) survive inside the document
    assert 2 not in docs[2]  # literal "</s>" in text is not an EOS token
    assert meta["train"]["num_docs"] == 3 and meta["train"]["num_tokens"] == len(toks)


def test_saved_datasets_of_no_rows_or_of_several_splits_are_named(tmp_path, small_tok):
    """A save_to_disk split of no rows (which datasets 5.2 cannot load: an IndexError from inside it) is a source
    of no documents, named as any empty source is; a saved DatasetDict (one folder per split) names its splits and
    the folder to give instead of "no .txt, ... files"."""
    import datasets

    datasets.Dataset.from_dict({"text": []}).save_to_disk(str(tmp_path / "empty"))
    assert list(LocalSource([str(tmp_path / "empty")])) == []
    with pytest.raises(ValueError, match="no training documents: the source produced 0 documents"):
        prepare(LocalSource([str(tmp_path / "empty")]), tmp_path / "out", small_tok, val_docs=0, progress=False)
    split = datasets.Dataset.from_dict({"text": ["a b c", "d e"]})
    datasets.DatasetDict(train=split, test=split).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(
        ValueError, match=r"dd is a saved DatasetDict \(splits: test, train\): give one split's .*dd/train"
    ):
        LocalSource([str(tmp_path / "dd")]).files()
    assert list(LocalSource([str(tmp_path / "dd" / "train")])) == ["a b c", "d e"]


def test_an_input_file_named_twice_is_read_once(tmp_path, small_tok, capsys, monkeypatch):
    """A file that two inputs name (a folder and a file in it, overlapping globs, a link to it) is one input: its
    documents were tokenized once per name, and trained on that many times, without a word."""
    folder = tmp_path / "txt"
    folder.mkdir()
    (folder / "a.txt").write_text("first document")
    (folder / "b.txt").write_text("second document")
    (tmp_path / "link.txt").symlink_to(folder / "b.txt")
    source = LocalSource([str(folder / "b.txt"), str(folder), str(folder / "*.txt"), str(tmp_path / "link.txt")])
    a, b = folder / "a.txt", folder / "b.txt"
    assert source.files() == [b, a]
    specs = source.paths
    assert source.repeated_files() == [
        (b, specs[0], specs[1]),
        (a, specs[1], specs[2]),
        (b, specs[0], specs[2]),
        (tmp_path / "link.txt", specs[0], specs[3]),
    ]
    assert list(source) == ["second document", "first document"]
    meta = prepare(source, tmp_path / "out", small_tok, val_docs=0, progress=False)
    assert meta["train"]["num_docs"] == 2
    err = capsys.readouterr().err
    assert f"prepare: 4 input file(s) named more than once (first: {b}, named by {str(b)!r} and again by " in err
    # the same files named otherwise (the folder alone, from another directory) are the same preparation
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    again = prepare(LocalSource(["../txt/b.txt", "../txt"]), tmp_path / "out", small_tok, val_docs=0, progress=False)
    assert again == meta
    # a preparation begun before inputs named twice were read once (no mark in its progress.json) read them once per
    # name: finished, it is reported with a note saying so; stopped after some documents, it is refused by name
    progress = tmp_path / "out" / P.PROGRESS_FILE
    state = json.loads(progress.read_text())
    progress.write_text(json.dumps({k: v for k, v in state.items() if k != "inputs_read_once"}))
    assert prepare(source, tmp_path / "out", small_tok, val_docs=0, progress=False) == meta
    assert "was prepared before inputs named twice were read once: it holds the documents of 4 input" in (
        capsys.readouterr().err
    )
    progress.write_text(json.dumps({**state, "complete": False, "inputs_read_once": None}))
    with pytest.raises(ValueError, match="was begun before inputs named twice were read once, and has read 4 input"):
        prepare(source, tmp_path / "out", small_tok, val_docs=0, progress=False)
    # a link loop among the inputs is a bad record, as it was (resolving it raised RuntimeError)
    (folder / "loop.txt").symlink_to(folder / "loop.txt")
    with pytest.raises(ValueError, match="loop.txt"):
        prepare(LocalSource([str(folder)]), tmp_path / "loop", small_tok, val_docs=0, progress=False)


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_tokenizer_workers_start_with_ctrl_c_ignored(method):
    """Ctrl-C reaches the whole process group, and the preparation alone handles it. A worker ignored it only from
    its initializer on, so a spawned worker interrupted while importing the package printed a KeyboardInterrupt
    traceback. Workers now start with SIGINT ignored: a process of the preparation's context that raises SIGINT
    at its very start exits cleanly (it ended with KeyboardInterrupt, exit code 1), and this process's own
    Ctrl-C handler is the one it had."""
    import multiprocessing as mp

    handler = signal.getsignal(signal.SIGINT)
    ctx = P._WorkersIgnoreInterrupt(mp.get_context(method))
    worker = ctx.Process(target=signal.raise_signal, args=(signal.SIGINT,))
    worker.start()
    worker.join(60)
    assert worker.exitcode == 0
    assert signal.getsignal(signal.SIGINT) is handler
    assert ctx.get_start_method() == method  # (the rest of the context is the one it wraps)


def test_sources_agree(tmp_path, small_tok, docs):
    """.txt, .jsonl, .jsonl.gz, .parquet, datasets.load_dataset and save_to_disk
    give the same token stream."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = docs[:30]
    (tmp_path / "txt").mkdir()
    for i, t in enumerate(texts):
        (tmp_path / "txt" / f"{i:03d}.txt").write_text(t, encoding="utf-8")
    write_jsonl(tmp_path / "d.jsonl", texts)
    with gzip.open(tmp_path / "d.jsonl.gz", "wt", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"body": t}) + "\n")
    pq.write_table(pa.table({"text": texts}), tmp_path / "d.parquet")
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "saved"))
    sources = {
        "txt": LocalSource([str(tmp_path / "txt")]),
        "jsonl": LocalSource([str(tmp_path / "d.jsonl")]),
        "gz": LocalSource([str(tmp_path / "d.jsonl.gz")], text_field="body"),
        "parquet": LocalSource([str(tmp_path / "d.parquet")]),
        "saved": LocalSource([str(tmp_path / "saved")]),
        "hf_json": HFSource("json", split="train", streaming=True, data_files=str(tmp_path / "d.jsonl")),
    }
    streams = {}
    for name, src in sources.items():
        out = tmp_path / f"out_{name}"
        prepare(src, out, small_tok, shard_tokens=500, val_docs=3, num_workers=1, progress=False)
        streams[name] = (all_train_tokens(out).tolist(), np.asarray(open_shard(out / "val_000000.bin")).tolist())
    out = tmp_path / "out_list"
    prepare(
        texts,
        out,
        small_tok,
        shard_tokens=500,
        val_docs=3,
        num_workers=1,
        progress=False,
        source_description={"type": "list"},
    )
    streams["list"] = (all_train_tokens(out).tolist(), np.asarray(open_shard(out / "val_000000.bin")).tolist())
    assert load_meta(out)["source"] == {"type": "list"}
    ref = streams["jsonl"]
    expected = []
    for t in texts:
        expected += [1] + small_tok.encode(t, add_special_tokens=False) + [2]
    assert ref[1] + ref[0] == expected
    for name, s in streams.items():
        assert s == ref, name


def test_txt_paragraph_split_and_field_errors(tmp_path, small_tok):
    (tmp_path / "a.txt").write_text("Para one\nstill one.\n\n\nPara two.\n  \nPara three.\n")
    src = LocalSource([str(tmp_path / "a.txt")], txt_split="paragraph")
    assert list(src) == ["Para one\nstill one.", "Para two.", "Para three."]
    assert list(LocalSource([str(tmp_path / "a.txt")])) == ["Para one\nstill one.\n\n\nPara two.\n  \nPara three.\n"]
    # a byte-order mark (as Windows editors save UTF-8) is not part of the first document; one alone is no document
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfPara one\n\nPara two.\n")
    assert list(LocalSource([str(tmp_path / "bom.txt")], txt_split="paragraph")) == ["Para one", "Para two."]
    assert list(LocalSource([str(tmp_path / "bom.txt")])) == ["Para one\n\nPara two.\n"]
    (tmp_path / "only_bom.txt").write_bytes(b"\xef\xbb\xbf\n")
    assert list(LocalSource([str(tmp_path / "only_bom.txt")])) == []
    # and before a JSON Lines file's first record (it was "invalid JSON"); later lines keep it as text
    (tmp_path / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "one"}\n{"text": "\xef\xbb\xbftwo"}\n')
    assert list(LocalSource([str(tmp_path / "bom.jsonl")])) == ["one", "\ufefftwo"]
    write_jsonl(tmp_path / "b.jsonl", ["x"], field="content")
    with pytest.raises(ValueError, match=r"b\.jsonl:1.*no field 'text'"):
        list(LocalSource([str(tmp_path / "b.jsonl")]))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(LocalSource([str(tmp_path / "missing.jsonl")]))
    assert HFSource().config == "sample-10BT" and HFSource().name == "HuggingFaceFW/fineweb"


def test_prepare_layout_and_parallel_determinism(tmp_path, small_tok, docs):
    src = LocalSource([str(write_jsonl(tmp_path / "d.jsonl", docs))])
    m1 = prepare(
        src, tmp_path / "one", small_tok, shard_tokens=3000, val_docs=10, num_workers=1, batch_docs=7, progress=False
    )
    m2 = prepare(
        src, tmp_path / "two", small_tok, shard_tokens=3000, val_docs=10, num_workers=2, batch_docs=5, progress=False
    )
    assert read_dir(tmp_path / "one") == read_dir(tmp_path / "two")
    assert m1 == m2 == load_meta(tmp_path / "one")
    # workers of the other start methods (a fork server's are its children, not this process's: they exited at
    # once, taking them for orphans)
    kw = dict(shard_tokens=3000, val_docs=10, num_workers=2, batch_docs=5, progress=False)
    for context in ("forkserver", "spawn"):
        assert prepare(src, tmp_path / context, small_tok, mp_context=context, **kw) == m1
        assert read_dir(tmp_path / context) == read_dir(tmp_path / "one")
    shards = m1["train"]["shards"]
    assert all(s["tokens"] == 3000 for s in shards[:-1]) and 0 < shards[-1]["tokens"] <= 3000
    assert m1["train"]["num_docs"] == len(docs) - 10 and m1["val"]["num_docs"] == 10
    total = sum(s["tokens"] for s in shards)
    assert total == m1["train"]["num_tokens"] == len(all_train_tokens(tmp_path / "one"))
    val = np.asarray(open_shard(tmp_path / "one" / "val_000000.bin"))
    assert (val == 1).sum() == 10 and (val == 2).sum() == 10 and val[0] == 1 and val[-1] == 2
    train = all_train_tokens(tmp_path / "one")
    assert (train == 1).sum() == len(docs) - 10 and train[0] == 1 and train[-1] == 2
    # Rerunning a finished preparation is a no-op that returns the same meta.
    assert (
        prepare(
            src,
            tmp_path / "one",
            small_tok,
            shard_tokens=3000,
            val_docs=10,
            num_workers=1,
            batch_docs=3,
            progress=False,
        )
        == m1
    )


@pytest.mark.parametrize("shard_tokens", [50, 997])
def test_prepare_restart_is_byte_identical(tmp_path, small_tok, docs, shard_tokens):
    """Stopping after k shards (shard_tokens=50 also splits single documents
    over several shards) and rerunning gives exactly the uninterrupted output."""
    src = LocalSource([str(write_jsonl(tmp_path / "d.jsonl", docs[:40]))])
    kw = dict(shard_tokens=shard_tokens, val_docs=4, num_workers=1, batch_docs=3, progress=False)
    prepare(src, tmp_path / "ref", small_tok, **kw)
    ref = read_dir(tmp_path / "ref")
    n_shards = len([n for n in ref if n.startswith("train_")])
    assert n_shards > 3
    for k in sorted({1, 2, n_shards // 2, n_shards - 1}):
        out = tmp_path / f"stop{k}"
        part = prepare(src, out, small_tok, stop_after_shards=k, **kw)
        assert part["complete"] is False and len(part["train_shards"]) == k
        assert not (out / "meta.json").exists()
        if 1 < k < n_shards - 2:  # a second partial run continues from the first
            part = prepare(src, out, small_tok, stop_after_shards=1, **kw)
            assert len(part["train_shards"]) == k + 1
        prepare(src, out, small_tok, **kw)
        assert read_dir(out) == ref


def test_a_rerun_naming_the_same_input_another_way_continues_the_preparation(tmp_path, small_tok, docs, monkeypatch):
    """A stopped preparation continued with its input named another way (relative, ./, absolute, from another
    directory) is the same preparation (it was refused as one whose source differs); another file is still another
    preparation, and one of the same relative name in another directory is refused by its documents. A
    stop_after_shards below 1 is refused by name (0 wrote a shard)."""
    write_jsonl(tmp_path / "d.jsonl", docs[:40])
    write_jsonl(tmp_path / "e.jsonl", docs[:40])
    monkeypatch.chdir(tmp_path)
    kw = {"shard_tokens": 50, "val_docs": 4, "num_workers": 1, "progress": False}
    part = prepare(LocalSource(["d.jsonl"]), tmp_path / "out", small_tok, stop_after_shards=1, **kw)
    assert part["complete"] is False
    with pytest.raises(ValueError, match="different preparation \\(differs in: source\\)"):
        prepare(LocalSource(["e.jsonl"]), tmp_path / "out", small_tok, **kw)
    part = prepare(LocalSource(["./d.jsonl"]), tmp_path / "out", small_tok, stop_after_shards=1, **kw)
    assert len(part["train_shards"]) == 2
    # from another directory: the recorded relative name is read from the directory it was given in, so the input
    # named from there continues; the same relative name for another file there is refused by its documents
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    part = prepare(LocalSource(["../d.jsonl"]), tmp_path / "out", small_tok, stop_after_shards=1, **kw)
    assert len(part["train_shards"]) == 3
    write_jsonl(tmp_path / "sub" / "d.jsonl", docs[40:80])
    with pytest.raises(ValueError, match="the first 4 documents of the input are not those the interrupted"):
        prepare(LocalSource(["d.jsonl"]), tmp_path / "out", small_tok, **kw)
    monkeypatch.chdir(tmp_path)
    meta = prepare(LocalSource([str(tmp_path / "d.jsonl")]), tmp_path / "out", small_tok, **kw)
    ref = prepare(LocalSource(["d.jsonl"]), tmp_path / "ref", small_tok, **kw)
    got, want = read_dir(tmp_path / "out"), read_dir(tmp_path / "ref")
    assert {n: b for n, b in got.items() if n != "meta.json"} == {n: b for n, b in want.items() if n != "meta.json"}
    assert meta["source"]["paths"] == [str(tmp_path / "d.jsonl")]  # (the name the finishing run was given)
    assert {**meta, "source": None} == {**ref, "source": None} and meta["train"]["num_docs"] == 36
    for bad in (0, -1):
        with pytest.raises(ValueError, match=f"stop_after_shards must be >= 1 or None \\(no stop\\), got {bad}"):
            prepare(LocalSource(["d.jsonl"]), tmp_path / "z", small_tok, stop_after_shards=bad, **kw)
    # a worker count no machine needs (a typo's 100000 started processes by the thousand) or below 0 is refused
    most = P.MAX_WORKERS_PER_CPU * (os.cpu_count() or 1)
    for bad in (-2, most + 1, 100_000):
        with pytest.raises(ValueError, match=rf"num_workers \(--workers\) must be in \[0, {most}\] .*got {bad}$"):
            prepare(LocalSource(["d.jsonl"]), tmp_path / "z", small_tok, **{**kw, "num_workers": bad})
    assert not (tmp_path / "z").exists()


def test_a_preparation_that_fails_before_writing_anything_leaves_the_folder_as_it_was(tmp_path, small_tok, docs):
    """A preparation that fails before its first shard (here a first record that is not JSON; an unreachable Hub
    dataset fails the same way) removes the progress.json it had just recorded (the folder and its lock file
    stay): the next preparation into that folder, of another input, is not refused as "a different preparation".
    One that had progress keeps it when its continuation fails."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"\n')
    kw = {"shard_tokens": 50, "val_docs": 4, "num_workers": 1, "progress": False}
    with pytest.raises(ValueError, match="bad.jsonl"):
        prepare(LocalSource([str(bad)]), tmp_path / "new", small_tok, **kw)
    assert [p.name for p in (tmp_path / "new").iterdir()] == [".prepare.lock"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("kept")
    with pytest.raises(ValueError, match="bad.jsonl"):
        prepare(LocalSource([str(bad)]), mine, small_tok, **kw)
    assert sorted(p.name for p in mine.iterdir()) == [".prepare.lock", "notes.txt"]
    good = write_jsonl(tmp_path / "d.jsonl", docs[:40])
    assert prepare(LocalSource([str(good)]), mine, small_tok, **kw)["train"]["num_docs"] == 36
    kept = tmp_path / "kept"
    part = prepare(LocalSource([str(good)]), kept, small_tok, stop_after_shards=1, **kw)
    assert len(part["train_shards"]) == 1
    from llamathink.data import preparation

    real_write, writes = preparation._atomic_write_json, []

    def failing_second_write(path, obj):  # the fresh record, then the first shard's record fails (a full disk)
        writes.append(path)
        if len(writes) == 2:
            raise OSError(28, "No space left on device")
        return real_write(path, obj)

    preparation._atomic_write_json = failing_second_write
    try:
        with pytest.raises(OSError):
            prepare(LocalSource([str(good)]), tmp_path / "full", small_tok, **kw)
    finally:
        preparation._atomic_write_json = real_write
    assert (tmp_path / "full" / "progress.json").exists()  # a shard on disk keeps the record: a rerun continues
    assert prepare(LocalSource([str(good)]), tmp_path / "full", small_tok, **kw)["train"]["num_docs"] == 36
    write_jsonl(good, docs[40:80])  # the input changed under the stopped preparation: its continuation fails
    with pytest.raises(ValueError):
        prepare(LocalSource([str(good)]), kept, small_tok, **kw)
    assert len(json.loads((kept / "progress.json").read_text())["train_shards"]) == 1


def test_prepare_restart_after_crash(tmp_path, small_tok, docs, monkeypatch):
    src = LocalSource([str(write_jsonl(tmp_path / "d.jsonl", docs[:60]))])
    kw = dict(shard_tokens=700, val_docs=5, num_workers=2, batch_docs=4, progress=False)
    prepare(src, tmp_path / "ref", small_tok, **kw)

    real_write = P.write_shard
    calls = {"n": 0}

    def flaky(path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:  # val shard + 2 train shards succeed, then "crash" mid-write
            Path(path).write_bytes(b"partial garbage")
            raise KeyboardInterrupt("simulated crash")
        return real_write(path, *a, **k)

    monkeypatch.setattr(P, "write_shard", flaky)
    with pytest.raises(KeyboardInterrupt):
        prepare(src, tmp_path / "out", small_tok, **kw)
    monkeypatch.setattr(P, "write_shard", real_write)
    (tmp_path / "out" / "train_000003.bin.tmp.12345").write_bytes(b"left by a killed process")
    progress = json.loads((tmp_path / "out" / "progress.json").read_text())
    assert len(progress["train_shards"]) == 2 and not progress["complete"]
    prepare(src, tmp_path / "out", small_tok, **kw)
    assert read_dir(tmp_path / "out") == read_dir(tmp_path / "ref")


def test_prepare_errors(tmp_path, small_tok, docs):
    src = LocalSource([str(write_jsonl(tmp_path / "d.jsonl", docs[:10]))])
    prepare(src, tmp_path / "out", small_tok, shard_tokens=500, val_docs=2, num_workers=1, progress=False)
    with pytest.raises(ValueError, match="different preparation.*shard_tokens"):
        prepare(src, tmp_path / "out", small_tok, shard_tokens=600, val_docs=2, num_workers=1, progress=False)
    meta = prepare(
        src, tmp_path / "out", small_tok, shard_tokens=600, val_docs=2, num_workers=1, progress=False, overwrite=True
    )
    assert meta["shard_tokens"] == 600
    with pytest.raises(ValueError, match="all of them went to the validation split.*add --overwrite"):
        prepare(src, tmp_path / "v", small_tok, val_docs=50, num_workers=1, progress=False)
    with pytest.raises(ValueError, match="different preparation"):  # the corrected rerun: as the error says,
        prepare(src, tmp_path / "v", small_tok, val_docs=2, num_workers=1, progress=False)
    assert prepare(src, tmp_path / "v", small_tok, val_docs=2, num_workers=1, progress=False, overwrite=True)
    (tmp_path / "stale").mkdir()
    write_shard(tmp_path / "stale" / "train_000000.bin", [1, 2], 10)
    with pytest.raises(ValueError, match="already contains shards"):
        prepare(src, tmp_path / "stale", small_tok, num_workers=1, progress=False)

    class NoBos:
        bos_token_id = None
        eos_token_id = 2
        name_or_path = "nobos"

        def __len__(self):
            return 100

    with pytest.raises(ValueError, match="needs both a BOS and an EOS"):
        prepare(src, tmp_path / "nb", NoBos(), num_workers=1, progress=False)


def test_a_second_preparation_of_a_folder_being_written_is_refused_at_once(tmp_path, small_tok, docs):
    """Two preparations writing one folder (the second with --overwrite deleted the first's shards under it, and both
    reported success over a folder that training then refused): the second is refused at once, naming the holder;
    once the first has ended the folder is free. The lock file is no part of the data: a run's fingerprint of the
    folder is the same with it, whatever pid it holds (a rerun on a finished folder takes the lock too)."""
    from llamathink.data.preparation import LOCK_FILE, _preparation_lock
    from llamathink.train.checkpoint import _fingerprint

    src = LocalSource([str(write_jsonl(tmp_path / "d.jsonl", docs[:10]))])
    out = tmp_path / "out"
    prepare(src, out, small_tok, val_docs=2, num_workers=1, progress=False)
    print_before = _fingerprint(out)
    held = rf"{out} is being written by another preparation \(pid {os.getpid()}\)"
    with _preparation_lock(out), pytest.raises(ValueError, match=held):  # another preparation at work
        prepare(src, out, small_tok, val_docs=2, num_workers=1, progress=False, overwrite=True)
    assert len(list(out.glob("train_*.bin"))) >= 1  # nothing deleted
    # the lock held by a process that outlived the preparation that wrote its pid (it started it): said so
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    with _preparation_lock(out) as fd:
        os.ftruncate(fd, 0)
        os.pwrite(fd, gone.stdout.strip().encode(), 0)
        with pytest.raises(ValueError, match=rf"\(pid {gone.stdout.strip()}, no longer running: a process it star"):
            prepare(src, out, small_tok, val_docs=2, num_workers=1, progress=False)
    (out / LOCK_FILE).write_text("12345")
    assert _fingerprint(out) == print_before
    assert prepare(src, out, small_tok, val_docs=2, num_workers=1, progress=False)["val"]["num_docs"] == 2
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="afile is a file, not a folder"):
        prepare(src, tmp_path / "afile", small_tok, num_workers=1, progress=False)


def _children(pid: int) -> list[int]:
    """The pids of the live processes whose parent is `pid` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc (Linux)")
def test_a_killed_preparation_leaves_no_workers_and_its_rerun_continues(tmp_path):
    """A preparation killed (the OOM killer, a job's time limit) left its forked tokenizer workers waiting on their
    task queue for ever, holding the folder's lock: the rerun that the README promises continues was refused,
    naming the dead process. Its workers now close their copy of the lock and exit with it, and the rerun writes
    what an uninterrupted preparation writes."""
    import time

    texts = [" ".join(f"w{(i * 7 + j) % 997}" for j in range(60)) for i in range(1_500)]
    src = write_jsonl(tmp_path / "d.jsonl", texts)
    cmd = [sys.executable, "-m", "llamathink.data", "prepare", "--input", str(src), "--tokenizer", "builtin"]
    cmd += ["--shard-tokens", "4000", "--val-docs", "10", "--workers", "2", "--batch-docs", "8", "--no-progress"]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    run = subprocess.Popen([*cmd, "--out", str(tmp_path / "out")], env=env, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "out").glob("train_000002.bin")) and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = _children(run.pid)
    run.kill()  # (SIGKILL; SIGTERM ends a Python process without its cleanup as well)
    run.wait(timeout=60)
    assert not (tmp_path / "out" / "meta.json").exists() and len(workers) == 2, "killed too late, or no workers"
    deadline = time.monotonic() + 20
    while any(_running(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    outlived = [pid for pid in workers if _running(pid)]
    for pid in outlived:  # (not left behind by a failing test)
        os.kill(pid, signal.SIGKILL)
    assert not outlived, "the workers outlived their preparation"
    rerun = subprocess.run([*cmd, "--out", str(tmp_path / "out")], env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    uninterrupted = subprocess.run([*cmd, "--out", str(tmp_path / "whole")], env=env, capture_output=True, text=True)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-2000:]
    from llamathink.data.preparation import LOCK_FILE  # (it holds the pid of the run that last took it)

    written, whole = read_dir(tmp_path / "out"), read_dir(tmp_path / "whole")
    assert written.pop(LOCK_FILE) != whole.pop(LOCK_FILE) and written == whole


def test_a_rerun_of_a_finished_preparation_names_an_input_changed_since(tmp_path, small_tok, docs, monkeypatch):
    """A finished preparation rerun after its input changed (a file edited, grown, added to its folder or gone)
    reported the old shards as written from the new input: refused, naming the file and --overwrite, which
    prepares the new input. An unchanged rerun still returns the result without reading the input."""
    folder = tmp_path / "in"
    folder.mkdir()
    first = write_jsonl(folder / "a.jsonl", docs[:6])
    kw = dict(val_docs=1, num_workers=1, progress=False)
    out = tmp_path / "out"
    meta = prepare(LocalSource([str(folder)]), out, small_tok, **kw)
    assert prepare(LocalSource([str(folder)]), out, small_tok, **kw) == meta
    changes = (
        (lambda: write_jsonl(folder / "b.jsonl", docs[6:8]), r"b\.jsonl: a file it did not read"),
        (lambda: (folder / "b.jsonl").unlink(), r"b\.jsonl: gone since"),
        (
            lambda: first.write_text(first.read_text() + json.dumps({"text": "more"}) + "\n"),
            r"a\.jsonl: [\d,]+ bytes now",
        ),
    )
    for change, named in changes:
        change()
        with pytest.raises(
            ValueError, match=rf"{out} was prepared from input that has changed \(.*{named}.*--overwrite"
        ):
            prepare(LocalSource([str(folder)]), out, small_tok, **kw)
        meta = prepare(LocalSource([str(folder)]), out, small_tok, overwrite=True, **kw)
    assert meta["num_docs"] == 7  # (the six documents and the one added)
    # only the modification time changed (a touch, a copy): the documents are read again, untokenized, and the
    # same ones pass (and are recorded: the next rerun compares the new time); the same size with other text not
    os.utime(first, ns=(0, 0))
    assert prepare(LocalSource([str(folder)]), out, small_tok, **kw) == meta
    assert json.loads((out / "progress.json").read_text())["input_files"][str(first.resolve())][1] == 0
    first.write_text(first.read_text().replace("a", "b", 1))
    with pytest.raises(ValueError, match=r"a\.jsonl: modified since, with other documents \(the same size\)"):
        prepare(LocalSource([str(folder)]), out, small_tok, **kw)
    # the input named by the same relative name from a copy of the project (files of the same sizes under other
    # names): the same documents pass, others are refused naming the file no longer read ("gone", it said)
    project = tmp_path / "project"
    project.mkdir()
    write_jsonl(project / "x.jsonl", docs[:5])
    monkeypatch.chdir(project)
    copied = prepare(LocalSource(["x.jsonl"]), tmp_path / "copied", small_tok, **kw)
    shutil.copytree(project, tmp_path / "copy")
    monkeypatch.chdir(tmp_path / "copy")
    assert prepare(LocalSource(["x.jsonl"]), tmp_path / "copied", small_tok, **kw) == copied
    (project / "x.jsonl").write_text((project / "x.jsonl").read_text().replace("a", "b", 1))
    monkeypatch.chdir(project)  # (the record now names the copy's file, which is still there)
    with pytest.raises(ValueError, match=r"copy/x\.jsonl: no longer among the inputs"):
        prepare(LocalSource(["x.jsonl"]), tmp_path / "copied", small_tok, **kw)
    # a record of the input files edited by hand into another form is named, not a formatting error
    progress = tmp_path / "copied" / "progress.json"
    state = json.loads(progress.read_text())
    for bad in ({"x.jsonl": ["1110", 5]}, {"x.jsonl": [1]}, {"x.jsonl": None}):
        progress.write_text(json.dumps({**state, "input_files": bad}))
        with pytest.raises(ValueError, match=r"progress.json: its record of the input files \(input_files\) is not"):
            prepare(LocalSource(["x.jsonl"]), tmp_path / "copied", small_tok, **kw)
    # local files read through datasets (--hf-dataset json --hf-data-files FILE) are compared too
    hf = HFSource("json", split="train", streaming=True, data_files=str(first))
    prepare(hf, tmp_path / "hf", small_tok, **kw)
    first.write_text(first.read_text() + json.dumps({"text": "one more"}) + "\n")
    with pytest.raises(ValueError, match=r"has changed \(.*a\.jsonl: [\d,]+ bytes now"):
        prepare(hf, tmp_path / "hf", small_tok, **kw)


def poke_last_token(path: Path, token: int) -> None:
    """Overwrite a shard's last token in place (write_shard refuses ids outside the vocabulary)."""
    raw = bytearray(path.read_bytes())
    raw[-2:] = np.uint16(token).tobytes()
    path.write_bytes(bytes(raw))


def test_cli_prepare_and_inspect(tmp_path, capsys):
    src = write_jsonl(tmp_path / "d.jsonl", list(iter_sample_texts(include_conversations=False))[:40])
    argv = [
        "prepare",
        "--input",
        str(src),
        "--tokenizer",
        "builtin",
        "--out",
        str(tmp_path / "out"),
        "--shard-tokens",
        "2000",
        "--val-docs",
        "4",
        "--workers",
        "1",
        "--no-progress",
    ]
    assert main(argv + ["--stop-after-shards", "1"]) == 0
    assert "rerun the same command" in capsys.readouterr().out
    assert main(argv) == 0
    assert "train shards" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "out")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["meta"]["tokenizer"] == "builtin"
    assert summary["shards"]["train_000000.bin"]["num_tokens"] == 2000
    assert main(["inspect", str(tmp_path / "out" / "meta.json")]) == 0  # the folder's meta.json stands for it
    assert json.loads(capsys.readouterr().out) == summary
    # the shards are checked against meta.json: a listed shard gone, another vocabulary, an id outside it
    out, vocab = tmp_path / "out", summary["meta"]["vocab_size"]
    header = summary["shards"]["train_000000.bin"]
    tokens = np.array(D.open_shard(out / "train_000000.bin"))
    val = (out / "val_000000.bin").read_bytes()
    for breakage, message in (
        (lambda: (out / "val_000000.bin").unlink(), r"val_000000.bin: listed in meta.json \(val\) but missing"),
        (lambda: write_shard(out / "train_000000.bin", tokens, vocab + 1), f"vocabulary {vocab + 1}, meta.json says"),
        (lambda: poke_last_token(out / "train_000000.bin", vocab), f"token id {vocab} is outside"),
    ):
        breakage()
        with pytest.raises(SystemExit) as stop:
            main(["inspect", str(out)])
        assert stop.value.code == 2 and re.search(message, capsys.readouterr().err)
        (out / "val_000000.bin").write_bytes(val)
        write_shard(out / "train_000000.bin", tokens, vocab, bos_id=header["bos_id"], eos_id=header["eos_id"])
    assert main(["inspect", str(out)]) == 0
    # one shard alone is checked against its own header's vocabulary (it passed with any id)
    poke_last_token(out / "train_000000.bin", vocab)
    with pytest.raises(SystemExit) as stop:
        main(["inspect", str(out / "train_000000.bin")])
    assert stop.value.code == 2 and f"token id {vocab} is outside the vocabulary of {vocab}" in capsys.readouterr().err
    write_shard(out / "train_000000.bin", tokens, vocab, bos_id=header["bos_id"], eos_id=header["eos_id"])
    assert main(["inspect", str(out / "train_000000.bin")]) == 0
    capsys.readouterr()
    assert (
        main(
            [
                "prepare",
                "--sample",
                "--tokenizer",
                "builtin",
                "--out",
                str(tmp_path / "s"),
                "--shard-tokens",
                "100000",
                "--val-docs",
                "8",
                "--workers",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    meta = load_meta(tmp_path / "s")
    assert meta["train"]["num_tokens"] > 50_000  # the sample corpus is big enough for a demo run
    with pytest.raises(SystemExit, match="--text-field and --txt-split do not apply"):
        main(["prepare", "--sample", "--text-field", "body", "--tokenizer", "builtin", "--out", str(tmp_path / "t")])
    assert not (tmp_path / "t").exists()


def test_prepare_script_takes_the_options_without_the_subcommand(tmp_path, capsys):
    """The ``llamathink-prepare`` console script (``llamathink.data.preparation:main``) takes the options of
    ``python -m llamathink.data prepare`` without the subcommand and writes the same folder; each parser names the
    way it was invoked."""
    from importlib.metadata import EntryPoint

    script = EntryPoint("llamathink-prepare", "llamathink.data.preparation:main", "console_scripts").load()
    assert script is P.main
    src = write_jsonl(tmp_path / "d.jsonl", list(iter_sample_texts(include_conversations=False))[:40])
    opts = [
        "--input",
        str(src),
        "--tokenizer",
        "builtin",
        "--shard-tokens",
        "2000",
        "--val-docs",
        "4",
        "--workers",
        "1",
        "--no-progress",
    ]
    assert script([*opts, "--out", str(tmp_path / "a")]) == 0
    assert "train shards" in capsys.readouterr().out
    assert main(["prepare", *opts, "--out", str(tmp_path / "b")]) == 0
    assert "train shards" in capsys.readouterr().out
    assert read_dir(tmp_path / "a") == read_dir(tmp_path / "b")
    for call, usage in (
        (lambda: script(["--help"]), "usage: llamathink-prepare "),
        (lambda: main(["prepare", "--help"]), "usage: python -m llamathink.data prepare "),
        (lambda: main(["--help"]), "usage: python -m llamathink.data "),
    ):
        with pytest.raises(SystemExit) as exc:
            call()
        assert exc.value.code == 0 and capsys.readouterr().out.startswith(usage)
    with pytest.raises(SystemExit) as exc:  # the subcommand form is the module's, not the script's
        script(["prepare", *opts, "--out", str(tmp_path / "c")])
    assert exc.value.code == 2
    assert "llamathink-prepare: error: unrecognized arguments: prepare" in capsys.readouterr().err


# ---------------------------------------------------------------- reader


def make_shards(d, sizes, vocab=60000):
    """Shards whose concatenation is 0, 1, 2, ... so a window identifies itself."""
    d.mkdir(parents=True, exist_ok=True)
    start = 0
    for i, n in enumerate(sizes):
        write_shard(d / f"train_{i:06d}.bin", np.arange(start, start + n), vocab)
        start += n
    return start


def window_ids(x, seq_len):
    assert (x[:, 0] % seq_len == 0).all()
    return (x[:, 0] // seq_len).tolist()


def test_dataset_windows_span_shards(tmp_path):
    total = make_shards(tmp_path, [10, 7, 30, 3])
    ds = ShardedTokenDataset(tmp_path, 8)
    assert ds.total_tokens == total == 50 and len(ds) == 6
    for i in range(len(ds)):
        assert ds[i].tolist() == list(range(8 * i, 8 * i + 8))
    assert ds.windows([5, 1]).tolist() == [list(range(40, 48)), list(range(8, 16))]
    with pytest.raises(IndexError):
        ds[6]
    with pytest.raises(ValueError, match="seq_len 51 is longer than the data.*50 tokens"):
        ShardedTokenDataset(tmp_path, 51)
    with pytest.raises(ValueError, match="60000.*model vocab_size 32000"):
        ShardedTokenDataset(tmp_path, 8, model_vocab_size=32000)


def test_loader_batches_epochs_and_determinism(tmp_path):
    make_shards(tmp_path, [1000, 24, 1000])  # 2024 tokens -> 126 windows of 16
    L = TokenBatchLoader(tmp_path, seq_len=16, batch_size=6, seed=3)
    assert len(L) == 21  # 126 windows // 6
    x, y = next(L)
    assert x.shape == y.shape == (6, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x, y) and x.data_ptr() != y.data_ptr()
    assert (x[:, 1:] - x[:, :-1] == 1).all()  # contiguous windows
    seen = window_ids(x, 16)
    for _ in range(20):
        seen += window_ids(next(L)[0], 16)
    assert sorted(seen) == list(range(126))  # one epoch: every window exactly once
    epoch1 = []
    for _ in range(21):
        epoch1 += window_ids(next(L)[0], 16)
    assert sorted(epoch1) == list(range(126)) and epoch1 != seen and L.epoch == 1
    again = TokenBatchLoader(tmp_path, seq_len=16, batch_size=6, seed=3)
    assert [window_ids(next(again)[0], 16) for _ in range(21)] == [seen[i : i + 6] for i in range(0, 126, 6)]
    other = TokenBatchLoader(tmp_path, seq_len=16, batch_size=6, seed=4)
    assert window_ids(next(other)[0], 16) != seen[:6]


def test_loader_resume_exact(tmp_path):
    make_shards(tmp_path, [700, 300])
    ref = TokenBatchLoader(tmp_path, 10, 4, seed=11)  # 100 windows -> 25 batches per epoch
    stream = [next(ref)[0] for _ in range(60)]  # crosses two epoch boundaries
    for k in (0, 1, 24, 25, 26, 49):
        a = TokenBatchLoader(tmp_path, 10, 4, seed=11)
        for _ in range(k):
            next(a)
        state = json.loads(json.dumps(a.state_dict()))  # must survive JSON (checkpoint files)
        b = TokenBatchLoader(tmp_path, 10, 4, seed=11)
        b.load_state_dict(state)
        for j in range(k, min(k + 12, 60)):
            assert torch.equal(next(b)[0], stream[j]), (k, j)
    bad = TokenBatchLoader(tmp_path, 10, 4, seed=12)
    with pytest.raises(ValueError, match="seed=11"):
        bad.load_state_dict(ref.state_dict())


def test_loader_rank_split(tmp_path):
    make_shards(tmp_path, [960])  # 120 windows of 8; 2 ranks x batch 5 -> 12 batches per rank
    r0 = TokenBatchLoader(tmp_path, 8, 5, rank=0, world_size=2, seed=5)
    r1 = TokenBatchLoader(tmp_path, 8, 5, rank=1, world_size=2, seed=5)
    assert len(r0) == len(r1) == 12
    w0 = [w for _ in range(12) for w in window_ids(next(r0)[0], 8)]
    w1 = [w for _ in range(12) for w in window_ids(next(r1)[0], 8)]
    assert not set(w0) & set(w1)
    assert sorted(w0 + w1) == list(range(120))
    # Rank r takes every world_size-th batch of the single-process order.
    single = TokenBatchLoader(tmp_path, 8, 5, seed=5)
    perm = single.permutation(0)
    assert w0[:5] == perm[0:5].tolist() and w1[:5] == perm[5:10].tolist() and w0[5:10] == perm[10:15].tolist()
    # Resuming with another world size continues at the same global batch.
    state = r0.state_dict()  # 12 batches x 2 ranks = all 24 global batches of epoch 0
    with pytest.warns(UserWarning, match="world_size"):
        single.load_state_dict(state)
    assert single.state_dict()["position"] == 24 and single.epoch == 0
    with pytest.raises(ValueError, match="rank"):
        TokenBatchLoader(tmp_path, 8, 5, rank=2, world_size=2)
    with pytest.raises(ValueError, match="cannot fill one optimizer step of 61 x 1"):
        TokenBatchLoader(tmp_path, 8, 61, world_size=2)


def test_a_step_keeps_its_windows_when_its_global_batch_is_split_otherwise_across_epochs(tmp_path):
    """An epoch holds whole optimizer steps (micro batch x processes x accumulation windows), so a resume that splits
    the same global batch otherwise (6 x 1 -> 3 x 2, 1 process -> 2) gives every later step the windows the
    uninterrupted run had, after the epoch's end too (83 windows: steps of 6 used to end an epoch after 78 windows
    with micro batches of 6, after 81 with micro batches of 3)."""
    write_shard(tmp_path / "train_000000.bin", np.arange(83 * 8 + 1), 1000)

    def steps(loaders, accum, count):  # the sorted windows of each optimizer step, over all ranks
        return [
            sorted(w for _ in range(accum) for loader in loaders for w in window_ids(next(loader)[0], 8))
            for _ in range(count)
        ]

    whole = TokenBatchLoader(tmp_path, 8, 6, seed=1)
    reference = steps([whole], 1, 40)  # 13 steps per epoch: three epochs
    for batch, world, accum in ((3, 1, 2), (1, 2, 3), (2, 3, 1)):
        first = TokenBatchLoader(tmp_path, 8, 6, seed=1)
        assert steps([first], 1, 5) == reference[:5]
        state = first.state_dict()
        split = [
            TokenBatchLoader(tmp_path, 8, batch, rank=r, world_size=world, seed=1, grad_accum=accum)
            for r in range(world)
        ]
        for loader in split:
            if batch * world == 6:  # the same windows per round: nothing to say
                loader.load_state_dict(state)
                continue
            with pytest.warns(UserWarning, match="each optimizer step still gets the windows"):
                loader.load_state_dict(state)
        assert steps(split, accum, 35) == reference[5:], (batch, world, accum)
    # a checkpoint of the version whose epochs were whole rounds of micro batches (no grad_accum saved), resumed with
    # accumulation: where the epochs now end elsewhere, a warning says from which epoch the windows differ
    old_state = {k: v for k, v in TokenBatchLoader(tmp_path, 8, 3, seed=1).state_dict().items() if k != "grad_accum"}
    with pytest.warns(UserWarning, match=r"epochs held 81 windows; they now hold 72 .*from epoch 1 on"):
        TokenBatchLoader(tmp_path, 8, 3, seed=1, grad_accum=4).load_state_dict(old_state)


def test_val_batches(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    write_shard(d / "val_000000.bin", np.arange(100), 1000)
    a = list(val_batches(d, 8, 5))
    b = list(val_batches(d, 8, 5))
    assert len(a) == 3 and [x.shape[0] for x, _ in a] == [5, 5, 2]
    assert all(torch.equal(x, x2) and torch.equal(x, y) for (x, y), (x2, _) in zip(a, b, strict=True))
    assert [w for x, _ in a for w in window_ids(x, 8)] == list(range(12))
    r1 = list(val_batches(d, 8, 5, rank=1, world_size=2))
    assert len(r1) == 1 and torch.equal(r1[0][0], a[1][0])
    assert len(list(val_batches(d, 8, 2, max_batches=2))) == 2
    assert len(list(val_batches([d / "val_000000.bin"], 8, 5))) == 3
    with pytest.raises(FileNotFoundError, match="no val_"):
        list(val_batches(tmp_path, 8, 5))


def test_end_to_end_with_prepared_sample(tmp_path, small_tok):
    prepare(
        LocalSource([str(REPO / "llamathink" / "sample_data" / "prose.jsonl")]),
        tmp_path / "s",
        small_tok,
        shard_tokens=30000,
        val_docs=8,
        num_workers=1,
        progress=False,
    )
    L = TokenBatchLoader(tmp_path / "s", seq_len=128, batch_size=8, seed=0, model_vocab_size=1024)
    x, y = next(L)
    assert x.shape == (8, 128) and int(x.max()) < 1024
    text = small_tok.decode(x[0].tolist())
    assert len(text) > 200
    v = list(val_batches(tmp_path / "s", 128, 8))
    assert v and v[0][0].shape[1] == 128
    with pytest.raises(ValueError, match="1024.*model vocab_size 512"):
        TokenBatchLoader(tmp_path / "s", 128, 8, model_vocab_size=512)


# ---------------------------------------------------------------- bad records

GOOD = ["First good document.", "Second good document,\nwith two lines.", "Third good one."]
FILLER = [f"filler {i} " * 40 for i in range(300)]


def _jsonl_bytes(texts):
    return b"".join(json.dumps({"text": t}).encode() + b"\n" for t in texts)


def _bad_input(tmp_path, case):
    """(input spec, where the error must point, kind) for one kind of bad record; the input also holds GOOD."""
    good = _jsonl_bytes(GOOD[:2])  # lines 1-2
    tail = _jsonl_bytes(GOOD[2:])
    p = tmp_path / "in.jsonl"
    if case == "invalid_utf8":
        p.write_bytes(good + b'{"text": "caf\xe9 au lait"}\n' + tail)
        return p, "in.jsonl:3", r"invalid UTF-8: byte\(s\) e9"
    if case == "lone_surrogate":
        p.write_bytes(good + b'{"text": "broken \\ud800 pair"}\n' + tail)
        return p, r"in\.jsonl:3", r"lone surrogate U\+D800"
    if case == "invalid_json":
        p.write_bytes(good + b'{"text": "no end\n' + tail)
        return p, "in.jsonl:3", "invalid JSON"
    if case == "long_number_json":  # valid JSON that Python refuses: a number past its 4300-digit limit
        p.write_bytes(good + b'{"text": "x", "id": ' + b"7" * 5000 + b"}\n" + tail)
        return p, "in.jsonl:3", r"invalid JSON \(Exceeds the limit \(4300 digits\)"
    if case == "deep_json":  # and nesting past its recursion limit
        p.write_bytes(good + b'{"text": "x", "meta": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n" + tail)
        return p, "in.jsonl:3", "invalid JSON .*recursion depth"
    if case == "missing_field":
        p.write_bytes(good + b"\n" + b'{"body": "x"}\n' + tail)  # a blank line 3 still counts as a line
        return p, "in.jsonl:4", "no field 'text'"
    if case == "not_a_string":
        p.write_bytes(good + b'{"text": null}\n' + tail)
        return p, "in.jsonl:3", "field 'text' is NoneType, not a string"
    if case == "nul_only":
        p.write_bytes(good + b'{"text": "\\u0000\\u0000 \\u0000"}\n' + tail)
        return p, "in.jsonl:3", "only NUL characters"
    if case == "nul_only_txt":
        d = tmp_path / "txt"
        d.mkdir()
        for i, t in enumerate(GOOD):
            (d / f"{2 * i}.txt").write_text(t)
        (d / "1.txt").write_bytes(b"\0" * 100 + b"\n\0\0")
        return d, "1.txt", "only NUL characters"
    if case == "invalid_utf8_txt":
        d = tmp_path / "txt"
        d.mkdir()
        for i, t in enumerate(GOOD):
            (d / f"{2 * i}.txt").write_text(t)
        # An invalid byte on line 3, column 5, after a 2-byte character that the small read chunks cut in half.
        (d / "1.txt").write_bytes(b"one\ntw\xc3\xa9 x\nthre\xff four\n")  # 7-byte chunks cut the \xc3\xa9
        return d, "1.txt:3", r"byte\(s\) ff at column 5"
    if case == "corrupt_gzip":
        g = gzip.compress(good + _jsonl_bytes(FILLER))
        (tmp_path / "a.jsonl.gz").write_bytes(g[: len(g) // 2])  # truncated mid-stream
        (tmp_path / "b.jsonl").write_bytes(tail)
        return tmp_path / "*.jsonl*", r"a\.jsonl\.gz:\d+", "corrupt or truncated gzip data after line"
    if case == "not_gzip":
        (tmp_path / "a.jsonl").write_bytes(good)
        (tmp_path / "b.jsonl.gz").write_bytes(b"plain text, not gzip\n")
        (tmp_path / "c.jsonl").write_bytes(tail)
        return tmp_path / "*.jsonl*", r"b\.jsonl\.gz:1", "Not a gzipped file"
    if case == "corrupt_parquet":
        (tmp_path / "a.jsonl").write_bytes(good)
        (tmp_path / "b.parquet").write_bytes(b"PAR1 this is not parquet")
        (tmp_path / "c.jsonl").write_bytes(tail)
        return tmp_path / "*", r"b\.parquet row 0", "corrupt parquet data"
    if case == "unreadable_dir":
        (tmp_path / "a.jsonl").write_bytes(good)
        (tmp_path / "b.jsonl").mkdir()  # a directory where a glob expects a file
        (tmp_path / "c.jsonl").write_bytes(tail)
        return tmp_path / "*.jsonl", r"b\.jsonl", r"cannot read file \(Is a directory\)"
    if case == "unreadable_link":
        (tmp_path / "a.jsonl").write_bytes(good)
        os.symlink(tmp_path / "gone.jsonl", tmp_path / "b.jsonl")
        (tmp_path / "c.jsonl").write_bytes(tail)
        return tmp_path, r"b\.jsonl", r"cannot read file \(No such file"
    raise AssertionError(case)


BAD_CASES = {
    "invalid_utf8": "invalid_utf8",
    "lone_surrogate": "lone_surrogate",
    "invalid_json": "invalid_json",
    "long_number_json": "invalid_json",
    "deep_json": "invalid_json",
    "missing_field": "missing_field",
    "not_a_string": "not_a_string",
    "nul_only": "nul_only",
    "nul_only_txt": "nul_only",
    "invalid_utf8_txt": "invalid_utf8",
    "corrupt_gzip": "corrupt_file",
    "not_gzip": "corrupt_file",
    "corrupt_parquet": "corrupt_file",
    "unreadable_dir": "unreadable_file",
    "unreadable_link": "unreadable_file",
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_record_named_or_skipped(tmp_path, small_tok, case, monkeypatch):
    """Every kind of bad record stops prepare with a ValueError naming file and line (or row) and the kind;
    skip_bad_records=True skips exactly that record, counts it in meta.json and keeps every good document."""
    monkeypatch.setattr(P, "_READ_CHUNK_BYTES", 7)  # .txt files: line counting across read chunks
    (tmp_path / "src").mkdir()
    spec, where, problem = _bad_input(tmp_path / "src", case)
    kind = BAD_CASES[case]
    kw = dict(shard_tokens=10_000, val_docs=0, num_workers=1, progress=False)
    with pytest.raises(ValueError, match=rf"{where}: .*{problem}.*\[bad record: {kind}\].*--skip-bad-records"):
        prepare(LocalSource([str(spec)]), tmp_path / "out", small_tok, **kw)
    meta = prepare(LocalSource([str(spec)]), tmp_path / "out", small_tok, skip_bad_records=True, **kw)
    assert meta["skip_bad_records"] is True
    assert meta["bad_records"]["skipped"] == 1 and meta["bad_records"]["by_kind"] == {kind: 1}
    assert re.search(where, meta["bad_records"]["examples"][0])
    assert load_meta(tmp_path / "out")["bad_records"] == meta["bad_records"]
    toks = all_train_tokens(tmp_path / "out").tolist()
    kept = GOOD
    if case == "corrupt_gzip":  # the records before the damage were read; the rest of that file is lost
        n_filler = meta["train"]["num_docs"] - 3
        assert 0 < n_filler < len(FILLER)
        kept = GOOD[:2] + FILLER[:n_filler] + GOOD[2:]
    expected = []
    for t in kept:
        expected += [1] + small_tok.encode(t, add_special_tokens=False) + [2]
    assert toks == expected and meta["train"]["num_docs"] == len(kept)


def test_bad_records_hf_and_iterable_rows(tmp_path, small_tok):
    """Datasets name the row; plain iterables the document number; counts add up by kind."""
    write_jsonl(tmp_path / "d.jsonl", ["good one", "good two"])
    with open(tmp_path / "d.jsonl", "a") as f:
        f.write('{"text": null}\n{"text": "three"}\n')
    hf = HFSource("json", split="train", streaming=True, data_files=str(tmp_path / "d.jsonl"))
    kw = dict(shard_tokens=1000, val_docs=0, num_workers=1, progress=False)
    with pytest.raises(ValueError, match=r"json row 2: field 'text' is NoneType"):
        prepare(hf, tmp_path / "hf", small_tok, **kw)
    texts = ["a doc", 5, "x\ud800y", "\0", "another doc", None]
    with pytest.raises(ValueError, match=r"document 1: document is int, not a string"):
        prepare(texts, tmp_path / "it", small_tok, **kw)
    meta = prepare(texts, tmp_path / "it", small_tok, skip_bad_records=True, **kw)
    assert meta["bad_records"]["by_kind"] == {"lone_surrogate": 1, "not_a_string": 2, "nul_only": 1}
    assert meta["bad_records"]["skipped"] == 4 and meta["train"]["num_docs"] == 2


def test_cli_bad_record_exits_with_message(tmp_path, capsys):
    src = tmp_path / "d.jsonl"
    src.write_bytes(_jsonl_bytes(GOOD[:2]) + b'{"text": "bad \xff"}\n' + _jsonl_bytes(GOOD[2:]))
    argv = [
        "prepare",
        "--input",
        str(src),
        "--tokenizer",
        "builtin",
        "--out",
        str(tmp_path / "out"),
        "--shard-tokens",
        "1000",
        "--val-docs",
        "0",
        "--workers",
        "1",
        "--no-progress",
    ]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert re.match(rf"prepare: error: {re.escape(str(src))}:3: invalid UTF-8.*--skip-bad-records", str(exc.value))
    assert main(argv + ["--skip-bad-records"]) == 0
    assert "skipped 1 bad record(s) (1 invalid_utf8)" in capsys.readouterr().err
    meta = load_meta(tmp_path / "out")
    assert meta["bad_records"]["by_kind"] == {"invalid_utf8": 1} and meta["train"]["num_docs"] == 3
    assert meta["max_doc_chars"] == D.DEFAULT_MAX_DOC_CHARS
    with pytest.raises(SystemExit, match="max_doc_chars must be an integer >= 2 or None, got -3"):
        main(argv + ["--max-doc-chars", "-3", "--out", str(tmp_path / "o2")])
    assert main(argv + ["--skip-bad-records", "--max-doc-chars", "0", "--out", str(tmp_path / "o3")]) == 0
    assert load_meta(tmp_path / "o3")["max_doc_chars"] is None


def test_stop_at_bad_record_keeps_shards_and_resumes(tmp_path, small_tok, docs):
    """A bad record late in the source stops the run after some shards; those shards and progress.json stay,
    and a rerun with skipping (or after fixing the file) finishes with output identical to a clean run: no shard
    lost or duplicated."""
    good = docs[:40]
    bad_line = b'{"text": "bad \\udc80 record"}\n'
    src = tmp_path / "d.jsonl"
    src.write_bytes(_jsonl_bytes(good[:30]) + bad_line + _jsonl_bytes(good[30:]))
    kw = dict(shard_tokens=300, val_docs=3, num_workers=1, batch_docs=2, progress=False)
    with pytest.raises(ValueError, match=r"d\.jsonl:31: .*lone surrogate U\+DC80"):
        prepare(LocalSource([str(src)]), tmp_path / "out", small_tok, **kw)
    progress = json.loads((tmp_path / "out" / "progress.json").read_text())
    written = sorted(p.name for p in (tmp_path / "out").glob("train_*.bin"))
    assert len(progress["train_shards"]) >= 5 and written == [s["file"] for s in progress["train_shards"]]
    before = read_dir(tmp_path / "out")
    prepare(LocalSource([str(src)]), tmp_path / "out", small_tok, skip_bad_records=True, **kw)
    after = read_dir(tmp_path / "out")
    assert all(after[name] == data for name, data in before.items() if name.endswith(".bin"))
    fixed = tmp_path / "fixed.jsonl"
    fixed.write_bytes(_jsonl_bytes(good))
    prepare(LocalSource([str(fixed)]), tmp_path / "ref", small_tok, **kw)
    ref = read_dir(tmp_path / "ref")
    shards = {n for n in ref if n.endswith(".bin")}
    assert {n for n in after if n.endswith(".bin")} == shards
    assert all(after[n] == ref[n] for n in shards)
    # Fixing the input instead of skipping also continues the stopped run exactly.
    src2 = tmp_path / "d2.jsonl"
    src2.write_bytes(_jsonl_bytes(good[:30]) + bad_line + _jsonl_bytes(good[30:]))
    with pytest.raises(ValueError):
        prepare(LocalSource([str(src2)]), tmp_path / "out2", small_tok, **kw)
    src2.write_bytes(_jsonl_bytes(good))
    prepare(LocalSource([str(src2)]), tmp_path / "out2", small_tok, **kw)
    assert all(read_dir(tmp_path / "out2")[n] == ref[n] for n in shards)


# ---------------------------------------------------------------- overlong documents


def _long_doc(docs, n):
    """One long document: n sample paragraphs separated by blank lines."""
    return "\n\n".join(docs[i % len(docs)] for i in range(n))


def test_splitter_cuts_at_boundaries(docs):
    text = _long_doc(docs, 30)
    pieces = list(P._document_pieces(text, "doc", D.BadRecords(), 500))
    assert "".join(p.text for p in pieces) == text
    assert all(0 < len(p.text) <= 500 for p in pieces) and len(pieces) > len(text) // 500
    assert [p.first for p in pieces] == [True] + [False] * (len(pieces) - 1)
    assert [p.last for p in pieces] == [False] * (len(pieces) - 1) + [True]
    ends = [len("".join(q.text for q in pieces[: k + 1])) for k in range(len(pieces) - 1)]
    assert [p.context for p in pieces[1:]] == [text[e - 1] for e in ends]
    # Cuts fall at a paragraph start where the window has one, else at a line start or before a space.
    for e in ends:
        assert text[e - 2 : e] == "\n\n" or text[e - 1] == "\n" or text[e] in " \t"
    assert sum(text[e - 2 : e] == "\n\n" for e in ends) >= len(ends) // 2
    # No whitespace at all: hard cuts of exactly max_chars.
    solid = "x" * 1234
    assert [len(p.text) for p in P._document_pieces(solid, "doc", D.BadRecords(), 500)] == [500, 500, 234]
    assert [p.text for p in P._document_pieces("short", "d", D.BadRecords(), 500)] == ["short"]
    assert list(P._document_pieces(" \n\t", "d", D.BadRecords(), 500)) == []  # whitespace-only: no document


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "paragraph"])
def test_long_documents_tokenize_like_whole(tmp_path, small_tok, docs, fmt):
    """Documents longer than max_doc_chars are tokenized piece by piece into ONE [BOS] ... [EOS] document whose
    tokens equal the whole document's (the cuts here fall at paragraph and line starts)."""
    long_docs = [_long_doc(docs[k:], 12 + 5 * k) for k in range(3)] + ["short doc"]
    if fmt == "jsonl":
        spec = write_jsonl(tmp_path / "d.jsonl", long_docs)
    elif fmt == "txt":
        spec = tmp_path / "txt"
        spec.mkdir()
        for i, t in enumerate(long_docs):
            (spec / f"{i}.txt").write_text(t, encoding="utf-8")
    else:  # paragraph mode: one very long paragraph (lines, no blank line) between ordinary ones
        para = "\n".join(d.replace("\n\n", "\n") for d in docs[:15])
        long_docs = ["Opening paragraph.", para, "Closing paragraph."]
        spec = tmp_path / "p.txt"
        spec.write_text("\n\n".join(long_docs) + "\n", encoding="utf-8")
    src = LocalSource([str(spec)], txt_split="paragraph" if fmt == "paragraph" else "file")
    assert list(src) == long_docs
    assert max(len(p.text) for p in src.pieces(700)) <= 700 and len(list(src.pieces(700))) > 10
    kw = dict(shard_tokens=100_000, val_docs=0, num_workers=1, progress=False)
    whole = prepare(src, tmp_path / "whole", small_tok, max_doc_chars=None, **kw)
    cut = prepare(src, tmp_path / "cut", small_tok, max_doc_chars=700, batch_docs=3, **kw)
    toks = all_train_tokens(tmp_path / "cut")
    assert toks.tolist() == all_train_tokens(tmp_path / "whole").tolist()
    assert (toks == 1).sum() == (toks == 2).sum() == len(long_docs) == cut["train"]["num_docs"]
    expected = []
    for t in long_docs:
        expected += [1] + small_tok.encode(t, add_special_tokens=False) + [2]
    assert toks.tolist() == expected
    assert cut["max_doc_chars"] == 700 and whole["max_doc_chars"] is None


def test_long_documents_llama2_pieces(tmp_path, docs):
    """The context trick also reproduces the Llama 2 tokenizer's whole-document tokens at line and space cuts."""
    tok = load_tokenizer(llama2_model_path())
    text = _long_doc(docs, 8)
    enc = P._make_encoder(*P._tokenizer_payload(tok), 1, 2)
    for max_chars in (300, 97):
        arrays = P._encode_with(enc, list(P._document_pieces(text, "d", D.BadRecords(), max_chars)))
        assert np.concatenate(arrays).tolist() == [1] + tok.encode(text, add_special_tokens=False) + [2]


@pytest.mark.parametrize("num_workers", [1, 2])
def test_restart_with_split_documents(tmp_path, small_tok, docs, num_workers):
    """Stopping and resuming while documents are cut into pieces and shards end inside pieces gives exactly the
    uninterrupted output."""
    long_docs = [_long_doc(docs[k:], 3 + k % 4) for k in range(12)]
    src = LocalSource([str(write_jsonl(tmp_path / "d.jsonl", long_docs))])
    kw = dict(shard_tokens=333, val_docs=2, num_workers=num_workers, batch_docs=2, progress=False, max_doc_chars=400)
    prepare(src, tmp_path / "ref", small_tok, **kw)
    ref = read_dir(tmp_path / "ref")
    n_shards = len([n for n in ref if n.startswith("train_")])
    assert n_shards > 6
    out = tmp_path / "out"
    stops = []
    for k in range(3):
        part = prepare(src, out, small_tok, stop_after_shards=2, **kw)
        assert part["complete"] is False and len(part["train_shards"]) == 2 * (k + 1)
        stops.append(part["skip_tokens"])
    assert any(s > 0 for s in stops)  # some stop fell inside a document, so the rerun skips part of it
    prepare(src, out, small_tok, **kw)
    assert read_dir(out) == ref


def test_max_doc_chars_validation(tmp_path, small_tok):
    for bad in (0, 1, -5):
        with pytest.raises(ValueError, match="max_doc_chars must be an integer >= 2"):
            prepare(["x"], tmp_path / "o", small_tok, max_doc_chars=bad, num_workers=1, progress=False)


_MEMORY_PROBE = r"""
import importlib, json, os, re, sys, types
from tokenizers import Tokenizer
def peak_rss_kib():  # VmHWM: this process's own peak (ru_maxrss would carry the forking parent's peak over exec)
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s*(\d+) kB", f.read()).group(1))
# llamathink.data.preparation without running the packages' __init__ (llamathink's imports torch and transformers):
# empty stand-ins for the two packages, pointing at their folders (sys.argv[1] is llamathink/data).
for name, folder in (("llamathink", os.path.dirname(sys.argv[1])), ("llamathink.data", sys.argv[1])):
    sys.modules[name] = types.ModuleType(name)
    sys.modules[name].__path__ = [folder]
D = importlib.import_module("llamathink.data.preparation")
assert "torch" not in sys.modules and "transformers" not in sys.modules
D._READ_CHUNK_BYTES = int(sys.argv[6])
import tqdm.auto  # imported by prepare: not part of the growth
class Tok:  # the builtin tokenizer without importing transformers (keeps the subprocess small and quick)
    backend_tokenizer = Tokenizer.from_file(sys.argv[2])
    bos_token_id, eos_token_id, name_or_path = 1, 2, "builtin"
    def __len__(self):
        return self.backend_tokenizer.get_vocab_size()
Tok.backend_tokenizer.encode("warm up")
base = peak_rss_kib()
meta = D.prepare(D.LocalSource([sys.argv[3]]), sys.argv[4], Tok(), shard_tokens=200_000, val_docs=0,
                 num_workers=1, progress=False, max_doc_chars=int(sys.argv[5]) or None)
peak = peak_rss_kib()
print(json.dumps({"growth_kib": peak - base, "base_kib": base, "tokens": meta["train"]["num_tokens"]}))
"""


def test_long_txt_memory_is_bounded(tmp_path, small_tok, docs):
    """A 2 MB .txt file (one document), read in 64 KiB chunks and tokenized in pieces of 20,000 characters, is
    prepared with a peak RSS growth of a few bytes per input byte (about 10 MB, set by the piece size), where
    tokenizing it whole grows it by ~130 bytes per input byte (measured in a fresh process)."""
    import subprocess
    import sys

    body = _long_doc(docs, len(docs))
    text = ("\n\n".join([body] * (2_000_000 // len(body) + 1)))[:2_000_000]
    (tmp_path / "big.txt").write_text(text, encoding="utf-8")
    small_tok.backend_tokenizer.save(str(tmp_path / "tok.json"))
    size = (tmp_path / "big.txt").stat().st_size
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            _MEMORY_PROBE,
            os.path.dirname(P.__file__),
            str(tmp_path / "tok.json"),
            str(tmp_path / "big.txt"),
            str(tmp_path / "out"),
            "20000",
            "65536",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    probe = json.loads(res.stdout.strip().splitlines()[-1])
    growth = probe["growth_kib"] * 1024
    print(f"peak RSS growth {growth / 2**20:.1f} MiB = {growth / size:.1f} bytes per input byte")
    assert growth < 10 * size, f"peak RSS grew by {growth / size:.1f} bytes per input byte"
    toks = all_train_tokens(tmp_path / "out")
    assert probe["tokens"] == len(toks) and (toks == 1).sum() == 1 and toks[0] == 1 and toks[-1] == 2


def test_progress_from_before_max_doc_chars(tmp_path, small_tok, docs):
    """A progress.json written before max_doc_chars existed: a finished preparation is still accepted as is; an
    unfinished one (its documents were tokenized whole) resumes only with max_doc_chars=None."""
    src = LocalSource([str(write_jsonl(tmp_path / "d.jsonl", docs[:20]))])
    kw = dict(shard_tokens=500, val_docs=2, num_workers=1, progress=False)
    meta = prepare(src, tmp_path / "done", small_tok, **kw)
    prepare(src, tmp_path / "part", small_tok, stop_after_shards=1, **kw)
    for name in ("done", "part"):
        p = tmp_path / name / "progress.json"
        state = json.loads(p.read_text())
        del state["config"]["max_doc_chars"]
        p.write_text(json.dumps(state))
    assert prepare(src, tmp_path / "done", small_tok, **kw) == meta
    with pytest.raises(ValueError, match="different preparation.*max_doc_chars"):
        prepare(src, tmp_path / "part", small_tok, **kw)
    prepare(src, tmp_path / "part", small_tok, max_doc_chars=None, **kw)
    assert all_train_tokens(tmp_path / "part").tolist() == all_train_tokens(tmp_path / "done").tolist()


@pytest.mark.parametrize(
    "damage",
    ['{"docs_done": 0', "[1]", '{"complete": true}', "[" * 100_000, "meta.json"],
    ids=["truncated", "list", "no_config", "deep", "meta"],
)
def test_a_damaged_progress_or_meta_json_is_named_and_nothing_is_deleted(tmp_path, small_tok, docs, damage):
    """A preparation folder whose progress.json (which documents its shards hold) cannot be read, or whose finished
    meta.json is damaged: the error names the file and --overwrite, the shards stay; --overwrite prepares afresh."""
    src = LocalSource([str(write_jsonl(tmp_path / "d.jsonl", docs[:20]))])
    kw = dict(shard_tokens=500, val_docs=2, num_workers=1, progress=False)
    out = tmp_path / "out"
    meta = prepare(src, out, small_tok, **kw)
    tokens = all_train_tokens(out).tolist()
    damaged = out / ("meta.json" if damage == "meta.json" else "progress.json")
    damaged.write_text("{" if damage == "meta.json" else damage)
    files = sorted(p.name for p in out.iterdir())
    named = r"meta.json is not a valid meta.json" if damage == "meta.json" else r"progress.json cannot be read as a"
    with pytest.raises(ValueError, match=rf"out/{named} .*--overwrite"):
        prepare(src, out, small_tok, **kw)
    assert sorted(p.name for p in out.iterdir()) == files  # nothing removed
    assert prepare(src, out, small_tok, overwrite=True, **kw) == meta
    assert all_train_tokens(out).tolist() == tokens


@pytest.mark.parametrize("which", ["builtin", "llama2"])
def test_a_cut_through_a_merge_keeps_the_text(which):
    """A long document cut where no whitespace is near (a run of one character, minified code, a data URI) is cut
    through a merge: the piece after the cut was tokenized alone, and started with the tokenizer's dummy-prefix
    space, a space that is not in the document. Its tokens may differ from the whole document's at the cut; its
    text is the document's."""
    tok = builtin_tokenizer(1024) if which == "builtin" else load_tokenizer(llama2_model_path())
    enc = P._make_encoder(*P._tokenizer_payload(tok), 1, 2)
    for text in ("=" * 40, "Title\n" + "=" * 45 + "\nBody", "x" * 33 + "\n\n" + "y" * 30):
        pieces = list(P._document_pieces(text, "d", D.BadRecords(), 20))
        assert len(pieces) > 1 and "".join(p.text for p in pieces) == text
        ids = np.concatenate(P._encode_with(enc, pieces)).tolist()
        assert ids[0] == 1 and ids[-1] == 2 and tok.decode(ids[1:-1]) == text, (text, tok.decode(ids[1:-1]))


def test_piece_context_fallback():
    """Where the context character merges with the piece's first characters (its tokens are not a prefix), the
    piece is tokenized after a neutral character instead (here too its tokens are a prefix: the piece's are those
    of the piece alone); BOS/EOS go only at the document's real start and end."""

    class MergeAB:  # characters as ids, except that "ab" is one token (99)
        def __call__(self, texts, **kw):
            return {"input_ids": [[99 if t == "ab" else ord(t) for t in re.findall("ab|.", s, re.S)] for s in texts]}

    enc = P._make_encoder("python", MergeAB(), 1, 2)
    pieces = [D.Piece("xa", True, False), D.Piece("bc", False, False, "a"), D.Piece(" d", False, True, "c")]
    out = [a.tolist() for a in P._encode_with(enc, pieces)]
    assert out == [[1, ord("x"), ord("a")], [ord("b"), ord("c")], [ord(" "), ord("d"), 2]]
    assert [a.tolist() for a in P._encode_with(enc, ["ab c"])] == [[1, 99, ord(" "), ord("c"), 2]]


def test_an_overlong_jsonl_line_is_named_and_skipped_without_holding_it(tmp_path, small_tok, monkeypatch):
    """A JSON Lines line over MAX_JSONL_LINE_BYTES (e.g. a binary or one-line file named .jsonl) is a bad record
    named by file and line; it is read past in bounded pieces, and the lines after it keep their numbers."""
    monkeypatch.setattr(P, "MAX_JSONL_LINE_BYTES", 64)
    monkeypatch.setattr(P, "_READ_CHUNK_BYTES", 7)
    lines = [
        json.dumps({"text": GOOD[0]}),
        json.dumps({"text": "x" * 500}),
        json.dumps({"text": GOOD[1]}),
        json.dumps({"text": None}),
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    reads = []
    real_open = open

    class Recording:  # the file object, recording the longest single read
        def __init__(self, f):
            self.f = f

        def readline(self, size=-1):
            line = self.f.readline(size)
            reads.append(len(line))
            return line

        def __iter__(self):
            return iter(self.readline, b"")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(
        "builtins.open",
        lambda p, mode="r", *a, **k: (
            Recording(real_open(p, mode, *a, **k))
            if str(p).endswith("d.jsonl") and "b" in mode
            else real_open(p, mode, *a, **k)
        ),
    )
    kw = dict(shard_tokens=10_000, val_docs=0, num_workers=1, progress=False)
    with pytest.raises(ValueError, match=r"d\.jsonl:2: line longer than 64 bytes .*\[bad record: line_too_long\]"):
        prepare(LocalSource([str(tmp_path / "d.jsonl")]), tmp_path / "out", small_tok, **kw)
    reads.clear()
    meta = prepare(LocalSource([str(tmp_path / "d.jsonl")]), tmp_path / "out", small_tok, skip_bad_records=True, **kw)
    assert meta["bad_records"]["by_kind"] == {"line_too_long": 1, "not_a_string": 1}
    assert re.search(r"d\.jsonl:4: ", meta["bad_records"]["examples"][1])  # numbering goes on after the long line
    assert max(reads) <= 65  # never more than the limit (+1 to see that it is over) in memory at once
    expected = []
    for t in GOOD[:2]:
        expected += [1] + small_tok.encode(t, add_special_tokens=False) + [2]
    assert all_train_tokens(tmp_path / "out").tolist() == expected


def test_loader_resume_refuses_negative_or_zero_counts(tmp_path):
    make_shards(tmp_path, [700, 300])
    L = TokenBatchLoader(tmp_path, 10, 4, seed=11)
    next(L)
    good = L.state_dict()
    for key, value in [("position", -5), ("epoch", -1), ("world_size", 0), ("batch_size", -4)]:
        again = TokenBatchLoader(tmp_path, 10, 4, seed=11)
        with pytest.raises(ValueError, match=rf"cannot resume data loader: saved .*{key}={value}.* not valid counts"):
            again.load_state_dict({**good, key: value})
        assert (again.epoch, again.position) == (0, 0)  # unchanged
    # a damaged entry is named, not read with int() as another position (a float, a bool) or failing deep inside
    # (inf, a string), and a position past its epoch's end (25 batches of 4 windows here) is not taken for the next
    for key, value, named in [
        ("position", 1.0, r"position is 1\.0, not an integer\)"),
        ("position", float("inf"), r"position is inf, not an integer\)"),
        ("epoch", True, r"epoch is True, not an integer\)"),
        ("world_size", "2", r"world_size is '2', not an integer\)"),
        ("grad_accum", 0, r"grad_accum is 0, not an integer >= 1\)"),
        ("seed", torch.tensor(11), r"seed is tensor\(11\), not an integer\)"),
        ("position", 26, r"position 26 is past the end of an epoch of 25 batches of 1 x 4 windows"),
    ]:
        with pytest.raises(ValueError, match=r"the checkpoint's loader state is damaged \(" + named):
            TokenBatchLoader(tmp_path, 10, 4, seed=11).load_state_dict({**good, key: value})
    again.load_state_dict({**good, "position": 25})  # an epoch's end: the next batch starts the next epoch
    again.load_state_dict(good)
    assert torch.equal(next(again)[0], next(L)[0])


def test_ctrl_c_during_a_multi_worker_prepare_exits_promptly_and_resumes(tmp_path):
    """Ctrl-C (SIGINT to the whole process group, workers included) while two workers tokenize: the CLI exits
    within seconds with status 130 and a one-line message (multiprocessing.Pool.terminate() could wait forever on
    a queue lock here), keeps the shards written, and the same command then completes the preparation."""
    import signal
    import subprocess
    import sys
    import time

    texts = list(iter_sample_texts())
    src = write_jsonl(tmp_path / "big.jsonl", [texts[i % len(texts)] + f" ({i})" for i in range(8_000)])
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "llamathink.data",
        "prepare",
        "--input",
        str(src),
        "--tokenizer",
        "builtin",
        "--out",
        str(out),
        "--val-docs",
        "10",
        "--workers",
        "2",
        "--batch-docs",
        "16",
        "--shard-tokens",
        "10000",
        "--no-progress",
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 120
    while not (out / "train_000001.bin").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the preparation ended before it could be interrupted: give it more data"
    os.killpg(proc.pid, signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("prepare did not exit within 30 s of Ctrl-C") from None
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err and "rerun the same command" in err and "Traceback" not in err
    assert not json.loads((out / "progress.json").read_text())["complete"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["num_docs"] == 8_000 and meta["train"]["num_docs"] == 8_000 - 10


def test_inspect_names_a_missing_or_foreign_file_in_one_line(tmp_path, capsys):
    from llamathink.data.__main__ import main as data_main

    foreign = tmp_path / "notes.bin"
    foreign.write_bytes(b"# not a shard" * 100)
    short = tmp_path / "short.txt"  # shorter than a shard's header, yet no shard cut short
    short.write_text('{"vocab_size": 32000}')
    write_shard(tmp_path / "cut.bin", [1, 2, 3], 10)
    (tmp_path / "cut.bin").write_bytes((tmp_path / "cut.bin").read_bytes()[:2])  # cut inside the magic number
    for path, message in (
        (tmp_path / "missing", "no shards at"),
        (foreign, "not a LlamaThink token shard"),
        (short, "not a LlamaThink token shard"),
        (tmp_path / "cut.bin", "truncated shard: 2 bytes"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            data_main(["inspect", str(path)])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and message in err, err


def test_training_and_a_continued_preparation_refuse_shards_changed_since_prepare(tmp_path, small_tok, docs):
    """A shard that meta.json lists but is gone, truncated, or one it does not list: training would read other
    data than the folder says (a missing shard was silently skipped); a stopped preparation continued over a
    missing or truncated shard would report every shard written."""
    from llamathink.data import check_shards_against_meta, load_meta

    src = tmp_path / "d.jsonl"
    src.write_bytes(_jsonl_bytes(docs[:40]))
    kw = {"shard_tokens": 300, "val_docs": 3, "num_workers": 1, "batch_docs": 2, "progress": False}
    out = tmp_path / "out"
    prepare(LocalSource([str(src)]), out, small_tok, **kw)
    meta = load_meta(out)
    assert len(check_shards_against_meta(out, meta)) == len(meta["train"]["shards"]) + 1
    second = out / meta["train"]["shards"][1]["file"]
    data = second.read_bytes()
    second.unlink()
    with pytest.raises(FileNotFoundError, match=rf"{second.name}: listed in meta.json \(train\) but missing"):
        check_shards_against_meta(out, meta)
    second.write_bytes(data)
    extra = out / "train_000999.bin"
    shutil.copy(second, extra)
    with pytest.raises(ValueError, match="train_000999.bin not listed in meta.json"):
        check_shards_against_meta(out, meta)
    extra.unlink()
    for broken in ({**meta, "train": [1]}, {**meta, "train": {"shards": None}}, {**meta, "val": {"shards": ["x"]}}):
        with pytest.raises(ValueError, match=r"meta.json: its '(train|val)' entry is not"):
            check_shards_against_meta(out, broken)
    # a stopped preparation: its second shard deleted, or cut, before the rerun
    for damage in ("delete", "truncate"):
        part = tmp_path / f"part_{damage}"
        prepare(LocalSource([str(src)]), part, small_tok, stop_after_shards=3, **kw)
        shard = part / "train_000001.bin"
        if damage == "delete":
            shard.unlink()
        else:
            shard.write_bytes(shard.read_bytes()[: len(data) // 2])
        with pytest.raises(ValueError, match=r"train_000001\.bin: .*cannot be continued: rerun with --overwrite"):
            prepare(LocalSource([str(src)]), part, small_tok, **kw)


def test_a_continued_preparation_refuses_an_input_edited_before_the_documents_it_wrote(tmp_path, small_tok, docs):
    """Lines added at the front of the input would shift every document: the continued shards would repeat some
    and lose others. The documents already written are checked by digest while they are read past; an input
    extended at the end continues, exactly as a run over the extended input from the start."""
    kw = {"shard_tokens": 300, "val_docs": 3, "num_workers": 1, "batch_docs": 2, "progress": False}
    src = tmp_path / "d.jsonl"
    src.write_bytes(_jsonl_bytes(docs[:40]))
    prepare(LocalSource([str(src)]), tmp_path / "out", small_tok, stop_after_shards=3, **kw)
    assert json.loads((tmp_path / "out" / "progress.json").read_text())["docs_sha256"]
    src.write_bytes(_jsonl_bytes(docs[40:45] + docs[:40]))
    with pytest.raises(ValueError, match=r"the first \d+ documents of the input are not those .* --overwrite"):
        prepare(LocalSource([str(src)]), tmp_path / "out", small_tok, **kw)
    src.write_bytes(_jsonl_bytes(docs[:45]))  # extended at the end: continues
    prepare(LocalSource([str(src)]), tmp_path / "out", small_tok, **kw)
    ref = tmp_path / "ref.jsonl"
    ref.write_bytes(_jsonl_bytes(docs[:45]))
    prepare(LocalSource([str(ref)]), tmp_path / "ref", small_tok, **kw)
    got, want = read_dir(tmp_path / "out"), read_dir(tmp_path / "ref")
    shards = sorted(n for n in want if n.endswith(".bin"))
    assert sorted(n for n in got if n.endswith(".bin")) == shards and all(got[n] == want[n] for n in shards)


def test_a_missing_input_fails_before_the_output_folder_is_made(tmp_path, small_tok):
    """A typo in --input must not leave a progress.json behind that makes the corrected command refuse the folder."""
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare(LocalSource([str(tmp_path / "typo.jsonl")]), tmp_path / "out", small_tok, progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("max_docs", [0, -1])
def test_a_document_limit_below_one_is_refused_before_anything_is_written(tmp_path, small_tok, max_docs):
    """`--max-docs 0` or a negative limit would read nothing and then fail on the empty result, naming
    --val-docs and leaving an unfinishable preparation behind: it is refused by name first."""
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=f"max_docs must be >= 1 or None \\(no limit\\), got {max_docs}"):
        prepare(["one document", "another"], out, small_tok, max_docs=max_docs, num_workers=1, progress=False)
    assert not out.exists()
