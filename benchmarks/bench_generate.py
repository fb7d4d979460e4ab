"""Generation speed and memory, our runner against Hugging Face transformers on the same weights.

    python benchmarks/bench_generate.py --ckpt_dir DIR --tokenizer_path DIR/tokenizer.json \
        --hf_source PATH_TO_GGUF_OR_HF_FOLDER [--threads 2] [--json results.json]
    torchrun --nproc_per_node N benchmarks/bench_generate.py --ckpt_dir DIR ... --runners ours

Each runner is measured in its own child process (so peak memory is its own), greedy, same
prompts, same dtype, same thread count, stop tokens ignored so every run makes the same number of
tokens. Every figure is the median of --runs runs after a warm-up. Decode speed is measured as
the difference between generating N tokens and generating 1, so prefill is not counted in it.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def median_time(fn: Callable[[], None], runs: int) -> float:
    fn()  # warm-up
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


# --------------------------------------------------------------------------------------------
# Our runner


def bench_ours(args) -> Dict:
    from llama import Llama
    from llama.distributed import is_main_process

    build_kwargs = dict(device="cpu" if args.device == "cpu" else "auto", dtype=args.dtype)
    for option in ("compile", "quantize", "prefill"):
        if getattr(args, option) is not None:
            build_kwargs[option] = getattr(args, option)
    shard_bytes = sum(p.stat().st_size for p in Path(args.ckpt_dir).glob("consolidated.*.pth"))
    rss_before_load = peak_rss_bytes()  # the interpreter, torch and our imports
    read_seconds = _read_files_once(Path(args.ckpt_dir))
    start = time.perf_counter()
    generator = Llama.build(args.ckpt_dir, args.tokenizer_path, max_seq_len=args.max_seq_len,
                            max_batch_size=max(args.batch_sizes + [len(RAGGED_LENGTHS)]), **build_kwargs)
    load_seconds = time.perf_counter() - start
    rss_after_load = peak_rss_bytes()
    generator.tokenizer.stop_tokens = []  # every run makes exactly the tokens asked for
    weight_bytes = _unique_bytes(generator.model.parameters()) + _unique_bytes(generator.model.buffers(), skip_cache=True)

    def generate(prompts, new_tokens):
        generator.generate(prompts, max_gen_len=new_tokens, temperature=0)

    result = _measure(generate, args)
    result.update(runner="ours", load_seconds=load_seconds, peak_rss_after_load=rss_after_load,
                  rss_before_load=rss_before_load,
                  weight_bytes_this_rank=weight_bytes, shard_file_bytes=shard_bytes,
                  read_shards_seconds=read_seconds, world_size=int(os.environ.get("WORLD_SIZE", 1)))
    result["main"] = is_main_process()
    return result


def _read_files_once(folder: Path) -> float:
    start = time.perf_counter()
    for path in sorted(folder.glob("consolidated.*.pth")):
        with open(path, "rb") as f:
            while f.read(8 << 20):
                pass
    return time.perf_counter() - start


def _unique_bytes(tensors, skip_cache: bool = False) -> int:
    seen, total = set(), 0
    for t in tensors:
        if skip_cache and t.dim() == 4:  # KV caches are not weights
            continue
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


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

    result = _measure(generate, args)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    result.update(runner="transformers", load_seconds=load_seconds, peak_rss_after_load=rss_after_load,
                  rss_before_load=rss_before_load,
                  weight_bytes_this_rank=weight_bytes, world_size=1, main=True)
    return result


# --------------------------------------------------------------------------------------------
# The shared measurements


def _measure(generate, args) -> Dict:
    runs, n = args.runs, args.new_tokens
    prefill_prompt = prompts_of_lengths([args.prefill_tokens])
    prefill_seconds = median_time(lambda: generate(prefill_prompt, 1), runs)
    decode = {}
    for batch in args.batch_sizes:
        prompts = prompts_of_lengths([16] * batch)
        one = median_time(lambda: generate(prompts, 1), runs)
        full = median_time(lambda: generate(prompts, n), runs)
        decode[batch] = {"tokens_per_second": batch * (n - 1) / (full - one), "step_seconds": (full - one) / (n - 1)}
    ragged = prompts_of_lengths(RAGGED_LENGTHS)
    ragged_seconds = median_time(lambda: generate(ragged, args.ragged_new_tokens), runs)
    return {
        "prefill_tokens_per_second": args.prefill_tokens / prefill_seconds,
        "decode": decode,
        "ragged_seconds": ragged_seconds,
        "peak_rss": peak_rss_bytes(),
    }


# --------------------------------------------------------------------------------------------
# Orchestration and the table


def run_child(runner: str, argv: List[str]) -> Dict:
    proc = subprocess.run([sys.executable, __file__, "--child", runner, *argv], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the {runner} benchmark failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_table(results: List[Dict], bandwidth: float, model_bytes: int) -> None:
    gb = 1e9
    print(f"\nmemory bandwidth (large copy, read + write): {bandwidth / gb:.1f} GB/s")
    print(f"weights streamed per decode step: {model_bytes / 1e6:.0f} MB -> "
          f"limit {bandwidth / model_bytes:.1f} steps/s\n")
    header = ["runner", "load s", "peak RSS MB (above imports)", "prefill tok/s"]
    batches = sorted({int(b) for r in results for b in r["decode"]})
    header += [f"decode b{b} tok/s (% limit)" for b in batches] + ["ragged s"]
    rows = []
    for r in results:
        above = r["peak_rss_after_load"] - r["rss_before_load"]
        row = [r["label"], f"{r['load_seconds']:.2f}", f"{r['peak_rss_after_load'] / 1e6:.0f} ({above / 1e6:.0f})",
               f"{r['prefill_tokens_per_second']:.0f}"]
        for b in batches:
            d = r["decode"][str(b)] if str(b) in r["decode"] else r["decode"][b]
            pct = 100 * (1 / d["step_seconds"]) / (bandwidth / r["weight_bytes_all_ranks"])
            row.append(f"{d['tokens_per_second']:.1f} ({pct:.0f}%)")
        row.append(f"{r['ragged_seconds']:.2f}")
        rows.append(row)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for line in [header, ["-" * w for w in widths], *rows]:
        print(" | ".join(str(x).ljust(w) for x, w in zip(line, widths)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt_dir", required=True)
    parser.add_argument("--tokenizer_path", required=True)
    parser.add_argument("--hf_source", help="the same weights for transformers: a GGUF file or HF folder")
    parser.add_argument("--runners", default="ours,transformers")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "auto"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process")
    parser.add_argument("--batch_sizes", default="1,8,32")
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--ragged_new_tokens", type=int, default=32)
    parser.add_argument("--prefill_tokens", type=int, default=256)
    parser.add_argument("--max_seq_len", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--compile", action="store_true", default=None)
    parser.add_argument("--quantize", choices=["int8"], default=None)
    parser.add_argument("--prefill", choices=["batched", "reference"], default=None)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.batch_sizes = [int(b) for b in str(args.batch_sizes).split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.child or "WORLD_SIZE" in os.environ:  # a measuring process (torchrun: every rank)
        result = bench_ours(args) if (args.child or "ours") == "ours" else bench_hf(args)
        if not result["main"]:
            return
        if args.child:
            print(json.dumps(result))
            return
        results = [result]
    else:
        argv = [a for a in sys.argv[1:]]
        results = [run_child(r, argv) for r in args.runners.split(",")]
    for r in results:
        r["label"] = r["runner"] + (f" x{r['world_size']} ranks" if r["world_size"] > 1 else "")
        r["weight_bytes_all_ranks"] = r["weight_bytes_this_rank"] * r["world_size"]
    bandwidth = memory_bandwidth()
    print_table(results, bandwidth, results[0]["weight_bytes_all_ranks"])
    if args.json:
        Path(args.json).write_text(json.dumps({"bandwidth_bytes_per_second": bandwidth, "results": results,
                                               "argv": sys.argv[1:]}, indent=2))


if __name__ == "__main__":
    main()
