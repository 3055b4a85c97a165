"""Model-core tests: configuration, kernels, mixers against independent references and transformers' Qwen3.5
modules, causality, caching and generate(), padding, saving and remote-code loading."""

import collections
import concurrent.futures
import copy
import itertools
import json
import math
import os
import pickle
import re
import shutil
import subprocess
import sys
import textwrap
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO_ROOT, randomize_, tiny_config, tiny_model
from safetensors import safe_open
from torch._dynamo.testing import CompileCounterWithBackend

from llamathink import LlamaThinkCache, LlamaThinkConfig, LlamaThinkForCausalLM, LlamaThinkModel
from llamathink import kernels_llamathink as kernels
from llamathink import modeling_llamathink as modeling
from llamathink.modeling_llamathink import (
    LlamaThinkAttention,
    LlamaThinkCompressedSparseAttention,
    LlamaThinkGatedDeltaNet,
    LlamaThinkRotaryEmbedding,
    apply_rotary,
    chunked_causal_lm_loss,
    l2norm,
    torch_chunk_gated_delta_rule,
    torch_recurrent_gated_delta_rule,
)

# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------


def test_default_config_is_the_95m_model():
    config = LlamaThinkConfig()
    assert config.mixer_types == ["linear", "linear", "csa", "full"] * 4
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (576, 1536, 16)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert (config.vocab_size, config.bos_token_id, config.eos_token_id) == (32000, 1, 2)
    assert config.rotary_dim == 32 and config.rope_theta == 20000.0 and config.tie_word_embeddings
    with torch.device("meta"):
        model = LlamaThinkForCausalLM(config)
    # tied embeddings counted once; the CSA layers' blend bias (4 x 576) is the measured default's only addition
    assert sum(p.numel() for p in model.parameters()) == 95_717_712
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert (config.csa_window, config.csa_blend_bias) == (512, -4.0)
    with torch.device("meta"):
        seed_gate = LlamaThinkForCausalLM(LlamaThinkConfig(csa_blend_bias=None))
    assert sum(p.numel() for p in seed_gate.parameters()) == 95_715_408  # the seed's count


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(mixer_types=["linear", "full"]), "mixer_types"),
        (dict(mixer_types=["linear", "csa", "full", "mamba"]), "mixer_types[3]"),
        # Qwen3.5's name for the pattern would be stored and ignored
        ({"layer_types": ["linear_attention"] * 3 + ["full_attention"]}, "layer_types is not a LlamaThink setting"),
        (dict(num_attention_heads=5), "num_key_value_heads"),
        (dict(linear_num_value_heads=3), "linear_num_key_heads"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(csa_stride=-4), "csa_stride"),
        (dict(vocab_size=2.5), "vocab_size"),
        (dict(partial_rotary_factor=1.5), "partial_rotary_factor"),
        (dict(rms_norm_eps=0.0), "rms_norm_eps"),
        (dict(eos_token_id=500), "eos_token_id"),
        (dict(decode_cuda_graphs="cpu"), "decode_cuda_graphs"),
        (dict(decode_cuda_graphs=1), "decode_cuda_graphs"),
        ({"A_init_range": 5}, "A_init_range"),
        ({"initializer_range": float("inf")}, "initializer_range"),
        ({"rms_norm_eps": float("inf")}, "rms_norm_eps"),
        ({"eos_token_id": 1.5}, "eos_token_id"),
        ({"mixer_types": "linear"}, "mixer_types"),
        ({"vocab_size": "96"}, "vocab_size"),
        ({"num_hidden_layers": "4", "mixer_types": None}, "num_hidden_layers"),
        ({"csa_blend_bias": "closed"}, "csa_blend_bias"),
        ({"csa_blend_bias": True}, "csa_blend_bias"),
        ({"csa_blend_bias": float("inf")}, "csa_blend_bias"),
        ({"csa_blend_bias": float("nan")}, "csa_blend_bias"),
        ({"tie_word_embeddings": "no"}, "tie_word_embeddings"),
        ({"use_cache": 0}, "use_cache"),
        ({"eos_token_id": []}, "eos_token_id"),
        ({"eos_token_id": [2, None]}, "eos_token_id"),
        ({"pad_token_id": [1]}, "pad_token_id"),
        ({"bos_token_id": [1, 3]}, "bos_token_id"),
        ({"partial_rotary_factor": "0.5"}, "partial_rotary_factor"),
        ({"partial_rotary_factor": True}, "partial_rotary_factor"),
        ({"partial_rotary_factor": None}, "partial_rotary_factor"),
        # RoPE scaling (transformers' rope_parameters / rope_scaling) is refused, not trained unapplied
        ({"rope_scaling": {"rope_type": "linear", "factor": 4.0}}, "no RoPE scaling"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "no RoPE scaling"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}, "no RoPE scaling"),
        ({"rope_parameters": {"rope_type": "default", "factor": 2.0}}, "no RoPE scaling"),
        ({"rope_parameters": "linear"}, "rope_parameters must be a dict"),
        ({"rope_theta": 5.0, "rope_parameters": {"rope_theta": 100.0}}, r"rope_theta=5.0 but rope_parameters"),
        ({"rope_parameters": {"rope_theta": -1.0}}, "rope_theta must be a finite positive number"),
        # spans that would allocate their length in every forward
        ({"csa_stride": 257}, "csa_stride=257 is longer than the context"),
        ({"linear_conv_kernel_dim": 40, "max_position_embeddings": 32}, "linear_conv_kernel_dim=40 is longer than"),
        ({"linear_conv_kernel_dim": 65}, "linear_conv_kernel_dim=65 is past the 64"),
        ({"gdn_chunk_size": 10**9}, "gdn_chunk_size=1000000000 is past 4096"),
        ({"max_position_embeddings": 2**21}, "max_position_embeddings=2097152 is past"),
        ({"vocab_size": 16_000_000}, "vocab_size=16000000 is past the 4,194,304"),
        ({"intermediate_size": 10**9}, "intermediate_size=1000000000 is past"),
        ({"hidden_size": 2**17, "head_dim": 64, "num_attention_heads": 4}, "hidden_size=131072 is past"),
        # counts and widths that would build a million layers or allocate terabytes before any other check
        ({"num_hidden_layers": 513, "mixer_types": ["linear"] * 513}, "num_hidden_layers=513 is past the 512"),
        ({"num_hidden_layers": 4 * 10**12, "mixer_types": None}, "num_hidden_layers=4000000000000 is past the 512"),
        ({"rope_theta": 1e13}, r"rope_theta=10000000000000.0 is past the 1e\+12"),
        ({"rms_norm_eps": 2.0}, "rms_norm_eps must be below 1"),
        ({"eos_token_id": list(range(2, 19))}, "eos_token_id has 17 ids; at most 16"),
        ({"num_attention_heads": 8192, "num_key_value_heads": 1}, "num_attention_heads=8192 is past the 4,096"),
        ({"linear_key_head_dim": 10**6}, "linear_key_head_dim=1000000 is past the 4,096"),
        ({"linear_num_value_heads": 10**5}, "linear_num_value_heads=100000 is past"),
        ({"csa_window": 2**40}, "csa_window=1099511627776 is past the 1,048,576"),
        (
            {"num_attention_heads": 4096, "num_key_value_heads": 1, "head_dim": 512},
            r"attention query width num_attention_heads \* head_dim is 2,097,152, past the 1,048,576",
        ),
        (
            {"linear_num_key_heads": 2048, "linear_num_value_heads": 4096, "linear_key_head_dim": 256},
            r"Gated DeltaNet conv width .* is 1,089,536, past the 1,048,576",
        ),
        # transformers looks a dtype's name up in torch (an AttributeError that names no field)
        ({"dtype": "bfloat17"}, "dtype must be a torch dtype name"),
        ({"torch_dtype": "fp16"}, "torch_dtype must be a torch dtype name"),
        ({"dtype": "Size"}, "dtype must be a torch dtype name"),
        ({"dtype": "torch.float16"}, "dtype must be a torch dtype name"),
        ({"dtype": "auto"}, "dtype must be a torch dtype name"),
        ({"dtype": 16}, "dtype must be a torch dtype name"),
    ],
)
def test_config_rejects_inconsistent_values(overrides, field):
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        tiny_config(**overrides)


def test_config_takes_the_default_rope_from_transformers_rope_parameters(tmp_path):
    """transformers 5.x spells RoPE settings in `rope_parameters` (older configs in `rope_scaling`): the default
    RoPE given there is the model's `rope_theta` / `partial_rotary_factor` (the same logits as those fields), and the
    saved config holds the fields alone, so it loads back as it was."""
    ids = torch.randint(1, 96, (1, 24), generator=torch.Generator().manual_seed(0))
    parameters = {"rope_type": "default", "rope_theta": 100.0, "partial_rotary_factor": 0.5}
    config = tiny_config(rope_parameters=parameters)
    assert (config.rope_theta, config.partial_rotary_factor) == (100.0, 0.5)
    assert "rope_parameters" not in config.to_dict() and "rope_scaling" not in config.to_dict()
    assert tiny_config(rope_scaling={"type": "default"}).rope_theta == 20000.0
    with torch.no_grad():
        got = tiny_model(seed=1, rope_parameters=parameters)(ids).logits
        want = tiny_model(seed=1, rope_theta=100.0)(ids).logits
        default = tiny_model(seed=1)(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.allclose(default, want)  # the base matters on these positions: the check can fail
    config.save_pretrained(tmp_path)
    assert LlamaThinkConfig.from_pretrained(tmp_path).rope_theta == 100.0


def test_a_saved_config_with_a_rope_dict_it_never_applied_loads_as_trained(tmp_path):
    """Earlier LlamaThink versions took any `rope_scaling` / `rope_parameters`, trained with the default RoPE at the
    `rope_theta` field, and `save_pretrained` wrote the dict out. Such a saved folder loads as the model it is (the
    same logits, with a warning that says to delete the key), for a scaling dict and for a default dict whose
    rope_theta disagrees with the field; a fresh config with either is refused (the tests above), and so are
    `from_pretrained` keyword overrides that ask for scaling, which transformers would otherwise drop unseen,
    while a default override's rope_theta is taken."""
    ids = torch.randint(1, 96, (1, 24), generator=torch.Generator().manual_seed(0))
    model = tiny_model(seed=1, rope_theta=1000.0)
    model.save_pretrained(tmp_path / "plain")
    with torch.no_grad():
        want = model(ids).logits
    for extra in (
        {"rope_parameters": {"rope_type": "linear", "factor": 4.0}},
        {"rope_scaling": {"type": "dynamic", "factor": 2.0}, "rope_parameters": {"rope_theta": 20000.0}},
    ):
        folder = tmp_path / max(extra)
        shutil.copytree(tmp_path / "plain", folder, dirs_exist_ok=True)
        fields = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**fields, **extra}))
        with pytest.warns(UserWarning, match=r"never applied: its model has the default RoPE at rope_theta=1000.0"):
            loaded = LlamaThinkForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
        assert loaded.config.rope_theta == 1000.0 and "rope_parameters" not in loaded.config.to_dict()
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no RoPE scaling"):
        LlamaThinkConfig.from_pretrained(tmp_path / "plain", rope_scaling={"rope_type": "yarn", "factor": 4.0})
    override = {"rope_type": "default", "rope_theta": 500.0}
    assert LlamaThinkConfig.from_pretrained(tmp_path / "plain", rope_parameters=override).rope_theta == 500.0


def test_a_csa_window_past_the_context_is_the_context():
    """A window longer than the context (the default 512 in a smaller model, or 2^20, the largest the config takes:
    TBs of padding in the first forward of a 2^40 window before the layers took min(window, context)) sees what a
    window of the whole context sees: the same logits, cached and not, with buffers of the context's length."""
    ids = torch.randint(1, 96, (2, 40), generator=torch.Generator().manual_seed(3))
    models = [tiny_model(csa_window=window, max_position_embeddings=64, seed=5).eval() for window in (64, 2**20)]
    assert models[1].model.layers[1].mixer.window == 64
    with torch.no_grad():
        logits = [m(ids).logits for m in models]
        generated = [m.generate(ids[:, :10], max_new_tokens=20, do_sample=False) for m in models]
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=0)
    assert torch.equal(generated[1], generated[0])


def test_a_config_edited_after_it_was_built_is_checked_by_the_model_and_by_save(tmp_path):
    """transformers configs are often edited in place; a LlamaThink config edited into an inconsistent one is
    refused by name when a model is built from it (not 16 frames deep in a layer) and when it is saved (the file
    would not load again), and nothing is written."""
    config = tiny_config()
    config.num_hidden_layers = 2
    with pytest.raises(ValueError, match="mixer_types has 4 entries but num_hidden_layers=2"):
        LlamaThinkForCausalLM(config)
    config = tiny_config()
    config.num_key_value_heads = 3
    with pytest.raises(ValueError, match="num_key_value_heads=3"):
        LlamaThinkForCausalLM(config)
    model = LlamaThinkForCausalLM(tiny_config())
    model.config.num_hidden_layers = 8
    with pytest.raises(ValueError, match="mixer_types has 4 entries but num_hidden_layers=8"):
        model.save_pretrained(tmp_path / "edited")
    assert not (tmp_path / "edited" / "config.json").exists()
    # from_pretrained's keyword overrides are set after __init__'s checks: checked again
    from transformers import AutoConfig

    model.config.num_hidden_layers = 4
    model.config.save_pretrained(tmp_path / "saved")
    with pytest.raises(ValueError, match="gdn_chunk_size=1048576 is past 4096"):
        LlamaThinkConfig.from_pretrained(tmp_path / "saved", gdn_chunk_size=1 << 20)
    with pytest.raises(ValueError, match="num_key_value_heads=3"):
        AutoConfig.from_pretrained(tmp_path / "saved", num_key_value_heads=3)


@pytest.mark.parametrize(
    "field, value",
    [("rms_norm_eps", 1e-2), ("rope_theta", 100.0), ("csa_window", 8), ("csa_stride", 2), ("head_dim", 24)],
)
def test_a_config_edited_after_the_model_was_built_is_not_saved_as_the_models(tmp_path, field, value):
    """The layers copy their norm epsilon, RoPE base, CSA settings and head layout when they are built, and the
    weights do not record them, so a valid edit of `model.config` afterwards changes nothing the model computes: a
    config.json saved with it would reload as another model (other logits). `save_pretrained` refuses it, naming
    the field with both values, and writes nothing; set back (also as an equal value of another type), the model
    saves and reloads to the same logits; a new model built from the edited config is saved as it is."""
    model = randomize_(LlamaThinkForCausalLM(tiny_config()), seed=5).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    before = getattr(model.config, field)
    setattr(model.config, field, value)
    if field == "head_dim":  # (the same projection widths: half the heads of twice the width)
        model.config.num_attention_heads //= 2
        model.config.num_key_value_heads //= 2
    with pytest.raises(
        ValueError, match=rf"edited after the model was built \(.*\b{field}\b.*?: built with {before!r}, now"
    ):
        model.save_pretrained(tmp_path / "edited")
    assert not (tmp_path / "edited").exists()
    edited = LlamaThinkForCausalLM(copy.deepcopy(model.config))  # built from the edited config: saved as it is
    edited.save_pretrained(tmp_path / "rebuilt")
    assert getattr(LlamaThinkConfig.from_pretrained(tmp_path / "rebuilt"), field) == value
    if field == "head_dim":
        model.config.num_attention_heads *= 2
        model.config.num_key_value_heads *= 2
    setattr(model.config, field, int(before) if isinstance(before, float) and before == int(before) else before)
    model.save_pretrained(tmp_path / "back")
    reloaded = LlamaThinkForCausalLM.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_edits_the_weights_record_or_that_keep_the_function_are_saved(tmp_path):
    """What `save_pretrained`'s check of config edits lets through, because the saved model computes what the
    model did: embeddings untied (`tie_word_embeddings` false, as PEFT's merge of a trained head sets it), layers
    removed with the config to match, a shorter context than the CSA window (the same attention on every sequence
    it allows), a longer one where the window stays inside it. A longer context past a window that the built
    layers cut to the old context is refused."""
    model = randomize_(LlamaThinkForCausalLM(tiny_config()), seed=6).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone() + 0.1)
    model.config.tie_word_embeddings = False
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers, model.config.mixer_types = 2, model.config.mixer_types[:2]
    model.config.max_position_embeddings = model.config.csa_window // 2  # 8 < the window (16)
    model.save_pretrained(tmp_path / "edited")
    reloaded = LlamaThinkForCausalLM.from_pretrained(tmp_path / "edited").eval()
    with torch.no_grad():  # (the window cut to the context runs other kernels: float rounding apart)
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    model = randomize_(LlamaThinkForCausalLM(tiny_config()), seed=6).eval()
    model.config.max_position_embeddings *= 2  # 512: the window (16) stays inside it
    model.save_pretrained(tmp_path / "longer")
    small = randomize_(LlamaThinkForCausalLM(tiny_config(max_position_embeddings=8)), seed=6)  # window cut to 8
    small.config.max_position_embeddings = 64
    with pytest.raises(ValueError, match=r"csa_window \(as the layers use it.*\): built with 8, now 16"):
        small.save_pretrained(tmp_path / "small")


@pytest.mark.parametrize(
    "edit, named",
    [
        (lambda m: setattr(m.config, "tie_word_embeddings", False), r"tie_word_embeddings: the model's True, the co"),
        (lambda m: setattr(m.config, "hidden_size", 32), r"hidden_size: the model's 48, the config's 32; shapes"),
        (lambda m: setattr(m.config, "vocab_size", 80), r"vocab_size: the model's 96, the config's 80"),
        (lambda m: setattr(m.config, "intermediate_size", 64), r"shapes model\.layers\.0\.mlp\.gate_proj\.weight"),
        (lambda m: setattr(m.config, "hyper_connections", False), r"hyper_connections: the model's True, the con"),
        (lambda m: setattr(m.config, "linear_conv_kernel_dim", 3), r"conv1d\.weight \(72, 1, 4\) where the config"),
        (lambda m: setattr(m.config, "mixer_types", ["full"] * 4), r"mixer_types: the model's \['linear', 'csa'"),
        (lambda m: setattr(m.model, "layers", m.model.layers[:2]), r"num_hidden_layers: the model's 2, the config's 4"),
    ],
    ids=["untied", "hidden", "vocab", "mlp", "hyper", "conv", "mixers", "layers-cut"],
)
def test_a_config_that_does_not_describe_the_weights_is_not_saved(tmp_path, edit, named):
    """Fields the weights record, edited in `model.config` alone (or layers removed with the config left as it
    was), saved a folder that did not load again (missing or misshapen tensors), or that would tie an output head
    trained on its own: `save_pretrained` refuses, naming the field and the tensors, and writes nothing. A config
    edited into a mixer pattern other than the layers' is named by the next cached forward too (its cache would
    not fit the layers), while an uncached forward computes as built."""
    model = randomize_(LlamaThinkForCausalLM(tiny_config()), seed=7).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    with torch.no_grad():
        before = model(ids, use_cache=False).logits
    edit(model)
    with pytest.raises(ValueError, match=rf"cannot save to .*config does not describe its weights \(.*{named}"):
        model.save_pretrained(tmp_path / "edited")
    assert not (tmp_path / "edited").exists()
    if named.startswith("tie_word_embeddings"):  # an output head of its own, equal to the embeddings: saved
        model.config.tie_word_embeddings = True  # (as PEFT's unload() leaves a tied model's head under
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # modules_to_save)
        model.save_pretrained(tmp_path / "equal")
        with torch.no_grad():
            reloaded = LlamaThinkForCausalLM.from_pretrained(tmp_path / "equal").eval()
            torch.testing.assert_close(reloaded(ids, use_cache=False).logits, before, rtol=0, atol=0)
        with torch.no_grad():
            model.lm_head.weight.add_(0.5)
        with pytest.raises(ValueError, match="tie_word_embeddings: the model's False, the config's True"):
            model.save_pretrained(tmp_path / "different")
    if model.config.mixer_types == ["full"] * 4:
        with pytest.raises(ValueError, match=r"config\.mixer_types \['full'.*does not name this model's layers"):
            model(ids)
        with torch.no_grad():
            torch.testing.assert_close(model(ids, use_cache=False).logits, before, rtol=0, atol=0)


def test_a_middle_layer_removed_is_named_by_a_cached_forward_until_the_layers_are_numbered_again(tmp_path):
    """A middle layer removed with the config kept in step (as the README allows) saves and reloads, but the kept
    layers keep their built cache indices (0, 2, 3 of three layers): a cached forward failed deep in a mixer, or
    read another layer's state. It is named, with the fix; numbered again, the model generates as its reload."""
    model = randomize_(LlamaThinkForCausalLM(tiny_config()), seed=8).eval()
    del model.model.layers[1]
    model.config.num_hidden_layers, model.config.mixer_types = 3, ["linear", "full", "linear"]
    ids = torch.randint(3, model.config.vocab_size, (1, 6))
    with pytest.raises(ValueError, match=r"cache indices \(layer_idx\) are \[0, 2, 3\], not their positions 0\.\.2"):
        model.generate(ids, max_new_tokens=3, do_sample=False)
    with torch.no_grad():
        uncached = model(ids, use_cache=False).logits  # (no cache: computed as built)
    model.save_pretrained(tmp_path / "pruned")
    reloaded = LlamaThinkForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    for i, layer in enumerate(model.model.layers):
        layer.mixer.layer_idx = i
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids, use_cache=False).logits, uncached, rtol=0, atol=0)
        expected = reloaded.generate(ids, max_new_tokens=5, do_sample=False)
        assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False), expected)


def test_output_attentions_is_refused_by_the_config_and_by_the_forward():
    """LlamaThink has no attention matrix to return (linear and compressed mixers): asking for one, in the config
    (where transformers' models take their default) or in the call, is a ValueError naming it, not a result
    without attentions."""
    with pytest.raises(ValueError, match="output_attentions=true is not supported"):
        tiny_config(output_attentions=True)
    model = LlamaThinkForCausalLM(tiny_config()).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 6))
    with pytest.raises(ValueError, match="output_attentions is not supported"):
        model(ids, output_attentions=True)
    model.config._output_attentions = True  # set after the build (transformers' setter allows it with eager attention)
    with pytest.raises(ValueError, match="output_attentions is not supported.*the config\\)"):
        model(ids)
    assert model(ids, output_attentions=False).logits.shape == (1, 6, model.config.vocab_size)


def test_config_takes_dtypes_by_name_and_a_saved_bad_one_is_named(tmp_path):
    """`dtype` / `torch_dtype` as transformers takes them (a torch dtype or its attribute name in torch); a
    config.json whose dtype names no torch dtype is refused by AutoConfig with the field named."""
    from transformers import AutoConfig

    for value in (torch.bfloat16, "bfloat16", "float16", "float32", None):
        tiny_config(dtype=value)
        tiny_config(torch_dtype=value)
    saved = tiny_config().to_dict() | {"dtype": "bfloat17"}
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="dtype must be a torch dtype name .* got 'bfloat17'"):
        AutoConfig.from_pretrained(tmp_path)


def test_config_takes_numpy_numbers_as_the_python_numbers_they_hold(tmp_path):
    """A value computed with numpy (np.int64, np.float32, in a list too) was refused with a message that
    contradicted itself ("rope_theta must be a finite positive number, got np.float32(10000.0)"): it is taken as
    the Python number, and the config saves and loads as JSON; a numpy value out of range is still refused."""
    import numpy as np

    config = tiny_config(rope_theta=np.float32(1e4), hidden_size=np.int64(64), A_init_range=[np.float64(1.0), 16])
    assert (config.rope_theta, config.hidden_size, config.A_init_range) == (1e4, 64, [1.0, 16])
    assert type(config.hidden_size) is int and type(config.A_init_range[0]) is float
    config.save_pretrained(tmp_path)
    assert LlamaThinkConfig.from_pretrained(tmp_path).hidden_size == 64
    with pytest.raises(ValueError, match="hidden_size must be a positive integer, got 0"):
        tiny_config(hidden_size=np.int64(0))


def test_config_names_allowed_mixer_values():
    with pytest.raises(ValueError, match=r"\['linear', 'csa', 'full'\]"):
        tiny_config(mixer_types=["linear", "csa", "full", "attention"])


def test_config_json_round_trip(tmp_path):
    config = tiny_config(hyper_connections=False, csa_window=8)
    config.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["model_type"] == "llamathink" and raw["mixer_types"] == config.mixer_types
    again = LlamaThinkConfig.from_pretrained(tmp_path)
    assert again.to_dict() == config.to_dict()


# ---------------------------------------------------------------------------------------------------------------
# Gated delta rule kernels
# ---------------------------------------------------------------------------------------------------------------


def _gdn_inputs(B=2, T=37, H=3, Dk=8, Dv=6, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    q = l2norm(torch.randn(B, T, H, Dk, generator=gen, dtype=dtype))
    k = l2norm(torch.randn(B, T, H, Dk, generator=gen, dtype=dtype))
    v = torch.randn(B, T, H, Dv, generator=gen, dtype=dtype)
    g = -F.softplus(torch.randn(B, T, H, generator=gen, dtype=dtype))  # log-decay <= 0
    beta = torch.rand(B, T, H, generator=gen, dtype=dtype)
    s0 = torch.randn(B, H, Dk, Dv, generator=gen, dtype=dtype)
    return q, k, v, g, beta, s0


def _naive_delta_rule(q, k, v, g, beta, scale, s0):
    """The definition, literally: S_t = a S + beta k (v - a S^T k)^T, o = S^T (scale q), one head at a time."""
    B, T, H, _ = q.shape
    out = torch.zeros(B, T, H, v.shape[-1], dtype=v.dtype)
    state = s0.clone()
    for b in range(B):
        for h in range(H):
            S = state[b, h]
            for t in range(T):
                a = g[b, t, h].exp()
                kt, vt = k[b, t, h], v[b, t, h]
                S = a * S + beta[b, t, h] * torch.outer(kt, vt - a * S.T @ kt)
                out[b, t, h] = S.T @ (scale * q[b, t, h])
            state[b, h] = S
    return out, state


def test_recurrent_delta_rule_matches_definition():
    q, k, v, g, beta, s0 = _gdn_inputs(B=1, T=9, H=2)
    o, s = torch_recurrent_gated_delta_rule(q, k, v, g, beta, 0.4, s0, True)
    o_ref, s_ref = _naive_delta_rule(q, k, v, g, beta, 0.4, s0)
    torch.testing.assert_close(o, o_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s, s_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("T, chunk", [(37, 16), (64, 16), (5, 16), (1, 8), (50, 64)])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_equals_recurrent_forward_and_gradients(T, chunk, with_state):
    inputs = [x.requires_grad_() for x in _gdn_inputs(T=T)]
    q, k, v, g, beta, s0 = inputs
    init = s0 if with_state else None
    o1, s1 = torch_chunk_gated_delta_rule(q, k, v, g, beta, 0.35, init, True, chunk_size=chunk)
    o2, s2 = torch_recurrent_gated_delta_rule(q, k, v, g, beta, 0.35, init, True)
    torch.testing.assert_close(o1, o2, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s1, s2, rtol=1e-10, atol=1e-10)
    gen = torch.Generator().manual_seed(1)
    w_o, w_s = (
        torch.randn(o1.shape, generator=gen, dtype=o1.dtype),
        torch.randn(s1.shape, generator=gen, dtype=s1.dtype),
    )
    grads1 = torch.autograd.grad((o1 * w_o).sum() + (s1 * w_s).sum(), inputs, allow_unused=True)
    grads2 = torch.autograd.grad((o2 * w_o).sum() + (s2 * w_s).sum(), inputs, allow_unused=True)
    for name, a, b in zip("q k v g beta s0".split(), grads1, grads2):
        if not with_state and name == "s0":
            assert a is None and b is None
            continue
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=f"gradient of {name}")


def test_chunked_delta_rule_state_hand_off():
    """Running two halves with the state handed over equals one run (what prefill + continuation relies on)."""
    q, k, v, g, beta, s0 = _gdn_inputs(T=40)
    o, s = torch_chunk_gated_delta_rule(q, k, v, g, beta, 0.3, s0, True, chunk_size=16)
    oa, sa = torch_chunk_gated_delta_rule(*(x[:, :23] for x in (q, k, v, g, beta)), 0.3, s0, True, chunk_size=16)
    ob, sb = torch_chunk_gated_delta_rule(*(x[:, 23:] for x in (q, k, v, g, beta)), 0.3, sa, True, chunk_size=16)
    torch.testing.assert_close(torch.cat((oa, ob), 1), o, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sb, s, rtol=1e-10, atol=1e-10)


def test_chunked_delta_rule_is_finite_in_bf16_with_strong_decay():
    q, k, v, g, beta, _ = _gdn_inputs(T=130, dtype=torch.float32)
    g = g * 40  # exp(G) underflows within a chunk: the masked-before-exp form must stay finite
    o, s = torch_chunk_gated_delta_rule(q.bfloat16(), k.bfloat16(), v.bfloat16(), g, beta, 0.3, None, True)
    assert o.dtype == torch.bfloat16 and torch.isfinite(o).all() and torch.isfinite(s).all()
    o_ref, _ = torch_recurrent_gated_delta_rule(q, k, v, g, beta, 0.3, None, True)
    torch.testing.assert_close(o.float(), o_ref, rtol=0.05, atol=0.05)


# ---------------------------------------------------------------------------------------------------------------
# Mixers against transformers' Qwen3.5 modules and an independent CSA reference
# ---------------------------------------------------------------------------------------------------------------


def _qwen35_text_config(config):
    from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5TextConfig

    qcfg = Qwen3_5TextConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=2,
        layer_types=["linear_attention", "full_attention"],
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        linear_num_key_heads=config.linear_num_key_heads,
        linear_num_value_heads=config.linear_num_value_heads,
        linear_key_head_dim=config.linear_key_head_dim,
        linear_value_head_dim=config.linear_value_head_dim,
        linear_conv_kernel_dim=config.linear_conv_kernel_dim,
        rms_norm_eps=config.rms_norm_eps,
        hidden_act="silu",
        attention_bias=False,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": config.rope_theta,
            "partial_rotary_factor": config.partial_rotary_factor,
        },
    )
    qcfg._attn_implementation = "sdpa"
    return qcfg


def _rope(config, T, B=1, dtype=torch.float32):
    rotary = LlamaThinkRotaryEmbedding(config)
    return rotary(torch.arange(T)[None].expand(B, T), dtype)


def test_full_attention_matches_transformers_qwen3_5_attention():
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5Attention

    config = tiny_config()
    ours = randomize_(LlamaThinkAttention(config, layer_idx=0), seed=3)
    theirs = Qwen3_5Attention(_qwen35_text_config(config), layer_idx=1)
    theirs.load_state_dict(ours.state_dict())  # same parameter names and layouts
    x = torch.randn(2, 29, config.hidden_size)
    cos, sin = _rope(config, 29, B=2)
    from llamathink.modeling_llamathink import ForwardContext

    ctx = ForwardContext(
        position_ids=torch.arange(29)[None].expand(2, 29),
        cos=cos,
        sin=sin,
        valid=None,
        key_valid=None,
        real_lengths=None,
        new_real_lengths=None,
        cache=None,
        rotary=None,
    )
    expected, _ = theirs(x, position_embeddings=(cos, sin), attention_mask=None)
    torch.testing.assert_close(ours(x, ctx), expected, rtol=1e-5, atol=1e-5)


def test_gated_deltanet_matches_transformers_qwen3_5_gated_deltanet():
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5GatedDeltaNet

    config = tiny_config()
    ours = randomize_(LlamaThinkGatedDeltaNet(config, layer_idx=0), seed=4)
    theirs = Qwen3_5GatedDeltaNet(_qwen35_text_config(config), layer_idx=0)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 70, config.hidden_size)  # longer than transformers' 64-token chunk
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_gate_projections_are_one_product_equal_to_the_three_and_lora_wrappers_are_called(monkeypatch):
    """`_gate_projections` stacks in_proj_z, in_proj_b and in_proj_a into one matrix product (padded rows) whose
    outputs and weight gradients equal the three projections'; a projection wrapped by another module (PEFT's LoRA)
    is called as a module, so its extra path counts."""
    config = tiny_config(linear_num_value_heads=3, linear_num_key_heads=3)  # 3 x 10 + 2 x 3 = 36 rows: 4 padded
    layer = randomize_(LlamaThinkGatedDeltaNet(config, layer_idx=0), seed=2).double()
    x = torch.randn(2, 5, config.hidden_size, dtype=torch.float64)
    calls = []
    linear = F.linear
    monkeypatch.setattr(F, "linear", lambda *a, **k: calls.append(1) or linear(*a, **k))
    outs = layer._gate_projections(x)
    assert len(calls) == 1 and [o.shape[-1] for o in outs] == [layer.value_dim, 3, 3]
    projections = (layer.in_proj_z, layer.in_proj_b, layer.in_proj_a)
    refs = [m(x) for m in projections]
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    weights = [torch.randn_like(r) for r in refs]
    grads = torch.autograd.grad(sum((o * w).sum() for o, w in zip(outs, weights)), [m.weight for m in projections])
    ref_grads = torch.autograd.grad(sum((r * w).sum() for r, w in zip(refs, weights)), [m.weight for m in projections])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)
    calls.clear()  # one token per row (decoding): the three products, no weight copy each step
    for out, m in zip(layer._gate_projections(x[:, :1]), projections):
        torch.testing.assert_close(out, m(x[:, :1]), rtol=1e-12, atol=1e-12)
    assert len(calls) == 6

    class LoRALike(torch.nn.Module):  # what PEFT puts in a projection's place: the base layer plus a delta
        def __init__(self, base):
            super().__init__()
            self.base_layer, self.delta = base, torch.nn.Linear(base.in_features, base.out_features, bias=False)

        def forward(self, x):
            return self.base_layer(x) + self.delta(x)

    layer.in_proj_b = LoRALike(layer.in_proj_b).double()
    z, b, _ = layer._gate_projections(x)
    torch.testing.assert_close(b, layer.in_proj_b(x))
    torch.testing.assert_close(z, refs[0])
    assert (b - refs[1]).abs().max() > 1e-3

    # a hook on a plain projection (a user's, or old-style weight_norm's and pruning's pre-hooks) runs
    layer = randomize_(LlamaThinkGatedDeltaNet(config, layer_idx=0), seed=2).double()
    handle = layer.in_proj_a.register_forward_hook(lambda module, args, out: out * 0)
    assert layer._gate_projections(x)[2].abs().max() == 0
    handle.remove()
    assert layer._gate_projections(x)[2].abs().max() > 0


def test_gate_projections_backward_under_autocast_and_with_unused_outputs():
    """The stacked projections' own backward (`_StackedGateProjections`): under bf16 autocast its outputs and
    gradients have the dtypes and values (to bf16 rounding) of the three Linears' autograd, the input's gradient in
    the input's dtype and the weights' in theirs; an output the loss does not use (autograd hands the backward
    zeros for it) adds nothing, and its weight's gradient is zero."""
    config = tiny_config(linear_num_value_heads=3, linear_num_key_heads=3)
    layer = randomize_(LlamaThinkGatedDeltaNet(config, layer_idx=0), seed=4)
    projections = (layer.in_proj_z, layer.in_proj_b, layer.in_proj_a)
    params = [m.weight for m in projections]
    x = torch.randn(2, 7, config.hidden_size, requires_grad=True)
    weights = [torch.randn(2, 7, n) for n in (layer.value_dim, 3, 3)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs, refs = layer._gate_projections(x), [m(x) for m in projections]
    assert [o.dtype for o in outs] == [r.dtype for r in refs] == [torch.bfloat16] * 3
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=1e-2)
    grads = torch.autograd.grad(sum((o.float() * w).sum() for o, w in zip(outs, weights)), [x, *params])
    ref_grads = torch.autograd.grad(sum((r.float() * w).sum() for r, w in zip(refs, weights)), [x, *params])
    for g, r in zip(grads, ref_grads):
        assert g.dtype == r.dtype == torch.float32
        assert ((g - r).norm() / r.norm()).item() < 1e-2

    layer = layer.double()  # only z in the loss: b's and a's incoming gradients are zeros
    x = x.detach().double().requires_grad_()
    z, _, _ = layer._gate_projections(x)
    grads = torch.autograd.grad(z.sum(), [x, layer.in_proj_z.weight, layer.in_proj_b.weight])
    ref_grads = torch.autograd.grad(layer.in_proj_z(x).sum(), [x, layer.in_proj_z.weight])
    torch.testing.assert_close(grads[0], ref_grads[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[1], ref_grads[1], rtol=1e-12, atol=1e-12)
    assert grads[2].abs().max() == 0


def test_gate_projections_without_padding():
    """Stacked rows that already fill a multiple of 8 (4 value heads of 12: 48 + 2 x 4 = 56 rows, no zero rows)
    slice into the three projections' outputs just the same."""
    config = tiny_config(linear_num_value_heads=4, linear_num_key_heads=4, linear_value_head_dim=12)  # 48 + 8 = 56
    layer = randomize_(LlamaThinkGatedDeltaNet(config, layer_idx=0), seed=3).double()
    assert (layer.value_dim + 2 * layer.num_v_heads) % 8 == 0
    x = torch.randn(2, 5, config.hidden_size, dtype=torch.float64)
    for out, m in zip(layer._gate_projections(x), (layer.in_proj_z, layer.in_proj_b, layer.in_proj_a)):
        torch.testing.assert_close(out, m(x), rtol=1e-12, atol=1e-12)


def test_rotary_matches_transformers_qwen3_5_rotary_for_text_positions():
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5TextRotaryEmbedding

    config = LlamaThinkConfig()
    theirs = Qwen3_5TextRotaryEmbedding(_qwen35_text_config(config))
    pos = torch.arange(300)[None]
    cos, sin = LlamaThinkRotaryEmbedding(config)(pos, torch.float32)
    # text positions are the same on the three M-RoPE axes (5.17 wants them [3, B, T]; 5.24 accepts both)
    cos_ref, sin_ref = theirs(torch.zeros(1, dtype=torch.float32), pos[None].expand(3, 1, -1))
    torch.testing.assert_close(cos, cos_ref)
    torch.testing.assert_close(sin, sin_ref)


def test_whole_row_rotary_tables_are_the_forwards_values_made_once_and_static():
    """`whole_rows` gives `forward`'s cos / sin of positions 0 .. T - 1 exactly, as the same tensors on every call,
    views of one table per length whatever the batch (marked static for CUDA graphs: no copy per replay, one address);
    it keeps the most recently used lengths, makes the tables again when the frequencies change (edited in place,
    replaced, module moved), and keeps nothing where a cached table could differ from calling the module: hooks, a
    dispatch mode (FakeTensorMode). Tables first made in inference mode serve training; threads share the cache
    safely. CSA's FlexAttention masks are marked static as well."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    config = tiny_config()
    cpu = torch.device("cpu")
    rotary = LlamaThinkRotaryEmbedding(config)
    for dtype in (torch.float32, torch.bfloat16):
        cos, sin = rotary.whole_rows(3, 11, dtype, cpu)
        ref_cos, ref_sin = rotary(torch.arange(11)[None].expand(3, 11), dtype)
        assert cos.shape == (3, 11, config.rotary_dim) and cos.dtype == dtype
        assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)
        again = rotary.whole_rows(3, 11, dtype, cpu)
        assert again[0] is cos and again[1] is sin
        assert cos._dynamo_static_input_type == sin._dynamo_static_input_type == "unguarded"
        other_batch = rotary.whole_rows(5, 11, dtype, cpu)[0]
        assert other_batch.shape[0] == 5 and other_batch.data_ptr() == cos.data_ptr()  # one table, one address
    # least recently used out: length 11 in float32, used again before each new length, stays
    hot = rotary.whole_rows(3, 11, torch.float32, cpu)[0]
    for T in range(1, 3 * rotary.whole_rows_kept):
        rotary.whole_rows(1, T + 20, torch.float32, cpu)
        assert rotary.whole_rows(3, 11, torch.float32, cpu)[0] is hot
    assert len(rotary._whole_rows) == rotary.whole_rows_kept
    # new frequencies, new tables: edited in place, replaced, or the module moved
    rotary.inv_freq.mul_(0.5)
    edited = rotary.whole_rows(3, 11, torch.float32, cpu)[0]
    assert edited is not hot and torch.equal(edited, rotary(torch.arange(11)[None].expand(3, 11), torch.float32)[0])
    for scale in (2.0, 3.0, 1.0):  # replaced (the old tensors freed: a new one may take their address)
        rotary.inv_freq = rotary.compute_inv_freq() * scale
        made = rotary.whole_rows(3, 11, torch.float32, cpu)[0]
        assert torch.equal(made, rotary(torch.arange(11)[None].expand(3, 11), torch.float32)[0])
    assert torch.equal(made, hot)
    assert not hasattr(copy.deepcopy(rotary), "_whole_rows") and rotary._whole_rows  # copies leave the tables
    wide = LlamaThinkRotaryEmbedding(config)  # wider tables: freed frequencies' memory is soon reused
    wide.rotary_dim = 1024
    for scale in range(300):
        wide.inv_freq = wide.compute_inv_freq() * (1.0 + scale % 7)
        made = wide.whole_rows(1, 3, torch.float32, cpu)[0]
        assert torch.equal(made, wide(torch.arange(3)[None], torch.float32)[0]), scale
    rotary.to(torch.float64)  # a move drops the tables (and keeps the frequencies in float32)
    assert rotary._whole_rows == {} and rotary.inv_freq.dtype == torch.float32
    # a hook sees (and may change) every call's tables: none are kept
    calls = []
    handle = rotary.register_forward_hook(lambda m, a, out: calls.append(1) or tuple(t * 2 for t in out))
    first, second = rotary.whole_rows(3, 7, torch.float32, cpu)[0], rotary.whole_rows(3, 7, torch.float32, cpu)[0]
    assert len(calls) == 2 and first is not second and torch.equal(first, second)
    handle.remove()
    assert torch.equal(rotary.whole_rows(3, 7, torch.float32, cpu)[0], first / 2) and rotary._whole_rows != {}
    with FakeTensorMode(allow_non_fake_inputs=True):
        rotary.whole_rows(2, 13, torch.float32, cpu)
    assert all(key[0] != 13 for key in rotary._whole_rows)
    # first made in inference mode, then used by a training forward with autograd
    with torch.inference_mode():
        rotary.whole_rows(2, 17, torch.float32, cpu)
    x = torch.randn(2, 1, 17, config.rotary_dim, requires_grad=True)
    (apply_rotary(x, *rotary.whole_rows(2, 17, torch.float32, cpu)) ** 2).sum().backward()
    assert x.grad is not None

    # frequencies made in inference mode count no edits: never cached; nor with whole_rows_kept = 0
    with torch.inference_mode():
        frozen = LlamaThinkRotaryEmbedding(config)
    assert torch.equal(frozen.whole_rows(2, 5, torch.float32, cpu)[0], rotary.whole_rows(2, 5, torch.float32, cpu)[0])
    assert not getattr(frozen, "_whole_rows", None)
    off = LlamaThinkRotaryEmbedding(config)
    off.whole_rows_kept = 0
    assert torch.equal(off.whole_rows(2, 5, torch.float32, cpu)[0], frozen.whole_rows(2, 5, torch.float32, cpu)[0])
    assert not getattr(off, "_whole_rows", None)

    # threads share the cache: every call gets its tables, none is lost to another thread's eviction (two lengths
    # kept, threads switched every microsecond: without the lock some call finds its entry gone)
    def hammer(seed):
        for T in np.random.default_rng(seed).integers(1, 6, 1000):
            batch = 1 + int(T) * seed % 5
            cos, _ = rotary.whole_rows(batch, int(T), torch.float32, cpu)
            assert cos.shape[:2] == (batch, T)

    rotary.whole_rows_kept, switch = 2, sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(hammer, range(8)))
    finally:
        sys.setswitchinterval(switch)
        del rotary.whole_rows_kept
    # CSA's FlexAttention masks (cached per shape) are static inputs too
    masks = modeling.csa_block_masks(64, 16, 4, cpu)
    tensors = [t for mask in masks for t in mask.as_tuple(flatten=True) if isinstance(t, torch.Tensor)]
    assert len(tensors) >= 8 and all(t._dynamo_static_input_type == "unguarded" for t in tensors)


def test_the_model_hands_whole_row_rotary_tables_to_compiled_layers_only(monkeypatch):
    """The model's forward gives its layers `whole_rows`' tables when they run compiled on whole rows (training
    forwards), and new tables to eager layers (an uncompiled model, evaluation without autograd) and to rows with
    padding, packed documents or a cache; the loss is the same either way."""
    made = []
    context = modeling.ForwardContext
    monkeypatch.setattr(modeling, "ForwardContext", lambda **kw: made.append(kw["cos"]) or context(**kw))
    ids = torch.randint(3, 96, (2, 9))
    model = tiny_model(dtype=torch.float32).train()
    loss_plain = model(input_ids=ids, labels=ids).loss  # not compiled yet: eager layers
    model.compile_layers(backend="eager")
    loss = model(input_ids=ids, labels=ids).loss
    model(input_ids=ids, position_ids=torch.arange(9)[None].expand(2, 9), labels=ids)
    tables = model.model.rotary_emb.whole_rows(2, 9, torch.float32, torch.device("cpu"))
    assert made[1] is tables[0] and made[2] is tables[0] and made[0] is not tables[0]
    torch.testing.assert_close(loss, loss_plain, rtol=1e-6, atol=0)
    model(input_ids=ids, attention_mask=torch.tensor([[0] + [1] * 8, [1] * 9]), labels=ids)  # left padding
    model(input_ids=ids, position_ids=torch.tensor([list(range(4)) + list(range(5))] * 2), labels=ids)  # packed
    model.eval()
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)  # evaluation: eager layers
        model(input_ids=ids[:, :5], use_cache=True)  # a cache: positions go on from the cached length
    assert len(made) == 7 and all(cos is not tables[0] for cos in made[3:])


def test_embedding_lookup_sums_the_weight_gradient_as_the_embedding_backward():
    """`_EmbeddingIndexAdd` (the CUDA path of `embedding_lookup`) gives `F.embedding`'s output, weight gradient
    (repeated ids summed) and forward-mode derivative; `_index_add_embedding_applies` takes it only for a plain
    float32 / float64 table on CUDA in training, outside deterministic algorithms, and `embedding_lookup` calls the
    module otherwise."""
    torch.manual_seed(0)
    ids = torch.randint(0, 7, (3, 20))  # many repeats
    for dtype in (torch.float64, torch.float32):
        weight = torch.randn(7, 5, dtype=dtype, requires_grad=True)
        grad = torch.randn(3, 20, 5, dtype=dtype)
        out = modeling._EmbeddingIndexAdd.apply(ids, weight)
        (ours,) = torch.autograd.grad(out, weight, grad)
        ref_out = F.embedding(ids, weight)
        (ref,) = torch.autograd.grad(ref_out, weight, grad)
        assert torch.equal(out, ref_out) and ours.dtype == dtype
        exact = torch.zeros(7, 5, dtype=torch.float64).index_add_(0, ids.flatten(), grad.reshape(-1, 5).double())
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(ours.double(), exact, rtol=tol, atol=tol)
        torch.testing.assert_close(ours, ref, rtol=tol, atol=tol)
    import torch.autograd.forward_ad as fwAD

    tangent = torch.randn(7, 5, dtype=torch.float64)
    with fwAD.dual_level():
        dual = modeling._EmbeddingIndexAdd.apply(ids, fwAD.make_dual(weight.detach().double(), tangent))
        assert torch.equal(fwAD.unpack_dual(dual).tangent, F.embedding(ids, tangent))

    def applies(emb, on_cuda=True):
        return modeling._index_add_embedding_applies(emb, on_cuda)

    plain = torch.nn.Embedding(7, 5)
    assert applies(plain) and not applies(plain, on_cuda=False)
    assert not applies(torch.nn.Embedding(7, 5, padding_idx=0))
    assert not applies(torch.nn.Embedding(7, 5, max_norm=1.0))
    assert not applies(torch.nn.Embedding(7, 5, scale_grad_by_freq=True))
    assert not applies(torch.nn.Embedding(7, 5, sparse=True))
    assert not applies(torch.nn.Embedding(7, 5).to(torch.bfloat16))  # 16-bit tables: PyTorch's own backward
    frozen = torch.nn.Embedding(7, 5)
    frozen.weight.requires_grad_(False)
    assert not applies(frozen)
    hooked = torch.nn.Embedding(7, 5)
    handle = hooked.register_forward_hook(lambda m, a, o: None)
    assert not applies(hooked)
    handle.remove()
    assert applies(hooked)
    with torch.no_grad():
        assert not applies(plain)
    torch.use_deterministic_algorithms(True)
    try:
        assert not applies(plain)
    finally:
        torch.use_deterministic_algorithms(False)
    # off CUDA the module itself
    assert modeling.embedding_lookup(plain, ids).grad_fn.name() == "EmbeddingBackward0"


def _naive_csa(mod: LlamaThinkCompressedSparseAttention, x, rotary):
    """CSA computed straight from its definition, one query at a time, with dense loops (batch 1)."""
    T = x.shape[1]
    S, W, D, G = mod.stride, mod.window, mod.head_dim, mod.num_groups
    cos, sin = rotary(torch.arange(T)[None], x.dtype)
    q, k, k_raw, v, gate = mod.project(x, cos, sin)  # [1, H, T, D]
    q, k, k_raw, v = q[0], k[0], k_raw[0], v[0]
    n_blocks = T // S
    kc, vc = [], []
    for j in range(n_blocks):
        mean_k = k_raw[:, j * S : (j + 1) * S].mean(1).reshape(-1)  # [Hkv * D]
        mean_v = v[:, j * S : (j + 1) * S].mean(1).reshape(-1)
        kj = mod.compress_k(mean_k).view(-1, 1, D)  # [Hkv, 1, D]
        c, s = rotary(torch.tensor([[j * S + S // 2]]), x.dtype)
        kc.append(apply_rotary(kj[None], c, s)[0, :, 0])
        vc.append(mod.compress_v(mean_v).view(-1, D))
    out = torch.zeros(T, mod.num_heads * D, dtype=x.dtype)
    bias = mod.blend_proj.bias
    blend = torch.sigmoid(x[0] @ mod.blend_proj.weight.T + (0 if bias is None else bias))  # [T, Hq * D]
    for t in range(T):
        for h in range(mod.num_heads):
            kv = h // G
            lo = max(0, t - W + 1)
            w = torch.softmax(k[kv, lo : t + 1] @ q[h, t] / math.sqrt(D), 0)
            local = w @ v[kv, lo : t + 1]
            visible = [j for j in range(n_blocks) if S * (j + 1) <= t]
            if visible:
                keys = torch.stack([kc[j][kv] for j in visible])
                vals = torch.stack([vc[j][kv] for j in visible])
                comp = torch.softmax(keys @ q[h, t] / math.sqrt(D), 0) @ vals
            else:
                comp = torch.zeros(D, dtype=x.dtype)
            b = blend[t, h * D : (h + 1) * D]
            out[t, h * D : (h + 1) * D] = b * comp + (1 - b) * local
    return mod.o_proj(out * torch.sigmoid(gate[0]))[None]


@pytest.mark.parametrize(
    "T, blend_bias", [(1, None), (3, None), (4, None), (5, None), (23, None), (40, None), (23, -4.0)]
)
def test_csa_matches_naive_definition(T, blend_bias):
    config = tiny_config(csa_window=8, csa_blend_bias=blend_bias)
    mod = LlamaThinkCompressedSparseAttention(config, layer_idx=0).double()
    if blend_bias is not None:  # built on its own (no model init), the blend bias still starts at its value
        assert torch.equal(mod.blend_proj.bias, torch.full_like(mod.blend_proj.bias, blend_bias))
    mod = randomize_(mod, scale=1.0, seed=5)
    rotary = LlamaThinkRotaryEmbedding(config)
    x = torch.randn(1, T, config.hidden_size, dtype=torch.float64)
    from llamathink.modeling_llamathink import ForwardContext

    cos, sin = rotary(torch.arange(T)[None], x.dtype)
    ctx = ForwardContext(
        position_ids=torch.arange(T)[None],
        cos=cos,
        sin=sin,
        valid=None,
        key_valid=None,
        real_lengths=None,
        new_real_lengths=None,
        cache=None,
        rotary=rotary,
    )
    torch.testing.assert_close(mod(x, ctx), _naive_csa(mod, x, rotary), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("T", [5, 8, 23, 24])
def test_csa_pools_a_round_block_count_without_cache(T):
    """Without a cache every row numbers its tokens from 0, so the compressed path pools into ceil(T / S) blocks
    (256 at the seed's T = 1024, S = 4, a key count SDPA runs faster than 257: BENCHMARKS.md, session 37); left
    padding does not change the count (padding goes to the dump slot). With a cache a chunk may start inside a block
    and pools into (T + 2S - 2) // S. The cached prefill and its continuation give the uncached logits."""
    model = randomize_(tiny_model(), seed=2).double().eval()
    layer = next(m.mixer for m in model.model.layers if isinstance(m.mixer, LlamaThinkCompressedSparseAttention))
    S = layer.stride
    pooled = []
    hook = layer.compress_k.register_forward_hook(lambda m, args, out: pooled.append(args[0].shape[1]))
    ids = torch.randint(3, 90, (2, T), generator=torch.Generator().manual_seed(T))
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, :2] = 0
    with torch.no_grad():
        whole = model(ids, attention_mask=mask, use_cache=False).logits
        assert pooled == [-(-T // S)], (pooled, T, S)
        pooled.clear()
        prefill = 3  # the continuation starts inside block 0
        cache = model(ids[:, :prefill], attention_mask=mask[:, :prefill], use_cache=True).cache
        rest = model(ids[:, prefill:], attention_mask=mask, cache=cache).logits
    hook.remove()
    assert pooled == [(prefill + 2 * S - 2) // S, (T - prefill + 2 * S - 2) // S], pooled
    torch.testing.assert_close(rest, whole[:, prefill:], rtol=1e-9, atol=1e-9)


def _flex_csa_model(monkeypatch, **overrides):
    """A float64 tiny model (two CSA layers with head_dim 16) whose forwards build CSA's FlexAttention masks as
    layers compiled by inductor with CUDA graphs would (`compiled_layers`, `compiled_layers_cuda_graphs` and
    `compiled_layers_inductor` set, layers not compiled, so FlexAttention runs its eager reference),
    `uses_flex_window` true on the CPU, and parameters that need no gradient (PyTorch has no FlexAttention backward
    on CPU; the masks are built for forwards with autograd on); and the list of what happened, in order: (T, window,
    stride) for each mask pair built, ("attend", T, blocks) for each CSA layer that took `_attend_flex`."""
    from llamathink import modeling_llamathink

    built = []
    build = modeling_llamathink.csa_block_masks.__wrapped__  # uncached: every forward's request is seen

    def recorded(T, window, stride, device):
        built.append((T, window, stride))
        return build(T, window, stride, device)

    attend = LlamaThinkCompressedSparseAttention._attend_flex

    def attend_flex(self, *args):  # each CSA layer's FlexAttention call, recorded as the mask shape it was given
        built.append(("attend", *args[-1].csa_block_masks[1].shape[-2:]))
        return attend(self, *args)

    monkeypatch.setattr(modeling_llamathink, "csa_block_masks", recorded)
    monkeypatch.setattr(LlamaThinkCompressedSparseAttention, "_attend_flex", attend_flex)
    monkeypatch.setattr(LlamaThinkCompressedSparseAttention, "uses_flex_window", lambda self, device: True)
    dims = {"head_dim": 16, "mixer_types": ["csa", "linear", "csa", "full"], "csa_window": 16, "csa_stride": 4}
    model = randomize_(tiny_model(**(dims | overrides)), seed=3).double()
    model.model.compiled_layers = model.model.compiled_layers_cuda_graphs = model.model.compiled_layers_inductor = True
    return model.requires_grad_(False), built


@pytest.mark.parametrize("T", [1, 3, 4, 5, 16, 37, 70])
def test_csa_flex_attention_matches_the_sdpa_paths(T, monkeypatch):
    """Layers compiled by inductor with CUDA graphs run both CSA paths on whole rows through FlexAttention
    (`_attend_flex`, with the static masks of `csa_block_masks`): the sliding window of W = 16 positions and the completed blocks of S = 4 positions give
    the SDPA paths' logits to float64 rounding, for rows shorter than a block (no block visible: zeros), than the
    window, and longer than both, not a multiple of S. A wrong window edge, block rule, pooling or block RoPE moves
    the logits far more."""
    from llamathink.modeling_llamathink import csa_block_masks

    model, built = _flex_csa_model(monkeypatch)
    ids = torch.randint(3, 90, (2, T), generator=torch.Generator().manual_seed(T))
    flex = model.train()(ids, use_cache=False).logits
    taken = [(T, 16, 4), ("attend", T, -(-T // 4)), ("attend", T, -(-T // 4))]  # the masks, then both CSA layers
    assert built == taken
    model.model.compiled_layers = False
    sdpa = model(ids, use_cache=False).logits
    assert built == taken
    torch.testing.assert_close(flex, sdpa, rtol=1e-10, atol=1e-10)
    # the masks element by element: the window of the query's position and the 15 before it; block j once complete
    from torch.nn.attention.flex_attention import create_mask

    local, blocks = csa_block_masks.__wrapped__(T, 16, 4, torch.device("cpu"))
    t, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    assert torch.equal(create_mask(local.mask_mod, 1, 1, T, T, "cpu")[0, 0], (j <= t) & (t - j < 16))
    nb = -(-T // 4)
    assert blocks.shape[-2:] == (T, nb)
    assert torch.equal(create_mask(blocks.mask_mod, 1, 1, T, nb, "cpu")[0, 0], 4 * (j[:, :nb] + 1) <= t)


def test_csa_flex_window_turns_the_path_off_layer_by_layer(monkeypatch):
    """`flex_window = False` on a CSA layer keeps that layer on its SDPA paths while the others take FlexAttention
    (the first CSA layer's flag decided for every layer); with every layer off no mask is built. The logits stay the
    SDPA model's."""
    model, built = _flex_csa_model(monkeypatch)
    ids = torch.randint(3, 90, (2, 21), generator=torch.Generator().manual_seed(1))
    reference = copy.deepcopy(model)
    reference.model.compiled_layers = False
    want = reference.train()(ids, use_cache=False).logits
    first, second = model.model.layers[0].mixer, model.model.layers[2].mixer
    for off, taken in (([first], 1), ([second], 1), ([first, second], 0)):
        first.flex_window = second.flex_window = True
        for mixer in off:
            mixer.flex_window = False
        built.clear()
        got = model.train()(ids, use_cache=False).logits
        assert built == ([(21, 16, 4)] if taken else []) + [("attend", 21, 6)] * taken, (off, built)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_csa_flex_attention_only_for_compiled_layers_on_whole_rows(monkeypatch):
    """The FlexAttention masks are built (and CSA takes its FlexAttention path) only for a forward of layers compiled
    by inductor with CUDA graphs on whole rows: not with a cache, padding or packed documents, nor where the layers
    run eagerly (forwards without autograd), are compiled without CUDA graphs or by another backend (whose
    FlexAttention is the unfused reference) or are not compiled; each of those forwards still gives the SDPA
    model's logits. On a CPU, and for heads narrower than 16, the path is never taken (no
    FlexAttention backward there; inductor's narrowest)."""
    model, built = _flex_csa_model(monkeypatch)
    ids = torch.randint(3, 90, (2, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, :3] = 0
    packed = torch.cat([torch.arange(10), torch.arange(14)])[None].repeat(2, 1)
    model.train()
    reference = copy.deepcopy(model)
    reference.model.compiled_layers = False
    # one RoPE form for both (the eager model's whole-head tables round apart from the form compiled layers trace,
    # which the stood-in "compiled" layers run here): the logits then agree bit for bit where the paths agree
    monkeypatch.setattr(modeling, "rotary_tables", lambda cos, sin, head_dim: None)

    def same_logits(**kwargs):
        torch.testing.assert_close(model(ids, **kwargs).logits, reference(ids, **kwargs).logits, rtol=0, atol=0)

    for kwargs in ({"use_cache": True}, {"attention_mask": mask, "use_cache": False}, {"position_ids": packed}):
        same_logits(**kwargs)
    with torch.no_grad():
        same_logits(use_cache=False)
    model.model.compiled_layers_cuda_graphs = False
    same_logits(use_cache=False)
    model.model.compiled_layers_cuda_graphs, model.model.compiled_layers_inductor = True, False  # e.g. "cudagraphs"
    same_logits(use_cache=False)
    assert built == []
    model.model.compiled_layers_inductor = True
    model(ids, use_cache=False)
    assert built == [(24, 16, 4), ("attend", 24, 6), ("attend", 24, 6)]
    monkeypatch.undo()
    for dims, device, taken in ((16, "cuda", True), (16, "cpu", False), (12, "cuda", False)):
        config = tiny_config(head_dim=dims)
        layer = LlamaThinkCompressedSparseAttention(config, layer_idx=1)
        assert layer.uses_flex_window(torch.device(device)) is taken, (dims, device)
    layer = LlamaThinkCompressedSparseAttention(tiny_config(head_dim=16), layer_idx=1)
    layer.flex_window = False
    assert not layer.uses_flex_window(torch.device("cuda"))


def test_compile_layers_records_whether_inductor_and_cuda_graphs_run_the_layers():
    """`compile_layers` tells the model how its layers run (what decides CSA's FlexAttention path): CUDA graphs for a
    CUDA-graph mode, inductor's option or the "cudagraphs" backend; inductor (which fuses FlexAttention) unless
    another backend is named."""
    for kwargs, graphs, inductor in (
        ({}, False, True),
        ({"mode": "reduce-overhead"}, True, True),
        ({"options": {"triton.cudagraphs": True}}, True, True),
        ({"backend": "cudagraphs"}, True, False),
        ({"backend": "aot_eager"}, False, False),
    ):
        model = tiny_model().compile_layers(**kwargs)
        assert (model.model.compiled_layers_cuda_graphs, model.model.compiled_layers_inductor) == (graphs, inductor)


def _csa_local_paths(model, ids, mask, positions, weights, prefill: int, cache_mask=None):
    """Every path that runs the CSA local attention, on ids [B, T] (float64 model): logits of plain rows, of left
    padding (`mask` [B, T]), of packed documents (`positions` [B, T] restarting at 0), and of a cached prefill of
    `prefill` tokens continued by the rest (with `cache_mask`, the whole rows' padding mask, or none) -> (the four
    logits [B, *, V], the parameters' gradients of the first three's sum weighted by `weights` [B, T, V])."""
    model.zero_grad()
    outs = [
        model(ids).logits,
        model(ids, attention_mask=mask).logits,
        model(ids, position_ids=positions, use_cache=False).logits,
    ]
    sum((out * weights).sum() for out in outs).backward()
    with torch.no_grad():
        head_mask = None if cache_mask is None else cache_mask[:, :prefill]
        cache = model(ids[:, :prefill], attention_mask=head_mask, use_cache=True).cache
        outs.append(model(ids[:, prefill:], attention_mask=cache_mask, cache=cache).logits)
    return outs, [p.grad.clone() for p in model.parameters()]


def _assert_same_logits_and_grads(got, want):
    """Two `_csa_local_paths` results equal to float64 rounding of a reordered sum."""
    for a, b in zip(got[0], want[0]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_eager_shortcuts_give_their_reference_forms_values(monkeypatch):
    """The eager forward's launch-saving forms against the forms they replace, on every path of the attention
    layers (plain rows, left padding, packed documents, a cached prefill continued; float64): RoPE through
    whole-head tables (`rotary_tables`, `_RotateHalf`), CSA's masks made once per forward and shared by its layers
    (`per_forward`), and each decoder layer's `1 + weight` of its norms and hyper-connection scales in one
    multi-tensor add (`LlamaThinkDecoderLayer._scales`). Each form is taken (counted) before it is turned off. (The
    stacked projections, taken under autocast only: `test_stacked_projections_under_autocast_give_the_modules_values`.)"""
    model = tiny_model(csa_window=8, mixer_types=["csa", "full", "linear", "csa"], num_hidden_layers=4)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 96, (2, 29), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0  # left padding
    positions = torch.cat([torch.arange(11), torch.arange(18)])[None].expand(2, -1)  # two documents a row
    weights = torch.randn(2, 29, 96, dtype=torch.float64, generator=gen)
    taken = collections.Counter()

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            if name != "shared" or (args[0] is not None and args[1] in args[0]):  # (a value another layer made)
                taken[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(torch, "_foreach_add", counting("foreach", torch._foreach_add))
    monkeypatch.setattr(modeling._RotateHalf, "apply", counting("rope", modeling._RotateHalf.apply))
    monkeypatch.setattr(modeling, "per_forward", counting("shared", modeling.per_forward))

    def paths():  # the paths with a cache (`_csa_local_paths`), then training's (no cache): plain rows and padding
        outs, grads = _csa_local_paths(model, ids, mask, positions, weights, prefill=13)
        model.zero_grad()
        extra = [model(ids, use_cache=False).logits, model(ids, attention_mask=mask, use_cache=False).logits]
        sum((out * weights).sum() for out in extra).backward()
        return outs + extra, grads + [p.grad.clone() for p in model.parameters()]

    fast = paths()
    # CSA's second layer takes the first's masks in both training paths (4 each) and packed documents (1)
    assert taken["rope"] >= 2 * 3 * 3 and taken["shared"] == 9, taken
    assert taken["foreach"] == 4 * 7, taken  # every layer of the seven forwards
    monkeypatch.setattr(modeling, "rotary_tables", lambda cos, sin, head_dim: None)
    monkeypatch.setattr(modeling, "per_forward", lambda shared, key, make: make())

    def scales_one_by_one(layer, norm_dtype):  # the norms make their own `1 + weight`; each scale's sum its own
        names = ("mixer_residual_scale", "mixer_sublayer_scale", "mlp_residual_scale", "mlp_sublayer_scale")
        return ((), (), *(1 + getattr(layer, name) for name in names))

    monkeypatch.setattr(modeling.LlamaThinkDecoderLayer, "_scales", scales_one_by_one)
    reference = paths()
    _assert_same_logits_and_grads(fast, reference)


def test_layer_scales_keep_the_norms_float32_sums_and_take_hooked_norms(monkeypatch):
    """`LlamaThinkDecoderLayer._scales`: a bf16 model's norms get `1 + weight` summed in float32, as a norm makes it
    alone (a 16-bit sum would round 1 + w and move every output), so the layer's output is the one of the sums made
    one by one, bit for bit; and a layer whose norms are both hooked (any global module hook), without
    hyper-connections, has no sum to make and runs (an empty multi-tensor add raised)."""
    model = tiny_model(dtype=torch.bfloat16, mixer_types=["full", "linear"], num_hidden_layers=2)
    for p in model.parameters():  # norm weights far from 0, where 1 + w in bf16 drops bits
        if p.dim() == 1:
            p.data.normal_(0, 0.3)
    ids = torch.randint(1, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    norm = model.model.layers[0].input_layernorm
    x = torch.randn(3, norm.weight.shape[0], generator=torch.Generator().manual_seed(1)).bfloat16()
    want = F.rms_norm(x.float(), x.shape[-1:], 1 + norm.weight.float(), norm.eps).bfloat16()
    assert torch.equal(norm(x), want)
    fast = model(ids, use_cache=False).logits

    def scales_one_by_one(layer, norm_dtype):
        names = ("mixer_residual_scale", "mixer_sublayer_scale", "mlp_residual_scale", "mlp_sublayer_scale")
        return ((), (), *(1 + getattr(layer, name) for name in names))

    with monkeypatch.context() as patch:
        patch.setattr(modeling.LlamaThinkDecoderLayer, "_scales", scales_one_by_one)
        assert torch.equal(model(ids, use_cache=False).logits, fast)

    plain = tiny_model(hyper_connections=False, mixer_types=["full", "linear"], num_hidden_layers=2)
    want = plain(ids, use_cache=False).logits
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, args, out: None)
    try:
        # (a global hook also sends GDN's gate projections through their modules: float64 rounding apart)
        torch.testing.assert_close(plain(ids, use_cache=False).logits, want, rtol=1e-10, atol=1e-12)
    finally:
        handle.remove()


def test_stacked_projections_under_autocast_give_the_modules_values(monkeypatch):
    """`stacked_projections` under (CPU bf16) autocast with float32 weights: q, k, v and the MLP's gate and up as
    one product each (counted by the stacked weights' widths), with the logits and every gradient of calling each
    module (the same bf16 casts; products summed in another order: bf16 rounding apart). Without autocast, and for
    hooked projections, each module is called (no stacked copy of the weights kept for the backward)."""
    model = tiny_model(dtype=torch.float32, csa_window=8, mixer_types=["csa", "full", "linear"], num_hidden_layers=3)
    config = model.config
    model.train()
    ids = torch.randint(1, 96, (2, 24), generator=torch.Generator().manual_seed(0))
    attention = config.num_attention_heads * config.head_dim
    widths = {2 * config.intermediate_size, 2 * attention + 2 * config.num_key_value_heads * config.head_dim}
    stacked = []
    linear = F.linear

    def spy(x, weight, *args, **kwargs):
        if weight.shape[0] in widths:
            stacked.append(weight.shape[0])
        return linear(x, weight, *args, **kwargs)

    monkeypatch.setattr(F, "linear", spy)

    def loss_and_grads(autocast=True):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(ids, labels=ids, use_cache=False)
        out.loss.backward()
        return out.logits.float(), {n: p.grad.clone() for n, p in model.named_parameters()}

    logits, grads = loss_and_grads()
    assert sorted(set(stacked)) == sorted(widths) and len(stacked) == 3 + 2  # 3 MLPs, 2 attention layers
    stacked.clear()
    loss_and_grads(autocast=False)
    assert stacked == []  # without autocast: no stack
    hook = model.model.layers[0].mlp.up_proj.register_forward_pre_hook(lambda module, args: None)
    loss_and_grads()
    hook.remove()
    assert len(stacked) == 2 + 2  # the hooked MLP's projections called one by one
    stacked.clear()
    model.double()  # autocast leaves float64 alone: no cast to share, no stack
    loss_and_grads()
    model.float()
    assert stacked == []
    monkeypatch.setattr(modeling, "stacked_projections", lambda x, linears: tuple(m(x) for m in linears))
    ref_logits, ref_grads = loss_and_grads()
    assert (logits - ref_logits).norm() / ref_logits.norm() < 2e-2
    for name, g in ref_grads.items():
        assert (grads[name] - g).norm() <= 5e-2 * g.norm() + 1e-6, name


@pytest.mark.parametrize("weights, autocast", [(torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16)])
def test_sixteen_bit_weights_train_under_the_other_sixteen_bit_autocast(weights, autocast, monkeypatch):
    """Weights stacked for one product (the attention's and MLP's `stacked_projections`, GDN's gate projections)
    under autocast to the other 16-bit dtype: autocast's `cat` has no widest dtype for bf16 and fp16 and raised;
    the stack is made outside autocast (`cat_rows`), and the logits are those of each module called alone (the
    same casts and products)."""
    model = tiny_model(dtype=weights, mixer_types=["linear", "full", "csa"], num_hidden_layers=3, csa_window=8).train()
    ids = torch.randint(1, 96, (2, 12), generator=torch.Generator().manual_seed(0))

    def logits():
        with torch.autocast("cpu", dtype=autocast):
            out = model(ids, use_cache=False).logits.float()
        out.sum().backward()  # (the backward runs too)
        return out.detach()

    stacked = logits()
    monkeypatch.setattr(modeling, "stacked_projections", lambda x, linears: tuple(m(x) for m in linears))
    assert torch.isfinite(stacked).all()
    assert (stacked - logits()).norm() <= 2e-2 * stacked.norm()


def test_constant_caches_keep_no_fake_tensors():
    """A forward under `FakeTensorMode` (shape and memory estimators) makes the constant tables it needs (RoPE's
    index, the q/k norm's weight) without keeping them: a later real forward gives real values, as before it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    model = tiny_model(mixer_types=["csa", "full", "full", "csa"], csa_window=8, num_hidden_layers=4)
    ids = torch.randint(1, 96, (2, 29), generator=torch.Generator().manual_seed(0))
    modeling._rotate_half_index.cache_clear()
    modeling._inverse_sqrt_weight.cache_clear()
    embeds = model.model.embed_tokens(ids).detach()
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = model(inputs_embeds=mode.from_tensor(embeds), use_cache=False).logits
        q = mode.from_tensor(torch.randn(2, 3, 16))
        modeling.l2norm_rms(q)
    assert fake.shape == (2, 29, 96)
    assert modeling._rotate_half_index.cache_info().currsize == 0
    assert modeling._inverse_sqrt_weight.cache_info().currsize == 0
    out = model(inputs_embeds=embeds, use_cache=False).logits
    assert type(out) is torch.Tensor and torch.isfinite(out).all()
    torch.testing.assert_close(out, model(ids, use_cache=False).logits)


def test_rotate_half_takes_forward_ad_and_torch_func():
    """`_RotateHalf` (RoPE through `rotary_tables`) under forward-mode AD (`torch.func.jvp`), `torch.func.grad` and
    `torch.func.vmap`, with the values of `apply_rotary`'s reference form (float64)."""
    gen = torch.Generator().manual_seed(0)
    B, H, T, D, R = 2, 3, 5, 12, 8
    freqs = torch.randn(B, T, R // 2, dtype=torch.float64, generator=gen)
    cos, sin = torch.cat((freqs, freqs), -1).cos(), torch.cat((freqs, freqs), -1).sin()
    tables = modeling.rotary_tables(cos, sin, D)
    x, t = (torch.randn(B, H, T, D, dtype=torch.float64, generator=gen) for _ in range(2))
    w = torch.randn(B, H, T, D, dtype=torch.float64, generator=gen)

    def fast(x):
        return modeling.apply_rotary(x, cos, sin, tables)

    def reference(x):
        return modeling.apply_rotary(x, cos, sin)

    for a, b in zip(torch.func.jvp(fast, (x,), (t,)), torch.func.jvp(reference, (x,), (t,))):
        torch.testing.assert_close(a, b)
    grads = [torch.func.grad(lambda x, f=f: (f(x) * w).sum())(x) for f in (fast, reference)]
    torch.testing.assert_close(grads[0], grads[1])
    torch.testing.assert_close(torch.func.vmap(fast)(torch.stack((x, t))), torch.stack((reference(x), reference(t))))


def test_torch_func_transforms_and_forward_ad_take_the_plain_forms_with_the_same_values():
    """Under torch.func transforms (grad, vmap, jvp, grad over the parameters through `functional_call`) and
    forward-mode AD, the model takes its plain PyTorch forms (`needs_plain_autograd`) instead of its autograd
    Functions without rules for them, which raised (`_StackedGateProjections` in every Gated DeltaNet layer, the
    chunked loss of `skip_logits=True`), and gives the values of ordinary autograd (float64; the forward-mode ones
    under SDPA's math backend, PyTorch's flash attention on CPU having no forward-mode derivative)."""
    import torch.autograd.forward_ad as fwAD
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = tiny_model()  # linear, csa, full, linear
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 96, (2, 9), generator=gen)
    emb = model.get_input_embeddings()(ids).detach()
    tangent, w = (
        torch.randn(emb.shape, dtype=emb.dtype, generator=gen),
        torch.randn(2, 9, 96, dtype=emb.dtype, generator=gen),
    )

    def f(e):
        return model(inputs_embeds=e, use_cache=False).logits

    e = emb.clone().requires_grad_()
    (want,) = torch.autograd.grad((f(e) * w).sum(), e)  # ordinary autograd: the stacked gate projections
    torch.testing.assert_close(torch.func.grad(lambda e: (f(e) * w).sum())(emb), want)
    torch.testing.assert_close(torch.func.vmap(lambda e: f(e[None])[0])(emb), f(emb))
    with sdpa_kernel(SDPBackend.MATH):
        _, want = torch.autograd.functional.jvp(f, emb, tangent)  # ordinary autograd (the double-backward trick)
        torch.testing.assert_close(torch.func.jvp(f, (emb,), (tangent,))[1], want)
        with fwAD.dual_level():
            torch.testing.assert_close(fwAD.unpack_dual(f(fwAD.make_dual(emb, tangent))).tangent, want)
    assert want.abs().max() > 1  # (not a vanishing derivative)
    # grad over the parameters of the chunked loss, against its ordinary backward (both in float64)
    params = dict(model.named_parameters())
    kwargs = {"use_cache": False, "labels": ids, "skip_logits": True}
    loss = torch.func.functional_call(model, params, (ids,), kwargs).loss
    grads = torch.func.grad(lambda p: torch.func.functional_call(model, p, (ids,), kwargs).loss)(params)
    model.zero_grad()
    eager = model(ids, **kwargs).loss
    eager.backward()
    assert loss.dtype == eager.dtype == torch.float64
    torch.testing.assert_close(loss, eager, rtol=1e-13, atol=0)
    for name, p in params.items():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-10, atol=1e-13, msg=name)
    # a cached prefill and one step: forward-mode AD through the CSA layer's stored blocks as reverse mode (the cache
    # holds values only, so neither sees the prefill's part through it)
    csa = tiny_model(mixer_types=["csa"] * 2, num_hidden_layers=2)

    def decode(e):
        cache = csa(inputs_embeds=e[:, :8], use_cache=True).cache
        return csa(inputs_embeds=e[:, 8:], cache=cache, use_cache=True).logits

    with sdpa_kernel(SDPBackend.MATH):
        _, want = torch.autograd.functional.jvp(decode, emb, tangent)
        torch.testing.assert_close(torch.func.jvp(decode, (emb,), (tangent,))[1], want)
    # the embedding's index_add_ path (CUDA training) steps aside under a transform too
    table = torch.nn.Embedding(96, 8)
    seen = []
    torch.func.grad(lambda x: seen.append(modeling._index_add_embedding_applies(table, True)) or x.sum())(emb)
    assert seen == [False] and modeling._index_add_embedding_applies(table, True)


@pytest.mark.parametrize("chunk", [1, 3, 5])
def test_csa_local_chunk_changes_nothing(chunk):
    """The CSA local path's query chunk (`local_chunk`, below the window of 8) gives the same logits and gradients as
    whole-window chunks on every path that runs it: plain rows, left padding, packed documents, and a cached prefill
    continued by a multi-token chunk (float64); and the chunk is the one asked for (every local SDPA call's query
    length, each run's band of C + W keys)."""
    model = tiny_model(csa_window=8, mixer_types=["csa", "linear", "csa"], num_hidden_layers=3)
    gen = torch.Generator().manual_seed(chunk)
    ids = torch.randint(1, 96, (2, 29), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0  # left padding
    positions = torch.cat([torch.arange(11), torch.arange(18)])[None].expand(2, -1)  # two documents a row
    weights = torch.randn(2, 29, 96, dtype=torch.float64, generator=gen)
    csa = [m for m in model.modules() if isinstance(m, LlamaThinkCompressedSparseAttention)]

    def run():
        return _csa_local_paths(model, ids, mask, positions, weights, prefill=13)

    chunks = []  # the query length of each local-path SDPA call: a band of C + W keys for C queries

    def recording(m):
        def grouped_sdpa(q, k, v, mask, **kwargs):
            if k.shape[-2] == q.shape[-2] + m.window:
                chunks.append(q.shape[-2])
            return type(m)._grouped_sdpa(m, q, k, v, mask, **kwargs)

        return grouped_sdpa

    for m in csa:
        m._grouped_sdpa = recording(m)
    whole, whole_grads = run()
    assert all(m.local_chunk >= m.window for m in csa)  # the default chunk (128) holds this window whole
    assert len(chunks) >= 8 and set(chunks) == {8}  # two layers, four paths (every row longer than the window)
    chunks.clear()
    for m in csa:
        m.local_chunk = chunk
    try:
        chunked, chunked_grads = run()
    finally:
        for m in csa:
            del m.local_chunk, m._grouped_sdpa
    assert len(chunks) >= 8 and set(chunks) == {chunk}
    _assert_same_logits_and_grads((chunked, chunked_grads), (whole, whole_grads))


def test_csa_default_chunk_equals_whole_windows_past_128():
    """The default local chunk (128) on a window wider than it (150, as the seed's 512 is): the same logits and
    gradients as whole-window chunks for rows of 300 (chunks that do not divide T), left padding longer than a chunk,
    packed documents, and a cached prefill continued by 140 tokens (float64)."""
    model = tiny_model(csa_window=150, mixer_types=["csa", "linear"], num_hidden_layers=2, max_position_embeddings=512)
    csa = [m for m in model.modules() if isinstance(m, LlamaThinkCompressedSparseAttention)]
    assert csa and all(m.local_chunk == 128 < m.window for m in csa)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 96, (2, 300), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :140] = 0
    positions = torch.cat([torch.arange(90), torch.arange(210)])[None].expand(2, -1)
    weights = torch.randn(2, 300, 96, dtype=torch.float64, generator=gen)

    def run():
        return _csa_local_paths(model, ids, mask, positions, weights, prefill=160, cache_mask=mask)

    chunked, chunked_grads = run()
    for m in csa:
        m.local_chunk = 1 << 30
    whole, whole_grads = run()
    _assert_same_logits_and_grads((chunked, chunked_grads), (whole, whole_grads))


# ---------------------------------------------------------------------------------------------------------------
# Whole model: causality, labels, embeddings, hidden states, errors
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mixer", ["linear", "csa", "full"])
def test_causality_per_mixer_type(mixer):
    model = tiny_model(mixer_types=[mixer] * 2, num_hidden_layers=2, csa_window=8)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 96, (1, 41), generator=gen)
    with torch.no_grad():
        base = model(ids).logits
        for t in (0, 3, 4, 7, 20, 39):
            for k in (1, 5):
                if t + k >= ids.shape[1]:
                    continue
                changed = ids.clone()
                changed[0, t + k] = (changed[0, t + k] + 7) % 96
                out = model(changed).logits
                torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=0)
                assert (out[:, t + k] - base[:, t + k]).abs().max() > 1e-6  # the change is seen where it should be


def test_labels_give_shifted_cross_entropy_ignoring_minus_100(model):
    ids = torch.randint(1, 96, (2, 17))
    labels = ids.clone()
    labels[0, :5] = -100
    labels[1, 10] = -100
    out = model(ids, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, 96)
    target = labels[:, 1:].reshape(-1)
    expected = F.cross_entropy(logits, target, ignore_index=-100)
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-6, atol=1e-6)  # loss is computed in fp32


def test_inputs_embeds_and_hidden_states(model):
    ids = torch.randint(1, 96, (2, 11))
    a = model(ids, output_hidden_states=True)
    b = model(inputs_embeds=model.get_input_embeddings()(ids), output_hidden_states=True)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    assert len(a.hidden_states) == model.config.num_hidden_layers + 1
    torch.testing.assert_close(a.hidden_states[0], model.get_input_embeddings()(ids))
    torch.testing.assert_close(model.lm_head(a.hidden_states[-1]), a.logits)


def test_logits_to_keep(model):
    ids = torch.randint(1, 96, (2, 11))
    full = model(ids).logits
    torch.testing.assert_close(model(ids, logits_to_keep=1).logits, full[:, -1:], rtol=1e-12, atol=1e-12)


def test_bad_inputs_raise_clear_errors(model):
    with pytest.raises(ValueError, match="token id 96, outside the vocabulary"):
        model(torch.tensor([[1, 2, 96]]))
    with pytest.raises(ValueError, match="token id -1"):
        model(torch.tensor([[1, -1]]))
    with pytest.raises(ValueError, match="longer than max_position_embeddings=256"):
        model(torch.ones(1, 257, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(torch.ones(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model()
    with pytest.raises(ValueError, match="padding between real tokens"):
        model(torch.ones(1, 5, dtype=torch.long), attention_mask=torch.tensor([[1, 1, 0, 1, 1]]))
    # the likely cause when generate() made the mask: a prompt that holds the pad token's id
    prompt = torch.tensor([[5, 6, 0, 7]])
    with pytest.raises(ValueError, match="generate\\(\\) makes one from pad_token_id: a prompt that holds"):
        model.generate(prompt, max_new_tokens=1, pad_token_id=0, eos_token_id=2)
    # a cache given with use_cache=False: each step would feed the whole sequence again into it
    for key in ("cache", "past_key_values"):
        with pytest.raises(ValueError, match=r"given a cache \(cache or past_key_values\) and use_cache=False"):
            model.generate(prompt[:, :2], **{key: LlamaThinkCache(model.config)}, use_cache=False, max_new_tokens=2)
    # a right-padded prompt without the cache: the generated tokens follow its padding
    right = torch.tensor([[5, 6, 7, 0, 0], [5, 6, 7, 8, 9]])
    with pytest.raises(ValueError, match="a right-padded prompt gives this once tokens follow its padding: pad"):
        model.generate(right, attention_mask=(right != 0).long(), use_cache=False, max_new_tokens=2, pad_token_id=0)
    assert model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=1, pad_token_id=0).shape == (
        1,
        5,
    )
    with pytest.raises(ValueError, match="labels has shape"):
        model(torch.ones(1, 5, dtype=torch.long), labels=torch.ones(1, 4, dtype=torch.long))
    for bad in (96, -1):  # torch's IndexError on the CPU, a device-side assert on CUDA
        with pytest.raises(ValueError, match=rf"labels contains {bad}: neither -100 \(ignored\) nor a token id"):
            model(torch.ones(1, 3, dtype=torch.long), labels=torch.tensor([[-100, bad, 2]]))
    for dtype in (torch.float32, torch.bool):
        with pytest.raises(ValueError, match=f"labels must be an integer tensor .* got {dtype}"):
            model(torch.ones(1, 3, dtype=torch.long), labels=torch.ones(1, 3, dtype=dtype))
    # ids and labels of the narrower integer types the checks accept are read as int64 (the embedding and
    # cross-entropy take no others): the same loss and logits
    ids = torch.randint(3, 96, (2, 6), generator=torch.Generator().manual_seed(0))
    ref = model(ids, labels=ids)
    for dtype in (torch.int32, torch.int16, torch.uint8):
        out = model(ids.to(dtype), labels=ids.to(dtype))
        assert torch.equal(out.logits, ref.logits) and torch.equal(out.loss, ref.loss), dtype
    with torch.no_grad():
        assert torch.equal(model.model(ids.to(torch.uint8)).last_hidden_state, model.model(ids).last_hidden_state)
    for mask in (torch.full((1, 3), 2), torch.tensor([[0.0, 0.5, 1.0]])):  # 2: transformers would skip a position
        with pytest.raises(ValueError, match=r"attention_mask must hold only 0 \(padding\) and 1"):
            model.generate(torch.ones(1, 3, dtype=torch.long), attention_mask=mask, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"the batch is empty \(0 rows\)"):
        model(torch.zeros(0, 5, dtype=torch.long))
    for width in (4, 6):  # generate() may drop an all-ones mask: its width is still checked, by name
        with pytest.raises(ValueError, match=f"attention_mask has {width} columns but the prompt takes 5 positions"):
            model.generate(torch.ones(2, 5, dtype=torch.long), attention_mask=torch.ones(2, width), max_new_tokens=2)


def test_a_bfloat16_cast_keeps_the_rotary_frequencies_in_float32(tmp_path):
    """`model.to(torch.bfloat16)` and `from_pretrained(..., dtype=torch.bfloat16)` give the same model: the
    rotary frequencies stay fp32 (rounded to bf16 they are 0.3% off, about a radian at position 1000)."""
    model = tiny_model(dtype=torch.float32, max_position_embeddings=1100)
    model.save_pretrained(tmp_path)
    cast = model.to(torch.bfloat16)
    loaded = LlamaThinkForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert cast.model.rotary_emb.inv_freq.dtype == torch.float32
    torch.testing.assert_close(cast.model.rotary_emb.inv_freq, loaded.model.rotary_emb.inv_freq, rtol=0, atol=0)
    ids = torch.randint(1, 96, (1, 1050), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(cast(ids).logits, loaded(ids).logits, rtol=0, atol=0)


def test_too_long_continuation_raises(model):
    out = model(torch.ones(1, 250, dtype=torch.long), use_cache=True)
    with pytest.raises(ValueError, match=r"257 positions \(250 cached \+ 7 new\)"):
        model(torch.ones(1, 7, dtype=torch.long), cache=out.cache)


# ---------------------------------------------------------------------------------------------------------------
# Caching
# ---------------------------------------------------------------------------------------------------------------


def _state_tensors(cache: LlamaThinkCache):
    for i, layer in enumerate(cache.layers):
        for name in layer.fields:
            value = getattr(layer, name)
            if value is not None:
                yield f"layer {i} {name}", value


@pytest.fixture(scope="module")
def window64_model():
    """Every mixer type with the seed's CSA window (64; the default is 512) and the real stride (4): the prompts
    below cross the window without the cost of 512-token ones."""
    return tiny_model(csa_window=64, mixer_types=["csa", "linear", "full", "csa"])


@pytest.mark.parametrize("prompt_len", [1, 3, 4, 5, 63, 64, 65, 130])
def test_cached_decoding_equals_full_forward(window64_model, prompt_len):
    """Prefill `prompt_len` tokens, then decode one token at a time; the short prompt decodes across the window."""
    _check_stepwise_decoding(window64_model, prompt_len, total=72 if prompt_len == 1 else prompt_len + 10)


def _check_stepwise_decoding(model, prompt_len: int, total: int, static: bool = False):
    """Prefill `prompt_len` tokens, decode the rest one at a time, compare with the uncached forward (float64)."""
    ids = torch.randint(1, 96, (2, total), generator=torch.Generator().manual_seed(prompt_len))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :prompt_len], use_cache=True)
        pieces, cache = [out.logits], out.cache
        for t in range(prompt_len, total):
            out = model(ids[:, t : t + 1], cache=cache)
            assert not static or cache._static is not None  # the static path was taken
            pieces.append(out.logits)
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-10, atol=1e-10)
    assert cache.get_seq_length() == total


def _count_static_steps(model) -> list:
    """A list that grows by one each time `model` runs a decode step on the static buffers."""
    steps = []
    model._decode_static_step = lambda *a, _f=model._decode_static_step: steps.append(1) or _f(*a)
    return steps


@pytest.fixture()
def static_model():
    """The window-64 mixer set with the static decode path on (`decode_cuda_graphs="always"`: on CPU it runs the
    CUDA-graph step eagerly)."""
    model = tiny_model(
        csa_window=64,
        mixer_types=["csa", "linear", "full", "csa"],
        max_position_embeddings=200,
        decode_cuda_graphs="always",
    )
    return model


def test_csa_blend_bias_starts_the_gate_closed_and_leaves_every_other_tensor_as_without_it(tmp_path):
    """`csa_blend_bias=-4`: each CSA layer's blend_proj gets a bias filled with -4 and nothing else changes at the
    same seed (a paired comparison with the seed's gate); the bias saves and loads bit for bit, and cached decoding,
    the static-buffer step included, equals the uncached forward with it."""
    kw = {"mixer_types": ["csa", "linear", "full", "csa"], "max_position_embeddings": 96}
    torch.manual_seed(4)
    plain = LlamaThinkForCausalLM(tiny_config(csa_blend_bias=None, **kw))
    torch.manual_seed(4)
    biased = LlamaThinkForCausalLM(tiny_config(csa_blend_bias=-4, **kw))
    want, got = plain.state_dict(), biased.state_dict()
    extra = sorted(set(got) - set(want))
    assert extra == [f"model.layers.{i}.mixer.blend_proj.bias" for i in (0, 3)], extra
    assert all(torch.equal(got[name], tensor) for name, tensor in want.items())
    assert all(torch.all(got[name] == -4.0) for name in extra)
    randomize_(biased, seed=2)
    biased.save_pretrained(tmp_path)
    loaded = LlamaThinkForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.csa_blend_bias == -4
    for name, tensor in biased.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    model = biased.double().eval()
    _check_stepwise_decoding(model, 5, total=40)
    model.config.decode_cuda_graphs = "always"
    _check_stepwise_decoding(model, 21, total=96, static=True)


@pytest.mark.parametrize("prompt_len", [1, 5, 66])
def test_static_decode_equals_full_forward(static_model, prompt_len):
    """Static-buffer steps (rings for the window and the open block, block slots, K/V slots) decode exactly like
    the uncached forward, across window wrap-around and block completions, up to the last position."""
    _check_stepwise_decoding(static_model, prompt_len, total=200 if prompt_len == 66 else prompt_len + 75, static=True)


def test_static_decode_state_moves_back_for_continuation_and_between_caches(static_model):
    """A multi-token chunk after static steps, and two caches taking turns on the same buffers, stay exact."""
    model = static_model
    ids = torch.randint(1, 96, (2, 120), generator=torch.Generator().manual_seed(11))
    other = torch.randint(1, 96, (2, 90), generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        full, full_other = model(ids).logits, model(other).logits
        a = model(ids[:, :10], use_cache=True).cache
        b = model(other[:, :30], use_cache=True).cache
        for t in range(10, 50):  # a and b alternate: each step moves the other's state out of the buffers
            la = model(ids[:, t : t + 1], cache=a).logits
            lb = model(other[:, t + 20 : t + 21], cache=b).logits
            torch.testing.assert_close(la, full[:, t : t + 1], rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(lb, full_other[:, t + 20 : t + 21], rtol=1e-10, atol=1e-10)
        chunk = model(ids[:, 50:57], cache=a).logits  # general path: the state comes back from the buffers
        torch.testing.assert_close(chunk, full[:, 50:57], rtol=1e-10, atol=1e-10)
        for t in range(57, 90):
            la = model(ids[:, t : t + 1], cache=a).logits
        for batch in (1, 3, 4, 5):  # four other batch sizes evict the decoder that holds a's state
            c = model(ids[:1].expand(batch, -1)[:, :5], use_cache=True).cache
            model(ids[:1].expand(batch, -1)[:, 5:6], cache=c)
        assert a._static is not None and a._static not in model.__dict__["_static_decoders"].values()
        for t in range(90, 120):  # a new decoder for batch 2 takes a's state from the evicted one
            la = model(ids[:, t : t + 1], cache=a).logits
        torch.testing.assert_close(la, full[:, 119:120], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_a_copied_cache_continues_exactly_while_its_state_sits_in_the_static_buffers(static_model, how):
    """Branching a conversation: a cache copied (or saved) right after static one-token steps holds the state itself,
    not a link to the decoder's buffers, and both it and the original continue exactly; the copy does not drag the
    model along."""
    import io

    model = static_model
    ids = torch.randint(1, 96, (2, 40), generator=torch.Generator().manual_seed(21))
    with torch.no_grad():
        full = model(ids).logits
        cache = model(ids[:, :10], use_cache=True).cache
        for t in range(10, 20):
            model(ids[:, t : t + 1], cache=cache)
        assert cache._static is not None  # the state lives in the decoder's buffers now
        if how == "torch.save":
            buffer = io.BytesIO()
            torch.save(cache, buffer)
            branch = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
        else:
            branch = copy.deepcopy(cache)
        assert branch._static is None and "model" not in vars(branch)
        for state in (branch, cache):  # the copy first: the original's next step must not have moved it
            got = torch.cat([model(ids[:, t : t + 1], cache=state).logits for t in range(20, 30)], 1)
            torch.testing.assert_close(got, full[:, 20:30], rtol=1e-10, atol=1e-10)
            assert state._static is not None  # each decodes on the static path again
        got = model(ids[:, 30:40], cache=branch).logits  # and a multi-token chunk after the copy's own steps
        torch.testing.assert_close(got, full[:, 30:40], rtol=1e-10, atol=1e-10)


def test_a_cache_of_another_layer_pattern_or_with_an_empty_row_is_refused_by_name(static_model):
    other = tiny_model(mixer_types=["linear", "linear", "full", "full"], max_position_embeddings=200)
    ids = torch.randint(1, 96, (2, 8), generator=torch.Generator().manual_seed(22))
    with torch.no_grad():
        foreign = other(ids, use_cache=True).cache
        for n in (1, 3):  # the static one-token path and the general one
            with pytest.raises(ValueError, match="another layer pattern"):
                static_model(ids[:, :n], cache=foreign)
        same_pattern = tiny_model(
            csa_window=64, mixer_types=static_model.config.mixer_types, max_position_embeddings=200, head_dim=16
        )
        with pytest.raises(ValueError, match=r"other shapes \({'head_dim': \(16, 12\)}"):
            static_model(ids[:, :1], cache=same_pattern(ids, use_cache=True).cache)
        # without a cache (evaluation), a row of padding only is no error: its outputs are simply unused
        model_eval = static_model.eval()
        mask = torch.ones_like(ids)
        mask[1] = 0
        assert torch.isfinite(model_eval(ids, attention_mask=mask, labels=ids).logits[0]).all()
        with pytest.raises(ValueError, match=r"rows \[1\] hold no real token"):
            static_model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)


def test_static_decode_generate_greedy_and_beam_equal_the_general_path(static_model):
    model = static_model
    prompt = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(3))
    kwargs = dict(max_new_tokens=80, do_sample=False, pad_token_id=0, eos_token_id=None)
    beams = dict(
        max_new_tokens=12, num_beams=3, num_return_sequences=2, do_sample=False, pad_token_id=0, eos_token_id=None
    )
    steps = _count_static_steps(model)
    with torch.no_grad():
        fast = model.generate(prompt, output_scores=True, return_dict_in_generate=True, **kwargs)
        assert len(steps) == 79  # every step after the prompt's took the static path
        fast_beams = model.generate(prompt, **beams)
        model.config.decode_cuda_graphs = False
        slow = model.generate(prompt, output_scores=True, return_dict_in_generate=True, **kwargs)
        slow_beams = model.generate(prompt, **beams)
    assert torch.equal(fast.sequences, slow.sequences)
    torch.testing.assert_close(torch.stack(fast.scores), torch.stack(slow.scores), rtol=1e-10, atol=1e-10)
    assert torch.equal(fast_beams, slow_beams)
    for batch in range(1, 7):  # at most four batch sizes keep their buffers (least recently used goes first)
        model.config.decode_cuda_graphs = "always"
        with torch.no_grad():
            model.generate(prompt[:1].expand(batch, -1), max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert [key[0] for key in model.__dict__["_static_decoders"]] == [3, 4, 5, 6]
    clone = copy.deepcopy(model)  # the static decoders (weak references, graphs) are left behind, not copied
    assert "_static_decoders" in model.__dict__ and "_static_decoders" not in clone.__dict__


def left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D id tensors -> (ids, attention_mask), both [len(rows), longest], padded on the left with id 0."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
    return ids, mask


def test_static_decode_buffers_made_under_inference_mode_serve_calls_outside_it(static_model):
    """The static decode buffers outlive the generate() call that made them: made under torch.inference_mode (a
    serving loop's), they still serve a later call outside it, and a cache returned from inside it continues
    outside it, each with the tokens of a model that never saw inference mode (its tensors, once made, could never
    be written in place outside it)."""
    import copy

    model, plain = static_model, copy.deepcopy(static_model)
    prompt = torch.randint(3, 96, (1, 12), generator=torch.Generator().manual_seed(1))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        want = plain.generate(prompt, **kwargs)
        longer = plain.generate(want, **kwargs)
    steps = _count_static_steps(model)
    with torch.inference_mode():
        out = model.generate(prompt, return_dict_in_generate=True, **kwargs)
    assert torch.equal(out.sequences, want)
    with torch.no_grad():
        assert torch.equal(model.generate(prompt, **kwargs), want)
        cache = out.past_key_values if hasattr(out, "past_key_values") else out.cache
        assert torch.equal(model.generate(out.sequences, past_key_values=cache, **kwargs), longer)
    assert len(steps) == 5 + 5 + 6  # all static (the continuation's first step, out's last token, too)


def test_static_decode_serves_threads_that_generate_with_one_model_at_once(static_model):
    """Two threads generating with one model at once, each with its own cache (a chat server, a streamer), take
    turns with the static decode buffers: each gets the tokens it gets alone (the buffers hold one cache's state at
    a time; unguarded, the threads read and wrote each other's state)."""
    import threading

    model = static_model
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 96, (1, 10), generator=generator) for _ in range(2)]
    kwargs = dict(max_new_tokens=40, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        alone = [model.generate(p, **kwargs) for p in prompts]
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)  # (the threads then interleave their steps finely)
    try:
        for _ in range(4):
            got, start = [None, None], threading.Barrier(2)

            def work(i):
                start.wait()
                with torch.no_grad():
                    try:
                        got[i] = model.generate(prompts[i], **kwargs)
                    except Exception as err:  # noqa: BLE001 - reported below
                        got[i] = err

            threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            for i in range(2):
                assert isinstance(got[i], torch.Tensor) and torch.equal(got[i], alone[i]), (i, got[i])
    finally:
        torch.set_num_threads(threads_before)


def test_static_decode_of_a_left_padded_batch_equals_each_row_alone(static_model):
    """Rows at different positions (left padding) decode on the static buffers exactly as each row alone: blocks
    follow each row's positions, padding stays out of the window and the K/V slots."""
    model = static_model
    gen = torch.Generator().manual_seed(21)
    lengths = (70, 9, 3)
    rows = [torch.randint(3, 96, (n,), generator=gen) for n in lengths]
    ids, mask = left_pad(rows)
    width = ids.shape[1]
    steps = _count_static_steps(model)
    kwargs = dict(
        max_new_tokens=70,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
        output_scores=True,
        return_dict_in_generate=True,
    )
    with torch.no_grad():
        batched = model.generate(ids, attention_mask=mask, **kwargs)
        assert len(steps) == 69  # every step after the prompt took the static path
        for i, r in enumerate(rows):
            alone = model.generate(r[None], **kwargs)
            assert torch.equal(batched.sequences[i, width:], alone.sequences[0, len(r) :])
            torch.testing.assert_close(
                torch.stack(batched.scores)[:, i], torch.stack(alone.scores)[:, 0], rtol=1e-9, atol=1e-9
            )
        # the cache handed back after static steps continues exactly on the general path too
        cache = model(ids, attention_mask=mask, use_cache=True).cache
        step_ids = torch.randint(3, 96, (len(rows), 12), generator=gen)
        for t in range(8):
            model(step_ids[:, t : t + 1], cache=cache)
        assert cache._static is not None
        tail = model(step_ids[:, 8:], cache=cache).logits  # multi-token chunk: general path
        full_ids = torch.cat((ids, step_ids), 1)
        full_mask = torch.cat((mask, torch.ones_like(step_ids)), 1)
        full = model(full_ids, attention_mask=full_mask).logits
    for i, n in enumerate(lengths):
        torch.testing.assert_close(tail[i], full[i, -4:], rtol=1e-10, atol=1e-10)


def test_multi_token_continuation_equals_full_forward(window64_model):
    model = window64_model
    ids = torch.randint(1, 96, (2, 150), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        full = model(ids).logits
        cache, pieces, start = None, [], 0
        for size in (5, 7, 1, 66, 3, 68):  # chunk sizes that straddle blocks, the window and each other
            out = model(ids[:, start : start + size], cache=cache, use_cache=True)
            pieces.append(out.logits)
            cache, start = out.cache, start + size
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-10, atol=1e-10)


def test_cache_holds_only_the_csa_window_and_completed_blocks(window64_model):
    model = window64_model
    with torch.no_grad():
        cache = model(torch.randint(1, 96, (1, 130)), use_cache=True).cache
    csa = cache.layers[0]
    assert csa.window_k.shape[2] == 63 and bool(csa.window_valid.all())
    assert csa.blocks_k.shape[2] == 130 // 4  # 32 completed blocks, the partial one (2 tokens) kept raw
    assert cache.layers[1].recurrent.dtype == torch.float64 and cache.layers[1].conv.shape[-1] == 3
    assert cache.layers[2].keys.shape[2] == 130


def test_left_padded_batch_equals_each_row_alone():
    model = tiny_model(csa_window=8)
    gen = torch.Generator().manual_seed(11)
    rows = [torch.randint(1, 96, (n,), generator=gen) for n in (21, 14, 3)]
    ids, mask = left_pad(rows)
    T = ids.shape[1]
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits
        for i, r in enumerate(rows):
            alone = model(r[None]).logits
            torch.testing.assert_close(batched[i, T - len(r) :], alone[0], rtol=1e-10, atol=1e-10)
        # and decoding on from the padded prefill stays exact (blocks are aligned per row by position)
        out = model(ids, attention_mask=mask, use_cache=True)
        cache, extra = out.cache, torch.randint(1, 96, (len(rows), 9), generator=gen)
        steps = []
        for t in range(9):
            mask = torch.cat((mask, torch.ones(len(rows), 1, dtype=torch.long)), 1)
            steps.append(model(extra[:, t : t + 1], attention_mask=mask, cache=cache).logits)
        steps = torch.cat(steps, 1)
        for i, r in enumerate(rows):
            alone = model(torch.cat((r, extra[i]))[None]).logits[0, len(r) :]
            torch.testing.assert_close(steps[i], alone, rtol=1e-10, atol=1e-10)


def test_right_padded_forward_is_exact_for_real_tokens_and_its_cache_refuses_to_continue(model):
    ids = torch.randint(1, 96, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
        alone = model(ids[1:, :7]).logits
    torch.testing.assert_close(out.logits[1, :7], alone[0], rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="right-padded"):
        model(ids[:, :1], cache=out.cache)
    # a chunk that ends inside a row's left padding is not right padding: the row goes on from its empty state, and
    # chunk by chunk equals the prompt in one forward (what generate()'s prefill_chunk_size does with any padding)
    left = torch.ones(2, 12, dtype=torch.long)
    left[0, :9] = 0
    with torch.no_grad():
        whole = model(ids, attention_mask=left, use_cache=True)
        cache = LlamaThinkCache(model.config)
        chunks = [
            model(ids[:, a:b], attention_mask=left[:, :b], cache=cache).logits for a, b in ((0, 3), (3, 6), (6, 12))
        ]
        step = torch.cat((left, torch.ones(2, 1, dtype=torch.long)), 1)
        token = ids[:, :1]
        after = [model(token, attention_mask=step, cache=c).logits for c in (whole.cache, cache)]
    torch.testing.assert_close(torch.cat(chunks, 1)[0, 9:], whole.logits[0, 9:], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(torch.cat(chunks, 1)[1], whole.logits[1], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(after[0], after[1], rtol=1e-10, atol=1e-10)


def test_reorder_cache_permutes_every_state_kind(model):
    ids = torch.randint(1, 96, (3, 23), generator=torch.Generator().manual_seed(2))
    perm = torch.tensor([2, 0, 1])
    with torch.no_grad():
        cache = model(ids, use_cache=True).cache
        permuted = model(ids[perm], use_cache=True).cache
    cache.reorder_cache(perm)
    names = []
    for (name, a), (_, b) in zip(_state_tensors(cache), _state_tensors(permuted)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
        names.append(name)
    kinds = {n.split()[2] for n in names}
    assert {"conv", "recurrent", "keys", "values", "window_k", "blocks_k", "partial"} <= kinds
    torch.testing.assert_close(cache.real_lengths, permuted.real_lengths)


# ---------------------------------------------------------------------------------------------------------------
# generate()
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt_len, seed, search, shape",
    [
        (9, 3, dict(max_new_tokens=30), (2, 39)),  # greedy
        (7, 8, dict(max_new_tokens=12, num_beams=3, num_return_sequences=2), (4, 19)),  # beam: reorders the cache
    ],
    ids=["greedy", "beam"],
)
def test_generate_with_cache_equals_without(model, prompt_len, seed, search, shape):
    prompt = torch.randint(3, 96, (2, prompt_len), generator=torch.Generator().manual_seed(seed))
    kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None, **search)
    with torch.no_grad():
        cached = model.generate(prompt, **kwargs)
        uncached = model.generate(prompt, use_cache=False, **kwargs)
    assert cached.shape == shape
    assert torch.equal(cached, uncached)


def test_continuing_from_returned_cache_equals_one_long_generate(model):
    prompt = torch.randint(3, 96, (1, 6), generator=torch.Generator().manual_seed(4))
    kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        first = model.generate(prompt, max_new_tokens=12, return_dict_in_generate=True, **kwargs)
        cache = first.cache if hasattr(first, "cache") else first.past_key_values
        assert isinstance(cache, LlamaThinkCache)
        extra = torch.randint(3, 96, (1, 5), generator=torch.Generator().manual_seed(5))
        ids = torch.cat((first.sequences, extra), 1)  # a user turn appended to the generated text
        continued = model.generate(ids, past_key_values=cache, max_new_tokens=10, **kwargs)
        one_shot = model.generate(ids, max_new_tokens=10, **kwargs)
        # ids that do not reach past the cache's positions (the 23 ids and 9 of the 10 decoded tokens): named, not
        # "the input sequence is empty"
        with pytest.raises(ValueError, match="the cache holds 32 positions but input_ids only 10: pass the ids"):
            model.generate(ids[:, :10], past_key_values=cache, max_new_tokens=2, **kwargs)
        # a cache of one row continued with two prompts: its batch named first, whatever the lengths say
        for prompt in (ids[:, :10], torch.cat((ids, ids), 1)):  # too short for the cache (10), long enough (46)
            with pytest.raises(ValueError, match="the cache holds 1 rows but the prompt has batch size 2: continue"):
                model.generate(prompt.expand(2, -1), past_key_values=cache, max_new_tokens=2, **kwargs)
    assert torch.equal(continued, one_shot)


def test_left_padded_generate_equals_each_row_alone():
    model = tiny_model(csa_window=8)
    gen = torch.Generator().manual_seed(6)
    rows = [torch.randint(3, 96, (n,), generator=gen) for n in (13, 6)]
    ids, mask = left_pad(rows)
    kwargs = dict(max_new_tokens=20, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        batched = model.generate(ids, attention_mask=mask, **kwargs)
        for i, r in enumerate(rows):
            alone = model.generate(r[None], **kwargs)
            assert torch.equal(batched[i, 13:], alone[0, len(r) :])


def test_sampling_is_reproducible_with_seed(model):
    prompt = torch.randint(3, 96, (1, 4))
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        outs.append(model.generate(prompt, max_new_tokens=15, do_sample=True, top_k=20, top_p=0.9, pad_token_id=0))
    assert torch.equal(outs[0], outs[1])


def _generate_warnings(model, *args, **kwargs):
    """generate(), and the messages of the warnings it raised (each one recorded, none filtered)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            out = model.generate(*args, **kwargs)
    return out, [str(w.message) for w in caught if "max_position_embeddings" in str(w.message)]


@pytest.fixture(scope="module")
def short_model():
    return tiny_model(max_position_embeddings=32)


@pytest.mark.parametrize(
    "search",
    [dict(do_sample=False), dict(do_sample=True, top_k=20), dict(do_sample=False, num_beams=3, num_return_sequences=2)],
    ids=["greedy", "sample", "beam"],
)
def test_generate_stops_at_max_position_embeddings_with_one_warning(short_model, search):
    """Prompt 20 + 50 new tokens with a 32-position model: 32 tokens come back (the first 12 new ones equal to an
    uncapped run asking for 12), with one warning naming the numbers, instead of an error after the work."""
    prompt = torch.randint(3, 96, (2, 20), generator=torch.Generator().manual_seed(11))
    kwargs = dict(pad_token_id=0, eos_token_id=None, **search)
    torch.manual_seed(5)
    capped, messages = _generate_warnings(short_model, prompt, max_new_tokens=50, **kwargs)
    torch.manual_seed(5)
    reference, none = _generate_warnings(short_model, prompt, max_new_tokens=12, **kwargs)
    rows = 2 * search.get("num_return_sequences", 1)
    assert capped.shape == reference.shape == (rows, 32)
    assert torch.equal(capped, reference)
    assert none == []
    assert len(messages) == 1
    assert all(n in messages[0] for n in ("max_position_embeddings=32", "20 positions", "50 new tokens", "at most 12"))


def test_generate_with_max_length_beyond_the_limit_is_capped(short_model):
    prompt = torch.randint(3, 96, (1, 25), generator=torch.Generator().manual_seed(12))
    kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    out, messages = _generate_warnings(short_model, prompt, max_length=100, min_length=90, **kwargs)
    reference, _ = _generate_warnings(short_model, prompt, max_new_tokens=7, **kwargs)
    assert out.shape == (1, 32) and torch.equal(out, reference)
    assert len(messages) == 1 and "at most 7" in messages[0]
    # the warning names the line that called generate() (a fixed stacklevel named a transformers decorator)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        short_model.generate(prompt, max_length=100, **kwargs)
        line = sys._getframe().f_lineno - 1
    (where,) = [(w.filename, w.lineno) for w in caught if "max_position_embeddings" in str(w.message)]
    assert where == (__file__, line)


def test_generate_caps_a_left_padded_batch_by_its_longest_row(short_model):
    """The cache counts padded positions, so the limit is the batch's width (its longest row): rows of 20 and 14
    tokens stop after 12 new tokens each, and each row still equals its own uncapped generation."""
    gen = torch.Generator().manual_seed(13)
    rows = [torch.randint(3, 96, (n,), generator=gen) for n in (20, 14)]
    ids, mask = left_pad(rows)
    kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    out, messages = _generate_warnings(short_model, ids, attention_mask=mask, max_new_tokens=40, **kwargs)
    assert out.shape == (2, 32) and len(messages) == 1
    for i, r in enumerate(rows):
        alone, _ = _generate_warnings(short_model, r[None], max_new_tokens=12, **kwargs)
        assert torch.equal(out[i, 20:], alone[0, len(r) :])


@pytest.mark.parametrize("full_sequence", [True, False], ids=["full_ids", "new_ids_only"])
def test_generate_continuing_a_cache_is_capped_by_the_positions_it_holds(short_model, full_sequence):
    """A continued cache counts: passing only the new ids (with the full-width attention mask, transformers'
    convention) must stop at the limit just as passing the whole sequence does."""
    kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    prompt = torch.randint(3, 96, (1, 6), generator=torch.Generator().manual_seed(16))
    with torch.no_grad():
        first = short_model.generate(prompt, max_new_tokens=8, return_dict_in_generate=True, **kwargs)
    cache = first.cache if hasattr(first, "cache") else first.past_key_values
    extra = torch.randint(3, 96, (1, 6), generator=torch.Generator().manual_seed(17))
    ids = torch.cat((first.sequences, extra), 1)  # 20 tokens, 13 of them in the cache
    assert cache.get_seq_length() == 13
    mask = torch.ones_like(ids)
    fed = ids if full_sequence else ids[:, cache.get_seq_length() :]
    out, messages = _generate_warnings(
        short_model, fed, attention_mask=mask, past_key_values=cache, max_new_tokens=30, **kwargs
    )
    reference, _ = _generate_warnings(short_model, ids, max_new_tokens=12, **kwargs)
    assert torch.equal(out[:, -12:], reference[:, 20:]) and out.shape[1] == fed.shape[1] + 12
    assert len(messages) == 1 and "20 positions" in messages[0] and "at most 12" in messages[0]


@pytest.mark.parametrize("prompt_len", [32, 40])
def test_generate_with_a_prompt_at_or_past_the_limit_raises_before_any_forward(short_model, prompt_len):
    calls = []
    handle = short_model.model.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(ValueError, match=rf"prompt takes {prompt_len} positions and max_position_embeddings=32"):
            short_model.generate(torch.ones(1, prompt_len, dtype=torch.long), max_new_tokens=5, pad_token_id=0)
        with pytest.raises(ValueError, match=rf"prompt takes {prompt_len} positions"):  # inputs_embeds count too
            embeds = short_model.get_input_embeddings()(torch.ones(1, prompt_len, dtype=torch.long))
            short_model.generate(inputs_embeds=embeds, max_new_tokens=5, pad_token_id=0)
    finally:
        handle.remove()
    assert calls == []


@pytest.mark.parametrize("layout", ["no_mask", "mask", "left_padded"])
def test_generate_from_inputs_embeds_equals_generate_from_ids(layout):
    """generate(inputs_embeds=embed(ids)) returns only the new tokens (transformers' convention), and they are
    the new tokens of generate(ids): greedy and beam search, without and with an attention mask, left padding."""
    model = tiny_model(csa_window=8)
    gen = torch.Generator().manual_seed(14)
    ids = torch.randint(3, 96, (2, 11), generator=gen)
    mask = None
    if layout != "no_mask":
        mask = torch.ones_like(ids)
    if layout == "left_padded":
        ids[1, :5], mask[1, :5] = 0, 0
    embeds = model.get_input_embeddings()(ids).detach()
    for search in (dict(), dict(num_beams=3)):
        kwargs = dict(max_new_tokens=14, do_sample=False, pad_token_id=0, eos_token_id=None, attention_mask=mask)
        kwargs.update(search)
        with torch.no_grad():
            from_ids = model.generate(ids, **kwargs)
            from_embeds = model.generate(inputs_embeds=embeds, **kwargs)
        assert from_embeds.shape == (2, 14)
        assert torch.equal(from_embeds, from_ids[:, 11:]), search


def test_peft_prompt_tuning_generate_equals_generate_from_the_prompted_embeddings():
    """PEFT prompt tuning feeds its virtual tokens as inputs_embeds on the first step only (it looks for
    `past_key_values` to tell): its generate() must equal generate(inputs_embeds=[prompt; embed(ids)]), greedy and
    beam search, and differ from generating without the prompt."""
    import peft  # setup.py's dev extra: a missing peft fails this test rather than skipping it

    model = tiny_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes on deprecated names
        tuned = peft.get_peft_model(model, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with torch.no_grad():
        for p in tuned.prompt_encoder.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(18), dtype=p.dtype))
    ids = torch.randint(3, 96, (2, 8), generator=torch.Generator().manual_seed(19))
    mask = torch.ones_like(ids)
    for search in (dict(), dict(num_beams=3)):
        kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None, **search)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = tuned.generate(input_ids=ids, attention_mask=mask, **kwargs)
            embeds = torch.cat((tuned.get_prompt(batch_size=2), model.get_input_embeddings()(ids)), 1)
            reference = model.generate(inputs_embeds=embeds, **kwargs)
            unprompted = model.generate(ids, **kwargs)
        assert out.shape == (2, 18) and torch.equal(out[:, :8], ids)
        assert torch.equal(out[:, 8:], reference), search
        assert not torch.equal(out, unprompted)


@pytest.mark.parametrize("kind", ["LoHa", "LoKr"])
def test_peft_adapters_on_the_gated_deltanet_conv_equal_their_merged_model(kind):
    """PEFT adapters on the Gated DeltaNet `conv1d` (LoHa and LoKr at any rank; LoRA too at a rank that is a
    multiple of the conv's channels, though PEFT cannot merge LoRA into a grouped conv) wrap the conv: the mixer
    then calls the wrapper as a module, padded as its base conv is. Its logits equal those of the model with the
    adapter merged (a plain conv again), and its cached decoding equals its full forward."""
    import peft

    model = tiny_model()
    original = copy.deepcopy(model)
    config = {"LoHa": peft.LoHaConfig, "LoKr": peft.LoKrConfig}[kind](r=4, target_modules=["conv1d"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tuned = peft.get_peft_model(model, config).eval()
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if p.requires_grad:  # the adapter's own (PEFT freezes the rest)
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name)), dtype=p.dtype) * 0.1)
    ids = torch.randint(3, 96, (2, 14), generator=torch.Generator().manual_seed(21))
    with torch.no_grad():
        wrapped = tuned(input_ids=ids).logits
        prefix = tuned(input_ids=ids[:, :9], use_cache=True)
        steps = [tuned(input_ids=ids[:, t : t + 1], cache=prefix.cache).logits for t in range(9, 14)]
        merged = tuned.merge_and_unload()
        reference = merged(input_ids=ids).logits
        plain = original(input_ids=ids).logits
    assert not torch.allclose(reference, plain, atol=1e-3)  # the adapter changes the model
    torch.testing.assert_close(wrapped, reference, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(torch.cat(steps, 1), wrapped[:, 9:], rtol=1e-10, atol=1e-10)


def test_static_decoder_is_rebuilt_when_peft_adapters_or_modules_change():
    """The static decode step (a CUDA graph on GPUs) records the modules as they ran at capture, so a model whose
    PEFT adapter is switched off, swapped, merged or unloaded, whose module is replaced or whose weight is replaced
    through `.data`, gets a new decoder rather than a replay of the old step; an unchanged model reuses its decoder.
    On CPU (`decode_cuda_graphs="always"`, the step run eagerly) each generation also equals the general path's."""
    import peft

    base = tiny_model(decode_cuda_graphs="always")
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "in_proj_qkv", "gate_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(base, config).eval()
        model.add_adapter("other", config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.3)
    ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(20))
    kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}

    def generate(m):
        """(tokens, the decoders the static path used) and the general path's tokens for the same model."""
        with torch.no_grad():
            out = m.generate(input_ids=ids, **kwargs)
            used = set(base.__dict__["_static_decoders"].values())  # (held in `seen`: no id is reused)
            base.config.decode_cuda_graphs = False
            reference = m.generate(input_ids=ids, **kwargs)
            base.config.decode_cuda_graphs = "always"
        assert torch.equal(out, reference)
        return out, used

    seen = []

    def new_decoder(m):
        out, used = generate(m)
        assert used and not used & {d for ds in seen for d in ds}, "a decoder of an earlier model state was reused"
        seen.append(used)
        return out

    adapted = new_decoder(model)
    assert torch.equal(generate(model)[0], adapted) and generate(model)[1] == seen[-1]  # unchanged: reused
    with model.disable_adapter():
        plain = new_decoder(model)
    assert not torch.equal(plain, adapted)
    # a generation continued from a returned cache whose state sits in the adapter's decoder, adapter switched off:
    # its steps go to a new decoder (on a GPU, a new graph), and equal the general path's from the same state
    with torch.no_grad():
        first = model.generate(input_ids=ids, return_dict_in_generate=True, **kwargs)
        cache = first.past_key_values
        adapters = cache._static  # the adapter's decoder, holding the cache's state
        assert adapters in base.__dict__["_static_decoders"].values()
        base.config.decode_cuda_graphs = False
        twin = model.generate(input_ids=ids, return_dict_in_generate=True, **kwargs).past_key_values
        base.config.decode_cuda_graphs = "always"
        whole = {"input_ids": first.sequences, "attention_mask": torch.ones_like(first.sequences)}
        with model.disable_adapter():
            more = model.generate(**whole, past_key_values=cache, **kwargs)
            assert cache._static is not None and cache._static is not adapters, "the adapter's decoder continued"
            base.config.decode_cuda_graphs = False
            reference = model.generate(**whole, past_key_values=twin, **kwargs)
            base.config.decode_cuda_graphs = "always"
    assert torch.equal(more, reference)
    seen.append({cache._static})
    assert torch.equal(generate(model)[0], adapted)  # the adapter's state has a decoder in the model again
    seen.append(set(base.__dict__["_static_decoders"].values()))
    for module in model.modules():  # LoRA's scales (`set_scale`): constants of a captured step
        if hasattr(module, "set_scale") and "default" in getattr(module, "scaling", {}):
            module.set_scale("default", 0.5)
    halved = new_decoder(model)
    assert not torch.equal(halved, adapted)
    for module in model.modules():
        if hasattr(module, "set_scale") and "default" in getattr(module, "scaling", {}):
            module.set_scale("default", 1.0)
    model.set_adapter("other")
    new_decoder(model)
    model.set_adapter("default")
    model.merge_adapter()
    assert torch.equal(new_decoder(model), adapted)
    model.unmerge_adapter()
    merged = model.merge_and_unload()
    assert torch.equal(new_decoder(merged), adapted)
    layer = merged.model.layers[0].mlp
    layer.down_proj = copy.deepcopy(layer.down_proj)  # a replaced module
    new_decoder(merged)
    weight = merged.model.layers[1].mlp.up_proj.weight
    weight.data = weight.data.clone()  # a replaced tensor (new address)
    new_decoder(merged)


def test_generate_with_chunked_prefill_equals_generate():
    """`generate(prefill_chunk_size=...)` (transformers feeds the prompt in chunks to a cache it needs up front,
    which this model otherwise builds in its first forward): the same tokens and scores as one prefill, with the
    prompt in chunks of 4 and 5 (the last chunk shorter), and left-padded batches, also where whole chunks are a
    row's padding (a row longer padded than the chunk: it was refused), with the static step and without; each row
    of those generates what it generates alone. A row of padding only is refused: nothing to generate from."""
    model = tiny_model().eval()
    ids = torch.randint(3, 96, (3, 13), generator=torch.Generator().manual_seed(22))
    short = torch.ones_like(ids)
    short[1, :2] = 0  # row 1 left-padded by 2: every chunk of 4 or 5 holds a real token of it
    long = torch.ones_like(ids)
    long[0, :11], long[2, :6] = 0, 0  # rows whose first chunks, or first two, are padding only
    kwargs = {"max_new_tokens": 7, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    kwargs |= {"output_scores": True, "return_dict_in_generate": True}
    with torch.no_grad():
        for attention_mask, static in ((None, True), (short, True), (long, True), (long, "always"), (long, False)):
            model.config.decode_cuda_graphs = static
            whole = model.generate(ids, attention_mask=attention_mask, **kwargs)
            for chunk in (4, 5):
                chunked = model.generate(ids, attention_mask=attention_mask, prefill_chunk_size=chunk, **kwargs)
                assert torch.equal(chunked.sequences, whole.sequences), chunk
                torch.testing.assert_close(torch.stack(chunked.scores), torch.stack(whole.scores))
            for row, real in enumerate(attention_mask.sum(1).tolist() if attention_mask is not None else ()):
                alone = model.generate(ids[row : row + 1, 13 - real :], **kwargs)
                assert torch.equal(alone.sequences[0, real:], whole.sequences[row, 13:]), (row, static)
        model.config.decode_cuda_graphs = True
        empty = long.clone()
        empty[1] = 0
        with pytest.raises(ValueError, match=r"attention_mask rows \[1\] hold no real token: nothing to generate"):
            model.generate(ids, attention_mask=empty, prefill_chunk_size=4, **kwargs)
        with pytest.raises(ValueError, match="Cannot use prefill chunking without a cache"):  # transformers' own
            model.generate(ids, prefill_chunk_size=4, use_cache=False, **kwargs)
        for bad in (0, -1, 2.5, True, "4"):  # (torch.split's own errors otherwise, or a chunk per token for True)
            with pytest.raises(ValueError, match=f"prefill_chunk_size must be a positive number of tokens .* {bad!r}"):
                model.generate(ids, prefill_chunk_size=bad, **kwargs)
        embeds = model.get_input_embeddings()(ids[:1])  # (transformers slices input_ids: empty position ids)
        with pytest.raises(ValueError, match="prefill_chunk_size prefills input_ids .* does not take inputs_embeds"):
            model.generate(inputs_embeds=embeds, prefill_chunk_size=4, **kwargs)
        # beams and returned sequences: a ZeroDivisionError from inside beam search for 0, a TypeError for 2.5
        for name in ("num_beams", "num_return_sequences"):
            for bad in (0, -2, 2.5, True):
                with pytest.raises(ValueError, match=f"{name} must be a positive integer, got {bad!r}"):
                    model.generate(ids, **{**kwargs, "num_beams": 4, name: bad})
        out = model.generate(ids, **{**kwargs, "num_beams": np.int64(2), "num_return_sequences": np.int64(2)})
        assert out.sequences.shape[0] == 2 * ids.shape[0]  # NumPy integers are integers


def test_assisted_decoding_is_refused_by_name_before_anything_runs():
    """Assisted (speculative) decoding needs a cache that can drop rejected draft tokens; the recurrent state cannot.
    Each way of asking for it (a draft model, prompt lookup, early exit) gets a ValueError that says so, before any
    forward (on transformers 5.25 it failed inside the assisted loop with "Assisted decoding requires a cache").
    As another model's draft model, its cache refuses to be cut back by name at the first verification."""
    model = tiny_model().eval()
    ids = torch.randint(3, 96, (1, 9), generator=torch.Generator().manual_seed(23))
    calls = []
    hook = model.register_forward_pre_hook(lambda *a: calls.append(1))
    kwargs = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        for asked in (
            {"prompt_lookup_num_tokens": 2},
            {"prompt_lookup_num_tokens": 2, "do_sample": True},
            {"assistant_model": tiny_model().eval()},
            {"assistant_early_exit": 1},
        ):
            with pytest.raises(ValueError, match="does not support assisted .*cannot be rolled back"):
                model.generate(ids, **{**kwargs, **asked})
        assert calls == []
        assert model.generate(ids, **kwargs).shape == (1, 12)  # plain greedy decoding still runs
        # as the draft model of another: its cache refuses to be cut back, by name, at the first verification
        from transformers import LlamaConfig, LlamaForCausalLM

        target = LlamaForCausalLM(
            LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
        ).eval()
        with pytest.raises(NotImplementedError, match="cannot be cropped: .* cannot be rolled back"):
            target.generate(ids, **kwargs, assistant_model=model)
    hook.remove()


def test_inputs_that_are_not_tensors_are_named_with_their_type():
    """A NumPy array or a list where a tensor goes is a TypeError naming the argument and its type (the dtype checks
    read the array's dtype and said "must be an integer tensor, got int64"); position_ids are converted, as before."""
    model = tiny_model().eval()
    ids = torch.tensor([[3, 4, 5]])
    for kwargs, named in (
        ({"input_ids": ids.numpy()}, "input_ids must be a torch.Tensor, got numpy.ndarray"),
        ({"input_ids": [[3, 4, 5]]}, "input_ids must be a torch.Tensor, got list"),
        ({"input_ids": ids, "attention_mask": np.ones((1, 3))}, "attention_mask must be a torch.Tensor, got numpy"),
        ({"inputs_embeds": np.zeros((1, 3, 48))}, "inputs_embeds must be a torch.Tensor, got numpy.ndarray"),
    ):
        for call in (model, model.model):
            with pytest.raises(TypeError, match=named):
                call(**kwargs)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, position_ids=[[0, 1, 2]]).logits, model(ids).logits)


def test_continuous_batching_is_refused_by_name_at_once():
    """transformers' continuous batching keeps requests in a paged key/value cache, which cannot hold the recurrent
    state: each of its entry points raises NotImplementedError at once (it ran for a while, then returned empty
    outputs with status FAILED, the error only logged), before any forward."""
    from transformers import GenerationConfig

    model = tiny_model().eval()
    calls = []
    hook = model.register_forward_pre_hook(lambda *a: calls.append(1))
    config = GenerationConfig(max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=2)
    with pytest.raises(NotImplementedError, match="does not support continuous batching"):
        model.generate_batch(inputs=[[5, 6, 7]], generation_config=config)
    with pytest.raises(NotImplementedError, match="does not support continuous batching"):
        with model.continuous_batching_context_manager(generation_config=config):
            pass
    assert calls == [] and getattr(model, "_cached_continuous_batching_manager", None) is None
    hook.remove()


def test_generate_from_inputs_embeds_counts_their_positions_against_the_limit(short_model):
    ids = torch.randint(3, 96, (1, 20), generator=torch.Generator().manual_seed(15))
    embeds = short_model.get_input_embeddings()(ids).detach()
    kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    out, messages = _generate_warnings(short_model, inputs_embeds=embeds, max_new_tokens=50, **kwargs)
    reference, _ = _generate_warnings(short_model, ids, max_new_tokens=12, **kwargs)
    assert out.shape == (1, 12) and torch.equal(out, reference[:, 20:])
    assert len(messages) == 1 and "20 positions" in messages[0]


# ---------------------------------------------------------------------------------------------------------------
# Training features
# ---------------------------------------------------------------------------------------------------------------


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = torch.randint(1, 96, (2, 33), generator=torch.Generator().manual_seed(9))
    grads = []
    for checkpointing in (False, True):
        model = tiny_model()
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-10, atol=1e-12, msg=name)


def test_generate_from_a_checkpointed_model_in_training_mode_caches_as_in_eval_mode():
    """A model with gradient checkpointing on, left in training mode, generating without gradients (a callback or
    RL loop sampling mid-training): nothing is recomputed, so the cache is kept and the tokens are those of eval
    mode, for a left-padded batch and a single prompt (the cache was dropped while generate() fed one token a step,
    which failed on the mask's or positions' shape)."""
    model = tiny_model(dtype=torch.float32)
    ids = torch.tensor([[0, 0, 5, 6, 7], [1, 8, 9, 10, 11]])
    mask = (ids != 0).long()
    kwargs = {"max_new_tokens": 4, "do_sample": False}
    batch = model.eval().generate(input_ids=ids, attention_mask=mask, **kwargs)
    single = model.generate(input_ids=ids[1:], **kwargs)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with torch.no_grad():
        assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **kwargs), batch)
        assert torch.equal(model.generate(input_ids=ids[1:], **kwargs), single)
    ids = torch.randint(1, 96, (2, 9), generator=torch.Generator().manual_seed(3))
    out = model(ids, labels=ids, use_cache=True)  # with gradients: checkpointed, so no cache
    assert out.past_key_values is None and out.loss.requires_grad


def _assert_same_loss_and_grads(reference, other):
    """`reference` and `other` are (loss, {parameter name: grad}) of the same float64 model and batch."""
    torch.testing.assert_close(other[0], reference[0], rtol=1e-12, atol=1e-12)
    for name, grad in reference[1].items():
        torch.testing.assert_close(other[1][name], grad, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize(
    "rows, vocab, fused, expected",
    [
        (16384, 32000, True, 4096),  # the seed's batch: 4 chunks of 2**27 logits at most
        (16384, 32000, False, 2048),  # unfused chunks also hold float32 logits: 2**26
        (65536, 32000, True, 4096),
        (10240, 32000, True, 2560),  # 3 chunks at fewest, 3 does not divide 10240: 4 equal ones
        (3072, 32000, False, 1536),
        (4000, 32000, True, 4000),  # one chunk
        (5000, 32000, True, 2500),  # two equal chunks, not 4194 + 806
        (5001, 32000, True, 1667),  # 2 does not divide it, 3 does
        (5003, 32000, True, 2502),  # a prime: 2502 + 2501 (near-equal, the last shorter)
        (3, 2**28, True, 1),  # a vocabulary past the cap: one row a chunk
        (0, 32000, True, 1),  # no rows: no chunk, but a valid step for the chunk loop
    ],
)
def test_loss_chunks_hold_at_most_their_logits_in_equal_parts_where_they_can(rows, vocab, fused, expected):
    assert modeling.loss_chunk_rows(rows, vocab, fused) == expected


def test_chunked_loss_takes_the_fused_chunk_rows_only_for_inductor_on_16_bit_inputs(monkeypatch):
    """`chunked_causal_lm_loss` without `chunk_rows` splits by `loss_chunk_rows`: the fused cap (here 6 rows of 10
    logits) for chunks compiled by inductor on bf16 inputs, the unfused cap (3 rows) eagerly, for another backend
    (whose chunks inductor does not fuse) and for float32 inputs (twice the bytes a logit)."""
    taken = []
    apply = modeling._ChunkedLinearCrossEntropy.apply
    monkeypatch.setattr(modeling, "LOSS_CHUNK_LOGITS", (30, 60))
    monkeypatch.setattr(modeling, "_compiled_cross_entropy_chunk", lambda backend: modeling.cross_entropy_chunk)
    monkeypatch.setattr(modeling._ChunkedLinearCrossEntropy, "apply", lambda *a: taken.append(a[4]) or apply(*a))
    hidden, weight = torch.randn(2, 6, 4), torch.randn(10, 4)
    labels = torch.randint(0, 10, (2, 6))
    losses = []
    for dtype, backend in [
        (torch.bfloat16, None),
        (torch.bfloat16, "inductor"),
        (torch.bfloat16, "aot_eager"),
        (torch.float32, "inductor"),
    ]:
        losses.append(modeling.chunked_causal_lm_loss(hidden.to(dtype), weight, labels, compile_backend=backend))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float32 states that the loss casts to bf16 (training's case)
        losses.append(modeling.chunked_causal_lm_loss(hidden, weight, labels, compile_backend="inductor"))
    assert taken == [3, 6, 3, 3, 6]
    for loss in losses[1:3] + losses[4:]:
        torch.testing.assert_close(loss, losses[0], rtol=1e-2, atol=1e-2)
    empty = modeling.chunked_causal_lm_loss(hidden[:, :0], weight, labels[:, :0], compile_backend="inductor")
    assert taken[-1] == 1 and torch.isnan(empty)  # no rows: the mean of no loss, as F.cross_entropy gives


@pytest.mark.parametrize("chunk_rows", [None, 5])
@pytest.mark.parametrize("num_items", [None, 40])
def test_chunked_loss_equals_full_logits_loss_and_gradients(chunk_rows, num_items):
    """`skip_logits=True` (the training loops' path) computes the loss without the logits tensor; value and every
    gradient (tied head included) must equal transformers' loss on full logits."""
    ids = torch.randint(1, 96, (3, 19), generator=torch.Generator().manual_seed(4))
    labels = ids.clone()
    labels[0, :6] = -100
    labels[2, 11] = -100
    results = []
    for fused in (False, True):
        model = tiny_model()
        model.train()
        if fused:
            out = model(ids, labels=labels, num_items_in_batch=num_items, skip_logits=True)
            assert out.logits is None
            loss = out.loss
            if chunk_rows is not None:  # also exercise several chunks with a ragged last one
                hidden = model.model(ids).last_hidden_state
                loss = chunked_causal_lm_loss(hidden, model.lm_head.weight, labels, num_items, chunk_rows=chunk_rows)
        else:  # the definition in float64 (transformers' own loss upcasts only to fp32)
            logits = model(ids).logits[:, :-1].reshape(-1, 96)
            target = labels[:, 1:].reshape(-1)
            loss = F.cross_entropy(logits, target, ignore_index=-100, reduction="sum")
            loss = loss / (num_items if num_items is not None else (target != -100).sum())
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    _assert_same_loss_and_grads(*results)


def test_training_forward_returns_the_logits_unless_asked_to_skip_them():
    """transformers' convention, which trainers rely on (TRL's SFTTrainer computes entropy and token accuracy from
    `outputs.logits` in training): logits come back with the loss by default; `skip_logits=True` (this project's
    loops) gives the same loss and gradients without them."""
    ids, labels = _loss_batch(seed=8)
    results = []
    for skip in (False, True):
        model = tiny_model()
        model.train()
        out = model(ids, labels=labels, skip_logits=skip)
        assert (out.logits is None) == skip
        if not skip:
            assert out.logits.shape == (*ids.shape, 96)
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    _assert_same_loss_and_gradients(results[1], results[0])  # (transformers' loss upcasts only to fp32)


def test_chunked_loss_under_bf16_autocast_matches_fp32():
    model = tiny_model(dtype=torch.float32)
    model.train()
    ids = torch.randint(1, 96, (2, 40), generator=torch.Generator().manual_seed(5))
    ref = model(ids, labels=ids, skip_logits=False).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=ids, skip_logits=True).loss
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref.item()) < 2e-2 * ref.item()
    loss.backward()
    assert model.lm_head.weight.grad.dtype == torch.float32 and torch.isfinite(model.lm_head.weight.grad).all()
    with pytest.raises(ValueError, match="skip_logits=True needs labels"):
        model(ids, skip_logits=True)


@pytest.mark.parametrize("backend", [None, "inductor"], ids=["eager", "inductor"])
def test_chunked_loss_scales_both_gradients_in_float32_under_autocast(backend):
    """Under bf16 autocast the chunked loss takes the float32 hidden states and returns their gradient in float32,
    and a loss weighted by c (`c * loss`, gradient accumulation's 1 / steps) gives gradients c times the unweighted
    ones to float32 rounding, for the hidden states as for the head: the divisor (1000 items here, not a power of 2)
    enters the gradients in float32 before their bf16 rounding, and the incoming gradient multiplies them in
    float32. (The scale rounded to bf16, as before, put the two gradients 0.64% apart here.)"""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 24, 16, generator=gen, requires_grad=True)
    weight = torch.randn(96, 16, generator=gen, requires_grad=True)
    labels = torch.randint(0, 96, (2, 24), generator=gen)
    labels[1, :7] = -100
    grads = {}
    for c in (1.0, 0.3, 1 / 3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = chunked_causal_lm_loss(hidden, weight, labels, 1000, chunk_rows=16, compile_backend=backend)
        grads[c] = torch.autograd.grad(c * loss, (hidden, weight))
        assert loss.dtype == grads[c][0].dtype == grads[c][1].dtype == torch.float32
    for c in (0.3, 1 / 3):
        for got, unweighted in zip(grads[c], grads[1.0]):
            kept = unweighted != 0
            assert kept.sum() > 0.5 * kept.numel()
            ratio = (got[kept].double() / unweighted[kept].double()) / c
            assert (ratio - 1).abs().max().item() < 1e-6
    # the float64 loss of the bf16-rounded inputs, to bf16 rounding: the divisor reached both gradients once
    h64 = hidden.detach().bfloat16().double().requires_grad_()
    w64 = weight.detach().bfloat16().double().requires_grad_()
    targets = F.pad(labels, (0, 1), value=-100)[:, 1:].reshape(-1)
    ref = F.cross_entropy(h64.reshape(-1, 16) @ w64.T, targets, ignore_index=-100, reduction="sum") / 1000
    ref_grads = torch.autograd.grad(ref, (h64, w64))
    for got, expected in zip(grads[1.0], ref_grads):
        assert ((got.double() - expected).norm() / expected.norm()).item() < 1e-2


def test_chunked_loss_under_float16_autocast_keeps_small_gradients_for_the_loss_scaler():
    """float16 has no float32 exponent range: the softmax gradient of a 32000-token head divided by a batch's 16384
    tokens would underflow to zero in most entries before a loss scaler's factor (here 2**16, as `GradScaler`
    starts) multiplies it in the backward. So in float16 the divisor is applied in the backward, in float32, and both
    gradients match the float64 loss of the float16-rounded inputs (folding it into the chunks left 99.8% of the
    head's gradient exactly zero, 0.6% off, and the hidden gradient 2.5% off)."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 64, 64, generator=gen, requires_grad=True)
    weight = (torch.randn(32000, 64, generator=gen) * 0.02).requires_grad_()
    labels = torch.randint(0, 32000, (1, 64), generator=gen)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = chunked_causal_lm_loss(hidden, weight, labels, 16384)
    grads = torch.autograd.grad(2.0**16 * loss, (hidden, weight))
    h64 = hidden.detach().half().double().requires_grad_()
    w64 = weight.detach().half().double().requires_grad_()
    targets = F.pad(labels, (0, 1), value=-100)[:, 1:].reshape(-1)
    ref = F.cross_entropy(h64.reshape(-1, 64) @ w64.T, targets, ignore_index=-100, reduction="sum") / 16384
    ref_grads = torch.autograd.grad(2.0**16 * ref, (h64, w64))
    for got, expected in zip(grads, ref_grads):
        assert got.dtype == torch.float32
        assert ((got.double() - expected).norm() / expected.norm()).item() < 2e-3
    assert (grads[1] == 0).float().mean().item() < 0.01  # rows of kept targets reach every vocabulary entry


def test_chunked_loss_of_a_bf16_model_multiplies_its_gradient_by_the_incoming_one_in_float32():
    """A model in bf16 (no autocast): a loss weighted by 1/3 gives the unweighted hidden gradient times 1/3 computed
    in float32 and rounded once to bf16, and the float32 scale reaches the head's gradient too (the scale rounded to
    bf16 first, as before, put a third of the entries 0.2% off)."""
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 24, 16, generator=gen).bfloat16().requires_grad_()
    weight = torch.randn(96, 16, generator=gen).bfloat16().requires_grad_()
    labels = torch.randint(0, 96, (2, 24), generator=gen)
    grads = {}
    for c in (1.0, 1 / 3):
        loss = chunked_causal_lm_loss(hidden, weight, labels, chunk_rows=16)
        grads[c] = torch.autograd.grad(c * loss, (hidden, weight))
    assert grads[1 / 3][0].dtype == torch.bfloat16
    assert torch.equal(grads[1 / 3][0], (grads[1.0][0].float() * (1 / 3)).bfloat16())
    # the head's gradient: its float32 sum times 1/3, rounded to bf16 once; the unweighted one is that sum rounded
    assert ((grads[1 / 3][1].float() * 3 - grads[1.0][1].float()).abs() <= grads[1.0][1].float().abs() / 128).all()


def test_chunked_loss_refuses_a_second_derivative():
    """The chunked loss computes its gradients in the forward, so it has no second derivative: a backward with
    create_graph=True (a gradient penalty through an earlier layer) raises and names the full-logits loss, rather
    than giving gradients without the loss's second-order terms."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 12, 8, generator=gen, requires_grad=True)
    layer = torch.randn(8, 8, generator=gen, requires_grad=True)
    weight = torch.randn(40, 8, generator=gen, requires_grad=True)
    labels = torch.randint(0, 40, (1, 12), generator=gen)
    loss = chunked_causal_lm_loss(x @ layer, weight, labels)
    with pytest.raises(RuntimeError, match="no second derivative.*skip_logits=False"):
        torch.autograd.grad(loss, x, create_graph=True)
    (grad_x,) = torch.autograd.grad(chunked_causal_lm_loss(x @ layer, weight, labels), x)  # first order: fine
    ref = F.cross_entropy((x @ layer)[0, :-1] @ weight.T, labels[0, 1:])
    torch.testing.assert_close(grad_x, torch.autograd.grad(ref, x)[0], rtol=1e-5, atol=1e-6)


def _train_and_eval_loss(model, ids, labels):
    """Train-mode loss (chunked, `skip_logits=True`, as the training loops ask) and eval-mode loss (full logits) on
    the same batch, each with the gradients it gives: ((loss, {name: grad}), (loss, {name: grad}))."""
    results = []
    for training in (True, False):
        model.train(training)
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=labels, skip_logits=training)
        assert (out.logits is None) == training  # train mode took the chunked path
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.loss.detach(), grads))
    model.zero_grad(set_to_none=True)
    return results


def _assert_same_loss_and_gradients(train, evaluated):
    # eval mode's loss is transformers' ForCausalLMLoss, which upcasts the logits to fp32 (also from fp64)
    torch.testing.assert_close(train[0].float(), evaluated[0].float(), rtol=1e-6, atol=1e-6)
    assert train[1].keys() == evaluated[1].keys() and train[1]
    for name in train[1]:
        torch.testing.assert_close(train[1][name], evaluated[1][name], rtol=1e-4, atol=1e-6, msg=name)


def _loss_batch(seed=4):
    ids = torch.randint(1, 96, (3, 19), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[0, :6] = -100
    return ids, labels


def test_train_mode_loss_equals_eval_mode_loss():
    ids, labels = _loss_batch()
    _assert_same_loss_and_gradients(*_train_and_eval_loss(tiny_model(), ids, labels))


class _ScaledHead(torch.nn.Linear):  # a user's Linear subclass (e.g. a quantised layer) whose forward differs
    def forward(self, x):
        return 0.5 * super().forward(x) + 0.1


@pytest.mark.parametrize("wrap", ["forward_hook", "forward_pre_hook", "subclass", "global_hook", "instance_forward"])
def test_wrapped_or_hooked_head_stays_in_the_training_loss(wrap):
    """Whatever changes lm_head's output changes the train-mode loss exactly as the eval-mode one, and its
    gradient reaches the head weight through the module (no read of lm_head.weight behind its back)."""
    ids, labels = _loss_batch()
    model = tiny_model()
    (plain_loss, _), _ = _train_and_eval_loss(model, ids, labels)
    handle = None
    if wrap == "forward_hook":
        handle = model.lm_head.register_forward_hook(lambda mod, args, out: 0.5 * out + 0.1)
    elif wrap == "forward_pre_hook":
        handle = model.lm_head.register_forward_pre_hook(lambda mod, args: (2.0 * args[0],))
    elif wrap == "global_hook":
        handle = torch.nn.modules.module.register_module_forward_hook(
            lambda mod, args, out: 0.5 * out + 0.1 if mod is model.lm_head else None
        )
    elif wrap == "instance_forward":  # how accelerate's hooks (device maps, offloading) wrap a module
        plain_forward = model.lm_head.forward
        model.lm_head.forward = lambda x: 0.5 * plain_forward(x) + 0.1
    else:
        head = _ScaledHead(48, 96, bias=False).to(torch.float64)
        head.weight = model.lm_head.weight  # still tied
        model.lm_head = head
    try:
        assert not modeling.is_plain_linear(model.lm_head)
        train, evaluated = _train_and_eval_loss(model, ids, labels)
    finally:
        if handle is not None:
            handle.remove()
    assert abs(train[0].item() - plain_loss.item()) > 1e-3  # the wrapper was applied...
    _assert_same_loss_and_gradients(train, evaluated)  # ...in train mode as in eval mode, gradients included


def test_offloaded_or_hooked_gated_deltanet_conv_is_called_as_a_module(tmp_path):
    """accelerate's offloading (`cpu_offload`; `device_map` with a Gated DeltaNet layer on "disk") loads a weight
    only inside its module's call: the conv must not read `conv1d.weight` behind it (it was the meta device's
    uninitialised memory: NaN logits). Offloaded models give the resident model's logits, packed logits (taps read
    from the module's response to an impulse) and greedy tokens. A forward hook on the conv (here adding to its
    output) applies in the unpacked path, a call with the real input, and in cached decoding (the static decoder,
    which reads the conv's weight, steps aside); with packed rows, where its taps are needed apart, such a conv is
    refused by name rather than shown an impulse."""
    from accelerate import cpu_offload
    from transformers import AutoModelForCausalLM

    model = tiny_model()  # float64; mixer types linear, csa, full, linear
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    packed = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]] * 2)  # two documents per row
    with torch.no_grad():
        ref, ref_packed = model(ids).logits, model(ids, position_ids=packed).logits
    ref_tokens = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)

    offloaded = copy.deepcopy(model)
    cpu_offload(offloaded, execution_device=torch.device("cpu"))
    assert not modeling.is_plain_module(offloaded.model.layers[0].mixer.conv1d, torch.nn.Conv1d)
    with torch.no_grad():
        torch.testing.assert_close(offloaded(ids).logits, ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(offloaded(ids, position_ids=packed).logits, ref_packed, rtol=1e-10, atol=1e-10)
    assert torch.equal(offloaded.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0), ref_tokens)

    model.save_pretrained(tmp_path / "saved")
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    device_map.update({f"model.layers.{i}": "disk" if i == 0 else "cpu" for i in range(4)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers notes the parameters left on the meta device
        on_disk = AutoModelForCausalLM.from_pretrained(
            tmp_path / "saved", device_map=device_map, offload_folder=tmp_path / "offload", dtype=torch.float64
        )
    with torch.no_grad():
        torch.testing.assert_close(on_disk(ids).logits, ref, rtol=1e-10, atol=1e-10)

    hooked = copy.deepcopy(model)
    for layer in (0, 3):
        hooked.model.layers[layer].mixer.conv1d.register_forward_hook(lambda mod, args, out: out + 0.1)
    with torch.no_grad():
        rows = hooked(ids).logits
        assert (rows - ref).abs().max() > 1e-3  # the hook was applied
        # generation: the static one-token path (on for every device here) must not skip the hook
        hooked.config.decode_cuda_graphs = "always"
        fast = hooked.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        hooked.config.decode_cuda_graphs = False
        assert torch.equal(fast, hooked.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0))
        with pytest.raises(ValueError, match="packed sequences .* hooked or wrapped conv1d"):
            hooked(ids, position_ids=packed)


def test_a_model_with_tied_embeddings_on_disk_saves_after_a_forward(tmp_path):
    """accelerate puts offloaded weights back as new objects around each forward, so after one the tied head and
    embeddings were taken for untied ones (the meta device holds no values to compare) and `save_pretrained`
    refused the model. It saves, and reloads to the same logits."""
    from transformers import AutoModelForCausalLM

    model = tiny_model()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path / "saved")
    device_map = {"model.embed_tokens": "disk", "lm_head": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu"}
    device_map.update({f"model.layers.{i}": "cpu" for i in range(4)})
    ids = torch.randint(3, 96, (1, 8), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers notes the parameters left on the meta device
        on_disk = AutoModelForCausalLM.from_pretrained(
            tmp_path / "saved", device_map=device_map, offload_folder=tmp_path / "offload", dtype=torch.float64
        )
        with torch.no_grad():
            logits = on_disk(ids).logits
        on_disk.save_pretrained(tmp_path / "again")
    with torch.no_grad():
        reloaded = LlamaThinkForCausalLM.from_pretrained(tmp_path / "again", dtype=torch.float64)
        torch.testing.assert_close(reloaded(ids).logits, logits, rtol=1e-10, atol=1e-10)  # (another summation order)


def test_one_token_steps_run_every_forward_hook_and_honour_every_option_the_general_path_does():
    """The static one-token step (on for every device here, "always") computes the new token's logits only, and
    calls the layers without `LlamaThinkModel.forward` (on CUDA it replays a graph: no Python at all). So a forward
    hook anywhere in the model (added before generate() or between two steps), hidden states asked for (also through
    the config), skip_logits, a logits_to_keep tensor or another keyword send the step down the general path, which
    runs the hooks on every step and returns or refuses the option as on any other step; without them the step is
    static (its buffers are in use)."""
    model = tiny_model(decode_cuda_graphs="always").eval()
    ids = torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(4))
    kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    with torch.no_grad():
        ref = model.generate(ids, **kwargs)
        assert model.__dict__.get("_static_decoders")  # the static step served the plain call
        calls = {"model": [], "layer": []}
        hooks = [
            model.model.register_forward_hook(lambda mod, args, out: calls["model"].append(out.last_hidden_state)),
            model.model.layers[3].register_forward_hook(lambda mod, args, out: calls["layer"].append(out.clone())),
        ]
        assert torch.equal(model.generate(ids, **kwargs), ref)
        assert len(calls["model"]) == len(calls["layer"]) == 5  # the prompt and four one-token steps
        model.config.decode_cuda_graphs = False  # the hooks saw what the general path computes, step by step
        seen = {k: list(v) for k, v in calls.items()}
        calls["model"].clear(), calls["layer"].clear()
        model.generate(ids, **kwargs)
        for name, slow_calls in calls.items():
            for fast, slow in zip(seen[name], slow_calls, strict=True):
                torch.testing.assert_close(fast, slow, rtol=0, atol=0)
        model.config.decode_cuda_graphs = "always"
        for hook in hooks:
            hook.remove()
        # a hook added between two steps of a hand-written loop runs from the next step on (the static step skips
        # LlamaThinkModel.forward); a hook on the causal LM itself runs around forward on either path
        out = model(ids, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        outer = model.register_forward_pre_hook(lambda mod, args: calls["layer"].append("outer"))
        out = model(token, past_key_values=cache)
        assert cache._static is not None  # the step was static
        # the cache holds its state only, not the model (it is copied and saved with the state)
        assert len(pickle.dumps(cache)) < sum(p.numel() * p.element_size() for p in model.parameters()) / 4
        hook = model.model.register_forward_pre_hook(lambda mod, args: calls["layer"].append("model"))
        calls["layer"].clear()
        out = model(out.logits.argmax(-1), past_key_values=cache)
        assert calls["layer"] == ["outer", "model"]
        hook.remove(), outer.remove()
        # a module swapped in between steps is looked at once the graphs are released (as after an adapter switch)
        swapped = copy.deepcopy(model.model.layers[2].mlp)
        swapped.register_forward_hook(lambda mod, args, out: calls["layer"].append("swapped"))
        model(out.logits.argmax(-1), past_key_values=cache)
        assert cache._static is not None
        model.model.layers[2].mlp = swapped
        model.release_decode_graphs()
        calls["layer"].clear()
        model(out.logits.argmax(-1), past_key_values=cache)
        assert calls["layer"] == ["swapped"]
        # options: each as on a step of the general path
        model.config.output_hidden_states = True
        out = model(ids, use_cache=True)
        step = model(out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values)
        assert step.hidden_states is not None and len(step.hidden_states) == model.config.num_hidden_layers + 1
        model.config.output_hidden_states = False
        out = model(ids, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        step = model(token, past_key_values=cache, logits_to_keep=torch.tensor([0, 0]))
        assert step.logits.shape == (2, 2, model.config.vocab_size)
        with pytest.raises(ValueError, match="skip_logits=True needs labels"):
            model(token, past_key_values=cache, skip_logits=True)
        with pytest.raises(ValueError, match="output_attentions"):
            model(token, past_key_values=cache, output_attentions=True)


@pytest.mark.parametrize("chunk_rows, num_items", [(None, None), (7, None), (1, 40)])
def test_loss_through_the_head_module_equals_the_fused_loss_and_gradients(chunk_rows, num_items):
    """`chunked_causal_lm_loss_through_module` (several checkpointed slices, ragged last one) gives the fused
    loss's value and every gradient, the tied embedding included."""
    ids, labels = _loss_batch(seed=6)
    results = []
    for through_module in (False, True):
        model = tiny_model()
        model.train()
        hidden = model.model(ids).last_hidden_state
        if through_module:
            loss = modeling.chunked_causal_lm_loss_through_module(hidden, model.lm_head, labels, num_items, chunk_rows)
        else:
            loss = chunked_causal_lm_loss(hidden, model.lm_head.weight, labels, num_items)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    _assert_same_loss_and_grads(*results)


@pytest.mark.parametrize("num_items", [None, 30])
def test_shift_labels_are_the_targets_of_every_loss_path(num_items):
    """transformers' `shift_labels` (targets already shifted: context parallelism and padding-free collators give
    them, the last position's target from beyond the row) replace the shifted labels in the full-logits loss, the
    fused chunked loss and the loss through the head module, as in transformers' `ForCausalLMLoss` (they were
    dropped without a word, the loss taken from `labels`). Shift labels equal to the shifted labels give the same
    loss as labels alone; without labels no loss is computed (transformers' Trainer drops labels for a custom loss
    after context parallelism added shift_labels); shift labels of another shape or outside the vocabulary are
    refused."""
    ids, labels = _loss_batch(seed=8)
    shift = torch.randint(0, 96, ids.shape, generator=torch.Generator().manual_seed(9))
    shift[0, :4] = -100
    shift[1, -1] = 5  # the last position has a target here (a shifted label never does)
    model = tiny_model()
    model.train()
    logits = model(ids).logits
    want = F.cross_entropy(logits.reshape(-1, 96), shift.reshape(-1), ignore_index=-100, reduction="sum")
    want = want / (num_items if num_items is not None else (shift != -100).sum())
    kw = {"num_items_in_batch": num_items} if num_items is not None else {}
    got = {
        "logits": model(ids, labels=labels, shift_labels=shift, **kw).loss,
        "fused": model(ids, labels=labels, shift_labels=shift, skip_logits=True, **kw).loss,
    }
    hidden = model.model(ids).last_hidden_state
    got["module"] = modeling.chunked_causal_lm_loss_through_module(
        hidden, model.lm_head, labels, num_items, chunk_rows=7, shift_labels=shift
    )
    for path, loss in got.items():  # (transformers' loss on full logits computes in float32)
        tol = 1e-6 if path == "logits" else 1e-12
        torch.testing.assert_close(loss, want.to(loss.dtype), rtol=tol, atol=tol, msg=path)
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
    for skip in (False, True):
        torch.testing.assert_close(
            model(ids, labels=labels, shift_labels=shifted, skip_logits=skip).loss,
            model(ids, labels=labels, skip_logits=skip).loss,
            rtol=1e-12,
            atol=1e-12,
        )
    out = model(ids, shift_labels=shift)  # no labels: no loss, shift_labels unused (as transformers' models)
    assert out.loss is None
    torch.testing.assert_close(out.logits, logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"shift_labels has shape \(3, 18\), expected"):
        model(ids, labels=labels, shift_labels=shift[:, 1:])
    with pytest.raises(ValueError, match="shift_labels contains 96: neither -100"):
        model(ids, labels=labels, shift_labels=torch.full_like(shift, 96))


def test_peft_lora_on_lm_head_and_q_proj_trains_through_the_chunked_loss():
    """PEFT LoRA on lm_head (and q_proj): one training step has a finite loss equal to the eval-mode loss, and the
    head's LoRA matrices get nonzero gradients (the old weight read skipped them)."""
    import peft  # setup.py's dev extra: a missing peft fails this test rather than skipping it

    ids, labels = _loss_batch(seed=7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes on tied weights and deprecated names
        lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"])
        model = peft.get_peft_model(tiny_model(), lora)
    with torch.no_grad():  # LoRA starts with B = 0 (no change); make the adapters change the logits
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    with model.disable_adapter():
        model.eval()
        with torch.no_grad():
            base_loss = model(input_ids=ids, labels=labels).loss
    train, evaluated = _train_and_eval_loss(model, ids, labels)
    assert torch.isfinite(train[0])
    assert abs(train[0].item() - base_loss.item()) > 1e-3  # the adapters are in the path
    _assert_same_loss_and_gradients(train, evaluated)
    grads = train[1]
    head_lora = {n: g for n, g in grads.items() if "lm_head.lora_" in n}
    assert len(head_lora) == 2 and all(g.abs().sum() > 0 for g in head_lora.values())
    assert any("q_proj.lora_" in n and g.abs().sum() > 0 for n, g in grads.items())
    assert all("lora_" in n for n in grads)  # the base stays frozen
    # the step itself: the head's adapters move, its base weight does not
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lm_head" in n or "embed_tokens" in n}
    assert len(before) == 3  # the tied head/embedding weight and the head's two LoRA matrices
    model.train()
    model(input_ids=ids, labels=labels, skip_logits=True).loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    after = dict(model.named_parameters())
    for name, value in before.items():
        assert torch.equal(after[name], value) != ("lora_" in name), name


def _explain_without_graph_breaks(fn, *args):
    """torch._dynamo.explain(fn)(*args), asserting that dynamo traced it without a graph break (naming the reasons)."""
    explanation = torch._dynamo.explain(fn)(*args)
    assert explanation.graph_break_count == 0, [str(b.reason)[:200] for b in explanation.break_reasons]
    return explanation


def test_training_step_traces_into_one_graph_for_torch_compile():
    """torch.compile sees the whole training forward (PyTorch kernels, chunked loss) as one graph: no graph breaks
    from host syncs or Python-side checks. (The fla backend's one-graph test is below.)"""
    model = tiny_model(dtype=torch.float32, mixer_types=["linear", "csa", "full", "linear"])
    model.train()
    ids = torch.randint(1, 96, (2, 64), generator=torch.Generator().manual_seed(0))
    explanation = _explain_without_graph_breaks(lambda x: model(input_ids=x, labels=x, skip_logits=True).loss, ids)
    assert explanation.graph_count == 1


def _reference_fla_internals():
    """Stand-ins for fla's chunked forward and backward with fla's signatures and output layout, computed by our
    PyTorch reference (the backward by autograd on a worker thread: a custom op's body runs with autograd off)."""

    def fwd(q, k, v, g, beta, scale, initial_state, output_final_state, **_):
        o, state = torch_chunk_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state)
        return g.clone(), o, k.new_zeros(*k.shape[:3], 64), state, initial_state, None

    def bwd(q, k, v, g, beta, A, scale, initial_state, do, dht, **_):
        def grads():
            inputs = [t.detach().requires_grad_() for t in (q, k, v, g, beta)]
            h0 = None if initial_state is None else initial_state.detach().requires_grad_()
            o, state = torch_chunk_gated_delta_rule(*inputs, scale, h0, dht is not None)
            outputs, grad_outputs = [o, state][: 1 + (dht is not None)], [do, dht][: 1 + (dht is not None)]
            return torch.autograd.grad(outputs, inputs + [h0][: h0 is not None], grad_outputs)

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            r = pool.submit(grads).result()
        return r[0], r[1], r[2], r[4], r[3], r[5] if initial_state is not None else None, None, None

    return fwd, bwd


@pytest.fixture
def fla_as_reference(monkeypatch):
    """fla's kernels replaced by the PyTorch reference, and the fla backend used (also on CPU) unless "torch" is
    asked for."""
    monkeypatch.setitem(kernels._fla_state, "internals", _reference_fla_internals())
    # the Gated DeltaNet layers ask the name the modeling file imported from kernels_llamathink
    monkeypatch.setattr(modeling, "select_gdn_backend", lambda asked, *_: "torch" if asked == "torch" else "fla")


def test_fla_custom_op_registration(fla_as_reference):
    """The op behind compiled fla training: schema, fake (meta) outputs, autograd formula and AOT tracing are
    consistent (torch.library.opcheck), with and without an initial state / final state."""
    gen = torch.Generator().manual_seed(0)
    B, T, H, K, V = 2, 70, 3, 8, 10
    q, k = (l2norm(torch.randn(B, T, H, K, generator=gen)) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=gen)
    g = -F.softplus(torch.randn(B, T, H, generator=gen)) * 0.3
    beta = torch.rand(B, T, H, generator=gen)
    h0 = torch.randn(B, H, K, V, generator=gen) * 0.1
    for initial_state, final in ((None, False), (h0, True)):
        args = [t.clone().requires_grad_() for t in (q, k, v, g, beta)]
        h = None if initial_state is None else initial_state.clone().requires_grad_()
        torch.library.opcheck(kernels._fla_chunk_op, (*args, K**-0.5, h, final))


def test_compiled_fla_path_is_one_graph_with_exact_gradients(fla_as_reference):
    """Under torch.compile the fla backend runs as one opaque op per layer: the training forward is one graph
    (no break per Gated DeltaNet layer), and loss and gradients equal the eager PyTorch path's."""
    _assert_compiled_backend_is_one_graph_with_the_reference_gradients("fla", "llamathink.fla_chunk_gdn")


def _assert_compiled_backend_is_one_graph_with_the_reference_gradients(gdn_backend: str, op_name: str):
    """A tiny model with `gdn_backend` (its kernels stood in for by the PyTorch reference) traced by dynamo: the
    training forward is one graph holding `op_name` (one opaque op per Gated DeltaNet layer), and compiled
    (AOTAutograd) its loss and every gradient equal the PyTorch backend's eagerly."""
    ids = torch.randint(1, 96, (2, 70), generator=torch.Generator().manual_seed(0))
    mixers = ["linear", "csa", "full", "linear"]
    reference = tiny_model(dtype=torch.float32, mixer_types=mixers, gdn_backend="torch").train()
    compiled = tiny_model(dtype=torch.float32, mixer_types=mixers, gdn_backend=gdn_backend).train()
    loss_ref = reference(input_ids=ids, labels=ids).loss
    loss_ref.backward()

    def train_loss(x):
        return compiled(input_ids=x, labels=x, skip_logits=True).loss

    explanation = _explain_without_graph_breaks(train_loss, ids)
    assert op_name in str(explanation.graphs[0].graph)
    torch._dynamo.reset()
    loss = torch.compile(train_loss, backend="aot_eager", fullgraph=True)(ids)
    loss.backward()
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    for (name, p_ref), (_, p) in zip(reference.named_parameters(), compiled.named_parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_every_parameter_gets_a_gradient(model):
    ids = torch.randint(1, 96, (2, 20))
    model.train()
    model(ids, labels=ids).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_fresh_init_values():
    """Every weight matrix, the embedding and the depthwise conv start N(0, initializer_range), but the projections
    into the residual stream, which start at zero (the first init gave the conv std 0.29 and those projections
    0.02 / sqrt(2L), later N(0, 0.02) until session 18); gains, scales and GDN decays as documented."""
    torch.manual_seed(0)
    model = LlamaThinkForCausalLM(LlamaThinkConfig())  # the default 95M shape: large tensors, tight std estimates
    std = model.config.initializer_range
    normal, zeros = 0, []
    for name, p in model.named_parameters():
        if name.endswith(("o_proj.weight", "out_proj.weight", "down_proj.weight")):
            assert not p.any(), name
            zeros.append(name)
        elif p.dim() >= 2:  # Linear weights, the embedding, conv1d [C, 1, K]
            assert abs(p.std().item() - std) < 0.1 * std, (name, p.std().item())
            assert abs(p.mean().item()) < 0.1 * std, name
            normal += 1
    assert len(zeros) == 16 * 2  # each layer's mixer output and MLP down projection
    assert normal == 1 + 16 * 2 + 8 * 5 + 4 * 3 + 4 * 6  # embedding, MLPs, GDN (conv included), full, CSA
    layer = model.model.layers[0]
    assert torch.all(layer.input_layernorm.weight == 0) and torch.all(layer.mixer_residual_scale == 0)
    assert torch.all(layer.mlp_sublayer_scale == 0) and torch.all(layer.mixer.norm.weight == 1)
    assert torch.all(layer.mixer.dt_bias == 1)
    a = torch.cat([m.mixer.A_log for m in model.model.layers if m.mixer_type == "linear"]).exp()
    assert a.min() >= 0.01 and a.max() <= 16 and a.min() < 1  # Qwen3.5's range: some heads decay slowly
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, LlamaThinkRotaryEmbedding(model.config).inv_freq)


def test_init_options():
    torch.manual_seed(0)
    cfg = dict(
        num_hidden_layers=8, mixer_types=["linear", "csa", "full", "linear"] * 2, hidden_size=96, intermediate_size=384
    )
    model = LlamaThinkForCausalLM(
        tiny_config(rescale_prenorm_residual=True, A_init_range=[2, 3], dt_init_range=[0.001, 0.1], **cfg)
    )
    std = model.config.initializer_range
    layer = model.model.layers[0]
    assert abs(layer.mlp.down_proj.weight.std().item() - std / 4) < 0.1 * std / 4  # / sqrt(2 * 8)
    assert abs(layer.mlp.up_proj.weight.std().item() - std) < 0.1 * std
    a = torch.cat([m.mixer.A_log for m in model.model.layers if m.mixer_type == "linear"]).exp()
    assert a.min() >= 2 and a.max() <= 3
    dt = torch.nn.functional.softplus(
        torch.cat([m.mixer.dt_bias for m in model.model.layers if m.mixer_type == "linear"])
    )
    assert dt.min() >= 0.001 * 0.999 and dt.max() <= 0.1 * 1.001 and len(set(dt.tolist())) == len(dt)
    for bad in (
        {"A_init_range": [0, 16]},
        {"A_init_range": [16, 1]},
        {"A_init_range": [1]},
        {"dt_init_range": [0.1, 0.001]},
        {"dt_init_range": "0.1"},
        {"A_init_range": [1e-300, 16]},  # log(A) in float32: -inf
        {"dt_init_range": [0.001, 1e39]},  # beyond float32: the draw gives inf
        {"dt_init_range": [0.001, 3.4e38]},  # float32's largest: log's exp rounds to inf
        {"A_init_range": [1e37, 1e37]},  # a chunk's running sum of log-decays would be -inf: NaN outputs
        {"dt_init_range": [1, 1e16]},
        {"rescale_prenorm_residual": "yes"},
        {"zero_init_residual": "yes"},
        {"zero_init_residual": 1},
        {"zero_init_residual": 0.0},
        {"zero_init_residual": True, "rescale_prenorm_residual": True},
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            tiny_config(**bad)
    # the largest rates accepted: a 64-token chunk's log-decays stay finite, and equal to decoding token by token
    extreme = tiny_config(A_init_range=[1e15, 1e15], dt_init_range=[1e15, 1e15], gdn_backend="torch", gdn_chunk_size=64)
    model = LlamaThinkForCausalLM(extreme).eval()
    ids = torch.randint(3, 96, (1, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = model(ids).logits
        out = model(ids[:, :1], use_cache=True)
        steps = [out.logits]
        for t in range(1, 64):
            out = model(ids[:, t : t + 1], cache=out.past_key_values)
            steps.append(out.logits)
    assert torch.isfinite(whole).all()
    torch.testing.assert_close(whole, torch.cat(steps, 1), rtol=1e-5, atol=1e-5)


def test_zero_init_residual_setting():
    """Unset, `zero_init_residual` is on unless `rescale_prenorm_residual` asks for the GPT-2 start (a file that sets
    only that keeps its meaning); off gives the residual projections N(0, initializer_range). Either way a fresh
    model trains every weight: the zero projections get gradients at once, the weights behind them one step later."""
    assert LlamaThinkConfig().residual_starts_at_zero is True
    assert LlamaThinkConfig(rescale_prenorm_residual=True).residual_starts_at_zero is False
    assert LlamaThinkConfig.from_dict({"rescale_prenorm_residual": True}).residual_starts_at_zero is False
    assert tiny_config(zero_init_residual=None).residual_starts_at_zero is True
    edited = LlamaThinkConfig()
    edited.rescale_prenorm_residual = True  # set after construction (or by a loading keyword): still one setting
    assert edited.residual_starts_at_zero is False
    edited.validate_llamathink()
    torch.manual_seed(0)
    off = LlamaThinkForCausalLM(tiny_config(zero_init_residual=False, hidden_size=256, intermediate_size=512))
    down = off.model.layers[0].mlp.down_proj.weight
    assert abs(down.std().item() - 0.02) < 0.002
    torch.manual_seed(0)
    model = LlamaThinkForCausalLM(tiny_config(zero_init_residual=True)).double()
    params = dict(model.named_parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    ids = torch.randint(3, 96, (2, 40), generator=torch.Generator().manual_seed(0))
    first_grads = {}
    for step in range(2):
        optimizer.zero_grad()
        model(ids, labels=ids).loss.backward()
        if step == 0:
            first_grads = {n: p.grad.clone() for n, p in params.items()}
        optimizer.step()
    residual = [n for n in params if n.endswith(("o_proj.weight", "out_proj.weight", "down_proj.weight"))]
    assert len(residual) == 8 and all(first_grads[n].abs().sum() > 0 for n in residual)
    assert first_grads["model.layers.0.mlp.up_proj.weight"].abs().sum() == 0  # behind a zero down_proj
    untrained = [n for n, p in params.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert untrained == []


def test_zero_residual_start_keeps_every_other_tensor_of_the_normal_start():
    """At one seed the default model is the `zero_init_residual=false` model with its residual projections zeroed:
    the same random draws for every other tensor (the paired comparison of BENCHMARKS.md section 2, where the zero
    start was measured as `init.residual_out=0` on top of the normal one)."""
    torch.manual_seed(3)
    zero = LlamaThinkForCausalLM(tiny_config(zero_init_residual=None)).state_dict()
    torch.manual_seed(3)
    normal = LlamaThinkForCausalLM(tiny_config(zero_init_residual=False)).state_dict()
    residual = {n for n in zero if n.endswith(("o_proj.weight", "out_proj.weight", "down_proj.weight"))}
    assert len(residual) == 8
    for name, tensor in zero.items():
        if name in residual:
            assert not tensor.any() and normal[name].std() > 0.01, name
        else:
            assert torch.equal(tensor, normal[name]), name


def test_from_pretrained_keeps_saved_tensors_bit_for_bit(tmp_path):
    """Loading never re-initialises: every saved tensor (A_log and dt_bias included) comes back unchanged."""
    saved = tiny_model(dtype=torch.float32, seed=5)
    saved.save_pretrained(tmp_path)
    torch.manual_seed(123)  # a different init stream than the saved model's
    loaded = LlamaThinkForCausalLM.from_pretrained(tmp_path)
    expected, got = saved.state_dict(), loaded.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_a_config_file_without_csa_blend_bias_is_the_seed_gate(tmp_path):
    """A model saved before `csa_blend_bias` existed has no such key in config.json (which records
    transformers_version) and no blend bias in its weights: every loader reads it as `None` (no bias), where the
    class default (-4) would add a bias the weights lack, filled at -4, and shift every CSA layer. A config without
    transformers_version (hand-written, or built in Python) gets the class default."""
    from transformers import AutoConfig, AutoModelForCausalLM

    old = tiny_model(csa_blend_bias=None)
    old.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    raw = json.loads(path.read_text())
    assert raw.pop("csa_blend_bias") is None
    path.write_text(json.dumps(raw))
    assert LlamaThinkConfig.from_json_file(str(path)).csa_blend_bias is None
    assert LlamaThinkConfig.from_pretrained(tmp_path).csa_blend_bias is None
    assert AutoConfig.from_pretrained(tmp_path, trust_remote_code=True).csa_blend_bias is None
    assert LlamaThinkConfig.from_pretrained(tmp_path, csa_blend_bias=-2.0).csa_blend_bias == -2.0  # kwargs win
    ids = torch.randint(1, 96, (2, 20))
    for loaded in (
        LlamaThinkForCausalLM.from_pretrained(tmp_path, dtype=torch.float64),
        AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64, trust_remote_code=True),
    ):
        assert loaded.config.csa_blend_bias is None
        assert not any(name.endswith("blend_proj.bias") for name in loaded.state_dict())
        torch.testing.assert_close(loaded(ids).logits, old(ids).logits, rtol=0, atol=1e-12)
    assert LlamaThinkConfig.from_dict(raw).csa_blend_bias is None  # the same dict, however it is read
    raw.pop("transformers_version")  # hand-written, or built in Python: the class default
    assert LlamaThinkConfig.from_dict(raw).csa_blend_bias == LlamaThinkConfig(**raw).csa_blend_bias == -4.0
    # such a config.json beside weights without the bias: refused by name (transformers would fill it at -4)
    path.write_text(json.dumps(raw))
    for load in (LlamaThinkForCausalLM.from_pretrained, AutoModelForCausalLM.from_pretrained):
        with pytest.raises(
            ValueError, match=r'weights have no model\.layers\.\d\.mixer\.blend_proj\.bias.*"csa_blend_bias": null'
        ):
            load(tmp_path, trust_remote_code=True)


def test_weights_of_other_layers_than_the_config_are_named_not_blamed_on_the_blend_bias(tmp_path):
    """A saved model whose config.json was edited so that a CSA layer moved (mixer_types of the weights' CSA at
    layer 1, the config's at layer 2) misses that layer's CSA tensors, blend bias included, and holds layer 1's as
    unexpected: the error names both sets, a few of each and how many more, not the `"csa_blend_bias": null` fix
    (which would only lead to this error). Only the blend bias missing still gets that fix."""
    from transformers import AutoModelForCausalLM

    tiny_model(mixer_types=["linear", "csa", "full", "linear"]).save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    raw = json.loads(path.read_text())
    csa_only = [f"mixer.{name}" for name in ("blend_proj.bias", "blend_proj.weight", "compress_k.weight")]
    csa_only += ["mixer.compress_v.weight"]  # what a CSA layer has beyond a full-attention layer
    cases = {  # edited mixer_types -> the message's ending: all four tensors of each side, or four and a count
        ("linear", "full", "csa", "linear"): "missing tensors "
        + ", ".join(f"model.layers.2.{n}" for n in csa_only)
        + "; unexpected tensors "
        + ", ".join(f"model.layers.1.{n}" for n in csa_only),
        ("csa", "linear", "full", "linear"): re.compile(
            r"missing tensors (model\.layers\.[01]\.\S+, ){3}model\.layers\.[01]\.\S+ and \d+ more; "
            r"unexpected tensors (model\.layers\.[01]\.\S+, ){3}model\.layers\.[01]\.\S+ and \d+ more$"
        ),
    }
    for mixer_types, ending in cases.items():
        raw["mixer_types"] = list(mixer_types)
        path.write_text(json.dumps(raw))
        for load in (LlamaThinkForCausalLM.from_pretrained, AutoModelForCausalLM.from_pretrained):
            with pytest.raises(ValueError) as err:
                load(tmp_path, trust_remote_code=True)
            text = str(err.value)
            assert "its weights do not match the config (its config.json" in text and "csa_blend_bias" not in text, text
            assert text.endswith(ending) if isinstance(ending, str) else ending.search(text), text


def test_weights_that_do_not_match_the_config_are_refused_not_filled_in(tmp_path):
    """transformers fills a missing tensor with its init and drops an unexpected one with a log line: a saved
    model whose config.json was edited (hyper-connections off, untied head, a layer more or less) or whose weights
    file lost a tensor would load and compute something else. Each is refused, naming the tensors; with
    `output_loading_info=True` the load goes on and the caller gets the keys."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    tiny_model().save_pretrained(tmp_path / "good")
    config = json.loads((tmp_path / "good" / "config.json").read_text())
    weights = load_file(str(tmp_path / "good" / "model.safetensors"))
    cases = {
        "hyper_connections": ({"hyper_connections": False}, None, "unexpected tensors model.layers.0."),
        "untied": ({"tie_word_embeddings": False}, None, "missing tensors lm_head.weight"),
        "layers": (
            {"num_hidden_layers": config["num_hidden_layers"] + 1, "mixer_types": [*config["mixer_types"], "full"]},
            None,
            f"missing tensors model.layers.{config['num_hidden_layers']}.",
        ),
        "lost tensor": ({}, "model.embed_tokens.weight", "missing tensors lm_head.weight, model.embed_tokens.weight;"),
    }
    for name, (edit, lost, message) in cases.items():
        folder = tmp_path / name.replace(" ", "_")
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({**config, **edit}))
        save_file({k: v for k, v in weights.items() if k != lost}, str(folder / "model.safetensors"))
        for load in (LlamaThinkForCausalLM.from_pretrained, AutoModelForCausalLM.from_pretrained):
            with pytest.raises(ValueError, match=r"its weights do not match the config \(its config\.json") as err:
                load(folder, trust_remote_code=True)
            assert message in str(err.value), (name, str(err.value))
        model, info = LlamaThinkForCausalLM.from_pretrained(folder, output_loading_info=True)
        assert info["missing_keys"] or info["unexpected_keys"], name
    assert isinstance(LlamaThinkForCausalLM.from_pretrained(tmp_path / "good"), LlamaThinkForCausalLM)
    # the caller's own config values are named first among the causes
    with pytest.raises(ValueError, match=r"the config values passed to from_pretrained \(tie_word_embeddings=False\)"):
        LlamaThinkForCausalLM.from_pretrained(tmp_path / "good", tie_word_embeddings=False)


def test_weights_that_cannot_compute_are_refused_by_bare_from_pretrained(tmp_path):
    """transformers loads a tensor stored as integers cast to floats, and NaN or infinite values, without a word:
    the model would then give NaN logits, or sample from nonsense. `from_pretrained` (and through trust_remote_code
    the Auto class) refuses them, naming the tensors: integer weights (read from the headers of the files it
    reads, sharded ones and a variant's included), NaN, and values that overflow the dtype asked for (float16).
    A safetensors file beside the weights that from_pretrained does not read (an adapter, say) is not blamed."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    tiny_model(dtype=torch.float32).save_pretrained(tmp_path / "good")
    weights = load_file(str(tmp_path / "good" / "model.safetensors"))
    config = (tmp_path / "good" / "config.json").read_text()
    integer, nan, large = (dict(weights) for _ in range(3))
    integer["model.norm.weight"] = (weights["model.norm.weight"] * 1000).to(torch.int32)
    nan["model.layers.0.mlp.up_proj.weight"] = weights["model.layers.0.mlp.up_proj.weight"].clone()
    nan["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    large["model.norm.weight"] = weights["model.norm.weight"] * 1e6  # finite in float32, inf in float16
    cases = [
        (integer, {}, r"weights must be floating point \(.*\); model\.norm\.weight \(I32\) would be cast"),
        (nan, {}, r"its weights hold NaN or infinite values \(model\.layers\.0\.mlp\.up_proj\.weight\) in "),
        (
            large,
            {"dtype": torch.float16},
            r"its weights hold NaN or infinite values \(model\.norm\.weight\) in torch\.float16",
        ),
        (integer, {"variant": "v1"}, r"weights must be .*; model\.norm\.weight \(I32\) would be cast"),
    ]
    for i, (tensors, kwargs, named) in enumerate(cases):
        folder = tmp_path / f"case{i}"
        folder.mkdir()
        (folder / "config.json").write_text(config)
        name = f"model.{kwargs['variant']}.safetensors" if "variant" in kwargs else "model.safetensors"
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        for load in (LlamaThinkForCausalLM.from_pretrained, AutoModelForCausalLM.from_pretrained):
            with pytest.raises(ValueError, match=rf"{re.escape(str(folder))}: {named}"):
                load(folder, trust_remote_code=True, **kwargs)
    assert LlamaThinkForCausalLM.from_pretrained(tmp_path / "good", dtype=torch.float16) is not None
    # sharded weights: the shards the index names are read; a stray file beside them is not
    sharded = tmp_path / "sharded"
    LlamaThinkForCausalLM(LlamaThinkConfig.from_json_file(str(tmp_path / "good" / "config.json"))).save_pretrained(
        sharded, max_shard_size="20KB"
    )
    save_file({"step": torch.tensor([3])}, str(sharded / "adapter_model.safetensors"))
    assert isinstance(LlamaThinkForCausalLM.from_pretrained(sharded), LlamaThinkForCausalLM)
    shard = sorted(sharded.glob("model-*.safetensors"))[-1]
    tensors = load_file(str(shard))
    first = sorted(tensors)[0]
    tensors[first] = torch.ones_like(tensors[first], dtype=torch.int64)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{re.escape(first)} \(I64\) would be cast"):
        LlamaThinkForCausalLM.from_pretrained(sharded)


# ---------------------------------------------------------------------------------------------------------------
# Saving, loading, remote code
# ---------------------------------------------------------------------------------------------------------------


def test_save_pretrained_writes_safetensors_tied_and_auto_map(tmp_path, model):
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_llamathink.LlamaThinkConfig",
        "AutoModel": "modeling_llamathink.LlamaThinkModel",
        "AutoModelForCausalLM": "modeling_llamathink.LlamaThinkForCausalLM",
    }
    for name in ("configuration_llamathink.py", "modeling_llamathink.py", "kernels_llamathink.py"):
        assert (tmp_path / name).exists(), name  # the kernels file: copied as a relative import of the modeling file
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys  # tied: stored once
    again = LlamaThinkForCausalLM.from_pretrained(tmp_path, dtype=torch.float64)
    assert again.lm_head.weight.data_ptr() == again.model.embed_tokens.weight.data_ptr()
    assert model.state_dict().keys() == again.state_dict().keys()
    assert all(torch.equal(t, again.state_dict()[k]) for k, t in model.state_dict().items())
    ids = torch.randint(1, 96, (1, 30))
    # float64 rounding only: the loaded tensors sit at other memory alignments, where BLAS may take another path
    torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=1e-12)
    torch.testing.assert_close(again.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq.float())


def test_auto_classes_load_the_saved_model(tmp_path, model):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    model.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), LlamaThinkConfig)
    assert isinstance(AutoModelForCausalLM.from_pretrained(tmp_path), LlamaThinkForCausalLM)
    assert isinstance(AutoModel.from_pretrained(tmp_path), LlamaThinkModel)


def test_the_model_files_require_only_torch_and_transformers_for_a_hub_copy():
    """For a `trust_remote_code` model on the Hub, transformers refuses to load unless every package the files import
    outside a try block is installed (`check_imports`): the files save_pretrained copies may ask only for torch and
    transformers, so a machine without fla, FlashQLA or accelerate loads them (on the PyTorch kernels)."""
    from transformers.dynamic_module_utils import get_imports

    for name in ("configuration_llamathink.py", "modeling_llamathink.py", "kernels_llamathink.py"):
        needed = {m for m in get_imports(str(REPO_ROOT / "llamathink" / name)) if m not in sys.stdlib_module_names}
        assert needed <= {"torch", "transformers"}, (name, needed)


def test_remote_code_round_trip_in_a_fresh_process_without_the_package(tmp_path, model):
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    ids = torch.randint(1, 96, (1, 25), generator=torch.Generator().manual_seed(1))
    torch.save({"ids": ids, "logits": model(ids).logits.float()}, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["llamathink"] = None  # the package may be installed here; make it unimportable
        try:
            import llamathink
            raise SystemExit("llamathink is still importable")
        except ImportError:
            pass
        import torch
        from transformers import AutoModel, AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(ckpt)!r}, trust_remote_code=True, dtype=torch.float64)
        assert type(m).__name__ == "LlamaThinkForCausalLM" and "transformers_modules" in type(m).__module__
        assert any(name.endswith(".kernels_llamathink") and "transformers_modules" in name for name in sys.modules)
        e = torch.load({str(tmp_path / "expected.pt")!r})
        got = m(e["ids"]).logits.float()
        assert torch.allclose(got, e["logits"], atol=1e-6), (got - e["logits"]).abs().max()
        out = m.generate(e["ids"][:, :5], max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert out.shape == (1, 13)
        base = AutoModel.from_pretrained({str(ckpt)!r}, trust_remote_code=True)
        assert type(base).__name__ == "LlamaThinkModel"
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        assert MODEL_FOR_CAUSAL_LM_MAPPING_NAMES["llamathink"] == "LlamaThinkForCausalLM"  # (Trainer's shift)
        print("REMOTE-OK")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    env["HF_MODULES_CACHE"] = str(tmp_path / "hf_modules")
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and "REMOTE-OK" in proc.stdout, proc.stderr[-3000:]


def test_trainer_label_smoothing_smooths_next_token_targets(tmp_path):
    """`Trainer` with `label_smoothing_factor` shifts the labels only for a model named among transformers' causal LMs
    (`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`); LlamaThink was not, so it smoothed each position's own token (a loss
    that trains the model to copy its input), without a word. Plain and with a PEFT adapter (the Trainer reads the
    base model's name), the logged loss is the smoothed loss of the next-token targets."""
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_pt_utils import LabelSmoother

    class InOrder(Trainer):  # the batch as given, so that the loss can be recomputed
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    ids = torch.randint(1, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": r, "labels": r} for r in ids]
    for adapter in (False, True):
        model = tiny_model(dtype=torch.float32).train()
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits
        if adapter:
            model = get_peft_model(model, LoraConfig(r=2, target_modules=["down_proj"]))
        args = TrainingArguments(
            str(tmp_path / f"run{adapter}"), per_device_train_batch_size=2, max_steps=1, learning_rate=0.0,
            label_smoothing_factor=0.1, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
        )  # fmt: skip
        trainer = InOrder(model=model, args=args, train_dataset=rows)
        trainer.train()
        logged = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
        smoother = LabelSmoother(0.1)
        shifted = smoother({"logits": logits}, ids, shift_labels=True).item()
        unshifted = smoother({"logits": logits}, ids).item()
        assert logged == pytest.approx(shifted, rel=1e-5) and abs(shifted - unshifted) > 0.1, (logged, shifted)


def test_a_second_copy_of_the_modeling_file_loads_in_the_same_process(tmp_path, monkeypatch):
    """trust_remote_code imports a copy of the modeling file next to the installed package: the copy reuses the
    first definition of the custom op `llamathink::fla_chunk_gdn` instead of registering it again."""
    import importlib
    import shutil

    (tmp_path / "llamathink_copy").mkdir()
    for name in ("__init__.py", "configuration_llamathink.py", "kernels_llamathink.py", "modeling_llamathink.py"):
        source = REPO_ROOT / "llamathink" / name
        target = tmp_path / "llamathink_copy" / name
        if name == "__init__.py":
            target.write_text("")
        else:
            shutil.copy(source, target)
    monkeypatch.syspath_prepend(str(tmp_path))
    copy_module = importlib.import_module("llamathink_copy.modeling_llamathink")
    copy_kernels = importlib.import_module("llamathink_copy.kernels_llamathink")
    assert copy_module is not modeling and copy_kernels is not kernels
    assert copy_kernels._fla_chunk_op is kernels._fla_chunk_op
    ids = torch.randint(1, 96, (1, 9), generator=torch.Generator().manual_seed(0))
    config = copy_module.LlamaThinkConfig(**tiny_config().to_dict())
    assert copy_module.LlamaThinkForCausalLM(config)(ids).logits.shape == (1, 9, 96)


def test_text_generation_pipeline(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, pipeline

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(93)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    model = tiny_model(dtype=torch.float32)
    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
    out = pipe("w5 w6 w7", max_new_tokens=6, do_sample=False)
    text = out[0]["generated_text"]
    assert text.startswith("w5 w6 w7") and len(text.split()) > 3


def test_gated_deltanet_runs_fla_conv_per_part_on_views_of_the_qkv_rows(monkeypatch):
    """fla's path of `_causal_conv`, eagerly through `_FlaConvSplitFunction` and traced through the real custom op
    (`llamathink::fla_causal_conv1d_silu_split`), with
    fla's conv functions stood in for by PyTorch ones of the same signature (this CPU has no fla): the forward runs
    once per part, q's, k's and v's channels (`conv_parts`), on views of qkv's rows at offsets 0, key_dim and
    2 key_dim (not copies); the backward once over all channels, on the parts' gradients joined. The parts and the
    gradients of qkv and of the conv weight equal the PyTorch path's (float32), for one sequence per row and for
    packed sequences (`cu_seqlens`: each starts from zeros), eagerly and traced by AOTAutograd (the op's fake
    outputs and its backward formula in the compiled graph)."""
    from llamathink import kernels_llamathink as kernels
    from llamathink.modeling_llamathink import packed_segments

    layer = modeling.LlamaThinkGatedDeltaNet(tiny_config(gdn_backend="fla"), 0)
    randomize_(layer)
    assert layer.conv_parts == (16, 16, 40) and layer.conv_dim == 72
    seen = []

    def segments_of(x, cu_seqlens):  # (start, end) of each sequence along T
        bounds = [0, x.shape[1]] if cu_seqlens is None else cu_seqlens.tolist()
        return list(zip(bounds, bounds[1:]))

    def pre_activation(x, weight, a, b):  # u [B, L, C] of x[:, a:b] from zeros, float32; and x left-padded
        K = weight.shape[1]
        xp = F.pad(x[:, a:b].float(), (0, 0, K - 1, 0))  # [B, K-1+L, C]
        return sum(weight[:, j].float() * xp[:, j : j + b - a] for j in range(K)), xp

    def fwd(x, weight, bias, residual, initial_state, output_final_state, activation, cu_seqlens):
        seen.append(("forward", x.storage_offset(), x.stride(-2), x.shape[-1]))
        y = torch.cat([F.silu(pre_activation(x, weight, a, b)[0]) for a, b in segments_of(x, cu_seqlens)], 1)
        return y.to(x.dtype), None

    def bwd(x, dy, dht, weight, bias, residual, initial_state, activation, cu_seqlens):
        # by hand (autograd does not record inside an op): du = dy silu'(u); dx[t] = sum_j w_j du[t + K-1-j];
        # dw_j = sum_t du[t] x[t - (K-1) + j]
        seen.append(("backward", x.storage_offset(), x.stride(-2), x.shape[-1], dy.shape[-1]))
        K, dxs, dw = weight.shape[1], [], torch.zeros(weight.shape)
        for a, b in segments_of(x, cu_seqlens):
            u, xp = pre_activation(x, weight, a, b)
            s = torch.sigmoid(u)
            du = dy[:, a:b].float() * s * (1 + u * (1 - s))  # [B, L, C]
            dup = F.pad(du, (0, 0, 0, K - 1))  # [B, L+K-1, C]
            dxs.append(sum(weight[:, j].float() * dup[:, K - 1 - j : K - 1 - j + b - a] for j in range(K)))
            dw += torch.stack([(du * xp[:, j : j + b - a]).sum((0, 1)) for j in range(K)], 1)
        return torch.cat(dxs, 1).to(x.dtype), dw, None, None, None

    monkeypatch.setitem(kernels._fla_state, "conv", (fwd, bwd))
    monkeypatch.setitem(kernels._fla_state, "conv-strides", True)  # fla-core 0.6 reads x through its strides
    qkv = torch.randn(2, 24, 72, generator=torch.Generator().manual_seed(0))
    pos = torch.cat([torch.arange(10), torch.arange(14)])[None].repeat(2, 1)
    for packed in (False, True):
        segments, segment_pos = packed_segments(pos, None, None, 2, 24) if packed else (None, None)
        grads = [torch.randn(2, 24, n, generator=torch.Generator().manual_seed(n)) for n in (16, 16, 40)]
        results = {}
        for run, backend, dtype in (
            ("eager", "fla", torch.bfloat16),
            ("aot", "fla", torch.bfloat16),
            ("ref", "torch", torch.float32),
        ):
            x = qkv.to(dtype).detach().clone().requires_grad_()
            layer.zero_grad()
            seen.clear()

            def conv(x, backend=backend, segments=segments, segment_pos=segment_pos):
                return layer._causal_conv(x, None, backend, segments, segment_pos)

            parts = torch.compile(conv, backend="aot_eager", fullgraph=True)(x) if run == "aot" else conv(x)
            assert [p.shape for p in parts] == [(2, 24, 16), (2, 24, 16), (2, 24, 40)]
            assert backend == "torch" or all(p.is_contiguous() for p in parts)
            torch.autograd.backward(parts, [g.to(dtype) for g in grads])
            results[run] = ([p.float() for p in parts], x.grad.float(), layer.conv1d.weight.grad.clone())
            if backend == "fla":  # the rows: [B, T, 72], or one packed row [1, B*T, 72]
                assert seen == [
                    ("forward", 0, 72, 16),
                    ("forward", 16, 72, 16),
                    ("forward", 32, 72, 40),
                    ("backward", 0, 72, 72, 72),
                ], (run, packed, seen)
        want_parts, want_dx, want_dw = results["ref"]
        for run in ("eager", "aot"):
            got_parts, got_dx, got_dw = results[run]
            for got, want in zip([*got_parts, got_dx, got_dw], [*want_parts, want_dx, want_dw]):
                assert ((got - want).norm() / want.norm()).item() < 2e-2, (run, packed)  # bf16 rounding


def test_l2norm_by_one_rms_norm_equals_l2norm():
    """`l2norm_rms` (x / sqrt(sum x^2 + eps) as rms_norm(x, eps / D) / sqrt(D)) equals `l2norm`: to float64 rounding
    in float64 (tiny and large rows, where eps matters and where it does not), and in bf16 to the rounding of
    its output (float32 inside, one rounding at the end); gradients likewise."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 112, generator=gen, dtype=torch.float64)
    x[0, 0] *= 1e-5  # sum x^2 ~ eps
    x[1, 1] *= 1e3
    for dtype, tol in ((torch.float64, 1e-12), (torch.bfloat16, 8e-3)):
        a, b = x.to(dtype).detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
        got, want = modeling.l2norm_rms(a), modeling.l2norm(b)
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
        w = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        (got.double() * w).sum().backward()
        (want * w).sum().backward()
        assert ((a.grad.double() - b.grad).norm() / b.grad.norm()).item() < tol


@pytest.mark.parametrize("case", ["rows", "grouped-values", "packed", "state"])
def test_gated_deltanet_hands_fla_the_raw_gate_inputs_where_its_kernels_compute_the_gates(case, monkeypatch):
    """`_gated_delta_rule_fused` (eager fla: q and k normalised by `l2norm_rms`, fla computes beta's sigmoid and the
    decay) with fla's chunk function stood in for by the PyTorch gates and kernel (this CPU has no fla): it receives
    q and k normalised (key heads, not repeated), a as the gate input, b as beta's, A_log, dt_bias and the flags
    that ask fla for the gates, and the layer's output, final state and gradients equal the PyTorch path's
    (`_heads_and_gates` then `_delta_rule`) for whole rows, grouped values (fla's grouped-value form against the
    model's repeat), packed documents (one flattened row with `cu_seqlens`) and a cached prefill."""
    from llamathink import kernels_llamathink as kernels
    from llamathink.modeling_llamathink import packed_segments

    # the tiny model's 2 key heads serve 4 value heads (grouped values); "rows" has one key head per value head
    overrides = {"linear_num_key_heads": 4} if case == "rows" else {}
    layer = modeling.LlamaThinkGatedDeltaNet(tiny_config(**overrides), 0).double()
    assert (layer.num_k_heads, layer.num_v_heads) == ((4, 4) if case == "rows" else (2, 4))
    randomize_(layer)
    seen = []

    def chunk(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens=None, **flags):
        assert flags["use_beta_sigmoid_in_kernel"] is True and flags["use_gate_in_kernel"] is True
        assert not flags.get("use_qk_l2norm_in_kernel")
        torch.testing.assert_close(q.norm(dim=-1), torch.ones_like(q[..., 0]), rtol=0, atol=1e-5)  # normalised (eps)
        seen.append((tuple(q.shape), tuple(v.shape), cu_seqlens is not None))
        group = v.shape[2] // q.shape[2]
        qn, kn = (x.repeat_interleave(group, dim=2) for x in (q, k))
        gate = -flags["A_log"].exp() * F.softplus(g + flags["dt_bias"])
        args = (qn, kn, v, gate, torch.sigmoid(beta), scale)
        if cu_seqlens is None:  # (the state comes as fla takes it, float32: s0 below is exact in float32)
            state = None if initial_state is None else initial_state.to(q.dtype)
            return modeling.torch_chunk_gated_delta_rule(*args, state, output_final_state)
        bounds = cu_seqlens.tolist()
        parts = [
            modeling.torch_chunk_gated_delta_rule(*(x[:, s:e] for x in args[:5]), scale)[0]
            for s, e in itertools.pairwise(bounds)
        ]
        return torch.cat(parts, dim=1), None

    monkeypatch.setitem(kernels._fla_state, "ops", (chunk, None))
    B, T = 2, 24
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(B, T, layer.key_dim, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, T, layer.value_dim, generator=gen, dtype=torch.float64)
    a, b = (torch.randn(B, T, layer.num_v_heads, generator=gen, dtype=torch.float64) for _ in range(2))
    s0 = torch.randn(B, layer.num_v_heads, layer.head_k_dim, layer.head_v_dim, generator=gen, dtype=torch.float64)
    s0 = s0.float().double() if case == "state" else None
    segments = None
    if case == "packed":
        pos = torch.cat([torch.arange(10), torch.arange(14)])[None].repeat(2, 1)
        segments, _ = packed_segments(pos, None, None, B, T)
    w = torch.randn(B, T, layer.num_v_heads, layer.head_v_dim, generator=gen, dtype=torch.float64)
    results = []
    for fused in (True, False):
        inputs = [x.clone().requires_grad_() for x in (q, k, v, a, b)]
        layer.zero_grad()
        if fused:
            o, state = layer._gated_delta_rule_fused(*inputs, s0, s0 is not None, segments)
        else:
            gates = layer._heads_and_gates(*inputs[:3], inputs[4], inputs[3], None)
            o, state = layer._delta_rule(*gates, s0, s0 is not None, "torch", segments)
        loss = (o * w).sum() + (state.square().sum() if state is not None else 0)
        loss.backward()
        results.append([o, *(x.grad for x in inputs), layer.A_log.grad.clone(), layer.dt_bias.grad.clone()])
        if state is not None:
            results[-1].append(state)
    key_heads = (1, B * T) if case == "packed" else (B, T)
    want = ((*key_heads, layer.num_k_heads, layer.head_k_dim), (*key_heads, 4, layer.head_v_dim), case == "packed")
    assert seen == [want], seen
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_fla_conv_takes_gluon_where_it_runs_and_falls_back_to_triton(monkeypatch):
    """`fla_conv_kernels` / the conv ops' calls: fla's Gluon kernels by default where its verifier takes the call,
    for the first `GLUON_CONV_SHAPES_PER_PROCESS` shapes of each direction (Gluon builds kernels per shape); its
    Triton kernels with `LLAMATHINK_FLA_CONV=triton`, for calls the verifier refuses, for further shapes, and for
    the rest of the process after a Gluon call fails (with one warning naming the error; running out of memory is
    raised); another value of the switch is an error that names it."""
    from llamathink import kernels_llamathink as kernels

    calls = []

    def implementation(name, direction):
        def run(x, weight, cu_seqlens, **kwargs):
            calls.append((name, direction))
            if name == "gluon" and fail:
                raise fail[0]
            return (x * 2, None) if direction == "forward" else (x * 3, weight * 0, None, None, None)

        return run

    def verifier(x, weight, cu_seqlens=None, **kwargs):
        return (x.shape[0] == 1, "packed rows need a batch of one") if cu_seqlens is not None else (True, None)

    fail, warned = [], []
    monkeypatch.setattr(kernels, "_fla_state", {})
    monkeypatch.setattr(kernels.logger, "warning", warned.append)
    kernels._fla_state["conv"] = (implementation("triton", "forward"), implementation("triton", "backward"))
    kernels._fla_state["conv-gluon"] = (
        implementation("gluon", "forward"),
        implementation("gluon", "backward"),
        verifier,
    )
    kernels._fla_state["conv-strides"] = True
    monkeypatch.delenv("LLAMATHINK_FLA_CONV", raising=False)
    x, weight, cu = torch.ones(2, 8, 12, dtype=torch.bfloat16), torch.ones(12, 4), torch.tensor([0, 3, 8])
    op, backward = torch.ops.llamathink.fla_causal_conv1d_silu, torch.ops.llamathink.fla_causal_conv1d_silu_backward

    assert kernels.fla_conv_kernels(x, weight) == "gluon"
    assert torch.equal(op(x, weight, None), x * 2) and torch.equal(backward(x, weight, x, None)[0], x * 3)
    assert kernels.fla_conv_kernels(x, weight, cu) == "triton"  # refused by the verifier: batch 2 with cu_seqlens
    assert kernels.fla_conv_kernels(x[:1], weight, cu) == "gluon"
    monkeypatch.setenv("LLAMATHINK_FLA_CONV", " Triton ")
    assert kernels.fla_conv_kernels(x, weight) == "triton"
    op(x, weight, None)
    assert calls == [("gluon", "forward"), ("gluon", "backward"), ("triton", "forward")]
    monkeypatch.setenv("LLAMATHINK_FLA_CONV", "cuda")
    with pytest.raises(ValueError, match=r"LLAMATHINK_FLA_CONV='cuda': expected one of gluon, triton"):
        op(x, weight, None)

    # Gluon for the first shapes of each direction, then for those shapes only
    monkeypatch.setenv("LLAMATHINK_FLA_CONV", "gluon")
    lengths = range(8, 8 + kernels.GLUON_CONV_SHAPES_PER_PROCESS + 1)
    calls.clear()
    for T in lengths:
        op(torch.ones(2, T, 12, dtype=torch.bfloat16), weight, None)
    op(x, weight, None)
    assert [name for name, _ in calls] == ["gluon"] * (len(lengths) - 1) + ["triton", "gluon"]
    assert kernels.fla_conv_kernels(x, weight, None, x) == "gluon"  # the backward's first shape: its own count
    assert kernels.fla_conv_kernels(x, weight, None, x[..., :6]) == "gluon"  # another layout of dy is a shape

    fail.append(torch.OutOfMemoryError("CUDA out of memory"))
    with pytest.raises(torch.OutOfMemoryError):
        op(x, weight, None)
    assert kernels.fla_conv_kernels(x, weight) == "gluon" and not warned  # memory is not the kernels' fault
    fail[0] = RuntimeError("PassManager::run failed")
    calls.clear()
    assert torch.equal(op(x, weight, None), x * 2)  # the Triton kernels' result
    assert calls == [("gluon", "forward"), ("triton", "forward")]
    assert len(warned) == 1 and "Gluon causal conv failed (RuntimeError: PassManager::run failed)" in warned[0]
    assert kernels.fla_conv_kernels(x, weight) == "triton"  # for the rest of the process
    backward(x, weight, x, None)
    op(x, weight, None)
    assert calls[-2:] == [("triton", "backward"), ("triton", "forward")] and len(warned) == 1


def test_fla_causal_conv1d_silu_split_names_widths_that_do_not_fit(monkeypatch):
    """The public wrapper refuses channel groups that are not positive integers summing to C, naming them."""
    from llamathink import kernels_llamathink as kernels

    monkeypatch.setitem(kernels._fla_state, "conv", (None, None))  # "available": the widths are checked first
    x, weight = torch.zeros(1, 4, 12, dtype=torch.bfloat16), torch.zeros(12, 4)
    for bad in ((4, 4), (4, 0, 8), (4.0, 4, 4), (), 12, (True, 4, 7), "12", {12: 1}):
        with pytest.raises(ValueError, match=r"widths=.*sum to x\.shape\[-1\]=12"):
            kernels.fla_causal_conv1d_silu_split(x, weight, bad)


def test_gdn_backend_selection_falls_back_on_cpu(caplog):
    from llamathink.kernels_llamathink import select_gdn_backend

    assert select_gdn_backend("auto", torch.device("cpu"), needs_grad=True) == "torch"
    assert select_gdn_backend("fla", torch.device("cpu"), needs_grad=False) == "torch"
    with pytest.raises(ValueError, match="gdn_backend='triton' is not one of"):
        tiny_config(gdn_backend="triton")


def test_a_chunk_length_the_gpu_kernels_do_not_take_is_named(monkeypatch):
    """fla's and FlashQLA's kernels always use chunks of 64: a model that names one of them with another
    `gdn_chunk_size` is warned that the length is the PyTorch kernels' (and computes the same function)."""
    said = []
    monkeypatch.setattr(modeling.logger, "warning_once", said.append)
    for backend in ("fla", "flash_qla"):
        LlamaThinkForCausalLM(tiny_config(gdn_backend=backend, gdn_chunk_size=16))
        assert said and f"gdn_chunk_size=16 is the PyTorch kernels' chunk length: {backend}'s kernels" in said[-1]
        said.clear()
    for backend, chunk in (("fla", 64), ("auto", 16), ("torch", 16)):
        LlamaThinkForCausalLM(tiny_config(gdn_backend=backend, gdn_chunk_size=chunk))
        assert not said, (backend, chunk, said)


def test_gdn_backend_selection_keeps_fp32_training_off_fla(monkeypatch):
    """Where fla works (stubbed here), bf16/fp16 training and any inference use it; fp32 training does not."""
    from llamathink import kernels_llamathink as m

    monkeypatch.setattr(m, "_fla_ops", lambda: ("chunk", "recurrent"))
    monkeypatch.setattr(m, "fla_backward_problem", lambda device: None)
    cuda = torch.device("cuda")
    assert m.select_gdn_backend("auto", cuda, needs_grad=True, dtype=torch.bfloat16) == "fla"
    assert m.select_gdn_backend("fla", cuda, needs_grad=True, dtype=torch.float16) == "fla"
    assert m.select_gdn_backend("auto", cuda, needs_grad=False, dtype=torch.float32) == "fla"
    assert m.select_gdn_backend("auto", cuda, needs_grad=True, dtype=torch.float32) == "torch"
    assert m.select_gdn_backend("torch", cuda, needs_grad=True, dtype=torch.bfloat16) == "torch"


def test_flash_qla_is_chosen_where_it_can_run_and_the_reason_named_where_it_cannot(monkeypatch):
    """Where fla runs (stubbed), "flash_qla" takes FlashQLA's kernels for 16-bit values, heads of at most 128 and a
    GPU it builds for, and anywhere else fla's with the reason named; "auto" stays on fla's."""
    from llamathink import kernels_llamathink as m

    warnings_seen = []
    monkeypatch.setattr(m, "_fla_state", {})
    monkeypatch.setattr(m, "_warn_once", lambda key, message: warnings_seen.append(message))
    monkeypatch.setattr(m, "_fla_ops", lambda: ("chunk", "recurrent"))
    monkeypatch.setattr(m, "fla_backward_problem", lambda device: None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    cuda, bf16, heads = torch.device("cuda", 0), torch.bfloat16, (112, 112)

    monkeypatch.setattr(m, "_flash_qla_kernels", lambda: None)  # flash-qla not installed
    m._fla_state["flash_qla_error"] = "ModuleNotFoundError: No module named 'flash_qla'"
    assert m.select_gdn_backend("auto", cuda, True, bf16, heads) == "fla" and warnings_seen == []
    assert m.select_gdn_backend("flash_qla", cuda, True, bf16, heads) == "fla"
    assert "flash-qla is not available (ModuleNotFoundError" in warnings_seen.pop()

    monkeypatch.setattr(m, "_flash_qla_kernels", lambda: ("its kernels",))
    assert m.select_gdn_backend("flash_qla", cuda, True, bf16, heads) == "flash_qla"
    assert m.select_gdn_backend("flash_qla", cuda, False, torch.float16, (128, 64)) == "flash_qla"
    assert m.select_gdn_backend("auto", cuda, True, bf16, heads) == "fla"  # opt-in
    assert m.select_gdn_backend("fla", cuda, True, bf16, heads) == "fla"  # fla when asked by name
    assert m.select_gdn_backend("torch", cuda, True, bf16, heads) == "torch"
    assert m.select_gdn_backend("flash_qla", cuda, True, torch.float32, heads) == "torch"  # fp32 training: PyTorch
    assert len(warnings_seen) == 1 and "training in torch.float32 uses the PyTorch" in warnings_seen.pop()
    assert m.select_gdn_backend("flash_qla", cuda, False, torch.float32, heads) == "fla"  # fp32 inference: fla
    assert "FlashQLA computes in 16 bits, not in torch.float32" in warnings_seen.pop()
    assert m.select_gdn_backend("flash_qla", cuda, True, bf16, (112, 192)) == "fla"
    assert "heads of at most 128 (key and value heads (112, 192))" in warnings_seen.pop()
    assert "needs a CUDA GPU" in m.flash_qla_problem(torch.device("cpu"), heads, bf16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    m._fla_state.pop(("flash_qla_arch", 0))
    assert m.select_gdn_backend("flash_qla", cuda, True, bf16, heads) == "fla"
    assert "FlashQLA has no kernels for sm80" in warnings_seen.pop()
    assert m.flash_qla_problem(cuda, heads, bf16) == "FlashQLA has no kernels for sm80"


def test_fla_backend_runs_flas_own_chunked_kernel_not_its_backend_dispatch(monkeypatch):
    """fla's public chunked function is wrapped by its backend dispatch (which hands 16-bit heads of 128 to
    FlashQLA's public function wherever flash-qla is installed) and by torch.compiler.disable; `_fla_ops` takes the
    function under both wrappers, so that "fla" means fla's kernels (stand-in modules here)."""
    import functools

    def own(*args, **kwargs):
        return "fla's kernels"

    dispatched = functools.wraps(own)(lambda *args, **kwargs: "FlashQLA's public function")
    public = functools.wraps(dispatched)(lambda *args, **kwargs: dispatched(*args, **kwargs))
    ops = types.ModuleType("fla.ops.gated_delta_rule")
    ops.chunk_gated_delta_rule, ops.fused_recurrent_gated_delta_rule = public, object()
    for name, module in (("fla", types.ModuleType("fla")), ("fla.ops", types.ModuleType("fla.ops"))):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setitem(sys.modules, "fla.ops.gated_delta_rule", ops)
    monkeypatch.setattr(kernels, "_fla_state", {})
    assert public() == "FlashQLA's public function"
    chunk, recurrent = kernels._fla_ops()
    assert chunk() == "fla's kernels" and recurrent is ops.fused_recurrent_gated_delta_rule


def _reference_flash_qla_kernels():
    """Stand-ins for FlashQLA's kernel functions and fla's `chunk_local_cumsum`, with their signatures and output
    layouts, computed by our PyTorch reference: the forward takes the chunk-local cumulative gates (the raw gates
    are their differences within each chunk) and the backward returns the gradient of those sums (whose reverse
    chunk-local sums are the raw gates' gradient), as FlashQLA's do. Rows of equal length only (no `cu_seqlens`)."""

    def cumsum(g, chunk_size, reverse=False, cu_seqlens=None, chunk_indices=None, **_):
        assert cu_seqlens is None
        B, T, H = g.shape
        x = F.pad(g, (0, 0, 0, -T % chunk_size)).reshape(B, -1, chunk_size, H)
        x = x.flip(2).cumsum(2).flip(2) if reverse else x.cumsum(2)
        return x.reshape(B, -1, H)[:, :T]

    def raw_gates(g_cum, chunk=64):
        B, T, H = g_cum.shape
        x = F.pad(g_cum, (0, 0, 0, -T % chunk)).reshape(B, -1, chunk, H)
        return torch.cat((x[:, :, :1], x.diff(dim=2)), dim=2).reshape(B, -1, H)[:, :T]

    def kkt_solve(k, b, chunk_size=64, cu_seqlens=None):
        return k.new_zeros(*b.shape, chunk_size)

    def fused_fwd(q, k, v, a, g, b, scale, initial_state, output_final_state, output_h, output_o, cu_seqlens):
        return torch_chunk_gated_delta_rule(q, k, v, raw_gates(g), b, scale)[0], None, None

    def fused_h(k, v, a, g, b, initial_state, output_final_state, output_h, cu_seqlens):
        return k.new_zeros(1), None, None

    def fused_bwd(q, k, v, a, g, b, do, dht, h, scale, cu_seqlens):
        def grads():
            inputs = [t.detach().requires_grad_() for t in (q, k, v, raw_gates(g), b)]
            return torch.autograd.grad(torch_chunk_gated_delta_rule(*inputs, scale)[0], inputs, do)

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            dq, dk, dv, dg, db = pool.submit(grads).result()
        B, T, H = dg.shape  # the gradient of the chunk-local sums: differences of dg within each chunk, backwards
        x = F.pad(dg, (0, 0, 0, -T % 64)).reshape(B, -1, 64, H)
        dg_cum = torch.cat((-x.diff(dim=2), x[:, :, -1:]), dim=2).reshape(B, -1, H)[:, :T]
        return dq, dk, dv, dg_cum, db, None

    return kkt_solve, fused_fwd, fused_h, fused_bwd, cumsum


def test_flash_qla_op_pads_heads_to_128_exactly_and_traces_into_one_graph(monkeypatch):
    """The FlashQLA path with its kernels replaced by the PyTorch reference (`_reference_flash_qla_kernels`): the
    custom op's schema, fake outputs and autograd formula are consistent (opcheck); heads of 12 zero-padded to
    128 give the unpadded kernel's output and gradients; and a compiled model with `gdn_backend: flash_qla` is one
    graph holding the op, with the loss and every gradient of the PyTorch backend."""
    monkeypatch.setitem(kernels._fla_state, "flash_qla", _reference_flash_qla_kernels())
    gen = torch.Generator().manual_seed(0)
    B, T, H, D = 2, 70, 3, 12
    q, k = (l2norm(torch.randn(B, T, H, D, generator=gen, dtype=torch.float64)) for _ in range(2))
    v = torch.randn(B, T, H, D, generator=gen, dtype=torch.float64)
    g = -F.softplus(torch.randn(B, T, H, generator=gen, dtype=torch.float64)) * 0.3
    beta = torch.rand(B, T, H, generator=gen, dtype=torch.float64)
    padded = [kernels.pad_heads(t, 128) for t in (q, k, v)]
    torch.library.opcheck(kernels._flash_qla_op, (*padded, g.float(), beta, D**-0.5, None))

    leaves = [t.clone().requires_grad_() for t in (q, k, v, g, beta)]
    o_ref = torch_chunk_gated_delta_rule(*leaves, D**-0.5)[0]
    o_ref.backward(o_ref.detach().cos())
    ours = [t.clone().requires_grad_() for t in (q, k, v, g, beta)]
    o, state = kernels.flash_qla_chunk_gated_delta_rule(*ours, D**-0.5)
    assert state is None and o.shape == o_ref.shape and o.dtype == torch.float64
    o.backward(o_ref.detach().cos())
    torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-6)  # g passes through fp32 (the kernels' gate dtype)
    for name, a, b in zip("q k v g beta".split(), ours, leaves):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)

    monkeypatch.setattr(modeling, "select_gdn_backend", lambda asked, *_: "torch" if asked == "torch" else "flash_qla")
    _assert_compiled_backend_is_one_graph_with_the_reference_gradients("flash_qla", "llamathink.flash_qla_chunk_gdn")


def _pretend_hopper_with_triton_in_flas_bad_range(monkeypatch, kernels):
    """A Hopper card and Triton 3.6 (fla's backward is wrong there unless tilelang replaces it), with
    `kernels_llamathink`'s memoised answers cleared."""
    monkeypatch.setattr(kernels, "_fla_state", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    fake_triton = types.ModuleType("triton")
    fake_triton.__version__ = "3.6.0"
    monkeypatch.setitem(sys.modules, "triton", fake_triton)


def test_fla_backend_choice_is_probed_once_and_traces_without_graph_breaks(monkeypatch):
    """Under torch.compile every Gated DeltaNet layer asks `select_gdn_backend` again. The probe behind it (triton's
    version, importlib's find_spec for tilelang: dynamo cannot trace find_spec in torch 2.11, which cut the compiled
    step on the H100 at all 8 GDN layers) must run once per device, when the layer is built; later answers are a
    lookup that traces into the graph."""
    import importlib.util

    from torch._dynamo.backends import debugging  # noqa: F401  (explain's imports need the real, here missing, triton)

    from llamathink import kernels_llamathink as m

    probes = []
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args):
        if name == "tilelang":
            probes.append(name)
            return real_find_spec("json")  # "installed"
        return real_find_spec(name, *args)

    _pretend_hopper_with_triton_in_flas_bad_range(monkeypatch, m)
    monkeypatch.setattr(m, "_fla_ops", lambda: ("chunk", "recurrent"))
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    cuda = torch.device("cuda", 0)
    assert m.fla_backward_problem(cuda) is None  # what the layer's constructor does
    for _ in range(8):
        assert m.select_gdn_backend("auto", cuda, True, torch.bfloat16) == "fla"
    assert probes == ["tilelang"]

    def step(x):
        x = x.sin()
        return x * 2 if m.select_gdn_backend("auto", cuda, True, torch.bfloat16) == "fla" else x - 1

    torch._dynamo.reset()
    _explain_without_graph_breaks(step, torch.ones(3))
    assert probes == ["tilelang"]


def test_flash_qla_choice_is_probed_when_the_layer_is_built_and_traces_without_graph_breaks(monkeypatch):
    """`gdn_backend: flash_qla` asks `flash_qla_problem` at every Gated DeltaNet forward, also inside the compiled
    step: FlashQLA's import and each GPU's architecture are looked up once, when the layer is built
    (`probe_flash_qla`), and the answers after that are lookups that dynamo traces into the graph."""
    from torch._dynamo.backends import debugging  # noqa: F401  (explain's imports need the real, here missing, triton)

    from llamathink import kernels_llamathink as m

    probes = []
    monkeypatch.setattr(m, "_fla_state", {})
    monkeypatch.setattr(m, "_fla_ops", lambda: ("chunk", "recurrent"))
    monkeypatch.setattr(m, "fla_backward_problem", lambda device: None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: probes.append(index) or (9, 0))

    def kernels():
        if "flash_qla" not in m._fla_state:
            probes.append("import")
            m._fla_state["flash_qla"] = ("its kernels",)
        return m._fla_state["flash_qla"]

    monkeypatch.setattr(m, "_flash_qla_kernels", kernels)
    with monkeypatch.context() as gpus:  # two GPUs while the model is built (dynamo below must not believe it)
        gpus.setattr(torch.cuda, "is_available", lambda: True)
        gpus.setattr(torch.cuda, "device_count", lambda: 2)
        tiny_model(gdn_backend="flash_qla", linear_key_head_dim=24)  # builds its layers: the probe
    assert probes == ["import", 0, 1]
    cuda = torch.device("cuda", 1)

    def step(x):
        x = x.sin()
        chosen = m.select_gdn_backend("flash_qla", cuda, True, torch.bfloat16, (24, 10))
        return x * 2 if chosen == "flash_qla" else x - 1

    torch._dynamo.reset()
    _explain_without_graph_breaks(step, torch.ones(3))
    torch.testing.assert_close(torch.compile(step, backend="eager")(torch.ones(3)), torch.ones(3).sin() * 2)
    assert probes == ["import", 0, 1]


def _captured_prebuild_command(kernels_module, monkeypatch, **kwargs) -> list[str]:
    """The command line `start_fla_prebuild` of `kernels_module` starts, as if CUDA and fla were there."""
    started = []

    class Child:
        def poll(self):
            return 0

    with monkeypatch.context() as patch:
        patch.setattr(kernels_module.torch.cuda, "is_available", lambda: True)
        patch.setattr(kernels_module, "_fla_ops", lambda: object())
        patch.setattr(subprocess, "Popen", lambda command, **kw: started.append(command) or Child())
        defaults = {"num_heads": 4, "head_k_dim": 8, "head_v_dim": 10, "conv_dim": 72, "conv_kernel_size": 4}
        child = kernels_module.start_fla_prebuild(2, 64, **{**defaults, "device": 0, **kwargs})
    assert isinstance(child, Child) and len(started) == 1
    return started[0]


def test_fla_prebuild_child_imports_this_module_from_anywhere_with_inductors_triton_cache(tmp_path, monkeypatch):
    """The child of `start_fla_prebuild` runs `prebuild_fla_kernels` of this very module, also the copy that
    `trust_remote_code` loaded (a module name with hash parts that are not identifiers), from a working directory
    whose own `llamathink/` would shadow it; and where TRITON_CACHE_DIR was unset, the parent now uses (and the child
    inherits) inductor's per-device folder, the one inductor itself would set at its first kernel. On this CPU the
    child gets as far as asking for the GPU (its traceback runs through `prebuild_fla_kernels`)."""
    from torch._inductor.runtime.cache_dir_utils import triton_cache_dir
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    monkeypatch.setenv("TRITON_CACHE_DIR", "x")  # recorded, so that teardown restores the variable's first state
    monkeypatch.delenv("TRITON_CACHE_DIR")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.delenv(kernels.FLA_PREBUILD_ENV, raising=False)
    decoy = tmp_path / "cwd" / "llamathink"
    decoy.mkdir(parents=True)
    (decoy / "__init__.py").write_text("raise SystemExit('the decoy package was imported')\n")
    tiny_model().save_pretrained(tmp_path / "saved")
    remote = get_class_from_dynamic_module("modeling_llamathink.LlamaThinkForCausalLM", tmp_path / "saved")
    remote_kernels = sys.modules[remote.__module__.rsplit(".", 1)[0] + ".kernels_llamathink"]
    assert remote_kernels is not kernels and remote_kernels.__name__.startswith("transformers_modules.")
    # one list of prebuilds to wait for in the process: the FlashQLA ops are registered by the first copy imported
    assert remote_kernels._prebuild_waits is kernels._prebuild_waits
    # the child imports the kernels module alone: its package's __init__ (transformers' Auto classes, the model) is
    # not run (a sitecustomize tells, at the child's exit, which of the package's modules it imported)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import atexit, sys\n"
        "atexit.register(lambda: print('IMPORTED', sorted(n.rsplit('.', 1)[-1] for n in sys.modules"
        " if n.endswith('_llamathink')), file=sys.stderr))\n"
    )
    for module in (kernels, remote_kernels):
        with monkeypatch.context() as patch:
            patch.setenv("TRITON_CACHE_DIR", "x")  # (restored unset on leaving the context)
            patch.delenv("TRITON_CACHE_DIR")
            command = _captured_prebuild_command(module, patch)
            assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "inductor" / "triton" / "0") == triton_cache_dir(0)
        assert command[4] == module.__name__
        paths = [str(site), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
        run = subprocess.run(command, cwd=tmp_path / "cwd", capture_output=True, text=True, timeout=300, env=env)
        assert run.returncode != 0 and "decoy" not in run.stderr, run.stderr[-2000:]
        assert "in prebuild_fla_kernels" in run.stderr and "_prebuild_child_main" in run.stderr, run.stderr[-2000:]
        assert "IMPORTED ['kernels_llamathink']" in run.stderr, run.stderr[-2000:]
    # the split into parts is FlashQLA's only; a part fla's kernels do not come in is named before any GPU work
    with pytest.raises(ValueError, match=r"delta_rule='fla', part='backward': expected fla \(all\)"):
        kernels.prebuild_fla_kernels(2, 64, 4, 8, 10, 72, 4, delta_rule="fla", part="backward")
    # FlashQLA's kernels: each in a process of its own, the child's (`solve`) and three more beside it (here all
    # four fail alike: the child's own error is the one it ends with), each telling its end in the folder that this
    # process's FlashQLA calls wait on (`wait_for_prebuild`)
    command = _captured_prebuild_command(kernels, monkeypatch, delta_rule="flash_qla")
    (entry,) = [e for e in kernels._prebuild_waits if str(e.ready) == json.loads(command[5])["ready_dir"]]
    kernels._prebuild_waits.remove(entry)  # (this process has no GPU work to wait for it)
    assert entry.pending == {"solve", "forward", "states", "backward"} and entry.ready.is_dir()
    run = subprocess.run(command, cwd=tmp_path / "cwd", capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and run.stderr.count("in prebuild_fla_kernels") == 4, run.stderr[-3000:]
    assert sorted(p.name for p in entry.ready.iterdir()) == [
        "backward.failed",
        "forward.failed",
        "solve.failed",
        "states.failed",
    ]
    shutil.rmtree(entry.ready)
    # the dtypes reach the child by name; a set TRITON_CACHE_DIR is left as it is
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "mine"))
    command = _captured_prebuild_command(kernels, monkeypatch, dtype=torch.float16, conv_weight_dtype=torch.bfloat16)
    assert json.loads(command[5]) | {} == {
        "batch_size": 2,
        "seq_len": 64,
        "num_heads": 4,
        "head_k_dim": 8,
        "head_v_dim": 10,
        "conv_dim": 72,
        "conv_kernel_size": 4,
        "dtype": "float16",
        "packed": False,
        "device": 0,
        "conv_weight_dtype": "bfloat16",
        "delta_rule": "fla",
        "conv_parts": None,
    }
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "mine")
    # the conv's parts (q, k, v channels, as the layer runs it) reach the child as widths; wrong ones are named here
    for parts in ((24, 24, 24), [24, 24, 24], np.array([24, 24, 24]), (p for p in (24, 24, 24))):  # numpy's too
        command = _captured_prebuild_command(kernels, monkeypatch, conv_parts=parts)
        assert json.loads(command[5])["conv_parts"] == [24, 24, 24]
    for bad in (
        (24, 24),
        (24, 0, 48),
        (24.0, 24, 24),
        (),
        72,
        (True, 24, 47),
        (torch.tensor(True), 24, 47),
        "72",
        {72: 1},
    ):
        with pytest.raises(ValueError, match=r"conv_parts=.*sum to conv_dim=72"):
            _captured_prebuild_command(kernels, monkeypatch, conv_parts=bad)
        with pytest.raises(ValueError, match=r"conv_parts=.*sum to conv_dim=72"):
            kernels.prebuild_fla_kernels(2, 64, 4, 8, 10, 72, 4, conv_parts=bad)
    assert kernels.start_fla_prebuild(2, 64, 4, 8, 10, 72, 4, dtype=torch.float32) is None  # no float32 fla
    for off in ("0", "false", "Off", " no "):  # switched off, in any of the words and cases
        with monkeypatch.context() as patch:
            patch.setenv(kernels.FLA_PREBUILD_ENV, off)
            patch.setattr(kernels.torch.cuda, "is_available", lambda: True)
            patch.setattr(kernels, "_fla_ops", lambda: object())
            patch.setattr(subprocess, "Popen", lambda *a, **kw: pytest.fail(f"a child started with {off!r}"))
            assert kernels.start_fla_prebuild(2, 64, 4, 8, 10, 72, 4) is None


def test_fla_prebuild_child_reads_the_ptxas_whose_version_keys_its_parents_kernels(tmp_path, monkeypatch):
    """Triton keys kernels by the ptxas version its process read at its first compile (cached), and inductor points
    TRITON_PTXAS_PATH at torch's own ptxas at its first compile. The prebuild child gets the ptxas of its parent's
    key (`_ptxas_for_prebuild`), with Triton faked on this CPU (Triton's ptxas 12.8, torch's 13.0):
    * the parent has not compiled yet: TRITON_PTXAS_PATH is set now as inductor sets it (torch's), and the child's
      environment holds it;
    * the parent compiled with Triton's ptxas and the variable now names torch's: the child is pointed at Triton's;
    * the parent compiled with the ptxas the variable names, or with one that neither is: the child inherits as is.
    """
    import stat

    def ptxas(path: Path, release: str) -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}'\n")
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
        return str(path)

    tritons = ptxas(tmp_path / "triton/backends/nvidia/bin/ptxas", "12.8")
    torchs = ptxas(tmp_path / "torch/bin/ptxas", "13.0")
    version = {p: f"Cuda compilation tools, release {r}\n" for p, r in ((tritons, "12.8"), (torchs, "13.0"))}
    cached: list[str] = []  # the parent's cached ptxas version, once it has compiled

    nvidia = types.ModuleType("triton.backends.nvidia.compiler")
    nvidia.__file__ = str(tmp_path / "triton/backends/nvidia/compiler.py")
    nvidia.get_ptxas_version = types.SimpleNamespace(cache_info=lambda: types.SimpleNamespace(currsize=len(cached)))
    target = types.SimpleNamespace(backend="cuda", arch=90)
    compiler = types.ModuleType("triton.compiler.compiler")
    compiler.make_backend = lambda t: types.SimpleNamespace(hash=lambda: f"{cached[0]}-{t.arch}")
    driver = types.ModuleType("triton.runtime.driver")
    driver.driver = types.SimpleNamespace(active=types.SimpleNamespace(get_current_target=lambda: target))
    for name in ("triton", "triton.backends", "triton.backends.nvidia", "triton.compiler", "triton.runtime"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setattr(sys.modules["triton.backends.nvidia"], "compiler", nvidia, raising=False)
    monkeypatch.setattr(sys.modules["triton.compiler"], "compiler", compiler, raising=False)
    monkeypatch.setattr(sys.modules["triton.runtime"], "driver", driver, raising=False)
    for module in (nvidia, compiler, driver):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    from torch._inductor.runtime import compile_tasks

    monkeypatch.setattr(
        compile_tasks, "_set_triton_ptxas_path", lambda: os.environ.setdefault("TRITON_PTXAS_PATH", torchs)
    )

    class Child:
        def poll(self):
            return 0

    monkeypatch.setenv("TRITON_PTXAS_PATH", "")  # (whatever the fake inductor sets is undone after the test)
    real_popen = subprocess.Popen

    def popen(command, started, **kw):  # the ptxas runs as it is; the child is recorded with its environment
        if command[0] in version:
            return real_popen(command, **kw)
        started.append(kw.get("env"))
        return Child()

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))

    def child_ptxas(named: str | None, parent_version: str | None) -> str | None:
        """TRITON_PTXAS_PATH in the environment the child starts with."""
        cached[:] = [parent_version] if parent_version else []
        started = []
        with monkeypatch.context() as patch:
            if named is None:
                patch.delenv("TRITON_PTXAS_PATH", raising=False)
            else:
                patch.setenv("TRITON_PTXAS_PATH", named)
            patch.setattr(kernels.torch.cuda, "is_available", lambda: True)
            patch.setattr(kernels, "_fla_ops", lambda: object())
            patch.setattr(subprocess, "Popen", lambda command, **kw: popen(command, started, **kw))
            kernels.start_fla_prebuild(2, 64, 4, 8, 10, 72, 4, device=0)
            (env,) = started
            return (os.environ if env is None else env).get("TRITON_PTXAS_PATH")

    assert child_ptxas(None, None) == torchs  # set as inductor will set it, before the child reads it
    assert child_ptxas(torchs, version[tritons]) == tritons
    assert child_ptxas(None, version[tritons]) == tritons
    assert child_ptxas(tritons, version[tritons]) == tritons
    assert child_ptxas(torchs, version[torchs]) == torchs
    assert child_ptxas(torchs, "Cuda compilation tools, release 11.0\n") == torchs  # unknown: inherited


def test_fla_prebuild_child_imports_the_parents_file_through_a_symlinked_folder_of_another_name(tmp_path):
    """The prebuild child imports the very file its parent imported, where the package's folder is a symlink to a
    folder of another name (e.g. a versioned store) whose own folder holds a stale `llamathink/`: the child's
    packages get the folders the parent found them in, not a folder worked out from the resolved file. On this CPU
    the child gets as far as asking for the GPU, in `prebuild_fla_kernels` of the symlinked file."""
    store, site = tmp_path / "store", tmp_path / "site"
    shutil.copytree(REPO_ROOT / "llamathink", store / "llamathink-0.1.0", ignore=shutil.ignore_patterns("__pycache__"))
    (store / "llamathink").mkdir()  # a stale copy beside it
    (store / "llamathink" / "__init__.py").write_text("")
    (store / "llamathink" / "kernels_llamathink.py").write_text("raise SystemExit('the stale copy was imported')\n")
    site.mkdir()
    (site / "llamathink").symlink_to(store / "llamathink-0.1.0", target_is_directory=True)
    parent = (
        "import os, subprocess, sys\n"
        "import llamathink.kernels_llamathink as k\n"
        "args = dict(batch_size=2, seq_len=64, num_heads=4, head_k_dim=8, head_v_dim=10, conv_dim=72,\n"
        "            conv_kernel_size=4, dtype='bfloat16', packed=False, device=0, delta_rule='fla')\n"
        "print(k.__file__)\n"
        "command = k._prebuild_command(args, os.getpid())\n"
        "run = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)\n"
        "print(run.returncode, run.stderr)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_CACHE_DIR")}
    env["PYTHONPATH"] = str(site)
    run = subprocess.run(
        [sys.executable, "-c", parent], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert run.returncode == 0, run.stderr[-2000:]
    parent_file, child = run.stdout.split("\n", 1)
    assert parent_file == str(site / "llamathink" / "kernels_llamathink.py"), parent_file
    assert not child.startswith("0 ") and "stale copy" not in child, child[-2000:]
    assert f'File "{parent_file}"' in child and "in prebuild_fla_kernels" in child, child[-2000:]


_FAKE_PREBUILD_SITE = """
import importlib, json, os, signal, sys, time, types
if os.environ.get("FAKE_PREBUILD"):
    # the package registered bare, as the prebuild's program does (`_PREBUILD_CHILD_PROGRAM`), which keeps it
    bare = sys.modules["llamathink"] = types.ModuleType("llamathink")
    bare.__path__ = [os.path.join(os.environ["FAKE_PREBUILD_ROOT"], "llamathink")]
    kernels_llamathink = importlib.import_module("llamathink.kernels_llamathink")

    def fake(part="all", on_built=None, **_):
        action = json.loads(os.environ["FAKE_PREBUILD"]).get(part, "done")
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if action == "interrupt":
            raise KeyboardInterrupt
        if action == "sleep":
            time.sleep(120)
        on_built()
        if action == "late-error":
            raise RuntimeError("after the kernels of the step's shapes")

    kernels_llamathink.prebuild_fla_kernels = fake
    # the build record's GPU and package versions, without a GPU or FlashQLA here
    kernels_llamathink._gpu_identity = lambda device: {"gpu": "fake", "capability": [9, 0], "sm_count": 132}
    kernels_llamathink._distribution_version = lambda name: "1.0"
"""


def test_flash_qla_prebuild_parts_tell_their_end_however_they_end(tmp_path, monkeypatch):
    """Each FlashQLA prebuild part tells `ready_dir` how it ended, however it ends: done once the kernels of the
    step's shapes are built (also where it fails after that), failed on an exception or KeyboardInterrupt in its
    build, and a part killed by a signal (its own `finally` never runs) is told failed by the child that started it;
    the child ends with an error naming the parts that failed. A child whose parent has gone removes the folder
    and ends. The builds here are stand-ins (a sitecustomize in each process: no GPU)."""
    import time

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_FAKE_PREBUILD_SITE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), str(REPO_ROOT)]))
    command = _captured_prebuild_command(kernels, monkeypatch, delta_rule="flash_qla")
    ready = Path(json.loads(command[5])["ready_dir"])
    kernels._prebuild_waits[:] = [e for e in kernels._prebuild_waits if e.ready != ready]
    plan = {"solve": "done", "forward": "kill", "states": "interrupt", "backward": "late-error"}
    monkeypatch.setenv("FAKE_PREBUILD", json.dumps(plan))
    monkeypatch.setenv("FAKE_PREBUILD_ROOT", str(REPO_ROOT))
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode != 0, run.stderr[-3000:]
    assert "ended with codes" in run.stderr and "'forward': -9" in run.stderr, run.stderr[-3000:]
    assert sorted(p.name for p in ready.iterdir()) == [
        "backward.done",
        "forward.failed",
        "solve.done",
        "states.failed",
    ], run.stderr[-3000:]
    # the parent gone (a parent pid that is not the child's parent): the child removes the folder and ends
    monkeypatch.setenv("FAKE_PREBUILD", json.dumps(dict.fromkeys(plan, "sleep")))
    start = time.monotonic()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])  # a pid that is no one's parent any more
    gone.wait()
    run = subprocess.run([*command[:6], str(gone.pid)], capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 3 and not ready.exists(), (run.returncode, run.stderr[-3000:])
    assert time.monotonic() - start < 60


def _fake_gpu_and_flash_qla(monkeypatch, versions=None):
    """`_flash_qla_build_key`'s GPU and package versions, without a GPU or FlashQLA."""
    versions = {"flash-qla": "1.0", "tilelang": "1.0", "fla-core": "1.0", **(versions or {})}
    monkeypatch.setattr(kernels, "_gpu_identity", lambda device: {"gpu": "fake", "capability": [9, 0], "sm_count": 132})
    monkeypatch.setattr(kernels, "_distribution_version", versions.get)


def test_flash_qla_build_record_names_the_shapes_gpu_and_versions_it_was_built_for(tmp_path, monkeypatch):
    """`flash_qla_built` is true only for the step shapes, GPU and package versions a build recorded
    (`record_flash_qla_build`), in TileLang's cache folder (TILELANG_CACHE_DIR); an unreadable, foreign or
    truncated record, or flash-qla or tilelang missing, counts as no build. The record is written whole (no
    temporary file left)."""
    monkeypatch.setenv("TILELANG_CACHE_DIR", str(tmp_path / "tl"))
    _fake_gpu_and_flash_qla(monkeypatch)
    shapes = (16, 1024, 9, (112, 112), "bfloat16", False, 0)
    assert not kernels.flash_qla_built(*shapes)
    path = kernels.record_flash_qla_build(*shapes)
    assert path.parent == tmp_path / "tl" / "llamathink" and [p.name for p in path.parent.iterdir()] == [path.name]
    assert kernels.flash_qla_built(*shapes)
    assert kernels.flash_qla_built(16, 1024, 9, (112, 112), torch.bfloat16, False, 0)  # a dtype as torch names it
    for other in [
        (64, 1024, 9, (112, 112), "bfloat16", False, 0),  # another batch size
        (16, 2048, 9, (112, 112), "bfloat16", False, 0),
        (16, 1024, 8, (128, 128), "bfloat16", False, 0),
        (16, 1024, 9, (112, 112), "float16", False, 0),
        (16, 1024, 9, (112, 112), "bfloat16", True, 0),  # packed rows
    ]:
        assert not kernels.flash_qla_built(*other), other
    with monkeypatch.context() as patch:  # another GPU kind
        patch.setattr(kernels, "_gpu_identity", lambda d: {"gpu": "other", "capability": [10, 0], "sm_count": 148})
        assert not kernels.flash_qla_built(*shapes)
    for versions in ({"tilelang": "1.1"}, {"flash-qla": None}, {"tilelang": None}):
        with monkeypatch.context() as patch:
            _fake_gpu_and_flash_qla(patch, versions)
            assert not kernels.flash_qla_built(*shapes), versions
    text = path.read_text()
    for damaged in (text[: len(text) // 2], "[]", json.dumps({**json.loads(text), "batch_size": 64})):
        path.write_text(damaged)
        assert not kernels.flash_qla_built(*shapes), damaged
    path.unlink()
    path.mkdir()  # not a file
    assert not kernels.flash_qla_built(*shapes)


def test_auto_layers_train_with_flash_qla_only_where_its_build_is_recorded_or_a_resumed_run_says_so(monkeypatch):
    """`choose_training_kernels`: layers with `gdn_backend` "auto" switch to FlashQLA (their `backend`; the config
    keeps "auto") where its build is recorded for the step's shapes and it can run, or where `kernels` says so (a
    resumed run); otherwise, or where FlashQLA cannot run (a warning), they stay on fla. Layers that name a backend
    keep it. `start_flash_qla_build` builds only for "auto" layers on fla whose build is not recorded. CPU: the GPU
    and the packages are stood in for."""
    built, problem, started = {"yes": False}, {"why": None}, []
    monkeypatch.setattr(modeling.LlamaThinkPreTrainedModel, "_training_device", lambda self: torch.device("cuda", 0))
    monkeypatch.setattr(modeling, "select_gdn_backend", lambda requested, *a, **k: requested.replace("auto", "fla"))
    monkeypatch.setattr(modeling, "flash_qla_built", lambda *args: built["yes"] and args[:4] == (16, 1024, 2, (8, 8)))
    monkeypatch.setattr(modeling, "flash_qla_problem", lambda *a, **k: problem["why"])
    monkeypatch.setattr(modeling, "start_fla_prebuild", lambda **kw: started.append(kw) or "child")

    def model(**overrides):
        return tiny_model(
            linear_num_key_heads=2,
            linear_num_value_heads=2,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
            **overrides,
        )

    def backends(m):
        return {mixer.backend for mixer in m._gated_deltanets()}

    m = model()
    assert m.choose_training_kernels(16, 1024) == "fla" and backends(m) == {"auto"}
    assert m.start_flash_qla_build(16, 1024, log_path="log") == "child"
    assert started[-1]["delta_rule"] == "flash_qla" and started[-1]["wait"] is False
    assert (started[-1]["batch_size"], started[-1]["num_heads"], started[-1]["log_path"]) == (16, 2, "log")
    built["yes"] = True
    assert m.start_flash_qla_build(16, 1024) is None and len(started) == 1  # built already
    assert m.choose_training_kernels(64, 1024) == "fla"  # built for batch 16 only
    assert m.choose_training_kernels(16, 1024) == "flash_qla"
    assert backends(m) == {"flash_qla"} and m.config.gdn_backend == "auto"
    assert m.start_flash_qla_build(16, 1024) is None  # nothing left on fla
    assert model().choose_training_kernels(16, 1024, kernels="fla") == "fla"  # a run that started on fla
    built["yes"] = False
    assert model().choose_training_kernels(16, 1024, kernels="flash_qla") == "flash_qla"  # a resumed FlashQLA run
    problem["why"] = "FlashQLA has no kernels for sm80"
    with warnings.catch_warnings(record=True):
        m = model()
        assert m.choose_training_kernels(16, 1024, kernels="flash_qla") == "fla" and backends(m) == {"auto"}
        assert m.start_flash_qla_build(16, 1024) is None  # cannot run here: nothing to build
    problem["why"], built["yes"] = None, True
    m = model(gdn_backend="fla")  # a named backend is kept
    assert m.choose_training_kernels(16, 1024) == "fla" and m.start_flash_qla_build(16, 1024) is None
    with pytest.raises(ValueError, match="kernels='FlashQLA': expected"):
        m.choose_training_kernels(16, 1024, kernels="FlashQLA")


def test_flash_qla_prebuild_records_its_build_only_when_all_four_parts_end_well(tmp_path, monkeypatch):
    """A FlashQLA prebuild's child records the build (`flash_qla_built` true afterwards) once its four parts have
    all ended well, also where nothing waits for it (`wait=False`, a build for later runs, which has no folder of
    parts' ends); a part that fails, even after its kernels for the step were built, leaves no record. The builds
    here are stand-ins (a sitecustomize in each process: no GPU)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_FAKE_PREBUILD_SITE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), str(REPO_ROOT)]))
    monkeypatch.setenv("TILELANG_CACHE_DIR", str(tmp_path / "tl"))
    monkeypatch.setenv("FAKE_PREBUILD_ROOT", str(REPO_ROOT))
    _fake_gpu_and_flash_qla(monkeypatch)
    shapes = (2, 64, 4, (8, 10), "bfloat16", False, 0)  # as `_captured_prebuild_command` starts it
    command = _captured_prebuild_command(kernels, monkeypatch, delta_rule="flash_qla", wait=False)
    assert (
        "ready_dir" not in json.loads(command[5])
        and not kernels._prebuild_waits[-1:]
        or all(e.ready != json.loads(command[5]).get("ready_dir") for e in kernels._prebuild_waits)
    )
    monkeypatch.setenv("FAKE_PREBUILD", json.dumps({"backward": "late-error"}))
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode != 0 and "ended with codes" in run.stderr, run.stderr[-3000:]
    assert not kernels.flash_qla_built(*shapes) and not (tmp_path / "tl").exists()
    monkeypatch.setenv("FAKE_PREBUILD", json.dumps({}))  # every part done
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert kernels.flash_qla_built(*shapes)


def test_flash_qla_calls_wait_once_for_each_prebuild_part_until_its_process_tells_its_end(tmp_path, monkeypatch):
    """`wait_for_prebuild`, which FlashQLA's ops call before their kernels: it waits until each asked-for part's
    process has written its end (done or failed) into the prebuild's folder, once per part (a later call with a part
    already asked for returns at once, also where that part never ended), stops waiting once the prebuild's child
    has ended, or after `PREBUILD_WAIT_LIMIT_S` with a warning; without a prebuild it returns at once."""
    import threading
    import time

    class Child:
        ended = False

        def poll(self):
            return 0 if self.ended else None

    monkeypatch.setattr(kernels, "_prebuild_waits", [])
    kernels.wait_for_prebuild(("solve", "forward"))  # no prebuild: nothing to wait for
    child = Child()
    entry = kernels._PrebuildWait(child, tmp_path, {"solve", "forward", "states", "backward"})
    kernels._prebuild_waits.append(entry)

    def tell(name, after):
        time.sleep(after)
        (tmp_path / name).touch()

    tellers = [threading.Thread(target=tell, args=a) for a in (("solve.done", 0.2), ("forward.failed", 0.5))]
    for teller in tellers:
        teller.start()
    start = time.monotonic()
    kernels.wait_for_prebuild(("solve", "forward"))
    waited = time.monotonic() - start
    assert 0.5 <= waited < 5, waited
    assert {p.name for p in tmp_path.iterdir()} == {"solve.done", "forward.failed"}
    assert entry.pending == {"states", "backward"}
    start = time.monotonic()
    kernels.wait_for_prebuild(("solve", "forward"))  # asked for already: no second wait
    assert time.monotonic() - start < 0.1
    # the limit: a part that never ends is waited for at most PREBUILD_WAIT_LIMIT_S, with a warning that names it
    monkeypatch.setattr(kernels, "PREBUILD_WAIT_LIMIT_S", 0.3)
    monkeypatch.delitem(kernels._fla_state, "prebuild-wait", raising=False)
    warned = []
    monkeypatch.setattr(kernels.logger, "warning", warned.append)
    other = kernels._PrebuildWait(Child(), tmp_path / "other", {"states"})  # a second prebuild: one limit for both
    kernels._prebuild_waits.append(other)
    start = time.monotonic()
    kernels.wait_for_prebuild(("states",))
    assert 0.3 <= time.monotonic() - start < 0.58  # (a limit for each prebuild would take 0.6 s or more)
    assert len(warned) == 1 and "prebuild of states has not ended after 0 s" in warned[0], warned
    assert entry.pending == {"backward"} and other.pending == set()
    # the child has ended (killed, or failed before its parts could tell): no wait for the parts left
    monkeypatch.setattr(kernels, "PREBUILD_WAIT_LIMIT_S", 60.0)
    child.ended = True
    start = time.monotonic()
    kernels.wait_for_prebuild(("backward", "states"))
    assert time.monotonic() - start < 1 and entry.pending == set()


def test_fla_backward_problem_names_fla_tilelang_switched_off(monkeypatch):
    """On Hopper with Triton in fla's bad range, tilelang installed but turned off by fla's own `FLA_TILELANG=0` is a
    problem named up front (fla's Triton backward would raise inside autograd), not a crash in the first backward."""
    import importlib.util

    from llamathink import kernels_llamathink as m

    _pretend_hopper_with_triton_in_flas_bad_range(monkeypatch, m)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())  # tilelang "installed"
    cuda = torch.device("cuda", 0)
    assert m.fla_backward_problem(cuda) is None
    monkeypatch.setattr(m, "_fla_state", {})
    monkeypatch.setenv("FLA_TILELANG", "0")
    assert "FLA_TILELANG=0" in m.fla_backward_problem(cuda)


def test_compiled_loss_chunk_matches_eager_through_inductor():
    """The chunked loss through inductor (what `compile_layers` turns on) gives the eager loss and gradients in
    float64, with ignored targets, a ragged last chunk and the `num_items_in_batch` divisor, and equals
    `F.cross_entropy` on the full logits."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 40, 16, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(96, 16, dtype=torch.float64, generator=gen, requires_grad=True)
    labels = torch.randint(0, 96, (2, 40), generator=gen)
    labels[0, :5] = -100
    results = []
    for backend in (None, "inductor"):
        for num_items in (None, 123):
            loss = chunked_causal_lm_loss(hidden, weight, labels, num_items, chunk_rows=30, compile_backend=backend)
            results.append((loss, *torch.autograd.grad(loss, (hidden, weight))))
    for eager, compiled in zip(results[:2], results[2:]):
        for a, b in zip(eager, compiled):
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    assert not torch.equal(results[0][1], results[1][1])  # the divisor reached the gradients
    reference = F.cross_entropy((hidden[:, :-1] @ weight.T).reshape(-1, 96), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(results[2][0], reference, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["float64", "bf16-autocast"])
def test_compile_layers_through_aot_autograd_match_eager(dtype):
    """The compiled layers as AOTAutograd runs them (dynamo's "aot_eager" backend: the traced forward and backward
    graphs, op by op, with the strides the trace assumed): the loss and every gradient of the eager model, in
    float64 to rounding and under bf16 autocast to bf16 rounding, plain and packed. The layers' own autograd
    Functions (the stacked gate projections' backward) must not assume strides a traced graph does not keep."""
    torch._dynamo.reset()
    kwargs = {"mixer_types": ["linear", "csa", "full"], "num_hidden_layers": 3}
    kwargs |= {"linear_num_value_heads": 3, "linear_num_key_heads": 3}  # 3 x 2 gate columns: padded rows
    ref = tiny_model(**kwargs).train()
    counter = CompileCounterWithBackend("aot_eager")  # counts the graphs dynamo hands to AOTAutograd
    compiled = tiny_model(**kwargs).train().compile_layers(backend=counter)
    if dtype == torch.float64:
        ref, compiled = ref.double(), compiled.double()
    ids = torch.randint(3, 96, (2, 40), generator=torch.Generator().manual_seed(0))
    positions = torch.cat([torch.arange(15), torch.arange(25)])[None].expand(2, 40)
    for extra, graphs in (({}, 4), ({"position_ids": positions}, 7)):
        results = []
        for model in (ref, compiled):
            model.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                loss = model(input_ids=ids, labels=ids, use_cache=False, skip_logits=True, **extra).loss
            loss.backward()
            results.append((loss.detach().double(), {n: p.grad.double() for n, p in model.named_parameters()}))
        (loss_ref, grads_ref), (loss, grads) = results
        # one graph per mixer type and the loss's; packed rows add one per mixer type (no eager fallback)
        assert counter.frame_count == graphs, counter.frame_count
        tol = 1e-12 if dtype == torch.float64 else 2e-2
        torch.testing.assert_close(loss, loss_ref, rtol=tol, atol=tol)
        for name, grad in grads_ref.items():
            if dtype == torch.float64:
                torch.testing.assert_close(grads[name], grad, rtol=1e-9, atol=1e-12, msg=name)
            else:  # bf16 kernels fused differently: relative to the tensor's norm
                assert (grads[name] - grad).norm() <= 2e-2 * grad.norm() + 1e-6, name


def test_mixer_pattern_period_is_the_shortest_run_repeated_whole():
    assert modeling.mixer_pattern_period(LlamaThinkConfig().mixer_types) == 4  # the seed's 16 layers
    assert modeling.mixer_pattern_period(["linear"] * 3) == 1
    assert modeling.mixer_pattern_period(["linear", "full", "linear"]) == 3  # no run repeats whole
    assert modeling.mixer_pattern_period(["linear", "full"] * 2 + ["linear"]) == 5
    assert modeling.mixer_pattern_period(["linear", "linear", "full"] * 2) == 3


def test_compiled_runs_of_layers_give_way_to_each_layer_where_a_run_cannot_serve(caplog):
    """`compile_layers` compiles runs of the mixer pattern (here linear, full, twice over) and training forwards call
    them; forwards that need each layer alone call the layers (compiled one by one): `output_hidden_states`, gradient
    checkpointing, and layers replaced after `compile_layers` (with a warning). Every path gives the eager model's
    loss, gradients and hidden states (float64); the parameters and state dict are the model's own. A counting
    backend stands in for inductor."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    kwargs = {"mixer_types": ["linear", "full"] * 2, "num_hidden_layers": 4}
    ref, compiled = tiny_model(**kwargs).train(), tiny_model(**kwargs).train()
    keys = list(compiled.state_dict())
    compiled.compile_layers(backend=counting_backend)
    assert [len(run.layers) for run in compiled.model.layer_runs] == [2, 2]
    assert list(compiled.state_dict()) == keys and len(list(compiled.parameters())) == len(list(ref.parameters()))
    ids = torch.randint(3, 96, (2, 24), generator=torch.Generator().manual_seed(0))

    def step(model, **kwargs):
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids, use_cache=False, **kwargs)
        out.loss.backward()
        return out, {n: p.grad for n, p in model.named_parameters()}

    def same(**kwargs):
        (out_ref, grads_ref), (out, grads) = step(ref, **kwargs), step(compiled, **kwargs)
        torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-12, atol=1e-12)
        for name, grad in grads_ref.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-9, atol=1e-12, msg=name)
        for h, h_ref in zip(out.hidden_states or (), out_ref.hidden_states or ()):
            torch.testing.assert_close(h, h_ref, rtol=1e-12, atol=1e-12)
        return out

    same()
    assert len([gm for gm in graphs if "logsumexp" not in gm.code]) == 1  # one run's graph, called twice
    n = len(graphs)
    out = same(output_hidden_states=True)
    assert len(out.hidden_states) == 5
    assert len(graphs) == n + 2  # the linear and full layers, each compiled alone
    ref.gradient_checkpointing_enable(), compiled.gradient_checkpointing_enable()
    same()  # (the layers' graphs recompile for the checkpoint)
    ref.gradient_checkpointing_disable(), compiled.gradient_checkpointing_disable()
    # a hook added to a layer after the runs' graph was traced: the layers run alone, so that it runs
    handles = [
        model.model.layers[1].register_forward_hook(lambda mod, args, out: out * 0.5) for model in (ref, compiled)
    ]
    with caplog.at_level("WARNING"):
        same()
        assert "decoder layers have hooks: they now run one by one" in caplog.text
        # compiled again with the hook in place: still each layer alone (a run would reuse the graph traced without it)
        compiled.compile_layers(backend=counting_backend)
        assert compiled.model.layer_runs is None
        assert "decoder layers have hooks: they are compiled one by one" in caplog.text
        same()
    for handle in handles:
        handle.remove()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda mod, args, out: None)
    try:  # a hook for every module is a layer's hook too
        compiled.compile_layers(backend=counting_backend)
        assert compiled.model.layer_runs is None
    finally:
        handle.remove()
    compiled.compile_layers(backend=counting_backend)
    assert compiled.model.layer_runs is not None
    same()  # the runs again, as traced
    for model in (ref, compiled):  # a layer replaced after compile_layers: each layer runs alone
        model.model.layers[3] = copy.deepcopy(model.model.layers[1])
    with caplog.at_level("WARNING"):
        same()
    assert "the decoder layers changed after compile_layers" in caplog.text
    assert compiled.model.layer_runs is None  # dropped with the layers they held
    compiled.compile_layers(layers_per_graph=3, backend=counting_backend)  # a shorter last run: its own graph
    assert [len(run.layers) for run in compiled.model.layer_runs] == [3, 1]
    same()
    caplog.clear()
    with caplog.at_level("WARNING"):
        compiled.compile_layers(layers_per_graph=2, backend=counting_backend)  # fits the period 2: no warning
        assert "cuts the mixer pattern" not in caplog.text
        six = tiny_model(mixer_types=["linear", "csa", "full"] * 2, num_hidden_layers=6)
        six.compile_layers(layers_per_graph=2, backend="eager")  # runs (linear, csa), (full, linear), (csa, full)
    assert "layers_per_graph=2 cuts the mixer pattern (period 3) into 3 different runs" in caplog.text


@pytest.mark.parametrize("layers_per_graph", [0, -1, True, 2.0, "2"])
def test_compile_layers_refuses_a_layers_per_graph_that_is_not_a_positive_integer(layers_per_graph):
    with pytest.raises(ValueError, match=r"layers_per_graph must be a positive integer or None, got"):
        tiny_model().compile_layers(layers_per_graph=layers_per_graph, backend="eager")


@pytest.mark.parametrize(("layers_per_graph", "layer_graphs"), [(None, 1), (1, 3)], ids=["pattern-runs", "layers"])
def test_compile_layers_compiles_once_per_mixer_type_and_matches_eager(layers_per_graph, layer_graphs):
    """Regional compilation (`compile_layers`): by default one graph for a run of the mixer pattern (here linear,
    csa, full, twice over), replayed for each run; with `layers_per_graph=1` one graph per mixer type however many
    layers share it. Either way the same loss and gradients as the eager model (float64), packed batches included,
    and cached generation through the eager layer forwards with the same tokens. A counting backend stands in for
    inductor (the graphs are what dynamo hands over; their code is run as traced)."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    mixers = ["linear", "csa", "full", "linear", "csa", "full"]
    ref = tiny_model(mixer_types=mixers, num_hidden_layers=6).train()
    compiled = tiny_model(mixer_types=mixers, num_hidden_layers=6).train()
    compiled.compile_layers(layers_per_graph=layers_per_graph, backend=counting_backend)
    assert compiled.model.compiled_layers and not ref.model.compiled_layers

    def step(model, ids, **kwargs):
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids, use_cache=False, skip_logits=True, **kwargs).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    for seed in range(3):
        ids = torch.randint(3, 96, (2, 40), generator=torch.Generator().manual_seed(seed))
        (loss_ref, grads_ref), (loss, grads) = step(ref, ids), step(compiled, ids)
        torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=1e-12)
        for name, grad in grads_ref.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-9, atol=1e-12, msg=name)
    loss_graphs = [gm for gm in graphs if "logsumexp" in gm.code]
    assert len(graphs) - len(loss_graphs) == layer_graphs, f"{len(graphs) - len(loss_graphs)} layer graphs"
    assert len(loss_graphs) == 1  # the chunked loss, compiled once for the one chunk shape
    positions = torch.cat([torch.arange(15), torch.arange(25)])[None].expand(2, 40)
    (loss_ref, grads_ref), (loss, grads) = (
        step(ref, ids, position_ids=positions),
        step(compiled, ids, position_ids=positions),
    )
    torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        grads["model.layers.0.mixer.conv1d.weight"], grads_ref["model.layers.0.mixer.conv1d.weight"]
    )
    n_graphs = len(graphs)
    # training-mode forwards without autograd (reentrant checkpointing's first pass) keep the compiled layers...
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, labels=ids).loss, ref(ids, labels=ids).loss, rtol=1e-12, atol=0)
    assert len(graphs) > n_graphs
    n_graphs = len(graphs)
    # ...except with CUDA graphs (what compile_layers(mode="reduce-overhead") sets), where they run eagerly
    compiled.model.compiled_layers_cuda_graphs = True
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, labels=ids).loss, ref(ids, labels=ids).loss, rtol=1e-12, atol=0)
    assert len(graphs) == n_graphs
    compiled.model.compiled_layers_cuda_graphs = False
    # evaluation forwards (eval mode, no autograd) run the eager layers: no graphs for them or a short last batch
    ref.eval(), compiled.eval()
    with torch.no_grad():
        for batch in (ids, ids[:1]):
            out, out_ref = compiled(batch, use_cache=False), ref(batch, use_cache=False)
            torch.testing.assert_close(out.logits, out_ref.logits, rtol=1e-12, atol=1e-12)
    assert len(graphs) == n_graphs
    with torch.no_grad():
        out_ref = ref.generate(ids[:, :8], max_new_tokens=6, do_sample=False)
        out = compiled.generate(ids[:, :8], max_new_tokens=6, do_sample=False)
    assert torch.equal(out, out_ref)
    assert len(graphs) == n_graphs  # cached steps ran the eager forwards


def test_mixed_dtype_addmm_probe_picks_the_form_torch_takes(monkeypatch):
    """`_mixed_dtype_addmm_form` (which form of fp32-accumulating addmm `accumulate_grad_weight` uses on CUDA) with
    torch.addmm stood in for by each behaviour a torch release may have: "in place" only where `out=` is taken and
    written into the sum's own memory with the right values; "new tensor" where `out=` is refused or ignored (a new
    tensor returned) but the plain form works; None where the overload is missing, refuses a float32 C, or gives
    the wrong dtype or values (the cast-and-add form)."""
    probe = modeling._mixed_dtype_addmm_form.__wrapped__  # uncached
    real = torch.addmm

    def exact(acc, a, b, out_dtype=None, out=None):  # C + A B in out_dtype, into `out` when given
        result = acc.to(out_dtype) + (a.float() @ b.float()).to(out_dtype)
        return out.copy_(result) if out is not None else result

    def no_out(acc, a, b, out_dtype=None, out=None):
        if out is not None:
            raise RuntimeError("out= not supported with out_dtype")
        return exact(acc, a, b, out_dtype)

    def ignores_out(acc, a, b, out_dtype=None, out=None):
        return exact(acc, a, b, out_dtype)  # a new tensor even when `out` is given

    def missing(acc, a, b, **kwargs):
        if "out_dtype" in kwargs:
            raise TypeError("addmm() got an unexpected keyword argument 'out_dtype'")
        return real(acc, a, b, **kwargs)

    def wrong_dtype(acc, a, b, out_dtype=None, out=None):
        return exact(acc, a, b, torch.bfloat16)

    def wrong_values(acc, a, b, out_dtype=None, out=None):
        result = (a.float() @ b.float()).to(out_dtype)  # C dropped
        return out.copy_(result) if out is not None else result

    cases = {exact: "in place", no_out: "new tensor", ignores_out: "new tensor", missing: None}
    cases.update({wrong_dtype: None, wrong_values: None})
    for addmm, want in cases.items():
        monkeypatch.setattr(torch, "addmm", addmm)
        assert probe(torch.device("cpu"), torch.bfloat16, torch.float32) == want, addmm.__name__


def test_inputs_checked_by_caller_skips_the_forwards_value_check_and_nothing_else(model, monkeypatch):
    """`check_token_values` names each bad input (ids, mask, targets) on tensors of any device mix; inside
    `inputs_checked_by_caller` (given the model or a wrapper of it) the forward skips it, so a training step does
    not wait for the GPU, but still refuses wrong shapes and dtypes; the count is restored on leaving, also after an
    error, and blocks nest. Outside, every forward with labels checks (the ids and the labels)."""
    check = modeling.check_token_values
    vocab = model.config.vocab_size
    with pytest.raises(ValueError, match=f"input_ids contains token id {vocab}, outside the vocabulary"):
        check(vocab, input_ids=torch.tensor([[1, vocab]]))
    with pytest.raises(ValueError, match="attention_mask must hold only 0"):
        check(vocab, input_ids=torch.tensor([[1, 2]]), attention_mask=torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match=r"shift_labels contains -7: neither -100 \(ignored\)"):
        check(vocab, labels=torch.tensor([[-100, 3]]), shift_labels=torch.tensor([[5, -7]]))
    with pytest.raises(ValueError, match="input_ids must be an integer tensor, got torch.float32"):
        check(vocab, input_ids=torch.ones(1, 2))
    check(vocab, input_ids=torch.tensor([[0, vocab - 1]]), labels=torch.tensor([[-100, vocab - 1]]))  # all good

    calls = []
    monkeypatch.setattr(modeling, "check_token_values", lambda *a, **k: calls.append(sorted(k)) or check(*a, **k))
    ids = torch.randint(3, vocab, (2, 6), generator=torch.Generator().manual_seed(0))
    ref = model(ids, labels=ids)
    assert calls == [["labels"], ["attention_mask", "input_ids"]]
    wrapper = torch.nn.ModuleDict({"inner": model})  # as DDP, PEFT or accelerate wrap it
    calls.clear()
    with modeling.inputs_checked_by_caller(wrapper):
        with modeling.inputs_checked_by_caller(model):
            out = model(ids, labels=ids)
        assert torch.equal(out.loss, ref.loss) and torch.equal(out.logits, ref.logits)
        model(ids, labels=ids)  # the outer block still holds
        with pytest.raises(ValueError, match="labels has shape"):
            model(ids, labels=ids[:, :-1])
        with pytest.raises(ValueError, match="labels must be an integer tensor"):
            model(ids, labels=ids.float())
        with pytest.raises(ValueError, match="input_ids must be an integer tensor"):
            model(ids.float())
    assert calls == []
    with pytest.raises(ValueError, match=f"labels contains {vocab}"):
        model(ids, labels=torch.full_like(ids, vocab))
    assert calls == [["labels"]]
    assert modeling._CHECKED_BY_CALLER.get() == {}
    # blocks that end out of order (a generator's block closed inside a later one) each count themselves out
    other = LlamaThinkForCausalLM(model.config).double()

    def held_in_generator():
        with modeling.inputs_checked_by_caller(other):
            yield

    gen = held_in_generator()
    next(gen)
    with modeling.inputs_checked_by_caller(model):
        gen.close()
        assert not modeling._inputs_checked_by_caller(other) and modeling._inputs_checked_by_caller(model)
    assert modeling._CHECKED_BY_CALLER.get() == {}
    with pytest.raises(ValueError, match=f"labels contains {vocab}"):
        other(ids, labels=torch.full_like(ids, vocab))
    # the block holds for its own thread only, and not for a copy of the model made inside it
    with modeling.inputs_checked_by_caller(model):
        copied = copy.deepcopy(model)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            other_thread = pool.submit(model, ids, labels=torch.full_like(ids, vocab)).exception()
    assert isinstance(other_thread, ValueError) and f"labels contains {vocab}" in str(other_thread)
    with pytest.raises(ValueError, match=f"labels contains {vocab}"):
        copied(ids, labels=torch.full_like(ids, vocab))


def test_narrow_integer_labels_are_checked_as_the_token_ids_they_hold():
    """Labels of 8- and 16-bit integer dtypes are compared as int64: a valid id above the dtype's range of
    vocab_size (uint8 labels with vocab 32000) is no error, and an out-of-vocabulary one is named, not taken for
    -100 by wrap-around (uint8 156 == -100 mod 256)."""
    check = modeling.check_token_values
    for dtype in (torch.uint8, torch.int8, torch.int16):
        check(32000, labels=torch.tensor([[5, 66, 100]], dtype=dtype))  # all valid ids
    with pytest.raises(ValueError, match="labels contains 156: neither -100"):
        check(96, labels=torch.tensor([[5, 156]], dtype=torch.uint8))
    with pytest.raises(ValueError, match="shift_labels contains 32767: neither -100"):
        check(32000, shift_labels=torch.tensor([[-100, 32767]], dtype=torch.int16))


@pytest.mark.parametrize("case", ["torch-backend", "fla-training", "fla-eval", "fla-checkpointed-adapter"])
def test_gated_deltanet_runs_fla_gated_norm_exactly_where_it_trains_on_fla_kernels(case, monkeypatch):
    """The Gated DeltaNet's output norm takes fla's fused kernel (`fused=True`) only where the layer trains on
    fla's kernels (its `gdn_backend` as `select_gdn_backend` resolves it): never with gdn_backend "torch" (nor where
    fla falls back to it), not in evaluation without gradients, and under reentrant gradient checkpointing of a
    layer whose own weights are frozen (an adapter's trainable) in both passes, the no-grad first one and the
    recomputation, so that the backward differentiates what the forward computed. fla's kernel, its delta rule and
    the GPU stood in for by PyTorch (this CPU has no fla); the values equal the PyTorch norm's either way."""
    calls = []

    def fla_norm(x, gate, weight, eps):  # the PyTorch norm's function, recorded
        calls.append(torch.is_grad_enabled())
        return (weight * F.rms_norm(x, x.shape[-1:], None, eps) * F.silu(gate)).to(x.dtype)

    monkeypatch.setattr(modeling.LlamaThinkGatedRMSNorm, "fla_takes", staticmethod(lambda x: True))
    monkeypatch.setattr(modeling, "fla_gated_rms_norm", fla_norm)
    monkeypatch.setattr(modeling, "select_gdn_backend", lambda requested, *a, **k: requested)
    monkeypatch.setitem(modeling.FLA_GDN_KERNELS, "chunk", modeling.torch_chunk_gated_delta_rule)
    backend = "torch" if case == "torch-backend" else "fla"
    layer = modeling.LlamaThinkGatedDeltaNet(tiny_config(gdn_backend=backend), 0).double()
    randomize_(layer)
    x = torch.randn(
        2, 12, layer.in_proj_qkv.in_features, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    reference = copy.deepcopy(layer)
    reference.backend = "torch"
    want = reference(x)
    if case == "fla-eval":
        with torch.no_grad():
            got = layer.eval()(x)
        assert calls == []
    elif case == "fla-checkpointed-adapter":
        for name, p in layer.named_parameters():
            p.requires_grad_(name == "in_proj_qkv.weight")  # the layer's own weights frozen but one
        # (reentrant checkpointing needs an input that requires grad: PEFT's enable_input_require_grads)
        got = torch.utils.checkpoint.checkpoint(layer, x.clone().requires_grad_(), use_reentrant=True)
        got.sum().backward()
        assert calls == [False, True]  # the first pass without gradients, the recomputation with them
        assert layer.in_proj_qkv.weight.grad is not None
    else:
        got = layer(x.clone().requires_grad_())
        assert calls == ([] if backend == "torch" else [True])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
