"""Times our CPU kernels alone (llama/csrc/) against PyTorch's, at a model's product shapes:

    python benchmarks/bench_kernels.py --dim 2048 --hidden 8192 --rows 1,4,512 --threads 2

Each line: the product, its shape, rows, microseconds per call (median of --repeats) and the rate
at which it reads the weights (GB/s), beside the read limit: a one-row fp32 product over 1 GiB
run by the compiled multiply-and-sum, as the model's fp32 decode step does.
"""

import argparse
import statistics
import time

import torch

from llama import cpu_kernels
from llama.bf16 import Bf16Product
from llama.quantize import Int4Product, Int8Product


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def read_limit(repeats: int) -> float:
    weight = torch.randn(1 << 16, 1 << 12)  # 1 GiB of fp32
    x = torch.randn(1, 1 << 12)
    product = torch.compile(lambda x, w: (x.unsqueeze(-2) * w).sum(-1))
    seconds = timed(lambda: product(x, weight), repeats)
    return weight.numel() * 4 / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=8192)
    parser.add_argument("--rows", default="1,4,512")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"kernels: {cpu_kernels.describe()}; read limit {read_limit(5):.1f} GB/s")
    torch.manual_seed(0)
    shapes = {"w1+w3": (2 * args.hidden, args.dim), "w2": (args.dim, args.hidden)}
    for name, (out, inp) in shapes.items():
        weight = torch.randn(out, inp) * 0.02
        products = {"fp32 (PyTorch)": (lambda x, w=weight: torch.nn.functional.linear(x, w), 4),
                    "bf16": (Bf16Product(weight.bfloat16()), 2),
                    "int8": (Int8Product(weight), 1),
                    "int4": (Int4Product(weight, 32), 0.5 + 4 / 32)}
        for label, (product, bytes_per_weight) in products.items():
            for rows in map(int, args.rows.split(",")):
                x = torch.randn(rows, inp)
                repeats = args.repeats if rows < 64 else max(3, args.repeats // 5)
                seconds = timed(lambda: product(x), repeats)
                rate = out * inp * bytes_per_weight / seconds / 1e9
                print(f"{name:6} {out:5}x{inp:<5} {label:15} rows {rows:4}: {seconds * 1e6:9.0f} us  "
                      f"{rate:5.1f} GB/s of weights  {rows * out * inp * 2 / seconds / 1e9:7.1f} GFLOP/s")


if __name__ == "__main__":
    main()
