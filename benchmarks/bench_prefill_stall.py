"""How much a long prompt arriving holds up the streams already decoding: with and without chunked
prefill (llama.serve --prefill_chunk).

    python benchmarks/bench_prefill_stall.py --ckpt_dir DIR --tokenizer_path DIR/tokenizer.json \
        [--streams 8] [--long_tokens 2000] [--chunks 0,256] [--compile] [--json out.json]

For each --chunks value (0: prompts prefilled whole) a server starts; --streams streamed
completions decode, greedy, a short prompt each; once every stream has sent a few tokens, one
request with a --long_tokens-token prompt arrives (max_tokens 1). Each stream's gaps between
tokens are timed as the client receives them: the worst gap while the long prompt is being
prefilled (from its sending to its answer) against the streams' median gap before it arrived.
"""

import argparse
import asyncio
import json
import os
import statistics
import time
from typing import Dict, List

import httpx
from bench_serve import REPO, start_server, stop_server

from llama import Tokenizer

SHORT = "Count from one to one thousand in words: one, two, three,"
FILLER = "The history of every city is written in its streets, its markets and its old stone walls. "


async def stream(client: httpx.AsyncClient, url: str, model: str, max_tokens: int, times: List[float]) -> None:
    body = {"model": model, "prompt": SHORT, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                times.append(time.perf_counter())


async def long_request(client: httpx.AsyncClient, url: str, model: str, prompt: List[int]) -> Dict[str, float]:
    sent = time.perf_counter()
    response = await client.post(url + "/v1/completions",
                                 json={"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0})
    response.raise_for_status()
    return {"sent": sent, "answered": time.perf_counter()}


async def measure(url: str, args, prompt: List[int]) -> Dict[str, float]:
    model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
    async with httpx.AsyncClient(timeout=600) as client:
        times: List[List[float]] = [[] for _ in range(args.streams)]
        streams = [asyncio.ensure_future(stream(client, url, model, args.stream_tokens, t)) for t in times]
        while min(len(t) for t in times) < 8:  # every stream decoding at its pace
            await asyncio.sleep(0.05)
        long = await long_request(client, url, model, prompt)
        await asyncio.gather(*streams)
    before = [b - a for t in times for a, b in zip(t, t[1:]) if b < long["sent"]]
    during = [b - a for t in times for a, b in zip(t, t[1:]) if b > long["sent"] and a < long["answered"]]
    return {"gap_before_p50_ms": 1000 * statistics.median(before),
            "worst_gap_during_ms": 1000 * max(during) if during else float("nan"),
            "long_prompt_latency_ms": 1000 * (long["answered"] - long["sent"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt_dir", required=True)
    parser.add_argument("--tokenizer_path", required=True)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--stream_tokens", type=int, default=160)
    parser.add_argument("--long_tokens", type=int, default=2000)
    parser.add_argument("--chunks", default="0,256")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    args.ranks, args.max_batch_size = 1, args.streams + 1
    args.max_seq_len = args.long_tokens + 64
    tokenizer = Tokenizer(args.tokenizer_path)
    prompt = tokenizer.encode(FILLER * (args.long_tokens // 10), bos=True, eos=False)[:args.long_tokens]
    rows = []
    for chunk in [int(c) for c in args.chunks.split(",")]:
        args.server_flags = ["--prefill_chunk", str(chunk)]
        server, url = start_server(args, {**os.environ, "PYTHONPATH": str(REPO)})
        try:
            row = {"prefill_chunk": chunk, **asyncio.run(measure(url, args, prompt))}
        finally:
            stop_server(server)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{args.streams} streams decoding, a {len(prompt)}-token prompt arriving:\n")
    print("| --prefill_chunk | streams' median gap before (ms) | worst gap while it prefills (ms) | its latency (ms) |")
    print("|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['prefill_chunk'] or 'whole'} | {r['gap_before_p50_ms']:.0f} | {r['worst_gap_during_ms']:.0f} | "
              f"{r['long_prompt_latency_ms']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
