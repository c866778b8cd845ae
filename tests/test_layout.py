"""Segment computation for flat partitions (pure arithmetic, no processes), checked against a brute-force
element-by-element construction of the same flat buffers."""

from __future__ import annotations

import pytest
import torch

from novograd_ds.integrations.zero_layout import contiguous_segments, zero12_segments, zero3_segments
from novograd_ds.sharding import FlatLayout, compact_layer_values, expand_layer_values
from novograd_ds.kernels import SegmentTable
from novograd_ds.kernels.foreach import ForeachBackend


def brute_owner(flat_offsets, numels, layers, total):
    """owner[e] = layer of element e of the whole flat buffer, -1 for gaps and padding."""
    owner = [-1] * total
    for off, n, k in zip(flat_offsets, numels, layers):
        for e in range(off, off + n):
            assert owner[e] == -1
            owner[e] = k
    return owner


def table_owner(table: SegmentTable, psz):
    owner = [-1] * psz
    for o, n, k in zip(table.offsets, table.lengths, table.layers):
        for e in range(o, o + n):
            assert owner[e] == -1, "segments overlap"
            owner[e] = k
    return owner


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("gaps", [False, True])
@pytest.mark.parametrize("reorder", [False, True])
def test_zero12_segments_match_brute_force(world, gaps, reorder):
    numels = [143, 11, 77, 7, 21, 3, 1]
    order = [2, 0, 5, 1, 6, 3, 4] if reorder else list(range(len(numels)))  # round-robin style flat order
    offsets, acc = [], 0
    for j in order:
        offsets.append(acc)
        acc += numels[j] + (3 if gaps else 0)
    total = -(-acc // (2 * world)) * 2 * world
    psz = total // world
    owner = brute_owner(offsets, [numels[j] for j in order], order, total)
    covered = 0
    for r in range(world):
        t = zero12_segments(offsets, [numels[j] for j in order], order, rank=r, partition_size=psz)
        assert table_owner(t, psz) == owner[r * psz:(r + 1) * psz]
        assert t.offsets == sorted(t.offsets)
        covered += sum(t.lengths)
    assert covered == sum(numels)


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_contiguous_segments(world):
    numels = [10, 1, 33, 4]
    total = -(-sum(numels) // (2 * world)) * 2 * world
    psz = total // world
    owner = brute_owner([0, 10, 11, 44], numels, range(4), total)
    for r in range(world):
        assert table_owner(contiguous_segments(numels, rank=r, partition_size=psz), psz) == owner[r * psz:(r + 1) * psz]


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_zero3_segments_match_per_tensor_partitioning(world):
    numels = [143, 11, 1, 7, 2]
    psz = [-(-n // world) for n in numels]
    for r in range(world):
        t = zero3_segments(psz, numels, rank=r)
        expected, off = [], 0
        for k, (n, p) in enumerate(zip(numels, psz)):
            part = list(range(n))[r * p:(r + 1) * p]
            expected += [k] * len(part) + [-1] * (p - len(part))
            off += p
        assert table_owner(t, sum(psz)) == expected


def test_segment_norms_sum_to_layer_norms_across_ranks():
    """Per-rank partial sums over segments, added across ranks, equal each layer's squared norm."""
    torch.manual_seed(0)
    numels, world = [143, 11, 77, 7, 21, 3], 3
    tensors = [torch.randn(n, dtype=torch.float64) for n in numels]
    flat = torch.cat(tensors)
    total = -(-flat.numel() // (2 * world)) * 2 * world
    flat = torch.cat([flat, torch.zeros(total - flat.numel(), dtype=torch.float64)])
    psz = total // world
    acc = torch.zeros(len(numels), dtype=torch.float64)
    for r in range(world):
        t = contiguous_segments(numels, rank=r, partition_size=psz)
        acc += ForeachBackend().sq_norms_segments(flat[r * psz:(r + 1) * psz], t, len(numels))
    torch.testing.assert_close(acc, torch.stack([(x * x).sum() for x in tensors]), rtol=1e-12, atol=0)


def test_expand_and_compact_round_trip():
    t = SegmentTable([0, 5, 9], [4, 3, 2], [2, 0, 1])
    v = torch.tensor([0.5, 1.5, 2.5])
    flat = expand_layer_values(v, t, 12)
    assert flat.tolist() == [2.5] * 4 + [0.0] + [0.5] * 3 + [0.0] + [1.5] * 2 + [0.0]
    values, present = compact_layer_values(flat, t, 3)
    assert values.tolist() == v.tolist() and present.all()
    values, present = compact_layer_values(flat, SegmentTable([5], [3], [0]), 3)
    assert values.tolist() == [0.5, 0.0, 0.0] and present.tolist() == [True, False, False]


def test_flat_layout_rejects_segments_outside_the_flat():
    with pytest.raises(ValueError, match="outside a flat of 10 elements"):
        FlatLayout(SegmentTable([8], [4], [0]), n_layers=1, numel=10)
    with pytest.raises(ValueError, match="with 1 layers"):
        FlatLayout(SegmentTable([0], [4], [1]), n_layers=1, numel=10)


def test_whole_tensor_layout_of_a_matrix_steps_through_the_default_segment_forms():
    """FP16_UnfusedOptimizer binds each 2-D fp32 clone as one segment of its numel: the views must be 1-D."""
    from novograd_ds.kernels.reference import ReferenceBackend
    from novograd_ds.sharding import whole_tensor_layout

    gen = torch.Generator().manual_seed(0)
    w, g = torch.randn(11, 13, generator=gen), torch.randn(11, 13, generator=gen)
    m = torch.zeros_like(w)
    lay = whole_tensor_layout(w)
    for backend in (ForeachBackend(), ReferenceBackend()):
        n = backend.sq_norms_segments(g, lay.segments, 1)
        torch.testing.assert_close(n, g.square().sum().reshape(1), rtol=1e-6, atol=0)
    w0 = w.clone()
    ForeachBackend().update_segments_(w, g, m, lay.segments, n.sqrt(), lr=0.1, beta1=0.0, grad_scale=1.0,
                                      weight_decay=0.0, decoupled=False)
    torch.testing.assert_close(w, w0 - 0.1 * g / n.sqrt(), rtol=1e-6, atol=1e-7)
