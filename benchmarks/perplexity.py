"""Quantization's cost in quality: perplexity of fp32, int8 and int4 weights on the same fixed text.

    python benchmarks/perplexity.py --ckpt_dir DIR --tokenizer_path DIR/tokenizer.json \
        [--text benchmarks/data/perplexity_text.txt] [--window 512] [--quant_group 32] [--threads 2] \
        [--json out.json]

Every model scores the same tokens in the same windows (see llama/perplexity.py); they are built
one after the other, each freed before the next, so memory holds one model at a time.
"""

import argparse
import gc
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def measure(args, quantize) -> float:
    from llama import Llama
    from llama.perplexity import perplexity

    generator = Llama.build(args.ckpt_dir, args.tokenizer_path, max_seq_len=args.window, max_batch_size=1,
                            device=args.device, dtype="fp32", quantize=quantize, quant_group=args.quant_group)
    return perplexity(generator, args.text.read_text(), args.window)


def print_table(rows) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(*rows)]
    for line in [rows[0], ["-" * w for w in widths], *rows[1:]]:
        print(" | ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt_dir", required=True)
    parser.add_argument("--tokenizer_path", required=True)
    parser.add_argument("--text", type=Path, default=REPO / "benchmarks" / "data" / "perplexity_text.txt")
    parser.add_argument("--window", type=int, default=512, help="tokens per scored window")
    parser.add_argument("--quant_group", type=int, default=32, help="int4's group size")
    parser.add_argument("--device", default="cpu", choices=["cpu", "auto"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from llama.distributed import is_main_process
    from llama.tokenizer import Tokenizer

    n_tokens = len(Tokenizer(args.tokenizer_path).encode(args.text.read_text(), bos=True, eos=False))
    scores = {}
    for quantize in (None, "int8", "int4"):
        scores[quantize or "fp32"] = measure(args, quantize)
        gc.collect()  # this model is gone before the next one loads
    fp32 = scores["fp32"]
    changes = {mode: 100 * (scores[mode] / fp32 - 1) for mode in ("int8", "int4")}
    if not is_main_process():
        return
    print(f"\nperplexity on {args.text.name}, windows of {args.window} tokens, int4 in groups of {args.quant_group}\n")
    print_table([["tokens", "fp32 ppl", "int8 ppl", "int8 vs fp32", "int4 ppl", "int4 vs fp32"],
                 [n_tokens, f"{fp32:.3f}", f"{scores['int8']:.3f}", f"{changes['int8']:+.2f}%",
                  f"{scores['int4']:.3f}", f"{changes['int4']:+.2f}%"]])
    if args.json:
        Path(args.json).write_text(json.dumps({
            "text": str(args.text), "tokens": n_tokens, "window": args.window, "quant_group": args.quant_group,
            "perplexity": scores, "relative_change_percent": changes, "argv": sys.argv[1:]}, indent=2))


if __name__ == "__main__":
    main()
