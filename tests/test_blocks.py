"""llama/blocks.py against the `gguf` package as the independent reference: every type decoded
bit for bit as gguf decodes it, the int4 parts, column slices and their joins, the encoders' round
trips, and the refusals. Small seeded matrices of random blocks, a fraction of a second in all."""

import ast
import inspect

import numpy as np
import pytest
import torch

pytest.importorskip("gguf", reason="the `gguf` package is these tests' reference decoder (pip install gguf)")
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType  # noqa: E402
from gguf.quants import dequantize as gguf_dequantize, quantize as gguf_quantize  # noqa: E402

from llama import blocks  # noqa: E402
from llama.blocks import (  # noqa: E402
    I8_ROW, TYPES, bits_per_weight, column_bytes, dequantize, encode_i8_row, encode_q4_1, int4_parts,
    join_columns, logical_cols, row_bytes, take_columns,
)

ROWS, COLS = 4, 512  # two super-blocks a row for the K types
GGUF_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")
FP16_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}  # offsets


def random_matrix(qtype: str, seed: int = 0) -> torch.Tensor:
    """Random bytes as valid blocks: any bits make valid codes, but random fp16 scale fields can be
    inf or nan, so those are written as random finite values of either sign, some of them tiny."""
    generator = torch.Generator().manual_seed(seed)
    if qtype == I8_ROW:
        codes = torch.randint(-128, 128, (ROWS, COLS), dtype=torch.int8, generator=generator)
        return encode_i8_row(codes, torch.rand(ROWS, generator=generator) * 0.1)
    elems, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    raw = torch.randint(0, 256, (ROWS, COLS // elems, nbytes), dtype=torch.uint8, generator=generator)
    for offset in FP16_FIELDS[qtype]:
        values = torch.randn(ROWS, COLS // elems, 1, generator=generator) * 0.05
        raw[..., offset:offset + 2] = values.half().view(torch.uint8)
    return raw.reshape(ROWS, -1)


def test_block_sizes_are_gguf_own():
    assert TYPES == {name: tuple(GGML_QUANT_SIZES[GGMLQuantizationType[name]]) for name in GGUF_TYPES}


@pytest.mark.parametrize("qtype", GGUF_TYPES)
def test_dequantize_gives_gguf_values_bit_for_bit(qtype):
    for seed in range(3):
        raw = random_matrix(qtype, seed)
        want = torch.from_numpy(gguf_dequantize(raw.numpy(), GGMLQuantizationType[qtype]))
        got = dequantize(raw, qtype)
        assert got.dtype == torch.float32 and got.shape == (ROWS, COLS)
        assert torch.isfinite(want).all()
        assert torch.equal(got, want), f"{qtype} seed {seed}: {int((got != want).sum())} weights differ"


def test_i8_row_is_codes_then_a_little_endian_fp32_scale():
    codes = torch.tensor([[1, -2, 127], [-128, 0, 5]], dtype=torch.int8)
    scales = torch.tensor([0.5, -0.25])
    raw = encode_i8_row(codes, scales)
    want_row = [codes[0].numpy().view(np.uint8).tobytes() + np.float32(0.5).astype("<f4").tobytes(),
                codes[1].numpy().view(np.uint8).tobytes() + np.float32(-0.25).astype("<f4").tobytes()]
    assert [bytes(row.numpy()) for row in raw] == want_row
    assert torch.equal(dequantize(raw, I8_ROW), codes.float() * scales[:, None])


@pytest.mark.parametrize("qtype", blocks.INT4_TYPES)
def test_int4_parts_are_exactly_the_dequantized_weights(qtype):
    raw = random_matrix(qtype)
    codes, scales, mins = int4_parts(raw, qtype)
    assert codes.dtype == torch.int32 and codes.shape == (ROWS, COLS)
    assert int(codes.min()) >= 0 and int(codes.max()) <= 15
    assert scales.dtype == mins.dtype == torch.float32 and scales.shape == mins.shape == (ROWS, COLS // 32)
    weights = codes * scales.repeat_interleave(32, dim=1) + mins.repeat_interleave(32, dim=1)
    assert torch.equal(weights, dequantize(raw, qtype))


@pytest.mark.parametrize("qtype", ["Q8_0", "Q5_K", "Q6_K", I8_ROW])
def test_int4_parts_refuses_other_types(qtype):
    with pytest.raises(ValueError, match=f"{qtype!r} is not one of them"):
        int4_parts(random_matrix(qtype), qtype)


def boundaries(qtype: str):
    """Cuts of a row on block boundaries."""
    if qtype == I8_ROW:
        return [0, 100, 101, 384, COLS]  # any columns: its codes are a weight a byte
    return [0, 256, 384, COLS] if TYPES[qtype][0] == 32 else [0, 256, COLS]


@pytest.mark.parametrize("qtype", GGUF_TYPES + (I8_ROW,))
def test_column_slices_dequantize_to_the_slices_of_the_weights_and_join_back(qtype):
    raw = random_matrix(qtype)
    weights = dequantize(raw, qtype)
    cuts = boundaries(qtype)
    parts = []
    for start, end in zip(cuts, cuts[1:]):
        part = take_columns(raw, qtype, COLS, start, end)
        assert part.shape == (ROWS, row_bytes(qtype, end - start)) and part.is_contiguous()
        assert torch.equal(dequantize(part, qtype), weights[:, start:end]), (start, end)
        if qtype != I8_ROW:  # a view of the row's bytes decodes as well
            byte_start, byte_end = column_bytes(qtype, COLS, start, end)
            assert torch.equal(dequantize(raw[:, byte_start:byte_end], qtype), weights[:, start:end])
        parts.append(part)
    assert torch.equal(join_columns(parts, qtype), raw)


def test_column_bytes_are_whole_blocks_and_i8_row_codes():
    assert column_bytes("Q4_K", COLS, 256, 512) == (144, 288)
    assert column_bytes("Q4_0", COLS, 32, 96) == (18, 54)
    assert column_bytes("Q6_K", COLS, 0, 256) == (0, 210)
    assert column_bytes(I8_ROW, COLS, 3, 7) == (3, 7)


@pytest.mark.parametrize("qtype,start,end,message", [
    ("Q4_0", 16, 64, "multiples of its block size, 32"),
    ("Q8_0", 0, 40, "multiples of its block size, 32"),
    ("Q4_K", 0, 128, "multiples of its block size, 256"),
    ("Q6_K", 256, 300, "multiples of its block size, 256"),
    ("Q4_1", 0, 2 * COLS, "not a non-empty range"),
    ("Q4_1", 64, 64, "not a non-empty range"),
    (I8_ROW, -1, 4, "not a non-empty range"),
])
def test_misaligned_or_outside_column_ranges_are_refused(qtype, start, end, message):
    with pytest.raises(ValueError, match=message):
        column_bytes(qtype, COLS, start, end)
    with pytest.raises(ValueError, match=message):
        take_columns(random_matrix(qtype), qtype, COLS, start, end)


def test_take_columns_refuses_a_matrix_of_other_columns():
    with pytest.raises(ValueError, match="a Q4_0 matrix of 256 columns has 144 bytes a row, not 288"):
        take_columns(random_matrix("Q4_0"), "Q4_0", 256, 0, 32)


def test_join_columns_refuses_i8_row_parts_of_different_scales():
    codes = torch.zeros(ROWS, 8, dtype=torch.int8)
    with pytest.raises(ValueError, match="must share each row's scale"):
        join_columns([encode_i8_row(codes, torch.ones(ROWS)), encode_i8_row(codes, torch.full((ROWS,), 2.0))], I8_ROW)


def test_row_bytes_and_logical_cols():
    for qtype in GGUF_TYPES:
        elems, nbytes = TYPES[qtype]
        assert row_bytes(qtype, COLS) == COLS // elems * nbytes
        assert logical_cols(qtype, row_bytes(qtype, COLS)) == COLS
    assert row_bytes(I8_ROW, 100) == 104 and logical_cols(I8_ROW, 104) == 100
    with pytest.raises(ValueError, match="cols=300 is not a positive multiple of the block size, 256"):
        row_bytes("Q4_K", 300)
    with pytest.raises(ValueError, match="row_bytes=211 is not a positive multiple of 210"):
        logical_cols("Q6_K", 211)
    with pytest.raises(ValueError, match="holds no codes"):
        logical_cols(I8_ROW, 4)
    with pytest.raises(ValueError, match="unknown quantized type 'Q2_K'"):
        row_bytes("Q2_K", 256)
    with pytest.raises(ValueError, match="2-d torch.uint8 tensor"):
        dequantize(torch.zeros(4, 18), "Q4_0")


def test_bits_per_weight():
    want = {"Q4_0": 4.5, "Q4_1": 5.0, "Q5_0": 5.5, "Q5_1": 6.0, "Q8_0": 8.5, "Q4_K": 4.5, "Q5_K": 5.5, "Q6_K": 6.5625}
    assert {qtype: bits_per_weight(qtype, COLS) for qtype in GGUF_TYPES} == want
    assert bits_per_weight(I8_ROW, COLS) == 8 + 32 / COLS


def random_q4_1_parts(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (ROWS, COLS), dtype=torch.int32, generator=generator)
    scales = (torch.rand(ROWS, COLS // 32, generator=generator) * 0.01).half().float()
    mins = (torch.randn(ROWS, COLS // 32, generator=generator) * 0.05).half().float()
    return codes, scales, mins


def test_encode_q4_1_round_trips_through_ours_and_gguf():
    codes, scales, mins = random_q4_1_parts()
    want = codes * scales.repeat_interleave(32, dim=1) + mins.repeat_interleave(32, dim=1)
    raw = encode_q4_1(codes, scales, mins)
    assert raw.dtype == torch.uint8 and raw.shape == (ROWS, row_bytes("Q4_1", COLS))
    assert torch.equal(dequantize(raw, "Q4_1"), want)
    assert torch.equal(torch.from_numpy(gguf_dequantize(raw.numpy(), GGMLQuantizationType.Q4_1)), want)
    for got, expected in zip(int4_parts(raw, "Q4_1"), (codes, scales, mins)):
        assert torch.equal(got, expected)


def test_encode_q4_1_rebuilds_gguf_quantized_bytes():
    weights = torch.randn(ROWS, COLS, generator=torch.Generator().manual_seed(0)).numpy()
    raw = torch.from_numpy(gguf_quantize(weights, GGMLQuantizationType.Q4_1))
    assert torch.equal(encode_q4_1(*int4_parts(raw, "Q4_1")), raw)


def test_encode_q4_1_refuses_what_it_cannot_store():
    codes, scales, mins = random_q4_1_parts()
    with pytest.raises(ValueError, match="scales as fp16 and these are not all fp16 values"):
        encode_q4_1(codes, scales + 1e-6, mins)
    with pytest.raises(ValueError, match="must lie in 0..15"):
        encode_q4_1(codes + 1, scales, mins)
    with pytest.raises(ValueError, match=r"takes scales and mins of shape \(4, 16\)"):
        encode_q4_1(codes, scales[:, 1:], mins)
    with pytest.raises(ValueError, match="not a positive multiple of the block size, 32"):
        encode_q4_1(codes[:, :48], scales[:, :1], mins[:, :1])


def test_the_runtime_module_does_not_import_gguf():
    tree = ast.parse(inspect.getsource(blocks))
    imported = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    imported += [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert imported and not [name for name in imported if name.split(".")[0] == "gguf"]
