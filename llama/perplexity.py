"""Perplexity of a model on a text: how well it predicts each next token."""

import math

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
    total, scored = 0.0, 0
    for start in range(0, len(tokens), window):
        chunk = tokens[start:start + window]
        if len(chunk) < 2:  # a lone last token has nothing to predict it from
            continue
        ids = torch.tensor([chunk], device=generator.device)
        logits = generator.model(ids, 0)[0, :-1]
        nll = -F.log_softmax(logits.float(), dim=-1).gather(-1, ids[0, 1:, None])
        total += float(nll.double().sum())
        scored += len(chunk) - 1
    if scored == 0:
        raise ValueError("the text must be at least 2 tokens long to score anything")
    return math.exp(total / scored)
