// The 8-bit moment's CUDA kernels (NOTE: [8-bit moment] in novograd_ds/kernels/eightbit.py; launches: NOTE: [8-bit
// launches] in q8_plan.h). One warp per layer block of 256 elements (8 per lane), the per-element math of q8_math.h
// and novograd_math.h shared with the CPU op, the block's max |m| by a shuffle-xor tree (exact). No torch header.
//
// tests/cuda_q8_emulation.cpp replays these kernels warp by warp on the CPU: a change here must be made there too.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "novograd_cuda.h"

namespace novograd_cuda {
namespace {

namespace q8 = novograd::q8;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

__device__ __forceinline__ float warp_max(float x) {
  for (int o = kQ8Warp / 2; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

template <typename G, int kMap, int kRnd>
__global__ void __launch_bounds__(kQ8Threads) q8_update_kernel(Q8LaunchTable t, const float* __restrict__ denoms,
                                                               const float* __restrict__ boundary,
                                                               novograd::UpdateScalars sc) {
  const Q8ChunkWork cw = q8_chunk_work(t, blockIdx.x);
  const int s = cw.s;
  const G* __restrict__ g = static_cast<const G*>(t.g[s]);
  float* __restrict__ w = t.w[s];
  int8_t* __restrict__ q = t.q[s];
  float* __restrict__ scale = t.scale[s];
  const int64_t start = t.start[s], n = t.n[s];
  const float d = denoms[t.layer[s]];
  const int64_t fb = q8::first_block(start), count = q8::block_count(start, n);
  const bool fp = q8::first_partial(start, n, t.layer_numel[s]), lp = q8::last_partial(start, n, t.layer_numel[s]);
  const float bnd0 = fp ? boundary[2 * t.run[s]] : 0.0f, bnd1 = lp ? boundary[2 * t.run[s] + 1] : 0.0f;
  const int lane = threadIdx.x % kQ8Warp, warp = threadIdx.x / kQ8Warp;
  const int64_t b_first = (start + cw.lo) / q8::kBlock, b_last = (start + cw.hi - 1) / q8::kBlock;
  for (int64_t b = b_first + warp; b <= b_last; b += kQ8Warps) {
    const int64_t j = b - fb;
    const int64_t e0 = b * q8::kBlock - start;  // run-local index of the block's element 0 (< 0: before the run)
    const int64_t elo = e0 > cw.lo ? e0 : cw.lo, ehi = e0 + q8::kBlock < cw.hi ? e0 + q8::kBlock : cw.hi;
    const float step = q8::dequant_step(scale[j], kMap);
    float mv[kQ8PerLane];
    float amax = 0.0f;
#pragma unroll
    for (int k = 0; k < kQ8PerLane; ++k) {
      const int64_t e = e0 + lane + kQ8Warp * k;
      mv[k] = 0.0f;
      if (e >= elo && e < ehi) {
        float m = q8::dequant(q[e], step, kMap);
        float wi = w[e];
        novograd::update_element(to_float(g[e]), wi, m, d, sc);
        w[e] = wi;
        mv[k] = m;
        amax = fmaxf(amax, fabsf(m));
      }
    }
    amax = warp_max(amax);
    const float a = q8::block_absmax(j, count, fp, lp, amax, bnd0, bnd1);
    const float inv = q8::quant_inv(a, kMap);
    const uint32_t ib = q8::index_base(t.base[s], b * q8::kBlock);
#pragma unroll
    for (int k = 0; k < kQ8PerLane; ++k) {
      const int64_t e = e0 + lane + kQ8Warp * k;
      if (e >= elo && e < ehi) {
        const float u = kRnd == q8::kStochastic ? q8::uniform(ib, start + e) : 0.0f;
        q[e] = q8::quant(mv[k], inv, kMap, kRnd, u);
      }
    }
    if (lane == 0) scale[j] = a;
  }
}

template <typename G, int kMap>
__global__ void __launch_bounds__(kQ8Threads) q8_boundary_kernel(Q8LaunchTable t, int n_spans,
                                                                 const float* __restrict__ denoms,
                                                                 novograd::UpdateScalars sc, float* __restrict__ out) {
  const int item = blockIdx.x * kQ8Warps + threadIdx.x / kQ8Warp;
  if (item >= 2 * n_spans) return;  // the whole warp leaves together
  const int s = item / 2, col = item % 2, lane = threadIdx.x % kQ8Warp;
  const int64_t start = t.start[s], n = t.n[s];
  const bool partial = col == 0 ? q8::first_partial(start, n, t.layer_numel[s])
                                : q8::last_partial(start, n, t.layer_numel[s]);
  float amax = 0.0f;
  if (partial) {
    const G* __restrict__ g = static_cast<const G*>(t.g[s]);
    const int64_t j = col == 0 ? 0 : q8::block_count(start, n) - 1;
    const int64_t e0 = (q8::first_block(start) + j) * q8::kBlock - start;
    const int64_t elo = e0 > 0 ? e0 : 0, ehi = e0 + q8::kBlock < n ? e0 + q8::kBlock : n;
    const float step = q8::dequant_step(t.scale[s][j], kMap), d = denoms[t.layer[s]];
#pragma unroll
    for (int k = 0; k < kQ8PerLane; ++k) {
      const int64_t e = e0 + lane + kQ8Warp * k;
      if (e >= elo && e < ehi) {
        float m = q8::dequant(t.q[s][e], step, kMap);
        float wi = t.w[s][e];
        novograd::update_element(to_float(g[e]), wi, m, d, sc);
        amax = fmaxf(amax, fabsf(m));
      }
    }
  }
  amax = warp_max(amax);
  if (lane == 0) out[2 * t.run[s] + col] = partial ? amax : 0.0f;
}

int last_error() { return static_cast<int>(cudaGetLastError()); }

template <typename G, int kMap, int kRnd>
int q8_update_typed(const std::vector<Q8Launch>& plan, const float* denoms, const float* boundary,
                    novograd::UpdateScalars sc, cudaStream_t stream) {
  for (const Q8Launch& l : plan) {
    q8_update_kernel<G, kMap, kRnd><<<l.blocks, kQ8Threads, 0, stream>>>(l.table, denoms, boundary, sc);
    if (const int err = last_error()) return err;
  }
  return static_cast<int>(cudaSuccess);
}

template <typename G>
int q8_update_by_map(const std::vector<Q8Launch>& plan, const float* denoms, const float* boundary,
                     novograd::UpdateScalars sc, q8::Q8Scalars qs, cudaStream_t st) {
  if (qs.map == q8::kLinear)
    return qs.rounding == q8::kNearest ? q8_update_typed<G, q8::kLinear, q8::kNearest>(plan, denoms, boundary, sc, st)
                                       : q8_update_typed<G, q8::kLinear, q8::kStochastic>(plan, denoms, boundary, sc, st);
  return qs.rounding == q8::kNearest ? q8_update_typed<G, q8::kSqrt, q8::kNearest>(plan, denoms, boundary, sc, st)
                                     : q8_update_typed<G, q8::kSqrt, q8::kStochastic>(plan, denoms, boundary, sc, st);
}

template <typename G>
int q8_boundary_typed(const std::vector<Q8Launch>& plan, const float* denoms, novograd::UpdateScalars sc, int map,
                      float* out, cudaStream_t stream) {
  for (const Q8Launch& l : plan) {
    if (map == q8::kLinear)
      q8_boundary_kernel<G, q8::kLinear><<<l.blocks, kQ8Threads, 0, stream>>>(l.table, l.n_spans, denoms, sc, out);
    else
      q8_boundary_kernel<G, q8::kSqrt><<<l.blocks, kQ8Threads, 0, stream>>>(l.table, l.n_spans, denoms, sc, out);
    if (const int err = last_error()) return err;
  }
  return static_cast<int>(cudaSuccess);
}

}  // namespace

int launch_q8_update(const novograd::QSpan* spans, int64_t n_spans, GradDtype dtype, const float* denoms,
                     const float* boundary, novograd::UpdateScalars scalars, novograd::q8::Q8Scalars qs, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const std::vector<Q8Launch> plan = make_q8_update_plan(spans, n_spans, qs);
  switch (dtype) {
    case kFloat32: return q8_update_by_map<float>(plan, denoms, boundary, scalars, qs, st);
    case kBFloat16: return q8_update_by_map<__nv_bfloat16>(plan, denoms, boundary, scalars, qs, st);
    case kFloat16: return q8_update_by_map<__half>(plan, denoms, boundary, scalars, qs, st);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int launch_q8_boundary(const novograd::QSpan* spans, int64_t n_spans, GradDtype dtype, const float* denoms,
                       novograd::UpdateScalars scalars, int map, float* out, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const std::vector<Q8Launch> plan = make_q8_boundary_plan(spans, n_spans);
  switch (dtype) {
    case kFloat32: return q8_boundary_typed<float>(plan, denoms, scalars, map, out, st);
    case kBFloat16: return q8_boundary_typed<__nv_bfloat16>(plan, denoms, scalars, map, out, st);
    case kFloat16: return q8_boundary_typed<__half>(plan, denoms, scalars, map, out, st);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace novograd_cuda
