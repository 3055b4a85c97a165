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


class FakeAutotuner:
    """What the loader uses of `triton.runtime.autotuner.Autotuner`: `cache` (key tuple -> config), `configs`,
    `keys` and the kernel under `.fn`."""

    def __init__(self, fn, keys):
        self.fn, self.keys, self.configs, self.cache = _jit(fn), keys, ["a", "b"], {}


class Config:
    def __init__(self, kwargs, num_warps, num_stages, num_ctas=1, maxnreg=None):
        self.kwargs, self.num_warps, self.num_stages, self.num_ctas, self.maxnreg = (
            kwargs,
            num_warps,
            num_stages,
            num_ctas,
            maxnreg,
        )

    def as_tuple(self):
        return (self.kwargs, self.num_warps, self.num_stages, self.num_ctas, self.maxnreg)


def make_config(kwargs, num_warps, num_stages, num_ctas, maxnreg):
    return Config(kwargs, num_warps, num_stages, num_ctas, maxnreg)


@pytest.fixture
def fake_fla(monkeypatch):
    """Two fake fla kernel modules: one autotuner bare, one under a heuristics wrapper, one re-exported elsewhere."""

    def kernel_h():
        pass

    def kernel_o():
        pass

    kernel_h.__module__, kernel_h.__qualname__ = "fla.ops.common.chunk_delta_h", "kernel_h"
    kernel_o.__module__, kernel_o.__qualname__ = "fla.ops.common.chunk_o", "kernel_o"
    tuner_h = FakeAutotuner(kernel_h, ["H", "K"])
    tuner_o = FakeAutotuner(kernel_o, ["H", "BT"])
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
    monkeypatch.delenv(k.FLA_TUNED_CONFIGS_ENV, raising=False)
    return tuner_h, tuner_o


def test_choices_round_trip_into_autotuner_caches(fake_fla, tmp_path):
    tuner_h, tuner_o = fake_fla
    assert set(k._fla_autotuners()) == {"fla.ops.common.chunk_delta_h:kernel_h", "fla.ops.common.chunk_o:kernel_o"}
    tuner_h.cache[(9, 112, "torch.bfloat16", True)] = Config({"BV": 64}, 4, 3)
    tuner_o.cache[(9, 64)] = Config({"BK": 64, "BV": 32}, 8, 2, maxnreg=128)
    tuner_o.cache[(9, 32)] = Config({"BK": 32, "BV": 32}, 2, 1)
    path = tmp_path / "NVIDIA_H200.json"
    doc = k.write_fla_tuned_configs(path, "NVIDIA H200", extra={"measured_with": "a test"})
    assert json.loads(path.read_text()) == doc
    assert doc["gpu"] == "NVIDIA H200" and doc["versions"] == VERSIONS and doc["measured_with"] == "a test"
    assert doc["kernels"]["fla.ops.common.chunk_delta_h:kernel_h"] == [
        {
            "key": [9, 112, "torch.bfloat16", True],
            "config": {"kwargs": {"BV": 64}, "num_warps": 4, "num_stages": 3, "num_ctas": 1, "maxnreg": None},
        }
    ]
    assert [e["key"] for e in doc["kernels"]["fla.ops.common.chunk_o:kernel_o"]] == [[9, 32], [9, 64]]

    chosen_o = tuner_o.cache.pop((9, 64))
    tuner_h.cache.clear()
    already = tuner_o.cache[(9, 32)]
    assert k.load_fla_tuned_configs(path, make_config) == 2  # (9, 32) was tuned in this process: kept
    assert tuner_o.cache[(9, 32)] is already
    assert tuner_o.cache[(9, 64)].as_tuple() == chosen_o.as_tuple()
    assert tuner_h.cache[(9, 112, "torch.bfloat16", True)].as_tuple() == ({"BV": 64}, 4, 3, 1, None)
    assert k.load_fla_tuned_configs(path, make_config) == 0  # nothing left to give


def test_write_merges_earlier_entries_of_the_same_gpu_and_versions(fake_fla, tmp_path):
    tuner_h, _ = fake_fla
    path = tmp_path / "t.json"
    tuner_h.cache[(16,)] = Config({"BV": 32}, 4, 2)
    k.write_fla_tuned_configs(path, "NVIDIA H200")
    tuner_h.cache.clear()
    tuner_h.cache[(64,)] = Config({"BV": 64}, 4, 2)
    doc = k.write_fla_tuned_configs(path, "NVIDIA H200")
    assert [e["key"] for e in doc["kernels"]["fla.ops.common.chunk_delta_h:kernel_h"]] == [[16], [64]]
    doc = k.write_fla_tuned_configs(path, "NVIDIA H100 80GB HBM3")  # another GPU: the file is replaced
    assert [e["key"] for e in doc["kernels"]["fla.ops.common.chunk_delta_h:kernel_h"]] == [[64]]
    assert not list(tmp_path.glob("*.tmp"))


def _file(tmp_path, doc, name="t.json"):
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def _doc(**overrides):
    doc = {
        "format": 1,
        "gpu": "NVIDIA H200",
        "versions": dict(VERSIONS),
        "kernels": {
            "fla.ops.common.chunk_delta_h:kernel_h": [
                {"key": [9], "config": {"kwargs": {"BV": 64}, "num_warps": 4, "num_stages": 3, "num_ctas": 1}}
            ],
            "fla.ops.gone:kernel_x": [  # a kernel this fla does not have: skipped
                {"key": [9], "config": {"kwargs": {}, "num_warps": 4, "num_stages": 3, "num_ctas": 1}}
            ],
        },
    }
    doc.update(overrides)
    return doc


def test_nothing_given_for_another_version_or_when_switched_off(fake_fla, tmp_path, monkeypatch):
    tuner_h, _ = fake_fla
    assert (
        k.load_fla_tuned_configs(_file(tmp_path, _doc(versions={"fla": "0.6.1", "triton": "3.6.0"})), make_config) == 0
    )
    assert (
        k.load_fla_tuned_configs(_file(tmp_path, _doc(versions={"fla": "0.6.0", "triton": "3.7.1"})), make_config) == 0
    )
    assert tuner_h.cache == {}
    path = _file(tmp_path, _doc())
    monkeypatch.setenv(k.FLA_TUNED_CONFIGS_ENV, "0")
    assert k.load_fla_tuned_configs(path, make_config) == 0
    monkeypatch.setenv(k.FLA_TUNED_CONFIGS_ENV, str(path))  # a path in the variable names the file
    assert k.load_fla_tuned_configs(None, make_config) == 1
    assert tuner_h.cache[(9,)].as_tuple() == ({"BV": 64}, 4, 3, 1, None)


def test_missing_file_named_by_the_variable_warns(fake_fla, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(k.FLA_TUNED_CONFIGS_ENV, str(tmp_path / "nope.json"))
    monkeypatch.setattr(k, "_fla_state", {})
    assert k.load_fla_tuned_configs(None, make_config) == 0
    assert "nope.json: no such file" in caplog.text


def _entry_config(**config):
    return _doc(kernels={"fla.ops.common.chunk_delta_h:kernel_h": [{"key": [9], "config": config}]})


@pytest.mark.parametrize(
    ("content", "fault"),
    [
        ("{not json", "Expecting property name"),
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
        ("\udcff", "surrogates not allowed"),
    ],
)
def test_hostile_files_are_ignored_with_a_warning_naming_the_fault(
    fake_fla, tmp_path, monkeypatch, caplog, content, fault
):
    tuner_h, _ = fake_fla
    monkeypatch.setattr(k, "_fla_state", {})
    path = tmp_path / "bad.json"
    if content == "\udcff":
        path.write_bytes(b"\xff\xfe{")  # not UTF-8
        fault = "can't decode"
    else:
        path.write_text(content)
    assert k.load_fla_tuned_configs(path, make_config) == 0
    assert tuner_h.cache == {}
    assert f"ignoring fla's tuned kernel configs in {path}" in caplog.text
    assert fault in caplog.text


def test_write_replaces_an_unreadable_earlier_file(fake_fla, tmp_path):
    tuner_h, _ = fake_fla
    tuner_h.cache[(16,)] = Config({"BV": 32}, 4, 2)
    path = _file(tmp_path, "{broken")
    doc = k.write_fla_tuned_configs(path, "NVIDIA H200")
    assert json.loads(path.read_text()) == doc and list(doc["kernels"]) == ["fla.ops.common.chunk_delta_h:kernel_h"]


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
    monkeypatch.setattr(k, "_fla_state", {})
    monkeypatch.setattr(k.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(k.torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(k.torch.cuda, "get_device_name", lambda index=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setenv(k.FLA_TUNED_CONFIGS_ENV, str(_file(tmp_path, _doc())))  # an H200 file
    assert k.load_fla_tuned_configs(None, make_config) == 0
    assert tuner_h.cache == {}
    assert "are for NVIDIA H200, not NVIDIA H100 80GB HBM3: not used" in caplog.text
    monkeypatch.setattr(k.torch.cuda, "get_device_name", lambda index=None: "NVIDIA H200")
    assert k.load_fla_tuned_configs(None, make_config) == 1
