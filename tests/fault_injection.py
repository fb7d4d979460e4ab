"""Runs a script or module (the example scripts, python -m llama.serve) with a fault injected, for
the failure tests: python tests/fault_injection.py SCRIPT.py ARGS... or ... -m MODULE ARGS...,
under torchrun like the program itself.

LLAMA_TEST_FAULT="rank=R,at=WHERE,do=WHAT" makes global rank R fail at WHERE ("build": the end of
loading, just before the ranks wait for each other; "step:N": the engine's Nth decode step in this
process) by WHAT ("raise" an exception, "kill" itself with SIGKILL, "hang" forever). The fault is
put in by wrapping the package's functions here, so the production code carries no hook.
"""

import itertools
import os
import runpy
import signal
import sys
import time

import llama.generation
from llama.engine import Engine

FAULT = os.environ.get("LLAMA_TEST_FAULT", "")


def fail(what: str) -> None:
    rank = int(os.environ.get("RANK", 0))
    if what == "kill":
        print(f"rank {rank}: killed by LLAMA_TEST_FAULT", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    if what == "hang":
        while True:
            time.sleep(60)
    raise RuntimeError(f"failure injected by LLAMA_TEST_FAULT={FAULT!r} (a test hook)")


def inject(spec: dict) -> None:
    if int(spec["rank"]) != int(os.environ.get("RANK", 0)):
        return
    if spec["at"] == "build":
        # Llama.build's last step: waiting for every rank to finish loading.
        wait_for_all_ranks = llama.generation.wait_for_all_ranks

        def failing_wait():
            fail(spec["do"])
            wait_for_all_ranks()

        llama.generation.wait_for_all_ranks = failing_wait
        return
    at, n = spec["at"].split(":")
    assert at == "step", spec
    step, steps = Engine.step, itertools.count(1)

    def failing_step(self):
        if next(steps) == int(n):
            fail(spec["do"])
        return step(self)

    Engine.step = failing_step


def main() -> None:
    if FAULT:
        inject(dict(part.split("=", 1) for part in FAULT.split(",")))
    if sys.argv[1] == "-m":
        module, sys.argv = sys.argv[2], sys.argv[2:]
        sys.path[0] = os.getcwd()  # as python -m has it
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        script, sys.argv = sys.argv[1], sys.argv[1:]
        sys.path[0] = os.path.dirname(os.path.abspath(script))
        runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
