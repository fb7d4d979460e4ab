"""The second turn of a chat with a long history, with and without prefix reuse
(llama.serve --noprefix_reuse).

    python benchmarks/bench_prefix_reuse.py --ckpt_dir DIR --tokenizer_path DIR/tokenizer.json \
        [--history_tokens 1000] [--turns 3] [--json out.json]

For each setting a server starts (eager, one rank); a chat whose system message and first user
message hold about --history_tokens tokens gets its first answer (greedy, 24 tokens), then each
later turn sends the whole conversation so far plus a short new message, streamed: its time to
first token (TTFT) is timed as the client sees it. Its answers must be the same with and without
reuse (greedy); the script says so.
"""

import argparse
import json
import os
import statistics
import time
from typing import Dict, List

import httpx
from bench_serve import REPO, start_server, stop_server

STORY = ("The old lighthouse keeper kept a log of every ship that passed, the weather of each day, "
         "and the small repairs the tower needed. ")


def chat(url: str, model: str, messages: List[Dict], max_tokens: int) -> Dict:
    """Streams one chat turn: its text and its time to first token."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    sent, first, text = time.perf_counter(), None, []
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
                if delta:
                    first = first or time.perf_counter()
                    text.append(delta)
    return {"text": "".join(text), "ttft_s": (first or time.perf_counter()) - sent}


def conversation(url: str, args) -> Dict:
    model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
    history = [{"role": "system", "content": "You summarise logs briefly."},
               {"role": "user", "content": STORY * (args.history_tokens // 22) + "What happened?"}]
    first = chat(url, model, history, 24)
    history.append({"role": "assistant", "content": first["text"]})
    turns = []
    for n in range(args.turns):
        history.append({"role": "user", "content": f"And on day {n + 2}?"})
        reply = chat(url, model, history, 24)
        history.append({"role": "assistant", "content": reply["text"]})
        turns.append(reply)
    return {"first_turn_ttft_s": first["ttft_s"], "later_ttft_s": [t["ttft_s"] for t in turns],
            "texts": [first["text"]] + [t["text"] for t in turns]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt_dir", required=True)
    parser.add_argument("--tokenizer_path", required=True)
    parser.add_argument("--history_tokens", type=int, default=1000)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    args.ranks, args.max_batch_size, args.max_seq_len, args.compile = 1, 4, args.history_tokens + 512, False
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    results = {}
    for name, flags in (("reuse", []), ("no reuse", ["--noprefix_reuse"])):
        args.server_flags = flags
        server, url = start_server(args, env)
        try:
            results[name] = conversation(url, args)
        finally:
            stop_server(server)
        print(name, json.dumps({k: v for k, v in results[name].items() if k != "texts"}), flush=True)
    with_reuse, without = (statistics.median(results[k]["later_ttft_s"]) for k in ("reuse", "no reuse"))
    same = results["reuse"]["texts"] == results["no reuse"]["texts"]
    print(f"\nlater turns' TTFT (median of {args.turns}): {1000 * with_reuse:.0f} ms with prefix reuse, "
          f"{1000 * without:.0f} ms without: {without / with_reuse:.1f}x; same answers: {same}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
