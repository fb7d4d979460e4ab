"""Our CPU kernels (llama/csrc/quantized_gemv.cpp) against independent references: int8 against
the dequantized weights in float64, int4 against what llama.cpp computes for a Q4_1 weight times a
Q8_0-quantized activation (both formats made by the `gguf` package), and the fallback to
PyTorch's kernels where ours cannot run."""

import shutil

import numpy as np
import pytest
import torch
from gguf.quants import GGMLQuantizationType, dequantize, quantize

from llama import cpu_kernels
from llama.quantize import Int4Product, Int8Product, describe, int4_codes

CAN_RUN = (all(flag in cpu_kernels._cpu_flags() for flag in cpu_kernels.NEEDED_CPU_FLAGS)
           and shutil.which("c++") is not None)
pytestmark = pytest.mark.skipif(not CAN_RUN, reason="this CPU lacks AVX-512 VNNI or no C++ compiler is installed")

ROWS = [1, 2, 3, 4, 5, 9]  # every path of the kernels: one row, the 2- and 3-row tails, blocks of 4


def gguf_round_trip(values: torch.Tensor, kind: GGMLQuantizationType) -> torch.Tensor:
    data = values.double().numpy().astype(np.float32)
    return torch.from_numpy(dequantize(quantize(data, kind), kind).astype(np.float32)).reshape(values.shape)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


def test_the_kernels_build_and_load_on_this_machine():
    assert cpu_kernels.load() is None
    assert "our kernels" in describe("int8", 32)
    assert "our kernels (int8 activations)" in describe("int4", 32)


@pytest.mark.parametrize("rows", ROWS)
def test_int8_product_equals_the_dequantized_weights(rows):
    torch.manual_seed(rows)
    weight = torch.randn(160, 576) * 0.05  # 10 blocks of 16 rows: both threads get some
    product = Int8Product(weight)
    assert product.ours
    dequantized = product.codes().double() * product.row_scales().double()[:, None]
    x = torch.randn(rows, 576)
    assert relative_error(product(x), x.double() @ dequantized.t()) < 1e-6


@pytest.mark.parametrize("rows", ROWS)
def test_int4_product_is_q4_1_weights_times_q8_0_activations(rows):
    """llama.cpp's 4-bit dot product: the activation is rounded to int8 by groups of 32, each with
    scale max|a| / 127 (Q8_0; llama.cpp stores that scale in fp16, we keep fp32)."""
    torch.manual_seed(rows)
    weight = gguf_round_trip(torch.randn(160, 576) * 0.05, GGMLQuantizationType.Q4_1)
    product = Int4Product(weight, 32)
    assert product.ours
    torch.testing.assert_close(product.dequantized(), weight, rtol=2.0 ** -10, atol=1e-7)  # fp16 of d and m
    x = torch.randn(rows, 576)
    want = gguf_round_trip(x, GGMLQuantizationType.Q8_0).double() @ weight.double().t()
    got = product(x)
    assert relative_error(got, want) < 1e-3  # llama.cpp keeps the activation scales in fp16
    assert relative_error(got, x.double() @ weight.double().t()) > 1e-3  # the activations were rounded


@pytest.mark.parametrize("group", [32, 64, 128, 256])
def test_int4_layout_holds_each_groups_codes_scale_and_min(group):
    torch.manual_seed(group)
    weight = torch.randn(48, 512)
    codes, scales, mins = int4_codes(weight, group)
    want = (codes.float().reshape(48, -1, group) * scales.half().float()[..., None]
            + mins.half().float()[..., None]).reshape(48, 512)
    product = Int4Product(weight, group)
    assert product.ours and torch.equal(product.dequantized(), want)
    x = torch.randn(2, 512)
    assert relative_error(product(x), x.double() @ want.double().t()) < 3e-2


def test_an_int8_layer_whose_rows_are_not_whole_blocks_uses_pytorchs_kernel():
    weight = torch.randn(24, 64)  # (PyTorch's int4 kernel also needs whole blocks of 16 rows)
    product = Int8Product(weight)
    assert not product.ours
    x = torch.randn(1, 64)
    assert relative_error(product(x), x @ weight.t()) < 0.02


@pytest.fixture
def without_our_kernels(monkeypatch):
    monkeypatch.setenv("LLAMA_CPU_KERNELS", "0")
    cpu_kernels.load.cache_clear()
    yield
    monkeypatch.undo()
    cpu_kernels.load.cache_clear()


def test_turned_off_pytorchs_kernels_give_close_products(without_our_kernels):
    assert cpu_kernels.load() == "LLAMA_CPU_KERNELS=0"
    assert describe("int4", 32) == ("int4, group 32, output int8, PyTorch's kernels "
                                    "(bf16 activations; ours: LLAMA_CPU_KERNELS=0)")
    torch.manual_seed(0)
    weight, x = torch.randn(64, 128) * 0.05, torch.randn(3, 128)
    for product, bound in ((Int8Product(weight), 0.02), (Int4Product(weight, 32), 0.2)):
        assert not product.ours
        assert relative_error(product(x), x @ weight.t()) < bound


@pytest.mark.parametrize("compiler", ["false", "/nonexistent/c++"])  # always fails; is not there
def test_a_failed_build_is_reported_and_falls_back(without_our_kernels, monkeypatch, tmp_path, compiler):
    monkeypatch.setenv("LLAMA_CPU_KERNELS", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CXX", compiler)
    cpu_kernels.load.cache_clear()
    reason = cpu_kernels.load()
    assert reason is not None and reason.startswith("building our kernels failed")
    assert not Int8Product(torch.randn(32, 64)).ours
    assert not list((tmp_path / "llama-runner" / "kernels").glob("*.so"))


@pytest.mark.parametrize("batch,heads,kv_heads,dim,length", [(1, 9, 3, 64, 150), (3, 8, 2, 128, 77), (2, 4, 4, 64, 5),
                                                             (1, 4, 1, 64, 1)])
def test_decode_attention_equals_pytorchs(batch, heads, kv_heads, dim, length):
    """One new position per sequence, each at its own place in a larger cache (strided views)."""
    torch.manual_seed(length)
    q = torch.randn(batch, 1, heads, dim).transpose(1, 2)
    cache_k, cache_v = torch.randn(4, kv_heads, 256, dim), torch.randn(4, kv_heads, 256, dim)
    keys, values = cache_k[:batch, :, :length], cache_v[:batch, :, :length]
    positions = torch.randint(0, length, (batch,))
    positions[0] = length - 1
    mask = (torch.arange(length) <= positions[:, None]).view(batch, 1, 1, length)
    want = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                                            enable_gqa=heads != kv_heads)
    torch.testing.assert_close(torch.ops.llama_cpu.decode_attention(q, keys, values, mask), want,
                               rtol=1e-5, atol=1e-5)


def test_a_compiled_fp32_cpu_model_attends_with_our_kernel(llama31_ckpts):
    from llama import Llama

    generator = Llama.build(str(llama31_ckpts[1]), str(llama31_ckpts[1] / "tokenizer.model"), max_seq_len=32,
                            max_batch_size=1, device="cpu", dtype="fp32", compile=True)
    assert all(layer.attention.decode_kernel for layer in generator.model.layers)


def test_a_damaged_library_in_the_cache_is_reported_and_falls_back(without_our_kernels, monkeypatch, tmp_path):
    monkeypatch.setenv("LLAMA_CPU_KERNELS", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CXX", "c++")
    library = cpu_kernels.library_path("c++")
    library.parent.mkdir(parents=True)
    library.write_bytes(b"not a shared library")
    cpu_kernels.load.cache_clear()
    reason = cpu_kernels.load()
    assert reason is not None and reason.startswith(f"loading {library} failed")
    assert not Int4Product(torch.randn(32, 64), 32).ours
