// Runs of the 8-bit moment (NOTE: [8-bit moment] in novograd_ds/kernels/eightbit.py) and the parser of their
// tables, shared by the CPU op, the CUDA op and the CUDA emulation. No torch or CUDA header.
#pragma once

#include <stdint.h>

#include <string>
#include <vector>

#include "q8_math.h"

namespace novograd {

// One run: a contiguous piece [start, start + n) of one layer held here, with its int8 codes (one per element)
// and its scales (one per layer block it touches, q8::block_count(start, n) of them).
struct QSpan {
  float* w;             // parameter, fp32
  const void* g;        // gradient, of the call's gradient dtype
  int8_t* q;            // codes
  float* scale;         // the scale of the run's first block; block j's is scale[j]
  int64_t n;            // elements (0: skipped)
  int64_t layer;        // index of the denominator
  int64_t start;        // index in the layer of the run's element 0
  int64_t layer_numel;  // elements of the layer
  uint32_t key;         // the layer's stochastic-rounding key
  int64_t run;          // row of the run in the call's boundary array [n_runs, 2]
};

inline std::string q8_row_error(int64_t r, const std::string& what) { return "run " + std::to_string(r) + ": " + what; }

// Checks a run's geometry; returns an empty string when it is valid.
inline std::string q8_check_run(int64_t r, int64_t n, int64_t start, int64_t layer_numel) {
  if (n < 0 || start < 0 || layer_numel < 0 || start > layer_numel || n > layer_numel - start)
    return q8_row_error(r, "[" + std::to_string(start) + ", " + std::to_string(start + n) +
                               ") does not lie inside its layer of " + std::to_string(layer_numel) + " elements");
  return std::string();
}

// Rows (offset, length, layer, start, layer_numel, key, scale_offset) of a flat tensor of `numel` elements (the
// parameter, gradient and codes are parallel flats) and a flat scales tensor of `n_scales` entries. Returns -1
// when every row is valid, else the first invalid row, `why` saying what is wrong.
inline int64_t q8_segment_spans(const int64_t* rows, int64_t n_rows, int64_t numel, int64_t n_layers, int64_t n_scales,
                                const void* g, int64_t esize, float* w, int8_t* q, float* scales,
                                std::vector<QSpan>& out, std::string& why) {
  out.clear();
  out.reserve(static_cast<size_t>(n_rows));
  const char* gb = static_cast<const char*>(g);
  for (int64_t r = 0; r < n_rows; ++r) {
    const int64_t* row = rows + 7 * r;
    const int64_t off = row[0], len = row[1], layer = row[2], start = row[3], lnumel = row[4], key = row[5],
                  soff = row[6];
    if (off < 0 || len < 0 || off > numel || len > numel - off) {
      why = q8_row_error(r, "offset " + std::to_string(off) + ", length " + std::to_string(len) +
                                " lies outside the flat tensor of " + std::to_string(numel) + " elements");
      return r;
    }
    if (layer < 0 || layer >= n_layers) {
      why = q8_row_error(r, "names layer " + std::to_string(layer) + ", outside [0, " + std::to_string(n_layers) + ")");
      return r;
    }
    why = q8_check_run(r, len, start, lnumel);
    if (!why.empty()) return r;
    const int64_t nb = q8::block_count(start, len);
    if (soff < 0 || soff > n_scales || nb > n_scales - soff) {
      why = q8_row_error(r, "its " + std::to_string(nb) + " scales at offset " + std::to_string(soff) +
                                " do not fit the scales tensor of " + std::to_string(n_scales) + " entries");
      return r;
    }
    out.push_back({w + off, gb + off * esize, q + off, scales + soff, len, layer, start, lnumel,
                   static_cast<uint32_t>(key), r});
  }
  return -1;
}

}  // namespace novograd
