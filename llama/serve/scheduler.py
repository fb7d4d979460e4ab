"""Rank 0's side of serving: requests wait in a bounded queue, join the running batch as soon as
a slot is free, and leave it when they finish or their client goes away.

Two threads meet here. The HTTP handlers (the asyncio loop) call submit(), cancel() and stop();
the engine thread calls next_plan() before each iteration and deliver() after it. A lock guards
what they share; a request's results reach its handler through the job's asyncio queue."""

import asyncio
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Deque, Dict, List, Optional, Sequence, Tuple

from ..engine import Request, SamplingParams, TokenEvent
from ..streaming import TextStream
from ..tokenizer import Tokenizer
from .schemas import ApiError
from .steps import Plan


@dataclass
class Update:
    """What a handler receives each time its request advances."""
    text: str = ""  # generated text settled since the last update
    tokens: List[int] = field(default_factory=list)  # tokens generated since the last update
    logprobs: List[float] = field(default_factory=list)
    top_logprobs: List[List[Tuple[int, float]]] = field(default_factory=list)
    finish_reason: Optional[str] = None  # on the last update: "stop" (stop token or string) or "length"
    error: Optional[ApiError] = None  # on the last update when the request failed


class Job:
    """One request on its way through the engine, as rank 0 follows it: its tokens, its text (with
    stop strings), and the queue its handler reads."""

    def __init__(self, request_id: int, prompt: List[int], params: SamplingParams, text: TextStream,
                 loop: asyncio.AbstractEventLoop):
        self.request = Request(request_id, prompt, params)
        self.text = text
        self.tokens: List[int] = []
        self.logprobs: List[float] = []
        self.top_logprobs: List[List[Tuple[int, float]]] = []
        self.prompt_logprobs: Optional[List[float]] = None  # echo with logprobs: from the admit event
        self.finish_reason: Optional[str] = None
        self.updates: "asyncio.Queue[Update]" = asyncio.Queue()
        self._loop = loop
        self._published = 0  # tokens already handed to the handler
        self.ended = False  # the handler got its last update

    @property
    def id(self) -> int:
        return self.request.id

    def add(self, event: TokenEvent) -> None:
        """Takes one token from the engine (engine thread)."""
        if event.token is None:  # a stop token (not part of the text), or no room for any token
            self._finish(event.finish_reason)
            return
        self.tokens.append(event.token)
        if event.logprob is not None:
            self.logprobs.append(event.logprob)
        if event.top_logprobs is not None:
            self.top_logprobs.append(event.top_logprobs)
        if self.text.push(event.token):
            self._finish("stop")  # a stop string: the engine still holds the request, so release it
        elif event.finish_reason == "length":
            self._finish("length")

    def _finish(self, reason: str) -> None:
        self.finish_reason = reason
        self.text.close()

    def publish(self) -> None:
        """Hands what is new to the handler (engine thread)."""
        new = slice(self._published, len(self.tokens))
        self._published = len(self.tokens)
        self._send(Update(self.text.take(), self.tokens[new], self.logprobs[new], self.top_logprobs[new],
                          self.finish_reason))

    def fail(self, error: ApiError) -> None:
        self._send(Update(error=error))

    def _send(self, update: Update) -> None:
        if self.ended:
            return
        self.ended = update.finish_reason is not None or update.error is not None
        try:
            self._loop.call_soon_threadsafe(self.updates.put_nowait, update)
        except RuntimeError:
            pass  # the event loop has closed: the server is exiting and nobody waits for this


class Scheduler:
    """The queue and the running batch, as rank 0 sees them; see the module docstring."""

    def __init__(self, tokenizer: Tokenizer, utf8_errors: str, max_batch_size: int, max_queue: int,
                 loop: asyncio.AbstractEventLoop):
        self._tokenizer, self._utf8_errors = tokenizer, utf8_errors
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self._loop = loop
        self._lock = threading.Condition()
        self._waiting: Deque[Job] = deque()
        self._running: Dict[int, Job] = {}  # admitted and not finished, by request id
        self._release: List[int] = []  # ids the engine still holds but whose requests have ended
        self._stop_at: Optional[float] = None  # once stopping: when to end the requests still running
        self._failure: Optional[str] = None
        self._ids = itertools.count()

    # --- the HTTP side (asyncio loop) ---

    def submit(self, prompt: List[int], params: SamplingParams, stop: Sequence[str]) -> Job:
        """Queues a request; raises ApiError 429 when the queue is full, 503 when the server stops."""
        with self._lock:
            self._check_available()
            # Requests that will find a free slot at the next step do not count against the queue.
            free = max(0, self.max_batch_size - len(self._running) - len(self._release))
            if len(self._waiting) >= self.max_queue + free:
                raise ApiError(429, f"the server is busy: {len(self._running)} requests are running and "
                                    f"{len(self._waiting)} waiting, the most its queue holds; retry later",
                               code="queue_full", kind="server_overloaded")
            text = TextStream(self._tokenizer, stop, errors=self._utf8_errors)
            job = Job(next(self._ids), prompt, params, text, self._loop)
            self._waiting.append(job)
            self._lock.notify()
            return job

    def cancel(self, job: Job) -> None:
        """The client went away (or the handler ended early): free the request's slot at once."""
        with self._lock:
            job.ended = True
            if job in self._waiting:
                self._waiting.remove(job)
            elif self._running.pop(job.id, None) is not None:
                self._release.append(job.id)
                self._lock.notify()

    def stop(self, grace: float) -> None:
        """Stops taking requests: the waiting ones fail now, the running ones may finish within
        `grace` seconds, then fail too; after that next_plan() says stop."""
        with self._lock:
            if self._stop_at is None:
                self._stop_at = time.monotonic() + grace
            else:  # asked twice (a second Ctrl-C): stop now
                self._stop_at = time.monotonic()
            error = ApiError(503, "the server is shutting down", code="shutting_down")
            while self._waiting:
                self._waiting.popleft().fail(error)
            self._lock.notify()

    def _check_available(self) -> None:
        if self._failure is not None:
            raise ApiError(503, f"the server has failed: {self._failure}", code="server_failed")
        if self._stop_at is not None:
            raise ApiError(503, "the server is shutting down", code="shutting_down")

    @property
    def available(self) -> bool:
        with self._lock:
            return self._failure is None and self._stop_at is None

    # --- the engine side (engine thread) ---

    def next_plan(self, free_slots: int, block: bool) -> Plan:
        """What the next iteration does. block: the engine is idle, so wait for a request (or stop())."""
        with self._lock:
            while True:
                if self._stop_at is not None and (not self._running or time.monotonic() >= self._stop_at):
                    self._fail_all(ApiError(503, "the server is shutting down", code="shutting_down"))
                    return Plan(stop=True)
                release, self._release = self._release, []
                admit = []
                while self._waiting and len(admit) < free_slots + len(release) and self._stop_at is None:
                    job = self._waiting.popleft()
                    self._running[job.id] = job
                    admit.append(job.request)
                if admit or release or self._running or not block:
                    return Plan(admit=admit, release=release)
                self._lock.wait()

    def deliver(self, events: List[TokenEvent]) -> None:
        """Hands the tokens of one iteration to their requests."""
        with self._lock:
            touched: Dict[int, Job] = {}
            for event in events:
                job = self._running.get(event.request_id)
                if job is None:  # cancelled, or ended by a stop string, in this iteration
                    if event.finish_reason is not None and event.request_id in self._release:
                        self._release.remove(event.request_id)  # the engine freed it by itself
                    continue
                if event.prompt_logprobs is not None:
                    job.prompt_logprobs = event.prompt_logprobs
                job.add(event)
                touched[job.id] = job
                if job.finish_reason is not None:
                    del self._running[job.id]
                    if event.finish_reason is None:
                        self._release.append(job.id)
            for job in touched.values():
                job.publish()

    def fail(self, reason: str) -> None:
        """The engine cannot go on (a rank failed): every request ends with an error, and no new
        one is taken."""
        with self._lock:
            self._failure = self._failure or reason
            self._fail_all(ApiError(503, f"the server has failed: {reason}", code="server_failed"))
            self._lock.notify()

    def _fail_all(self, error: ApiError) -> None:
        for job in list(self._waiting) + list(self._running.values()):
            job.fail(error)
        self._waiting.clear()
        self._running.clear()
