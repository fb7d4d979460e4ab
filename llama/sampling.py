"""Choosing the next token from logits: greedy, temperature, top-k, top-p (nucleus).

The draws follow Meta's reference code step for step (softmax of logits / temperature, then
`sample_top_p`), and take their random numbers from torch's global generator unless one is
passed, so `torch.manual_seed` decides the samples as it does in Meta's code.
"""

from typing import Optional

import torch


def check_sampling(temperature: float, top_p: float, top_k: Optional[int]) -> None:
    """Raises ValueError for settings that have no meaning, before any work starts."""
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature!r}")
    if not isinstance(top_p, (int, float)) or isinstance(top_p, bool) or not 0 <= top_p <= 1:
        raise ValueError(f"top_p must be in [0, 1] (0 keeps only the most likely token, 1 keeps every token), "
                         f"got {top_p!r}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0):
        raise ValueError(f"top_k must be None or an integer >= 0 (0 or None keeps every token), got {top_k!r}")


def nucleus_sample(probs: torch.Tensor, p: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Samples from the smallest set of most likely tokens whose probability reaches p (p = 0
    keeps only the most likely one). probs: (batch, vocab), rows sum to 1. Returns (batch, 1)
    token ids. The same operations as Meta's sample_top_p, so the same random numbers give the
    same tokens; generator None means torch's global generator."""
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(before > p, 0.0)  # the top token always survives
    sorted_probs = sorted_probs / sorted_probs.sum(dim=-1, keepdim=True)
    choice = torch.multinomial(sorted_probs, num_samples=1, generator=generator)
    return torch.gather(order, -1, choice)


def sample_top_p(probs: torch.Tensor, p: float) -> torch.Tensor:
    """Meta's function under Meta's name and signature (llama/generation.py of Llama 2 and 3):
    top-p sampling from torch's global generator. probs: (batch, vocab). Returns (batch, 1)."""
    return nucleus_sample(probs, p)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, top_k: Optional[int],
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """logits: (batch, vocab) float. Returns (batch,) token ids. generator None: torch's global
    generator, as Meta's code samples; pass one to give a request its own seed."""
    if temperature == 0:
        return torch.argmax(logits, dim=-1)
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return nucleus_sample(torch.softmax(logits, dim=-1), top_p, generator).reshape(-1)
