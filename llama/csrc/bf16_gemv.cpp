// Products of a few activation rows with bf16 weights, as stored (n, k) row-major: the decode
// step of a bf16 model reads half of fp32's bytes. Weights are widened to fp32 in registers and
// every product is summed in fp32.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cstdint>

#include "simd.h"

namespace {

using simd::F32x16;

constexpr int64_t kStep = 16;  // inputs per vector

// y[r, c..c+W-1] for weight rows c..c+W-1: W rows share each load of x.
template <int W>
void bf16_rows(const uint16_t* w, const float* x, int64_t k, int64_t m, int64_t c, float* y, int64_t n) {
  for (int64_t r = 0; r < m; ++r) {
    F32x16 acc[W];
    for (int j = 0; j < W; ++j) acc[j] = simd::zeros();
    const float* xr = x + r * k;
    for (int64_t i = 0; i < k; i += kStep) {
      const F32x16 xv = simd::load(xr + i);
      for (int j = 0; j < W; ++j) acc[j] = simd::fmadd(simd::load_bf16(w + (c + j) * k + i), xv, acc[j]);
    }
    for (int j = 0; j < W; ++j) y[r * n + c + j] = simd::sum(acc[j]);
  }
}

// y (m, n) fp32 = x (m, k) fp32 times weight (n, k) bf16.
at::Tensor bf16_gemv(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous float (m, k)");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16 && weight.is_contiguous(),
              "weight: contiguous bf16 (n, k)");
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0);
  TORCH_CHECK(weight.size(1) == k && k % kStep == 0, "x has ", k, " inputs, the weights ", weight.size(1),
              " (a multiple of 16 is needed)");
  auto y = at::empty({m, n}, x.options());
  const uint16_t* w = reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>());
  const float* xs = x.data_ptr<float>();
  float* out = y.data_ptr<float>();
  constexpr int64_t kRowsPerTask = 4;
  const int64_t whole = n / kRowsPerTask;
  at::parallel_for(0, whole + (n % kRowsPerTask ? 1 : 0), 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t c = t * kRowsPerTask;
      if (t < whole) {
        bf16_rows<kRowsPerTask>(w, xs, k, m, c, out, n);
      } else {
        for (int64_t j = c; j < n; ++j) bf16_rows<1>(w, xs, k, m, j, out, n);
      }
    }
  });
  return y;
}

}  // namespace

LLAMA_LIBRARY_IMPL(LLAMA_OPS, CPU, lib) {
  lib.impl("bf16_gemv", &bf16_gemv);
}
