"""Weight-only int8 (Llama.build(quantize="int8")): the stored weights and scales, the logits, model
parallel, and the quality cost on a real model: SmolLM2's perplexity on a fixed text."""

import math

import pytest
import torch

from llama import Llama
from llama.layers import ColumnParallel, RowParallel
from llama.perplexity import perplexity

from .conftest import REPO
from .convert_helpers import run_ranks

TEXT = (REPO / "benchmarks" / "data" / "perplexity_text.txt").read_text()
PROMPTS = ["The quick brown fox jumps over the lazy dog", "Once upon a time", "I believe the meaning of life is"]


def build(ckpt, quantize=None, max_seq_len=64, max_batch_size=len(PROMPTS)) -> Llama:
    tokenizer = ckpt / "tokenizer.json" if (ckpt / "tokenizer.json").exists() else ckpt / "tokenizer.model"
    return Llama.build(str(ckpt), str(tokenizer), max_seq_len=max_seq_len, max_batch_size=max_batch_size,
                       device="cpu", dtype="fp32", quantize=quantize)


def parallel_linears(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, (ColumnParallel, RowParallel))}


@pytest.fixture(scope="module")
def tiny(llama31_ckpts):
    """The tiny Llama 3.1 checkpoint built as fp32 and as int8."""
    return build(llama31_ckpts[1]), build(llama31_ckpts[1], "int8")


def test_int8_weights_are_within_half_a_step_of_fp32(tiny):
    fp32, int8 = tiny
    originals, quantized = parallel_linears(fp32.model), parallel_linears(int8.model)
    assert len(quantized) == 7 * fp32.model.params.n_layers + 1  # q k v o, w1 w2 w3, and the output
    for name, layer in quantized.items():
        weight = originals[name].weight.float()
        scale = layer.weight_scale.float()
        assert layer.weight.dtype == torch.int8 and layer.weight.shape == weight.shape, name
        # One scale per output row, spanning that row's largest magnitude with 127 steps.
        assert scale.shape == (weight.shape[0],), name
        torch.testing.assert_close(scale, weight.abs().amax(dim=1) / 127, msg=name)
        error = (layer.weight.float() * scale[:, None] - weight).abs()
        assert (error <= scale[:, None] / 2 * (1 + 1e-5)).all(), name


def test_int8_logits_stay_close_to_fp32(tiny):
    fp32, int8 = tiny
    tokens = torch.tensor([fp32.tokenizer.encode(PROMPTS[0], bos=True, eos=False)])
    want, got = fp32.model(tokens, 0), int8.model(tokens, 0)
    # Correct int8 is about 0.013 off here; a scale on the wrong rows or axis is 0.2 or more.
    assert float((got - want).norm() / want.norm()) < 0.05
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_int8_on_two_ranks_matches_one_rank(llama31_ckpts, tiny, tmp_path):
    _, int8 = tiny
    prompts = [int8.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS]
    expected, _ = int8.generate(prompts, max_gen_len=12, temperature=0)
    ckpt = llama31_ckpts[2]
    job = {"ckpt_dir": str(ckpt), "tokenizer": str(ckpt / "tokenizer.model"), "max_seq_len": 64,
           "max_batch_size": len(prompts), "mode": "generate", "tokens": prompts, "max_gen_len": 12,
           "quantize": "int8"}
    (got,) = run_ranks(2, [job], tmp_path)
    assert got == expected
    assert all(len(t) == 12 for t in expected)  # no early stop: every step is compared


def test_perplexity_scores_each_window_from_a_fresh_start(tiny):
    fp32, _ = tiny
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
        perplexity(tiny[0], "Hello world", window)


def test_int8_perplexity_of_smollm2_is_within_2_percent_of_fp32(smollm2_ckpt):
    # The benchmark's setting: the whole text (about 2300 tokens) in 5 windows, seconds per model.
    window = 512
    fp32 = perplexity(build(smollm2_ckpt, max_seq_len=window, max_batch_size=1), TEXT, window)
    int8 = perplexity(build(smollm2_ckpt, "int8", max_seq_len=window, max_batch_size=1), TEXT, window)
    assert fp32 < 50  # the model reads the text well (about 30), so the comparison means something
    assert int8 <= 1.02 * fp32, f"int8 perplexity {int8:.3f} is more than 2% above fp32's {fp32:.3f}"
