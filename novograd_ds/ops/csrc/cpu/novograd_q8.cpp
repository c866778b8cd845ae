// The fused CPU op's 8-bit moment (NOTE: [8-bit moment] in novograd_ds/kernels/eightbit.py; math in q8_math.h).
//
// q8_update: one pass over the runs' blocks. Work is cut into chunks of whole layer blocks, aligned to multiples of
// kQChunk elements of the layer (so a chunk never splits a block and never crosses 2^32 in layer indices), and the
// chunk list is split over threads with at::parallel_for. Per block: (1) dequantise the old codes, update m and w
// (SIMD main loop + scalar tail, the same IEEE operations as novograd_math.h's update_element, no FMA), write w,
// keep m_new in a 1 KiB buffer and its max |m_new|; (2) quantise the buffer with the block's scale (its own max, or
// for a partial boundary block the caller's all-reduced value) and write the codes and the scale. Memory traffic:
// read g, w, codes (and a scale per 256 elements), write w, codes: 13 bytes per fp32 parameter with fp32
// gradients (with the norm pass, 17). Each block is written by one thread only: deterministic, and independent of
// the thread count.
//
// q8_boundary_absmax: per run, the local max |m_new| over its partial first and last block (<= 2 x 256 elements,
// scalar code, nothing written).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "../q8_math.h"
#include "../q8_spans.h"
#include "novograd_q8.h"
#include "op_common.h"
#include "simd.h"
#include "sq_sum.h"

namespace novograd_cpu {
namespace {

namespace q8 = novograd::q8;
using novograd::QSpan;

constexpr int64_t kQChunk = 1 << 16;  // elements of a layer per work item: 256 blocks
static_assert(kQChunk % q8::kBlock == 0, "chunks hold whole blocks");

struct QChunk {
  int64_t span, lo, hi;  // the run's local elements [lo, hi)
};

std::vector<QChunk> make_q8_chunks(const std::vector<QSpan>& spans) {
  std::vector<QChunk> chunks;
  for (int64_t s = 0; s < static_cast<int64_t>(spans.size()); ++s) {
    const QSpan& sp = spans[s];
    if (sp.n <= 0) continue;
    const int64_t end = sp.start + sp.n;
    for (int64_t c = sp.start / kQChunk; c <= (end - 1) / kQChunk; ++c)
      chunks.push_back({s, std::max(sp.start, c * kQChunk) - sp.start, std::min(end, (c + 1) * kQChunk) - sp.start});
  }
  return chunks;
}

// What a block is quantised with: the boundary value of a partial end, else its own max.
struct BlockScale {
  bool given;
  float value;
};

struct RunEnds {  // a run's block count and partial ends, computed once per chunk
  int64_t count;
  bool fp, lp;
  explicit RunEnds(const QSpan& sp)
      : count(q8::block_count(sp.start, sp.n)), fp(q8::first_partial(sp.start, sp.n, sp.layer_numel)),
        lp(q8::last_partial(sp.start, sp.n, sp.layer_numel)) {}
  BlockScale scale_of(const QSpan& sp, int64_t j, const float* boundary) const {
    if (j == 0 && fp) return {true, boundary[2 * sp.run]};
    if (j == count - 1 && lp) return {true, boundary[2 * sp.run + 1]};
    return {false, 0.0f};
  }
};

#if defined(__AVX512F__) || defined(__AVX2__)
// The per-call constants of the vector code.
struct VConsts {
  vfloat d, lr, a1, c1, wd;
  explicit VConsts(float dd, const novograd::UpdateScalars& s)
      : d(vset1(dd)), lr(vset1(s.lr)), a1(vset1(s.a1)), c1(vset1(s.c1)), wd(vset1(s.wd)) {}
};

// W elements at i: dequantise the codes, update_element (novograd_math.h) in vector form, store w; returns m_new.
template <typename G, bool kDecoupled, int kMap>
inline vfloat moment_vec(float* w, const G* g, const int8_t* q, int64_t i, const VConsts& c, vfloat step) {
  vfloat qv = vload_codes(q + i);
  if (kMap == q8::kSqrt) qv = vmul(qv, vabs(qv));         // q|q|
  const vfloat mo = vmul(qv, step);                         // m_old = dequant(code)
  const vfloat wv = vload(w + i);
  vfloat gh = vdiv(vload(g + i), c.d);                      // gh = g / d
  if (!kDecoupled) gh = vadd(gh, vmul(c.wd, wv));           // gh = gh + wd*w
  const vfloat mn = vadd(vmul(c.a1, mo), vmul(c.c1, gh));   // m  = a1*m + c1*gh
  const vfloat u = kDecoupled ? vadd(mn, vmul(c.wd, wv)) : mn;
  vstore(w + i, vsub(wv, vmul(c.lr, u)));                   // w  = w - lr*u
  return mn;
}

// q8::word_hash of W consecutive words from `word_lo` (32-bit), lane by lane the same integers.
inline vint word_hash_vec(vint ib, uint32_t word_lo) {
  vint x = vi_xor(ib, vi_add(vi_set1(word_lo), vi_iota()));
  x = vi_xor(x, vi_shr<16>(x));
  x = vi_mul(x, vi_set1(0x21F0AAADu));
  x = vi_xor(x, vi_shr<15>(x));
  x = vi_mul(x, vi_set1(0x735A2D97u));
  return vi_xor(x, vi_shr<15>(x));
}

// The stochastic-rounding bytes of a whole block (256 elements from the layer index `index0`, a multiple of 256):
// its 64 words' hashes, stored in order, so byte i is element index0 + i's (x86 is little-endian).
inline void block_random_bytes(uint32_t ib, int64_t index0, uint32_t* words) {
  const vint vib = vi_set1(ib);
  const uint32_t w0 = static_cast<uint32_t>(static_cast<uint64_t>(index0) >> 2);
  for (int j = 0; j < static_cast<int>(q8::kBlock / 4); j += W) vi_store(words + j, word_hash_vec(vib, w0 + j));
}

// u of W elements from their random bytes: (byte + 0.5) / 256, as q8::byte_uniform.
inline vfloat uniform_vec(const uint8_t* bytes) {
  return vmul(vadd(vload_u8(bytes), vset1(0.5f)), vset1(1.0f / 256.0f));
}

// q8::quant of W values m, stored as W codes at q: the same operations lane by lane (the linear map's rint and
// floor are done by the conversion to integers, exactly; its clamps by a max at -127 and the saturating pack).
template <int kMap, int kRound>
inline void store_codes(int8_t* q, vfloat m, vfloat inv, vfloat u) {
  if (kMap == q8::kLinear) {
    const vfloat t = vmul(m, inv);
    if (kRound == q8::kNearest)
      vstore_codes_rint(q, t);
    else
      vstore_codes_floor(q, vadd(t, u));
    return;
  }
  const vfloat one = vset1(1.0f), zero = vzero();
  const vfloat t = vmul(vabs(m), inv);
  vfloat k = vfloor(vsqrt(t));                               // vsqrtps is correctly rounded
  k = vselect(vgt(vmul(k, k), t), vsub(k, one), k);         // exactly floor(sqrt(t))
  const vmask up = kRound == q8::kNearest ? vge(t, vadd(vmul(k, vadd(k, one)), vset1(0.5f)))
                                          : vlt(vmul(u, vadd(vmul(vset1(2.0f), k), one)), vsub(t, vmul(k, k)));
  const vfloat qm = vmin(vadd(k, vselect(up, one, zero)), vset1(127.0f));
  vstore_codes_rint(q, vselect(vlt(m, zero), vsub(zero, qm), qm));
}

constexpr int kVecsPerBlock = static_cast<int>(q8::kBlock) / W;
constexpr int64_t kPrefetchBlocks = 2;  // software prefetch distance (measured: ~5% faster than the hardware's alone)

// A whole block (256 elements from `lo`, the block's first element): m_new kept in registers (AVX-512: 16 zmm;
// AVX2 spills them to the stack), one pass over memory. Returns the scale written.
template <typename G, bool kDecoupled, int kMap, int kRound>
inline float full_block(float* w, const G* g, int8_t* q, int64_t lo, const VConsts& c, float old_scale,
                        const BlockScale& given, uint32_t ib, int64_t index0) {
  const int64_t ahead = lo + kPrefetchBlocks * q8::kBlock;  // a hint: past the end of the tensor it does nothing
  for (int k = 0; k < static_cast<int>(q8::kBlock); k += 64 / static_cast<int>(sizeof(float))) {  // per cache line
    _mm_prefetch(reinterpret_cast<const char*>(w + ahead + k), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(g + ahead + k), _MM_HINT_T0);
  }
  for (int k = 0; k < static_cast<int>(q8::kBlock); k += 64)
    _mm_prefetch(reinterpret_cast<const char*>(q + ahead + k), _MM_HINT_T0);
  const vfloat step = vset1(q8::dequant_step(old_scale, kMap));
  vfloat mn[kVecsPerBlock];
  vfloat vmx = vzero();
#pragma GCC unroll 32
  for (int k = 0; k < kVecsPerBlock; ++k) {
    mn[k] = moment_vec<G, kDecoupled, kMap>(w, g, q, lo + k * W, c, step);
    vmx = vmax(vmx, vabs(mn[k]));
  }
  const float a = given.given ? given.value : vmax_all(vmx);
  const vfloat inv = vset1(q8::quant_inv(a, kMap));
  alignas(64) uint32_t words[q8::kBlock / 4];
  if (kRound == q8::kStochastic) block_random_bytes(ib, index0, words);
  const uint8_t* bytes = reinterpret_cast<const uint8_t*>(words);
#pragma GCC unroll 32
  for (int k = 0; k < kVecsPerBlock; ++k)
    store_codes<kMap, kRound>(q + lo + k * W, mn[k], inv,
                              kRound == q8::kStochastic ? uniform_vec(bytes + k * W) : vzero());
  return a;
}
#endif

// A block's elements [lo, hi) of the run (any part of a block): pass 1 updates w and keeps m_new in `buf`, pass 2
// writes the codes. Vector main loops and scalar tails evaluate the same operations. Returns the scale written.
template <typename G, bool kDecoupled, int kMap, int kRound>
float part_block(float* w, const G* g, int8_t* q, int64_t lo, int64_t hi, float d, const novograd::UpdateScalars& s,
                 float old_scale, const BlockScale& given, uint32_t ib, int64_t index0, float* buf) {
  const float step = q8::dequant_step(old_scale, kMap);
  int64_t i = lo;
  float amax = 0.0f;
#if defined(__AVX512F__) || defined(__AVX2__)
  const VConsts c(d, s);
  const vfloat vstep = vset1(step);
  vfloat vmx = vzero();
  for (; i + W <= hi; i += W) {
    const vfloat mn = moment_vec<G, kDecoupled, kMap>(w, g, q, i, c, vstep);
    vstore(buf + (i - lo), mn);
    vmx = vmax(vmx, vabs(mn));
  }
  amax = vmax_all(vmx);
#endif
  novograd::UpdateScalars ts = s;
  ts.decoupled = kDecoupled ? 1 : 0;
  for (; i < hi; ++i) {
    float m = q8::dequant(q[i], step, kMap);
    novograd::update_element(to_float(g[i]), w[i], m, d, ts);
    buf[i - lo] = m;
    amax = std::max(amax, std::fabs(m));
  }
  const float a = given.given ? given.value : amax;
  const float inv = q8::quant_inv(a, kMap);
  i = lo;
#if defined(__AVX512F__) || defined(__AVX2__)
  alignas(64) float ubuf[q8::kBlock];
  if (kRound == q8::kStochastic)  // a partial block: its elements' u one by one (at most two such blocks per run)
    for (int64_t e = lo; e < hi; ++e) ubuf[e - lo] = q8::uniform(ib, index0 + (e - lo));
  const vfloat vinv = vset1(inv);
  for (; i + W <= hi; i += W)
    store_codes<kMap, kRound>(q + i, vload(buf + (i - lo)), vinv,
                              kRound == q8::kStochastic ? vload(ubuf + (i - lo)) : vzero());
#endif
  for (; i < hi; ++i) {
    const float u = kRound == q8::kStochastic ? q8::uniform(ib, index0 + (i - lo)) : 0.0f;
    q[i] = q8::quant(buf[i - lo], inv, kMap, kRound, u);
  }
  return a;
}

// The blocks of one chunk of a run.
template <typename G, bool kDecoupled, int kMap, int kRound>
void run_chunk(const QSpan& sp, const QChunk& ch, float d, const novograd::UpdateScalars& s, uint32_t base,
               const float* boundary) {
  alignas(64) float buf[q8::kBlock];
  const G* g = static_cast<const G*>(sp.g);
  const int64_t fb = q8::first_block(sp.start);
  const RunEnds ends(sp);
#if defined(__AVX512F__) || defined(__AVX2__)
  const VConsts c(d, s);
#endif
  for (int64_t lo = ch.lo; lo < ch.hi;) {
    const int64_t b = (sp.start + lo) / q8::kBlock;
    const int64_t hi = std::min(ch.hi, (b + 1) * q8::kBlock - sp.start);
    const int64_t j = b - fb;
    const BlockScale given = ends.scale_of(sp, j, boundary);
    const int64_t index0 = sp.start + lo;
    const uint32_t ib = q8::index_base(base, index0);
#if defined(__AVX512F__) || defined(__AVX2__)
    if (hi - lo == q8::kBlock)
      sp.scale[j] = full_block<G, kDecoupled, kMap, kRound>(sp.w, g, sp.q, lo, c, sp.scale[j], given, ib, index0);
    else
#endif
      sp.scale[j] = part_block<G, kDecoupled, kMap, kRound>(sp.w, g, sp.q, lo, hi, d, s, sp.scale[j], given, ib, index0,
                                                          buf);
    lo = hi;
  }
}

void update_q8_spans(const std::vector<QSpan>& spans, GradKind kind, const float* denoms, const float* boundary,
                     const novograd::UpdateScalars& s, const q8::Q8Scalars& qs) {
  const std::vector<QChunk> chunks = make_q8_chunks(spans);
  pybind11::gil_scoped_release nogil;
  dispatch_grad(kind, [&](auto tag) {
    using G = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    auto run = [&](auto dec, auto map, auto rnd) {
      constexpr bool kDec = decltype(dec)::value;
      constexpr int kMap = decltype(map)::value, kRnd = decltype(rnd)::value;
      at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
        for (int64_t c = lo; c < hi; ++c) {
          const QSpan& sp = spans[chunks[c].span];
          run_chunk<G, kDec, kMap, kRnd>(sp, chunks[c], denoms[sp.layer], s, q8::stream_base(qs.seed, sp.key, qs.step),
                                         boundary);
        }
      });
    };
    using T = std::true_type;
    using F = std::false_type;
    using Lin = std::integral_constant<int, q8::kLinear>;
    using Sq = std::integral_constant<int, q8::kSqrt>;
    using Near = std::integral_constant<int, q8::kNearest>;
    using Sto = std::integral_constant<int, q8::kStochastic>;
    auto by_round = [&](auto dec, auto map) {
      if (qs.rounding == q8::kNearest) run(dec, map, Near{}); else run(dec, map, Sto{});
    };
    auto by_map = [&](auto dec) {
      if (qs.map == q8::kLinear) by_round(dec, Lin{}); else by_round(dec, Sq{});
    };
    if (s.decoupled) by_map(T{}); else by_map(F{});
  });
}

// The local max |m_new| over each run's partial first / last block; 0 where the block is not partial.
at::Tensor boundary_q8_spans(const std::vector<QSpan>& spans, int64_t n_runs, GradKind kind, const float* denoms,
                             const novograd::UpdateScalars& s, int map) {
  at::Tensor out = at::zeros({n_runs, 2}, at::kFloat);
  float* o = out.data_ptr<float>();
  pybind11::gil_scoped_release nogil;
  dispatch_grad(kind, [&](auto tag) {
    using G = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    at::parallel_for(0, static_cast<int64_t>(spans.size()), 16, [&](int64_t lo_s, int64_t hi_s) {
      for (int64_t r = lo_s; r < hi_s; ++r) {
        const QSpan& sp = spans[r];
        const G* g = static_cast<const G*>(sp.g);
        const int64_t count = q8::block_count(sp.start, sp.n);
        const bool partial[2] = {q8::first_partial(sp.start, sp.n, sp.layer_numel),
                                 q8::last_partial(sp.start, sp.n, sp.layer_numel)};
        for (int col = 0; col < 2; ++col) {
          if (!partial[col]) continue;
          const int64_t j = col == 0 ? 0 : count - 1;
          const int64_t b = q8::first_block(sp.start) + j;
          const int64_t lo = std::max<int64_t>(0, b * q8::kBlock - sp.start);
          const int64_t hi = std::min(sp.n, (b + 1) * q8::kBlock - sp.start);
          const float step = q8::dequant_step(sp.scale[j], map);
          float amax = 0.0f;
          for (int64_t i = lo; i < hi; ++i) {
            float w = sp.w[i];
            float m = q8::dequant(sp.q[i], step, map);
            novograd::update_element(to_float(g[i]), w, m, denoms[sp.layer], s);
            amax = std::max(amax, std::fabs(m));
          }
          o[2 * sp.run + col] = amax;
        }
      }
    });
  });
  return out;
}

// ---- argument checks ------------------------------------------------------------------------------------------
void check_codes(const at::Tensor& t, const char* what, int64_t i, int64_t numel) {
  check_dense(t, what, i);
  TORCH_CHECK(t.scalar_type() == at::kChar, "novograd_ds fused CPU op: ", what, "[", i, "] has dtype ", t.scalar_type(),
              "; 8-bit codes are int8");
  TORCH_CHECK(t.numel() == numel, "novograd_ds fused CPU op: ", what, "[", i, "] has ", t.numel(), " elements, expected ",
              numel);
}

// List form: one run per tensor, geometry rows (start, layer_numel, key).
std::vector<QSpan> list_spans(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                              const std::vector<at::Tensor>& codes, const std::vector<at::Tensor>& scales,
                              const at::Tensor& runs, GradKind& kind) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && codes.size() == n && scales.size() == n,
              "novograd_ds fused CPU op: params, grads, codes and scales must have the same length");
  TORCH_CHECK(runs.device().is_cpu() && runs.scalar_type() == at::kLong && runs.dim() == 2 && runs.size(0) == (int64_t)n &&
                  runs.size(1) == 3,
              "novograd_ds fused CPU op: runs must be a CPU int64 tensor [n, 3] (start, layer_numel, key); "
              "Q8Runs.as_tensor() makes one");
  kind = n ? common_grad_kind(grads) : GradKind::kFloat;
  at::Tensor rt = runs.contiguous();
  const int64_t* r = rt.data_ptr<int64_t>();
  std::vector<QSpan> spans;
  spans.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const int64_t numel = grads[i].numel();
    check_state(params[i], "params", i, numel);
    check_codes(codes[i], "codes", i, numel);
    const std::string why = novograd::q8_check_run(i, numel, r[3 * i], r[3 * i + 1]);
    TORCH_CHECK(why.empty(), "novograd_ds fused CPU op: ", why);
    check_state(scales[i], "scales", i, q8::block_count(r[3 * i], numel));
    spans.push_back({params[i].data_ptr<float>(), grads[i].data_ptr(), codes[i].data_ptr<int8_t>(),
                     scales[i].data_ptr<float>(), numel, static_cast<int64_t>(i), r[3 * i], r[3 * i + 1],
                     static_cast<uint32_t>(r[3 * i + 2]), static_cast<int64_t>(i)});
  }
  return spans;
}

std::vector<QSpan> table_spans(const at::Tensor& flat_param, const at::Tensor& flat_grad, const at::Tensor& flat_codes,
                               const at::Tensor& flat_scales, const at::Tensor& table, int64_t n_layers, GradKind& kind) {
  check_dense(flat_grad, "flat_grad", 0);
  kind = grad_kind(flat_grad.scalar_type(), "flat_grad");
  check_state(flat_param, "flat_param", 0, flat_grad.numel());
  check_codes(flat_codes, "flat_codes", 0, flat_grad.numel());
  check_dense(flat_scales, "flat_scales", 0);
  TORCH_CHECK(flat_scales.scalar_type() == at::kFloat, "novograd_ds fused CPU op: flat_scales must be float32");
  TORCH_CHECK(table.device().is_cpu() && table.scalar_type() == at::kLong && table.dim() == 2 && table.size(1) == 7,
              "novograd_ds fused CPU op: the 8-bit run table must be a CPU int64 tensor [n, 7] (offset, length, layer, "
              "start, layer_numel, key, scale_offset); Q8SegmentTable.as_tensor() makes one");
  at::Tensor t = table.contiguous();
  std::vector<QSpan> spans;
  std::string why;
  const int64_t bad = novograd::q8_segment_spans(t.data_ptr<int64_t>(), t.size(0), flat_grad.numel(), n_layers,
                                                 flat_scales.numel(), flat_grad.data_ptr(), flat_grad.element_size(),
                                                 flat_param.data_ptr<float>(), flat_codes.data_ptr<int8_t>(),
                                                 flat_scales.data_ptr<float>(), spans, why);
  TORCH_CHECK(bad < 0, "novograd_ds fused CPU op: ", why);
  return spans;
}

const float* checked_boundary(const std::optional<at::Tensor>& boundary, const std::vector<QSpan>& spans,
                              int64_t n_runs) {
  bool needed = false;
  for (const QSpan& sp : spans)
    needed = needed || q8::first_partial(sp.start, sp.n, sp.layer_numel) || q8::last_partial(sp.start, sp.n, sp.layer_numel);
  if (!boundary.has_value() || !boundary->defined()) {
    TORCH_CHECK(!needed, "novograd_ds fused CPU op: some runs have partial (boundary) blocks; pass boundary=, the "
                         "all-reduced (MAX) result of q8_boundary_absmax");
    return nullptr;
  }
  const at::Tensor& b = *boundary;
  TORCH_CHECK(b.device().is_cpu() && b.scalar_type() == at::kFloat && b.is_contiguous() && b.dim() == 2 &&
                  b.size(0) == n_runs && b.size(1) == 2,
              "novograd_ds fused CPU op: boundary must be a contiguous CPU float32 tensor [", n_runs, ", 2]");
  return b.data_ptr<float>();
}

q8::Q8Scalars q8_scalars(int64_t map, int64_t rounding, int64_t seed, int64_t step) {
  TORCH_CHECK(map == q8::kLinear || map == q8::kSqrt, "novograd_ds fused CPU op: map must be 0 (linear) or 1 (sqrt)");
  TORCH_CHECK(rounding == q8::kNearest || rounding == q8::kStochastic,
              "novograd_ds fused CPU op: rounding must be 0 (nearest) or 1 (stochastic)");
  return {static_cast<int>(map), static_cast<int>(rounding), static_cast<uint32_t>(seed), static_cast<uint32_t>(step)};
}

// ---- entry points ---------------------------------------------------------------------------------------------
at::Tensor q8_boundary_absmax(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                              const std::vector<at::Tensor>& codes, const std::vector<at::Tensor>& scales,
                              const at::Tensor& denoms, const at::Tensor& runs, double a1, double c1, double wd,
                              bool decoupled, int64_t map) {
  GradKind kind;
  std::vector<QSpan> spans = list_spans(params, grads, codes, scales, runs, kind);
  const int64_t n = static_cast<int64_t>(params.size());
  q8_scalars(map, 0, 0, 0);
  return boundary_q8_spans(spans, n, kind, checked_denoms(denoms, n), scalars(0.0, a1, c1, wd, decoupled),
                           static_cast<int>(map));
}

void q8_update(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
               const std::vector<at::Tensor>& codes, const std::vector<at::Tensor>& scales, const at::Tensor& denoms,
               const at::Tensor& runs, const std::optional<at::Tensor>& boundary, double lr, double a1, double c1,
               double wd, bool decoupled, int64_t map, int64_t rounding, int64_t seed, int64_t step) {
  GradKind kind;
  std::vector<QSpan> spans = list_spans(params, grads, codes, scales, runs, kind);
  const int64_t n = static_cast<int64_t>(params.size());
  const q8::Q8Scalars qs = q8_scalars(map, rounding, seed, step);
  update_q8_spans(spans, kind, checked_denoms(denoms, n), checked_boundary(boundary, spans, n),
                  scalars(lr, a1, c1, wd, decoupled), qs);
}

at::Tensor q8_boundary_absmax_segments(const at::Tensor& flat_param, const at::Tensor& flat_grad,
                                       const at::Tensor& flat_codes, const at::Tensor& flat_scales,
                                       const at::Tensor& table, const at::Tensor& layer_denoms, double a1, double c1,
                                       double wd, bool decoupled, int64_t map) {
  GradKind kind;
  const int64_t n_layers = layer_denoms.numel();
  std::vector<QSpan> spans = table_spans(flat_param, flat_grad, flat_codes, flat_scales, table, n_layers, kind);
  q8_scalars(map, 0, 0, 0);
  return boundary_q8_spans(spans, table.size(0), kind, checked_denoms(layer_denoms, n_layers),
                           scalars(0.0, a1, c1, wd, decoupled), static_cast<int>(map));
}

void q8_update_segments(const at::Tensor& flat_param, const at::Tensor& flat_grad, const at::Tensor& flat_codes,
                        const at::Tensor& flat_scales, const at::Tensor& table, const at::Tensor& layer_denoms,
                        const std::optional<at::Tensor>& boundary, double lr, double a1, double c1, double wd,
                        bool decoupled, int64_t map, int64_t rounding, int64_t seed, int64_t step) {
  GradKind kind;
  const int64_t n_layers = layer_denoms.numel();
  std::vector<QSpan> spans = table_spans(flat_param, flat_grad, flat_codes, flat_scales, table, n_layers, kind);
  const q8::Q8Scalars qs = q8_scalars(map, rounding, seed, step);
  update_q8_spans(spans, kind, checked_denoms(layer_denoms, n_layers), checked_boundary(boundary, spans, table.size(0)),
                  scalars(lr, a1, c1, wd, decoupled), qs);
}

// NOTE: [8-bit layer at a time] The plain-path step of whole tensors (each its own layer, no boundary blocks) in one
// call, as layer_step (NOTE: [layer at a time] in novograd_cpu.cpp) does for the fp32 moment: per tensor, the norm
// pass (the chunks and sums of sq_norms), the second moment (second_moment_step: NOTE: [v in double]), then the
// 8-bit update of its blocks, each thread walking its chunks backwards so that the gradient it summed last is
// re-read first. Bit for bit the result of sq_norms + second_moment_ + q8_update; it saves the Python between them
// (about 1 ms per step at 25M parameters in 51 tensors).
void q8_layer_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                   const std::vector<at::Tensor>& codes, const std::vector<at::Tensor>& scales,
                   const std::vector<at::Tensor>& vs, const std::vector<at::Tensor>& vmaxs, const at::Tensor& runs,
                   double lr, double a1, double c1, double a2, double c2, double eps, double wd, bool decoupled,
                   int64_t map, int64_t rounding, int64_t seed, int64_t step) {
  GradKind kind;
  std::vector<QSpan> spans = list_spans(params, grads, codes, scales, runs, kind);
  const size_t n_t = spans.size();
  TORCH_CHECK(vs.size() == n_t && (vmaxs.empty() || vmaxs.size() == n_t),
              "novograd_ds fused CPU op: vs (and vmaxs when given) must have one entry per tensor");
  for (size_t i = 0; i < n_t; ++i) {
    check_state(vs[i], "vs", static_cast<int64_t>(i), 1);
    if (!vmaxs.empty()) check_state(vmaxs[i], "vmaxs", static_cast<int64_t>(i), 1);
    TORCH_CHECK(spans[i].start == 0 && spans[i].layer_numel == spans[i].n,
                "novograd_ds fused CPU op: q8_layer_step takes whole tensors (runs starting at 0 and covering their "
                "layer); step pieces of layers with q8_boundary_absmax and q8_update");
  }
  const q8::Q8Scalars qs = q8_scalars(map, rounding, seed, step);
  const novograd::UpdateScalars s = scalars(lr, a1, c1, wd, decoupled);
  pybind11::gil_scoped_release nogil;
  dispatch_grad(kind, [&](auto tag) {
    using G = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    std::vector<double> partial;
    for (size_t i = 0; i < n_t; ++i) {
      const QSpan& sp = spans[i];
      const int64_t n = sp.n;
      const G* g = static_cast<const G*>(sp.g);
      const int64_t n_chunks = (n + kChunk - 1) / kChunk;
      partial.assign(static_cast<size_t>(n_chunks), 0.0);
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
      const uint32_t base = q8::stream_base(qs.seed, sp.key, qs.step);
      static_assert(kQChunk == kChunk, "the update walks back over the chunks the norm pass summed");
      auto run = [&](auto dec, auto mp, auto rnd) {
        constexpr bool kDec = decltype(dec)::value;
        constexpr int kMap = decltype(mp)::value, kRnd = decltype(rnd)::value;
        at::parallel_for(0, n_chunks, 1, [&](int64_t lo, int64_t hi) {
          for (int64_t c = hi - 1; c >= lo; --c) {
            const QChunk ch{0, c * kQChunk, std::min(n, (c + 1) * kQChunk)};
            run_chunk<G, kDec, kMap, kRnd>(sp, ch, d, s, base, nullptr);
          }
        });
      };
      using Lin = std::integral_constant<int, q8::kLinear>;
      using Sq = std::integral_constant<int, q8::kSqrt>;
      using Near = std::integral_constant<int, q8::kNearest>;
      using Sto = std::integral_constant<int, q8::kStochastic>;
      auto by_round = [&](auto dec, auto mp) {
        if (qs.rounding == q8::kNearest) run(dec, mp, Near{}); else run(dec, mp, Sto{});
      };
      auto by_map = [&](auto dec) {
        if (qs.map == q8::kLinear) by_round(dec, Lin{}); else by_round(dec, Sq{});
      };
      if (s.decoupled) by_map(std::true_type{}); else by_map(std::false_type{});
    }
  });
}

}  // namespace

void register_q8(pybind11::module_& mod) {
  mod.def("q8_boundary_absmax", &q8_boundary_absmax,
          "8-bit moment: each run's local max |m_new| over its partial first/last block ([n, 2], 0 where not partial)");
  mod.def("q8_update", &q8_update, "8-bit moment: dequantise, update m and w, block scales, quantise (list form)");
  mod.def("q8_boundary_absmax_segments", &q8_boundary_absmax_segments, "q8_boundary_absmax over a run table");
  mod.def("q8_update_segments", &q8_update_segments, "q8_update over a run table of flat tensors");
  mod.def("q8_layer_step", &q8_layer_step, "8-bit plain-path step of whole tensors, one layer at a time (norm, v, update)");
}

}  // namespace novograd_cpu
