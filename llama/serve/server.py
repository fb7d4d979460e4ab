"""Rank 0's process while serving: the HTTP server on the main thread's event loop, the engine
loop on a thread of its own, and how the two end together.

- SIGTERM or Ctrl-C: stop listening; waiting requests fail (503) at once, running ones get
  SHUTDOWN_GRACE seconds to finish, then fail; rank 0 tells every rank to stop; all exit.
  (A second signal ends the grace at once, unless it comes within SAME_SIGNAL seconds of the
  first: under torchrun one Ctrl-C reaches rank 0 twice, from the terminal and from the launcher.)
- A rank fails (its collective breaks, or the watchdog in llama/lockstep.py gives up on it): every
  open request is answered with an error (503) and the process exits with an error; the others
  follow within the runner's bounded time. The port never stays open without an engine behind it.

The event loop, not the engine thread, owns the signals, so a stop is heard even while the engine
waits in a collective."""

import asyncio
import hashlib
import json
import os
import signal
import threading
import time
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist
from aiohttp import web

from .. import lockstep
from ..engine import Engine
from ..generation import Llama
from ..streaming import invalid_utf8_errors
from ..tool_calls import ToolFormat
from .app import Service, make_app
from .cors import Cors
from .metrics import Metrics
from .scheduler import Scheduler
from .steps import lead

SHUTDOWN_GRACE = 5.0  # seconds running requests get to finish after SIGTERM / Ctrl-C
ENGINE_EXIT_WAIT = 15.0  # then, how long the engine thread gets to share the stop with the other ranks
RESPONSE_FLUSH = 2.0  # how long handlers get to send their last bytes once the engine has stopped
SAME_SIGNAL = 2.0  # seconds within which a second signal is the first one again (see the docstring)


def serve(llama: Llama, engine: Engine, host: str, port: int, model_name: str, api_key: Optional[str],
          max_queue: int, cors_origins: Sequence[str] = (), tools: Optional[ToolFormat] = None) -> None:
    """Serves until stopped; raises the engine's error if it failed. tools: how the model writes
    tool calls (llama/tool_calls.py), None where it cannot."""
    asyncio.run(_serve(llama, engine, host, port, model_name, api_key, max_queue, cors_origins, tools))


async def _serve(llama: Llama, engine: Engine, host: str, port: int, model_name: str, api_key: Optional[str],
                 max_queue: int, cors_origins: Sequence[str], tools: Optional[ToolFormat]) -> None:
    loop = asyncio.get_running_loop()
    scheduler = Scheduler(engine.max_batch_size, max_queue, loop)
    service = Service(scheduler, llama.tokenizer, llama.formatter, model_name, llama.model.params.max_seq_len,
                      llama.model.params.vocab_size, invalid_utf8_errors(llama.tokenizer), api_key,
                      created=int(time.time()), fingerprint=fingerprint(llama, model_name), cors=Cors(cors_origins),
                      metrics=Metrics(scheduler.sizes, prefix_tokens=_prefix_counts(engine)), tool_format=tools)
    runner = web.AppRunner(make_app(service), handler_cancellation=True, access_log=None,
                           shutdown_timeout=RESPONSE_FLUSH)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()

    engine_done: "asyncio.Future[Optional[BaseException]]" = loop.create_future()

    def run_engine() -> None:
        error = None
        if engine.device.type == "cuda":  # a new thread starts on cuda:0, whatever the rank's GPU
            torch.cuda.set_device(engine.device)
        try:
            lead(engine, lambda block: scheduler.next_plan(engine.free_slots, block), scheduler.deliver)
        except BaseException as e:  # a collective broke: a rank failed
            error = e
            scheduler.fail(f"{type(e).__name__}: {e}")
        loop.call_soon_threadsafe(lambda: engine_done.done() or engine_done.set_result(error))

    # A daemon thread: if a dead peer leaves it stuck inside a collective, it must not keep the process alive.
    threading.Thread(target=run_engine, name="llama-engine", daemon=True).start()

    stop_requested = asyncio.Event()
    signaled: List[float] = []  # when the signals that counted came

    def on_signal(signum: int) -> None:
        if signaled and time.monotonic() - signaled[-1] < SAME_SIGNAL:
            return  # the same Ctrl-C again, forwarded by the launcher
        signaled.append(time.monotonic())
        again = " at once (a second signal)" if len(signaled) > 1 else ""
        print(f"{signal.Signals(signum).name}: stopping the server{again}", flush=True)
        scheduler.stop(SHUTDOWN_GRACE)
        stop_requested.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    lockstep.on_abort(lambda message: _answer_before_abort(scheduler, service, message))

    bound = runner.addresses[0]
    print(f"Serving {model_name} at http://{host}:{bound[1]}/v1 (ready)", flush=True)

    stop_waiter = asyncio.ensure_future(stop_requested.wait())
    await asyncio.wait([engine_done, stop_waiter], return_when=asyncio.FIRST_COMPLETED)
    await site.stop()  # no new connections from here on
    try:
        error = await asyncio.wait_for(asyncio.shield(engine_done), SHUTDOWN_GRACE + ENGINE_EXIT_WAIT)
        stuck = False
    except asyncio.TimeoutError:
        scheduler.fail("the engine did not stop: a rank stopped answering")
        error, stuck = None, True
    stop_waiter.cancel()
    await runner.cleanup()  # lets the handlers send their last answers
    if stuck:
        lockstep.abort("rank 0: stopping: the engine stayed inside a collective step (a rank stopped answering)")
    if error is not None:
        raise error
    print("Server stopped: every rank has left its loop", flush=True)


def _prefix_counts(engine: Engine):
    """For /metrics: (prompt tokens placed, of those reused), read from the engine thread's counters
    (two ints, each read whole), or None without prefix reuse."""
    prefixes = engine.prefixes
    return None if prefixes is None else (lambda: (prefixes.prompt_tokens, prefixes.reused_tokens))


def fingerprint(llama: Llama, model_name: str) -> str:
    """OpenAI's system_fingerprint: the same for every answer of one model with the same weights'
    precision, context and ranks, so a client can tell when results may change."""
    p = llama.model.params
    weights = {name: str(value.dtype) for name, value in llama.model.state_dict().items()}
    what = json.dumps([model_name, p.max_seq_len, p.vocab_size, p.dim, p.n_layers, sorted(weights.items()),
                       dist.get_world_size() if dist.is_initialized() else 1])
    return "fp_" + hashlib.sha256(what.encode()).hexdigest()[:12]


def _answer_before_abort(scheduler: Scheduler, service: Service, message: str) -> None:
    """lockstep.abort is about to end this process: answer the open requests with the error first
    (for at most RESPONSE_FLUSH seconds)."""
    scheduler.fail(message.split(": stopping: ", 1)[-1])
    deadline = time.monotonic() + RESPONSE_FLUSH
    while service.open_responses and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.1)  # the last bytes, from the socket to the client


def ignore_signals_until_rank0_stops(timeout: float = 25.0) -> None:
    """Ranks other than 0: SIGTERM / Ctrl-C reach every rank (from torchrun or the terminal), but only
    rank 0 may decide when to stop, or the ranks would leave their lockstep at different steps.
    So note the signal and wait for rank 0's stop; if it does not come within `timeout`, exit."""

    def on_signal(signum, frame) -> None:
        timer = threading.Timer(timeout, lockstep.abort, args=(
            f"rank {os.environ.get('RANK', '?')}: stopping: rank 0 did not stop the server {timeout:g} s after "
            f"{signal.Signals(signum).name}",))
        timer.daemon = True
        timer.start()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)
