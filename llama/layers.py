"""The model-parallel layers: fairscale's ColumnParallelLinear, RowParallelLinear and embeddings
(same parameters, same slices, same state-dict names) with a forward of our own, which

- runs a one-row product on CPU under torch.compile as a multiply-and-sum, which the compiler
  turns into one bandwidth-bound loop (~3.5x faster than the BLAS call at batch 1 on our CPU);
- multiplies through a product module (quantized: llama/quantize.py; bf16: llama/bf16.py) once
  replace_products has given it one in place of its weight;
- talks to the other ranks with collectives torch.compile traces as they are (out-of-place
  functional ones where compiled or on an accelerator; see _functional).
"""

from typing import Callable, List, Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
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


def linear(x: torch.Tensor, weight: torch.Tensor, parts: Optional[List[int]] = None) -> torch.Tensor:
    """x @ weight.T, with weight (out, in) in x's dtype; parts: the row counts of the layers fused
    in it (q, k, v; w1, w3), None for one layer."""
    rows = x.numel() // x.shape[-1]
    # Both branches compute the same product; which is faster depends on who runs it, not on the
    # layer. Fused by the compiler, the multiply-and-sum is one pass over the weight; run eagerly it
    # would first build the whole (rows, out, in) product. And the same layer runs both ways within
    # one generation (the compiled decode step, the eager prefill), so no flag set on the layer from
    # outside could choose: is_compiling() is PyTorch's own word for "this call is being traced".
    if x.device.type == "cpu" and rows <= GEMV_MAX_ROWS and torch.compiler.is_compiling():
        # A sum per part: the compiler runs the parts' sums side by side in one loop, each its own
        # chain of additions. One sum over all rows is one chain per row, bound by the additions'
        # latency on short rows: SmolLM2's w13 took 30% longer so, its decode 10% (benchmarks).
        products = [(x.unsqueeze(-2) * part).sum(-1) for part in weight.split(parts or [weight.shape[0]])]
        y = products[0] if len(products) == 1 else torch.cat(products, dim=-1)
    else:
        y = F.linear(x, weight)
    return y


def _functional(x: torch.Tensor) -> bool:
    """Whether to talk through the out-of-place functional collectives: under torch.compile, which
    traces them as they are (an in-place collective it rewrites into one plus a copy back, and
    compiled in-place collectives have given wrong results: all zeros from all_reduce on XPU,
    vllm#39844; a wrong all_gather, pytorch#159350), and on any accelerator, whose graphs then
    capture no in-place collective. Eager on CPU (gloo) the in-place call stays: it does the same
    work, and the functional one costs ~0.2 ms more per call there (on our 2-core CPU, gloo group
    of one: 0.36 against 0.14 ms for an all_reduce, 0.53 against 0.18 ms for a gather), where an
    eager step makes two per layer."""
    return torch.compiler.is_compiling() or x.device.type != "cpu"


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """The sum of x over the model-parallel ranks (x itself when alone). x may be overwritten
    with the sum; use the result."""
    if get_model_parallel_world_size() == 1:
        return x
    group = get_model_parallel_group()
    if _functional(x):
        return funcol.all_reduce(x, "sum", group)
    dist.all_reduce(x, group=group)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """x (..., n) of every model-parallel rank, joined in rank order: (..., world * n)."""
    world = get_model_parallel_world_size()
    if world == 1:
        return x
    group = get_model_parallel_group()
    if _functional(x):
        # The last dim by its index: all_gather_single fails on gather_dim=-1 at batch 1 (it
        # views the result to a wrong shape).
        return funcol.all_gather_single(x.contiguous(), x.dim() - 1, group)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


class _Quantizable:
    """A parallel linear layer's product: its float weight, or once quantized (llama/quantize.py)
    the `product` module that replaced it."""

    product: Optional[nn.Module]

    parts: Optional[List[int]] = None  # a fused layer's row counts (see linear), set by the model

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.parts) if self.product is None else self.product(x)


class ColumnParallel(_Quantizable, ColumnParallelLinear):
    """Holds the output rows (features) of this rank; gathers them when gather_output."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_module("product", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._product(x)
        return all_gather_last_dim(y) if self.gather_output else y


class RowParallel(_Quantizable, RowParallelLinear):
    """Holds the input columns of this rank; sums the partial outputs of all ranks."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_module("product", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(self._product(x))


def _weight(layer: nn.Module):
    """The layer's weight to make a product of: a weight stored quantized (`stored`, set while
    loading), its float weight, or None when replaced already or not loaded yet (on meta)."""
    stored = getattr(layer, "stored", None)
    if stored is not None:
        return stored
    if layer.weight is None or layer.weight.is_meta:
        return None
    return layer.weight.detach()


def _drop_weight(layer: nn.Module) -> None:
    layer.weight = None
    layer.stored = None


def replace_products(model: nn.Module, make: Callable[[object, bool], Optional[nn.Module]]) -> None:
    """Gives every parallel linear layer the product `make(weight, is_output_layer)` in place of its
    weight (a float tensor, a stored.QuantizedWeight, or a stored.RowParts), layer by layer, so only
    one layer is held twice at once; where `make` returns None the layer keeps its weight. Layers
    already replaced, or not loaded yet (on the meta device), are left alone."""
    for layer in model.modules():
        if isinstance(layer, (ColumnParallel, RowParallel)):
            weight = _weight(layer)
            product = None if weight is None else make(weight, layer is getattr(model, "output", None))
            if product is not None:
                layer.product = product
                _drop_weight(layer)


class VocabParallel(VocabParallelEmbedding):
    """Holds rows [vocab_start_index, vocab_end_index) of the table; other ranks supply the rest.
    Its `table`, once quantize_model has given it one, reads those rows from a tied output layer's
    product in place of the weight."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_module("table", None)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.vocab_start_index
        elsewhere = (local < 0) | (local >= self.num_embeddings_per_partition)
        ids = local.masked_fill(elsewhere, 0)
        rows = F.embedding(ids, self.weight) if self.table is None else self.table(ids)
        return all_reduce(rows.masked_fill(elsewhere.unsqueeze(-1), 0))


class DimParallel(ParallelEmbedding):
    """Holds a slice of every row's features (Llama 2's split); gathers the rest."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return all_gather_last_dim(F.embedding(tokens, self.weight))
