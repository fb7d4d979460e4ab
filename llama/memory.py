"""What one rank will hold, estimated before any weight is read, and a clear refusal when the
machine cannot hold it (instead of the kernel's OOM killer, hours into a download's first run).

Peak of a rank = its slice of the weights in the loading dtype x LOAD_OVERHEAD (the slice being
copied, the joined q/k/v and w1/w3 groups while they are concatenated) + the KV cache for
max_batch_size x max_seq_len + RUNTIME_BYTES (PyTorch, the kernels, activations). Quantization
happens after the float weights are in memory, so its peak is the float one.
"""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .args import ModelArgs
from .checkpoint import expected_shapes, rank_slice

LOAD_OVERHEAD = 1.10  # measured: peak above the interpreter is 1.10x a rank's weights (README)
RUNTIME_BYTES = 1 << 30
GIB = 1 << 30


@dataclass
class Estimate:
    weights: int
    kv_cache: int
    runtime: int

    @property
    def total(self) -> int:
        return int(self.weights * LOAD_OVERHEAD) + self.kv_cache + self.runtime


def estimate(args: ModelArgs, world: int, rank: int, dtype: torch.dtype, tied: bool, embedding_split: str) -> Estimate:
    bytes_per = torch.empty((), dtype=dtype).element_size()
    weights = 0
    for key, shape in expected_shapes(args, tied=tied).items():
        dim, start, end = rank_slice(key, args, rank, world, embedding_split)
        numel = 1
        for size in shape:
            numel *= size
        weights += numel if dim is None else numel // shape[dim] * (end - start)
    kv_heads = max(1, args.n_kv_heads // world)
    kv = 2 * args.n_layers * args.max_batch_size * args.max_seq_len * kv_heads * args.head_dim * bytes_per
    return Estimate(weights * bytes_per, kv, RUNTIME_BYTES)


def available_bytes(device: torch.device) -> Optional[int]:
    """Memory free for this process: MemAvailable on CPU, free device memory on a GPU; None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _size(n: int) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / (1 << 20):.0f} MiB"


def check_fits(need: Estimate, device: torch.device, dtype: torch.dtype, args: ModelArgs,
               available: Optional[int]) -> None:
    """Raises, naming the figures and the fixes, when this machine's ranks cannot hold their share.
    On CPU every rank started on this machine (LOCAL_WORLD_SIZE) draws on the same memory."""
    if available is None:
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if device.type == "cpu" else 1
    if need.total * local <= available:
        return
    fixes = []
    if dtype == torch.float32:
        fixes.append("--dtype bf16 (dtype='bf16': half the weights' bytes)")
    if need.kv_cache > need.weights // 10:
        fixes.append(f"a smaller --max_seq_len or --max_batch_size (the KV cache is {_size(need.kv_cache)} "
                     f"for {args.max_batch_size} x {args.max_seq_len} positions)")
    fixes.append("more ranks on more machines (torchrun --nnodes): each holds 1/N of the weights")
    ranks = f" x {local} ranks on this machine" if local > 1 else ""
    raise MemoryError(
        f"this model needs about {_size(need.total)} per rank{ranks} on {device.type} (weights "
        f"{_size(need.weights)} in {str(dtype).replace('torch.', '')} x {LOAD_OVERHEAD} while loading, "
        f"KV cache {_size(need.kv_cache)}, runtime {_size(need.runtime)}) but only "
        f"{_size(available)} is available; try: " + "; ".join(fixes))
