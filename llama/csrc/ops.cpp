// The ops of one kernel variant, as torch.ops.<LLAMA_OPS>.* (llama/cpu_kernels.py names them).

#include <torch/library.h>

#include "simd.h"

LLAMA_LIBRARY(LLAMA_OPS, lib) {
  lib.def("int4_gemv(Tensor x, Tensor packed) -> Tensor");
  lib.def("pack_q4_blocks(Tensor raw, bool has_min) -> Tensor");
  lib.def("int8_gemv(Tensor x, Tensor weight, Tensor scales) -> Tensor");
  lib.def("bf16_gemv(Tensor x, Tensor weight) -> Tensor");
  lib.def("decode_attention(Tensor q, Tensor keys, Tensor values, Tensor mask) -> Tensor");
}
