// Python bindings of the NovoGrad CUDA op: the only CUDA-side file that touches torch. It checks the tensors,
// turns them into Spans (novograd_cuda.h) and calls the torch-free launchers on the current CUDA stream.
// Same entry points and semantics as the CPU op (csrc/cpu/novograd_cpu.cpp).
#include <torch/extension.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <string>
#include <vector>

#include "novograd_cuda.h"

namespace {

using novograd_cuda::GradDtype;
using novograd_cuda::Span;

GradDtype grad_dtype(const at::Tensor& g) {
  switch (g.scalar_type()) {
    case at::kFloat: return novograd_cuda::kFloat32;
    case at::kBFloat16: return novograd_cuda::kBFloat16;
    case at::kHalf: return novograd_cuda::kFloat16;
    default:
      TORCH_CHECK(false, "novograd_ds fused CUDA op: gradient dtype ", g.scalar_type(),
                  " is not supported (float32, bfloat16, float16); use foreach=True");
  }
}

void check_dense(const at::Tensor& t, const at::Device& dev, const char* what, size_t i) {
  TORCH_CHECK(t.device() == dev, "novograd_ds fused CUDA op: ", what, "[", i, "] is on ", t.device(), ", expected ", dev);
  TORCH_CHECK(t.is_contiguous(), "novograd_ds fused CUDA op: ", what, "[", i, "] is not contiguous");
}

void check_state(const at::Tensor& t, const at::Device& dev, const char* what, size_t i, int64_t numel) {
  check_dense(t, dev, what, i);
  TORCH_CHECK(t.scalar_type() == at::kFloat, "novograd_ds fused CUDA op: ", what, "[", i, "] has dtype ",
              t.scalar_type(), "; the fused op needs float32 parameters and state (use foreach=True for others)");
  TORCH_CHECK(t.numel() == numel, "novograd_ds fused CUDA op: ", what, "[", i, "] has ", t.numel(),
              " elements, its gradient ", numel);
}

GradDtype common_dtype(const std::vector<at::Tensor>& grads) {
  GradDtype k = grad_dtype(grads[0]);
  for (size_t i = 0; i < grads.size(); ++i) {
    check_dense(grads[i], grads[0].device(), "grads", i);
    TORCH_CHECK(grad_dtype(grads[i]) == k, "novograd_ds fused CUDA op: all gradients of one call must share a dtype");
  }
  return k;
}

void check(int err) {
  TORCH_CHECK(err == 0, "novograd_ds fused CUDA op: kernel launch failed: ", novograd_cuda::error_string(err));
}

std::vector<Span> segment_spans(const at::Tensor& table, const at::Tensor& flat_g, float* w, float* m, int64_t n_layers) {
  TORCH_CHECK(table.device().is_cpu() && table.scalar_type() == at::kLong && table.dim() == 2 && table.size(1) == 3,
              "novograd_ds fused CUDA op: the segment table must be a CPU int64 tensor of shape [n, 3] "
              "(offset, length, layer); SegmentTable.as_tensor() makes one");
  at::Tensor t = table.contiguous();
  std::vector<Span> spans;
  std::string why;
  const int64_t bad = novograd::segment_spans(t.data_ptr<int64_t>(), t.size(0), flat_g.numel(), n_layers,
                                              flat_g.data_ptr(), flat_g.element_size(), w, m, spans, why);
  TORCH_CHECK(bad < 0, "novograd_ds fused CUDA op: ", why);
  return spans;
}

novograd::UpdateScalars scalars(double lr, double a1, double c1, double wd, bool decoupled) {
  return {static_cast<float>(lr), static_cast<float>(a1), static_cast<float>(c1), static_cast<float>(wd),
          decoupled ? 1 : 0};
}

const float* checked_denoms(const at::Tensor& d, const at::Device& dev, int64_t n) {
  TORCH_CHECK(d.device() == dev && d.scalar_type() == at::kFloat && d.is_contiguous() && d.dim() == 1 && d.numel() == n,
              "novograd_ds fused CUDA op: denominators must be a contiguous float32 vector of ", n, " entries on ", dev);
  return d.data_ptr<float>();
}

void* stream() { return static_cast<void*>(c10::cuda::getCurrentCUDAStream().stream()); }

// The per-layer sums of squares of `spans` (NOTE: [deterministic norms] in launch_plan.h): a workspace of one
// double per chunk from torch's caching allocator, then the two kernels; no host-device synchronisation.
at::Tensor norms_of(const std::vector<Span>& spans, int64_t n_layers, GradDtype k, const at::Tensor& like) {
  const int64_t n_slots = novograd_cuda::count_slots(spans.data(), static_cast<int64_t>(spans.size()));
  at::Tensor partials = at::empty({n_slots > 0 ? n_slots : 1}, like.options().dtype(at::kDouble));
  at::Tensor out = at::empty({n_layers}, like.options().dtype(at::kFloat));
  if (n_layers > 0)
    check(novograd_cuda::launch_sq_norms(spans.data(), static_cast<int64_t>(spans.size()), n_layers, k,
                                         partials.data_ptr<double>(), out.data_ptr<float>(), stream()));
  return out;
}

at::Tensor sq_norms(const std::vector<at::Tensor>& grads) {
  TORCH_CHECK(!grads.empty(), "novograd_ds fused CUDA op: empty gradient list");
  const GradDtype k = common_dtype(grads);
  c10::cuda::CUDAGuard guard(grads[0].device());
  std::vector<Span> spans;
  spans.reserve(grads.size());
  for (size_t i = 0; i < grads.size(); ++i)
    spans.push_back({nullptr, grads[i].data_ptr(), nullptr, grads[i].numel(), static_cast<int64_t>(i)});
  return norms_of(spans, static_cast<int64_t>(grads.size()), k, grads[0]);
}

at::Tensor sq_norms_segments(const at::Tensor& flat_grad, const at::Tensor& table, int64_t n_layers) {
  check_dense(flat_grad, flat_grad.device(), "flat_grad", 0);
  TORCH_CHECK(n_layers >= 0, "novograd_ds fused CUDA op: n_layers must be >= 0, got ", n_layers);
  const GradDtype k = grad_dtype(flat_grad);
  c10::cuda::CUDAGuard guard(flat_grad.device());
  return norms_of(segment_spans(table, flat_grad, nullptr, nullptr, n_layers), n_layers, k, flat_grad);
}

void update(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
            const std::vector<at::Tensor>& exp_avgs, const at::Tensor& denoms, double lr, double a1, double c1,
            double wd, bool decoupled) {
  TORCH_CHECK(params.size() == grads.size() && params.size() == exp_avgs.size() && !params.empty(),
              "novograd_ds fused CUDA op: params, grads and exp_avgs must be non-empty lists of one length");
  const GradDtype k = common_dtype(grads);
  const at::Device dev = grads[0].device();
  c10::cuda::CUDAGuard guard(dev);
  std::vector<Span> spans;
  for (size_t i = 0; i < params.size(); ++i) {
    check_state(params[i], dev, "params", i, grads[i].numel());
    check_state(exp_avgs[i], dev, "exp_avgs", i, grads[i].numel());
    spans.push_back({params[i].data_ptr<float>(), grads[i].data_ptr(), exp_avgs[i].data_ptr<float>(), grads[i].numel(),
                     static_cast<int64_t>(i)});
  }
  const int64_t n = static_cast<int64_t>(params.size());
  check(novograd_cuda::launch_update(spans.data(), n, n, k, checked_denoms(denoms, dev, n),
                                     scalars(lr, a1, c1, wd, decoupled), stream()));
}

void update_segments(const at::Tensor& flat_param, const at::Tensor& flat_grad, const at::Tensor& flat_exp_avg,
                     const at::Tensor& table, const at::Tensor& layer_denoms, double lr, double a1, double c1,
                     double wd, bool decoupled) {
  const at::Device dev = flat_grad.device();
  check_dense(flat_grad, dev, "flat_grad", 0);
  const GradDtype k = grad_dtype(flat_grad);
  check_state(flat_param, dev, "flat_param", 0, flat_grad.numel());
  check_state(flat_exp_avg, dev, "flat_exp_avg", 0, flat_grad.numel());
  c10::cuda::CUDAGuard guard(dev);
  const int64_t n_layers = layer_denoms.numel();
  std::vector<Span> spans =
      segment_spans(table, flat_grad, flat_param.data_ptr<float>(), flat_exp_avg.data_ptr<float>(), n_layers);
  check(novograd_cuda::launch_update(spans.data(), static_cast<int64_t>(spans.size()), n_layers, k,
                                     checked_denoms(layer_denoms, dev, n_layers), scalars(lr, a1, c1, wd, decoupled),
                                     stream()));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.doc() = "NovoGrad fused CUDA kernels (novograd_ds); stateless, every scalar passed per call";
  mod.attr("simd") = "cuda";
  mod.def("sq_norms", &sq_norms, "sum(g*g) per tensor (fp32), deterministic: per-chunk partials, then per tensor");
  mod.def("sq_norms_segments", &sq_norms_segments, "sum(g*g) per layer over (offset, length, layer) segments");
  mod.def("update", &update, "fused NovoGrad update of fp32 params/exp_avgs, one denominator per tensor");
  mod.def("update_segments", &update_segments, "fused update over segments of flat tensors, denominators per layer");
}
