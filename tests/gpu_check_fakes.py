"""Checks that misbehave, for tests/test_gpu_check.py: run by benchmarks/gpu_check's runner in a
child process, as a real check is."""

import atexit
import os
import time

from gpu_check.report import Row


def hang(ctx):
    yield Row("first", "PASS", 1.0)
    time.sleep(600)  # a collective that never returns


def boom(ctx):
    yield Row("first", "PASS", 1.0)
    raise RuntimeError("boom")


def crash(ctx):
    yield Row("first", "PASS", 1.0)
    os._exit(3)  # a segfault, or the OOM killer


def exit_hangs(ctx):
    atexit.register(time.sleep, 600)  # as destroy_process_group() can, after everything was reported
    for name in ("first", "second", "third"):
        yield Row(name, "PASS", 1.0)


def facts(ctx):
    yield {"name": "fake GPU"}
    for name in ("first", "second", "third"):
        yield Row(name, "WARN", {"x": 0.5})
