// NovoGrad's fused CPU op: per-layer sums of squares and the fused elementwise update.
//
// Two passes over memory, as in NOTE: [the kernel seam]: (1) n = sum(g*g) per layer (reads g), then, after
// Python has turned n into each layer's denominator d = sqrt(v) + eps, (2) the fused update (reads g, w, m;
// writes w, m). 24 bytes per fp32 parameter, nothing else touched, no temporaries.
//
// Work is cut into chunks of at most kChunk elements (a chunk never crosses a tensor or segment) and the
// chunk list is split over threads with at::parallel_for (torch.set_num_threads governs it). Each chunk runs a
// SIMD main loop (AVX-512 or AVX2, chosen at compile time by the flags builder.py passes) and a scalar tail
// that evaluates the same expressions in the same order (novograd_math.h); the build uses -ffp-contract=off so
// neither path fuses a multiply-add, which keeps the result bitwise equal to the reference backend in fp32.
// Norm partials are kept per chunk and summed per layer in chunk order, in double: the result does not depend
// on the number of threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "../novograd_math.h"
#include "../spans.h"
#include "novograd_q8.h"
#include "op_common.h"
#include "simd.h"
#include "sq_sum.h"

namespace {

using namespace novograd_cpu;  // simd.h: W lanes of fp32


using novograd::Span;  // spans.h: a whole tensor, or a segment of a flat tensor

struct Chunk {
  int64_t span, begin, end;
};

std::vector<Chunk> make_chunks(const std::vector<Span>& spans) {
  std::vector<Chunk> chunks;
  for (int64_t s = 0; s < static_cast<int64_t>(spans.size()); ++s)
    for (int64_t b = 0; b < spans[s].n; b += kChunk) chunks.push_back({s, b, std::min(spans[s].n, b + kChunk)});
  return chunks;
}

// The fused update of w[0:n], m[0:n] from g[0:n] with denominator d (novograd_math.h, vector form).
template <typename G, bool kDecoupled>
void chunk_update(float* w, const G* g, float* m, int64_t n, float d, const novograd::UpdateScalars& s) {
  int64_t i = 0;
#if defined(__AVX512F__) || defined(__AVX2__)
  const vfloat vd = vset1(d), vlr = vset1(s.lr), va1 = vset1(s.a1), vc1 = vset1(s.c1), vwd = vset1(s.wd);
  for (; i + W <= n; i += W) {
    const vfloat wv = vload(w + i), mv = vload(m + i);
    vfloat gh = vdiv(vload(g + i), vd);                   // gh = g / (sqrt(v) + eps)
    if (!kDecoupled) gh = vadd(gh, vmul(vwd, wv));        // gh = gh + wd*w
    const vfloat mn = vadd(vmul(va1, mv), vmul(vc1, gh)); // m  = b1*m + c*gh
    const vfloat u = kDecoupled ? vadd(mn, vmul(vwd, wv)) // u  = m + wd*w (decoupled)
                                : mn;                     // u  = m
    vstore(w + i, vsub(wv, vmul(vlr, u)));                // w  = w - lr*u
    vstore(m + i, mn);
  }
#endif
  novograd::UpdateScalars ts = s;
  ts.decoupled = kDecoupled ? 1 : 0;
  for (; i < n; ++i) novograd::update_element(to_float(g[i]), w[i], m[i], d, ts);
}

// Sum of squares per layer over spans: out[layer] += sum over the layer's spans, in chunk order.
at::Tensor sq_norms_spans(const std::vector<Span>& spans, GradKind kind, int64_t n_out) {
  const std::vector<Chunk> chunks = make_chunks(spans);
  std::vector<double> partial(chunks.size(), 0.0);
  {
    pybind11::gil_scoped_release nogil;
    dispatch_grad(kind, [&](auto tag) {
      using G = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
      at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
        for (int64_t c = lo; c < hi; ++c) {
          const Chunk& ch = chunks[c];
          const G* g = static_cast<const G*>(spans[ch.span].g) + ch.begin;
          partial[c] = chunk_sq_sum(g, ch.end - ch.begin);
        }
      });
    });
  }
  std::vector<double> acc(n_out, 0.0);
  for (size_t c = 0; c < chunks.size(); ++c) acc[spans[chunks[c].span].layer] += partial[c];
  at::Tensor out = at::empty({n_out}, at::kFloat);
  float* o = out.data_ptr<float>();
  for (int64_t k = 0; k < n_out; ++k) o[k] = static_cast<float>(acc[k]);
  return out;
}

void update_spans(const std::vector<Span>& spans, GradKind kind, const float* denoms, const novograd::UpdateScalars& s) {
  const std::vector<Chunk> chunks = make_chunks(spans);
  pybind11::gil_scoped_release nogil;
  dispatch_grad(kind, [&](auto tag) {
    using G = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
      for (int64_t c = lo; c < hi; ++c) {
        const Chunk& ch = chunks[c];
        const Span& sp = spans[ch.span];
        const G* g = static_cast<const G*>(sp.g) + ch.begin;
        const float d = denoms[sp.layer];
        if (s.decoupled)
          chunk_update<G, true>(sp.w + ch.begin, g, sp.m + ch.begin, ch.end - ch.begin, d, s);
        else
          chunk_update<G, false>(sp.w + ch.begin, g, sp.m + ch.begin, ch.end - ch.begin, d, s);
      }
    });
  });
}

// ---- argument checks -----------------------------------------------------------------------------
std::vector<Span> segment_spans(const at::Tensor& table, const at::Tensor& flat_g, float* w, float* m, int64_t n_layers) {
  TORCH_CHECK(table.device().is_cpu() && table.scalar_type() == at::kLong && table.dim() == 2 && table.size(1) == 3,
              "novograd_ds fused CPU op: the segment table must be a CPU int64 tensor of shape [n, 3] "
              "(offset, length, layer); SegmentTable.as_tensor() makes one");
  at::Tensor t = table.contiguous();
  std::vector<Span> spans;
  std::string why;
  const int64_t bad = novograd::segment_spans(t.data_ptr<int64_t>(), t.size(0), flat_g.numel(), n_layers,
                                              flat_g.data_ptr(), flat_g.element_size(), w, m, spans, why);
  TORCH_CHECK(bad < 0, "novograd_ds fused CPU op: ", why);
  return spans;
}

// ---- entry points --------------------------------------------------------------------------------
at::Tensor sq_norms(const std::vector<at::Tensor>& grads) {
  GradKind kind = common_grad_kind(grads);
  std::vector<Span> spans;
  spans.reserve(grads.size());
  for (size_t i = 0; i < grads.size(); ++i)
    spans.push_back({nullptr, grads[i].data_ptr(), nullptr, grads[i].numel(), static_cast<int64_t>(i)});
  return sq_norms_spans(spans, kind, static_cast<int64_t>(grads.size()));
}

at::Tensor sq_norms_segments(const at::Tensor& flat_grad, const at::Tensor& table, int64_t n_layers) {
  check_dense(flat_grad, "flat_grad", 0);
  GradKind kind = grad_kind(flat_grad.scalar_type(), "flat_grad");
  return sq_norms_spans(segment_spans(table, flat_grad, nullptr, nullptr, n_layers), kind, n_layers);
}

void update(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
            const std::vector<at::Tensor>& exp_avgs, const at::Tensor& denoms, double lr, double a1, double c1,
            double wd, bool decoupled) {
  TORCH_CHECK(params.size() == grads.size() && params.size() == exp_avgs.size(),
              "novograd_ds fused CPU op: params, grads and exp_avgs must have the same length");
  GradKind kind = common_grad_kind(grads);
  std::vector<Span> spans;
  spans.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    check_state(params[i], "params", i, grads[i].numel());
    check_state(exp_avgs[i], "exp_avgs", i, grads[i].numel());
    spans.push_back({params[i].data_ptr<float>(), grads[i].data_ptr(), exp_avgs[i].data_ptr<float>(), grads[i].numel(),
                     static_cast<int64_t>(i)});
  }
  update_spans(spans, kind, checked_denoms(denoms, static_cast<int64_t>(params.size())), scalars(lr, a1, c1, wd, decoupled));
}

void update_segments(const at::Tensor& flat_param, const at::Tensor& flat_grad, const at::Tensor& flat_exp_avg,
                     const at::Tensor& table, const at::Tensor& layer_denoms, double lr, double a1, double c1,
                     double wd, bool decoupled) {
  check_dense(flat_grad, "flat_grad", 0);
  GradKind kind = grad_kind(flat_grad.scalar_type(), "flat_grad");
  check_state(flat_param, "flat_param", 0, flat_grad.numel());
  check_state(flat_exp_avg, "flat_exp_avg", 0, flat_grad.numel());
  const int64_t n_layers = layer_denoms.numel();
  std::vector<Span> spans =
      segment_spans(table, flat_grad, flat_param.data_ptr<float>(), flat_exp_avg.data_ptr<float>(), n_layers);
  update_spans(spans, kind, checked_denoms(layer_denoms, n_layers), scalars(lr, a1, c1, wd, decoupled));
}

// NOTE: [layer at a time] The whole plain-path step for a list of tensors, each its own layer, with the
// per-layer second moment updated here instead of in Python: per tensor, the norm pass, then v and the
// denominator, then the update pass, back to back. The update pass re-reads g while it is still in cache (L2/L3)
// for tensors that fit, so a step moves about 20 bytes per fp32 parameter from memory instead of 24. The v
// arithmetic is second_moment_'s (optimizer.py, NOTE: [v in double]) operation for operation, and the norm
// partials are summed in the same chunk order as sq_norms, so the result equals the two-pass path bit for bit.
void layer_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& vs,
                const std::vector<at::Tensor>& vmaxs, double lr, double a1, double c1, double a2, double c2,
                double eps, double wd, bool decoupled) {
  const size_t n_t = params.size();
  TORCH_CHECK(grads.size() == n_t && exp_avgs.size() == n_t && vs.size() == n_t &&
                  (vmaxs.empty() || vmaxs.size() == n_t),
              "novograd_ds fused CPU op: params, grads, exp_avgs, vs (and vmaxs when given) must have the same length");
  GradKind kind = common_grad_kind(grads);
  for (size_t i = 0; i < n_t; ++i) {
    check_state(params[i], "params", i, grads[i].numel());
    check_state(exp_avgs[i], "exp_avgs", i, grads[i].numel());
    check_state(vs[i], "vs", i, 1);
    if (!vmaxs.empty()) check_state(vmaxs[i], "vmaxs", i, 1);
  }
  const novograd::UpdateScalars s = scalars(lr, a1, c1, wd, decoupled);
  pybind11::gil_scoped_release nogil;
  dispatch_grad(kind, [&](auto tag) {
    using G = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    std::vector<double> partial;
    for (size_t i = 0; i < n_t; ++i) {
      const int64_t n = grads[i].numel();
      const G* g = static_cast<const G*>(grads[i].data_ptr());
      float* w = params[i].data_ptr<float>();
      float* m = exp_avgs[i].data_ptr<float>();
      const int64_t n_chunks = (n + kChunk - 1) / kChunk;
      partial.assign(n_chunks, 0.0);
      at::parallel_for(0, n_chunks, 1, [&](int64_t lo, int64_t hi) {
        for (int64_t c = lo; c < hi; ++c) {
          const int64_t b = c * kChunk;
          partial[c] = chunk_sq_sum(g + b, std::min(n, b + kChunk) - b);
        }
      });
      double total = 0.0;
      for (int64_t c = 0; c < n_chunks; ++c) total += partial[c];
      const float d = second_moment_step(static_cast<float>(total), vs[i].data_ptr<float>(),
                                         vmaxs.empty() ? nullptr : vmaxs[i].data_ptr<float>(), a2, c2, eps);
      // Each thread walks its own range of chunks backwards: the chunks it summed last are the ones still in its
      // cache (a forward re-read of a range larger than the cache would evict every line before reusing it).
      at::parallel_for(0, n_chunks, 1, [&](int64_t lo, int64_t hi) {
        for (int64_t c = hi - 1; c >= lo; --c) {
          const int64_t b = c * kChunk, e = std::min(n, b + kChunk);
          if (s.decoupled)
            chunk_update<G, true>(w + b, g + b, m + b, e - b, d, s);
          else
            chunk_update<G, false>(w + b, g + b, m + b, e - b, d, s);
        }
      });
    }
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.doc() = "NovoGrad fused CPU kernels (novograd_ds); stateless, every scalar passed per call";
  mod.attr("simd") = NOVOGRAD_SIMD;
  mod.attr("simd_width") = W;
  mod.def("sq_norms", &sq_norms, "sum(g*g) per tensor, fp32 result accumulated in double across chunks");
  mod.def("sq_norms_segments", &sq_norms_segments, "sum(g*g) per layer over (offset, length, layer) segments");
  mod.def("update", &update, "fused NovoGrad update of fp32 params/exp_avgs, one denominator per tensor");
  mod.def("update_segments", &update_segments, "fused update over segments of flat tensors, denominators per layer");
  mod.def("layer_step", &layer_step, "the whole plain-path step, one layer at a time (norm, v, update)");
  novograd_cpu::register_q8(mod);  // the 8-bit moment's entry points (novograd_q8.cpp)
}
