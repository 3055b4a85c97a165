"""Muon + AdamW in a single ``torch.optim.Optimizer``.

Which parameters of a model go to Muon is the caller's choice (param groups flagged ``use_muon``);
LlamaThink's routing by parameter name is in ``llamathink.train.optim``.

Why one optimizer object?
    Muon is only defined for 2-D weight matrices of hidden layers; embeddings, the
    LM head, norms, scales etc. must be trained with AdamW.  The usual recipe of two
    optimizers is awkward with ``accelerate`` (``prepare`` / gradient accumulation /
    ``save_state``), LR schedulers and checkpoints, which all assume one optimizer.
    So every param group here carries a flag ``use_muon``; ``step()`` runs Muon on
    the ``use_muon=True`` groups and AdamW on the others.  ``state_dict`` /
    ``load_state_dict`` / LR schedulers are inherited unchanged from
    ``torch.optim.Optimizer`` (a scheduler scales each group's ``lr`` relative to
    its own ``initial_lr``, so Muon and AdamW groups keep their ratio).

Muon update for one matrix ``W`` (rows x cols) with gradient ``G``
(same conventions as ``torch.optim.Muon`` in torch >= 2.9)::

    B  <- momentum * B + (1 - momentum) * G           # EMA momentum buffer
    U  <- (1 - momentum) * G + momentum * B           # Nesterov look-ahead (else U = B)
    O  <- NewtonSchulz5(U)                            # ~ U V^T of U's SVD, in bf16
    W  <- W * (1 - lr * weight_decay)                 # decoupled weight decay
    W  <- W - adjusted_lr * O
    adjusted_lr = lr * sqrt(max(1, rows / cols))      # adjust_lr_fn="original" (K. Jordan)
                = lr * 0.2 * sqrt(max(rows, cols))    # adjust_lr_fn="match_rms_adamw" (Moonlight)

The EMA form of momentum differs from the classical ``B = mu B + G`` only by a
constant factor, which the Frobenius normalisation in Newton-Schulz removes.

Distributed data parallel (``torch.distributed`` initialised, world size > 1):
    gradients are already identical on every rank (DDP all-reduced them), so every
    rank updates the (cheap, element-wise) momentum of *all* Muon params - this keeps
    the full optimizer state on every rank, so rank 0's checkpoint is complete.  The
    expensive Newton-Schulz orthogonalisation is split: matrices are bucketed by
    shape, assigned round-robin to ranks, each rank orthogonalises only its share
    (batched into one ``bmm`` chain per bucket) and one asynchronous all-gather per
    shape bucket (bf16) gives every rank every update, so all ranks apply identical
    updates.  Works with gloo (CPU) and NCCL (GPU).  Requirement: every rank must
    have the same set of Muon params with a non-None ``.grad`` (true under DDP).
    Not meant for FSDP/ZeRO (parameters must be full, unsharded tensors).

CUDA graphs (one process, every Muon matrix on one CUDA device; ``cuda_graph=None`` or ``True``):
    eagerly, the orthogonalisation is about twenty kernel launches per shape bucket (the normalisation, five
    iterations of three batched matrix products, casts), and their host time exceeds their GPU time: a small
    model's step waits on the host.  So the first step records every bucket's Newton-Schulz chain as one CUDA graph
    (``torch.cuda.CUDAGraph``) over static input and output buffers; each step writes the look-ahead updates into
    the inputs (one pass per matrix), replays the graph once and applies the outputs (one ``foreach`` pass per
    group).  The graph is recorded again when the set of matrices with a gradient or their learning-rate adjustment
    changes (after ``MAX_GRAPH_RECORDINGS`` recordings the optimizer stays eager, with a warning).  The eager path
    above, used on CPUs, with several ranks and with ``cuda_graph=False``, computes the same numbers the same way,
    except after a weight decay changed since the graph was recorded (a schedule): the graph's outputs are then
    applied by a ``mul_`` and an ``add_``, the same update to the parameters' rounding (so a resumed run, which
    records anew, matches the uninterrupted one to rounding, not bitwise).

Memory passes: the update's shape factor is folded into the last Newton-Schulz product, and the decay and the update
are one ``lerp``: where a group decays, the outputs hold ``V = -adjusted_lr / (lr * weight_decay) * O``, and
``W.lerp_(V, lr * weight_decay) = W * (1 - lr * weight_decay) - adjusted_lr * O`` (a ``mul_`` and an ``add_`` where
the decay is zero, too small for ``V`` to fit the parameters' dtype, or changed since the graph was recorded).
AdamW groups on CUDA take torch's fused AdamW kernel.
"""

from __future__ import annotations

import collections
import logging
import math
import numbers
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "Muon",
    "zeropower_via_newtonschulz",
    "adjusted_muon_lr",
]

logger = logging.getLogger(__name__)

# Quintic Newton-Schulz coefficients from Keller Jordan's Muon: chosen to maximise the
# slope at 0 so that 5 iterations push all singular values into roughly [0.7, 1.2].
NS_COEFFICIENTS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
# Same default as torch.optim.Muon; only guards the division for an all-zero update.
NS_EPS = 1e-7
ADJUST_LR_FNS = ("original", "match_rms_adamw")
# How many times the Newton-Schulz CUDA graph may be recorded (once per change of the matrices with a gradient)
# before the optimizer stays eager: recording costs more than a few eager steps.
MAX_GRAPH_RECORDINGS = 8


# --------------------------------------------------------------------------------------
# Newton-Schulz orthogonalisation
# --------------------------------------------------------------------------------------
def ns_output_dtype(device: torch.device) -> torch.dtype:
    """The Newton-Schulz iteration dtype: bf16 on GPUs (tensor cores), fp32 on CPUs (no fast bf16 matmul there)."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def zeropower_via_newtonschulz(
    update: Tensor,
    steps: int = NS_STEPS,
    coefficients: Sequence[float] = NS_COEFFICIENTS,
    eps: float = NS_EPS,
    dtype: torch.dtype | None = None,
    scale: float = 1.0,
) -> Tensor:
    """Approximately orthogonalise a matrix (or a batch of same-shape matrices).

    Returns ``~ scale * U V^T`` where ``U S V^T`` is the SVD of each ``[rows, cols]`` slice of
    ``update`` (shape ``[rows, cols]`` or ``[batch, rows, cols]``), in **bfloat16** on GPUs (fp32 on CPUs; ``dtype``
    overrides), contiguous.
    The quintic iteration ``X <- a X + (b A + c A^2) X`` with ``A = X X^T`` does not
    converge exactly to 1 (singular values end up in ~[0.7, 1.2]); that is fine for
    Muon and lets 5 cheap bf16 iterations suffice (Keller Jordan's Muon).

    * Each slice is first divided by its Frobenius norm (+ eps): the Frobenius norm
      bounds the spectral norm, so all singular values start in [0, 1], inside the
      region where the polynomial iteration behaves.  The norm is accumulated in fp32 (fp64 for fp64 input).
    * Tall slices (rows > cols) iterate on the small ``[cols, cols]`` Gram matrix ``A = X^T X`` and multiply from
      the right, ``X <- a X + X (b A + c A^2)`` (the same iteration on ``X^T``), so that no transposed copy is made.
    * ``scale`` multiplies the result inside the last iteration's product (Muon's shape factor, at no extra pass).
    * The input is never modified.
    """
    if update.ndim not in (2, 3):
        raise ValueError(f"Newton-Schulz expects a matrix or a batch of matrices, got shape {tuple(update.shape)}")
    if len(coefficients) != 3:
        raise ValueError(f"need exactly 3 Newton-Schulz coefficients, got {coefficients}")
    a, b, c = (float(x) for x in coefficients)
    squeeze = update.ndim == 2
    x = update.unsqueeze(0) if squeeze else update
    tall = x.size(-2) > x.size(-1)
    norm = torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True, dtype=torch.promote_types(x.dtype, torch.float32))
    # The divide in fp32 (fp64 for fp64 input) with one rounding to the iteration dtype on the way out, in one
    # kernel, out of place (never touch the input). bf16 on GPUs (tensor cores); fp32 on CPUs, where bf16 matmuls
    # are emulated and several times slower without AMX.
    dtype = dtype or ns_output_dtype(x.device)
    if torch.is_grad_enabled() and x.requires_grad:  # (out= takes no autograd)
        x = (x / (norm + eps)).to(dtype)
    else:
        x = torch.div(x, norm + eps, out=torch.empty(x.shape, dtype=dtype, device=x.device))
    for step in range(steps):
        s = float(scale) if step == steps - 1 else 1.0
        gram = torch.bmm(x.mT, x) if tall else torch.bmm(x, x.mT)  # [B, m, m], m = min(rows, cols)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b*A + c*A@A
        # s * (a*X + X @ poly), or from the left for wide slices. (a*X stays the product's fp32 addend: folding a
        # into the bf16 polynomial's diagonal would save the addend's copy but doubles the error against fp64.)
        x = torch.baddbmm(x, x, poly, beta=a * s, alpha=s) if tall else torch.baddbmm(x, poly, x, beta=a * s, alpha=s)
    if steps == 0 and scale != 1.0:
        x = x * scale
    return x.squeeze(0) if squeeze else x


def adjusted_muon_lr(lr: float, adjust_lr_fn: str | None, shape: Sequence[int]) -> float:
    """Shape-aware Muon step size.

    The orthogonalised update has all singular values ~1, so its per-entry RMS is
    ``1/sqrt(max(rows, cols))``; the adjustment makes step sizes comparable across
    matrix shapes.

    * ``"original"`` (Keller Jordan, default): ``lr * sqrt(max(1, rows / cols))``.
    * ``"match_rms_adamw"`` (Moonlight, "Muon is Scalable for LLM Training"):
      ``lr * 0.2 * sqrt(max(rows, cols))`` - update RMS ~0.2 like AdamW's, so AdamW's
      lr / weight decay can be reused.
    """
    rows, cols = int(shape[0]), int(shape[1])
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    raise ValueError(f"adjust_lr_fn must be one of {ADJUST_LR_FNS}, got {adjust_lr_fn!r}")


# Devices whose AdamW groups take torch's fused kernel (`_fused_adamw_takes`). The CPU keeps the foreach path: the
# reference, bitwise equal to torch.optim.AdamW(foreach=False).
FUSED_ADAMW_DEVICES = ("cuda",)


def _fused_adamw_takes(params: list[Tensor], grads: list[Tensor]) -> bool:
    """Whether these AdamW tensors can go to torch's fused AdamW kernel together (``torch._fused_adamw_``, present
    since torch 2.0): one device of `FUSED_ADAMW_DEVICES`, one floating dtype the kernel takes, gradients of the
    parameters' dtype."""
    if getattr(torch, "_fused_adamw_", None) is None:
        return False
    device, dtype = params[0].device, params[0].dtype
    return (
        device.type in FUSED_ADAMW_DEVICES
        and dtype in (torch.float32, torch.float16, torch.bfloat16)
        and all(t.device == device and t.dtype == dtype for t in (*params, *grads))
    )


# torch >= 2.13 deprecates all_gather_into_tensor in favour of all_gather_single.
_all_gather_flat = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)


# --------------------------------------------------------------------------------------
# Newton-Schulz for every shape bucket, recorded as one CUDA graph
# --------------------------------------------------------------------------------------
def _scaled_for(group: dict[str, Any]) -> float | None:
    """The weight decay a group's orthogonalised updates are divided by, so that `_apply_updates` applies decay and
    update as one ``lerp`` (see there), or None where they are not: no decay, or a decay so small that
    ``adjusted_lr / weight_decay`` times an update entry (at most about 1.2; 4 allowed) would not fit a parameter's
    dtype or float32 (where Newton-Schulz and the factors compute; float16 below a weight decay of about 1e-4,
    every other dtype below about 1e-38, where ``1 - lr * wd`` is 1 in float32)."""
    wd = group["weight_decay"]
    if wd <= 0:
        return None
    for p in group["params"]:
        if not p.is_floating_point():
            continue
        largest = min(torch.finfo(p.dtype).max, torch.finfo(torch.float32).max)
        if 4.0 * adjusted_muon_lr(1.0, group["adjust_lr_fn"], p.shape) / wd > largest:
            return None
    return wd


def _update_factor(group: dict[str, Any], shape: Sequence[int], scaled_for: float | None) -> float:
    """What one matrix's orthogonalised update is multiplied by before it is applied (`_apply_updates`): its
    :func:`adjusted_muon_lr` at ``lr = 1``, divided by ``-scaled_for`` (`_scaled_for`) where that is not None."""
    factor = adjusted_muon_lr(1.0, group["adjust_lr_fn"], shape)
    return factor if scaled_for is None else -factor / scaled_for


def _bucket_factors(
    items: list[tuple[Tensor, Any, dict[str, Any]]], shape: Sequence[int], device, scaled_for: dict[int, float | None]
) -> float | Tensor:
    """The `_update_factor` of a shape bucket's matrices (`scaled_for`: each group's, by ``id``): one float where
    they share it (the usual case), else a ``[n, 1, 1]`` fp32 tensor (groups in one bucket may differ in
    ``adjust_lr_fn`` or weight decay)."""
    factors = [_update_factor(group, shape, scaled_for[id(group)]) for _, _, group in items]
    if len(set(factors)) == 1:
        return factors[0]
    return torch.tensor(factors, dtype=torch.float32, device=device).view(-1, 1, 1)


def _orthogonalise_bucket(inputs: Tensor, factors: float | Tensor, ns_settings: tuple, out: Tensor) -> Tensor:
    """``out <- zeropower_via_newtonschulz(inputs) * factors`` for one shape bucket, inputs and out ``[n, rows,
    cols]`` in the parameters' dtype: one shared factor inside the last Newton-Schulz product, then a cast;
    several as a product in fp32 with one rounding to the parameters' dtype. The same numbers on every path (the
    recorded graph, the eager step, each rank of a sharded one)."""
    steps, coefficients, eps = ns_settings
    if isinstance(factors, float):
        return out.copy_(zeropower_via_newtonschulz(inputs, steps, coefficients, eps, scale=factors))
    return torch.mul(zeropower_via_newtonschulz(inputs, steps, coefficients, eps), factors, out=out)


def _apply_updates(
    group: dict[str, Any], params: list[Tensor], updates: list[Tensor], scaled_for: float | None
) -> None:
    """``p <- p * (1 - lr * wd) - lr * factor * O`` for a group's matrices: the decoupled weight decay with the
    *unadjusted* lr (as torch.optim.Muon) and the shape-adjusted update. ``updates`` hold ``factor * O``, divided
    by ``-scaled_for`` where that is not None (`_scaled_for`, `_update_factor`). Where it is the group's weight
    decay, one foreach pass, ``p.lerp_(update, lr * wd) = p + lr * wd * (update - p)``, is both; otherwise (no
    decay, a tiny one, or a decay changed since the updates' graph was recorded) a ``mul_`` and an ``add_``."""
    lr, wd = group["lr"], group["weight_decay"]
    if scaled_for is not None and wd == scaled_for:
        torch._foreach_lerp_(params, updates, lr * wd)
        return
    if wd != 0:
        torch._foreach_mul_(params, 1.0 - lr * wd)
    torch._foreach_add_(params, updates, alpha=-lr if scaled_for is None else lr * scaled_for)


class _NewtonSchulzGraph:
    """Every shape bucket's orthogonalisation of one optimizer step as one recorded CUDA graph.

    ``buckets`` is a list of ``(key, items)`` as :meth:`Muon._buckets` makes them: ``key = (shape, dtype, device,
    (ns_steps, coefficients, eps))``, ``items`` the ``(param, index, group)`` triples of that bucket, ``index`` the
    parameter's position among its group's parameters with a gradient.  Per bucket the graph reads a static input
    ``[n, rows, cols]`` (the parameters' dtype) and writes a static output of the same shape and dtype:
    ``zeropower_via_newtonschulz(input) * factor``, with each matrix's ``factor`` from :func:`_update_factor`
    (`_orthogonalise_bucket`).  Callers fill the inputs
    through :attr:`inputs` (one view per parameter of each group, ``[rows, cols]``), call :meth:`replay`, then read
    :attr:`outputs` (views laid out the same way).

    ``signature`` identifies the plan (the parameters, their shapes, dtypes, device and settings, their lr
    adjustment): a step whose plan differs needs a new graph. A changed weight decay does not: :attr:`scaled_for`
    keeps, per group, the decay the outputs were divided by (`_apply_updates`).

    Raises the ``RuntimeError`` of ``torch.cuda.graph`` when recording fails (the optimizer then warns and stays
    eager).
    """

    def __init__(self, buckets: list[tuple[tuple, list[tuple[Tensor, Any, dict[str, Any]]]]], signature: tuple) -> None:
        self.signature = signature
        # (input, output, factors: one float or a [n, 1, 1] fp32 tensor, ns settings)
        self._work: list[tuple[Tensor, Tensor, float | Tensor, tuple]] = []
        # id(group) -> one view per parameter (in the group's order) of its slot in the inputs / outputs
        self.inputs: dict[int, list[Tensor]] = {}
        self.outputs: dict[int, list[Tensor]] = {}
        sizes = collections.Counter(id(group) for _, items in buckets for _, _, group in items)
        # id(group) -> the weight decay its outputs are divided by (`_scaled_for`, at recording)
        self.scaled_for = {id(group): _scaled_for(group) for _, items in buckets for _, _, group in items}
        device = buckets[0][0][2]
        for (shape, dtype, _, ns_settings), items in buckets:
            inputs = torch.zeros((len(items), *shape), dtype=dtype, device=device)
            outputs = torch.zeros_like(inputs)
            self._work.append((inputs, outputs, _bucket_factors(items, shape, device, self.scaled_for), ns_settings))
            for i, (_, index, group) in enumerate(items):
                self.inputs.setdefault(id(group), [inputs[0]] * sizes[id(group)])[index] = inputs[i]
                self.outputs.setdefault(id(group), [outputs[0]] * sizes[id(group)])[index] = outputs[i]
        self._graph: torch.cuda.CUDAGraph | None = None
        if device.type != "cuda":
            return  # static buffers without a recording (the layout's CPU test): replay() runs eagerly
        # Warm up on a side stream first: cuBLAS creates its handles and workspaces outside the recording.
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            self._orthogonalise()
        torch.cuda.current_stream(device).wait_stream(stream)
        self._graph = torch.cuda.CUDAGraph()
        # thread_local: a data loader's pinned-memory thread may call CUDA while this thread records.
        with torch.cuda.graph(self._graph, capture_error_mode="thread_local"):
            self._orthogonalise()

    def _orthogonalise(self) -> None:
        for inputs, outputs, factors, ns_settings in self._work:
            _orthogonalise_bucket(inputs, factors, ns_settings, out=outputs)

    def replay(self) -> None:
        """Run the recorded orthogonalisation on the current contents of the inputs."""
        if self._graph is None:
            self._orthogonalise()
        else:
            self._graph.replay()


# --------------------------------------------------------------------------------------
# The optimizer
# --------------------------------------------------------------------------------------
class Muon(torch.optim.Optimizer):
    """Muon for hidden 2-D matrices and AdamW for everything else, in one optimizer.

    Every param group has ``use_muon: bool`` (missing -> ``True``, like
    ``torch.optim.Muon``).  Hyper-parameters a group does not set are filled from the
    constructor arguments of its kind:

    * Muon groups: ``lr``, ``weight_decay``, ``momentum``, ``nesterov``, ``ns_steps``,
      ``ns_coefficients``, ``eps`` (Newton-Schulz normalisation), ``adjust_lr_fn``.
      Only 2-D params are allowed (``ValueError`` otherwise).
    * AdamW groups: ``lr`` (from ``adamw_lr``), ``weight_decay`` (from
      ``adamw_weight_decay``, default ``weight_decay``), ``betas``, ``eps`` (from
      ``adamw_eps``).  Same arithmetic as ``torch.optim.AdamW`` (bias correction,
      decoupled weight decay ``p *= 1 - lr * wd``): on CUDA torch's fused AdamW kernel, elsewhere
      ``torch._foreach_*`` (bitwise torch's ``foreach=False`` AdamW on CPUs).

    Params whose ``.grad`` is None are skipped (their state is untouched).

    Args:
        params: tensors or param-group dicts, e.g. ``muon_param_groups(model)``.
        lr: Muon learning rate (default 0.02).
        momentum: Muon momentum (default 0.95).
        nesterov: Nesterov look-ahead for Muon (default True).
        ns_steps / ns_coefficients / eps: Newton-Schulz settings.
        adjust_lr_fn: ``"original"`` (default) or ``"match_rms_adamw"``, see
            :func:`adjusted_muon_lr`.
        weight_decay: decoupled weight decay of Muon groups (default 0.01).
        adamw_lr / adamw_betas / adamw_eps / adamw_weight_decay: AdamW defaults
            (0.002, (0.9, 0.99), 1e-8, ``weight_decay``).
        distributed: ``None`` (default) = shard Newton-Schulz across ranks whenever
            ``torch.distributed`` is initialised with world size > 1; ``False`` =
            never; ``True`` = require it.
        process_group: process group for the sharding (default: the world).
        cuda_graph: ``None`` (default) = record the Newton-Schulz step as a CUDA graph when
            the run has one process and every Muon matrix is on one CUDA device (see the
            module docstring); ``True`` = the same, and ``ValueError`` at the first step when
            that does not hold; ``False`` = always eager.  A recording that fails warns
            once and leaves the optimizer eager.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = NS_STEPS,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        eps: float = NS_EPS,
        adjust_lr_fn: str | None = "original",
        weight_decay: float = 0.01,
        adamw_lr: float = 0.002,
        adamw_betas: tuple[float, float] = (0.9, 0.99),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float | None = None,
        *,
        distributed: bool | None = None,
        process_group: Any = None,
        cuda_graph: bool | None = None,
    ) -> None:
        # Kind-specific defaults must exist before super().__init__ calls add_param_group.
        self._muon_defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "nesterov": nesterov,
            "ns_steps": ns_steps,
            "ns_coefficients": tuple(ns_coefficients),
            "eps": eps,
            "adjust_lr_fn": "original" if adjust_lr_fn is None else adjust_lr_fn,
        }
        self._adamw_defaults = {
            "lr": adamw_lr,
            "weight_decay": weight_decay if adamw_weight_decay is None else adamw_weight_decay,
            "betas": tuple(adamw_betas),
            "eps": adamw_eps,
        }
        self._distributed = distributed
        self._process_group = process_group
        if cuda_graph not in (None, True, False):
            raise TypeError(f"cuda_graph must be None, True or False, got {cuda_graph!r}")
        self._cuda_graph = cuda_graph
        self._ns_graph: _NewtonSchulzGraph | None = None
        self._graph_recordings = 0
        # ``defaults`` only holds keys common to both kinds: Optimizer.add_param_group
        # setdefault()s every key of ``defaults`` into every group, and e.g. a
        # "momentum" key on an AdamW group would be misleading.  (The complete,
        # kind-specific defaults are filled in by our add_param_group.)
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})

    # ---- construction -------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Fill the kind-specific defaults, validate, then defer to torch."""
        use_muon = param_group.setdefault("use_muon", True)
        if not isinstance(use_muon, bool):
            raise TypeError(f"param group key 'use_muon' must be a bool, got {use_muon!r}")
        for key, value in (self._muon_defaults if use_muon else self._adamw_defaults).items():
            param_group.setdefault(key, value)
        if use_muon and param_group["adjust_lr_fn"] is None:
            param_group["adjust_lr_fn"] = "original"  # same meaning as torch.optim.Muon
        super().add_param_group(param_group)  # normalises "params" to a list, checks dups
        try:
            self._validate_group(self.param_groups[-1])
        except Exception:
            self.param_groups.pop()  # never keep an invalid group around
            raise

    @staticmethod
    def _validate_group(group: dict[str, Any]) -> None:
        for key in ("lr", "weight_decay", "eps"):  # a tensor would fail inside the foreach kernels of the step
            if isinstance(group[key], bool) or not isinstance(group[key], numbers.Real):
                raise TypeError(f"Muon takes {key} as a number, got {type(group[key]).__name__} {group[key]!r}")
            group[key] = float(group[key])
        if not 0.0 <= group["lr"]:
            raise ValueError(f"invalid learning rate {group['lr']}")
        if not 0.0 <= group["weight_decay"]:
            raise ValueError(f"invalid weight_decay {group['weight_decay']}")
        if not 0.0 <= group["eps"]:
            raise ValueError(f"invalid eps {group['eps']}")
        if group["use_muon"]:
            if not 0.0 <= group["momentum"] < 1.0:
                raise ValueError(f"invalid momentum {group['momentum']}")
            if group["adjust_lr_fn"] not in ADJUST_LR_FNS:
                raise ValueError(f"adjust_lr_fn must be one of {ADJUST_LR_FNS}, got {group['adjust_lr_fn']!r}")
            if len(group["ns_coefficients"]) != 3 or int(group["ns_steps"]) < 0:
                raise ValueError("ns_coefficients must have 3 values and ns_steps must be >= 0")
            names = group.get("param_names")
            for i, p in enumerate(group["params"]):
                if p.ndim != 2:
                    name = f" {names[i]!r}" if names is not None else ""
                    raise ValueError(
                        f"Muon groups only accept 2-D parameters, but parameter{name} has "
                        f"shape {tuple(p.shape)}; put it in an AdamW group (use_muon=False)"
                    )
        else:
            b1, b2 = group["betas"]
            if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
                raise ValueError(f"invalid AdamW betas {group['betas']}")

    def __getstate__(self) -> dict[str, Any]:
        # Keep the kind defaults across pickling/deepcopy (the base class only keeps
        # defaults/state/param_groups); process groups are not picklable -> dropped.
        state = super().__getstate__()
        state["_muon_defaults"] = self._muon_defaults
        state["_adamw_defaults"] = self._adamw_defaults
        state["_distributed"] = self._distributed
        state["_cuda_graph"] = self._cuda_graph
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Unpickling fills a fresh object; load_state_dict also calls this, with only "state" and "param_groups":
        # the settings this object was built with must stay. (A recorded graph refers to its groups by identity,
        # and load_state_dict makes new group dicts, so the next step records a new one.)
        # process groups and recorded graphs are not pickled
        defaults = {"_process_group": None, "_cuda_graph": None, "_ns_graph": None, "_graph_recordings": 0}
        for key, value in defaults.items():
            if key not in state and not hasattr(self, key):
                state[key] = value
        super().__setstate__(state)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.load_state_dict``, then a check that every loaded state fits its parameter
        (momentum and AdamW moments: tensors of the parameter's shape; the AdamW step: an integer >= 0). A damaged
        or edited state fails here, naming the parameter, not inside the next step: ValueError, and the optimizer
        keeps the state it had."""
        before = {"state": self.state, "param_groups": self.param_groups}  # (torch's load replaces both objects)
        super().load_state_dict(state_dict)
        try:
            self._check_loaded_state()
        except ValueError:
            self.__setstate__(before)
            raise

    def _check_loaded_state(self) -> None:
        for g, group in enumerate(self.param_groups):
            names = group.get("param_names")
            for i, p in enumerate(group["params"]):
                state = self.state.get(p, {})
                name = repr(names[i]) if names is not None else f"{i} of group {g}"
                for key in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
                    value = state.get(key)
                    if value is not None and not torch.is_tensor(value):
                        raise ValueError(f"optimizer state {key!r} of parameter {name} is a {type(value).__name__}")
                    if value is not None and value.shape != p.shape:
                        raise ValueError(
                            f"optimizer state {key!r} of parameter {name} has shape {tuple(value.shape)}, the "
                            f"parameter {tuple(p.shape)}: the state is not this model's"
                        )
                step = state.get("step")
                if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
                    raise ValueError(f"optimizer state 'step' of parameter {name} is {step!r}, not an integer >= 0")

    # ---- step -------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """One optimisation step for all groups (AdamW groups first, then Muon)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        muon_work: list[tuple[dict[str, Any], list[Tensor], list[Tensor], list[Tensor]]] = []
        for group in self.param_groups:
            if group["use_muon"]:
                params, grads, bufs = self._muon_momentum(group)
                if params:
                    muon_work.append((group, params, grads, bufs))
            else:
                self._adamw_step(group)
        if muon_work and not self._graph_step(muon_work):
            self._muon_orthogonalise_and_apply(
                [(group, params, self._look_ahead(group, grads, bufs)) for group, params, grads, bufs in muon_work]
            )
        return loss

    def _muon_momentum(self, group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Update the momentum buffers of one Muon group; return its (params, grads, buffers) with a gradient.

        Runs on every rank for every param (element-wise, cheap) so that all ranks
        keep the complete, identical optimizer state.
        """
        params: list[Tensor] = []
        grads: list[Tensor] = []
        bufs: list[Tensor] = []
        for p in group["params"]:
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                raise RuntimeError("Muon does not support sparse gradients")
            if g.ndim != 2:  # belt and braces; add_param_group already checked p
                raise ValueError(f"Muon gradient must be 2-D, got shape {tuple(g.shape)}")
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(g)
            bufs.append(state["momentum_buffer"])
        if params:
            torch._foreach_lerp_(bufs, grads, 1.0 - group["momentum"])  # B = m*B + (1-m)*G
        return params, grads, bufs

    @staticmethod
    def _look_ahead(group: dict[str, Any], grads: list[Tensor], bufs: list[Tensor]) -> list[Tensor]:
        """The matrices to orthogonalise: ``(1-m)*G + m*B`` with Nesterov (new tensors), else the buffers."""
        if group["nesterov"]:
            return torch._foreach_lerp(grads, bufs, group["momentum"])
        return bufs  # NS never modifies its input, so handing out the buffers is safe

    def _graph_step(self, work: list[tuple[dict[str, Any], list[Tensor], list[Tensor], list[Tensor]]]) -> bool:
        """Orthogonalise and apply through the recorded CUDA graph; False when this step must run eagerly."""
        if self._cuda_graph is False:
            return False
        reason = self._graph_unavailable(work)
        if reason is not None:
            if self._cuda_graph:
                raise ValueError(f"Muon(cuda_graph=True) cannot record its step: {reason}")
            return False
        buckets, signature = self._buckets([(group, params, range(len(params))) for group, params, _, _ in work])
        if self._ns_graph is None or self._ns_graph.signature != signature:
            self._graph_recordings += 1
            if self._graph_recordings > MAX_GRAPH_RECORDINGS:  # e.g. layers that get a gradient only on some steps
                warnings.warn(
                    "Muon: the set of matrices with a gradient, or their learning-rate adjustment, changed "
                    f"{MAX_GRAPH_RECORDINGS} times, and each change records a new CUDA graph; the optimizer goes on "
                    "eagerly",
                    stacklevel=3,
                )
                self._cuda_graph, self._ns_graph = False, None
                return False
            self._ns_graph = None  # free the old graph's buffers before recording a new one
            try:
                self._ns_graph = _NewtonSchulzGraph(list(buckets.items()), signature)
            except RuntimeError as err:  # CUDA's refusal to record leaves the optimizer eager
                warnings.warn(
                    f"Muon: recording the Newton-Schulz step as a CUDA graph failed ({type(err).__name__}: {err}); "
                    "the optimizer stays eager (Muon(cuda_graph=False) skips the attempt)",
                    stacklevel=3,
                )
                self._cuda_graph = False
                return False
        graph = self._ns_graph
        for group, _, grads, bufs in work:
            inputs = graph.inputs[id(group)]
            if group["nesterov"]:
                for g, buf, slot in zip(grads, bufs, inputs):  # one pass each (a copy then a lerp_ were two)
                    torch.lerp(g, buf, group["momentum"], out=slot)  # (1-m)*G + m*B
            else:
                torch._foreach_copy_(inputs, bufs)
        graph.replay()
        for group, params, _, _ in work:
            _apply_updates(group, params, graph.outputs[id(group)], graph.scaled_for[id(group)])
        return True

    def _graph_unavailable(
        self, work: list[tuple[dict[str, Any], list[Tensor], list[Tensor], list[Tensor]]]
    ) -> str | None:
        """Why this step cannot be recorded as a CUDA graph, or None when it can."""
        if self._world()[0] != 1:
            return "the run has several processes (Newton-Schulz is sharded across them eagerly)"
        devices = {p.device for _, params, _, _ in work for p in params}
        if len(devices) != 1 or next(iter(devices)).type != "cuda":
            return f"the Muon matrices are on {', '.join(sorted(str(d) for d in devices))}, not on one CUDA device"
        return None

    @staticmethod
    def _buckets(work: list[tuple[dict[str, Any], list[Tensor], list[Any]]]) -> tuple[dict[tuple, list], tuple]:
        """Group matrices that can share one batched Newton-Schulz: same shape, dtype, device and NS settings.

        ``work`` holds ``(group, params, payloads)``; each bucket lists ``(param, payload, group)`` in
        ``param_groups`` order, which is identical on all ranks, so the bucket/ownership plan is deterministic.
        Also returns a signature of the plan (which parameters, in which buckets, with which lr adjustment).
        """
        buckets: dict[tuple, list[tuple[Tensor, Any, dict[str, Any]]]] = {}
        for group, params, payloads in work:
            ns_key = (int(group["ns_steps"]), tuple(group["ns_coefficients"]), float(group["eps"]))
            for p, payload in zip(params, payloads):
                key = (tuple(p.shape), p.dtype, p.device, ns_key)
                buckets.setdefault(key, []).append((p, payload, group))
        signature = tuple(
            (key, tuple((id(p), id(group), group["adjust_lr_fn"]) for p, _, group in items))
            for key, items in buckets.items()
        )
        return buckets, signature

    def _world(self) -> tuple[int, int, Any]:
        """(world_size, rank, group) used for sharding Newton-Schulz."""
        if self._distributed is False:
            return 1, 0, None
        if not (dist.is_available() and dist.is_initialized()):
            if self._distributed:
                raise RuntimeError("Muon(distributed=True) but torch.distributed is not initialised")
            return 1, 0, None
        pg = self._process_group
        return dist.get_world_size(pg), dist.get_rank(pg), pg

    def _muon_orthogonalise_and_apply(self, work: list[tuple[dict[str, Any], list[Tensor], list[Tensor]]]) -> None:
        world, rank, pg = self._world()

        buckets, _ = self._buckets(work)
        scaled_for = {id(group): _scaled_for(group) for group, _, _ in work}

        if world == 1:
            for (shape, dtype, device, ns_settings), items in buckets.items():
                inputs = torch.stack([u for _, u, _ in items])  # [n, rows, cols]
                factors = _bucket_factors(items, shape, device, scaled_for)
                outputs = _orthogonalise_bucket(inputs, factors, ns_settings, out=torch.empty_like(inputs))
                self._apply_bucket(items, outputs.unbind(0), scaled_for)
            return

        if _all_gather_flat is None:  # pragma: no cover - very old torch
            raise RuntimeError("this torch.distributed has no all_gather_into_tensor")
        # Round robin over a *global* counter (not restarting per bucket) so that many
        # small buckets do not all land on rank 0.  Item i of a bucket starting at
        # global position `offset` belongs to rank (offset + i) % world.
        pending = []
        offset = 0
        for key, items in buckets.items():
            shape, (ns_steps, coeffs, eps) = key[0], key[3]
            n = len(items)
            per_rank = -(-n // world)  # ceil: every rank sends the same-size block
            device = key[2]
            factors = _bucket_factors(items, shape, device, scaled_for)
            # One shared factor goes inside the last product, as on one process; several are applied after the
            # gather, in fp32 (`_orthogonalise_bucket`): every rank applies the numbers one process would.
            scale = factors if isinstance(factors, float) else 1.0
            ns_dtype = ns_output_dtype(device)  # what zeropower_via_newtonschulz returns on this device
            send = torch.zeros((per_rank, *shape), dtype=ns_dtype, device=device)
            mine = items[(rank - offset) % world :: world]
            if mine:
                send[: len(mine)] = zeropower_via_newtonschulz(
                    torch.stack([u for _, u, _ in mine]), ns_steps, coeffs, eps, scale=scale
                )
            recv = torch.empty((world * per_rank, *shape), dtype=ns_dtype, device=device)
            # Async: on NCCL the gather of this bucket overlaps the next bucket's NS.
            handle = _all_gather_flat(recv, send, group=pg, async_op=True)
            pending.append((key, items, offset, per_rank, recv, handle, factors))
            offset += n

        for key, items, start, per_rank, recv, handle, factors in pending:
            handle.wait()
            # recv is owner-major: rows [owner*per_rank, (owner+1)*per_rank) are that
            # owner's matrices in bucket order.  Map them back to bucket positions.
            order = [0] * len(items)
            for owner in range(world):
                first = (owner - start) % world
                for j, idx in enumerate(range(first, len(items), world)):
                    order[idx] = owner * per_rank + j
            rows = recv[order]  # [n, rows, cols] in bucket order
            if isinstance(factors, float):
                updates = rows.to(dtype=key[1])
            else:
                updates = torch.mul(rows, factors, out=torch.empty(rows.shape, dtype=key[1], device=rows.device))
            self._apply_bucket(items, updates.unbind(0), scaled_for)

    @staticmethod
    def _apply_bucket(
        items: list[tuple[Tensor, Tensor, dict[str, Any]]],
        updates: Sequence[Tensor],
        scaled_for: dict[int, float | None],
    ) -> None:
        """`_apply_updates` for one shape bucket: ``updates`` in bucket order, each its matrix's ``factor * O``
        (`_update_factor`; `scaled_for`: each group's, by ``id``)."""
        by_group: dict[int, tuple[dict[str, Any], list[Tensor], list[Tensor]]] = {}
        for (p, _, group), u in zip(items, updates):
            entry = by_group.setdefault(id(group), (group, [], []))
            entry[1].append(p)
            entry[2].append(u)
        for group, params, group_updates in by_group.values():
            _apply_updates(group, params, group_updates, scaled_for[id(group)])

    def _adamw_step(self, group: dict[str, Any]) -> None:
        """AdamW for one group: torch's fused kernel for the tensors it takes (`_fused_adamw_takes`), the foreach
        path for the others; same arithmetic as torch.optim.AdamW."""
        params: list[Tensor] = []
        grads: list[Tensor] = []
        exp_avgs: list[Tensor] = []
        exp_avg_sqs: list[Tensor] = []
        steps: list[int] = []
        for p in group["params"]:
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                raise RuntimeError("AdamW groups do not support sparse gradients")
            state = self.state[p]
            if not state:
                # "step" is a plain int: no per-param tensor increment each step.
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            params.append(p)
            grads.append(g)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        # Each parameter's update depends only on its own device and dtype (as in torch's fused AdamW, which groups
        # by them): the fused kernel's share, then the foreach path for the rest.
        fused: dict[tuple, list[int]] = {}
        rest: list[int] = []
        for i, (p, g) in enumerate(zip(params, grads)):
            if _fused_adamw_takes([p], [g]):
                fused.setdefault((p.device, p.dtype, steps[i]), []).append(i)
            else:
                rest.append(i)
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        for (device, _, count), chosen in fused.items():
            # torch's fused AdamW kernel (what torch.optim.AdamW(fused=True) calls): one pass over each tensor
            # instead of the foreach path's eight. It reads the step count from a tensor.
            step_count = torch.full((), float(count), dtype=torch.float32, device=device)
            torch._fused_adamw_(
                [params[i] for i in chosen],
                [grads[i] for i in chosen],
                [exp_avgs[i] for i in chosen],
                [exp_avg_sqs[i] for i in chosen],
                [],
                [step_count] * len(chosen),
                lr=lr,
                beta1=beta1,
                beta2=beta2,
                weight_decay=wd,
                eps=eps,
                amsgrad=False,
                maximize=False,
            )
        if rest:
            self._adamw_foreach(
                group,
                [params[i] for i in rest],
                [grads[i] for i in rest],
                [exp_avgs[i] for i in rest],
                [exp_avg_sqs[i] for i in rest],
                [steps[i] for i in rest],
            )

    @staticmethod
    def _adamw_foreach(
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor],
        exp_avg_sqs: list[Tensor],
        steps: list[int],
    ) -> None:
        """AdamW with foreach kernels, the steps already counted: bitwise torch.optim.AdamW(foreach=False) on CPUs."""
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        if wd != 0:
            torch._foreach_mul_(params, 1.0 - lr * wd)
        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
        denom = torch._foreach_sqrt(exp_avg_sqs)
        if all(s == steps[0] for s in steps):  # usual case: one scalar for the group
            bc2_sqrt = (1.0 - beta2 ** steps[0]) ** 0.5
            step_size = lr / (1.0 - beta1 ** steps[0])
            torch._foreach_div_(denom, bc2_sqrt)
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(params, exp_avgs, denom, -step_size)
        else:  # some params skipped steps (grad None) -> per-param bias correction
            torch._foreach_div_(denom, [(1.0 - beta2**s) ** 0.5 for s in steps])
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(params, exp_avgs, denom, [-lr / (1.0 - beta1**s) for s in steps])
