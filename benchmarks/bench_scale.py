"""Models at the sizes people run: for each configuration, in a fresh process, the time to load,
the peak resident memory of the whole process, decode speed at batch 1 and 8, and prefill of a
long prompt; llama.cpp on a GGUF file the same way (llama-cpp-python, batch 1 only).

    python benchmarks/bench_scale.py --threads 2 --prefill_tokens 512 \
        --ours "int4=/tmp/m8b/ours:bf16:int4" --ours "Q4_K_M kept=/tmp/m8b/ours-q4_k_m:bf16:" \
        --llamacpp "Q4_K_M=/tmp/m8b/8b-Q4_K_M.gguf"

An --ours entry is LABEL=CKPT_DIR:DTYPE:QUANTIZE[:compile] (QUANTIZE empty: none, or the
checkpoint's own stored blocks). Peak memory is the process's maximum resident set (ru_maxrss):
everything it ever held, the interpreter, PyTorch and the file pages it touched included. The
page cache is dropped for the files before each load, so every load reads from disk.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_generate import drop_from_page_cache, peak_rss_bytes as peak_rss  # noqa: E402


def prompt(n: int):
    import torch

    return torch.randint(1000, 21000, (n,), generator=torch.Generator().manual_seed(0)).tolist()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_ours(spec: dict, args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    from llama import Llama

    ckpt = Path(spec["ckpt"])
    drop_from_page_cache(sorted(ckpt.glob("consolidated.*.pth")))
    imported = time.perf_counter()
    generator = Llama.build(str(ckpt), str(ckpt / "tokenizer.json"), max_seq_len=args.prefill_tokens + 64,
                            max_batch_size=8, device="cpu", dtype=spec["dtype"], quantize=spec["quantize"] or None,
                            compile=spec["compile"])
    built = time.perf_counter()
    generator.tokenizer.stop_tokens = []  # exactly the tokens asked for
    result = {"import_s": imported - start, "load_s": built - imported, "peak_rss_after_load": peak_rss()}

    def decode(batch: int) -> float:
        prompts = [prompt(8)] * batch
        generator.generate(prompts, max_gen_len=2, temperature=0)  # warm up (compiles this width)
        short = timed(lambda: generator.generate(prompts, max_gen_len=2, temperature=0))
        long = timed(lambda: generator.generate(prompts, max_gen_len=2 + args.new_tokens, temperature=0))
        return batch * args.new_tokens / (long - short)

    result["decode_b1"] = decode(1)
    result["decode_b8"] = decode(8)
    long_prompt = [prompt(args.prefill_tokens)]
    generator.generate(long_prompt, max_gen_len=1, temperature=0)
    result["prefill"] = args.prefill_tokens / timed(lambda: generator.generate(long_prompt, max_gen_len=1,
                                                                               temperature=0))
    result["peak_rss"] = peak_rss()
    if torch.distributed.is_initialized():  # under torchrun (--ranks): every rank's peaks, rank 0 reports
        peaks = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(peaks, (result["peak_rss_after_load"], result["peak_rss"]))
        result["peak_rss_after_load_by_rank"], result["peak_rss_by_rank"] = map(list, zip(*peaks))
        result["peak_rss_after_load"], result["peak_rss"] = max(result["peak_rss_after_load_by_rank"]), \
            max(result["peak_rss_by_rank"])
    return result


def run_llamacpp(spec: dict, args) -> dict:
    start = time.perf_counter()
    from llama_cpp import Llama as LlamaCpp

    drop_from_page_cache([spec["gguf"]])
    imported = time.perf_counter()
    model = LlamaCpp(model_path=spec["gguf"], n_ctx=args.prefill_tokens + 64, n_batch=args.prefill_tokens + 64,
                     n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
    built = time.perf_counter()
    result = {"import_s": imported - start, "load_s": built - imported, "peak_rss_after_load": peak_rss()}

    def generate(tokens, new):
        model.reset()
        for made, _ in enumerate(model.generate(tokens, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0,
                                                reset=True), start=1):
            if made == new:
                break

    generate(prompt(8), 2)
    short = timed(lambda: generate(prompt(8), 2))
    long = timed(lambda: generate(prompt(8), 2 + args.new_tokens))
    result["decode_b1"] = args.new_tokens / (long - short)
    generate(prompt(args.prefill_tokens), 1)
    result["prefill"] = args.prefill_tokens / timed(lambda: generate(prompt(args.prefill_tokens), 1))
    result["peak_rss"] = peak_rss()
    return result


def parse_ours(entry: str) -> dict:
    label, rest = entry.split("=", 1)
    ckpt, dtype, quantize, *more = rest.split(":")
    return {"runner": "ours", "label": label, "ckpt": ckpt, "dtype": dtype, "quantize": quantize,
            "compile": "compile" in more}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ours", action="append", default=[])
    parser.add_argument("--llamacpp", action="append", default=[], help="LABEL=FILE.gguf")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--prefill_tokens", type=int, default=512)
    parser.add_argument("--ranks", type=int, default=1, help="run ours on this many ranks (torchrun; each rank "
                        "--threads / ranks threads); peak memory is then the largest rank's, each rank's in the JSON")
    parser.add_argument("--json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        result = run_ours(spec, args) if spec["runner"] == "ours" else run_llamacpp(spec, args)
        if int(os.environ.get("RANK", "0")) == 0:
            print("RESULT " + json.dumps(result))
        return
    specs = [parse_ours(e) for e in args.ours]
    specs += [{"runner": "llama.cpp", "label": e.split("=", 1)[0], "gguf": e.split("=", 1)[1]} for e in args.llamacpp]
    rows = []
    for spec in specs:
        ranks = args.ranks if spec["runner"] == "ours" else 1
        launch = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                       "--nproc_per_node", str(ranks)]
        cmd = [*launch, __file__, "--child", json.dumps(spec), "--threads", str(max(1, args.threads // ranks)),
               "--new_tokens", str(args.new_tokens), "--prefill_tokens", str(args.prefill_tokens)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith(("RESULT ", "Loaded in"))]
        if proc.returncode != 0 or not lines or not lines[-1].startswith("RESULT "):
            print(f"{spec['label']}: failed (exit {proc.returncode})\n{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}")
            continue
        result = {**spec, **json.loads(lines[-1][len("RESULT "):]),
                  "loaded": next((line for line in lines if line.startswith("Loaded in")), "")}
        rows.append(result)
        print(f"{result['label']}: {result['loaded']}", flush=True)
    gb = 1e9
    header = ["runner", "load s", "peak RSS GB (after load / at end)", "decode b1 tok/s", "decode b8 tok/s",
              f"prefill {args.prefill_tokens} tok/s"]
    table = [header] + [[f"{r['runner']} {r['label']}", f"{r['load_s']:.1f}",
                         f"{r['peak_rss_after_load'] / gb:.2f} / {r['peak_rss'] / gb:.2f}", f"{r['decode_b1']:.2f}",
                         f"{r['decode_b8']:.2f}" if "decode_b8" in r else "-", f"{r['prefill']:.1f}"] for r in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    print()
    for i, row in enumerate(table):
        print(" | ".join(str(x).ljust(w) for x, w in zip(row, widths)))
        if i == 0:
            print(" | ".join("-" * w for w in widths))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
