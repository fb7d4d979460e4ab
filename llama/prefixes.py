"""Prefix reuse: a new request whose prompt begins as the tokens already in a KV-cache row (a
system prompt, the earlier turns of the same chat) starts from them rather than prefilling them
again. In the spirit of vLLM's automatic prefix caching, at the granularity of whole rows: the
cache's rows are the memory it has, so nothing more is allocated.

A free row keeps what its last request left in it (prompt and fed output) until a new request
needs the row. A new request goes on in the free row whose whole contents its prompt begins with
(the earlier turns of its chat), if there is one; otherwise it takes a free row inside the running
batch (the least recently freed of them), or else the lowest free row, evicting what that held,
and the longest prefix its prompt shares with any row, free or running, is copied there first.
Rows are chosen low so that the decode step stays narrow: it runs every row up to the last one
in use, so a request alone in row 7 would cost eight rows a step (and change its logits' last
bits from a run in row 0).
"""

from typing import Dict, List, Optional, Sequence, Tuple


def shared_length(held: Sequence[int], prompt: Sequence[int]) -> int:
    """How many first tokens the two have in common."""
    n = 0
    for a, b in zip(held, prompt):
        if a != b:
            break
        n += 1
    return n


class PrefixCache:
    def __init__(self, rows: int):
        self._held: List[Optional[List[int]]] = [None] * rows  # a free row's tokens, in its cache
        self._freed_at = [0] * rows
        self._clock = 0
        self.prompt_tokens = 0  # of the requests placed
        self.reused_tokens = 0  # of those, found in the cache

    def free(self, row: int, tokens: List[int]) -> None:
        """The row's request left; `tokens` are those whose keys and values the row holds."""
        self._clock += 1
        self._held[row], self._freed_at[row] = tokens, self._clock

    def place(self, prompt: Sequence[int], free: Sequence[int], running: Dict[int, List[int]],
              reuse: bool = True) -> Tuple[int, int, Optional[int]]:
        """Chooses a row among `free` for the prompt. running: the tokens in the rows that hold
        requests (and those placed before it in the same admission). Returns (row, reused: how
        many first prompt tokens are already there, source: the row to copy them from first, or
        None). At least the last prompt token is left to prefill, for the logits of the first new
        token. reuse=False: a row only (evicting what it held)."""
        limit = len(prompt) - 1
        width = max(running, default=-1) + 1  # the rows the decode step runs now
        row = self._target(prompt[:limit] if reuse else (), free, width)
        best, source = 0, None
        if reuse:
            held = [(r, self._held[r]) for r in [row] + [r for r in free if r != row] if self._held[r]]
            for r, tokens in held + list(running.items()):  # the target first: no copy on a tie
                n = min(shared_length(tokens, prompt), limit)
                if n > best:
                    best, source = n, r
        self._held[row] = None
        self.prompt_tokens += len(prompt)
        self.reused_tokens += best
        return row, best, None if source == row else source

    def _target(self, prefix: Sequence[int], free: Sequence[int], width: int) -> int:
        """The free row whose whole contents the prompt goes on from (the earlier turns of its
        chat: nothing is lost by writing there), the longest such; else a free row inside the
        decode step's width, empty or least recently freed first; else the lowest free row."""
        extended = [r for r in free if self._held[r] and len(self._held[r]) <= len(prefix)
                    and shared_length(self._held[r], prefix) == len(self._held[r])]
        if extended:
            return max(extended, key=lambda r: len(self._held[r]))
        inside = [r for r in free if r < width]
        if inside:
            return min(inside, key=lambda r: (self._held[r] is not None, self._freed_at[r]))
        return min(free)
