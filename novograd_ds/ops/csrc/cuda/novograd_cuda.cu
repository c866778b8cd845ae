// NovoGrad CUDA kernels, multi-tensor style: one launch covers many tensors or segments, cut into chunks of
// kChunk elements, one chunk per block. The launch's table of spans (pointers, lengths, layer ids) and the
// block -> (span, chunk) map travel as a kernel argument (under 4 KiB), so a launch needs no host-to-device
// copy and no synchronisation. Two kernels, as on the CPU: the per-layer sum of squares and the fused update
// (novograd_math.h). No torch or ATen header here: this file compiles with plain nvcc (scripts/check_cuda_compile.sh).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "novograd_cuda.h"

namespace novograd_cuda {
namespace {

constexpr int kMaxSpans = 36;   // spans per launch
constexpr int kMaxBlocks = 320; // blocks (chunks) per launch
constexpr int64_t kChunk = 65536;
constexpr int kThreads = 512;

struct LaunchTable {
  float* w[kMaxSpans];
  const void* g[kMaxSpans];
  float* m[kMaxSpans];
  int64_t n[kMaxSpans];
  int64_t layer[kMaxSpans];
  unsigned char block_span[kMaxBlocks];
  int block_chunk[kMaxBlocks];
};
static_assert(sizeof(LaunchTable) <= 4096, "kernel arguments are limited to 4 KiB on older toolchains");

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename G>
__global__ void __launch_bounds__(kThreads) sq_norms_kernel(LaunchTable t, float* out) {
  const int s = t.block_span[blockIdx.x];
  const int64_t begin = static_cast<int64_t>(t.block_chunk[blockIdx.x]) * kChunk;
  const int64_t end = min(t.n[s], begin + kChunk);
  const G* __restrict__ g = static_cast<const G*>(t.g[s]);
  float acc = 0.f;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) acc += novograd::square(to_float(g[i]));
  // block reduction: warp shuffles, then one value per warp through shared memory
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, o);
  __shared__ float warp_sums[kThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = acc;
  __syncthreads();
  if (warp == 0) {
    acc = lane < kThreads / 32 ? warp_sums[lane] : 0.f;
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, o);
    if (lane == 0) atomicAdd(out + t.layer[s], acc);
  }
}

template <typename G>
__global__ void __launch_bounds__(kThreads) update_kernel(LaunchTable t, const float* denoms, novograd::UpdateScalars sc) {
  const int s = t.block_span[blockIdx.x];
  const int64_t begin = static_cast<int64_t>(t.block_chunk[blockIdx.x]) * kChunk;
  const int64_t end = min(t.n[s], begin + kChunk);
  // distinct buffers: __restrict__ lets the compiler keep several iterations' loads in flight
  const G* __restrict__ g = static_cast<const G*>(t.g[s]);
  float* __restrict__ w = t.w[s];
  float* __restrict__ m = t.m[s];
  const float d = denoms[t.layer[s]];
#pragma unroll 4
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    float wi = w[i], mi = m[i];
    novograd::update_element(to_float(g[i]), wi, mi, d, sc);
    w[i] = wi;
    m[i] = mi;
  }
}

// Walk the spans, filling tables of at most kMaxSpans spans and kMaxBlocks chunks, and launch each full table.
template <typename Launch>
int for_each_launch(const Span* spans, int64_t n_spans, Launch&& launch) {
  LaunchTable t;
  int ns = 0, nb = 0;
  for (int64_t s = 0; s < n_spans; ++s) {
    const int64_t n = spans[s].n;
    if (n == 0) continue;
    const int64_t chunks = (n + kChunk - 1) / kChunk;
    for (int64_t c = 0; c < chunks; ++c) {
      if (c == 0 || nb == 0) {  // the span enters this table (again, when its chunks spill into the next)
        t.w[ns] = spans[s].w;
        t.g[ns] = spans[s].g;
        t.m[ns] = spans[s].m;
        t.n[ns] = n;
        t.layer[ns] = spans[s].layer;
        ++ns;
      }
      t.block_span[nb] = static_cast<unsigned char>(ns - 1);
      t.block_chunk[nb] = static_cast<int>(c);
      ++nb;
      const bool last_chunk = c == chunks - 1;
      if (nb == kMaxBlocks || (ns == kMaxSpans && last_chunk)) {
        launch(t, nb);
        const cudaError_t err = cudaGetLastError();
        if (err != cudaSuccess) return static_cast<int>(err);
        ns = 0;
        nb = 0;
      }
    }
  }
  if (nb > 0) {
    launch(t, nb);
    return static_cast<int>(cudaGetLastError());
  }
  return static_cast<int>(cudaSuccess);
}

template <typename G>
int sq_norms_typed(const Span* spans, int64_t n_spans, float* out, cudaStream_t stream) {
  return for_each_launch(spans, n_spans, [&](const LaunchTable& t, int nb) {
    sq_norms_kernel<G><<<nb, kThreads, 0, stream>>>(t, out);
  });
}

template <typename G>
int update_typed(const Span* spans, int64_t n_spans, const float* denoms, novograd::UpdateScalars sc,
                 cudaStream_t stream) {
  return for_each_launch(spans, n_spans, [&](const LaunchTable& t, int nb) {
    update_kernel<G><<<nb, kThreads, 0, stream>>>(t, denoms, sc);
  });
}

}  // namespace

int launch_sq_norms(const Span* spans, int64_t n_spans, GradDtype dtype, float* out, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kFloat32: return sq_norms_typed<float>(spans, n_spans, out, st);
    case kBFloat16: return sq_norms_typed<__nv_bfloat16>(spans, n_spans, out, st);
    case kFloat16: return sq_norms_typed<__half>(spans, n_spans, out, st);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int launch_update(const Span* spans, int64_t n_spans, GradDtype dtype, const float* denoms,
                  novograd::UpdateScalars scalars, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kFloat32: return update_typed<float>(spans, n_spans, denoms, scalars, st);
    case kBFloat16: return update_typed<__nv_bfloat16>(spans, n_spans, denoms, scalars, st);
    case kFloat16: return update_typed<__half>(spans, n_spans, denoms, scalars, st);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

const char* error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

}  // namespace novograd_cuda
