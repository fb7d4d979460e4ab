"""compile=True on CUDA: greedy tokens equal to eager's with the decode step replayed as CUDA
graphs (across a key bucket: the step's shapes change at 256 positions), the graphs actually
replayed every step, and how often each decode step makes the host wait for the device."""

import collections
import warnings
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import torch
from torch.profiler import ProfilerActivity, profile

from llama import Llama
from llama.engine import Request, SamplingParams

from .checks import Context
from .models import prompts
from .numerics import greedy, greedy_parity, guarded
from .report import Row

PROMPT_LENGTHS = [5, 240]  # the second crosses key_bucket's first edge (256) while it decodes
NEW_TOKENS = 40
STEPS = 16


def graph_launches(llama: Llama, prompt_tokens: List[List[int]], new_tokens: int) -> Dict[str, int]:
    """CUDA graph replays in one greedy generation, against its decode steps (the first new token
    comes from the prefill), counted twice: calls of torch.cuda.CUDAGraph.replay (what inductor's
    CUDA graph trees call) and the profiler's cudaGraphLaunch events; and the graphs inductor chose
    not to use (its cudagraph_skips counter)."""
    from torch._dynamo.utils import counters

    skips_before, replays = counters["inductor"]["cudagraph_skips"], [0]
    replay = torch.cuda.CUDAGraph.replay

    def counted(graph):
        replays[0] += 1
        return replay(graph)

    torch.cuda.CUDAGraph.replay = counted
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            greedy(llama, prompt_tokens, new_tokens)
            torch.cuda.synchronize()
    finally:
        torch.cuda.CUDAGraph.replay = replay
    launches = sum(e.count for e in prof.key_averages() if "cudaGraphLaunch" in e.key)
    return {"steps": new_tokens - 1, "replays": replays[0], "launches": launches,
            "skips": counters["inductor"]["cudagraph_skips"] - skips_before}


def replay_row(name: str, counts: Dict[str, int]) -> Row:
    replayed = max(counts["replays"], counts["launches"])
    ok = replayed >= counts["steps"] and counts["skips"] == 0
    status = "PASS" if ok else "FAIL" if replayed == 0 else "WARN"
    return Row(name, status, counts, "a graph replay per decode step, no cudagraph skips",
               "replays: CUDAGraph.replay calls; launches: the profiler's cudaGraphLaunch events")


def syncs_per_step(llama: Llama, prompt_tokens: List[List[int]], steps: int) -> Tuple[float, collections.Counter]:
    """Synchronizing CUDA calls (torch.cuda.set_sync_debug_mode's warnings) per engine step,
    after two warm-up steps; and the Python lines they came from."""
    engine = llama.engine
    requests = [Request(("syncs", i), p, SamplingParams(temperature=0, max_new_tokens=steps + 4))
                for i, p in enumerate(prompt_tokens)]
    engine.admit(requests)
    try:
        for _ in range(2):
            engine.step()
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for _ in range(steps):
                    engine.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
    finally:
        for r in requests:
            engine.release(r.id)
    where = collections.Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught
                                if "synchroniz" in str(w.message).lower())
    return sum(where.values()) / steps, where


def syncs_row(name: str, per_step: float, where: collections.Counter, steps: int = STEPS) -> Row:
    """One sync per step is needed (the sampled tokens read back); more is time the GPU idles."""
    lines = ", ".join(f"{line} x{n}" for line, n in where.most_common(6))
    return Row(name, "PASS" if per_step <= 1 else "WARN", per_step, "<= 1 (reading the sampled tokens back)",
               f"set_sync_debug_mode('warn') over {steps} steps: {lines or 'none'}")


def run(ctx: Context) -> Iterator[Row]:
    ckpt = ctx.tiny_checkpoint(1)
    compiled = Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=512, max_batch_size=4,
                           device="cuda", dtype="fp32", compile=True)
    eager = Llama(compiled.model, compiled.tokenizer)  # the same weights, the engine's eager step
    prompt_tokens = prompts(PROMPT_LENGTHS)
    name = "compiled = eager (CUDA graphs)"
    yield guarded(name, lambda: greedy_parity(name, eager, compiled, prompt_tokens, NEW_TOKENS))
    name = "CUDA graph replays"
    yield guarded(name, lambda: replay_row(name, graph_launches(compiled, prompt_tokens, STEPS)))
    for label, llama in (("eager", eager), ("compiled", compiled)):
        name = f"syncs per decode step ({label})"
        yield guarded(name, lambda: syncs_row(name, *syncs_per_step(llama, prompt_tokens, STEPS)))
