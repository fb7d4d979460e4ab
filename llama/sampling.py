"""Choosing the next token from logits: greedy, temperature, top-k, top-p (nucleus)."""

from typing import Optional

import torch


def check_sampling(temperature: float, top_p: float, top_k: Optional[int]) -> None:
    """Raises ValueError for settings that have no meaning, before any work starts."""
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature!r}")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 keeps every token), got {top_p!r}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0):
        raise ValueError(f"top_k must be None or an integer >= 0 (0 or None keeps every token), got {top_k!r}")


def sample_top_p(probs: torch.Tensor, p: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Samples from the smallest set of most likely tokens whose probability reaches p.
    probs: (batch, vocab), rows sum to 1. Returns (batch,) token ids."""
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(before > p, 0.0)  # the top token always survives
    sorted_probs = sorted_probs / sorted_probs.sum(dim=-1, keepdim=True)
    choice = torch.multinomial(sorted_probs, num_samples=1, generator=generator)
    return torch.gather(order, -1, choice).squeeze(-1)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, top_k: Optional[int],
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """logits: (batch, vocab) float. Returns (batch,) token ids."""
    if temperature == 0:
        return torch.argmax(logits, dim=-1)
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return sample_top_p(torch.softmax(logits, dim=-1), top_p, generator)
