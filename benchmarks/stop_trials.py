"""SIGTERM and Ctrl-C at any moment: trials that stop a real server (python -m llama.serve, on 1
rank or 2 torchrun ranks) at a chosen moment, and check how it ended.

    python benchmarks/stop_trials.py [--trials 30] [--seed 0] [--ckpt_dir DIR] [--json out.json]

Moments (each trial waits a random, seeded delay within its moment, then signals):
- idle: the server is ready and has nothing to do;
- mid_burst: streams are running (a full batch, one of them short enough to finish within the
  grace, the others too long to) and more wait in the queue; the long ones must not fail before
  the grace is over;
- warmup: --compile, before "(ready)", while the decode widths compile (a fresh compile cache, so
  they compile for real);
- after_burst: just after a burst of requests was answered;
- prefill: while a prompt near the context is prefilled in chunks (--prefill_chunk 8).
SIGTERM goes to the launcher alone (as `kill` or a service manager sends it); SIGINT goes to the
launcher's whole process group (as a terminal's Ctrl-C does: the launcher and every rank).

Each trial checks: the server exited, with every process it started gone, within BOUND seconds
of the signal (README's bound); its port is closed; every request in flight ended with a complete
answer or an error, within the bound (none hung: the clients time out); once it was ready, it
said it stopped cleanly (before, that it stopped early). Prints a table, writes JSON with --json; exits 1 if a trial failed.
Uses the tests' tiny random model unless --ckpt_dir gives one (1 shard; mp2/ beside it for 2 ranks).
The CI test tests/test_serve_stop.py runs one trial of each kind through run_trial().
"""

import argparse
import json
import random
import re
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional
from urllib.parse import urlparse

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

from llama.serve.server import SHUTDOWN_GRACE  # noqa: E402
from tests.launch import processes_tagged  # noqa: E402
from tests.serving import READY, START, Server, tiny_checkpoints  # noqa: E402

BOUND = 30.0  # README: every rank exits within 30 s of SIGTERM / Ctrl-C
MOMENTS = ("idle", "mid_burst", "warmup", "after_burst", "prefill")
DELAYS = {  # seconds: the range each moment's random delay is drawn from
    "idle": (0.0, 3.0),  # after "(ready)"
    "mid_burst": (0.0, 2.0),  # after every running stream has its first token
    "warmup": (0.0, 4.0),  # after "Compiling the decode step" (a cold compile takes far longer)
    "after_burst": (0.0, 0.5),  # after the burst's last answer
    "prefill": (0.0, 0.2),  # after the engine took the long prompt (its prefill: 0.2-2 s here)
}
COMPILING = re.compile(r"Compiling the decode step")
STOPPED = "Server stopped: every rank has left its loop"
EARLY = "before the server was ready"  # what a rank stopped before that says
BATCH = 4
SEQ_LEN = 2048
FLAGS = ["--max_batch_size", str(BATCH), "--max_queue", "8", "--max_seq_len", str(SEQ_LEN), "--model_name", "tiny",
         "--prefill_chunk", "8"]
LONG_PROMPT = 1900  # tokens: 238 chunks of 8
CLIENT_TIMEOUT = BOUND + 15  # seconds without a byte after which a client counts its request as hung


@dataclass
class Trial:
    ranks: int
    moment: str
    signal: str  # "SIGTERM" (to the launcher) or "SIGINT" (to its process group)
    delay: float


@dataclass
class Call:
    """One request in flight, and how it ended: complete (a whole answer), error (an error status
    or an error event), dropped (the connection closed without either), hung (the client timed out)."""
    name: str
    stream: bool
    outcome: str = "pending"
    status: Optional[int] = None
    first_token: Optional[float] = None  # time.monotonic() of its first token
    ended: Optional[float] = None
    detail: str = ""


def plan(trials: int, seed: int) -> List[Trial]:
    """`trials` trials, each moment on 1 and 2 ranks in turn; every third block of ten sends SIGINT
    to the group (so 30 trials hold every moment x ranks x signal, SIGTERM twice)."""
    rng = random.Random(seed)
    out = []
    for i in range(trials):
        moment = MOMENTS[i % len(MOMENTS)]
        ranks = 1 + (i // len(MOMENTS)) % 2
        sig = "SIGINT" if (i // (2 * len(MOMENTS))) % 3 == 1 else "SIGTERM"
        out.append(Trial(ranks, moment, sig, round(rng.uniform(*DELAYS[moment]), 3)))
    return out


def _request(url: str, call: Call, path: str, body: dict) -> None:
    """Sends one request and records how it ended (runs on a thread of its own)."""
    try:
        with httpx.Client(timeout=httpx.Timeout(CLIENT_TIMEOUT, connect=10)) as client:
            if not call.stream:
                response = client.post(url + path, json=body)
                call.status = response.status_code
                data = response.json()
                if response.status_code == 200 and data["choices"][0]["finish_reason"]:
                    call.outcome, call.first_token = "complete", time.monotonic()
                else:
                    call.outcome, call.detail = "error", data.get("error", {}).get("message", "")
                return
            with client.stream("POST", url + path, json={**body, "stream": True}) as response:
                call.status = response.status_code
                if response.status_code != 200:
                    response.read()
                    call.outcome, call.detail = "error", response.json().get("error", {}).get("message", "")
                    return
                finished = False
                for line in response.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        call.outcome = "complete" if finished else "dropped"
                        return
                    chunk = json.loads(line[len("data: "):])
                    if "error" in chunk:
                        call.outcome, call.detail = "error", chunk["error"].get("message", "")
                        return
                    call.first_token = call.first_token or time.monotonic()
                    finished = finished or any(c.get("finish_reason") for c in chunk["choices"])
                call.outcome, call.detail = "dropped", "the stream ended without [DONE] or an error event"
    except httpx.TimeoutException as e:
        call.outcome, call.detail = "hung", repr(e)
    except httpx.HTTPError as e:
        call.outcome, call.detail = "dropped", repr(e)
    finally:
        call.ended = time.monotonic()


def _start(url: str, calls: List[Call], threads: List[threading.Thread], name: str, stream: bool,
           body: dict, path: str = "/completions") -> Call:
    call = Call(name, stream)
    thread = threading.Thread(target=_request, args=(url, call, path, {"model": "tiny", "temperature": 0, **body}),
                              daemon=True)
    thread.start()
    calls.append(call)
    threads.append(thread)
    return call


def _wait_until(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _gauge(url: str, name: str) -> float:
    """/metrics' count of the requests running (in the engine) or waiting (queued)."""
    text = httpx.get(url.removesuffix("/v1") + "/metrics", timeout=10).text
    return float(re.search(rf"^llama_requests_{name} (\S+)$", text, re.M).group(1))


def _port_open(url: str) -> bool:
    address = urlparse(url)
    with socket.socket() as s:
        return s.connect_ex((address.hostname, address.port)) == 0


def run_trial(ckpts: Dict[int, Path], trial: Trial, bound: float = BOUND) -> dict:
    """Starts a server, brings it to the trial's moment, signals, and checks how it ended.
    Returns the trial with what was measured, its failures (empty: it passed) and the output's tail."""
    url = None
    calls: List[Call] = []
    threads: List[threading.Thread] = []
    failures: List[str] = []
    hit = True  # the signal came at the moment meant (checked where it can be missed)
    with tempfile.TemporaryDirectory(prefix="stop-trial-cache-") as cache:
        env = {"TORCHINDUCTOR_CACHE_DIR": cache} if trial.moment == "warmup" else {}
        srv = Server(ckpts[trial.ranks], trial.ranks, *FLAGS, compile=trial.moment == "warmup", wait_ready=False,
                     session=True, **env)
        try:
            if trial.moment == "warmup":
                if srv.wait_for(COMPILING, START) is None:
                    raise RuntimeError("the server never started compiling")
            elif srv.wait_for(READY, START) is None or srv.url is None:
                raise RuntimeError("the server did not start")
            url = srv.url
            if trial.moment == "mid_burst":
                # A full batch, one after another (the last short enough to end within the grace),
                # then two more that wait in the queue.
                for i in range(BATCH):
                    call = _start(url, calls, threads, f"stream{i}", True,
                                  {"prompt": f"Hello {i}", "max_tokens": 60 if i == BATCH - 1 else 2000})
                    if not _wait_until(lambda: call.first_token or call.ended, 120):
                        raise RuntimeError("a stream of the burst did not start")
                for i in range(2):
                    _start(url, calls, threads, f"queued{i}", i == 0, {"prompt": f"Hi {i}", "max_tokens": 8})
                if not _wait_until(lambda: _gauge(url, "waiting") + _gauge(url, "running")
                                   >= sum(c.ended is None for c in calls), 60):
                    raise RuntimeError("the queued requests did not arrive")
            elif trial.moment == "after_burst":
                for i in range(BATCH):
                    _start(url, calls, threads, f"burst{i}", i % 2 == 0, {"prompt": f"Hi {i}", "max_tokens": 8})
                for thread in threads:
                    thread.join(120)
            elif trial.moment == "prefill":
                long = _start(url, calls, threads, "long_prompt", True,
                              {"prompt": [1000 + (7 * i) % 90000 for i in range(LONG_PROMPT)], "max_tokens": 40})
                if not _wait_until(lambda: long.ended or _gauge(url, "running") > 0, 60):  # the engine has taken it
                    raise RuntimeError("the long prompt was not admitted")
            time.sleep(trial.delay)
            signaled = time.monotonic()
            if trial.moment == "warmup":
                hit = srv.url is None  # still compiling: not ready yet
            elif trial.moment == "mid_burst":
                hit = any(c.ended is None for c in calls[:BATCH - 1])  # long streams still running
            elif trial.moment == "prefill":
                hit = long.first_token is None  # its prefill had not ended
            srv.signal(getattr(signal, trial.signal), group=trial.signal == "SIGINT")
            # The launcher's exit, then every process it started (the launcher may return first).
            code = srv.wait(bound + 30)
            _wait_until(lambda: not processes_tagged(srv.env), bound + 30)
            exit_s = time.monotonic() - signaled
            left = processes_tagged(srv.env)
            for thread in threads:
                thread.join(CLIENT_TIMEOUT + 5)
        finally:
            srv.kill()
    if code is None:
        failures.append(f"the launcher was still running {bound + 30:g} s after the signal")
    if left:
        failures.append(f"processes left: {left}")
    elif exit_s > bound:
        failures.append(f"took {exit_s:.1f} s to exit, over the bound of {bound:g} s")
    if url is not None and _port_open(url):
        failures.append(f"the port of {url} is still open")
    for call in calls:
        if call.outcome not in ("complete", "error"):
            failures.append(f"{call.name}: {call.outcome} ({call.detail})")
        elif call.ended is not None and call.ended - signaled > bound:
            failures.append(f"{call.name}: ended {call.ended - signaled:.1f} s after the signal")
    for call in calls[:BATCH] if trial.moment == "mid_burst" else []:
        # A stream that was running when the signal came gets the grace: it cannot end with an
        # error before (2000 tokens take far longer than the grace on a CPU).
        if call.outcome == "error" and call.first_token and call.first_token < signaled \
                and call.ended - signaled < SHUTDOWN_GRACE - 0.5:
            failures.append(f"{call.name}: its error came {call.ended - signaled:.1f} s after the signal, "
                            f"within the {SHUTDOWN_GRACE:g} s grace")
    ready = url is not None
    if ready and STOPPED not in srv.output:
        failures.append(f"it did not say {STOPPED!r}")
    if not ready and EARLY not in srv.output:
        failures.append(f"it did not say it was stopping {EARLY!r}")
    outcomes = [c.outcome for c in calls]
    return {**asdict(trial), "hit": hit, "exit_s": round(exit_s, 2), "code": code, "left": len(left),
            "port_closed": None if url is None else not _port_open(url),
            "complete": outcomes.count("complete"), "error": outcomes.count("error"),
            "bad": len(outcomes) - outcomes.count("complete") - outcomes.count("error"),
            "calls": [{**asdict(c), "first_token": _after(c.first_token, signaled), "ended": _after(c.ended, signaled)}
                      for c in calls],
            "failures": failures, "output_tail": srv.output[-4000:] if failures else ""}


def _after(moment: Optional[float], signaled: float) -> Optional[float]:
    """A time.monotonic() as seconds after the signal (negative: before)."""
    return None if moment is None else round(moment - signaled, 3)


def table(rows: List[dict]) -> str:
    head = (f"{'#':>3} {'ranks':>5} {'moment':<11} {'signal':<7} {'delay s':>7} {'hit':>4} {'exit s':>6} "
            f"{'code':>4} {'left':>4} {'port':>6} {'complete':>8} {'error':>5} {'bad':>3}  result")
    lines = [head, "-" * len(head)]
    for i, r in enumerate(rows):
        port = "n/a" if r["port_closed"] is None else ("closed" if r["port_closed"] else "OPEN")
        lines.append(f"{i:>3} {r['ranks']:>5} {r['moment']:<11} {r['signal']:<7} {r['delay']:>7.3f} "
                     f"{'yes' if r['hit'] else 'no':>4} {r['exit_s']:>6.1f} {str(r['code']):>4} {r['left']:>4} "
                     f"{port:>6} {r['complete']:>8} {r['error']:>5} {r['bad']:>3}  "
                     f"{'ok' if not r['failures'] else 'FAIL: ' + '; '.join(r['failures'])}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ckpt_dir", type=Path, help="a 1-shard checkpoint, with its 2-shard copy in ../mp2")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    trials = plan(args.trials, args.seed)
    print(f"{len(trials)} trials, seed {args.seed}; bound {BOUND:g} s", flush=True)
    with tempfile.TemporaryDirectory(prefix="stop-trials-") as root:
        ckpts = ({1: args.ckpt_dir, 2: args.ckpt_dir.parent / "mp2"} if args.ckpt_dir else tiny_checkpoints(root))
        rows = []
        for i, trial in enumerate(trials):
            started = time.monotonic()
            try:
                row = run_trial(ckpts, trial)
            except RuntimeError as e:  # the server never reached the moment: the trial could not run
                row = {**asdict(trial), "hit": False, "exit_s": float("nan"), "code": None, "left": 0,
                       "port_closed": None, "complete": 0, "error": 0, "bad": 0, "calls": [],
                       "failures": [f"not run: {e}"], "output_tail": ""}
            rows.append(row)
            print(f"trial {i}: {trial} -> {'ok' if not row['failures'] else row['failures']} "
                  f"({time.monotonic() - started:.0f} s)", flush=True)
            if row["failures"] and row["output_tail"]:
                print(row["output_tail"], flush=True)
    print(table(rows))
    failed = sum(bool(r["failures"]) for r in rows)
    exits = [r["exit_s"] for r in rows if r["exit_s"] == r["exit_s"]]
    print(f"{len(rows) - failed}/{len(rows)} passed; exit after the signal: max {max(exits, default=0):.1f} s, "
          f"bound {BOUND:g} s; moments hit: {sum(r['hit'] for r in rows)}/{len(rows)}")
    if args.json:
        args.json.write_text(json.dumps({"seed": args.seed, "bound_s": BOUND, "trials": rows}, indent=1))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
