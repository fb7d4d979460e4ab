// The few vector operations our kernels are written in, for each x86 instruction set they are
// built for (llama/cpu_kernels.py compiles every kernel once per variant, with one of):
//   LLAMA_AVX512_VNNI  one 512-bit register holds 16 lanes; vpdpbusd for int8 dot products
//   LLAMA_AVX_VNNI     two 256-bit registers hold 16 lanes; the 256-bit vpdpbusd (AVX-VNNI)
//   (neither)          two 256-bit registers (AVX2 + FMA + F16C); the dot products by
//                      vpmaddubsw + vpmaddwd, which give the same integers
// Every kernel works on 16 lanes at a time (F32x16), or on parts of them (Part: the int4 product),
// lane j always computing the same thing in the same order, so every variant gives the same results
// up to how the compiler contracts operations under -ffast-math.

#pragma once

#include <immintrin.h>

#include <cstdint>

#ifndef LLAMA_OPS
#error "LLAMA_OPS (the op namespace of this variant) must be defined by the build"
#endif

namespace simd {

#if defined(LLAMA_AVX512_VNNI)

struct F32x16 { __m512 v; };

inline F32x16 zeros() { return {_mm512_setzero_ps()}; }
inline F32x16 broadcast(float x) { return {_mm512_set1_ps(x)}; }
inline F32x16 load(const float* p) { return {_mm512_loadu_ps(p)}; }
inline void store(float* p, F32x16 a) { _mm512_storeu_ps(p, a.v); }
inline F32x16 add(F32x16 a, F32x16 b) { return {_mm512_add_ps(a.v, b.v)}; }
inline F32x16 mul(F32x16 a, F32x16 b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline F32x16 fmadd(F32x16 a, F32x16 b, F32x16 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline F32x16 load_fp16(const void* p) {
  return {_mm512_cvtph_ps(_mm256_loadu_si256(static_cast<const __m256i*>(p)))};
}
inline F32x16 load_bf16(const void* p) {  // bf16 is the top half of an fp32
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(static_cast<const __m256i*>(p)));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(wide, 16))};
}
inline F32x16 load_int8(const int8_t* p) {
  return {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))))};
}

// The int4 product works on "parts" of the 16 lanes, one register each: here one part of 16.
constexpr int kParts = 1, kPartLanes = 16;
using Part = __m512;
inline Part part_zeros() { return _mm512_setzero_ps(); }
inline Part part_broadcast(float x) { return _mm512_set1_ps(x); }
inline Part part_fmadd(Part a, Part b, Part c) { return _mm512_fmadd_ps(a, b, c); }
inline Part part_mul(Part a, Part b) { return _mm512_mul_ps(a, b); }
inline Part part_fp16(const uint8_t* p, int) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline void part_store(float* p, Part a) { _mm512_storeu_ps(p, a); }

// 4-bit codes of 16 lanes x 32 inputs (256 bytes: 4 vectors s of 64 bytes, lane j's 4 bytes at
// 4j; low nibbles inputs 4s..4s+3, high nibbles 16+4s..16+4s+3), split into bytes 0..15.
struct Nibbles { __m512i low[4], high[4]; };

inline Nibbles unpack(const uint8_t* p, int) {
  const __m512i mask = _mm512_set1_epi8(0x0F);
  Nibbles n;
  for (int s = 0; s < 4; ++s) {
    const __m512i v = _mm512_loadu_si512(p + 64 * s);
    n.low[s] = _mm512_and_si512(v, mask);
    n.high[s] = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
  }
  return n;
}

// Each lane's 32 codes dotted with 32 int8 activations (a: 8 words of 4 bytes, in input order).
inline Part dot(const Nibbles& n, const int32_t* a) {
  __m512i low = _mm512_setzero_si512(), high = _mm512_setzero_si512();
  for (int s = 0; s < 4; ++s) {
    low = _mm512_dpbusd_epi32(low, n.low[s], _mm512_set1_epi32(a[s]));
    high = _mm512_dpbusd_epi32(high, n.high[s], _mm512_set1_epi32(a[s + 4]));
  }
  return _mm512_cvtepi32_ps(_mm512_add_epi32(low, high));
}

#else  // AVX2 (+ AVX-VNNI): lanes 0..7 in .lo, 8..15 in .hi

struct F32x16 { __m256 lo, hi; };

inline F32x16 zeros() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline F32x16 broadcast(float x) { const __m256 v = _mm256_set1_ps(x); return {v, v}; }
inline F32x16 load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline void store(float* p, F32x16 a) { _mm256_storeu_ps(p, a.lo); _mm256_storeu_ps(p + 8, a.hi); }
inline F32x16 add(F32x16 a, F32x16 b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline F32x16 mul(F32x16 a, F32x16 b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline F32x16 fmadd(F32x16 a, F32x16 b, F32x16 c) {
  return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
inline F32x16 load_fp16(const void* p) {
  const __m128i* q = static_cast<const __m128i*>(p);
  return {_mm256_cvtph_ps(_mm_loadu_si128(q)), _mm256_cvtph_ps(_mm_loadu_si128(q + 1))};
}
inline __m256 widen_bf16(__m128i v) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16)); }
inline F32x16 load_bf16(const void* p) {
  const __m128i* q = static_cast<const __m128i*>(p);
  return {widen_bf16(_mm_loadu_si128(q)), widen_bf16(_mm_loadu_si128(q + 1))};
}
inline F32x16 load_int8(const int8_t* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8)))};
}

// The int4 product works on two parts of 8 lanes, one register each, one after the other, so a
// part's unpacked codes (8 registers) and a few rows' sums fit AVX2's 16 registers.
constexpr int kParts = 2, kPartLanes = 8;
using Part = __m256;
inline Part part_zeros() { return _mm256_setzero_ps(); }
inline Part part_broadcast(float x) { return _mm256_set1_ps(x); }
inline Part part_fmadd(Part a, Part b, Part c) { return _mm256_fmadd_ps(a, b, c); }
inline Part part_mul(Part a, Part b) { return _mm256_mul_ps(a, b); }
inline Part part_fp16(const uint8_t* p, int h) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * h)));
}
inline void part_store(float* p, Part a) { _mm256_storeu_ps(p, a); }

struct Nibbles { __m256i low[4], high[4]; };  // of lanes 8h..8h+7

inline Nibbles unpack(const uint8_t* p, int h) {
  const __m256i mask = _mm256_set1_epi8(0x0F);
  Nibbles n;
  for (int s = 0; s < 4; ++s) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64 * s + 32 * h));
    n.low[s] = _mm256_and_si256(v, mask);
    n.high[s] = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
  }
  return n;
}

inline Part dot(const Nibbles& n, const int32_t* a) {
#if defined(LLAMA_AVX_VNNI)
  __m256i sum = _mm256_setzero_si256();
  for (int s = 0; s < 4; ++s) {
    sum = _mm256_dpbusd_avx_epi32(sum, n.low[s], _mm256_set1_epi32(a[s]));
    sum = _mm256_dpbusd_avx_epi32(sum, n.high[s], _mm256_set1_epi32(a[s + 4]));
  }
#else
  // Byte pairs into int16: |code * activation| <= 15 * 127, so a pair and even the sum of all 8
  // pairs below (<= 30480) stay within int16 and vpmaddubsw never saturates.
  __m256i pairs = _mm256_setzero_si256();
  for (int s = 0; s < 4; ++s) {
    pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(n.low[s], _mm256_set1_epi32(a[s])));
    pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(n.high[s], _mm256_set1_epi32(a[s + 4])));
  }
  const __m256i sum = _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
#endif
  return _mm256_cvtepi32_ps(sum);
}

#endif

// The sum of the 16 lanes, always in the same order.
inline float sum(F32x16 a) {
  alignas(64) float lanes[16];
  store(lanes, a);
  float half[8];
  for (int i = 0; i < 8; ++i) half[i] = lanes[i] + lanes[i + 8];
  for (int i = 0; i < 4; ++i) half[i] += half[i + 4];
  return (half[0] + half[2]) + (half[1] + half[3]);
}

}  // namespace simd

// TORCH_LIBRARY_IMPL pastes its namespace argument: this indirection expands LLAMA_OPS first.
#define LLAMA_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)
#define LLAMA_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
