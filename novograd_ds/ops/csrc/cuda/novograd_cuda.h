// Launchers of the NovoGrad CUDA kernels. Torch-free: included by novograd_cuda.cu (nvcc, no torch headers)
// and by bindings.cpp (the only file that touches torch).
#pragma once

#include <cstdint>

#include "../novograd_math.h"

namespace novograd_cuda {

enum GradDtype : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// One contiguous run of one layer's elements on the device: a whole tensor or a segment of a flat tensor.
struct Span {
  float* w;       // parameter, fp32 (unused by the norm pass)
  const void* g;  // gradient, of the call's GradDtype
  float* m;       // exp_avg, fp32 (unused by the norm pass)
  int64_t n;      // elements
  int64_t layer;  // index into the norm output / denominators
};

// out[layer] += sum(g*g) over every span of the layer (fp32 accumulation; out must be zeroed by the caller).
// `spans` is host memory; the launches are queued on `stream` (a cudaStream_t). Returns a cudaError_t.
int launch_sq_norms(const Span* spans, int64_t n_spans, GradDtype dtype, float* out, void* stream);

// The fused update of every span with denominator denoms[layer] (device memory), novograd_math.h's rule.
int launch_update(const Span* spans, int64_t n_spans, GradDtype dtype, const float* denoms,
                  novograd::UpdateScalars scalars, void* stream);

const char* error_string(int err);

}  // namespace novograd_cuda
