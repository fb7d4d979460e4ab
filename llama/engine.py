"""The decode engine: requests held in KV-cache slots, decoded together one token per step.

`admit` prefills new requests into free slots together (one forward over prompts of different
lengths, each written at its own cache row) and samples each one's first token; `step` feeds every
running request its newest token at its own position and samples the next; `release` frees a slot
at once. Requests come and go between steps, so the same engine runs Llama.generate's fixed batches
and a server's continuous batching.

A request's tokens do not depend on the other slots: every row attends only to its own cache row,
and a request with a seed samples from its own torch.Generator. Only up to the last bits, though:
the batch's shape decides how the products sum, so a request's logits can differ in the last bits
between batches, which can move a draw (or an argmax) between near-equal tokens (README, "What a
seed does and does not promise"). Requests without a seed and with the same settings are sampled
in one call on torch's global generator, in slot order, as Meta's loop samples a batch.

The engine adds no communication: under torchrun every rank calls admit/step/release in the same
order with the same arguments, and the model's collectives keep the ranks together.
"""

from dataclasses import dataclass
from typing import Dict, Hashable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .lockstep import fault_point
from .model import Transformer
from .sampling import check_sampling, sample_next


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. temperature 0 is greedy; top_k None or 0 is off."""

    temperature: float = 0.6
    top_p: float = 0.9
    top_k: Optional[int] = None
    seed: Optional[int] = None  # None: torch's global generator (Meta's behaviour)
    max_new_tokens: Optional[int] = None  # None: until the context (max_seq_len) is full
    logprobs: bool = False  # the log-probability of each new token
    top_logprobs: int = 0  # also the k most likely (token, logprob) at each new token
    prompt_logprobs: bool = False  # the prompt tokens' log-probabilities (echo), on the admit event
    stop_tokens: Tuple[int, ...] = ()  # tokens that end the request (tokenizer.stop_tokens)


@dataclass(frozen=True)
class Request:
    id: Hashable
    prompt: Sequence[int]
    params: SamplingParams = SamplingParams()


@dataclass
class TokenEvent:
    """What admit() and step() return for each request that moved on.

    token: the new token, part of the output; None when the request ended without one (a stop
        token, which is not output, or no room for any new token).
    logprob / top_logprobs: when asked for; log-probabilities under the raw (untempered) logits.
    finish_reason: None while the request goes on; "stop" (a stop token) or "length"
        (max_new_tokens or the context reached) when it ended with this event.
    prompt_logprobs: on the admit event of a request that asked for them: one per prompt token,
        0.0 for the first."""

    request_id: Hashable
    token: Optional[int]
    logprob: Optional[float] = None
    top_logprobs: Optional[List[Tuple[int, float]]] = None
    finish_reason: Optional[str] = None
    prompt_logprobs: Optional[List[float]] = None


class _Slot:
    """A request in its cache row: where its next token goes, and how many it may still add."""

    def __init__(self, request: Request, budget: int, device: torch.device):
        self.request = request
        self.position = len(request.prompt)  # where the next fed token is written
        self.last: Optional[int] = None  # the newest token, fed at the next step
        self.budget = budget  # new tokens it may add
        self.generated = 0
        self.finished = False
        self.stop_tokens = frozenset(request.params.stop_tokens)
        seed = request.params.seed
        self.generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)


class Engine:
    def __init__(self, model: Transformer, *, hold_finished: bool = False):
        """model: its KV cache (max_batch_size rows of max_seq_len) holds the slots. One engine per
        model at a time: slots are rows of the model's own cache.

        hold_finished: a finished request keeps its slot until release(), idle but still sampled
        with its group (the draws are dropped). Meta's loop samples every row of a batch until the
        whole batch ends; Llama.generate holds finished requests to draw the same random numbers.
        By default a finished request frees its slot at once."""
        self.model = model
        self.max_batch_size = model.params.max_batch_size
        self.max_seq_len = model.params.max_seq_len
        self.device = model.norm.weight.device
        self.hold_finished = hold_finished
        self._slots: List[Optional[_Slot]] = [None] * self.max_batch_size
        self._slot_of: Dict[Hashable, int] = {}

    @property
    def free_slots(self) -> int:
        return self.max_batch_size - len(self._slot_of)

    @property
    def active(self) -> int:
        """Requests still decoding (held finished ones not counted)."""
        return sum(1 for s in self._slots if s is not None and not s.finished)

    def __contains__(self, request_id: Hashable) -> bool:
        return request_id in self._slot_of

    @torch.inference_mode()
    def admit(self, requests: Sequence[Request]) -> List[TokenEvent]:
        """Prefills the requests together into the lowest free slots and samples each one's first
        token. Returns one event per request, in order."""
        self._check(requests)
        free = [i for i, s in enumerate(self._slots) if s is None][:len(requests)]
        lengths = [len(r.prompt) for r in requests]
        tokens = torch.zeros((len(requests), max(lengths)), dtype=torch.long)
        for row, r in enumerate(requests):
            tokens[row, :len(r.prompt)] = torch.tensor(list(r.prompt), dtype=torch.long)
        tokens = tokens.to(self.device)
        # The first rows in order need no row index (the cache is then read as a view).
        rows = None if free == list(range(len(free))) else torch.tensor(free, device=self.device)
        last_index = torch.tensor(lengths, device=self.device) - 1
        # Right padding writes keys past a prompt's end, which that row overwrites before reading.
        prompt_logprobs: List[Optional[List[float]]] = [None] * len(requests)
        if any(r.params.prompt_logprobs for r in requests):
            logits = self.model(tokens, 0, kv_len=max(lengths), rows=rows)
            all_logprobs = token_logprobs(logits[:, :-1], tokens[:, 1:]).tolist()
            for row, r in enumerate(requests):
                if r.params.prompt_logprobs:
                    prompt_logprobs[row] = [0.0] + all_logprobs[row][:lengths[row] - 1]
            last = logits[torch.arange(len(requests), device=self.device), last_index]
        else:
            last = self.model(tokens, 0, last_index=last_index, kv_len=max(lengths), rows=rows)

        for slot, r in zip(free, requests):
            room = self.max_seq_len - len(r.prompt)
            budget = room if r.params.max_new_tokens is None else min(r.params.max_new_tokens, room)
            self._slots[slot] = _Slot(r, budget, self.device)
            self._slot_of[r.id] = slot
        events = {}
        for slot, r in zip(free, requests):
            if self._slots[slot].budget == 0:  # prefilled (for prompt logprobs), nothing to add
                events[slot] = TokenEvent(r.id, None, finish_reason="length")
                self._finish(slot)
        kept = [row for row, slot in enumerate(free) if self._slots[slot] is not None]
        if any(not self._slots[free[row]].finished for row in kept):
            if len(kept) < len(free):
                last = last[torch.tensor(kept, dtype=torch.long, device=self.device)]
            events.update(self._sample([free[row] for row in kept], last))
        for slot, lps in zip(free, prompt_logprobs):
            events[slot].prompt_logprobs = lps
        return [events[slot] for slot in free]

    @torch.inference_mode()
    def step(self) -> List[TokenEvent]:
        """One decode step for every running request: feeds its newest token and samples the next.
        Returns one event per running request, in slot order."""
        fault_point("step")
        occupied = [i for i, s in enumerate(self._slots) if s is not None]
        if not any(not self._slots[i].finished for i in occupied):
            return []
        # Rows run from the first slot to the last occupied one (a view of the cache); free and
        # finished rows in between feed a placeholder at position 0, which no one reads.
        width = occupied[-1] + 1
        feed, positions = [0] * width, [0] * width
        for i in occupied:
            s = self._slots[i]
            if not s.finished:
                feed[i], positions[i] = s.last, s.position
                s.position += 1
        logits = self.model(torch.tensor(feed, device=self.device).unsqueeze(1), torch.tensor(positions),
                            last_index=torch.zeros(width, dtype=torch.long), kv_len=max(positions) + 1)
        if len(occupied) < width:
            logits = logits[torch.tensor(occupied, dtype=torch.long, device=self.device)]
        events = self._sample(occupied, logits)
        return [events[i] for i in occupied if i in events]

    def release(self, request_id: Hashable) -> bool:
        """Frees the request's slot now (finished, cancelled, or a stop string found above the
        engine). False when the engine does not hold it (it already finished and was freed)."""
        slot = self._slot_of.pop(request_id, None)
        if slot is None:
            return False
        self._slots[slot] = None
        return True

    def _check(self, requests: Sequence[Request]) -> None:
        if len(requests) == 0:
            raise ValueError("admit() needs at least one request")
        if len(requests) > self.free_slots:
            raise ValueError(f"{len(requests)} requests but only {self.free_slots} free slots of "
                             f"{self.max_batch_size}; admit at most free_slots at a time")
        ids = [r.id for r in requests]
        if len(set(ids)) < len(ids) or any(i in self._slot_of for i in ids):
            raise ValueError(f"request ids must be unique among running requests, got {ids}")
        vocab = self.model.params.vocab_size
        for r in requests:
            p = r.params
            if len(r.prompt) == 0 or len(r.prompt) > self.max_seq_len:
                raise ValueError(f"request {r.id!r}: the prompt must have 1 to max_seq_len={self.max_seq_len} "
                                 f"tokens, got {len(r.prompt)}")
            if min(r.prompt) < 0 or max(r.prompt) >= vocab:
                raise ValueError(f"request {r.id!r}: prompt holds token ids outside [0, {vocab})")
            check_sampling(p.temperature, p.top_p, p.top_k)
            if p.max_new_tokens is not None and (not isinstance(p.max_new_tokens, int) or p.max_new_tokens < 0):
                raise ValueError(f"request {r.id!r}: max_new_tokens must be None or an integer >= 0, "
                                 f"got {p.max_new_tokens!r}")
            if not isinstance(p.top_logprobs, int) or p.top_logprobs < 0:
                raise ValueError(f"request {r.id!r}: top_logprobs must be an integer >= 0, got {p.top_logprobs!r}")

    def _sample(self, slots: List[int], logits: torch.Tensor) -> Dict[int, TokenEvent]:
        """Samples a token for each of `slots` (logits row by row) and records it; returns the
        events of the slots still running. Unseeded slots with the same settings are sampled in
        one call, in slot order; a seeded one alone, from its own generator."""
        groups: Dict[tuple, List[int]] = {}
        for row, i in enumerate(slots):
            p = self._slots[i].request.params
            seeded = p.seed is not None and p.temperature > 0
            key = ("seed", i) if seeded else (p.temperature, p.top_p, p.top_k)
            groups.setdefault(key, []).append(row)
        chosen = torch.empty(len(slots), dtype=torch.long, device=logits.device)
        for rows in groups.values():
            s = self._slots[slots[rows[0]]]
            p = s.request.params
            if len(rows) == len(slots):
                chosen = sample_next(logits, p.temperature, p.top_p, p.top_k, s.generator)
            else:
                index = torch.tensor(rows, dtype=torch.long, device=logits.device)
                chosen[index] = sample_next(logits[index], p.temperature, p.top_p, p.top_k, s.generator)
        tokens = chosen.tolist()

        running = [row for row, i in enumerate(slots) if not self._slots[i].finished]
        want = [row for row in running if self._slots[slots[row]].request.params.logprobs
                or self._slots[slots[row]].request.params.top_logprobs]
        if want:
            index = torch.tensor(want, dtype=torch.long, device=logits.device)
            logprobs = F.log_softmax(logits[index].float(), dim=-1)
            chosen_logprobs = dict(zip(want, logprobs.gather(-1, chosen[index].unsqueeze(-1)).squeeze(-1).tolist()))
        events = {}
        for row in running:
            i = slots[row]
            s = self._slots[i]
            token = tokens[row]
            if token in s.stop_tokens:  # ends the request; the stop token is not output
                events[i] = TokenEvent(s.request.id, None, finish_reason="stop")
                self._finish(i)
                continue
            event = TokenEvent(s.request.id, token)
            if s.request.params.logprobs:
                event.logprob = chosen_logprobs[row]
            k = s.request.params.top_logprobs
            if k:
                values, ids = torch.topk(logprobs[want.index(row)], min(k, logprobs.shape[-1]))
                event.top_logprobs = list(zip(ids.tolist(), values.tolist()))
            s.last = token
            s.generated += 1
            if s.generated == s.budget:
                event.finish_reason = "length"
                self._finish(i)
            events[i] = event
        return events

    def _finish(self, slot: int) -> None:
        if self.hold_finished:
            self._slots[slot].finished = True
        else:
            self.release(self._slots[slot].request.id)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) under the raw (untempered) logits, as Meta reports it."""
    return torch.gather(F.log_softmax(logits.float(), dim=-1), -1, tokens.unsqueeze(-1)).squeeze(-1)
