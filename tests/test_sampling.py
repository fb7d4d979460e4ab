"""The sampler: Meta's sample_top_p name, signature and draws, top_p=0, the global RNG, and
nucleus (top-p) and top-k statistics with a fixed seed."""

import inspect

import pytest
import torch

from llama import Llama
from llama.generation import sample_top_p as from_generation
from llama.sampling import check_sampling, nucleus_sample, sample_next, sample_top_p

from .meta_source import meta_function

PROBS = torch.tensor([0.05, 0.4, 0.02, 0.25, 0.15, 0.1, 0.03])  # sorted: 0.4, 0.25, 0.15, 0.1, ...


@pytest.fixture(scope="module")
def meta_sample_top_p():
    return meta_function("llama3/generation.py", "sample_top_p", {"torch": torch})


def draw(fn, n=20000):
    gen = torch.Generator().manual_seed(0)
    return torch.cat([fn(gen) for _ in range(n // 1000)])


def test_sample_top_p_has_metas_name_signature_and_shape(meta_sample_top_p):
    assert from_generation is sample_top_p
    assert list(inspect.signature(sample_top_p).parameters) == list(inspect.signature(meta_sample_top_p).parameters)
    out = sample_top_p(PROBS.expand(3, -1).clone(), 0.9)
    assert out.shape == (3, 1) and out.dtype == torch.long


@pytest.mark.parametrize("p", [0.0, 0.5, 0.9, 1.0])
def test_sample_top_p_draws_what_metas_draws_from_the_global_rng(meta_sample_top_p, p):
    probs = torch.softmax(torch.randn(6, 1000, generator=torch.Generator().manual_seed(1)) * 3, dim=-1)
    torch.manual_seed(123)
    metas = meta_sample_top_p(probs.clone(), p)
    torch.manual_seed(123)
    ours = sample_top_p(probs.clone(), p)
    assert torch.equal(ours, metas)


def test_sample_next_is_metas_reference_step(meta_sample_top_p):
    """Meta's loop: probs = softmax(logits / temperature); sample_top_p(probs, top_p).reshape(-1)."""
    logits = torch.randn(4, 2000, generator=torch.Generator().manual_seed(2)) * 4
    for seed in range(5):
        torch.manual_seed(seed)
        metas = meta_sample_top_p(torch.softmax(logits / 0.6, dim=-1), 0.9).reshape(-1)
        torch.manual_seed(seed)
        assert torch.equal(sample_next(logits, 0.6, 0.9, None), metas)


def test_top_p_zero_is_greedy_and_accepted():
    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(3)) * 2
    check_sampling(0.6, 0, None)
    for _ in range(20):
        assert torch.equal(sample_next(logits, 1.5, 0.0, None), torch.argmax(logits, dim=-1))
    with pytest.raises(ValueError, match="top_p must be in"):
        check_sampling(0.6, 1.1, None)
    with pytest.raises(ValueError, match="top_p must be in"):
        check_sampling(0.6, -0.1, None)


def test_top_p_zero_generates_the_greedy_tokens(llama31_ckpts):
    ckpt = llama31_ckpts[1]
    generator = Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=32, max_batch_size=2)
    prompts = ["The quick brown fox", "Hello"]
    greedy = generator.text_completion(prompts, temperature=0, max_gen_len=8)
    assert generator.text_completion(prompts, temperature=0.8, top_p=0, max_gen_len=8) == greedy


def test_manual_seed_after_build_decides_the_samples(llama31_ckpts):
    """As in Meta's code, sampling uses torch's global generator: reseeding it after build repeats
    the samples, another seed changes them."""
    ckpt = llama31_ckpts[1]
    generator = Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=32, max_batch_size=2, seed=5)
    prompts = ["The quick brown fox", "Hello"]
    kwargs = dict(temperature=1.0, top_p=1.0, max_gen_len=10)
    first = generator.text_completion(prompts, **kwargs)
    torch.manual_seed(5)
    assert generator.text_completion(prompts, **kwargs) == first  # build(seed=5) seeded it with 5
    torch.manual_seed(6)
    assert generator.text_completion(prompts, **kwargs) != first


def test_top_p_never_samples_outside_the_nucleus_and_keeps_its_proportions():
    # p = 0.7: 0.4 + 0.25 = 0.65 < 0.7, so the nucleus is {1, 3, 4} (mass 0.8).
    samples = draw(lambda g: nucleus_sample(PROBS.expand(1000, -1), 0.7, g).reshape(-1))
    assert set(samples.tolist()) == {1, 3, 4}
    freq = torch.bincount(samples, minlength=len(PROBS)).float() / len(samples)
    expected = torch.tensor([0, 0.4, 0, 0.25, 0.15, 0, 0]) / 0.8
    assert torch.allclose(freq, expected, atol=0.015)


def test_top_p_one_keeps_every_token_and_tiny_p_is_greedy():
    every = draw(lambda g: nucleus_sample(PROBS.expand(1000, -1), 1.0, g).reshape(-1))
    freq = torch.bincount(every, minlength=len(PROBS)).float() / len(every)
    assert torch.allclose(freq, PROBS, atol=0.015)
    assert set(draw(lambda g: nucleus_sample(PROBS.expand(1000, -1), 1e-6, g).reshape(-1), 2000).tolist()) == {1}


def test_a_generator_passed_in_leaves_the_global_rng_alone():
    logits = PROBS.log().expand(8, -1)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    sample_next(logits, 1.0, 0.9, None, torch.Generator().manual_seed(1))
    assert torch.equal(torch.get_rng_state(), state)


def test_top_k_keeps_the_k_most_likely():
    logits = PROBS.log().expand(1000, -1)
    samples = draw(lambda g: sample_next(logits, 1.0, 1.0, 2, g))
    assert set(samples.tolist()) == {1, 3}
    share = (samples == 1).float().mean().item()
    assert abs(share - 0.4 / 0.65) < 0.015


def test_temperature_zero_is_argmax_and_temperature_sharpens():
    logits = PROBS.log().expand(1000, -1)
    assert set(sample_next(logits, 0, 0.9, None).tolist()) == {1}
    cold = draw(lambda g: sample_next(logits, 0.5, 1.0, None, g))
    assert (cold == 1).float().mean().item() > 0.55  # 0.4 at temperature 1


def test_default_prefill_samples_as_metas_loop_only_for_the_shortest_prompts(llama31_sharp_ckpt):
    """What the README says of prefill="together" against Meta's loop (prefill="reference", which
    tests/ compares with llama-models): with the same seed, prompts of the shortest length in the
    batch get the same samples; a longer prompt's first token comes from a later draw in Meta's
    loop (it draws for every row at every position and drops the draws of rows still reading their
    prompt), so its samples differ. On the sharp model (conftest.SHARP_OUTPUT): the two loops'
    logits differ in the last bits (other product shapes), which must not move a draw."""
    ckpt = llama31_sharp_ckpt
    together, reference = (Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=48, max_batch_size=3,
                                       prefill=prefill) for prefill in ("together", "reference"))
    kwargs = dict(max_gen_len=12, temperature=0.6, top_p=0.9)

    def both(prompts):
        torch.manual_seed(11)
        ours, _ = together.generate(prompts, **kwargs)
        torch.manual_seed(11)
        metas, _ = reference.generate(prompts, **kwargs)
        assert all(len(t) == 12 for t in ours + metas)  # random weights: no stop token this early
        return ours, metas

    same_length = [[128000, 791, 4062, 14198], [128000, 9906, 1917, 13], [128000, 12805, 5304, 264]]
    ours, metas = both(same_length)
    assert ours == metas
    ragged = [same_length[0], same_length[1] + [1205, 374, 264], same_length[2][:2]]
    ours, metas = both(ragged)
    assert ours[2] == metas[2]  # the shortest prompt
    assert ours[0] != metas[0] and ours[1] != metas[1]
