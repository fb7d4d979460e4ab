"""The model-parallel layers: fairscale's ColumnParallelLinear, RowParallelLinear and embeddings
(same parameters, same slices, same state-dict names) with a forward of our own, which

- runs a one-row product on CPU under torch.compile as a multiply-and-sum, which the compiler
  turns into one bandwidth-bound loop (~3.5x faster than the BLAS call at batch 1 on our CPU);
- computes with int8 weights and per-row scales once `quantize_int8` has been applied;
- talks to the other ranks with plain collectives, which torch.compile can trace.
"""

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from fairscale.nn.model_parallel.initialize import get_model_parallel_group, get_model_parallel_world_size
from fairscale.nn.model_parallel.layers import (
    ColumnParallelLinear,
    ParallelEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from torch import nn

# Up to this many rows (batch x new positions), a compiled CPU product is written as multiply-and-sum.
# Beyond it the weights are reused across rows and the BLAS matrix product is faster.
GEMV_MAX_ROWS = 4


def linear(x: torch.Tensor, weight: torch.Tensor, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x @ weight.T, with weight (out, in) in x's dtype, or int8 with one scale per output row."""
    if weight.dtype == torch.int8:
        weight = weight.to(x.dtype)
    rows = x.numel() // x.shape[-1]
    if x.device.type == "cpu" and rows <= GEMV_MAX_ROWS and torch.compiler.is_compiling():
        y = (x.unsqueeze(-2) * weight).sum(-1)
    else:
        y = F.linear(x, weight)
    return y if scale is None else y * scale


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    if get_model_parallel_world_size() > 1:
        dist.all_reduce(x, group=get_model_parallel_group())
    return x


def _all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    world = get_model_parallel_world_size()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=get_model_parallel_group())
    return torch.cat(parts, dim=-1)


class ColumnParallel(ColumnParallelLinear):
    """Holds the output rows (features) of this rank; gathers them when gather_output."""

    weight_scale: Optional[torch.Tensor]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight, getattr(self, "weight_scale", None))
        return _all_gather_last_dim(y) if self.gather_output else y


class RowParallel(RowParallelLinear):
    """Holds the input columns of this rank; sums the partial outputs of all ranks."""

    weight_scale: Optional[torch.Tensor]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _all_reduce(linear(x, self.weight, getattr(self, "weight_scale", None)))


class VocabParallel(VocabParallelEmbedding):
    """Holds rows [vocab_start_index, vocab_end_index) of the table; other ranks supply the rest."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.vocab_start_index
        elsewhere = (local < 0) | (local >= self.num_embeddings_per_partition)
        rows = F.embedding(local.masked_fill(elsewhere, 0), self.weight)
        return _all_reduce(rows.masked_fill(elsewhere.unsqueeze(-1), 0))


class DimParallel(ParallelEmbedding):
    """Holds a slice of every row's features (Llama 2's split); gathers the rest."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return _all_gather_last_dim(F.embedding(tokens, self.weight))


def quantize_int8(model: nn.Module) -> None:
    """Weight-only int8: every parallel linear layer keeps its weight as int8 with one fp scale per
    output row (symmetric, max |w| -> 127). Layer by layer, so only one layer is held twice at once.
    Works on each rank's slice alike: a RowParallel rank scales its own columns and so its own
    partial sum. The int8 values therefore depend slightly on the rank count (fp32 ones do not)."""
    for layer in model.modules():
        if isinstance(layer, (ColumnParallel, RowParallel)) and layer.weight.dtype != torch.int8:
            weight = layer.weight.detach()
            scale = weight.float().abs().amax(dim=1).clamp(min=1e-12) / 127
            quantized = torch.round(weight.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
            layer.weight = nn.Parameter(quantized, requires_grad=False)
            layer.register_buffer("weight_scale", scale.to(weight.dtype), persistent=False)
