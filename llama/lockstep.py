"""Keeping the ranks in lockstep, and ending all of them when one fails.

Every rank runs the same generation, meeting the others in collective operations. When one rank
dies or raises, the others would sit in their next collective until it times out (torch's default
is 30 minutes). Instead, once `Llama.build` has joined a group of more than one process:

- each rank beats a heartbeat in the process group's store, and a watchdog thread reads the
  others' heartbeats and failure reports about once a second (a tenth of `timeout` if smaller);
- an uncaught exception is written to the store (key `llama/error/RANK`) before the process exits;
- a rank that sees another's failure prints "rank R: stopping: rank F failed: <reason>" to stderr
  and exits with code 1 at once; a rank whose heartbeat stops for `timeout` seconds (killed, out
  of memory, machine lost) counts as failed;
- collectives time out after `timeout` seconds, which ends the wait on a rank that is alive but
  stuck (see distributed.init_model_parallel).

Under torchrun, the launcher also stops the other ranks of its node as soon as one exits with an
error, and prints which rank failed.

Waits that can rightly last long (for a slow rank to finish loading, for the user to type) do not
use a timed collective: they wait on a store key, and only the watchdog ends them.
"""

import atexit
import hashlib
import itertools
import os
import sys
import threading
import time
from typing import Callable, List, Optional, TypeVar

import torch
import torch.distributed as dist
from fairscale.nn.model_parallel.initialize import get_model_parallel_group, model_parallel_is_initialized

from .distributed import control_group

DEFAULT_TIMEOUT = 120.0  # seconds; Llama.build(timeout=...) and the examples' --timeout
KEY = "llama/"  # every store key of this module starts with it

T = TypeVar("T")


def check_timeout(timeout) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a number of seconds > 0 (default {DEFAULT_TIMEOUT:g}), got {timeout!r}")
    return float(timeout)


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


class _Watchdog:
    def __init__(self, store: dist.Store, rank: int, world: int, timeout: float):
        self.store, self.rank, self.world, self.timeout = store, rank, world, timeout
        self.interval = min(1.0, timeout / 10)
        self.stopped = False
        self.wake = threading.Event()  # set by finish(), so the thread leaves its sleep at once
        self.thread = threading.Thread(target=self._run, name="llama-watchdog", daemon=True)

    def start(self) -> None:
        self.store.add(f"{KEY}beat/{self.rank}", 1)
        self.thread.start()

    def _run(self) -> None:
        peers = [r for r in range(self.world) if r != self.rank]
        now = time.monotonic()
        last_beat = {r: (-1, now) for r in peers}  # (count, when this rank saw it change)
        while not self.stopped:
            try:
                self.store.add(f"{KEY}beat/{self.rank}", 1)
                failure = self._reported_failure() or self._silent_peer(last_beat)
            except Exception as e:  # the store is gone: its host (torchrun on node 0, or rank 0) ended
                # The connection does not come back, and every further try would log a warning.
                # A run that is ending normally has `timeout` seconds to finish.
                self.wake.wait(self.timeout)
                failure = (f"lost contact with the process group's store {self.timeout:g} s ago ({e}); "
                           f"the launcher or rank that hosts it (on node 0) has stopped")
            if failure and not self.stopped:
                abort(f"rank {self.rank}: stopping: {failure}")
            self.wake.wait(self.interval)

    def _reported_failure(self) -> Optional[str]:
        if int(self.store.add(f"{KEY}errors", 0)) == 0:
            return None
        for r in range(self.world):
            if r != self.rank and self.store.check([f"{KEY}error/{r}"]):
                return f"rank {r} failed: {self.store.get(f'{KEY}error/{r}').decode(errors='replace')}"
        return None

    def _silent_peer(self, last_beat) -> Optional[str]:
        now = time.monotonic()
        for r, (count, seen) in last_beat.items():
            beats = int(self.store.add(f"{KEY}beat/{r}", 0))
            if beats != count:
                last_beat[r] = (beats, now)
            elif now - seen > self.timeout and not self.store.check([f"{KEY}done/{r}"]):
                return (f"rank {r} stopped responding: no heartbeat for {self.timeout:g} s (killed, crashed "
                        f"without a Python error, or its machine is unreachable)")
        return None

    def report(self, reason: str) -> None:
        """Tells the other ranks why this one is about to exit."""
        try:
            self.store.set(f"{KEY}error/{self.rank}", reason[:2000])
            self.store.add(f"{KEY}errors", 1)
        except Exception:
            pass  # the store is gone too; the others will notice the missing heartbeat

    def wait_for_peer_failure(self, seconds: float) -> None:
        """Gives the thread time to find a failed peer (it exits the process if it does)."""
        deadline = time.monotonic() + seconds + 3 * self.interval
        while time.monotonic() < deadline:
            time.sleep(self.interval)

    def finish(self) -> None:
        """Normal exit: stop watching, and let the others know this rank's silence is no failure."""
        self.stopped = True
        self.wake.set()
        try:
            self.store.set(f"{KEY}done/{self.rank}", "1")
        except Exception:
            pass
        # Wait for the thread to leave the store's C++ code: a daemon thread still inside it when
        # the interpreter shuts down is torn out of it, and the process aborts ("terminate called").
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(timeout=10)


_watchdog: Optional[_Watchdog] = None


_abort_hooks: List[Callable[[str], None]] = []


def on_abort(hook: Callable[[str], None]) -> None:
    """Has abort() call hook(message) before it ends the process; for last words that must not
    wait long (the server answers its open requests with the error)."""
    _abort_hooks.append(hook)


def abort(message: str) -> None:
    """Prints the message and ends this process now, from any thread, with exit code 1."""
    try:
        sys.stdout.flush()
        sys.stderr.write(message + "\n")
        sys.stderr.flush()
        for hook in _abort_hooks:
            hook(message)
    finally:
        os._exit(1)


def report(reason: str) -> None:
    """Tells the other ranks why this one is about to exit (when a watchdog runs), so that they
    stop at once rather than when its heartbeat is missed."""
    if _watchdog is not None and not _watchdog.stopped:
        _watchdog.report(reason)


def _looks_like_lost_peer(error: BaseException) -> bool:
    """A collective failed: more likely a peer's fault than this rank's."""
    if isinstance(error, dist.DistError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        word in text for word in ("gloo", "Gloo", "NCCL", "Connection", "connection", "Timed out", "timed out"))


def _excepthook(kind, error, traceback) -> None:
    watchdog = _watchdog
    if watchdog is not None and not watchdog.stopped:
        first_line = (str(error).strip().splitlines() or [""])[0]
        reason = f"{kind.__name__}: {first_line}" if first_line else kind.__name__
        if _looks_like_lost_peer(error):
            # Let the watchdog name the rank that broke the collective rather than blame this one:
            # a peer that died has `timeout` seconds to be missed; after a collective timed out,
            # a dead peer would already have been missed.
            timed_out = "timed out" in first_line.lower()
            watchdog.wait_for_peer_failure(0 if timed_out else watchdog.timeout)
            if timed_out:
                reason = (f"a collective step timed out after {watchdog.timeout:g} s, yet every rank kept its "
                          f"heartbeat: one is stuck, or slower than the timeout ({reason})")
        watchdog.report(reason)
    _previous_excepthook(kind, error, traceback)


_previous_excepthook = sys.excepthook


def start_watchdog(timeout: float) -> None:
    """Starts heartbeats and the watchdog for this process (once; later calls do nothing) when the
    default process group has more than one rank."""
    global _watchdog, _previous_excepthook
    if _watchdog is not None or _world() == 1:
        return
    store = dist.distributed_c10d._get_default_store()
    _watchdog = _Watchdog(store, dist.get_rank(), dist.get_world_size(), timeout)
    _watchdog.start()
    _previous_excepthook, sys.excepthook = sys.excepthook, _excepthook
    atexit.register(_watchdog.finish)


_waits = itertools.count()


def _wait_for_key(store: dist.Store, key: str) -> None:
    """Waits for `key` as long as it takes; only the watchdog ends a wait on a failed rank.
    (store.wait() with a short timeout would do, but logs a warning at every timeout.)"""
    pause = 0.005
    while True:
        try:
            if store.check([key]):
                return
        except RuntimeError:
            pass  # the store is gone: the watchdog will say so
        time.sleep(pause)
        pause = min(pause * 2, 0.2)


def wait_for_all_ranks() -> None:
    """A barrier with no time limit, for steps whose length varies a lot between ranks (loading a
    checkpoint from a slow disk). Every rank must call it the same number of times."""
    if _world() == 1:
        return
    store = dist.distributed_c10d._get_default_store()
    n = next(_waits)
    if int(store.add(f"{KEY}arrived/{n}", 1)) == dist.get_world_size():
        store.set(f"{KEY}all_arrived/{n}", "1")
    _wait_for_key(store, f"{KEY}all_arrived/{n}")


def share_from_rank0(read: Callable[[], T]) -> T:
    """Rank 0 calls read() (which may block as long as it likes, e.g. for a user to type) and every
    rank returns its result, sent with broadcast_object_list. Every rank must call it the same
    number of times."""
    if _world() == 1:
        return read()
    store = dist.distributed_c10d._get_default_store()
    key = f"{KEY}shared/{next(_waits)}"
    value = None
    if dist.get_rank() == 0:
        value = read()
        store.set(key, "1")
    else:
        _wait_for_key(store, key)
    box = [value]
    dist.broadcast_object_list(box, src=0, group=control_group())
    return box[0]


def check_same_inputs(what: str, values, device: Optional[torch.device] = None) -> None:
    """Raises the same ValueError on every rank of the model-parallel group when they were not
    given the same `values`: ranks that run different inputs would deadlock or return garbage."""
    if _world() == 1 or not model_parallel_is_initialized():
        return
    group = get_model_parallel_group()
    if dist.get_world_size(group) == 1:
        return
    digest = int.from_bytes(hashlib.sha256(repr(values).encode()).digest()[:8], "little", signed=True)
    mine = torch.tensor([digest], dtype=torch.long, device=device)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, mine, group=group)
    digests = [int(d) for d in everyone]
    if len(set(digests)) > 1:
        differ = [r for r, d in enumerate(digests) if d != digests[0]]
        raise ValueError(
            f"the ranks were given different {what}: ranks {differ} of the model-parallel group disagree "
            f"with its rank 0. Every rank must make the same calls with the same inputs; read input on "
            f"one rank and share it (llama.lockstep.share_from_rank0)"
        )

