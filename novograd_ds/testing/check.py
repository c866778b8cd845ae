"""``python -m novograd_ds.env --check``: every usable backend on every visible device against the float64 rule.

Backends: ``reference`` and ``foreach`` on every device, ``fused-cpu`` on the CPU, ``fused-cuda`` on each visible
GPU (each when it can be loaded; otherwise a SKIP line says why). Each backend is driven through the kernel seam
(NOTE: [the kernel seam]) the way the optimizer drives it, for three steps (a first step, then later ones), and
compared after every step with :func:`novograd_ds.testing.rule.rule_step` in float64 on the same gradients:

* every flag combination of the rule: weight decay 0 / 0.01, decoupled, grad_averaging, amsgrad, beta2 0.98 / 0;
* every gradient dtype the backend takes: fp32, bf16 and fp16 gradients of fp32 parameters (and fp64 for the
  PyTorch backends);
* the list form (one tensor per layer; sizes 1, 7, 1003 and 70001, across a 64K chunk), the two-pass list form
  where a backend also has the one-call layer step (the fused CPU op), and the segment form (a flat tensor cut
  into (offset, length, layer) segments: a layer in two segments, a zero-length entry, gaps, a segment that is the
  flat's tail, a layer without segments);
* on a GPU also both forms with more spans (50) and more chunks (330 x 64K in one tensor) than one launch of the
  CUDA op holds.

* the 8-bit first moment (``state_bits=8``): both maps and both roundings, fp32 and bf16 gradients, through
  ``q8_update_`` against :func:`novograd_ds.testing.rule.rule_step_8bit` (dequantise, update, quantise in float64):
  weights normwise within :data:`Q8_TOLERANCE`, codes equal but for at most 1 in 10^4 one code apart (an fp32
  ``m`` within rounding of a code boundary; tests/test_eightbit.py measures 0-5 in 10^6).

The fused ops are also self-checked against foreach (NOTE: [self-check] in kernels/native.py), one line per device.

One line per check: ``PASS|FAIL|SKIP backend device case worst-relative-error <= tolerance``; exit status 1 when any
check fails. Errors are normwise per layer, ``max|x - rule| / max|rule|``, the worst over the layers, the steps and
``w``, ``m`` and ``v``. Tolerances: :data:`TOLERANCE`.
"""

from __future__ import annotations

import itertools
import math
import sys
from typing import Any, Callable, Iterator, Optional, Sequence, TextIO

import torch
from torch import Tensor

from .rule import rule_step

# Worst normwise relative error allowed after three steps, by the dtype of the parameters and state, and why.
TOLERANCE = {
    # fp32 w, m, v: each step rounds them to fp32 (2^-24 ~ 6e-8), and the layer norm n = |g|^2 is an fp32 result
    # of fp32 partial sums, whose error reaches v, d = sqrt(v) + eps and through d m and w. The fused ops sum at
    # most 128 fp32 terms per partial (~1e-6 worst, measured); torch's foreach norm of fp16/bf16 gradients on the
    # CPU has an error that grows with the tensor (2.6e-6 on |g| at 70K elements, so ~5e-6 on n; 4.1e-6 measured
    # here). 2e-5 leaves a factor 5 over the worst seen; a wrong kernel is off by 1e-3 or more.
    torch.float32: 2e-5,
    # fp64 (the PyTorch backends): only the order of float64 sums differs from the rule.
    torch.float64: 1e-12,
}
LR, EPS, B1 = 0.05, 1e-8, 0.9
STEPS = 3
LIST_SIZES = (1, 7, 1003, 70001)
# (offset, length, layer) over a flat of 80000: layer 0 in two segments, a zero-length entry, gaps, layer 2 is
# the flat's tail, layer 3 has no segment
SEGMENTS = ((5, 1000, 0), (1005, 0, 1), (1010, 9000, 1), (10010, 3, 0), (10020, 69980, 2))
FLAT, N_LAYERS = 80000, 4
# the flags of the (large) multi-launch cases: L2 decay with grad_averaging and amsgrad; decoupled with b2 = 0
MULTI_LAUNCH_FLAGS = (dict(wd=0.01, decoupled=False, grad_averaging=True, amsgrad=True, b2=0.98),
                      dict(wd=0.01, decoupled=True, grad_averaging=False, amsgrad=False, b2=0.0))


# 8-bit: quantised layers (>= 4096 elements), one across a 64K chunk; L2 weight decay, beta2 0.98
Q8_SIZES = (5000, 4396, 70001)
# A code one step off the rule's (allowed, see check_q8) moves its weight by lr times one code step, about 1e-5 of
# max|w| here (measured 9.4e-6 with linear stochastic rounding); a wrong kernel is off by 1e-3 or more.
Q8_TOLERANCE = 5e-5
Q8_CASES = tuple(itertools.product(("linear", "sqrt"), ("nearest", "stochastic")))


def flag_cases() -> list[dict[str, Any]]:
    """Every combination of the rule's flags: weight decay, decoupled, grad_averaging, amsgrad, beta2 = 0."""
    cases = []
    for wd, decoupled, ga, ams, b2 in itertools.product((0.0, 0.01), (False, True), (False, True), (False, True),
                                                        (0.98, 0.0)):
        cases.append(dict(wd=wd, decoupled=decoupled, grad_averaging=ga, amsgrad=ams, b2=b2))
    return cases


def case_label(form: str, gdtype: torch.dtype, f: dict[str, Any]) -> str:
    flags = [f"wd={f['wd']:g}"] + [n for n in ("decoupled", "grad_averaging", "amsgrad") if f[n]] + [f"b2={f['b2']:g}"]
    return f"{form} {str(gdtype).replace('torch.', '')} " + " ".join(flags)


class Line:
    def __init__(self, status: str, backend: str, device: str, case: str, worst: float = float("nan"),
                 tol: float = float("nan"), detail: str = ""):
        self.status, self.backend, self.device, self.case = status, backend, device, case
        self.worst, self.tol, self.detail = worst, tol, detail

    def __str__(self) -> str:
        if self.status == "SKIP" or (self.detail and math.isnan(self.worst)):
            return f"{self.status:<4} {self.backend:<10} {self.device:<7} {self.case}: {self.detail}"
        op = "<=" if self.status == "PASS" else ">"
        return f"{self.status:<4} {self.backend:<10} {self.device:<7} {self.case:<64} {self.worst:.2e} {op} {self.tol:.0e}"


# -- problems ---------------------------------------------------------------------------------------------------
def _grads(sizes: Sequence[int], seed: int) -> list[list[Tensor]]:
    """STEPS lists of fp32 gradients, of magnitudes from 0.01 to 100 by tensor."""
    gen = torch.Generator().manual_seed(seed)
    scales = [10.0 ** ((i % 5) - 2) for i in range(len(sizes))]
    return [[torch.randn(n, generator=gen) * s for n, s in zip(sizes, scales)] for _ in range(STEPS)]


def _table(segments: Sequence[tuple[int, int, int]]):
    from ..kernels import SegmentTable

    return SegmentTable(*zip(*segments)) if segments else SegmentTable([], [], [])


def multi_launch_segments() -> tuple[list[tuple[int, int, int]], int, int]:
    """50 segments over 7 layers, one of 330 chunks of 64K: more of both than one CUDA launch holds."""
    chunk, rows, o = 65536, [], 0
    for i in range(50):
        n = 330 * chunk + 3 if i == 17 else (i * 7919) % (2 * chunk) + (i % 2)
        rows.append((o, n, i % 7))
        o += n + i % 3
    return rows, o + 5, 7


# -- driving a backend through the seam, as the optimizer does -------------------------------------------------
def _factors(k: int, b2: float, ga: bool) -> tuple[float, float, float, float]:
    from ..optimizer import step_factors

    return step_factors(k, B1, b2, ga)


def run_list(backend, w0: Sequence[Tensor], grads: Sequence[Sequence[Tensor]], f: dict[str, Any],
             one_call: bool, on_step: Callable[[int, list, list, list], None]) -> None:
    """STEPS steps of one-tensor layers; ``one_call`` uses ``layer_step_`` (the fused CPU op's plain path)."""
    from ..optimizer import second_moment_

    w = [t.clone() for t in w0]
    m = [torch.zeros_like(t) for t in w0]
    vdtype = torch.float64 if w0[0].dtype == torch.float64 else torch.float32
    vs = [torch.zeros((), dtype=vdtype, device=w0[0].device) for _ in w0]
    vmaxs = [torch.zeros_like(v) for v in vs] if f["amsgrad"] else None
    for k in range(1, STEPS + 1):
        a1, c1, a2, c2 = _factors(k, f["b2"], f["grad_averaging"])
        g = grads[k - 1]
        done = one_call and backend.layer_step_(w, g, m, vs, vmaxs, lr=LR, a1=a1, c1=c1, a2=a2, c2=c2, eps=EPS,
                                                weight_decay=f["wd"], decoupled=f["decoupled"])
        if one_call and not done:
            raise RuntimeError("layer_step_ declined tensors it should take")
        if not done:
            v = torch.stack(vs)
            vmax = torch.stack(vmaxs) if vmaxs is not None else None
            d = second_moment_(v, backend.sq_norms(g).to(vdtype), vmax, a2=a2, c2=c2, eps=EPS)
            torch._foreach_copy_(vs, list(v.unbind(0)))
            if vmaxs is not None:
                torch._foreach_copy_(vmaxs, list(vmax.unbind(0)))
            backend.update_(w, g, m, d, lr=LR, beta1=a1, grad_scale=c1, weight_decay=f["wd"], decoupled=f["decoupled"])
        on_step(k, w, m, [vmaxs[i] if vmaxs is not None else vs[i] for i in range(len(vs))])


def run_segments(backend, flat_w0: Tensor, grads: Sequence[Tensor], segments, n_layers: int, f: dict[str, Any],
                 on_step: Callable[[int, Tensor, Tensor, Tensor], None]) -> None:
    """STEPS steps of a flat tensor cut into segments (the optimizer's bound-flat path, one process)."""
    from ..optimizer import second_moment_

    table = _table(segments)
    w, m = flat_w0.clone(), torch.zeros_like(flat_w0)
    vdtype = torch.float64 if w.dtype == torch.float64 else torch.float32
    v = torch.zeros(n_layers, dtype=vdtype, device=w.device)
    vmax = torch.zeros_like(v) if f["amsgrad"] else None
    for k in range(1, STEPS + 1):
        a1, c1, a2, c2 = _factors(k, f["b2"], f["grad_averaging"])
        n = backend.sq_norms_segments(grads[k - 1], table, n_layers).to(vdtype)
        d = second_moment_(v, n, vmax, a2=a2, c2=c2, eps=EPS)
        backend.update_segments_(w, grads[k - 1], m, table, d, lr=LR, beta1=a1, grad_scale=c1, weight_decay=f["wd"],
                                 decoupled=f["decoupled"])
        on_step(k, w, m, vmax if vmax is not None else v)


# -- the rule side ------------------------------------------------------------------------------------------------
class RuleLayers:
    """The float64 rule over layers given as float64 vectors (a layer's segments concatenated)."""

    def __init__(self, w: Sequence[Tensor], f: dict[str, Any]):
        self.w = [t.double().clone() for t in w]
        self.st = [dict() for _ in w]
        self.hp = dict(lr=LR, b1=B1, b2=f["b2"], eps=EPS, wd=f["wd"], grad_averaging=f["grad_averaging"],
                       amsgrad=f["amsgrad"], decoupled=f["decoupled"])

    def step(self, grads: Sequence[Tensor]) -> None:
        for i, g in enumerate(grads):
            if g.numel():
                self.w[i] = rule_step(self.w[i], g.double(), self.st[i], **self.hp)

    def v_used(self, i: int) -> float:
        return self.st[i]["vmax"] if self.hp["amsgrad"] else self.st[i]["v"]


def _normwise(x: Tensor, ref: Tensor) -> float:
    if ref.numel() == 0:
        return 0.0
    x, ref = x.double().reshape(-1), ref.reshape(-1)
    scale = float(ref.abs().max())
    diff = float((x - ref).abs().max())
    return diff / scale if scale > 0 else diff


def _scalar_rel(x: float, ref: float) -> float:
    return abs(x - ref) / abs(ref) if ref != 0 else abs(x)


# -- one check ----------------------------------------------------------------------------------------------------
def check_q8(backend, device: torch.device, gdtype: torch.dtype, qmap: str, rounding: str) -> float:
    """STEPS steps of 8-bit NovoGrad on whole tensors against the rule's 8-bit form; the weights' normwise error, or
    infinity when a code differs by more than one step or more than 1 in 10^4 of them differ."""
    from ..kernels import eightbit as eb
    from ..optimizer import second_moment_
    from .rule import rule_step_8bit

    gen = torch.Generator().manual_seed(11)
    w_ref = [torch.randn(n, generator=gen, dtype=torch.float64) for n in Q8_SIZES]
    grads = [[torch.randn(n, generator=gen, dtype=torch.float64) * (i + 1) for i, n in enumerate(Q8_SIZES)]
             for _ in range(STEPS)]
    cfg = eb.Q8Config(qmap, rounding, 5)
    w = [t.to(device, torch.float32) for t in w_ref]
    codes = [torch.zeros(n, dtype=eb.CODE_DTYPE, device=device) for n in Q8_SIZES]
    scales = [torch.zeros(eb.n_blocks(0, n), dtype=torch.float32, device=device) for n in Q8_SIZES]
    v = torch.zeros(len(Q8_SIZES), dtype=torch.float32, device=device)
    runs = eb.Q8Runs.plain(Q8_SIZES)
    states: list[dict] = [{} for _ in Q8_SIZES]
    worst = 0.0
    for k in range(1, STEPS + 1):
        a1, c1, a2, c2 = _factors(k, 0.98, False)
        g = [t.to(device, gdtype) for t in grads[k - 1]]
        d = second_moment_(v, backend.sq_norms(g).to(torch.float32), None, a2=a2, c2=c2, eps=EPS)
        backend.q8_update_(w, g, codes, scales, d, runs, None, lr=LR, beta1=a1, grad_scale=c1, weight_decay=0.01,
                           decoupled=False, q8=cfg, step=k)
        for i in range(len(Q8_SIZES)):
            w_ref[i] = rule_step_8bit(w_ref[i], g[i].double().cpu(), states[i], lr=LR, b1=B1, b2=0.98, eps=EPS,
                                      wd=0.01, grad_averaging=False, amsgrad=False, decoupled=False, qmap=qmap,
                                      rounding=rounding, seed=5, key=i)
            worst = max(worst, _normwise(w[i].cpu(), w_ref[i]))
            off = (codes[i].cpu().long() - torch.from_numpy(states[i]["codes"])).abs()
            if int(off.max()) > 1 or float((off > 0).double().mean()) > 1e-4:
                return math.inf
    return worst



def check_list(backend, device: torch.device, pdtype: torch.dtype, gdtype: torch.dtype, f: dict[str, Any],
               sizes: Sequence[int] = LIST_SIZES, one_call: bool = False) -> float:
    gen = torch.Generator().manual_seed(7)
    w0 = [torch.randn(n, generator=gen).to(device=device, dtype=pdtype) for n in sizes]
    grads = [[g.to(device=device, dtype=gdtype) for g in step] for step in _grads(sizes, seed=11)]
    rule = RuleLayers(w0, f)
    worst = [0.0]

    def on_step(k, w, m, v):
        rule.step(grads[k - 1])
        for i in range(len(w)):
            if not rule.st[i]:
                continue  # an empty tensor: the rule never steps it
            worst[0] = max(worst[0], _normwise(w[i], rule.w[i]), _normwise(m[i], rule.st[i]["m"]),
                           _scalar_rel(float(v[i]), rule.v_used(i)))

    run_list(backend, w0, grads, f, one_call, on_step)
    return worst[0]


def check_segments(backend, device: torch.device, pdtype: torch.dtype, gdtype: torch.dtype, f: dict[str, Any],
                   segments=SEGMENTS, numel: int = FLAT, n_layers: int = N_LAYERS) -> float:
    gen = torch.Generator().manual_seed(5)
    flat_w0 = torch.randn(numel, generator=gen).to(device=device, dtype=pdtype)
    grads = [(torch.randn(numel, generator=gen) * 3).to(device=device, dtype=gdtype) for _ in range(STEPS)]

    def layer_of(t: Tensor, k: int) -> Tensor:
        parts = [t[o:o + n] for o, n, lk in segments if lk == k]
        return torch.cat(parts) if parts else t[:0]

    rule = RuleLayers([layer_of(flat_w0, k) for k in range(n_layers)], f)
    covered = torch.zeros(numel, dtype=torch.bool, device=device)
    for o, n, _ in segments:
        covered[o:o + n] = True
    worst = [0.0]

    def on_step(k, w, m, v):
        rule.step([layer_of(grads[k - 1], j) for j in range(n_layers)])
        for j in range(n_layers):
            if not rule.st[j]:
                continue  # a layer without segments: nothing of it lives here
            worst[0] = max(worst[0], _normwise(layer_of(w, j), rule.w[j]), _normwise(layer_of(m, j), rule.st[j]["m"]),
                           _scalar_rel(float(v[j]), rule.v_used(j)))
        if not (torch.equal(w[~covered], flat_w0[~covered]) and bool((m[~covered] == 0).all())):
            raise RuntimeError(f"step {k} wrote elements that lie outside every segment")

    run_segments(backend, flat_w0, grads, segments, n_layers, f, on_step)
    return worst[0]


# -- backends and devices -------------------------------------------------------------------------------------------
class FaultyBackend:
    """``--inject-fault``: a backend whose updates are off by 1e-3 relative, to show that the check catches it."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    @staticmethod
    def _perturb(ts):
        for t in ts:
            t.mul_(1.0 + 1e-3)

    def update_(self, params, *args, **kw):
        self.inner.update_(params, *args, **kw)
        self._perturb(params)

    def update_segments_(self, flat_param, *args, **kw):
        self.inner.update_segments_(flat_param, *args, **kw)
        self._perturb([flat_param])

    def layer_step_(self, params, *args, **kw):
        done = self.inner.layer_step_(params, *args, **kw)
        self._perturb(params)
        return done

    def q8_update_(self, params, *args, **kw):
        self.inner.q8_update_(params, *args, **kw)
        self._perturb(params)


def devices() -> list[torch.device]:
    out = [torch.device("cpu")]
    if torch.cuda.is_available():
        out += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return out


def backends_for(device: torch.device, lines: list) -> Iterator[tuple[str, Any]]:
    """(name, backend) for every backend usable on ``device``; SKIP/FAIL lines for fused ops that are not."""
    from ..kernels import native
    from ..kernels.foreach import ForeachBackend
    from ..kernels.reference import ReferenceBackend

    yield "reference", ReferenceBackend()
    yield "foreach", ForeachBackend()
    name = f"fused-{device.type}"
    module, why = native._load_module(device.type)
    if module is None:
        lines.append(Line("SKIP", name, str(device), "load", detail=why or "unavailable"))
        return
    results = native.self_check(module, device)
    failed = [r for r in results if not r.passed]
    worst = max((r.diff / r.tol for r in results if r.error is None), default=0.0)
    if failed:
        lines.append(Line("FAIL", name, str(device), f"self-check ({len(results)} comparisons with foreach)",
                          detail=failed[0].describe()))
    else:
        lines.append(Line("PASS", name, str(device), f"self-check ({len(results)} comparisons with foreach)",
                          worst=worst * native.SELF_CHECK_TOLERANCE["update"],
                          tol=native.SELF_CHECK_TOLERANCE["update"]))
    backend = native.FusedBackend(module, device.type, strict=True)
    backend._device_ok[device] = True  # checked against the rule below whatever the self-check said
    yield name, backend


def run_checks(out: TextIO = sys.stdout, inject_fault: Optional[str] = None,
               only: Optional[Sequence[str]] = None, backends: Optional[Sequence[str]] = None) -> int:
    """Run every check, print one line each and a summary; returns the number of failures.

    ``only`` limits the devices (``cpu``, ``cuda``, ``cuda:1``), ``backends`` the backends (``reference``,
    ``foreach``, ``fused-cpu``, ``fused-cuda``); ``inject_fault`` names a backend to perturb (:class:`FaultyBackend`).
    """
    n_fail = n_pass = 0

    def emit(line: Line) -> None:
        nonlocal n_fail, n_pass
        n_fail += line.status == "FAIL"
        n_pass += line.status == "PASS"
        out.write(str(line) + "\n")
        out.flush()

    for device in devices():
        if only and str(device) not in only and device.type not in only:
            continue
        pending: list[Line] = []
        for name, backend in backends_for(device, pending):
            for line in pending:
                emit(line)
            pending.clear()
            if backends and name not in backends:
                continue
            if inject_fault == name:
                backend = FaultyBackend(backend)
            fused = name.startswith("fused")
            gdtypes = (torch.float32, torch.bfloat16, torch.float16) + (() if fused else (torch.float64,))
            forms = ["list"] + (["list-one-call"] if hasattr(backend, "layer_step_") and device.type == "cpu" else [])
            forms.append("segments")
            for gdtype in gdtypes:
                pdtype = torch.float64 if gdtype == torch.float64 else torch.float32
                tol = TOLERANCE[pdtype]
                for form in forms:
                    for f in flag_cases():
                        if form == "list":
                            fn = lambda: check_list(backend, device, pdtype, gdtype, f)  # noqa: E731
                        elif form == "list-one-call":
                            fn = lambda: check_list(backend, device, pdtype, gdtype, f, one_call=True)  # noqa: E731
                        else:
                            fn = lambda: check_segments(backend, device, pdtype, gdtype, f)  # noqa: E731
                        emit(_line(name, device, case_label(form, gdtype, f), fn, tol))
                if device.type == "cuda" and pdtype == torch.float32:
                    # more spans and chunks than one launch of the CUDA op holds (36 spans, 320 chunks of 64K)
                    rows, numel, n_layers = multi_launch_segments()
                    big = [n for _, n, _ in rows]
                    for f in MULTI_LAUNCH_FLAGS:
                        emit(_line(name, device, case_label("list-multilaunch", gdtype, f),
                                   lambda: check_list(backend, device, pdtype, gdtype, f, sizes=big), tol))
                        emit(_line(name, device, case_label("segments-multilaunch", gdtype, f),
                                   lambda: check_segments(backend, device, pdtype, gdtype, f, rows, numel, n_layers),
                                   tol))
            for gdtype in (torch.float32, torch.bfloat16):
                for qmap, rounding in Q8_CASES:
                    emit(_line(name, device, f"8-bit {qmap} {rounding} grad={str(gdtype).replace('torch.', '')}",
                               lambda: check_q8(backend, device, gdtype, qmap, rounding), Q8_TOLERANCE))
        for line in pending:
            emit(line)
    out.write(f"env --check: {n_pass} passed, {n_fail} failed\n")
    return n_fail


def _line(backend: str, device: torch.device, case: str, fn: Callable[[], float], tol: float) -> Line:
    try:
        worst = fn()
    except Exception as exc:  # a backend that raises fails its check; the others still run
        return Line("FAIL", backend, str(device), case, detail=f"raised {type(exc).__name__}: {exc}")
    return Line("PASS" if worst <= tol else "FAIL", backend, str(device), case, worst, tol)
