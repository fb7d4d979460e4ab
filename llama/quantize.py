"""Weight-only quantization, chosen once in Llama.build (quantize="int8" or "int4"): every parallel
linear layer swaps its float weight for a compact one and multiplies through one of PyTorch's own
CPU kernels, with bf16 activations (they are 20-50x slower fed fp32):

- int8: one scale per output row, symmetric (max |w| -> 127); torch._weight_int8pack_mm.
- int4: groups of `group` consecutive input features, asymmetric (w = scale * q + min, q in 0..15,
  the same form as a GGUF Q4_1 block); torch._convert_weight_to_int4pack_for_cpu packs the codes
  and torch._weight_int4pack_mm_for_cpu multiplies. The output layer is kept as int8, as llama.cpp's
  4-bit files keep it at 6 or 8 bits: in int4 it alone raises SmolLM2's perplexity by 6% (+0.7%
  with it in int8, for a fifth more bytes per step).

Each rank quantizes its own slice, so a row-parallel slice must hold whole groups; check_quantize
refuses a rank count that cuts one. The embedding table stays as it is (a step reads one row).
"""

from typing import List, Optional, Tuple

import torch
from torch import nn

from .args import ModelArgs
from .layers import ColumnParallel, RowParallel

QUANTIZE_CHOICES = (None, "int8", "int4")
# Groups of 32 match GGUF's Q4_1 blocks and hold perplexity closest to fp32; on SmolLM2 and this CPU
# they decode as fast as groups of 64 (BENCHMARKS.md).
DEFAULT_GROUP = 32
GROUP_CHOICES = (32, 64, 128, 256)  # what the int4 kernel accepts
_KERNELS = {"int8": ["aten::_weight_int8pack_mm"],
            "int4": ["aten::_convert_weight_to_int4pack_for_cpu", "aten::_weight_int4pack_mm_for_cpu"]}


def describe(quantize: Optional[str], group: int) -> str:
    """How the output names the mode: "int8" or "int4, group 32, output int8"."""
    return quantize + (f", group {group}, output int8" if quantize == "int4" else "")


def _row_parallel_in_features(args: ModelArgs) -> List[int]:
    return [args.n_heads * args.head_dim, args.ffn_hidden_dim]


def check_quantize(quantize: Optional[str], group: int, args: ModelArgs, world_size: int,
                   device: torch.device) -> None:
    """Refuses, before any weight is read, what the kernels cannot do here."""
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"unknown quantize={quantize!r}; use one of {QUANTIZE_CHOICES}")
    if quantize is None:
        return
    for op in _KERNELS[quantize]:
        if not torch._C._dispatch_has_kernel_for_dispatch_key(op, device.type.upper()):
            raise ValueError(f"quantize={quantize!r} needs PyTorch's {op} kernel, which this PyTorch has no "
                             f"{device.type} version of; run on CPU (device='cpu') or without quantize")
    if quantize != "int4":
        return
    if group not in GROUP_CHOICES:
        raise ValueError(f"quant_group={group!r} is not supported; use one of {GROUP_CHOICES}")
    if args.dim % group:
        raise ValueError(f"quant_group={group} does not divide the model's dim={args.dim}; use one of "
                         f"{[g for g in GROUP_CHOICES if args.dim % g == 0] or 'none: this model cannot run int4'}")

    def fits(world: int) -> bool:
        return all(n % world == 0 and (n // world) % group == 0 for n in _row_parallel_in_features(args))

    if not fits(world_size):
        can = [w for w in range(1, args.n_heads + 1) if args.n_heads % w == 0 and fits(w)]
        raise ValueError(f"int4 with quant_group={group} cannot run on {world_size} ranks: a rank's slice of the "
                         f"row-parallel layers ({_row_parallel_in_features(args)} input features) must hold whole "
                         f"groups; rank counts that can: {can} (or choose a smaller quant_group)")


def int4_codes(weight: torch.Tensor, group: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Min-max asymmetric int4 of (out, in) weights by groups of `group` inputs: (codes (out, in)
    int32 in 0..15, scales (out, in // group), mins (out, in // group)), w ~ codes * scale + min."""
    rows, cols = weight.shape
    groups = weight.float().reshape(rows, cols // group, group)
    low, high = groups.amin(-1), groups.amax(-1)
    scales = ((high - low) / 15).clamp(min=1e-12)
    codes = torch.round((groups - low.unsqueeze(-1)) / scales.unsqueeze(-1)).clamp(0, 15).to(torch.int32)
    return codes.reshape(rows, cols), scales, low


class Int8Product(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features = weight.shape[0]
        weight = weight.float()
        scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer("weight", torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        y = torch._weight_int8pack_mm(flat, self.weight, self.scales)
        return y.reshape(*x.shape[:-1], -1).to(x.dtype)


class Int4Product(nn.Module):
    def __init__(self, weight: torch.Tensor, group: int):
        super().__init__()
        self.group = group
        codes, scales, mins = int4_codes(weight, group)
        self.out_features = weight.shape[0]
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(codes, 1))
        # The kernel reads w = (q - 8) * scale + zero, so zero is the value of the middle code.
        zeros = mins + 8 * scales
        self.register_buffer("scales_and_zeros", torch.stack([scales.t(), zeros.t()], dim=-1)
                             .to(torch.bfloat16).contiguous())  # (in // group, out, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        y = torch._weight_int4pack_mm_for_cpu(flat, self.packed, self.group, self.scales_and_zeros)
        return y.reshape(*x.shape[:-1], -1).to(x.dtype)

    def dequantized(self) -> torch.Tensor:
        """The (out, in) weights the kernel multiplies by, in fp32 (from the stored codes, read back
        through the kernel itself with an identity input)."""
        in_features = self.packed.shape[1] * 2
        eye = torch.eye(in_features, dtype=torch.bfloat16)
        return torch._weight_int4pack_mm_for_cpu(eye, self.packed, self.group, self.scales_and_zeros).float().t()


def quantize_model(model: nn.Module, quantize: Optional[str], group: int = DEFAULT_GROUP) -> None:
    """Replaces every parallel linear layer's weight by its quantized product, layer by layer (or
    joined group by joined group), so only one layer or group is held twice at once. Layers that read the same input (a module's SAME_INPUT:
    q, k and v; w1 and w3) get one product for all their rows, on the first of them (its `joint`;
    see layers.column_products). A tied output layer gets its own quantized copy; with int4, the
    output layer is int8 (see above)."""
    if quantize is None:
        return

    def product(weight: torch.Tensor, int8: bool) -> nn.Module:
        return Int8Product(weight) if int8 else Int4Product(weight, group)

    for module in list(model.modules()):
        layers = [getattr(module, name) for name in getattr(module, "SAME_INPUT", ())]
        if layers:
            layers[0].joint = product(torch.cat([layer.weight.detach() for layer in layers]), quantize == "int8")
            for layer in layers:
                layer.weight = None
    for layer in model.modules():
        if isinstance(layer, (ColumnParallel, RowParallel)) and layer.weight is not None:
            weight = layer.weight.detach()
            layer.product = product(weight, quantize == "int8" or layer is model.output)
            layer.weight = None
