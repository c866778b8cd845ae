// Torch-side helpers shared by the fused CPU op's translation units (novograd_cpu.cpp, novograd_q8.cpp): the
// gradient dtype dispatch, argument checks and the per-call scalars.
#pragma once

#include <torch/extension.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <vector>

#include "../novograd_math.h"

namespace novograd_cpu {

enum class GradKind { kFloat, kBFloat16, kHalf };

inline GradKind grad_kind(at::ScalarType t, const char* what) {
  switch (t) {
    case at::kFloat: return GradKind::kFloat;
    case at::kBFloat16: return GradKind::kBFloat16;
    case at::kHalf: return GradKind::kHalf;
    default:
      TORCH_CHECK(false, "novograd_ds fused CPU op: ", what, " has dtype ", t,
                  "; it supports float32, bfloat16 and float16 gradients (use foreach=True for others)");
  }
}

template <typename Fn>
inline void dispatch_grad(GradKind k, Fn&& fn) {
  switch (k) {
    case GradKind::kFloat: fn(static_cast<const float*>(nullptr)); break;
    case GradKind::kBFloat16: fn(static_cast<const c10::BFloat16*>(nullptr)); break;
    case GradKind::kHalf: fn(static_cast<const c10::Half*>(nullptr)); break;
  }
}

inline void check_dense(const at::Tensor& t, const char* what, int64_t i) {
  TORCH_CHECK(t.device().is_cpu(), "novograd_ds fused CPU op: ", what, "[", i, "] is on ", t.device(), ", not the CPU");
  TORCH_CHECK(t.is_contiguous(), "novograd_ds fused CPU op: ", what, "[", i, "] is not contiguous");
}

inline novograd::UpdateScalars scalars(double lr, double a1, double c1, double wd, bool decoupled) {
  // float(x) of each Python double, as torch does when it multiplies an fp32 tensor by a Python scalar
  return {static_cast<float>(lr), static_cast<float>(a1), static_cast<float>(c1), static_cast<float>(wd),
          decoupled ? 1 : 0};
}

inline void check_state(const at::Tensor& t, const char* what, int64_t i, int64_t numel) {
  check_dense(t, what, i);
  TORCH_CHECK(t.scalar_type() == at::kFloat, "novograd_ds fused CPU op: ", what, "[", i, "] has dtype ",
              t.scalar_type(), "; the fused op needs float32 parameters and state (use foreach=True for others)");
  TORCH_CHECK(t.numel() == numel, "novograd_ds fused CPU op: ", what, "[", i, "] has ", t.numel(),
              " elements, its gradient ", numel);
}

inline GradKind common_grad_kind(const std::vector<at::Tensor>& grads) {
  GradKind kind = GradKind::kFloat;
  for (size_t i = 0; i < grads.size(); ++i) {
    check_dense(grads[i], "grads", i);
    GradKind k = grad_kind(grads[i].scalar_type(), "a gradient");
    TORCH_CHECK(i == 0 || k == kind, "novograd_ds fused CPU op: all gradients of one call must share a dtype");
    kind = k;
  }
  return kind;
}

inline const float* checked_denoms(const at::Tensor& denoms, int64_t n) {
  TORCH_CHECK(denoms.device().is_cpu() && denoms.scalar_type() == at::kFloat && denoms.is_contiguous() &&
                  denoms.dim() == 1 && denoms.numel() == n,
              "novograd_ds fused CPU op: denominators must be a contiguous CPU float32 vector of ", n,
              " entries, got ", denoms.sizes(), " ", denoms.scalar_type());
  return denoms.data_ptr<float>();
}

}  // namespace novograd_cpu
