"""Generation speed and memory, our runner against Hugging Face transformers (and llama.cpp) on
the same weights.

    python benchmarks/bench_generate.py --ckpt_dir DIR --tokenizer_path DIR/tokenizer.json \
        --hf_source PATH_TO_GGUF_OR_HF_FOLDER [--threads 2] [--peers llamacpp] [--json results.json]
    torchrun --nproc_per_node N benchmarks/bench_generate.py --ckpt_dir DIR ... --configs compile

Each runner and each of our configurations (--configs: plain, compile, compile+int8, ...) is
measured in its own child process, greedy, same prompts, same dtype, same thread count, stop
tokens ignored so every run makes the same number of tokens. Every figure is the median of --runs
runs after a warm-up. Decode speed is the difference between generating N tokens and generating 1,
so prefill is not counted in it. Loading is measured apart, in a process that loads for one
sequence (so no large KV cache), from a cold page cache: against reading the shard files once.

--peers llamacpp also measures llama.cpp (through llama-cpp-python, installed apart: it is not a
dependency of ours) on the GGUF given as --hf_source, batch 1 only, the same way: same prompt
tokens, same token count, greedy, end of text ignored, same threads.

The limit a decode rate is held against is this machine's read bandwidth measured the way decode
reads memory, a one-row product over 1 GiB of fp32 weights at its fastest setting, measured again
before and after every configuration (it moves within minutes on a shared machine): each row is
compared with the mean of the two next to it. A large copy's bandwidth is kept for reference.
--startup CONFIG measures process start to the first decoded token twice, with PyTorch's compile
caches and our kernel cache empty (cold: a new machine) and then filled by the first run (warm).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def median_time(fn: Callable[[], None], runs: int, warm_up: bool = True) -> float:
    if warm_up:
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def memory_bandwidth(runs: int = 5, size_bytes: int = 1 << 30) -> float:
    """Bytes per second of a large copy, counting the bytes read and the bytes written."""
    src = torch.ones(size_bytes // 4)
    dst = torch.empty_like(src)
    seconds = median_time(lambda: dst.copy_(src), runs)
    return 2 * size_bytes / seconds


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def prompts_of_lengths(lengths: List[int], vocab_low: int = 1000) -> List[List[int]]:
    """Deterministic token prompts of given lengths (content does not matter for speed)."""
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(vocab_low, vocab_low + 20000, (n,), generator=gen).tolist() for n in lengths]


RAGGED_LENGTHS = [4, 60, 117, 174, 231, 288, 345, 400]  # spread from 4 to 400 tokens
CONFIGS = {  # Llama.build's levers; repeat_kv: copy K/V per query head, as Meta's code does (attend_with_copies)
    "plain": {}, "compile": {"compile": True}, "int8": {"quantize": "int8"}, "int4": {"quantize": "int4"},
    "compile+int8": {"compile": True, "quantize": "int8"}, "compile+int4": {"compile": True, "quantize": "int4"},
    "repeat-kv": {"repeat_kv": True},
}
PEERS = ("llamacpp",)


def shard_files(ckpt_dir: str) -> List[Path]:
    return sorted(Path(ckpt_dir).glob("consolidated.*.pth"))


def drop_from_page_cache(paths: List[Path]) -> None:
    """So the next read comes from disk, as the first load after a reboot would."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_files_once(paths: List[Path]) -> float:
    start = time.perf_counter()
    for path in paths:
        with open(path, "rb") as f:
            while f.read(8 << 20):
                pass
    return time.perf_counter() - start


def read_limit(runs: int = 5, size_bytes: int = 1 << 30) -> Dict:
    """Bytes per second read by a one-row product over size_bytes of fp32 weights (as a decode step
    reads its weights), at the faster of the BLAS call and the compiled multiply-and-sum that our
    compiled step uses. Measured in a child process, so the parent holds no memory meanwhile."""
    weights = [torch.randn(8192, 4096) for _ in range(size_bytes // (8192 * 4096 * 4))]
    x = torch.randn(4096)
    summed = torch.compile(lambda x, w: (x * w).sum(-1))

    def over_all_weights(product):
        for w in weights:
            product(x, w)

    with torch.inference_mode():
        rates = {name: size_bytes / median_time(lambda: over_all_weights(product), runs)
                 for name, product in (("blas", lambda x, w: torch.mv(w, x)), ("compiled", summed))}
    return {"bytes_per_second": max(rates.values()), "by_setting": rates}


def streamed_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter (and quantized weight, scale and
    zero) but the embedding table, of which a step reads one row per sequence (a tied output
    layer shares it and is counted as the output)."""
    embedding = model.tok_embeddings.weight
    tensors = [t for name, t in model.named_parameters(remove_duplicate=False) if t is not embedding]
    tensors += [t for name, t in model.named_buffers() if ".product." in f".{name}"]
    if embedding is not None and model.output.weight is embedding:
        tensors.append(embedding)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


# --------------------------------------------------------------------------------------------
# Our runner


def build_ours(args, max_batch_size: int, **levers):
    from llama import Llama

    return Llama.build(args.ckpt_dir, args.tokenizer_path, max_seq_len=args.max_seq_len,
                       max_batch_size=max_batch_size, device="cpu" if args.device == "cpu" else "auto",
                       dtype=args.dtype, quant_group=args.quant_group, **levers)


def bench_load(args) -> Dict:
    """Load time and memory for one sequence, from a cold page cache, against reading the files."""
    start = time.perf_counter()
    import torch._dynamo  # noqa: F401  torch's compiler; fairscale's layers import it on first use
    from llama.distributed import is_main_process
    import_seconds = time.perf_counter() - start
    files = shard_files(args.ckpt_dir)
    drop_from_page_cache(files)
    read_seconds = read_files_once(files)
    drop_from_page_cache(files)
    rss_before = peak_rss_bytes()
    start = time.perf_counter()
    generator = build_ours(args, max_batch_size=1)
    load_seconds = time.perf_counter() - start
    # Parameters and the products' buffers (quantized or bf16 weights); not the KV cache.
    held = list(generator.model.parameters()) + [b for name, b in generator.model.named_buffers()
                                                 if not name.endswith(("cache_k", "cache_v"))]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in held}
    slice_bytes = sum(storages.values())  # a tied output layer shares the embedding's storage
    return {"runner": "load", "main": is_main_process(), "import_seconds": import_seconds,
            "read_seconds": read_seconds, "load_seconds": load_seconds, "rss_before_load": rss_before,
            "peak_rss_after_load": peak_rss_bytes(), "slice_bytes": slice_bytes,
            "shard_file_bytes": sum(p.stat().st_size for p in files)}


def bench_ours(args, config: str) -> Dict:
    from llama.distributed import is_main_process

    levers = dict(CONFIGS[config])
    repeat_kv = levers.pop("repeat_kv", False)
    start = time.perf_counter()
    generator = build_ours(args, max_batch_size=max(args.batch_sizes + [len(RAGGED_LENGTHS)]), **levers)
    load_seconds = time.perf_counter() - start
    if repeat_kv:
        for layer in generator.model.layers:
            attend_with_copies(layer.attention)
    generator.tokenizer.stop_tokens = []  # every run makes exactly the tokens asked for

    def generate(prompts, new_tokens):
        generator.generate(prompts, max_gen_len=new_tokens, temperature=0)

    def reference_ragged():
        generator.prefill = "reference"
        try:
            generate(prompts_of_lengths(RAGGED_LENGTHS), args.ragged_new_tokens)
        finally:
            generator.prefill = "together"

    result = _measure(generate, args, ragged=args.ragged)
    # Meta's loop on the same ragged batch; its decode step is the one warmed up above.
    if args.ragged:
        result["ragged_reference_seconds"] = median_time(reference_ragged, args.runs, warm_up=False)
    result["host_seconds_per_token_b1"] = _host_seconds_per_token(generator, args.new_tokens)
    result.update(runner="ours", config=config, load_seconds=load_seconds,
                  streamed_bytes_this_rank=streamed_bytes(generator.model),
                  world_size=int(os.environ.get("WORLD_SIZE", 1)), main=is_main_process())
    return result


def attend_with_copies(attention) -> None:
    """Has the attention copy each KV head for its query heads before attending, as Meta's code
    does, to measure what grouped-query attention without the copies saves."""
    attend = attention.attend

    def attend_copied(q, keys, values, mask):
        groups = q.shape[1] // keys.shape[1]
        return attend(q, keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1), mask)

    attention.attend = attend_copied


def _host_seconds_per_token(generator, new_tokens: int) -> float:
    """Time the decoding loop spends outside the model at batch 1 (sampling, reading the token
    back, stop checks, bookkeeping), per generated token: one generate() with every model call
    timed (the eager forward, and the compiled decode step where there is one). (Exact on CPU; on
    GPU the model's time would partly show up in the read-back.)"""
    model, engine, spent = generator.model, generator.engine, []

    def timed(call):
        def timed_call(*args, **kwargs):
            start = time.perf_counter()
            out = call(*args, **kwargs)
            spent.append(time.perf_counter() - start)
            return out
        return timed_call

    compiled_step = engine.decode_step
    model.forward = timed(model.forward)
    if compiled_step is not None:
        engine.decode_step = timed(compiled_step)
    try:
        start = time.perf_counter()
        generator.generate(prompts_of_lengths([16]), max_gen_len=new_tokens, temperature=0)
        total = time.perf_counter() - start
    finally:
        del model.forward
        engine.decode_step = compiled_step
    return (total - sum(spent)) / new_tokens


# --------------------------------------------------------------------------------------------
# Hugging Face transformers


def bench_hf(args) -> Dict:
    from transformers import AutoModelForCausalLM

    source = Path(args.hf_source)
    rss_before_load = peak_rss_bytes()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype or "fp32"]
    start = time.perf_counter()
    if source.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype)
    model.eval()
    load_seconds = time.perf_counter() - start
    rss_after_load = peak_rss_bytes()
    pad = model.config.eos_token_id if isinstance(model.config.eos_token_id, int) else 0

    @torch.inference_mode()
    def generate(prompts, new_tokens):
        width = max(len(p) for p in prompts)  # left padding, as transformers wants for generation
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)

    result = _measure(generate, args, ragged=args.ragged)
    embedding = model.get_input_embeddings().weight
    streamed = sum(p.numel() * p.element_size() for p in model.parameters())
    if model.get_output_embeddings().weight is not embedding:  # untied: the table is not streamed
        streamed -= embedding.numel() * embedding.element_size()
    result.update(runner="transformers", config="", load_seconds=load_seconds, load_rss_above_imports=rss_after_load
                  - rss_before_load, streamed_bytes_this_rank=streamed, world_size=1, main=True)
    return result


# --------------------------------------------------------------------------------------------
# llama.cpp (llama-cpp-python), batch 1


def bench_llamacpp(args) -> Dict:
    from llama_cpp import Llama as LlamaCpp
    from llama_cpp import __version__ as llamacpp_version

    source = Path(args.hf_source)
    threads = args.threads or torch.get_num_threads()
    start = time.perf_counter()
    model = LlamaCpp(model_path=str(source), n_ctx=args.max_seq_len, n_batch=args.max_seq_len, n_threads=threads,
                     n_threads_batch=threads, verbose=False)
    load_seconds = time.perf_counter() - start

    def generate(prompts, new_tokens):
        (prompt,) = prompts
        model.reset()  # forget the last run's tokens, so the whole prompt is evaluated again
        # generate() samples greedily at temp 0 and never stops by itself: end of text is ignored.
        for made, _ in enumerate(model.generate(prompt, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0,
                                                reset=True), start=1):
            if made == new_tokens:
                break

    result = _measure(generate, args, batch_sizes=[1], ragged=False)
    result.update(runner="llama.cpp", config=f"llama-cpp-python {llamacpp_version}, {source.name}",
                  load_seconds=load_seconds, streamed_bytes_this_rank=_gguf_streamed_bytes(source), world_size=1,
                  main=True)
    return result


def _gguf_streamed_bytes(path: Path) -> int:
    """Bytes of the GGUF's tensors a step reads: all but the embedding table, unless the output
    layer is tied to it (then the table is read whole, as the output)."""
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(str(path)).tensors}
    if "output.weight" in tensors:
        tensors.pop("token_embd.weight")
    return sum(tensors.values())


# --------------------------------------------------------------------------------------------
# Start-up of a compiled configuration: process start to the first decoded token


def bench_startup_child(args, config: str) -> None:
    generator = build_ours(args, max_batch_size=1, **CONFIGS[config])
    generator.tokenizer.stop_tokens = []
    generator.generate(prompts_of_lengths([16]), max_gen_len=2, temperature=0)  # token 2 is the decode step's
    print("FIRST DECODED TOKEN", flush=True)


def measure_startup(config: str, argv: List[str], cache_dir: Path) -> float:
    # Both of the runner's on-disk caches live under cache_dir: PyTorch's compiled code and our
    # CPU kernels (built under $XDG_CACHE_HOME/llama-runner/kernels on first use).
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache_dir / "torchinductor"),
           "XDG_CACHE_HOME": str(cache_dir / "xdg")}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--child", f"startup:{config}", *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seconds = None
    for line in proc.stdout:
        if line.startswith("FIRST DECODED TOKEN"):
            seconds = time.perf_counter() - start
    if proc.wait() != 0 or seconds is None:
        raise RuntimeError(f"the start-up run of {config} failed:\n{proc.stderr.read()[-4000:]}")
    return seconds


# --------------------------------------------------------------------------------------------
# The shared measurements


def _measure(generate, args, batch_sizes: Optional[List[int]] = None, ragged: bool = True) -> Dict:
    runs, n = args.runs, args.new_tokens
    prefill_prompt = prompts_of_lengths([args.prefill_tokens])
    prefill_seconds = median_time(lambda: generate(prefill_prompt, 1), runs)
    decode, first_call_seconds = {}, 0.0
    for batch in batch_sizes or args.batch_sizes:
        prompts = prompts_of_lengths([16] * batch)
        start = time.perf_counter()
        generate(prompts, 2)  # the first decode step of a batch size: where a compiled step compiles
        first_call_seconds += time.perf_counter() - start
        one = median_time(lambda: generate(prompts, 1), runs)
        full = median_time(lambda: generate(prompts, n), runs)
        decode[str(batch)] = {"tokens_per_second": batch * (n - 1) / (full - one), "step_seconds": (full - one) / (n - 1)}
    ragged_prompts = prompts_of_lengths(RAGGED_LENGTHS)
    ragged_seconds = median_time(lambda: generate(ragged_prompts, args.ragged_new_tokens), runs) if ragged else None
    return {
        "prefill_tokens_per_second": args.prefill_tokens / prefill_seconds,
        "decode": decode,
        "first_calls_seconds": first_call_seconds,
        "ragged_seconds": ragged_seconds,
        "peak_rss": peak_rss_bytes(),
    }


# --------------------------------------------------------------------------------------------
# Orchestration and the tables


def run_child(what: str, argv: List[str]) -> Dict:
    proc = subprocess.run([sys.executable, __file__, "--child", what, *argv], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the {what} benchmark failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_in_this_process(what: str, args) -> Dict:
    if what == "load":
        return bench_load(args)
    if what == "transformers":
        return bench_hf(args)
    if what == "llamacpp":
        return bench_llamacpp(args)
    if what == "limit":
        return read_limit()
    if what.startswith("startup:"):
        return bench_startup_child(args, what.split(":", 1)[1])
    return bench_ours(args, what)


def print_tables(load: Optional[Dict], results: List[Dict], bandwidth: float, limits: List[float],
                 startup: Dict[str, float]) -> None:
    gb, mb = 1e9, 1e6
    print(f"\nmemory bandwidth (large copy, read + write, for reference): {bandwidth / gb:.1f} GB/s")
    print("read limit (one-row product over 1 GiB, before, between and after the rows below): "
          + ", ".join(f"{limit / gb:.1f}" for limit in limits) + " GB/s")
    for name, seconds in startup.items():
        print(f"start-up, process start to the first decoded token, {name}: {seconds:.1f} s")
    if load:
        ranks = load["world_size"]
        print(f"\nloading ({'per rank, ' if ranks > 1 else ''}cold page cache, one sequence of KV cache):")
        print(f"  imports (torch, its compiler, fairscale, llama): {load['import_seconds']:.2f} s")
        print(f"  read the shard files once: {load['read_seconds']:.2f} s; Llama.build: {load['load_seconds']:.2f} s "
              f"({load['load_seconds'] / load['read_seconds']:.2f}x)")
        above = load["peak_rss_after_load"] - load["rss_before_load"]
        print(f"  weights of this rank: {load['slice_bytes'] / mb:.0f} MB; peak RSS {load['peak_rss_after_load'] / mb:.0f}"
              f" MB, above imports {above / mb:.0f} MB ({above / load['slice_bytes']:.2f}x the weights)")
    for r in results:
        if r["runner"] == "transformers":
            print(f"  transformers from_pretrained: {r['load_seconds']:.2f} s, "
                  f"{r['load_rss_above_imports'] / mb:.0f} MB above imports")
    batches = sorted({int(b) for r in results for b in r["decode"]})
    header = ["runner", "MB/step", "build s", "first calls s", "prefill tok/s", "limit GB/s"]
    header += [f"decode b{b} tok/s (% limit)" for b in batches]
    header += ["ragged s", "ragged s, Meta's loop", "host us/token b1"]
    rows = []
    for r in results:
        row = [r["label"], f"{r['streamed_bytes_all_ranks'] / mb:.0f}", f"{r['load_seconds']:.2f}",
               f"{r['first_calls_seconds']:.1f}", f"{r['prefill_tokens_per_second']:.0f}",
               f"{r['limit_bytes_per_second'] / gb:.1f}"]
        for b in batches:
            d = r["decode"].get(str(b))
            if d is None:
                row.append("-")
                continue
            pct = 100 * (1 / d["step_seconds"]) / (r["limit_bytes_per_second"] / r["streamed_bytes_all_ranks"])
            row.append(f"{d['tokens_per_second']:.1f} ({pct:.0f}%)")
        row.append("-" if r["ragged_seconds"] is None else f"{r['ragged_seconds']:.2f}")
        if "host_seconds_per_token_b1" in r:
            reference = r.get("ragged_reference_seconds")
            row.append("-" if reference is None else f"{reference:.2f} ({reference / r['ragged_seconds']:.1f}x)")
            row.append(f"{r['host_seconds_per_token_b1'] * 1e6:.0f}")
        else:
            row += ["-", "-"]
        rows.append(row)
    print()
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for line in [header, ["-" * w for w in widths], *rows]:
        print(" | ".join(str(x).ljust(w) for x, w in zip(line, widths)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt_dir", required=True)
    parser.add_argument("--tokenizer_path", required=True)
    parser.add_argument("--hf_source", help="the same weights for transformers: a GGUF file or HF folder")
    parser.add_argument("--configs", default="plain,compile,compile+int8",
                        help=f"our configurations to measure, from {','.join(CONFIGS)}; empty for none")
    parser.add_argument("--transformers", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure transformers (needs --hf_source)")
    parser.add_argument("--peers", default="", help="other runners to measure at batch 1: llamacpp (needs "
                        "llama-cpp-python and a GGUF --hf_source)")
    parser.add_argument("--quant_group", type=int, default=32, help="int4's group size")
    parser.add_argument("--startup", default="", help="configurations whose cold and warm start-up to measure, "
                        "e.g. compile,compile+int4")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "auto"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process")
    parser.add_argument("--batch_sizes", default="1,8,32")
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--ragged_new_tokens", type=int, default=32)
    parser.add_argument("--ragged", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the ragged batch (8 prompts of 4 to 400 tokens)")
    parser.add_argument("--prefill_tokens", type=int, default=256)
    parser.add_argument("--max_seq_len", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.batch_sizes = [int(b) for b in str(args.batch_sizes).split(",")]
    configs = [c for c in args.configs.split(",") if c]
    startup_configs = [c for c in args.startup.split(",") if c]
    for c in configs + startup_configs:
        if c not in CONFIGS:
            parser.error(f"unknown configuration {c!r}; choose from {', '.join(CONFIGS)}")
    peers = [p for p in args.peers.split(",") if p]
    for p in peers:
        if p not in PEERS:
            parser.error(f"unknown peer {p!r}; choose from {', '.join(PEERS)}")
        if not (args.hf_source or "").endswith(".gguf"):
            parser.error("--peers llamacpp needs the GGUF file as --hf_source")
    if args.transformers and not args.hf_source and "WORLD_SIZE" not in os.environ:
        parser.error("--hf_source is needed to measure transformers (or pass --no-transformers)")
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.child:  # a measuring process
        print(json.dumps(measure_in_this_process(args.child, args)))
        return
    if "WORLD_SIZE" in os.environ:  # torchrun: every rank measures each of our configurations
        measure = lambda what: measure_in_this_process(what, args)  # noqa: E731
        whats = ["load"] + configs
    else:
        argv = sys.argv[1:]
        measure = lambda what: run_child(what, argv)  # noqa: E731
        whats = ["load"] + configs + (["transformers"] if args.transformers else []) + peers
    single = "WORLD_SIZE" not in os.environ
    load, results, limits = None, [], []
    for what in whats:
        if single and what != "load":  # the limit next to each row (torchrun ranks share the CPU: skipped)
            limits.append(run_child("limit", sys.argv[1:])["bytes_per_second"])
        result = measure(what)
        result["world_size"] = int(os.environ.get("WORLD_SIZE", 1)) if what != "transformers" else 1
        if what == "load":
            load = result
        else:
            results.append(result)
    if not (load or results[0])["main"]:
        return
    if single:
        limits.append(run_child("limit", sys.argv[1:])["bytes_per_second"])
    else:  # measured once, by rank 0 alone, after the ranks' runs
        limits = [read_limit()["bytes_per_second"]]
    for i, r in enumerate(results):
        r["limit_bytes_per_second"] = (limits[i] + limits[i + 1]) / 2 if single else limits[0]
    startup = {}
    with tempfile.TemporaryDirectory() as caches:
        for config in startup_configs:
            cache_dir = Path(caches) / config
            startup[f"{config}, cold caches"] = measure_startup(config, sys.argv[1:], cache_dir)
            startup[f"{config}, warm caches"] = measure_startup(config, sys.argv[1:], cache_dir)
    for r in results:
        r["label"] = r["runner"] + (f" {r['config']}" if r["config"] else "") + (
            f" x{r['world_size']} ranks" if r["world_size"] > 1 else "")
        r["streamed_bytes_all_ranks"] = r["streamed_bytes_this_rank"] * r["world_size"]
    bandwidth = memory_bandwidth()
    print_tables(load, results, bandwidth, limits, startup)
    if args.json:
        Path(args.json).write_text(json.dumps({"bandwidth_bytes_per_second": bandwidth, "read_limits": limits,
                                               "startup_seconds": startup, "load": load, "results": results,
                                               "argv": sys.argv[1:]}, indent=2))


if __name__ == "__main__":
    main()
