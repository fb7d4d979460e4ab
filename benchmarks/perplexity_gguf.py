"""What running a quantized GGUF our way costs in quality: the file converted with its blocks kept
(python -m llama.convert), run as stored, against llama.cpp running the same file, on the same
tokens in the same windows (llama/perplexity.py's scoring):

    python benchmarks/perplexity_gguf.py --gguf FILE.gguf [--gguf OTHER.gguf ...] [--window 512] \
        [--threads 2] [--work /tmp/perplexity-gguf] [--json out.json]

Needs llama-cpp-python (not a dependency of ours). Each model is built, scored and freed before
the next.
"""

import argparse
import contextlib
import gc
import io
import json
import re
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

sys.path.insert(0, str(REPO / "benchmarks"))
from perplexity import print_table  # noqa: E402  benchmarks/perplexity.py


def llamacpp_perplexity(gguf: Path, tokens, window: int, threads: int) -> float:
    from llama_cpp import Llama as LlamaCpp

    from llama.perplexity import windowed_perplexity

    model = LlamaCpp(model_path=str(gguf), n_ctx=window, n_batch=window, n_threads=threads, logits_all=True,
                     verbose=False)

    def logits_of(chunk):
        model.reset()
        model.eval(chunk)
        return torch.tensor(model.scores[: len(chunk)], dtype=torch.float32)

    return windowed_perplexity(tokens, window, logits_of)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, action="append", required=True)
    parser.add_argument("--text", type=Path, default=REPO / "benchmarks" / "data" / "perplexity_text.txt")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/perplexity-gguf"))
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from llama import Llama
    from llama.convert import convert
    from llama.perplexity import perplexity

    rows, results = [["file", "tokens", "ours, as stored", "llama.cpp", "ours vs llama.cpp", "how ours runs it"]], []
    for gguf in args.gguf:
        out = args.work / gguf.stem
        convert(gguf, out, progress=False)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            generator = Llama.build(str(out), str(out / "tokenizer.json"), max_seq_len=args.window,
                                    max_batch_size=1, device="cpu", dtype="fp32")
        loaded = re.search(r"Loaded in [\d.]+ seconds \((.*)\)", printed.getvalue())
        text = args.text.read_text()
        tokens = generator.tokenizer.encode(text, bos=True, eos=False)
        ours = perplexity(generator, text, args.window)
        how = loaded.group(1) if loaded else "?"
        del generator
        gc.collect()
        theirs = llamacpp_perplexity(gguf, tokens, args.window, args.threads)
        rows.append([gguf.name, len(tokens), f"{ours:.3f}", f"{theirs:.3f}", f"{100 * (ours / theirs - 1):+.2f}%", how])
        results.append({"gguf": str(gguf), "tokens": len(tokens), "ours": ours, "llamacpp": theirs, "ours_runs_it": how})
    print(f"\nperplexity on {args.text.name}, windows of {args.window} tokens\n")
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"window": args.window, "results": results}, indent=2))


if __name__ == "__main__":
    main()
