"""Structure tests: every mixer type is known everywhere it must be (model, decode state, FLOP count, exporter,
numpy reference, C runner), and the constants that the exporter and run.c each spell out for the file format agree.

These guard against drift between files that cannot import each other (run.c is C; export_c/export.py does not
import the model), so they read run.c's source text: its `#define LT_*` constants, its `enum`s and the header reads
of `model_init()`.
"""

import re
import struct

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, randomize_, tiny_config

from export_c import export as ex
from export_c import reference
from llamathink import LlamaThinkConfig, LlamaThinkForCausalLM
from llamathink import configuration_llamathink as configuration
from llamathink import modeling_llamathink as modeling

RUN_C = REPO_ROOT / "export_c" / "run.c"


# ---------------------------------------------------------------------------------------------------------------
# run.c's source text
# ---------------------------------------------------------------------------------------------------------------


def _c_source() -> str:
    return re.sub(r"/\*.*?\*/", "", RUN_C.read_text(), flags=re.S)  # comments could hold stale values


def c_defines(prefix: str) -> dict[str, int]:
    """`#define <prefix>NAME <integer>` lines of run.c -> {NAME: value} (hex or decimal, `u` suffix allowed)."""
    found = re.findall(rf"^\s*#define\s+{prefix}(\w+)\s+(0[xX][0-9a-fA-F]+|\d+)[uU]?\s*$", _c_source(), flags=re.M)
    return {name: int(value, 0) for name, value in found}


def c_enum(prefix: str) -> dict[str, int]:
    """The members of run.c's one `enum { <prefix>A = 0, <prefix>B = 1, ... }` -> {A: 0, B: 1, ...}."""
    enums = [body for body in re.findall(r"enum\s*\{([^}]*)\}", _c_source()) if re.search(rf"\b{prefix}\w+", body)]
    assert len(enums) == 1, f"expected one enum of {prefix}* constants in run.c, found {len(enums)}"
    members = {}
    for item in enums[0].split(","):
        match = re.fullmatch(rf"\s*{prefix}(\w+)\s*=\s*(\d+)\s*", item)
        assert match, f"enum member {item.strip()!r} in run.c has no explicit value"
        members[match.group(1)] = int(match.group(2))
    return members


def c_header_reads() -> dict[str, tuple[str, int]]:
    """What `model_init()` reads from fixed header offsets: {field: (reader, offset)}, the field being the name it
    is stored under (`m->vocab = rd_i32(data + 32)` -> "vocab"), or the constant it is compared with
    (`rd_u32(data) != LT_MAGIC` -> "LT_MAGIC")."""
    body = _c_source().split("static int model_init(", 1)[1].split("\n}\n", 1)[0]
    reads = {}
    for name, reader, offset in re.findall(r"(?:m->|\b)(\w+)\s*=\s*(?:\(\w+\))?rd_(\w+)\(data(?: \+ (\d+))?\)", body):
        reads[name] = (reader, int(offset or 0))
    for reader, offset, name in re.findall(r"rd_(\w+)\(data(?: \+ (\d+))?\)\s*!=\s*(?:\(\w+\))?(\w+)", body):
        reads[name] = (reader, int(offset or 0))
    return reads


# ---------------------------------------------------------------------------------------------------------------
# Every mixer type everywhere
# ---------------------------------------------------------------------------------------------------------------


def _one_layer_config(kind: str) -> dict:
    return dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=8,
        linear_value_head_dim=6,
        mixer_types=[kind],
        csa_stride=4,
        csa_window=6,
        max_position_embeddings=64,
        pad_token_id=0,
    )


@pytest.mark.parametrize("kind", configuration.MIXER_TYPES)
def test_every_mixer_type_has_a_class_state_flops_export_code_reference_and_c_code(kind, tmp_path):
    # the model: one class per type, with its own decode state and FLOP term (not inherited from another mixer)
    cls = modeling.MIXER_CLASSES[kind]
    assert modeling.mixer_class(kind) is cls
    for name in ("state_class", "allocate_static_state", "load_static_state", "store_static_state", "flops_per_token"):
        assert name in vars(cls), f"{cls.__name__} does not define {name} itself"
    assert issubclass(cls.state_class, modeling._LayerState)
    config = LlamaThinkConfig(**_one_layer_config(kind))
    assert isinstance(modeling.LlamaThinkCache(config).layers[0], cls.state_class)
    term = cls.flops_per_token(config, 48)
    assert isinstance(term, float) and term > 0
    assert modeling.flops_per_token(config, 48) - modeling.flops_per_token(config, 1) == pytest.approx(
        cls.flops_per_token(config, 48) - cls.flops_per_token(config, 1)
    )

    # the exporter and the C runner: the same code for the type
    assert kind in ex.MIXER_CODES
    c_codes = c_enum("MIX_")
    assert c_codes.get(kind.upper()) == ex.MIXER_CODES[kind], (
        f"run.c has no MIX_{kind.upper()} = {ex.MIXER_CODES[kind]}"
    )
    uses = re.findall(rf"\bMIX_{kind.upper()}\b", _c_source())
    assert len(uses) > 1, f"run.c defines MIX_{kind.upper()} but never dispatches on it"

    # the numpy reference has a branch for the type, and it computes what the PyTorch model computes
    torch.manual_seed(0)
    model = randomize_(LlamaThinkForCausalLM(config).double().eval(), seed=1)
    model.save_pretrained(tmp_path)
    ids = [1] + [int(x) for x in np.random.default_rng(3).integers(2, 64, 20)]  # past the window, 5 blocks
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    got = reference.forward(ex.load_config(str(tmp_path)), ex.load_tensors(str(tmp_path)), ids)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_mixer_type_lists_agree_and_an_unknown_type_is_a_clear_error():
    assert set(modeling.MIXER_CLASSES) == set(configuration.MIXER_TYPES)
    assert set(ex.MIXER_CODES) == set(configuration.MIXER_TYPES)
    assert {name.lower() for name in c_enum("MIX_")} == set(configuration.MIXER_TYPES)
    assert len(set(ex.MIXER_CODES.values())) == len(ex.MIXER_CODES)
    assert len({cls.state_class for cls in modeling.MIXER_CLASSES.values()}) == len(modeling.MIXER_CLASSES)

    with pytest.raises(ValueError, match=r"mixer_types\[1\]='mamba' is not one of"):
        tiny_config(num_hidden_layers=2, mixer_types=["linear", "mamba"])
    with pytest.raises(ValueError, match="unknown mixer type 'mamba'"):
        modeling.mixer_class("mamba")
    # a config that skipped validation (edited after construction) still never runs another mixer's code
    config = tiny_config(num_hidden_layers=2, mixer_types=["linear", "full"])
    config.mixer_types = ["linear", "mamba"]
    with pytest.raises(ValueError, match="unknown mixer type 'mamba'"):
        modeling.LlamaThinkCache(config)
    with pytest.raises(ValueError, match=r"mixer_types\[1\]='mamba' is not one of"):  # the model checks its config
        LlamaThinkForCausalLM(config)
    with pytest.raises(ValueError, match="'mamba'"):
        modeling.flops_per_token(config, 16)
    weights = reference.random_tensors(dict(_one_layer_config("full")))
    with pytest.raises(ValueError, match="'mamba'"):
        reference.forward(dict(_one_layer_config("mamba")), weights, [1, 2, 3])


def _reference_flops_per_token(config: LlamaThinkConfig, seq_len: int) -> float:
    """The FLOP count as train_hf.py computed it before the terms moved onto the mixer classes."""
    with torch.device("meta"):
        model = LlamaThinkForCausalLM(config)
    n_params = sum(
        p.numel() for n, p in model.named_parameters() if not n.endswith(("embed_tokens.weight", "lm_head.weight"))
    )
    n_params += config.vocab_size * config.hidden_size  # the head
    flops = 6.0 * n_params
    D, Hq = config.head_dim, config.num_attention_heads
    for mixer in config.mixer_types:
        if mixer == "full":
            flops += 6.0 * Hq * D * seq_len
        elif mixer == "csa":
            flops += 12.0 * Hq * D * (min(config.csa_window, seq_len) + seq_len / (2 * config.csa_stride))
        else:
            flops += 12.0 * config.linear_num_value_heads * config.linear_key_head_dim * config.linear_value_head_dim
    return flops


@pytest.mark.parametrize("name", ["95m", "tiny", "tiny-untied"])
@pytest.mark.parametrize("seq_len", [1, 37, 1024])
def test_flops_per_token_equals_the_formula_exactly(name, seq_len):
    config = {
        "95m": LlamaThinkConfig,
        "tiny": tiny_config,
        "tiny-untied": lambda: tiny_config(tie_word_embeddings=False, mixer_types=["csa", "full", "linear", "csa"]),
    }[name]()
    assert modeling.flops_per_token(config, seq_len) == _reference_flops_per_token(config, seq_len)  # to the bit


# ---------------------------------------------------------------------------------------------------------------
# The file format: run.c against export.py
# ---------------------------------------------------------------------------------------------------------------


def test_run_c_format_constants_equal_the_exporters():
    defines = c_defines("LT_")
    for name in (
        "MAGIC",
        "VERSION",
        "VERSION_MIN",
        "HEADER_SIZE",
        "ALIGN",
        "MAX_LAYERS",
        "TYPES_OFFSET",
        "EOS_OFFSET",
        "MAX_EOS",
    ):
        assert name in defines, f"run.c has no #define LT_{name}"
        assert defines[name] == getattr(ex, name), f"run.c LT_{name}={defines[name]}, export.py {getattr(ex, name)}"
    dtypes = c_enum("DT_")
    assert {"fp32": dtypes.get("F32"), "bf16": dtypes.get("BF16"), "int8": dtypes.get("I8")} == ex.DTYPES
    assert {name.lower(): code for name, code in c_enum("MIX_").items()} == ex.MIXER_CODES
    # the layer types and the EOS list fit in the header between the fixed fields and the end
    assert ex.EOS_OFFSET >= 144 and ex.EOS_OFFSET + 4 * (1 + ex.MAX_EOS) <= ex.TYPES_OFFSET
    assert ex.TYPES_OFFSET + ex.MAX_LAYERS <= ex.HEADER_SIZE


def test_run_c_reads_every_header_field_where_the_exporter_writes_it():
    """A header written by export.py with a distinct value in every field, read back at the offsets and with the
    types that run.c's model_init() uses: each field must come back as the value the exporter wrote for it."""
    cfg = dict(ex.DEFAULTS)
    cfg.update(
        vocab_size=3001,
        hidden_size=1002,
        intermediate_size=1003,
        num_hidden_layers=5,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=32,
        max_position_embeddings=1007,
        linear_num_key_heads=11,
        linear_num_value_heads=22,
        linear_key_head_dim=13,
        linear_value_head_dim=14,
        linear_conv_kernel_dim=3,
        csa_stride=6,
        csa_window=17,
        hyper_connections=True,
        tie_word_embeddings=False,
        bos_token_id=19,
        eos_token_id=[20, 21, 22],
        rope_theta=12345.5,
        partial_rotary_factor=0.25,
        rms_norm_eps=3e-5,
        mixer_types=["full", "linear", "csa", "linear", "full"],
        csa_blend_bias=-4.0,
    )
    header = ex.header_bytes(cfg, "int8", 64, n_tensors=123, file_size=987654)
    assert len(header) == ex.HEADER_SIZE
    expected = {
        "LT_MAGIC": ex.MAGIC,
        "version": ex.VERSION,
        "LT_HEADER_SIZE": ex.HEADER_SIZE,
        "dtype": ex.DTYPES["int8"],
        "gs": 64,
        "LT_ALIGN": ex.ALIGN,
        "size": 987654,
        "vocab": 3001,
        "dim": 1002,
        "inter": 1003,
        "n_layers": 5,
        "n_heads": 16,
        "n_kv": 4,
        "head_dim": 32,
        "max_pos": 1007,
        "rope_dim": 8,
        "lk_heads": 11,
        "lv_heads": 22,
        "lk_dim": 13,
        "lv_dim": 14,
        "conv_k": 3,
        "csa_stride": 6,
        "csa_window": 17,
        "hyper": 1,
        "tied": 0,
        "bos": 19,
        "eos": 20,
        "n_tensors": 123,
        "rope_theta": 12345.5,
        "rope_frac": 0.25,
        "eps": 3e-5,
        "flags": ex.FLAG_CSA_BLEND_BIAS,
    }
    reads = c_header_reads()
    assert set(reads) == set(expected), "model_init() reads header fields this test does not know (or no longer reads)"
    formats = {"u32": "<I", "i32": "<i", "u64": "<Q", "f64": "<d"}
    for field, (reader, offset) in reads.items():
        (value,) = struct.unpack_from(formats[reader], header, offset)
        assert value == expected[field], f"run.c reads {field} as rd_{reader} at offset {offset}: got {value}"
    (flag,) = re.findall(r"#define LT_FLAG_CSA_BLEND_BIAS (\d+)u", _c_source())
    assert int(flag) == ex.FLAG_CSA_BLEND_BIAS
    # version >= 2: the EOS list at LT_EOS_OFFSET (count, then ids); the mixer codes at LT_TYPES_OFFSET
    assert struct.unpack_from("<4i", header, ex.EOS_OFFSET) == (3, 20, 21, 22)
    assert list(header[ex.TYPES_OFFSET : ex.TYPES_OFFSET + 5]) == [ex.MIXER_CODES[t] for t in cfg["mixer_types"]]


def test_exporter_defaults_equal_the_config_defaults():
    """export.py fills fields missing from a config.json with DEFAULTS: they must be LlamaThinkConfig()'s values."""
    config = LlamaThinkConfig()
    for key, value in ex.DEFAULTS.items():
        ours = getattr(config, key)
        assert type(ours) is type(value) and ours == value, f"export.py DEFAULTS[{key!r}]={value!r}, config {ours!r}"


def _public_definitions_without_docstrings(paths) -> list[str]:
    """Public (no leading underscore) module-level functions and classes, and the public methods of public classes,
    that have no docstring, as "file:line name"."""
    import ast

    missing = []
    for path in paths:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) or node.name.startswith("_"):
                continue
            if not ast.get_docstring(node):
                missing.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno} {node.name}")
            if isinstance(node, ast.ClassDef):
                for sub in node.body:
                    public = isinstance(sub, ast.FunctionDef) and not sub.name.startswith("_")
                    if public and not ast.get_docstring(sub):
                        missing.append(f"{path.relative_to(REPO_ROOT)}:{sub.lineno} {node.name}.{sub.name}")
    return missing


def test_the_packages_public_functions_and_classes_have_docstrings():
    """What users import (the llamathink package, export_c) documents every public function, class and method."""
    paths = sorted((REPO_ROOT / "llamathink").rglob("*.py")) + sorted((REPO_ROOT / "export_c").rglob("*.py"))
    assert len(paths) > 10
    assert _public_definitions_without_docstrings(paths) == []


def test_the_configs_size_limits_are_the_exporters():
    """`LlamaThinkConfig` refuses widths past run.c's limits, as the exporter does (`export.INT_RANGES`): one number
    each, so that a model the config accepts is one the C runner takes."""
    for name, limit in configuration.MAX_SIZES.items():
        assert ex.INT_RANGES[name][1] == limit, name
    assert ex.INT_RANGES["max_position_embeddings"][1] == configuration.MAX_CONTEXT
    assert ex.WIDTH_LIMIT == configuration.MAX_WIDTH and ex.MAX_EOS == configuration.MAX_EOS_IDS
    rope_in_range, _ = ex.FLOAT_FIELDS["rope_theta"]
    assert rope_in_range(configuration.MAX_ROPE_THETA * 0.999) and not rope_in_range(configuration.MAX_ROPE_THETA)
    eps_in_range, _ = ex.FLOAT_FIELDS["rms_norm_eps"]
    assert eps_in_range(0.999) and not eps_in_range(1.0)
    # every size field the exporter bounds, the config bounds (the context and the query widths above)
    assert set(ex.INT_RANGES) - set(configuration.MAX_SIZES) == {"max_position_embeddings"}
