// Products of activation rows with int4 or int8 weights on x86 CPUs (AVX2 and up; simd.h): the
// decode step's matrix-vector products, which PyTorch's own weight-only kernels run at under half
// the memory bandwidth on small models (BENCHMARKS.md), and prefill's many rows, several rows
// sharing each weight vector that is read and unpacked. Layouts are made by llama/quantize.py.
//
// Both layouts put 16 output rows side by side, one per 32-bit lane, so one operation advances 16
// rows at once and an activation value is broadcast, not reduced.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <cmath>
#include <cstdint>
#include <vector>

#include "simd.h"

namespace {

using simd::F32x16;

constexpr int64_t kRows = 16;         // output rows per block
constexpr int64_t kGroup = 32;        // int4: inputs per group
constexpr int64_t kInt4Block = 320;   // int4: bytes per (16 rows, 32 inputs): codes, scales, mins
constexpr int64_t kTileBytes = 128 << 10;  // int4: activation bytes of a tile of rows

// Quantizes each group of 32 activations to int8 with its own scale (max |a| / 127), as llama.cpp
// does for its 4-bit dot products. The min term takes the sum of the rounded activations, not of
// the exact ones: then the rounding errors meet the whole weight (scale * code + min, centred near
// zero) rather than the codes 0..15 alone, and mostly cancel (llama.cpp's Q8_1 does the same).
void quantize_groups(const float* a, int64_t k, int8_t* q, float* scale, float* sum) {
  for (int64_t g = 0; g < k / kGroup; ++g) {
    const float* x = a + g * kGroup;
    float amax = 0.f;
    for (int64_t i = 0; i < kGroup; ++i) amax = std::max(amax, std::fabs(x[i]));
    const float s = amax / 127.f;
    const float inv = s > 0.f ? 1.f / s : 0.f;
    int32_t total = 0;
    for (int64_t i = 0; i < kGroup; ++i) {
      const int8_t v = static_cast<int8_t>(std::nearbyint(x[i] * inv));
      q[g * kGroup + i] = v;
      total += v;
    }
    scale[g] = s;
    sum[g] = s * static_cast<float>(total);
  }
}

struct QuantizedRows {
  std::vector<int8_t> q;
  std::vector<float> scale, sum;
};

// Rows r..r+R-1 of y for int4 block p (all groups of 16 rows), a part of the lanes at a time:
// each group's codes are unpacked once for the R rows.
template <int R>
void int4_block(const uint8_t* p, int64_t groups, const QuantizedRows& x, int64_t k, int64_t r, float* y,
                int64_t n) {
  for (int h = 0; h < simd::kParts; ++h) {
    simd::Part acc[R];
    for (int j = 0; j < R; ++j) acc[j] = simd::part_zeros();
    const uint8_t* block = p;
    for (int64_t g = 0; g < groups; ++g, block += kInt4Block) {
      const simd::Nibbles codes = simd::unpack(block, h);
      const simd::Part scales = simd::part_fp16(block + 256, h), mins = simd::part_fp16(block + 288, h);
      for (int j = 0; j < R; ++j) {
        const int64_t row = r + j;
        const int32_t* a = reinterpret_cast<const int32_t*>(x.q.data() + row * k + g * kGroup);
        const simd::Part dot = simd::dot(codes, a);
        acc[j] = simd::part_fmadd(dot, simd::part_mul(scales, simd::part_broadcast(x.scale[row * groups + g])), acc[j]);
        acc[j] = simd::part_fmadd(mins, simd::part_broadcast(x.sum[row * groups + g]), acc[j]);
      }
    }
    for (int j = 0; j < R; ++j) simd::part_store(y + (r + j) * n + h * simd::kPartLanes, acc[j]);
  }
}

// y (m, n) = x (m, k) times int4 weights. Block (b, g) holds rows 16b..16b+15, inputs 32g..32g+31:
// 4 x 64 bytes of codes (vector s, lane j, byte t: low nibble = input 32g+4s+t, high nibble = input
// 32g+16+4s+t of row 16b+j), then 16 fp16 scales and 16 fp16 mins; w = code * scale + min.
at::Tensor int4_gemv(const at::Tensor& x, const at::Tensor& packed) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous float (m, k)");
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kByte && packed.size(2) == kInt4Block &&
              packed.is_contiguous(), "packed: contiguous uint8 (n / 16, k / 32, 320)");
  const int64_t m = x.size(0), k = x.size(1), blocks = packed.size(0), groups = packed.size(1), n = blocks * kRows;
  TORCH_CHECK(groups * kGroup == k, "x has ", k, " inputs, the weights ", groups * kGroup);
  auto y = at::empty({m, n}, x.options());
  QuantizedRows rows{std::vector<int8_t>(m * k), std::vector<float>(m * groups), std::vector<float>(m * groups)};
  const float* xs = x.data_ptr<float>();
  at::parallel_for(0, m, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      quantize_groups(xs + r * k, k, rows.q.data() + r * k, rows.scale.data() + r * groups, rows.sum.data() + r * groups);
  });
  const uint8_t* w = packed.data_ptr<uint8_t>();
  float* out = y.data_ptr<float>();
  // Many rows (prefill): a tile of rows whose int8 activations stay in L2 meets every block of
  // this thread's weights before the next tile.
  const int64_t tile = std::max<int64_t>(4, (kTileBytes / k) / 4 * 4);
  at::parallel_for(0, blocks, 4, [&](int64_t begin, int64_t end) {
    for (int64_t first = 0; first < m; first += tile) {
      const int64_t last = std::min(m, first + tile);
      for (int64_t b = begin; b < end; ++b) {
        const uint8_t* p = w + b * groups * kInt4Block;
        float* yb = out + b * kRows;
        int64_t r = first;
        for (; r + 4 <= last; r += 4) int4_block<4>(p, groups, rows, k, r, yb, n);
        switch (last - r) {
          case 3: int4_block<3>(p, groups, rows, k, r, yb, n); break;
          case 2: int4_block<2>(p, groups, rows, k, r, yb, n); break;
          case 1: int4_block<1>(p, groups, rows, k, r, yb, n); break;
        }
      }
    }
  });
  return y;
}

// Rows r..r+R-1 of y for the int8 block at p: each weight vector is widened to fp32 once and used
// for R activation rows; with one row, four accumulators hide the multiply-add latency instead.
template <int R>
void int8_block(const int8_t* p, const float* x, int64_t k, int64_t r, const float* scales, float* y, int64_t n) {
  constexpr int kUnroll = R == 1 ? 4 : (R == 2 ? 2 : 1);
  F32x16 acc[R][kUnroll];
  for (int j = 0; j < R; ++j)
    for (int u = 0; u < kUnroll; ++u) acc[j][u] = simd::zeros();
  for (int64_t i = 0; i < k; i += kUnroll, p += kUnroll * kRows) {
    for (int u = 0; u < kUnroll; ++u) {
      const F32x16 w = simd::load_int8(p + u * kRows);
      for (int j = 0; j < R; ++j) acc[j][u] = simd::fmadd(w, simd::broadcast(x[(r + j) * k + i + u]), acc[j][u]);
    }
  }
  const F32x16 scale = simd::load(scales);
  for (int j = 0; j < R; ++j) {
    F32x16 total = acc[j][0];
    for (int u = 1; u < kUnroll; ++u) total = simd::add(total, acc[j][u]);
    simd::store(y + (r + j) * n, simd::mul(total, scale));
  }
}

// y (m, n) = x (m, k) times int8 weights (n / 16, k, 16) with one fp32 scale per row, in fp32:
// the same values as dequantizing the weights, without quantizing the activations.
at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous float (m, k)");
  TORCH_CHECK(weight.dim() == 3 && weight.scalar_type() == at::kChar && weight.size(2) == kRows &&
              weight.is_contiguous(), "weight: contiguous int8 (n / 16, k, 16)");
  const int64_t m = x.size(0), k = x.size(1), blocks = weight.size(0), n = blocks * kRows;
  TORCH_CHECK(weight.size(1) == k && k % 4 == 0, "x has ", k, " inputs, the weights ", weight.size(1));
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.numel() == n && scales.is_contiguous(),
              "scales: contiguous float (n)");
  auto y = at::empty({m, n}, x.options());
  const int8_t* w = weight.data_ptr<int8_t>();
  const float* xs = x.data_ptr<float>();
  const float* sc = scales.data_ptr<float>();
  float* out = y.data_ptr<float>();
  at::parallel_for(0, blocks, 4, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int8_t* p = w + b * k * kRows;
      float* yb = out + b * kRows;
      int64_t r = 0;
      for (; r + 4 <= m; r += 4) int8_block<4>(p, xs, k, r, sc + b * kRows, yb, n);
      switch (m - r) {
        case 3: int8_block<3>(p, xs, k, r, sc + b * kRows, yb, n); break;
        case 2: int8_block<2>(p, xs, k, r, sc + b * kRows, yb, n); break;
        case 1: int8_block<1>(p, xs, k, r, sc + b * kRows, yb, n); break;
      }
    }
  });
  return y;
}

// GGUF's Q4_0 / Q4_1 blocks (rows, groups * 18 or 20 bytes: fp16 d, [fp16 m,] 16 code bytes) in the
// int4 layout above: (rows / 16, groups, 320). A block's code byte t pairs input t (low nibble) with
// 16 + t (high), as the layout does, so packing moves 4-byte words and fp16 values and reads no code;
// Q4_0's min is -8 d. Returns an empty tensor when a scale or min is not finite in fp16 (the
// caller then takes the general path).
at::Tensor pack_q4_blocks(const at::Tensor& raw, bool has_min) {
  const int64_t block_bytes = has_min ? 20 : 18;
  TORCH_CHECK(raw.dim() == 2 && raw.scalar_type() == at::kByte && raw.is_contiguous(),
              "pack_q4_blocks: raw must be a contiguous 2-d uint8 tensor");
  const int64_t rows = raw.size(0), groups = raw.size(1) / block_bytes;
  TORCH_CHECK(rows % kRows == 0 && raw.size(1) == groups * block_bytes,
              "pack_q4_blocks: rows must be a multiple of 16 and each row whole blocks");
  at::Tensor packed = at::empty({rows / kRows, groups, kInt4Block}, raw.options());
  const uint8_t* src = raw.data_ptr<uint8_t>();
  uint8_t* dst = packed.data_ptr<uint8_t>();
  std::atomic<bool> finite{true};
  at::parallel_for(0, rows / kRows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t g = 0; g < groups; ++g) {
        uint8_t* out = dst + (b * groups + g) * kInt4Block;
        for (int64_t j = 0; j < kRows; ++j) {
          const uint8_t* block = src + ((b * kRows + j) * groups + g) * block_bytes;
          const uint8_t* codes = block + block_bytes - 16;
          for (int64_t s = 0; s < 4; ++s) std::memcpy(out + (s * kRows + j) * 4, codes + 4 * s, 4);
          uint16_t d, m;
          std::memcpy(&d, block, 2);
          if (has_min) {
            std::memcpy(&m, block + 2, 2);
          } else {
            m = _cvtss_sh(-8.f * _cvtsh_ss(d), _MM_FROUND_TO_NEAREST_INT);
          }
          if ((d & 0x7C00) == 0x7C00 || (m & 0x7C00) == 0x7C00) finite = false;
          std::memcpy(out + 256 + 2 * j, &d, 2);
          std::memcpy(out + 288 + 2 * j, &m, 2);
        }
      }
    }
  });
  return finite ? packed : at::empty({0}, raw.options());
}

}  // namespace

LLAMA_LIBRARY_IMPL(LLAMA_OPS, CPU, lib) {
  lib.impl("int4_gemv", &int4_gemv);
  lib.impl("int8_gemv", &int8_gemv);
  lib.impl("pack_q4_blocks", &pack_q4_blocks);
}
