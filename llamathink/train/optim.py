"""Optimizer construction for LlamaThink training: which parameters Muon trains (routing by name), the optimizer
object, and the learning-rate schedule.

`llamathink.muon.Muon` is a general optimizer (Muon for param groups flagged `use_muon`, AdamW for the others);
this module decides, from LlamaThink's parameter names, which tensor goes to which group.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

from torch import Tensor, nn

from ..muon import Muon
from .config import RunConfig

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------------------
# Parameter routing (LlamaThink's names; works for any model that uses them)
# --------------------------------------------------------------------------------------------------------------
MUON = "muon"
ADAMW_DECAY = "adamw_decay"
ADAMW_NO_DECAY = "adamw_no_decay"

# Hidden matrices live inside the decoder stack: "...layers.<i>....".
_IN_DECODER_LAYER = re.compile(r"(?:^|\.)layers\.\d+\.")
# 2-D matrices inside decoder layers that must NOT use Muon.  in_proj_a / in_proj_b of
# the Gated DeltaNet produce one scalar per head ([num_heads=9, 576]): they feed the
# decay / beta gates, not a hidden representation.  Orthogonalisation makes every one of
# their 9 singular values ~1 and the "original" shape scale then gives them an update
# as large as a 576x576 matrix's - a far too big step for a 9-row gate (known defect of
# the original LlamaThink training setup).  AdamW's per-entry step suits them.
ADAMW_MATRIX_SUFFIXES: tuple[str, ...] = ("in_proj_a.weight", "in_proj_b.weight")
_SCALE_LEAVES = ("A_log", "dt_bias")
# Name parts PEFT puts between a wrapped module and its tensors ("...in_proj_a.lora_B.default.weight",
# "...q_proj.base_layer.weight"): the routing by module name looks through them.
_PEFT_PARTS = frozenset(
    ("base_layer", "lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
    + ("modules_to_save", "original_module")
)


def module_weight_name(name: str) -> str:
    """The name a parameter's module weight has without PEFT's wrapping: ``"...in_proj_a.lora_B.default.weight"``
    -> ``"...in_proj_a.weight"``; other names are returned as they are."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in _PEFT_PARTS:
            return ".".join([*parts[:i], "weight"])
    return name


def classify_parameter(name: str, param: Tensor, extra_adamw_suffixes: Sequence[str] = ()) -> tuple[str, str]:
    """Return ``(group, reason)`` for one named parameter.

    ``group`` is ``"muon"``, ``"adamw_decay"`` or ``"adamw_no_decay"``.  Rules, in order:

    1. Norm gains (``*norm.weight``/``*norm.bias``: input/post-attention layernorms,
       final norm, GDN output norm, ``q_norm``/``k_norm``), hyper-connection scales
       (``*_residual_scale``, ``*_sublayer_scale``), ``A_log``, ``dt_bias``, biases and
       any other tensor with < 2 dims -> AdamW **without** weight decay: their natural
       value is not 0 (gains ~1, ``A_log`` sets the decay rates), so decaying them
       towards 0 only biases the model; they are also tiny.
    2. ``embed_tokens`` / ``lm_head`` -> AdamW with decay: embeddings are lookup tables
       (only the rows of seen tokens get gradient), the head is the output layer; the
       Muon authors recommend AdamW for both.
    3. Tensors with > 2 dims (``conv1d.weight`` [C, 1, K], depthwise filters, not a
       linear map between hidden spaces) -> AdamW with decay.
    4. The tiny gate projections ``in_proj_a/in_proj_b`` (+ ``extra_adamw_suffixes``)
       -> AdamW with decay (see ``ADAMW_MATRIX_SUFFIXES``); with PEFT, their LoRA matrices too
       (suffixes are matched on :func:`module_weight_name`).
    5. Other 2-D weights inside decoder layers (``layers.<i>.``): attention, GDN and
       MLP projections -> Muon (with decay).
    6. Any other 2-D tensor (outside the decoder stack) -> AdamW with decay, to be safe.
    """
    parts = name.split(".")
    leaf = parts[-1]
    module = parts[-2] if len(parts) > 1 else ""
    if module.endswith("norm") and leaf in ("weight", "bias"):
        return ADAMW_NO_DECAY, "norm gain"
    if leaf.endswith("_residual_scale") or leaf.endswith("_sublayer_scale"):
        return ADAMW_NO_DECAY, "hyper-connection scale"
    if leaf in _SCALE_LEAVES:
        return ADAMW_NO_DECAY, "GDN decay parameter"
    if leaf == "bias":
        return ADAMW_NO_DECAY, "bias"
    if param.ndim < 2:
        return ADAMW_NO_DECAY, "non-matrix (<2-D)"
    if "embed_tokens" in parts or "lm_head" in parts:
        return ADAMW_DECAY, "embedding / lm_head"
    if param.ndim > 2:
        return ADAMW_DECAY, "conv / >2-D"
    if any(module_weight_name(name).endswith(s) for s in (*ADAMW_MATRIX_SUFFIXES, *extra_adamw_suffixes)):
        return ADAMW_DECAY, "tiny gate projection"
    if _IN_DECODER_LAYER.search(name):
        return MUON, "hidden matrix"
    return ADAMW_DECAY, "2-D outside decoder layers"


def muon_param_groups(
    model: nn.Module,
    muon_lr: float = 0.02,
    adamw_lr: float = 0.002,
    weight_decay: float = 0.01,
    *,
    muon_weight_decay: float | None = None,
    extra_adamw_suffixes: Sequence[str] = (),
    log: bool = True,
) -> list[dict[str, Any]]:
    """Route the trainable parameters of ``model`` into param groups for :class:`Muon`.

    Returns up to three groups (empty ones are dropped), each with keys ``params``,
    ``param_names``, ``name`` (``"muon"``, ``"adamw_decay"``, ``"adamw_no_decay"``),
    ``use_muon``, ``lr`` and ``weight_decay``; see :func:`classify_parameter` for the
    rules.  Weight decay (``weight_decay``, or ``muon_weight_decay`` for the Muon
    group) is applied to matrices and embeddings; 1-D params (norms, scales,
    ``A_log``, ``dt_bias``, biases) get none.  Params with ``requires_grad=False`` are
    ignored, and a tied tensor (``lm_head.weight`` is ``model.embed_tokens.weight``)
    appears exactly once.  Logs a summary (see :func:`summarize_param_groups`) at INFO.

    Raises TypeError when ``extra_adamw_suffixes`` is a bare string, ValueError when one of them is empty or
    matches no trainable 2-D parameter (a typo would otherwise leave the routing silently unchanged).
    """
    if isinstance(extra_adamw_suffixes, str):  # one suffix, not its characters
        raise TypeError(
            f"extra_adamw_suffixes must be a sequence of name suffixes, got the string {extra_adamw_suffixes!r}"
        )
    extra_adamw_suffixes = tuple(extra_adamw_suffixes)  # (a generator would be used up by the first check)
    if any(not isinstance(s, str) or not s for s in extra_adamw_suffixes):  # "" would match every name
        raise ValueError(
            f"extra_adamw_suffixes must be non-empty parameter-name suffixes, got {list(extra_adamw_suffixes)!r}"
        )
    buckets: dict[str, tuple[list[Tensor], list[str]]] = {
        MUON: ([], []),
        ADAMW_DECAY: ([], []),
        ADAMW_NO_DECAY: ([], []),
    }
    seen: set[int] = set()
    # named_parameters() already drops duplicates (tied weights keep the first name);
    # the id check makes that explicit and independent of remove_duplicate defaults.
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        kind, _ = classify_parameter(name, p, extra_adamw_suffixes)
        buckets[kind][0].append(p)
        buckets[kind][1].append(name)

    routed = [module_weight_name(name) for name in buckets[ADAMW_DECAY][1]]
    unmatched = [s for s in extra_adamw_suffixes if not any(name.endswith(s) for name in routed)]
    if unmatched:
        frozen = [
            s
            for s in unmatched
            if any(module_weight_name(n).endswith(s) and not p.requires_grad for n, p in model.named_parameters())
        ]
        raise ValueError(
            f"extra_adamw_suffixes {unmatched} match no trainable 2-D parameter of the model"
            + (f" ({frozen} match only frozen ones)" if frozen else "")
        )
    settings = {
        MUON: (True, muon_lr, weight_decay if muon_weight_decay is None else muon_weight_decay),
        ADAMW_DECAY: (False, adamw_lr, weight_decay),
        ADAMW_NO_DECAY: (False, adamw_lr, 0.0),
    }
    groups = []
    for kind, (params, names) in buckets.items():
        if not params:
            continue
        use_muon, lr, wd = settings[kind]
        groups.append(
            {
                "params": params,
                "param_names": names,
                "name": kind,
                "use_muon": use_muon,
                "lr": lr,
                "weight_decay": wd,
            }
        )
    if log:
        summary = summarize_param_groups(groups)
        logger.info(
            "Muon param groups: %s",
            ", ".join(f"{k}: {v['tensors']} tensors / {v['params']:,} params" for k, v in summary.items()),
        )
    return groups


def summarize_param_groups(groups: Iterable[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """``{group name: {"tensors": count, "params": numel}}`` for param-group dicts."""
    out: dict[str, dict[str, int]] = {}
    for i, g in enumerate(groups):
        key = g.get("name", f"group{i}")
        out[key] = {"tensors": len(g["params"]), "params": sum(p.numel() for p in g["params"])}
    return out


# --------------------------------------------------------------------------------------------------------------
# The optimizer and the schedule of a run
# --------------------------------------------------------------------------------------------------------------


def build_optimizer(model: nn.Module, cfg: RunConfig, extra_adamw_suffixes: Sequence[str] = ()) -> Muon:
    """One optimizer object either way, so checkpoints and schedules treat both recipes alike. With
    `cfg.optimizer` "adamw" the hidden matrices Muon would train are AdamW's group "adamw_matrices".
    `extra_adamw_suffixes`: more 2-D parameters (by name suffix) for AdamW instead of Muon (`classify_parameter`).
    `cfg.muon_cuda_graph` false keeps Muon's step eager (true: recorded as a CUDA graph where it can be)."""
    route = {"extra_adamw_suffixes": extra_adamw_suffixes, "log": False}  # (checked by muon_param_groups)
    if cfg.optimizer == "muon":
        groups = muon_param_groups(model, cfg.muon_lr, cfg.adamw_lr, cfg.weight_decay, **route)
    else:  # the AdamW baseline: the same routing of decay / no-decay, no Muon group
        groups = muon_param_groups(model, cfg.adamw_lr, cfg.adamw_lr, cfg.weight_decay, **route)
        for group in groups:
            group["use_muon"] = False
            if group.get("name") == MUON:  # (named for what trains it: the run's summary lists the groups)
                group["name"] = "adamw_matrices"
    return Muon(
        groups,
        lr=cfg.muon_lr,
        adjust_lr_fn=cfg.muon_adjust_lr,
        weight_decay=cfg.weight_decay,
        adamw_lr=cfg.adamw_lr,
        adamw_betas=cfg.adamw_betas,
        cuda_graph=None if cfg.muon_cuda_graph else False,
    )


def lr_factor(step: int, cfg: RunConfig) -> float:
    """Linear warmup over `warmup_steps`, then cosine from 1 to `min_lr_ratio` at `max_steps`."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
