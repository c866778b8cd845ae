// NovoGrad CUDA kernels, multi-tensor style: one launch covers many tensors or segments, cut into chunks of
// kChunk elements, one chunk per block. The launch's table of spans and the block -> (span, chunk) map travel
// as a kernel argument (under 4 KiB, launch_plan.h), so a launch needs no host-to-device copy and no
// synchronisation. Three kernels: the per-chunk sums of squares, their fixed-order per-layer sum (NOTE:
// [deterministic norms] in launch_plan.h), and the fused update (novograd_math.h).
//
// tests/cuda_launch_emulation.cpp replays these kernels block by block on the CPU: a change to a reduction
// order here must be made there too (test_launch_plan.py then checks the two agree with float64 sums).
// No torch or ATen header here: this file compiles with plain nvcc (scripts/check_cuda_compile.sh).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "novograd_cuda.h"

namespace novograd_cuda {
namespace {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

// x summed over the 32 lanes of a warp through a fixed tree (offsets 16, 8, 4, 2, 1); lane 0 holds the sum.
__device__ __forceinline__ double warp_tree_sum(double x) {
  for (int o = kWarp / 2; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
  return x;
}

// Stage 1: partials[slot] = sum(g*g) over the block's chunk.
template <typename G>
__global__ void __launch_bounds__(kThreads) sq_partials_kernel(LaunchTable t, double* __restrict__ partials) {
  const BlockWork bw = block_work(t, blockIdx.x);
  const G* __restrict__ g = static_cast<const G*>(t.g[bw.s]);
  float acc = 0.f;  // at most kChunk / kThreads (128) terms per thread
  for (int64_t i = bw.begin + threadIdx.x; i < bw.end; i += kThreads) acc += novograd::square(to_float(g[i]));
  __shared__ double warp_sums[kWarps];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const double ws = warp_tree_sum(static_cast<double>(acc));
  if (lane == 0) warp_sums[warp] = ws;
  __syncthreads();
  if (warp == 0) {
    const double total = warp_tree_sum(lane < kWarps ? warp_sums[lane] : 0.0);
    if (lane == 0) partials[bw.slot] = total;
  }
}

// Stage 2: out[layer] = the layer's slots summed in a fixed order, one warp per layer, rounded once to fp32.
__global__ void __launch_bounds__(kFinalizeThreads) finalize_kernel(FinalizeTable t, const double* __restrict__ partials,
                                                                    float* __restrict__ out) {
  const int lane = threadIdx.x % kWarp;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kFinalizeLayersPerBlock + threadIdx.x / kWarp;
  if (j >= t.n_layers) return;  // the whole warp leaves together
  const int64_t b = t.slot_begin[j], e = t.slot_begin[j + 1];
  double x = 0.0;
  for (int64_t i = b + lane; i < e; i += kWarp) x += partials[i];
  x = warp_tree_sum(x);
  if (lane == 0) out[t.first_layer + j] = static_cast<float>(x);
}

template <typename G>
__global__ void __launch_bounds__(kThreads) update_kernel(LaunchTable t, const float* __restrict__ denoms,
                                                          novograd::UpdateScalars sc) {
  const BlockWork bw = block_work(t, blockIdx.x);
  // distinct buffers: __restrict__ lets the compiler keep several iterations' loads in flight
  const G* __restrict__ g = static_cast<const G*>(t.g[bw.s]);
  float* __restrict__ w = t.w[bw.s];
  float* __restrict__ m = t.m[bw.s];
  const float d = denoms[t.layer[bw.s]];
#pragma unroll 4
  for (int64_t i = bw.begin + threadIdx.x; i < bw.end; i += kThreads) {
    float wi = w[i], mi = m[i];
    novograd::update_element(to_float(g[i]), wi, mi, d, sc);
    w[i] = wi;
    m[i] = mi;
  }
}

int last_error() { return static_cast<int>(cudaGetLastError()); }

template <typename G>
int sq_norms_typed(const Span* spans, int64_t n_spans, int64_t n_layers, double* partials, float* out,
                   cudaStream_t stream) {
  const Plan plan = make_plan(spans, n_spans, n_layers, /*with_finalize=*/true);
  for (const Launch& l : plan.launches) {
    sq_partials_kernel<G><<<l.blocks, kThreads, 0, stream>>>(l.table, partials);
    if (const int err = last_error()) return err;
  }
  for (const FinalizeLaunch& f : plan.finalize) {
    finalize_kernel<<<f.blocks, kFinalizeThreads, 0, stream>>>(f.table, partials, out);
    if (const int err = last_error()) return err;
  }
  return static_cast<int>(cudaSuccess);
}

template <typename G>
int update_typed(const Span* spans, int64_t n_spans, int64_t n_layers, const float* denoms,
                 novograd::UpdateScalars sc, cudaStream_t stream) {
  const Plan plan = make_plan(spans, n_spans, n_layers, /*with_finalize=*/false);
  for (const Launch& l : plan.launches) {
    update_kernel<G><<<l.blocks, kThreads, 0, stream>>>(l.table, denoms, sc);
    if (const int err = last_error()) return err;
  }
  return static_cast<int>(cudaSuccess);
}

}  // namespace

int launch_sq_norms(const Span* spans, int64_t n_spans, int64_t n_layers, GradDtype dtype, double* partials,
                    float* out, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kFloat32: return sq_norms_typed<float>(spans, n_spans, n_layers, partials, out, st);
    case kBFloat16: return sq_norms_typed<__nv_bfloat16>(spans, n_spans, n_layers, partials, out, st);
    case kFloat16: return sq_norms_typed<__half>(spans, n_spans, n_layers, partials, out, st);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int launch_update(const Span* spans, int64_t n_spans, int64_t n_layers, GradDtype dtype, const float* denoms,
                  novograd::UpdateScalars scalars, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kFloat32: return update_typed<float>(spans, n_spans, n_layers, denoms, scalars, st);
    case kBFloat16: return update_typed<__nv_bfloat16>(spans, n_spans, n_layers, denoms, scalars, st);
    case kFloat16: return update_typed<__half>(spans, n_spans, n_layers, denoms, scalars, st);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

const char* error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

}  // namespace novograd_cuda
