"""Configuration of LlamaThink, a small hybrid-attention language model.

The defaults ARE the original 95.7M-parameter "Llama Think" model: 16 layers in the repeating pattern
linear (Gated DeltaNet), linear, csa (compressed sparse attention), full (gated softmax attention),
hidden size 576, tied embeddings, Llama 2 vocabulary; with the initialisation, CSA window and CSA gate start
chosen by measurement (BENCHMARKS.md section 2), each field's docstring says where it differs from the seed.

This file must only import from `transformers` and the standard library: `save_pretrained` copies it next
to the weights so `AutoConfig.from_pretrained(..., trust_remote_code=True)` works where the `llamathink`
package is not installed.
"""

import math
import warnings

from transformers import PretrainedConfig

MIXER_TYPES = ("linear", "csa", "full")
DEFAULT_MIXER_PATTERN = ("linear", "linear", "csa", "full")
GDN_BACKENDS = ("auto", "flash_qla", "fla", "torch")
MAX_CONTEXT = 1 << 20  # max_position_embeddings: export_c/run.c's limit too
# widths past export_c/run.c's limits (export_c.export.INT_RANGES): refused before the model would allocate them
# The largest sizes the model (and export_c's run.c: export.INT_RANGES) takes: past them a typo of a few digits would
# allocate terabytes (or build a million layers) before any other check could name it
MAX_SIZES = {
    "vocab_size": 1 << 22,
    "hidden_size": 1 << 16,
    "intermediate_size": 1 << 18,
    "num_hidden_layers": 512,
    "num_attention_heads": 4096,
    "num_key_value_heads": 4096,
    "head_dim": 4096,
    "linear_num_key_heads": 4096,
    "linear_num_value_heads": 4096,
    "linear_key_head_dim": 4096,
    "linear_value_head_dim": 4096,
    "linear_conv_kernel_dim": 64,
    "csa_stride": 1 << 16,
    "csa_window": 1 << 20,
}
MAX_WIDTH = 1 << 20  # the attention query width and the Gated DeltaNet conv width (run.c's limit too)
MAX_ROPE_THETA = 1e12  # rope_theta below this (run.c's range)
MAX_EOS_IDS = 16  # end-of-sequence ids a config may list (run.c's)
MAX_GDN_CHUNK = 4096
# The bounds of A_init_range and dt_init_range: float32's smallest positive normal number (the layers keep log(A) and
# the inverse softplus of dt in float32), and a largest value that keeps the chunked delta rule's running sum of
# log-decays finite in float32: a chunk (at most MAX_GDN_CHUNK tokens) sums -A * dt per token, and past about 3.4e38
# the sum is -inf and the chunk's outputs NaN (where token-by-token decoding stays finite). 1e15 * 1e15 * 4096 is
# 4e33, room left for the input's share of dt.
INIT_RANGE_MIN, INIT_RANGE_MAX = 2.0**-126, 1e15


def _check_max_size(name: str, value: int) -> None:
    """Raise ValueError where size field `name`'s `value` is past its `MAX_SIZES` limit."""
    if value > MAX_SIZES[name]:
        raise ValueError(f"{name}={value} is past the {MAX_SIZES[name]:,} this model (and the C runner) supports")


def _saved_config(config_dict):
    """A config dict as `from_pretrained` / `from_json_file` read it from a file: `_without_csa_blend_bias`, then
    `_without_unapplied_rope`."""
    return _without_unapplied_rope(_without_csa_blend_bias(config_dict))


def _without_unapplied_rope(config_dict):
    """A saved config (it records `transformers_version`) whose `rope_parameters` / `rope_scaling` the model never
    applied: LlamaThink before RoPE dicts were checked accepted any, trained with the default RoPE at its
    `rope_theta` field, and `save_pretrained` wrote the dict out. Such a file describes a model of plain RoPE: the
    dicts are dropped with a warning (delete them from the file to silence it), so that the model loads as it was
    trained. Dicts this version takes (the default RoPE, agreeing with the fields) stay; other dicts (new,
    hand-written or built in Python) reach `__init__`, which refuses them."""
    if not isinstance(config_dict, dict) or "transformers_version" not in config_dict:
        return config_dict
    dicts = {k: config_dict[k] for k in ("rope_parameters", "rope_scaling") if k in config_dict}
    fields = [config_dict.get(k, _UNSET) for k in ("rope_theta", "partial_rotary_factor")]
    try:
        _plain_rope(*fields, dicts.get("rope_parameters"), dicts.get("rope_scaling"))
    except ValueError:
        theta, factor = (_ROPE_DEFAULTS[k] if v is _UNSET else v for k, v in zip(_ROPE_DEFAULTS, fields))
        warnings.warn(
            f"this saved config holds {dicts}, which LlamaThink never applied: its model has the default RoPE at "
            f"rope_theta={theta}, partial_rotary_factor={factor}, and loads as such; delete {sorted(dicts)} from its "
            "config.json",
            stacklevel=4,
        )
        return {k: v for k, v in config_dict.items() if k not in dicts}
    return config_dict


def _without_csa_blend_bias(config_dict):
    """A saved config (`save_pretrained` records `transformers_version` and every field) without `csa_blend_bias`
    was written before the field existed, when every CSA layer mixed its two paths with a bias-free gate: give it
    `csa_blend_bias=None`. The class default (-4) would give its model a blend bias its weights lack, which
    `from_pretrained` would fill at -4, shifting every CSA layer. Other dicts (hand-written, or built in Python)
    keep the class default."""
    if isinstance(config_dict, dict) and "transformers_version" in config_dict and "csa_blend_bias" not in config_dict:
        return {**config_dict, "csa_blend_bias": None}
    return config_dict


_ROPE_DEFAULTS = {"rope_theta": 20000.0, "partial_rotary_factor": 0.5}


class _Unset:
    """The default of a field that another argument may also give (`rope_theta` in `rope_parameters`): tells "not
    given" from any value, None included (which the field's check then refuses)."""

    def __repr__(self) -> str:
        return "<default>"


_UNSET = _Unset()


def _plain_rope(rope_theta, partial_rotary_factor, rope_parameters, rope_scaling) -> tuple:
    """(rope_theta, partial_rotary_factor) from the config's own fields and transformers' `rope_parameters` /
    `rope_scaling` dicts (5.x spells the RoPE settings there; a saved or hand-written config may carry them). The
    model has the default RoPE only: a dict may say `rope_type` (or `type`) "default" and give `rope_theta` and
    `partial_rotary_factor`, each equal to the field where both are given; anything else raises ValueError naming
    it, so that a scaled RoPE is never accepted and then trained without its scaling."""
    given = {"rope_theta": rope_theta, "partial_rotary_factor": partial_rotary_factor}
    for name, value in (("rope_parameters", rope_parameters), ("rope_scaling", rope_scaling)):
        if value is None or value == {}:
            continue
        if not isinstance(value, dict):  # (a config error, ValueError like every other here)
            raise ValueError(f"{name} must be a dict of RoPE settings, got {value!r}")  # noqa: TRY004
        rope_type = value.get("rope_type", value.get("type", "default"))
        other = sorted(set(value) - {"rope_type", "type", *given})
        if rope_type != "default" or other:
            raise ValueError(
                f"{name}={value!r}: LlamaThink has the default RoPE only (rope_theta, partial_rotary_factor), no "
                "RoPE scaling (linear, dynamic, yarn, ...); to train a longer context, raise "
                "max_position_embeddings (and rope_theta)"
            )
        for field, own in list(given.items()):
            if field in value:
                if own is not _UNSET and own != value[field]:
                    raise ValueError(f"{field}={own!r} but {name}[{field!r}]={value[field]!r}: give one value")
                given[field] = value[field]
    return tuple(_ROPE_DEFAULTS[field] if value is _UNSET else value for field, value in given.items())


class LlamaThinkConfig(PretrainedConfig):
    r"""
    Args:
        vocab_size (`int`, defaults to 32000): vocabulary size (Llama 2 SentencePiece).
        hidden_size (`int`, defaults to 576): width of the residual stream.
        intermediate_size (`int`, defaults to 1536): SwiGLU hidden width.
        num_hidden_layers (`int`, defaults to 16): number of decoder layers.
        num_attention_heads (`int`, defaults to 9): query heads of the softmax-attention mixers.
        num_key_value_heads (`int`, defaults to 3): key/value heads (grouped-query attention).
        head_dim (`int`, defaults to 64): per-head width of the softmax-attention mixers.
        max_position_embeddings (`int`, defaults to 1024): longest sequence the model accepts.
        rope_theta (`float`, defaults to 20000.0): RoPE base. No RoPE scaling: transformers' `rope_parameters`
            (and its older `rope_scaling`) are taken only as the default RoPE (`rope_type` "default"), their
            `rope_theta` and `partial_rotary_factor` agreeing with these fields; any other RoPE type (linear,
            dynamic, yarn, ...) is refused with a ValueError rather than trained and saved unapplied.
        partial_rotary_factor (`float`, defaults to 0.5): fraction of each head's dims that are rotated.
        rms_norm_eps (`float`, defaults to 1e-6): RMSNorm epsilon.
        initializer_range (`float`, defaults to 0.02): std of the normal init of every linear, embedding and
            depthwise-conv weight (transformers' `PreTrainedModel` rule, which HF Qwen3.5 and HF Llama use).
        zero_init_residual (`bool` or `None`, defaults to `None`): start every projection that writes into the
            residual stream (`o_proj`, `out_proj`, `down_proj`) at zero, so that each decoder layer starts as the
            identity (Fixup, Zhang et al. 2019; SkipInit, De & Smith 2020; torchvision ResNet's `zero_init_residual`;
            modded-nanogpt's output projections). Muon's orthogonalised update moves a zero matrix from the first
            step, and the layer's inner weights from the second. `None` (kept as such, resolved when a model is
            built: `residual_starts_at_zero`) means True unless `rescale_prenorm_residual` is set. Measured against
            N(0, initializer_range) at equal tokens: 0.020 nats lower at 800 steps (five seeds, paired) and 0.007
            at 1600 (four seeds) (BENCHMARKS.md section 2). Fresh-model init only: weights loaded from a checkpoint
            are never re-initialised.
        rescale_prenorm_residual (`bool`, defaults to False): start the residual output projections at
            N(0, initializer_range / sqrt(2 * num_hidden_layers)), as GPT-2 and llama2.c do, instead of zero
            (`zero_init_residual` must then be false or unset). Measured on 13M tokens with Muon it learned less
            per token than N(0, initializer_range) (one seed each, within the seed noise), which learns less than
            zeros (BENCHMARKS.md section 2).
        A_init_range (`list[float]`, defaults to `[0.01, 16]`): Gated DeltaNet decay rates `A = exp(A_log)` start
            uniform in this range (Mamba-2's `A_init_range`; Qwen3.5's range, which measured better than the seed's
            `[1, 16]`: slow-decaying heads from the start).
        dt_init_range (`list[float]` or `None`, defaults to `None`): `None` starts `dt_bias` at 1 (Qwen3-Next /
            Qwen3.5); `[dt_min, dt_max]` starts each head's step `softplus(dt_bias)` log-uniform in that range, floored
            at 1e-4 (Mamba-2 / fla).
        tie_word_embeddings (`bool`, defaults to True): share the input embedding and the output head.
        mixer_types (`list[str]`): token mixer of every layer, each of `"linear"` (Gated DeltaNet),
            `"csa"` (compressed sparse attention) or `"full"` (gated full attention).
            Defaults to `["linear", "linear", "csa", "full"] * (num_hidden_layers // 4)`.
        linear_num_key_heads / linear_num_value_heads (`int`, defaults to 9 / 9): Gated DeltaNet heads.
        linear_key_head_dim / linear_value_head_dim (`int`, defaults to 112 / 112): Gated DeltaNet head widths.
        linear_conv_kernel_dim (`int`, defaults to 4): causal depthwise convolution width.
        csa_stride (`int`, defaults to 4): tokens pooled into one compressed key/value block.
        csa_window (`int`, defaults to 512): local causal window of the CSA layers (the query's own token included).
            The seed used 64; at 800 steps of the equal-token benchmark a 64-token window cost 0.03-0.04 nats
            against 256, and 512 was lower than 256 in 7 of 8 seed-paired runs (0.008 nats on the mean of five at
            1600 steps) at the same training speed (BENCHMARKS.md section 2).
        csa_blend_bias (`float` or `None`, defaults to -4.0): `None` mixes the CSA layers' two paths with
            `sigmoid(blend_proj(x))` (the seed's gate, no bias: it starts half open). A number gives `blend_proj` a
            learned bias starting there, so the gate starts at `sigmoid(csa_blend_bias)` (-4: 0.018, the layer
            starts as its window and learns how much of the compressed path to take). The half-open start cost
            0.05-0.09 nats at 800 steps (BENCHMARKS.md section 2). A saved config without this key (it records
            `transformers_version`) was written before the field existed and describes a model without the bias:
            it loads as `None` (`_without_csa_blend_bias`).
        hyper_connections (`bool`, defaults to True): learned per-dimension residual scaling,
            `h = (1 + r) * h + (1 + s) * sublayer(norm(h))`, with `r`, `s` initialised to zero.
        gdn_chunk_size (`int`, defaults to 64): chunk length of the chunked Gated DeltaNet (training/prefill) in
            the PyTorch kernels; fla's and FlashQLA's kernels always use chunks of 64 (a model that names one of
            them with another length is warned). The chunked form is exact, so the length changes speed and
            rounding, not the function.
        gdn_backend (`str`, defaults to `"auto"`): Gated DeltaNet kernels: `"auto"` (fla's Triton kernels on CUDA
            where installed and trustworthy, else PyTorch; a compiled pretraining run of fixed-shape batches takes
            FlashQLA's where flash-qla is installed and an earlier run on the machine has built its kernels for
            the same shapes, and otherwise builds them in the background after its first step for the runs after
            it: `LlamaThinkPreTrainedModel.choose_training_kernels`), `"fla"` (fla's, warning when it must fall back),
            `"flash_qla"` (FlashQLA's fused delta-rule kernels with fla's conv: at the 95M shape on an H200 the
            compiled training step's kernels take 7.7% less time than with fla's, but its kernels' first build
            is slower; used where flash-qla is installed and the GPU (sm90, sm100), 16-bit dtype and heads of at
            most 128 suit it; else as `"fla"`, warning once) or `"torch"` (always the PyTorch reference).
        decode_cuda_graphs (`bool` or `"always"`, defaults to True): on CUDA, run each one-token decode step
            (left-padded batches included) as one replay of a captured CUDA graph (static-shape state buffers; see
            `LlamaThinkCache`), for contexts (`max_position_embeddings`) of at most 16384 positions, where every step
            attending over all the slots still costs less than the launches it saves. A step that asks for more
            than the new token's logits (hidden states, other options) and a model with forward hooks (which a graph
            replay would not run) take the eager path. False runs every step eagerly on the cache's own tensors.
            `"always"` also takes the static-buffer step off CUDA (and at any context length), run eagerly there (no
            graph): it exercises the captured step's code on a machine without a GPU (the tests use it) and keeps the
            decode state in buffers allocated once for `max_position_embeddings` positions; on CPU it is usually no
            faster, as every step attends over all slots.
    """

    model_type = "llamathink"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 576,
        intermediate_size: int = 1536,
        num_hidden_layers: int = 16,
        num_attention_heads: int = 9,
        num_key_value_heads: int = 3,
        head_dim: int = 64,
        max_position_embeddings: int = 1024,
        rope_theta: float = _UNSET,
        partial_rotary_factor: float = _UNSET,
        rms_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        zero_init_residual: bool | None = None,
        rescale_prenorm_residual: bool = False,
        A_init_range: list[float] | tuple[float, float] = (0.01, 16.0),
        dt_init_range: list[float] | tuple[float, float] | None = None,
        tie_word_embeddings: bool = True,
        mixer_types: list[str] | tuple[str, ...] | None = None,
        linear_num_key_heads: int = 9,
        linear_num_value_heads: int = 9,
        linear_key_head_dim: int = 112,
        linear_value_head_dim: int = 112,
        linear_conv_kernel_dim: int = 4,
        csa_stride: int = 4,
        csa_window: int = 512,
        csa_blend_bias: float | None = -4.0,
        hyper_connections: bool = True,
        gdn_chunk_size: int = 64,
        gdn_backend: str = "auto",
        decode_cuda_graphs: bool | str = True,
        use_cache: bool = True,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        pad_token_id: int | None = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta, self.partial_rotary_factor = _plain_rope(
            rope_theta, partial_rotary_factor, kwargs.pop("rope_parameters", None), kwargs.pop("rope_scaling", None)
        )
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.rescale_prenorm_residual = rescale_prenorm_residual
        self.zero_init_residual = zero_init_residual  # None: see `residual_starts_at_zero`
        # lists as JSON keeps them; anything else is kept as given for `validate_llamathink` to name
        self.A_init_range = list(A_init_range) if isinstance(A_init_range, (list, tuple)) else A_init_range
        self.dt_init_range = list(dt_init_range) if isinstance(dt_init_range, (list, tuple)) else dt_init_range
        if mixer_types is None:
            _check_positive_int("num_hidden_layers", num_hidden_layers)
            _check_max_size("num_hidden_layers", num_hidden_layers)  # before a default pattern of its length is made
            if num_hidden_layers % len(DEFAULT_MIXER_PATTERN) != 0:
                raise ValueError(
                    f"mixer_types is not given and num_hidden_layers={num_hidden_layers} is not a multiple of "
                    f"{len(DEFAULT_MIXER_PATTERN)}, the length of the default pattern {list(DEFAULT_MIXER_PATTERN)}; "
                    "pass mixer_types explicitly"
                )
            mixer_types = list(DEFAULT_MIXER_PATTERN) * (num_hidden_layers // len(DEFAULT_MIXER_PATTERN))
        self.mixer_types = list(mixer_types) if isinstance(mixer_types, (list, tuple)) else mixer_types
        self.linear_num_key_heads = linear_num_key_heads
        self.linear_num_value_heads = linear_num_value_heads
        self.linear_key_head_dim = linear_key_head_dim
        self.linear_value_head_dim = linear_value_head_dim
        self.linear_conv_kernel_dim = linear_conv_kernel_dim
        self.csa_stride = csa_stride
        self.csa_window = csa_window
        self.csa_blend_bias = csa_blend_bias
        self.hyper_connections = hyper_connections
        self.gdn_chunk_size = gdn_chunk_size
        self.gdn_backend = gdn_backend
        self.decode_cuda_graphs = decode_cuda_graphs
        self.use_cache = use_cache
        # transformers' own validators (run by `super().__init__`) compare token ids with the vocabulary size and
        # would fail on a wrong type with an error that does not name it
        _check_positive_int("vocab_size", vocab_size)
        if (
            kwargs.get("layer_types") is not None
        ):  # (it would be stored and ignored: the model is built from mixer_types)
            raise ValueError(
                "layer_types is not a LlamaThink setting: the layer pattern is mixer_types, each of 'linear' (Gated "
                "DeltaNet, Qwen3.5's 'linear_attention'), 'csa' (compressed sparse attention) or 'full' (Qwen3.5's "
                "'full_attention')"
            )
        kwargs.pop("layer_types", None)
        for key in ("dtype", "torch_dtype"):  # transformers would look the name up in torch and raise AttributeError
            _check_dtype(key, kwargs.get(key))
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        # transformers 5.x reads `tie_word_embeddings` from the config; older versions from kwargs. Set it on both.
        self.tie_word_embeddings = tie_word_embeddings
        self.validate_llamathink()

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        """`PretrainedConfig.from_dict` (the path of `from_pretrained` and `AutoConfig`), reading a config saved
        before `csa_blend_bias` existed, or with a RoPE dict it never applied, as the model it describes (see
        `_saved_config`). Keyword overrides (`from_pretrained(path, gdn_chunk_size=...)`) are set after `__init__`
        has checked the file's values, so the result is checked again (ValueError naming the field);
        `rope_parameters` / `rope_scaling` overrides, which transformers would drop unseen, are read as `__init__`
        reads them (their `rope_theta` / `partial_rotary_factor` override the file's; any scaling is refused)."""
        rope = {k: kwargs.pop(k) for k in ("rope_parameters", "rope_scaling") if k in kwargs}
        loaded = super().from_dict(_saved_config(config_dict), **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        if rope:
            given = [kwargs.get(k, _UNSET) for k in ("rope_theta", "partial_rotary_factor")]
            theta, factor = _plain_rope(*given, rope.get("rope_parameters"), rope.get("rope_scaling"))
            named = {k for d in rope.values() if isinstance(d, dict) for k in d}
            config.rope_theta = theta if "rope_theta" in named else config.rope_theta
            config.partial_rotary_factor = factor if "partial_rotary_factor" in named else config.partial_rotary_factor
        config.validate_llamathink()
        return loaded

    @classmethod
    def _dict_from_json_file(cls, json_file):
        """The same for `from_json_file`, which builds the config from the file's dict without `from_dict`. Raises
        OSError naming the file where it is no JSON that Python can read: transformers names a syntax error, but a
        number past Python's 4300 digits or nesting past the recursion limit would come from deep inside it."""
        try:
            config_dict = super()._dict_from_json_file(json_file)
        except (ValueError, RecursionError) as err:  # (JSONDecodeError and UnicodeDecodeError are ValueErrors)
            raise OSError(f"the config file {json_file} cannot be read as JSON ({type(err).__name__}: {err})") from None
        return _saved_config(config_dict)

    def validate_llamathink(self):
        """Raise `ValueError` naming the field when the configuration cannot describe a working model. NumPy
        numbers (a value computed with numpy, or read from an array) are taken as the Python numbers they hold,
        in lists too, so that they pass the checks below and save to config.json."""
        for name, value in list(vars(self).items()):
            plain = _plain_number(value)
            if plain is not value:
                setattr(self, name, plain)
        positive_ints = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
            "linear_num_key_heads",
            "linear_num_value_heads",
            "linear_key_head_dim",
            "linear_value_head_dim",
            "linear_conv_kernel_dim",
            "csa_stride",
            "csa_window",
            "gdn_chunk_size",
        )
        for name in positive_ints:
            _check_positive_int(name, getattr(self, name))
        # (a dict set on the config after it was built)
        _plain_rope(
            self.rope_theta,
            self.partial_rotary_factor,
            getattr(self, "rope_parameters", None),
            getattr(self, "rope_scaling", None),
        )
        for name in ("rope_theta", "rms_norm_eps", "initializer_range"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"{name} must be a finite positive number, got {value!r}")
        # the C runner's ranges (export_c's FLOAT_FIELDS): a model the config takes is one it exports
        if self.rope_theta >= MAX_ROPE_THETA:
            raise ValueError(f"rope_theta={self.rope_theta!r} is past the {MAX_ROPE_THETA:g} this model supports")
        if self.rms_norm_eps >= 1:
            raise ValueError(
                f"rms_norm_eps must be below 1 (a small number added to the mean square), got {self.rms_norm_eps!r}"
            )
        if not isinstance(self.mixer_types, list):  # (a config error, ValueError like every other here)
            raise ValueError(  # noqa: TRY004
                f"mixer_types must be a list of mixer names, one per layer, got {self.mixer_types!r}"
            )
        if len(self.mixer_types) != self.num_hidden_layers:
            raise ValueError(
                f"mixer_types has {len(self.mixer_types)} entries but num_hidden_layers={self.num_hidden_layers}; "
                "give one mixer type per layer"
            )
        for i, mixer in enumerate(self.mixer_types):
            if mixer not in MIXER_TYPES:
                raise ValueError(f"mixer_types[{i}]={mixer!r} is not one of the allowed values {list(MIXER_TYPES)}")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be divisible by "
                f"num_key_value_heads={self.num_key_value_heads} (grouped-query attention)"
            )
        if self.linear_num_value_heads % self.linear_num_key_heads != 0:
            raise ValueError(
                f"linear_num_value_heads={self.linear_num_value_heads} must be divisible by "
                f"linear_num_key_heads={self.linear_num_key_heads}"
            )
        factor = self.partial_rotary_factor
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0.0 < factor <= 1.0:
            raise ValueError(f"partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor!r}")
        rotary_dim = int(self.head_dim * self.partial_rotary_factor)
        if rotary_dim < 2 or rotary_dim % 2 != 0:
            raise ValueError(
                f"head_dim * partial_rotary_factor = {self.head_dim} * {self.partial_rotary_factor} must give an even "
                f"number of rotary dims >= 2, got {rotary_dim}"
            )
        if self.csa_window < 2:
            raise ValueError(
                f"csa_window must be at least 2 (the query's own token and one more), got {self.csa_window}"
            )
        # spans of tokens: past the context they only cost memory (buffers and padding of their length in every
        # forward), so an absurd value would fail deep inside the first forward rather than here
        if self.max_position_embeddings > MAX_CONTEXT:
            raise ValueError(
                f"max_position_embeddings={self.max_position_embeddings} is past the {MAX_CONTEXT:,} positions this "
                "model (and the C runner) supports"
            )
        for name in MAX_SIZES:  # (a typo of a few digits would allocate terabytes in the first layer)
            _check_max_size(name, getattr(self, name))
        widths = {
            "the attention query width num_attention_heads * head_dim": self.num_attention_heads * self.head_dim,
            "the Gated DeltaNet conv width 2 * linear_num_key_heads * linear_key_head_dim + linear_num_value_heads * "
            "linear_value_head_dim": 2 * self.linear_num_key_heads * self.linear_key_head_dim
            + self.linear_num_value_heads * self.linear_value_head_dim,
        }
        for what, width in widths.items():
            if width > MAX_WIDTH:
                raise ValueError(f"{what} is {width:,}, past the {MAX_WIDTH:,} this model (and the C runner) supports")
        # (a csa_window past the context is allowed, as a smaller context with the default window is common: the
        # layers use min(csa_window, max_position_embeddings), which sees the same tokens)
        if self.csa_stride > self.max_position_embeddings:
            raise ValueError(
                f"csa_stride={self.csa_stride} is longer than the context (max_position_embeddings="
                f"{self.max_position_embeddings}): give at most that (a compressed block longer than the context is "
                "never complete)"
            )
        if self.linear_conv_kernel_dim > self.max_position_embeddings:
            raise ValueError(
                f"linear_conv_kernel_dim={self.linear_conv_kernel_dim} is longer than the context "
                f"(max_position_embeddings={self.max_position_embeddings}): give at most that (taps past the context "
                "only ever meet padding)"
            )
        if self.gdn_chunk_size > MAX_GDN_CHUNK:
            raise ValueError(
                f"gdn_chunk_size={self.gdn_chunk_size} is past {MAX_GDN_CHUNK}: the chunked delta rule keeps "
                "[chunk, chunk] matrices per chunk and head, so longer chunks only cost memory (fla uses 64)"
            )
        bias = self.csa_blend_bias
        if bias is not None and (isinstance(bias, bool) or not isinstance(bias, (int, float)) or not abs(bias) < 1e4):
            raise ValueError(
                f"csa_blend_bias must be null or a finite number (the gate's starting logit), got {bias!r}"
            )
        if self.gdn_backend not in GDN_BACKENDS:
            raise ValueError(f"gdn_backend={self.gdn_backend!r} is not one of the allowed values {list(GDN_BACKENDS)}")
        if not (isinstance(self.decode_cuda_graphs, bool) or self.decode_cuda_graphs == "always"):
            raise ValueError(f'decode_cuda_graphs must be true, false or "always", got {self.decode_cuda_graphs!r}')
        if getattr(self, "output_attentions", False):  # (transformers' models return them where it is true)
            raise ValueError(
                "output_attentions=true is not supported: LlamaThink's linear and compressed mixers have no attention "
                "matrix; set it to false"
            )
        for name in ("hyper_connections", "rescale_prenorm_residual", "tie_word_embeddings", "use_cache"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.zero_init_residual is not None and not isinstance(self.zero_init_residual, bool):
            raise ValueError(f"zero_init_residual must be true, false or null, got {self.zero_init_residual!r}")
        if self.zero_init_residual and self.rescale_prenorm_residual:
            raise ValueError(
                "zero_init_residual=true starts the residual output projections at zero, and rescale_prenorm_residual="
                "true scales their normal start: give one (set zero_init_residual to false for the GPT-2 scaling)"
            )
        for name in ("A_init_range", "dt_init_range"):
            value = getattr(self, name)
            if value is None and name == "dt_init_range":
                continue
            numbers = (
                isinstance(value, list)
                and len(value) == 2
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            )
            # The layers draw and keep these in float32 (log(A), the inverse softplus of dt): beyond these bounds
            # the start is -inf or inf, or the draw fails.
            if not numbers or not INIT_RANGE_MIN <= value[0] <= value[1] <= INIT_RANGE_MAX:
                raise ValueError(
                    f"{name} must be two numbers [low, high] with {INIT_RANGE_MIN:.4g} <= low <= high <= "
                    f"{INIT_RANGE_MAX:.4g} (what float32 keeps finite in the layers' log-decays), got {value!r}"
                )
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name, None)
            ids = value if isinstance(value, (list, tuple)) else [value]
            # generation stops at any of several eos ids; it takes one bos and one pad id
            allowed = (
                "a token id (an integer), a list of them or null"
                if name == "eos_token_id"
                else "a token id (an integer) or null"
            )
            if isinstance(value, (list, tuple)) and (name != "eos_token_id" or not value or None in value):
                raise ValueError(f"{name} must be {allowed}, got {value!r}")
            if isinstance(value, (list, tuple)) and len(value) > MAX_EOS_IDS:
                raise ValueError(f"{name} has {len(value)} ids; at most {MAX_EOS_IDS} are supported (the C runner's)")
            for token_id in ids:
                if token_id is not None and (isinstance(token_id, bool) or not isinstance(token_id, int)):
                    raise ValueError(f"{name} must be {allowed}, got {value!r}")
                if token_id is not None and not 0 <= token_id < self.vocab_size:
                    raise ValueError(f"{name}={value!r} is outside the vocabulary [0, {self.vocab_size})")

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """transformers' `save_pretrained`, refusing (ValueError naming the field) a configuration edited since it
        was built into one that cannot describe a working model: such a file would not load again."""
        self.validate_llamathink()
        return super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

    @property
    def residual_starts_at_zero(self) -> bool:
        """Whether a fresh model's residual output projections start at zero: `zero_init_residual`, or when that is
        `None`, unless `rescale_prenorm_residual` asks for the GPT-2 start (so a config written before the field,
        or one that sets only that, keeps meaning what it said)."""
        if self.zero_init_residual is None:
            return not self.rescale_prenorm_residual
        return self.zero_init_residual

    @property
    def rotary_dim(self) -> int:
        """The head dims RoPE rotates, `int(head_dim * partial_rotary_factor)` (the first ones of each head)."""
        return int(self.head_dim * self.partial_rotary_factor)


def _check_dtype(name: str, value) -> None:
    """`value` (a config's `dtype` or `torch_dtype`) is None, a torch dtype or its attribute name in torch
    ("bfloat16", as transformers looks it up); else ValueError naming `name` and the value."""
    import torch

    if value is None or isinstance(value, torch.dtype):
        return
    if isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype):
        return
    raise ValueError(f"{name} must be a torch dtype name such as 'bfloat16', 'float16' or 'float32', got {value!r}")


def _plain_number(value):
    """`value` with NumPy scalars (`np.int64`, `np.float32`, `np.bool_`) replaced by the Python numbers they hold,
    in lists and tuples too; `value` itself where there is none."""
    if isinstance(value, (list, tuple)):
        items = [_plain_number(v) for v in value]
        return value if all(a is b for a, b in zip(items, value)) else type(value)(items)
    if type(value).__module__ == "numpy" and hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return value.item()
    return value


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


__all__ = ["LlamaThinkConfig"]
