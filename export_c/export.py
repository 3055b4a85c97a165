"""Export a LlamaThink checkpoint (config.json + *.safetensors) to the binary read by run.c.

Usage:
    python -m export_c.export <model_dir_or_hub_id> <out.bin> [--dtype fp32|bf16|int8]
                              [--group-size auto|N] [--tokenizer-out tokenizer.bin]
                              [--tokenizer-src DIR] [--chat-marker KEY=VALUE ...]
                              [--no-chat-markers]
                              [--tokenizer-sentencepiece | --tokenizer-transformers-rules]

The checkpoint is read tensor by tensor by NAME with the safetensors library; no PyTorch model
is built.  Every tensor in the checkpoint must be used and every expected tensor must exist
(anything else is an error naming the tensors).  The format is described in export_c/README.md
and mirrored by model_init() in run.c.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import struct
import sys
import tempfile

import numpy as np

MAGIC = 0x4B48544C  # b"LTHK" little-endian
VERSION = 3  # newest format (run.c LT_VERSION); each version written only when a model needs it
VERSION_MIN = 1  # run.c LT_VERSION_MIN: one EOS id, no list
EOS_OFFSET = 144  # version >= 2: i32 count, then MAX_EOS i32 ids (run.c LT_EOS_OFFSET)
FLAGS_OFFSET = 212  # version 3: u32 flags (run.c model_init)
FLAG_CSA_BLEND_BIAS = 1  # CSA layers carry blend_proj.bias (config csa_blend_bias set; run.c LT_FLAG_CSA_BLEND_BIAS)
MAX_EOS = 16
HEADER_SIZE = 1024
ALIGN = 64
TYPES_OFFSET = 256
MAX_LAYERS = 512
DTYPES = {"fp32": 0, "bf16": 1, "int8": 2}
MIXER_CODES = {"linear": 0, "csa": 1, "full": 2}
GROUP_CANDIDATES = (64, 48, 32, 16)

DEFAULTS = dict(
    vocab_size=32000,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=16,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    max_position_embeddings=1024,
    rope_theta=20000.0,
    partial_rotary_factor=0.5,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    mixer_types=["linear", "linear", "csa", "full"] * 4,
    linear_num_key_heads=9,
    linear_num_value_heads=9,
    linear_key_head_dim=112,
    linear_value_head_dim=112,
    linear_conv_kernel_dim=4,
    csa_stride=4,
    csa_window=512,
    csa_blend_bias=-4.0,  # a saved config.json without it predates the field: no bias (load_config)
    hyper_connections=True,
)


# config fields written as int32 header fields
INT_FIELDS = (
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
)


# The ranges run.c's model_init accepts (its CHECK_RANGE lines; tests/test_export_c.py compares the two): a config
# outside them would give a file the runner refuses. num_key_value_heads: at most num_attention_heads.
INT_RANGES = {
    "vocab_size": (1, 1 << 22),
    "hidden_size": (1, 1 << 16),
    "intermediate_size": (1, 1 << 18),
    "num_hidden_layers": (1, MAX_LAYERS),
    "num_attention_heads": (1, 4096),
    "num_key_value_heads": (1, 4096),
    "head_dim": (1, 4096),
    "max_position_embeddings": (1, 1 << 20),
    "linear_num_key_heads": (1, 4096),
    "linear_num_value_heads": (1, 4096),
    "linear_key_head_dim": (1, 4096),
    "linear_value_head_dim": (1, 4096),
    "linear_conv_kernel_dim": (1, 64),
    "csa_stride": (1, 1 << 16),
    "csa_window": (1, 1 << 20),
}
WIDTH_LIMIT = 1 << 20  # run.c's "linear width" and "query width"


# config fields written as float64 header fields, with the ranges run.c accepts (partial_rotary_factor 0: no
# rotary dimensions)
FLOAT_FIELDS = {
    "rope_theta": (lambda v: 0 < v < 1e12, "in (0, 1e12)"),
    "partial_rotary_factor": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "rms_norm_eps": (lambda v: 0 < v < 1, "in (0, 1)"),
}


# safetensors' names of the dtypes weights may be stored in (also in llamathink.train.checkpoint: this module runs
# without the package)
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


class ExportError(Exception):
    """A checkpoint, option or output the exporter refuses; the message names the file or value and why."""


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------
def check_output(path: str, magic: int, what: str) -> None:
    """Refuse (ExportError) to write a `what` file at `path` over anything but an earlier file of the same kind
    (`magic`, its first four bytes) or an empty file: a wrong argument must not replace a trained model's
    weights, config or tokenizer, or any other file, with an export."""
    if os.path.isdir(path):
        raise ExportError(f"{path} is a folder; give the path of the {what} file to write")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ExportError(f"cannot write the {what} file {path}: no such folder {folder}")
    if os.path.exists(path) and not os.path.isfile(path):  # a device such as /dev/null: it would be renamed over
        raise ExportError(f"{path} is not a regular file; give the path of the {what} file to write")
    if os.path.exists(path) and os.path.getsize(path) > 0:
        with open(path, "rb") as f:
            head = f.read(4)
        if len(head) < 4 or struct.unpack("<I", head)[0] != magic:
            raise ExportError(
                f"{path} exists and is not a {what} written by this exporter; refusing to overwrite it "
                "(choose another path, or remove the file)"
            )


def resolve_source(src: str) -> str:
    """A local directory, or a Hugging Face hub id downloaded with huggingface_hub. Raises ExportError for a file,
    for a path that names no folder (one that cannot be a Hub id, "name" or "namespace/name", or whose first part
    is a local folder: a mistyped local path is never looked up on the Hub), and for a failed download."""
    if os.path.isdir(src):
        return src
    if os.path.exists(src):
        raise ExportError(f"{src} is a file; pass the saved model's folder (save_pretrained's, e.g. <out_dir>/final)")
    parts = src.split("/")
    if src.startswith((".", "/", "~")) or os.sep in src.replace("/", "") or len(parts) > 2 or not all(parts):
        raise ExportError(f"no such folder: {src}")
    if len(parts) == 2 and os.path.isdir(parts[0]):
        raise ExportError(f"no such folder: {src} ({parts[0]}/ is a local folder, so it is not taken as a Hub id)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover
        raise ExportError(f"{src} is not a directory and huggingface_hub is unavailable") from e
    try:
        return snapshot_download(src, allow_patterns=["*.json", "*.safetensors", "tokenizer.model"])
    except Exception as e:  # offline, no such repo, no access
        raise ExportError(
            f"{src} is not a local folder, and downloading it from the Hugging Face Hub failed: {type(e).__name__}: {e}"
        ) from e


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_beside(path: str, write) -> str:
    """Call `write(f)` on a new temporary file in `path`'s folder and return the file's name, for the caller to
    rename over `path` (`os.replace`) once everything it writes has been written. The file is created anew (never
    an existing file, nor a link's target) with the permissions a new file gets; it is removed again if `write`
    raises. An OSError of a write that names no file (a full disk) is raised as an ExportError naming `path`."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=f".{os.path.basename(path)}.")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
    except BaseException as e:  # no half-written file left behind
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and e.filename is None:
            raise ExportError(f"cannot write {path}: {e.strerror or e}") from e
        raise
    return tmp


# (also in llamathink.train.checkpoint: this module runs without the package)
ADAPTER_HINT = "load it on its base model with peft, then save_pretrained the model that merge_and_unload() returns"


def _rope_from_dicts(raw: dict, cfg: dict, path: str) -> None:
    """transformers' `rope_parameters` / `rope_scaling` as LlamaThinkConfig reads them: a default-RoPE dict gives
    `rope_theta` / `partial_rotary_factor` where config.json has no such field; a dict with RoPE scaling (or a value
    that disagrees with the field) is one the model never applied: a saved config (it records transformers_version)
    exports its plain RoPE with a note, as it loads; any other config is refused, as LlamaThinkConfig refuses it."""
    for name in ("rope_parameters", "rope_scaling"):
        value = raw.get(name)
        if not value:
            continue
        plain = isinstance(value, dict) and value.get("rope_type", value.get("type", "default")) == "default"
        plain = plain and set(value) <= {"rope_type", "type", "rope_theta", "partial_rotary_factor"}
        fields = ("rope_theta", "partial_rotary_factor")
        agree = plain and all(raw.get(k) in (None, value[k]) for k in fields if k in value)
        if agree:
            cfg.update({k: value[k] for k in fields if k in value and raw.get(k) is None})
        elif "transformers_version" in raw:
            print(
                f"note: {path}: {name}={value!r} was never applied by the model; exported with its plain RoPE "
                f"(rope_theta={cfg['rope_theta']})",
                file=sys.stderr,
            )
        else:
            raise ExportError(f"{path}: {name}={value!r}: LlamaThink has the default RoPE only, no RoPE scaling")


def load_config(d: str) -> dict:
    """The model settings run.c needs from `d`/config.json: `DEFAULTS` updated with the file's values (RoPE read
    from its rope dicts too). Raises ExportError for a missing, unreadable or non-LlamaThink config (a PEFT adapter
    folder is named as one) and for values run.c cannot run."""
    path = os.path.join(d, "config.json")
    if os.path.islink(path) and not os.path.exists(path):
        raise ExportError(f"{path} is a symbolic link that leads nowhere (a loop, or a target that is gone)")
    if os.path.isdir(path):
        raise ExportError(f"{path} is a folder, not a config file")
    if not os.path.exists(path):
        if os.path.exists(os.path.join(d, "adapter_config.json")):
            raise ExportError(f"{d} is a PEFT adapter (adapter_config.json), not a whole model: {ADAPTER_HINT}")
        if os.path.exists(os.path.join(d, "state.pt")):  # (as llamathink's loaders name it)
            raise ExportError(
                f"{d} is a training checkpoint (it holds state.pt), not a saved model: export the run's final folder "
                "(<out_dir>/final)"
            )
        if os.path.isdir(os.path.join(d, "final")) or os.path.isdir(os.path.join(d, "checkpoints")):
            raise ExportError(f"{d} is a training run's folder, not a saved model: export {os.path.join(d, 'final')}")
        raise ExportError(f"no config.json in {d}")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, >4300 digits, too deep
        raise ExportError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ExportError(f"{path} holds a JSON {type(raw).__name__}, not a config object")
    if raw.get("model_type", "llamathink") != "llamathink":  # (another architecture's fields would be misread)
        raise ExportError(
            f"{path} is a {raw['model_type']!r} model's config, not a LlamaThink one (model_type 'llamathink'): run.c "
            "runs LlamaThink models only"
        )
    cfg = dict(DEFAULTS)
    cfg.update({k: v for k, v in raw.items() if k in DEFAULTS and v is not None})
    _rope_from_dicts(raw, cfg, path)
    # null is the seed's bias-free gate, and so is a saved config without the key (it records transformers_version:
    # written before the field existed; LlamaThinkConfig reads it the same way). Only its presence matters here:
    # the bias values are tensors
    missing = None if "transformers_version" in raw else DEFAULTS["csa_blend_bias"]
    cfg["csa_blend_bias"] = bias = raw.get("csa_blend_bias", missing)
    if bias is not None and (isinstance(bias, bool) or not isinstance(bias, (int, float))):
        raise ExportError(f"config field csa_blend_bias must be null or a number, got {bias!r}")
    if raw.get("head_dim") is None and _is_int(raw.get("hidden_size")) and _is_int(raw.get("num_attention_heads")):
        cfg["head_dim"] = raw["hidden_size"] // max(raw["num_attention_heads"], 1)
    for k in INT_FIELDS:  # first: the checks below compute with them
        v = cfg[k]
        if not _is_int(v):
            raise ExportError(f"config field {k} must be an integer, got {v!r}")
        low, high = INT_RANGES[k]
        if k == "num_key_value_heads":
            high = min(high, cfg["num_attention_heads"])
        if not low <= v <= high:
            raise ExportError(f"config field {k}={v} is outside [{low}, {high}], what run.c accepts")
    for k in ("tie_word_embeddings", "hyper_connections"):
        if not isinstance(cfg[k], bool):
            raise ExportError(f"config field {k} must be true or false, got {cfg[k]!r}")
    types = cfg["mixer_types"]
    if not isinstance(types, list) or not all(isinstance(t, str) for t in types):
        raise ExportError(f"config field mixer_types must be a list of mixer names, one per layer, got {types!r}")
    if len(types) != cfg["num_hidden_layers"]:
        raise ExportError(f"mixer_types has {len(types)} entries for {cfg['num_hidden_layers']} layers")
    bad = [t for t in types if t not in MIXER_CODES]
    if bad:
        raise ExportError(f"unknown mixer types {bad}")
    if cfg["num_attention_heads"] % cfg["num_key_value_heads"]:
        raise ExportError("num_attention_heads must be a multiple of num_key_value_heads")
    if cfg["linear_num_value_heads"] % cfg["linear_num_key_heads"]:
        raise ExportError("linear_num_value_heads must be a multiple of linear_num_key_heads")
    for k, (in_range, text) in FLOAT_FIELDS.items():  # NaN, a string or a bool would give an unusable file
        v = cfg[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not in_range(v):
            raise ExportError(f"config field {k} must be a finite number {text}, got {v!r}")
    bos = cfg["bos_token_id"]
    if bos is not None and (not _is_int(bos) or not 0 <= bos < cfg["vocab_size"]):
        raise ExportError(f"bos_token_id must be one token id in [0, {cfg['vocab_size']}) or null, got {bos!r}")
    widths = derived(cfg)
    if widths["R"] % 2:
        raise ExportError(
            f"head_dim * partial_rotary_factor gives {widths['R']} rotary dims; it must be even (pairs are rotated)"
        )
    for name, key in (("linear width", "C"), ("query width", "QD")):
        if widths[key] > WIDTH_LIMIT:
            raise ExportError(f"the model's {name} {widths[key]} is past {WIDTH_LIMIT}, what run.c accepts")
    eos_ids(cfg)  # validates the EOS id(s) now, before any tensor is read
    return cfg


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def eos_ids(cfg: dict) -> list[int]:
    """Every EOS id of the config as a list: ``eos_token_id`` may be null, one id or a list of ids
    (as in Llama 3 checkpoints; generation stops at any of them).  Raises ExportError for a value
    that is not an id inside the vocabulary or for more than MAX_EOS ids."""
    raw = cfg["eos_token_id"]
    ids = [] if raw is None else list(raw) if isinstance(raw, (list, tuple)) else [raw]
    out: list[int] = []
    for i in ids:
        if not _is_int(i) or not 0 <= i < cfg["vocab_size"]:
            raise ExportError(f"eos_token_id {raw!r}: {i!r} is not a token id in [0, {cfg['vocab_size']})")
        if i not in out:
            out.append(i)
    if len(out) > MAX_EOS:
        raise ExportError(f"eos_token_id has {len(out)} ids; the format holds at most {MAX_EOS}")
    return out


def _safetensor_files(d: str) -> list[str]:
    """The weights files of checkpoint folder `d`, those transformers loads: the ones its
    `model.safetensors.index.json` maps tensors to, else `model.safetensors` (other `*.safetensors` beside it, a
    PEFT adapter saved in the same folder say, are left out with a note), else every `*.safetensors` there. Raises
    ExportError naming an index that is not JSON, has no `weight_map` of tensor names to file names in `d`, or no
    weights files at all."""
    idx = os.path.join(d, "model.safetensors.index.json")
    if os.path.exists(idx):
        try:
            with open(idx, encoding="utf-8") as f:
                wm = json.load(f)
        except (OSError, ValueError, RecursionError) as e:  # unreadable, not UTF-8, not JSON, nested too deeply
            raise ExportError(f"{idx} cannot be read as JSON: {e}") from e
        wm = wm.get("weight_map") if isinstance(wm, dict) else None
        if not isinstance(wm, dict) or not wm or not all(isinstance(v, str) for v in wm.values()):
            raise ExportError(f"{idx} has no weight_map of tensor names to weights files")
        bad = sorted({v for v in wm.values() if os.path.basename(v) != v or not v.endswith(".safetensors")})
        if bad:
            raise ExportError(f"{idx} maps tensors to {bad[0]!r}, which is not a .safetensors file of {d}")
        if "model.safetensors" not in wm.values() and os.path.isfile(os.path.join(d, "model.safetensors")):
            # transformers loads the single file, this exporter the index's shards: the C model would not be the one
            # PyTorch runs
            raise ExportError(
                f"{d} holds both model.safetensors and model.safetensors.index.json (sharded weights): one of them "
                "is left from an earlier save, and transformers would load the other; remove the stale one"
            )
        return sorted({os.path.join(d, v) for v in wm.values()})
    files = sorted(glob.glob(os.path.join(d, "*.safetensors")))
    single = os.path.join(d, "model.safetensors")
    if os.path.isfile(single):
        others = [os.path.basename(f) for f in files if f != single]
        if others:
            print(
                f"note: {d}: exporting model.safetensors, the weights transformers loads; {', '.join(others)} "
                "beside it left out",
                file=sys.stderr,
            )
        return [single]
    if not files:
        raise ExportError(f"no *.safetensors in {d}")
    return files


def load_tensors(d: str) -> dict[str, np.ndarray]:
    """All tensors as float32 numpy arrays, by name (bf16 is converted exactly). Raises ExportError naming a
    weights file that cannot be read (truncated, corrupt header), a tensor in two shards, or one stored in a dtype
    that is not floating point."""
    from safetensors import SafetensorError, safe_open

    try:
        import torch  # noqa: F401

        framework = "pt"
    except ImportError:  # pragma: no cover
        framework = "numpy"
    out: dict[str, np.ndarray] = {}
    for fn in _safetensor_files(d):
        try:
            with safe_open(fn, framework=framework) as f:
                for name in f.keys():
                    if name in out:
                        raise ExportError(f"tensor {name} appears in more than one shard")
                    stored = f.get_slice(name).get_dtype()
                    if stored not in FLOAT_DTYPES:  # it would be cast to floats as it is
                        raise ExportError(f"tensor {name} is stored as {stored}; weights must be floating point")
                    t = f.get_tensor(name)
                    if framework == "pt":
                        t = t.float().numpy()
                    out[name] = np.ascontiguousarray(np.asarray(t, dtype=np.float32))
        except (SafetensorError, OSError) as e:  # truncated, corrupt header, unreadable
            raise ExportError(f"{fn} cannot be read as safetensors ({e}); is it truncated or corrupt?") from None
    return out


# ---------------------------------------------------------------------------------------------
# layout (must match model_init() in run.c)
# ---------------------------------------------------------------------------------------------
def derived(cfg: dict) -> dict:
    """Widths derived from a config: R rotary dims per head, C Gated DeltaNet conv channels (q|k|v), VD its value
    width, QD / KV the attention query / key-value widths."""
    D = cfg["head_dim"]
    return dict(
        R=int(D * cfg["partial_rotary_factor"]),
        C=2 * cfg["linear_num_key_heads"] * cfg["linear_key_head_dim"]
        + cfg["linear_num_value_heads"] * cfg["linear_value_head_dim"],
        VD=cfg["linear_num_value_heads"] * cfg["linear_value_head_dim"],
        QD=cfg["num_attention_heads"] * D,
        KV=cfg["num_key_value_heads"] * D,
    )


def layout(cfg: dict) -> list[tuple]:
    """List of (kind, [tensor names], rows, cols).  kind 'vec' is always fp32 (rows=numel,
    cols=None); kind 'mat' is a matmul weight in the file dtype, the named tensors concatenated
    along rows (row-wise fusion)."""
    H, I, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    d = derived(cfg)
    Hv, D = cfg["linear_num_value_heads"], cfg["head_dim"]
    K = cfg["linear_conv_kernel_dim"]
    out = [("mat", ["model.embed_tokens.weight"], V, H), ("vec", ["model.norm.weight"], H, None)]
    if not cfg["tie_word_embeddings"]:
        out.append(("mat", ["lm_head.weight"], V, H))
    for i, t in enumerate(cfg["mixer_types"]):
        p = f"model.layers.{i}."
        out += [
            ("vec", [p + "input_layernorm.weight"], H, None),
            ("vec", [p + "post_attention_layernorm.weight"], H, None),
        ]
        if cfg["hyper_connections"]:
            for n in ("mixer_residual_scale", "mixer_sublayer_scale", "mlp_residual_scale", "mlp_sublayer_scale"):
                out.append(("vec", [p + n], H, None))
        m = p + "mixer."
        if t == "linear":
            out += [
                (
                    "mat",
                    [m + "in_proj_qkv.weight", m + "in_proj_z.weight", m + "in_proj_b.weight", m + "in_proj_a.weight"],
                    d["C"] + d["VD"] + 2 * Hv,
                    H,
                ),
                ("vec", [m + "conv1d.weight"], d["C"] * K, None),
                ("vec", [m + "A_log"], Hv, None),
                ("vec", [m + "dt_bias"], Hv, None),
                ("vec", [m + "norm.weight"], cfg["linear_value_head_dim"], None),
                ("mat", [m + "out_proj.weight"], H, d["VD"]),
            ]
        else:
            names = [m + "q_proj.weight", m + "k_proj.weight", m + "v_proj.weight"]
            rows = 2 * d["QD"] + 2 * d["KV"]
            if t == "csa":
                names.append(m + "blend_proj.weight")
                rows += d["QD"]
            out += [
                ("mat", names, rows, H),
                ("vec", [m + "q_norm.weight"], D, None),
                ("vec", [m + "k_norm.weight"], D, None),
            ]
            if t == "csa" and cfg["csa_blend_bias"] is not None:
                out.append(("vec", [m + "blend_proj.bias"], d["QD"], None))
            if t == "csa":
                out += [
                    ("mat", [m + "compress_k.weight"], d["KV"], d["KV"]),
                    ("mat", [m + "compress_v.weight"], d["KV"], d["KV"]),
                ]
            out.append(("mat", [m + "o_proj.weight"], H, d["QD"]))
        out += [
            ("mat", [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"], 2 * I, H),
            ("mat", [p + "mlp.down_proj.weight"], H, I),
        ]
    return out


def expected_shapes(cfg: dict) -> dict[str, tuple]:
    """Every tensor a checkpoint of `cfg` must hold, by its transformers name -> its shape."""
    H, I, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    d = derived(cfg)
    Hv, D, K = cfg["linear_num_value_heads"], cfg["head_dim"], cfg["linear_conv_kernel_dim"]
    s = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    if not cfg["tie_word_embeddings"]:
        s["lm_head.weight"] = (V, H)
    for i, t in enumerate(cfg["mixer_types"]):
        p = f"model.layers.{i}."
        s[p + "input_layernorm.weight"] = (H,)
        s[p + "post_attention_layernorm.weight"] = (H,)
        if cfg["hyper_connections"]:
            for n in ("mixer_residual_scale", "mixer_sublayer_scale", "mlp_residual_scale", "mlp_sublayer_scale"):
                s[p + n] = (H,)
        s[p + "mlp.gate_proj.weight"] = (I, H)
        s[p + "mlp.up_proj.weight"] = (I, H)
        s[p + "mlp.down_proj.weight"] = (H, I)
        m = p + "mixer."
        if t == "linear":
            s.update(
                {
                    m + "in_proj_qkv.weight": (d["C"], H),
                    m + "in_proj_z.weight": (d["VD"], H),
                    m + "in_proj_b.weight": (Hv, H),
                    m + "in_proj_a.weight": (Hv, H),
                    m + "conv1d.weight": (d["C"], 1, K),
                    m + "A_log": (Hv,),
                    m + "dt_bias": (Hv,),
                    m + "norm.weight": (cfg["linear_value_head_dim"],),
                    m + "out_proj.weight": (H, d["VD"]),
                }
            )
        else:
            s.update(
                {
                    m + "q_proj.weight": (2 * d["QD"], H),
                    m + "k_proj.weight": (d["KV"], H),
                    m + "v_proj.weight": (d["KV"], H),
                    m + "o_proj.weight": (H, d["QD"]),
                    m + "q_norm.weight": (D,),
                    m + "k_norm.weight": (D,),
                }
            )
            if t == "csa":
                s.update(
                    {
                        m + "compress_k.weight": (d["KV"], d["KV"]),
                        m + "compress_v.weight": (d["KV"], d["KV"]),
                        m + "blend_proj.weight": (d["QD"], H),
                    }
                )
                if cfg["csa_blend_bias"] is not None:
                    s[m + "blend_proj.bias"] = (d["QD"],)
    return s


def check_tensors(cfg: dict, tensors: dict[str, np.ndarray]) -> None:
    """Raises ExportError naming every missing or unknown tensor and every shape that differs from
    `expected_shapes(cfg)` (a tied head saved as a copy of the embedding is allowed)."""
    exp = expected_shapes(cfg)
    missing = sorted(n for n in exp if n not in tensors)
    unknown = sorted(n for n in tensors if n not in exp)
    if cfg["tie_word_embeddings"] and "lm_head.weight" in unknown:
        if np.array_equal(tensors["lm_head.weight"], tensors.get("model.embed_tokens.weight")):
            unknown.remove("lm_head.weight")  # a tied copy saved explicitly: harmless
        else:
            raise ExportError("tie_word_embeddings is true but lm_head.weight differs from model.embed_tokens.weight")
    if missing or unknown:
        msg = []
        if missing:
            msg.append("missing tensors: " + ", ".join(missing))
        if unknown:
            msg.append("unknown tensors: " + ", ".join(unknown))
        raise ExportError("; ".join(msg))
    bad = [f"{n}: {tuple(tensors[n].shape)} != {shp}" for n, shp in exp.items() if tuple(tensors[n].shape) != shp]
    if bad:
        raise ExportError("shape mismatch: " + "; ".join(bad))


def matmul_cols(cfg: dict) -> list[int]:
    """The distinct row lengths (input widths) of the matrices run.c multiplies by, ascending."""
    return sorted({c for kind, _, _, c in layout(cfg) if kind == "mat"})


def pick_group_size(cfg: dict, requested: str | int = "auto") -> int:
    """The int8 quantisation group (values per scale): `requested`, checked, or with "auto" the largest of
    `GROUP_CANDIDATES` that divides every row length. Raises ExportError for a group that is not a positive multiple
    of 16 or does not divide some row length."""
    cols = matmul_cols(cfg)
    if requested != "auto":
        try:
            g = int(requested)
        except ValueError:
            raise ExportError(f"--group-size {requested!r} is not auto or a whole number") from None
        if g <= 0 or g % 16:
            raise ExportError(f"group size {g} must be a positive multiple of 16")
        bad = [c for c in cols if c % g]
        if bad:
            raise ExportError(f"group size {g} does not divide row lengths {bad}")
        return g
    for g in GROUP_CANDIDATES:
        if all(c % g == 0 for c in cols):
            return g
    raise ExportError(f"no int8 group size in {GROUP_CANDIDATES} divides every row length {cols}")


# ---------------------------------------------------------------------------------------------
# encoding
# ---------------------------------------------------------------------------------------------
def to_bf16_bits(w: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 with round-to-nearest-even (as torch does); returns uint16."""
    u = np.ascontiguousarray(w, dtype=np.float32).view(np.uint32).astype(np.uint64)
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    nan = np.isnan(w)
    out = r.astype(np.uint16)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def quantize_int8(w: np.ndarray, g: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-group int8: groups of g consecutive values inside a row."""
    rows, cols = w.shape
    wg = w.reshape(rows, cols // g, g).astype(np.float32)
    amax = np.abs(wg).max(axis=2)
    scale = (amax / 127.0).astype(np.float32)
    inv = np.where(scale > 0, 1.0 / np.where(scale > 0, scale, 1.0), 0.0).astype(np.float32)
    q = np.clip(np.rint(wg * inv[:, :, None]), -127, 127).astype(np.int8)
    return q.reshape(rows, cols), scale.reshape(-1)


def dequantize_int8(q: np.ndarray, scale: np.ndarray, g: int) -> np.ndarray:
    """The inverse of `quantize_int8`: q [rows, cols] int8 and scale [rows * cols / g] -> [rows, cols] float32."""
    rows, cols = q.shape
    return (q.reshape(rows, cols // g, g).astype(np.float32) * scale.reshape(rows, cols // g, 1)).reshape(rows, cols)


def mat_kc(dtype: str, cols: int, group: int) -> int:
    """Chunk length of the packed matrix layout (must match mat_kc() in run.c)."""
    if dtype == "int8":
        return group
    if dtype == "bf16" and cols % 32 == 0:
        return 32
    for kc in (16, 8):
        if cols % kc == 0:
            return kc
    return cols


def pack_blocks(a: np.ndarray, kc: int) -> np.ndarray:
    """Packed layout of a [rows, cols] matrix: blocks of 4 rows; inside a block, chunks of kc
    columns, the block's rows one after another inside each chunk (see README / pk_off)."""
    rows, cols = a.shape
    nb, nr = rows // 4, rows % 4
    parts = []
    if nb:
        parts.append(a[: nb * 4].reshape(nb, 4, cols // kc, kc).transpose(0, 2, 1, 3).reshape(-1))
    if nr:
        parts.append(a[nb * 4 :].reshape(1, nr, cols // kc, kc).transpose(0, 2, 1, 3).reshape(-1))
    return np.ascontiguousarray(np.concatenate(parts))


def header_bytes(cfg: dict, dtype: str, group: int, n_tensors: int, file_size: int) -> bytes:
    """The 1024-byte header (layout: export_c/README.md "File format").  The lowest version that
    holds the model, so files stay readable by older runners: 1; 2 when it has several EOS ids
    (the EOS list at EOS_OFFSET); 3 when its CSA layers have a blend bias (flags at FLAGS_OFFSET,
    the EOS list as in version 2)."""
    d = derived(cfg)
    eos = eos_ids(cfg)
    flags = FLAG_CSA_BLEND_BIAS if cfg["csa_blend_bias"] is not None and "csa" in cfg["mixer_types"] else 0
    version = 3 if flags else 2 if len(eos) > 1 else VERSION_MIN
    h = bytearray(HEADER_SIZE)
    struct.pack_into("<6I", h, 0, MAGIC, version, HEADER_SIZE, DTYPES[dtype], group, ALIGN)
    struct.pack_into("<Q", h, 24, file_size)
    ints = [
        cfg["vocab_size"],
        cfg["hidden_size"],
        cfg["intermediate_size"],
        cfg["num_hidden_layers"],
        cfg["num_attention_heads"],
        cfg["num_key_value_heads"],
        cfg["head_dim"],
        cfg["max_position_embeddings"],
        d["R"],
        cfg["linear_num_key_heads"],
        cfg["linear_num_value_heads"],
        cfg["linear_key_head_dim"],
        cfg["linear_value_head_dim"],
        cfg["linear_conv_kernel_dim"],
        cfg["csa_stride"],
        cfg["csa_window"],
        int(bool(cfg["hyper_connections"])),
        int(bool(cfg["tie_word_embeddings"])),
        -1 if cfg["bos_token_id"] is None else cfg["bos_token_id"],
        eos[0] if eos else -1,
    ]
    struct.pack_into("<20i", h, 32, *ints)
    if version >= 2:
        struct.pack_into(f"<{1 + len(eos)}i", h, EOS_OFFSET, len(eos), *eos)
    if version >= 3:
        struct.pack_into("<I", h, FLAGS_OFFSET, flags)
    struct.pack_into("<I", h, 112, n_tensors)
    struct.pack_into(
        "<3d", h, 120, float(cfg["rope_theta"]), float(cfg["partial_rotary_factor"]), float(cfg["rms_norm_eps"])
    )
    for i, t in enumerate(cfg["mixer_types"]):
        h[TYPES_OFFSET + i] = MIXER_CODES[t]
    return bytes(h)


def export(
    src: str,
    out_path: str,
    dtype: str = "fp32",
    group_size="auto",
    verbose=True,
    config: dict | None = None,
    commit: bool = True,
) -> dict:
    """Export checkpoint ``src`` (directory or hub id) to the run.c model file ``out_path`` (written to a new
    temporary file beside it and renamed, so a failure leaves no partial file and the earlier file as it was).
    ``config``: the source's ``load_config``, where the caller has read it already. ``commit`` False: leave the
    written file under its temporary name (``"tmp"`` in the result) for the caller to rename over ``out_path`` with
    ``os.replace`` (or remove), e.g. once the tokenizer exported with it is written too. Returns the config, int8
    group size, tensor count, file size in bytes and source directory. Raises ExportError for a config or tensors
    the format cannot hold (missing / misshapen tensors, out-of-range or non-finite fields, NaN / inf weights)."""
    if dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype}")
    check_output(out_path, MAGIC, "run.c model")
    d = resolve_source(src)
    cfg = load_config(d) if config is None else config
    tensors = load_tensors(d)
    check_tensors(cfg, tensors)
    for name, t in tensors.items():  # NaN / inf weights would make every logit NaN in run.c
        if not np.isfinite(t).all():
            raise ExportError(f"tensor {name} holds {int((~np.isfinite(t)).sum())} NaN or infinite values")
    group = pick_group_size(cfg, group_size) if dtype == "int8" else 0
    entries = layout(cfg)
    sizes = []
    tmp = write_beside(out_path, lambda f: sizes.append(_write_model(f, cfg, tensors, dtype, group, entries)))
    result = dict(config=cfg, group_size=group, n_tensors=len(entries), size=sizes[0], dir=d)
    if not commit:
        return {**result, "tmp": tmp}
    os.replace(tmp, out_path)
    if verbose:
        print(_written(out_path, dtype, result), file=sys.stderr)
    return result


def _written(out_path: str, dtype: str, result: dict) -> str:
    """What `export` says of a model file it wrote."""
    return f"wrote {out_path}: {dtype}, group {result['group_size']}, {result['n_tensors']} tensors, {result['size']} bytes"


def _write_model(f, cfg: dict, tensors: dict, dtype: str, group: int, entries: list) -> int:
    """Write the model file to the binary file object ``f``; returns its size in bytes."""
    f.write(b"\0" * HEADER_SIZE)

    def pad():
        f.write(b"\0" * (-f.tell() % ALIGN))

    for kind, names, rows, cols in entries:
        if kind == "vec":
            pad()
            f.write(tensors[names[0]].reshape(-1).astype("<f4").tobytes())
            continue
        w = np.concatenate([tensors[n].reshape(-1, cols) for n in names], axis=0)
        assert w.shape == (rows, cols), (names, w.shape, rows, cols)
        pad()
        kc = mat_kc(dtype, cols, group)
        if dtype == "fp32":
            f.write(pack_blocks(w.astype("<f4"), kc).tobytes())
        elif dtype == "bf16":
            f.write(pack_blocks(to_bf16_bits(w).astype("<u2"), kc).tobytes())
        else:
            q, s = quantize_int8(w, group)
            f.write(pack_blocks(q, kc).tobytes())
            pad()
            f.write(pack_blocks(s.reshape(rows, cols // group).astype("<f4"), 1).tobytes())
    size = f.tell()
    f.seek(0)
    f.write(header_bytes(cfg, dtype, group, len(entries), size))
    return size


def main(argv=None) -> int:
    """`llamathink-export-c`: the command line (the module docstring); returns the exit status: 0, or 1 after
    printing the error that stopped it (ExportError, TokenizerExportError, I/O)."""
    ap = argparse.ArgumentParser(prog="python -m export_c.export", description=__doc__.split("\n")[0])
    ap.add_argument("src", help="checkpoint directory (config.json + *.safetensors) or hub id")
    ap.add_argument("out", help="output model .bin")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument(
        "--group-size",
        default="auto",
        help=f"int8 group size (auto: largest of {GROUP_CANDIDATES} dividing every row length)",
    )
    ap.add_argument("--tokenizer-out", help="also write tokenizer.bin here")
    ap.add_argument("--tokenizer-src", help="tokenizer directory (default: the checkpoint dir)")
    ap.add_argument(
        "--chat-marker",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="chat-template marker stored in tokenizer.bin (repeatable; overrides one key of the default "
        "llamathink.chat_format.CHAT_MARKERS: system_prefix, system_suffix, user_prefix, user_suffix, "
        "assistant_prefix; assistant_suffix must stay empty)",
    )
    ap.add_argument(
        "--no-chat-markers",
        action="store_true",
        help="store no default chat markers in tokenizer.bin (only --chat-marker ones)",
    )
    rules = ap.add_mutually_exclusive_group()
    rules.add_argument(
        "--tokenizer-sentencepiece",
        dest="tokenizer_rules",
        action="store_const",
        const=True,
        help="tokenizer.model source: SentencePiece's own rules (the default for a .model file or a folder without "
        "a tokenizer_config.json naming LlamaTokenizer, as training read it; see export_c/README.md)",
    )
    rules.add_argument(
        "--tokenizer-transformers-rules",
        dest="tokenizer_rules",
        action="store_const",
        const=False,
        help="tokenizer.model source: transformers' LlamaTokenizer's rules (the default for a folder whose "
        "tokenizer_config.json names LlamaTokenizer)",
    )
    a = ap.parse_args(argv)
    tokenizer_only = [
        name
        for name, given in (
            ("--tokenizer-src", a.tokenizer_src),
            ("--chat-marker", a.chat_marker),
            ("--no-chat-markers", a.no_chat_markers),
            (
                {True: "--tokenizer-sentencepiece", False: "--tokenizer-transformers-rules"}.get(a.tokenizer_rules),
                a.tokenizer_rules is not None,
            ),
        )
        if given
    ]
    if tokenizer_only and not a.tokenizer_out:  # they would be ignored: say so rather than write a model alone
        verb = "apply" if len(tokenizer_only) > 1 else "applies"
        ap.error(f"{', '.join(tokenizer_only)} only {verb} to tokenizer.bin: add --tokenizer-out PATH")
    try:
        tokenizer = config = None
        if a.tokenizer_out:  # checked, and the tokenizer read, before anything is written
            from .tokenizer_export import TK_MAGIC, chat_markers, load_tokenizer, tokenizer_written, write_tokenizer

            if os.path.realpath(a.tokenizer_out) == os.path.realpath(a.out) or (
                os.path.exists(a.out) and os.path.exists(a.tokenizer_out) and os.path.samefile(a.out, a.tokenizer_out)
            ):
                raise ExportError(f"--tokenizer-out {a.tokenizer_out} is the model's output path too")
            check_output(a.tokenizer_out, TK_MAGIC, "run.c tokenizer")
            source = resolve_source(a.src)
            markers = chat_markers(a.chat_marker, not a.no_chat_markers, a.tokenizer_src or source)
            tokenizer = load_tokenizer(a.tokenizer_src or source, a.tokenizer_rules)
            config = load_config(source)  # read once: export() takes it
            vocab = config["vocab_size"]
            if len(tokenizer["pieces"]) > vocab:  # another model's tokenizer: run.c would refuse the pair
                raise ExportError(
                    f"the tokenizer of {a.tokenizer_src or source} has {len(tokenizer['pieces'])} pieces, more than "
                    f"the model's {vocab} token ids (vocab_size): it is not this model's tokenizer; give the one the "
                    "model was trained with (--tokenizer-src), nothing was written"
                )
        written = export(
            a.src if tokenizer is None else source, a.out, a.dtype, a.group_size, config=config, commit=False
        )
        tokenizer_tmp = None
        try:  # both files written before either replaces an earlier one: a failure leaves the pair as it was
            if tokenizer is not None:
                tokenizer_tmp = write_tokenizer(tokenizer, a.tokenizer_out, markers, commit=False)
            os.replace(written["tmp"], a.out)
        except BaseException:
            for tmp in (written["tmp"], tokenizer_tmp):
                if tmp is not None and os.path.exists(tmp):
                    os.remove(tmp)
            raise
        print(_written(a.out, a.dtype, written), file=sys.stderr)
        if tokenizer_tmp is not None:
            os.replace(tokenizer_tmp, a.tokenizer_out)
            print(tokenizer_written(tokenizer, a.tokenizer_out, markers), file=sys.stderr)
    except Exception as e:  # ExportError, TokenizerExportError, I/O errors
        if not isinstance(e, (ExportError, OSError, ValueError)) and type(e).__name__ != "TokenizerExportError":
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
