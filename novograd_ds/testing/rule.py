"""The NovoGrad update rule in float64, written independently of the implementation (the tests' oracle).

It mirrors the rule in the README line by line, on plain tensors, one layer at a time, with Python state.
`RuleOptimizer` drives it over a list of parameters that may skip steps. It imports nothing from novograd_ds
(no backend, no kernel, not even the optimizer's step factors): keep it that way, or it stops being a check.
Used by the tests (tests/rule.py re-exports it) and by ``python -m novograd_ds.env --check``.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def rule_step(w, g, st, *, lr, b1, b2, eps, wd, grad_averaging, amsgrad, decoupled):
    """One update of one layer. w, g: float64 tensors; st: dict with k, v, vmax, m. Returns the new w."""
    st["k"] = k = st.get("k", 0) + 1
    n = float((g * g).sum())
    v = n if k == 1 else b2 * st["v"] + (1 - b2) * n
    st["v"] = v
    if amsgrad:
        st["vmax"] = v if k == 1 else max(st["vmax"], v)
        v_used = st["vmax"]
    else:
        v_used = v
    gh = g / (math.sqrt(v_used) + eps)
    if not decoupled:
        gh = gh + wd * w
    if k == 1:
        m = gh
    else:
        c = (1 - b1) if grad_averaging else 1.0
        m = b1 * st["m"] + c * gh
    st["m"] = m
    if decoupled:
        return w - lr * (m + wd * w)
    return w - lr * m


class RuleOptimizer:
    """Float64 rule over named layers. `round_to` emulates storage of w and m in a low-precision dtype.

    ``state_bits=8`` keeps m of layers with at least 4096 elements in 8 bits (rule_step_8bit) with ``q8`` =
    dict(qmap=..., rounding=..., seed=...); layer i's stochastic-rounding key is ``keys[i]`` (default i).
    """

    def __init__(self, params, *, round_to=None, state_bits=32, q8=None, keys=None, **hp):
        self.w = [p.detach().to(torch.float64).clone() for p in params]
        self.state = [dict() for _ in params]
        self.hp = hp
        self.round_to = round_to
        if state_bits not in (8, 32):
            raise ValueError(f"state_bits must be 8 or 32, got {state_bits}")
        self.state_bits = state_bits
        self.q8 = dict(q8 or {})
        self.keys = list(keys) if keys is not None else list(range(len(self.w)))

    def quantized(self, i) -> bool:
        return self.state_bits == 8 and self.w[i].numel() >= Q8_MIN_NUMEL

    def step(self, grads):
        for i, g in enumerate(grads):
            if g is None:
                continue
            if self.quantized(i):
                self.w[i] = rule_step_8bit(self.w[i], g.to(torch.float64), self.state[i], key=self.keys[i],
                                           **self.q8, **self.hp)
                continue
            w = rule_step(self.w[i], g.to(torch.float64), self.state[i], **self.hp)
            if self.round_to is not None:
                w = w.to(self.round_to).to(torch.float64)
                self.state[i]["m"] = self.state[i]["m"].to(self.round_to).to(torch.float64)
            self.w[i] = w


# -- the 8-bit form (NOTE: [8-bit moment] in novograd_ds/kernels/eightbit.py), written again from its spec ----------
# m is kept as int8-valued codes and one scale per block of 256 elements of the layer; layers under 4096 elements
# keep a full-precision m. Everything is float64 here: dequantise, update, the block maxima, quantise.
Q8_BLOCK, Q8_MIN_NUMEL, Q8_QMAX = 256, 4096, 127


def _mix32(x):
    """The stochastic-rounding hash on numpy uint64 arrays holding 32-bit values (wrapping products, masked)."""
    m = np.uint64(0xFFFFFFFF)
    x = x ^ (x >> np.uint64(16))
    x = (x * np.uint64(0x21F0AAAD)) & m
    x = x ^ (x >> np.uint64(15))
    x = (x * np.uint64(0x735A2D97)) & m
    return x ^ (x >> np.uint64(15))


def rule_uniform(seed: int, key: int, step: int, index: np.ndarray) -> np.ndarray:
    """u in (0, 1) for layer elements ``index`` (int64): byte ``index % 4`` of the hash of (seed, key, step,
    index // 4), as (byte + 0.5) / 256."""
    mask = 0xFFFFFFFF
    one = lambda v: int(_mix32(np.array([v & mask], dtype=np.uint64))[0])
    base = one(one(one(step) ^ (key & mask)) ^ (seed & mask))
    idx = index.astype(np.uint64)
    word = idx // np.uint64(4)
    ib = _mix32(np.uint64(base) ^ (word >> np.uint64(32)))
    h = _mix32(ib ^ (word & np.uint64(mask)))
    byte = (h >> (np.uint64(8) * (idx % np.uint64(4)))) & np.uint64(255)
    return (byte.astype(np.float64) + 0.5) / 256.0


def rule_dequantize(codes, scales, qmap):
    """float64 m of int codes (numpy int array) with per-block scales (float64, one per 256 elements)."""
    a = np.repeat(np.asarray(scales, dtype=np.float64), Q8_BLOCK)[: len(codes)]
    q = np.asarray(codes, dtype=np.float64)
    if qmap == "linear":
        return q * a / Q8_QMAX
    return q * np.abs(q) * a / (Q8_QMAX * Q8_QMAX)


def rule_quantize(m, qmap, rounding, u=None):
    """(codes, scales) of float64 m (numpy), blocks of 256 from element 0: scale = max |m| of the block."""
    n = len(m)
    nb = -(-n // Q8_BLOCK)
    padded = np.zeros(nb * Q8_BLOCK)
    padded[:n] = np.abs(m)
    scales = padded.reshape(nb, Q8_BLOCK).max(axis=1)
    a = np.repeat(scales, Q8_BLOCK)[:n]
    safe = np.where(a > 0, a, 1.0)
    if qmap == "linear":
        t = np.where(a > 0, m / safe * Q8_QMAX, 0.0)
        q = np.rint(t) if rounding == "nearest" else np.floor(t + u)
        return np.clip(q, -Q8_QMAX, Q8_QMAX).astype(np.int64), scales
    t = np.where(a > 0, np.abs(m) / safe * (Q8_QMAX * Q8_QMAX), 0.0)
    k = np.floor(np.sqrt(t))
    k = np.where(k * k > t, k - 1, np.where((k + 1) ** 2 <= t, k + 1, k))  # exactly floor(sqrt(t))
    r = t - k * k
    up = (r >= k + 0.5) if rounding == "nearest" else (u * (2 * k + 1) < r)
    qm = np.minimum(k + up, Q8_QMAX)
    return np.where(m < 0, -qm, qm).astype(np.int64), scales


def rule_step_8bit(w, g, st, *, lr, b1, b2, eps, wd, grad_averaging, amsgrad, decoupled, qmap, rounding, seed, key):
    """rule_step with m stored in 8 bits (st holds k, v, vmax, codes, scales). w, g: float64 tensors of one layer
    (flattened here, whole: blocks start at its element 0). Returns the new w; m is updated from the float64 m_new
    and only its codes and scales are kept."""
    shape = w.shape
    w = w.reshape(-1).numpy()
    g = g.reshape(-1).numpy()
    st["k"] = k = st.get("k", 0) + 1
    n = float((g * g).sum())
    v = n if k == 1 else b2 * st["v"] + (1 - b2) * n
    st["v"] = v
    if amsgrad:
        st["vmax"] = v if k == 1 else max(st["vmax"], v)
        v = st["vmax"]
    gh = g / (math.sqrt(v) + eps)
    if not decoupled:
        gh = gh + wd * w
    if k == 1:
        m = gh
    else:
        c = (1 - b1) if grad_averaging else 1.0
        m = b1 * rule_dequantize(st["codes"], st["scales"], qmap) + c * gh
    u = rule_uniform(seed, key, k, np.arange(len(m), dtype=np.int64)) if rounding == "stochastic" else None
    st["codes"], st["scales"] = rule_quantize(m, qmap, rounding, u)
    st["m"] = m  # the unquantised m_new, for measurements
    w_new = w - lr * (m + wd * w) if decoupled else w - lr * m
    return torch.from_numpy(w_new).reshape(shape)
