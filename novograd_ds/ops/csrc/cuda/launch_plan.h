// Launch planning of the NovoGrad CUDA op: which launches a pass makes, which (span, chunk) each block takes,
// and where each block's norm partial goes. No torch or CUDA header: nvcc compiles it into novograd_cuda.cu,
// and g++ compiles it into the sequential emulation of the kernels (tests/cuda_launch_emulation.cpp, run by
// tests/test_launch_plan.py), so the CPU tests exercise exactly the tables the GPU receives.
//
// NOTE: [deterministic norms] A pass over spans is cut into chunks of kChunk elements (a chunk never crosses a
// span); each block of a launch takes one chunk. The norm pass is two-stage:
//   1. every (span, chunk) writes sum(g*g) of its chunk, as a double, to its own slot of a workspace: each
//      thread sums its thread-stride elements in fp32 (at most kChunk / kThreads of them), the block then adds
//      the threads' sums in double through a fixed tree (warp shuffles, then the warps' sums);
//   2. a second kernel adds each layer's slots in a fixed order (one warp per layer: lane l sums slots l,
//      l+32, ... in order, then a fixed shuffle tree) and rounds once to fp32.
// Slots are numbered per layer, in span order then chunk order, independently of how the chunks are packed into
// launches. No atomics anywhere: the same inputs give the same bits on every run, every rank and every launch
// split (kMaxSpans/kMaxBlocks change only the packing, never a sum).
#pragma once

#include <cstdint>
#include <vector>

#include "../novograd_math.h"
#include "../spans.h"

// The limits can be overridden with -D for the emulation test; the op itself is built with the defaults.
#ifndef NOVOGRAD_CUDA_MAX_SPANS
#define NOVOGRAD_CUDA_MAX_SPANS 36
#endif
#ifndef NOVOGRAD_CUDA_MAX_BLOCKS
#define NOVOGRAD_CUDA_MAX_BLOCKS 320
#endif
#ifndef NOVOGRAD_CUDA_CHUNK
#define NOVOGRAD_CUDA_CHUNK 65536
#endif
#ifndef NOVOGRAD_CUDA_THREADS
#define NOVOGRAD_CUDA_THREADS 512
#endif
#ifndef NOVOGRAD_CUDA_FINALIZE_LAYERS
#define NOVOGRAD_CUDA_FINALIZE_LAYERS 480
#endif

namespace novograd_cuda {

using novograd::Span;

constexpr int kMaxSpans = NOVOGRAD_CUDA_MAX_SPANS;     // spans per launch table
constexpr int kMaxBlocks = NOVOGRAD_CUDA_MAX_BLOCKS;   // blocks (chunks) per launch
constexpr int64_t kChunk = NOVOGRAD_CUDA_CHUNK;        // elements per block
constexpr int kThreads = NOVOGRAD_CUDA_THREADS;        // threads per block of the update and norm kernels
constexpr int kWarp = 32;
constexpr int kWarps = kThreads / kWarp;
constexpr int kFinalizeLayers = NOVOGRAD_CUDA_FINALIZE_LAYERS;  // layers per finalize launch
constexpr int kFinalizeThreads = 256;                           // one warp per layer
constexpr int kFinalizeLayersPerBlock = kFinalizeThreads / kWarp;

static_assert(kMaxSpans >= 1 && kMaxSpans <= 256, "block_span is one byte");
static_assert(kMaxBlocks >= 1 && kChunk >= 1 && kFinalizeLayers >= 1, "limits must be positive");
static_assert(kThreads % kWarp == 0 && kWarps >= 1 && kWarps <= kWarp, "the block tree needs 1..32 full warps");

// One launch's spans and the block -> (span, chunk) map, passed by value as the kernel argument: a launch
// needs no host-to-device copy and no synchronisation.
struct LaunchTable {
  float* w[kMaxSpans];
  const void* g[kMaxSpans];
  float* m[kMaxSpans];
  int64_t n[kMaxSpans];
  int64_t slot[kMaxSpans];          // norm pass: the slot of the span's chunk 0; chunk c's slot is slot + c
  int32_t layer[kMaxSpans];         // update pass: index of the denominator
  unsigned char block_span[kMaxBlocks];
  int32_t block_chunk[kMaxBlocks];
};
static_assert(sizeof(LaunchTable) <= 4096, "kernel arguments are limited to 4 KiB on older toolchains");

// One finalize launch: layers [first_layer, first_layer + n_layers); layer first_layer + j owns the slots
// [slot_begin[j], slot_begin[j + 1]).
struct FinalizeTable {
  int64_t first_layer;
  int64_t n_layers;
  int64_t slot_begin[kFinalizeLayers + 1];
};
static_assert(sizeof(FinalizeTable) <= 4096, "kernel arguments are limited to 4 KiB on older toolchains");

struct Launch {
  LaunchTable table;
  int blocks;
};

struct FinalizeLaunch {
  FinalizeTable table;
  int blocks;
};

struct Plan {
  std::vector<Launch> launches;          // the norm-partial or update launches, in order
  std::vector<FinalizeLaunch> finalize;  // the norm pass's second stage (empty for the update pass)
  int64_t n_slots = 0;                   // workspace entries the norm pass writes (one per chunk)
};

NOVOGRAD_HD int64_t chunks_of(int64_t n) { return n > 0 ? (n + kChunk - 1) / kChunk : 0; }

// Chunks (= norm workspace slots) of a pass over `spans`.
inline int64_t count_slots(const Span* spans, int64_t n_spans) {
  int64_t total = 0;
  for (int64_t s = 0; s < n_spans; ++s) total += chunks_of(spans[s].n);
  return total;
}

// The work of block `b` of a launch: span s of the table, elements [begin, end) of it, norm slot `slot`.
struct BlockWork {
  int s;
  int64_t begin, end, slot;
};

NOVOGRAD_HD BlockWork block_work(const LaunchTable& t, int b) {
  BlockWork w;
  w.s = t.block_span[b];
  const int64_t c = t.block_chunk[b];
  w.begin = c * kChunk;
  w.end = t.n[w.s] < w.begin + kChunk ? t.n[w.s] : w.begin + kChunk;
  w.slot = t.slot[w.s] + c;
  return w;
}

// The plan of one pass over `spans` (every layer in [0, n_layers): the caller checked them). Empty spans are
// skipped; a span whose chunks do not fit the current table continues in the next one.
inline Plan make_plan(const Span* spans, int64_t n_spans, int64_t n_layers, bool with_finalize) {
  Plan plan;
  // slot numbering: layer by layer; within a layer, its spans in order, each span's chunks in order
  std::vector<int64_t> begin(static_cast<size_t>(n_layers) + 1, 0);
  for (int64_t s = 0; s < n_spans; ++s) begin[spans[s].layer + 1] += chunks_of(spans[s].n);
  for (int64_t k = 0; k < n_layers; ++k) begin[k + 1] += begin[k];
  plan.n_slots = begin[n_layers];
  if (with_finalize) {
    for (int64_t first = 0; first < n_layers; first += kFinalizeLayers) {
      FinalizeLaunch f{};
      f.table.first_layer = first;
      f.table.n_layers = n_layers - first < kFinalizeLayers ? n_layers - first : kFinalizeLayers;
      for (int64_t j = 0; j <= f.table.n_layers; ++j) f.table.slot_begin[j] = begin[first + j];
      f.blocks = static_cast<int>((f.table.n_layers + kFinalizeLayersPerBlock - 1) / kFinalizeLayersPerBlock);
      plan.finalize.push_back(f);
    }
  }
  std::vector<int64_t> cursor(begin.begin(), begin.end() - 1);  // next free slot of each layer
  Launch cur{};
  int ns = 0, nb = 0;
  for (int64_t s = 0; s < n_spans; ++s) {
    const Span& sp = spans[s];
    const int64_t chunks = chunks_of(sp.n);
    if (chunks == 0) continue;
    const int64_t slot0 = cursor[sp.layer];
    cursor[sp.layer] += chunks;
    for (int64_t c = 0; c < chunks; ++c) {
      if (c == 0 || nb == 0) {  // the span enters this table (again, when its chunks spill into the next)
        cur.table.w[ns] = sp.w;
        cur.table.g[ns] = sp.g;
        cur.table.m[ns] = sp.m;
        cur.table.n[ns] = sp.n;
        cur.table.slot[ns] = slot0;
        cur.table.layer[ns] = static_cast<int32_t>(sp.layer);
        ++ns;
      }
      cur.table.block_span[nb] = static_cast<unsigned char>(ns - 1);
      cur.table.block_chunk[nb] = static_cast<int32_t>(c);
      ++nb;
      if (nb == kMaxBlocks || (ns == kMaxSpans && c == chunks - 1)) {
        cur.blocks = nb;
        plan.launches.push_back(cur);
        cur = Launch{};
        ns = 0;
        nb = 0;
      }
    }
  }
  if (nb > 0) {
    cur.blocks = nb;
    plan.launches.push_back(cur);
  }
  return plan;
}

}  // namespace novograd_cuda
