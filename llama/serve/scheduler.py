"""Rank 0's side of serving: requests wait in a bounded queue, join the running batch as soon as
a slot is free, and leave it when they finish or their client goes away.

Two threads meet here. The HTTP handlers (the asyncio loop) call submit(), release() and stop();
the engine thread calls next_plan() before each iteration and deliver() after it. A lock guards
what they share, and nothing slow runs under it: deliver() only sorts the iteration's events by
request and hands each job its own, through the job's asyncio queue; the handler turns them into
text (llama/outputs.py) and releases its request when a stop string ends it."""

import asyncio
import itertools
import threading
import time
from collections import deque
from typing import Deque, Dict, List, Optional, Union

from ..requests import Request, SamplingParams, TokenEvent
from .schemas import ApiError
from .steps import Plan


class Job:
    """One request on its way through the engine: what the scheduler tracks, and the queue on
    which its handler receives each iteration's events (or the error that ended it)."""

    def __init__(self, request_id: int, prompt: List[int], params: SamplingParams,
                 loop: asyncio.AbstractEventLoop):
        self.request = Request(request_id, prompt, params)
        self.events: "asyncio.Queue[Union[List[TokenEvent], ApiError]]" = asyncio.Queue()
        self._loop = loop
        self.ended = False  # the handler got its last events (the engine ended it) or an error

    @property
    def id(self) -> int:
        return self.request.id

    def send(self, events: List[TokenEvent]) -> None:
        """Hands one iteration's events to the handler (engine thread)."""
        self._send(events, any(e.finish_reason is not None for e in events))

    def fail(self, error: ApiError) -> None:
        self._send(error, True)

    def _send(self, item: Union[List[TokenEvent], ApiError], last: bool) -> None:
        if self.ended:
            return
        self.ended = last
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:
            pass  # the event loop has closed: the server is exiting and nobody waits for this


class Scheduler:
    """The queue and the running batch, as rank 0 sees them; see the module docstring."""

    def __init__(self, max_batch_size: int, max_queue: int, loop: asyncio.AbstractEventLoop):
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

    def submit(self, prompt: List[int], params: SamplingParams) -> Job:
        """Queues a request; raises ApiError 429 when the queue is full, 503 when the server stops."""
        with self._lock:
            self._check_available()
            # Requests that will find a free slot at the next step do not count against the queue.
            free = max(0, self.max_batch_size - len(self._running) - len(self._release))
            if len(self._waiting) >= self.max_queue + free:
                raise ApiError(429, f"the server is busy: {len(self._running)} requests are running and "
                                    f"{len(self._waiting)} waiting, the most its queue holds; retry later",
                               code="queue_full", kind="server_overloaded")
            job = Job(next(self._ids), prompt, params, self._loop)
            self._waiting.append(job)
            self._lock.notify()
            return job

    def release(self, job: Job) -> None:
        """The handler is done with the request (it finished on a stop string, or its client went
        away): its slot is freed at the next iteration, if the engine still holds it."""
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

    def sizes(self) -> tuple:
        """(running, waiting, free slots), for the metrics."""
        with self._lock:
            running = len(self._running)
            return running, len(self._waiting), max(0, self.max_batch_size - running - len(self._release))

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
        """Hands the events of one iteration to their requests' handlers."""
        with self._lock:
            by_job: Dict[Job, List[TokenEvent]] = {}
            for event in events:
                job = self._running.get(event.request_id)
                if job is None:  # released by its handler
                    if event.finish_reason is not None and event.request_id in self._release:
                        self._release.remove(event.request_id)  # the engine freed it by itself
                    continue
                by_job.setdefault(job, []).append(event)
                if event.finish_reason is not None:  # the engine has freed its slot
                    del self._running[job.id]
            for job, own in by_job.items():
                job.send(own)

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
