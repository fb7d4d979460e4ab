"""Which of scaled_dot_product_attention's kernels runs, read from the profiler's event names: in
the (always eager) prefill, in an eager decode step, and in the compiled decode step, at the 8B
attention shape (32 query heads, 8 KV heads, head size 128) in bf16. The math kernel copies K/V
for every query head and builds the whole score matrix: it must not be the one."""

from typing import Callable, Dict, Iterable, Iterator, List

import torch
from torch.profiler import ProfilerActivity, profile

from llama.compiling import CompiledDecode
from llama.engine import Engine, Request, SamplingParams

from .checks import Context
from .models import LLAMA31_8B, prompts, random_model
from .numerics import guarded
from .report import Row

FAST = ("flash", "efficient", "cudnn")
PREFILL = 2048
VOCAB = 4096  # the vocabulary does not touch attention; a small one keeps the model small


def backend_of(name: str) -> str:
    """The SDPA backend an operator or kernel name belongs to: flash, efficient, cudnn, math, or
    "" for anything else. cuDNN's kernels may say "flash" too, so cuDNN is recognised first; the
    CPU's own flash kernel (_for_cpu) is not a CUDA backend."""
    n = name.lower()
    if "for_cpu" in n:
        return ""
    if "cudnn" in n and any(word in n for word in ("attention", "sdpa", "fmha", "mha")):
        return "cudnn"
    if "attention_math" in n:
        return "math"
    if "flash" in n:
        return "flash"
    if any(word in n for word in ("efficient_attention", "fmha", "memeff", "mem_eff")):
        return "efficient"
    return ""


def classify(names: Iterable[str]) -> Dict[str, List[str]]:
    """Backend -> the names seen of it."""
    seen: Dict[str, List[str]] = {}
    for name in names:
        backend = backend_of(name)
        if backend and name not in seen.setdefault(backend, []):
            seen[backend].append(name)
    return seen


def kernel_row(name: str, seen: Dict[str, List[str]], what: str, hidden_hint: str = "") -> Row:
    """FAIL when the math kernel ran, PASS when only fast ones did, WARN when none was seen."""
    fast = [b for b in FAST if b in seen]
    threshold = "flash, efficient or cudnn; not math"
    if "math" in seen:
        return Row(name, "FAIL", ", ".join(["math"] + fast), threshold, f"{what}: the math kernel ran ({seen['math'][0]})")
    if fast:
        return Row(name, "PASS", ", ".join(fast), threshold, f"{what}: {seen[fast[0]][0][:120]}")
    return Row(name, "WARN", None, threshold, f"{what}: no attention kernel seen{hidden_hint}")


def profiled_names(fn: Callable[[], object], cpu: bool = True) -> List[str]:
    """The names of every operator (when cpu) and device kernel the profiler records while fn runs."""
    activities = ([ProfilerActivity.CPU] if cpu else []) + \
        ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    names = set()
    for event in prof.events():
        names.add(event.name)
        names.update(k.name for k in getattr(event, "kernels", []))
    return sorted(names)


def run(ctx: Context) -> Iterator[Row]:
    device = torch.device("cuda", 0)
    params = {**LLAMA31_8B, "n_layers": 1}
    model = random_model(params, device, torch.bfloat16, max_batch_size=1, max_seq_len=PREFILL + 64, vocab_size=VOCAB)
    engine = Engine(model)
    (prompt,) = prompts([PREFILL], low=10, high=VOCAB)
    request = Request(0, prompt, SamplingParams(temperature=0, max_new_tokens=16))
    shape = "32 query / 8 KV heads of 128, bf16"
    name = "SDPA kernel, prefill"
    yield guarded(name, lambda: kernel_row(name, classify(profiled_names(lambda: engine.admit([request]))),
                                           f"{PREFILL}-token prefill from position 0 (causal, no mask), {shape}"))
    name = "SDPA kernel, decode (eager)"
    yield guarded(name, lambda: kernel_row(name, classify(profiled_names(engine.step)),
                                           f"one eager decode step at position {PREFILL} (masked, query groups "
                                           f"folded), {shape}"))
    engine.release(0)
    step = CompiledDecode(model)
    tokens, start = torch.tensor([[5]], device=device), torch.tensor([PREFILL])

    def compiled_steps():  # the first compiles, the next record and replay the CUDA graph
        for _ in range(3):
            step(tokens, start, PREFILL + 1)

    name = "SDPA kernel, decode (compiled)"
    # CPU events left out: the first call compiles, and tracing would record thousands of them.
    yield guarded(name, lambda: kernel_row(name, classify(profiled_names(compiled_steps, cpu=False)),
                                           f"the compiled decode step (CompiledDecode), {shape}",
                                           " (the compiler may have written attention as matmul + softmax, "
                                           "the math path, or the profiler saw no kernels inside the graphs)"))
