// Spans and the segment table, shared by the CPU op (novograd_cpu.cpp) and the CUDA op (cuda/bindings.cpp,
// cuda/launch_plan.h). No torch or CUDA header: g++ and nvcc both compile it, and so does the launch-plan
// emulation of tests/test_launch_plan.py.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace novograd {

// One contiguous run of one layer's elements: a whole tensor, or a segment of a flat tensor.
struct Span {
  float* w;       // parameter, fp32 (nullptr in the norm pass)
  const void* g;  // gradient, of the call's gradient dtype
  float* m;       // exp_avg, fp32 (nullptr in the norm pass)
  int64_t n;      // elements (0 is allowed: the span is skipped)
  int64_t layer;  // index into the norm output / the denominators
};

// Turns the rows of a segment table, (offset, length, layer) each, into spans of a flat tensor of `numel`
// elements whose gradient starts at `g` (elements of `esize` bytes) and whose parameter and exp_avg start at
// `w` and `m` (either may be nullptr: the norm pass). Returns -1 when every row is valid, else the index of the
// first invalid row, with `why` saying what is wrong with it; `out` is then incomplete.
inline int64_t segment_spans(const int64_t* rows, int64_t n_rows, int64_t numel, int64_t n_layers, const void* g,
                             int64_t esize, float* w, float* m, std::vector<Span>& out, std::string& why) {
  out.clear();
  out.reserve(static_cast<size_t>(n_rows));
  const char* gb = static_cast<const char*>(g);
  for (int64_t r = 0; r < n_rows; ++r) {
    const int64_t off = rows[3 * r], len = rows[3 * r + 1], layer = rows[3 * r + 2];
    if (off < 0 || len < 0 || off > numel || len > numel - off) {
      why = "segment " + std::to_string(r) + " (offset " + std::to_string(off) + ", length " + std::to_string(len) +
            ") lies outside the flat tensor of " + std::to_string(numel) + " elements";
      return r;
    }
    if (layer < 0 || layer >= n_layers) {
      why = "segment " + std::to_string(r) + " names layer " + std::to_string(layer) + ", outside [0, " +
            std::to_string(n_layers) + ")";
      return r;
    }
    out.push_back({w ? w + off : nullptr, gb + off * esize, m ? m + off : nullptr, len, layer});
  }
  return -1;
}

}  // namespace novograd
