"""Serving under concurrent load: continuous batching (llama.serve) against one request at a time
and against static batching.

    python benchmarks/bench_serve.py --ckpt_dir DIR --tokenizer_path DIR/tokenizer.json \
        [--ranks 3] [--clients 16] [--max_batch_size 16] [--requests 32] [--compile] [--json results.json]
        [--api chat] [--no_static] [--multi_turn 4] [--server_flag=--quantize=int4 ...]
        [--peer_llama_server PATH/llama-server --peer_gguf MODEL.gguf]

The same fixed requests (prompts of different lengths, greedy, a fixed mix of max_tokens) run three
ways, and each way reports requests/s, generated tokens/s, time to first token (TTFT) and time per
output token (TPOT = (latency - TTFT) / (tokens - 1)), p50 and p99:
- one at a time: one client sends the requests to the server one after another;
- static batching: the runner's stream_text_completion over the requests in chunks of
  max_batch_size, under torchrun with the same ranks (a batch runs until its longest request
  ends, and only then do its clients send their next requests, so a request's latency is its
  chunk's end; TTFT is when its first text came out, from the chunk's start);
- continuous batching: --clients clients send to the server at once, each its next request as
  soon as the last one is answered (streamed; usage counts the tokens).
Tokens are those each request really generated (a stop token can end one before max_tokens).
Every run's prompts open with a number of their own, so no run finds an earlier one's prompts in a
prefix cache. --api chat sends chat requests (/v1/chat/completions, with a system message, so both
servers format the same ChatML) instead of completions. --multi_turn N adds a chat load: --clients
conversations at once, each N turns, every turn sending the whole conversation so far and a new
question (what prefix reuse is for).

--peer_llama_server runs llama.cpp's server on --peer_gguf as a peer (not in CI): the same
client, load and table, started with --max_batch_size slots (-np), a context of max_batch_size *
max_seq_len (-c, so max_seq_len per slot) and --threads threads (-t). The server under test gets
the same threads (OMP_NUM_THREADS, split between its ranks).
Needs the serve extra and httpx (the test extra has both).
"""

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parent.parent

# Prompts of different lengths (about 5 to 120 tokens) and a fixed mix of output lengths whose
# mean is 64 tokens.
TEXTS = [
    "The capital of France is",
    "Here is a short story about a robot who learns to paint:",
    "Write a list of ten things to pack for a week of hiking in the mountains, with a reason for each:",
    "def quicksort(items):\n    \"\"\"Sorts a list of numbers.\"\"\"\n",
    "Dear hiring manager,\n\nI am writing to apply for the position of data analyst that I saw advertised "
    "on your website last week. Over the past five years I have worked with large data sets in the retail "
    "and logistics industries, building reports and dashboards that helped managers plan stock, staff and "
    "deliveries. I am confident that",
    "Q: What causes the seasons on Earth?\nA:",
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "several existing technologies into a practical system for producing books. Before that, books were "
    "copied by hand, which made them rare and expensive. Gutenberg's press used movable metal type, an "
    "oil-based ink and a wooden screw press adapted from those used to make wine and olive oil. The "
    "result was",
    "Translate to French: I would like a cup of coffee and a croissant, please.",
]
OUTPUT_LENGTHS = [8, 24, 40, 56, 72, 88, 104, 120]


def workload(n: int, max_tokens: Optional[int]) -> List[Tuple[str, int]]:
    """n (prompt, max_tokens) pairs; max_tokens None: the fixed mix."""
    return [(TEXTS[i % len(TEXTS)], max_tokens or OUTPUT_LENGTHS[(3 * i) % len(OUTPUT_LENGTHS)])
            for i in range(n)]


def summary(name: str, records: List[Dict], wall: float) -> Dict:
    """records: per request {ttft, latency, tokens} in seconds / tokens."""
    def pct(values, q):
        values = sorted(values)
        if len(values) == 1:
            return values[0]
        return statistics.quantiles(values, n=100, method="inclusive")[q - 1]

    ttft = [r["ttft"] for r in records]
    tpot = [(r["latency"] - r["ttft"]) / (r["tokens"] - 1) for r in records if r["tokens"] > 1]
    tokens = sum(r["tokens"] for r in records)
    return {"mode": name, "requests": len(records), "seconds": wall, "requests_per_s": len(records) / wall,
            "tokens": tokens, "tokens_per_s": tokens / wall,
            "ttft_p50_ms": 1000 * pct(ttft, 50), "ttft_p99_ms": 1000 * pct(ttft, 99),
            "tpot_p50_ms": 1000 * pct(tpot, 50), "tpot_p99_ms": 1000 * pct(tpot, 99)}


# ---- static batching: runs under torchrun, every rank the same calls ---------------------------

def static_worker(args) -> None:
    sys.path.insert(0, str(REPO))
    from llama import Llama

    llama = Llama.build(args.ckpt_dir, args.tokenizer_path, max_seq_len=args.max_seq_len,
                        max_batch_size=args.max_batch_size, device="cpu", dtype="fp32", compile=args.compile)
    requests = workload(args.requests, args.max_tokens)
    llama.text_completion([requests[0][0]], temperature=0, max_gen_len=4)  # warm-up
    if args.compile:
        llama.text_completion([p for p, _ in requests[:args.max_batch_size]], temperature=0, max_gen_len=4)
    records = []
    start = time.perf_counter()
    for first in range(0, len(requests), args.max_batch_size):
        chunk = requests[first:first + args.max_batch_size]
        chunk_start = time.perf_counter()
        first_text, counts = {}, {}
        # The batch runs until its longest request ends; each request keeps its own first tokens.
        for piece in llama.stream_text_completion([p for p, _ in chunk], temperature=0, logprobs=True,
                                                  max_gen_len=max(n for _, n in chunk)):
            i = piece["index"]
            if i not in first_text and (piece["text"] or piece["result"] is not None):
                first_text[i] = time.perf_counter() - chunk_start
            if piece["result"] is not None:
                counts[i] = min(len(piece["result"]["tokens"]), chunk[i][1])
        chunk_end = time.perf_counter() - chunk_start
        records += [{"ttft": first_text[i], "latency": chunk_end, "tokens": counts[i]} for i in range(len(chunk))]
    wall = time.perf_counter() - start
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.static_out).write_text(json.dumps(summary("static batching", records, wall)))


def run_static(args, env) -> Dict:
    out = Path(args.workdir) / "static.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.ranks), __file__,
           "--static_worker", "--static_out", str(out), "--requests", str(args.requests),
           *(["--max_tokens", str(args.max_tokens)] if args.max_tokens else []),
           *(["--compile"] if args.compile else []), *common_flags(args)]
    subprocess.run(cmd, env=env, check=True)
    return json.loads(out.read_text())


# ---- the servers: one at a time, continuous batching, multi-turn chats --------------------------

SYSTEM = "You are a helpful assistant."
# The later turns of a multi-turn chat, in order.
FOLLOW_UPS = ["Can you say that more briefly?", "Why is that?", "Give me one example.", "What would you add?",
              "Summarise our conversation in one sentence."]


async def send(client, url: str, model: str, prompt, max_tokens: int, api: str) -> Dict:
    """Streams one request; prompt: a text (completions) or a list of messages (chat). Returns
    its TTFT, latency, tokens and text. Tokens: the usage chunk's count; a server that sends
    none (or not this way) is counted one token per streamed chunk that carries text."""
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    body.update({"messages": prompt} if api == "chat" else {"prompt": prompt})
    path = "/v1/chat/completions" if api == "chat" else "/v1/completions"
    start = time.perf_counter()
    first, usage, pieces = None, None, []
    async with client.stream("POST", url + path, json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"the server answered {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            for choice in chunk.get("choices") or []:
                text = choice.get("delta", {}).get("content") if api == "chat" else choice.get("text")
                if text:
                    first = first or time.perf_counter() - start
                    pieces.append(text)
            if chunk.get("usage"):
                usage = chunk["usage"]["completion_tokens"]
    latency = time.perf_counter() - start
    return {"ttft": latency if first is None else first, "latency": latency,
            "tokens": len(pieces) if usage is None else usage, "text": "".join(pieces)}


def fresh_connections(clients: int):
    """A new connection per request: llama-server closes idle kept-alive connections on its own,
    and a request sent on one just closed fails without an answer."""
    import httpx

    return httpx.Limits(max_connections=clients, max_keepalive_connections=0)


def as_prompt(text: str, api: str):
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}] if api == "chat" else text


async def drive(url: str, model: str, requests: List[Tuple[str, int]], clients: int,
                api: str = "completions") -> Tuple[List[Dict], float]:
    """`clients` clients, each sending its next request when the last one is answered."""
    import httpx

    queue = list(enumerate(requests))
    records: Dict[int, Dict] = {}

    async def client_loop(client):
        while queue:
            i, (prompt, max_tokens) = queue.pop(0)
            records[i] = await send(client, url, model, as_prompt(prompt, api), max_tokens, api)

    async with httpx.AsyncClient(timeout=600, limits=fresh_connections(clients)) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        wall = time.perf_counter() - start
    return [records[i] for i in range(len(requests))], wall


async def drive_chats(url: str, model: str, openings: List[str], turns: int, max_tokens: int) -> Tuple[List[Dict], float]:
    """One client per opening, all at once: a chat of `turns` turns each, every turn sending the
    conversation so far (the server's own answers included) and the next follow-up question.
    Records carry their turn (0: the first)."""
    import httpx

    async def chat(client, opening: str) -> List[Dict]:
        messages = as_prompt(opening, "chat")
        records = []
        for turn in range(turns):
            if turn:
                messages.append({"role": "user", "content": FOLLOW_UPS[(turn - 1) % len(FOLLOW_UPS)]})
            record = await send(client, url, model, list(messages), max_tokens, "chat")
            messages.append({"role": "assistant", "content": record["text"]})
            records.append({**record, "turn": turn})
        return records

    async with httpx.AsyncClient(timeout=600, limits=fresh_connections(len(openings))) as client:
        start = time.perf_counter()
        chats = await asyncio.gather(*(chat(client, opening) for opening in openings))
        wall = time.perf_counter() - start
    return [r for records in chats for r in records], wall


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(server: subprocess.Popen, url: str, what: str) -> None:
    import httpx

    deadline = time.time() + 900
    while time.time() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"{what} exited with code {server.returncode} before it was ready")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop_server(server)
    raise RuntimeError(f"{what} was not ready within 900 s")


def start_server(args, env) -> Tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.ranks), "-m", "llama.serve",
           "--port", str(port), "--compile" if args.compile else "--nocompile", *common_flags(args),
           *getattr(args, "server_flags", [])]
    server = subprocess.Popen(cmd, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_ready(server, url, "the server")
    return server, url


def start_llama_server(args) -> Tuple[subprocess.Popen, str]:
    """llama.cpp's server on the peer GGUF: a slot per batch row, max_seq_len per slot, the same threads."""
    port = free_port()
    cmd = [args.peer_llama_server, "-m", args.peer_gguf, "--host", "127.0.0.1", "--port", str(port),
           "-np", str(args.max_batch_size), "-c", str(args.max_batch_size * args.max_seq_len),
           "-t", str(args.threads), "--no-webui", *args.peer_flags]
    server = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=open(Path(args.workdir) / "llama-server.log", "w"))
    url = f"http://127.0.0.1:{port}"
    wait_ready(server, url, "llama-server")
    return server, url


def stop_server(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def tagged(requests: List[Tuple[str, int]], tag: str) -> List[Tuple[str, int]]:
    """The requests with prompts of their own: no run finds another's in a prefix cache."""
    return [(f"({tag}) {prompt}", max_tokens) for prompt, max_tokens in requests]


def run_server_modes(args, name: str, start) -> List[Dict]:
    """One server (start() -> (process, url)): warm-up, one at a time, continuous batching, and
    the multi-turn chats if asked. name: how the rows call this server."""
    import httpx

    requests = workload(args.requests, args.max_tokens)
    server, url = start()
    try:
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        # warm-up (with --compile: batch 1, then a full batch; our server compiles every width up front anyway)
        asyncio.run(drive(url, model, tagged(requests[:1], "warm-up"), 1, args.api))
        asyncio.run(drive(url, model, tagged(requests[:args.max_batch_size], "warm-up 2"), args.max_batch_size,
                          args.api))
        alone, wall_alone = asyncio.run(drive(url, model, tagged(requests, "one"), 1, args.api))
        together, wall_together = asyncio.run(drive(url, model, tagged(requests, "many"), args.clients, args.api))
        rows = [summary(f"{name}: one at a time", alone, wall_alone),
                summary(f"{name}: continuous batching ({args.clients} clients)", together, wall_together)]
        if args.multi_turn:
            openings = [prompt for prompt, _ in tagged(requests[:args.clients], "chat")]
            records, wall = asyncio.run(drive_chats(url, model, openings, args.multi_turn,
                                                    args.max_tokens or 64))
            rows.append(summary(f"{name}: {args.clients} chats of {args.multi_turn} turns", records, wall))
            later = [r for r in records if r["turn"] > 0]
            if later:  # the turns that follow a conversation: what prefix reuse speeds up
                later_row = summary("", later, wall)
                rows[-1].update({f"later_turns_{k}": later_row[k] for k in ("ttft_p50_ms", "ttft_p99_ms")})
    finally:
        stop_server(server)
    return rows


def run_bursts(args, name: str, start) -> List[Dict]:
    """The concurrent load args.bursts times, from the moment the server says it is ready, no
    warm-up: what a fresh server's first clients see, against its later bursts."""
    import httpx

    requests = workload(args.requests, args.max_tokens)
    started = time.perf_counter()
    server, url = start()
    print(f"{name}: ready {time.perf_counter() - started:.1f} s after the start", flush=True)
    try:
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        rows = []
        for n in range(1, args.bursts + 1):
            # Each burst's prompts open with its own number: no burst finds an earlier one's
            # prompts in the prefix cache, so the bursts differ only in what the server has warmed.
            records, wall = asyncio.run(drive(url, model, tagged(requests, str(n)), args.clients, args.api))
            rows.append(summary(f"{name}: burst {n} ({args.clients} clients)", records, wall))
            print(table(rows[-1:]), flush=True)
    finally:
        stop_server(server)
    return rows


def common_flags(args) -> List[str]:
    return ["--ckpt_dir", args.ckpt_dir, "--tokenizer_path", args.tokenizer_path,
            "--max_batch_size", str(args.max_batch_size), "--max_seq_len", str(args.max_seq_len)]


def table(rows: List[Dict]) -> str:
    lines = ["| mode | requests/s | generated tokens/s | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | "
                     f"{r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} | {r['tpot_p50_ms']:.0f} / {r['tpot_p99_ms']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt_dir", required=True)
    parser.add_argument("--tokenizer_path", required=True)
    parser.add_argument("--ranks", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of each server in all (default: the CPUs this process may use); "
                             "ours splits them between its ranks")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max_batch_size", type=int, default=16)
    parser.add_argument("--max_seq_len", type=int, default=512)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max_tokens", type=int, default=None,
                        help="the same max_tokens for every request (default: a fixed mix, mean 64)")
    parser.add_argument("--compile", action="store_true",
                        help="compiled decode step in every mode (default: eager in every mode)")
    parser.add_argument("--api", choices=("completions", "chat"), default="completions")
    parser.add_argument("--server_flag", action="append", default=[], dest="server_flags",
                        help="a flag for our server, e.g. --server_flag=--quantize=int4 (repeatable)")
    parser.add_argument("--no_static", action="store_true", help="skip static batching (the runner under torchrun)")
    parser.add_argument("--only_peer", action="store_true", help="run llama-server's rows only")
    parser.add_argument("--multi_turn", type=int, default=0,
                        help="also --clients chats of this many turns each, at once (chat API)")
    parser.add_argument("--bursts", type=int, default=0,
                        help="only the concurrent load, this many times from the server's start, no warm-up")
    parser.add_argument("--peer_llama_server", help="llama.cpp's llama-server binary: run it as a peer")
    parser.add_argument("--peer_gguf", help="the GGUF file llama-server serves")
    parser.add_argument("--peer_flag", action="append", default=[], dest="peer_flags",
                        help="a flag for llama-server (repeatable)")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--workdir", default="/tmp")
    parser.add_argument("--static_worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--static_out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.static_worker:
        return static_worker(args)
    if bool(args.peer_llama_server) != bool(args.peer_gguf):
        parser.error("--peer_llama_server and --peer_gguf go together")
    args.threads = args.threads or len(os.sched_getaffinity(0))

    threads = os.environ.get("OMP_NUM_THREADS", str(max(1, args.threads // args.ranks)))
    env = {**os.environ, "OMP_NUM_THREADS": threads,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    servers = [] if args.only_peer else [("ours", lambda: start_server(args, env))]
    if args.peer_llama_server:
        servers.append(("llama-server", lambda: start_llama_server(args)))
    print(f"load average before: {os.getloadavg()}; our server's threads per rank: {threads}", flush=True)
    rows = []
    if args.bursts:
        for name, start in servers:
            rows += run_bursts(args, name, start)
    else:
        if not args.no_static and not args.only_peer:
            rows.append(run_static(args, env))
        for name, start in servers:
            rows += run_server_modes(args, name, start)
    print(f"load average after: {os.getloadavg()}")
    print(table(rows))
    by_mode = {r["mode"]: r for r in rows}
    for name, _ in servers:
        alone = by_mode.get(f"{name}: one at a time")
        continuous = by_mode.get(f"{name}: continuous batching ({args.clients} clients)")
        if alone and continuous:
            print(f"{name}: continuous / one at a time: {continuous['tokens_per_s'] / alone['tokens_per_s']:.2f}x tokens/s")
    if len(servers) == 2 and not args.bursts:
        for mode in ("one at a time", f"continuous batching ({args.clients} clients)",
                     f"{args.clients} chats of {args.multi_turn} turns"):
            ours, peer = by_mode.get(f"ours: {mode}"), by_mode.get(f"llama-server: {mode}")
            if ours and peer:
                print(f"{mode}: ours / llama-server {ours['tokens_per_s'] / peer['tokens_per_s']:.2f}x tokens/s, "
                      f"TTFT p99 {ours['ttft_p99_ms']:.0f} against {peer['ttft_p99_ms']:.0f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
