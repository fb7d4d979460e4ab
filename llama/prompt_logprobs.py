"""The log-probabilities of prompt tokens (echo with logprobs), computed a bounded chunk of
positions at a time.

Every prompt position needs a row of logits over the whole vocabulary: projected at once, a batch
of 8 prompts of 2048 tokens with a 128k vocabulary makes 8.4 GB of fp32 logits, and their
log_softmax as much again. Projected CHUNK_BYTES at a time, the peak stays bounded whatever the
batch and the prompts. A row's log-softmax does not depend on the others', so the values are
those of the whole computation up to the last bits (a product over fewer rows may sum in another
order).
"""

from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

# Memory for one chunk's fp32 logits and their log_softmax together (plus, briefly, the logits in
# the model's dtype): 256 MiB is 261 positions of a 128k vocabulary, enough rows that projecting a
# chunk is a compute-bound matrix product rather than a pass over the output weights per few rows.
CHUNK_BYTES = 256 << 20

Top = List[Tuple[int, float]]


def chunk_positions(vocab_size: int) -> int:
    """How many positions one chunk projects: CHUNK_BYTES holds two fp32 rows of vocab_size each."""
    return max(1, CHUNK_BYTES // (8 * vocab_size))


def prompt_logprobs(logits: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, tokens: torch.Tensor,
                    rows: Sequence[int], lengths: Sequence[int], top_k: int, chunk: int,
                    ) -> Tuple[List[List[float]], Optional[List[List[Top]]]]:
    """The log-probability of each prompt token after the first, given those before it.

    logits: maps hidden states (n, dim) to float logits (n, vocab) (Transformer.logits).
    hidden: (batch, seq, dim) the last block's states of a prefill of tokens (batch, seq).
    rows, lengths: the batch rows to score and how many tokens of each are the prompt.
    top_k: also the top_k most likely (token, logprob) at each scored position, most likely
    first (0: none). chunk: how many positions to project at a time (chunk_positions).

    Returns, per row in rows, lengths[i] - 1 log-probabilities (of tokens 1 .. n-1), and when
    top_k > 0, as many lists of (token, logprob) (else None). The results are read back from the
    device once."""
    # Every scored (row, position), row by row: the flat order the results are split back by.
    where = [(row, position) for row, n in zip(rows, lengths) for position in range(n - 1)]
    if not where:
        return [[] for _ in rows], [[] for _ in rows] if top_k else None
    row_index, position_index = torch.tensor(where, dtype=torch.long, device=hidden.device).unbind(1)
    targets = tokens[row_index, position_index + 1]
    chosen, top_values, top_ids = [], [], []
    for start in range(0, len(where), chunk):
        part = slice(start, start + chunk)
        every = F.log_softmax(logits(hidden[row_index[part], position_index[part]]), dim=-1)  # (chunk, vocab)
        chosen.append(every.gather(-1, targets[part].unsqueeze(-1)).squeeze(-1))
        if top_k:
            values, ids = torch.topk(every, min(top_k, every.shape[-1]))
            top_values.append(values)
            top_ids.append(ids)
    scored = [n - 1 for n in lengths]
    top = None
    if top_k:
        pairs = [list(zip(i, v)) for i, v in zip(torch.cat(top_ids).tolist(), torch.cat(top_values).tolist())]
        top = _per_row(pairs, scored)
    return _per_row(torch.cat(chosen).tolist(), scored), top


def _per_row(flat: list, counts: List[int]) -> List[list]:
    """Splits the flat list back into consecutive lists of counts[i] items."""
    out, start = [], 0
    for n in counts:
        out.append(flat[start:start + n])
        start += n
    return out
