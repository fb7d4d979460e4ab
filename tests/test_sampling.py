"""The sampler on its own: nucleus (top-p) and top-k statistics with a fixed seed."""

import torch

from llama.sampling import sample_next, sample_top_p

PROBS = torch.tensor([0.05, 0.4, 0.02, 0.25, 0.15, 0.1, 0.03])  # sorted: 0.4, 0.25, 0.15, 0.1, ...


def draw(fn, n=20000):
    gen = torch.Generator().manual_seed(0)
    return torch.cat([fn(gen) for _ in range(n // 1000)])


def test_top_p_never_samples_outside_the_nucleus_and_keeps_its_proportions():
    # p = 0.7: 0.4 + 0.25 = 0.65 < 0.7, so the nucleus is {1, 3, 4} (mass 0.8).
    samples = draw(lambda g: sample_top_p(PROBS.expand(1000, -1), 0.7, g))
    assert set(samples.tolist()) == {1, 3, 4}
    freq = torch.bincount(samples, minlength=len(PROBS)).float() / len(samples)
    expected = torch.tensor([0, 0.4, 0, 0.25, 0.15, 0, 0]) / 0.8
    assert torch.allclose(freq, expected, atol=0.015)


def test_top_p_one_keeps_every_token_and_tiny_p_is_greedy():
    every = draw(lambda g: sample_top_p(PROBS.expand(1000, -1), 1.0, g))
    freq = torch.bincount(every, minlength=len(PROBS)).float() / len(every)
    assert torch.allclose(freq, PROBS, atol=0.015)
    assert set(draw(lambda g: sample_top_p(PROBS.expand(1000, -1), 1e-6, g), 2000).tolist()) == {1}


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
