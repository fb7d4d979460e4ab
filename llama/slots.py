"""A request as the engine holds it in its KV-cache row: where its next token goes, how many it
may still add, what the row holds, and the events its tokens make."""

from typing import List, Optional, Tuple

import torch

from .constraints import Constraint
from .requests import Finish, Request, TokenEvent


class Slot:
    """A request in its cache row: where its next token goes, and how many it may still add."""

    def __init__(self, request: Request, prefilled: int, budget: int, device: torch.device, order: int,
                 in_chunks: bool = False):
        self.request = request
        self.params = request.params
        self.order = order  # when it was admitted: chunked prefills go oldest first
        self.position = prefilled  # where the next fed (or prefilled) token is written
        # prompt tokens still to feed, one per step (prefill="reference"), or to prefill in chunks
        self.forced = [] if in_chunks else list(request.prompt[prefilled:])
        self.prefilling = in_chunks
        self.cached = list(request.prompt[:prefilled])  # the tokens whose keys and values the row holds
        self.last: Optional[int] = None  # the newest token, fed at the next step
        self.budget = budget  # new tokens it may add
        self.generated = 0
        self.finished = False
        self.prompt_logprobs: Optional[List[float]] = None  # until handed out with the first event
        self.prompt_top_logprobs: Optional[List[Optional[List[Tuple[int, float]]]]] = None
        self.stop_tokens = frozenset(request.params.stop_tokens)
        seed = request.params.seed
        self.generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
        self.constraint: Optional[Constraint] = None  # the engine gives it one when params.constraint is set

    @property
    def constrained(self) -> bool:
        """Its next draw is a new token under a grammar (not a prompt token, not an idle held slot)."""
        return self.constraint is not None and not self.finished and not self.forced

    @property
    def sampling_group(self) -> tuple:
        """Slots with the same key are sampled in one call (a seeded one alone, on its generator)."""
        p = self.params
        return ("seed", id(self)) if p.seed is not None and p.temperature > 0 else (p.temperature, p.top_p, p.top_k)

    def feed_prompt(self, token: int, logprob: Optional[float],
                    top: Optional[List[Tuple[int, float]]]) -> Optional[TokenEvent]:
        """Takes its next prompt token (prefill="reference"); an event only if that ends it."""
        self.last = token
        if self.params.prompt_logprobs:
            self.prompt_logprobs.append(logprob)
            if self.prompt_top_logprobs is not None:
                self.prompt_top_logprobs.append(top)
        if not self.forced and self.budget == 0:  # the whole prompt seen, no room for a new token
            return self.end(Finish.LENGTH)
        return None

    def add(self, token: int, logprob: Optional[float], top: Optional[List[Tuple[int, float]]]) -> TokenEvent:
        """Takes a sampled token: the event of a new output token, or of its end."""
        if token in self.stop_tokens:  # ends the request; the stop token is not output
            return self.end(Finish.STOP_TOKEN)
        if self.constraint is not None and not self.constraint.advance(token):
            return self.end(Finish.ERROR, self.constraint.error)
        self.last = token
        self.generated += 1
        return self._event(token, logprob if self.params.logprobs else None, top,
                           Finish.LENGTH if self.generated == self.budget else None)

    def end(self, reason: str, error: Optional[str] = None) -> TokenEvent:
        """The event of its end without a new token."""
        event = self._event(None, finish_reason=reason)
        event.error = error
        return event

    def _event(self, token: Optional[int], logprob: Optional[float] = None,
               top: Optional[List[Tuple[int, float]]] = None, finish_reason: Optional[str] = None) -> TokenEvent:
        event = TokenEvent(self.request.id, token, logprob, top, finish_reason, self.prompt_logprobs,
                           self.prompt_top_logprobs)
        self.prompt_logprobs = self.prompt_top_logprobs = None  # handed out with the first event only
        return event
