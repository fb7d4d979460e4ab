"""Our CPU kernels (llama/csrc/) against independent references, in every variant this CPU can
run (the others skip, naming the CPU flags they need): int8 and bf16 against the weights' exact
products in float64, int4 against what llama.cpp computes for a Q4_1 weight times a Q8_0-quantized
activation (both formats made by the `gguf` package), attention against PyTorch's
scaled_dot_product_attention; and the fallback to PyTorch's kernels where ours cannot run."""

import os
import platform
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf.quants import GGMLQuantizationType, dequantize, quantize

from llama import cpu_kernels
from llama.bf16 import Bf16Product
from llama.quantize import Int4Product, Int8Product, describe, int4_codes

X86 = platform.machine() in ("x86_64", "AMD64")
BASELINE = cpu_kernels.VARIANTS[-1]  # avx2: what every other variant must agree with
CAN_RUN = X86 and not cpu_kernels.missing_flags(BASELINE) and shutil.which("c++") is not None
pytestmark = pytest.mark.skipif(not CAN_RUN, reason="our kernels need an x86 CPU with AVX2, FMA and F16C "
                                                    "and a C++ compiler (c++); this machine lacks them")

ROWS = [1, 2, 3, 4, 5, 9]  # every path of the kernels: one row, the 2- and 3-row tails, blocks of 4


@pytest.fixture(params=cpu_kernels.VARIANTS, ids=lambda variant: variant.name)
def kernels(request):
    """The ops of one variant, built and loaded; skips where this CPU cannot run it."""
    variant = request.param
    missing = cpu_kernels.missing_flags(variant)
    if missing:
        pytest.skip(f"the {variant.name} variant needs CPU flags this CPU lacks: {', '.join(missing)}")
    assert cpu_kernels.load_variant(variant) is None
    return cpu_kernels.ops(variant)


def gguf_round_trip(values: torch.Tensor, kind: GGMLQuantizationType) -> torch.Tensor:
    data = values.double().numpy().astype(np.float32)
    return torch.from_numpy(dequantize(quantize(data, kind), kind).astype(np.float32)).reshape(values.shape)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


def test_the_best_variant_this_cpu_runs_is_chosen_and_named():
    assert cpu_kernels.load() is None
    best = next(variant for variant in cpu_kernels.VARIANTS if not cpu_kernels.missing_flags(variant))
    assert cpu_kernels.chosen() == best
    assert describe("int8", 32) == f"int8, our kernels ({best.name})"
    assert describe("int4", 32) == f"int4, group 32, output int8, our kernels ({best.name}), int8 activations"


@pytest.mark.parametrize("rows", ROWS)
def test_int8_product_equals_the_dequantized_weights(kernels, rows):
    torch.manual_seed(rows)
    weight = torch.randn(160, 576) * 0.05  # 10 blocks of 16 rows: both threads get some
    product = Int8Product(weight)
    assert product.ours
    dequantized = product.codes().double() * product.row_scales().double()[:, None]
    x = torch.randn(rows, 576)
    got = kernels.int8_gemv(x, product.weight, product.scales)
    assert relative_error(got, x.double() @ dequantized.t()) < 1e-6


@pytest.mark.parametrize("rows", ROWS)
def test_int4_product_is_q4_1_weights_times_q8_0_activations(kernels, rows):
    """llama.cpp's 4-bit dot product: the activation is rounded to int8 by groups of 32, each with
    scale max|a| / 127 (Q8_0; llama.cpp stores that scale in fp16, we keep fp32)."""
    torch.manual_seed(rows)
    weight = gguf_round_trip(torch.randn(160, 576) * 0.05, GGMLQuantizationType.Q4_1)
    product = Int4Product(weight, 32)
    assert product.ours
    torch.testing.assert_close(product.dequantized(), weight, rtol=2.0 ** -10, atol=1e-7)  # fp16 of d and m
    x = torch.randn(rows, 576)
    want = gguf_round_trip(x, GGMLQuantizationType.Q8_0).double() @ weight.double().t()
    got = kernels.int4_gemv(x, product.packed)
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
    cpu_kernels.load_variant.cache_clear()


def test_turned_off_pytorchs_kernels_give_close_products(without_our_kernels):
    assert cpu_kernels.load() == "LLAMA_CPU_KERNELS=0"
    assert describe("int4", 32) == ("int4, group 32, output int8, PyTorch's kernels "
                                    "(ours: LLAMA_CPU_KERNELS=0), bf16 activations")
    torch.manual_seed(0)
    weight, x = torch.randn(64, 128) * 0.05, torch.randn(3, 128)
    for product, bound in ((Int8Product(weight), 0.02), (Int4Product(weight, 32), 0.2)):
        assert not product.ours
        assert relative_error(product(x), x @ weight.t()) < bound


def _fresh_process(env: dict) -> str:
    """What a new process with `env` says of our kernels, and whether its products use them."""
    script = ("import torch; from llama import cpu_kernels; from llama.quantize import Int4Product, Int8Product; "
              "print(cpu_kernels.load()); print(Int8Product(torch.randn(32, 64)).ours, "
              "Int4Product(torch.randn(32, 64), 32).ours)")
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("compiler", ["false", "/nonexistent/c++"])  # always fails; is not there
def test_a_failed_build_is_reported_and_falls_back(tmp_path, compiler):
    said = _fresh_process({"LLAMA_CPU_KERNELS": "1", "XDG_CACHE_HOME": str(tmp_path), "CXX": compiler})
    assert said.startswith("avx") and "building our kernels failed" in said  # named by the variant tried
    assert said.endswith("False False\n")
    assert not list((tmp_path / "llama-runner" / "kernels").glob("*.so"))


@pytest.mark.parametrize("batch,heads,kv_heads,dim,length", [(1, 9, 3, 64, 150), (3, 8, 2, 128, 77), (2, 4, 4, 64, 5),
                                                             (1, 4, 1, 64, 1)])
def test_decode_attention_equals_pytorchs(kernels, batch, heads, kv_heads, dim, length):
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
    torch.testing.assert_close(kernels.decode_attention(q, keys, values, mask), want,
                               rtol=1e-5, atol=1e-5)


def test_a_compiled_fp32_cpu_model_attends_with_our_kernel(llama31_ckpts):
    from llama import Llama

    generator = Llama.build(str(llama31_ckpts[1]), str(llama31_ckpts[1] / "tokenizer.model"), max_seq_len=32,
                            max_batch_size=1, device="cpu", dtype="fp32", compile=True)
    assert all(layer.attention.decode_attention is not None for layer in generator.model.layers)


def test_a_damaged_library_in_the_cache_is_reported_and_falls_back(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    library = cpu_kernels.library_path("c++", BASELINE)
    library.parent.mkdir(parents=True)
    library.write_bytes(b"not a shared library")
    said = _fresh_process({"LLAMA_CPU_KERNELS": BASELINE.name, "XDG_CACHE_HOME": str(tmp_path), "CXX": "c++"})
    assert f"loading {library} failed" in said and said.endswith("False False\n")


@pytest.mark.parametrize("rows", ROWS + [16])
def test_bf16_product_equals_the_bf16_weights_in_float64(kernels, rows):
    torch.manual_seed(rows)
    weight = (torch.randn(131, 576) * 0.05).bfloat16()  # rows not a multiple of the 4 a task takes
    x = torch.randn(rows, 576)
    assert relative_error(kernels.bf16_gemv(x, weight), x.double() @ weight.double().t()) < 1e-6


@pytest.mark.parametrize("rows", [1, 3, 64])  # the kernel's rows, then prefill's widened slices
def test_a_bf16_layer_multiplies_in_fp32_and_returns_bf16(rows, monkeypatch):
    monkeypatch.setattr("llama.bf16.WIDEN_BYTES", 4 * 576 * 50)  # 50 rows a slice: 3 slices
    torch.manual_seed(rows)
    weight = (torch.randn(131, 576) * 0.05).bfloat16()
    product = Bf16Product(weight)
    assert product.kernel is not None and product.rows_at_once == 50
    x = torch.randn(2, rows, 576).bfloat16()
    got = product(x)
    assert got.dtype == torch.bfloat16 and got.shape == (2, rows, 131)
    want = (x.double() @ weight.double().t()).bfloat16()
    assert torch.equal(got, want) or relative_error(got, want) < 2 ** -8  # one bf16 rounding


def _products():
    """The products every variant must compute as the avx2 variant does (the attention is checked
    against PyTorch's only: the compiler vectorises its sums to each variant's width)."""
    torch.manual_seed(3)
    weight = gguf_round_trip(torch.randn(64, 256) * 0.05, GGMLQuantizationType.Q4_1)
    int4, int8 = Int4Product(weight, 32), Int8Product(weight)
    calls = {"int4": lambda ops, x: ops.int4_gemv(x, int4.packed),
             "int8": lambda ops, x: ops.int8_gemv(x, int8.weight, int8.scales),
             "bf16": lambda ops, x: ops.bf16_gemv(x, weight.bfloat16())}
    return [(name, call, torch.randn(rows, 256)) for name, call in calls.items() for rows in (1, 5)]


@pytest.mark.parametrize("variant", [v for v in cpu_kernels.VARIANTS if v != BASELINE], ids=lambda v: v.name)
def test_every_variant_returns_the_avx2_ones_results(variant):
    missing = cpu_kernels.missing_flags(variant)
    if missing:
        pytest.skip(f"the {variant.name} variant needs CPU flags this CPU lacks: {', '.join(missing)}")
    assert cpu_kernels.load_variant(variant) is None and cpu_kernels.load_variant(BASELINE) is None
    for name, call, x in _products():
        # Same layouts, same order of sums in every lane; -ffast-math leaves the compiler free to
        # contract a multiply and an add differently per variant, so last-bit differences may remain.
        torch.testing.assert_close(call(cpu_kernels.ops(variant), x), call(cpu_kernels.ops(BASELINE), x),
                                   rtol=1e-6, atol=1e-6, msg=name)


def test_the_variants_this_cpu_cannot_run_compile_here(tmp_path):
    """Their code is checked wherever the tests run (those it can run are built above)."""
    compiler = shutil.which("c++")
    for variant in filter(cpu_kernels.missing_flags, cpu_kernels.VARIANTS):
        assert cpu_kernels._build(compiler, variant, tmp_path / f"{variant.namespace}.so") is None, variant.name


def test_a_bf16_cpu_model_multiplies_through_bf16_products_close_to_fp32(llama31_ckpts, capsys):
    from llama import Llama

    ckpt = llama31_ckpts[1]
    built = {dtype: Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=32, max_batch_size=2,
                                device="cpu", dtype=dtype, compile=dtype == "bf16")
             for dtype in ("fp32", "bf16")}
    assert f"bfloat16, {cpu_kernels.describe()}, compiled decode step" in capsys.readouterr().out
    model = built["bf16"].model
    products = [m for m in model.modules() if isinstance(m, Bf16Product)]
    assert len(products) == 2 * 4 + 1 and all(p.kernel is not None for p in products)  # joined qkv, w13; wo, w2; output
    tokens = torch.tensor([[128000, 791, 4062, 14198, 13], [128000, 9906, 1917, 13, 264]])
    logits = {dtype: llama.model(tokens, 0).float() for dtype, llama in built.items()}  # prefill: widened slices
    assert relative_error(logits["bf16"], logits["fp32"]) < 0.03
    step = {dtype: llama.model(tokens[:, :1], 5, last_index=torch.zeros(2, dtype=torch.long)).float()
            for dtype, llama in built.items()}  # one compiled decode step: the kernel
    assert relative_error(step["bf16"], step["fp32"]) < 0.03


def test_a_variant_can_be_asked_for_by_name_and_a_wrong_name_is_refused():
    assert _fresh_process({"LLAMA_CPU_KERNELS": BASELINE.name}) == "None\nTrue True\n"
    said = _fresh_process({"LLAMA_CPU_KERNELS": "sse2"})
    assert "LLAMA_CPU_KERNELS=sse2 names no variant" in said and said.endswith("False False\n")
