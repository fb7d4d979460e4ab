"""Weight-only quantization, chosen once in Llama.build (quantize="int8" or "int4"): every parallel
linear layer swaps its float weight for a compact one and multiplies through a CPU kernel:

- int8: one scale per output row, symmetric (max |w| -> 127).
- int4: groups of `group` consecutive input features, asymmetric (w = scale * q + min, q in 0..15,
  the same form as a GGUF Q4_1 block). The output layer is kept as int8, as llama.cpp's 4-bit files
  keep it at 6 or 8 bits: in int4 it alone raises SmolLM2's perplexity by 6% (+0.7% with it in
  int8, for a fifth more bytes per step).

Two sets of kernels, chosen once per layer when it is quantized:
- ours (llama/csrc/quantized_gemv.cpp, llama/cpu_kernels.py), on x86 CPUs with AVX2 and a C++
  compiler (AVX-VNNI or AVX-512 VNNI where present): 2-4x faster than PyTorch's at the decode
  step's few rows. int8 multiplies fp32
  activations exactly by the int8 weights; int4, as llama.cpp does, rounds each group of 32
  activations to int8 with its own scale (SmolLM2's perplexity moves by under 1%, tested) and
  keeps the scales and mins in fp16, as GGUF does.
- PyTorch's own elsewhere (torch._weight_int8pack_mm, torch._weight_int4pack_mm_for_cpu), fed bf16
  activations (they are 20-50x slower fed fp32), with scales and zeros in bf16.

Each rank quantizes its own slice, so a row-parallel slice must hold whole groups; check_quantize
refuses a rank count that cuts one. The embedding table stays as it is (a step reads one row).
"""

from collections import Counter
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from . import blocks, cpu_kernels
from .args import ModelArgs
from .layers import VocabParallel, replace_products
from .stored import QuantizedWeight, Record, RowParts

QUANTIZE_CHOICES = (None, "int8", "int4")
# Groups of 32 match GGUF's Q4_1 blocks and hold perplexity closest to fp32; on SmolLM2 and this CPU
# they decode as fast as groups of 64 (BENCHMARKS.md).
DEFAULT_GROUP = 32
GROUP_CHOICES = (32, 64, 128, 256)  # what the int4 kernel accepts
_KERNELS = {"int8": ["aten::_weight_int8pack_mm"],
            "int4": ["aten::_convert_weight_to_int4pack_for_cpu", "aten::_weight_int4pack_mm_for_cpu"]}


def describe(quantize: Optional[str], group: int) -> str:
    """How the output names the mode, e.g. "int4, group 32, output int8, our kernels (avx2), int8
    activations" or "int8, PyTorch's kernels (ours: <why not>), bf16 activations"."""
    mode = quantize + (f", group {group}, output int8" if quantize == "int4" else "")
    if cpu_kernels.load() is None:
        return f"{mode}, {cpu_kernels.describe()}" + (", int8 activations" if quantize == "int4" else "")
    return f"{mode}, {cpu_kernels.describe()}, bf16 activations"


def _row_parallel_in_features(args: ModelArgs) -> Dict[str, int]:
    """The input width of each row-parallel layer, the one a rank's slice cuts."""
    return {"attention.wo.weight": args.n_heads * args.head_dim, "feed_forward.w2.weight": args.ffn_hidden_dim}


def _rank_counts(args: ModelArgs, block: int, widths: List[int]) -> List[int]:
    """The rank counts whose slices of these input widths hold whole blocks of `block`."""
    return [w for w in range(1, args.n_heads + 1)
            if args.n_heads % w == 0 and all(n % w == 0 and (n // w) % block == 0 for n in widths)]


def check_quantize(quantize: Optional[str], group: int, args: ModelArgs, world_size: int,
                   device: torch.device) -> None:
    """Refuses, before any weight is read, what the kernels cannot do here."""
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"unknown quantize={quantize!r}; use one of {QUANTIZE_CHOICES}")
    if quantize is None:
        return
    if device.type != "cpu":  # PyTorch's CUDA int8 product is a naive kernel, slower than bf16
        raise ValueError(f"quantize={quantize!r} runs on CPU only (there is no fast {device.type} kernel for it "
                         f"yet); on {device.type} leave quantize unset (bf16/fp16 weights), or use device='cpu'")
    for op in _KERNELS[quantize]:
        if not torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU"):
            raise ValueError(f"quantize={quantize!r} needs PyTorch's {op} CPU kernel, which this PyTorch build "
                             f"lacks; install PyTorch 2.4 or later, or run without quantize")
    if quantize != "int4":
        return
    if group not in GROUP_CHOICES:
        raise ValueError(f"quant_group={group!r} is not supported; use one of {GROUP_CHOICES}")
    if args.dim % group:
        raise ValueError(f"quant_group={group} does not divide the model's dim={args.dim}; use one of "
                         f"{[g for g in GROUP_CHOICES if args.dim % g == 0] or 'none: this model cannot run int4'}")

    widths = list(_row_parallel_in_features(args).values())
    can = _rank_counts(args, group, widths)
    if world_size not in can:
        raise ValueError(f"int4 with quant_group={group} cannot run on {world_size} ranks: a rank's slice of the "
                         f"row-parallel layers ({widths} input features) must hold whole "
                         f"groups; rank counts that can: {can} (or choose a smaller quant_group)")


def check_stored(record: Optional[Record], quantize: Optional[str], args: ModelArgs, world_size: int,
                 device: torch.device) -> Optional[str]:
    """A checkpoint stored quantized (llama/stored.py) runs as stored. Returns None for an all-float
    checkpoint, else how it was made; refuses, before any weight is read, another `quantize`, a
    device our products do not run on, and a rank count that would cut a block."""
    if record is None:
        return None
    if quantize is not None and quantize != record.mode:
        raise ValueError(f"this checkpoint is stored quantized ({record.made_by}), so it cannot also be quantized "
                         f"as {quantize}; run it without quantize / --quantize, or convert its source again "
                         f"(python -m llama.convert --quantize {quantize}, or --dtype bf16 for floats)")
    if device.type != "cpu":
        raise ValueError(f"this checkpoint is stored quantized ({record.made_by}), which runs on CPU only; run it "
                         f"with device='cpu', or convert its source to floats (python -m llama.convert --dtype bf16)")
    row_parallel = _row_parallel_in_features(args)
    for key, qtype in record.types.items():
        width = row_parallel.get(key.split(".", 2)[-1])
        block = blocks.TYPES.get(qtype, (1, 0))[0]  # I8_ROW: any cut
        if width is not None and (width // world_size) % block:
            raise ValueError(f"this checkpoint's {key} is stored as {qtype} blocks of {block} inputs, which "
                             f"{world_size} ranks would cut ({width} inputs); rank counts that can "
                             f"run it: {_rank_counts(args, block, [width])}")
    return record.mode or "blocks"


def int8_codes(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 of (out, in) weights by rows: (codes (out, in) int8, scales (out,) fp32),
    w ~ codes * scale; a slice of rows at a time, so only a slice is held in fp32."""
    scales = torch.cat([part.float().abs().amax(dim=1) for part in _row_slices(weight)]).clamp(min=1e-12) / 127
    codes = torch.cat([torch.round(part.float() / part_scales[:, None]).clamp(-127, 127).to(torch.int8)
                       for part, part_scales in zip(_row_slices(weight), _row_slices(scales))])
    return codes, scales


def int4_codes(weight: torch.Tensor, group: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Min-max asymmetric int4 of (out, in) weights by groups of `group` inputs: (codes (out, in)
    int32 in 0..15, scales (out, in // group), mins (out, in // group)), w ~ codes * scale + min."""
    rows, cols = weight.shape
    groups = weight.float().reshape(rows, cols // group, group)
    low, high = groups.amin(-1), groups.amax(-1)
    scales = ((high - low) / 15).clamp(min=1e-12)
    codes = torch.round((groups - low.unsqueeze(-1)) / scales.unsqueeze(-1)).clamp(0, 15).to(torch.int32)
    return codes.reshape(rows, cols), scales, low


Parts = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # int4 codes, scales, mins of some rows
ROWS_PER_BLOCK = 16  # our kernels' layouts hold output rows in blocks of 16


def _ours(rows: int, device: torch.device) -> bool:
    return device.type == "cpu" and rows % ROWS_PER_BLOCK == 0 and cpu_kernels.load() is None


def _flat(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).to(dtype).contiguous()


SLICE_ROWS = 2048  # rows quantized at once (a multiple of ROWS_PER_BLOCK): float copies of a slice only


def _row_slices(x: torch.Tensor):
    return x.split(SLICE_ROWS)


class Int8Product(nn.Module):
    """int8 codes with one scale per output row. Int8Product(weight) quantizes a float weight;
    Int8Product.from_codes takes codes already made (a checkpoint stored quantized)."""

    origin = "quantized here"  # how the codes were made, for the "Loaded" line

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self._store(*int8_codes(weight))

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor) -> "Int8Product":
        product = cls.__new__(cls)
        nn.Module.__init__(product)
        product._store(codes, scales.float())
        return product

    def _store(self, codes: torch.Tensor, scales: torch.Tensor) -> None:
        rows, cols = codes.shape
        self.out_features = rows
        self.ours = _ours(rows, codes.device)
        if self.ours:  # (rows / 16, cols, 16): 16 rows side by side, one input after another
            codes = codes.reshape(rows // ROWS_PER_BLOCK, ROWS_PER_BLOCK, cols).transpose(1, 2).contiguous()
        self.register_buffer("weight", codes.contiguous())  # stored rows are views of codes + scale
        self.register_buffer("scales", scales if self.ours else scales.to(torch.bfloat16))
        self.kernel = cpu_kernels.ops().int8_gemv if self.ours else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ours:
            y = self.kernel(_flat(x, torch.float32), self.weight, self.scales)
        else:
            y = torch._weight_int8pack_mm(_flat(x, torch.bfloat16), self.weight, self.scales)
        return y.reshape(*x.shape[:-1], -1).to(x.dtype)

    def codes(self) -> torch.Tensor:
        """The (out, in) int8 codes; row i's weights are codes[i] * row_scales()[i]."""
        if self.ours:
            return self.weight.transpose(1, 2).reshape(self.out_features, -1)
        return self.weight

    def row_scales(self) -> torch.Tensor:
        return self.scales.float()

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the weights, in fp32: ids.shape + (in,)."""
        if self.ours:  # row r is lane r % 16 of block r // 16
            codes = self.weight[ids // ROWS_PER_BLOCK, :, ids % ROWS_PER_BLOCK]
        else:
            codes = self.weight[ids]
        return codes.float() * self.row_scales()[ids].unsqueeze(-1)


class TableRows(nn.Module):
    """An embedding table read from a tied output layer's int8 product: each row as the output
    layer multiplies by it (codes x the row's scale), in the model's dtype. The table's own float
    copy is then dropped, as llama.cpp reads its quantized token_embd: a 1B model's bf16 table is
    200 MB, its int8 rows 100 MB it holds anyway. Each value moves by at most half its row's int8 step."""

    def __init__(self, product: Int8Product, dtype: torch.dtype):
        super().__init__()
        self.product = product
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.product.rows(ids).to(self.dtype)


class Int4Product(nn.Module):
    """int4 codes with a scale and a min per group of inputs. Int4Product(weight, group) quantizes a
    float weight; Int4Product.from_parts takes codes already made (a checkpoint stored quantized)."""

    origin = "quantized here"  # how the codes were made, for the "Loaded" line

    def __init__(self, weight: torch.Tensor, group: int):
        super().__init__()
        self._store(lambda: (int4_codes(part, group) for part in _row_slices(weight)), group, weight.shape[0],
                    weight.device)

    @classmethod
    def from_parts(cls, parts: Callable[[], Iterable[Parts]], group: int, rows: int) -> "Int4Product":
        """parts(): (codes, scales, mins) of consecutive row slices, as int4_codes returns them."""
        product = cls.__new__(cls)
        nn.Module.__init__(product)
        product._store(parts, group, rows, torch.device("cpu"))
        return product

    @classmethod
    def from_packed(cls, packed: torch.Tensor) -> "Int4Product":
        """Weights already in our kernel's layout (_pack_int4's, groups of SUBGROUP)."""
        product = cls.__new__(cls)
        nn.Module.__init__(product)
        product.group, product.out_features, product.ours = SUBGROUP, packed.shape[0] * ROWS_PER_BLOCK, True
        product.kernel = cpu_kernels.ops().int4_gemv
        product.register_buffer("packed", packed)
        return product

    def _store(self, parts: Callable[[], Iterable[Parts]], group: int, rows: int, device: torch.device) -> None:
        self.group = group
        self.out_features = rows
        self.ours = _ours(rows, device)
        packed = []
        for codes, scales, mins in parts() if self.ours else ():  # a slice at a time: small copies
            # fp16 holds the scales and mins of real weights (GGUF stores them so); odd ones go the other way.
            if not torch.isfinite(torch.cat([scales, mins]).half()).all():
                self.ours = False
                break
            packed.append(_pack_int4(codes, scales, mins, group))
        self.kernel = cpu_kernels.ops().int4_gemv if self.ours else None
        if self.ours:
            self.register_buffer("packed", torch.cat(packed))
            return
        codes, scales, mins = (torch.cat(values) for values in zip(*parts()))
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(codes, 1))
        # The kernel reads w = (q - 8) * scale + zero, so zero is the value of the middle code.
        zeros = mins + 8 * scales
        self.register_buffer("scales_and_zeros", torch.stack([scales.t(), zeros.t()], dim=-1)
                             .to(torch.bfloat16).contiguous())  # (in // group, out, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ours:
            y = self.kernel(_flat(x, torch.float32), self.packed)
        else:
            y = torch._weight_int4pack_mm_for_cpu(_flat(x, torch.bfloat16), self.packed, self.group,
                                                  self.scales_and_zeros)
        return y.reshape(*x.shape[:-1], -1).to(x.dtype)

    def dequantized(self) -> torch.Tensor:
        """The (out, in) weights the kernel multiplies by, in fp32."""
        if self.ours:
            return _unpack_int4(self.packed)
        # PyTorch's packing is its own: read the weights back through its kernel with an identity input.
        in_features = self.packed.shape[1] * 2
        eye = torch.eye(in_features, dtype=torch.bfloat16)
        return torch._weight_int4pack_mm_for_cpu(eye, self.packed, self.group, self.scales_and_zeros).float().t()


# Our int4 layout (llama/csrc/quantized_gemv.cpp): for each block of 16 rows and each 32 inputs,
# 4 x 64 bytes of codes (vector s, row j, byte t: input 4s+t in the low nibble, 16+4s+t in the high
# one), then the 16 rows' scales and their mins as fp16. A larger group repeats its scale and min.
SUBGROUP = 32


def _pack_int4(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group: int) -> torch.Tensor:
    rows, cols = codes.shape
    blocks, subgroups = rows // ROWS_PER_BLOCK, cols // SUBGROUP
    nibbles = codes.to(torch.uint8).reshape(blocks, ROWS_PER_BLOCK, subgroups, 2, 4, 4)  # b j g half s t
    code_bytes = (nibbles[:, :, :, 0] | (nibbles[:, :, :, 1] << 4)).permute(0, 2, 3, 1, 4)  # b g s j t

    def by_block(values: torch.Tensor) -> torch.Tensor:  # (rows, cols / group) -> (b, g, 32 bytes)
        values = values.repeat_interleave(group // SUBGROUP, dim=1).half()
        return values.reshape(blocks, ROWS_PER_BLOCK, subgroups).transpose(1, 2).contiguous().view(torch.uint8)

    return torch.cat([code_bytes.reshape(blocks, subgroups, 256), by_block(scales), by_block(mins)], -1).contiguous()


def _pack_q4_blocks(raw: torch.Tensor, qtype: str) -> Optional[torch.Tensor]:
    """Q4_0 or Q4_1 blocks (rows, bytes) in our layout, or None where fp16 cannot hold a scale or min.
    A block's 16 code bytes already pair input k (low nibble) with input 16 + k (high), as our
    layout does, and its scale and min are fp16 as ours are: packing only moves bytes (our kernel
    op does it; a start-up from a stored int4 checkpoint is mostly this)."""
    packed = cpu_kernels.ops().pack_q4_blocks(raw.contiguous(), qtype == "Q4_1")
    return packed if packed.numel() else None


def _unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    blocks, subgroups, _ = packed.shape
    code_bytes = packed[..., :256].reshape(blocks, subgroups, 4, ROWS_PER_BLOCK, 4).permute(0, 3, 1, 2, 4)  # b j g s t
    codes = torch.stack([code_bytes & 15, code_bytes >> 4], dim=3).float()  # b j g half s t

    def by_row(raw: torch.Tensor) -> torch.Tensor:  # (b, g, 32 bytes) -> (b, j, g, 1, 1, 1)
        return raw.contiguous().view(torch.float16).float().transpose(1, 2)[..., None, None, None]

    weights = codes * by_row(packed[..., 256:288]) + by_row(packed[..., 288:])
    return weights.reshape(blocks * ROWS_PER_BLOCK, subgroups * SUBGROUP)


def stored_product(weight: QuantizedWeight) -> nn.Module:
    """The product of a weight stored quantized (llama/stored.py): 4-bit blocks become our int4
    with the same codes (Q4_K's scales d * sc are rounded to fp16 where fp16 cannot hold them:
    the origin says so), our I8_ROW rows our int8 as they are, other blocks (Q5_0, Q5_1, Q5_K, Q6_K, Q8_0) are
    dequantized and requantized to int8 per row (the origin says so)."""
    qtype = weight.qtype
    packed = (_pack_q4_blocks(weight.raw, qtype) if qtype in ("Q4_0", "Q4_1") and _ours(weight.shape[0], weight.raw.device)
              else None)
    if packed is not None:
        product = Int4Product.from_packed(packed)
        product.origin = f"{qtype} as int4"
    elif qtype in blocks.INT4_TYPES:
        rounded = []

        def parts():
            for raw in weight.raw.split(SLICE_ROWS):
                codes, scales, mins = blocks.int4_parts(raw, qtype)
                rounded.append(any(bool((v.half().float() != v).any()) for v in (scales, mins)))
                yield codes, scales, mins

        product = Int4Product.from_parts(parts, SUBGROUP, weight.shape[0])
        product.origin = f"{qtype} as int4" + (" (scales rounded to fp16)" if any(rounded) else "")
    elif qtype == blocks.I8_ROW:
        product = Int8Product.from_codes(*blocks.i8_row_parts(weight.raw))
        product.origin = "int8 as stored"
    else:
        product = Int8Product(weight.dequantize())
        product.origin = f"{qtype} requantized to int8"
    return product


def stored_blocks(weight: torch.Tensor, quantize: str, group: int) -> QuantizedWeight:
    """The blocks llama.convert --quantize stores for a float weight: exactly the codes Llama.build
    (quantize=...) makes at load, as Q4_1 (int4: its fp16 scales and mins, a larger group's repeated
    for each 32 inputs) or I8_ROW (int8)."""
    if quantize == "int8":
        return QuantizedWeight(blocks.encode_i8_row(*int8_codes(weight)), blocks.I8_ROW)

    def q4_1(part: torch.Tensor) -> torch.Tensor:
        codes, scales, mins = int4_codes(part, group)
        per_32 = [values.repeat_interleave(group // SUBGROUP, dim=1).half().float() for values in (scales, mins)]
        return blocks.encode_q4_1(codes, *per_32)

    return QuantizedWeight(torch.cat([q4_1(part) for part in _row_slices(weight)]), "Q4_1")


class ConcatProduct(nn.Module):
    """The product of a fused layer (q/k/v, w1/w3) whose parts cannot be one product (stored as
    blocks of different types, stored.RowParts): each part's product, outputs side by side."""

    def __init__(self, parts: List[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.out_features = sum(part.out_features for part in parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts], dim=-1)


def _float_product(weight: torch.Tensor) -> nn.Module:
    """A float part of a fused layer stored quantized (a file may keep one matrix in F16)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    return linear


def describe_stored(model: nn.Module) -> str:
    """How a checkpoint stored quantized runs, e.g. "stored quantized: 112 Q4_K as int4, 50 Q6_K
    requantized to int8, our kernels (avx2)" (products counted: a fused layer of one type is one)."""
    origins = Counter(m.origin for m in model.modules() if isinstance(m, (Int4Product, Int8Product)))
    kinds = ", ".join(f"{count} {origin}" for origin, count in sorted(origins.items()))
    return f"stored quantized: {kinds}, {cpu_kernels.describe()}"


def make_product(weight, quantize: Optional[str], group: int = DEFAULT_GROUP,
                 is_output: bool = False) -> Optional[nn.Module]:
    """The product quantize_model gives a layer holding `weight` (see there); None: stay float."""
    if isinstance(weight, RowParts):
        products = [make_product(part, quantize, group) for part in weight.parts]
        return ConcatProduct([_float_product(part) if product is None else product
                              for part, product in zip(weight.parts, products)])
    if isinstance(weight, QuantizedWeight):
        return stored_product(weight)
    if quantize is None:
        return None
    return Int8Product(weight) if quantize == "int8" or is_output else Int4Product(weight, group)


def quantize_model(model: nn.Module, quantize: Optional[str], group: int = DEFAULT_GROUP) -> None:
    """Replaces every parallel linear layer's weight by its quantized product (replace_products:
    one layer at a time). A tied output layer gets its own quantized copy; with int4, the output
    layer is int8 (see above). Weights stored quantized get their stored_product whatever
    `quantize` says, a fused layer stored as parts of different types a ConcatProduct of them;
    with quantize None, float weights stay float. A vocab-split embedding tied to an output layer
    quantized here then reads its rows from that product (TableRows)."""
    embedding, output = getattr(model, "tok_embeddings", None), getattr(model, "output", None)
    tied = embedding is not None and _same_tensor(getattr(embedding, "weight", None), getattr(output, "weight", None))
    replace_products(model, lambda weight, is_output: make_product(weight, quantize, group, is_output))
    if tied and isinstance(embedding, VocabParallel) and isinstance(output.product, Int8Product):
        embedding.table = TableRows(output.product, embedding.weight.dtype)
        embedding.weight = None


def _same_tensor(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> bool:
    """Whether a and b are one tensor's values (a tied output layer and its embedding)."""
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.device.type != "meta"
            and a.shape == b.shape and a.stride() == b.stride() and a.data_ptr() == b.data_ptr())
