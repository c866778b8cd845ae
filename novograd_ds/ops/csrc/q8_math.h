// The 8-bit moment's per-element math and layout, shared by the CPU op (g++), the CUDA op (nvcc) and the CUDA
// emulation of tests/test_q8_launch_plan.py. No torch or CUDA header.
//
// This is NOTE: [8-bit moment] of novograd_ds/kernels/eightbit.py, operation for operation (the Python backends
// evaluate the same IEEE fp32 operations in the same order, so codes and scales agree bit for bit):
//
//   block b of a layer = its elements [256 b, 256 b + 256); a run [start, start + n) of a layer keeps one scale
//   (the block's max |m|) per block it touches and one int8 code per element;
//   m_old = dequant(code, scale);  update_element(g, w, m) -> w, m_new   (novograd_math.h)
//   A = max |m_new| over the block (boundary blocks: the all-reduced value the caller passes);  code = quant(m_new, A)
//
// Maps: linear  m = q * (A/127),        t = m * (127/A),   q = rint(t)   | floor(t + u)
//       sqrt    m = (q|q|) * (A/16129), t = |m| * (16129/A), k = floor(sqrt(t)) exactly,
//                                        |q| = k + (t >= k(k+1) + 0.5)  | k + (u*(2k+1) < t - k*k),  sign of m
// Stochastic u: 8 bits (a byte of a counter-based hash of (seed, step, layer key, element index in the layer / 4)).
#pragma once

#include <math.h>
#include <stdint.h>

#include "novograd_math.h"

namespace novograd {
namespace q8 {

constexpr int64_t kBlock = 256;  // elements per scale, aligned to the layer's element 0
constexpr int kQmax = 127;       // codes in [-127, 127]
constexpr float kLinearDen = 127.0f;
constexpr float kSqrtDen = 16129.0f;  // 127 * 127

enum Map : int { kLinear = 0, kSqrt = 1 };
enum Rounding : int { kNearest = 0, kStochastic = 1 };

// The per-call quantisation settings (besides UpdateScalars): the map, the rounding and the stochastic stream.
struct Q8Scalars {
  int map;        // Map
  int rounding;   // Rounding
  uint32_t seed;  // low 32 bits of the seed
  uint32_t step;  // low 32 bits of the layers' step count
};

// -- stochastic rounding: a counter-based hash (xorshift-multiply, constants from a published search of 32-bit
// mixers), so u depends only on (seed, step, key, index): the same on every backend and under every sharding.
NOVOGRAD_HD uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x21F0AAADu;
  x ^= x >> 15;
  x *= 0x735A2D97u;
  x ^= x >> 15;
  return x;
}

// Per (seed, layer key, step).
NOVOGRAD_HD uint32_t stream_base(uint32_t seed, uint32_t key, uint32_t step) {
  return hash32(hash32(hash32(step) ^ key) ^ seed);
}

// Per run of elements whose word index (index >> 2) shares its high 32 bits (any 65536-aligned chunk).
NOVOGRAD_HD uint32_t index_base(uint32_t base, int64_t index) {
  return hash32(base ^ static_cast<uint32_t>(static_cast<uint64_t>(index) >> 34));
}

// The hash of the word holding the element at `index` (four elements per word, a byte each).
NOVOGRAD_HD uint32_t word_hash(uint32_t ib, int64_t index) {
  return hash32(ib ^ static_cast<uint32_t>(static_cast<uint64_t>(index) >> 2));
}

// u in (0, 1) of the element at `index` of the layer: (byte (index & 3) of word_hash + 0.5) / 256, exact in fp32.
// 8 random bits bias a stochastic rounding by at most 1/512 of a code step.
NOVOGRAD_HD float byte_uniform(uint32_t byte) { return (static_cast<float>(byte) + 0.5f) * (1.0f / 256.0f); }
NOVOGRAD_HD float uniform(uint32_t ib, int64_t index) {
  return byte_uniform((word_hash(ib, index) >> (8 * static_cast<uint32_t>(index & 3))) & 255u);
}

// -- the maps -------------------------------------------------------------------------------------------------
// Per block: the factor from a code (linear) or q|q| (sqrt) to a value.
NOVOGRAD_HD float dequant_step(float absmax, int map) {
  return map == kLinear ? absmax / kLinearDen : absmax / kSqrtDen;
}

// Per block: the factor from a value to the code domain; 0 for an all-zero block (every code 0).
NOVOGRAD_HD float quant_inv(float absmax, int map) {
  return absmax > 0.0f ? (map == kLinear ? kLinearDen : kSqrtDen) / absmax : 0.0f;
}

NOVOGRAD_HD float dequant(int8_t code, float step, int map) {
  const float q = static_cast<float>(code);
  return map == kLinear ? q * step : (q * fabsf(q)) * step;  // q|q| <= 16129: exact in fp32
}

// The code of m given its block's quant_inv; u is used by stochastic rounding only.
NOVOGRAD_HD int8_t quant(float m, float inv, int map, int rounding, float u) {
  float q;
  if (map == kLinear) {
    const float t = m * inv;
    q = rounding == kNearest ? rintf(t) : floorf(t + u);  // rint: ties to even, as torch.round
    q = q < -127.0f ? -127.0f : (q > 127.0f ? 127.0f : q);
  } else {
    const float t = fabsf(m) * inv;  // <= 16129 (1 + 2^-23); above, |q| clamps to 127
    // k = floor(sqrt(t)) exactly: sqrtf is correctly rounded (IEEE; nvcc's default -prec-sqrt=true), so it never
    // falls below an integer it should reach, but may round up onto one, which the correction undoes
    float k = floorf(sqrtf(t));
    if (k * k > t) k = k - 1.0f;
    const bool up = rounding == kNearest ? (t >= k * (k + 1.0f) + 0.5f) : (u * (2.0f * k + 1.0f) < t - k * k);
    float qm = k + (up ? 1.0f : 0.0f);
    qm = qm > 127.0f ? 127.0f : qm;
    q = m < 0.0f ? -qm : qm;
  }
  return static_cast<int8_t>(static_cast<int>(q));
}

// -- layout ---------------------------------------------------------------------------------------------------
// Blocks a run [start, start + n) of a layer touches: [first, first + count).
NOVOGRAD_HD int64_t first_block(int64_t start) { return start / kBlock; }
NOVOGRAD_HD int64_t block_count(int64_t start, int64_t n) {
  return n > 0 ? (start + n - 1) / kBlock - start / kBlock + 1 : 0;
}

// Whether the run's first / last block is partial: the run lacks some of that block's elements in the layer.
NOVOGRAD_HD bool first_partial(int64_t start, int64_t n, int64_t layer_numel) {
  if (n <= 0) return false;
  const int64_t b = start / kBlock;
  const int64_t block_end = (b + 1) * kBlock < layer_numel ? (b + 1) * kBlock : layer_numel;
  return start > b * kBlock || start + n < block_end;
}
NOVOGRAD_HD bool last_partial(int64_t start, int64_t n, int64_t layer_numel) {
  if (n <= 0) return false;
  const int64_t b = (start + n - 1) / kBlock;
  const int64_t block_end = (b + 1) * kBlock < layer_numel ? (b + 1) * kBlock : layer_numel;
  return start + n < block_end || start > b * kBlock;
}

// The scale a run's block j (0-based among its blocks) is quantised with: the boundary value of a partial first
// (bnd0) or last (bnd1) block, else the block's own max. A run inside one block uses bnd0.
NOVOGRAD_HD float block_absmax(int64_t j, int64_t count, bool fp, bool lp, float local, float bnd0, float bnd1) {
  if (j == 0 && fp) return bnd0;
  if (j == count - 1 && lp) return bnd1;
  return local;
}

}  // namespace q8
}  // namespace novograd
