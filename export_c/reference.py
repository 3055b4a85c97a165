"""Plain numpy (float64) reference of the LlamaThink forward pass, written straight from the
semantics in export_c/README.md.  Used by tests to check run.c independently of the PyTorch
model, and to build small random checkpoints (make_random_checkpoint) when no model is around.
"""

from __future__ import annotations

import json
import os

import numpy as np

from .export import DEFAULTS, derived, expected_shapes


def _rms(x, w1, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w1


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _softplus(x):
    return np.where(x > 20, x, np.log1p(np.exp(np.minimum(x, 20))))


def _rope(x, pos, R, theta):
    """x [..., T, n, D] rotated at positions pos [T] (rotate-half on the first R dims)."""
    if R == 0:
        return x
    half = R // 2
    inv = 1.0 / theta ** (np.arange(0, R, 2, dtype=np.float64) / R)
    ang = np.asarray(pos, dtype=np.float64)[:, None] * inv[None, :]  # [T, half]
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    y = x.copy()
    x1, x2 = x[..., :half], x[..., half:R]
    y[..., :half] = x1 * c - x2 * s
    y[..., half:R] = x2 * c + x1 * s
    return y


def _softmax_attend(q, k, v, mask):
    """q [T,D], k [S,D], v [S,D], mask [T,S] bool."""
    sc = q @ k.T / np.sqrt(q.shape[-1])
    sc = np.where(mask, sc, -np.inf)
    mx = sc.max(axis=1, keepdims=True)
    mx = np.where(np.isfinite(mx), mx, 0.0)
    p = np.exp(sc - mx)
    p = np.where(mask, p, 0.0)
    den = p.sum(axis=1, keepdims=True)
    out = (p @ v) / np.where(den > 0, den, 1.0)
    return np.where(den > 0, out, 0.0)


def forward(cfg: dict, W: dict, ids) -> np.ndarray:
    """Logits [T, V] (float64) for token ids at positions 0..T-1.  Raises ValueError for a mixer
    type it does not know (each known type has its own branch below)."""
    c = dict(DEFAULTS)
    c.update(cfg)
    d = derived(c)
    W = {k: np.asarray(v, dtype=np.float64) for k, v in W.items()}
    T = len(ids)
    eps, H = c["rms_norm_eps"], c["hidden_size"]
    D, Hq, Hkv = c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"]
    R, theta = d["R"], c["rope_theta"]
    pos = np.arange(T)
    h = W["model.embed_tokens.weight"][np.asarray(ids)]
    for i, kind in enumerate(c["mixer_types"]):
        p = f"model.layers.{i}."
        m = p + "mixer."
        x = _rms(h, 1 + W[p + "input_layernorm.weight"], eps)
        if kind == "linear":
            Hk, Hv = c["linear_num_key_heads"], c["linear_num_value_heads"]
            Dk, Dv, K = c["linear_key_head_dim"], c["linear_value_head_dim"], c["linear_conv_kernel_dim"]
            qkv = x @ W[m + "in_proj_qkv.weight"].T  # [T, C]
            cw = W[m + "conv1d.weight"][:, 0, :]  # [C, K]
            pad = np.concatenate([np.zeros((K - 1, qkv.shape[1])), qkv], 0)
            u = np.zeros_like(qkv)
            for j in range(K):
                u += cw[:, j] * pad[j : j + T]
            u = _silu(u)
            q = u[:, : Hk * Dk].reshape(T, Hk, Dk)
            k = u[:, Hk * Dk : 2 * Hk * Dk].reshape(T, Hk, Dk)
            v = u[:, 2 * Hk * Dk :].reshape(T, Hv, Dv)
            q = q / np.sqrt((q * q).sum(-1, keepdims=True) + 1e-6) / np.sqrt(Dk)
            k = k / np.sqrt((k * k).sum(-1, keepdims=True) + 1e-6)
            rep = Hv // Hk
            beta = _sigmoid(x @ W[m + "in_proj_b.weight"].T)  # [T, Hv]
            g = -np.exp(W[m + "A_log"]) * _softplus(x @ W[m + "in_proj_a.weight"].T + W[m + "dt_bias"])
            z = (x @ W[m + "in_proj_z.weight"].T).reshape(T, Hv, Dv)
            o = np.zeros((T, Hv, Dv))
            for hh in range(Hv):
                S = np.zeros((Dk, Dv))
                kh = hh // rep
                for t in range(T):
                    S = np.exp(g[t, hh]) * S
                    kv = S.T @ k[t, kh]
                    delta = beta[t, hh] * (v[t, hh] - kv)
                    S = S + np.outer(k[t, kh], delta)
                    o[t, hh] = S.T @ q[t, kh]
            o = o / np.sqrt((o * o).mean(-1, keepdims=True) + eps) * W[m + "norm.weight"] * _silu(z)
            y = o.reshape(T, Hv * Dv) @ W[m + "out_proj.weight"].T
        elif kind in ("full", "csa"):
            qg = (x @ W[m + "q_proj.weight"].T).reshape(T, Hq, 2 * D)
            q, gate = qg[..., :D], qg[..., D:]
            q = _rms(q, 1 + W[m + "q_norm.weight"], eps)
            kr = _rms((x @ W[m + "k_proj.weight"].T).reshape(T, Hkv, D), 1 + W[m + "k_norm.weight"], eps)
            v = (x @ W[m + "v_proj.weight"].T).reshape(T, Hkv, D)
            q = _rope(q, pos, R, theta)
            k = _rope(kr, pos, R, theta)
            rep = Hq // Hkv
            tt, ss = np.meshgrid(pos, pos, indexing="ij")
            if kind == "full":
                mask = ss <= tt
            else:
                mask = (ss <= tt) & (ss > tt - c["csa_window"])
            loc = np.zeros((T, Hq, D))
            for hh in range(Hq):
                loc[:, hh] = _softmax_attend(q[:, hh], k[:, hh // rep], v[:, hh // rep], mask)
            if kind == "full":
                o = loc
            else:
                S_ = c["csa_stride"]
                nb = T // S_
                comp = np.zeros((T, Hq, D))
                if nb > 0:
                    km = kr[: nb * S_].reshape(nb, S_, Hkv * D).mean(1)
                    vm = v[: nb * S_].reshape(nb, S_, Hkv * D).mean(1)
                    kc = (km @ W[m + "compress_k.weight"].T).reshape(nb, Hkv, D)
                    vc = (vm @ W[m + "compress_v.weight"].T).reshape(nb, Hkv, D)
                    kc = _rope(kc, np.arange(nb) * S_ + S_ // 2, R, theta)
                    jj = np.arange(nb)
                    cmask = (jj[None, :] + 1) * S_ <= pos[:, None]
                    for hh in range(Hq):
                        comp[:, hh] = _softmax_attend(q[:, hh], kc[:, hh // rep], vc[:, hh // rep], cmask)
                blend_logit = x @ W[m + "blend_proj.weight"].T + W.get(m + "blend_proj.bias", 0.0)
                blend = _sigmoid(blend_logit).reshape(T, Hq, D)
                o = blend * comp + (1 - blend) * loc
            o = o * _sigmoid(gate)
            y = o.reshape(T, Hq * D) @ W[m + "o_proj.weight"].T
        else:
            raise ValueError(f"mixer_types[{i}]={kind!r}: the numpy reference has no branch for this mixer type")
        if c["hyper_connections"]:
            h = (1 + W[p + "mixer_residual_scale"]) * h + (1 + W[p + "mixer_sublayer_scale"]) * y
        else:
            h = h + y
        x = _rms(h, 1 + W[p + "post_attention_layernorm.weight"], eps)
        y = (_silu(x @ W[p + "mlp.gate_proj.weight"].T) * (x @ W[p + "mlp.up_proj.weight"].T)) @ W[
            p + "mlp.down_proj.weight"
        ].T
        if c["hyper_connections"]:
            h = (1 + W[p + "mlp_residual_scale"]) * h + (1 + W[p + "mlp_sublayer_scale"]) * y
        else:
            h = h + y
    x = _rms(h, 1 + W["model.norm.weight"], eps)
    E = W["model.embed_tokens.weight"] if c["tie_word_embeddings"] else W["lm_head.weight"]
    return x @ E.T


def random_tensors(cfg: dict, seed: int = 0, scale: float = 1.0) -> dict:
    """Random float32 tensors of every expected name, with non-trivial norms and scales."""
    c = dict(DEFAULTS)
    c.update(cfg)
    rng = np.random.default_rng(seed)
    out = {}
    for name, shp in expected_shapes(c).items():
        if name.endswith("A_log"):
            a = np.log(rng.uniform(1, 16, shp))
        elif name.endswith("dt_bias"):
            a = rng.uniform(-1, 1.5, shp)
        elif name.endswith("conv1d.weight"):
            a = rng.normal(0, 0.5, shp)
        elif name.endswith("mixer.norm.weight"):
            a = rng.uniform(0.5, 1.5, shp)
        elif len(shp) == 1:  # (1+w) norms and hyper-connection scales
            a = rng.normal(0, 0.2, shp)
        elif "embed_tokens" in name or name == "lm_head.weight":
            a = rng.normal(0, 1.0, shp)
        else:
            a = rng.normal(0, scale / np.sqrt(shp[-1]), shp)
        out[name] = a.astype(np.float32)
    return out


def make_random_checkpoint(d: str, cfg: dict, seed: int = 0, dtype: str = "float32") -> dict:
    """Write config.json + model.safetensors for a random model (no PyTorch model needed)."""
    from safetensors.numpy import save_file

    os.makedirs(d, exist_ok=True)
    c = dict(DEFAULTS)
    c.update(cfg)
    W = random_tensors(c, seed)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(dict(c, model_type="llamathink"), f, indent=1)
    save_file(W, os.path.join(d, "model.safetensors"))
    return W
