"""python -m llama.convert --source HF_FOLDER_OR_GGUF --out DIR [--shards N] [--dtype auto|bf16|fp16|fp32]
[--quantize int4|int8 [--quant_group G]]"""

import argparse
import signal
import sys

from ..dtypes import DTYPES
from ..quantize import DEFAULT_GROUP
from . import convert


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llama.convert",
        description="Convert a Hugging Face Llama folder or a GGUF file into Meta's checkpoint layout "
                    "(params.json + consolidated.NN.pth + tokenizer.json).")
    parser.add_argument("--source", required=True, help="a Hugging Face model folder or a .gguf file")
    parser.add_argument("--out", required=True, help="the folder to create")
    parser.add_argument("--shards", type=int, default=1,
                        help="number of consolidated.NN.pth files, as for that many ranks (default 1; any "
                             "rank count that divides the heads can load any shard count)")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="precision of the written float weights (default auto: the source's own, and a "
                             "GGUF's quantized blocks kept as they are; bf16/fp16/fp32 expand blocks to floats)")
    parser.add_argument("--quantize", choices=["int4", "int8"],
                        help="store the linear layers quantized, as Llama.build(quantize=...) would make them "
                             "at every start (int4's output layer in int8)")
    parser.add_argument("--quant_group", type=int, default=DEFAULT_GROUP,
                        help=f"int4's group of input features (default {DEFAULT_GROUP})")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    # `kill` as well as Ctrl-C unwinds normally, so the partial output is removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        record = convert(args.source, args.out, args.shards, args.dtype, progress=not args.quiet,
                         quantize=args.quantize, group=args.quant_group)
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    except (ValueError, OSError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    verb = "already holds" if record.get("reused") else "wrote"
    stored = f", linear layers {record['quantize']}" if record.get("quantize") else ""
    print(f"{args.out} {verb} the model from {record['source']} ({record['shards']} shard(s), {record['dtype']}"
          f"{stored}).\n"
          f"Run it with:\n  torchrun --nproc_per_node N example_chat_completion.py --ckpt_dir {args.out} "
          f"--tokenizer_path {args.out}/{record['tokenizer']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
