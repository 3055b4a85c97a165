"""Optional fla (flash-linear-attention) and FlashQLA Gated DeltaNet kernels behind the contract of LlamaThink's
PyTorch reference kernels (`torch_chunk_gated_delta_rule` / `torch_recurrent_gated_delta_rule` in
`modeling_llamathink.py`).

fla is never imported at module load: `_fla_ops` imports it on first use and remembers a failure, so the model runs
on its pure-PyTorch kernels wherever fla (or triton) is missing or broken; FlashQLA likewise (`_flash_qla_kernels`).
`select_gdn_backend` is the one place that decides between them; `FLA_GDN_KERNELS` and `FLASH_QLA_GDN_KERNELS`
mirror the modeling file's `GDN_KERNELS` table.

Like the configuration and modeling files, this file only imports from torch, transformers and the standard library:
the modeling file imports it with a single-dot relative import, so `save_pretrained` copies it next to the weights and
`trust_remote_code=True` loading finds it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import operator
import os
import re
import shutil
import sys
import tempfile
import types
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

_fla_state: dict = {}


def _warn_once(key: str, message: str):
    if key not in _fla_state:
        _fla_state[key] = True
        logger.warning(message)


def _fla_ops():
    """fla's (chunk, fused_recurrent) gated delta rule functions, or None when fla is missing or broken. The chunked
    one without fla's backend dispatch (`fla.backends.dispatch`), which would hand 16-bit calls with heads of 128 to
    FlashQLA's public function wherever flash-qla is installed (its own gate sums fail for 9 heads): "fla" runs
    fla's kernels, FlashQLA runs only where asked for (`flash_qla_chunk_gated_delta_rule`)."""
    if "ops" not in _fla_state:
        try:
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule

            chunk = inspect.unwrap(chunk_gated_delta_rule)  # through torch.compiler.disable and fla's dispatch
            _fla_state["ops"] = (chunk, fused_recurrent_gated_delta_rule)
        except Exception as err:  # ImportError, or a broken triton/fla install
            _fla_state["ops"] = None
            _fla_state["import_error"] = f"{type(err).__name__}: {err}"
    return _fla_state["ops"]


def fla_backward_problem(device: torch.device) -> str | None:
    """Why fla's gated-delta-rule backward cannot be trusted on `device`, or None.

    fla 0.6 refuses the backward pass on Hopper (sm_90) with Triton >= 3.4 and < 3.7.1 (wrong gradients, fla issue
    #640) unless tilelang is installed (and not turned off by fla's `FLA_TILELANG=0`, read when first asked), in which
    case it uses tilelang for that kernel. We detect the case up front: an exception raised inside autograd's
    backward would otherwise end a training run.
    """
    if device.type != "cuda":
        return "fla kernels need a CUDA device"
    # Memoised per device: the checks below (importlib's find_spec in particular) cannot be traced by dynamo, and a
    # compiled training step asks again in every Gated DeltaNet layer.
    key = ("backward-problem", device.index if device.index is not None else torch.cuda.current_device())
    if key not in _fla_state:
        _fla_state[key] = _fla_backward_problem_uncached(device)
    return _fla_state[key]


def _fla_backward_problem_uncached(device: torch.device) -> str | None:
    import importlib.util

    try:
        import triton

        triton_version = tuple(int(x) for x in triton.__version__.split("+")[0].split(".")[:3])
    except Exception:  # pragma: no cover - fla imports triton, so this only happens on broken installs
        return "triton is not importable"
    major, _ = torch.cuda.get_device_capability(device)
    if major == 9 and (3, 4, 0) <= triton_version < (3, 7, 1):
        if os.environ.get("FLA_TILELANG", "1") == "0":  # fla's own switch: its Triton kernel would then raise
            return (
                f"fla's backward pass is wrong on Hopper with Triton {triton.__version__} (fla issue #640) and "
                "FLA_TILELANG=0 turns off the tilelang kernel that replaces it (unset it, or Triton >= 3.7.1)"
            )
        if importlib.util.find_spec("tilelang") is None:
            return (
                f"fla's backward pass is wrong on Hopper with Triton {triton.__version__} (fla issue #640) and "
                "tilelang is not installed (pip install tilelang, or Triton >= 3.7.1)"
            )
    return None


def select_gdn_backend(
    requested: str,
    device: torch.device,
    needs_grad: bool,
    dtype: torch.dtype | None = None,
    head_dims: tuple[int, int] | None = None,
) -> str:
    """Resolve `config.gdn_backend` ("auto", "flash_qla", "fla" or "torch") to the kernels that will run: "fla"
    only where fla is installed, on CUDA, and (when gradients are needed) where its backward is trustworthy and the
    inputs are 16-bit; otherwise "torch" (the PyTorch reference), with one warning saying why. Where fla runs,
    "flash_qla" gives "flash_qla" (FlashQLA's delta-rule kernels, fla's conv and decode step) where
    `flash_qla_problem` finds none for `head_dims` (Dk, Dv) and `dtype`, and warns once where it cannot. "auto"
    resolves to fla here: FlashQLA's first kernel builds made a cold first compiled step 87-101 s on an H200, against
    fla's 42-44 s (BENCHMARKS.md section 1, sessions 28 and 40), so a compiled training run switches its "auto"
    layers to FlashQLA only where its kernels are built already
    (`LlamaThinkPreTrainedModel.choose_training_kernels`).
    `dtype`: the dtype of the values (v)."""
    if requested == "torch" or device.type != "cuda":
        if requested in ("fla", "flash_qla") and device.type != "cuda":
            _warn_once(
                "fla-cpu", f"gdn_backend={requested!r} needs a CUDA device; using the PyTorch Gated DeltaNet kernels"
            )
        return "torch"
    if _fla_ops() is None:
        _warn_once(
            "fla-missing",
            "flash-linear-attention (fla-core) is not available "
            f"({_fla_state.get('import_error', 'not installed')}); using the slower PyTorch Gated DeltaNet kernels. "
            "Install it with `pip install llamathink[gpu]`.",
        )
        return "torch"
    if needs_grad:
        problem = fla_backward_problem(device)
        if problem is not None:
            _warn_once("fla-backward", f"{problem}; training uses the PyTorch Gated DeltaNet kernels instead.")
            return "torch"
        if dtype is not None and dtype not in (torch.float16, torch.bfloat16):
            # fla computes fp32 inputs through TF32 matmuls, and our fp32 gradient check against the CPU reference
            # has not passed on the H100 (BENCHMARKS.md): fp32 training stays on the exact PyTorch kernels.
            _warn_once(
                "fla-fp32",
                f"fla is used for 16-bit (bf16 autocast) training; training in {dtype} uses the PyTorch Gated DeltaNet "
                "kernels instead.",
            )
            return "torch"
    if requested == "flash_qla":
        problem = flash_qla_problem(device, head_dims, dtype)
        if problem is None:
            return "flash_qla"
        _warn_once("flash-qla", f"gdn_backend='flash_qla': {problem}; using fla's Gated DeltaNet kernels")
    return "fla"


def _fla_dtype(v: torch.Tensor) -> torch.dtype:
    """The dtype fla computes in: 16-bit inputs as they are, anything else in fp32."""
    return v.dtype if v.dtype in (torch.float16, torch.bfloat16) else torch.float32


def _fla_chunk_internals():
    """fla's chunked forward and backward functions (the pieces its autograd function calls), or None where this
    fla lacks them in the form used here (fla-core 0.6); then compiled training takes the graph-break path."""
    if "internals" not in _fla_state:
        _fla_state["internals"] = None
        try:
            from fla.ops.gated_delta_rule.chunk import chunk_gated_delta_rule_bwd, chunk_gated_delta_rule_fwd

            need_fwd = {"q", "k", "v", "g", "beta", "scale", "initial_state", "output_final_state"}
            need_bwd = {"q", "k", "v", "g", "beta", "A", "scale", "initial_state", "do", "dht"}
            if need_fwd <= set(inspect.signature(chunk_gated_delta_rule_fwd).parameters) and need_bwd <= set(
                inspect.signature(chunk_gated_delta_rule_bwd).parameters
            ):
                _fla_state["internals"] = (chunk_gated_delta_rule_fwd, chunk_gated_delta_rule_bwd)
        except Exception:  # fla missing, broken, or reorganised
            pass
    return _fla_state["internals"]


# Eager: fla's own autograd function. Under torch.compile the same kernels run behind two opaque custom ops
# (forward, backward) that dynamo records as single nodes: dynamo cannot trace fla's Triton/tilelang launch code,
# and `torch.compiler.disable` alone cuts the graph at every Gated DeltaNet layer (BENCHMARKS.md section 1: the
# compiled step then waits ~39 ms of 109 on the host).
@torch.compiler.disable
def _fla_chunk_eager(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens=None):
    chunk, _ = _fla_ops()
    dtype = _fla_dtype(v)
    extra = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}
    return chunk(
        q.to(dtype),
        k.to(dtype),
        v.to(dtype),
        g.float(),
        beta.to(dtype),
        scale=scale,
        initial_state=None if initial_state is None else initial_state.float(),
        output_final_state=output_final_state,
        **extra,
    )


def _chunk_indices(cu_seqlens: torch.Tensor | None) -> dict:
    """fla's variable-length arguments for `cu_seqlens` [N + 1] (None: equal-length rows): the chunk index table
    its forward and backward both need, computed once here."""
    if cu_seqlens is None:
        return {}
    try:  # (fla's kernels are running: it imports. A try block, so that transformers' check of a Hub copy's imports
        # does not count fla as required: `trust_remote_code` loading works without it, on the PyTorch kernels)
        from fla.ops.utils.index import prepare_chunk_indices
    except ImportError as err:
        raise RuntimeError(f"fla's variable-length kernels need fla.ops.utils.index: {err}") from err
    return {"cu_seqlens": cu_seqlens, "chunk_indices": prepare_chunk_indices(cu_seqlens, 64)}


def _empty_f32(like: torch.Tensor) -> torch.Tensor:  # custom ops return tensors, never None
    return like.new_empty(0, dtype=torch.float32)


def _device_of(t: torch.Tensor):
    """Make `t`'s GPU the current one while fla launches (its kernels run on the current device's stream)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _define_fla_chunk_op():
    """Define `llamathink::fla_chunk_gdn` (+ its backward op and autograd formula) once per process: a copy of this
    file loaded through `trust_remote_code` next to the installed package reuses the first definition rather than
    registering the op a second time."""
    try:
        return torch.ops.llamathink.fla_chunk_gdn
    except (AttributeError, RuntimeError):
        pass

    @torch.library.custom_op("llamathink::fla_chunk_gdn", mutates_args=())
    def fla_chunk_gdn(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        g: torch.Tensor,
        beta: torch.Tensor,
        scale: float,
        initial_state: torch.Tensor | None,
        output_final_state: bool,
        cu_seqlens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v, beta [B, T, H, D] / [B, T, H] in one 16-bit or fp32 dtype, g fp32, all contiguous ->
        o [B, T, H, Dv], final state [B, H, Dk, Dv] fp32 (or empty), and what the backward needs: fla's per-chunk
        cumulative gates [B, T, H] fp32 and inverted WY matrices A [B, T, H, 64] (k's dtype). `cu_seqlens`
        [N + 1] (B = 1): N packed sequences, each starting from a zero state."""
        fwd, _ = _fla_chunk_internals()
        with _device_of(q):
            g_cum, o, A, state = fwd(
                q=q,
                k=k,
                v=v,
                g=g,
                beta=beta,
                scale=scale,
                initial_state=initial_state,
                output_final_state=output_final_state,
                **_chunk_indices(cu_seqlens),
            )[:4]
        if A.shape != (*v.shape[:3], 64) or A.dtype != k.dtype or g_cum.dtype != torch.float32:
            raise RuntimeError(
                f"fla's chunk_gated_delta_rule_fwd returned A {tuple(A.shape)} {A.dtype}, gates {g_cum.dtype}: not "
                "the layout this version of LlamaThink was written for (fla-core 0.6); train without torch.compile"
            )
        return o.to(q.dtype).contiguous(), state if state is not None else _empty_f32(q), g_cum, A

    @fla_chunk_gdn.register_fake
    def _(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens=None):
        B, T, H, V = v.shape  # H: value heads (fla also takes fewer q/k heads; we pass them repeated)
        state = v.new_empty((B, H, k.shape[3], V), dtype=torch.float32) if output_final_state else _empty_f32(q)
        return torch.empty_like(v, dtype=q.dtype), state, torch.empty_like(g), k.new_empty(B, T, H, 64)

    @torch.library.custom_op("llamathink::fla_chunk_gdn_backward", mutates_args=())
    def fla_chunk_gdn_backward(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        g_cum: torch.Tensor,
        beta: torch.Tensor,
        A: torch.Tensor,
        scale: float,
        initial_state: torch.Tensor | None,
        grad_o: torch.Tensor,
        grad_state: torch.Tensor | None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gradients w.r.t. q, k, v, g, beta and the initial state (empty when there is none), by fla's backward."""
        _, bwd = _fla_chunk_internals()
        with _device_of(q):
            dq, dk, dv, dbeta, dg, dh0 = bwd(
                q=q,
                k=k,
                v=v,
                g=g_cum,
                beta=beta,
                A=A,
                scale=scale,
                initial_state=initial_state,
                do=grad_o.to(q.dtype).contiguous(),
                dht=grad_state,
                **_chunk_indices(cu_seqlens),
            )[:6]
        grads = (
            dq.to(q.dtype),
            dk.to(k.dtype),
            dv.to(v.dtype),
            dg.float(),
            dbeta.to(beta.dtype),
            dh0.float() if dh0 is not None and initial_state is not None else _empty_f32(q),
        )
        return tuple(t.contiguous() for t in grads)

    @fla_chunk_gdn_backward.register_fake
    def _(q, k, v, g_cum, beta, A, scale, initial_state, grad_o, grad_state, cu_seqlens=None):
        dh0 = torch.empty_like(initial_state, dtype=torch.float32) if initial_state is not None else _empty_f32(q)
        return (
            torch.empty_like(q),
            torch.empty_like(k),
            torch.empty_like(v),
            torch.empty_like(g_cum),
            torch.empty_like(beta),
            dh0,
        )

    def setup_context(ctx, inputs, output):
        q, k, v, _, beta, scale, initial_state, _, cu_seqlens = inputs
        _, _, g_cum, A = output
        ctx.save_for_backward(q, k, v, g_cum, beta, A, initial_state, cu_seqlens)
        ctx.scale = scale

    def backward(ctx, grad_o, grad_state, _grad_g_cum, _grad_A):
        q, k, v, g_cum, beta, A, initial_state, cu_seqlens = ctx.saved_tensors
        if grad_state is not None and grad_state.numel() == 0:
            grad_state = None
        dq, dk, dv, dg, dbeta, dh0 = fla_chunk_gdn_backward(
            q, k, v, g_cum, beta, A, ctx.scale, initial_state, grad_o, grad_state, cu_seqlens
        )
        return dq, dk, dv, dg, dbeta, None, dh0 if initial_state is not None else None, None, None

    fla_chunk_gdn.register_autograd(backward, setup_context=setup_context)
    return torch.ops.llamathink.fla_chunk_gdn


_fla_chunk_op = _define_fla_chunk_op()


def fla_chunk_gated_delta_rule(
    q, k, v, g, beta, scale, initial_state=None, output_final_state=False, chunk_size=64, cu_seqlens=None
):
    """fla's chunked kernel behind our contract (q, k already L2-normalised; [B, T, H, D]; fp32 g). `cu_seqlens`
    [N + 1] (B = 1): the row holds N sequences, each starting from a zero state (fla's variable-length mode)."""
    if not torch.compiler.is_compiling() or _fla_chunk_internals() is None:
        o, state = _fla_chunk_eager(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens)
        return o.to(v.dtype), state
    # Traced: the casts and copies to fla's dtypes and layout happen here, where inductor fuses them into the
    # kernels that produce q, k, v, g and beta (behind a graph break they were 13 ms of separate copies per step).
    dtype = _fla_dtype(v)
    o, state, _, _ = _fla_chunk_op(
        q.to(dtype).contiguous(),
        k.to(dtype).contiguous(),
        v.to(dtype).contiguous(),
        g.float().contiguous(),
        beta.to(dtype).contiguous(),
        scale,
        None if initial_state is None else initial_state.float().contiguous(),
        output_final_state,
        cu_seqlens,
    )
    return o.to(v.dtype), state if output_final_state else None


def fla_fused_gates_available() -> bool:
    """Whether this fla's chunked delta rule computes the layer's gates itself (`fla_chunk_gated_delta_rule_gated`):
    beta's sigmoid (`use_beta_sigmoid_in_kernel`) and the decay `-exp(A_log) * softplus(a + dt_bias)` with its
    chunk-local sum (`use_gate_in_kernel`), fla-core 0.6."""
    if "fused-gates" not in _fla_state:
        _fla_state["fused-gates"] = False
        if _fla_ops() is not None:
            try:
                from fla.ops.gated_delta_rule.chunk import chunk_gated_delta_rule_fwd

                chunk = _fla_ops()[0]
                _fla_state["fused-gates"] = "use_beta_sigmoid_in_kernel" in inspect.signature(chunk).parameters and {
                    "use_gate_in_kernel",
                    "A_log",
                    "dt_bias",
                } <= set(inspect.signature(chunk_gated_delta_rule_fwd).parameters)
            except (ImportError, AttributeError, TypeError, ValueError):  # fla reorganised: the model's gates
                _fla_state["fused-gates"] = False
    return _fla_state["fused-gates"]


@torch.compiler.disable
def fla_chunk_gated_delta_rule_gated(
    q, k, v, a, b, A_log, dt_bias, scale, initial_state=None, output_final_state=False, cu_seqlens=None
):
    """The Gated DeltaNet layer's delta rule from its gate pre-activations, by fla's chunked kernels, which compute
    the gates in their own passes (`fla_fused_gates_available`): q, k [B, T, Hk, Dk] L2-normalised, v [B, T, Hv,
    Dv] (Hv a multiple of Hk: each key head serves Hv / Hk consecutive value heads, fla's grouped-value form), the
    beta and decay pre-activations b, a [B, T, Hv], A_log and dt_bias [Hv] (float32 parameters; fla returns their
    gradients) -> o [B, T, Hv, Dv] in v's dtype and the final state [B, Hv, Dk, Dv] float32 (None unless
    `output_final_state`). `cu_seqlens` [N + 1] (B = 1): N packed sequences, each from a zero state.

    The same function as `fla_chunk_gated_delta_rule` given beta = sigmoid(b) and g = -exp(A_log) * softplus(a +
    dt_bias) (float32), the model's `_heads_and_gates` (tests/test_gpu.py compares forward and gradients with the
    PyTorch reference). q and k are not normalised here: fla's own L2-norm kernels time 25 configurations per
    shape bucket on their first call (a minute of a cold first step), where one fused `rms_norm` needs none
    (`l2norm_rms`). Eager only: under torch.compile the model computes the gates in the traced graph, where
    inductor fuses them. 16-bit q, k, v, a, b."""
    chunk, _ = _fla_ops()
    extra = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}
    o, state = chunk(
        q,
        k,
        v,
        a,
        b,
        scale=scale,
        initial_state=None if initial_state is None else initial_state.float(),
        output_final_state=output_final_state,
        use_beta_sigmoid_in_kernel=True,
        use_gate_in_kernel=True,
        A_log=A_log,
        dt_bias=dt_bias,
        **extra,
    )
    return o.to(v.dtype), state


def _fla_gated_norm():
    """fla's fused gated RMSNorm function (`rms_norm_gated`, fla.modules.norm.fused_norm_gate in fla-core 0.6,
    fla.modules.fused_norm_gate before), or None where fla lacks it in the form used here."""
    if "gated-norm" not in _fla_state:
        _fla_state["gated-norm"] = None
        if _fla_ops() is not None:
            import importlib

            for module in ("fla.modules.norm.fused_norm_gate", "fla.modules.fused_norm_gate"):
                try:
                    fn = importlib.import_module(module).rms_norm_gated
                except (ImportError, AttributeError):  # another layout of fla: try the next, else the PyTorch norm
                    continue
                if {"x", "g", "weight", "bias", "activation", "eps"} <= set(inspect.signature(fn).parameters):
                    _fla_state["gated-norm"] = fn
                    break
    return _fla_state["gated-norm"]


def fla_gated_norm_available() -> bool:
    """True when fla's fused gated RMSNorm (`fla_gated_rms_norm`) can be used."""
    return _fla_gated_norm() is not None


@torch.compiler.disable
def fla_gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`rmsnorm(x) * weight * silu(gate)` over the last dim by fla's fused kernel, forward and backward (one pass
    each, float32 inside): x, gate [..., D] (CUDA), weight [D] -> [..., D] in x's dtype; gradients for x, gate and
    weight in their own dtypes. The reference is `LlamaThinkGatedRMSNorm`'s PyTorch form (tests/test_gpu.py
    compares both). Raises RuntimeError where fla's kernel is not available (`fla_gated_norm_available`)."""
    fn = _fla_gated_norm()
    if fn is None:
        raise RuntimeError("fla's fused gated RMSNorm (fla.modules.norm.fused_norm_gate) is not available")
    return fn(x, gate, weight, None, activation="silu", eps=eps)


@torch.compiler.disable
def fla_recurrent_gated_delta_rule(q, k, v, g, beta, scale, initial_state=None, output_final_state=False):
    """fla's fused recurrent kernel (decode; it has no backward) behind our contract."""
    _, recurrent = _fla_ops()
    dtype = _fla_dtype(v)
    o, state = recurrent(
        q.to(dtype),
        k.to(dtype),
        v.to(dtype),
        g=g.float(),
        beta=beta.to(dtype),
        scale=scale,
        initial_state=None if initial_state is None else initial_state.float(),
        output_final_state=output_final_state,
    )
    return o.to(v.dtype), state


FLA_GDN_KERNELS = {"chunk": fla_chunk_gated_delta_rule, "recurrent": fla_recurrent_gated_delta_rule}


# ----------------------------------------------------------------------------------------------------------------
# FlashQLA (flash-qla): fused TileLang Gated DeltaNet kernels for training on Hopper and Blackwell, heads of 128
# ----------------------------------------------------------------------------------------------------------------
# FlashQLA (the Qwen team's kernels, also fla's own backend for 128-wide heads) computes the chunked delta rule in a
# few fused, warp-specialised kernels rather than fla's chain of Triton kernels: at the 95M model's shape its
# forward + backward takes 0.43x fla's time on the H200 (`benchmarks/bench_gdn_kernels.py`, BENCHMARKS.md section
# 1). Its kernels take heads of exactly 128; narrower heads are zero-padded to 128 and the output sliced back,
# which is exact: a zero key column never writes the state's row, a zero value column keeps the state's column
# zero, so the padded output and the gradients of the padded values are zero and the rest is unchanged.
# The gates' chunk-local cumulative sums come from fla's kernel, not FlashQLA's own, which holds all heads of a
# chunk in one TileLang fragment and finds no thread layout for 9 heads. The cached prefill (an initial or final
# state) keeps fla's kernels; FlashQLA runs training and uncached forwards.

FLASH_QLA_HEAD_DIM = 128
# what flash-qla 0.1.3 trains on with chunks of 64 (its sm120/sm121 kernels take chunks of 32, forward-only in fla)
_FLASH_QLA_ARCHES = {(9, 0), (10, 0), (10, 3)}


def _flash_qla_kernels():
    """FlashQLA's kernel functions (kkt_solve, fused_gdr_fwd, fused_gdr_h, fused_gdr_bwd) and fla's
    `chunk_local_cumsum`, or None where either package is missing or lacks them in the form used here (flash-qla
    0.1.3, fla-core 0.6); the reason is kept in `_fla_state["flash_qla_error"]`. Imports FlashQLA, which picks its
    kernels for the current CUDA device's architecture."""
    if "flash_qla" not in _fla_state:
        _fla_state["flash_qla"] = None
        try:
            from fla.ops.utils import chunk_local_cumsum
            from flash_qla.ops.gated_delta_rule import chunk as fq

            needs = {
                "kkt_solve": {"k", "b", "chunk_size", "cu_seqlens"},
                "fused_gdr_fwd": {
                    "q",
                    "k",
                    "v",
                    "a",
                    "g",
                    "b",
                    "scale",
                    "initial_state",
                    "output_final_state",
                    "output_h",
                    "output_o",
                    "cu_seqlens",
                },
                "fused_gdr_h": {
                    "k",
                    "v",
                    "a",
                    "g",
                    "b",
                    "initial_state",
                    "output_final_state",
                    "output_h",
                    "cu_seqlens",
                },
                "fused_gdr_bwd": {"q", "k", "v", "a", "g", "b", "do", "dht", "h", "scale", "cu_seqlens"},
            }
            functions = []
            for name, params in needs.items():
                fn = getattr(fq, name, None)
                if fn is None or not params <= set(inspect.signature(fn).parameters):
                    raise ImportError(
                        f"flash_qla's {name} is missing or takes other arguments (flash-qla 0.1.3 expected)"
                    )
                functions.append(fn)
            if not {"chunk_size", "reverse", "cu_seqlens", "chunk_indices"} <= set(
                inspect.signature(chunk_local_cumsum).parameters
            ):
                raise ImportError("fla's chunk_local_cumsum takes other arguments (fla-core 0.6 expected)")
            _fla_state["flash_qla"] = (*functions, chunk_local_cumsum)
        except Exception as exc:  # missing, broken, another version, or a GPU FlashQLA has no kernels for
            _fla_state["flash_qla_error"] = f"{type(exc).__name__}: {exc}"
    return _fla_state["flash_qla"]


def flash_qla_problem(
    device: torch.device,
    head_dims: tuple[int, int] | None,
    dtype: torch.dtype | None,
    import_it: bool = True,
) -> str | None:
    """Why FlashQLA's kernels cannot run a Gated DeltaNet layer with key and value heads of `head_dims` (Dk, Dv)
    on values of `dtype` on `device`, or None where they can: a CUDA GPU of an architecture FlashQLA trains on
    with chunks of 64 (sm90, sm100/103), 16-bit values, heads at most 128 wide, and flash-qla (and fla)
    importable. `import_it` False: flash-qla installed is enough (its import takes seconds)."""
    if device.type != "cuda":
        return "FlashQLA needs a CUDA GPU"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"FlashQLA computes in 16 bits, not in {dtype}"
    if head_dims is None or max(head_dims) > FLASH_QLA_HEAD_DIM:
        return f"FlashQLA takes heads of at most {FLASH_QLA_HEAD_DIM} (key and value heads {head_dims})"
    arch_problem = _flash_qla_arch_problem(device.index if device.index is not None else torch.cuda.current_device())
    if arch_problem is not None:
        return arch_problem
    if not import_it:
        import importlib.util

        return None if importlib.util.find_spec("flash_qla") is not None else "flash-qla is not installed"
    if _flash_qla_kernels() is None:
        return f"flash-qla is not available ({_fla_state.get('flash_qla_error')})"
    return None


def _flash_qla_arch_problem(index: int) -> str | None:
    """Why FlashQLA has no kernels for CUDA device `index`'s architecture, or None (memoised)."""
    key = ("flash_qla_arch", index)
    if key not in _fla_state:
        arch = tuple(torch.cuda.get_device_capability(index))
        _fla_state[key] = None if arch in _FLASH_QLA_ARCHES else f"FlashQLA has no kernels for sm{arch[0]}{arch[1]}"
    return _fla_state[key]


def probe_flash_qla():
    """Look FlashQLA up now (its import, kernel functions, each visible GPU's architecture) rather than on the first
    forward, as `probe_fla` does for fla: under torch.compile `flash_qla_problem` is then a lookup that traces into
    the graph. A no-op without CUDA or without fla; the answers are memoised in `_fla_state`."""
    if not torch.cuda.is_available() or _fla_ops() is None:
        return
    _flash_qla_kernels()
    for index in range(torch.cuda.device_count()):  # the model may move to any of them later
        _flash_qla_arch_problem(index)


def _define_flash_qla_ops():
    """Define `llamathink::flash_qla_chunk_gdn` (+ its backward op and autograd formula) once per process (see
    `_define_fla_chunk_op`): FlashQLA's forward and backward as two opaque ops that dynamo records as single nodes
    and CUDA graphs capture (no host synchronisation on rows of equal length)."""
    try:
        return torch.ops.llamathink.flash_qla_chunk_gdn
    except (AttributeError, RuntimeError):
        pass

    @torch.library.custom_op("llamathink::flash_qla_chunk_gdn", mutates_args=())
    def flash_qla_chunk_gdn(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        g: torch.Tensor,
        beta: torch.Tensor,
        scale: float,
        cu_seqlens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v [B, T, H, 128] and beta [B, T, H] in one 16-bit dtype, g [B, T, H] fp32, all contiguous ->
        o [B, T, H, 128] in v's dtype, and what the backward needs: the chunk-local cumulative gates [B, T, H] fp32
        and the inverted WY matrices A [B, T, H, 64] (k's dtype). `cu_seqlens` [N + 1] (B = 1): N packed sequences,
        each starting from a zero state."""
        cumsum = _flash_qla_kernels()[4]
        wait_for_prebuild(("solve", "forward"))
        with _device_of(q):
            g_cum = cumsum(g, chunk_size=64, **_chunk_indices(cu_seqlens))
            A = _flash_qla_solve(k, beta, cu_seqlens)
            o = _flash_qla_forward_given_solve(q, k, v, g_cum, beta, A, scale, cu_seqlens)
        return o.to(v.dtype).contiguous(), g_cum.float().contiguous(), A.contiguous()

    @flash_qla_chunk_gdn.register_fake
    def _(q, k, v, g, beta, scale, cu_seqlens=None):
        B, T, H, _ = v.shape
        return torch.empty_like(v), torch.empty_like(g, dtype=torch.float32), k.new_empty(B, T, H, 64)

    @torch.library.custom_op("llamathink::flash_qla_chunk_gdn_backward", mutates_args=())
    def flash_qla_chunk_gdn_backward(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        g_cum: torch.Tensor,
        beta: torch.Tensor,
        A: torch.Tensor,
        scale: float,
        grad_o: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gradients w.r.t. q, k, v, g (the raw log-decays: the chunk-local sums' gradient summed back) and beta,
        by FlashQLA's backward (which recomputes the chunk states from the saved WY matrices)."""
        wait_for_prebuild(("states", "backward"))
        with _device_of(q):
            h = _flash_qla_chunk_states(k, v, g_cum, beta, A, cu_seqlens)
            return _flash_qla_backward_from_states(q, k, v, g_cum, beta, A, h, scale, grad_o, cu_seqlens)

    @flash_qla_chunk_gdn_backward.register_fake
    def _(q, k, v, g_cum, beta, A, scale, grad_o, cu_seqlens=None):
        return (
            torch.empty_like(q),
            torch.empty_like(k),
            torch.empty_like(v),
            torch.empty_like(g_cum),
            torch.empty_like(beta),
        )

    def setup_context(ctx, inputs, output):
        q, k, v, _, beta, scale, cu_seqlens = inputs
        _, g_cum, A = output
        ctx.save_for_backward(q, k, v, g_cum, beta, A, cu_seqlens)
        ctx.scale = scale

    def backward(ctx, grad_o, _grad_g_cum, _grad_A):
        q, k, v, g_cum, beta, A, cu_seqlens = ctx.saved_tensors
        dq, dk, dv, dg, dbeta = flash_qla_chunk_gdn_backward(q, k, v, g_cum, beta, A, ctx.scale, grad_o, cu_seqlens)
        return dq, dk, dv, dg, dbeta, None, None

    flash_qla_chunk_gdn.register_autograd(backward, setup_context=setup_context)
    return torch.ops.llamathink.flash_qla_chunk_gdn


_flash_qla_op = _define_flash_qla_ops()


def _flash_qla_solve(k, beta, cu_seqlens=None) -> torch.Tensor:
    """FlashQLA's `kkt_solve`: the inverted WY matrices A [B, T, H, 64] (k's dtype) of each chunk of 64, from k
    [B, T, H, 128] and beta [B, T, H] (arguments as `llamathink::flash_qla_chunk_gdn`'s)."""
    return _flash_qla_kernels()[0](k=k, b=beta, chunk_size=64, cu_seqlens=cu_seqlens)


def _flash_qla_forward_given_solve(q, k, v, g_cum, beta, A, scale, cu_seqlens=None) -> torch.Tensor:
    """FlashQLA's `fused_gdr_fwd` given the WY matrices A (`_flash_qla_solve`) and the chunk-local gate sums g_cum
    [B, T, H] fp32: the output o [B, T, H, 128] (arguments as `llamathink::flash_qla_chunk_gdn`'s)."""
    return _flash_qla_kernels()[1](
        q=q,
        k=k,
        v=v,
        a=A,
        g=g_cum,
        b=beta,
        scale=scale,
        initial_state=None,
        output_final_state=False,
        output_h=False,
        output_o=True,
        cu_seqlens=cu_seqlens,
    )[0]


def _flash_qla_chunk_states(k, v, g_cum, beta, A, cu_seqlens=None) -> torch.Tensor:
    """The state at the start of each chunk, h [B, NT, H, 128, 128] in k's dtype (NT: the chunks of 64 of each row,
    or of all `cu_seqlens`' sequences with B = 1), recomputed by FlashQLA's `fused_gdr_h` from what its forward
    saved (arguments as `llamathink::flash_qla_chunk_gdn_backward`'s)."""
    fused_h = _flash_qla_kernels()[2]
    return fused_h(
        k=k,
        v=v,
        a=A,
        g=g_cum,
        b=beta,
        initial_state=None,
        output_final_state=False,
        output_h=True,
        cu_seqlens=cu_seqlens,
    )[0]


def _flash_qla_backward_from_states(q, k, v, g_cum, beta, A, h, scale, grad_o, cu_seqlens=None) -> tuple:
    """FlashQLA's `fused_gdr_bwd` given the chunk states h (`_flash_qla_chunk_states`), and fla's reverse
    chunk-local sum of the gates' gradient: (dq, dk, dv, dg, dbeta) as `llamathink::flash_qla_chunk_gdn_backward`
    returns them."""
    _, _, _, fused_bwd, cumsum = _flash_qla_kernels()
    dq, dk, dv, dg, dbeta = fused_bwd(
        q=q,
        k=k,
        v=v,
        a=A,
        g=g_cum,
        b=beta,
        do=grad_o.to(q.dtype).contiguous(),
        dht=None,
        h=h,
        scale=scale,
        cu_seqlens=cu_seqlens,
    )[:5]
    dg = cumsum(dg.float(), chunk_size=64, reverse=True, **_chunk_indices(cu_seqlens))
    grads = (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg.float(), dbeta.to(beta.dtype))
    return tuple(t.contiguous() for t in grads)


def pad_heads(x: torch.Tensor, width: int) -> torch.Tensor:
    """x [..., D] -> [..., width] with zeros after the D values (x itself where D == width)."""
    return torch.nn.functional.pad(x, (0, width - x.shape[-1])) if x.shape[-1] != width else x


def flash_qla_chunk_gated_delta_rule(
    q, k, v, g, beta, scale, initial_state=None, output_final_state=False, chunk_size=64, cu_seqlens=None
):
    """FlashQLA's chunked kernels behind our contract (q, k already L2-normalised [B, T, H, Dk], v [B, T, H, Dv],
    fp32 g, beta [B, T, H]; Dk, Dv <= 128, zero-padded to 128 here and the output sliced back). `cu_seqlens`
    [N + 1] (B = 1): N packed sequences, each starting from a zero state. With an initial or a final state (the
    cached prefill) this is fla's kernel (`fla_chunk_gated_delta_rule`). Returns o [B, T, H, Dv] in v's dtype and
    the final state or None. Traced by torch.compile, the padding and the casts fuse into the kernels that
    produce q, k, v and the slice into the output's consumer."""
    if initial_state is not None or output_final_state:
        return fla_chunk_gated_delta_rule(
            q, k, v, g, beta, scale, initial_state, output_final_state, chunk_size, cu_seqlens=cu_seqlens
        )
    dtype = _fla_dtype(v)
    o, _, _ = _flash_qla_op(
        pad_heads(q.to(dtype), FLASH_QLA_HEAD_DIM).contiguous(),
        pad_heads(k.to(dtype), FLASH_QLA_HEAD_DIM).contiguous(),
        pad_heads(v.to(dtype), FLASH_QLA_HEAD_DIM).contiguous(),
        g.float().contiguous(),
        beta.to(dtype).contiguous(),
        scale,
        cu_seqlens,
    )
    return o[..., : v.shape[-1]].to(v.dtype), None


FLASH_QLA_GDN_KERNELS = {"chunk": flash_qla_chunk_gated_delta_rule, "recurrent": fla_recurrent_gated_delta_rule}


# ----------------------------------------------------------------------------------------------------------------
# Short causal convolution (the Gated DeltaNet conv): fla's fused conv + SiLU (Gluon or Triton), channels-last
# ----------------------------------------------------------------------------------------------------------------


def _fla_conv_internals():
    """fla's causal-conv forward and backward functions (`fla.modules.causal_conv1d`, fla-core 0.6), or None where
    fla is missing or lacks them in the form used here; the model then keeps its PyTorch conv."""
    if "conv" not in _fla_state:
        _fla_state["conv"] = None
        try:
            from fla.modules.causal_conv1d import causal_conv1d_bwd, causal_conv1d_fwd

            need_fwd = {"x", "weight", "bias", "residual", "initial_state", "activation", "cu_seqlens"}
            need_bwd = {"x", "dy", "dht", "weight", "bias", "residual", "initial_state", "activation", "cu_seqlens"}
            if need_fwd <= set(inspect.signature(causal_conv1d_fwd).parameters) and need_bwd <= set(
                inspect.signature(causal_conv1d_bwd).parameters
            ):
                _fla_state["conv"] = (causal_conv1d_fwd, causal_conv1d_bwd)
        except Exception:  # fla missing, broken, or reorganised
            pass
    return _fla_state["conv"]


FLA_CONV_ENV = "LLAMATHINK_FLA_CONV"  # fla's conv kernels: "gluon" (the default) or "triton" (`fla_conv_kernels`)
FLA_CONV_KERNELS = ("gluon", "triton")


def _fla_conv_gluon():
    """fla's Gluon causal conv (`fla.modules.causal_conv1d.backends.gluon`, fla-core 0.6: forward, backward, and the
    verifier that says which calls it takes), or None where this fla, Triton or GPU lacks it."""
    if "conv-gluon" not in _fla_state:
        _fla_state["conv-gluon"] = None
        try:
            from fla.backends import GluonBackend

            if GluonBackend.is_available():  # an NVIDIA GPU, and a Triton with `triton.experimental.gluon`
                from fla.modules.causal_conv1d.backends import gluon

                _fla_state["conv-gluon"] = (
                    gluon.causal_conv1d_fwd_gluon,
                    gluon.causal_conv1d_bwd_gluon,
                    gluon.causal_conv1d_fwd_verifier,
                )
        except Exception:  # fla or Triton without it, or reorganised: fla's Triton kernels
            pass
    return _fla_state["conv-gluon"]


GLUON_CONV_SHAPES_PER_PROCESS = 4  # distinct Gluon builds of each direction a process makes (`fla_conv_kernels`)


def _gluon_conv_shape(x: torch.Tensor, weight: torch.Tensor, cu_seqlens, grad_y) -> tuple:
    """What fla's Gluon conv kernels are built for (its strides are compile-time constants): a key of the call's
    direction, shapes, strides and dtypes."""
    key = ("backward" if grad_y is not None else "forward", tuple(x.shape), x.stride(), x.dtype, weight.dtype)
    return (*key, cu_seqlens is None) + ((grad_y.stride(), grad_y.dtype) if grad_y is not None else ())


def fla_conv_kernels(
    x: torch.Tensor,
    weight: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
    grad_y: torch.Tensor | None = None,
) -> str:
    """Which of fla's two causal-conv implementations the package's conv ops (`fla_causal_conv1d_silu`,
    `fla_causal_conv1d_silu_split` and their backward) run next for x [B, T, C] (as the op receives it), weight
    [C, K], `cu_seqlens` and, for the backward, the output gradient `grad_y` [B, T, C]: "gluon" or "triton".

    "gluon": fla's Gluon kernels (`fla.modules.causal_conv1d.backends.gluon`, opt-in in fla itself through its
    `FLA_CONV_GLUON=1`). Their backward recomputes the conv's pre-activation in registers where the Triton backward
    first reruns the whole forward to memory, and each thread reuses its loaded inputs across neighbouring outputs:
    at the seed's shape (batch 16 x 1024, 3024 channels, bf16) forward + backward take 0.46x the Triton kernels' time
    with the same errors against float32 (benchmarks/bench_conv.py, BENCHMARKS.md section 1, session 41). Taken
    where `LLAMATHINK_FLA_CONV` is unset or "gluon", fla and Triton have them (`fla.backends.GluonBackend`: an NVIDIA
    GPU, `triton.experimental.gluon`), their verifier takes the call (channels adjacent in memory, K of 2 to 4,
    packed rows in a batch of one; no `torch.distributed` process group: fla keeps them to one process), no Gluon
    call has failed in this process, and the call's shape is one of the first `GLUON_CONV_SHAPES_PER_PROCESS` of its
    direction that this process ran on Gluon: Gluon takes the strides, so the length, as compile-time constants and
    builds kernels for each new shape, where a training run has one shape (and its evaluation's).
    "triton": fla's Triton kernels (`fla.modules.causal_conv1d.ops`), which take any length with the same kernels:
    every other call (finetuning batches padded to their longest conversation beyond the first few lengths,
    uncached generation), and all calls with `LLAMATHINK_FLA_CONV=triton`. fla's own switches still apply to them:
    with `FLA_CONV_GLUON=1` or `FLA_GLUON=1` fla hands them to its Gluon kernels itself.

    Raises ValueError for another value of `LLAMATHINK_FLA_CONV`."""
    return _fla_conv_choice(x, weight, cu_seqlens, grad_y)[0]


def _fla_conv_choice(x, weight, cu_seqlens, grad_y) -> tuple[str, tuple | None]:
    """`fla_conv_kernels`' answer, and with "gluon" the call's shape key (`_gluon_conv_shape`) to record once the
    call has run."""
    setting = os.environ.get(FLA_CONV_ENV, "").strip().lower() or "gluon"
    if setting not in FLA_CONV_KERNELS:
        raise ValueError(
            f"{FLA_CONV_ENV}={os.environ[FLA_CONV_ENV]!r}: expected one of {', '.join(FLA_CONV_KERNELS)} "
            "(or unset: gluon where fla can run it)"
        )
    gluon = _fla_conv_gluon()
    if setting == "triton" or gluon is None or "conv-gluon-failed" in _fla_state:
        return "triton", None
    try:
        takes, _ = gluon[2](x=x, weight=weight, cu_seqlens=cu_seqlens)
    except Exception:  # a verifier that cannot judge the call: the kernels that take every call
        takes = False
    if not takes:
        return "triton", None
    shapes, key = _fla_state.setdefault("conv-gluon-shapes", set()), _gluon_conv_shape(x, weight, cu_seqlens, grad_y)
    if key not in shapes and sum(k[0] == key[0] for k in shapes) >= GLUON_CONV_SHAPES_PER_PROCESS:
        return "triton", None
    return "gluon", key


def _fla_conv_call(x: torch.Tensor, weight: torch.Tensor, cu_seqlens, grad_y=None, **kwargs):
    """fla's conv forward on x [B, T, C], or its backward given the output gradient `grad_y`, with the
    implementation `fla_conv_kernels` picks; the other keyword arguments as fla's `causal_conv1d_fwd` /
    `causal_conv1d_bwd` take them. A Gluon call that raises (a kernel this GPU or Triton cannot build) turns Gluon
    off for the process with a warning and runs the Triton kernels instead; running out of memory, and errors while
    a CUDA graph is being captured (whose capture they have broken), are raised as they are."""
    index = 0 if grad_y is None else 1
    if grad_y is not None:
        kwargs["dy"] = grad_y
    choice, shape = _fla_conv_choice(x, weight, cu_seqlens, grad_y)
    if choice == "gluon":
        try:
            out = _fla_conv_gluon()[index](x=x, weight=weight, cu_seqlens=cu_seqlens, **kwargs)
        except torch.OutOfMemoryError:
            raise
        except Exception as err:
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise
            _fla_state["conv-gluon-failed"] = f"{type(err).__name__}: {err}"
            _warn_once(
                "conv-gluon-failed-warning",
                f"fla's Gluon causal conv failed ({type(err).__name__}: {err}); the Gated DeltaNet conv runs on "
                f"fla's Triton kernels in this process ({FLA_CONV_ENV}=triton chooses them from the start)",
            )
        else:
            _fla_state["conv-gluon-shapes"].add(shape)
            return out
    return _fla_conv_internals()[index](x=x, weight=weight, cu_seqlens=cu_seqlens, **kwargs)


def _fla_conv_takes_strides() -> bool:
    """Whether this fla's causal-conv kernels read x (forward and backward) and the output gradient (backward)
    through their strides (fla-core 0.6: `stride_x_t`, `stride_dy_t` among the kernels' arguments); versions whose
    kernels assume contiguous rows get contiguous copies (`_as_fla_conv_rows`)."""
    if "conv-strides" not in _fla_state:
        try:
            from fla.modules.causal_conv1d.ops import causal_conv1d_bwd_kernel, causal_conv1d_fwd_kernel

            forward, backward = (
                set(getattr(kernel, "arg_names", ())) for kernel in (causal_conv1d_fwd_kernel, causal_conv1d_bwd_kernel)
            )
            _fla_state["conv-strides"] = "stride_x_t" in forward and {"stride_x_t", "stride_dy_t"} <= backward
        except Exception:  # fla missing or reorganised: copy
            _fla_state["conv-strides"] = False
    return _fla_state["conv-strides"]


def _as_fla_conv_rows(t: torch.Tensor) -> torch.Tensor:
    """`t` [B, T, C] itself where fla's conv kernels can read it: contiguous, or channels adjacent in memory (stride 1
    along C) with kernels that take the time and batch strides (`_fla_conv_takes_strides`); else a contiguous copy."""
    return t if t.is_contiguous() or (t.stride(-1) == 1 and _fla_conv_takes_strides()) else t.contiguous()


def _fla_conv_forward(x: torch.Tensor, weight: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """The body of `llamathink::fla_causal_conv1d_silu`: silu(causal conv(x)) [B, T, C], contiguous."""
    with _device_of(x):
        y, _ = _fla_conv_call(
            _as_fla_conv_rows(x),
            weight,
            cu_seqlens,
            bias=None,
            residual=None,
            initial_state=None,
            output_final_state=False,
            activation="silu",
        )
    return y.contiguous()


def _fla_conv_split_forward(x: torch.Tensor, weight: torch.Tensor, cu_seqlens, widths) -> list[torch.Tensor]:
    """`_fla_conv_forward` once per group of consecutive channels (`widths`), each on the group's view of x."""
    outs, start = [], 0
    for width in widths:
        outs.append(_fla_conv_forward(x[..., start : start + width], weight[start : start + width], cu_seqlens))
        start += width
    return outs


def _fla_conv_backward(x: torch.Tensor, weight: torch.Tensor, grad_y: torch.Tensor, cu_seqlens):
    """The body of `llamathink::fla_causal_conv1d_silu_backward`: (dx in x's dtype, dw in weight's), contiguous."""
    with _device_of(x):
        dx, dw = _fla_conv_call(
            _as_fla_conv_rows(x),
            weight,
            cu_seqlens,
            grad_y=_as_fla_conv_rows(grad_y.to(x.dtype)),
            dht=None,
            bias=None,
            residual=None,
            initial_state=None,
            activation="silu",
        )[:2]
    return dx.to(x.dtype).contiguous(), dw.to(weight.dtype).contiguous()


class _FlaConvSplitFunction(torch.autograd.Function):
    """The eager form of `llamathink::fla_causal_conv1d_silu_split`: the same forward and backward functions called
    straight from autograd. A custom op's every call passes through the dispatcher and torch.library's Python
    wrappers (its schema check, its autograd and its aliasing check), host time that eager training, which is
    bound by the host, pays on every layer; dynamo needs the op, eager code does not."""

    @staticmethod
    def forward(ctx, x, weight, cu_seqlens, widths):
        ctx.save_for_backward(x, weight, cu_seqlens)
        return tuple(_fla_conv_split_forward(x, weight, cu_seqlens, widths))

    @staticmethod
    def backward(ctx, *grads):
        x, weight, cu_seqlens = ctx.saved_tensors
        grad_y = torch.cat(grads, dim=-1) if len(grads) > 1 else grads[0]
        dx, dw = _fla_conv_backward(x, weight, grad_y, cu_seqlens)
        return dx, dw, None, None


def _define_fla_conv_op():
    """Define `llamathink::fla_causal_conv1d_silu`, its backward op and `llamathink::fla_causal_conv1d_silu_split`
    (the same conv per channel group, the model's op), with their autograd formulas, once per process (see
    `_define_fla_chunk_op`). The ops are for torch.compile, which records each as a single node; eager calls of
    the split conv run the same functions from `_FlaConvSplitFunction`.

    The ops are tagged `needs_fixed_stride_order`: inductor may hand them its padded layouts (it pads the rows of
    the qkv projection's output, 3024 channels, to 3072) instead of copying them to the exact contiguous strides
    of the trace, the default for custom ops; fla's kernels read x and the output gradient through their strides.
    The outputs are always contiguous, as the fake functions say."""
    try:
        return torch.ops.llamathink.fla_causal_conv1d_silu
    except (AttributeError, RuntimeError):
        pass

    layout = (torch.Tag.needs_fixed_stride_order,)

    @torch.library.custom_op("llamathink::fla_causal_conv1d_silu", mutates_args=(), tags=layout)
    def fla_causal_conv1d_silu(x: torch.Tensor, weight: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
        """x [B, T, C] 16-bit, any strides (copied where fla's kernels cannot read them: `_as_fla_conv_rows`);
        weight [C, K] (fp32); `cu_seqlens` [N + 1] (B = 1): N packed sequences, each starting from zeros ->
        silu(causal depthwise conv) [B, T, C] in x's dtype, contiguous."""
        return _fla_conv_forward(x, weight, cu_seqlens)

    @fla_causal_conv1d_silu.register_fake
    def _(x, weight, cu_seqlens):
        return x.new_empty(x.shape)  # contiguous, whatever x's strides

    @torch.library.custom_op("llamathink::fla_causal_conv1d_silu_backward", mutates_args=(), tags=layout)
    def fla_causal_conv1d_silu_backward(
        x: torch.Tensor, weight: torch.Tensor, grad_y: torch.Tensor, cu_seqlens: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradients w.r.t. x (x's dtype) and weight (weight's dtype), contiguous, by fla's fused backward (which
        recomputes the pre-activation rather than storing it; Gluon or Triton kernels, `fla_conv_kernels`); x and
        grad_y may have any strides, as in the forward."""
        return _fla_conv_backward(x, weight, grad_y, cu_seqlens)

    @fla_causal_conv1d_silu_backward.register_fake
    def _(x, weight, grad_y, cu_seqlens):
        return x.new_empty(x.shape), weight.new_empty(weight.shape)

    def setup_context(ctx, inputs, output):
        x, weight, cu_seqlens = inputs
        ctx.save_for_backward(x, weight, cu_seqlens)

    def backward(ctx, grad_y):
        x, weight, cu_seqlens = ctx.saved_tensors
        dx, dw = fla_causal_conv1d_silu_backward(x, weight, grad_y, cu_seqlens)
        return dx, dw, None

    fla_causal_conv1d_silu.register_autograd(backward, setup_context=setup_context)

    @torch.library.custom_op("llamathink::fla_causal_conv1d_silu_split", mutates_args=(), tags=layout)
    def fla_causal_conv1d_silu_split(
        x: torch.Tensor, weight: torch.Tensor, cu_seqlens: torch.Tensor | None, widths: list[int]
    ) -> list[torch.Tensor]:
        """`fla_causal_conv1d_silu` run once per group of consecutive channels (`widths`, summing to C), each on
        the group's view of x's rows -> [B, T, w] for each width w, each contiguous."""
        return _fla_conv_split_forward(x, weight, cu_seqlens, widths)

    @fla_causal_conv1d_silu_split.register_fake
    def _(x, weight, cu_seqlens, widths):
        return [x.new_empty((*x.shape[:-1], width)) for width in widths]

    def setup_split_context(ctx, inputs, output):
        x, weight, cu_seqlens, _ = inputs
        ctx.save_for_backward(x, weight, cu_seqlens)

    def split_backward(ctx, grads):
        # One backward over all C channels: the groups' output gradients joined along the channels. Under
        # torch.compile this cat is traced into the backward graph, where inductor writes each gradient into its
        # slice as it computes it; a backward per group would instead need a cat of the input gradients after fla.
        x, weight, cu_seqlens = ctx.saved_tensors
        grad_y = torch.cat(grads, dim=-1) if len(grads) > 1 else grads[0]
        dx, dw = fla_causal_conv1d_silu_backward(x, weight, grad_y, cu_seqlens)
        return dx, dw, None, None

    fla_causal_conv1d_silu_split.register_autograd(split_backward, setup_context=setup_split_context)
    return torch.ops.llamathink.fla_causal_conv1d_silu


_fla_conv_op = _define_fla_conv_op()


def fla_causal_conv1d_silu(x: torch.Tensor, weight: torch.Tensor, cu_seqlens: torch.Tensor | None = None):
    """`silu(causal depthwise conv1d(x))` by fla's fused kernels (forward and backward; its Gluon or its Triton
    ones, `fla_conv_kernels`), in the channels-last layout: x [B, T, C] (16-bit), weight [C, K] (the `nn.Conv1d`
    weight [C, 1, K] without its middle axis; kept in its own dtype, gradients too) -> [B, T, C] in x's dtype.
    Output t sees inputs t - K + 1 .. t, zeros before the start of each sequence: the row, or with `cu_seqlens`
    [N + 1] (B = 1) each of the N packed sequences.

    The reference is `LlamaThinkGatedDeltaNet._causal_conv`'s PyTorch form (tests/test_gpu.py compares both, forward
    and gradients). x may have any strides: the op reads it where it lies, or copies it, as fla's kernels allow
    (`_as_fla_conv_rows`). Raises RuntimeError where fla's conv is not available (check `fla_conv_available`
    first)."""
    if _fla_conv_internals() is None:
        raise RuntimeError("fla's causal conv (fla.modules.causal_conv1d) is not available")
    return _fla_conv_op(x, weight.contiguous(), cu_seqlens)


def fla_causal_conv1d_silu_split(
    x: torch.Tensor, weight: torch.Tensor, widths: Sequence[int], cu_seqlens: torch.Tensor | None = None
) -> tuple[torch.Tensor, ...]:
    """`fla_causal_conv1d_silu(x, weight, cu_seqlens)` split along the channels into groups of `widths` (positive
    integers summing to C) -> one contiguous [B, T, w] tensor per group: fla's forward runs once per group, on the
    group's view of x's rows, so that no part of the output is a strided slice of a wider tensor (inductor loops a
    row reduction over such slices, BENCHMARKS.md section 1, session 32); the backward runs once over all C
    channels. The Gated DeltaNet's q, k and v channels (`LlamaThinkGatedDeltaNet.conv_parts`).

    Values equal those of `fla_causal_conv1d_silu` split afterwards (the same kernels, per channel). Raises
    ValueError for widths that are not positive integers summing to C, RuntimeError where fla's conv is not
    available."""
    if _fla_conv_internals() is None:
        raise RuntimeError("fla's causal conv (fla.modules.causal_conv1d) is not available")
    widths = _conv_parts(widths, x.shape[-1], name="widths", total="x.shape[-1]")
    if not torch.compiler.is_compiling():  # the custom op is for dynamo; eagerly its dispatch is only host time
        return _FlaConvSplitFunction.apply(x, weight.contiguous(), cu_seqlens, tuple(widths))
    return tuple(torch.ops.llamathink.fla_causal_conv1d_silu_split(x, weight.contiguous(), cu_seqlens, list(widths)))


def fla_conv_available() -> bool:
    """True when fla's fused causal conv can be used (fla-core importable, with the functions used here)."""
    return _fla_ops() is not None and _fla_conv_internals() is not None


def probe_fla():
    """Look fla up now (import, chunk internals, the backward check of every visible GPU) rather than on the first
    forward: under torch.compile that lookup would import fla (and ask importlib whether tilelang is there) while
    dynamo traces the step; and hand fla's autotuners the package's measured choices for this GPU
    (`load_fla_tuned_configs`). A no-op without CUDA or without fla; the answers are memoised in `_fla_state`."""
    if not torch.cuda.is_available() or _fla_ops() is None:
        return
    _fla_chunk_internals()
    _fla_conv_internals()
    _fla_conv_gluon()
    for index in range(torch.cuda.device_count()):  # the model may move to any of them later
        fla_backward_problem(torch.device("cuda", index))
    if "tuned" not in _fla_state:
        _fla_state["tuned"] = load_fla_tuned_configs()


# ----------------------------------------------------------------------------------------------------------------
# fla's kernels built beside the first compiled step
# ----------------------------------------------------------------------------------------------------------------
# Triton and tilelang compile each of fla's kernels on its first launch, one after the other, and a compiled training
# step launches fla only after inductor has compiled the graph around it: on a cold machine the first step spends
# about 30 s building fla's kernels (tilelang's backward kernel alone about 11 s) after about 35 s of inductor's own
# compilation (BENCHMARKS.md section 1). A child process that runs fla's forward and backward once at the step's
# shapes builds the same kernels into the same disk caches meanwhile, so that the step then loads them.

# `prebuild_fla_kernels`' parts for FlashQLA: all, or one of its four TileLang kernels (with the `solve`, fla's conv)
FLASH_QLA_PARTS = ("all", "solve", "forward", "states", "backward")
FLA_PREBUILD_ENV = "LLAMATHINK_FLA_PREBUILD"  # "0" (or false, no, off): no child process (`start_fla_prebuild`)
_OFF_WORDS = ("0", "false", "no", "off")  # the words that turn an environment switch off, in any case


def _switched_off(setting: str) -> bool:
    """Whether an environment switch's value is one of `_OFF_WORDS` (any case, spaces around)."""
    return setting.strip().lower() in _OFF_WORDS


PREBUILD_WAIT_LIMIT_S = 300.0  # the longest a FlashQLA call waits for a prebuild process (`wait_for_prebuild`)
_prebuild_children: list = []
# `_PrebuildWait`s of this process's FlashQLA prebuilds (their folders go at exit): one list for the process, also
# where `trust_remote_code` loaded a second copy of this module, since the custom ops (whose bodies wait on it) are
# registered once per process, by whichever copy came first
_prebuild_waits: list = sys.modules.setdefault(
    "_llamathink_prebuild_waits", types.ModuleType("_llamathink_prebuild_waits")
).__dict__.setdefault("waits", [])


def _conv_parts(conv_parts, conv_dim: int, name: str = "conv_parts", total: str = "conv_dim") -> tuple[int, ...]:
    """The channel groups the conv runs on (`fla_causal_conv1d_silu_split`, `prebuild_fla_kernels`): `conv_parts`
    (a sequence or iterable of integers, numpy's and 0-d integer tensors too) as a tuple of ints, or the whole
    `conv_dim` where None. Raises ValueError, naming the argument (`name`) and what the widths must sum to (`total`),
    unless they are positive integers (not bools) that sum to conv_dim."""
    if conv_parts is None:
        return (conv_dim,)
    try:
        if isinstance(conv_parts, (str, bytes, Mapping)):
            raise TypeError
        items = list(conv_parts)  # once: a generator is read here and nowhere else
        if any(isinstance(p, bool) or (isinstance(p, torch.Tensor) and p.dtype == torch.bool) for p in items):
            raise TypeError
        parts = tuple(operator.index(p) for p in items)
    except TypeError:
        parts = ()
    if not parts or min(parts) < 1 or sum(parts) != conv_dim:
        raise ValueError(f"{name}={conv_parts!r}: expected positive integer widths that sum to {total}={conv_dim}")
    return parts


def prebuild_fla_kernels(
    batch_size: int,
    seq_len: int,
    num_heads: int,
    head_k_dim: int,
    head_v_dim: int,
    conv_dim: int,
    conv_kernel_size: int,
    dtype: str = "bfloat16",
    packed: bool = False,
    device: int | None = None,
    conv_weight_dtype: str = "float32",
    delta_rule: str = "fla",
    part: str = "all",
    on_built=None,
    conv_parts: tuple[int, ...] | list[int] | None = None,
) -> None:
    """Run fla's causal conv and the chunked Gated DeltaNet forward and backward once on random inputs of one
    training step's shapes, through the same custom ops a compiled step calls
    (`llamathink::fla_causal_conv1d_silu_split`, and `llamathink::fla_chunk_gdn` with the package's recorded
    autotune choices or, with `delta_rule` "flash_qla", `llamathink::flash_qla_chunk_gdn`; with "none" the conv
    alone, for a step whose delta-rule kernels are built already), so that Triton and
    tilelang build and cache (TRITON_CACHE_DIR, TILELANG_CACHE_DIR) the kernels that step launches. The body of `start_fla_prebuild`'s child
    process; also callable directly. `part`: "all", or for FlashQLA one of its four TileLang kernels, which
    processes build side by side, each on random inputs: "solve" (`kkt_solve`, the WY matrices; with fla's conv
    and gate sums), "forward" (`fused_gdr_fwd`), "states" (`fused_gdr_h`, the backward's recomputation of the chunk
    states) and "backward" (`fused_gdr_bwd`). Raises ValueError for a part `delta_rule` does not come in.
    `on_built`: a function of no arguments, called once the kernels the step may launch are built (packed: the
    forward's variants for every document count, since the step's is not known here), before the `solve` part's
    conv (the step builds its conv itself before its first FlashQLA call), and again at the end.

    Shapes as the model passes them: the conv input [B, T, conv_dim] in `dtype` (a torch dtype's name, 16-bit) with
    its weight [conv_dim, conv_kernel_size] in `conv_weight_dtype` (the parameter's: float32 under autocast), the
    conv run on each of `conv_parts` (widths that sum to conv_dim, channels taken in order where they lie in the
    input's rows, as `LlamaThinkGatedDeltaNet._causal_conv` runs it; default one part, the whole); q, k
    [B, T, num_heads, head_k_dim] (q and k heads already repeated to the value heads), v [B, T, num_heads,
    head_v_dim], beta [B, T, num_heads] in `dtype`; log-decays g [B, T, num_heads] in float32. `packed`:
    document-masked training, whose rows are joined into one [1, batch_size * seq_len] row of several documents
    (fla's variable-length kernels). `device`: the CUDA device
    index (default the current one). Raises RuntimeError where fla is not available, ValueError for `conv_parts`
    that do not sum to conv_dim."""
    conv_parts = _conv_parts(conv_parts, conv_dim)
    if part not in {"fla": ("all",), "flash_qla": FLASH_QLA_PARTS, "none": ("all",)}.get(delta_rule, ()):
        raise ValueError(
            f"delta_rule={delta_rule!r}, part={part!r}: expected fla (all), flash_qla ({', '.join(FLASH_QLA_PARTS)})"
            " or none (all)"
        )
    if device is not None:  # before fla's import, which may open a CUDA context on the current device
        torch.cuda.set_device(device)
    if _fla_ops() is None or _fla_chunk_internals() is None:
        raise RuntimeError(f"fla is not available: {_fla_state.get('import_error', 'its chunk functions differ')}")
    if delta_rule == "flash_qla" and _flash_qla_kernels() is None:
        raise RuntimeError(f"flash-qla is not available: {_fla_state.get('flash_qla_error')}")
    dev = torch.device("cuda", torch.cuda.current_device())
    load_fla_tuned_configs()  # what building the model gives the autotuners: the same configurations get built
    dt = getattr(torch, dtype)
    B, T = (1, batch_size * seq_len) if packed else (batch_size, seq_len)
    cu_seqlens = None
    if packed:  # a few documents of uneven lengths, the last one cut by the row's end
        cu_seqlens = torch.tensor([0, T // 5, T // 2 + 7, T], device=dev, dtype=torch.long)

    def leaf(*shape, dtype=dt, fn=None):
        x = torch.randn(*shape, device=dev)
        return (fn(x) if fn is not None else x).to(dtype).contiguous().requires_grad_()

    def conv():
        if _fla_conv_internals() is not None:
            weight = leaf(conv_dim, conv_kernel_size, dtype=getattr(torch, conv_weight_dtype))
            x = leaf(B, T, conv_dim)  # contiguous rows, as eager training has them
            ys = torch.ops.llamathink.fla_causal_conv1d_silu_split(x, weight, cu_seqlens, list(conv_parts))
            torch.autograd.backward(ys, [torch.randn_like(y) for y in ys])
            # a compiled step's layout: inductor pads rows of over 1024 elements to 128 bytes (the qkv projection's
            # output and the joined output gradient, 3024 -> 3072 channels), and fla's Gluon kernels are built for
            # each row stride
            row = -(-conv_dim * dt.itemsize // 128) * 128 // dt.itemsize
            if conv_dim > 1024 and row != conv_dim:
                x, grad_y = (torch.randn(B, T, row, device=dev, dtype=dt)[..., :conv_dim] for _ in range(2))
                with torch.no_grad():
                    torch.ops.llamathink.fla_causal_conv1d_silu_split(x, weight, cu_seqlens, list(conv_parts))
                    torch.ops.llamathink.fla_causal_conv1d_silu_backward(x, weight, grad_y, cu_seqlens)

    def built():  # the kernels the step may launch are in the caches
        if on_built is not None:
            torch.cuda.synchronize(dev)
            on_built()

    if part == "all":
        conv()  # its tensors freed before the delta rule's: the child's peak memory is the larger of the two
        if delta_rule == "none":  # the delta rule's kernels are in the disk cache already (`flash_qla_built`)
            torch.cuda.synchronize(dev)
            built()
            return
    H, scale = num_heads, head_k_dim**-0.5
    if delta_rule == "flash_qla":  # the padded heads the op takes (`flash_qla_chunk_gated_delta_rule`)
        head_k_dim = head_v_dim = FLASH_QLA_HEAD_DIM
    q = leaf(B, T, H, head_k_dim, fn=lambda t: torch.nn.functional.normalize(t, dim=-1))
    k = leaf(B, T, H, head_k_dim, fn=lambda t: torch.nn.functional.normalize(t, dim=-1))
    v, beta = leaf(B, T, H, head_v_dim), leaf(B, T, H, fn=torch.sigmoid)
    g = leaf(B, T, H, dtype=torch.float32, fn=lambda t: -torch.nn.functional.softplus(t))
    # FlashQLA's forward kernels come in variants by (number of sequences x heads) against the GPU's SM count (its
    # values per CTA): packed, one for each number of documents a batch may hold, 1 to 256 by doubling, each cut
    # into documents of about equal lengths
    forward_cuts = [cu_seqlens]
    if packed:
        forward_cuts += [
            torch.linspace(0, T, n + 1, device=dev).long() for n in (2**i for i in range(9)) if n <= T // 2
        ]
    if part != "all":  # one of FlashQLA's kernels, on random inputs (its code depends on the shapes alone)
        with torch.no_grad():
            cumsum = _flash_qla_kernels()[4]
            g_cum = g.cumsum(1)
            A = torch.randn(B, T, H, 64, device=dev).div(8).to(dt)  # the WY matrices [B, T, H, chunk]
            if part == "solve":
                for cuts in forward_cuts:
                    cumsum(g, chunk_size=64, **_chunk_indices(cuts))
                    _flash_qla_solve(k, beta, cuts)
                built()
                with torch.enable_grad():
                    conv()  # after: the step has built its conv itself by its first FlashQLA call
            elif part == "forward":
                for cuts in forward_cuts:
                    _flash_qla_forward_given_solve(q, k, v, g_cum, beta, A, scale, cuts)
            elif part == "states":
                _flash_qla_chunk_states(k, v, g_cum, beta, A, cu_seqlens)
            else:  # given the chunk states [B, NT, H, K, V]: NT chunks of 64 in each row, or in all documents
                chunks = (B, -(-T // 64)) if not packed else (1, int(((cu_seqlens.diff() + 63) // 64).sum()))
                h = torch.randn(*chunks, H, head_k_dim, head_v_dim, device=dev).div(8).to(dt)
                _flash_qla_backward_from_states(q, k, v, g_cum, beta, A, h, scale, v, cu_seqlens)
    elif delta_rule == "flash_qla":
        o = _flash_qla_op(q, k, v, g, beta, scale, cu_seqlens)[0]
        with torch.no_grad():
            for cuts in forward_cuts[1:]:
                _flash_qla_op(*(t.detach() for t in (q, k, v, g, beta)), scale, cuts)
        o.backward(torch.randn_like(o))
    else:
        o = _fla_chunk_op(q, k, v, g, beta, scale, None, False, cu_seqlens)[0]
        o.backward(torch.randn_like(o))
    torch.cuda.synchronize(dev)
    built()  # (again, for the parts that called it early: `on_built` is told every time)


def start_fla_prebuild(
    batch_size: int,
    seq_len: int,
    num_heads: int,
    head_k_dim: int,
    head_v_dim: int,
    conv_dim: int,
    conv_kernel_size: int,
    dtype: torch.dtype = torch.bfloat16,
    packed: bool = False,
    device: torch.device | int | None = None,
    conv_weight_dtype: torch.dtype = torch.float32,
    log_path: str | Path | None = None,
    delta_rule: str = "fla",
    conv_parts: tuple[int, ...] | list[int] | None = None,
    wait: bool = True,
):
    """Start `prebuild_fla_kernels` in a child Python process and return it (a `subprocess.Popen`), or None where
    there is nothing to build: fla or CUDA missing, a dtype fla does not train in, or `LLAMATHINK_FLA_PREBUILD=0` (or
    false, no, off).
    Arguments as `prebuild_fla_kernels`'s, with torch dtypes and `device` a CUDA device or its index (default the
    current one). The caller goes on at once: meant to be called just before the first compiled training step of
    the process that trains on `device`, which then finds in the disk caches what the child has built, and builds
    itself whatever the child has not yet: Triton does not wait for a kernel another process is building.

    With `delta_rule` "flash_qla" each of FlashQLA's four TileLang kernels is built by a process of its own (the
    child and three more beside it, `FLASH_QLA_PARTS`): TileLang builds a kernel in one thread, 9 to 31 s each on
    an H200 host, 80 s one after another (session 27). TileLang does not wait for another process's build either,
    so here this process's FlashQLA calls do (`wait_for_prebuild`): the forward for the `solve` and `forward`
    parts, the backward for `states` and `backward`, each until its part's process has told that its kernels are
    built or that it failed (a file in a folder of its own), at most `PREBUILD_WAIT_LIMIT_S` a call; then the
    kernels load from TileLang's disk cache rather than being built a second time beside the prebuild's. With
    `wait` False nothing here waits: a build for later runs (`start_flash_qla_build`). A FlashQLA prebuild whose
    four parts all end well records that its kernels are built (`flash_qla_built`).

    One cache for both: where TRITON_CACHE_DIR is unset, inductor sets it in this process, at its first compiled
    kernel, to its own per-device folder (`torch._inductor.runtime.cache_dir_utils.triton_cache_dir`, under
    TORCHINDUCTOR_CACHE_DIR); this sets it to that same folder now, before fla's first launch here, and the child
    inherits it (and TILELANG_CACHE_DIR, and the visible GPUs); a process that compiles without inductor, or not
    at all, then also keeps fla's kernels in that folder rather than Triton's default one. One key for both: the
    child reads the ptxas whose version keys this process's kernels (`_ptxas_for_prebuild`), also where inductor
    points Triton at torch's own ptxas.

    The child imports this same module (also the copy that `trust_remote_code` loaded), never a package of the
    same name in the working directory; it ends by itself once the kernels are built (about 30 s on an H200 for
    fla's; FlashQLA's took about 80 s one after another in one process, session 27), when this process ends (it
    watches its parent), or is killed at this process's exit; its output is discarded, or written to `log_path` (a
    file, replaced). Its cost: one CUDA context and one step's fla inputs, outputs and gradients on `device` while
    it runs (by their sizes about 2 GB at the 95M model's batch 64 x 1024, a quarter of that at batch 16), and CPU
    time beside inductor's compile workers; with FlashQLA four contexts and four such sets (heads padded to 128).
    Raises OSError where the child cannot be started or `log_path` not written, ValueError for `conv_parts` that
    do not sum to conv_dim (before anything is started or changed). Method: a warm-up of the kernels' JIT disk
    caches, as inductor's parallel compile workers build its own kernels beside the main process."""
    import atexit
    import subprocess

    conv_parts = _conv_parts(conv_parts, conv_dim) if conv_parts is not None else None

    if _switched_off(os.environ.get(FLA_PREBUILD_ENV, "")) or not torch.cuda.is_available() or _fla_ops() is None:
        return None
    if dtype not in (torch.float16, torch.bfloat16):
        return None
    index = torch.device(device).index if isinstance(device, (torch.device, str)) else device
    index = torch.cuda.current_device() if index is None else index
    if os.environ.get("TRITON_CACHE_DIR") is None:
        try:
            from torch._inductor.runtime.cache_dir_utils import triton_cache_dir
        except ImportError:  # another torch layout: no way to know the folder inductor will pick
            return None
        os.environ["TRITON_CACHE_DIR"] = triton_cache_dir(index)
    args = {
        "batch_size": batch_size,
        "seq_len": seq_len,
        "num_heads": num_heads,
        "head_k_dim": head_k_dim,
        "head_v_dim": head_v_dim,
        "conv_dim": conv_dim,
        "conv_kernel_size": conv_kernel_size,
        "dtype": str(dtype).removeprefix("torch."),
        "packed": packed,
        "device": index,
        "conv_weight_dtype": str(conv_weight_dtype).removeprefix("torch."),
        "delta_rule": delta_rule,
        "conv_parts": list(conv_parts) if conv_parts is not None else None,
    }
    ready = None
    if delta_rule == "flash_qla" and wait:  # where its parts' processes tell that they have ended (`wait_for_prebuild`)
        ready = Path(tempfile.mkdtemp(prefix="llamathink-prebuild-"))
        args["ready_dir"] = str(ready)
    ptxas = _ptxas_for_prebuild()  # (before the environment is read: it may set TRITON_PTXAS_PATH here)
    env = {**os.environ, **ptxas}
    if torch.distributed.is_available() and torch.distributed.is_initialized() or "conv-gluon-failed" in _fla_state:
        env[FLA_CONV_ENV] = "triton"  # what this process runs (fla's Gluon conv refuses a process group's calls)
    try:
        with open(log_path, "w") if log_path is not None else contextlib.nullcontext(subprocess.DEVNULL) as out:
            child = subprocess.Popen(
                _prebuild_command(args, os.getpid()),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
    except BaseException:
        if ready is not None:
            shutil.rmtree(ready, ignore_errors=True)
        raise
    if not _prebuild_children:
        atexit.register(_stop_prebuild_children)
    _prebuild_children.append(child)
    if ready is not None:
        _prebuild_waits.append(_PrebuildWait(child, ready, set(FLASH_QLA_PARTS[1:])))
    return child


def _ptxas_for_prebuild() -> dict[str, str]:
    """The environment a prebuild child needs beside this process's for both to key their Triton kernels alike:
    {"TRITON_PTXAS_PATH": a ptxas}, or {} where the inherited environment does (or nothing can be told: another
    Triton layout, no CUDA driver).

    Triton keys every kernel by its backend's hash, which holds the version of the ptxas that the process read at
    its first compile and keeps for its life (`get_ptxas_version` is cached), while the ptxas it runs follows
    TRITON_PTXAS_PATH at each compile. Inductor points that variable at torch's own ptxas (`torch/bin/ptxas`, where
    the build ships one) at its first compiled kernel, in its compile workers and in this process.
    * This process has not compiled yet: the variable is set now as inductor would set it, so that this process,
      inductor's workers and the child all read that ptxas (the child, started before inductor's first compile,
      would otherwise key by Triton's own ptxas, and this process by torch's).
    * It has (its version is fixed; e.g. fla ran before inductor's first compile): the child is pointed at the
      ptxas of that version, the one the variable names now, or Triton's own."""
    import subprocess

    try:
        from triton.backends.nvidia import compiler as nvidia
        from triton.compiler.compiler import make_backend
        from triton.runtime.driver import driver

        if nvidia.get_ptxas_version.cache_info().currsize == 0:
            from torch._inductor.runtime.compile_tasks import _set_triton_ptxas_path

            _set_triton_ptxas_path()
            return {}
        target = driver.active.get_current_target()
        keyed = make_backend(target).hash()  # f"{ptxas --version}-{arch}": the cached version, as its compiles use
    except Exception:  # noqa: BLE001 - another Triton or torch layout, or no driver: the child inherits as it is
        return {}
    named = os.environ.get("TRITON_PTXAS_PATH")
    for path in (named, str(Path(nvidia.__file__).parent / "bin" / "ptxas")):
        if path and os.path.isfile(path):
            try:
                version = subprocess.run([path, "--version"], capture_output=True, timeout=60, check=True).stdout
            except (OSError, subprocess.SubprocessError):
                continue
            if keyed == f"{version.decode()}-{target.arch}":
                return {} if path == named else {"TRITON_PTXAS_PATH": path}
    return {}


# The program of a prebuild process (`python -c`), given the folders of the packages above this module (JSON:
# {package: its `__path__` in this process}), its name, the arguments (JSON) and the parent's pid. The working
# directory (the first path entry), which could shadow torch or fla, is dropped. The packages are registered bare,
# with the folders this process found them in, and their `__init__` not run: the package's imports transformers'
# Auto classes and the model, seconds of imports that the child does not use (a package already imported, e.g. by a
# sitecustomize, is kept as it is). So the child imports this very file, also through a symlinked or renamed
# folder, or the copy that `trust_remote_code` loaded (imported by name, not by an import statement: its name has
# parts that are not identifiers).
_PREBUILD_CHILD_PROGRAM = """
import importlib, json, sys, types
packages, name = json.loads(sys.argv[1]), sys.argv[2]
if not getattr(sys.flags, "safe_path", False):
    del sys.path[0]
for package, path in packages.items():
    if package not in sys.modules:
        bare = sys.modules[package] = types.ModuleType(package)
        bare.__path__ = path
importlib.import_module(name)._prebuild_child_main(sys.argv[3], int(sys.argv[4]))
"""


def _prebuild_command(args: dict, parent_pid: int) -> list[str]:
    """The command line of a prebuild process: `_prebuild_child_main(args, parent_pid)` of this very module, which
    it imports without its package's `__init__` (`_PREBUILD_CHILD_PROGRAM`)."""
    packages, parts = {}, __name__.split(".")[:-1]
    for i in range(len(parts)):
        package = ".".join(parts[: i + 1])
        path = getattr(sys.modules.get(package), "__path__", None)
        if path is None:  # (a module loaded outside its package) the folder of each level above this file
            path = [str(Path(__file__).absolute().parents[len(parts) - i - 1])]
        packages[package] = [os.path.abspath(p) for p in path]
    program = [sys.executable, "-c", _PREBUILD_CHILD_PROGRAM]
    return [*program, json.dumps(packages), __name__, json.dumps(args), str(parent_pid)]


def _prebuild_child_main(args_json: str, parent_pid: int):
    """The child process of `start_fla_prebuild`: `prebuild_fla_kernels(**args)`, ended early if the parent ends
    (killed by a signal, its `atexit` kill never runs; the child then removes the parent's `ready_dir`). For
    FlashQLA, the parts of `FLASH_QLA_PARTS` in processes of their own, each telling its end in `ready_dir`
    (`_prebuild_part`); a part process that ends without telling (killed, crashed) is told "failed" by this one."""
    import threading
    import time

    args = json.loads(args_json)
    ready = args.pop("ready_dir", None)

    def watch_parent():
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        if ready is not None and args.get("part", "all") == "all":  # the parent's atexit never ran
            shutil.rmtree(ready, ignore_errors=True)
        os._exit(3)

    threading.Thread(target=watch_parent, daemon=True).start()
    if args.get("delta_rule") == "flash_qla" and args.get("part", "all") == "all":
        import subprocess

        # TileLang builds a kernel in one thread: each of FlashQLA's kernels in a process of its own (the others
        # watch this one, and tell `ready` themselves), the `solve` here
        others = {
            part: subprocess.Popen(
                _prebuild_command({**args, "part": part, "ready_dir": ready}, os.getpid()), stdin=subprocess.DEVNULL
            )
            for part in FLASH_QLA_PARTS[2:]
        }

        def tell_if_silent(part: str, process):  # killed by a signal or crashed: its own `finally` never ran
            process.wait()
            if not any(Path(ready).glob(f"{part}.*")):
                _tell(ready, part, "failed")

        tellers = [threading.Thread(target=tell_if_silent, args=item, daemon=True) for item in others.items() if ready]
        for teller in tellers:
            teller.start()
        try:
            _prebuild_part(args | {"part": "solve"}, ready)
        finally:
            codes = {part: child.wait() for part, child in others.items()}  # an error here propagates after them
            for teller in tellers:
                teller.join()
        failed = {part: code for part, code in codes.items() if code != 0}
        if failed:
            raise RuntimeError(f"FlashQLA's prebuild processes ended with codes {failed}")
        record_flash_qla_build(
            args["batch_size"],
            args["seq_len"],
            args["num_heads"],
            (args["head_k_dim"], args["head_v_dim"]),
            args["dtype"],
            args["packed"],
            args["device"],
        )
        return
    _prebuild_part(args, ready)


def _tell(ready: str | None, part: str, outcome: str):
    """Write `<ready>/<part>.<outcome>` for `wait_for_prebuild` (nothing where `ready` is None or is gone)."""
    if ready is not None:
        with contextlib.suppress(OSError):  # the folder removed at the parent's exit: nobody waits any more
            Path(ready, f"{part}.{outcome}").touch()


def _prebuild_part(args: dict, ready: str | None):
    """`prebuild_fla_kernels(**args)`, telling `ready` (a folder, or None) `<part>.done` as soon as the kernels
    the step may launch are built (`on_built`), or `<part>.failed` where the build raised before that (an
    exception, KeyboardInterrupt, SystemExit); a part killed by a signal is told by its parent
    (`_prebuild_child_main`)."""
    part, told = args.get("part", "all"), []

    def on_built():
        if not told:
            _tell(ready, part, "done")
            told.append(part)

    try:
        prebuild_fla_kernels(**args, on_built=on_built)
    finally:
        if not told:
            _tell(ready, part, "failed")


@dataclasses.dataclass
class _PrebuildWait:
    """A FlashQLA prebuild this process started: its child, the folder its parts tell their end in, and the parts
    no FlashQLA call has waited for yet."""

    child: object  # subprocess.Popen
    ready: Path
    pending: set


def wait_for_prebuild(parts: tuple[str, ...]) -> None:
    """Wait until the processes building FlashQLA's kernel `parts` (of `FLASH_QLA_PARTS`) for this process
    (`start_fla_prebuild`) have built them, so that the calls that follow load those kernels from TileLang's disk
    cache instead of building them again beside the prebuild. Waits once per part and prebuild, returns at once
    when there is none, and ends its wait when each part's process has told that the kernels the step may launch
    are built or that it failed, the prebuild's child has ended, or after `PREBUILD_WAIT_LIMIT_S` for the call as
    a whole (with a warning); never inside a CUDA graph capture. Called by the FlashQLA ops before their kernels."""
    import time

    if not any(entry.pending for entry in _prebuild_waits):
        return
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return
    deadline = time.monotonic() + PREBUILD_WAIT_LIMIT_S  # one limit for the call, however many prebuilds
    for entry in list(_prebuild_waits):
        wanted, entry.pending = entry.pending & set(parts), entry.pending - set(parts)
        while wanted:
            wanted = {p for p in wanted if not any(entry.ready.glob(f"{p}.*"))}
            if not wanted or entry.child.poll() is not None:
                break
            if time.monotonic() > deadline:
                _warn_once(
                    "prebuild-wait",
                    f"FlashQLA's prebuild of {', '.join(sorted(wanted))} has not ended after {PREBUILD_WAIT_LIMIT_S:.0f}"
                    " s; this process builds those kernels itself",
                )
                break
            time.sleep(0.05)


def _stop_prebuild_children():
    for child in _prebuild_children:
        if child.poll() is None:
            child.kill()
    for entry in _prebuild_waits:
        shutil.rmtree(entry.ready, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# FlashQLA's kernels built once per machine
# ----------------------------------------------------------------------------------------------------------------
# FlashQLA trains the Gated DeltaNet layers faster than fla (BENCHMARKS.md section 1), but TileLang builds its
# backward kernel in about 50 s, which a cold machine's first compiled step would wait for. TileLang keeps built
# kernels in its disk cache, so the cost is once per machine and shape. A FlashQLA prebuild whose four parts all end
# well leaves a record of what it built beside that cache; `gdn_backend` "auto" trains with FlashQLA where the record
# says the step's kernels are there, and otherwise with fla's kernels while the loop builds FlashQLA's in the
# background for the runs after it (`LlamaThinkPreTrainedModel.choose_training_kernels`).

FLASH_QLA_BUILD_RECORD_FORMAT = 1


def _tilelang_cache_dir() -> Path:
    """TileLang's disk cache folder, as TileLang reads it (`tilelang/env.py`): TILELANG_CACHE_DIR, else
    ~/.tilelang/cache. Read here rather than from tilelang, whose import takes seconds."""
    return Path(os.environ.get("TILELANG_CACHE_DIR") or "~/.tilelang/cache").expanduser()


def _gpu_identity(device: int) -> dict:
    """What picks FlashQLA's kernels on CUDA device `device` besides the shapes: its name, architecture and SM count
    (FlashQLA sizes its forward's variants by the SM count)."""
    props = torch.cuda.get_device_properties(device)
    return {"gpu": props.name, "capability": [props.major, props.minor], "sm_count": props.multi_processor_count}


def _distribution_version(distribution: str) -> str | None:
    """The installed version of `distribution` (a pip name), or None: read from its metadata, not imported."""
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _flash_qla_build_key(
    batch_size: int,
    seq_len: int,
    num_heads: int,
    head_dims: tuple[int, int],
    dtype: str,
    packed: bool,
    device: int,
) -> dict:
    """Everything that decides which FlashQLA kernels a training step of these shapes launches on `device`: the
    shapes as `prebuild_fla_kernels` takes them (`dtype` a torch dtype's name), the GPU, and the versions of the
    packages and the CUDA toolkit that build them."""
    version = _distribution_version
    return {
        "format": FLASH_QLA_BUILD_RECORD_FORMAT,
        "batch_size": int(batch_size),
        "seq_len": int(seq_len),
        "num_heads": int(num_heads),
        "head_dims": [int(d) for d in head_dims],
        "dtype": str(dtype).removeprefix("torch."),
        "packed": bool(packed),
        **_gpu_identity(device),
        "flash_qla": version("flash-qla"),
        "tilelang": version("tilelang"),
        "fla": version("fla-core"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }


def _flash_qla_build_record(key: dict) -> Path:
    """The record file of a FlashQLA build with key `key`, in a folder of ours inside TileLang's cache (a cleared
    cache takes its records with it)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return _tilelang_cache_dir() / "llamathink" / f"flash-qla-{digest}.json"


def record_flash_qla_build(
    batch_size: int,
    seq_len: int,
    num_heads: int,
    head_dims: tuple[int, int],
    dtype: str | torch.dtype,
    packed: bool,
    device: int,
) -> Path:
    """Record that TileLang's disk cache now holds the FlashQLA kernels a training step of these shapes launches on
    CUDA device `device` (arguments as `prebuild_fla_kernels`'s; `head_dims` the model's (Dk, Dv), before FlashQLA's
    padding). Called by a FlashQLA prebuild once its four parts have all ended well. Written whole or not at all
    (a temporary file renamed); returns the record's path. Raises OSError where the cache folder cannot be
    written."""
    key = _flash_qla_build_key(batch_size, seq_len, num_heads, head_dims, str(dtype), packed, device)
    path = _flash_qla_build_record(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(key, indent=1, sort_keys=True))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def flash_qla_built(
    batch_size: int,
    seq_len: int,
    num_heads: int,
    head_dims: tuple[int, int],
    dtype: str | torch.dtype,
    packed: bool,
    device: int,
) -> bool:
    """Whether a finished FlashQLA prebuild has recorded (`record_flash_qla_build`) that TileLang's disk cache
    holds the kernels a training step of these shapes launches on CUDA device `device`, built by the installed
    flash-qla, tilelang and fla for this GPU kind. Reads one small file (no import of FlashQLA); an unreadable or
    foreign record counts as none. A cache emptied by hand but for our folder would make the step build the kernels
    itself: slower, never wrong."""
    key = _flash_qla_build_key(batch_size, seq_len, num_heads, head_dims, str(dtype), packed, device)
    if key["flash_qla"] is None or key["tilelang"] is None:
        return False
    try:
        return json.loads(_flash_qla_build_record(key).read_text()) == key
    except (OSError, ValueError):
        return False


# ----------------------------------------------------------------------------------------------------------------
# fla's autotuned kernel configurations, measured once per GPU kind and shipped with the package
# ----------------------------------------------------------------------------------------------------------------
# fla's Triton kernels are `triton.autotune`d: the first call with a new key compiles and times every candidate
# configuration (about a dozen per kernel), which is most of a cold machine's first training step. The choices
# depend only on the GPU kind, the Triton and fla versions and the autotune key (head counts and sizes, chunk size,
# dtypes; batch for a few), so `benchmarks/tune_fla_configs.py` records them once per GPU kind and
# `load_fla_tuned_configs` gives them back to the autotuners' in-memory caches, exactly as an autotuning call would
# have left them: a key without a recorded choice is still autotuned, and outputs are the same up to rounding order
# whichever candidate runs.
# (fla's own `FLA_CONFIG_DIR` / `FLA_CACHE_MODE` does the same for its `fla_cache_autotune` kernels only, and is
# read when fla is first imported; several kernels on the Gated DeltaNet path use plain `triton.autotune`.)

FLA_TUNED_CONFIGS_ENV = "LLAMATHINK_FLA_TUNED_CONFIGS"  # "0" (or false, no, off): autotune as fla does; a path
_TUNED_FILE_LIMIT = 16 * 2**20  # bytes: recorded choices take kilobytes; a larger file is something else
FLA_TUNED_CONFIGS_DIR = Path(__file__).resolve().parent / "fla_configs"
_TUNED_FORMAT = 1
_SCALARS = (bool, int, float, str, type(None))


def fla_tuned_configs_path(gpu_name: str) -> Path:
    """The package's file of fla autotune choices for GPUs named `gpu_name` (`torch.cuda.get_device_name()`):
    `fla_configs/<name>.json` beside this file, the name with every run of other characters than letters and digits
    made one `_` (as fla names its own per-GPU config folders), e.g. `NVIDIA_H200.json`."""
    return FLA_TUNED_CONFIGS_DIR / f"{re.sub(r'[^0-9A-Za-z]+', '_', gpu_name).strip('_') or 'unknown_gpu'}.json"


def _library_versions() -> dict:
    """{"fla": ..., "triton": ...}: the versions a tuned-configs file must match (None where not importable)."""
    versions = {}
    for name in ("fla", "triton"):
        module = sys.modules.get(name)
        if module is None:
            try:
                module = __import__(name)
            except ImportError:
                module = None
        versions[name] = getattr(module, "__version__", None)
    return versions


def _fla_autotuners() -> dict[str, object]:
    """fla's Triton autotuners, by `module:function` of the kernel they tune: every attribute of an imported `fla.*`
    module that is one, or wraps one (`triton.heuristics`). Recognised by what is used of them (a `cache` dict from
    autotune key to config, `configs`, `keys`, the kernel function under `.fn`), so that no private Triton class is
    named."""
    found: dict[str, object] = {}
    for module_name, module in list(sys.modules.items()):
        if module is None or not (module_name == "fla" or module_name.startswith("fla.")):
            continue
        for value in list(vars(module).values()):
            obj = value
            for _ in range(4):  # heuristics -> autotuner -> jit function -> python function
                if obj is None:
                    break
                cache = getattr(obj, "cache", None) if not isinstance(obj, type) else None
                if isinstance(cache, dict) and hasattr(obj, "configs") and hasattr(obj, "keys"):
                    fn = obj
                    while hasattr(fn, "fn") and not inspect.isfunction(fn):
                        fn = fn.fn
                    if inspect.isfunction(fn):
                        found[f"{fn.__module__}:{fn.__qualname__}"] = obj
                    break
                obj = getattr(obj, "fn", None)
    return found


def _config_record(config) -> dict:
    """A Triton config as a tuned-configs file records it: its kwargs and launch settings."""
    return {
        "kwargs": dict(getattr(config, "kwargs", {})),
        "num_warps": getattr(config, "num_warps", None),
        "num_stages": getattr(config, "num_stages", None),
        "num_ctas": getattr(config, "num_ctas", 1),
        "maxnreg": getattr(config, "maxnreg", None),
    }


def _record_signature(record: dict) -> tuple:
    """What identifies a config's record (`_config_record`, or a file's entry), compared by value."""
    fields = (record["num_warps"], record["num_stages"], record["num_ctas"], record.get("maxnreg"))
    return (tuple(sorted(record["kwargs"].items())), *fields)


def fla_autotune_choices() -> dict[str, list[dict]]:
    """The configurations fla's autotuners have chosen in this process: {"module:function": [{"key": [...],
    "config": {"kwargs": {...}, "num_warps", "num_stages", "num_ctas", "maxnreg"}}]}, keys and kernels sorted."""
    choices: dict[str, list[dict]] = {}
    for name, tuner in sorted(_fla_autotuners().items()):
        entries = []
        for key, config in tuner.cache.items():
            key = list(key) if isinstance(key, tuple) else [key]
            record = _config_record(config)
            if all(isinstance(x, _SCALARS) for x in [*key, *record["kwargs"].values()]):
                entries.append({"key": key, "config": record})
        if entries:
            choices[name] = sorted(entries, key=lambda e: json.dumps(e["key"]))
    return choices


def write_fla_tuned_configs(path: str | Path, gpu_name: str, extra: dict | None = None) -> dict:
    """Write this process's fla autotune choices (`fla_autotune_choices`) to `path` as a tuned-configs file for GPUs
    named `gpu_name`, merged over the entries already there when that file is for the same GPU and versions (this
    process's choice wins for a key both have; keys are compared as the autotuners compare them, so `1` and `true`
    are one key). An earlier tuned-configs file (a JSON object with "format", "gpu" and "kernels") for another GPU,
    other versions or another format, or a damaged one, is replaced, with a warning that says why; any other file is
    never replaced. `extra`: fields recorded beside the choices (how they were measured); it cannot change the
    format, GPU, versions or kernels. Returns the written document.

    Raises RuntimeError when this process has made no choices (fla not installed or not used: nothing to record, and
    an earlier file is kept), ValueError where `path` names something that is not a tuned-configs file (a folder, a
    model config, an unreadable file: kept as it is), OSError where the file cannot be written. A temporary file is
    renamed into place (the target of a symbolic link is what is written), so an earlier file is never left half
    written."""
    choices = fla_autotune_choices()
    if not choices:
        raise RuntimeError(
            "no fla autotune choices in this process (fla not installed, or no fla kernel ran): nothing to record"
        )
    path = Path(path).resolve()
    versions = _library_versions()
    kernels: dict[str, dict[tuple, dict]] = {}
    if path.exists():
        earlier, what = earlier_tuned_configs(path)
        if earlier is not None and earlier["gpu"] == gpu_name and earlier["versions"] == versions:
            for name, entries in earlier["kernels"].items():
                kernels[name] = {tuple(e["key"]): e for e in entries}
        else:
            what = what or f"for {earlier['gpu']}, {earlier['versions']}"
            logger.warning(f"replacing {path} ({what}) with choices for {gpu_name}, {versions}")
    for name, entries in choices.items():
        kernels.setdefault(name, {}).update({tuple(e["key"]): e for e in entries})
    doc = {
        **(extra or {}),
        "format": _TUNED_FORMAT,
        "gpu": gpu_name,
        "versions": versions,
        "kernels": {
            name: sorted(by_key.values(), key=lambda e: json.dumps(e["key"]))
            for name, by_key in sorted(kernels.items())
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return doc


def earlier_tuned_configs(path: str | Path) -> tuple[dict | None, str | None]:
    """What `write_fla_tuned_configs` finds at `path`, an existing file: (the tuned-configs document, None) when it
    is a well-formed one, (None, why) for a tuned-configs file (a JSON object with "format", "gpu" and "kernels")
    that is damaged or of another format. Raises ValueError, naming the file, for anything else (a folder, a model
    config, a file that cannot be read): a file that `write_fla_tuned_configs` must not replace."""
    path = Path(path)
    not_ours = f"{path} is not a tuned-configs file, so it is not replaced: remove it or name another file"
    if not path.is_file():
        raise ValueError(f"{not_ours} (it is a folder or a device)")
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as err:
        raise ValueError(f"{not_ours} ({type(err).__name__}: {err})") from None
    if not isinstance(found, dict) or not {"format", "gpu", "kernels"} <= found.keys():
        raise ValueError(f'{not_ours} (not a JSON object with "format", "gpu" and "kernels")')
    try:
        return _validated_tuned_configs(found), None
    except ValueError as err:
        return None, f"damaged or of another format: {err}"


def _validated_tuned_configs(doc) -> dict:
    """`doc` (a parsed tuned-configs file) when well formed; raises ValueError naming the first fault."""

    def _fault(message: str):
        raise ValueError(message)

    if not isinstance(doc, dict):
        _fault(f"the file holds a {type(doc).__name__}, not an object")
    if doc.get("format") != _TUNED_FORMAT:
        _fault(f"format {doc.get('format')!r} is not {_TUNED_FORMAT}")
    if not isinstance(doc.get("gpu"), str):
        _fault("'gpu' is not a string")
    versions = doc.get("versions")
    if not isinstance(versions, dict) or not all(
        isinstance(versions.get(k), (str, type(None))) for k in ("fla", "triton")
    ):
        _fault("'versions' is not an object with string 'fla' and 'triton'")
    kernels = doc.get("kernels")
    if not isinstance(kernels, dict):
        _fault("'kernels' is not an object")
    for name, entries in kernels.items():
        if not isinstance(entries, list):
            _fault(f"kernels[{name!r}] is not a list")
        for i, entry in enumerate(entries):
            where = f"kernels[{name!r}][{i}]"
            if not isinstance(entry, dict) or not isinstance(entry.get("key"), list):
                _fault(f"{where} has no 'key' list")
            if not all(isinstance(x, _SCALARS) for x in entry["key"]):
                _fault(f"{where}.key holds a value that is not a number, string, boolean or null")
            config = entry.get("config")
            if not isinstance(config, dict) or not isinstance(config.get("kwargs"), dict):
                _fault(f"{where} has no 'config' with a 'kwargs' object")
            if not all(isinstance(k, str) and isinstance(v, _SCALARS) for k, v in config["kwargs"].items()):
                _fault(f"{where}.config.kwargs holds a value that is not a number, string or boolean")
            for field, low in (("num_warps", 1), ("num_stages", 0), ("num_ctas", 1)):
                value = config.get(field)
                if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 64:
                    _fault(f"{where}.config.{field} is {value!r}, not an integer in [{low}, 64]")
            maxnreg = config.get("maxnreg")
            if maxnreg is not None and (isinstance(maxnreg, bool) or not isinstance(maxnreg, int) or maxnreg <= 0):
                _fault(f"{where}.config.maxnreg is {maxnreg!r}, not a positive integer or null")
    return doc


def _is_autotune_key(key: tuple, tuner) -> bool:
    """Whether `key` has the shape of `tuner`'s keys: one value per key argument, then the dtypes of the tensor
    arguments (`torch.*` strings), as Triton's `Autotuner.run` builds them."""
    n = len(getattr(tuner, "keys", ()))
    return len(key) >= n and all(isinstance(x, str) and x.startswith("torch.") for x in key[n:])


def load_fla_tuned_configs(path: str | Path | None = None) -> int:
    """Give fla's autotuners the choices recorded in a tuned-configs file (`write_fla_tuned_configs`) for every
    autotune key they have not met yet in this process, so that a kernel's first call compiles one configuration
    instead of timing each candidate. Returns how many keys were given.

    What is given is always one of the kernel's own candidate configurations (the object in the autotuner's
    `configs`, exactly what autotuning could have chosen): a recorded choice that equals none of them, or a key not
    shaped like the kernel's autotune keys, is skipped with a warning. Outputs are the same up to floating-point
    rounding order whichever candidate runs.

    `path`: the file; default the `LLAMATHINK_FLA_TUNED_CONFIGS` environment variable when it names one, else the
    package's file for the current CUDA device (`fla_tuned_configs_path`). `LLAMATHINK_FLA_TUNED_CONFIGS=0` (or
    false, no, off) turns this off; a file over 16 MiB is not read. Nothing is given when the file is missing, was
    measured with other fla or Triton versions (its choices may not fit these kernels) or on another kind of GPU,
    nor for kernels this fla does not have; a file named by the variable or the argument that cannot be used, and
    any malformed file, gives a warning that names it and the reason. Never raises: this only saves compilation
    time."""
    setting = os.environ.get(FLA_TUNED_CONFIGS_ENV, "")
    if _switched_off(setting):
        return 0
    named = path is not None or bool(setting)  # a file the user asked for: say why it is not used
    try:
        return _load_fla_tuned_configs(path, setting, named)
    except Exception as err:  # noqa: BLE001 - an optimisation must never stop a model from being built
        _warn_once(
            f"tuned-error:{path or setting}", f"fla's tuned kernel configs not used: {type(err).__name__}: {err}"
        )
        return 0


def _load_fla_tuned_configs(path, setting: str, named: bool) -> int:
    gpu = torch.cuda.get_device_name(torch.cuda.current_device()) if torch.cuda.is_available() else None
    if path is None:
        if setting:
            path = setting
        elif gpu is not None:
            path = fla_tuned_configs_path(gpu)
        else:
            return 0
    path = Path(path)

    def not_used(reason: str) -> int:
        message = f"fla's tuned kernel configs in {path} not used: {reason}; fla autotunes as usual"
        if named:
            _warn_once(f"tuned:{path}:{reason}", message)
        else:
            logger.info(message)
        return 0

    if not path.exists():
        return not_used("no such file (or a symbolic link that leads nowhere)") if named else 0
    if not path.is_file():
        return not_used("not a file")
    size = path.stat().st_size
    if size > _TUNED_FILE_LIMIT:
        return not_used(f"{size:,} bytes, too large for recorded choices (kilobytes); not read")
    try:
        doc = _validated_tuned_configs(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError
        _warn_once(f"tuned-bad:{path}", f"ignoring fla's tuned kernel configs in {path}: {err}; fla autotunes as usual")
        return 0
    versions = _library_versions()
    if any(doc["versions"].get(k) != versions[k] for k in ("fla", "triton")):
        return not_used(f"measured with {doc['versions']}, this process has {versions}")
    if gpu is not None and doc["gpu"] != gpu:  # another GPU kind's choices may not fit this one (shared memory)
        _warn_once(f"tuned-gpu:{path}", f"fla tuned configs in {path} are for {doc['gpu']}, not {gpu}: not used")
        return 0
    given, skipped = 0, []
    tuners = _fla_autotuners()
    for name, entries in doc["kernels"].items():
        tuner = tuners.get(name)
        if tuner is None:
            continue
        offered = {_record_signature(_config_record(c)): c for c in getattr(tuner, "configs", ())}
        for entry in entries:
            key = tuple(entry["key"])
            config = offered.get(_record_signature(entry["config"]))
            if config is None or not _is_autotune_key(key, tuner):
                skipped.append(name)
            elif key not in tuner.cache:
                tuner.cache[key] = config
                given += 1
    if skipped:
        _warn_once(
            f"tuned-skipped:{path}",
            f"{len(skipped)} choices in {path} were skipped (not one of their kernel's candidate configurations, or "
            f"a key not shaped like its autotune keys), first in {skipped[0]}; those keys are autotuned as usual",
        )
    return given


__all__ = [
    "FLASH_QLA_GDN_KERNELS",
    "FLA_CONV_ENV",
    "FLA_CONV_KERNELS",
    "FLA_GDN_KERNELS",
    "FLA_PREBUILD_ENV",
    "FLA_TUNED_CONFIGS_ENV",
    "GLUON_CONV_SHAPES_PER_PROCESS",
    "earlier_tuned_configs",
    "fla_autotune_choices",
    "fla_backward_problem",
    "fla_causal_conv1d_silu",
    "fla_causal_conv1d_silu_split",
    "fla_chunk_gated_delta_rule",
    "fla_conv_available",
    "fla_conv_kernels",
    "fla_recurrent_gated_delta_rule",
    "fla_tuned_configs_path",
    "flash_qla_chunk_gated_delta_rule",
    "flash_qla_problem",
    "load_fla_tuned_configs",
    "prebuild_fla_kernels",
    "probe_fla",
    "probe_flash_qla",
    "select_gdn_backend",
    "start_fla_prebuild",
    "write_fla_tuned_configs",
]
