"""Soak: drives a server for minutes with a random mix of requests and checks that it stays whole.

    python benchmarks/soak_serve.py [--minutes 10] [--clients 6] [--seed 0] [--ranks 2] [--compile]
        [--ckpt_dir DIR] [--json out.json]
    python benchmarks/soak_serve.py --url http://HOST:PORT/v1 --pid PID --max_batch_size B --max_seq_len N ...

Without --url it starts its own server on the tests' tiny random model (or --ckpt_dir: 1 shard,
with its 2-shard copy in ../mp2 for 2 ranks) and stops it at the end. --clients threads each send
one request after another, drawn (seeded) from: streamed and whole chat and completions; streams
whose client goes away after a few chunks; bad requests (each must get a 4xx); prompts near the
context; chat with response_format json_object (a finished answer must parse as JSON).

Checked (each failure is a violation; the script exits 1 if there is any):
- every request ends with a complete answer or an error (both counted by kind), none hangs (the
  client times out) or is dropped without either; errors beyond --max_errors are violations;
- at the end /metrics shows every slot free and nothing running or waiting;
- the resident memory of all the server's processes (from /proc), measured with the traffic
  paused after --warmup seconds (which begin with every kind once, then a full batch of long
  prompts) and again at the end, grows by less than --max_growth;
- the server still answers (/health, one completion) at the end; a self-started one then stops
  on SIGTERM with nothing left.
The CI test tests/test_serve_soak.py runs soak() for a minute on the tiny model.
"""

import argparse
import json
import os
import random
import re
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Dict, List, Optional

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

CLIENT_TIMEOUT = 180.0  # seconds without a byte after which a request counts as hung
KINDS = {  # kind: weight in the mix
    "chat": 3, "chat_stream": 3, "completion": 2, "completion_stream": 2, "disconnect": 2, "bad": 2,
    "long": 1, "json": 1,
}
WORDS = "the a server model request token stream answer prompt cache slot batch rank step".split()


def rss_bytes(pids: List[int]) -> int:
    """The resident memory of these processes, summed (those that have exited count 0)."""
    total = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        total += int(match.group(1)) * 1024 if match else 0
    return total


def descendants(pid: int) -> List[int]:
    """pid and every process below it (for a server given by --pid: the launcher and its ranks)."""
    children: Dict[int, List[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo += children.get(p, [])
    return found


def gauges(base: str) -> Dict[str, float]:
    """/metrics' request and slot gauges."""
    text = httpx.get(base + "/metrics", timeout=30).text
    return {name: float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))
            for name in ("llama_requests_running", "llama_requests_waiting", "llama_free_slots")}


class Mix:
    """One client's requests, drawn from `rng`: each returns (kind, outcome, detail)."""

    def __init__(self, url: str, model: str, rng: random.Random, max_seq_len: int):
        self.url, self.model, self.rng, self.max_seq_len = url, model, rng, max_seq_len
        self.http = httpx.Client(timeout=httpx.Timeout(CLIENT_TIMEOUT, connect=30))

    def one(self, kind: Optional[str] = None) -> tuple:
        """One request, of `kind` or of a kind drawn from the mix."""
        kind = kind or self.rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
        try:
            return (kind, *getattr(self, kind)())
        except httpx.TimeoutException as e:
            return kind, "hung", repr(e)
        except httpx.HTTPError as e:
            return kind, "dropped", repr(e)

    def _text(self, n: int) -> str:
        return " ".join(self.rng.choice(WORDS) for _ in range(n))

    def _messages(self) -> list:
        return [{"role": "user", "content": self._text(self.rng.randint(1, 40))}]

    def _common(self) -> dict:
        return {"model": self.model, "max_tokens": self.rng.randint(1, 48),
                "temperature": self.rng.choice([0, 0.7, 1.0]), "seed": self.rng.choice([None, self.rng.randint(0, 99)])}

    def chat(self) -> tuple:
        return self._whole("/chat/completions", {**self._common(), "messages": self._messages()})

    def completion(self) -> tuple:
        return self._whole("/completions", {**self._common(), "prompt": self._text(self.rng.randint(1, 40))})

    def chat_stream(self) -> tuple:
        return self._stream("/chat/completions", {**self._common(), "messages": self._messages()})

    def completion_stream(self) -> tuple:
        return self._stream("/completions", {**self._common(), "prompt": self._text(self.rng.randint(1, 40))})

    def disconnect(self) -> tuple:
        body = {**self._common(), "max_tokens": 400, "prompt": self._text(10)}
        return self._stream("/completions", body, leave_after=self.rng.randint(1, 6))

    def long(self) -> tuple:
        """A prompt of token ids that leaves room for only a few new tokens."""
        new = self.rng.randint(1, 8)
        n = self.max_seq_len - new - self.rng.randint(0, 16)
        body = {**self._common(), "max_tokens": new, "prompt": [self.rng.randrange(1000, 100000) for _ in range(n)]}
        return (self._stream if self.rng.random() < 0.5 else self._whole)("/completions", body)

    def json(self) -> tuple:
        body = {**self._common(), "max_tokens": 64, "messages": self._messages(),
                "response_format": {"type": "json_object"}}
        outcome, detail = self._whole("/chat/completions", body)
        if outcome == "complete" and detail == "stop":
            try:
                json.loads(self._last_content)
            except ValueError:
                return "malformed", f"not JSON: {self._last_content[:200]!r}"
        return outcome, detail

    def bad(self) -> tuple:
        """A request the server must refuse with a 4xx."""
        case = self.rng.randrange(6)
        path, body = "/chat/completions", {"model": self.model, "messages": self._messages()}
        if case == 0:
            body["model"] = "no-such-model"
        elif case == 1:
            body["messages"] = []
        elif case == 2:
            body["max_tokens"] = self.max_seq_len + 1
        elif case == 3:
            body["messages"] = [{"role": "tool", "content": "x"}]
        elif case == 4:
            body["temperature"] = "hot"
        if case == 5:
            response = self.http.post(self.url + path, content=b"{not json", headers={"Content-Type": "application/json"})
        else:
            response = self.http.post(self.url + path, json=body)
        if 400 <= response.status_code < 500 and response.status_code != 429:
            return "refused", str(response.status_code)
        return "malformed", f"bad request {case} answered {response.status_code}: {response.text[:200]}"

    def _status(self, response: httpx.Response) -> Optional[tuple]:
        """The outcome of an answer that is not a 200."""
        if response.status_code == 200:
            return None
        if response.status_code == 429:
            return "rejected", "429"
        if response.status_code >= 500:
            return "error", f"{response.status_code}: {response.text[:200]}"
        return "malformed", f"a valid request answered {response.status_code}: {response.text[:200]}"

    def _whole(self, path: str, body: dict) -> tuple:
        response = self.http.post(self.url + path, json=body)
        status = self._status(response)
        if status:
            return status
        choice = response.json()["choices"][0]
        self._last_content = choice["message"]["content"] if "message" in choice else choice["text"]
        if choice["finish_reason"] not in ("stop", "length"):
            return "malformed", f"finish_reason {choice['finish_reason']!r}"
        return "complete", choice["finish_reason"]

    def _stream(self, path: str, body: dict, leave_after: Optional[int] = None) -> tuple:
        with self.http.stream("POST", self.url + path, json={**body, "stream": True}) as response:
            if response.status_code != 200:
                response.read()
                return self._status(response)
            chunks, finish = 0, None
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    return ("complete", finish) if finish else ("malformed", "[DONE] before a finish_reason")
                chunk = json.loads(line[len("data: "):])
                if "error" in chunk:
                    return "error", chunk["error"].get("message", "")
                finish = finish or next((c["finish_reason"] for c in chunk["choices"] if c.get("finish_reason")), None)
                chunks += 1
                if leave_after is not None and chunks >= leave_after and not finish:
                    return "disconnected", f"after {chunks} chunks"  # leaving the block closes the connection
            return "dropped", "the stream ended without [DONE] or an error event"


def soak(url: str, pids: Callable[[], List[int]], seconds: float, clients: int, seed: int, max_batch_size: int,
         max_seq_len: int, warmup: float, max_growth: float = 0.10, max_errors: int = 0,
         log: Callable[[str], None] = lambda line: print(line, flush=True)) -> dict:
    """Runs the mix against the server at `url` (.../v1) and returns the report; its "violations"
    list is empty when the server held. pids() lists the server's processes now."""
    base = url.removesuffix("/v1")
    model = httpx.get(url + "/models", timeout=30).json()["data"][0]["id"]
    counts: Counter = Counter()  # (kind, outcome) -> requests
    details: List[str] = []  # what each violation and error said (the first few)
    lock = threading.Lock()
    running = threading.Event()  # cleared while the traffic pauses
    running.set()
    busy = [0]  # clients inside a request
    started = time.monotonic()
    deadline = started + seconds

    def send(mix: Mix, kind: Optional[str] = None) -> None:
        with lock:
            busy[0] += 1
        try:
            kind, outcome, detail = mix.one(kind)
        finally:
            with lock:
                busy[0] -= 1
        with lock:
            counts[kind, outcome] += 1
            if outcome not in ("complete", "refused", "disconnected", "rejected") and len(details) < 30:
                details.append(f"{kind}: {outcome}: {detail}")

    def client(i: int) -> None:
        mix = Mix(url, model, random.Random(f"{seed}/{i}"), max_seq_len)
        while time.monotonic() < deadline:
            running.wait()
            send(mix)
        mix.http.close()

    # First every kind once, then a full batch of prompts near the context at once: what a server
    # builds once (the JSON grammar's vocabulary on every rank, the largest prefill's buffers)
    # belongs to the warm-up's memory, not to its growth.
    primer = Mix(url, model, random.Random(f"{seed}/primer"), max_seq_len)
    for kind in KINDS:
        send(primer, kind)
    mixes = [Mix(url, model, random.Random(f"{seed}/long{i}"), max_seq_len) for i in range(max_batch_size)]
    longs = [threading.Thread(target=send, args=(mix, "long")) for mix in mixes]
    for t in longs:
        t.start()
    for t in longs:
        t.join()
    for mix in [primer, *mixes]:
        mix.http.close()
    log(f"{time.monotonic() - started:.0f} s: primed (every kind once, a batch of long prompts)")

    def quiet() -> None:
        """Pauses the traffic until no request is in flight."""
        running.clear()
        while busy[0]:
            time.sleep(0.05)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    samples = []  # (seconds since the start, RSS bytes), every few seconds
    baseline = None
    while any(t.is_alive() for t in threads):
        now = time.monotonic() - started
        if baseline is None and now >= warmup:
            quiet()
            time.sleep(1)  # the engine frees what the last requests held
            baseline = rss_bytes(pids())
            log(f"{now:.0f} s: warmed up; RSS {baseline / 2**20:.1f} MiB (traffic paused)")
            running.set()
        samples.append((round(now, 1), rss_bytes(pids())))
        for t in threads:
            t.join(timeout=5 / len(threads))
    ended = time.monotonic() - started

    violations = []
    bad = {k: v for k, v in counts.items() if k[1] in ("hung", "dropped", "malformed")}
    if bad:
        violations.append(f"requests that hung, were dropped or answered wrongly: {bad}")
    errors = sum(v for (_, outcome), v in counts.items() if outcome == "error")
    if errors > max_errors:
        violations.append(f"{errors} requests ended with an error (allowed: {max_errors})")
    # The slots: all free once the last answers are in (a client that left frees its slot at the
    # engine's next step).
    settled = time.monotonic() + 30
    while True:
        g = gauges(base)
        free = g == {"llama_requests_running": 0, "llama_requests_waiting": 0, "llama_free_slots": max_batch_size}
        if free or time.monotonic() > settled:
            break
        time.sleep(0.2)
    if not free:
        violations.append(f"at the end /metrics says {g} (expected every one of {max_batch_size} slots free)")
    time.sleep(1)
    final = rss_bytes(pids())
    growth = (final - baseline) / baseline if baseline else float("nan")
    if baseline is None:
        violations.append(f"the run ({seconds:g} s) ended before its warm-up ({warmup:g} s)")
    elif not growth < max_growth:
        violations.append(f"resident memory grew by {100 * growth:.1f}% after the warm-up "
                          f"({baseline / 2**20:.1f} -> {final / 2**20:.1f} MiB; allowed {100 * max_growth:g}%)")
    health = httpx.get(base + "/health", timeout=30).status_code
    answer = httpx.post(url + "/completions", json={"model": model, "prompt": "Still there?", "max_tokens": 4},
                        timeout=CLIENT_TIMEOUT)
    if health != 200 or answer.status_code != 200 or not answer.json()["choices"][0]["finish_reason"]:
        violations.append(f"at the end the server does not answer: /health {health}, completion "
                          f"{answer.status_code} {answer.text[:200]}")
    total = sum(counts.values())
    report = {
        "seconds": round(ended, 1), "clients": clients, "seed": seed, "requests": total,
        "requests_per_s": round(total / ended, 2),
        "by_kind": {kind: {o: v for (k, o), v in sorted(counts.items()) if k == kind} for kind in KINDS},
        "by_outcome": dict(Counter(o for (_, o) in counts.elements())),
        "rss_warm_mib": None if baseline is None else round(baseline / 2**20, 1),
        "rss_end_mib": round(final / 2**20, 1), "rss_peak_mib": round(max(r for _, r in samples) / 2**20, 1),
        "rss_growth_pct": round(100 * growth, 2), "metrics_end": g, "rss_samples": samples,
        "details": details, "violations": violations,
    }
    return report


def summary(report: dict) -> str:
    lines = [f"{report['requests']} requests in {report['seconds']} s ({report['requests_per_s']}/s) from "
             f"{report['clients']} clients, seed {report['seed']}",
             f"{'kind':<18} " + " ".join(f"{o:>12}" for o in ("complete", "error", "refused", "disconnected",
                                                                  "rejected", "hung/dropped", "malformed"))]
    for kind, outcomes in report["by_kind"].items():
        cells = [outcomes.get(o, 0) for o in ("complete", "error", "refused", "disconnected", "rejected")]
        cells += [outcomes.get("hung", 0) + outcomes.get("dropped", 0), outcomes.get("malformed", 0)]
        lines.append(f"{kind:<18} " + " ".join(f"{c:>12}" for c in cells))
    lines.append(f"RSS of the server's processes: {report['rss_warm_mib']} MiB after the warm-up, "
                 f"{report['rss_end_mib']} MiB at the end ({report['rss_growth_pct']:+.2f}%), peak "
                 f"{report['rss_peak_mib']} MiB")
    lines.append(f"/metrics at the end: {report['metrics_end']}")
    lines += [f"  {d}" for d in report["details"][:10]]
    lines.append("violations: " + ("none" if not report["violations"] else "; ".join(report["violations"])))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--warmup", type=float, help="seconds of traffic before the first memory sample "
                        "(default: a tenth of the run, at least 15)")
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="the server's compiled decode (default: eager)")
    parser.add_argument("--max_batch_size", type=int, default=4)
    parser.add_argument("--max_seq_len", type=int, default=1024)
    parser.add_argument("--max_growth", type=float, default=0.10)
    parser.add_argument("--max_errors", type=int, default=0)
    parser.add_argument("--ckpt_dir", type=Path, help="a 1-shard checkpoint, with its 2-shard copy in ../mp2")
    parser.add_argument("--url", help="a running server's .../v1 (with --pid: its launcher's process id)")
    parser.add_argument("--pid", type=int)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    seconds = 60 * args.minutes
    warmup = args.warmup if args.warmup is not None else max(15.0, seconds / 10)
    run = lambda url, pids: soak(url, pids, seconds, args.clients, args.seed, args.max_batch_size,  # noqa: E731
                                 args.max_seq_len, warmup, args.max_growth, args.max_errors)
    if args.url:
        if args.pid is None:
            parser.error("--url needs --pid (the server's processes, whose memory is measured)")
        report = run(args.url, lambda: descendants(args.pid))
    else:
        from tests.launch import processes_tagged
        from tests.serving import Server, tiny_checkpoints

        with tempfile.TemporaryDirectory(prefix="soak-") as root:
            if args.ckpt_dir:
                ckpt = args.ckpt_dir if args.ranks == 1 else args.ckpt_dir.parent / f"mp{args.ranks}"
            else:
                ckpt = tiny_checkpoints(root)[args.ranks]
            srv = Server(ckpt, args.ranks, "--max_batch_size", str(args.max_batch_size), "--max_seq_len",
                         str(args.max_seq_len), "--model_name", "tiny", compile=args.compile)
            try:
                print(f"server at {srv.url} on {args.ranks} rank(s); {args.minutes:g} min, warm-up {warmup:g} s",
                      flush=True)
                report = run(srv.url, lambda: [int(p.split(":", 1)[0]) for p in processes_tagged(srv.env)])
                stopped = time.monotonic()
                code = srv.stop()
                while processes_tagged(srv.env) and time.monotonic() < stopped + 60:  # ranks still leaving
                    time.sleep(0.2)
                report["stop_s"] = round(time.monotonic() - stopped, 1)
                left = processes_tagged(srv.env)
                if code is None or left:
                    report["violations"].append(f"SIGTERM at the end: exit code {code}, processes left {left}")
            finally:
                srv.kill()
    print(summary(report))
    if "stop_s" in report:
        print(f"then SIGTERM: the server exited in {report['stop_s']} s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    sys.exit(1 if report["violations"] else 0)


if __name__ == "__main__":
    main()
