// Python bindings of the NovoGrad CUDA op: the only CUDA-side file that touches torch. It checks the tensors,
// turns them into Spans (novograd_cuda.h) and calls the torch-free launchers on the current CUDA stream.
// Same entry points and semantics as the CPU op (csrc/cpu/novograd_cpu.cpp).
#include <torch/extension.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>
#include <string>
#include <vector>

#include <pybind11/stl.h>

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

// ---- the 8-bit moment (NOTE: [8-bit moment]; launches: NOTE: [8-bit launches] in q8_plan.h) -------------------
namespace q8 = novograd::q8;
using novograd::QSpan;

void check_codes(const at::Tensor& t, const at::Device& dev, const char* what, size_t i, int64_t numel) {
  check_dense(t, dev, what, i);
  TORCH_CHECK(t.scalar_type() == at::kChar, "novograd_ds fused CUDA op: ", what, "[", i, "] has dtype ", t.scalar_type(),
              "; 8-bit codes are int8");
  TORCH_CHECK(t.numel() == numel, "novograd_ds fused CUDA op: ", what, "[", i, "] has ", t.numel(), " elements, expected ",
              numel);
}

std::vector<QSpan> q8_list_spans(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                                 const std::vector<at::Tensor>& codes, const std::vector<at::Tensor>& scales,
                                 const at::Tensor& runs, GradDtype& k) {
  const size_t n = params.size();
  TORCH_CHECK(n > 0 && grads.size() == n && codes.size() == n && scales.size() == n,
              "novograd_ds fused CUDA op: params, grads, codes and scales must be non-empty lists of one length");
  TORCH_CHECK(runs.device().is_cpu() && runs.scalar_type() == at::kLong && runs.dim() == 2 &&
                  runs.size(0) == static_cast<int64_t>(n) && runs.size(1) == 3,
              "novograd_ds fused CUDA op: runs must be a CPU int64 tensor [n, 3] (start, layer_numel, key); "
              "Q8Runs.as_tensor() makes one");
  k = common_dtype(grads);
  const at::Device dev = grads[0].device();
  at::Tensor rt = runs.contiguous();
  const int64_t* r = rt.data_ptr<int64_t>();
  std::vector<QSpan> spans;
  for (size_t i = 0; i < n; ++i) {
    const int64_t numel = grads[i].numel();
    check_state(params[i], dev, "params", i, numel);
    check_codes(codes[i], dev, "codes", i, numel);
    const std::string why = novograd::q8_check_run(static_cast<int64_t>(i), numel, r[3 * i], r[3 * i + 1]);
    TORCH_CHECK(why.empty(), "novograd_ds fused CUDA op: ", why);
    check_state(scales[i], dev, "scales", i, q8::block_count(r[3 * i], numel));
    spans.push_back({params[i].data_ptr<float>(), grads[i].data_ptr(), codes[i].data_ptr<int8_t>(),
                     scales[i].data_ptr<float>(), numel, static_cast<int64_t>(i), r[3 * i], r[3 * i + 1],
                     static_cast<uint32_t>(r[3 * i + 2]), static_cast<int64_t>(i)});
  }
  return spans;
}

std::vector<QSpan> q8_table_spans(const at::Tensor& flat_param, const at::Tensor& flat_grad,
                                  const at::Tensor& flat_codes, const at::Tensor& flat_scales, const at::Tensor& table,
                                  int64_t n_layers, GradDtype& k) {
  const at::Device dev = flat_grad.device();
  check_dense(flat_grad, dev, "flat_grad", 0);
  k = grad_dtype(flat_grad);
  check_state(flat_param, dev, "flat_param", 0, flat_grad.numel());
  check_codes(flat_codes, dev, "flat_codes", 0, flat_grad.numel());
  check_dense(flat_scales, dev, "flat_scales", 0);
  TORCH_CHECK(flat_scales.scalar_type() == at::kFloat, "novograd_ds fused CUDA op: flat_scales must be float32");
  TORCH_CHECK(table.device().is_cpu() && table.scalar_type() == at::kLong && table.dim() == 2 && table.size(1) == 7,
              "novograd_ds fused CUDA op: the 8-bit run table must be a CPU int64 tensor [n, 7] (offset, length, "
              "layer, start, layer_numel, key, scale_offset); Q8SegmentTable.as_tensor() makes one");
  at::Tensor t = table.contiguous();
  std::vector<QSpan> spans;
  std::string why;
  const int64_t bad = novograd::q8_segment_spans(t.data_ptr<int64_t>(), t.size(0), flat_grad.numel(), n_layers,
                                                 flat_scales.numel(), flat_grad.data_ptr(), flat_grad.element_size(),
                                                 flat_param.data_ptr<float>(), flat_codes.data_ptr<int8_t>(),
                                                 flat_scales.data_ptr<float>(), spans, why);
  TORCH_CHECK(bad < 0, "novograd_ds fused CUDA op: ", why);
  return spans;
}

const float* q8_checked_boundary(const std::optional<at::Tensor>& boundary, const std::vector<QSpan>& spans,
                                 int64_t n_runs, const at::Device& dev) {
  bool needed = false;
  for (const QSpan& sp : spans)
    needed = needed || q8::first_partial(sp.start, sp.n, sp.layer_numel) || q8::last_partial(sp.start, sp.n, sp.layer_numel);
  if (!boundary.has_value() || !boundary->defined()) {
    TORCH_CHECK(!needed, "novograd_ds fused CUDA op: some runs have partial (boundary) blocks; pass boundary=, the "
                         "all-reduced (MAX) result of q8_boundary_absmax");
    return nullptr;
  }
  const at::Tensor& b = *boundary;
  TORCH_CHECK(b.device() == dev && b.scalar_type() == at::kFloat && b.is_contiguous() && b.dim() == 2 &&
                  b.size(0) == n_runs && b.size(1) == 2,
              "novograd_ds fused CUDA op: boundary must be a contiguous float32 tensor [", n_runs, ", 2] on ", dev);
  return b.data_ptr<float>();
}

q8::Q8Scalars q8_scalars(int64_t map, int64_t rounding, int64_t seed, int64_t step) {
  TORCH_CHECK(map == q8::kLinear || map == q8::kSqrt, "novograd_ds fused CUDA op: map must be 0 (linear) or 1 (sqrt)");
  TORCH_CHECK(rounding == q8::kNearest || rounding == q8::kStochastic,
              "novograd_ds fused CUDA op: rounding must be 0 (nearest) or 1 (stochastic)");
  return {static_cast<int>(map), static_cast<int>(rounding), static_cast<uint32_t>(seed), static_cast<uint32_t>(step)};
}

at::Tensor q8_boundary_of(const std::vector<QSpan>& spans, int64_t n_runs, GradDtype k, const float* denoms,
                          novograd::UpdateScalars sc, int64_t map, const at::Tensor& like) {
  q8_scalars(map, 0, 0, 0);
  at::Tensor out = at::zeros({n_runs, 2}, like.options().dtype(at::kFloat));
  if (!spans.empty())
    check(novograd_cuda::launch_q8_boundary(spans.data(), static_cast<int64_t>(spans.size()), k, denoms, sc,
                                            static_cast<int>(map), out.data_ptr<float>(), stream()));
  return out;
}

at::Tensor q8_boundary_absmax(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                              const std::vector<at::Tensor>& codes, const std::vector<at::Tensor>& scales,
                              const at::Tensor& denoms, const at::Tensor& runs, double a1, double c1, double wd,
                              bool decoupled, int64_t map) {
  GradDtype k;
  std::vector<QSpan> spans = q8_list_spans(params, grads, codes, scales, runs, k);
  const at::Device dev = grads[0].device();
  c10::cuda::CUDAGuard guard(dev);
  const int64_t n = static_cast<int64_t>(params.size());
  return q8_boundary_of(spans, n, k, checked_denoms(denoms, dev, n), scalars(0.0, a1, c1, wd, decoupled), map, grads[0]);
}

void q8_update(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
               const std::vector<at::Tensor>& codes, const std::vector<at::Tensor>& scales, const at::Tensor& denoms,
               const at::Tensor& runs, const std::optional<at::Tensor>& boundary, double lr, double a1, double c1,
               double wd, bool decoupled, int64_t map, int64_t rounding, int64_t seed, int64_t step) {
  GradDtype k;
  std::vector<QSpan> spans = q8_list_spans(params, grads, codes, scales, runs, k);
  const at::Device dev = grads[0].device();
  c10::cuda::CUDAGuard guard(dev);
  const int64_t n = static_cast<int64_t>(params.size());
  check(novograd_cuda::launch_q8_update(spans.data(), n, k, checked_denoms(denoms, dev, n),
                                        q8_checked_boundary(boundary, spans, n, dev), scalars(lr, a1, c1, wd, decoupled),
                                        q8_scalars(map, rounding, seed, step), stream()));
}

at::Tensor q8_boundary_absmax_segments(const at::Tensor& flat_param, const at::Tensor& flat_grad,
                                       const at::Tensor& flat_codes, const at::Tensor& flat_scales,
                                       const at::Tensor& table, const at::Tensor& layer_denoms, double a1, double c1,
                                       double wd, bool decoupled, int64_t map) {
  GradDtype k;
  const int64_t n_layers = layer_denoms.numel();
  std::vector<QSpan> spans = q8_table_spans(flat_param, flat_grad, flat_codes, flat_scales, table, n_layers, k);
  const at::Device dev = flat_grad.device();
  c10::cuda::CUDAGuard guard(dev);
  return q8_boundary_of(spans, table.size(0), k, checked_denoms(layer_denoms, dev, n_layers),
                        scalars(0.0, a1, c1, wd, decoupled), map, flat_grad);
}

void q8_update_segments(const at::Tensor& flat_param, const at::Tensor& flat_grad, const at::Tensor& flat_codes,
                        const at::Tensor& flat_scales, const at::Tensor& table, const at::Tensor& layer_denoms,
                        const std::optional<at::Tensor>& boundary, double lr, double a1, double c1, double wd,
                        bool decoupled, int64_t map, int64_t rounding, int64_t seed, int64_t step) {
  GradDtype k;
  const int64_t n_layers = layer_denoms.numel();
  std::vector<QSpan> spans = q8_table_spans(flat_param, flat_grad, flat_codes, flat_scales, table, n_layers, k);
  const at::Device dev = flat_grad.device();
  c10::cuda::CUDAGuard guard(dev);
  check(novograd_cuda::launch_q8_update(spans.data(), static_cast<int64_t>(spans.size()), k,
                                        checked_denoms(layer_denoms, dev, n_layers),
                                        q8_checked_boundary(boundary, spans, table.size(0), dev),
                                        scalars(lr, a1, c1, wd, decoupled), q8_scalars(map, rounding, seed, step),
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
  mod.def("q8_boundary_absmax", &q8_boundary_absmax,
          "8-bit moment: each run's local max |m_new| over its partial first/last block ([n, 2], 0 where not partial)");
  mod.def("q8_update", &q8_update, "8-bit moment: dequantise, update m and w, block scales, quantise (list form)");
  mod.def("q8_boundary_absmax_segments", &q8_boundary_absmax_segments, "q8_boundary_absmax over a run table");
  mod.def("q8_update_segments", &q8_update_segments, "q8_update over a run table of flat tensors");
}
