"""LlamaThink: a small hybrid-attention causal language model for Hugging Face transformers.

Every layer is a pre-norm block `mixer -> SwiGLU MLP`, the mixer being one of

* ``linear``: Gated DeltaNet (Qwen3-Next / Qwen3.5 style linear attention with a causal depthwise conv),
* ``csa``:    compressed sparse attention (a causal window, 512 tokens by default, blended with attention over
              mean-pooled, learned-compressed blocks of 4 tokens by a learned gate started closed),
* ``full``:   gated full softmax attention (Qwen3.5 style: sigmoid output gate, per-head QK RMSNorm, GQA),

with partial RoPE, (1 + w) RMSNorms and optional hyper-connections `h = (1 + r) * h + (1 + s) * f(norm(h))`.

Everything here is plain PyTorch and runs on CPU. The hot spots have one dispatch point each
(`LlamaThinkGatedDeltaNet._delta_rule` over `GDN_KERNELS`, fla's `FLA_GDN_KERNELS` or FlashQLA's
`FLASH_QLA_GDN_KERNELS`, `LlamaThinkAttention._attend`, `LlamaThinkCompressedSparseAttention._local_attention` /
`_compressed_attention`) so faster GPU kernels can be slotted in without touching the model; the optional fla and
FlashQLA adapters live in the sibling `kernels_llamathink.py`. One-token
decode steps (left-padded batches included) have a second, static-shape form (`decode_static` of each mixer, driven
by `_StaticDecoder`) that is replayed from a CUDA graph on GPU; the tests hold both forms to the uncached forward.

A mixer type maps to its class in one place, `MIXER_CLASSES` (`mixer_class`); each mixer class owns what depends on
its type: its decode state (`state_class`, `allocate_static_state`, `load_static_state`, `store_static_state`) and
its FLOP term (`flops_per_token`, summed by the module-level `flops_per_token`).

Only sibling relative imports are allowed in this file: `save_pretrained` copies it (and the configuration and
kernels files) next to the weights for `trust_remote_code=True` loading where the `llamathink` package is absent.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import functools
import inspect
import json
import math
import operator
import threading
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers.generation import GenerationMode
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput, logging

from .configuration_llamathink import LlamaThinkConfig
from .kernels_llamathink import (
    FLA_GDN_KERNELS,
    FLASH_QLA_GDN_KERNELS,
    fla_causal_conv1d_silu_split,
    fla_chunk_gated_delta_rule_gated,
    fla_fused_gates_available,
    fla_gated_norm_available,
    fla_gated_rms_norm,
    flash_qla_built,
    flash_qla_problem,
    probe_fla,
    probe_flash_qla,
    select_gdn_backend,
    start_fla_prebuild,
)

try:  # transformers >= 5: init functions that respect the "already loaded" flags of from_pretrained
    from transformers import initialization as init
except ImportError:  # pragma: no cover - transformers 4.x
    init = nn.init

try:
    from transformers.modeling_layers import GradientCheckpointingLayer
except ImportError:  # pragma: no cover - old transformers
    GradientCheckpointingLayer = nn.Module

logger = logging.get_logger(__name__)

# transformers 5.24 renamed generate()'s cache argument from `past_key_values` to `cache`; accept both.
_GENERATE_CACHE_KEY = (
    "cache"
    if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    else "past_key_values"
)


# ----------------------------------------------------------------------------------------------------------------
# Normalisation, RoPE, MLP
# ----------------------------------------------------------------------------------------------------------------


def _constant_cache(maxsize: int):
    """`functools.lru_cache(maxsize)` for functions that make constant tensors (masks, index and weight tables)
    once per size and device, except while a dispatch mode is active (`FakeTensorMode` of shape and memory
    estimators, tracing tools): then every call makes its own, so that no fake or traced tensor is kept for later
    real calls. The wrapped function keeps `cache_info` and `cache_clear`."""

    def decorate(fn):
        cached = functools.lru_cache(maxsize=maxsize)(fn)

        @functools.wraps(fn)
        def wrapper(*args):
            return fn(*args) if _get_current_dispatch_mode() is not None else cached(*args)

        wrapper.cache_info, wrapper.cache_clear = cached.cache_info, cached.cache_clear
        return wrapper

    return decorate


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for low-precision inputs, fp64 kept (the tests check exactness in double)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class LlamaThinkRMSNorm(nn.Module):
    """RMSNorm with a zero-initialised weight applied as `x_norm * (1 + w)`, computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., dim] -> the same shape and dtype, normalised over the last dim in float32 (float64 kept).
        `scale` [dim]: `1 + weight`, where the caller made it already in that float32 or float64
        (`LlamaThinkDecoderLayer._scales`: one launch for several such sums)."""
        # F.rms_norm is one fused kernel on GPU (and saves only x and 1/rms for backward) instead of ~6 passes
        acc = _acc_dtype(x.dtype)
        # the sum in float32 or float64 (a 16-bit weight's 1 + w rounded to 16 bits would move every output)
        scale = 1.0 + self.weight.to(acc) if scale is None else scale.to(acc)
        return F.rms_norm(x.to(acc), x.shape[-1:], scale, self.eps).type_as(x)

    def extra_repr(self) -> str:
        """The weight's shape and eps, for the module's repr."""
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


class LlamaThinkGatedRMSNorm(nn.Module):
    """Gated DeltaNet output norm: `rmsnorm(o) * w * silu(z)` (weight initialised to one, as in Qwen3.5)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    @staticmethod
    def fla_takes(x: torch.Tensor) -> bool:
        """Whether fla's fused kernel (`fla_gated_rms_norm`) can run this norm on x: 16-bit x on CUDA, not traced
        (inductor fuses the PyTorch form), fla's kernel available (`fla_gated_norm_available`)."""
        if not x.is_cuda or x.dtype not in (torch.float16, torch.bfloat16) or torch.compiler.is_compiling():
            return False
        return fla_gated_norm_available()

    def forward(self, x: torch.Tensor, gate: torch.Tensor, fused: bool = False) -> torch.Tensor:
        """x, gate [..., dim] -> [..., dim] in x's dtype; the norm and the SiLU gate computed in float32. `fused`:
        in fla's fused kernel where it can take x (`fla_takes`); the caller decides when (the Gated DeltaNet: in
        training on fla's kernels, `LlamaThinkGatedDeltaNet._output`)."""
        if fused and self.fla_takes(x):
            return fla_gated_rms_norm(x, gate, self.weight, self.eps)
        dtype, acc = x.dtype, _acc_dtype(x.dtype)
        xf = F.rms_norm(x.to(acc), x.shape[-1:], None, self.eps)
        out = self.weight * xf.to(dtype)
        return (out * F.silu(gate.to(acc))).to(dtype)


class LlamaThinkRotaryEmbedding(nn.Module):
    """Partial rotary embedding: the first `rotary_dim` dims of every head, rotate-half layout."""

    def __init__(self, config: LlamaThinkConfig):
        super().__init__()
        self.rotary_dim = config.rotary_dim
        self.base = config.rope_theta
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self, device=None) -> torch.Tensor:
        """The rotary frequencies [rotary_dim / 2], float32: theta^(-2i / rotary_dim) (RoFormer, Su et al. 2021)."""
        exponents = torch.arange(0, self.rotary_dim, 2, dtype=torch.float32, device=device) / self.rotary_dim
        return 1.0 / (self.base**exponents)

    def _apply(self, fn, recurse=True):
        # `model.to(torch.bfloat16)` would round the frequencies to bf16 (0.3% off: about a radian at position
        # 1000); they are rebuilt in fp32 on the new device, as `from_pretrained(dtype=...)` leaves them
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            self.inv_freq = self.compute_inv_freq(device=self.inv_freq.device)
        self._whole_rows = {}  # (tables of the old frequencies' device)
        return self

    def __getstate__(self):  # copies and pickles leave `whole_rows`' tables behind (keyed on this module's tensors)
        state = dict(super().__getstate__())  # (a copy: the base class may return the instance's own dict)
        state.pop("_whole_rows", None)
        return state

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, T] -> cos, sin [B, T, rotary_dim] (fp32 math, returned in `dtype`)."""
        freqs = position_ids[..., None].float() * self.inv_freq.float()  # [B, T, rotary_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    # sequence lengths whose `whole_rows` tables are kept at once (the least recently used goes first)
    whole_rows_kept: int = 8

    @torch.no_grad()
    def whole_rows(
        self, batch: int, seq_len: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` for rows at positions 0 .. seq_len - 1 each: cos, sin [batch, seq_len, rotary_dim], the same
        values, as views of [1, seq_len, rotary_dim] tables made once per length, dtype and device, marked as static
        inputs for torch.compile (`torch._dynamo.mark_static_address`, unguarded). CUDA graphs of compiled layers
        then read them in place: inputs that are not static are copied into the graph's own buffers before every
        replay, and a static input at a new address makes cudagraph trees record their graphs again.

        The tables are kept for `whole_rows_kept` lengths (least recently used first out; 0 keeps none) and made
        again when the frequencies change: `inv_freq` replaced, edited in place (not through `.data`, which autograd
        does not count), or the module moved. Where a cached table could differ from what calling the module gives,
        this calls it instead (new tensors, not kept): a module with hooks (its own, global ones, or accelerate's), a
        subclass, frequencies made in inference mode (they count no edits), a dispatch mode (e.g. FakeTensorMode) or
        a CUDA-graph capture under way. Thread-safe. Not for tracing (each traced call would bake the tables in)."""
        freq = self.inv_freq
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        uncached = capturing or self.whole_rows_kept <= 0 or freq.is_inference()
        if uncached or _get_current_dispatch_mode() is not None or not is_plain_module(self, LlamaThinkRotaryEmbedding):
            positions = torch.arange(seq_len, device=device)[None]  # [1, T]
            return tuple(t.expand(batch, -1, -1) for t in self(positions, dtype))
        key = (seq_len, dtype, torch.device(device), id(freq), freq.data_ptr(), freq._version)
        with _WHOLE_ROWS_LOCK:
            cache = self.__dict__.setdefault("_whole_rows", {})  # key -> (tables [1, T, R], {batch: views}, freq)
            entry = cache.pop(key, None)  # (re-inserted last: the most recently used)
            if entry is None:
                with torch.inference_mode(False):  # (kept tensors must serve training forwards too)
                    tables = self(torch.arange(seq_len, device=device)[None], dtype)  # [1, T, R] each
                # the entry holds the frequencies it was made from, so that no later tensor takes their id and address
                entry = (tables, {}, freq)
                while cache and len(cache) >= self.whole_rows_kept:
                    cache.pop(next(iter(cache)))
            cache[key] = entry
            tables, views, _ = entry
            if batch not in views:  # [1, T, R] -> [B, T, R]; views of one table share its address
                if len(views) >= self.whole_rows_kept:
                    views.clear()
                views[batch] = tuple(t.expand(batch, -1, -1) for t in tables)
                for t in views[batch]:
                    torch._dynamo.mark_static_address(t, guard=False)
            return views[batch]


# guards `LlamaThinkRotaryEmbedding.whole_rows`' caches (generate() may run in several threads, DataParallel replicas
# share one module's dict)
_WHOLE_ROWS_LOCK = threading.Lock()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """x [..., R] -> [-x2, x1] for its halves x1, x2 [..., R / 2] (the rotate-half RoPE layout of HF Llama)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, tables: RotaryTables | None = None):
    """x [B, H, T, D]; cos/sin [B, T, R] with R <= D: rotate the first R dims, pass the rest through -> [B, H, T, D]
    in the dtype x and the tables promote to. With `tables` (`rotary_tables` of these cos and sin, for heads of
    D), eagerly the same rotation in three kernels each way (`_RotateHalf`) instead of the slices, halves and
    concatenations below, which stay the reference and what torch.compile traces."""
    if tables is not None and not torch.compiler.is_compiling():
        return _RotateHalf.apply(x, tables.cos, tables.sin, tables.index)
    cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, R]
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    x_rot = x_rot * cos + rotate_half(x_rot) * sin
    return torch.cat((x_rot, x_pass), dim=-1)


@dataclass
class RotaryTables:
    """`apply_rotary`'s rotation as one element-wise form over whole heads of D: `x * cos + x[..., index] * sin`.
    cos [B, 1, T, D] holds the rotary cosines on the first R dims and 1 after them; sin [B, 1, T, D] the sines,
    negated on the first R / 2 dims (rotate-half's -x2), and 0 after R; index [D] (int64) swaps the halves of the
    first R dims and keeps the rest (its own inverse)."""

    cos: torch.Tensor
    sin: torch.Tensor
    index: torch.Tensor


def rotary_tables(cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> RotaryTables:
    """cos/sin [B, T, R] (`LlamaThinkRotaryEmbedding`) -> `RotaryTables` for heads of `head_dim` >= R, in cos's
    dtype: made once per forward and shared by every attention layer's q and k."""
    R = cos.shape[-1]
    index, sign = _rotate_half_index(R, head_dim, cos.device)
    return RotaryTables(
        cos=F.pad(cos, (0, head_dim - R), value=1.0)[:, None],
        sin=F.pad(sin * sign.to(sin.dtype), (0, head_dim - R))[:, None],
        index=index,
    )


@_constant_cache(maxsize=16)
def _rotate_half_index(R: int, D: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(index [D]: rotate-half's source dim of each output dim, its halves of R swapped and the rest kept; sign [R]:
    -1 on the first half, +1 on the second), made once per size and device, outside inference mode (saved by
    training forwards)."""
    with torch.inference_mode(False), torch.no_grad():
        h = R // 2
        index = torch.cat([torch.arange(h, R), torch.arange(h), torch.arange(R, D)]).to(device)
        sign = torch.cat([torch.full((h,), -1.0), torch.ones(R - h)]).to(device)
        return index, sign


class _RotateHalf(torch.autograd.Function):
    """x [..., D] -> `x * cos + x[..., index] * sin` (`RotaryTables`; the tables take no gradient). The backward is
    `g * cos + (g * sin)[..., index]` (index is its own inverse), in x's dtype: three kernels each way, where the
    autograd of `apply_rotary`'s reference form launches about twice as many (slices, negation, concatenations and
    their backward). Linear in x, so its forward-mode derivative (`jvp`) is itself applied to x's tangent; torch.func
    transforms take it too (`setup_context`, and vmap's rule generated)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, cos, sin, index):
        return torch.addcmul(x * cos, x.index_select(-1, index), sin)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, cos, sin, index = inputs
        ctx.save_for_backward(cos, sin, index)
        ctx.save_for_forward(cos, sin, index)
        ctx.x_dtype = x.dtype

    @staticmethod
    def backward(ctx, grad):
        cos, sin, index = ctx.saved_tensors
        dx = torch.addcmul((grad * sin).index_select(-1, index), grad, cos)
        return dx.to(ctx.x_dtype), None, None, None

    @staticmethod
    def jvp(ctx, x_tangent, cos_tangent, sin_tangent, index_tangent):
        cos, sin, index = ctx.saved_tensors
        return torch.addcmul(x_tangent * cos, x_tangent.index_select(-1, index), sin)


class LlamaThinkMLP(nn.Module):
    """SwiGLU feed-forward block, `down_proj(silu(gate_proj(x)) * up_proj(x))`: [B, T, hidden_size] -> the same
    shape through `intermediate_size` (Shazeer 2020, "GLU Variants Improve Transformer"; as in Llama and Qwen3.5)."""

    def __init__(self, config: LlamaThinkConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., hidden_size] -> [..., hidden_size]."""
        gate, up = stacked_projections(x, (self.gate_proj, self.up_proj))
        return self.down_proj(F.silu(gate) * up)


def stacked_projections(x: torch.Tensor, linears: tuple[nn.Module, ...]) -> tuple[torch.Tensor, ...]:
    """The outputs of `linears` on x [..., T, in_features]: [..., T, out_features_i] each, as their calls give them.

    Eagerly under autocast, where every one is a plain bias-free `nn.Linear` (`is_plain_linear`: not a PEFT wrapper,
    not hooked or offloaded) whose weight autocast casts (a 16- or 32-bit float, not autocast's dtype), all of one
    dtype, as one matrix product with the weights stacked: the input is cast once rather than once per projection,
    the weights in one cast of their stack instead of one each (the copy kept for the backward either way), and the
    backward is one product for the input's gradient and one for the stacked weights' (where separate calls take
    one of each per projection, then a cast and a sum of the input's gradients). The eager step is bound by the
    host's launches, so fewer, larger kernels pay; the outputs are views of the one product. Elsewhere each module
    is called: without the cast the stack would be a copy of the weights kept for the backward beside them; under
    torch.compile inductor plans the products itself; for one token per row (decoding) the stacking would copy the
    weights every step to save nothing."""
    device = x.device.type
    stack = (
        len(linears) > 1
        and x.dim() >= 2
        and x.shape[-2] > 1
        and not torch.compiler.is_compiling()
        and torch.is_autocast_enabled(device)
        and all(is_plain_linear(m) for m in linears)
        and len({m.weight.dtype for m in linears}) == 1
        # the weights autocast casts: 16- and 32-bit floats other than its own dtype (it leaves float64 alone)
        and linears[0].weight.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and linears[0].weight.dtype != torch.get_autocast_dtype(device)
    )
    if not stack:
        return tuple(m(x) for m in linears)
    weight = cat_rows([m.weight for m in linears])  # [sum of out_features, in_features]
    return F.linear(x, weight).split([m.weight.shape[0] for m in linears], dim=-1)


# ----------------------------------------------------------------------------------------------------------------
# Gated delta rule: pure-PyTorch reference kernels
# ----------------------------------------------------------------------------------------------------------------


def csa_window(config: LlamaThinkConfig) -> int:
    """The CSA layers' window: `csa_window`, at most the context. Within `max_position_embeddings` positions a
    window of the whole context already sees every earlier token, so a longer one sees the same tokens, with
    buffers of its own length."""
    return min(config.csa_window, config.max_position_embeddings)


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """`x / sqrt(sum(x^2) + eps)` over the last dim (the convention of fla and transformers' Qwen3.5)."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def l2norm_rms(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """`l2norm(x)` over the last dim D in x's dtype, computed in float32 by one fused RMSNorm: x / sqrt(sum(x^2) +
    eps) = rms_norm(x, eps / D) / sqrt(D), the 1 / sqrt(D) as the norm's weight. On CUDA a single kernel forward and
    backward (`torch.rms_norm`), where `l2norm` is five element-wise passes and their backward: the eager fla path's
    q and k (`LlamaThinkGatedDeltaNet._gated_delta_rule_fused`)."""
    D = x.shape[-1]
    acc = _acc_dtype(x.dtype)
    return F.rms_norm(x.to(acc), (D,), _inverse_sqrt_weight(D, acc, x.device), eps / D).to(x.dtype)


@_constant_cache(maxsize=64)
def _inverse_sqrt_weight(D: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[D] filled with 1 / sqrt(D) (`l2norm_rms`' weight), made once per size, dtype and device rather than by two
    kernels every call; outside inference mode, so that training forwards can save it for their backward."""
    with torch.inference_mode(False), torch.no_grad():
        return torch.full((D,), D**-0.5, dtype=dtype, device=device)


def torch_recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token gated delta rule (the definition; used for one-token decode and as the test oracle).

    q, k: [B, T, H, Dk] (already L2-normalised), v: [B, T, H, Dv], g (log-decay <= 0), beta: [B, T, H].
    Per head, with S of shape [Dk, Dv]:
        S_t = exp(g_t) S_{t-1} + beta_t k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T,   o_t = S_t^T (scale * q_t).
    Returns o [B, T, H, Dv] in v's dtype and the final state [B, H, Dk, Dv] in fp32.
    """
    out_dtype = v.dtype
    B, T, H, Dk = k.shape
    Dv = v.shape[-1]
    acc = _acc_dtype(v.dtype)
    q, k, v, g, beta = (x.transpose(1, 2).to(acc) for x in (q, k, v, g, beta))  # head-major: [B, H, T, ...]
    q = q * scale
    state = q.new_zeros(B, H, Dk, Dv) if initial_state is None else initial_state.to(acc)
    outs = []
    for t in range(T):
        state = state * g[:, :, t, None, None].exp()
        kv_mem = torch.einsum("bhkv,bhk->bhv", state, k[:, :, t])
        delta = (v[:, :, t] - kv_mem) * beta[:, :, t, None]
        state = state + k[:, :, t, :, None] * delta[:, :, None, :]
        outs.append(torch.einsum("bhkv,bhk->bhv", state, q[:, :, t]))
    o = torch.stack(outs, dim=2) if outs else v.new_zeros(B, H, 0, Dv)
    return o.transpose(1, 2).to(out_dtype), (state if output_final_state else None)


def torch_chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked (WY-form) gated delta rule: same inputs, outputs and maths as `torch_recurrent_gated_delta_rule`.

    Inside a chunk of C tokens with cumulative log-decay G_i = g_1 + ... + g_i and chunk-initial state S_0,
    the per-token state corrections delta_i = beta_i (v_i - exp(g_i) S_{i-1}^T k_i) satisfy the unit lower
    triangular system (I + A) delta = beta*V - (beta*exp(G)*K) S_0, A_ij = beta_i exp(G_i - G_j) k_i.k_j (j < i).
    Solving it once per chunk for both right-hand sides gives delta = U - W S_0, after which
        O   = (exp(G) * Q) S_0 + (Q K^T * decay) delta,        decay_ij = exp(G_i - G_j) for j <= i
        S_C = exp(G_C) S_0 + (exp(G_C - G) * K)^T delta.
    Only the chunk-to-chunk state hand-off is sequential; everything else is batched matmuls and one batched
    triangular solve, which is what makes this form fast under torch.compile on GPU.
    """
    out_dtype = v.dtype
    B, T, H, Dk = k.shape
    Dv = v.shape[-1]
    C = chunk_size
    acc = _acc_dtype(v.dtype)
    q, k, v, g, beta = (x.transpose(1, 2).to(acc) for x in (q, k, v, g, beta))  # [B, H, T, ...]
    q = q * scale
    pad = (-T) % C
    if pad:  # padded steps have g = 0 and beta = 0: they leave the state untouched; their outputs are dropped
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = (F.pad(x, (0, pad)) for x in (g, beta))
    N = (T + pad) // C
    q, k, v = (x.reshape(B, H, N, C, -1) for x in (q, k, v))  # [B, H, N, C, D]
    g, beta = g.reshape(B, H, N, C), beta.reshape(B, H, N, C)

    G = g.cumsum(-1)  # [B, H, N, C]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    # exp(G_i - G_j) <= 1 for j <= i; the upper triangle is masked BEFORE exp so it cannot overflow
    decay = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # [B, H, N, C, C]
    k_beta = k * beta[..., None]
    A = (k_beta @ k.transpose(-1, -2) * decay).tril(-1)  # strictly lower  [B, H, N, C, C]
    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    rhs = torch.cat((v * beta[..., None], k_beta * G.exp()[..., None]), dim=-1)  # [B, H, N, C, Dv + Dk]
    UW = torch.linalg.solve_triangular(eye + A, rhs, upper=False, unitriangular=True)
    U, W = UW.split((Dv, Dk), dim=-1)
    attn = q @ k.transpose(-1, -2) * decay  # inclusive lower triangle  [B, H, N, C, C]
    q_decayed = q * G.exp()[..., None]
    k_to_end = k * (G[..., -1:] - G).exp()[..., None]  # decay from each token to the chunk end

    state = q.new_zeros(B, H, Dk, Dv) if initial_state is None else initial_state.to(acc)
    outs = []
    for n in range(N):
        delta = U[:, :, n] - W[:, :, n] @ state  # [B, H, C, Dv]
        outs.append(q_decayed[:, :, n] @ state + attn[:, :, n] @ delta)
        state = state * G[:, :, n, -1, None, None].exp() + k_to_end[:, :, n].transpose(-1, -2) @ delta
    o = torch.stack(outs, dim=2).reshape(B, H, N * C, Dv)[:, :, :T]
    return o.transpose(1, 2).to(out_dtype), (state if output_final_state else None)


# Dispatch table of the pure-PyTorch delta-rule kernels: "chunk" for training/prefill, "recurrent" for one-token
# decode. The signatures above are the contract every backend follows.
GDN_KERNELS = {"chunk": torch_chunk_gated_delta_rule, "recurrent": torch_recurrent_gated_delta_rule}


# ----------------------------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------------------------


class _LayerState:
    """Per-layer decode state; every tensor field has the batch as its first dimension."""

    fields: tuple[str, ...] = ()

    def map_batch(self, fn):
        for name in self.fields:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, fn(value))


class GatedDeltaNetState(_LayerState):
    """Last (kernel - 1) conv inputs [B, C, K-1] and the delta-rule state [B, Hv, Dk, Dv] (fp32)."""

    fields = ("conv", "recurrent")

    def __init__(self):
        self.conv: torch.Tensor | None = None
        self.recurrent: torch.Tensor | None = None


class AttentionState(_LayerState):
    """RoPE'd keys and values of every cached position, [B, Hkv, S, D]."""

    fields = ("keys", "values")

    def __init__(self):
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None


class CompressedAttentionState(_LayerState):
    """What a CSA layer needs to continue.

    * `window_k`, `window_v` [B, Hkv, W-1, D] and `window_valid` [B, W-1]: RoPE'd keys/values of the last W-1
      positions (index space; padding and not-yet-filled slots are invalid).
    * `blocks_k`, `blocks_v` [B, Hkv, N, D]: compressed (and, for keys, RoPE'd) blocks in absolute slots: slot j
      holds block j of that row; row b has `completed_b = real_length_b // stride` valid slots.
    * `partial` [B, stride, 2 * Hkv * D]: raw (k-normed, un-RoPE'd) keys and values of the block being filled,
      a ring indexed by position % stride.
    """

    fields = ("window_k", "window_v", "window_valid", "blocks_k", "blocks_v", "partial")

    def __init__(self):
        self.window_k = self.window_v = self.window_valid = None
        self.blocks_k = self.blocks_v = None
        self.partial = None


_CACHE_SHAPE_FIELDS = (
    "num_key_value_heads",
    "head_dim",
    "linear_num_key_heads",
    "linear_num_value_heads",
    "linear_key_head_dim",
    "linear_value_head_dim",
    "linear_conv_kernel_dim",
    "csa_stride",
    "csa_window",
)


def _cache_signature(config: LlamaThinkConfig) -> dict:
    """The config fields that fix the shapes of a cache's per-layer states."""
    return {name: getattr(config, name, None) for name in _CACHE_SHAPE_FIELDS}


def _check_cache(cache, config: LlamaThinkConfig) -> None:
    """What a forward was given as its cache: a LlamaThinkCache that fits `config` (ValueError naming the problem)."""
    if not isinstance(cache, LlamaThinkCache):
        raise ValueError(f"the cache must be a LlamaThinkCache, got {type(cache).__name__}")  # noqa: TRY004
    cache.check_compatible(config)


class LlamaThinkCache:
    """Decode state of the hybrid stack, usable with `generate()` (transformers 5.17 to 5.25).

    Holds, per layer, a `GatedDeltaNetState`, `AttentionState` or `CompressedAttentionState`, plus what every
    layer shares: how many positions were processed (`get_seq_length`, padding included, so it matches the
    length of `attention_mask`), how many real tokens each row has seen (their next position), and which cached
    positions are padding.

    Padding must be on the left of the first chunk fed to the cache (what `generate` does with
    `padding_side="left"`). Decoding is then exact for every mixer: padded positions never enter the Gated
    DeltaNet conv or recurrent state and are masked from attention, and CSA blocks are aligned by each row's own
    token positions (block j = positions 4j..4j+3 of that row), so a left-padded row decodes exactly as it would
    alone. A cache built from right-padded input cannot be continued (a clear error says so).
    The recurrent state cannot be rolled back, so the cache is not croppable (no assisted decoding).
    During CUDA-graph decoding the state lives in the model's `_StaticDecoder` buffers; `layers`, every multi-token
    forward, `copy.deepcopy` and pickling bring it back first (`materialize`). A cache is refused (ValueError) by a
    model of another layer pattern or other state shapes (`check_compatible`).
    """

    is_compileable = False
    is_croppable = False

    def __init__(self, config: LlamaThinkConfig):
        # each mixer class names its state class; an unknown mixer type raises a ValueError naming it
        self._layers: list[_LayerState] = [mixer_class(kind).state_class() for kind in config.mixer_types]
        self.signature = _cache_signature(config)  # the shapes its states take (`check_compatible`)
        self._static: _StaticDecoder | None = None  # set while the state lives in a _StaticDecoder's buffers
        self._decode_signature: int | None = None  # the model's `_decode_signature` when the cache entered that path
        self.seq_length = 0  # positions processed, padding included (index space)
        self.real_lengths: torch.Tensor | None = None  # [B] long: real tokens seen per row = next position
        self.max_real_length: int | None = None  # host copy of real_lengths.max() (saves a device sync per step)
        self.key_valid: torch.Tensor | None = None  # [B, seq_length] bool, only kept once padding was seen
        self.continuable = True
        self._not_continuable_reason = ""

    @property
    def layers(self) -> list[_LayerState]:
        """Per-layer states (brought back from the CUDA-graph decoder's buffers first, if they are there)."""
        if self._static is not None:
            self.materialize()
        return self._layers

    def materialize(self):
        """Copy the state out of the static decode buffers into this cache's own tensors (a no-op otherwise)."""
        static = self._static
        if static is None:
            return
        with static.lock:  # not while another thread's step is using the buffers
            static, self._static = self._static, None
            if static is not None and static.owner is not None and static.owner() is self:
                static.store(self)

    def check_compatible(self, config: LlamaThinkConfig):
        """Raise a ValueError unless this cache holds one state per layer of a model with `config.mixer_types`, of
        the shapes `config` gives (`_CACHE_SHAPE_FIELDS`): a cache of another model would otherwise fail deep inside
        a mixer, or decode wrongly."""
        expected = [mixer_class(kind).state_class for kind in config.mixer_types]
        if [type(state) for state in self._layers] != expected:
            raise ValueError(
                f"the cache was built for another layer pattern: {[type(s).__name__ for s in self._layers]}, "
                f"where this model has mixer_types {list(config.mixer_types)}; start a new cache"
            )
        mine, theirs = getattr(self, "signature", None), _cache_signature(config)
        if mine is not None and mine != theirs:
            differ = {k: (mine.get(k), theirs[k]) for k in theirs if mine.get(k) != theirs[k]}
            raise ValueError(
                f"the cache was built for a model of other shapes ({differ}: cache, model); start a new cache"
            )

    # --- copies: the state comes back from the CUDA-graph decoder's buffers first --------------------------------
    def __deepcopy__(self, memo):
        """A copy owns its state: state still in a `_StaticDecoder`'s buffers is brought back first (`materialize`),
        so neither the decoder (nor its model) nor its weak reference to this cache is copied."""
        self.materialize()
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    def __copy__(self):  # shares the per-layer states, as any shallow copy does, but not the decoder's buffers
        self.materialize()
        new = self.__class__.__new__(self.__class__)
        new.__dict__.update(self.__dict__)
        return new

    def __getstate__(self):  # pickle / torch.save
        self.materialize()
        return dict(self.__dict__)

    # --- what transformers' generate() asks of a cache ---------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Positions processed so far (padding included; every layer holds the same); `layer_idx` is ignored."""
        return self.seq_length

    def __len__(self) -> int:
        return len(self._layers)

    @property
    def is_linear(self) -> list[bool]:
        """Per layer, whether it keeps no sequence length: all False. generate() slices continuation inputs only
        for caches that know their length, and every layer of this cache does (the shared `seq_length`)."""
        return [False] * len(self._layers)

    @property
    def batch_size(self) -> int | None:
        """Rows held, or None before the first forward."""
        return None if self.real_lengths is None else self.real_lengths.shape[0]

    def _map_batch(self, fn):
        for layer in self.layers:
            layer.map_batch(fn)
        if self.real_lengths is not None:
            self.real_lengths = fn(self.real_lengths)
        if self.key_valid is not None:
            self.key_valid = fn(self.key_valid)
        self.max_real_length = None  # rows were selected or reordered: recompute on the next forward

    def reorder_cache(self, beam_idx: torch.LongTensor):
        """Beam search: row i of the new cache is row beam_idx[i] of the old one."""
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int):
        """Each row repeated `repeats` times in place (generate()'s num_return_sequences / beams): row i becomes
        rows i * repeats .. i * repeats + repeats - 1."""
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor):
        """Keep the rows `indices` [N] (long or bool), in that order."""
        self._map_batch(lambda t: t[indices.to(t.device)])

    def crop(self, max_length: int):
        """Refused: raises NotImplementedError (a Gated DeltaNet state holds every position; it cannot be cut back)."""
        raise NotImplementedError(
            "LlamaThinkCache cannot be cropped: Gated DeltaNet layers keep a recurrent state that cannot be rolled back"
        )

    # --- bookkeeping used by the model -------------------------------------------------------------------------
    def check_continuable(self):
        """Raises ValueError, naming the reason, where this cache cannot take further positions."""
        if not self.continuable:
            raise ValueError(f"this LlamaThinkCache cannot be continued: {self._not_continuable_reason}")

    def advance(self, num_new: int, new_valid: torch.Tensor | None, batch_size: int, device: torch.device):
        """Record `num_new` processed positions (`new_valid` [B, T] bool, or None when all are real tokens)."""
        if self.real_lengths is None:
            self.real_lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        if new_valid is None:
            self.real_lengths = self.real_lengths + num_new
            if self.key_valid is not None:
                self.key_valid = F.pad(self.key_valid, (0, num_new), value=True)
        else:
            self.real_lengths = self.real_lengths + new_valid.sum(-1)
            past = self.key_valid
            if past is None:
                past = torch.ones(batch_size, self.seq_length, dtype=torch.bool, device=device)
            self.key_valid = torch.cat((past, new_valid), dim=-1)
            # a row whose input ended in padding after a real token was right-padded: its next token would follow
            # the padding. A row that holds no real token yet is inside its left padding (a chunked prefill's
            # chunk ended there): it continues, its state still the empty one.
            if bool((new_valid[:, -1].logical_not() & self.key_valid.any(-1)).any()):
                self.continuable = False
                self._not_continuable_reason = (
                    "it was built from right-padded input (a padding token after a real token); use left "
                    "padding (tokenizer.padding_side = 'left') for generation"
                )
        self.seq_length += num_new


_MAX_STATIC_DECODERS = 4  # batch sizes whose decode graphs and buffers a model keeps
# Python-level switches a captured decode step would freeze: PEFT's tuner layers' active adapters, their
# `disable_adapter()` flag, which adapters are merged into the base weights (`BaseTunerLayer`) and LoRA's scales
# (`set_scale`, `rescale_adapter_scale`: a float per adapter, a constant in the captured step)
_ADAPTER_SWITCHES = ("_active_adapter", "_disable_adapters", "merged_adapters", "scaling")


def _frozen(value):
    """`value` as something hashable: a dict of scales its items, lists and sets of adapter names tuples, anything
    else unhashable its identity."""
    if isinstance(value, dict):
        return tuple(sorted((str(k), _frozen(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, (set, frozenset)):
        return tuple(sorted(map(str, value)))
    try:
        hash(value)
    except TypeError:
        return id(value)
    return value


class _StaticDecoder:
    """Fixed-address decode state for one batch size, and the CUDA graph of one decode step over it.

    A cache (left padding allowed) hands its state to these buffers on its first one-token step (`load`); each later step
    writes the token id and position into fixed tensors and replays the graph (embedding -> every layer's
    `decode_static` -> head), so a step costs one launch instead of hundreds of Python-dispatched kernels. The state
    goes back into the cache's own tensors (`store`) as soon as anything else touches the cache: a multi-token
    forward, `reorder_cache`, reading `cache.layers`, a copy or pickle of the cache, or another cache taking over
    these buffers. Off CUDA (`decode_cuda_graphs="always"`, how the tests reach this path on CPU) the same step runs
    eagerly on the same buffers. Each mixer allocates, loads and stores its own buffers (`allocate_static_state`,
    `load_static_state`, `store_static_state`), so this class knows no mixer type.
    """

    def __init__(self, model: LlamaThinkForCausalLM, batch_size: int, use_graph: bool, lock: threading.RLock):
        cfg = model.config
        weight = model.lm_head.weight
        device = weight.device
        B, L = batch_size, cfg.max_position_embeddings
        self.model, self.batch_size, self.use_graph = model, batch_size, use_graph
        self.lock = lock  # the model's: one step (or hand-back) at a time over all of its decoders
        self.mixers = [layer.mixer for layer in model.model.layers]
        # Plain tensors even when made under torch.inference_mode: its tensors could never again be written outside
        # it, and the buffers outlive the generate() call that made them
        with torch.inference_mode(False):
            self.layers: list[_LayerState] = [
                mixer.allocate_static_state(B, L, device=device, dtype=weight.dtype) for mixer in self.mixers
            ]
            self.index = torch.zeros(1, dtype=torch.long, device=device)  # cache index (padding included) of the token
            self.positions = torch.zeros(B, dtype=torch.long, device=device)  # each row's position of the new token
            self.key_valid = torch.ones(B, L, dtype=torch.bool, device=device)  # which cache indices are real tokens
            self.slots = torch.arange(max(L, csa_window(cfg)), device=device)
            self.input_ids = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.padded = False  # whether the cache has seen padding (it then keeps `key_valid`)
        self.logits: torch.Tensor | None = None
        self.graph = None
        self.owner = None  # weakref to the cache whose state is in the buffers

    def load(self, cache: LlamaThinkCache):
        """Copy a cache's state (`seq_length` indices, left padding allowed) into the buffers."""
        L = cache.seq_length
        self.positions.copy_(cache.real_lengths)
        self.padded = cache.key_valid is not None
        self.key_valid.fill_(True)
        if self.padded:
            self.key_valid[:, :L] = cache.key_valid
        for mixer, state, src in zip(self.mixers, self.layers, cache._layers):
            mixer.load_static_state(state, src, L)

    def store(self, cache: LlamaThinkCache):
        """Write the buffers back as the cache's own state tensors (the inverse of `load`)."""
        L = cache.seq_length
        max_real_length = L if not self.padded else int(self.positions.max())  # (a host sync, once per hand-back)
        for mixer, state, dst in zip(self.mixers, self.layers, cache._layers):
            mixer.store_static_state(state, dst, L, self.key_valid, max_real_length)
        cache.real_lengths = self.positions.clone()
        cache.max_real_length = max_real_length
        cache.key_valid = self.key_valid[:, :L].clone() if self.padded else None
        self.owner = None

    def _run(self):
        self.logits = self.model._decode_static_step(self.input_ids, self)

    def step(self, cache: LlamaThinkCache, input_ids: torch.Tensor) -> torch.Tensor:
        """Decode one token [B, 1] with `cache` -> logits [B, vocab]; advances the cache by one position. Threads
        that decode with one model (each its own cache: a chat server, a streamer) take turns, one step each: the
        buffers hold one cache's state at a time."""
        with self.lock:
            return self._step(cache, input_ids)

    def _step(self, cache: LlamaThinkCache, input_ids: torch.Tensor) -> torch.Tensor:
        previous = self.owner() if self.owner is not None else None
        if previous is not cache:
            if previous is not None:
                previous.materialize()
            cache.materialize()  # its state may sit in another decoder (evicted, or built before the weights moved)
            self.load(cache)
            self.owner = weakref.ref(cache)
            cache._static = self
        self.index.fill_(cache.seq_length)
        self.input_ids.copy_(input_ids)
        if self.use_graph and self.graph is None:
            try:
                self._capture(cache)
            except Exception as err:  # never let an optimisation end a generation: run the same step eagerly
                logger.warning(f"capturing the decode step in a CUDA graph failed ({err!r}); decoding eagerly")
                self.use_graph, self.graph = False, None
                self.load(cache)
        if self.graph is not None:
            self.graph.replay()
        else:
            self._run()
        self.positions += 1  # outside the graph: warm-up and capture must not advance it
        cache.seq_length += 1
        return self.logits.clone()  # the graph's output buffer is rewritten by the next step

    def _capture(self, cache: LlamaThinkCache):
        # Warm-up on a side stream (lazy inits, Triton autotuning) before capturing, as CUDA graphs require. The
        # warm-up steps write into the buffers, so the cache's state is loaded again afterwards.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._run()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._run()
        self.graph = graph
        self.load(cache)


# ----------------------------------------------------------------------------------------------------------------
# Packed sequences: several documents in one row, each seeing only itself
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class PackedSegments:
    """The documents (segments) packed into the rows of a batch; every mixer keeps them apart.

    Built by `packed_segments` from the inputs transformers uses for padding-free batches: `position_ids` that
    restart at 0 at each document (`DataCollatorWithFlattening`, TRL's `padding_free` / `packing`), `seq_idx`
    (document index per token), or `cu_seq_lens_q` (flash-attention's cumulative lengths, batch of one row).
    Within a segment, a mixer computes exactly what it computes for that document alone; across segments nothing
    flows (the Gated DeltaNet state and conv window restart, attention and CSA blocks stay inside the segment).

    * `ids` [B, T] long: the segment of each token, counted from 0 in each row;
    * `lengths` [B, T] long: the length of each token's segment;
    * `row_lengths`: per row, the segment lengths in order (host ints, for the per-segment reference paths);
    * `cu_seqlens` [N + 1] long: cumulative lengths over the flattened batch (B * T tokens, N segments), the
      layout of fla's variable-length kernels.
    """

    ids: torch.Tensor
    lengths: torch.Tensor
    row_lengths: list[list[int]]
    cu_seqlens: torch.Tensor
    _block_mask: object = None  # FlexAttention's document-causal block mask, built once per forward when needed


def packed_segments(
    position_ids: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    B: int,
    T: int,
    max_length: int | None = None,
) -> tuple[PackedSegments | None, torch.Tensor | None]:
    """The packed segments of a [B, T] batch, and the position ids within them; (None, position_ids) when the batch
    holds one sequence per row.

    Sources, in the order used: `cu_seqlens` [N + 1] (flash-attention's `cu_seq_lens_q`; B must be 1), `seq_idx`
    [B, T] (a new segment wherever the value changes), `position_ids` [B, T] (a new segment wherever the position
    does not follow the previous one). Positions must count 0, 1, 2, ... in every segment of a packed batch; given
    together, the sources must agree. Raises ValueError naming the row and token where they do not (a restart to
    anything but 0, positions that skip or go back, a batch of several rows with `cu_seqlens`, lengths that do
    not add up to T): such inputs cannot be honoured, and would otherwise mix documents silently; and when a
    sequence is longer than `max_length` (the model's context).

    It reads the batch on the host (a device sync): under torch.compile the graph breaks here, once per forward,
    and nothing after it depends on the segment lengths as Python values (so no recompilation per batch).
    """
    device = (position_ids if position_ids is not None else seq_idx if seq_idx is not None else cu_seqlens).device
    if cu_seqlens is not None:
        cu = cu_seqlens.reshape(-1).long()
        if B != 1:
            raise ValueError(f"cu_seq_lens_q describes one flattened row, but the batch has {B} rows")
        bounds = cu.tolist()
        if bounds[0] != 0 or bounds[-1] != T or any(b >= a for a, b in zip(bounds[1:], bounds[:-1])):
            raise ValueError(f"cu_seq_lens_q must rise from 0 to the sequence length {T}, got {bounds}")
        starts = torch.zeros(B, T, dtype=torch.bool, device=device)
        starts[0, cu[:-1].to(device)] = True
    elif seq_idx is not None:
        if seq_idx.shape != (B, T):
            raise ValueError(f"seq_idx has shape {tuple(seq_idx.shape)}; expected [{B}, {T}]")
        starts = F.pad(seq_idx.diff(dim=1) != 0, (1, 0), value=True)
    elif position_ids is not None:
        starts = F.pad(position_ids.diff(dim=1) != 1, (1, 0), value=True)
    else:
        return None, position_ids
    if seq_idx is not None and cu_seqlens is not None:  # both given: they must cut the row alike
        if seq_idx.shape != (B, T) or not torch.equal(F.pad(seq_idx.diff(dim=1) != 0, (1, 0), value=True), starts):
            raise ValueError("seq_idx and cu_seq_lens_q describe different packed sequences; pass one of them")
    n_starts = starts.sum(1)  # [B]
    if not bool((n_starts > 1).any()):  # one sequence per row (its positions are checked by the caller)
        return None, position_ids
    ids = starts.long().cumsum(1) - 1  # [B, T]
    index = torch.arange(T, device=device).expand(B, T)
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(1).values  # index of each token's start
    within = index - first
    if position_ids is not None and not torch.equal(position_ids.to(within.dtype), within):
        bad = (position_ids != within).nonzero()[0].tolist()
        source = "seq_idx" if seq_idx is not None else "cu_seq_lens_q" if cu_seqlens is not None else None
        rule = f"disagree with {source}, which makes" if source else "of a packed batch must count"
        raise ValueError(
            f"position_ids {rule} 0, 1, 2, ... in each packed sequence; row {bad[0]}, token {bad[1]} has position "
            f"{int(position_ids[bad[0], bad[1]])} where {int(within[bad[0], bad[1]])} was expected (a restart to a "
            "value other than 0, or positions that skip or go back)"
        )
    # the host needs only the N segment starts (row, token), not the B x T flags
    where = starts.nonzero().tolist()  # row-major: the segments in order
    row_lengths: list[list[int]] = [[] for _ in range(B)]
    for (b, t), (b_next, t_next) in zip(where, where[1:] + [[B, 0]]):
        row_lengths[b].append((t_next if b_next == b else T) - t)
    longest = max(max(row) for row in row_lengths)
    if max_length is not None and longest > max_length:
        raise ValueError(f"a packed sequence of {longest} tokens is longer than max_position_embeddings={max_length}")
    sizes = torch.tensor([n for row in row_lengths for n in row], dtype=torch.long, device=device)  # [N]
    before = F.pad(n_starts.cumsum(0)[:-1], (1, 0))  # [B]: segments in the earlier rows
    lengths = sizes[ids + before[:, None]]  # [B, T]: each token's segment length
    cu = F.pad(sizes.cumsum(0), (1, 0))
    return PackedSegments(ids=ids, lengths=lengths, row_lengths=row_lengths, cu_seqlens=cu), within


def segment_slices(segments: PackedSegments):
    """(row, start, end) of every segment, in order."""
    for b, lengths in enumerate(segments.row_lengths):
        start = 0
        for n in lengths:
            yield b, start, start + n
            start += n


@dataclass
class ForwardContext:
    """Per-forward inputs shared by every layer."""

    position_ids: torch.Tensor  # [B, T] positions of the new tokens (padding gets 0)
    cos: torch.Tensor  # [B, T, R]
    sin: torch.Tensor
    valid: torch.Tensor | None  # [B, T] bool: real tokens of this chunk; None when all are real
    key_valid: torch.Tensor | None  # [B, past + T] bool over all attended positions; None when all are real
    real_lengths: torch.Tensor | None  # [B] real tokens before this chunk; None without a cache
    new_real_lengths: torch.Tensor | None  # [B] real tokens after this chunk; None without a cache
    cache: LlamaThinkCache | None
    rotary: LlamaThinkRotaryEmbedding
    max_new_real_length: int | None = None  # host copy of new_real_lengths.max(), computed once per forward
    static: _StaticDecoder | None = None  # one-token decode on fixed buffers (`static.index`, `static.positions`)
    segments: PackedSegments | None = None  # documents packed into rows (positions then restart in each)
    # FlexAttention block masks of compressed sparse attention's two paths (`csa_block_masks`), set where layers
    # compiled with CUDA graphs run on whole rows (no cache, padding or packing); None: its SDPA paths
    csa_block_masks: tuple | None = None
    # `rotary_tables` of cos and sin for the attention layers' heads, where the layers run eagerly (`apply_rotary`)
    rotary_tables: RotaryTables | None = None
    # what layers of one kind compute alike from this context (CSA's masks), made by the first (`per_forward`): a
    # dict where the layers run eagerly, None where they run compiled (traced code ignores both fields)
    shared: dict | None = None


def per_forward(shared: dict | None, key, make):
    """`make()`, once per forward where `shared` (`ForwardContext.shared`) is given: the first layer's call makes it
    and keeps it under `key` (which must name everything the value depends on beyond the context), later layers
    take it. Without `shared`, or traced, every call makes it."""
    if shared is None or torch.compiler.is_compiling():
        return make()
    if key not in shared:
        shared[key] = make()
    return shared[key]


def packed_sdpa(q, k, v, segments: PackedSegments, scale: float, bucket: int = 128) -> torch.Tensor:
    """Causal GQA attention of q [B, Hq, T, D] over k, v [B, Hkv, T, D] inside each packed sequence -> [B, Hq, T, D]:
    causal SDPA on each sequence alone (the reference of `packed_flex_attention`; no mask tensor at all).

    Each call covers the sequence and whatever follows it up to a multiple of `bucket` tokens (zeros past the row's
    end): under the causal mask no query of the sequence sees those later keys, and their outputs are dropped, so
    the result is the sequence alone while SDPA sees at most T / bucket distinct shapes (GPU attention kernels
    plan and tune per shape)."""
    T = q.shape[2]
    rows = []
    for b, lengths in enumerate(segments.row_lengths):
        parts, start = [], 0
        for n in lengths:
            span = min(-(-n // bucket) * bucket, -(-T // bucket) * bucket)
            qs, ks, vs = (x[b : b + 1, :, start : start + span] for x in (q, k, v))
            if qs.shape[2] < span:  # the row ends first: pad it (the padding is in every query's future)
                qs, ks, vs = (F.pad(x, (0, 0, 0, span - x.shape[2])) for x in (qs, ks, vs))
            out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=span > 1, scale=scale, enable_gqa=True)
            parts.append(out[:, :, :n])
            start += n
        rows.append(torch.cat(parts, dim=2))
    return torch.cat(rows, dim=0)


def _document_causal(ids: torch.Tensor, b, h, q_idx, kv_idx):
    # FlexAttention mask_mod over segment ids [B, T]: the key is not in the future and in the query's segment. A
    # module-level function bound with functools.partial (not a closure made per forward): a compiled layer that
    # receives the block mask then guards on this function, not on a new object every step.
    return (kv_idx <= q_idx) & (ids[b, q_idx] == ids[b, kv_idx])


def document_block_mask(segments: PackedSegments, device: torch.device):
    """FlexAttention's document-causal `BlockMask` for the packed batch of `segments` (B x T queries and keys),
    stored on `segments` and shared by every full-attention layer of the forward."""
    import functools

    from torch.nn.attention.flex_attention import create_block_mask

    if segments._block_mask is None:
        B, T = segments.ids.shape
        mask_mod = functools.partial(_document_causal, segments.ids)
        # Eagerly (before compiled layers) PyTorch builds the B x T x T mask at once; past a few thousand tokens a
        # compiled builder works block by block instead.
        long = T > 4096 and not torch.compiler.is_compiling()
        segments._block_mask = create_block_mask(mask_mod, B, None, T, T, device=device, _compile=long)
    return segments._block_mask


def packed_flex_attention(q, k, v, segments: PackedSegments, scale: float) -> torch.Tensor:
    """`packed_sdpa` through FlexAttention (PyTorch's `torch.nn.attention.flex_attention`) with a document-causal
    block mask: key blocks of other documents or of the future are skipped, not masked element by element. Fast
    only under torch.compile (eagerly PyTorch runs an unfused reference). The block mask is built once per forward
    (`document_block_mask`: before the layers when they are compiled one by one) and shared by the layers."""
    from torch.nn.attention.flex_attention import flex_attention

    # one dtype for FlexAttention (not an autocast op): under autocast the values' (bf16), as SDPA's autocast gives
    # the reference; q and k come out of the norms and RoPE in float32
    q, k = q.to(v.dtype), k.to(v.dtype)
    return flex_attention(q, k, v, block_mask=document_block_mask(segments, q.device), scale=scale, enable_gqa=True)


def _sliding_window_causal(window: int, b, h, q_idx, kv_idx):
    # FlexAttention mask_mod of CSA's local path: the key is the query's own position or one of the window - 1
    # before it (module level and bound with functools.partial: see `_document_causal`)
    return (kv_idx <= q_idx) & (q_idx - kv_idx < window)


def _completed_blocks(stride: int, b, h, q_idx, kv_idx):
    # FlexAttention mask_mod of CSA's compressed path: block kv_idx (positions stride * kv_idx ...) lies wholly
    # before the query at position q_idx
    return stride * (kv_idx + 1) <= q_idx


@_constant_cache(maxsize=16)
def csa_block_masks(seq_len: int, window: int, stride: int, device: torch.device) -> tuple:
    """FlexAttention block masks of compressed sparse attention on whole rows of `seq_len` tokens at positions
    0 .. seq_len - 1 (no cache, padding or packing) -> (local, compressed):

    * local: `seq_len` queries over `seq_len` keys, key at most `window` - 1 positions before the query;
    * compressed: `seq_len` queries over ceil(seq_len / stride) blocks, block j visible to the query at position
      t when stride * (j + 1) <= t (a query before the first completed block sees none: FlexAttention outputs 0).

    Both are broadcast over batch and heads and depend on the shape alone, so they are built once per shape and
    device (cached here) and the compiled layers receive the same objects every step, their tensors marked as static
    inputs (`torch._dynamo.mark_static_address`): CUDA graphs read them in place. FlexAttention skips the key
    blocks a mask rules out entirely, and no band or mask tensor is built in the layer's graph. Method:
    PyTorch's FlexAttention (`torch.nn.attention.flex_attention.create_block_mask`); the masks are those of
    `LlamaThinkCompressedSparseAttention._local_attention` and `_compressed_attention` on such rows."""
    from torch.nn.attention.flex_attention import create_block_mask

    blocks = -(-seq_len // stride)
    # PyTorch builds the whole seq_len x seq_len mask at once (about 10 bytes a pair); past a few thousand tokens a
    # compiled builder works block by block instead
    long = seq_len > 4096
    local = create_block_mask(
        functools.partial(_sliding_window_causal, window), None, None, seq_len, seq_len, device=device, _compile=long
    )
    compressed = create_block_mask(
        functools.partial(_completed_blocks, stride), None, None, seq_len, blocks, device=device, _compile=long
    )
    for mask in (local, compressed):  # unguarded: cudagraph trees record again should new masks replace these
        for t in mask.as_tuple(flatten=True):
            if isinstance(t, torch.Tensor):
                torch._dynamo.mark_static_address(t, guard=False)
    return local, compressed


# ----------------------------------------------------------------------------------------------------------------
# Mixers
# ----------------------------------------------------------------------------------------------------------------


# The longest context (`max_position_embeddings`) for which `decode_cuda_graphs=True` takes the static one-token step on
# CUDA: its buffers hold the whole context and every step attends over all of its slots, so its cost grows with the
# context, not with the tokens held. Measured with a tiny model on an H200 (session 51): 7.6x the eager step's tokens/s
# at 1024 positions, 0.44x at 131072 (break-even near 50K); larger models gain more from the saved launches.
STATIC_DECODE_MAX_POSITIONS = 16384


def _forward_hooks_present(modules) -> bool:
    """Whether any of `modules` has a forward (pre-)hook, or one is registered for every module
    (`torch.nn.modules.module.register_module_forward_hook`): hooks that must run on every step."""
    from torch.nn.modules import module as module_lib

    if module_lib._global_forward_hooks or module_lib._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def _padded_rows(weights: list[torch.Tensor]) -> torch.Tensor:
    """[rows_i, H] weights -> their rows stacked and zero rows added up to a multiple of 8 (16-byte rows of 16-bit
    outputs, which keep cuBLAS on its aligned kernels)."""
    pad = -sum(w.shape[0] for w in weights) % 8
    return cat_rows(weights + ([weights[0].new_zeros(pad, weights[0].shape[1])] if pad else []))


def cat_rows(tensors: list[torch.Tensor]) -> torch.Tensor:
    """`torch.cat(tensors)` along dim 0, of 16-bit tensors outside autocast: autocast's `cat` promotes its inputs to
    the widest float among them and its own dtype, and bf16 and fp16 have no widest (a bf16 stack under fp16
    autocast raised "Unexpected floating ScalarType"); stacking weights needs no cast (their product casts them)."""
    device = tensors[0].device.type
    sixteen_bit = tensors[0].dtype in (torch.float16, torch.bfloat16)
    if sixteen_bit and device in ("cuda", "cpu") and torch.is_autocast_enabled(device):
        with torch.autocast(device, enabled=False):
            return torch.cat(tensors)
    return torch.cat(tensors)


def needs_plain_autograd(*tensors: torch.Tensor, module: nn.Module | None = None) -> bool:
    """Whether the model must take its plain PyTorch forms instead of its own autograd Functions that lack torch.func
    rules (`_StackedGateProjections`, `_EmbeddingIndexAdd`, `_ChunkedLinearCrossEntropy`, fla's and FlashQLA's
    kernels) or a forward-mode derivative (all but `_EmbeddingIndexAdd`): True while a torch.func transform (grad,
    vjp, jvp, vmap, jacrev, ...) is active (the test `torch.autograd.Function.apply` makes before it refuses such a
    Function), or where one of `tensors` or of `module`'s parameters carries a forward-mode AD tangent
    (`torch.autograd.forward_ad`). False while tracing (torch.compile), which takes the Functions as they are.
    (vmap over token ids, masks or positions stays unsupported: the input checks read their values.)"""
    if torch.compiler.is_compiling():
        return False
    if torch._C._are_functorch_transforms_active():
        return True
    if torch.autograd.forward_ad._current_level < 0:  # no dual level entered: no tensor has a tangent
        return False
    params = module.parameters() if module is not None else ()
    return any(torch.autograd.forward_ad.unpack_dual(t).tangent is not None for t in (*tensors, *params))


class _StackedGateProjections(torch.autograd.Function):
    """`in_proj_z`, `in_proj_b`, `in_proj_a` of hidden [..., H] (weights w_z [Dv, H], w_b and w_a [Hv, H]) -> z
    [..., Dv], b and a [..., Hv], as one matrix product of the stacked weights (`_padded_rows`).

    The backward takes z's gradient and (b, a)'s apart: dx = dz w_z + d(b, a) w_(b, a) and the weight gradients
    dz^T x and d(b, a)^T x. The autograd of one product followed by a split would first concatenate dz, db and da
    into the stacked gradient, which inductor makes one pointwise kernel that evaluates the gated norm's,
    sigmoid's and softplus's backward for every element of every part (BENCHMARKS.md section 1, session 20); here
    only the 2 Hv + padding columns of (b, a) are concatenated. Under autocast the products run in the dtype the
    forward's product ran in (gradients in it, cast to each input's own dtype), as autocast's matrix products do."""

    @staticmethod
    def forward(ctx, hidden, w_z, w_b, w_a):
        zba = F.linear(hidden, _padded_rows([w_z, w_b, w_a]))  # [..., Dv + 2 Hv + pad]
        ctx.save_for_backward(hidden, w_z, w_b, w_a)
        ctx.compute_dtype = zba.dtype
        dv, hv = w_z.shape[0], w_b.shape[0]
        return zba[..., :dv], zba[..., dv : dv + hv], zba[..., dv + hv : dv + 2 * hv]

    @staticmethod
    def backward(ctx, dz, db, da):
        hidden, w_z, w_b, w_a = ctx.saved_tensors
        dtype = ctx.compute_dtype
        x = hidden.reshape(-1, hidden.shape[-1]).to(dtype)  # [N, H]
        # Each incoming gradient (autograd passes zeros for an output the loss does not use) as [N, n] rows. Traced
        # (torch.compile), a contiguous copy: AOTAutograd records a `reshape` as a view wherever the trace's strides
        # allowed one, and an op's strides at run time can differ from the trace's (softplus's backward under
        # dynamo's aot_eager backend), which makes that view fail; inductor computes the gradient straight into
        # the copy. Eagerly the strides are the real ones, and `reshape` copies only where it must.
        traced = torch.compiler.is_compiling()
        dz, db, da = (
            (g.to(dtype).clone(memory_format=torch.contiguous_format) if traced else g.to(dtype)).reshape(-1, n)
            for g, n in ((dz, w_z.shape[0]), (db, w_b.shape[0]), (da, w_a.shape[0]))
        )
        d_ba = _padded_rows([db.T, da.T]).T  # [N, 2 Hv + pad]: the stacked gradient of b and a only
        w_ba = _padded_rows([w_b, w_a]).to(dtype)  # [2 Hv + pad, H]
        dx = dz @ w_z.to(dtype) + d_ba @ w_ba  # [N, H]
        dw_z = dz.T @ x
        dw_ba = d_ba.T @ x  # [2 Hv + pad, H]
        hv = w_b.shape[0]
        return (
            dx.reshape(hidden.shape).to(hidden.dtype),
            dw_z.to(w_z.dtype),
            dw_ba[:hv].to(w_b.dtype),
            dw_ba[hv : 2 * hv].to(w_a.dtype),
        )


class LlamaThinkGatedDeltaNet(nn.Module):
    """Gated DeltaNet (linear attention with a delta-rule state), parameter-compatible with Qwen3.5's."""

    def __init__(self, config: LlamaThinkConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_k_heads = config.linear_num_key_heads
        self.num_v_heads = config.linear_num_value_heads
        self.head_k_dim = config.linear_key_head_dim
        self.head_v_dim = config.linear_value_head_dim
        self.key_dim = self.num_k_heads * self.head_k_dim
        self.value_dim = self.num_v_heads * self.head_v_dim
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.conv_parts = (self.key_dim, self.key_dim, self.value_dim)  # q, k, v channels of the qkv projection
        self.conv_kernel_size = config.linear_conv_kernel_dim
        self.chunk_size = config.gdn_chunk_size
        self.backend = config.gdn_backend
        if self.chunk_size != 64 and self.backend in ("fla", "flash_qla"):
            logger.warning_once(
                f"gdn_chunk_size={self.chunk_size} is the PyTorch kernels' chunk length: {self.backend}'s kernels "
                "always use chunks of 64 (the layer computes the same function either way)"
            )

        self.in_proj_qkv = nn.Linear(config.hidden_size, self.conv_dim, bias=False)
        self.in_proj_z = nn.Linear(config.hidden_size, self.value_dim, bias=False)
        self.in_proj_b = nn.Linear(config.hidden_size, self.num_v_heads, bias=False)
        self.in_proj_a = nn.Linear(config.hidden_size, self.num_v_heads, bias=False)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, kernel_size=self.conv_kernel_size, groups=self.conv_dim, bias=False
        )
        self.A_log = nn.Parameter(gdn_A_log_init(self.num_v_heads, config.A_init_range, device=None))
        self.dt_bias = nn.Parameter(gdn_dt_bias_init(self.num_v_heads, config.dt_init_range, device=None))
        self.norm = LlamaThinkGatedRMSNorm(self.head_v_dim, eps=config.rms_norm_eps)
        self.out_proj = nn.Linear(self.value_dim, config.hidden_size, bias=False)
        if self.backend != "torch":
            probe_fla()  # now, not on the first forward, where torch.compile would trace the lookup
        if self.backend == "flash_qla":
            probe_flash_qla()  # likewise

    @property
    def head_dims(self) -> tuple[int, int]:
        """(key head width, value head width): what FlashQLA's kernels are chosen by (`select_gdn_backend`)."""
        return self.head_k_dim, self.head_v_dim

    def _conv_left_padding(self) -> int:
        """How many zeros the conv module pads before its input (an int padding, "valid" or "same"); for a conv that
        PEFT wraps (LoRA, LoHa, LoKr: the wrapper's `base_layer`), the wrapped conv's, which the adapter's own conv
        matches (PEFT builds it with the base layer's padding)."""
        conv = self.conv1d.get_base_layer() if hasattr(self.conv1d, "get_base_layer") else self.conv1d
        padding = conv.padding
        if padding == "valid":
            return 0
        return (self.conv_kernel_size - 1) // 2 if padding == "same" else padding[0]

    def _conv_taps(self, like: torch.Tensor) -> torch.Tensor:
        """The conv's taps [C, K] in `like`'s dtype, read through a call of the module, for packed sequences (whose
        per-tap masks need the taps apart) when the conv is offloaded by accelerate (an offloaded weight is on the
        meta device until the module is called): its response to a unit impulse [1, C, 2K - 1] at position K - 1.
        Output j of a conv left-padded by P covers inputs j - P .. j - P + K - 1, so tap i is output P + K - 1 - i.
        Exact for a bias-free conv whose call only moves weights and tensors (accelerate's hook); any other hook or
        wrapper would see an impulse instead of its input, so such a conv is refused with packed sequences
        (ValueError)."""
        conv, K = self.conv1d, self.conv_kernel_size
        if not _moves_weights_only(conv, nn.Conv1d):
            raise ValueError(
                "packed sequences (position_ids restarting inside a row) need the Gated DeltaNet conv's taps, which a "
                f"hooked or wrapped conv1d ({type(conv).__name__} with forward hooks or a replaced forward) does not "
                "give without changing what its hooks see; run the documents as separate rows, or remove the hook"
            )
        impulse = like.new_zeros(1, self.conv_dim, 2 * K - 1)
        impulse[..., K - 1] = 1
        pad = self._conv_left_padding()
        return conv(impulse)[0, :, pad : pad + K].flip(-1).to(like.dtype)  # [C, K]

    def _causal_conv(
        self,
        qkv: torch.Tensor,
        state: GatedDeltaNetState | None,
        backend: str,
        segments: PackedSegments | None = None,
        segment_pos: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Depthwise causal conv + SiLU over qkv [B, T, C] (channels-last) -> its q, k and v channels [B, T,
        key_dim], [B, T, key_dim], [B, T, value_dim] (`conv_parts`); reads and updates the conv state [B, C, K-1]
        when caching. With packed `segments` (`segment_pos` [B, T]: each token's position in its sequence) a token
        sees no input from before the start of its sequence, as at the start of a row.

        Three forms of one function: fla's fused conv + SiLU (`backend` "fla" or "flash_qla", 16-bit, no cache;
        packed sequences through its `cu_seqlens`; its Gluon or Triton kernels, `fla_conv_kernels`), K shifted products (under torch.compile, where inductor
        fuses them with the SiLU, and for packed sequences without fla), and cuDNN's depthwise conv (eager, the CPU
        path). fla's runs once per part, on the part's channels where they lie in qkv's rows, so that q, k and v
        each come out contiguous: inductor then normalises q and k in one pass (it loops a row reduction over a
        slice of wider rows, BENCHMARKS.md section 1, session 32), and fla's delta rule takes v as it is."""
        B, T, C = qkv.shape
        K = self.conv_kernel_size
        plain = is_plain_module(self.conv1d, nn.Conv1d)
        if backend != "torch" and state is None and qkv.dtype in (torch.float16, torch.bfloat16) and plain:
            weight = self.conv1d.weight[:, 0]  # [C, K]
            if segments is None:
                return fla_causal_conv1d_silu_split(qkv, weight, self.conv_parts)
            flat = qkv.reshape(1, B * T, C)  # one row of the packed sequences
            parts = fla_causal_conv1d_silu_split(flat, weight, self.conv_parts, segments.cu_seqlens)
            return tuple(part.reshape(B, T, -1) for part in parts)  # [1, B*T, C_part] -> [B, T, C_part]
        if state is not None and state.conv is not None:
            x = torch.cat((state.conv.transpose(1, 2).to(qkv.dtype), qkv), dim=1)  # [B, K-1+T, C]
        else:
            x = F.pad(qkv, (0, 0, K - 1, 0))  # a fresh sequence sees zeros before position 0
        if state is not None:
            state.conv = x[:, x.shape[1] - (K - 1) :].transpose(1, 2).detach().clone()  # [B, C, K-1]
        if not plain and segment_pos is None:
            # Hooked or offloaded (accelerate loads an offloaded weight only inside the call): called as a module.
            # Output j of a conv left-padded by P covers inputs j - P .. j - P + K - 1 of x, so the windows that
            # end at x's last T positions are outputs P .. P + T - 1.
            pad = self._conv_left_padding()
            out = self.conv1d(x.transpose(1, 2))[:, :, pad : pad + T].transpose(1, 2)  # [B, T, C]
            return F.silu(out).split(self.conv_parts, dim=-1)
        weight = self._conv_taps(x) if not plain else self.conv1d.weight[:, 0].to(x.dtype)  # [C, K]
        if torch.compiler.is_compiling() or segment_pos is not None:
            # Each packed token counts an earlier input only inside its own sequence (packed batches have no state).
            out = None
            for i in range(K):
                term = x[:, i : i + T] * weight[:, i]  # [B, T, C]: the input K - 1 - i steps back
                if segment_pos is not None and i < K - 1:
                    term = term * (segment_pos >= K - 1 - i)[..., None].to(x.dtype)
                out = term if out is None else out + term
        else:
            out = F.conv1d(x.transpose(1, 2), weight[:, None], groups=C)[:, :, -T:].transpose(1, 2)  # [B, T, C]
        return F.silu(out).split(self.conv_parts, dim=-1)

    def _delta_rule(self, q, k, v, g, beta, initial_state, output_final_state, backend: str, segments=None):
        """The dispatch point of the delta-rule kernel given the gates: FlashQLA's, fla's or the PyTorch reference
        (`backend`, from `select_gdn_backend`), chunked or recurrent (eager fla calls that leave the gates to fla's
        kernels take `_gated_delta_rule_fused` instead, `_gates_in_kernel`). With packed `segments` the state
        starts from zero at each sequence: the GPU kernels' variable-length form over the flattened batch
        (`cu_seqlens`), or the PyTorch reference run on each sequence alone."""
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, g, beta))
        kernels = {"fla": FLA_GDN_KERNELS, "flash_qla": FLASH_QLA_GDN_KERNELS}.get(backend, GDN_KERNELS)
        if segments is not None:
            scale, B, T = self.head_k_dim**-0.5, q.shape[0], q.shape[1]
            if backend != "torch":
                flat = [x.reshape(1, B * T, *x.shape[2:]) for x in (q, k, v, g, beta)]  # [1, B*T, ...]
                o, _ = kernels["chunk"](*flat, scale, None, False, cu_seqlens=segments.cu_seqlens)
                return o.reshape(B, T, *o.shape[2:]), None
            outs = [[] for _ in range(B)]
            for b, start, end in segment_slices(segments):
                part = [x[b : b + 1, start:end] for x in (q, k, v, g, beta)]
                outs[b].append(kernels["chunk"](*part, scale, None, False, chunk_size=self.chunk_size)[0])
            return torch.cat([torch.cat(row, dim=1) for row in outs], dim=0), None
        if q.shape[1] == 1 and initial_state is not None and not needs_grad:
            return kernels["recurrent"](q, k, v, g, beta, self.head_k_dim**-0.5, initial_state, output_final_state)
        return kernels["chunk"](
            q, k, v, g, beta, self.head_k_dim**-0.5, initial_state, output_final_state, chunk_size=self.chunk_size
        )

    def forward(self, hidden_states: torch.Tensor, ctx: ForwardContext | None = None) -> torch.Tensor:
        """hidden_states [B, T, hidden_size] (normed) -> the mixer's output, the same shape: short causal conv over
        q, k, v, the gated delta rule (Yang et al. 2024, "Gated Delta Networks"; on CUDA the kernels `gdn_backend`
        names, fla's or FlashQLA's, else the PyTorch reference), the gated output norm and `out_proj`. `ctx` brings
        the cache, padding (`valid`) and packed segments; without it the rows are whole sequences, no cache."""
        if ctx is not None and ctx.static is not None:
            return self.decode_static(hidden_states, ctx)
        valid = ctx.valid if ctx is not None else None
        state = ctx.cache.layers[self.layer_idx] if ctx is not None and ctx.cache is not None else None
        segments = ctx.segments if ctx is not None else None

        qkv = self.in_proj_qkv(hidden_states)  # [B, T, conv_dim]
        if valid is not None:  # padding must not enter the conv state
            qkv = qkv * valid[..., None].to(qkv.dtype)
        # In training mode the answer does not depend on grad mode, so that the no-grad first pass of reentrant
        # gradient checkpointing chooses the same kernels as its recomputation.
        needs_grad = (torch.is_grad_enabled() or self.training) and (
            hidden_states.requires_grad or any(p.requires_grad for p in self.parameters())
        )
        # one choice for the layer; torch.func transforms and forward-mode AD run the PyTorch kernels (fla's have
        # neither rules for them nor a forward-mode derivative)
        backend = select_gdn_backend(self.backend, qkv.device, needs_grad, qkv.dtype, self.head_dims)
        if backend != "torch" and needs_plain_autograd(hidden_states, module=self):
            backend = "torch"
        segment_pos = ctx.position_ids if segments is not None else None
        q, k, v = self._causal_conv(qkv, state, backend, segments, segment_pos)  # [B, T, key/key/value_dim]
        z, b, a = self._gate_projections(hidden_states)
        initial_state = state.recurrent if state is not None else None
        if self._gates_in_kernel(backend, valid, q, initial_state):
            o, final_state = self._gated_delta_rule_fused(q, k, v, a, b, initial_state, state is not None, segments)
        else:
            q, k, v, g, beta = self._heads_and_gates(q, k, v, b, a, valid)
            o, final_state = self._delta_rule(q, k, v, g, beta, initial_state, state is not None, backend, segments)
        if state is not None:
            state.recurrent = final_state.detach()
        # fla's gated norm where fla's kernels train this layer (`backend` follows `gdn_backend` and the GPU), in
        # both passes of reentrant gradient checkpointing (`needs_grad` does not depend on grad mode in training)
        return self._output(o, z, hidden_states.dtype, fused_norm=backend in ("fla", "flash_qla") and needs_grad)

    def _gates_in_kernel(self, backend: str, valid: torch.Tensor | None, q: torch.Tensor, initial_state) -> bool:
        """Whether fla's kernels compute this call's gates (`_gated_delta_rule_fused`): eager fla calls of the chunked
        kernel (not a one-token step from a state, which `_delta_rule` may give the recurrent kernel) without padding
        (whose mask enters the gates), on 16-bit inputs, with a fla that has the fused gates
        (`fla_fused_gates_available`). The answer does not depend on grad mode (reentrant gradient checkpointing's
        no-grad pass and its recomputation run the same kernels). Under torch.compile the gates stay in the traced
        graph, where inductor fuses them with the conv."""
        if backend != "fla" or valid is not None or q.dtype not in (torch.float16, torch.bfloat16):
            return False
        if torch.compiler.is_compiling() or (q.shape[1] == 1 and initial_state is not None):
            return False
        return fla_fused_gates_available()

    def _gated_delta_rule_fused(self, q, k, v, a, b, initial_state, output_final_state: bool, segments=None):
        """The conv's q, k, v channels [B, T, key_dim / key_dim / value_dim] and the gate pre-activations a, b [B, T,
        Hv] -> the delta rule's output [B, T, Hv, Dv] and final state, with q and k normalised by one fused RMSNorm
        each (`l2norm_rms`) and beta and the decay computed by fla's kernels (`fla_chunk_gated_delta_rule_gated`):
        the function of `_heads_and_gates` then `_delta_rule`, in a few kernels instead of a dozen element-wise
        passes and their backward. Key heads are not repeated: fla serves groups of value heads itself."""
        B, T, _ = q.shape
        q = l2norm_rms(q.reshape(B, T, self.num_k_heads, self.head_k_dim))
        k = l2norm_rms(k.reshape(B, T, self.num_k_heads, self.head_k_dim))
        v = v.reshape(B, T, self.num_v_heads, self.head_v_dim)
        scale, params = self.head_k_dim**-0.5, (self.A_log, self.dt_bias)
        if segments is None:
            return fla_chunk_gated_delta_rule_gated(q, k, v, a, b, *params, scale, initial_state, output_final_state)
        flat = [x.reshape(1, B * T, *x.shape[2:]) for x in (q, k, v, a, b)]  # [1, B*T, ...]: one packed row
        o, _ = fla_chunk_gated_delta_rule_gated(*flat, *params, scale, cu_seqlens=segments.cu_seqlens)
        return o.reshape(B, T, *o.shape[2:]), None

    def _gate_projections(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`in_proj_z`, `in_proj_b` and `in_proj_a` of hidden_states [B, T, hidden] -> z [B, T, value_dim] and the
        beta and decay pre-activations b, a [B, T, Hv].

        Where all three are plain Linears of one dtype (`is_plain_linear`: not PEFT's LoRA wrappers, not hooked or
        offloaded), one matrix product with their weights stacked, its rows padded with zeros to a multiple of 8:
        reads the input once, and keeps cuBLAS off its slow kernels for b and a alone (Hv = 9 outputs in the 95M
        model: 18 bf16 bytes a row, not a multiple of 16). Otherwise, and for one token per row (decoding, where
        stacking would copy the weights every step to save nothing), each projection is called as a module. The
        parameters and the state dict stay the three projections (Qwen3.5's layout). The stacked product's
        backward takes z's gradient and (b, a)'s apart (`_StackedGateProjections`)."""
        projections = (self.in_proj_z, self.in_proj_b, self.in_proj_a)
        plain = all(is_plain_linear(m) for m in projections) and len({m.weight.dtype for m in projections}) == 1
        if not plain or hidden_states.shape[1] == 1 or needs_plain_autograd(hidden_states, module=self):
            return tuple(m(hidden_states) for m in projections)
        return _StackedGateProjections.apply(hidden_states, *(m.weight for m in projections))

    def _heads_and_gates(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        b: torch.Tensor,
        a: torch.Tensor,
        valid: torch.Tensor | None,
    ):
        """The conv's q, k, v channels [B, T, key_dim / key_dim / value_dim] (`_causal_conv`) and the gate projections
        b, a [B, T, Hv] (`_gate_projections`) -> q, k (L2-normed, fp32), v [B, T, H, D]; log-decay g and beta
        [B, T, Hv]."""
        B, T, _ = q.shape
        q = q.reshape(B, T, self.num_k_heads, self.head_k_dim)
        k = k.reshape(B, T, self.num_k_heads, self.head_k_dim)
        v = v.reshape(B, T, self.num_v_heads, self.head_v_dim)
        if self.num_v_heads > self.num_k_heads:  # each key head serves a group of consecutive value heads
            q = q.repeat_interleave(self.num_v_heads // self.num_k_heads, dim=2)
            k = k.repeat_interleave(self.num_v_heads // self.num_k_heads, dim=2)
        acc = _acc_dtype(v.dtype)  # q/k normalisation, gates and the state are kept in fp32
        q, k = l2norm(q.to(acc)), l2norm(k.to(acc))
        beta = torch.sigmoid(b.to(acc))  # [B, T, Hv]
        g = -self.A_log.to(acc).exp() * F.softplus(a.to(acc) + self.dt_bias.to(acc))
        if valid is not None:  # padded steps: decay 1, no write -> the recurrent state passes through unchanged
            beta = beta * valid[..., None]
            g = g * valid[..., None]
        return q, k, v, g, beta

    def _output(self, o: torch.Tensor, z: torch.Tensor, dtype: torch.dtype, fused_norm: bool = False) -> torch.Tensor:
        """Delta-rule output o [B, T, Hv, Dv] and the output gate's projection z [B, T, value_dim] -> [B, T, hidden];
        o enters the gated norm in `dtype` (the mixer input's). `fused_norm` (training on fla's kernels): the norm
        runs fla's fused kernel where it takes o (`LlamaThinkGatedRMSNorm.fla_takes`), reading o as the delta rule
        gives it (16-bit; float32 inside). A norm replaced by another module (PEFT's wrappers) is called as before."""
        B, T, _ = z.shape
        z = z.reshape(B, T, self.num_v_heads, self.head_v_dim)
        if fused_norm and type(self.norm) is LlamaThinkGatedRMSNorm and self.norm.fla_takes(o):
            o = self.norm(o, z, fused=True)
        else:
            o = self.norm(o.to(dtype), z)  # [B, T, Hv, Dv]
        return self.out_proj(o.reshape(B, T, self.value_dim))

    def decode_static(self, hidden_states: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """One-token step on the fixed buffers of a `_StaticDecoder` (updated in place: CUDA-graph capturable)."""
        state = ctx.static.layers[self.layer_idx]
        qkv = self.in_proj_qkv(hidden_states)  # [B, 1, conv_dim]
        window = torch.cat((state.conv, qkv.transpose(1, 2).to(state.conv.dtype)), dim=-1)  # [B, conv_dim, K]
        state.conv.copy_(window[:, :, 1:])
        qkv = F.silu((window * self.conv1d.weight[:, 0].to(window.dtype)).sum(-1, keepdim=True))  # [B, conv_dim, 1]
        z, b, a = self._gate_projections(hidden_states)
        parts = qkv.transpose(1, 2).to(hidden_states.dtype).split(self.conv_parts, dim=-1)  # [B, 1, C_part] each
        q, k, v, g, beta = self._heads_and_gates(*parts, b, a, None)
        # The PyTorch step, also where fla is installed: inside a CUDA graph its handful of small kernels cost no
        # launch overhead, and it is the path whose capture is tested (fla's Triton launcher is not needed here).
        o, final_state = torch_recurrent_gated_delta_rule(
            q, k, v, g, beta, self.head_k_dim**-0.5, state.recurrent, True
        )
        state.recurrent.copy_(final_state)
        return self._output(o, z, hidden_states.dtype)

    # --- decode state of this mixer (`LlamaThinkCache`, `_StaticDecoder`) and its cost ---------------------------
    state_class = GatedDeltaNetState

    def allocate_static_state(
        self, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype
    ) -> GatedDeltaNetState:
        """Zeroed fixed buffers of `decode_static`: conv [B, conv_dim, K-1] in `dtype` and the delta-rule state
        [B, Hv, Dk, Dv] in the accumulation dtype (fp32; fp64 for fp64 models). `max_len` is unused: the state
        does not grow with the sequence."""
        state = GatedDeltaNetState()
        state.conv = torch.zeros(batch_size, self.conv_dim, self.conv_kernel_size - 1, device=device, dtype=dtype)
        state.recurrent = torch.zeros(
            batch_size, self.num_v_heads, self.head_k_dim, self.head_v_dim, device=device, dtype=_acc_dtype(dtype)
        )
        return state

    def load_static_state(self, static_state: GatedDeltaNetState, cache_state: GatedDeltaNetState, seq_length: int):
        """Copy a cache's state into the buffers of `allocate_static_state` (`seq_length` is unused here)."""
        static_state.conv.copy_(cache_state.conv)
        static_state.recurrent.copy_(cache_state.recurrent)

    def store_static_state(
        self,
        static_state: GatedDeltaNetState,
        cache_state: GatedDeltaNetState,
        seq_length: int,
        key_valid: torch.Tensor,
        max_real_length: int,
    ):
        """The inverse of `load_static_state`: copies of the buffers become the cache's own tensors."""
        cache_state.conv, cache_state.recurrent = static_state.conv.clone(), static_state.recurrent.clone()

    @staticmethod
    def flops_per_token(config: LlamaThinkConfig, seq_len: int) -> float:
        """Training FLOPs (forward + backward) per token of one layer's sequence mixing, beyond its weight matmuls:
        12 * Hv * Dk * Dv, the delta-rule state read and write (2 products x 2 FLOPs/MAC x 3), whatever `seq_len`."""
        return 12.0 * config.linear_num_value_heads * config.linear_key_head_dim * config.linear_value_head_dim


class LlamaThinkAttention(nn.Module):
    """Gated full softmax attention: q_proj gives a query and a sigmoid output gate per head (interleaved per head,
    the layout of Qwen3.5's q_proj), per-head QK RMSNorm before partial RoPE, grouped-query attention."""

    def __init__(self, config: LlamaThinkConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.num_groups = self.num_heads // self.num_kv_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.q_proj = nn.Linear(config.hidden_size, 2 * self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.q_norm = LlamaThinkRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = LlamaThinkRMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, tables: RotaryTables | None = None):
        """x [B, T, hidden] -> q [B, Hq, T, D] (RoPE'd), k [B, Hkv, T, D] (RoPE'd), k_raw (normed, un-RoPE'd), v,
        gate [B, T, Hq*D]; cos/sin [B, T, R] and, where given, their `rotary_tables` (`apply_rotary`)."""
        B, T, _ = x.shape
        q, k, v = stacked_projections(x, (self.q_proj, self.k_proj, self.v_proj))
        q, gate = q.view(B, T, self.num_heads, 2 * self.head_dim).chunk(2, dim=-1)
        gate = gate.reshape(B, T, self.num_heads * self.head_dim)
        q = self.q_norm(q).transpose(1, 2)  # [B, Hq, T, D]
        k_raw = self.k_norm(k.view(B, T, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        return apply_rotary(q, cos, sin, tables), apply_rotary(k_raw, cos, sin, tables), k_raw, v, gate

    def _grouped_sdpa(self, q, k, v, mask, grouped: bool = False) -> torch.Tensor:
        """SDPA of q [..., Hq, L, D] over k, v [..., Hkv, S, D] with a bool mask [..., 1, L, S] shared by the heads,
        or (`grouped`) that mask already tiled by `_grouped_mask` ([N, 1, G * L, S], N the leading dims' product).

        GQA without copying keys: the G query heads of a kv head are stacked along the query length
        ([..., Hkv, G * L, D]), so each kv head is read once and the mask is tiled G times instead."""
        *lead, Hq, L, D = q.shape
        G, S = self.num_groups, k.shape[-2]
        # the fused SDPA kernels take 4-D inputs only: fold the leading dims into one batch dim
        q = q.reshape(-1, self.num_kv_heads, G * L, D)  # query head h = kv head h // G, group member h % G
        k, v = k.reshape(-1, self.num_kv_heads, S, D), v.reshape(-1, self.num_kv_heads, S, D)
        if not grouped:
            mask = self._grouped_mask(mask, L, S)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling)
        return out.reshape(*lead, Hq, L, D)

    def _grouped_mask(self, mask: torch.Tensor, L: int, S: int) -> torch.Tensor:
        """A bool mask [..., 1, L, S] of one query head -> [N, 1, G * L, S] for `_grouped_sdpa`'s stacked groups."""
        G = self.num_groups
        return mask.reshape(-1, 1, 1, L, S).expand(-1, 1, G, L, S).reshape(-1, 1, G * L, S)

    def uses_flex_attention(self, device: torch.device) -> bool:
        """Whether packed batches go through FlexAttention when this layer runs compiled: on CUDA (PyTorch has no
        FlexAttention backward on CPU) with heads of at least 16 (the narrowest inductor's kernels take)."""
        return device.type == "cuda" and self.head_dim >= 16

    def _attend_packed(self, q, k, v, segments: PackedSegments) -> torch.Tensor:
        """Causal attention inside each packed sequence -> [B, Hq, T, D], with no T x T mask: FlexAttention under
        torch.compile (which fuses it), causal SDPA on each sequence eagerly (and for heads narrower than 16, which
        inductor's FlexAttention kernels do not take)."""
        if torch.compiler.is_compiling() and self.uses_flex_attention(q.device):
            return packed_flex_attention(q, k, v, segments, self.scaling)
        return packed_sdpa(q, k, v, segments, self.scaling)

    def _attend(self, q, k, v, ctx: ForwardContext | None) -> torch.Tensor:
        """Causal GQA softmax attention of the T new queries over all S = past + T keys -> [B, Hq, T, D]."""
        if ctx is not None and ctx.segments is not None:  # (packed sequences come without cache and padding)
            return self._attend_packed(q, k, v, ctx.segments)
        T, S = q.shape[2], k.shape[2]
        key_valid = ctx.key_valid if ctx is not None else None
        if key_valid is None and S == T:
            return F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, scale=self.scaling, enable_gqa=True)
        # Query i sits at index S - T + i; it sees keys at indices <= its own, and never padding. Its own key is
        # always allowed so that a padding query has one key to look at (its output is ignored, but stays finite).
        q_idx = torch.arange(S - T, S, device=q.device)[:, None]
        k_idx = torch.arange(S, device=q.device)[None, :]
        mask = k_idx <= q_idx  # [T, S]
        if key_valid is not None:
            mask = (mask & key_valid[:, None, :]) | (k_idx == q_idx)  # [B, T, S]
            mask = mask[:, None]  # [B, 1, T, S]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling, enable_gqa=True)

    def forward(self, hidden_states: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """hidden_states [B, T, hidden_size] (normed) -> [B, T, hidden_size]: causal grouped-query attention
        with partial RoPE, q/k norms and a sigmoid output gate (Qwen3.5's gated attention), over the cache's earlier
        positions where `ctx.cache` holds some; padding and packed segments as `ctx` says."""
        if ctx.static is not None:
            return self.decode_static(hidden_states, ctx)
        B, T, _ = hidden_states.shape
        q, k, _, v, gate = self.project(hidden_states, ctx.cos, ctx.sin, ctx.rotary_tables)
        state = ctx.cache.layers[self.layer_idx] if ctx.cache is not None else None
        if state is not None:
            if state.keys is not None:
                k = torch.cat((state.keys, k), dim=2)
                v = torch.cat((state.values, v), dim=2)
            state.keys, state.values = k.detach(), v.detach()
        out = self._attend(q, k, v, ctx)  # [B, Hq, T, D]
        out = out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)
        return self.o_proj(out * torch.sigmoid(gate))

    def decode_static(self, hidden_states: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """One-token step: write K/V at slot `index` of the fixed [B, Hkv, max_len, D] buffers, attend the real
        tokens among slots <= it."""
        B = hidden_states.shape[0]
        static = ctx.static
        state, index = static.layers[self.layer_idx], static.index
        q, k, _, v, gate = self.project(hidden_states, ctx.cos, ctx.sin, ctx.rotary_tables)
        state.keys.index_copy_(2, index, k.to(state.keys.dtype))
        state.values.index_copy_(2, index, v.to(state.values.dtype))
        mask = (static.slots[: state.keys.shape[2]] <= index) & static.key_valid  # [B, max_len]
        out = self._grouped_sdpa(q, state.keys, state.values, mask[:, None, None])  # [B, Hq, 1, D]
        return self.o_proj(out.reshape(B, 1, -1) * torch.sigmoid(gate))

    # --- decode state of this mixer (`LlamaThinkCache`, `_StaticDecoder`) and its cost ---------------------------
    state_class = AttentionState

    def allocate_static_state(
        self, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype
    ) -> AttentionState:
        """Zeroed fixed buffers of `decode_static`: keys and values [B, Hkv, max_len, D], slot i = cache index i."""
        state = AttentionState()
        state.keys = torch.zeros(batch_size, self.num_kv_heads, max_len, self.head_dim, device=device, dtype=dtype)
        state.values = torch.zeros_like(state.keys)
        return state

    def load_static_state(self, static_state: AttentionState, cache_state: AttentionState, seq_length: int):
        """Copy a cache's `seq_length` keys and values into the first slots of the buffers."""
        static_state.keys[:, :, :seq_length].copy_(cache_state.keys)
        static_state.values[:, :, :seq_length].copy_(cache_state.values)

    def store_static_state(
        self,
        static_state: AttentionState,
        cache_state: AttentionState,
        seq_length: int,
        key_valid: torch.Tensor,
        max_real_length: int,
    ):
        """The inverse of `load_static_state`: copies of the first `seq_length` slots become the cache's tensors."""
        cache_state.keys = static_state.keys[:, :, :seq_length].clone()
        cache_state.values = static_state.values[:, :, :seq_length].clone()

    @staticmethod
    def flops_per_token(config: LlamaThinkConfig, seq_len: int) -> float:
        """Training FLOPs (forward + backward) per token of one layer's attention scores and weighted sum, beyond
        its weight matmuls: 6 * Hq * D * seq_len (QK^T and AV over seq_len / 2 keys on average (causal), 2 FLOPs per
        multiply-add, x3 for forward + backward)."""
        return 6.0 * config.num_attention_heads * config.head_dim * seq_len


class LlamaThinkCompressedSparseAttention(LlamaThinkAttention):
    """Compressed sparse attention: a causal local window blended with attention over compressed blocks.

    * local path: softmax attention over the last `csa_window` positions (the query's own included);
    * compressed path: k-normed keys and values are mean-pooled over blocks of `csa_stride` positions, refined by
      `compress_k` / `compress_v`, keys RoPE'd at the block centre `stride * j + stride // 2`; a query at position
      t attends block j only when the block lies wholly before it, `stride * (j + 1) <= t` (no block: output 0);
    * `blend = sigmoid(blend_proj(x))` per token and channel mixes the two, then the output gate and projection
      (`blend_proj` has a bias, starting at `config.csa_blend_bias`, when that is set).

    Blocks are cut by each row's token positions, so left padding does not shift them. Neither path builds a
    T x T mask: the window runs over query chunks against a (chunk + window) key band, and the compressed path
    scores T queries against T / stride blocks; both through SDPA with the GQA groups folded into the query length.
    """

    # The local path's query chunk (`_local_attention`): any size gives the same attention. 128 rather than whole
    # windows: at the seed's W = 512 a whole-window chunk scores 2W keys per query for the W it may see, and the
    # step's attention kernels were 0.55 ms (10%) faster at 128 on an H200 (BENCHMARKS.md section 1, session 35);
    # 64 was slower again (more, smaller chunks). Windows of 128 or less run whole, as before.
    local_chunk: int = 128
    # Whether whole rows may take FlexAttention where `uses_flex_window` allows it; False (on an instance) keeps this
    # layer's SDPA paths in every mode, for comparing the two paths' training (`bench_quality.py`'s `csa_flex=0`)
    # and for tests that need every mode to run the same kernels. Either way the attention is the same function.
    flex_window: bool = True

    def __init__(self, config: LlamaThinkConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.stride = config.csa_stride
        self.window = csa_window(config)
        kv_width = self.num_kv_heads * self.head_dim
        self.compress_k = nn.Linear(kv_width, kv_width, bias=False)
        self.compress_v = nn.Linear(kv_width, kv_width, bias=False)
        self.blend_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        if config.csa_blend_bias is not None:  # at its start value (also set by `_init_weights`), drawing no random
            # numbers, so a model with the bias gets every other tensor of the model without it at the same seed; a
            # module built on its own (not through the model's init) never holds uninitialised memory
            self.blend_proj.bias = nn.Parameter(
                torch.full((self.num_heads * self.head_dim,), float(config.csa_blend_bias))
            )
            self.blend_proj._bias_init = float(config.csa_blend_bias)

    def uses_flex_attention(self, device: torch.device) -> bool:
        """Never: packed CSA cuts its window and blocks per sequence itself (`_local_attention`,
        `_compressed_attention_packed`)."""
        return False

    def uses_flex_window(self, device: torch.device) -> bool:
        """Whether whole rows (no cache, padding or packing) go through FlexAttention when this layer runs compiled
        by inductor with CUDA graphs (`_attend_flex`, with `csa_block_masks`; `LlamaThinkModel.forward` decides):
        on CUDA (PyTorch has no FlexAttention backward on CPU) with heads of at least 16 (the narrowest inductor's
        kernels take), unless `flex_window` is off."""
        return self.flex_window and device.type == "cuda" and self.head_dim >= 16

    def _attend_flex(self, q, k, k_raw, v, ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Both paths on whole rows through FlexAttention -> (local, compressed), each [B, Hq, T, D]: q [B, Hq, T, D]
        and k [B, Hkv, T, D] RoPE'd, k_raw (normed, not RoPE'd) and v [B, Hkv, T, D] of positions 0 .. T - 1, with
        the masks of `csa_block_masks(T, window, stride, device)` in `ctx.csa_block_masks`. The same attention as
        `_local_attention` and `_compressed_attention` on such rows (their SDPA forms are the reference); fast only
        under torch.compile, which fuses the masks into FlexAttention's kernels (eagerly PyTorch runs an unfused
        reference, and has no backward on CPU)."""
        from torch.nn.attention.flex_attention import flex_attention

        local_mask, blocks_mask = ctx.csa_block_masks
        B, Hkv, T, D = k_raw.shape
        S, nb = self.stride, -(-T // self.stride)
        # one dtype for FlexAttention (it is not an autocast op): under autocast the values' (bf16), which SDPA's
        # autocast gives the SDPA paths too; q and k come out of the norms and RoPE in float32
        q, k = q.to(v.dtype), k.to(v.dtype)
        local = flex_attention(q, k, v, block_mask=local_mask, scale=self.scaling, enable_gqa=True)
        # means over blocks of S positions, the last one zero-padded (attended only once complete, so dividing by
        # S is exact): [B, Hkv, T, D] -> [B, nb, Hkv * D]
        k_mean, v_mean = (
            F.pad(x, (0, 0, 0, nb * S - T)).view(B, Hkv, nb, S, D).sum(3).div(S).transpose(1, 2).reshape(B, nb, -1)
            for x in (k_raw, v)
        )
        blocks_k = self.compress_k(k_mean).view(B, nb, Hkv, D).transpose(1, 2)  # [B, Hkv, nb, D]
        blocks_v = self.compress_v(v_mean).view(B, nb, Hkv, D).transpose(1, 2)
        centre = (torch.arange(nb, device=q.device) * S + S // 2)[None]  # [1, nb]
        cos, sin = ctx.rotary(centre, blocks_k.dtype)  # RoPE at the block centre
        blocks_k = apply_rotary(blocks_k, cos, sin).to(blocks_v.dtype)
        comp = flex_attention(q, blocks_k, blocks_v, block_mask=blocks_mask, scale=self.scaling, enable_gqa=True)
        return local, comp

    def _local_attention(
        self,
        q,
        k,
        v,
        valid,
        state: CompressedAttentionState | None,
        segment_ids: torch.Tensor | None = None,
        shared: dict | None = None,
    ) -> torch.Tensor:
        """Sliding-window causal attention -> [B, Hq, T, D]; updates the state's window when caching.

        Queries go in chunks of C = min(T, W, `local_chunk`); chunk c attends the band of C + W keys that starts W
        positions before it (one more than the W - 1 earlier positions a query may see, so the band is a round 128
        for W = 64), one SDPA call over all chunks with a [C, C + W] band mask: no T x T mask, no copies of kv heads.
        A query scores C + W keys of which it may see W, so shorter chunks waste less (W / (C + W) of the scores
        count) for more, smaller chunks. With packed `segment_ids` [B, T] a query also sees only keys of its own
        sequence. Without a cache the mask depends only on the forward's padding and segments, the same for every
        CSA layer: with `shared` (`ForwardContext.shared`, eager forwards) it is made once per forward."""
        B, Hkv, T, D = k.shape
        W = self.window
        C = min(T, W, self.local_chunk)  # query chunk; chunk c needs keys [c*C, c*C + C + W)
        n = -(-T // C)
        pad = n * C - T
        if state is None:  # the W slots before the row hold no key (zeros, masked)
            keys, values = (F.pad(x, (0, 0, W, pad)) for x in (k, v))  # [B, Hkv, W + n*C, D]
        else:
            if state.window_k is not None:  # the W - 1 cached positions, one invalid slot before
                past_k, past_v = F.pad(state.window_k, (0, 0, 1, 0)), F.pad(state.window_v, (0, 0, 1, 0))
                past_valid = F.pad(state.window_valid, (1, 0), value=False)
            else:
                past_k, past_v = k.new_zeros(B, Hkv, W, D), v.new_zeros(B, Hkv, W, D)
                past_valid = torch.zeros(B, W, dtype=torch.bool, device=k.device)
            new_valid = valid if valid is not None else torch.ones(B, T, dtype=torch.bool, device=k.device)
            keys = torch.cat((past_k, k), dim=2)  # [B, Hkv, W + T, D]; query i sits at index W + i
            values = torch.cat((past_v, v), dim=2)
            key_valid = torch.cat((past_valid, new_valid), dim=1)  # [B, W + T]
            state.window_k = keys[:, :, T + 1 :].detach()
            state.window_v = values[:, :, T + 1 :].detach()
            state.window_valid = key_valid[:, T + 1 :]
            keys, values = (F.pad(x, (0, 0, 0, pad)) for x in (keys, values))
            shared = None  # (the window's validity is this layer's own)

        def band_mask() -> torch.Tensor:  # [B, n, C, C + W]
            if state is None:
                real = valid if valid is not None else torch.ones(B, T, dtype=torch.bool, device=k.device)
                slots = F.pad(real, (W, pad), value=False)  # [B, W + n*C]
            else:
                slots = F.pad(key_valid, (0, pad), value=False)
            slots = slots.unfold(1, C + W, C)  # [B, n, C + W]
            r = torch.arange(C, device=q.device)[:, None]
            o = torch.arange(C + W, device=q.device)[None, :]
            band = (o > r) & (o <= r + W)  # [C, C + W]: query r sees band offsets r+1..r+W (itself at r + W)
            allowed = band & slots[:, :, None, :]  # [B, n, C, C + W]
            if segment_ids is not None:  # (packed sequences come without cache: the W slots before the row are empty)
                key_ids = F.pad(segment_ids, (W, pad), value=-1).unfold(1, C + W, C)  # [B, n, C + W]
                query_ids = F.pad(segment_ids, (0, pad), value=-1).view(B, n, C)
                allowed = allowed & (key_ids[:, :, None, :] == query_ids[..., None])
            return self._grouped_mask(allowed | (o == r + W), C, C + W)  # own key always allowed

        mask = per_forward(shared, ("csa_local", W, C, self.num_groups), band_mask)
        q = F.pad(q, (0, 0, 0, pad)).view(B, self.num_heads, n, C, D).transpose(1, 2)  # [B, n, Hq, C, D]
        keys = keys.unfold(2, C + W, C).permute(0, 2, 1, 4, 3)  # [B, n, Hkv, C + W, D]
        values = values.unfold(2, C + W, C).permute(0, 2, 1, 4, 3)
        out = self._grouped_sdpa(q, keys, values, mask, grouped=True)  # [B, n, Hq, C, D]
        return out.transpose(1, 2).reshape(B, self.num_heads, n * C, D)[:, :, :T]

    def _compressed_attention(self, q, k_raw, v, ctx: ForwardContext) -> torch.Tensor:
        """Attention over completed compressed blocks -> [B, Hq, T, D]; updates the cached blocks when caching."""
        B, Hkv, T, D = k_raw.shape
        S, E = self.stride, Hkv * D
        state = ctx.cache.layers[self.layer_idx] if ctx.cache is not None else None
        pos = ctx.position_ids  # [B, T]
        valid = ctx.valid
        # Without a cache every row's blocks start at block 0 and what follows depends only on the forward's
        # positions and padding, the same for every CSA layer: with `ctx.shared` (eager forwards) the block slots,
        # the blocks' RoPE tables and the mask are made once per forward (`per_forward`).
        shared = ctx.shared if state is None else None
        p0 = ctx.real_lengths if ctx.real_lengths is not None else torch.zeros(B, dtype=torch.long, device=q.device)
        base = p0 // S  # block holding this chunk's first position, per row

        # 1) Pool this chunk's keys/values into blocks base, base+1, ... (by position; padding to a dump slot).
        # at most this many blocks are touched: with a cache the first may be partly cached, one more; without one
        # every row numbers its real tokens from 0 (the model's forward checks it), so ceil(T / S) blocks hold them
        # all (SDPA then scores a round 256 blocks at the seed's T = 1024, S = 4, not 257)
        nb = (T + 2 * S - 2) // S if ctx.real_lengths is not None else -(-T // S)

        def block_slots() -> torch.Tensor:  # [B, T]: each token's block, relative to `base`; padding: slot nb
            rel = pos // S - base[:, None]
            return rel.masked_fill(~valid, nb) if valid is not None else rel

        rel = per_forward(shared, ("csa_slots", S, nb), block_slots)
        kv = torch.cat((k_raw, v), dim=1).transpose(1, 2).reshape(B, T, 2 * E)  # [B, T, 2E]: k heads | v heads
        sums = kv.new_zeros(B, nb + 1, 2 * E).scatter_add(1, rel[..., None].expand(B, T, 2 * E), kv)
        if state is not None and state.partial is not None:  # cached members of block `base`
            in_block = torch.arange(S, device=q.device)[None, :] < (p0 % S)[:, None]  # [B, S]
            sums[:, 0] += (state.partial * in_block[..., None]).sum(1).to(sums.dtype)
        mean = sums[:, :nb] / S  # only complete blocks are ever attended, so dividing by S is exact
        new_k = self.compress_k(mean[..., :E]).view(B, nb, Hkv, D).transpose(1, 2)  # [B, Hkv, nb, D]
        new_v = self.compress_v(mean[..., E:]).view(B, nb, Hkv, D).transpose(1, 2)
        new_abs = base[:, None] + torch.arange(nb, device=q.device)[None, :]  # absolute block index [B, nb]
        cos, sin = per_forward(  # RoPE at the block centre
            shared, ("csa_rope", S, nb, new_k.dtype), lambda: ctx.rotary(new_abs * S + S // 2, new_k.dtype)
        )
        new_k = apply_rotary(new_k, cos, sin)

        # 2) Attend over cached blocks (absolute slots 0..N-1, valid below `base`) and this chunk's blocks.
        if state is not None and state.blocks_k is not None:
            n_cached = state.blocks_k.shape[2]
            cached_abs = torch.arange(n_cached, device=q.device)[None, :].expand(B, n_cached)
            cached_abs = cached_abs.masked_fill(cached_abs >= base[:, None], torch.iinfo(torch.long).max)
            blocks_k = torch.cat((state.blocks_k, new_k), dim=2)
            blocks_v = torch.cat((state.blocks_v, new_v), dim=2)
            block_abs = torch.cat((cached_abs, new_abs), dim=1)
        else:
            blocks_k, blocks_v, block_abs = new_k, new_v, new_abs
        visible = per_forward(  # [B, T, N]: block j visible iff S(j+1) <= t, as `_attend_blocks` takes it
            shared,
            ("csa_blocks", S, nb, self.num_groups),
            lambda: self._blocks_mask(block_abs[:, None, :] < (pos // S)[:, :, None]),
        )
        out = self._attend_blocks(q, blocks_k, blocks_v, visible)

        if state is not None:
            self._update_blocks(
                state, new_k, new_v, kv, pos, valid, base, ctx.new_real_lengths, ctx.max_new_real_length
            )
        return out

    def _compressed_attention_packed(self, q, k_raw, v, ctx: ForwardContext) -> torch.Tensor:
        """`_compressed_attention` for packed sequences -> [B, Hq, T, D]: each sequence pools its own blocks, aligned
        to its own start (block j = its positions S*j .. S*j + S - 1), and a query attends only its own sequence's
        completed blocks. Only complete blocks are ever attended, so each row needs at most T // S block slots: the
        complete blocks of its sequences, in order; the tokens of a sequence's unfinished last block go to a dump
        slot."""
        B, Hkv, T, D = k_raw.shape
        S, E = self.stride, Hkv * D
        pos, ids, lengths = ctx.position_ids, ctx.segments.ids, ctx.segments.lengths  # [B, T] each
        nb = T // S
        per_sequence = lengths // S  # [B, T]: complete blocks of each token's sequence
        # blocks of the earlier sequences of the row: a running sum of each sequence's count, added at its start
        before = torch.where(pos == 0, per_sequence, torch.zeros_like(per_sequence)).cumsum(1) - per_sequence
        local_block = pos // S  # [B, T]
        slot = torch.where(local_block < per_sequence, before + local_block, torch.full_like(pos, nb))
        kv = torch.cat((k_raw, v), dim=1).transpose(1, 2).reshape(B, T, 2 * E)  # [B, T, 2E]: k heads | v heads
        sums = kv.new_zeros(B, nb + 1, 2 * E).scatter_add(1, slot[..., None].expand(B, T, 2 * E), kv)
        mean = sums[:, :nb] / S
        new_k = self.compress_k(mean[..., :E]).view(B, nb, Hkv, D).transpose(1, 2)  # [B, Hkv, nb, D]
        new_v = self.compress_v(mean[..., E:]).view(B, nb, Hkv, D).transpose(1, 2)
        # which sequence and which of its blocks each slot holds (every member writes the same values); -1: empty
        slot_ids = torch.full((B, nb + 1), -1, dtype=ids.dtype, device=ids.device).scatter(1, slot, ids)[:, :nb]
        slot_block = torch.zeros(B, nb + 1, dtype=pos.dtype, device=pos.device).scatter(1, slot, local_block)[:, :nb]
        cos, sin = ctx.rotary(slot_block * S + S // 2, new_k.dtype)  # RoPE at the block centre, as for one sequence
        new_k = apply_rotary(new_k, cos, sin)
        # block j visible to query t iff it is of t's sequence and lies wholly before t: S * (block + 1) <= pos
        visible = (slot_ids[:, None, :] == ids[:, :, None]) & (slot_block[:, None, :] < local_block[:, :, None])
        if nb == 0:  # no complete block anywhere: every query outputs 0
            return q.new_zeros(q.shape)
        return self._attend_blocks(q, new_k, new_v, visible)

    def _attend_blocks(self, q, blocks_k, blocks_v, visible: torch.Tensor | tuple) -> torch.Tensor:
        """q [B, Hq, T, D] over compressed blocks [B, Hkv, N, D] where `visible` [B, T, N] (or its `_blocks_mask`)
        -> [B, Hq, T, D]. A query that sees no block (t < S, padding) outputs 0: SDPA would give NaN for an
        all-masked row, so such rows look at block 0 and are zeroed afterwards (no gradient flows through them
        either)."""
        mask, any_visible = visible if isinstance(visible, tuple) else self._blocks_mask(visible)
        out = self._grouped_sdpa(q, blocks_k, blocks_v, mask, grouped=True)  # [B, Hq, T, D]
        return out * any_visible.to(out.dtype)

    def _blocks_mask(self, visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """visible [B, T, N] (changed in place) -> (`_grouped_sdpa`'s mask [B, 1, G * T, N], with a query that
        sees no block looking at block 0; whether it sees any [B, 1, T, 1], bool)."""
        any_visible = visible.any(-1, keepdim=True)  # [B, T, 1]
        visible[..., :1] |= ~any_visible
        return self._grouped_mask(visible[:, None], visible.shape[1], visible.shape[2]), any_visible[:, None]

    @torch.no_grad()
    def _update_blocks(self, state, new_k, new_v, kv, pos, valid, base, new_lengths, max_new_length: int):
        """Store completed blocks in absolute slots and keep the raw members of the block being filled."""
        # the cache holds values only, as the other layers' caches (`detach`): no_grad stops reverse mode, not a
        # forward-mode AD tangent, which the stored blocks would carry into later steps
        new_k, new_v, kv = new_k.detach(), new_v.detach(), kv.detach()
        B, Hkv, nb, D = new_k.shape
        S = self.stride
        completed = new_lengths // S  # [B]
        n_slots = max_new_length // S
        if n_slots > 0:
            old_k, old_v = state.blocks_k, state.blocks_v
            n_old = 0 if old_k is None else old_k.shape[2]
            slot = torch.arange(n_slots, device=kv.device)[None, :]  # [1, N]
            from_new = slot >= base[:, None]  # slots below `base` were completed before this chunk
            src = (slot - base[:, None]).clamp(0, nb - 1)[:, None, :, None].expand(B, Hkv, n_slots, D)
            blocks_k, blocks_v = new_k.gather(2, src), new_v.gather(2, src)
            if n_old:
                keep = ~from_new[:, None, :n_old, None]
                blocks_k[:, :, :n_old] = torch.where(keep, old_k[:, :, :n_slots], blocks_k[:, :, :n_old])
                blocks_v[:, :, :n_old] = torch.where(keep, old_v[:, :, :n_slots], blocks_v[:, :, :n_old])
            state.blocks_k, state.blocks_v = blocks_k, blocks_v
        # Ring of raw members of each row's unfinished block: slot = position % S. Only positions of that block are
        # written, so each slot gets at most one writer; positions that fall in finished blocks go to a dump slot.
        B, T, width = kv.shape
        keep = pos >= (completed * S)[:, None]
        if valid is not None:
            keep = keep & valid
        ring_idx = torch.where(keep, pos % S, torch.full_like(pos, S))
        partial = state.partial if state.partial is not None else kv.new_zeros(B, S, width)
        partial = torch.cat((partial.to(kv.dtype), kv.new_zeros(B, 1, width)), dim=1)
        partial = partial.scatter(1, ring_idx[..., None].expand(B, T, width), kv)
        state.partial = partial[:, :S]

    def forward(self, hidden_states: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """hidden_states [B, T, hidden_size] (normed) -> [B, T, hidden_size]: the local and compressed paths (the
        class docstring), blended and gated; cache, padding and packed segments as `ctx` says."""
        if ctx.static is not None:
            return self.decode_static(hidden_states, ctx)
        B, T, _ = hidden_states.shape
        q, k, k_raw, v, gate = self.project(hidden_states, ctx.cos, ctx.sin, ctx.rotary_tables)
        if ctx.segments is not None:  # packed sequences (no cache, no padding)
            local = self._local_attention(q, k, v, None, None, ctx.segments.ids, shared=ctx.shared)
            comp = self._compressed_attention_packed(q, k_raw, v, ctx)
            return self._combine(local, comp, hidden_states, gate)
        # whole rows, compiled with CUDA graphs (`LlamaThinkModel.forward`), unless this layer's path is turned off
        if ctx.csa_block_masks is not None and self.flex_window:
            local, comp = self._attend_flex(q, k, k_raw, v, ctx)
            return self._combine(local, comp, hidden_states, gate)
        state = ctx.cache.layers[self.layer_idx] if ctx.cache is not None else None
        local = self._local_attention(q, k, v, ctx.valid, state, shared=ctx.shared)
        comp = self._compressed_attention(q, k_raw, v, ctx)
        return self._combine(local, comp, hidden_states, gate)

    def _combine(self, local, comp, hidden_states, gate) -> torch.Tensor:
        B, T, _ = hidden_states.shape
        local = local.transpose(1, 2).reshape(B, T, -1)  # [B, T, Hq*D]
        comp = comp.transpose(1, 2).reshape(B, T, -1)
        blend = torch.sigmoid(self.blend_proj(hidden_states))
        out = blend * comp + (1 - blend) * local
        return self.o_proj(out * torch.sigmoid(gate))

    def decode_static(self, hidden_states: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """One-token step on fixed buffers: the window is a ring of W slots (cache index i in slot i % W), the raw
        members of each row's open block a ring of S slots (position p in slot p % S), completed blocks sit in slot
        j of a [B, Hkv, max_len / S, D] buffer. Every write happens every step (a block slot is rewritten with its
        old value until the block completes), so the step has no data-dependent control flow and can be captured in
        a CUDA graph. Rows may be at different positions (left padding): blocks follow each row's positions."""
        B = hidden_states.shape[0]
        S, W = self.stride, self.window
        static = ctx.static
        state, index, slots = static.layers[self.layer_idx], static.index, static.slots
        pos = static.positions  # [B]
        q, k, k_raw, v, gate = self.project(
            hidden_states, ctx.cos, ctx.sin, ctx.rotary_tables
        )  # q [B, Hq, 1, D], k [B, Hkv, 1, D]

        # local window over cache indices: slot s holds the latest index i <= index with i % W == s; it is seen
        # when i >= 0 and that index is a real token of the row
        state.window_k.index_copy_(2, index % W, k.to(state.window_k.dtype))
        state.window_v.index_copy_(2, index % W, v.to(state.window_v.dtype))
        held = index - (index - slots[:W]) % W  # [W] cache index held by each slot
        in_window = (held >= 0) & static.key_valid.gather(1, held.clamp(min=0)[None].expand(B, W))  # [B, W]
        local = self._grouped_sdpa(q, state.window_k, state.window_v, in_window[:, None, None])

        # compressed blocks: add this token to its row's open block; when that completes, compress it into slot
        # pos // S of the row
        kv = torch.cat((k_raw, v), dim=1).transpose(1, 2).reshape(B, 1, -1)  # [B, 1, 2E]: k heads | v heads
        state.partial.scatter_(1, (pos % S)[:, None, None].expand_as(kv), kv.to(state.partial.dtype))
        block = pos // S  # [B]
        n_slots = state.blocks_k.shape[2]
        E = kv.shape[-1] // 2
        mean = state.partial.sum(1) / S  # [B, 2E]
        new_k = self.compress_k(mean[:, :E]).view(B, self.num_kv_heads, 1, self.head_dim)
        new_v = self.compress_v(mean[:, E:]).view(B, self.num_kv_heads, 1, self.head_dim)
        cos, sin = ctx.rotary((block * S + S // 2)[:, None], new_k.dtype)  # RoPE at the block centre
        new_k = apply_rotary(new_k, cos, sin)
        complete = (pos % S == S - 1)[:, None, None, None]  # [B, 1, 1, 1]
        slot = block.clamp(max=n_slots - 1)[:, None, None, None].expand_as(new_k)  # [B, Hkv, 1, D]
        for buf, new in ((state.blocks_k, new_k), (state.blocks_v, new_v)):
            buf.scatter_(2, slot, torch.where(complete, new.to(buf.dtype), buf.gather(2, slot)))
        visible = slots[None, :n_slots] < block[:, None]  # [B, N]: block j visible iff S (j + 1) <= pos
        any_visible = (block > 0)[:, None]  # [B, 1]
        visible = visible | ((slots[None, :n_slots] == 0) & ~any_visible)  # an empty row looks at slot 0, zeroed
        comp = self._grouped_sdpa(q, state.blocks_k, state.blocks_v, visible[:, None, None])
        comp = comp * any_visible[:, :, None, None].to(comp.dtype)
        return self._combine(local, comp, hidden_states, gate)

    # --- decode state of this mixer (`LlamaThinkCache`, `_StaticDecoder`) and its cost ---------------------------
    state_class = CompressedAttentionState

    def allocate_static_state(
        self, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype
    ) -> CompressedAttentionState:
        """Zeroed fixed buffers of `decode_static`: a ring of W window slots [B, Hkv, W, D] for keys and values,
        `max_len // stride` compressed block slots [B, Hkv, N, D], and the open block's ring [B, stride, 2 Hkv D]
        (`window_valid` stays None: the decoder's `key_valid` says which window slots hold real tokens)."""
        kw = dict(device=device, dtype=dtype)
        B, Hkv, D = batch_size, self.num_kv_heads, self.head_dim
        state = CompressedAttentionState()
        state.window_k = torch.zeros(B, Hkv, self.window, D, **kw)
        state.window_v = torch.zeros_like(state.window_k)
        state.blocks_k = torch.zeros(B, Hkv, max_len // self.stride, D, **kw)
        state.blocks_v = torch.zeros_like(state.blocks_k)
        state.partial = torch.zeros(B, self.stride, 2 * Hkv * D, **kw)
        return state

    def load_static_state(
        self, static_state: CompressedAttentionState, cache_state: CompressedAttentionState, seq_length: int
    ):
        """Copy a cache's state (after `seq_length` cache indices) into the buffers: its last W - 1 window positions
        into their ring slots (cache index i in slot i % W), its completed blocks into their absolute slots."""
        state, src, L = static_state, cache_state, seq_length
        W = state.window_k.shape[2]
        idx = torch.arange(L - (W - 1), L, device=state.window_k.device)  # cache indices of src.window_k
        have = idx >= 0  # (their padding is marked in the decoder's key_valid)
        state.window_k[:, :, idx[have] % W] = src.window_k[:, :, have].to(state.window_k.dtype)
        state.window_v[:, :, idx[have] % W] = src.window_v[:, :, have].to(state.window_v.dtype)
        if src.blocks_k is not None:
            n = src.blocks_k.shape[2]
            state.blocks_k[:, :, :n].copy_(src.blocks_k)
            state.blocks_v[:, :, :n].copy_(src.blocks_v)
        state.partial.copy_(src.partial)

    def store_static_state(
        self,
        static_state: CompressedAttentionState,
        cache_state: CompressedAttentionState,
        seq_length: int,
        key_valid: torch.Tensor,
        max_real_length: int,
    ):
        """The inverse of `load_static_state`. `key_valid` [B, max_len]: the decoder's real-token flags per cache
        index; `max_real_length`: the most real tokens of any row (how many block slots the cache keeps)."""
        state, dst, L = static_state, cache_state, seq_length
        W, S = state.window_k.shape[2], state.partial.shape[1]
        idx = torch.arange(L - (W - 1), L, device=state.window_k.device)
        have = (idx >= 0) & key_valid[:, idx.clamp(min=0)]  # [B, W - 1]
        dst.window_k = state.window_k[:, :, idx % W] * have[:, None, :, None].to(state.window_k.dtype)
        dst.window_v = state.window_v[:, :, idx % W] * have[:, None, :, None].to(state.window_v.dtype)
        dst.window_valid = have
        n = max_real_length // S  # slots of the row that has completed the most blocks
        dst.blocks_k = state.blocks_k[:, :, :n].clone() if n else None
        dst.blocks_v = state.blocks_v[:, :, :n].clone() if n else None
        dst.partial = state.partial.clone()

    @staticmethod
    def flops_per_token(config: LlamaThinkConfig, seq_len: int) -> float:
        """Training FLOPs (forward + backward) per token of one layer's two attentions, beyond its weight matmuls:
        12 * Hq * D * (min(W, seq_len) + seq_len / (2 * stride)): scores and weighted sum (2 products x 2 FLOPs per
        multiply-add x 3) over the window's keys and over the compressed blocks seen on average."""
        return (
            12.0
            * config.num_attention_heads
            * config.head_dim
            * (min(csa_window(config), seq_len) + seq_len / (2 * config.csa_stride))
        )


# The one dispatch point from a mixer type (`LlamaThinkConfig.mixer_types`) to its class; the class also names the
# decode state (`state_class`), builds and moves its static decode buffers and gives its FLOP term.
MIXER_CLASSES = {
    "linear": LlamaThinkGatedDeltaNet,
    "csa": LlamaThinkCompressedSparseAttention,
    "full": LlamaThinkAttention,
}


def mixer_class(kind: str) -> type[nn.Module]:
    """The mixer class of a mixer type. Raises `ValueError` naming an unknown type (never another mixer's code)."""
    try:
        return MIXER_CLASSES[kind]
    except (KeyError, TypeError):
        raise ValueError(f"unknown mixer type {kind!r}; the known types are {list(MIXER_CLASSES)}") from None


# ----------------------------------------------------------------------------------------------------------------
# Decoder layer and models
# ----------------------------------------------------------------------------------------------------------------


class LlamaThinkDecoderLayer(GradientCheckpointingLayer):
    """One pre-norm block, a mixer (`config.mixer_types[layer_idx]`: "linear" Gated DeltaNet, "csa" compressed
    sparse attention or "full" attention) then the SwiGLU MLP. With `config.hyper_connections` each residual update
    is `(1 + r) * h + (1 + s) * f(norm(h))` with per-channel scales r, s initialised to zero (a per-channel,
    static simplification of hyper-connections: Zhu et al. 2024, "Hyper-Connections"), else `h + f(norm(h))`."""

    def __init__(self, config: LlamaThinkConfig, layer_idx: int):
        super().__init__()
        self.mixer_type = config.mixer_types[layer_idx]
        self.hyper_connections = config.hyper_connections
        self.input_layernorm = LlamaThinkRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mixer = mixer_class(self.mixer_type)(config, layer_idx)
        self.post_attention_layernorm = LlamaThinkRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = LlamaThinkMLP(config)
        if self.hyper_connections:  # zero init: training starts as a plain residual network
            self.mixer_residual_scale = nn.Parameter(torch.zeros(config.hidden_size))
            self.mixer_sublayer_scale = nn.Parameter(torch.zeros(config.hidden_size))
            self.mlp_residual_scale = nn.Parameter(torch.zeros(config.hidden_size))
            self.mlp_sublayer_scale = nn.Parameter(torch.zeros(config.hidden_size))

    def forward(self, hidden_states: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """hidden_states [B, T, hidden_size] -> the same shape and dtype (the residual stream after this layer)."""
        norm_1, norm_2, r_1, s_1, r_2, s_2 = self._scales(_acc_dtype(hidden_states.dtype))
        out = self.mixer(self.input_layernorm(hidden_states, *norm_1), ctx)
        if self.hyper_connections:  # (1 + r) * h + (1 + s) * out, the second product fused into the add
            hidden_states = torch.addcmul(hidden_states * r_1, out, s_1)
        else:
            hidden_states = hidden_states + out
        out = self.mlp(self.post_attention_layernorm(hidden_states, *norm_2))
        if self.hyper_connections:
            return torch.addcmul(hidden_states * r_2, out, s_2)
        return hidden_states + out

    def _scales(self, norm_dtype: torch.dtype) -> tuple:
        """The `1 + p` of this layer's two norm weights (in `norm_dtype`, the norms' float32 or float64) and its four
        hyper-connection scales (in their own dtype) [hidden_size] each: (the input norm's arguments, the
        post-attention norm's, (1 + r), (1 + s) of the mixer, (1 + r), (1 + s) of the MLP), the norms' arguments ()
        where the norm makes its own, and the scales None without hyper-connections. Eagerly one multi-tensor add
        (`torch._foreach_add`) makes them all: one launch where each sum was its own in a host-bound step, for
        float32 weights (a 16-bit model's scales and its norms' float32 copies differ in dtype, which a multi-tensor
        add runs one by one); a norm replaced or hooked (`is_plain_module`) still makes its own. Traced, the norms
        make their own and the scales' sums are written out (inductor fuses them into their users)."""
        residual = (
            (self.mixer_residual_scale, self.mixer_sublayer_scale, self.mlp_residual_scale, self.mlp_sublayer_scale)
            if self.hyper_connections
            else ()
        )
        norms = (self.input_layernorm, self.post_attention_layernorm)
        if torch.compiler.is_compiling():
            return ((), (), *(1 + p for p in residual)) if residual else ((), (), None, None, None, None)
        plain = [is_plain_module(n, LlamaThinkRMSNorm) for n in norms]
        terms = [n.weight.to(norm_dtype) for n, ok in zip(norms, plain) if ok] + list(residual)
        sums = iter(torch._foreach_add(terms, 1.0) if terms else ())
        norm_args = [(next(sums),) if ok else () for ok in plain]
        return (*norm_args, *(sums if residual else (None,) * 4))


def mixer_pattern_period(mixer_types: list[str]) -> int:
    """The length of the shortest run of mixer types that `mixer_types` is made of, repeated whole: 4 for the seed's
    linear, linear, csa, full four times over; len(mixer_types) where no shorter run repeats."""
    n = len(mixer_types)
    return next((p for p in range(1, n + 1) if n % p == 0 and mixer_types == mixer_types[:p] * (n // p)), n)


def check_layers_per_graph(layers_per_graph) -> None:
    """Raise ValueError unless `layers_per_graph` (`compile_layers`) is None or a positive integer."""
    if layers_per_graph is not None and (
        isinstance(layers_per_graph, bool) or not isinstance(layers_per_graph, int) or layers_per_graph < 1
    ):
        raise ValueError(f"layers_per_graph must be a positive integer or None, got {layers_per_graph!r}")


class LlamaThinkLayerRun(nn.Module):
    """Consecutive decoder layers called one after the other: the region that `compile_layers` compiles as one graph
    (`LlamaThinkModel.compile_layer_runs`). It holds the model's own layers but is not one of its submodules, so the
    model's parameters, state dict and hooks are unchanged. Layers with hooks are not run in a run
    (`LlamaThinkModel._current_layer_runs`)."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, hidden_states: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """hidden_states [B, T, hidden] through each layer in turn -> [B, T, hidden]."""
        for layer in self.layers:
            hidden_states = layer(hidden_states, ctx=ctx)
        return hidden_states


# transformers 5.24 names the cache field of model outputs `cache` (with a `past_key_values` alias); 5.17 and older
# name it `past_key_values`. Declare whichever the installed version reads, and give both spellings.
_OUTPUT_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

if _OUTPUT_CACHE_FIELD == "cache":

    @dataclass
    class LlamaThinkModelOutput(ModelOutput):
        last_hidden_state: torch.Tensor | None = None
        cache: LlamaThinkCache | None = None
        hidden_states: tuple[torch.Tensor, ...] | None = None

    @dataclass
    class LlamaThinkCausalLMOutput(ModelOutput):
        loss: torch.Tensor | None = None
        logits: torch.Tensor | None = None
        cache: LlamaThinkCache | None = None
        hidden_states: tuple[torch.Tensor, ...] | None = None

else:  # pragma: no cover - exercised on transformers < 5.24

    @dataclass
    class LlamaThinkModelOutput(ModelOutput):
        last_hidden_state: torch.Tensor | None = None
        past_key_values: LlamaThinkCache | None = None
        hidden_states: tuple[torch.Tensor, ...] | None = None

        @property
        def cache(self):
            return self.past_key_values

    @dataclass
    class LlamaThinkCausalLMOutput(ModelOutput):
        loss: torch.Tensor | None = None
        logits: torch.Tensor | None = None
        past_key_values: LlamaThinkCache | None = None
        hidden_states: tuple[torch.Tensor, ...] | None = None

        @property
        def cache(self):
            return self.past_key_values


# ----------------------------------------------------------------------------------------------------------------
# Loss without the full logits tensor
# ----------------------------------------------------------------------------------------------------------------


def cross_entropy_chunk(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, grad_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss and gradients of one chunk of rows of the head: the body of `_ChunkedLinearCrossEntropy`.

    hidden [n, H] and weight [V, H] in the compute dtype, targets [n] (-100 = ignored), grad_scale: None or a 0-d or
    one-element tensor that the gradients are multiplied by (the loss's 1 / divisor), in the accumulation dtype
    before they are rounded to the compute dtype. Returns the summed cross-entropy of `hidden @ weight.T` (a 0-d
    tensor in the accumulation dtype, fp32 for 16-bit inputs; not scaled), its gradient w.r.t. `hidden` [n, H] and
    w.r.t. the logits [n, V] (both in the compute dtype, times `grad_scale`), with the softmax in the accumulation
    dtype; the caller adds `grad_logits.T @ hidden` to its weight gradient (`accumulate_grad_weight`: on CUDA one
    product straight into the float32 sum). Plain PyTorch, so that `torch.compile` can fuse the cast, the logsumexp
    and the softmax - onehot into passes over the [n, V] logits that write only the compute-dtype gradient
    (`chunked_causal_lm_loss(..., compile_backend=...)`); eagerly it is the reference. Both forms compute
    each element with the same operations in the same dtypes."""
    acc = _acc_dtype(hidden.dtype)
    logits = (hidden @ weight.T).to(acc)  # [n, V]
    keep = targets != -100
    safe = targets.masked_fill(~keep, 0)
    lse = torch.logsumexp(logits, dim=-1)  # [n]
    loss = ((lse - logits.gather(1, safe[:, None])[:, 0]) * keep).sum()
    # d(sum of losses)/d(logits) = softmax - onehot on kept rows
    if torch.compiler.is_compiling():
        # one element-wise expression, which inductor fuses with the cast: an in-place update at the targets would
        # make it write the whole fp32 [n, V] softmax to memory and read it back
        prob = (logits - lse[:, None]).exp()
        at_target = torch.arange(logits.shape[1], device=logits.device)[None, :] == safe[:, None]  # [n, V]
        grad = torch.where(at_target, prob - 1.0, prob)
    else:  # in the logits' buffer: no second fp32 [n, V] tensor
        grad = logits.sub_(lse[:, None]).exp_()
        grad[torch.arange(len(safe), device=safe.device), safe] -= 1.0
    row_scale = keep.to(acc) if grad_scale is None else keep.to(acc) * grad_scale.to(acc)  # [n]: 0 where ignored
    grad = (grad * row_scale[:, None]).to(hidden.dtype)
    return loss, grad @ weight, grad


def accumulate_grad_weight(grad_weight: torch.Tensor, grad_logits: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """`grad_weight + grad_logits.T @ hidden`: one chunk's head-weight gradient added to the running sum.

    grad_weight [V, H] in the accumulation dtype (fp32 for 16-bit inputs), grad_logits [n, V] and hidden [n, H] in
    the compute dtype. On CUDA with 16-bit inputs (and not under tracing) the product is accumulated by cuBLAS
    straight into the float32 sum (`torch.addmm(..., out_dtype=torch.float32)`: C = A B + C with fp32 C), one
    kernel and no bf16 rounding of the chunk's product; written into `grad_weight` itself where torch takes it as
    `out` (`_mixed_dtype_addmm_form`: else torch first copies the [V, H] sum into a new output, a full pass over it
    per chunk). Elsewhere the product is rounded to the compute dtype, cast and added (what inductor fuses when
    traced, and the reference on the CPU, which lacks that form). Returns the sum: `grad_weight` itself, added to in
    place, or (where torch takes no `out`) a new tensor; use the returned one. `grad_weight` is a plain contiguous
    buffer outside autograd (the loss's backward allocates it): `out=` records no gradient and raises where an
    argument requires one."""
    if grad_logits.dtype == grad_weight.dtype:
        return grad_weight.addmm_(grad_logits.T, hidden)
    form = None
    if grad_logits.is_cuda and not torch.compiler.is_compiling():
        form = _mixed_dtype_addmm_form(grad_logits.device, grad_logits.dtype, grad_weight.dtype)
    if form == "in place":
        return torch.addmm(grad_weight, grad_logits.T, hidden, out_dtype=grad_weight.dtype, out=grad_weight)
    if form == "new tensor":
        return torch.addmm(grad_weight, grad_logits.T, hidden, out_dtype=grad_weight.dtype)
    return grad_weight.add_((grad_logits.T @ hidden).to(grad_weight.dtype))


@functools.cache
def _mixed_dtype_addmm_form(device: torch.device, dtype: torch.dtype, out_dtype: torch.dtype) -> str | None:
    """How `torch.addmm(C, A, B, out_dtype=out_dtype)` with A, B in `dtype` and C in `out_dtype` gives C + A B on
    `device`: "in place" where it also takes C as `out` (C = A B + C into C's own memory), "new tensor" where only
    the form that returns a new tensor works, None where neither does (torch releases before 2.8 lack the overload,
    and some that have it refuse a C of another dtype than A's; those take the cast-and-add form). Asked once per
    device and dtypes, on 2 x 2 ones."""
    ones = torch.ones(2, 2, device=device, dtype=dtype)

    def addmm_or_none(acc: torch.Tensor, **out) -> torch.Tensor | None:
        try:
            return torch.addmm(acc, ones, ones, out_dtype=out_dtype, **out)
        except Exception:  # noqa: BLE001 - any refusal (TypeError, RuntimeError, NotImplementedError): not this form
            return None

    for form in ("in place", "new tensor"):
        acc = torch.ones(2, 2, device=device, dtype=out_dtype)
        out = addmm_or_none(acc, **({"out": acc} if form == "in place" else {}))
        if out is None or out.dtype != out_dtype or not bool((out == 3).all()):
            continue
        if form == "new tensor" or out.data_ptr() == acc.data_ptr():
            return form
    return None


# torch.compile modes that replay the compiled kernels as CUDA graphs
CUDA_GRAPH_COMPILE_MODES = ("reduce-overhead", "max-autotune")


def uses_cuda_graphs(compile_kwargs: dict) -> bool:
    """Whether `torch.compile(**compile_kwargs)` replays its kernels as CUDA graphs: a CUDA-graph `mode`, inductor's
    `options={"triton.cudagraphs": True}`, or the "cudagraphs" backend."""
    options = compile_kwargs.get("options") or {}
    return (
        compile_kwargs.get("mode") in CUDA_GRAPH_COMPILE_MODES
        or bool(options.get("triton.cudagraphs"))
        or compile_kwargs.get("backend") == "cudagraphs"
    )


@functools.cache
def _compiled_cross_entropy_chunk(backend):
    """`cross_entropy_chunk` through `torch.compile(backend=backend)`, one compiled function per backend (a module
    attribute would make the model unpicklable). Dynamic shapes are left to dynamo: `chunked_causal_lm_loss`
    splits a batch into chunks of near-equal size, so a fixed batch shape compiles once or twice."""
    return torch.compile(cross_entropy_chunk, backend=backend)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Sum of token cross-entropies of `hidden @ weight.T` over `divisor`, computed `chunk_rows` rows at a time.

    The logits of the whole batch (16 x 1024 x 32000 in fp32 is 2 GiB, plus as much again for their gradient) never
    exist at once: each chunk's logits are made, turned into the loss and into the gradients w.r.t. `hidden` and
    `weight` right away (`chunk_fn`, `cross_entropy_chunk` or its compiled form), then dropped. The backward only
    multiplies the stored gradients by the incoming one, so the head matmuls are done exactly once each, as in the
    unfused forward + backward. Method: the chunked "fused linear cross-entropy" of Liger-Kernel and Apple's Cut
    Cross-Entropy (Wijmans et al. 2024), here in PyTorch.

    Scaling: where the compute dtype has float32's exponent range (bf16, float32, float64), the 1 / divisor enters
    each chunk's softmax gradient in float32 before it is rounded (`cross_entropy_chunk`'s `grad_scale`); in
    float16 it is applied in the backward instead, since a softmax gradient divided by a batch's token count would
    mostly underflow float16 before a loss scaler's factor arrives. The backward multiplies by the incoming gradient
    (and that 1 / divisor) in float32 and writes the hidden states' gradient in their own dtype in one pass: `hidden`
    comes in the caller's dtype (float32 under autocast) and is cast to `compute_dtype` here.

    There is no second derivative (the gradients are computed in the forward): a backward with
    `create_graph=True` (double backward, gradient penalties) raises a RuntimeError rather than giving gradients
    without the loss's second-order terms.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, divisor, chunk_rows: int, chunk_fn, compute_dtype: torch.dtype):
        # hidden [N, H] in the caller's dtype, weight [V, H], targets [N] (-100 = ignored), divisor: 0-d tensor
        acc = _acc_dtype(compute_dtype)
        h = hidden.to(compute_dtype)
        grad_hidden = torch.empty_like(h)
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        w = weight.to(compute_dtype)
        divisor = divisor.to(acc)
        inverse = (1.0 / divisor).reshape(1)  # (one element: a 0-d CPU tensor would make dynamo trace a chunk twice)
        in_chunks = torch.finfo(compute_dtype).tiny <= torch.finfo(torch.float32).tiny  # not float16
        total = torch.zeros((), dtype=acc, device=h.device)
        for start in range(0, h.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            loss, grad_h, grad_logits = chunk_fn(h[rows], w, targets[rows], inverse if in_chunks else None)
            total += loss
            grad_hidden[rows] = grad_h
            grad_weight = accumulate_grad_weight(grad_weight, grad_logits, h[rows])
            del loss, grad_h, grad_logits  # free this chunk's [n, V] gradient before the next chunk makes its own
        ctx.save_for_backward(grad_hidden, grad_weight, *(() if in_chunks else (inverse,)))
        ctx.weight_dtype, ctx.hidden_dtype = weight.dtype, hidden.dtype
        return total / divisor

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "the chunked loss (skip_logits=True, chunked_causal_lm_loss) has no second derivative: its gradients "
                "are computed in the forward. For a backward with create_graph=True (double backward, gradient "
                "penalties) compute the loss on the full logits (the model's forward with skip_logits=False)"
            )
        grad_hidden, grad_weight, *inverse = ctx.saved_tensors
        # in the accumulation dtype (float32 for 16-bit inputs), and one element: a [1] tensor takes part in type
        # promotion, where a 0-d one would be rounded to the 16-bit gradient's dtype
        scale = grad_out.to(grad_weight.dtype).reshape(1)
        if inverse:  # (float16: the divisor was left out of the chunks)
            scale = scale * inverse[0]
        grad_weight = (grad_weight * scale).to(ctx.weight_dtype)
        out = torch.empty_like(grad_hidden, dtype=ctx.hidden_dtype)  # one kernel, the product in `scale`'s dtype
        return torch.mul(grad_hidden, scale, out=out), grad_weight, None, None, None, None, None


def _next_token_targets(
    labels: torch.Tensor, num_items_in_batch, device, shift_labels: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """labels [B, T] -> (targets [B, T] on `device`, where position t predicts labels[t + 1] and the last position
    predicts nothing (-100), and the loss divisor: `num_items_in_batch`, else the number of kept targets).
    `shift_labels` [B, T] (transformers' name: targets already shifted, position t predicting shift_labels[t], as
    context parallelism and padding-free collators give them, the last position's target from beyond the row
    included) are the targets as given, in place of the shifted `labels`."""
    if shift_labels is not None:
        targets = shift_labels.to(device)
    else:
        targets = F.pad(labels, (0, 1), value=-100)[:, 1:].to(device)
    if num_items_in_batch is None:
        return targets, (targets != -100).sum()
    return targets, torch.as_tensor(num_items_in_batch, device=device)


# The most logits one chunk of `chunked_causal_lm_loss` holds by default: [unfused, fused]. A chunk fused by inductor
# on 16-bit inputs keeps its logits and their gradient (4 bytes a logit); an eager one (or one compiled by another
# backend, or in float32) also float32 logits and temporaries (8 bytes a logit or more).
LOSS_CHUNK_LOGITS = (2**26, 2**27)


def loss_chunk_rows(rows: int, vocab_size: int, fused: bool) -> int:
    """The rows per chunk that `chunked_causal_lm_loss` takes by default for `rows` rows of `vocab_size` logits, at
    most `LOSS_CHUNK_LOGITS[fused]` logits a chunk (at least one row). `fused`: the chunks run through inductor on
    16-bit inputs. Equal chunks where a count of them between the fewest possible and twice that divides `rows`
    (one chunk shape to compile: 4 of 4096 rows for 16 x 1024 rows of 32000 logits fused, 8 of 2048 unfused; 4 of
    2560 for 10 x 1024 fused), else the fewest near-equal ones (the last shorter: two shapes)."""
    cap = max(1, LOSS_CHUNK_LOGITS[bool(fused)] // vocab_size)
    fewest = max(1, math.ceil(rows / cap))
    equal = next((n for n in range(fewest, 2 * fewest + 1) if rows % n == 0), None)
    return max(1, rows // equal) if equal is not None else max(1, math.ceil(rows / fewest))  # (0 rows: 1, no chunk)


def chunked_causal_lm_loss(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_rows: int | None = None,
    compile_backend=None,
    shift_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next-token cross-entropy of `lm_head(hidden_states)` against `labels` (shifted inside, -100 ignored), equal to
    transformers' `ForCausalLMLoss` on the full logits, without materialising them (see `_ChunkedLinearCrossEntropy`).
    Under autocast the head matmuls run in the autocast dtype and the softmax in fp32, like the unfused path.

    hidden_states [B, T, H], weight [V, H], labels [B, T]. Returns a 0-d tensor: the sum of token losses over
    `num_items_in_batch`, else their mean over kept targets. `chunk_rows` is the most rows per chunk; by default
    (`loss_chunk_rows`) a chunk holds at most 2**27 logits when inductor fuses it on 16-bit inputs (4096 rows of
    32000 logits at 16 x 1024: their bf16 values and gradient, 500 MiB together; fewer, larger chunks run the head's
    products in fewer passes over the float32 weight gradient, BENCHMARKS.md section 1, session 47) and 2**26
    otherwise (an eager chunk also holds float32 logits), the B*T rows split into equal chunks where a count of them
    near the fewest divides B*T, else near-equal ones (the last shorter), so that one batch shape compiles at most
    two chunk shapes. `compile_backend` (a `torch.compile` backend, e.g. "inductor"; what `compile_layers`
    sets) runs each chunk through the compiled `cross_entropy_chunk`; None runs it eagerly. `shift_labels` [B, T]:
    targets already shifted, used in place of the shifted `labels` (`_next_token_targets`). The loss has no second
    derivative: a backward with `create_graph=True` raises a RuntimeError (`_ChunkedLinearCrossEntropy`)."""
    B, T, H = hidden_states.shape
    targets, divisor = _next_token_targets(labels, num_items_in_batch, hidden_states.device, shift_labels)
    targets = targets.reshape(-1)
    hidden = hidden_states.reshape(B * T, H)
    compute_dtype = hidden.dtype
    if torch.is_autocast_enabled(hidden.device.type):
        compute_dtype = torch.get_autocast_dtype(hidden.device.type)
    if chunk_rows is None:
        fused = compile_backend == "inductor" and compute_dtype.itemsize <= 2
        chunk_rows = loss_chunk_rows(hidden.shape[0], weight.shape[0], fused)
    chunk_fn = cross_entropy_chunk if compile_backend is None else _compiled_cross_entropy_chunk(compile_backend)
    with torch.autocast(hidden.device.type, enabled=False):  # dtypes are chosen explicitly above
        return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, divisor, chunk_rows, chunk_fn, compute_dtype)


TOKEN_ID_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)  # the dtypes input_ids may come in


def _is_target_dtype(dtype: torch.dtype) -> bool:  # labels: any integer dtype (-100 needs a signed one to occur)
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def check_token_values(
    vocab_size: int,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    **targets: torch.Tensor,
) -> None:
    """Raise ValueError naming the first bad input of a causal-LM forward: `input_ids` [B, T] not in an integer dtype
    (`TOKEN_ID_DTYPES`) or holding an id outside [0, vocab_size); an `attention_mask` holding a value other than 0
    (padding) and 1 (transformers counts positions as the mask's running sum, so a 2 would skip one); a target
    tensor (keyword: its name, e.g. `labels=`, `shift_labels=`) not of an integer dtype or holding a value that is
    neither -100 (ignored) nor a token id (CUDA would assert inside the embedding or the loss).

    The model's forward calls it on every batch, except while compiled and inside `inputs_checked_by_caller`:
    `LlamaThinkModel` on input_ids and attention_mask, `LlamaThinkForCausalLM` on labels and shift_labels. For
    tensors on a GPU reading the verdict is one host sync a call, which waits for all work queued before it; for
    CPU tensors it is none. So the training loop calls it on each batch's CPU tensors before copying them to the
    device, and runs the forward inside `inputs_checked_by_caller` (`llamathink.train.loop.check_batch_on_host`).
    Tensors may lie on different devices."""
    if input_ids is not None and input_ids.dtype not in TOKEN_ID_DTYPES:
        raise ValueError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    for name, t in targets.items():
        if not _is_target_dtype(t.dtype):
            raise ValueError(f"{name} must be an integer tensor (token ids, -100 ignored), got {t.dtype}")
    stats = {}  # 0-d int64 tensors, read together
    if input_ids is not None and input_ids.numel():
        stats["lo"], stats["hi"] = input_ids.min(), input_ids.max()
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        stats["mask"] = ((attention_mask != 0) & (attention_mask != 1)).any()
    targets = {name: t.long() for name, t in targets.items()}  # compared as int64: -100 and vocab_size fit
    outside = {name: (t != -100) & ((t < 0) | (t >= vocab_size)) for name, t in targets.items()}
    stats.update({name: bad.any() for name, bad in outside.items()})
    if not stats:
        return
    device = next(iter(stats.values())).device
    values = dict(zip(stats, torch.stack([v.to(device, torch.int64) for v in stats.values()]).tolist()))
    if values.get("lo", 0) < 0 or values.get("hi", 0) >= vocab_size:
        bad = values["lo"] if values["lo"] < 0 else values["hi"]
        raise ValueError(f"input_ids contains token id {bad}, outside the vocabulary [0, {vocab_size})")
    if values.get("mask"):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (a real token)")
    for name, bad in outside.items():
        if values[name]:
            raise ValueError(
                f"{name} contains {targets[name][bad][0].item()}: neither -100 (ignored) nor a token id in the "
                f"vocabulary [0, {vocab_size})"
            )


# the LlamaThink model modules whose forwards skip `check_token_values` in this thread (and async context) now: the
# ids of modules that enclosing `inputs_checked_by_caller` blocks hold alive, each with the number of such blocks
_CHECKED_BY_CALLER: contextvars.ContextVar[dict[int, int]] = contextvars.ContextVar(
    "llamathink_inputs_checked_by_caller", default={}
)


@contextlib.contextmanager
def inputs_checked_by_caller(model: nn.Module):
    """Within this block, forwards of the LlamaThink models in `model` (itself, or a wrapper such as DDP's, PEFT's
    or accelerate's) skip `check_token_values` on their input_ids, attention_mask, labels and shift_labels: the
    caller has checked those values itself, on the host (`check_token_values` on the batch's CPU tensors, as the
    training loop does: `llamathink.train.loop.check_batch_on_host`). Shapes and dtypes are still checked. The block
    holds for the thread (and async context, with the tasks it starts) that entered it, not for other threads
    using the same model, and not for copies of the model. Blocks nest, and may end in any order (each one counts
    itself in and out).

    Why: the forward's own check reads its verdict on the host, so a training step's forward would wait there for
    the GPU to finish everything queued before it (the previous step's backward and optimizer), then leave the GPU
    idle while the host launches the next step's first kernels. An id outside the vocabulary given inside the block
    is undefined behaviour, as in transformers' models (on CUDA a device-side assert)."""
    held = [id(m) for m in model.modules() if isinstance(m, LlamaThinkPreTrainedModel)]
    counts = dict(_CHECKED_BY_CALLER.get())  # a new dict each time: a context copied from this one keeps its own
    for key in held:
        counts[key] = counts.get(key, 0) + 1
    _CHECKED_BY_CALLER.set(counts)
    try:
        yield model
    finally:
        counts = dict(_CHECKED_BY_CALLER.get())
        for key in held:
            if counts.get(key, 0) > 1:
                counts[key] -= 1
            else:  # (absent: the block ends in another context than it began in; nothing of it is held there)
                counts.pop(key, None)
        _CHECKED_BY_CALLER.set(counts)


def _inputs_checked_by_caller(module: nn.Module) -> bool:
    return id(module) in _CHECKED_BY_CALLER.get()


def _caller_stacklevel() -> int:
    """The `warnings.warn` stacklevel, for the function that calls this one, of the first frame outside this module,
    transformers (remote-code copies of this module included: `transformers_modules`), torch, contextlib and
    functools: the user's line that called generate(), however many of the installed transformers' decorators and
    helpers lie between (a fixed level pointed into them)."""
    skipped = (__name__, "transformers", "torch", "contextlib", "functools")
    frame, level = inspect.currentframe().f_back, 1  # level 1: the function that warns
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if not any(module == name or module.startswith((name + ".", name + "_")) for name in skipped):
            return level
        frame, level = frame.f_back, level + 1
    return 1


def _check_tensor_arguments(**arguments) -> None:
    """Raise TypeError naming each keyword argument given (not None) that is not a torch.Tensor, e.g. a NumPy array or
    a list of token ids (torch.as_tensor converts them); the later checks read a tensor's dtype and shape."""
    for name, value in arguments.items():
        if value is not None and not isinstance(value, torch.Tensor):
            kind = f"{type(value).__module__}.{type(value).__qualname__}".removeprefix("builtins.")
            raise TypeError(f"{name} must be a torch.Tensor, got {kind} (torch.as_tensor converts it)")


def _as_index(input_ids: torch.Tensor) -> torch.Tensor:
    """Token ids as the embedding's index dtype: int16 and uint8 ids (which the input checks accept) as int64."""
    return input_ids.long() if input_ids.dtype in (torch.int16, torch.uint8) else input_ids


class _EmbeddingIndexAdd(torch.autograd.Function):
    """`F.embedding(ids, weight)` whose weight gradient is summed by `index_add_` into a zeroed table.

    ids [...] (integer), weight [V, H] (float32 or float64) -> [..., H]; the gradient w.r.t. weight is [V, H] in
    weight's dtype. On CUDA, PyTorch's embedding backward sorts the indices (radix sort, segment sums: about ten
    kernels) once a batch holds more than 3072 of them; `index_add_` adds each row with atomics in one kernel after
    the zero fill (what inductor emits for a compiled embedding's backward). The summation order then varies from
    run to run, so `embedding_lookup` takes this path only while `torch.use_deterministic_algorithms` is off; and
    only for float32 / float64 tables, which sum in their own dtype (PyTorch sums a 16-bit table's rows in float32
    per segment; a float32 copy of the whole table would add its size to the backward's peak memory)."""

    @staticmethod
    def forward(ctx, ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.save_for_forward(ids)
        ctx.num_embeddings = weight.shape[0]
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (ids,) = ctx.saved_tensors
        H = grad_output.shape[-1]
        grad_weight = grad_output.new_zeros(ctx.num_embeddings, H)
        grad_weight.index_add_(0, ids.reshape(-1), grad_output.reshape(-1, H))  # [..., H] -> [N, H] rows at their ids
        return None, grad_weight

    @staticmethod
    def jvp(ctx, ids_tangent, weight_tangent):  # forward-mode AD: the lookup is linear in the table
        (ids,) = ctx.saved_tensors
        return F.embedding(ids, weight_tangent)


def _index_add_embedding_applies(embedding: nn.Module, on_cuda: bool) -> bool:
    """Whether `embedding_lookup` runs `_EmbeddingIndexAdd` for `embedding` (with ids on CUDA when `on_cuda`): a
    plain `nn.Embedding` (`is_plain_module`: no hook, subclass or wrapper) without padding index, max norm,
    frequency scaling or sparse gradient, whose float32 / float64 weight takes a gradient now, outside tracing,
    deterministic algorithms and torch.func transforms (`needs_plain_autograd`); else the module is called."""
    return (
        on_cuda
        and is_plain_module(embedding, nn.Embedding)
        and embedding.padding_idx is None
        and embedding.max_norm is None
        and not embedding.scale_grad_by_freq
        and not embedding.sparse
        and embedding.weight.dtype in (torch.float32, torch.float64)
        and embedding.weight.requires_grad
        and torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and not torch.are_deterministic_algorithms_enabled()
        and not needs_plain_autograd()  # (a transform only: its `jvp` takes forward-mode AD)
    )


def embedding_lookup(embedding: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """`embedding(ids)`: ids [B, T] -> [B, T, H], the same values; where `_index_add_embedding_applies` (a plain
    float32 table on CUDA, training) through `_EmbeddingIndexAdd`, whose backward sums the weight gradient with one
    atomic kernel instead of PyTorch's sort-based backward."""
    if _index_add_embedding_applies(embedding, ids.is_cuda):
        return _EmbeddingIndexAdd.apply(ids, embedding.weight)
    return embedding(ids)


def is_plain_linear(module: nn.Module) -> bool:
    """True when `module(x)` is exactly `x @ module.weight.T`, so that its weight may be read instead of calling
    the module (`chunked_causal_lm_loss` with the head, `LlamaThinkGatedDeltaNet._gate_projections`): an
    `nn.Linear` without bias that is `is_plain_module`."""
    return is_plain_module(module, nn.Linear) and module.bias is None


def _moves_weights_only(module: nn.Module, cls: type) -> bool:
    """True when `module` is exactly of class `cls`, bias-free, with no hook but accelerate's device-placement hook
    (`AlignDevicesHook`: device maps and offloading load the weights for the call and move its tensors, nothing
    else): its call computes what its weights, once loaded, would."""
    hook = vars(module).get("_hf_hook")
    if type(module) is not cls or hook is None or getattr(module, "bias", None) is not None:
        return False
    try:  # (a try block: transformers' check of a Hub copy's imports does not count accelerate as required)
        from accelerate.hooks import AlignDevicesHook, SequentialHook
    except ImportError:  # then the hook is not accelerate's
        return False
    hooks = hook.hooks if isinstance(hook, SequentialHook) else [hook]
    return all(type(h) is AlignDevicesHook for h in hooks) and not _has_torch_hooks(module)


def is_plain_module(module: nn.Module, cls: type) -> bool:
    """True when `module` is exactly of class `cls` (not a subclass such as a PEFT LoRA layer, a quantised or a
    parametrised layer, or an FSDP2-sharded one), with no `forward` replaced on the instance (accelerate's
    device-map and offload hooks work that way: an offloaded weight is on the meta device until the module is
    called), and with no forward or backward hook on it or registered globally (a user's hook, or an old-style
    `weight_norm` or pruning pre-hook, must see, and may change, its input and output): then its weights may be
    read instead of calling it."""
    if type(module) is not cls or "forward" in vars(module) or "_hf_hook" in vars(module):
        return False
    return not _has_torch_hooks(module)


def _has_torch_hooks(module: nn.Module) -> bool:
    """A forward or backward hook on `module`, or one registered for every module."""
    if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks:
        return True
    registry = torch.nn.modules.module
    return any(
        getattr(registry, name, None)
        for name in (
            "_global_forward_hooks",
            "_global_forward_pre_hooks",
            "_global_backward_hooks",
            "_global_backward_pre_hooks",
        )
    )


def _head_cross_entropy_sum(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # hidden [B, n, H], targets [B, n] (-100 = ignored) -> summed token cross-entropy, softmax in fp32 (or fp64)
    logits = head(hidden)
    logits = logits.to(_acc_dtype(logits.dtype))
    logits = logits.reshape(-1, logits.shape[-1])
    return F.cross_entropy(logits, targets.reshape(-1), ignore_index=-100, reduction="sum")


def chunked_causal_lm_loss_through_module(
    hidden_states: torch.Tensor,
    head: nn.Module,
    labels: torch.Tensor,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_rows: int | None = None,
    shift_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next-token cross-entropy of `head(hidden_states)` against `labels` (shifted inside, -100 ignored) for any
    output module: a PEFT LoRA layer, a quantised Linear, a Linear with hooks. `head` is called on [B, n, H] slices
    of the time axis (about `chunk_rows` rows each), so its parameters, adapters and hooks stay in the autograd
    path. When there is more than one slice, each is wrapped in non-reentrant activation checkpointing
    (`torch.utils.checkpoint`): only one slice's logits exist at a time, in the forward and in the backward (where
    the slice is recomputed, calling `head` a second time with the same RNG state). Returns the same value as
    `chunked_causal_lm_loss` for a plain Linear (the mean over kept targets, or the sum / `num_items_in_batch`), with
    `shift_labels` as there."""
    B, T, H = hidden_states.shape
    targets, divisor = _next_token_targets(labels, num_items_in_batch, hidden_states.device, shift_labels)
    if chunk_rows is None:  # ~256 MiB of fp32 logits per slice (a head without `out_features`: assume 32000)
        chunk_rows = max(1, (64 * 2**20) // int(getattr(head, "out_features", None) or 32000))
    step = max(1, chunk_rows // B)
    total = None
    for start in range(0, T, step):
        h, t = hidden_states[:, start : start + step], targets[:, start : start + step]
        if step >= T or not torch.is_grad_enabled():
            part = _head_cross_entropy_sum(head, h, t)
        else:
            part = checkpoint(_head_cross_entropy_sum, head, h, t, use_reentrant=False)
        total = part if total is None else total + part
    return total / divisor.to(total.dtype)


def _equal_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors hold the same values (False where either has none: the meta device)."""
    if a.shape != b.shape or a.is_meta or b.is_meta:
        return False
    with torch.no_grad():
        return bool(torch.equal(a, b.to(a.device)))


def _layer_mixer_types(layers) -> list[str]:
    """The mixer type of each decoder layer in `layers` as built (a module of another class: its class name)."""
    return [getattr(layer, "mixer_type", type(layer).__name__) for layer in layers]


def _some(names: list[str], shown: int = 4) -> str:
    """The first `shown` of `names`, and how many more: an error message that names the fault without listing
    every tensor of a model."""
    if not names:
        return "(none)"
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})  # safetensors' names of the dtypes weights may have


def _weights_files(source, kwargs: dict) -> list:
    """The safetensors files that `from_pretrained(source, **kwargs)` reads: those its weights index names, else
    `model.safetensors` (each with `variant` in its name where one is given; other files beside them, such as an
    adapter, are not read), in a local folder or, for a Hub id, in its snapshot in the local cache (none where it is
    not there, or for a source that is neither)."""
    if not isinstance(source, (str, Path)):  # (weights passed as a state_dict)
        return []
    folder = Path(source).expanduser()
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(
                snapshot_download(
                    str(source),
                    revision=kwargs.get("revision"),
                    cache_dir=kwargs.get("cache_dir"),
                    local_files_only=True,
                    allow_patterns=["*.safetensors", "*.json"],
                )
            )
        except (OSError, ValueError):  # not in the local cache (LocalEntryNotFoundError), not a repo id
            return []
    folder = folder / kwargs["subfolder"] if kwargs.get("subfolder") else folder
    variant = f".{kwargs['variant']}" if kwargs.get("variant") else ""
    index = folder / f"model.safetensors.index{variant}.json"
    try:
        names = set(json.loads(index.read_text())["weight_map"].values()) if index.is_file() else set()
    except (OSError, ValueError, RecursionError, KeyError, TypeError, AttributeError):
        names = set()  # (an index transformers could read was read above; this one names no files)
    names = names or {f"model{variant}.safetensors"}
    return sorted(folder / name for name in names if isinstance(name, str) and (folder / name).is_file())


def _non_float_tensors(files: list) -> list[str]:
    """'name (DTYPE)' for each tensor of the safetensors `files` whose stored dtype is not in FLOAT_DTYPES (read
    from the files' headers; no tensor data is read)."""
    try:  # (in a try block: a Hub copy of this file may import only torch and transformers, `check_imports`)
        from safetensors import safe_open
    except ImportError:  # transformers reads safetensors files with it: without it there are none to read
        return []
    found = []
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (a safetensors file, not a dict)
                dtype = f.get_slice(name).get_dtype()
                if dtype not in FLOAT_DTYPES:
                    found.append(f"{name} ({dtype})")
    return found


def unusable_weights(model: nn.Module, files: list) -> str | None:
    """Why a loaded `model` cannot compute, or None: tensors of its safetensors weights `files` stored as integers
    or bools (`from_pretrained` casts them to floats as they are; read from the headers), else parameters holding
    NaN or infinite values in the dtype loaded (saved from a run that diverged, or past the range of float16).
    Parameters on the meta device (offloaded) are not read. For any model class: the trainers and the chat check
    other architectures with it too."""
    not_float = _non_float_tensors(files)
    if not_float:
        return (
            f"weights must be floating point ({', '.join(sorted(FLOAT_DTYPES))}); {_some(not_float, shown=3)} would "
            "be cast to floats as they are"
        )
    broken = [
        (name, p.dtype)
        for name, p in model.named_parameters()
        if p.device.type != "meta" and not bool(torch.isfinite(p).all())
    ]
    if broken:  # training would stop at its first step's loss, sampling fail deep inside torch.multinomial
        return (
            f"its weights hold NaN or infinite values ({_some([name for name, _ in broken], shown=3)}) in "
            f"{', '.join(sorted({str(dtype) for _, dtype in broken}))}: the model cannot be trained or generate text "
            "(saved from a run that diverged, or values beyond the range of the dtype)"
        )
    return None


class LlamaThinkPreTrainedModel(PreTrainedModel):
    """The transformers base of the LlamaThink models: the config class, weight init (`_init_weights`), gradient
    checkpointing, remote-code loading (`auto_map` in the saved config.json) and the training helpers shared by
    `LlamaThinkModel` and `LlamaThinkForCausalLM` (`compile_layers`, kernel choice)."""

    config_class = LlamaThinkConfig
    config: LlamaThinkConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaThinkDecoderLayer"]
    _supports_sdpa = True
    _is_stateful = True  # recurrent layers: no assisted decoding / cache cropping

    # Written into config.json by save_pretrained so that every Auto class loads this model with
    # trust_remote_code=True (transformers itself only records the class being saved).
    _auto_map = {
        "AutoConfig": "configuration_llamathink.LlamaThinkConfig",
        "AutoModel": "modeling_llamathink.LlamaThinkModel",
        "AutoModelForCausalLM": "modeling_llamathink.LlamaThinkForCausalLM",
    }

    # The config fields that the layers copy when the model is built and that its weights do not record (their
    # names and shapes do: sizes, layers, hyper-connections and tying are checked when the weights load): an edit
    # of `model.config` afterwards changes nothing the model computes, so a config.json written with it would
    # describe another model (`save_pretrained` refuses). The CSA window counts as the layers use it, at most the
    # context (`config_edits_since_build`).
    BUILD_FIELDS = (
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "linear_num_key_heads",
        "linear_num_value_heads",
        "linear_key_head_dim",
        "linear_value_head_dim",
        "csa_stride",
        "rms_norm_eps",
        "rope_theta",
        "partial_rotary_factor",
    )

    def __init__(self, config: LlamaThinkConfig, *args, **kwargs):
        # a config edited after it was built (`config.num_hidden_layers = 2`) is checked again here: the layers
        # would otherwise be built from inconsistent fields and fail deep inside, or save a model that cannot load
        config.validate_llamathink()
        super().__init__(config, *args, **kwargs)
        auto_map = dict(getattr(config, "auto_map", None) or {})
        for auto_class, reference in self._auto_map.items():
            auto_map.setdefault(auto_class, reference)
        config.auto_map = auto_map

    def post_init(self):
        """transformers' `post_init` (weights initialised), then the values of `BUILD_FIELDS` and the CSA window the
        model was built with recorded (`config_edits_since_build`)."""
        super().post_init()
        self._built_with = {name: copy.deepcopy(getattr(self.config, name, None)) for name in self.BUILD_FIELDS}
        self._built_with["csa_window"] = csa_window(self.config)

    def config_edits_since_build(self) -> dict[str, tuple]:
        """{field: (value the model was built with, value in `self.config` now)} for each of `BUILD_FIELDS` edited
        since: the model still computes with the first. Also the CSA window where the model's (at most the context
        it was built for) and the config's differ on sequences the config's context allows. Empty for a model built
        before the record existed."""
        built = dict(getattr(self, "_built_with", None) or {})
        if not built:
            return {}
        edits = {}
        window, now_window = built.pop("csa_window"), csa_window(self.config)
        context = self.config.max_position_embeddings
        if isinstance(context, int) and min(window, context) != now_window:
            edits["csa_window (as the layers use it: at most max_position_embeddings)"] = (window, now_window)
        for name, then in built.items():
            now = getattr(self.config, name, None)
            if now != then:
                edits[name] = (then, now)
        return edits

    def config_mismatches(self) -> list[str]:
        """How `self.config` no longer describes this model's own weights: the fields whose value differs from what
        the modules hold (`vocab_size`, `hidden_size`, `num_hidden_layers`, `mixer_types`, `hyper_connections`,
        `tie_word_embeddings`), then the tensors whose name or shape differ from those of a model built from the
        config now (built on the meta device: no memory). Empty where the config describes the model, as after `resize_token_embeddings`, or
        after layers removed with `num_hidden_layers` and `mixer_types` set to match."""
        base = getattr(self, "model", self)
        embeddings, head = self.get_input_embeddings(), self.get_output_embeddings()
        held = {
            "vocab_size": embeddings.num_embeddings,
            "hidden_size": embeddings.embedding_dim,
            "num_hidden_layers": len(base.layers),
            "mixer_types": _layer_mixer_types(base.layers),
            "hyper_connections": all(getattr(layer, "hyper_connections", False) for layer in base.layers),
        }
        # (weights offloaded by accelerate sit on the meta device, put back as new objects around each forward:
        # neither their identity nor their values tell whether they are tied)
        if head is not None and not (head.weight.is_meta or embeddings.weight.is_meta):
            tied = head.weight is embeddings.weight
            if not tied and self.config.tie_word_embeddings:  # an output head of its own equal to the embeddings
                tied = _equal_values(head.weight, embeddings.weight)  # (tied again on reload: the same model)
            held["tie_word_embeddings"] = tied
        config = {name: getattr(self.config, name, None) for name in held}
        if isinstance(config["mixer_types"], tuple):
            config["mixer_types"] = list(config["mixer_types"])
        found = [
            f"{name}: the model's {value!r}, the config's {config[name]!r}"
            for name, value in held.items()
            if value != config[name]
        ]
        try:
            with torch.device("meta"):
                described = type(self)(copy.deepcopy(self.config)).state_dict()
        except (ValueError, TypeError) as err:  # a config no model can be built from: `validate_llamathink` names it
            return [*found, f"no model can be built from the config ({err})"]
        mine = self.state_dict()
        differ = [
            f"{name} {tuple(mine[name].shape)} where the config gives {tuple(described[name].shape)}"
            for name in described
            if name in mine and mine[name].shape != described[name].shape
        ]
        lacking, extra = [n for n in described if n not in mine], [n for n in mine if n not in described]
        tensors = [
            f"{what} {_some(names)}"
            for what, names in (("shapes", differ), ("missing tensors", lacking), ("unexpected tensors", extra))
            if names
        ]
        return [*found, *tensors]

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' `save_pretrained`, refusing a `config` that does not describe the model.

        The layers copy their head layout, norm epsilon, RoPE base and CSA settings when they are built
        (`BUILD_FIELDS`), so `model.config.rms_norm_eps = 1e-5` afterwards changes nothing the model computes: the
        saved config.json would describe another model (the reloaded one would compute something else). The
        fields the weights record (sizes, layers, mixer types, tying) must describe the modules as they are
        (`config_mismatches`): `model.config.tie_word_embeddings = False` alone, or layers removed with the config
        left as it was, would save a folder that does not load (or, tied on reload, loses the output head).
        Edits of the modules that keep the config in step (`resize_token_embeddings`, layers removed with
        `num_hidden_layers` and `mixer_types` set to match, an output head untied into a parameter of its own
        with `tie_word_embeddings = False`) are saved as they are. A model carrying transformers' own PEFT
        adapters (`add_adapter`), which saves the adapters alone, is not checked.

        Raises ValueError, before anything is written, naming an inconsistent config's fault (`validate_llamathink`),
        each field edited since the model was built with its built and its new value (set the field back, or build
        a new model from the edited config and load these weights into it), or each field and tensor where the
        config and the modules differ."""
        self.config.validate_llamathink()  # (an edit into an inconsistent config: named as such first)
        edits = self.config_edits_since_build()
        if edits:
            named = "; ".join(f"{name}: built with {then!r}, now {now!r}" for name, (then, now) in edits.items())
            raise ValueError(
                f"cannot save to {save_directory}: the model's config was edited after the model was built ({named}), "
                "and the model still computes with the values it was built with, so the saved config.json would "
                "describe another model. Set the field(s) back, or build a new model from the edited config "
                "(`LlamaThinkForCausalLM(config)`) and load these weights into it (`load_state_dict`)"
            )
        if not getattr(self, "_hf_peft_config_loaded", False):
            mismatches = self.config_mismatches()
            if mismatches:
                injected = any(".base_layer." in n or "lora_" in n for n in self.state_dict())
                hint = (
                    "save the adapter with the PeftModel's save_pretrained, or merge_and_unload() first"
                    if injected
                    else "set the config to match the model, or build a model from the config and load the "
                    "weights it takes"
                )
                if any(m.startswith("tie_word_embeddings") for m in mismatches):
                    hint += (
                        " (an untied output head is a weight of its own: "
                        "`model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.clone())`)"
                    )
                raise ValueError(
                    f"cannot save to {save_directory}: the model's config does not describe its weights "
                    f"({'; '.join(mismatches)}), so the saved folder would not load as this model: {hint}"
                )
        return super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, refusing weights that do not match their config.

        transformers fills a missing weight with its init, drops an unexpected one, and only logs both: a model
        whose config.json was edited (layer count, `mixer_types`, `hyper_connections`, `tie_word_embeddings`) or
        whose weights file lost tensors would load and compute something else. Here missing or unexpected tensors
        are an error, unless `output_loading_info=True` asks for them (then returned as transformers returns
        them, for the caller to judge). A missing `blend_proj.bias` alone is a model from before `csa_blend_bias`
        existed (or saved with it null) read with the default -4 (a hand-written config.json without the key),
        whose every CSA layer would then compute something else: always refused, with the fix.

        Weights that load into a model that cannot compute are refused as well (transformers casts and loads
        them without a word): a tensor stored as integers or bools (its values cast to floats as they are, read
        from the weights files' headers), and NaN or infinite values in the dtype loaded (a run that diverged, or
        values past the range of float16).

        Raises:
            ValueError: naming the missing biases and the fix (`"csa_blend_bias": null` in config.json); where
                other tensors are missing or unexpected (without `output_loading_info`; with it only alongside a
                missing bias), naming those instead; naming the tensors stored in a dtype that is not floating
                point, or holding NaN or infinite values.
        """
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        all_missing = sorted(info.get("missing_keys") or ())
        missing = [k for k in all_missing if k.endswith("blend_proj.bias")]
        others, unexpected = [k for k in all_missing if k not in missing], sorted(info.get("unexpected_keys") or ())
        if (others or unexpected) and (missing or not wants_info):
            # the caller's own config values come first among the likely causes (an Auto class applies them to the
            # config it passes on: those are not seen here)
            fields = set(model.config.to_dict())
            overrides = ", ".join(f"{k}={v!r}" for k, v in kwargs.items() if k in fields)
            given = f"the config values passed to from_pretrained ({overrides}), or " if overrides else ""
            raise ValueError(
                f"{source}: its weights do not match the config ({given}its config.json: mixer_types, layer count, "
                "sizes, hyper_connections or tie_word_embeddings edited, or tensors lost from the weights file?): "
                f"missing tensors {_some(all_missing)}; unexpected tensors {_some(unexpected)}"
            )
        if missing:
            raise ValueError(
                f"{source}: its weights have no {', '.join(missing)}, but its config asks for a CSA blend bias "
                f"(csa_blend_bias={model.config.csa_blend_bias}, the default where config.json leaves it out); a "
                'model saved without one needs "csa_blend_bias": null in its config.json'
            )
        problem = unusable_weights(model, _weights_files(source, kwargs))
        if problem is not None:
            raise ValueError(f"{source}: {problem}")
        return (model, info) if wants_info else model

    def compile_layers(self, layers_per_graph: int | None = None, **compile_kwargs):
        """Regional compilation: `torch.compile` runs of consecutive decoder layers in place (`nn.Module.compile`)
        rather than the whole model, and return the model. Runs of the same mixer types share one compiled graph,
        so the first step compiles in a fraction of the whole-model time and a warm cache restarts fast. The chunked
        training loss compiles too (one graph per chunk shape, with the same `backend` but never CUDA graphs:
        `chunked_causal_lm_loss`), which fuses its logsumexp and softmax passes; the embedding and the final norm
        stay eager. Parameter names and state dicts are unchanged (no `_orig_mod.` wrapper), so checkpoints,
        `save_pretrained` and DDP see the plain model.

        `layers_per_graph`: how many consecutive layers one compiled region holds. None (the default): one
        repetition of the model's mixer pattern (`mixer_pattern_period`: the seed's linear, linear, csa, full, 4
        layers, one graph replayed 4 times), where the pattern repeats; else 1. A region of several layers lets
        inductor fuse across their boundaries (a layer's residual update with the next layer's norm, in the
        forward and the backward); the graph inlines every layer of the run, and the seed's run of four compiled in
        about the time its three mixer types took alone (BENCHMARKS.md section 1, session 45). 1: each layer its own
        region (layers of one mixer type share one graph). N > 1: runs of N layers, a shorter last run compiling a
        graph of its own; an N that is not a multiple of the pattern's period makes several different runs, each
        its own graph (a warning says so). The layers are compiled one by one as well, for the forwards that the
        runs do not serve: `output_hidden_states` (each layer's output), gradient checkpointing (which checkpoints
        each layer), a model whose `layers` were replaced after this call, and layers with forward or backward hooks
        (their own or every module's). (Hooks added to a layer's submodules after its first compiled step are not
        seen, as with any torch.compile'd module: dynamo does not guard on them. Register them before.) Raises
        ValueError for a `layers_per_graph` that is not a positive integer. A copy of the model (`copy.deepcopy`)
        runs its layers uncompiled, with the same results (torch does not copy a module's compiled call); call this
        method on the copy to compile it.

        Method: PyTorch's regional compilation recipe (pytorch.org/tutorials/recipes/regional_compilation.html);
        `compile_kwargs` go to `torch.compile` (for example `mode`, `dynamic`, `backend`). `mode="reduce-overhead"`
        replays each region's forward and backward kernels as CUDA graphs (cudagraph trees), which removes the
        host's per-kernel launch cost; call `torch.compiler.cudagraph_mark_step_begin()` before each training
        forward, and accumulate gradients into existing `.grad` tensors (`zero_grad(set_to_none=False)`) rather
        than keeping a graph's output as `.grad` across replays (what `run_training` does). Evaluation forwards
        (eval mode without autograd; with CUDA graphs any forward without autograd) and cached generation run
        the eager layers."""
        check_layers_per_graph(layers_per_graph)  # before anything is compiled
        cuda_graphs = uses_cuda_graphs(compile_kwargs)
        for module in self.modules():
            if isinstance(module, LlamaThinkDecoderLayer):
                module.compile(**compile_kwargs)
            elif isinstance(module, LlamaThinkModel):
                module.compile_layer_runs(layers_per_graph, **compile_kwargs)
                module.compiled_layers = True
                module.compiled_layers_cuda_graphs = cuda_graphs
                module.compiled_layers_inductor = compile_kwargs.get("backend", "inductor") == "inductor"
            elif isinstance(module, LlamaThinkForCausalLM):
                backend = compile_kwargs.get("backend", "inductor")
                module.loss_compile_backend = "inductor" if backend == "cudagraphs" else backend
        return self

    def start_fla_prebuild(
        self, batch_size: int, seq_len: int, packed: bool = False, dtype=torch.bfloat16, log_path: str | None = None
    ):
        """Start building fla's kernels for a compiled training step of `batch_size` x `seq_len` tokens in `dtype`
        (the autocast dtype; `packed`: document-masked rows) in a child process, while this one compiles the step
        (`kernels_llamathink.start_fla_prebuild`), and return the child (a `subprocess.Popen`), or None when no
        Gated DeltaNet layer of this model trains with fla there (fla missing, CPU, float32, or `gdn_backend`
        "torch") or `LLAMATHINK_FLA_PREBUILD=0`; `log_path`: a file for the child's output. Call it after
        `compile_layers`, before the first step, in each process that trains (the child builds for this model's
        device); the training loop does for fixed-shape pretraining batches. Raises OSError where the child cannot
        be started."""
        mixers = self._gated_deltanets()
        device = self._training_device() if mixers else None
        if device is None or device.type != "cuda":
            return None
        mixer = mixers[0]
        backend = select_gdn_backend(mixer.backend, device, needs_grad=True, dtype=dtype, head_dims=mixer.head_dims)
        if backend == "torch":
            return None
        if backend == "flash_qla" and flash_qla_built(
            *self._flash_qla_build_shapes(batch_size, seq_len, dtype, packed)
        ):
            backend = "none"  # its kernels load from TileLang's disk cache: the conv's alone are left to build
        return start_fla_prebuild(
            **self._prebuild_shapes(batch_size, seq_len, dtype, packed), log_path=log_path, delta_rule=backend
        )

    def _gated_deltanets(self) -> list:
        return [m for m in self.modules() if isinstance(m, LlamaThinkGatedDeltaNet)]

    def _training_device(self) -> torch.device:
        """Where the Gated DeltaNet layers' kernels run: the first one's conv weight's device."""
        return self._gated_deltanets()[0].conv1d.weight.device

    def _prebuild_shapes(self, batch_size: int, seq_len: int, dtype: torch.dtype, packed: bool) -> dict:
        """`kernels_llamathink.start_fla_prebuild`'s shape arguments for this model's compiled training step."""
        mixer = self._gated_deltanets()[0]
        return {
            "batch_size": batch_size,
            "seq_len": seq_len,
            "num_heads": mixer.num_v_heads,  # q and k heads reach fla repeated to the value heads
            "head_k_dim": mixer.head_k_dim,
            "head_v_dim": mixer.head_v_dim,
            "conv_dim": mixer.conv_dim,
            "conv_parts": mixer.conv_parts,
            "conv_kernel_size": mixer.conv_kernel_size,
            "dtype": dtype,
            "packed": packed,
            "device": mixer.conv1d.weight.device,
            "conv_weight_dtype": mixer.conv1d.weight.dtype,
        }

    def _flash_qla_build_shapes(self, batch_size: int, seq_len: int, dtype: torch.dtype, packed: bool) -> tuple:
        """`flash_qla_built`'s arguments for this model's compiled training step (on its first Gated DeltaNet
        layer's device)."""
        mixer, device = self._gated_deltanets()[0], self._training_device()
        index = device.index if device.index is not None else torch.cuda.current_device()
        return batch_size, seq_len, mixer.num_v_heads, mixer.head_dims, dtype, packed, index

    def choose_training_kernels(
        self,
        batch_size: int,
        seq_len: int,
        packed: bool = False,
        dtype: torch.dtype = torch.bfloat16,
        kernels: str | None = None,
    ) -> str | None:
        """Decide, once at the start of a compiled training run of fixed-shape batches (`batch_size` x `seq_len`
        tokens in autocast `dtype`, `packed`: document-masked rows), which Gated DeltaNet kernels its layers with
        `gdn_backend` "auto" train with, and return what every Gated DeltaNet layer will run: "flash_qla", "fla" or
        "torch" (None: the model has no such layer on CUDA).

        "auto" takes FlashQLA's kernels where FlashQLA can run them (`flash_qla_problem`) and a finished prebuild
        has recorded them built on this machine for these shapes (`flash_qla_built`; `start_flash_qla_build` makes
        one): they then load from TileLang's disk cache, and the step runs about 10% faster than on fla's kernels
        (BENCHMARKS.md section 1). Otherwise it stays on fla's kernels, whose first build takes seconds, not
        TileLang's minute. `kernels` overrides the record: "flash_qla" or "fla", e.g. what a checkpoint says the
        run trained with, so that a resumed run goes on with the same kernels (FlashQLA that cannot run here: fla,
        with a warning). Sets the layers' `backend`; the config keeps "auto". Layers that name their backend keep
        it. Raises ValueError for another `kernels`."""
        if kernels not in (None, "flash_qla", "fla"):
            raise ValueError(f"kernels={kernels!r}: expected 'flash_qla', 'fla' or None")
        mixers = self._gated_deltanets()
        device = self._training_device() if mixers else None
        if device is None or device.type != "cuda":
            return None
        head_dims = mixers[0].head_dims
        automatic = [m for m in mixers if m.backend == "auto"]
        if automatic and select_gdn_backend("auto", device, True, dtype, head_dims) == "fla":
            if kernels is None:
                wanted = flash_qla_built(*self._flash_qla_build_shapes(batch_size, seq_len, dtype, packed))
            else:
                wanted = kernels == "flash_qla"
            if wanted:
                problem = flash_qla_problem(device, head_dims, dtype)
                if problem is None:
                    for mixer in automatic:
                        mixer.backend = "flash_qla"
                else:
                    logger.warning(f"FlashQLA's kernels cannot run here ({problem}); training on fla's kernels")
        chosen = {select_gdn_backend(m.backend, device, True, dtype, m.head_dims) for m in mixers}
        return chosen.pop() if len(chosen) == 1 else "mixed"

    def start_flash_qla_build(
        self,
        batch_size: int,
        seq_len: int,
        packed: bool = False,
        dtype: torch.dtype = torch.bfloat16,
        log_path: str | None = None,
    ):
        """Build FlashQLA's kernels for a compiled training step of `batch_size` x `seq_len` tokens in `dtype`
        (`packed`: document-masked rows) into TileLang's disk cache, in the background, for the runs after this
        one: `kernels_llamathink.start_fla_prebuild` with FlashQLA's four parts and nothing waiting for them; once
        all four have ended well the child records the build (`record_flash_qla_build`), and later runs with
        `gdn_backend` "auto" train with FlashQLA (`choose_training_kernels`). Returns the child (a
        `subprocess.Popen`; about a minute on an H200, killed if this process ends first), or None where there is
        nothing to build: no layer with `gdn_backend` "auto" training on fla here, FlashQLA not installed or
        unable to run on this GPU, dtype or head size, the build recorded already, or `LLAMATHINK_FLA_PREBUILD=0`.
        Its cost while it runs: four processes, each with a CUDA context and one step's delta-rule inputs on this
        model's GPU, and a CPU core each. The training loop starts it after a run's first step. Raises OSError
        where the child cannot be started."""
        mixers = [m for m in self._gated_deltanets() if m.backend == "auto"]
        if not mixers:
            return None
        device, head_dims = self._training_device(), mixers[0].head_dims
        if device.type != "cuda" or select_gdn_backend("auto", device, True, dtype, head_dims) != "fla":
            return None
        if flash_qla_problem(device, head_dims, dtype, import_it=False) is not None:
            return None
        if flash_qla_built(*self._flash_qla_build_shapes(batch_size, seq_len, dtype, packed)):
            return None
        return start_fla_prebuild(
            **self._prebuild_shapes(batch_size, seq_len, dtype, packed),
            log_path=log_path,
            delta_rule="flash_qla",
            wait=False,
        )

    @torch.no_grad()
    def _init_weights(self, module: nn.Module):
        """Fresh-model init (never applied to loaded weights). Each choice was measured at equal tokens against
        HF Qwen3.5 and HF Llama (benchmarks/bench_quality.py, BENCHMARKS.md section 2):

        - every Linear, the embedding and the depthwise conv: N(0, initializer_range). PyTorch's default conv init
          (uniform +-1/sqrt(kernel), std 0.29) makes the conv output ~15x larger than its input's projections
          and the Gated DeltaNet layers learn far less per token.
        - the residual output projections (`o_proj`, `out_proj`, `down_proj`) start at zero (`zero_init_residual`):
          each layer starts as the identity and adds only what training has put there, rather than noise of the
          stream's own size from 16 random layers. With Muon every hidden matrix gets updates of a fixed spectral
          size from the first step, so a zero (or 1/sqrt(2L) smaller, `rescale_prenorm_residual`) start does not
          delay those layers as it would under SGD. Measured at equal tokens: zero 0.020 nats lower than
          N(0, initializer_range) at 800 steps (five seeds, paired); the 1/sqrt(2L) start no better than the full
          one (one seed).
        - RMSNorm gains zero (applied as 1 + w), the gated output norm's ones, hyper-connection scales zero: the
          network starts as a plain pre-norm residual stack, the identity-preserving start of hyper-connections.
        - `A_log = log(U(A_init_range))`, `dt_bias` from `dt_init_range` (see `LlamaThinkConfig`).
        - CSA's blend bias at `csa_blend_bias` (default -4: the gate starts at 0.018, each CSA layer starts as its
          local window). The seed's bias-free gate starts half open, adding the compressed path's output at full
          weight before it has learned anything; that cost 0.05-0.09 nats on two seeds of three at 800 steps.
        """
        config = self.config
        std = config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv1d)):
            residual_out = getattr(module, "_is_residual_out", False)
            if residual_out and config.rescale_prenorm_residual:
                std = std / math.sqrt(2 * config.num_hidden_layers)
            # drawn even when zeroed next: every other tensor then gets the same draws at one seed as with a normal
            # start (the paired comparison of BENCHMARKS.md section 2)
            init.normal_(module.weight, mean=0.0, std=std)
            if residual_out and config.residual_starts_at_zero:
                init.zeros_(module.weight)
            if module.bias is not None:  # CSA's blend_proj carries its start (`csa_blend_bias`); others start at 0
                init.constant_(module.bias, getattr(module, "_bias_init", 0.0))
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, LlamaThinkRMSNorm):
            init.zeros_(module.weight)  # applied as (1 + w)
        elif isinstance(module, LlamaThinkGatedRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, LlamaThinkRotaryEmbedding):
            # a non-persistent buffer: meta-device loading leaves it empty, so it is rebuilt here
            init.copy_(module.inv_freq, module.compute_inv_freq(device=module.inv_freq.device))
        if isinstance(module, LlamaThinkGatedDeltaNet):
            init.copy_(module.A_log, gdn_A_log_init(module.num_v_heads, config.A_init_range))
            init.copy_(module.dt_bias, gdn_dt_bias_init(module.num_v_heads, config.dt_init_range))
        elif isinstance(module, LlamaThinkDecoderLayer) and module.hyper_connections:
            for p in (
                module.mixer_residual_scale,
                module.mixer_sublayer_scale,
                module.mlp_residual_scale,
                module.mlp_sublayer_scale,
            ):
                init.zeros_(p)


def gdn_A_log_init(num_heads: int, A_init_range, device="cpu") -> torch.Tensor:
    """`A_log` of one Gated DeltaNet layer, [num_heads] fp32 (on `device`; None: the default device, which is
    `meta` while transformers builds a model to load): log(A) with A ~ U(A_init_range) (Mamba-2's decay-rate
    init; Qwen3.5 uses U(0.01, 16))."""
    low, high = A_init_range
    return torch.empty(num_heads, device=device).uniform_(low, high).log_()


def gdn_dt_bias_init(num_heads: int, dt_init_range, floor: float = 1e-4, device="cpu") -> torch.Tensor:
    """`dt_bias` of one Gated DeltaNet layer, [num_heads] fp32 (`device` as in `gdn_A_log_init`). `None`: ones
    (Qwen3-Next / Qwen3.5: a step softplus(1) = 1.31). `(dt_min, dt_max)`: the step softplus(dt_bias) starts
    log-uniform in that range, floored at `floor` (Mamba-2 / fla; dt_bias is the inverse softplus of the step)."""
    if dt_init_range is None:
        return torch.ones(num_heads, device=device)
    dt_min, dt_max = dt_init_range
    log_dt = torch.rand(num_heads, device=device) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
    dt = log_dt.exp().clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))  # softplus^-1(dt)


def _mark_residual_outputs(model: nn.Module):
    for name, module in model.named_modules():
        if name.endswith(("o_proj", "out_proj", "down_proj")) and isinstance(module, nn.Linear):
            module._is_residual_out = True


class LlamaThinkModel(LlamaThinkPreTrainedModel):
    """The decoder stack (embeddings -> layers -> final norm), returning hidden states."""

    def __init__(self, config: LlamaThinkConfig):
        super().__init__(config)
        self.compiled_layers = False  # set by `compile_layers`: packed batches then use FlexAttention
        self.layer_runs = None  # set by `compile_layers` (`compile_layer_runs`): runs of layers compiled as one region
        self.compiled_layers_cuda_graphs = False  # set by `compile_layers(mode=...)` with a CUDA-graph mode
        self.compiled_layers_inductor = False  # set by `compile_layers` with inductor (which fuses FlexAttention)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([LlamaThinkDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaThinkRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaThinkRotaryEmbedding(config)
        self.gradient_checkpointing = False
        _mark_residual_outputs(self)
        self.post_init()

    def compile_layer_runs(self, layers_per_graph: int | None = None, **compile_kwargs) -> None:
        """Make the runs of consecutive layers that training forwards call as compiled regions (`compile_layers`
        documents `layers_per_graph`; None: one repetition of the mixer pattern where it repeats, else 1) and
        compile each with `compile_kwargs`; runs of one layer leave the layers to be called one by one. Raises
        ValueError for a `layers_per_graph` that is not a positive integer (`check_layers_per_graph`)."""
        check_layers_per_graph(layers_per_graph)
        kinds = [getattr(layer, "mixer_type", type(layer).__name__) for layer in self.layers]
        n, period = len(kinds), mixer_pattern_period(kinds)
        if layers_per_graph is None:
            layers_per_graph = period if period < n else 1
        self.layer_runs = None
        if layers_per_graph > 1 and n > 1:
            starts = range(0, n, layers_per_graph)
            distinct = {tuple(kinds[i : i + layers_per_graph]) for i in starts}
            if len(distinct) > 1 + (n % layers_per_graph > 0):
                logger.warning(
                    f"layers_per_graph={layers_per_graph} cuts the mixer pattern (period {period}) into "
                    f"{len(distinct)} different runs, each its own graph to compile (and each counted against "
                    f"dynamo's recompile limit, past which a run trains eagerly); a multiple of {period} gives one"
                )
            if any(map(_has_torch_hooks, self.layers)):
                logger.warning("decoder layers have hooks: they are compiled one by one, so that the hooks run")
                return
            self.layer_runs = [LlamaThinkLayerRun(list(self.layers[i : i + layers_per_graph])) for i in starts]
            for run in self.layer_runs:
                run.compile(**compile_kwargs)

    def _current_layer_runs(self) -> list | None:
        """`layer_runs`, while they still hold exactly `layers` in order and no layer has forward or backward hooks
        (`_has_torch_hooks`: its own or every module's); else None, with a warning once: the layers then run one by
        one. Dynamo does not recompile a run's graph for hooks added after it was traced (it would reuse a graph
        traced without them, also from a later `compile_layers`), while a layer compiled alone runs its hooks.
        Replaced or removed layers also drop the runs (which would otherwise keep the old layers' memory)."""
        runs = self.layer_runs
        if not runs:
            return None
        held = [layer for run in runs for layer in run.layers]
        if len(held) != len(self.layers) or any(a is not b for a, b in zip(held, self.layers)):
            logger.warning_once(
                "the decoder layers changed after compile_layers: they now run one by one (call compile_layers "
                "again to compile runs of the new layers)"
            )
            self.layer_runs = None
            return None
        if any(map(_has_torch_hooks, self.layers)):
            logger.warning_once(
                "decoder layers have hooks: they now run one by one, each compiled alone, so that the hooks run"
            )
            return None
        return runs

    def get_input_embeddings(self):
        """The token embedding, nn.Embedding(vocab_size, hidden_size)."""
        return self.embed_tokens

    def set_input_embeddings(self, value):
        """Replace the token embedding (transformers' resize_token_embeddings calls this)."""
        self.embed_tokens = value

    def _check_inputs(self, input_ids, inputs_embeds, attention_mask, past: int):
        _check_tensor_arguments(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        shape = input_ids.shape if input_ids is not None else inputs_embeds.shape[:2]
        if len(shape) != 2 or (inputs_embeds is not None and inputs_embeds.dim() != 3):
            raise ValueError(
                "input_ids must be [batch, seq_len] and inputs_embeds [batch, seq_len, hidden_size], got "
                f"{tuple(input_ids.shape if input_ids is not None else inputs_embeds.shape)}"
            )
        if inputs_embeds is not None and inputs_embeds.shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"inputs_embeds has width {inputs_embeds.shape[-1]}, the model's hidden_size is {self.config.hidden_size}"
            )
        B, T = shape
        if T == 0:
            raise ValueError("the input sequence is empty")
        if B == 0:
            raise ValueError("the batch is empty (0 rows)")
        # value checks (one host sync), none while compiling or where the caller has checked them on the host; the
        # dtype always
        if not torch.compiler.is_compiling() and not _inputs_checked_by_caller(self):
            check_token_values(self.config.vocab_size, input_ids=input_ids, attention_mask=attention_mask)
        elif input_ids is not None and input_ids.dtype not in TOKEN_ID_DTYPES:
            raise ValueError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        if attention_mask is not None:
            if (
                attention_mask.dim() != 2
                or attention_mask.shape[0] != B
                or attention_mask.shape[1] not in (T, past + T)
            ):
                expected = f"[{B}, {past + T}]" + (f" or [{B}, {T}]" if past else "")
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}; expected {expected} for input of shape "
                    f"[{B}, {T}] with {past} cached positions"
                )
        return B, T

    @staticmethod
    def _check_flash_attention_kwargs(kwargs: dict, cu_seqlens: torch.Tensor | None):
        """The key side and maximum lengths of flash-attention's packing arguments (`DataCollatorWithFlattening(
        return_flash_attn_kwargs=True)`) must describe the documents `cu_seq_lens_q` does: a packed document
        attends to itself only, so they carry nothing else, and a ValueError names one that differs rather than
        ignoring it."""
        cu_k = kwargs.get("cu_seq_lens_k")
        if cu_k is not None:
            cu_k = torch.as_tensor(cu_k, device=cu_seqlens.device if cu_seqlens is not None else None)
            if cu_seqlens is None or not torch.equal(cu_k, cu_seqlens):
                raise ValueError(
                    f"cu_seq_lens_k ({cu_k.tolist()}) must equal cu_seq_lens_q "
                    f"({cu_seqlens.tolist() if cu_seqlens is not None else 'not given'}): each packed sequence "
                    "attends to itself only"
                )
        lengths = [kwargs.get(name) for name in ("max_length_q", "max_length_k")]
        if cu_seqlens is not None and any(n is not None for n in lengths) and cu_seqlens.numel() > 1:
            if bool((cu_seqlens.diff() < 0).any()) or int(cu_seqlens[0]) != 0:
                return  # a malformed cu_seq_lens_q is named by `packed_segments`, before its lengths are
            longest = int(cu_seqlens.diff().max())
            for name, given in zip(("max_length_q", "max_length_k"), lengths):
                if given is not None and int(given) != longest:
                    raise ValueError(f"{name}={int(given)} is not the longest sequence of cu_seq_lens_q ({longest})")

    def _check_cacheable(self) -> None:
        """ValueError where a cache would not fit the layers: it holds one state per `config.mixer_types` entry,
        and each mixer finds its own by its `layer_idx`. Both hold as built; `config.mixer_types` edited alone,
        or layers removed or reordered in `layers` (their `layer_idx` then not their positions), would fail deep
        inside a mixer or read another layer's state."""
        built = _layer_mixer_types(self.layers)
        if list(self.config.mixer_types) != built:
            raise ValueError(
                f"config.mixer_types {list(self.config.mixer_types)} does not name this model's layers {built} "
                "(edited after the model was built?), and a cache is built from the config: set config.mixer_types "
                "back, or build a model from the edited config"
            )
        indices = [getattr(getattr(layer, "mixer", None), "layer_idx", i) for i, layer in enumerate(self.layers)]
        if indices != list(range(len(indices))):
            raise ValueError(
                f"the layers' cache indices (layer_idx) are {indices}, not their positions 0..{len(indices) - 1} "
                "(layers removed or reordered after the model was built?), so a cache would give a layer another "
                "layer's state: number them again (`for i, layer in enumerate(model.model.layers): "
                "layer.mixer.layer_idx = i`), or save the model and load it again"
            )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: LlamaThinkCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache: LlamaThinkCache | None = None,
        **kwargs,
    ) -> LlamaThinkModelOutput | tuple:
        """Hidden states of the decoder stack.

        `attention_mask` [B, past + T] (or [B, T]) marks real tokens; padding may be on the left (generation) or the
        right (training), never between real tokens. `position_ids` default to each row's count of real tokens
        (what `generate` passes too); CSA cuts its blocks by these positions, so given ones must be exactly these
        (a ValueError names the first that is not), or a packing (below). `cache` (or `past_key_values`) continues
        a `LlamaThinkCache`; `use_cache` defaults to True in eval mode and False in training.

        Packed sequences (several documents per row, padding-free training): `position_ids` that restart at 0 at
        each document, or `seq_idx` [B, T], or `cu_seq_lens_q` [N + 1] for one flattened row (the keyword
        arguments of transformers' `DataCollatorWithFlattening`). Each document then sees only itself, in every
        mixer (`PackedSegments`); such a batch takes no padding and no cache. Positions that neither follow on nor
        restart at 0 raise a ValueError.
        """
        # (asked for by the call, or where it leaves it unset by the config, as transformers' models read it)
        asked = kwargs.get("output_attentions")
        if asked or (asked is None and getattr(self.config, "output_attentions", False)):
            raise ValueError(
                "output_attentions is not supported: linear and compressed mixers have no attention matrix (set "
                "output_attentions to false where it is asked for: the call, the generation config or the config)"
            )
        cache = cache if cache is not None else past_key_values
        explicit_cache = cache is not None or use_cache is True
        seq_idx, cu_seqlens = kwargs.get("seq_idx"), kwargs.get("cu_seq_lens_q", kwargs.get("cu_seqlens"))
        if cache is not None:
            _check_cache(cache, self.config)
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if use_cache or cache is not None:
            self._check_cacheable()
        # without gradients nothing is recomputed, so the layers run as they are, cache included (generate() from a
        # model in training mode), as transformers' GradientCheckpointingLayer does
        checkpointed = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        if checkpointed and (use_cache or cache is not None):
            logger.warning_once("use_cache=True is incompatible with gradient checkpointing; not caching.")
            use_cache, cache = False, None
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if cache is not None:
            cache.check_continuable()
            cache.materialize()  # the state may sit in the CUDA-graph decoder's buffers
        elif use_cache:
            cache = LlamaThinkCache(self.config)
        past = cache.get_seq_length() if cache is not None else 0
        B, T = self._check_inputs(input_ids, inputs_embeds, attention_mask, past)
        if inputs_embeds is None:
            inputs_embeds = embedding_lookup(self.embed_tokens, _as_index(input_ids))
        device = inputs_embeds.device
        if cache is not None and cache.batch_size is not None and cache.batch_size != B:
            raise ValueError(f"the cache holds {cache.batch_size} rows but the input has batch size {B}")

        # Which new positions are real tokens (None: all of them), and over all attended positions.
        valid = None
        if attention_mask is not None:
            new_mask = attention_mask[:, -T:].bool().to(device)
            if not bool(new_mask.all()):
                valid = new_mask
        key_valid = None
        if valid is not None or (cache is not None and cache.key_valid is not None):
            past_valid = cache.key_valid if cache is not None and cache.key_valid is not None else None
            if past_valid is None:
                past_valid = torch.ones(B, past, dtype=torch.bool, device=device)
            new_valid = valid if valid is not None else torch.ones(B, T, dtype=torch.bool, device=device)
            key_valid = torch.cat((past_valid, new_valid), dim=1)
            # each row's real tokens must form one contiguous run (left and/or right padding, no holes)
            starts = key_valid[:, :1].long() + (key_valid.long().diff(dim=1) == 1).sum(1, keepdim=True)
            if bool((starts > 1).any()):
                raise ValueError(
                    "attention_mask has padding between real tokens; only left or right padding is supported. (In "
                    "generate() a right-padded prompt gives this once tokens follow its padding: pad prompts on the "
                    "left, tokenizer.padding_side = 'left'. Given no attention_mask, generate() makes one from "
                    "pad_token_id: a prompt that holds the pad token's id, such as Llama 2's <unk> (0) where that is "
                    "the pad token, needs an explicit attention_mask.)"
                )

        segments = None
        seq_idx, cu_seqlens = (
            torch.as_tensor(x, device=device) if x is not None else None for x in (seq_idx, cu_seqlens)
        )
        for name, value in (("seq_idx", seq_idx), ("cu_seq_lens_q", cu_seqlens)):
            if value is not None and not _is_target_dtype(value.dtype):  # (a float's fraction would be cut off)
                raise ValueError(f"{name} must be an integer tensor, got {value.dtype}")
        self._check_flash_attention_kwargs(kwargs, cu_seqlens)
        if position_ids is not None:
            position_ids = torch.as_tensor(position_ids, device=device)
            if position_ids.is_floating_point() or position_ids.is_complex() or position_ids.dtype == torch.bool:
                raise ValueError(f"position_ids must be an integer tensor, got {position_ids.dtype}")
        if position_ids is not None and position_ids.shape != (B, T):
            if (
                position_ids.dim() != 2
                or position_ids.shape[0] not in (1, B)
                or position_ids.shape[1] not in (T, past + T)
            ):
                shapes = list(dict.fromkeys(f"[{rows}, {cols}]" for rows in (B, 1) for cols in (T, past + T)))
                covering = f" ([.., {past + T}]: the cached positions too)" if past else ""
                raise ValueError(
                    f"position_ids has shape {tuple(position_ids.shape)}; expected {' or '.join(shapes)}{covering} "
                    f"for input of shape [{B}, {T}]"
                )
            position_ids = position_ids[..., -T:].expand(B, T)
        packing_given = seq_idx is not None or cu_seqlens is not None
        if packing_given and (past > 0 or (cache is not None and explicit_cache)):
            raise ValueError(
                "packed sequences (seq_idx / cu_seq_lens_q) cannot be cached or continued from a cache; pass "
                "use_cache=False, or one sequence per row to generate"
            )
        if packing_given and valid is not None:
            raise ValueError("packed sequences (seq_idx / cu_seq_lens_q) take no padding: drop attention_mask")
        if packing_given or (position_ids is not None and T > 1 and valid is None and past == 0):
            segments, position_ids = packed_segments(
                position_ids, seq_idx, cu_seqlens, B, T, self.config.max_position_embeddings
            )
        if segments is None and past + T > self.config.max_position_embeddings:  # (packed: checked per sequence)
            raise ValueError(
                f"sequence of {past + T} positions ({past} cached + {T} new) is longer than "
                f"max_position_embeddings={self.config.max_position_embeddings}"
            )
        if segments is not None and cache is not None:
            if explicit_cache:
                raise ValueError(
                    "packed sequences (position_ids that restart, seq_idx, cu_seq_lens_q) cannot be cached or "
                    "continued from a cache; pass use_cache=False, or one sequence per row to generate"
                )
            cache = None  # the default use_cache of eval mode: nothing to continue
            past = 0
        real_lengths = cache.real_lengths if cache is not None and cache.real_lengths is not None else None
        if cache is not None and real_lengths is None:
            real_lengths = torch.zeros(B, dtype=torch.long, device=device)
        # Each row's real tokens are numbered from its cached length on: the only positions CSA can cut its blocks
        # by, and what generate() passes (its padding positions are ignored).
        start = real_lengths[:, None] if real_lengths is not None else 0
        if valid is None:
            expected = start + torch.arange(T, device=device)[None, :].expand(B, T)
        else:
            expected = (start + valid.long().cumsum(-1) - 1).masked_fill(~valid, 0)
        if position_ids is None:
            position_ids = expected
        elif segments is None and not torch.compiler.is_compiling():  # (the check syncs with the device)
            wrong = position_ids != expected
            if valid is not None:
                wrong &= valid
            if bool(wrong.any()):
                b, t = wrong.nonzero()[0].tolist()
                raise ValueError(
                    f"position_ids must number each row's tokens 0, 1, 2, ... from its cached length ({past} cached "
                    f"positions); row {b}, token {t} has position {int(position_ids[b, t])} where "
                    f"{int(expected[b, t])} was expected. Other positions are not supported (compressed sparse "
                    "attention cuts its blocks by position); packed documents restart at 0 and take no cache or "
                    "padding"
                )
        new_real_lengths, max_new_real_length = None, None
        if real_lengths is not None:
            new_real_lengths = real_lengths + (valid.sum(-1) if valid is not None else T)
            if valid is None and cache.max_real_length is not None:
                max_new_real_length = cache.max_real_length + T  # no host sync on the common decode path
            else:
                max_new_real_length = int(new_real_lengths.max())

        flex_layers = [
            layer for layer in self.layers if getattr(layer.mixer, "uses_flex_attention", lambda _: False)(device)
        ]
        if segments is not None and self.compiled_layers and flex_layers and not torch.compiler.is_compiling():
            document_block_mask(segments, device)  # eagerly, once: the compiled layers take it as an input
        # Layers compiled by `compile_layers` serve the training forwards. Cached steps (generation) call the eager
        # forward: each prompt length and cache state would otherwise be traced again. So do evaluation forwards
        # (eval mode, no autograd): their graphs (and a short last batch's) would add to the training graphs in
        # dynamo's per-function recompile limit, past which a layer silently runs eagerly, training included.
        # With CUDA graphs every forward without autograd is eager: cudagraph trees keep one generation of graph
        # outputs alive only while a backward is pending, so each compiled layer call would free the previous
        # layer's output. (In training mode without CUDA graphs, a no-grad forward, such as reentrant
        # checkpointing's first pass, keeps the compiled layers that its recomputation will use.)
        no_grad = not torch.is_grad_enabled()
        eager = self.compiled_layers and (
            cache is not None or (no_grad and (not self.training or self.compiled_layers_cuda_graphs))
        )
        # Compressed sparse attention on whole rows in layers compiled by inductor and replayed as CUDA graphs:
        # FlexAttention with masks built here, once per shape (`csa_block_masks`), which the compiled layers take
        # as inputs. Its kernels take less time and memory than the SDPA paths', but without CUDA graphs the masks'
        # many tensors add host time to every layer call of a host-bound step, more than its kernels save
        # (BENCHMARKS.md section 1, session 38); other backends (e.g. "cudagraphs" alone) run FlexAttention's
        # unfused reference, which scores every key. A whole-model compile traces this forward, and keeps the SDPA
        # paths.
        csa_masks = None
        whole_rows = segments is None and cache is None and valid is None
        graphs = self.compiled_layers and self.compiled_layers_cuda_graphs and self.compiled_layers_inductor
        if graphs and whole_rows and not eager and not torch.compiler.is_compiling():  # (no layer scan when decoding)
            csa = next(
                (m for m in (layer.mixer for layer in self.layers) if getattr(m, "flex_window", False)), None
            )  # (the first CSA layer that may take the path: the masks are the same for every CSA layer)
            if csa is not None and csa.uses_flex_window(device):
                csa_masks = csa_block_masks(T, csa.window, csa.stride, device)
        # the compiled layers on rows at positions 0 .. T - 1 take RoPE tables made once per length (`whole_rows`:
        # static inputs of their CUDA graphs); eager layers and tensor subclasses (e.g. DTensor) take new ones
        if (
            whole_rows
            and self.compiled_layers
            and not eager
            and type(inputs_embeds) is torch.Tensor
            and not torch.compiler.is_compiling()
        ):
            cos, sin = self.rotary_emb.whole_rows(B, T, inputs_embeds.dtype, device)
        else:
            cos, sin = self.rotary_emb(position_ids, inputs_embeds.dtype)
        ctx = ForwardContext(
            position_ids=position_ids,
            cos=cos,
            sin=sin,
            valid=valid,
            key_valid=key_valid,
            real_lengths=real_lengths,
            new_real_lengths=new_real_lengths,
            max_new_real_length=max_new_real_length,
            cache=cache,
            rotary=self.rotary_emb,
            segments=segments,
            csa_block_masks=csa_masks,
        )

        hidden_states = inputs_embeds
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        runs = None if eager or output_hidden_states or checkpointed else self._current_layer_runs()
        if (eager or not self.compiled_layers) and not torch.compiler.is_compiling():  # the layers run eagerly
            ctx.shared = {}
            if {"full", "csa"} & set(self.config.mixer_types):
                ctx.rotary_tables = rotary_tables(cos, sin, self.config.head_dim)  # (for every attention layer)
        if runs:  # (compiled runs of several layers, `compile_layers`)
            for run in runs:
                hidden_states = run(hidden_states, ctx=ctx)
        else:
            for layer in self.layers:
                hidden_states = (layer.forward if eager else layer)(hidden_states, ctx=ctx)
                if output_hidden_states and layer is not self.layers[-1]:
                    all_hidden_states += (hidden_states,)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        if cache is not None:
            cache.advance(T, valid, B, device)
            cache.max_real_length = max_new_real_length

        if not return_dict:
            return tuple(x for x in (hidden_states, cache, all_hidden_states) if x is not None)
        return LlamaThinkModelOutput(
            last_hidden_state=hidden_states, hidden_states=all_hidden_states, **{_OUTPUT_CACHE_FIELD: cache}
        )


class LlamaThinkForCausalLM(LlamaThinkPreTrainedModel, GenerationMixin):
    """`LlamaThinkModel` with a language-model head (tied to the embedding by default): next-token logits and loss
    in `forward`, and transformers' `generate()` over a `LlamaThinkCache` (greedy, sampling, beam search; assisted
    decoding is refused, the recurrent state cannot be rolled back)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LlamaThinkConfig):
        super().__init__(config)
        self.model = LlamaThinkModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.loss_compile_backend = None  # set by `compile_layers`: the chunked loss then runs compiled
        self.post_init()

    def get_input_embeddings(self):
        """The token embedding, nn.Embedding(vocab_size, hidden_size)."""
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        """Replace the token embedding (transformers' resize_token_embeddings calls this)."""
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        """The head, nn.Linear(hidden_size, vocab_size, bias=False)."""
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        """Replace the head (transformers' resize_token_embeddings calls this)."""
        self.lm_head = new_embeddings

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate() must not build a DynamicCache: this model creates its own LlamaThinkCache (see below)
        return False

    def prepare_inputs_for_generation(self, input_ids, inputs_embeds=None, **kwargs):
        """Inputs of one generate() step. `inputs_embeds` [B, T, hidden_size] (soft prompts, PEFT prompt tuning)
        feed the first step only; later steps feed the generated ids with the cache. As in transformers, with
        `inputs_embeds` alone the returned sequences hold only the new tokens."""
        other_key = "past_key_values" if _GENERATE_CACHE_KEY == "cache" else "cache"
        if kwargs.get(_GENERATE_CACHE_KEY) is None and kwargs.get(other_key) is not None:
            kwargs[_GENERATE_CACHE_KEY] = kwargs.pop(other_key)
        # No cache is made here for the first step: the forward makes a LlamaThinkCache (generate passes use_cache)
        # and generate() takes it from the outputs. Wrappers that decide on "is this the first step" by the absence
        # of `past_key_values` (PEFT prompt tuning injects its virtual tokens then) see the truth that way.
        model_inputs = super().prepare_inputs_for_generation(input_ids, inputs_embeds=inputs_embeds, **kwargs)
        if model_inputs.get(_GENERATE_CACHE_KEY) is not None:  # both spellings (5.24 names it `cache`, PEFT reads
            model_inputs["past_key_values"] = model_inputs[_GENERATE_CACHE_KEY]  # `past_key_values`)
        return model_inputs

    def _prepare_generated_length(
        self,
        generation_config,
        has_default_max_length,
        has_default_min_length,
        model_input_name,
        input_ids_length,
        inputs_tensor,
    ):
        # generate()'s length set-up (same signature in transformers 5.17 to 5.25). The prompt is checked here,
        # before transformers' own length checks and before any forward; the length is capped once the cache is
        # known (`_prepare_cache_for_generation`), because a continued cache can add positions.
        generation_config = super()._prepare_generated_length(
            generation_config=generation_config,
            has_default_max_length=has_default_max_length,
            has_default_min_length=has_default_min_length,
            model_input_name=model_input_name,
            input_ids_length=input_ids_length,
            inputs_tensor=inputs_tensor,
        )
        # positions taken by inputs_embeds beyond the ids that the returned sequences start with (all of them when
        # only inputs_embeds are given)
        hidden = inputs_tensor.shape[1] - input_ids_length if model_input_name == "inputs_embeds" else 0
        self._check_prompt_fits(input_ids_length + hidden)
        generation_config._llamathink_prompt = (input_ids_length, hidden, inputs_tensor.shape[0])
        return generation_config

    def _prepare_generation_config(self, *args, **kwargs):
        # generate()'s settings as transformers merges them, checked before it expands the inputs: it sizes tensors
        # with num_beams and num_return_sequences and divides by num_beams (0 gave a ZeroDivisionError from inside
        # beam search, 2.5 a TypeError from repeat_interleave)
        generation_config, model_kwargs = super()._prepare_generation_config(*args, **kwargs)
        for name in ("num_beams", "num_return_sequences"):
            value = getattr(generation_config, name, None)
            try:
                count = None if isinstance(value, bool) else operator.index(value)  # ints, NumPy's included
            except TypeError:
                count = None
            if value is not None and (count is None or count < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        return generation_config, model_kwargs

    def _validate_generation_mode(self, generation_mode, generation_config, *args, **kwargs):
        # refused up front: transformers 5.17 refuses stateful models here, 5.25 does not, and its assisted loop
        # then stops with a misleading "Assisted decoding requires a cache"
        if generation_mode == GenerationMode.ASSISTED_GENERATION:
            raise ValueError(
                "LlamaThink does not support assisted (speculative) decoding, which drafts tokens and keeps the "
                "accepted ones (assistant_model, prompt_lookup_num_tokens, assistant_early_exit, use_mtp, "
                "speculation_type): its recurrent state (the Gated DeltaNet state, the conv and CSA buffers) cannot "
                "be rolled back to drop rejected draft tokens; generate without them"
            )
        return super()._validate_generation_mode(generation_mode, generation_config, *args, **kwargs)

    def init_continuous_batching(self, *args, **kwargs):
        """Refused (NotImplementedError): transformers' continuous batching (`generate_batch`,
        `continuous_batching_context_manager`, `init_continuous_batching`) keeps every request in a paged
        key/value cache, which has no place for the Gated DeltaNet and CSA state; without this refusal it fails
        in its background thread and returns empty outputs. `generate()` with a padded batch serves many prompts."""
        raise NotImplementedError(
            "LlamaThink does not support continuous batching (generate_batch): its paged attention cache holds "
            "keys and values only, not the Gated DeltaNet and CSA state; call generate() on a left-padded batch"
        )

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        chunk = generation_config.prefill_chunk_size
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0):
            raise ValueError(f"prefill_chunk_size must be a positive number of tokens (or None), got {chunk!r}")
        if generation_config.use_cache is False and model_kwargs.get(_GENERATE_CACHE_KEY) is not None:
            # (each step would feed the whole sequence again into a cache that already holds it)
            raise ValueError(
                "generate() was given a cache (cache or past_key_values) and use_cache=False; drop one of the two"
            )
        out = super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        given = model_kwargs.get(_GENERATE_CACHE_KEY)
        if isinstance(given, LlamaThinkCache):  # continued: the model may have changed since (adapters switched)
            given._decode_signature = None
        chunked = generation_config.prefill_chunk_size is not None and generation_config.use_cache is not False
        if chunked and model_kwargs.get("inputs_embeds") is not None:
            # (transformers' chunked prefill slices input_ids: with embeddings it built empty position ids)
            raise ValueError("prefill_chunk_size prefills input_ids chunk by chunk; it does not take inputs_embeds")
        if chunked and given is None:
            # chunked prefill feeds the prompt to a cache chunk by chunk, and transformers asks for one up front
            # (the first forward builds it otherwise)
            model_kwargs[_GENERATE_CACHE_KEY] = LlamaThinkCache(self.config)
        mask = model_kwargs.get("attention_mask")
        if (
            isinstance(mask, torch.Tensor)
            and mask.dim() == 2
            and mask.shape[1] > 0
            and not bool(mask.bool().any(1).all())
        ):
            # (a forward takes such a row, as padding whose outputs go unused: a chunk of a left-padded prompt can
            # hold nothing else)
            empty = mask.bool().any(1).logical_not().nonzero().flatten().tolist()
            raise ValueError(f"attention_mask rows {empty} hold no real token: nothing to generate from")
        prompt = getattr(generation_config, "_llamathink_prompt", None)
        if prompt is not None:
            self._bound_generation_length(generation_config, model_kwargs, *prompt)
        return out

    def _check_prompt_fits(self, prompt: int):
        limit = self.config.max_position_embeddings
        if prompt >= limit:
            raise ValueError(
                f"the prompt takes {prompt} positions and max_position_embeddings={limit}: no room to generate a "
                "token; shorten the prompt"
            )

    def _bound_generation_length(
        self, generation_config, model_kwargs: dict, input_ids_length: int, hidden: int, batch: int
    ):
        """Bound generate() by `max_position_embeddings`, before any forward pass.

        A prompt that leaves no position for a new token raises a ValueError naming both numbers. A requested
        length (`max_new_tokens` or `max_length`) beyond the limit is cut to it with one warning, so greedy,
        sampling and beam search stop at the limit and return what they generated (as the C runner does), instead
        of failing when the position runs out. Positions are counted as the cache counts them: the padded width of
        a left-padded batch (its longest row), `inputs_embeds` positions that the returned sequences do not hold,
        and a continued cache's positions when only the new ids are passed (the attention mask is then longer than
        the ids; transformers feeds them after the cache).

        The attention mask must cover the prompt's positions, or the cached positions and the prompt's: a
        ValueError names the widths (transformers may drop an all-ones mask and build `position_ids` from its
        width, so a wrong width would otherwise surface as a `position_ids` error the caller never passed). A
        continued cache of another batch size than the prompt's (`batch` rows; without beams or several returned
        sequences, which expand it) is named first."""
        cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
        past = cache.get_seq_length() if isinstance(cache, LlamaThinkCache) else 0
        rows = getattr(cache, "batch_size", None) if isinstance(cache, LlamaThinkCache) else None
        expanded = (generation_config.num_beams or 1) > 1 or (generation_config.num_return_sequences or 1) > 1
        if rows is not None and rows != batch and not expanded:  # (named before the lengths: they follow from it)
            raise ValueError(
                f"the cache holds {rows} rows but the prompt has batch size {batch}: continue a cache with the "
                "batch that filled it"
            )
        mask = model_kwargs.get("attention_mask")
        # (transformers 5.24 drops an all-ones mask and keeps its width as `_mask_length`)
        width = mask.shape[-1] if isinstance(mask, torch.Tensor) else getattr(generation_config, "_mask_length", None)
        given = input_ids_length + hidden
        if width is not None and width not in (given, past + given):
            held = f" after the {past} cached positions" if past else ""
            raise ValueError(
                f"attention_mask has {width} columns but the prompt takes {given} positions{held}; give one mask "
                "column per prompt position" + (" (and per cached position)" if past else "")
            )
        ids_hold_cache = width is None or width == input_ids_length  # transformers then feeds ids[:, past:]
        if past and model_kwargs.get("inputs_embeds") is None and ids_hold_cache and input_ids_length <= past:
            raise ValueError(
                f"the cache holds {past} positions but input_ids only {input_ids_length}: pass the ids the cache has "
                f"seen followed by at least one new token, or only the new ids with an attention mask of {past} + "
                "their count columns"
            )
        if past and model_kwargs.get("inputs_embeds") is None and width is not None and width != input_ids_length:
            hidden += past
        limit = self.config.max_position_embeddings
        prompt = input_ids_length + hidden
        self._check_prompt_fits(prompt)
        if generation_config.max_length + hidden > limit:
            requested = generation_config.max_length + hidden - prompt
            warnings.warn(
                f"generation stops at max_position_embeddings={limit}: the prompt takes {prompt} positions and "
                f"{requested} new tokens were asked for, so at most {limit - prompt} are generated",
                UserWarning,
                stacklevel=_caller_stacklevel(),
            )
            generation_config.max_length = limit - hidden
            if generation_config.min_length is not None:
                generation_config.min_length = min(generation_config.min_length, generation_config.max_length)

    # --- one-token decode on static buffers (CUDA graphs) -----------------------------------------------------
    def _decode_lock(self) -> threading.RLock:
        """The lock under which one thread at a time checks for and runs a static decode step, or moves a cache's
        state in or out of this model's decode buffers (one per model, made on first use)."""
        return self.__dict__.setdefault("_static_lock", threading.RLock())

    def _static_decoder(self, batch_size: int, signature: int) -> _StaticDecoder:
        """The decoder for this batch size and model state (`_decode_signature`), rebuilt when that changed."""
        key = (batch_size, signature)
        decoders = self.__dict__.setdefault("_static_decoders", {})
        if key not in decoders:
            for old in [k for k in decoders if k[1] != signature]:  # graphs of freed weights, or of other modules
                del decoders[old]
            while len(decoders) >= _MAX_STATIC_DECODERS:  # least recently used batch size goes (a cache whose
                del decoders[next(iter(decoders))]  # state is in it still holds it and can take the state back)
            use_graph = self.lm_head.weight.device.type == "cuda"
            decoders[key] = _StaticDecoder(self, batch_size, use_graph=use_graph, lock=self._decode_lock())
        decoders[key] = decoders.pop(key)  # most recently used last
        return decoders[key]

    def _decode_signature(self) -> int:
        """A hash of what a captured decode step depends on besides its buffers, so that a change rebuilds the
        step instead of replaying a stale one: every module's identity (a swapped module, PEFT's
        `merge_and_unload`), train/eval mode and hook ids, PEFT's adapter switches (`_ADAPTER_SWITCHES`:
        `disable_adapter()`, `set_adapter`, `merge_adapter`), and every parameter's and buffer's address, dtype
        and device (weights moved, cast, or replaced through `.data`). Computed once per cache and `generate()` call
        (about a millisecond for the 95M model), not per token; a hand-written decode loop that switches adapters
        between its steps calls `release_decode_graphs()` after the switch."""
        parts = []
        for module in self.modules():
            state = vars(module)
            hooks = tuple(state.get("_forward_hooks", ())) + tuple(state.get("_forward_pre_hooks", ()))
            parts.append((id(module), module.training, hooks, *(_frozen(state.get(n)) for n in _ADAPTER_SWITCHES)))
        for tensor in (*self.parameters(), *self.buffers()):
            parts.append((tensor.data_ptr(), tensor.dtype, tensor.device))
        return hash(tuple(parts))

    def __getstate__(self):
        # copy.deepcopy / pickle: CUDA graphs, weak references to caches and locks cannot be copied; they are rebuilt
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        return {k: v for k, v in state.items() if k not in ("_static_decoders", "_static_lock", "_hooked_modules")}

    def release_decode_graphs(self):
        """Free the CUDA graphs and static buffers of one-token decoding (they are rebuilt when needed), and forget
        the list of modules whose hooks each static step looks for (modules swapped in since are listed anew)."""
        self.__dict__.pop("_hooked_modules", None)
        for decoder in self.__dict__.pop("_static_decoders", {}).values():
            if decoder.owner is not None and decoder.owner() is not None:
                decoder.owner().materialize()

    def _static_decoding_safe(self) -> bool:
        """False where the static step's fixed buffers or direct weight reads would bypass a module's call:
        accelerate's device-map or offload hooks (they move weights per call), or a hooked or wrapped Gated DeltaNet
        conv (`decode_static` reads its weight)."""
        for m in self.modules():
            if "_hf_hook" in vars(m):
                return False
            if isinstance(m, LlamaThinkGatedDeltaNet) and not is_plain_module(m.conv1d, nn.Conv1d):
                return False
        return True

    def _can_decode_static(self, input_ids, cache, attention_mask, position_ids, extra) -> bool:
        """Whether this one-token step may run on the static buffers (`_StaticDecoder`): it computes only the logits
        of the new token, so any other output or option asked for (`extra`: embeddings, labels, hidden states,
        skip_logits, a logits_to_keep tensor, further keyword arguments) takes the general path, which also checks
        them; so does a model with forward hooks (a CUDA graph replays no Python, and the static step calls the
        layers without `LlamaThinkModel.forward`), and, unless `decode_cuda_graphs` is "always", a context longer
        than `STATIC_DECODE_MAX_POSITIONS` (each static step attends over every slot of the context)."""
        if cache is None or input_ids is None or input_ids.shape[1] != 1 or any(extra):
            return False
        mode = self.config.decode_cuda_graphs  # True: on CUDA; "always": on every device (eager off CUDA); False: off
        on = mode == "always" or (
            input_ids.is_cuda and bool(mode) and self.config.max_position_embeddings <= STATIC_DECODE_MAX_POSITIONS
        )
        if not on or torch.is_grad_enabled() or torch.is_autocast_enabled(input_ids.device.type):
            return False
        B, L = input_ids.shape[0], cache.seq_length
        if not (0 < L < self.config.max_position_embeddings and cache.continuable and cache.real_lengths is not None):
            return False  # empty or full caches take the general path (which also reports errors)
        if cache._static is None and not self._static_decoding_safe():  # once per cache entering the static path
            return False
        modules = self.__dict__.get("_hooked_modules")
        if cache._decode_signature is None or modules is None:  # once per cache and generate() call
            cache._decode_signature = self._decode_signature()  # (`_prepare_cache_for_generation` resets it)
            # the modules whose calls the static step skips or replays (this model's own hooks run around forward
            # either way); listed again with the signature and after `release_decode_graphs`
            modules = self.__dict__["_hooked_modules"] = tuple(m for m in self.modules() if m is not self)
        if _forward_hooks_present(modules):  # every step: a hook may be added between two of them
            return False
        if cache.batch_size != B or (
            attention_mask is not None and tuple(attention_mask.shape) not in ((B, L + 1), (B, 1))
        ):
            return False
        if position_ids is not None and position_ids.shape[-1] < 1:
            return False
        # One host sync checks the token ids, that the new token is not padding, and that the positions (which
        # generate() passes) are each row's next position, the one the static step writes.
        last = attention_mask[:, -1] if attention_mask is not None else input_ids.new_ones(1)
        expected = cache._static.positions if cache._static is not None else cache.real_lengths
        wrong = (
            (position_ids[..., -1].reshape(-1) != expected).sum()
            if position_ids is not None
            else expected.new_zeros(())
        )
        stats = (input_ids.min(), input_ids.max(), last.min(), wrong)
        lo, hi, real, n_wrong = torch.stack([x.to(torch.long) for x in stats]).tolist()
        return 0 <= lo and hi < self.config.vocab_size and real == 1 and n_wrong == 0

    def _decode_static_step(self, input_ids: torch.Tensor, static: _StaticDecoder) -> torch.Tensor:
        """Embedding -> layers -> head for one token on `static`'s buffers (what the CUDA graph captures)."""
        hidden_states = self.model.embed_tokens(input_ids)
        static.key_valid.index_fill_(1, static.index, True)  # the new token is real (checked before the step)
        position_ids = static.positions[:, None]  # [B, 1]
        cos, sin = self.model.rotary_emb(position_ids, hidden_states.dtype)
        ctx = ForwardContext(
            position_ids=position_ids,
            cos=cos,
            sin=sin,
            valid=None,
            key_valid=None,
            real_lengths=None,
            new_real_lengths=None,
            cache=None,
            rotary=self.model.rotary_emb,
            static=static,
        )
        for layer in self.model.layers:
            run = layer.forward if self.model.compiled_layers else layer  # (compiled layers: see LlamaThinkModel)
            hidden_states = run(hidden_states, ctx=ctx)
        return self.lm_head(self.model.norm(hidden_states))[:, 0]  # [B, vocab]

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: LlamaThinkCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: LlamaThinkCache | None = None,
        skip_logits: bool = False,
        **kwargs,
    ) -> LlamaThinkCausalLMOutput | tuple:
        """Causal LM forward. `labels` [B, T] gives the mean next-token cross-entropy: positions are shifted inside,
        -100 is ignored. `logits_to_keep=n` computes logits for the last n positions only (generate uses 1).

        `skip_logits=True` (what this project's training loops pass; it needs `labels`) computes the loss chunk by
        chunk without ever holding the [B, T, vocab] logits and returns `logits=None`: `chunked_causal_lm_loss` on
        the head's weight when `lm_head` is a plain Linear (`is_plain_linear`), else
        `chunked_causal_lm_loss_through_module`, which calls the wrapped head (LoRA, quantised, hooked) so that it
        stays in the path and the loss equals the eval-mode one. By default the logits come back with the loss, as
        from transformers' own models: trainers such as TRL's `SFTTrainer` read them (entropy, token accuracy).

        `shift_labels` (a keyword, transformers' name) [B, T] are targets already shifted, position t predicting
        shift_labels[t]: what context parallelism and padding-free collators pass, where a row's last position has a
        target beyond it. With `labels` the loss uses them in place of the shifted `labels`; without, no loss is
        computed and they go unused, as in transformers' models. Raises ValueError for labels or shift_labels that
        are not integer token ids (-100 ignored) of the vocabulary, or not [B, T]."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        # without labels no loss is computed, and shift_labels go unused, as in transformers' models (its Trainer
        # drops labels for a custom loss or label smoothing after context parallelism has added shift_labels)
        shift_labels = kwargs.pop("shift_labels", None)
        if labels is None:
            shift_labels = None
        cache = cache if cache is not None else past_key_values
        if cache is not None:
            _check_cache(cache, self.config)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        # what the static one-token step does not compute or check (`_can_decode_static`); options left at None or
        # False ask for nothing
        extra = (
            inputs_embeds is not None,
            labels is not None,
            bool(output_hidden_states),
            skip_logits,
            not isinstance(logits_to_keep, int),
            any(v is not None and v is not False for v in kwargs.values()),
        )
        if input_ids is not None:
            _check_tensor_arguments(input_ids=input_ids, attention_mask=attention_mask)
            input_ids = _as_index(input_ids)  # (the static decoder embeds them directly)
        logits = None
        if cache is not None and input_ids is not None and input_ids.shape[1] == 1:
            with self._decode_lock():  # another thread's step may be moving this cache's state (`_StaticDecoder`)
                if self._can_decode_static(input_ids, cache, attention_mask, position_ids, extra):
                    decoder = self._static_decoder(input_ids.shape[0], cache._decode_signature)
                    logits = decoder.step(cache, input_ids)[:, None]  # [B, 1, vocab]
        if logits is not None:
            if not return_dict:
                return (logits, cache)
            return LlamaThinkCausalLMOutput(logits=logits, **{_OUTPUT_CACHE_FIELD: cache})
        if labels is not None:
            labels = self._check_targets("labels", labels)
        if shift_labels is not None:
            shift_labels = self._check_targets("shift_labels", shift_labels)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        for name, targets in (("labels", labels), ("shift_labels", shift_labels)):
            if targets is not None and targets.shape != hidden_states.shape[:2]:
                raise ValueError(f"{name} has shape {tuple(targets.shape)}, expected {tuple(hidden_states.shape[:2])}")
        if skip_logits:
            if labels is None:
                raise ValueError("skip_logits=True needs labels: without logits the loss is the only output")
            num_items = kwargs.get("num_items_in_batch")
            if needs_plain_autograd(hidden_states, module=self.lm_head):
                # the chunked losses' autograd Function and checkpointing have no torch.func rules: the same loss on
                # the full logits, in the chunked loss's accumulation dtype (float64 for a float64 model)
                targets, divisor = _next_token_targets(labels, num_items, hidden_states.device, shift_labels)
                loss = _head_cross_entropy_sum(self.lm_head, hidden_states, targets) / divisor
            elif is_plain_linear(self.lm_head):
                loss = chunked_causal_lm_loss(
                    hidden_states,
                    self.lm_head.weight,
                    labels,
                    num_items_in_batch=num_items,
                    compile_backend=self.loss_compile_backend,
                    shift_labels=shift_labels,
                )
            else:  # a wrapped head (LoRA, quantised, hooked) must be called, never bypassed through its weight
                loss = chunked_causal_lm_loss_through_module(
                    hidden_states, self.lm_head, labels, num_items, shift_labels=shift_labels
                )
            if not return_dict:
                return tuple(x for x in (loss, outputs.cache, outputs.hidden_states) if x is not None)
            return LlamaThinkCausalLMOutput(
                loss=loss, logits=None, hidden_states=outputs.hidden_states, **{_OUTPUT_CACHE_FIELD: outputs.cache}
            )
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            if logits.shape[1] != labels.shape[1]:
                raise ValueError("labels need logits for every position: do not combine labels with logits_to_keep")
            loss = self.loss_function(
                logits=logits,
                labels=labels,
                vocab_size=self.config.vocab_size,
                num_items_in_batch=kwargs.get("num_items_in_batch"),
                shift_labels=shift_labels,
            )
        if not return_dict:
            out = (logits, outputs.cache, outputs.hidden_states)
            out = tuple(x for x in out if x is not None)
            return (loss,) + out if loss is not None else out
        return LlamaThinkCausalLMOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, **{_OUTPUT_CACHE_FIELD: outputs.cache}
        )

    def _check_targets(self, name: str, targets: torch.Tensor) -> torch.Tensor:
        """`labels` / `shift_labels` as int64, or ValueError naming them: not integer, or (`check_token_values`, unless
        `inputs_checked_by_caller`) an id that is neither -100 (ignored) nor in the vocabulary (CUDA would assert
        inside the loss). Checked before the forward: its host sync then waits only for the previous step's work;
        after the forward it would hold the host until the forward ran."""
        if not torch.compiler.is_compiling() and not _inputs_checked_by_caller(self):
            check_token_values(self.config.vocab_size, **{name: targets})
        elif not _is_target_dtype(targets.dtype):
            raise ValueError(f"{name} must be an integer tensor (token ids, -100 ignored), got {targets.dtype}")
        # cross-entropy takes int64 targets; transformers' loss views them flat (both no-ops for contiguous int64)
        return targets.long().contiguous()


# ----------------------------------------------------------------------------------------------------------------
# Cost
# ----------------------------------------------------------------------------------------------------------------


def flops_per_token(config: LlamaThinkConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward) of a model of `config` on sequences of `seq_len`
    tokens, the count used for MFU: 6 x (non-embedding parameters + the output head; the embedding lookup costs no
    FLOPs, the head does), plus each layer's sequence-mixing term, its mixer class's `flops_per_token` (full
    attention 6 * Hq * D * T, CSA 12 * Hq * D * (min(W, T) + T / (2 * stride)), Gated DeltaNet 12 * Hv * Dk * Dv).
    The parameters are counted on a model built on the meta device (no memory, no initialisation).
    Raises `ValueError` for an unknown mixer type."""
    with torch.device("meta"):
        model = LlamaThinkForCausalLM(config)
    body = sum(
        p.numel() for n, p in model.named_parameters() if not n.endswith(("embed_tokens.weight", "lm_head.weight"))
    )
    flops = 6.0 * (body + config.vocab_size * config.hidden_size)
    for kind in config.mixer_types:
        flops += mixer_class(kind).flops_per_token(config, seq_len)
    return flops


def _name_among_causal_lms() -> None:
    """Name `LlamaThinkForCausalLM` among transformers' causal LMs (`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`, which
    `AutoModelForCausalLM.register` does not fill), as transformers' own are: `Trainer` shifts the labels of a
    smoothed loss (`label_smoothing_factor`) only for a model named there, and smoothed the targets of each position's
    own token otherwise, without a word; the text-generation pipeline checks the name too. At import, so that a model
    loaded with `trust_remote_code` (this file without the package) is named as well."""
    from transformers.models.auto import modeling_auto

    modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.setdefault(LlamaThinkConfig.model_type, "LlamaThinkForCausalLM")


_name_among_causal_lms()

__all__ = [
    "LlamaThinkCache",
    "flops_per_token",
    "CUDA_GRAPH_COMPILE_MODES",
    "uses_cuda_graphs",
    "chunked_causal_lm_loss",
    "chunked_causal_lm_loss_through_module",
    "loss_chunk_rows",
    "cross_entropy_chunk",
    "accumulate_grad_weight",
    "is_plain_linear",
    "LlamaThinkForCausalLM",
    "LlamaThinkModel",
    "LlamaThinkPreTrainedModel",
    "torch_chunk_gated_delta_rule",
    "torch_recurrent_gated_delta_rule",
]
