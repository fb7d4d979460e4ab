"""Perplexity of a model on a text: how well it predicts each next token."""

import math
from typing import Callable, List

import torch
import torch.nn.functional as F


@torch.inference_mode()
def perplexity(generator, text: str, window: int) -> float:
    """exp(mean negative log-likelihood) of `text`'s tokens (encoded with bos=True), scored in
    consecutive non-overlapping windows of at most `window` tokens. Each window is a fresh forward
    from position 0, so its first token is only context and is not scored."""
    max_seq_len = generator.model.params.max_seq_len
    if not isinstance(window, int) or isinstance(window, bool) or not 2 <= window <= max_seq_len:
        raise ValueError(f"window must be an integer from 2 to max_seq_len={max_seq_len}, got {window!r}")
    tokens = generator.tokenizer.encode(text, bos=True, eos=False)

    def logits_of(chunk: List[int]) -> torch.Tensor:
        return generator.model(torch.tensor([chunk], device=generator.device), 0)[0]

    return windowed_perplexity(tokens, window, logits_of)


def windowed_perplexity(tokens: List[int], window: int, logits_of: Callable[[List[int]], torch.Tensor]) -> float:
    """The scoring above for any runner: logits_of(chunk) gives the (len(chunk), vocab) logits of a
    fresh forward over chunk (benchmarks/perplexity_gguf.py passes llama.cpp's)."""
    total, scored = 0.0, 0
    for start in range(0, len(tokens), window):
        chunk = tokens[start:start + window]
        if len(chunk) < 2:  # a lone last token has nothing to predict it from
            continue
        logits = logits_of(chunk)[:-1]
        ids = torch.tensor(chunk[1:], device=logits.device)
        nll = -F.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, None])
        total += float(nll.double().sum())
        scored += len(chunk) - 1
    if scored == 0:
        raise ValueError("the text must be at least 2 tokens long to score anything")
    return math.exp(total / scored)
