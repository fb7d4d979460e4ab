"""SIGTERM and Ctrl-C at each kind of moment, on 1 and 2 CPU ranks: one trial of each kind from
benchmarks/stop_trials.py (which runs 30 and more): the server exits within README's bound with
every process gone and its port closed, and every request in flight gets its answer or its error.
And a signal repeated at once (one Ctrl-C under torchrun) keeps the grace; a later one ends it."""

import signal
import sys
import threading
import time

import openai
import pytest

from llama.serve.server import SAME_SIGNAL

from .conftest import REPO
from .serving import STOP, Server

sys.path.insert(0, str(REPO / "benchmarks"))  # the trials live there (fairscale owns the name `benchmarks`)

from stop_trials import Trial, run_trial, table  # noqa: E402

# Eager (--nocompile) except the warm-up, whose compile is the moment. Fixed delays, inside each
# moment on any machine: the warm-up's cold compile lasts far longer than 1 s; 0 s into the
# prefill of 1,900 tokens in chunks of 8 (the trial waits until the engine has taken it).
TRIALS = [
    Trial(1, "idle", "SIGTERM", 0.5),
    Trial(2, "mid_burst", "SIGINT", 0.3),
    Trial(1, "warmup", "SIGINT", 1.0),
    Trial(1, "after_burst", "SIGINT", 0.1),
    Trial(1, "prefill", "SIGTERM", 0.0),
]


@pytest.mark.parametrize("trial", TRIALS, ids=lambda t: f"{t.moment}-{t.ranks}rank-{t.signal}")
def test_a_stop_at_this_moment_ends_everything_in_time(llama31_ckpts, trial):
    row = run_trial(llama31_ckpts, trial)
    assert not row["failures"], f"{table([row])}\n{row['calls']}\n{row['output_tail']}"
    assert row["hit"], table([row])  # the signal came at the moment meant
    if trial.moment == "mid_burst":  # the running streams outlast the grace: they end with an error
        assert row["error"] >= 1 and row["complete"] + row["error"] == len(row["calls"]), row["calls"]


def test_a_signal_repeated_at_once_keeps_the_grace_and_a_later_one_ends_it(llama31_ckpts):
    """Under torchrun one Ctrl-C reaches rank 0 twice (the terminal's, then the launcher's), which
    must not cut the running requests' grace short; a second Ctrl-C seconds later does."""
    srv = Server(llama31_ckpts[1], 1, "--max_batch_size", "2", "--max_seq_len", "2048", "--model_name", "tiny")
    try:
        stream = srv.client().completions.create(model="tiny", prompt="Hello", max_tokens=2040, temperature=0,
                                                  stream=True)
        chunks = iter(stream)
        next(chunks)
        ended = threading.Event()
        errors = []

        def read() -> None:
            try:
                for _ in chunks:
                    pass
            except openai.APIError as e:
                errors.append(e.message)
            ended.set()

        threading.Thread(target=read, daemon=True).start()
        srv.signal(signal.SIGINT)
        time.sleep(0.1)
        srv.signal(signal.SIGINT)  # the same Ctrl-C, once more
        time.sleep(SAME_SIGNAL + 1)  # past the window, within the grace: the stream still runs
        assert not ended.is_set() and srv.proc.poll() is None, srv.output[-3000:]
        srv.signal(signal.SIGINT)  # a second Ctrl-C: the grace ends now
        assert ended.wait(STOP) and errors and "shutting down" in errors[0], (errors, srv.output[-3000:])
        assert srv.wait(STOP) == 0, srv.output[-3000:]
        assert srv.output.count("SIGINT: stopping the server") == 2
        assert "SIGINT: stopping the server at once (a second signal)" in srv.output
        srv.assert_nothing_left()
    finally:
        srv.kill()
