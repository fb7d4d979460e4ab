"""Weight-only int8 and int4 (Llama.build(quantize=...)): the stored weights against the fp32 ones
and against GGUF's own Q4_1 values, the logits on 1 and 2 ranks, eager against compiled, the rank
counts refused, and the quality cost on a real model: SmolLM2's perplexity on a fixed text."""

import math

import pytest
import torch

from llama import Llama
from llama.layers import ColumnParallel, RowParallel
from llama.perplexity import perplexity
from llama.args import load_params
from llama.quantize import Int4Product, Int8Product, check_quantize

from .conftest import REPO
from .convert_helpers import run_ranks

TEXT = (REPO / "benchmarks" / "data" / "perplexity_text.txt").read_text()
PROMPTS = ["The quick brown fox jumps over the lazy dog", "Once upon a time", "I believe the meaning of life is"]
BF16_ROUNDING = 2.0 ** -8  # bf16 keeps 8 significant bits: rounding moves a value by at most this share


def build(ckpt, quantize=None, max_seq_len=64, max_batch_size=len(PROMPTS), **levers) -> Llama:
    tokenizer = ckpt / "tokenizer.json" if (ckpt / "tokenizer.json").exists() else ckpt / "tokenizer.model"
    return Llama.build(str(ckpt), str(tokenizer), max_seq_len=max_seq_len, max_batch_size=max_batch_size,
                       device="cpu", dtype="fp32", quantize=quantize, **levers)


def parallel_linears(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, (ColumnParallel, RowParallel))}


def quantized_products(model):
    """Each parallel linear layer's quantized product, which has taken its float weight's place
    (q/k/v one layer, w1/w3 one layer: one product each)."""
    products = {}
    for name, layer in parallel_linears(model).items():
        assert layer.weight is None and layer.product is not None, name
        products[name] = layer.product
    return products


@pytest.fixture(scope="module")
def tiny(llama31_ckpts):
    """The tiny Llama 3.1 checkpoint built as fp32, int8 and int4 (groups of 32)."""
    return {q: build(llama31_ckpts[1], q) for q in (None, "int8", "int4")}


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def test_int8_weights_are_within_half_a_step_of_fp32(tiny):
    originals, quantized = parallel_linears(tiny[None].model), quantized_products(tiny["int8"].model)
    assert len(quantized) == 4 * tiny[None].model.params.n_layers + 1  # qkv o, w13 w2, and the output
    for name, product in quantized.items():
        weight = originals[name].weight
        assert isinstance(product, Int8Product), name
        codes, scales = product.codes(), product.row_scales()
        assert codes.dtype == torch.int8 and codes.shape == weight.shape, name
        # One scale per output row, spanning that row's largest magnitude with 127 steps (kept in bf16).
        step = weight.abs().amax(dim=1) / 127
        torch.testing.assert_close(scales.float(), step, rtol=BF16_ROUNDING, atol=0, msg=name)
        assert ((codes.float() * step[:, None] - weight).abs() <= step[:, None] / 2 * (1 + 1e-5)).all(), name


def test_int4_weights_dequantize_to_the_q4_1_values_they_came_from(smollm2_ckpt):
    """SmolLM2's GGUF stores every block-layer weight as Q4_1: groups of 32 input features, each
    w = d * q + m with q in 0..15, which the converter expands to fp32 (through the `gguf` package).
    Groups of 32 recover those groups' own codes, so the int4 weights the kernel multiplies by are
    the file's values, up to the bf16 rounding of the scale d, of the zero and of the read-back."""
    fp32 = build(smollm2_ckpt, max_seq_len=8, max_batch_size=1)
    int4 = build(smollm2_ckpt, "int4", max_seq_len=8, max_batch_size=1)
    originals, quantized = parallel_linears(fp32.model), quantized_products(int4.model)
    checked = 0
    for name, product in quantized.items():
        if name == "output":  # int8 under int4 (and the file's is the embedding table, stored as Q8_0)
            assert isinstance(product, Int8Product)
            continue
        weight = originals[name].weight.detach()
        groups = weight.reshape(weight.shape[0], -1, 32)
        d = (groups.amax(-1) - groups.amin(-1)) / 15
        zero = groups.amin(-1) + 8 * d  # the kernel's zero: the value of the middle code, 8
        stored = ((8 * d + zero.abs()) * BF16_ROUNDING).repeat_interleave(32, dim=1)  # scale (x at most 8) and zero
        allowed = stored + (weight.abs() + stored) * BF16_ROUNDING  # then the kernel's bf16 output is rounded
        assert isinstance(product, Int4Product) and product.group == 32, name
        error = (product.dequantized() - weight).abs()
        assert (error <= allowed).all(), f"{name}: {float((error - allowed).max())} beyond bf16 rounding"
        checked += 1
    assert checked == 4 * fp32.model.params.n_layers  # all 210 Q4_1 tensors of the file, in 120 layers


@pytest.mark.parametrize("quantize,bound", [("int8", 0.05), ("int4", 0.2)])
def test_quantized_logits_stay_close_to_fp32(tiny, quantize, bound):
    tokens = torch.tensor([tiny[None].tokenizer.encode(PROMPTS[0], bos=True, eos=False)])
    want, got = tiny[None].model(tokens, 0), tiny[quantize].model(tokens, 0)
    # Random weights are harder on int4 than a trained model's; a scale or zero on the wrong group
    # or row is 0.5 or more off. (int4's argmax moves on near ties among 128k random logits.)
    assert relative_error(got, want) < bound
    if quantize == "int8":
        assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_compiled_int4_step_gives_the_eager_int4_logits(llama31_ckpts, tiny):
    eager, compiled = tiny["int4"], build(llama31_ckpts[1], "int4", compile=True)
    prompts = [eager.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS]
    want = eager.generate(prompts, max_gen_len=6, temperature=0, logprobs=True)
    got = compiled.generate(prompts, max_gen_len=6, temperature=0, logprobs=True)
    assert got[0] == want[0]
    for w, g in zip(want[1], got[1]):
        assert g == pytest.approx(w, abs=0.05)  # bf16 activations: sums in another order move the last bits


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantized_logits_on_two_ranks_stay_close_to_fp32_on_one(llama2_ckpts, tmp_path, quantize):
    """llama2's tiny shape splits into whole groups of 32 on 2 ranks (feed-forward 192 -> 96)."""
    fp32 = build(llama2_ckpts[1])
    tokens = [fp32.tokenizer.encode(PROMPTS[0], bos=True, eos=False)]
    want = fp32.model(torch.tensor(tokens), 0)
    job = {"ckpt_dir": str(llama2_ckpts[2]), "tokenizer": str(llama2_ckpts[2] / "tokenizer.model"),
           "max_seq_len": 64, "max_batch_size": 1, "mode": "logits", "tokens": tokens, "quantize": quantize}
    (got,) = run_ranks(2, [job], tmp_path)
    assert relative_error(got, want) < (0.05 if quantize == "int8" else 0.2)


def test_int4_refuses_a_rank_count_that_cuts_a_group(llama31_ckpts):
    """The tiny Llama 3.1 shape has 224 feed-forward features: 112 per rank on 2, not whole groups.
    (Checked before anything is loaded, the same on every rank, so one process shows it.)"""
    args = load_params(llama31_ckpts[2], max_seq_len=64, max_batch_size=1)
    with pytest.raises(ValueError, match=r"cannot run on 2 ranks.*rank counts that can: \[1\]"):
        check_quantize("int4", 32, args, 2, torch.device("cpu"))
    check_quantize("int4", 32, args, 1, torch.device("cpu"))


def test_int4_refuses_a_group_that_does_not_divide_the_model(llama31_ckpts):
    with pytest.raises(ValueError, match=r"quant_group=128 does not divide the model's dim=64"):
        build(llama31_ckpts[1], "int4", quant_group=128)


def test_perplexity_scores_each_window_from_a_fresh_start(tiny):
    fp32 = tiny[None]
    text = " ".join(PROMPTS)
    tokens = fp32.tokenizer.encode(text, bos=True, eos=False)
    window = 8
    windows = [tokens[i:i + window] for i in range(0, len(tokens), window)]
    # Each window's prompt logprobs, through generate's own path; a window's first token has none.
    _, logprobs = fp32.generate(windows, max_gen_len=0, logprobs=True, echo=True)
    scored = [lp for lps in logprobs for lp in lps[1:]]
    assert perplexity(fp32, text, window) == pytest.approx(math.exp(-sum(scored) / len(scored)), rel=1e-5)


@pytest.mark.parametrize("window", [1, 65, 0, 8.0])
def test_perplexity_refuses_a_bad_window(tiny, window):
    with pytest.raises(ValueError, match="window"):
        perplexity(tiny[None], "Hello world", window)


def test_quantized_perplexity_of_smollm2_stays_near_fp32(smollm2_ckpt):
    # The benchmark's windows, over the text's first half (about 1150 tokens, 3 windows: the whole
    # text is the benchmark's): fp32 28.0, int8 and int4 within 0.7% of it here.
    window = 512
    half = TEXT[:len(TEXT) // 2]
    scores = {q: perplexity(build(smollm2_ckpt, q, max_seq_len=window, max_batch_size=1), half, window)
              for q in (None, "int8", "int4")}
    fp32 = scores[None]
    assert fp32 < 50  # the model reads the text well (about 30), so the comparison means something
    assert scores["int8"] <= 1.02 * fp32, f"int8 perplexity {scores['int8']:.3f} is over 2% above fp32's {fp32:.3f}"
    assert scores["int4"] <= 1.03 * fp32, f"int4 perplexity {scores['int4']:.3f} is over 3% above fp32's {fp32:.3f}"


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_a_tied_embedding_reads_the_output_layers_int8_rows(llama32_ckpts, quantize):
    ckpt = llama32_ckpts[1]  # Llama 3.2: the output layer is the embedding table
    float_table = build(ckpt).model.tok_embeddings.weight
    model = build(ckpt, quantize).model
    table = model.tok_embeddings.table
    assert model.tok_embeddings.weight is None and table.product is model.output.product  # one copy held
    ids = torch.arange(float_table.shape[0])
    # Each row within half its int8 step of the float row (the step spans the row's largest magnitude);
    # PyTorch's kernels (ARM, LLAMA_CPU_KERNELS=0) keep the scales in bf16, which moves a value by
    # up to its bf16 rounding times the code more: the table reads the weights the output multiplies by.
    step = float_table.abs().amax(dim=1, keepdim=True) / 127
    scale_rounding = 0 if table.product.ours else (float_table.abs() + step / 2) * BF16_ROUNDING
    bound = step / 2 * (1 + 1e-5) + scale_rounding + 1e-7
    assert ((model.tok_embeddings(ids) - float_table).abs() <= bound).all()
    assert table(ids).dtype == float_table.dtype
