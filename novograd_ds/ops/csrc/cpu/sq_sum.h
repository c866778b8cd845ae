// The fused CPU op's sum of squares of one chunk and the per-layer second moment of the layer-at-a-time steps,
// shared by novograd_cpu.cpp (sq_norms, layer_step) and novograd_q8.cpp (q8_layer_step): the same chunking and the
// same order of every sum, so a layer's norm is bit for bit the same whichever entry point computes it.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "../novograd_math.h"
#include "simd.h"

namespace novograd_cpu {

constexpr int64_t kChunk = 1 << 16;  // elements per work item of the norm pass: 256 KiB of fp32

// sum(g*g) of g[0:n], returned in double. The vector part reads four quarters of the chunk side by side: four
// concurrent streams keep more cache-line fills in flight than one (about 30 % faster read-only on a 2-core
// AMD EPYC VM). Each stream has its own fp32 accumulator, flushed into the double every kSub elements, so no
// fp32 lane adds up more than kSub / W terms. What the quarters leave over goes through one stream, then the
// scalar tail. Fixed order for a given n: deterministic.
constexpr int64_t kSub = 256;
#ifndef NOVOGRAD_NORM_PREFETCH
#define NOVOGRAD_NORM_PREFETCH 512
#endif
constexpr int64_t kNormPrefetch = NOVOGRAD_NORM_PREFETCH;  // elements ahead of each stream

template <typename G>
inline double chunk_sq_sum(const G* g, int64_t n) {
  int64_t i = 0;
  double total = 0.0;
#if defined(__AVX512F__) || defined(__AVX2__)
  const int64_t q = n / (4 * kSub) * kSub;  // elements per stream
  const G* g1 = g + q;
  const G* g2 = g + 2 * q;
  const G* g3 = g + 3 * q;
  for (int64_t j = 0; j < q; j += kSub) {
    vfloat acc0 = vzero(), acc1 = vzero(), acc2 = vzero(), acc3 = vzero();
    for (int64_t k = j; k < j + kSub; k += W) {
      if (((k * static_cast<int64_t>(sizeof(G))) & 63) == 0) {  // one hint per cache line and stream
        _mm_prefetch(reinterpret_cast<const char*>(g + k + kNormPrefetch), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(g1 + k + kNormPrefetch), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(g2 + k + kNormPrefetch), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(g3 + k + kNormPrefetch), _MM_HINT_T0);
      }
      const vfloat x0 = vload(g + k), x1 = vload(g1 + k), x2 = vload(g2 + k), x3 = vload(g3 + k);
      acc0 = vadd(acc0, vmul(x0, x0));
      acc1 = vadd(acc1, vmul(x1, x1));
      acc2 = vadd(acc2, vmul(x2, x2));
      acc3 = vadd(acc3, vmul(x3, x3));
    }
    total += static_cast<double>(vsum(vadd(vadd(acc0, acc1), vadd(acc2, acc3))));
  }
  i = 4 * q;
  while (i + W <= n) {
    const int64_t stop = std::min(n, i + kSub);
    vfloat acc = vzero();
    for (; i + W <= stop; i += W) {
      const vfloat x = vload(g + i);
      acc = vadd(acc, vmul(x, x));
    }
    total += static_cast<double>(vsum(acc));
  }
#endif
  float tail = 0.f;
  for (; i < n; ++i) {
    tail += novograd::square(to_float(g[i]));
    if (((n - i) & (kSub - 1)) == 1) {  // scalar build: flush into the double every kSub elements too
      total += static_cast<double>(tail);
      tail = 0.f;
    }
  }
  return total + static_cast<double>(tail);
}

// NOTE: [v in double] (optimizer.py) in C++: v = a2*v + c2*n evaluated in double and rounded once, amsgrad's
// max, d = sqrt(v) + eps in double rounded once; returns d. `vmax` may be nullptr (no amsgrad).
inline float second_moment_step(float n_sq, float* v, float* vmax, double a2, double c2, double eps) {
  const double ema = static_cast<double>(*v) * a2 + static_cast<double>(n_sq) * c2;  // v = a2*v + c2*n
  *v = static_cast<float>(ema);
  float used = *v;
  if (vmax != nullptr) {  // amsgrad: vmax = max(vmax, v)
    *vmax = std::max(*vmax, *v);
    used = *vmax;
  }
  return static_cast<float>(std::sqrt(static_cast<double>(used)) + eps);  // d = sqrt(v) + eps
}

}  // namespace novograd_cpu
