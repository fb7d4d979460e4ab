// Attention of one new position per sequence over its KV cache, on CPU: the decode step's 30-odd
// attention calls, each tiny (a few heads, a few hundred keys), where PyTorch's general CPU kernel
// spends most of its ~25 us a call setting up blocks. Grouped-query heads read their shared KV
// head in place; masked keys are skipped.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "simd.h"

namespace {

// q (b, h, 1, d) fp32; keys, values (b, kv_heads, l, d) fp32, any strides with a contiguous last
// dim (views of the cache); mask (b, 1, 1, l) bool, true where a key is attended. Returns
// softmax(q k^T / sqrt(d)) v as (b, h, 1, d), as scaled_dot_product_attention does.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                            const at::Tensor& mask) {
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1 && q.scalar_type() == at::kFloat, "q: float (b, h, 1, d)");
  TORCH_CHECK(keys.dim() == 4 && keys.scalar_type() == at::kFloat && keys.stride(3) == 1 &&
              values.sizes() == keys.sizes() && values.scalar_type() == at::kFloat && values.stride(3) == 1,
              "keys, values: float (b, kv_heads, l, d) with a contiguous last dim");
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(3);
  const int64_t kv_heads = keys.size(1), length = keys.size(2);
  TORCH_CHECK(keys.size(0) == batch && keys.size(3) == dim && heads % kv_heads == 0, "q and keys do not match");
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.numel() == batch * length, "mask: bool (b, 1, 1, l)");
  const auto query = q.contiguous();
  const auto attended = mask.reshape({batch, length}).contiguous();
  auto out = at::empty({batch, heads, 1, dim}, q.options());
  const float* qs = query.data_ptr<float>();
  const float* ks = keys.data_ptr<float>();
  const float* vs = values.data_ptr<float>();
  const bool* ms = attended.data_ptr<bool>();
  float* os = out.data_ptr<float>();
  const int64_t group = heads / kv_heads;
  const int64_t k_row = keys.stride(0), k_head = keys.stride(1), k_pos = keys.stride(2);
  const int64_t v_row = values.stride(0), v_head = values.stride(1), v_pos = values.stride(2);
  const float scale = 1.f / std::sqrt(static_cast<float>(dim));
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> weight(length);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t row = i / heads, kv = (i % heads) / group;
      const float* qi = qs + i * dim;
      const float* k0 = ks + row * k_row + kv * k_head;
      const float* v0 = vs + row * v_row + kv * v_head;
      const bool* mi = ms + row * length;
      float best = std::numeric_limits<float>::lowest();  // finite: built with -ffast-math
      for (int64_t j = 0; j < length; ++j) {
        const float* kj = k0 + j * k_pos;
        float dot = 0.f;
        for (int64_t t = 0; t < dim; ++t) dot += qi[t] * kj[t];
        weight[j] = dot * scale;
        if (mi[j]) best = std::max(best, weight[j]);
      }
      float total = 0.f;
      for (int64_t j = 0; j < length; ++j) {
        weight[j] = mi[j] ? std::exp(weight[j] - best) : 0.f;
        total += weight[j];
      }
      const float inverse = total > 0.f ? 1.f / total : 0.f;  // no key attended: zeros
      float* oi = os + i * dim;
      for (int64_t t = 0; t < dim; ++t) oi[t] = 0.f;
      for (int64_t j = 0; j < length; ++j) {
        if (!mi[j]) continue;
        const float w = weight[j] * inverse;
        const float* vj = v0 + j * v_pos;
        for (int64_t t = 0; t < dim; ++t) oi[t] += w * vj[t];
      }
    }
  });
  return out;
}

}  // namespace

LLAMA_LIBRARY_IMPL(LLAMA_OPS, CPU, lib) {
  lib.impl("decode_attention", &decode_attention);
}
