"""bf16 weights on CPU, applied in Llama.build to a bf16 model on CPU: every parallel linear layer
multiplies through a Bf16Product, which keeps the weight as stored and sums in fp32.

- Decode (up to KERNEL_MAX_ROWS rows): our kernel (llama/csrc/bf16_gemv.cpp) widens each weight to
  fp32 in registers, so a step reads bf16's bytes, half of fp32's.
- Prefill: the weight is widened to fp32 a slice of rows at a time and multiplied by the fp32
  matrix product. On CPUs without AVX-512 BF16, PyTorch's own bf16 product emulates bf16 and runs
  at a quarter of the fp32 one (BENCHMARKS.md); widening costs a pass over the weight per call,
  small beside the product of many rows.

Activations stay in the model's dtype between layers, as in Meta's bf16 runs; each product takes
them in fp32 and returns the model's dtype.
"""

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels
from .layers import replace_products

KERNEL_MAX_ROWS = 8  # up to this many rows the weight-reading kernel wins; beyond, the matrix product
WIDEN_BYTES = 64 << 20  # fp32 bytes of weight widened at once in prefill


def usable(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype == torch.bfloat16 and cpu_kernels.load() is None


class Bf16Product(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight.to(torch.bfloat16).contiguous())
        ours = cpu_kernels.load() is None and weight.shape[1] % 16 == 0
        self.kernel = cpu_kernels.ops().bf16_gemv if ours else None
        self.rows_at_once = max(1, WIDEN_BYTES // (4 * weight.shape[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).float()
        if self.kernel is not None and flat.shape[0] <= KERNEL_MAX_ROWS:
            y = self.kernel(flat.contiguous(), self.weight)
        else:
            y = torch.cat([F.linear(flat, part.float()) for part in self.weight.split(self.rows_at_once)], dim=-1)
        return y.reshape(*x.shape[:-1], -1).to(x.dtype)


def use_bf16_products(model: nn.Module) -> None:
    replace_products(model, lambda weight, is_output: Bf16Product(weight))
