// Launch planning of the 8-bit moment's CUDA kernels (NOTE: [8-bit moment] in novograd_ds/kernels/eightbit.py).
// No torch or CUDA header: nvcc compiles it into novograd_q8.cu and g++ into the kernels' sequential emulation
// (tests/cuda_q8_emulation.cpp, run by tests/test_q8_launch_plan.py), so the CPU tests exercise the tables the GPU
// receives.
//
// NOTE: [8-bit launches] A run is cut into chunks aligned to multiples of kQ8Chunk elements of its *layer* (so a
// chunk holds whole layer blocks, except where the run itself starts or ends inside one), one chunk per CUDA
// block. Inside a chunk each warp takes one layer block (256 elements, 8 per lane, lane l holding elements l,
// l + 32, ...) at a time, the warps striding over the chunk's blocks: it dequantises, updates w and m (in registers),
// takes the block's max |m| with a shuffle-xor tree (max is exact: the order cannot change the result), and
// quantises. Every block, element and scale is written by exactly one warp: deterministic, no atomics, no shared
// memory. The boundary pass gives each (run, end) pair one warp. A launch carries a table of up to kQ8MaxSpans runs
// and kQ8MaxBlocks chunks as its kernel argument (under 4 KiB), so it needs no host-to-device copy.
#pragma once

#include <stdint.h>

#include <vector>

#include "../q8_math.h"
#include "../q8_spans.h"

#ifndef NOVOGRAD_Q8_MAX_SPANS
#define NOVOGRAD_Q8_MAX_SPANS 24
#endif
#ifndef NOVOGRAD_Q8_MAX_BLOCKS
#define NOVOGRAD_Q8_MAX_BLOCKS 320
#endif
#ifndef NOVOGRAD_Q8_CHUNK
#define NOVOGRAD_Q8_CHUNK 65536
#endif
#ifndef NOVOGRAD_Q8_THREADS
#define NOVOGRAD_Q8_THREADS 512
#endif

namespace novograd_cuda {

using novograd::QSpan;

constexpr int kQ8MaxSpans = NOVOGRAD_Q8_MAX_SPANS;
constexpr int kQ8MaxBlocks = NOVOGRAD_Q8_MAX_BLOCKS;
constexpr int64_t kQ8Chunk = NOVOGRAD_Q8_CHUNK;
constexpr int kQ8Threads = NOVOGRAD_Q8_THREADS;
constexpr int kQ8Warp = 32;
constexpr int kQ8Warps = kQ8Threads / kQ8Warp;
constexpr int kQ8PerLane = static_cast<int>(novograd::q8::kBlock) / kQ8Warp;  // 8 elements of a block per lane

static_assert(kQ8MaxSpans >= 1 && kQ8MaxSpans <= 256, "block_span is one byte");
static_assert(kQ8Chunk % novograd::q8::kBlock == 0 && kQ8Chunk >= novograd::q8::kBlock, "chunks hold whole blocks");
static_assert(kQ8Threads % kQ8Warp == 0 && kQ8Warps >= 1, "whole warps");

struct Q8LaunchTable {
  float* w[kQ8MaxSpans];
  const void* g[kQ8MaxSpans];
  int8_t* q[kQ8MaxSpans];
  float* scale[kQ8MaxSpans];
  int64_t n[kQ8MaxSpans];
  int64_t start[kQ8MaxSpans];
  int64_t layer_numel[kQ8MaxSpans];
  int32_t layer[kQ8MaxSpans];  // index of the denominator
  int32_t run[kQ8MaxSpans];    // row of the boundary array
  uint32_t base[kQ8MaxSpans];  // q8::stream_base(seed, key, step)
  unsigned char block_span[kQ8MaxBlocks];
  int32_t block_chunk[kQ8MaxBlocks];
};
static_assert(sizeof(Q8LaunchTable) <= 4096, "kernel arguments are limited to 4 KiB on older toolchains");

struct Q8Launch {
  Q8LaunchTable table;
  int blocks;   // CUDA blocks of the launch
  int n_spans;  // spans in the table
};

// Chunks of a run [start, start + n) of its layer.
NOVOGRAD_HD int64_t q8_chunks_of(int64_t start, int64_t n) {
  return n > 0 ? (start + n - 1) / kQ8Chunk - start / kQ8Chunk + 1 : 0;
}

// Chunk c of span s of a table: the run's local elements [lo, hi).
struct Q8ChunkWork {
  int s;
  int64_t lo, hi;
};

NOVOGRAD_HD Q8ChunkWork q8_chunk_work(const Q8LaunchTable& t, int b) {
  Q8ChunkWork cw;
  cw.s = t.block_span[b];
  const int64_t start = t.start[cw.s], end = start + t.n[cw.s];
  const int64_t c = start / kQ8Chunk + t.block_chunk[b];
  cw.lo = (c * kQ8Chunk > start ? c * kQ8Chunk : start) - start;
  cw.hi = ((c + 1) * kQ8Chunk < end ? (c + 1) * kQ8Chunk : end) - start;
  return cw;
}

inline void q8_put_span(Q8LaunchTable& t, int ns, const QSpan& sp, const novograd::q8::Q8Scalars& qs) {
  t.w[ns] = sp.w;
  t.g[ns] = sp.g;
  t.q[ns] = sp.q;
  t.scale[ns] = sp.scale;
  t.n[ns] = sp.n;
  t.start[ns] = sp.start;
  t.layer_numel[ns] = sp.layer_numel;
  t.layer[ns] = static_cast<int32_t>(sp.layer);
  t.run[ns] = static_cast<int32_t>(sp.run);
  t.base[ns] = novograd::q8::stream_base(qs.seed, sp.key, qs.step);
}

// The update launches: every chunk of every non-empty span once; a span whose chunks do not fit the current table
// continues in the next one.
inline std::vector<Q8Launch> make_q8_update_plan(const QSpan* spans, int64_t n_spans, const novograd::q8::Q8Scalars& qs) {
  std::vector<Q8Launch> plan;
  Q8Launch cur{};
  int ns = 0, nb = 0;
  for (int64_t s = 0; s < n_spans; ++s) {
    const QSpan& sp = spans[s];
    const int64_t chunks = q8_chunks_of(sp.start, sp.n);
    for (int64_t c = 0; c < chunks; ++c) {
      if (c == 0 || nb == 0) q8_put_span(cur.table, ns++, sp, qs);
      cur.table.block_span[nb] = static_cast<unsigned char>(ns - 1);
      cur.table.block_chunk[nb] = static_cast<int32_t>(c);
      ++nb;
      if (nb == kQ8MaxBlocks || (ns == kQ8MaxSpans && c == chunks - 1)) {
        cur.blocks = nb;
        cur.n_spans = ns;
        plan.push_back(cur);
        cur = Q8Launch{};
        ns = nb = 0;
      }
    }
  }
  if (nb > 0) {
    cur.blocks = nb;
    cur.n_spans = ns;
    plan.push_back(cur);
  }
  return plan;
}

// The boundary launches: every span (empty ones too: their rows are written 0), kQ8MaxSpans per table, one warp
// per (span, end).
inline std::vector<Q8Launch> make_q8_boundary_plan(const QSpan* spans, int64_t n_spans) {
  std::vector<Q8Launch> plan;
  const novograd::q8::Q8Scalars none{0, 0, 0, 0};
  for (int64_t s0 = 0; s0 < n_spans; s0 += kQ8MaxSpans) {
    Q8Launch l{};
    l.n_spans = static_cast<int>(n_spans - s0 < kQ8MaxSpans ? n_spans - s0 : kQ8MaxSpans);
    for (int i = 0; i < l.n_spans; ++i) q8_put_span(l.table, i, spans[s0 + i], none);
    l.blocks = (2 * l.n_spans + kQ8Warps - 1) / kQ8Warps;
    plan.push_back(l);
  }
  return plan;
}

}  // namespace novograd_cuda
