"""The NovoGrad update rule in float64, written independently of the implementation (the tests' oracle).

It mirrors the rule in the README line by line, on plain tensors, one layer at a time, with Python state.
`RuleOptimizer` drives it over a list of parameters that may skip steps. It imports nothing from novograd_ds
(no backend, no kernel, not even the optimizer's step factors): keep it that way, or it stops being a check.
Used by the tests (tests/rule.py re-exports it) and by ``python -m novograd_ds.env --check``.
"""

from __future__ import annotations

import math

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
    """Float64 rule over named layers. `round_to` emulates storage of w and m in a low-precision dtype."""

    def __init__(self, params, *, round_to=None, **hp):
        self.w = [p.detach().to(torch.float64).clone() for p in params]
        self.state = [dict() for _ in params]
        self.hp = hp
        self.round_to = round_to

    def step(self, grads):
        for i, g in enumerate(grads):
            if g is None:
                continue
            w = rule_step(self.w[i], g.to(torch.float64), self.state[i], **self.hp)
            if self.round_to is not None:
                w = w.to(self.round_to).to(torch.float64)
                self.state[i]["m"] = self.state[i]["m"].to(self.round_to).to(torch.float64)
            self.w[i] = w
