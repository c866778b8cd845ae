// Python bindings of the NovoGrad CUDA op: the only CUDA-side file that touches torch. It checks the tensors,
// turns them into Spans (novograd_cuda.h) and calls the torch-free launchers on the current CUDA stream.
// Same entry points and semantics as the CPU op (csrc/cpu/novograd_cpu.cpp).
#include <torch/extension.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

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
  const int64_t* rows = t.data_ptr<int64_t>();
  const int64_t numel = flat_g.numel();
  const char* g = static_cast<const char*>(flat_g.data_ptr());
  const int64_t esize = flat_g.element_size();
  std::vector<Span> spans;
  for (int64_t r = 0; r < t.size(0); ++r) {
    const int64_t off = rows[3 * r], len = rows[3 * r + 1], layer = rows[3 * r + 2];
    TORCH_CHECK(off >= 0 && len >= 0 && off + len <= numel, "novograd_ds fused CUDA op: segment ", r,
                " lies outside the flat tensor of ", numel, " elements");
    TORCH_CHECK(layer >= 0 && layer < n_layers, "novograd_ds fused CUDA op: segment ", r, " names layer ", layer,
                ", outside [0, ", n_layers, ")");
    spans.push_back({w ? w + off : nullptr, g + off * esize, m ? m + off : nullptr, len, layer});
  }
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

at::Tensor sq_norms(const std::vector<at::Tensor>& grads) {
  TORCH_CHECK(!grads.empty(), "novograd_ds fused CUDA op: empty gradient list");
  const GradDtype k = common_dtype(grads);
  c10::cuda::CUDAGuard guard(grads[0].device());
  std::vector<Span> spans;
  for (size_t i = 0; i < grads.size(); ++i)
    spans.push_back({nullptr, grads[i].data_ptr(), nullptr, grads[i].numel(), static_cast<int64_t>(i)});
  at::Tensor out = at::zeros({static_cast<int64_t>(grads.size())}, grads[0].options().dtype(at::kFloat));
  check(novograd_cuda::launch_sq_norms(spans.data(), spans.size(), k, out.data_ptr<float>(), stream()));
  return out;
}

at::Tensor sq_norms_segments(const at::Tensor& flat_grad, const at::Tensor& table, int64_t n_layers) {
  check_dense(flat_grad, flat_grad.device(), "flat_grad", 0);
  const GradDtype k = grad_dtype(flat_grad);
  c10::cuda::CUDAGuard guard(flat_grad.device());
  std::vector<Span> spans = segment_spans(table, flat_grad, nullptr, nullptr, n_layers);
  at::Tensor out = at::zeros({n_layers}, flat_grad.options().dtype(at::kFloat));
  check(novograd_cuda::launch_sq_norms(spans.data(), spans.size(), k, out.data_ptr<float>(), stream()));
  return out;
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
  check(novograd_cuda::launch_update(spans.data(), spans.size(), k,
                                     checked_denoms(denoms, dev, static_cast<int64_t>(params.size())),
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
  check(novograd_cuda::launch_update(spans.data(), spans.size(), k, checked_denoms(layer_denoms, dev, n_layers),
                                     scalars(lr, a1, c1, wd, decoupled), stream()));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.doc() = "NovoGrad fused CUDA kernels (novograd_ds); stateless, every scalar passed per call";
  mod.attr("simd") = "cuda";
  mod.def("sq_norms", &sq_norms, "sum(g*g) per tensor (fp32), one multi-tensor launch per 36 tensors/320 chunks");
  mod.def("sq_norms_segments", &sq_norms_segments, "sum(g*g) per layer over (offset, length, layer) segments");
  mod.def("update", &update, "fused NovoGrad update of fp32 params/exp_avgs, one denominator per tensor");
  mod.def("update_segments", &update_segments, "fused update over segments of flat tensors, denominators per layer");
}
