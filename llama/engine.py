"""The decode engine: requests held in KV-cache slots, decoded together one token per step.

`admit` prefills new requests into free slots together (one forward over prompts of different
lengths, each written at its own cache row) and samples each one's first token; `step` feeds every
running request its newest token at its own position and samples the next; `release` frees a slot
at once. With a prefill chunk (the server's), a prompt longer than the chunk is prefilled a chunk
per step instead, before that step's decode, so the running requests keep their pace. Requests
come and go between steps, so the same engine runs Llama.generate's fixed batches and a server's
continuous batching.

The engine decides only what needs the model: slots, positions, stop tokens and budgets. What a
request's events become (text, stop strings, results) is llama/outputs.py's job.

A request's tokens do not depend on the other slots: every row attends only to its own cache row,
and a request with a seed samples from its own torch.Generator. Only up to the last bits, though:
the batch's shape decides how the products sum, so a request's logits can differ in the last bits
between batches, which can move a draw (or an argmax) between near-equal tokens (README, "What a
seed does and does not promise"). Requests without a seed and with the same settings are sampled
in one call on torch's global generator, in slot order, as Meta's loop samples a batch.

Under torchrun every rank calls admit/step/release in the same order with the same arguments, and
the model's collectives keep the ranks together. The engine adds no communication of its own, but
for one small message per sampling on GPUs: rank 0's draws, which every rank then takes
(distributed.rank_zero_draws).

A request with a grammar (SamplingParams.constraint, llama/constraints.py) draws only the tokens it
allows: its masks are computed on a worker thread while the model runs, and every rank computes
the same ones. Requests without one cost nothing extra.
"""

from typing import Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .constraints import Masks, Vocabulary
from .distributed import rank_zero_draws
from .model import Transformer
from .prefixes import PrefixCache
from .prompt_logprobs import chunk_positions, prompt_logprobs
from .requests import Finish, Request, SamplingParams, TokenEvent  # noqa: F401 (the engine's API)
from .sampling import check_sampling, sample_next
from .slots import Slot


# How admit() prefills a batch. "together": every prompt whole, in one forward. "reference": Meta's
# loop: the shortest prompt's length together, then one position per step for every row, a row
# fed its own prompt tokens while they last (what was sampled for it there is dropped).
PREFILL_POLICIES = ("together", "reference")


class _Logprobs:
    """Log-probabilities under the raw logits, for the rows that asked: computed in one pass, and
    read back from the device once (the chosen tokens' and the most likely ones at once)."""

    def __init__(self, rows: List[int], logits: torch.Tensor, chosen: torch.Tensor, top_k: int):
        self._index = {row: n for n, row in enumerate(rows)}
        self._chosen: List[float] = []
        self._top: List[List[Tuple[int, float]]] = []
        if rows:
            index = _on_device(rows, logits.device)
            every = F.log_softmax(logits[index].float(), dim=-1)
            self._chosen = every.gather(-1, chosen[index].unsqueeze(-1)).squeeze(-1).tolist()
            if top_k:
                values, ids = torch.topk(every, min(top_k, every.shape[-1]))
                self._top = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]

    def chosen(self, row: int) -> Optional[float]:
        n = self._index.get(row)
        return None if n is None else self._chosen[n]

    def top(self, row: int, k: int) -> Optional[List[Tuple[int, float]]]:
        """The k most likely (token, logprob), most likely first; None when k is 0."""
        return self._top[self._index[row]][:k] if k else None


class Engine:
    def __init__(self, model: Transformer, *, hold_finished: bool = False,
                 decode_step: Optional[Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]] = None,
                 prefill_chunk: Optional[int] = None, prefix_reuse: bool = False,
                 vocabulary: Optional[Vocabulary] = None):
        """model: its KV cache (max_batch_size rows of max_seq_len) holds the slots. One engine per
        model at a time: slots are rows of the model's own cache.

        decode_step: what runs each step's one new token per row in place of the model's eager
        forward, called as decode_step(tokens (batch, 1), positions (batch,), kv_len) -> logits
        (batch, vocab): a compiling.CompiledDecode of the model (Llama.build(compile=True)).

        hold_finished: a finished request keeps its slot until release(), idle but still sampled
        with its group (the draws are dropped). Meta's loop samples every row of a batch until the
        whole batch ends; Llama.generate holds finished requests to draw the same random numbers.
        By default a finished request frees its slot at once.

        prefill_chunk: a prompt of more tokens is not prefilled by admit() but by the steps, at most
        this many prompt tokens per step (all such prompts together, oldest first), each step's
        decode following; so a long prompt arriving holds the running requests up by one chunk's
        prefill per step rather than by its whole prefill at once. Prompts that ask for their
        logprobs are prefilled whole. None: every prompt whole, in admit().

        prefix_reuse: a request whose prompt begins as what a cache row already holds (a freed
        row's last request, or a running one) starts from there (llama/prefixes.py); the rest of
        its prompt is prefilled by the next step. Not for prompts that ask for their logprobs, nor
        for requests with a seed, nor under prefill="reference".

        vocabulary: the tokenizer as the grammar library sees it (constraints.Vocabulary), needed
        by requests with a constraint."""
        if prefill_chunk is not None and (isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int)
                                          or prefill_chunk < 1):
            raise ValueError(f"prefill_chunk must be None or an integer >= 1, got {prefill_chunk!r}")
        self.model = model
        self.max_batch_size = model.params.max_batch_size
        self.max_seq_len = model.params.max_seq_len
        self.device = model.norm.weight.device
        self.hold_finished = hold_finished
        self.decode_step = decode_step
        self.prefill_chunk = prefill_chunk
        self._admitted = 0
        self.prefixes = PrefixCache(self.max_batch_size) if prefix_reuse else None
        self._slots: List[Optional[Slot]] = [None] * self.max_batch_size
        self._slot_of: Dict[Hashable, int] = {}
        self._masks = Masks(vocabulary)

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
    def admit(self, requests: Sequence[Request], prefill: str = "together") -> List[TokenEvent]:
        """Prefills the requests together into the lowest free slots and samples each one's first
        token. Returns one event per request that moved on, in order: under prefill="reference" a
        request still feeding its prompt has none yet (see PREFILL_POLICIES)."""
        self._check(requests, prefill)
        lengths = [len(r.prompt) for r in requests]
        if prefill == "reference":
            lengths = [min(lengths)] * len(requests)
        budgets = [self._budget(r) for r in requests]
        admitted, now, now_lengths = [], [], []  # now: prefilled here, together; the rest by the steps
        for r, n, budget, (slot, reused) in zip(requests, lengths, budgets, self._place(requests, budgets, prefill)):
            later = reused > 0 or (prefill == "together" and self.prefill_chunk is not None and n > self.prefill_chunk
                                   and budget > 0 and not r.params.prompt_logprobs)
            self._slots[slot] = Slot(r, reused if later else n, budget, self.device, self._admitted, later)
            self._admitted += 1
            self._slot_of[r.id] = slot
            admitted.append(slot)
            if not later:
                now.append(slot)
                now_lengths.append(n)
        self._start_constraints(admitted)
        if not now:
            return []
        free, last = now, self._prefill(now, now_lengths)
        events = {}
        for slot in free:
            s = self._slots[slot]
            if s.budget == 0 and not s.forced:  # prefilled (for prompt logprobs), nothing to add
                events[slot] = s.end(Finish.LENGTH)
                self._finish(slot)
        kept = [row for row, slot in enumerate(free) if self._slots[slot] is not None]
        if any(not self._slots[free[row]].finished for row in kept):
            if len(kept) < len(free):
                last = last[torch.tensor(kept, dtype=torch.long, device=self.device)]
            events.update(self._sample([free[row] for row in kept], last))
        return [events[slot] for slot in free if slot in events]

    def _budget(self, request: Request) -> int:
        """How many new tokens the request may add: max_new_tokens, or up to the context's end."""
        room = self.max_seq_len - len(request.prompt)
        return room if request.params.max_new_tokens is None else min(request.params.max_new_tokens, room)

    def _place(self, requests: Sequence[Request], budgets: List[int], prefill: str) -> List[Tuple[int, int]]:
        """Each request's slot, and how many of its first prompt tokens that slot's cache row holds
        already (prefix reuse: copied there first when found in another row)."""
        free = [i for i, s in enumerate(self._slots) if s is None]
        if self.prefixes is None:
            return [(slot, 0) for slot in free[:len(requests)]]
        running = {i: s.cached for i, s in enumerate(self._slots) if s is not None}
        placed = []
        for r, budget in zip(requests, budgets):
            # A seeded request is prefilled whole, so that sent again alone it samples the same: a
            # reused prefix can change its logits in the last bits, and so a near-tie draw.
            reusable = (prefill == "together" and budget > 0 and not r.params.prompt_logprobs
                        and r.params.seed is None)
            slot, reused, source = self.prefixes.place(r.prompt, free, running, reusable)
            if source is not None:
                self.model.copy_cache(source, slot, reused)
            free.remove(slot)
            running[slot] = list(r.prompt[:reused])  # in use from now on
            placed.append((slot, reused))
        return placed

    def _prefill(self, slots: List[int], lengths: List[int]) -> torch.Tensor:
        """Runs each slot's first lengths[row] prompt tokens through the model into its cache row;
        returns each row's logits after its last one, and records prompt logprobs where asked."""
        tokens = torch.zeros((len(slots), max(lengths)), dtype=torch.long)
        for row, (slot, n) in enumerate(zip(slots, lengths)):
            tokens[row, :n] = torch.tensor(list(self._slots[slot].request.prompt[:n]), dtype=torch.long)
        tokens = tokens.to(self.device)
        # The first rows in order need no row index (the cache is then read as a view).
        rows = None if slots == list(range(len(slots))) else torch.tensor(slots, device=self.device)
        last_index = torch.tensor(lengths, device=self.device) - 1
        # Right padding writes keys past a prompt's end, which that row overwrites before reading.
        if not any(self._slots[slot].params.prompt_logprobs for slot in slots):
            return self.model(tokens, 0, last_index=last_index, kv_len=max(lengths), rows=rows)
        hidden = self.model(tokens, 0, kv_len=max(lengths), rows=rows, hidden=True)
        self._prompt_logprobs(slots, lengths, tokens, hidden)
        return self.model.logits(hidden[torch.arange(len(slots), device=self.device), last_index])

    def _prompt_logprobs(self, slots: List[int], lengths: List[int], tokens: torch.Tensor,
                         hidden: torch.Tensor) -> None:
        """Records the prompt logprobs of the slots that asked, from their prefill's hidden states
        (batch, seq, dim), projected a bounded chunk of positions at a time."""
        asking = [row for row, slot in enumerate(slots) if self._slots[slot].params.prompt_logprobs]
        top_k = max(self._slots[slots[row]].params.top_logprobs for row in asking)
        logprobs, tops = prompt_logprobs(self.model.logits, hidden, tokens, asking, [lengths[row] for row in asking],
                                         top_k, chunk_positions(self.model.vocab_size))
        for n, row in enumerate(asking):
            s = self._slots[slots[row]]
            s.prompt_logprobs = [0.0] + logprobs[n]
            if s.params.top_logprobs:
                s.prompt_top_logprobs = [None] + [top[:s.params.top_logprobs] for top in tops[n]]

    @torch.inference_mode()
    def step(self) -> List[TokenEvent]:
        """The next prefill chunk, if any prompt is being prefilled in chunks (see prefill_chunk),
        then one decode step for every running request: feeds its newest token and samples the
        next. Returns one event per request that moved on: those whose prefill ended first, then
        the rest in slot order."""
        events = self._prefill_next_chunk()
        occupied = [i for i, s in enumerate(self._slots) if s is not None]
        decoding = [i for i in occupied if not self._slots[i].finished and not self._slots[i].prefilling]
        if not decoding:
            return list(events.values())
        # Rows run from the first slot to the last occupied one (a view of the cache); the rows in
        # between that decode nothing (free, finished, still prefilling) feed a placeholder at the
        # cache's scratch position (args.cache_length), which no query reads.
        width = occupied[-1] + 1
        feed, positions = [0] * width, [self.max_seq_len] * width
        for i in decoding:
            s = self._slots[i]
            feed[i], positions[i] = s.last, s.position
            s.position += 1
            s.cached.append(s.last)
        kv_len = max(positions[i] for i in decoding) + 1
        tokens, start_pos = _on_device([feed, positions], self.device)  # one copy to the device
        tokens = tokens.unsqueeze(1)
        if self.decode_step is not None:
            logits = self.decode_step(tokens, start_pos, kv_len)
        else:
            logits = self.model(tokens, start_pos, kv_len=kv_len,
                                last_index=torch.zeros(width, dtype=torch.long, device=self.device))
        sampled = [i for i in occupied if not self._slots[i].prefilling]  # held finished ones too
        if len(sampled) < width:
            logits = logits[_on_device(sampled, self.device)]
        stepped = self._sample(sampled, logits)
        return list(events.values()) + [stepped[i] for i in sampled if i in stepped]

    def _prefill_next_chunk(self) -> Dict[int, TokenEvent]:
        """Prefills up to prefill_chunk more prompt tokens of the requests prefilling in chunks,
        oldest first, each from where its last chunk ended; a request whose whole prompt is in
        samples its first token. Returns their events."""
        waiting = sorted((s.order, i) for i, s in enumerate(self._slots) if s is not None and s.prefilling)
        room, events = self.prefill_chunk or self.max_seq_len * self.max_batch_size, {}
        for _, slot in waiting:
            if room == 0:
                break
            s = self._slots[slot]
            start = s.position
            chunk = s.request.prompt[start:start + room]
            tokens = _on_device([list(chunk)], self.device)
            last = self.model(tokens, start, kv_len=start + len(chunk), rows=_on_device([slot], self.device),
                              last_index=_on_device([len(chunk) - 1], self.device))
            s.position += len(chunk)
            s.cached.extend(chunk)
            room -= len(chunk)
            if s.position == len(s.request.prompt):
                s.prefilling = False
                events.update(self._sample([slot], last))
        return events

    def release(self, request_id: Hashable) -> bool:
        """Frees the request's slot now (finished, cancelled, or a stop string found above the
        engine). False when the engine does not hold it (it already finished and was freed)."""
        slot = self._slot_of.pop(request_id, None)
        if slot is None:
            return False
        if self.prefixes is not None:
            self.prefixes.free(slot, self._slots[slot].cached)
        self._slots[slot] = None
        return True

    def _check(self, requests: Sequence[Request], prefill: str) -> None:
        if prefill not in PREFILL_POLICIES:
            raise ValueError(f"unknown prefill={prefill!r}; use one of {PREFILL_POLICIES}")
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
            if p.constraint is not None and self._masks.vocabulary is None:
                raise ValueError(f"request {r.id!r} has a constraint, but the engine has no vocabulary: pass "
                                 f"Engine(model, vocabulary=constraints.Vocabulary(tokenizer, vocab_size))")

    def _sample(self, slots: List[int], logits: torch.Tensor) -> Dict[int, TokenEvent]:
        """Picks the next token of each of `slots` (logits row by row) and moves the running ones
        on; returns the events of those that moved on (not the ones still feeding their prompt)."""
        masked, stuck = self._masks.apply(logits, [s.constraint if s.constrained else None
                                                   for s in map(self._slots.__getitem__, slots)])
        chosen = rank_zero_draws(self._draw([self._slots[i] for i in slots], masked))
        running = [(row, self._slots[i]) for row, i in enumerate(slots) if not self._slots[i].finished]
        forced = set()
        for row, s in running:  # a slot still feeding its prompt takes its next prompt token instead
            if s.forced:
                chosen[row] = s.forced.pop(0)
                forced.add(row)
        want = [row for row, s in running if s.params.logprobs or s.params.top_logprobs
                or (row in forced and s.params.prompt_logprobs)]
        logprobs = _Logprobs(want, logits, chosen, max((s.params.top_logprobs for _, s in running), default=0))
        tokens = chosen.tolist()
        events = {}
        for row, s in running:
            if row in forced:
                event = s.feed_prompt(tokens[row], logprobs.chosen(row), logprobs.top(row, s.params.top_logprobs))
            elif row in stuck:  # its grammar allows no token: it cannot go on
                event = s.end(Finish.ERROR, s.constraint.error)
            else:
                event = s.add(tokens[row], logprobs.chosen(row), logprobs.top(row, s.params.top_logprobs))
            if event is not None:
                events[slots[row]] = event
                if event.finish_reason is not None:
                    self._finish(slots[row])
        self._prefetch_masks(slots)
        return events

    def _start_constraints(self, slots: List[int]) -> None:
        """Gives the new requests with a grammar their Constraint and starts their first masks,
        computed while the prompts are prefilled."""
        for slot in slots:
            s = self._slots[slot]
            if s.params.constraint is not None:
                s.constraint = self._masks.start(s.params.constraint)
        self._prefetch_masks(slots)

    def _prefetch_masks(self, slots: List[int]) -> None:
        """Starts the next masks of the slots that draw under a grammar next (the forward runs meanwhile)."""
        slots = [self._slots[i] for i in slots]
        self._masks.prefetch([s.constraint for s in slots if s is not None and s.constrained])

    def _draw(self, slots: List[Slot], logits: torch.Tensor) -> torch.Tensor:
        """One sampled token per row: unseeded slots with the same settings in one call, in slot
        order (held finished ones too, as Meta's loop draws for every row); a seeded one alone."""
        groups: Dict[tuple, List[int]] = {}
        for row, s in enumerate(slots):
            groups.setdefault(s.sampling_group, []).append(row)
        if len(groups) == 1:
            p = slots[0].params
            return sample_next(logits, p.temperature, p.top_p, p.top_k, slots[0].generator)
        chosen = torch.empty(len(slots), dtype=torch.long, device=logits.device)
        for rows in groups.values():
            p, generator = slots[rows[0]].params, slots[rows[0]].generator
            index = _on_device(rows, logits.device)
            chosen[index] = sample_next(logits[index], p.temperature, p.top_p, p.top_k, generator)
        return chosen

    def _finish(self, slot: int) -> None:
        if self.hold_finished:
            self._slots[slot].finished = True
        else:
            self.release(self._slots[slot].request.id)


def _on_device(values: list, device: torch.device) -> torch.Tensor:
    """A list of ints (or of equal-length lists) as a long tensor on `device`. On CUDA it is copied
    from pinned memory without making the host wait, so that a step's only wait for the GPU is
    reading its chosen tokens back."""
    host = torch.tensor(values, dtype=torch.long)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
