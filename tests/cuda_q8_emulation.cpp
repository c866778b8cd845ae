// Sequential emulation of the 8-bit moment's CUDA kernels (novograd_ds/ops/csrc/cuda/novograd_q8.cu) on the CPU.
//
// The launch plan is the real one (cuda/q8_plan.h, compiled here with g++ exactly as nvcc compiles it into the op),
// and so is the per-element math (q8_math.h, novograd_math.h). Each kernel is replayed launch by launch, CUDA block
// by block, warp by warp, lane by lane, with the same loops; the warp's shuffle-xor max is replayed as all 32 lanes
// reading before any writes. Built by tests/test_q8_launch_plan.py with -ffp-contract=off (nvcc: --fmad=false).
//
//   cuda_q8_emulation [--random K]          run every case; one line per case, exit 1 on a failure
//   cuda_q8_emulation --q8-from IN OUT      run the boundary pass and the update on the problem in IN, write the
//                                           results to OUT (the test compares them with the Python backends)
//
// Per case and per (map, rounding, decoupled) (two of them for the largest cases): every launch within the limits; every element of every run updated
// once, elements outside the runs never; every scale of every run written once; the boundary pass's every row
// written once; w, codes, scales and the boundary values equal, bit for bit, to a plain sequential evaluation of
// the definition (block by block, element by element). It prints a hash of the results, which the test compares
// across builds with different launch limits.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "cuda/q8_plan.h"

using namespace novograd_cuda;
namespace q8 = novograd::q8;

namespace {

struct Run {
  int64_t off, len, layer, start, layer_numel, key;
};

struct Case {
  std::string name;
  int64_t numel = 0, n_layers = 0;
  std::vector<Run> runs;
  void add(int64_t off, int64_t len, int64_t layer, int64_t start, int64_t layer_numel, int64_t key) {
    runs.push_back({off, len, layer, start, layer_numel, key});
    if (off + len > numel) numel = off + len;
    if (layer + 1 > n_layers) n_layers = layer + 1;
  }
};

struct Rng {
  uint64_t s;
  uint64_t next() {  // splitmix64
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  int64_t below(int64_t n) { return n <= 0 ? 0 : static_cast<int64_t>(next() % static_cast<uint64_t>(n)); }
  float unit() { return static_cast<float>(next() >> 40) * (1.0f / 16777216.0f); }
};

uint64_t fnv(uint64_t h, const void* p, size_t n) {
  const unsigned char* b = static_cast<const unsigned char*>(p);
  for (size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 0x100000001b3ull;
  return h;
}

// Every lane's value after `x = fmaxf(x, __shfl_xor_sync(full, x, o))` for o = 16, 8, 4, 2, 1.
float warp_max(float* lanes) {
  float t[kQ8Warp];
  for (int o = kQ8Warp / 2; o > 0; o >>= 1) {
    std::memcpy(t, lanes, sizeof(t));
    for (int l = 0; l < kQ8Warp; ++l) lanes[l] = std::fmax(t[l], t[l ^ o]);
  }
  return lanes[0];
}

int failures = 0;
#define EXPECT(cond, ...)                   \
  do {                                      \
    if (!(cond)) {                          \
      ++failures;                           \
      std::printf("FAIL %s: ", tag.c_str()); \
      std::printf(__VA_ARGS__);             \
      std::printf("\n");                    \
      return;                               \
    }                                       \
  } while (0)

// The state of one problem: flat parameter, gradient, codes, scales, per-layer denominators, boundary array.
struct State {
  std::vector<float> w, g, scales, denoms, boundary;
  std::vector<int8_t> q;
};

std::vector<QSpan> spans_of(const Case& c, State& st, std::vector<int64_t>& scale_off) {
  std::vector<QSpan> spans;
  scale_off.clear();
  int64_t so = 0;
  for (size_t r = 0; r < c.runs.size(); ++r) {
    const Run& ru = c.runs[r];
    scale_off.push_back(so);
    spans.push_back({st.w.data() + ru.off, st.g.data() + ru.off, st.q.data() + ru.off, st.scales.data() + so, ru.len,
                     ru.layer, ru.start, ru.layer_numel, static_cast<uint32_t>(ru.key), static_cast<int64_t>(r)});
    so += q8::block_count(ru.start, ru.len);
  }
  return spans;
}

// q8_boundary_kernel, replayed; `rows` counts writes of each boundary row entry.
void emulate_boundary(const std::vector<Q8Launch>& plan, const float* denoms, const novograd::UpdateScalars& sc, int map,
                      float* out, std::vector<int>& rows) {
  for (const Q8Launch& l : plan) {
    const Q8LaunchTable& t = l.table;
    for (int blk = 0; blk < l.blocks; ++blk)
      for (int warp = 0; warp < kQ8Warps; ++warp) {
        const int item = blk * kQ8Warps + warp;
        if (item >= 2 * l.n_spans) continue;
        const int s = item / 2, col = item % 2;
        const int64_t start = t.start[s], n = t.n[s];
        const bool partial = col == 0 ? q8::first_partial(start, n, t.layer_numel[s])
                                      : q8::last_partial(start, n, t.layer_numel[s]);
        float lanes[kQ8Warp];
        for (int lane = 0; lane < kQ8Warp; ++lane) {
          float amax = 0.0f;
          if (partial) {
            const float* g = static_cast<const float*>(t.g[s]);
            const int64_t j = col == 0 ? 0 : q8::block_count(start, n) - 1;
            const int64_t e0 = (q8::first_block(start) + j) * q8::kBlock - start;
            const int64_t elo = e0 > 0 ? e0 : 0, ehi = e0 + q8::kBlock < n ? e0 + q8::kBlock : n;
            const float step = q8::dequant_step(t.scale[s][j], map), d = denoms[t.layer[s]];
            for (int k = 0; k < kQ8PerLane; ++k) {
              const int64_t e = e0 + lane + kQ8Warp * k;
              if (e >= elo && e < ehi) {
                float m = q8::dequant(t.q[s][e], step, map);
                float wi = t.w[s][e];
                novograd::update_element(g[e], wi, m, d, sc);
                amax = std::fmax(amax, std::fabs(m));
              }
            }
          }
          lanes[lane] = amax;
        }
        const float a = warp_max(lanes);
        out[2 * t.run[s] + col] = partial ? a : 0.0f;
        ++rows[2 * t.run[s] + col];
      }
  }
}

// q8_update_kernel, replayed. `visits` counts updates of each flat element, `scale_writes` writes of each scale.
void emulate_update(const std::vector<Q8Launch>& plan, const float* denoms, const float* boundary,
                    const novograd::UpdateScalars& sc, int map, int rnd, const float* w_base, std::vector<int>& visits,
                    const float* scale_base, std::vector<int>& scale_writes) {
  for (const Q8Launch& l : plan) {
    const Q8LaunchTable& t = l.table;
    for (int blk = 0; blk < l.blocks; ++blk) {
      const Q8ChunkWork cw = q8_chunk_work(t, blk);
      const int s = cw.s;
      const float* g = static_cast<const float*>(t.g[s]);
      float* w = t.w[s];
      int8_t* q = t.q[s];
      float* scale = t.scale[s];
      const int64_t start = t.start[s], n = t.n[s];
      const float d = denoms[t.layer[s]];
      const int64_t fb = q8::first_block(start), count = q8::block_count(start, n);
      const bool fp = q8::first_partial(start, n, t.layer_numel[s]), lp = q8::last_partial(start, n, t.layer_numel[s]);
      const float bnd0 = fp ? boundary[2 * t.run[s]] : 0.0f, bnd1 = lp ? boundary[2 * t.run[s] + 1] : 0.0f;
      const int64_t b_first = (start + cw.lo) / q8::kBlock, b_last = (start + cw.hi - 1) / q8::kBlock;
      for (int warp = 0; warp < kQ8Warps; ++warp)
        for (int64_t b = b_first + warp; b <= b_last; b += kQ8Warps) {
          const int64_t j = b - fb;
          const int64_t e0 = b * q8::kBlock - start;
          const int64_t elo = e0 > cw.lo ? e0 : cw.lo, ehi = e0 + q8::kBlock < cw.hi ? e0 + q8::kBlock : cw.hi;
          const float step = q8::dequant_step(scale[j], map);
          float mv[kQ8Warp][kQ8PerLane], lanes[kQ8Warp];
          for (int lane = 0; lane < kQ8Warp; ++lane) {
            float amax = 0.0f;
            for (int k = 0; k < kQ8PerLane; ++k) {
              const int64_t e = e0 + lane + kQ8Warp * k;
              mv[lane][k] = 0.0f;
              if (e >= elo && e < ehi) {
                float m = q8::dequant(q[e], step, map);
                float wi = w[e];
                novograd::update_element(g[e], wi, m, d, sc);
                w[e] = wi;
                mv[lane][k] = m;
                amax = std::fmax(amax, std::fabs(m));
                ++visits[static_cast<size_t>(w + e - w_base)];
              }
            }
            lanes[lane] = amax;
          }
          const float amax = warp_max(lanes);
          const float a = q8::block_absmax(j, count, fp, lp, amax, bnd0, bnd1);
          const float inv = q8::quant_inv(a, map);
          const uint32_t ib = q8::index_base(t.base[s], b * q8::kBlock);
          for (int lane = 0; lane < kQ8Warp; ++lane)
            for (int k = 0; k < kQ8PerLane; ++k) {
              const int64_t e = e0 + lane + kQ8Warp * k;
              if (e >= elo && e < ehi) {
                const float u = rnd == q8::kStochastic ? q8::uniform(ib, start + e) : 0.0f;
                q[e] = q8::quant(mv[lane][k], inv, map, rnd, u);
              }
            }
          scale[j] = a;
          ++scale_writes[static_cast<size_t>(scale + j - scale_base)];
        }
    }
  }
}

// The definition, evaluated plainly: run by run, block by block, element by element.
void sequential(const Case& c, State& st, const novograd::UpdateScalars& sc, const q8::Q8Scalars& qs,
                std::vector<float>* bnd_out) {
  std::vector<int64_t> so;
  std::vector<QSpan> spans = spans_of(c, st, so);
  for (const QSpan& sp : spans) {
    const float* g = static_cast<const float*>(sp.g);
    const int64_t count = q8::block_count(sp.start, sp.n);
    const bool fp = q8::first_partial(sp.start, sp.n, sp.layer_numel), lp = q8::last_partial(sp.start, sp.n, sp.layer_numel);
    const float d = st.denoms[sp.layer];
    const uint32_t base = q8::stream_base(qs.seed, sp.key, qs.step);
    for (int64_t j = 0; j < count; ++j) {
      const int64_t b = q8::first_block(sp.start) + j;
      const int64_t lo = std::max<int64_t>(0, b * q8::kBlock - sp.start), hi = std::min(sp.n, (b + 1) * q8::kBlock - sp.start);
      const float step = q8::dequant_step(sp.scale[j], qs.map);
      std::vector<float> m(static_cast<size_t>(hi - lo));
      float amax = 0.0f;
      for (int64_t e = lo; e < hi; ++e) {
        float mm = q8::dequant(sp.q[e], step, qs.map);
        float wi = sp.w[e];
        novograd::update_element(g[e], wi, mm, d, sc);
        if (!bnd_out) sp.w[e] = wi;
        m[e - lo] = mm;
        amax = std::fmax(amax, std::fabs(mm));
      }
      if (bnd_out) {  // the boundary pass: the local max of partial ends, nothing written back
        if (j == 0 && fp) (*bnd_out)[2 * sp.run] = amax;
        if (j == count - 1 && lp) (*bnd_out)[2 * sp.run + 1] = amax;
        continue;
      }
      const float a = q8::block_absmax(j, count, fp, lp, amax, st.boundary[2 * sp.run], st.boundary[2 * sp.run + 1]);
      const float inv = q8::quant_inv(a, qs.map);
      const uint32_t ib = q8::index_base(base, b * q8::kBlock);
      for (int64_t e = lo; e < hi; ++e)
        sp.q[e] = q8::quant(m[e - lo], inv, qs.map, qs.rounding,
                            qs.rounding == q8::kStochastic ? q8::uniform(ib, sp.start + e) : 0.0f);
      sp.scale[j] = a;
    }
  }
}

State initial_state(const Case& c, uint64_t seed, int64_t n_scales) {
  Rng rng{seed};
  State st;
  st.g.resize(static_cast<size_t>(c.numel));
  st.w.resize(st.g.size());
  st.q.resize(st.g.size());
  for (size_t i = 0; i < st.g.size(); ++i) {
    const float u = rng.unit();
    st.g[i] = u < 0.02f ? 0.0f : (2.0f * rng.unit() - 1.0f) * std::ldexp(1.0f, static_cast<int>(rng.below(9)) - 4);
    st.w[i] = 2.0f * rng.unit() - 1.0f;
    st.q[i] = static_cast<int8_t>(rng.below(255) - 127);
  }
  st.scales.resize(static_cast<size_t>(n_scales));
  for (float& s : st.scales) s = rng.below(8) == 0 ? 0.0f : 0.5f * rng.unit();  // some all-zero blocks
  st.denoms.resize(static_cast<size_t>(c.n_layers));
  for (float& d : st.denoms) d = 0.5f + rng.unit();
  return st;
}

void run_case(const Case& c) {
  int64_t n_scales = 0;
  for (const Run& r : c.runs) n_scales += q8::block_count(r.start, r.len);
  uint64_t h = 0xcbf29ce484222325ull;
  size_t launches = 0, chunks = 0;
  for (int map = 0; map < 2; ++map)
    for (int rnd = 0; rnd < 2; ++rnd)
      for (int dec = 0; dec < 2; ++dec) {
        // cases over 2^20 elements (more chunks than a launch holds) run two of the eight combinations
        if (c.numel > (1 << 20) && !(map == rnd && rnd == dec)) continue;
        const std::string tag = c.name + " map=" + std::to_string(map) + " rounding=" + std::to_string(rnd) +
                                " decoupled=" + std::to_string(dec);
        const novograd::UpdateScalars sc{0.01f, 0.9f, dec ? 0.1f : 1.0f, 0.05f, dec};
        const q8::Q8Scalars qs{map, rnd, 1234u, 7u};
        State st = initial_state(c, 0x5eedull + static_cast<uint64_t>(c.numel), n_scales);
        State ref = st;
        const size_t n_runs = c.runs.size();
        // boundary pass: emulated vs sequential; every row written once
        std::vector<int64_t> so;
        std::vector<QSpan> spans = spans_of(c, st, so);
        const std::vector<Q8Launch> bplan = make_q8_boundary_plan(spans.data(), static_cast<int64_t>(spans.size()));
        std::vector<float> bnd(2 * n_runs, -1.0f), bnd_ref(2 * n_runs, 0.0f);
        std::vector<int> rows(2 * n_runs, 0);
        emulate_boundary(bplan, st.denoms.data(), sc, map, bnd.data(), rows);
        sequential(c, ref, sc, qs, &bnd_ref);
        for (size_t i = 0; i < rows.size(); ++i) EXPECT(rows[i] == 1, "boundary row %zu written %d times", i, rows[i]);
        EXPECT(std::memcmp(bnd.data(), bnd_ref.data(), bnd.size() * sizeof(float)) == 0,
               "boundary pass differs from the sequential definition");
        EXPECT(std::memcmp(st.w.data(), ref.w.data(), st.w.size() * sizeof(float)) == 0 &&
                   std::memcmp(st.q.data(), ref.q.data(), st.q.size()) == 0,
               "the boundary pass wrote w or codes");
        // the other ranks' pieces of boundary blocks: as if their max were up to 50% larger (or equal)
        Rng rng{0xb0b0ull + c.numel};
        st.boundary.resize(2 * n_runs);
        for (size_t i = 0; i < bnd.size(); ++i) st.boundary[i] = rng.below(3) == 0 ? bnd[i] : bnd[i] * (1.0f + 0.5f * rng.unit());
        ref.boundary = st.boundary;
        // update
        const std::vector<Q8Launch> plan = make_q8_update_plan(spans.data(), static_cast<int64_t>(spans.size()), qs);
        for (const Q8Launch& l : plan) {
          EXPECT(l.blocks >= 1 && l.blocks <= kQ8MaxBlocks && l.n_spans >= 1 && l.n_spans <= kQ8MaxSpans,
                 "a launch of %d blocks, %d spans", l.blocks, l.n_spans);
          for (int b = 0; b < l.blocks; ++b) EXPECT(l.table.block_span[b] < l.n_spans, "block names span %d", l.table.block_span[b]);
        }
        std::vector<int> visits(static_cast<size_t>(c.numel), 0), scale_writes(static_cast<size_t>(n_scales), 0);
        emulate_update(plan, st.denoms.data(), st.boundary.data(), sc, map, rnd, st.w.data(), visits, st.scales.data(),
                       scale_writes);
        sequential(c, ref, sc, qs, nullptr);
        std::vector<int> covered(static_cast<size_t>(c.numel), 0);
        for (const Run& r : c.runs)
          for (int64_t i = r.off; i < r.off + r.len; ++i) ++covered[i];
        for (int64_t i = 0; i < c.numel; ++i)
          EXPECT(visits[i] == covered[i], "element %lld updated %d times, it lies in %d runs", static_cast<long long>(i),
                 visits[i], covered[i]);
        for (int64_t i = 0; i < n_scales; ++i)
          EXPECT(scale_writes[i] == 1, "scale %lld written %d times", static_cast<long long>(i), scale_writes[i]);
        EXPECT(std::memcmp(st.w.data(), ref.w.data(), st.w.size() * sizeof(float)) == 0, "w differs from the definition");
        EXPECT(std::memcmp(st.q.data(), ref.q.data(), st.q.size()) == 0, "codes differ from the definition");
        EXPECT(std::memcmp(st.scales.data(), ref.scales.data(), st.scales.size() * sizeof(float)) == 0,
               "scales differ from the definition");
        h = fnv(h, bnd.data(), bnd.size() * sizeof(float));
        h = fnv(h, st.w.data(), st.w.size() * sizeof(float));
        h = fnv(h, st.q.data(), st.q.size());
        h = fnv(h, st.scales.data(), st.scales.size() * sizeof(float));
        launches = plan.size();
        chunks = 0;
        for (const Q8Launch& l : plan) chunks += static_cast<size_t>(l.blocks);
      }
  std::printf("case %s runs=%zu chunks=%zu scales=%lld launches=%zu hash=%016llx\n", c.name.c_str(), c.runs.size(),
              chunks, static_cast<long long>(n_scales), launches, static_cast<unsigned long long>(h));
}

// Cases depend on kQ8Chunk only, never on the launch limits, so builds with other limits run the same ones.
std::vector<Case> fixed_cases() {
  std::vector<Case> cases;
  const int64_t C = kQ8Chunk, B = q8::kBlock;
  { Case c; c.name = "whole-tensors"; c.add(0, 4096, 0, 0, 4096, 0); c.add(4096, 5000, 1, 0, 5000, 1);
    c.add(9096, 3 * C + 7, 2, 0, 3 * C + 7, 2); cases.push_back(c); }
  { Case c; c.name = "empty-runs"; c.add(0, 0, 0, 0, 10, 0); c.add(3, 0, 1, 5, 10, 1); c.add(3, 300, 2, 0, 300, 2);
    cases.push_back(c); }
  { Case c; c.name = "inside-one-block"; c.add(0, 10, 0, 3, 1000, 5); c.add(10, 1, 0, 255, 1000, 5);
    c.add(11, 7, 1, B + 9, 2 * B, 6); cases.push_back(c); }
  { Case c; c.name = "layer-in-pieces";  // one layer cut among three runs at block-interior points, interleaved
    c.add(0, 1000, 0, 0, 70001, 9); c.add(2000, 100, 0, 1000, 70001, 9); c.add(5000, 68901, 0, 1100, 70001, 9);
    c.add(1000, 600, 1, 17, 617, 3); cases.push_back(c); }
  { Case c; c.name = "chunk-edges"; c.add(0, C - 5, 0, 5, 3 * C, 1); c.add(C, C + 1, 1, C - 1, 3 * C, 2);
    c.add(3 * C, 2 * C, 2, C, 3 * C, 3); cases.push_back(c); }
  { Case c; c.name = "many-runs";  // more runs than a launch table holds
    int64_t o = 0;
    for (int i = 0; i < 60; ++i) { const int64_t n = 1 + (i * 7919) % (2 * C); c.add(o, n, i % 5, (i * 131) % 700, n + 700, i); o += n; }
    cases.push_back(c); }
  { Case c; c.name = "many-chunks"; c.add(0, 330 * C + 77, 0, 123, 330 * C + 300, 4); cases.push_back(c); }
  return cases;
}

std::vector<Case> random_cases(int k) {
  std::vector<Case> cases;
  Rng rng{777};
  const int64_t C = kQ8Chunk, B = q8::kBlock;
  for (int r = 0; r < k; ++r) {
    Case c;
    c.name = "random-" + std::to_string(r);
    const int64_t n_runs = 1 + rng.below(40);
    int64_t o = rng.below(3);
    for (int64_t s = 0; s < n_runs; ++s) {
      int64_t n;
      switch (rng.below(6)) {
        case 0: n = rng.below(2 * B); break;
        case 1: n = rng.below(5 * B) + B; break;
        case 2: n = rng.below(3 * C); break;
        case 3: n = C + rng.below(3) - 1; break;
        case 4: n = 0; break;
        default: n = rng.below(64); break;
      }
      const int64_t start = rng.below(2) ? rng.below(3 * B) : rng.below(2 * C);
      const int64_t lnumel = start + n + (rng.below(2) ? 0 : rng.below(2 * B));
      c.add(o, n, rng.below(8), start, lnumel, static_cast<int64_t>(rng.next() & 0xffffffffu));
      o += n + (rng.below(4) == 0 ? rng.below(9) : 0);
    }
    if (c.numel < o) c.numel = o;
    cases.push_back(c);
  }
  return cases;
}

// --q8-from IN OUT. IN: int64 numel, n_layers, n_runs, n_scales, map, rounding, seed, step, decoupled; double lr,
// a1, c1, wd; int64 runs[n_runs][6] (offset, length, layer, start, layer_numel, key); float denoms[n_layers],
// boundary_factor[n_runs][2]; float g[numel], w[numel]; int8 q[numel]; float scales[n_scales] (runs' scales packed
// in row order). The boundary pass runs first; the update then uses its output times boundary_factor. OUT: float
// boundary[n_runs][2], w[numel]; int8 q[numel]; float scales[n_scales].
int q8_from(const char* in_path, const char* out_path) {
  FILE* f = std::fopen(in_path, "rb");
  if (!f) { std::fprintf(stderr, "cannot open %s\n", in_path); return 2; }
  int64_t head[9];
  double fl[4];
  if (std::fread(head, sizeof(int64_t), 9, f) != 9 || std::fread(fl, sizeof(double), 4, f) != 4) return 2;
  const int64_t numel = head[0], n_layers = head[1], n_runs = head[2], n_scales = head[3];
  std::vector<int64_t> rows(static_cast<size_t>(6 * n_runs));
  State st;
  std::vector<float> factor(static_cast<size_t>(2 * n_runs));
  st.denoms.resize(static_cast<size_t>(n_layers));
  st.g.resize(static_cast<size_t>(numel));
  st.w.resize(st.g.size());
  st.q.resize(st.g.size());
  st.scales.resize(static_cast<size_t>(n_scales));
  bool ok = std::fread(rows.data(), sizeof(int64_t), rows.size(), f) == rows.size() &&
            std::fread(st.denoms.data(), sizeof(float), st.denoms.size(), f) == st.denoms.size() &&
            std::fread(factor.data(), sizeof(float), factor.size(), f) == factor.size() &&
            std::fread(st.g.data(), sizeof(float), st.g.size(), f) == st.g.size() &&
            std::fread(st.w.data(), sizeof(float), st.w.size(), f) == st.w.size() &&
            std::fread(st.q.data(), 1, st.q.size(), f) == st.q.size() &&
            std::fread(st.scales.data(), sizeof(float), st.scales.size(), f) == st.scales.size();
  std::fclose(f);
  if (!ok) { std::fprintf(stderr, "short file\n"); return 2; }
  Case c;
  for (int64_t r = 0; r < n_runs; ++r) {
    const int64_t* x = &rows[static_cast<size_t>(6 * r)];
    c.add(x[0], x[1], x[2], x[3], x[4], x[5]);
  }
  c.numel = numel;
  c.n_layers = n_layers;
  const novograd::UpdateScalars sc{static_cast<float>(fl[0]), static_cast<float>(fl[1]), static_cast<float>(fl[2]),
                                   static_cast<float>(fl[3]), static_cast<int>(head[8])};
  const q8::Q8Scalars qs{static_cast<int>(head[4]), static_cast<int>(head[5]), static_cast<uint32_t>(head[6]),
                         static_cast<uint32_t>(head[7])};
  std::vector<int64_t> so;
  std::vector<QSpan> spans = spans_of(c, st, so);
  std::vector<float> bnd(static_cast<size_t>(2 * n_runs), 0.0f);
  std::vector<int> rows_written(bnd.size(), 0);
  emulate_boundary(make_q8_boundary_plan(spans.data(), n_runs), st.denoms.data(), sc, qs.map, bnd.data(), rows_written);
  st.boundary.resize(bnd.size());
  for (size_t i = 0; i < bnd.size(); ++i) st.boundary[i] = bnd[i] * factor[i];
  std::vector<int> visits(static_cast<size_t>(numel), 0), scale_writes(static_cast<size_t>(n_scales), 0);
  emulate_update(make_q8_update_plan(spans.data(), n_runs, qs), st.denoms.data(), st.boundary.data(), sc, qs.map,
                 qs.rounding, st.w.data(), visits, st.scales.data(), scale_writes);
  FILE* o = std::fopen(out_path, "wb");
  if (!o) return 2;
  std::fwrite(bnd.data(), sizeof(float), bnd.size(), o);
  std::fwrite(st.w.data(), sizeof(float), st.w.size(), o);
  std::fwrite(st.q.data(), 1, st.q.size(), o);
  std::fwrite(st.scales.data(), sizeof(float), st.scales.size(), o);
  std::fclose(o);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  int n_random = 100;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--q8-from" && i + 2 < argc) return q8_from(argv[i + 1], argv[i + 2]);
    if (a == "--random" && i + 1 < argc) n_random = std::atoi(argv[++i]);
    else { std::fprintf(stderr, "unknown argument %s\n", a.c_str()); return 2; }
  }
  std::printf("limits spans=%d blocks=%d chunk=%lld threads=%d table_bytes=%zu\n", kQ8MaxSpans, kQ8MaxBlocks,
              static_cast<long long>(kQ8Chunk), kQ8Threads, sizeof(Q8LaunchTable));
  std::vector<Case> cases = fixed_cases();
  for (Case& c : random_cases(n_random)) cases.push_back(c);
  for (const Case& c : cases) run_case(c);
  std::printf("%s %zu cases, %d failures\n", failures ? "FAILED" : "ok", cases.size(), failures);
  return failures ? 1 : 0;
}
