// Launchers of the NovoGrad CUDA kernels. Torch-free: included by novograd_cuda.cu (nvcc, no torch headers)
// and by bindings.cpp (the only file that touches torch).
#pragma once

#include <cstdint>

#include "../novograd_math.h"
#include "../spans.h"
#include "launch_plan.h"
#include "q8_plan.h"

namespace novograd_cuda {

enum GradDtype : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// out[layer] = sum(g*g) over every span of the layer, for every layer in [0, n_layers) (0 for a layer without
// spans), deterministically: NOTE: [deterministic norms] in launch_plan.h. `partials` is a device workspace of
// count_slots(spans, n_spans) doubles (may be nullptr when that is 0); `out` is device memory of n_layers
// floats, written whole (no need to zero it). `spans` is host memory, every layer in [0, n_layers); the
// launches are queued on `stream` (a cudaStream_t) with no host-to-device copy. Returns a cudaError_t.
int launch_sq_norms(const Span* spans, int64_t n_spans, int64_t n_layers, GradDtype dtype, double* partials,
                    float* out, void* stream);

// The fused update of every span with denominator denoms[layer] (device memory, n_layers entries),
// novograd_math.h's rule.
int launch_update(const Span* spans, int64_t n_spans, int64_t n_layers, GradDtype dtype, const float* denoms,
                  novograd::UpdateScalars scalars, void* stream);

// The 8-bit moment (NOTE: [8-bit launches] in q8_plan.h): dequantise, update w and m, block scales (a partial
// block's from `boundary`, device memory [n_runs, 2], may be nullptr when no run has a partial block), quantise.
// `denoms` is device memory indexed by each span's layer.
int launch_q8_update(const novograd::QSpan* spans, int64_t n_spans, GradDtype dtype, const float* denoms,
                     const float* boundary, novograd::UpdateScalars scalars, novograd::q8::Q8Scalars qs, void* stream);

// out[2 run + end] = the run's local max |m_new| over its partial first (end 0) / last (end 1) block, 0 where that
// block is not partial; every row of every span written.
int launch_q8_boundary(const novograd::QSpan* spans, int64_t n_spans, GradDtype dtype, const float* denoms,
                       novograd::UpdateScalars scalars, int map, float* out, void* stream);

const char* error_string(int err);

}  // namespace novograd_cuda
