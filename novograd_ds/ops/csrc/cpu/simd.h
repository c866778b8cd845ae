// The SIMD abstraction of the fused CPU op: W lanes of fp32 (AVX-512: 16, AVX2: 8, scalar build: 1), chosen at
// compile time by the flags ops/builder.py passes. Shared by novograd_cpu.cpp and novograd_q8.cpp; only
// functions that are one instruction (or a fixed short sequence) per vector, so that a kernel's vector body and
// its scalar tail evaluate the same IEEE operations.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace novograd_cpu {

// ---- SIMD abstraction: W lanes of fp32 -------------------------------------------------------------
#if defined(__AVX512F__)
constexpr int W = 16;
using vfloat = __m512;
inline vfloat vset1(float x) { return _mm512_set1_ps(x); }
inline vfloat vzero() { return _mm512_setzero_ps(); }
inline vfloat vadd(vfloat a, vfloat b) { return _mm512_add_ps(a, b); }
inline vfloat vsub(vfloat a, vfloat b) { return _mm512_sub_ps(a, b); }
inline vfloat vmul(vfloat a, vfloat b) { return _mm512_mul_ps(a, b); }
inline vfloat vdiv(vfloat a, vfloat b) { return _mm512_div_ps(a, b); }
inline vfloat vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, vfloat x) { _mm512_storeu_ps(p, x); }
inline vfloat vload(const c10::BFloat16* p) {  // bf16 -> fp32: the 16 bits become the high half, exact
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline vfloat vload(const c10::Half* p) {  // fp16 -> fp32, exact
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline float vsum(vfloat x) { return _mm512_reduce_add_ps(x); }
// -- for the 8-bit moment (novograd_q8.cpp)
using vmask = __mmask16;
using vint = __m512i;
inline vfloat vabs(vfloat x) {
  return _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x7fffffff)));
}
inline vfloat vmax(vfloat a, vfloat b) { return _mm512_max_ps(a, b); }
inline vfloat vmin(vfloat a, vfloat b) { return _mm512_min_ps(a, b); }
inline vfloat vsqrt(vfloat x) { return _mm512_sqrt_ps(x); }
inline vfloat vfloor(vfloat x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
inline vfloat vrint(vfloat x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vmask vlt(vfloat a, vfloat b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
inline vmask vle(vfloat a, vfloat b) { return _mm512_cmp_ps_mask(a, b, _CMP_LE_OQ); }
inline vmask vgt(vfloat a, vfloat b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
inline vmask vge(vfloat a, vfloat b) { return _mm512_cmp_ps_mask(a, b, _CMP_GE_OQ); }
inline vfloat vselect(vmask m, vfloat if_true, vfloat if_false) { return _mm512_mask_blend_ps(m, if_false, if_true); }
inline float vmax_all(vfloat x) { return _mm512_reduce_max_ps(x); }
inline vfloat vload_codes(const int8_t* p) {  // W int8 codes -> fp32, exact
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
// rint(x) clamped to [-127, 127] as W int8 codes, for |x| <= 2^31: cvtps2dq rounds to nearest even (the MXCSR
// default, which torch keeps), the max clamps at -127 and the saturating pack at 127.
inline void vstore_codes_rint(int8_t* p, vfloat x) {
  const __m512i i = _mm512_max_epi32(_mm512_cvtps_epi32(x), _mm512_set1_epi32(-127));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtsepi32_epi8(i));
}
// floor(x) clamped to [-127, 127] as W int8 codes, the floor done by the conversion (AVX-512 embedded rounding).
inline void vstore_codes_floor(int8_t* p, vfloat x) {
  const __m512i i = _mm512_max_epi32(_mm512_cvt_roundps_epi32(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC),
                                     _mm512_set1_epi32(-127));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtsepi32_epi8(i));
}
inline vint vi_set1(uint32_t x) { return _mm512_set1_epi32(static_cast<int>(x)); }
inline vint vi_iota() { return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
inline vint vi_add(vint a, vint b) { return _mm512_add_epi32(a, b); }
inline vint vi_xor(vint a, vint b) { return _mm512_xor_si512(a, b); }
inline vint vi_mul(vint a, vint b) { return _mm512_mullo_epi32(a, b); }  // low 32 bits: the uint32 product
template <int k> inline vint vi_shr(vint a) { return _mm512_srli_epi32(a, k); }
inline vfloat vi_to_float(vint a) { return _mm512_cvtepi32_ps(a); }  // exact for values < 2^24
inline void vi_store(uint32_t* p, vint a) { _mm512_storeu_si512(reinterpret_cast<void*>(p), a); }
inline vfloat vload_u8(const uint8_t* p) {  // W unsigned bytes -> fp32, exact
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
#define NOVOGRAD_SIMD "avx512"
#elif defined(__AVX2__)
constexpr int W = 8;
using vfloat = __m256;
inline vfloat vset1(float x) { return _mm256_set1_ps(x); }
inline vfloat vzero() { return _mm256_setzero_ps(); }
inline vfloat vadd(vfloat a, vfloat b) { return _mm256_add_ps(a, b); }
inline vfloat vsub(vfloat a, vfloat b) { return _mm256_sub_ps(a, b); }
inline vfloat vmul(vfloat a, vfloat b) { return _mm256_mul_ps(a, b); }
inline vfloat vdiv(vfloat a, vfloat b) { return _mm256_div_ps(a, b); }
inline vfloat vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, vfloat x) { _mm256_storeu_ps(p, x); }
inline vfloat vload(const c10::BFloat16* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline vfloat vload(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline float vsum(vfloat x) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
// -- for the 8-bit moment (novograd_q8.cpp)
using vmask = __m256;
using vint = __m256i;
inline vfloat vabs(vfloat x) { return _mm256_and_ps(x, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff))); }
inline vfloat vmax(vfloat a, vfloat b) { return _mm256_max_ps(a, b); }
inline vfloat vmin(vfloat a, vfloat b) { return _mm256_min_ps(a, b); }
inline vfloat vsqrt(vfloat x) { return _mm256_sqrt_ps(x); }
inline vfloat vfloor(vfloat x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
inline vfloat vrint(vfloat x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vmask vlt(vfloat a, vfloat b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
inline vmask vle(vfloat a, vfloat b) { return _mm256_cmp_ps(a, b, _CMP_LE_OQ); }
inline vmask vgt(vfloat a, vfloat b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
inline vmask vge(vfloat a, vfloat b) { return _mm256_cmp_ps(a, b, _CMP_GE_OQ); }
inline vfloat vselect(vmask m, vfloat if_true, vfloat if_false) { return _mm256_blendv_ps(if_false, if_true, m); }
inline float vmax_all(vfloat x) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline vfloat vload_codes(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline void vstore_codes_rint(int8_t* p, vfloat x) {
  const __m256i i = _mm256_max_epi32(_mm256_cvtps_epi32(x), _mm256_set1_epi32(-127));
  const __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packs_epi16(w16, w16));
}
inline void vstore_codes_floor(int8_t* p, vfloat x) { vstore_codes_rint(p, _mm256_floor_ps(x)); }
inline vint vi_set1(uint32_t x) { return _mm256_set1_epi32(static_cast<int>(x)); }
inline vint vi_iota() { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }
inline vint vi_add(vint a, vint b) { return _mm256_add_epi32(a, b); }
inline vint vi_xor(vint a, vint b) { return _mm256_xor_si256(a, b); }
inline vint vi_mul(vint a, vint b) { return _mm256_mullo_epi32(a, b); }
template <int k> inline vint vi_shr(vint a) { return _mm256_srli_epi32(a, k); }
inline vfloat vi_to_float(vint a) { return _mm256_cvtepi32_ps(a); }
inline void vi_store(uint32_t* p, vint a) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), a); }
inline vfloat vload_u8(const uint8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
#define NOVOGRAD_SIMD "avx2"
#else
constexpr int W = 1;  // no vector ISA: the scalar loop below is the whole kernel
#define NOVOGRAD_SIMD "scalar"
#endif

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }
inline float to_float(c10::Half x) { return static_cast<float>(x); }

}  // namespace novograd_cpu
