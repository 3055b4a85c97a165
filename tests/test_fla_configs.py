"""fla's recorded autotune choices (`llamathink.kernels_llamathink`: `write_fla_tuned_configs` /
`load_fla_tuned_configs`): a round trip through the file into autotuners' caches, the cases where nothing may be
given (another fla or Triton version, a key already tuned, a kernel this fla lacks, the switch turned off), hostile
files (a warning naming the fault, never an exception), and the file shipped in the package."""

from __future__ import annotations

import json
import sys
import types

import pytest

from llamathink import kernels_llamathink as k

VERSIONS = {"fla": "0.6.0", "triton": "3.6.0"}


def _jit(fn):  # the shape of a Triton JITFunction as `_fla_autotuners` walks it: the Python function under `.fn`
    return types.SimpleNamespace(fn=fn)


class Config:
    """What is read of a `triton.Config`."""

    def __init__(self, kwargs, num_warps, num_stages, num_ctas=1, maxnreg=None):
        self.kwargs, self.num_warps, self.num_stages, self.num_ctas, self.maxnreg = (
            kwargs,
            num_warps,
            num_stages,
            num_ctas,
            maxnreg,
        )


class FakeAutotuner:
    """What the loader uses of `triton.runtime.autotuner.Autotuner`: `cache` (key tuple -> config), the candidate
    `configs`, the key argument names `keys`, and the kernel under `.fn`."""

    def __init__(self, fn, keys, configs):
        self.fn, self.keys, self.configs, self.cache = _jit(fn), keys, configs, {}


H_CONFIGS = [Config({"BV": 32}, 4, 2), Config({"BV": 64}, 4, 2), Config({"BV": 64}, 4, 3)]
O_CONFIGS = [Config({"BK": 64, "BV": 32}, 8, 2, maxnreg=128), Config({"BK": 32, "BV": 32}, 2, 1)]
KEY_H = (9, 112, True, "torch.bfloat16")  # H, K, USE_G, then the tensor arguments' dtypes


@pytest.fixture
def fake_fla(monkeypatch):
    """Two fake fla kernel modules: one autotuner bare, one under a heuristics wrapper, one re-exported elsewhere."""

    def kernel_h():
        pass

    def kernel_o():
        pass

    kernel_h.__module__, kernel_h.__qualname__ = "fla.ops.common.chunk_delta_h", "kernel_h"
    kernel_o.__module__, kernel_o.__qualname__ = "fla.ops.common.chunk_o", "kernel_o"
    tuner_h = FakeAutotuner(kernel_h, ["H", "K", "USE_G"], H_CONFIGS)
    tuner_o = FakeAutotuner(kernel_o, ["H", "BT"], O_CONFIGS)
    mod_h = types.ModuleType("fla.ops.common.chunk_delta_h")
    mod_h.kernel_h = tuner_h
    mod_o = types.ModuleType("fla.ops.common.chunk_o")
    mod_o.kernel_o = types.SimpleNamespace(fn=tuner_o)  # triton.heuristics(...)(autotuner)
    mod_o.not_a_kernel = 3
    mod_o.a_class = dict
    reexport = types.ModuleType("fla.ops.gated_delta_rule.chunk")
    reexport.kernel_h = tuner_h
    for mod in (mod_h, mod_o, reexport):
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setattr(k, "_library_versions", lambda: dict(VERSIONS))
    monkeypatch.setattr(k.torch.cuda, "is_available", lambda: False)  # the same on a GPU machine: no GPU-name check
    monkeypatch.setattr(k, "_fla_state", {})  # warnings are given once per process
    monkeypatch.delenv(k.FLA_TUNED_CONFIGS_ENV, raising=False)
    return tuner_h, tuner_o


def test_choices_round_trip_into_autotuner_caches(fake_fla, tmp_path):
    tuner_h, tuner_o = fake_fla
    assert set(k._fla_autotuners()) == {"fla.ops.common.chunk_delta_h:kernel_h", "fla.ops.common.chunk_o:kernel_o"}
    tuner_h.cache[KEY_H] = H_CONFIGS[2]
    tuner_o.cache[(9, 64)] = O_CONFIGS[0]
    tuner_o.cache[(9, 32)] = O_CONFIGS[1]
    path = tmp_path / "NVIDIA_H200.json"
    doc = k.write_fla_tuned_configs(path, "NVIDIA H200", extra={"measured_with": "a test", "format": 9, "gpu": "x"})
    assert json.loads(path.read_text()) == doc
    assert doc["format"] == 1 and doc["gpu"] == "NVIDIA H200" and doc["versions"] == VERSIONS  # extra cannot change
    assert doc["measured_with"] == "a test"
    assert doc["kernels"]["fla.ops.common.chunk_delta_h:kernel_h"] == [
        {
            "key": [9, 112, True, "torch.bfloat16"],
            "config": {"kwargs": {"BV": 64}, "num_warps": 4, "num_stages": 3, "num_ctas": 1, "maxnreg": None},
        }
    ]
    assert [e["key"] for e in doc["kernels"]["fla.ops.common.chunk_o:kernel_o"]] == [[9, 32], [9, 64]]

    tuner_o.cache.pop((9, 64))
    tuner_h.cache.clear()
    tuner_o.cache[(9, 32)] = already = Config({"BK": 32, "BV": 32}, 2, 1)  # tuned in this process: kept
    assert k.load_fla_tuned_configs(path) == 2
    assert tuner_o.cache[(9, 32)] is already
    assert tuner_o.cache[(9, 64)] is O_CONFIGS[0]  # the kernel's own candidate object
    assert tuner_h.cache[KEY_H] is H_CONFIGS[2]
    assert k.load_fla_tuned_configs(path) == 0  # nothing left to give


def test_write_merges_earlier_entries_of_the_same_gpu_and_versions(fake_fla, tmp_path, caplog):
    tuner_h, _ = fake_fla
    path = tmp_path / "t.json"
    tuner_h.cache[(16, 112, 1, "torch.bfloat16")] = H_CONFIGS[0]
    k.write_fla_tuned_configs(path, "NVIDIA H200")
    tuner_h.cache.clear()
    tuner_h.cache[(64, 112, True, "torch.bfloat16")] = H_CONFIGS[1]
    tuner_h.cache[(16, 112, True, "torch.bfloat16")] = H_CONFIGS[2]  # equal to the earlier (16, 112, 1) key
    doc = k.write_fla_tuned_configs(path, "NVIDIA H200")
    entries = doc["kernels"]["fla.ops.common.chunk_delta_h:kernel_h"]
    assert [(e["key"], e["config"]["num_stages"]) for e in entries] == [
        ([16, 112, True, "torch.bfloat16"], 3),  # this process's choice won
        ([64, 112, True, "torch.bfloat16"], 2),
    ]
    doc = k.write_fla_tuned_configs(path, "NVIDIA H100 80GB HBM3")  # another GPU: the file is replaced, with a note
    assert len(doc["kernels"]["fla.ops.common.chunk_delta_h:kernel_h"]) == 2
    assert "(for NVIDIA H200, {'fla': '0.6.0', 'triton': '3.6.0'}) with choices for NVIDIA H100" in caplog.text
    assert not list(tmp_path.glob("*.tmp"))


def test_write_keeps_the_earlier_file_when_there_is_nothing_to_record_or_the_write_fails(
    fake_fla, tmp_path, monkeypatch
):
    tuner_h, _ = fake_fla
    path = tmp_path / "t.json"
    tuner_h.cache[KEY_H] = H_CONFIGS[0]
    k.write_fla_tuned_configs(path, "NVIDIA H200")
    before = path.read_text()
    tuner_h.cache.clear()
    with pytest.raises(RuntimeError, match="no fla autotune choices in this process"):
        k.write_fla_tuned_configs(path, "NVIDIA H200")
    tuner_h.cache[KEY_H] = H_CONFIGS[1]

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(k.os, "replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        k.write_fla_tuned_configs(path, "NVIDIA H200")
    assert path.read_text() == before and not list(tmp_path.glob("*.tmp"))


def test_write_never_replaces_a_file_that_is_not_a_tuned_configs_file(fake_fla, tmp_path, caplog):
    """A model config, a folder, an empty or unreadable file named by mistake is kept, with a ValueError that names
    it; a tuned-configs file that is damaged or of another format is replaced, with a warning that says why."""
    tuner_h, _ = fake_fla
    tuner_h.cache[KEY_H] = H_CONFIGS[0]
    config = tmp_path / "my_model.json"
    config.write_text(json.dumps({"model_type": "llamathink", "hidden_size": 576}))
    empty, binary, folder = tmp_path / "empty.json", tmp_path / "weights.json", tmp_path / "folder.json"
    empty.write_text("")
    binary.write_bytes(b"\x89\xff\x00 not text")
    folder.mkdir()
    for path in (config, empty, binary, folder):
        before = path.read_bytes() if path.is_file() else None
        with pytest.raises(ValueError, match=rf"{path.name} is not a tuned-configs file, so it is not replaced"):
            k.write_fla_tuned_configs(path, "NVIDIA H200")
        assert (path.read_bytes() if path.is_file() else None) == before and path.exists()
    damaged = tmp_path / "old.json"
    damaged.write_text(json.dumps({"format": 0, "gpu": "NVIDIA H200", "kernels": {}}))
    doc = k.write_fla_tuned_configs(damaged, "NVIDIA H200")
    assert json.loads(damaged.read_text()) == doc and doc["format"] == 1
    assert "(damaged or of another format: format 0 is not 1)" in caplog.text
    assert not list(tmp_path.glob("*.tmp"))


def test_write_through_a_symbolic_link_writes_its_target(fake_fla, tmp_path):
    tuner_h, _ = fake_fla
    tuner_h.cache[KEY_H] = H_CONFIGS[0]
    target = tmp_path / "real.json"
    link = tmp_path / "link.json"
    link.symlink_to(target)
    k.write_fla_tuned_configs(link, "NVIDIA H200")
    assert link.is_symlink() and json.loads(target.read_text())["gpu"] == "NVIDIA H200"


def _file(tmp_path, doc, name="t.json"):
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def _entry(key, kwargs=None, num_warps=4, num_stages=3, num_ctas=1, **more):
    config = {"kwargs": {"BV": 64} if kwargs is None else kwargs, "num_warps": num_warps, "num_stages": num_stages}
    return {"key": key, "config": {**config, "num_ctas": num_ctas, **more}}


def _doc(**overrides):
    doc = {
        "format": 1,
        "gpu": "NVIDIA H200",
        "versions": dict(VERSIONS),
        "kernels": {
            "fla.ops.common.chunk_delta_h:kernel_h": [_entry(list(KEY_H))],
            "fla.ops.gone:kernel_x": [_entry([9])],  # a kernel this fla does not have: skipped
        },
    }
    doc.update(overrides)
    return doc


def test_nothing_given_for_another_version_or_when_switched_off(fake_fla, tmp_path, monkeypatch, caplog):
    tuner_h, _ = fake_fla
    assert k.load_fla_tuned_configs(_file(tmp_path, _doc(versions={"fla": "0.6.1", "triton": "3.6.0"}))) == 0
    assert "measured with {'fla': '0.6.1', 'triton': '3.6.0'}, this process has" in caplog.text  # a named file
    assert k.load_fla_tuned_configs(_file(tmp_path, _doc(versions={"fla": "0.6.0", "triton": "3.7.1"}))) == 0
    assert tuner_h.cache == {}
    path = _file(tmp_path, _doc())
    for off in ("0", "false", "No", " OFF "):  # the words that turn a switch off, in any case
        monkeypatch.setenv(k.FLA_TUNED_CONFIGS_ENV, off)
        assert k.load_fla_tuned_configs(path) == 0
    monkeypatch.setenv(k.FLA_TUNED_CONFIGS_ENV, str(path))  # a path in the variable names the file
    assert k.load_fla_tuned_configs() == 1
    assert tuner_h.cache[KEY_H] is H_CONFIGS[2]


def test_choices_that_are_no_candidate_or_keys_of_another_shape_are_skipped_with_a_warning(fake_fla, tmp_path, caplog):
    tuner_h, _ = fake_fla
    bad = [
        _entry([1, 112, True, "torch.bfloat16"], kwargs={"BV": "sixty-four"}),
        _entry([2, 112, True, "torch.bfloat16"], kwargs={"BV": 64.5}),
        _entry([3, 112, True, "torch.bfloat16"], kwargs={}),
        _entry([4, 112, True, "torch.bfloat16"], num_warps=3),
        _entry([5, 112, True, "torch.bfloat16"], num_stages=64),
        _entry([6, 112, True, "torch.bfloat16"], maxnreg=128),
        _entry([]),
        _entry([9, 112]),  # too short
        _entry([9, 112, True, 7]),  # a dtype position that holds no dtype
    ]
    doc = _doc(kernels={"fla.ops.common.chunk_delta_h:kernel_h": [*bad, _entry([7, 112, True, "torch.float32"])]})
    assert k.load_fla_tuned_configs(_file(tmp_path, doc)) == 1
    assert list(tuner_h.cache) == [(7, 112, True, "torch.float32")]
    assert "9 choices in" in caplog.text and "first in fla.ops.common.chunk_delta_h:kernel_h" in caplog.text


def test_missing_file_or_folder_named_by_the_variable_warns(fake_fla, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(k.FLA_TUNED_CONFIGS_ENV, str(tmp_path / "nope.json"))
    assert k.load_fla_tuned_configs() == 0
    assert "nope.json not used: no such file" in caplog.text
    monkeypatch.setenv(k.FLA_TUNED_CONFIGS_ENV, str(tmp_path))
    assert k.load_fla_tuned_configs() == 0
    assert f"{tmp_path} not used: not a file" in caplog.text


def test_a_file_too_large_for_recorded_choices_is_not_read(fake_fla, tmp_path, monkeypatch, caplog):
    """Recorded choices take kilobytes: a file past the limit (a weights file named by mistake) is named, not read."""
    path = _file(tmp_path, _doc())
    monkeypatch.setattr(k, "_TUNED_FILE_LIMIT", path.stat().st_size - 1)
    monkeypatch.setattr(k.Path, "read_text", lambda *a, **kw: pytest.fail("the file was read"))
    assert k.load_fla_tuned_configs(path) == 0
    assert f"{path} not used: {path.stat().st_size:,} bytes, too large for recorded choices" in caplog.text


def test_an_error_while_loading_is_a_warning_never_an_exception(fake_fla, tmp_path, monkeypatch, caplog):
    def broken():
        raise RuntimeError("a module attribute that raises")

    monkeypatch.setattr(k, "_fla_autotuners", broken)
    assert k.load_fla_tuned_configs(_file(tmp_path, _doc())) == 0
    assert "fla's tuned kernel configs not used: RuntimeError: a module attribute that raises" in caplog.text


def _entry_config(**config):
    return _doc(kernels={"fla.ops.common.chunk_delta_h:kernel_h": [{"key": list(KEY_H), "config": config}]})


@pytest.mark.parametrize(
    ("content", "fault"),
    [
        ("{not json", "Expecting property name"),
        pytest.param("[" * 200000, "recursion", id="deep"),
        ("[1, 2]", "holds a list, not an object"),
        (json.dumps(_doc(format=2)), "format 2 is not 1"),
        (json.dumps(_doc(gpu=7)), "'gpu' is not a string"),
        (json.dumps(_doc(versions=["0.6.0"])), "'versions' is not an object"),
        (json.dumps(_doc(kernels=[])), "'kernels' is not an object"),
        (json.dumps(_doc(kernels={"a:b": {}})), "kernels['a:b'] is not a list"),
        (json.dumps(_doc(kernels={"a:b": [{"key": 9}]})), "kernels['a:b'][0] has no 'key' list"),
        (json.dumps(_doc(kernels={"a:b": [{"key": [[9]]}]})), "kernels['a:b'][0].key holds a value"),
        (json.dumps(_doc(kernels={"a:b": [{"key": [9], "config": {}}]})), "has no 'config' with a 'kwargs' object"),
        (json.dumps(_entry_config(kwargs={"BV": [64]}, num_warps=4, num_stages=1, num_ctas=1)), "kwargs holds a"),
        (json.dumps(_entry_config(kwargs={}, num_warps="4", num_stages=1, num_ctas=1)), "num_warps is '4'"),
        (json.dumps(_entry_config(kwargs={}, num_warps=4, num_stages=-1, num_ctas=1)), "num_stages is -1"),
        (json.dumps(_entry_config(kwargs={}, num_warps=4, num_stages=1, num_ctas=True)), "num_ctas is True"),
        (json.dumps(_entry_config(kwargs={}, num_warps=4, num_stages=1, num_ctas=1, maxnreg=0)), "maxnreg is 0"),
        (b"\xff\xfe{", "can't decode"),
    ],
)
def test_hostile_files_are_ignored_with_a_warning_naming_the_fault(fake_fla, tmp_path, caplog, content, fault):
    tuner_h, _ = fake_fla
    path = tmp_path / "bad.json"
    if isinstance(content, bytes):
        path.write_bytes(content)  # not UTF-8
    else:
        path.write_text(content)
    assert k.load_fla_tuned_configs(path) == 0
    assert tuner_h.cache == {}
    assert f"ignoring fla's tuned kernel configs in {path}" in caplog.text
    assert fault in caplog.text


def test_write_keeps_an_unparsable_earlier_file(fake_fla, tmp_path):
    """A file that does not parse may be anyone's (a hand edit half done): kept, and named."""
    tuner_h, _ = fake_fla
    tuner_h.cache[KEY_H] = H_CONFIGS[0]
    path = _file(tmp_path, "{broken")
    with pytest.raises(ValueError, match=r"is not a tuned-configs file, so it is not replaced: .*JSONDecodeError"):
        k.write_fla_tuned_configs(path, "NVIDIA H200")
    assert path.read_text() == "{broken"


def test_path_of_a_gpu_name():
    assert k.fla_tuned_configs_path("NVIDIA H200").name == "NVIDIA_H200.json"
    assert k.fla_tuned_configs_path("NVIDIA H100 80GB HBM3").name == "NVIDIA_H100_80GB_HBM3.json"
    assert k.fla_tuned_configs_path("../..").name == "unknown_gpu.json"
    assert k.fla_tuned_configs_path("NVIDIA H200").parent == k.FLA_TUNED_CONFIGS_DIR


def test_shipped_files_are_well_formed_and_cover_the_gated_deltanet_path():
    """Every file in the package parses, names its GPU after its file name, records the fla and Triton versions of
    the `hopper` extra, and holds choices for the kernels of the default model's training step."""
    files = sorted(k.FLA_TUNED_CONFIGS_DIR.glob("*.json"))
    assert files, "no tuned fla configs shipped"
    for path in files:
        doc = k._validated_tuned_configs(json.loads(path.read_text()))
        assert k.fla_tuned_configs_path(doc["gpu"]) == path
        assert doc["versions"]["fla"] == "0.6.0"
        names = "\n".join(doc["kernels"])
        for kernel in ("chunk_gated_delta_rule_fwd_kernel_h", "chunk_fwd_kernel_o", "causal_conv1d"):
            assert kernel in names, (path.name, kernel)


def test_another_gpus_file_named_by_the_variable_is_not_used(fake_fla, tmp_path, monkeypatch, caplog):
    tuner_h, _ = fake_fla
    monkeypatch.setattr(k.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(k.torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(k.torch.cuda, "get_device_name", lambda index=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setenv(k.FLA_TUNED_CONFIGS_ENV, str(_file(tmp_path, _doc())))  # an H200 file
    assert k.load_fla_tuned_configs() == 0
    assert tuner_h.cache == {}
    assert "are for NVIDIA H200, not NVIDIA H100 80GB HBM3: not used" in caplog.text
    monkeypatch.setattr(k.torch.cuda, "get_device_name", lambda index=None: "NVIDIA H200")
    assert k.load_fla_tuned_configs() == 1
