// Sequential emulation of the NovoGrad CUDA kernels (novograd_ds/ops/csrc/cuda/novograd_cuda.cu) on the CPU.
//
// The launch plan is the real one: launch_plan.h, compiled here with g++ exactly as nvcc compiles it into the
// op. Each kernel is replayed launch by launch, block by block, thread by thread, with the same thread-stride
// loops and the same reduction trees (a warp shuffle `x += __shfl_down_sync(x, o)` is replayed as all 32 lanes
// reading before any writes). Built by tests/test_launch_plan.py with -ffp-contract=off (nvcc: --fmad=false), so
// every fp32 and fp64 operation rounds as on the GPU.
//
//   cuda_launch_emulation [--budget N] [--random K]   run every case; one line per case, exit 1 on a failure
//   cuda_launch_emulation --norms-from FILE           per-layer norms of the problem in FILE (the GPU test
//                                                     compares them with the op's, bit for bit)
//
// For each case it checks: every launch within kMaxSpans/kMaxBlocks; every element of every span read once by
// the norm pass and updated once by the update pass, elements outside the spans never; every norm slot written
// once; every layer written once; the norms against a float64 sum within the rounding bound; the update equal,
// bit for bit, to update_element applied element by element. It prints a hash of all results (partials, norms,
// parameters, exp_avg), which the test compares across builds with different launch limits.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "cuda/launch_plan.h"

using namespace novograd_cuda;

namespace {

struct Case {
  std::string name;
  int64_t numel = 0;
  int64_t n_layers = 0;
  std::vector<int64_t> off, len, layer;
  void add(int64_t o, int64_t n, int64_t k) {
    off.push_back(o);
    len.push_back(n);
    layer.push_back(k);
    if (o + n > numel) numel = o + n;
    if (k + 1 > n_layers) n_layers = k + 1;
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
  float unit() { return static_cast<float>(next() >> 40) * (1.0f / 16777216.0f); }  // [0, 1)
};

uint64_t fnv(uint64_t h, const void* p, size_t n) {
  const unsigned char* b = static_cast<const unsigned char*>(p);
  for (size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 0x100000001b3ull;
  return h;
}

// Lane 0 of `x += __shfl_down_sync(full, x, o)` for o = 16, 8, 4, 2, 1 (a lane whose source is out of range
// reads its own value, as the hardware does).
double warp_tree_sum(const double* lanes) {
  double v[kWarp], t[kWarp];
  std::memcpy(v, lanes, sizeof(v));
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    std::memcpy(t, v, sizeof(v));
    for (int l = 0; l < kWarp; ++l) v[l] = t[l] + (l + o < kWarp ? t[l + o] : t[l]);
  }
  return v[0];
}

int failures = 0;
#define EXPECT(cond, ...)                          \
  do {                                             \
    if (!(cond)) {                                 \
      ++failures;                                  \
      std::printf("FAIL %s: ", name.c_str());      \
      std::printf(__VA_ARGS__);                    \
      std::printf("\n");                           \
      return;                                      \
    }                                              \
  } while (0)

// The plan's tables stay within the limits and name only spans they hold.
void check_tables(const std::string& name, const Plan& plan) {
  for (const Launch& l : plan.launches) {
    EXPECT(l.blocks >= 1 && l.blocks <= kMaxBlocks, "a launch of %d blocks (limit %d)", l.blocks, kMaxBlocks);
    int max_span = 0;
    for (int b = 0; b < l.blocks; ++b) {
      max_span = l.table.block_span[b] > max_span ? l.table.block_span[b] : max_span;
      EXPECT(b == 0 || l.table.block_span[b] >= l.table.block_span[b - 1], "block -> span map not monotone");
    }
    EXPECT(max_span < kMaxSpans, "a launch names span %d (limit %d)", max_span, kMaxSpans);
  }
}

// Stage 1 (sq_partials_kernel), replayed. `visits` counts reads of each element of the flat gradient.
void emulate_partials(const Plan& plan, const float* base, std::vector<double>& partials, std::vector<int>& written,
                      std::vector<int>& visits) {
  std::vector<float> acc(kThreads);
  std::vector<double> lanes(kThreads), warp_sums(kWarp);
  for (const Launch& l : plan.launches) {
    for (int b = 0; b < l.blocks; ++b) {
      const BlockWork bw = block_work(l.table, b);
      const float* g = static_cast<const float*>(l.table.g[bw.s]);
      for (int t = 0; t < kThreads; ++t) {
        float a = 0.f;
        for (int64_t i = bw.begin + t; i < bw.end; i += kThreads) {
          a += novograd::square(g[i]);
          ++visits[static_cast<size_t>(g + i - base)];
        }
        acc[t] = a;
      }
      for (int t = 0; t < kThreads; ++t) lanes[t] = static_cast<double>(acc[t]);
      for (int w = 0; w < kWarps; ++w) warp_sums[w] = warp_tree_sum(&lanes[w * kWarp]);
      double first[kWarp];
      for (int l2 = 0; l2 < kWarp; ++l2) first[l2] = l2 < kWarps ? warp_sums[l2] : 0.0;
      partials[bw.slot] = warp_tree_sum(first);
      ++written[bw.slot];
    }
  }
}

// Stage 2 (finalize_kernel), replayed.
void emulate_finalize(const Plan& plan, const std::vector<double>& partials, std::vector<float>& out,
                      std::vector<int>& layer_written) {
  for (const FinalizeLaunch& f : plan.finalize) {
    for (int b = 0; b < f.blocks; ++b) {
      for (int w = 0; w < kFinalizeLayersPerBlock; ++w) {
        const int64_t j = static_cast<int64_t>(b) * kFinalizeLayersPerBlock + w;
        if (j >= f.table.n_layers) continue;
        const int64_t lo = f.table.slot_begin[j], hi = f.table.slot_begin[j + 1];
        double x[kWarp];
        for (int lane = 0; lane < kWarp; ++lane) {
          x[lane] = 0.0;
          for (int64_t i = lo + lane; i < hi; i += kWarp) x[lane] += partials[static_cast<size_t>(i)];
        }
        out[f.table.first_layer + j] = static_cast<float>(warp_tree_sum(x));
        ++layer_written[f.table.first_layer + j];
      }
    }
  }
}

// update_kernel, replayed.
void emulate_update(const Plan& plan, const float* denoms, const novograd::UpdateScalars& sc, const float* base,
                    std::vector<int>& visits) {
  for (const Launch& l : plan.launches) {
    for (int b = 0; b < l.blocks; ++b) {
      const BlockWork bw = block_work(l.table, b);
      const float* g = static_cast<const float*>(l.table.g[bw.s]);
      float* w = l.table.w[bw.s];
      float* m = l.table.m[bw.s];
      const float d = denoms[l.table.layer[bw.s]];
      for (int t = 0; t < kThreads; ++t)
        for (int64_t i = bw.begin + t; i < bw.end; i += kThreads) {
          float wi = w[i], mi = m[i];
          novograd::update_element(g[i], wi, mi, d, sc);
          w[i] = wi;
          m[i] = mi;
          ++visits[static_cast<size_t>(g + i - base)];
        }
    }
  }
}

std::vector<Span> spans_of(const Case& c, const float* g, float* w, float* m) {
  std::vector<Span> spans;
  for (size_t r = 0; r < c.off.size(); ++r)
    spans.push_back({w ? w + c.off[r] : nullptr, g + c.off[r], m ? m + c.off[r] : nullptr, c.len[r], c.layer[r]});
  return spans;
}

std::vector<float> data_of(const Case& c, uint64_t seed) {
  Rng rng{seed};
  std::vector<float> g(static_cast<size_t>(c.numel));
  for (size_t r = 0; r < c.off.size(); ++r) {
    const float scale = std::ldexp(1.0f, static_cast<int>(rng.below(21)) - 10);  // 2^-10 .. 2^10 per span
    for (int64_t i = c.off[r]; i < c.off[r] + c.len[r]; ++i) {
      const float u = rng.unit();
      g[i] = u < 0.02f ? 0.0f : (2.0f * rng.unit() - 1.0f) * scale;
    }
  }
  return g;
}

void run_case(const Case& c, bool verbose) {
  const std::string& name = c.name;
  std::vector<float> g = data_of(c, 0x5eed0000ull + c.numel);
  std::vector<Span> spans = spans_of(c, g.data(), nullptr, nullptr);
  const int64_t n_spans = static_cast<int64_t>(spans.size());

  // -- norm pass --------------------------------------------------------------------------------------------
  const Plan plan = make_plan(spans.data(), n_spans, c.n_layers, true);
  check_tables(name, plan);
  if (failures) return;
  EXPECT(plan.n_slots == count_slots(spans.data(), n_spans), "n_slots %lld, count_slots %lld",
         static_cast<long long>(plan.n_slots), static_cast<long long>(count_slots(spans.data(), n_spans)));
  std::vector<double> partials(static_cast<size_t>(plan.n_slots), std::numeric_limits<double>::quiet_NaN());
  std::vector<int> written(static_cast<size_t>(plan.n_slots), 0), visits(static_cast<size_t>(c.numel), 0);
  emulate_partials(plan, g.data(), partials, written, visits);
  std::vector<int> covered(static_cast<size_t>(c.numel), 0);
  for (size_t r = 0; r < c.off.size(); ++r)
    for (int64_t i = c.off[r]; i < c.off[r] + c.len[r]; ++i) ++covered[i];
  for (int64_t i = 0; i < c.numel; ++i)
    EXPECT(visits[i] == covered[i], "norm pass read element %lld %d times, it lies in %d spans",
           static_cast<long long>(i), visits[i], covered[i]);
  for (int64_t s = 0; s < plan.n_slots; ++s)
    EXPECT(written[s] == 1, "slot %lld written %d times", static_cast<long long>(s), written[s]);
  std::vector<float> out(static_cast<size_t>(c.n_layers), std::numeric_limits<float>::quiet_NaN());
  std::vector<int> layer_written(static_cast<size_t>(c.n_layers), 0);
  emulate_finalize(plan, partials, out, layer_written);
  for (int64_t k = 0; k < c.n_layers; ++k)
    EXPECT(layer_written[k] == 1, "layer %lld written %d times", static_cast<long long>(k), layer_written[k]);

  // against float64: each thread adds at most T = ceil(kChunk / kThreads) rounded squares in fp32 (relative
  // error <= T u for non-negative terms, u = 2^-24); the double stages add ~1e-15; the result is rounded once.
  std::vector<double> truth(static_cast<size_t>(c.n_layers), 0.0);
  for (size_t r = 0; r < c.off.size(); ++r)
    for (int64_t i = c.off[r]; i < c.off[r] + c.len[r]; ++i)
      truth[c.layer[r]] += static_cast<double>(g[i]) * static_cast<double>(g[i]);
  const double T = static_cast<double>((kChunk + kThreads - 1) / kThreads);
  const double bound = (T + 2.0) * std::ldexp(1.0, -24);
  double worst = 0.0;
  for (int64_t k = 0; k < c.n_layers; ++k) {
    const double err = truth[k] == 0.0 ? std::fabs(static_cast<double>(out[k]))
                                       : std::fabs(static_cast<double>(out[k]) - truth[k]) / truth[k];
    worst = err > worst ? err : worst;
    EXPECT(err <= bound, "layer %lld: norm %.9g, float64 %.17g, relative error %.3g > bound %.3g",
           static_cast<long long>(k), static_cast<double>(out[k]), truth[k], err, bound);
  }

  // -- update pass ------------------------------------------------------------------------------------------
  Rng rng{0xabcdefull + c.numel};
  std::vector<float> w(static_cast<size_t>(c.numel)), m(static_cast<size_t>(c.numel));
  for (int64_t i = 0; i < c.numel; ++i) {
    w[i] = 2.0f * rng.unit() - 1.0f;
    m[i] = 0.1f * (2.0f * rng.unit() - 1.0f);
  }
  std::vector<float> denoms(static_cast<size_t>(c.n_layers));
  for (int64_t k = 0; k < c.n_layers; ++k) denoms[k] = static_cast<float>(std::sqrt(static_cast<double>(out[k]))) + 1e-8f;
  std::vector<float> w_ref = w, m_ref = m;
  uint64_t h = 0xcbf29ce484222325ull;
  h = fnv(h, partials.data(), partials.size() * sizeof(double));
  h = fnv(h, out.data(), out.size() * sizeof(float));
  for (int decoupled = 0; decoupled < 2; ++decoupled) {
    const novograd::UpdateScalars sc{0.01f, 0.95f, 0.05f, 0.1f, decoupled};
    std::vector<Span> uspans = spans_of(c, g.data(), w.data(), m.data());
    const Plan up = make_plan(uspans.data(), n_spans, c.n_layers, false);
    check_tables(name, up);
    if (failures) return;
    EXPECT(up.finalize.empty(), "the update plan has finalize launches");
    std::fill(visits.begin(), visits.end(), 0);
    emulate_update(up, denoms.data(), sc, g.data(), visits);
    for (int64_t i = 0; i < c.numel; ++i)
      EXPECT(visits[i] == covered[i], "update pass wrote element %lld %d times, it lies in %d spans",
             static_cast<long long>(i), visits[i], covered[i]);
    for (size_t r = 0; r < c.off.size(); ++r)
      for (int64_t i = c.off[r]; i < c.off[r] + c.len[r]; ++i)
        novograd::update_element(g[i], w_ref[i], m_ref[i], denoms[c.layer[r]], sc);
    EXPECT(std::memcmp(w.data(), w_ref.data(), w.size() * sizeof(float)) == 0 &&
               std::memcmp(m.data(), m_ref.data(), m.size() * sizeof(float)) == 0,
           "update (decoupled=%d) differs from update_element applied element by element", decoupled);
  }
  h = fnv(h, w.data(), w.size() * sizeof(float));
  h = fnv(h, m.data(), m.size() * sizeof(float));
  int64_t chunks = plan.n_slots;
  std::printf("case %s spans=%lld chunks=%lld layers=%lld launches=%zu finalize=%zu worst=%.3g bound=%.3g "
              "hash=%016llx\n",
              name.c_str(), static_cast<long long>(n_spans), static_cast<long long>(chunks),
              static_cast<long long>(c.n_layers), plan.launches.size(), plan.finalize.size(), worst, bound,
              static_cast<unsigned long long>(h));
  (void)verbose;
}

// The cases depend on kChunk only (never on the launch limits), so builds with different limits run the same ones.
std::vector<Case> fixed_cases() {
  std::vector<Case> cases;
  const int64_t C = kChunk;
  { Case c; c.name = "no-spans"; c.n_layers = 3; c.numel = 10; cases.push_back(c); }
  { Case c; c.name = "empty-spans"; c.add(0, 0, 0); c.add(5, 0, 2); c.add(5, 0, 1); c.numel = 9; cases.push_back(c); }
  { Case c; c.name = "one-element"; c.add(0, 1, 0); cases.push_back(c); }
  { Case c; c.name = "chunk-edges"; c.add(0, C - 1, 0); c.add(C - 1, C, 1); c.add(2 * C - 1, C + 1, 2); c.add(3 * C, 1, 3);
    cases.push_back(c); }
  { Case c; c.name = "tail-of-flat"; c.add(3, 7, 1); c.add(C + 17, 2 * C + 5, 0); c.numel = C + 17 + 2 * C + 5; cases.push_back(c); }
  { Case c; c.name = "layer-split-interleaved";  // layer 0 in four segments between layers 1 and 2, gaps, an empty one
    int64_t o = 0;
    const int64_t lens[] = {C / 3 + 1, 2 * C + 3, 7, 0, C, 1, 3 * C - 1, 5};
    const int64_t layers[] = {0, 1, 0, 2, 0, 2, 0, 1};
    for (int i = 0; i < 8; ++i) { c.add(o, lens[i], layers[i]); o += lens[i] + (i % 3); }
    c.n_layers = 5;  // layers 3, 4: no segment
    cases.push_back(c); }
  { Case c; c.name = "many-spans";  // more spans than a launch table holds (default 36), one to three chunks each
    int64_t o = 0;
    for (int i = 0; i < 100; ++i) { const int64_t n = 1 + (i * 7919) % (3 * C); c.add(o, n, i % 13); o += n; }
    cases.push_back(c); }
  { Case c; c.name = "many-chunks";  // more chunks than a launch holds (default 320) in one span, plus small ones
    c.add(0, 5, 1); c.add(5, 330 * C + 7, 0); c.add(330 * C + 12, 9, 1); cases.push_back(c); }
  { Case c; c.name = "many-layers";  // more layers than a finalize launch covers (default 480)
    for (int i = 0; i < 1000; ++i) c.add(3 * i, (i % 4) ? 2 : 0, (i * 37) % 1100);
    c.n_layers = 1101; cases.push_back(c); }
  return cases;
}

std::vector<Case> random_cases(int k, int64_t budget) {
  std::vector<Case> cases;
  Rng rng{12345};
  const int64_t C = kChunk;
  for (int r = 0; r < k; ++r) {
    Case c;
    c.name = "random-" + std::to_string(r);
    const int64_t n_spans = rng.below(121);
    const int64_t n_layers = 1 + rng.below(40);
    int64_t o = rng.below(3), total = 0;
    for (int64_t s = 0; s < n_spans; ++s) {
      int64_t n;
      switch (rng.below(7)) {
        case 0: n = 0; break;
        case 1: n = 1 + rng.below(8); break;
        case 2: n = C + rng.below(3) - 1; break;
        case 3: n = rng.below(C); break;
        case 4: n = rng.below(3 * C); break;
        case 5: n = (1 + rng.below(4)) * C; break;
        default: n = rng.below(64); break;
      }
      if (total + n > budget) n = 0;
      total += n;
      c.add(o, n, rng.below(n_layers));
      o += n + (rng.below(4) == 0 ? rng.below(9) : 0);  // sometimes a gap
    }
    if (c.n_layers < n_layers) c.n_layers = n_layers;
    if (c.numel < o) c.numel = o;
    cases.push_back(c);
  }
  return cases;
}

// --norms-from FILE: int64 numel, n_layers, n_rows; int64 rows[n_rows][3] (offset, length, layer); float g[numel].
int norms_from(const char* path) {
  FILE* f = std::fopen(path, "rb");
  if (!f) { std::fprintf(stderr, "cannot open %s\n", path); return 2; }
  int64_t head[3];
  if (std::fread(head, sizeof(int64_t), 3, f) != 3) { std::fprintf(stderr, "short header\n"); return 2; }
  const int64_t numel = head[0], n_layers = head[1], n_rows = head[2];
  std::vector<int64_t> rows(static_cast<size_t>(3 * n_rows));
  std::vector<float> g(static_cast<size_t>(numel));
  if (std::fread(rows.data(), sizeof(int64_t), rows.size(), f) != rows.size() ||
      std::fread(g.data(), sizeof(float), g.size(), f) != g.size()) {
    std::fprintf(stderr, "short file\n");
    return 2;
  }
  std::fclose(f);
  std::vector<Span> spans;
  std::string why;
  if (novograd::segment_spans(rows.data(), n_rows, numel, n_layers, g.data(), sizeof(float), nullptr, nullptr, spans,
                              why) >= 0) {
    std::fprintf(stderr, "%s\n", why.c_str());
    return 2;
  }
  const Plan plan = make_plan(spans.data(), static_cast<int64_t>(spans.size()), n_layers, true);
  std::vector<double> partials(static_cast<size_t>(plan.n_slots));
  std::vector<int> written(partials.size()), visits(static_cast<size_t>(numel)), layer_written(static_cast<size_t>(n_layers));
  std::vector<float> out(static_cast<size_t>(n_layers));
  emulate_partials(plan, g.data(), partials, written, visits);
  emulate_finalize(plan, partials, out, layer_written);
  for (int64_t k = 0; k < n_layers; ++k) {
    uint32_t bits;
    std::memcpy(&bits, &out[k], sizeof(bits));
    std::printf("%08x\n", bits);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  int n_random = 200;
  int64_t budget = 1 << 21;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--norms-from" && i + 1 < argc) return norms_from(argv[++i]);
    if (a == "--random" && i + 1 < argc) n_random = std::atoi(argv[++i]);
    else if (a == "--budget" && i + 1 < argc) budget = std::atoll(argv[++i]);
    else { std::fprintf(stderr, "unknown argument %s\n", a.c_str()); return 2; }
  }
  std::printf("limits spans=%d blocks=%d chunk=%lld threads=%d finalize_layers=%d table_bytes=%zu\n", kMaxSpans,
              kMaxBlocks, static_cast<long long>(kChunk), kThreads, kFinalizeLayers, sizeof(LaunchTable));
  std::vector<Case> cases = fixed_cases();
  for (Case& c : random_cases(n_random, budget)) cases.push_back(c);
  for (const Case& c : cases) run_case(c, false);
  std::printf("%s %zu cases, %d failures\n", failures ? "FAILED" : "ok", cases.size(), failures);
  return failures ? 1 : 0;
}
