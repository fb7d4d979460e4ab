"""llama.cpp's block-quantized weight matrices, decoded from their raw bytes with torch alone (the
runtime does not need the `gguf` package): GGUF's Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, and our own
I8_ROW.

A quantized matrix of logical shape (rows, cols) is a torch.uint8 tensor (rows, row_bytes): each row
is cols / block_elems blocks one after another, each laid out as in ggml. Its fp16 and fp32 fields
are little-endian, as on every CPU this runs on, so they are read by reinterpreting the bytes.
Below, offsets are within one block, and "nibbles" of n bytes hold 2n 4-bit codes: the n low nibbles
first, then the n high ones.

- Q4_0 (32 weights, 18 bytes): d fp16 [0:2], nibbles [2:18]; w = d * (q - 8).
- Q4_1 (32, 20): d fp16 [0:2], m fp16 [2:4], nibbles [4:20]; w = d * q + m.
- Q5_0 (32, 22): d fp16 [0:2], qh [2:6] (bit i of this little-endian word: the fifth bit, 16, of
  weight i), nibbles [6:22]; w = d * (q - 16).
- Q5_1 (32, 24): d fp16 [0:2], m fp16 [2:4], qh [4:8], nibbles [8:24]; w = d * q + m.
- Q8_0 (32, 34): d fp16 [0:2], 32 int8 codes [2:34]; w = d * q.
- Q4_K (256, 144): eight sub-blocks of 32 weights. d fp16 [0:2], dmin fp16 [2:4], 12 bytes b [4:16]
  packing a 6-bit scale sc and min m per sub-block, codes [16:144] as 4 x 32 bytes of nibbles (64
  weights, two sub-blocks, each). Sub-block i: w = d * sc_i * q - dmin * m_i. For i < 4, sc_i and m_i
  are the low 6 bits of b[i] and b[i + 4]; for i >= 4 their low 4 bits are b[i + 4]'s low and high
  nibble and their top 2 bits the top 2 of b[i - 4] and b[i].
- Q5_K (256, 176): Q4_K's first 16 bytes, qh [16:48], then nibbles [48:176] laid out as Q4_K's; bit i
  of qh[j] is the fifth bit (16) of weight j of sub-block i.
- Q6_K (256, 210): ql [0:128], qh [128:192], 16 int8 scales sc [192:208] (one per 16 weights), d fp16
  [208:210]; w = d * sc * (q - 32). Each half of 128 weights takes 64 bytes of ql as nibbles (its 4
  bits) and 32 bytes of qh, whose byte l holds the top 2 bits of weights l, l + 32, l + 64, l + 96
  (lowest pair first).
- I8_ROW (ours): a row is cols int8 codes, then one fp32 scale; w = code * scale. Its one "block" is
  the whole row, so a slice of columns keeps the row's scale (take_columns).

Every type decodes as codes * scale (+ min) over runs of weights that share a scale (_parts). Each
product of a scale and a code is exact in fp32 (at most 11 + 7 + 5 significant bits), so the one
rounding is the addition of a min, as in ggml: dequantize gives ggml's fp32 values bit for bit.
"""

from typing import Dict, Optional, Sequence, Tuple

import torch

TYPES: Dict[str, Tuple[int, int]] = {  # name -> (weights a block, bytes a block), as GGUF's GGML_QUANT_SIZES
    "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
    "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210),
}
I8_ROW = "I8_ROW"
I8_ROW_SCALE_BYTES = 4  # the fp32 scale after a row's codes
INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")  # 4-bit codes with one scale and min per 32 weights (int4_parts)
INT4_GROUP = 32


def _block(qtype: str) -> Tuple[int, int]:
    if qtype not in TYPES:
        raise ValueError(f"unknown quantized type {qtype!r}; known: {', '.join(TYPES)}, {I8_ROW}")
    return TYPES[qtype]


def row_bytes(qtype: str, cols: int) -> int:
    """The bytes that hold one row of `cols` weights."""
    if qtype == I8_ROW:
        if cols < 1:
            raise ValueError(f"an {I8_ROW} row holds at least one weight; cols={cols}")
        return cols + I8_ROW_SCALE_BYTES
    elems, nbytes = _block(qtype)
    if cols < 1 or cols % elems:
        raise ValueError(f"{qtype} rows are whole blocks of {elems} weights: cols={cols} is not a positive "
                         f"multiple of the block size, {elems}")
    return cols // elems * nbytes


def logical_cols(qtype: str, row_bytes: int) -> int:
    """The weights that one row of `row_bytes` bytes holds."""
    if qtype == I8_ROW:
        if row_bytes <= I8_ROW_SCALE_BYTES:
            raise ValueError(f"an {I8_ROW} row is its codes and a {I8_ROW_SCALE_BYTES}-byte scale: "
                             f"row_bytes={row_bytes} holds no codes")
        return row_bytes - I8_ROW_SCALE_BYTES
    elems, nbytes = _block(qtype)
    if row_bytes < 1 or row_bytes % nbytes:
        raise ValueError(f"{qtype} rows are whole blocks of {nbytes} bytes: row_bytes={row_bytes} is not a "
                         f"positive multiple of {nbytes}")
    return row_bytes // nbytes * elems


def _check_raw(raw: torch.Tensor, qtype: str) -> int:
    """Refuses what is not a matrix of `qtype` rows; returns its logical columns."""
    if raw.dtype != torch.uint8 or raw.dim() != 2:
        raise ValueError(f"a {qtype} matrix is a 2-d torch.uint8 tensor of raw bytes (rows, row_bytes); got "
                         f"{raw.dtype} of shape {tuple(raw.shape)}")
    return logical_cols(qtype, raw.shape[1])


def column_bytes(qtype: str, cols: int, start: int, end: int) -> Tuple[int, int]:
    """The bytes [byte_start, byte_end) of each row that hold its columns [start, end), which must
    be on block boundaries. For I8_ROW these are the codes alone and any columns will do: the scale,
    at bytes [cols, cols + 4), belongs to every slice of the row, and take_columns adds it."""
    row_bytes(qtype, cols)  # refuses a row width the type cannot have
    if not 0 <= start < end <= cols:
        raise ValueError(f"columns [{start}, {end}) are not a non-empty range within the row's {cols}")
    if qtype == I8_ROW:
        return start, end
    elems, nbytes = TYPES[qtype]
    if start % elems or end % elems:
        raise ValueError(f"columns [{start}, {end}) cut a {qtype} block: both ends must be multiples of its "
                         f"block size, {elems}")
    return start // elems * nbytes, end // elems * nbytes


def take_columns(raw: torch.Tensor, qtype: str, cols: int, start: int, end: int) -> torch.Tensor:
    """Columns [start, end) of a quantized matrix, as a quantized matrix of their own: the blocks that
    hold them, or for I8_ROW the codes followed by each row's scale. A copy, so that a slice kept
    (a rank's share) does not keep the whole matrix's storage alive."""
    if _check_raw(raw, qtype) != cols:
        raise ValueError(f"a {qtype} matrix of {cols} columns has {row_bytes(qtype, cols)} bytes a row, "
                         f"not {raw.shape[1]}")
    byte_start, byte_end = column_bytes(qtype, cols, start, end)
    if qtype == I8_ROW:
        return torch.cat([raw[:, byte_start:byte_end], raw[:, cols:]], dim=1)
    return raw[:, byte_start:byte_end].clone(memory_format=torch.contiguous_format)


def join_columns(parts: Sequence[torch.Tensor], qtype: str) -> torch.Tensor:
    """Quantized matrices side by side, the inverse of take_columns over consecutive ranges. For I8_ROW
    the codes are joined and the one scale kept, which the parts must share (slices of one matrix do)."""
    for part in parts:
        _check_raw(part, qtype)
    if qtype != I8_ROW:
        return torch.cat(list(parts), dim=1)
    scale = parts[0][:, -I8_ROW_SCALE_BYTES:]
    if any(not torch.equal(part[:, -I8_ROW_SCALE_BYTES:], scale) for part in parts[1:]):
        raise ValueError(f"{I8_ROW} parts joined into one matrix must share each row's scale; these differ")
    return torch.cat([part[:, :-I8_ROW_SCALE_BYTES] for part in parts] + [scale], dim=1)


def _fp16(fields: torch.Tensor) -> torch.Tensor:
    """(..., 2k) bytes -> (..., k) fp16 values, as fp32."""
    return fields.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(..., n) bytes -> (..., 2n) 4-bit codes: the low nibbles, then the high ones."""
    return torch.cat([qs & 15, qs >> 4], dim=-1)


# Each decoder: blocks (rows, n, block_bytes) -> (codes (rows, n, block_elems) as small ints,
# scales (rows, n, runs), mins (rows, n, runs) or None), a run being block_elems / runs weights.
Parts = Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]


def _q4_0(blocks: torch.Tensor) -> Parts:
    d = _fp16(blocks[..., 0:2])
    return _nibbles(blocks[..., 2:]), d, -8 * d  # d * q - 8 * d is d * (q - 8), exactly


def _q4_1(blocks: torch.Tensor) -> Parts:
    return _nibbles(blocks[..., 4:]), _fp16(blocks[..., 0:2]), _fp16(blocks[..., 2:4])


def _fifth_bits(qh: torch.Tensor) -> torch.Tensor:
    """4 bytes (a little-endian 32-bit word) -> bit i of it for weight i, as 16 or 0."""
    return torch.stack([(qh >> i) & 1 for i in range(8)], dim=-1).flatten(-2) << 4


def _q5_0(blocks: torch.Tensor) -> Parts:
    d = _fp16(blocks[..., 0:2])
    return _nibbles(blocks[..., 6:]) | _fifth_bits(blocks[..., 2:6]), d, -16 * d


def _q5_1(blocks: torch.Tensor) -> Parts:
    return (_nibbles(blocks[..., 8:]) | _fifth_bits(blocks[..., 4:8]), _fp16(blocks[..., 0:2]),
            _fp16(blocks[..., 2:4]))


def _q8_0(blocks: torch.Tensor) -> Parts:
    return blocks[..., 2:].view(torch.int8), _fp16(blocks[..., 0:2]), None


def _k_scales_and_mins(blocks: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Q4_K's and Q5_K's sub-block scales d * sc and mins -dmin * m, (rows, n, 8)."""
    d, dmin = _fp16(blocks[..., 0:2]), _fp16(blocks[..., 2:4])
    # b[0:4]: sc 0..3 and the top bits of sc 4..7; b[4:8]: the same for m; b[8:12]: sc and m 4..7's low bits.
    first, second, third = blocks[..., 4:8], blocks[..., 8:12], blocks[..., 12:16]
    sc = torch.cat([first & 63, (third & 15) | ((first >> 6) << 4)], dim=-1)
    m = torch.cat([second & 63, (third >> 4) | ((second >> 6) << 4)], dim=-1)
    return d * sc, -(dmin * m)


def _k_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """128 bytes of codes -> 256: each 32 bytes are two sub-blocks' nibbles."""
    return _nibbles(qs.unflatten(-1, (4, 32))).flatten(-2)


def _q4_k(blocks: torch.Tensor) -> Parts:
    return (_k_nibbles(blocks[..., 16:]), *_k_scales_and_mins(blocks))


def _q5_k(blocks: torch.Tensor) -> Parts:
    qh = blocks[..., 16:48]
    fifth_bits = torch.stack([(qh >> i) & 1 for i in range(8)], dim=-2)  # (rows, n, 8 sub-blocks, 32)
    return (_k_nibbles(blocks[..., 48:]) | (fifth_bits.flatten(-2) << 4), *_k_scales_and_mins(blocks))


def _q6_k(blocks: torch.Tensor) -> Parts:
    low = _nibbles(blocks[..., :128].unflatten(-1, (2, 64)))  # (rows, n, 2 halves, 128)
    qh = blocks[..., 128:192].unflatten(-1, (2, 32))
    high = torch.stack([(qh >> shift) & 3 for shift in (0, 2, 4, 6)], dim=-2)  # (rows, n, 2, 4, 32)
    codes = (low | (high.flatten(-2) << 4)).flatten(-2).to(torch.int8) - 32
    return codes, _fp16(blocks[..., 208:210]) * blocks[..., 192:208].view(torch.int8), None


_DECODERS = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}


def _parts(raw: torch.Tensor, qtype: str) -> Parts:
    """(codes (rows, cols) as small ints, scales (rows, runs), mins (rows, runs) or None): each run
    of cols / runs weights of a row is codes * scale (+ min)."""
    _check_raw(raw, qtype)
    if qtype == I8_ROW:
        return (raw[:, :-I8_ROW_SCALE_BYTES].view(torch.int8),
                raw[:, -I8_ROW_SCALE_BYTES:].contiguous().view(torch.float32), None)
    codes, scales, mins = _DECODERS[qtype](raw.reshape(raw.shape[0], -1, TYPES[qtype][1]))
    return codes.flatten(1), scales.flatten(1), None if mins is None else mins.flatten(1)


def dequantize(raw: torch.Tensor, qtype: str) -> torch.Tensor:
    """The (rows, cols) fp32 weights of a quantized matrix."""
    codes, scales, mins = _parts(raw, qtype)
    rows, cols = codes.shape
    weights = codes.reshape(rows, scales.shape[1], -1) * scales[..., None]
    if mins is not None:
        weights = weights + mins[..., None]
    return weights.reshape(rows, cols)


def int4_parts(raw: torch.Tensor, qtype: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Q4_0, Q4_1 or Q4_K matrix as (codes (rows, cols) int32 in 0..15, scales (rows, cols / 32),
    mins (rows, cols / 32)) float32: the weights are codes * scale + min, exactly dequantize's."""
    if qtype not in INT4_TYPES:
        raise ValueError(f"int4_parts reads {', '.join(INT4_TYPES)} (4-bit codes, a scale and a min per "
                         f"{INT4_GROUP} weights); {qtype!r} is not one of them")
    codes, scales, mins = _parts(raw, qtype)
    return codes.to(torch.int32), scales, mins


def i8_row_parts(raw: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """An I8_ROW matrix as (codes (rows, cols) int8, scales (rows,) float32)."""
    codes, scales, _ = _parts(raw, I8_ROW)
    return codes, scales.flatten()


def encode_q4_1(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """Q4_1 bytes (rows, row_bytes) of codes (rows, cols) in 0..15 and scales and mins (rows, cols / 32),
    which must be fp16 values already (Q4_1 stores them so): then dequantize gives back
    codes * scales + mins exactly."""
    rows, cols = codes.shape
    row_bytes("Q4_1", cols)  # refuses a width that is not whole blocks
    runs = (rows, cols // INT4_GROUP)
    if tuple(scales.shape) != runs or tuple(mins.shape) != runs:
        raise ValueError(f"Q4_1 of {tuple(codes.shape)} codes takes scales and mins of shape {runs}; got "
                         f"{tuple(scales.shape)} and {tuple(mins.shape)}")
    if codes.min() < 0 or codes.max() > 15:
        raise ValueError("Q4_1 codes are 4-bit: they must lie in 0..15")
    for name, values in (("scales", scales), ("mins", mins)):
        if not torch.equal(values.half().float(), values.float()):
            raise ValueError(f"Q4_1 stores {name} as fp16 and these are not all fp16 values; round them first "
                             f"(.half().float()) so that the weights are the ones stored")
    halves = codes.to(torch.uint8).reshape(rows, -1, 2, 16)  # weights 0..15 low nibbles, 16..31 high
    qs = halves[..., 0, :] | (halves[..., 1, :] << 4)

    def fp16_bytes(values: torch.Tensor) -> torch.Tensor:
        return values.half().reshape(rows, -1, 1).view(torch.uint8)

    return torch.cat([fp16_bytes(scales), fp16_bytes(mins), qs], dim=-1).reshape(rows, -1)


def encode_i8_row(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """I8_ROW bytes (rows, cols + 4) of int8 codes (rows, cols) and one fp32 scale a row."""
    if codes.dtype != torch.int8 or codes.dim() != 2:
        raise ValueError(f"{I8_ROW} codes are a 2-d int8 tensor; got {codes.dtype} of shape {tuple(codes.shape)}")
    rows = codes.shape[0]
    if tuple(scales.shape) != (rows,):
        raise ValueError(f"{I8_ROW} takes one scale a row, shape ({rows},); got {tuple(scales.shape)}")
    scale_bytes = scales.to(torch.float32).contiguous().reshape(rows, 1).view(torch.uint8)
    return torch.cat([codes.view(torch.uint8), scale_bytes], dim=1)


def bits_per_weight(qtype: str, cols: int) -> float:
    """Stored bits a weight, scales included (for memory estimates)."""
    return 8 * row_bytes(qtype, cols) / cols
