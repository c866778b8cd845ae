"""8-bit NovoGrad: the first moment as 8-bit codes with one fp32 scale per block of 256 elements of a layer.

NOTE: [8-bit moment] The layout and the math, defined once; every backend (reference.py, foreach.py, the fused CPU
op, the CUDA op through ops/csrc/q8_math.h) implements exactly this, and novograd_ds/testing/rule.py holds an
independent float64 form of it. docs/eightbit.md explains the choices and the measurements behind them.

Layout. Block ``b`` of a layer covers its flattened elements ``[256 b, 256 b + 256)`` (the layer's last block may
be shorter). A *run* is a contiguous piece ``[start, start + n)`` of one layer held by this process: a whole tensor
(start 0), a ZeRO segment or an FSDP2 ``Shard(0)`` piece. It touches the blocks ``start // 256 .. (start+n-1) //
256`` and keeps one scale for each of them (``n_blocks(start, n)`` fp32 values) and one code per element (int8).
The first and last of its blocks are *partial* when the run does not cover all of the block's elements in the layer
(``partial_ends``); such a *boundary block* is shared with the neighbouring rank(s), each of which holds the same
scale for it. Tensors under :data:`MIN_QUANTIZED_NUMEL` elements keep an fp32 moment (the caller decides).

One step of a run with denominator ``d`` and the step factors ``a1, c1`` (novograd_math.h), per element::

    m_old = dequant(code, scale[block])                     fp32
    gh    = g / d;  gh = gh + wd*w  (unless decoupled)
    m_new = a1*m_old + c1*gh
    w     = w - lr*m_new   (decoupled: w - lr*(m_new + wd*w))      m_new in fp32, before quantisation
    A     = max |m_new| over the whole block                 boundary block: the max over every rank's piece
    code  = quant(m_new, A);  scale[block] = A

A boundary block's ``A`` needs the other ranks' pieces, so a sharded step is two kernel calls around one
all-reduce: ``q8_boundary_absmax`` (each run's local max of ``|m_new|`` over its partial first and last block; at
most 2 x 256 elements per run) -> the caller's all-reduce MAX -> ``q8_update_`` (everything else, one read of
g, w, codes, old scales, one write of w, codes, scales). A run without partial blocks (every plain tensor) needs
only ``q8_update_`` with ``boundary=None``.

The maps (``qmap``), with ``t`` the element's value scaled by its block's ``A``; codes are int8 in [-127, 127]:

``linear``  ``dequant = q * (A / 127)``; ``t = m * (127 / A)``, ``q = rint(t)`` (nearest, ties to even) or
            ``floor(t + u)`` (stochastic); clamped to [-127, 127].
``sqrt``    companded, finer near zero: ``dequant = (q |q|) * (A / 16129)``; ``t = |m| * (16129 / A)`` in
            [0, 16129], ``k = floor(sqrt(t))`` (a correctly rounded sqrt, then ``k - 1`` where ``k*k > t``: exact);
            the magnitude is ``k + (t >= k(k+1) + 0.5)`` (nearest in value) or ``k + (u(2k+1) < t - k*k)``
            (stochastic, unbiased in value), at most 127; the sign is m's.

``1 / A`` factors are 0 when ``A == 0`` (an all-zero block: codes 0). Every operation is one IEEE fp32 operation
(no FMA, correctly rounded division and square root), so every backend gives the same codes and scales bit for bit
from the same inputs.

Stochastic rounding draws ``u`` in (0, 1) (8 bits: a byte of a 32-bit hash shared by four elements) from a
counter-based hash of ``(seed, step, key, index)``:
``key`` identifies the layer (the caller's stable layer id, the same on every rank), ``index`` is the element's
index in the layer, ``step`` the layer's step count. The same element gets the same ``u`` on every backend and
under every sharding. See :func:`uniform`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

BLOCK = 256                 # elements per scale, aligned to the layer's element 0
MIN_QUANTIZED_NUMEL = 4096  # layers with fewer elements keep an fp32 exp_avg (the caller decides)
QMAX = 127                  # codes are int8 in [-QMAX, QMAX]
CODE_DTYPE = torch.int8
MAPS = ("linear", "sqrt")
ROUNDINGS = ("nearest", "stochastic")
# The map and rounding chosen by measurement (docs/eightbit.md): the default of Q8Config.
DEFAULT_MAP = "linear"
DEFAULT_ROUNDING = "nearest"

_QSQ = QMAX * QMAX          # 16129: the sqrt map's scale
_MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class Q8Config:
    """How the moment is quantised: the map, the rounding and the stochastic-rounding seed (32 bits used)."""

    qmap: str = DEFAULT_MAP
    rounding: str = DEFAULT_ROUNDING
    seed: int = 0

    def __post_init__(self):
        if self.qmap not in MAPS:
            raise ValueError(f"8-bit NovoGrad: qmap={self.qmap!r} is not one of {MAPS}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"8-bit NovoGrad: rounding={self.rounding!r} is not one of {ROUNDINGS}")

    @property
    def map_id(self) -> int:
        return MAPS.index(self.qmap)

    @property
    def rounding_id(self) -> int:
        return ROUNDINGS.index(self.rounding)


# -- layout -----------------------------------------------------------------------------------------------------
def block_range(start: int, n: int) -> tuple[int, int]:
    """The layer blocks ``[first, last + 1)`` a run ``[start, start + n)`` touches (empty when ``n == 0``)."""
    if n <= 0:
        return start // BLOCK, start // BLOCK
    return start // BLOCK, (start + n - 1) // BLOCK + 1


def n_blocks(start: int, n: int) -> int:
    """How many scales a run ``[start, start + n)`` of a layer keeps."""
    first, end = block_range(start, n)
    return end - first


def partial_ends(start: int, n: int, layer_numel: int) -> tuple[bool, bool]:
    """Whether the run's first and last block are partial (shared with another run of the layer)."""
    if n <= 0:
        return False, False
    first, end = block_range(start, n)
    last = end - 1
    first_partial = start > first * BLOCK or start + n < min((first + 1) * BLOCK, layer_numel)
    last_partial = start + n < min((last + 1) * BLOCK, layer_numel) or start > last * BLOCK
    return first_partial, last_partial


class Q8Runs:
    """The geometry of the runs of a list-form call, one per tensor: where each starts in its layer, the layer's
    size, and the layer's stochastic-rounding key. ``Q8Runs.plain(numels, keys)`` for whole tensors."""

    def __init__(self, starts: Sequence[int], layer_numels: Sequence[int], keys: Sequence[int]):
        if not (len(starts) == len(layer_numels) == len(keys)):
            raise ValueError("Q8Runs: starts, layer_numels and keys must have the same length")
        self.starts = [int(s) for s in starts]
        self.layer_numels = [int(n) for n in layer_numels]
        self.keys = [int(k) & _MASK32 for k in keys]
        if any(s < 0 for s in self.starts) or any(n < 0 for n in self.layer_numels):
            raise ValueError("Q8Runs: starts and layer_numels must be >= 0")

    @classmethod
    def plain(cls, numels: Sequence[int], keys: Optional[Sequence[int]] = None) -> "Q8Runs":
        numels = [int(n) for n in numels]
        return cls([0] * len(numels), numels, range(len(numels)) if keys is None else keys)

    def __len__(self) -> int:
        return len(self.starts)

    def __repr__(self) -> str:
        return f"Q8Runs(starts={self.starts}, layer_numels={self.layer_numels}, keys={self.keys})"

    def check(self, numels: Sequence[int]) -> None:
        if len(numels) != len(self):
            raise ValueError(f"Q8Runs describes {len(self)} runs, the call has {len(numels)} tensors")
        for i, (s, n, L) in enumerate(zip(self.starts, numels, self.layer_numels)):
            if s + n > L:
                raise ValueError(f"run {i}: [{s}, {s + n}) lies outside its layer of {L} elements")

    def n_blocks(self, i: int, n: int) -> int:
        return n_blocks(self.starts[i], n)

    def partial_ends(self, i: int, n: int) -> tuple[bool, bool]:
        return partial_ends(self.starts[i], n, self.layer_numels[i])

    def has_partial(self, numels: Sequence[int]) -> bool:
        return any(any(self.partial_ends(i, n)) for i, n in enumerate(numels))

    def as_tensor(self, numels: Sequence[int]) -> Tensor:
        """``int64 [n, 3]`` (start, layer_numel, key) on the CPU, the form native ops take."""
        self.check(numels)
        return torch.tensor(list(zip(self.starts, self.layer_numels, self.keys)), dtype=torch.int64).reshape(-1, 3)


class Q8SegmentTable:
    """Runs of a flat tensor: rows ``(offset, length, layer, start, layer_numel, key)``.

    ``offset``/``length`` place the run in the flat tensor (and its codes in the flat codes tensor, which is
    parallel to it); ``layer`` indexes the per-layer denominators; ``start`` is the run's first element's index in
    its layer, ``layer_numel`` the layer's size, ``key`` the layer's stochastic-rounding key. The run's scales are
    ``flat_scales[scale_offsets[r] : scale_offsets[r] + n_blocks(start, length)]``, runs' scales packed in row
    order: :attr:`n_scales` in all.
    """

    def __init__(self, offsets, lengths, layers, starts, layer_numels, keys):
        cols = [list(map(int, c)) for c in (offsets, lengths, layers, starts, layer_numels, keys)]
        if len({len(c) for c in cols}) != 1:
            raise ValueError("Q8SegmentTable: every column must have the same length")
        self.offsets, self.lengths, self.layers = cols[0], cols[1], cols[2]
        self.runs = Q8Runs(cols[3], cols[4], cols[5])
        self.runs.check(self.lengths)
        self.scale_offsets, total = [], 0
        for s, n in zip(self.runs.starts, self.lengths):
            self.scale_offsets.append(total)
            total += n_blocks(s, n)
        self.n_scales = total
        self._index_cache: dict[torch.device, Tensor] = {}

    def __len__(self) -> int:
        return len(self.offsets)

    def select(self, rows: Sequence[int]) -> "Q8SegmentTable":
        """The table of some of these rows, their scales where they are in this table's flat scales tensor (so a
        step over a subset of the layers updates the same codes and scales)."""
        rows = [int(j) for j in rows]
        r = self.runs
        sub = Q8SegmentTable([self.offsets[j] for j in rows], [self.lengths[j] for j in rows],
                             [self.layers[j] for j in rows], [r.starts[j] for j in rows],
                             [r.layer_numels[j] for j in rows], [r.keys[j] for j in rows])
        sub.scale_offsets = [self.scale_offsets[j] for j in rows]
        sub.n_scales = self.n_scales
        return sub

    def views(self, flat: Tensor) -> list[Tensor]:
        return [flat.narrow(0, o, n) for o, n in zip(self.offsets, self.lengths)]

    def scale_views(self, flat_scales: Tensor) -> list[Tensor]:
        return [flat_scales.narrow(0, o, n_blocks(s, n))
                for o, s, n in zip(self.scale_offsets, self.runs.starts, self.lengths)]

    def layer_index(self, device) -> Tensor:
        device = torch.device(device)
        idx = self._index_cache.get(device)
        if idx is None:
            idx = self._index_cache[device] = torch.tensor(self.layers, dtype=torch.long, device=device)
        return idx

    def as_tensor(self) -> Tensor:
        """``int64 [n, 7]`` (offset, length, layer, start, layer_numel, key, scale_offset), the native form."""
        r = self.runs
        return torch.tensor(list(zip(self.offsets, self.lengths, self.layers, r.starts, r.layer_numels, r.keys,
                                     self.scale_offsets)), dtype=torch.int64).reshape(-1, 7)


def state_bytes(numels: Sequence[int], *, min_numel: int = MIN_QUANTIZED_NUMEL) -> int:
    """Bytes of 8-bit NovoGrad state for whole tensors of these sizes: per tensor its ``exp_avg_sq`` (fp32 scalar),
    and either int8 codes plus fp32 block scales, or an fp32 ``exp_avg`` under ``min_numel`` elements."""
    total = 0
    for n in numels:
        total += 4
        total += (n + 4 * n_blocks(0, n)) if n >= min_numel else 4 * n
    return total


# -- the elementwise math in torch (reference and foreach share it; q8_math.h is its C++ twin) ----------------------
def _mul32(x: Tensor, c: int) -> Tensor:
    """``(x * c) mod 2^32`` for int64 tensors holding 32-bit values, without int64 overflow."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _MASK32


def hash32_t(x: Tensor) -> Tensor:
    """The 32-bit mixing function of q8_math.h (xorshift-multiply, two rounds) on int64 tensors of 32-bit values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x21F0AAAD)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x735A2D97)
    return x ^ (x >> 15)


def hash32(x: int) -> int:
    """:func:`hash32_t` on one Python int (32 bits)."""
    x &= _MASK32
    x ^= x >> 16
    x = (x * 0x21F0AAAD) & _MASK32
    x ^= x >> 15
    x = (x * 0x735A2D97) & _MASK32
    return x ^ (x >> 15)


def stream_base(seed: int, key: int, step: int) -> int:
    """The per-(seed, layer, step) base of the stochastic-rounding stream."""
    return hash32(hash32(hash32(step & _MASK32) ^ (key & _MASK32)) ^ (seed & _MASK32))


def uniform(seed: int, key: int, step: int, index: Tensor) -> Tensor:
    """``u`` in (0, 1), fp32 with 8 random bits, for the elements at ``index`` (int64, index in the layer).

    One 32-bit hash serves four consecutive elements, a byte each (NOTE: [8-bit moment]: 8 bits bias a rounding by
    at most 1/512 of a code step, and cost a quarter of a hash per element)::

        word = index >> 2,  base = stream_base(seed, key, step)
        h    = hash32(hash32(base ^ (word >> 32)) ^ (word & 0xFFFFFFFF))
        u    = (((h >> (8 * (index & 3))) & 255) + 0.5) / 256
    """
    return uniform_at(torch.full_like(index, stream_base(seed, key, step)), index)


def uniform_at(base: Tensor, index: Tensor) -> Tensor:
    """:func:`uniform` with the stream base given per element (int64 tensor of 32-bit values, broadcastable)."""
    word = index >> 2
    ib = hash32_t(base ^ (word >> 32))
    h = hash32_t(ib ^ (word & _MASK32))
    byte = (h >> ((index & 3) * 8)) & 255
    return (byte.to(torch.float32) + 0.5) * (1.0 / 256)


def dequant_step(absmax: Tensor, qmap: str) -> Tensor:
    """Per block: the factor that turns a code (linear) or ``q|q|`` (sqrt) into a value, in fp32."""
    return absmax / float(QMAX if qmap == "linear" else _QSQ)


def quant_inv(absmax: Tensor, qmap: str) -> Tensor:
    """Per block: the factor that scales a value into the code domain (0 for an all-zero block), in fp32."""
    num = torch.full_like(absmax, float(QMAX if qmap == "linear" else _QSQ))
    # tensor / tensor: one correctly rounded division (``scalar / tensor`` is reciprocal-then-multiply in torch)
    return torch.where(absmax > 0, num / absmax, torch.zeros_like(absmax))


def dequantize(codes: Tensor, step: Tensor, qmap: str) -> Tensor:
    """fp32 values of int8 ``codes``; ``step`` (from :func:`dequant_step`) broadcast to the codes."""
    q = codes.to(torch.int32)
    if qmap == "sqrt":
        q = q * q.abs()
    return q.to(torch.float32) * step


def quantize(m: Tensor, inv: Tensor, qmap: str, u: Optional[Tensor] = None) -> Tensor:
    """int8 codes of fp32 ``m``; ``inv`` (from :func:`quant_inv`) broadcast to ``m``; ``u`` for stochastic rounding."""
    if qmap == "linear":
        t = m * inv
        q = torch.round(t) if u is None else torch.floor(t + u)  # nearest (ties to even) | stochastic
        return q.clamp_(-QMAX, QMAX).to(CODE_DTYPE)
    t = m.abs() * inv                                       # <= 16129 (1 + 2^-23); above, |q| clamps to 127
    # floor(sqrt(t)) exactly: a correctly rounded sqrt (torch's fp32 sqrt is not: through float64, rounded once)
    # is never below an integer it should reach; it may round up onto one, which the one correction undoes
    k = torch.floor(torch.sqrt(t.double()).float())
    k = torch.where(k * k > t, k - 1, k)
    if u is None:
        up = t >= k * (k + 1) + 0.5                         # nearest in value: t - k^2 >= k + 1/2
    else:
        up = u * (2 * k + 1) < t - k * k                    # P(up) = (t - k^2) / ((k+1)^2 - k^2): unbiased
    qm = torch.clamp(k + up.to(torch.float32), max=float(QMAX))
    return torch.where(m < 0, -qm, qm).to(CODE_DTYPE)


def check_boundary(boundary: Optional[Tensor], n_runs: int, needed: bool) -> None:
    if boundary is None:
        if needed:
            raise ValueError("8-bit update: some runs have partial (boundary) blocks; pass boundary=, the all-reduced "
                             "(MAX) result of q8_boundary_absmax")
        return
    if boundary.shape != (n_runs, 2) or boundary.dtype != torch.float32:
        raise ValueError(f"8-bit update: boundary must be a float32 tensor of shape ({n_runs}, 2), got "
                         f"{tuple(boundary.shape)} {boundary.dtype}")


def check_q8_tensors(params, grads, codes, scales, runs: Q8Runs) -> list[int]:
    numels = [g.numel() for g in grads]
    if not (len(params) == len(grads) == len(codes) == len(scales)):
        raise ValueError("8-bit update: params, grads, codes and scales must have the same length")
    runs.check(numels)
    for i, (p, c, s, n) in enumerate(zip(params, codes, scales, numels)):
        if p.numel() != n or c.numel() != n:
            raise ValueError(f"8-bit update: tensor {i}: param, grad and codes must have {n} elements")
        if c.dtype != CODE_DTYPE:
            raise ValueError(f"8-bit update: codes[{i}] has dtype {c.dtype}; codes are {CODE_DTYPE}")
        nb = runs.n_blocks(i, n)
        if s.numel() != nb or s.dtype != torch.float32:
            raise ValueError(f"8-bit update: scales[{i}] must be float32 with {nb} entries (blocks of the run "
                             f"[{runs.starts[i]}, {runs.starts[i] + n})), got {s.numel()} {s.dtype}")
    return numels


def moment_and_weight(w: Tensor, g: Tensor, m_old: Tensor, d, *, lr: float, beta1: float, grad_scale: float,
                      weight_decay: float, decoupled: bool) -> tuple[Tensor, Tensor]:
    """``update_element`` of novograd_math.h on fp32 tensors, operation for operation: ``(m_new, w_new)``.

    ``d`` is a tensor broadcastable to ``g``. The weight-decay terms are always evaluated (as the C++ does), so the
    results agree with the native ops bit for bit, signed zeros included.
    """
    gh = g / d                                   # gh = g / (sqrt(v) + eps)
    if not decoupled:
        gh = gh + weight_decay * w               # gh = gh + wd*w
    m_new = beta1 * m_old + grad_scale * gh      # m = a1*m + c1*gh
    u = m_new + weight_decay * w if decoupled else m_new
    return m_new, w - lr * u                     # w = w - lr*u


def opmath_for_q8(t: Tensor) -> torch.dtype:
    if t.dtype == torch.float64:
        raise ValueError("8-bit NovoGrad state is for fp32/bf16/fp16 parameters (its math runs in fp32); keep an "
                         "fp32 exp_avg for float64 parameters")
    return torch.float32
