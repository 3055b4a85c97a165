"""Tests for llamathink.tokenizer_utils (offline; the Llama 2 tests need the
shared tokenizer.model and are skipped without it)."""

import json
import re
import shutil
from pathlib import Path

import pytest

from conftest import llama2_model_path
from llamathink.tokenizer_utils import (
    BYTE_PIECES,
    NO_MERGE_SCORE,
    builtin_tokenizer,
    check_tokenizer,
    greedy_encode,
    iter_sample_texts,
    load_tokenizer,
    main,
    save_tokenizer_for_model,
    tokenizer_from_sentencepiece,
    train_tokenizer,
    vocab_and_scores,
)

REPO = Path(__file__).resolve().parents[1]

TRICKY = [
    "",
    " ",
    "   ",
    " leading space",
    "  two leading spaces",
    "multiple   spaces  inside",
    "trailing space ",
    "line one\nline two\n\n\nafter blank lines\n",
    "\n starts with a newline",
    "tabs\tand\t\tmore tabs\t",
    "emoji \U0001f600\U0001f389 and a flag \U0001f1eb\U0001f1f7",
    "CJK \u4e2d\u6587\u5b57\u7b26 \u65e5\u672c\u8a9e \ud55c\uad6d\uc5b4",
    "accents: caf\u00e9, na\u00efve, \u00fcber, ma\u00f1ana, \u00c5ngstr\u00f6m, e\u0301 (combining)",
    "windows\r\nnewlines\r\n",
    "literal specials <s> </s> <unk> <0x41> stay text",
    "<person1> hi there <person2> hello",
    "zero\u200bwidth and nbsp\u00a0here",
    "math: 3 + 4 = 7, 10 x 2 = 20; 100% sure?!",
]


@pytest.fixture(scope="module")
def llama2():
    return load_tokenizer(llama2_model_path())


@pytest.fixture(scope="module")
def small():
    return builtin_tokenizer(1024)


# ---------------------------------------------------------------- Llama 2


def test_llama2_from_model_file(llama2):
    assert len(llama2) == 32000
    assert llama2.encode("Hello world", add_special_tokens=False) == [15043, 3186]
    # Like the Hugging Face Llama 2 tokenizer: BOS added, no EOS.
    assert llama2("Hello world").input_ids == [1, 15043, 3186]
    assert (llama2.unk_token_id, llama2.bos_token_id, llama2.eos_token_id, llama2.pad_token_id) == (0, 1, 2, 0)
    assert llama2.convert_ids_to_tokens([3, 13, 258]) == ["<0x00>", "<0x0A>", "<0xFF>"]


def test_llama2_matches_sentencepiece(llama2):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(llama2_model_path()))
    texts = TRICKY + [t[:2000] for t in list(iter_sample_texts())[:60]]
    for text in texts:
        ids = llama2.encode(text, add_special_tokens=False, split_special_tokens=True)
        assert ids == sp.encode(text), text
        assert llama2.decode(ids) == text


def test_llama2_from_directory_and_save_load(llama2, tmp_path):
    d = tmp_path / "tok"
    d.mkdir()
    shutil.copy(llama2_model_path(), d / "tokenizer.model")
    tok = load_tokenizer(d)
    assert tok.encode("Hello world", add_special_tokens=False) == [15043, 3186]
    out = tmp_path / "saved"
    tok.save_pretrained(out)
    again = load_tokenizer(out)
    for text in TRICKY:
        assert again.encode(text) == tok.encode(text)


def test_llama2_greedy_reference(llama2):
    pieces, scores = vocab_and_scores(llama2)
    assert len(pieces) == 32000 and pieces[15043] == "\u2581Hello"
    assert scores[0] == scores[1] == scores[3] == NO_MERGE_SCORE
    for text in TRICKY + ["Hello world", "The quick brown fox jumps over the lazy dog."]:
        assert greedy_encode(text, pieces, scores) == llama2.encode(
            text, add_special_tokens=False, split_special_tokens=True
        ), text


def test_three_token_pitfall_is_rejected():
    from transformers import LlamaTokenizer

    bad = LlamaTokenizer(vocab_file=str(llama2_model_path()))
    assert len(bad) == 3  # the transformers 5 pitfall this module guards against
    with pytest.raises(ValueError, match="only 3 tokens"):
        check_tokenizer(bad, "LlamaTokenizer(vocab_file=...)")


# ---------------------------------------------------------------- errors


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(ValueError, match="not a valid SentencePiece model"):
        load_tokenizer(junk)
    other = tmp_path / "vocab.txt"
    other.write_text("a\nb\n")
    with pytest.raises(ValueError, match="unsupported tokenizer file"):
        load_tokenizer(other)
    with pytest.raises(ValueError, match="bad built-in tokenizer name"):
        load_tokenizer("builtin:lots")
    with pytest.raises(FileNotFoundError):
        tokenizer_from_sentencepiece(tmp_path / "missing.model")
    saved = tmp_path / "saved"  # a saved tokenizer whose vocabulary file went missing
    load_tokenizer("builtin").save_pretrained(saved)
    (saved / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="neither tokenizer.json nor tokenizer.model: was the vocabulary lost"):
        load_tokenizer(saved)


# ---------------------------------------------------------------- trained tokenizer


def test_trained_structure(small):
    assert len(small) == 1024
    assert small.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
    assert small.convert_ids_to_tokens(list(range(3, 259))) == BYTE_PIECES
    assert (small.unk_token_id, small.bos_token_id, small.eos_token_id, small.pad_token_id) == (0, 1, 2, 0)
    data = json.loads(small.backend_tokenizer.to_str())
    model = data["model"]
    assert model["type"] == "BPE" and model["byte_fallback"] is True and model["unk_token"] == "<unk>"
    assert data["pre_tokenizer"]["type"] == "Metaspace"
    assert data["pre_tokenizer"]["replacement"] == "\u2581"
    assert data["pre_tokenizer"]["prepend_scheme"] == "first"
    assert data["normalizer"] == {"type": "Prepend", "prepend": "\u2581"}
    assert {t["content"] for t in data["added_tokens"]} == {"<unk>", "<s>", "</s>"}
    assert small("Hello world").input_ids[0] == 1
    assert small("Hello world").input_ids[-1] != 2


@pytest.mark.parametrize("text", TRICKY)
def test_trained_round_trip_and_greedy(small, text):
    ids = small.encode(text, add_special_tokens=False, split_special_tokens=True)
    assert small.decode(ids) == text
    assert all(0 <= i < len(small) for i in ids)
    pieces, scores = vocab_and_scores(small)
    assert greedy_encode(text, pieces, scores) == ids


def test_trained_matches_greedy_on_corpus(small):
    pieces, scores = vocab_and_scores(small)
    for text in list(iter_sample_texts())[::7][:80]:
        text = text[:600]
        ids = small.encode(text, add_special_tokens=False)
        assert greedy_encode(text, pieces, scores) == ids
        assert small.decode(ids) == text


def test_trained_compresses_and_falls_back_to_bytes(small):
    text = "\n\n".join(list(iter_sample_texts(include_conversations=False))[:50])
    ids = small.encode(text, add_special_tokens=False)
    assert len(ids) < len(text) / 2.4  # it learned real merges (about 2.7 characters per token)
    emoji = small.encode("\U0001f600", add_special_tokens=False)
    assert small.convert_ids_to_tokens(emoji) == ["\u2581", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]


def test_trained_deterministic_and_save_load(tmp_path):
    from transformers import AutoTokenizer

    texts = list(iter_sample_texts(include_conversations=False))[:200]
    a = train_tokenizer(texts, vocab_size=600)
    b = train_tokenizer(texts, vocab_size=600)
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    assert len(a) <= 600
    a.save_pretrained(tmp_path / "t")
    for loaded in (
        AutoTokenizer.from_pretrained(tmp_path / "t"),
        load_tokenizer(tmp_path / "t"),
        load_tokenizer(tmp_path / "t" / "tokenizer.json"),
    ):
        assert (loaded.bos_token_id, loaded.eos_token_id, loaded.unk_token_id, loaded.pad_token_id) == (1, 2, 0, 0)
        for text in TRICKY:
            assert loaded.encode(text) == a.encode(text)
            ids = loaded.encode(text, add_special_tokens=False, split_special_tokens=True)
            assert loaded.decode(ids) == text


def test_train_small_input_and_bad_sizes():
    tok = train_tokenizer(["tiny text, tiny text"], vocab_size=512)
    assert 259 < len(tok) <= 512
    assert tok.decode(tok.encode("\u00fcnknown \u4e2d", add_special_tokens=False)) == "\u00fcnknown \u4e2d"
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(["x"], vocab_size=300)
    with pytest.raises(ValueError, match="too large"):
        train_tokenizer(["x"], vocab_size=70000)


def test_training_cuts_runs_without_whitespace_into_bounded_words():
    """The trainer's words are at most MAX_TRAIN_WORD_CHARS characters: a run without whitespace was one word,
    and the BPE trainer's time grows with the square of a word's length (640K characters of "=": minutes). The
    text is all there, and a tokenizer trained on such runs encodes them back exactly."""
    from tokenizers import Regex, pre_tokenizers

    from llamathink.tokenizer_utils import _TRAIN_SPLIT_PATTERN, MAX_TRAIN_WORD_CHARS, SPACE

    split = pre_tokenizers.Split(Regex(_TRAIN_SPLIT_PATTERN), behavior="isolated")
    for text in (SPACE + "=" * 200, "\n" * 150, SPACE * 130 + "x", "ab" + SPACE + "c" * 70):
        words = [w for w, _ in split.pre_tokenize_str(text)]
        assert "".join(words) == text and max(map(len, words)) <= MAX_TRAIN_WORD_CHARS + 1, words  # (+ its space)
    long_run = "=" * 20_000 + " " + "data:" + "QUJD" * 5_000
    tok = train_tokenizer([long_run, "a few words of text"], vocab_size=400)
    assert tok.decode(tok.encode(long_run, add_special_tokens=False)) == long_run


def test_builtin_names(small):
    tok = load_tokenizer("builtin")
    assert tok.backend_tokenizer.to_str() == small.backend_tokenizer.to_str()
    assert len(load_tokenizer("builtin:512")) == 512


def test_a_hub_tokenizer_not_in_the_cache_offline_says_so(monkeypatch, tmp_path):
    """A Hub id that is not in the local cache, in offline mode: the message names the variable that set it and how
    to go on, where transformers' asks to check the internet connection; online, its own message stands."""
    import transformers

    def lookup(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'. Check your internet connection")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lookup)
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    with pytest.raises(ValueError, match="Hub/cache lookup failed \\(OSError: We couldn't connect"):
        load_tokenizer("someone/tokenizer")
    monkeypatch.setenv("HF_HUB_OFFLINE", "true")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="tokenizer 'someone/tokenizer': not a local path, .*; HF_HUB_OFFLINE is set"):
        load_tokenizer("someone/tokenizer")
    (tmp_path / "models--someone--tokenizer").mkdir()  # in the cache, but not loadable: the real error is named
    with pytest.raises(ValueError, match=r"cannot be loaded \(OSError: We couldn't connect.*HF_HUB_OFFLINE is set: on"):
        load_tokenizer("someone/tokenizer")


def test_cli_train_and_info(tmp_path, capsys):
    src = tmp_path / "docs.jsonl"
    src.write_text("\n".join(json.dumps({"text": t}) for t in list(iter_sample_texts())[:100]) + "\n")
    assert main(["train", "--input", str(src), "--vocab-size", "512", "--out", str(tmp_path / "t")]) == 0
    assert main(["info", str(tmp_path / "t"), "--text", "Hello world"]) == 0
    out = capsys.readouterr().out
    info = json.loads(out[out.index("{") :])
    assert info["vocab_size"] == 512 and info["bos_token_id"] == 1 and info["ids"]
    # typed control tokens are text, as the data, the chat and the C runner encode them (they gave BOS and EOS)
    assert main(["info", str(tmp_path / "t"), "--text", "a <s> </s> <unk>"]) == 0
    out = capsys.readouterr().out
    info = json.loads(out[out.index("{") :])
    assert not {1, 2, 0} & set(info["ids"]) and "".join(info["pieces"]).replace("\u2581", " ") == " a <s> </s> <unk>"


def test_cli_train_reads_its_input_as_prepare_does_and_names_bad_records(tmp_path, capsys):
    """`train --input` takes what `llamathink-prepare --input` takes (a folder of .jsonl and .txt files here), and
    its bad input gives one line naming the file and line, not a traceback: a record that is not JSON (including
    numbers past Python's 4300 digits), a record without the text field, an input that does not exist; with
    --skip-bad-records such records are skipped and counted, and the tokenizer is that of the good documents."""
    texts = list(iter_sample_texts())[:60]
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts[:59]) + "\n")
    (folder / "b.txt").write_text(texts[59])
    out = tmp_path / "t"
    assert main(["train", "--input", str(folder), "--vocab-size", "512", "--out", str(out)]) == 0
    reference = train_tokenizer(texts, vocab_size=512).backend_tokenizer.to_str()
    assert load_tokenizer(str(out)).backend_tokenizer.to_str() == reference
    with open(folder / "a.jsonl", "a") as f:
        f.write('{"text": "x", "id": ' + "7" * 5000 + "}\n")
    for args, named in [
        ([str(folder)], r"a\.jsonl:60: invalid JSON \(Exceeds the limit \(4300 digits"),
        ([str(tmp_path / "nothere.jsonl")], r"input .*nothere\.jsonl does not exist"),
    ]:
        with pytest.raises(SystemExit) as stop:
            main(["train", "--input", *args, "--vocab-size", "512", "--out", str(tmp_path / "u")])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and re.search(named, err) and "Traceback" not in err, err
    assert not (tmp_path / "u").exists()
    (folder / "c.jsonl").write_text('{"body": "no text field"}\n')
    assert main(["train", "--input", str(folder), "--vocab-size", "512", "--out", str(out), "--skip-bad-records"]) == 0
    assert "skipped 2 bad record(s) {'invalid_json': 1, 'missing_field': 1}" in capsys.readouterr().out
    assert load_tokenizer(str(out)).backend_tokenizer.to_str() == reference


def test_cli_train_refuses_an_out_it_would_spoil_and_input_without_text(tmp_path, capsys):
    """`train --out` writes a new or empty folder, or over an earlier tokenizer; a file, or a folder holding other
    files (a model folder, whose tokenizer replaced would no longer match the model), is refused before training
    and left as it was. Input without text (whitespace only; every record skipped) is an error, not a tokenizer of
    the bare alphabet; a vocabulary smaller than asked (too little text) is said so; `info --text` that is not
    UTF-8 is named (it was a TypeError from inside tokenizers)."""
    text = tmp_path / "docs.txt"
    text.write_text(" ".join(list(iter_sample_texts())[:3]))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (tmp_path / "afile").write_text("hi")
    blank = tmp_path / "blank.txt"
    blank.write_text("  \n\n\t\n")
    no_field = tmp_path / "nf.jsonl"
    no_field.write_text('{"txt": "hello"}\n')
    for args, named in [
        (["--out", str(model)], r"--out .*model holds other files than a tokenizer's \(config\.json\)"),
        (["--out", str(tmp_path / "afile")], r"--out .*afile is a file, not a folder"),
        (["--input", str(blank), "--out", str(tmp_path / "t1")], r"no text to train a tokenizer on"),
        (["--input", str(no_field), "--skip-bad-records", "--out", str(tmp_path / "t2")], r"no text to train"),
    ]:
        with pytest.raises(SystemExit) as stop:
            main(["train", "--input", str(text), "--vocab-size", "400", *args])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and re.search(named, err) and "Traceback" not in err, (args, err)
    assert sorted(p.name for p in model.iterdir()) == ["config.json"] and (tmp_path / "afile").read_text() == "hi"
    assert not (tmp_path / "t1").exists() and not (tmp_path / "t2").exists()
    out = tmp_path / "tok"
    for _ in range(2):  # a second run writes over the first one's tokenizer
        assert main(["train", "--input", str(text), "--vocab-size", "2000", "--out", str(out)]) == 0
        said = capsys.readouterr().out
        assert re.search(r"saved tokenizer with \d+ tokens to .*tok \(of the 2000 asked: the text is too small", said)
    with pytest.raises(SystemExit) as stop:
        main(["info", str(out), "--text", "caf\udce9"])  # how Python reads the bytes caf\xe9 of a command line
    assert stop.value.code == 2 and "--text is not UTF-8 text (character 4" in capsys.readouterr().err


@pytest.mark.parametrize(
    "text",
    ['{"version": "1.0", "model": {', "not json at all", '{"model": {"type": "BPE", "vocab": [1, 2]}}'],
    ids=["truncated", "not-json", "wrong-shape"],
)
def test_an_unreadable_tokenizer_json_is_named(tmp_path, text):
    """A truncated or edited tokenizer.json, given as the file or as its folder: a ValueError naming it (the
    tokenizers library raises a bare Exception, transformers a JSONDecodeError, neither naming the file)."""
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer.json").write_text(text)
    for spec in (folder / "tokenizer.json", folder):
        with pytest.raises(ValueError, match=f"{spec}: cannot read this tokenizer"):
            load_tokenizer(spec)


def test_a_model_folders_unreadable_config_is_named_beside_its_tokenizer(tmp_path):
    """transformers reads a model folder's config.json when it loads the tokenizer there: an error of that file is
    reported as the tokenizer's or the config's, with the underlying message (here a dtype torch does not have)."""
    import json

    from llamathink import LlamaThinkConfig

    load_tokenizer("builtin").save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(LlamaThinkConfig().to_dict() | {"dtype": "bfloat17"}))
    with pytest.raises(ValueError, match="cannot read this tokenizer or the config.json beside it .*bfloat17"):
        load_tokenizer(tmp_path)


def test_a_tokenizer_with_shared_ids_or_a_bad_model_max_length_is_refused_at_load(tmp_path):
    """Two tokens given one id (it loaded, trained a whole run, then failed to save next to the model) and a
    model_max_length that is not a positive integer (a TypeError at the first encode): refused by name at load."""
    good = tmp_path / "good"
    builtin_tokenizer(1024).save_pretrained(good)
    spec = json.loads((good / "tokenizer.json").read_text())
    tokens = list(spec["model"]["vocab"])
    spec["model"]["vocab"][tokens[600]] = spec["model"]["vocab"][tokens[601]]
    (tmp_path / "shared.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"gives one id to several tokens: .* \(id 601\)"):
        load_tokenizer(tmp_path / "shared.json")
    for bad in ("abc", -1, 0):  # (null: transformers takes its default)
        folder = tmp_path / f"limit_{bad}"
        shutil.copytree(good, folder)
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config["model_max_length"] = bad
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match="model_max_length must be a positive integer"):
            load_tokenizer(folder)


def test_a_chat_tokenizer_saved_for_a_model_loads_with_its_text_guard(tmp_path):
    """A Llama 2 folder whose tokenizer_config.json names LlamaTokenizer (a Hub layout), given the chat template
    (its U+FDD0 text guard put first in the normalizer) and saved with `save_tokenizer_for_model`: `AutoTokenizer`
    loads it back with the guard and encodes chats as the tokenizer that was saved. transformers 5's LlamaTokenizer
    builds its own normalizer when loaded, so the saved folder used to encode the template's guarded content as byte
    tokens; it is now named as the generic PreTrainedTokenizerFast. A tokenizer whose class reads tokenizer.json as
    written keeps its class."""
    from transformers import AutoTokenizer

    from llamathink.chat_format import set_chat_template

    folder = tmp_path / "hub_layout"
    folder.mkdir()
    shutil.copy(llama2_model_path(), folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    tok = set_chat_template(load_tokenizer(folder))
    assert type(tok).__name__ == "LlamaTokenizer"
    save_tokenizer_for_model(tok, tmp_path / "saved", 1024)
    again = AutoTokenizer.from_pretrained(tmp_path / "saved")
    chat = [{"role": "user", "content": "say </s> or <s> please"}, {"role": "assistant", "content": "ok </s>"}]
    for text in ("a\ufdd0b", " leading", "Hello world", "\u2581x"):
        assert again.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False), text
    assert again.apply_chat_template(chat, tokenize=True) == tok.apply_chat_template(chat, tokenize=True)
    assert again.encode("a\ufdd0b", add_special_tokens=False) == tok.encode("ab", add_special_tokens=False)
    assert json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())["tokenizer_class"] == (
        "PreTrainedTokenizerFast"
    )
    plain = set_chat_template(load_tokenizer(llama2_model_path()))
    save_tokenizer_for_model(plain, tmp_path / "plain", 1024)
    plain.save_pretrained(tmp_path / "as_transformers_saves_it")
    assert (
        json.loads((tmp_path / "plain" / "tokenizer_config.json").read_text())["tokenizer_class"]
        == (
            json.loads((tmp_path / "as_transformers_saves_it" / "tokenizer_config.json").read_text())["tokenizer_class"]
        )
    )


def test_a_tokenizer_without_a_tokenizers_backend_is_saved_as_it_is(tmp_path):
    """`save_tokenizer_for_model` of a SentencePiece-backed (slow) tokenizer, which has no text pipeline to compare:
    saved under its own class, not renamed (it was renamed, then refused, as its reload's pipeline never equalled
    the empty one)."""
    import transformers

    backend_class = getattr(transformers, "SentencePieceBackend", None)
    if backend_class is None:
        pytest.skip(f"transformers {transformers.__version__} has no SentencePieceBackend")

    class SlowLlama(backend_class):
        vocab_files_names = {"vocab_file": "tokenizer.model"}  # noqa: RUF012 (transformers reads it so)

    save_tokenizer_for_model(SlowLlama(vocab_file=str(llama2_model_path())), tmp_path / "slow", 512)
    assert json.loads((tmp_path / "slow" / "tokenizer_config.json").read_text())["tokenizer_class"] == "SlowLlama"


def test_a_saved_tokenizer_transformers_cannot_load_again_is_named_not_fatal(tmp_path, monkeypatch):
    """Where the reload check of `save_tokenizer_for_model` fails inside transformers, the save stands (it runs as
    a finished training run saves its model) and a warning names the folder."""
    import transformers

    def refuse(*args, **kwargs):
        raise OSError("no such class here")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    with pytest.warns(
        UserWarning, match=r"saved: the saved tokenizer .* cannot be loaded again \(OSError: no such class"
    ):
        save_tokenizer_for_model(builtin_tokenizer(), tmp_path / "saved", 512)
    assert (tmp_path / "saved" / "tokenizer.json").is_file()
