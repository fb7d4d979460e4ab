"""What one rank will hold, estimated before any weight is read, and a clear refusal when the
machine cannot hold it (instead of the kernel's OOM killer, hours into a download's first run).

Peak of a rank = its weights as held (float in the model's dtype, or quantized) + what loading
holds on top for a while (float: LOAD_OVERHEAD, the file pages of the slice being copied;
quantized: one block's float weights, as each block is quantized when read) + the
KV cache for max_batch_size x max_seq_len + RUNTIME_BYTES (PyTorch, the kernels, activations).
"""

import ctypes
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import torch

from . import blocks
from .args import ModelArgs, cache_length
from .checkpoint import expected_shapes, rank_slice

LOAD_OVERHEAD = 1.10  # measured: peak above the interpreter is 1.10x a rank's weights (README)
RUNTIME_BYTES = 1 << 30
GIB = 1 << 30


@dataclass
class Estimate:
    weights: int  # held once loaded
    loading: int  # held for a while on top: copies made while loading
    kv_cache: int
    runtime: int

    @property
    def total(self) -> int:
        return self.weights + self.loading + self.kv_cache + self.runtime


def _quantized_bytes(numel: int, rows: int, int8: bool, group: int) -> int:
    if int8:
        return numel + 4 * rows  # codes, an fp32 scale per row
    return numel // 2 + numel // group * 4  # codes, an fp16 scale and min per group


def estimate(args: ModelArgs, world: int, rank: int, dtype: torch.dtype, tied: bool, embedding_split: str,
             quantize: Optional[str] = None, group: int = 32, stored_types: Optional[Dict[str, str]] = None) -> Estimate:
    """One rank's memory. Float weights: its slice in `dtype`, plus LOAD_OVERHEAD while loading.
    Quantized: the embedding (and norms) in `dtype`, the linear layers quantized as they are read
    (int4's output layer in int8), plus one block's float weights, or the output layer's, at once;
    a tied embedding split by vocab reads the output layer's int8 rows instead.
    stored_types: the block type of each weight a checkpoint stores quantized (llama/stored.py),
    which loads as int4 (4-bit blocks) or int8 (the others), the blocks read beside it."""
    bytes_per = torch.empty((), dtype=dtype).element_size()
    stored_types = stored_types or {}
    held, block_float = 0, {}
    shapes = expected_shapes(args, tied=tied)
    # A vocab-split table tied to an output layer quantized here reads its rows from that layer's
    # int8 product (quantize.TableRows): no float copy of it is held once loaded.
    table_in_output = tied and quantize and embedding_split == "vocab" and "tok_embeddings.weight" not in stored_types
    if tied and (quantize or stored_types):
        shapes["output.weight"] = shapes["tok_embeddings.weight"]  # its own quantized copy
        if "tok_embeddings.weight" in stored_types:
            stored_types = {**stored_types, "output.weight": stored_types["tok_embeddings.weight"]}
    for key, shape in shapes.items():
        dim, start, end = rank_slice(key, args, rank, world, embedding_split)
        numel = 1
        for size in shape:
            numel *= size
        if dim is not None:
            numel = numel // shape[dim] * (end - start)
        block = key.split(".")[1] if key.startswith("layers.") else key
        qtype = stored_types.get(key)
        linear = len(shape) == 2 and key != "tok_embeddings.weight"
        rows = numel // shape[-1] if dim != 1 else shape[0]
        if linear and qtype:
            int4 = qtype in blocks.INT4_TYPES
            held += _quantized_bytes(numel, rows, not int4, 32)
            read = int(blocks.bits_per_weight(qtype, shape[1]) * numel / 8) + (0 if int4 or qtype == blocks.I8_ROW
                                                                           else 4 * numel)  # requantized from fp32
            block_float[block] = block_float.get(block, 0) + read
        elif linear and quantize:
            held += _quantized_bytes(numel, rows, quantize == "int8" or key == "output.weight", group)
            block_float[block] = block_float.get(block, 0) + numel * bytes_per
        elif key == "tok_embeddings.weight" and table_in_output:
            block_float[key] = numel * bytes_per  # held until the output layer is quantized
        else:
            held += numel * bytes_per
            if qtype:  # a stored-quantized embedding is dequantized through fp32
                block_float[block] = block_float.get(block, 0) + 4 * numel
    quantized = bool(quantize or stored_types)
    loading = max(block_float.values(), default=0) if quantized else int(held * (LOAD_OVERHEAD - 1))
    kv_heads = max(1, args.n_kv_heads // world)
    kv = 2 * args.n_layers * args.max_batch_size * cache_length(args.max_seq_len) * kv_heads * args.head_dim * bytes_per
    return Estimate(held, loading, kv, RUNTIME_BYTES)


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


# glibc's mallopt parameter, and the ceiling its own dynamic threshold rises to on 64-bit machines.
M_MMAP_THRESHOLD = -3
GLIBC_MMAP_THRESHOLD_MAX = 32 << 20


@contextmanager
def big_allocations_returned():
    """While loading, memory blocks of 256 KiB and more come straight from the system and go back to
    it when freed. Loading frees one layer's float copies after quantizing them, in many sizes, and
    glibc's heap would keep that memory for later: the next layer's copies fit its holes only in
    part. A 1B int4 model then held 260 MB more than its tensors after loading, and peaked 190 MB
    higher. Afterwards glibc's own ceiling is set, so that later blocks under 32 MiB are served from
    its heap, as glibc's rising threshold would have had it by then. On other C libraries: nothing."""
    libc = _GLIBC
    if libc is None:
        yield
        return
    # A fixed threshold also stops glibc raising its trim threshold, so the heap's free top goes
    # back as it grows; trimmed first, the top cannot serve a large block either.
    libc.mallopt(M_MMAP_THRESHOLD, 256 << 10)
    libc.malloc_trim(0)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, GLIBC_MMAP_THRESHOLD_MAX)
        libc.malloc_trim(0)


def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:  # musl, macOS, Windows
        return None


_GLIBC = _glibc()
GLIBC = _GLIBC is not None  # whether big_allocations_returned acts here


def _size(n: int) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / (1 << 20):.0f} MiB"


def check_fits(need: Estimate, device: torch.device, dtype: torch.dtype, args: ModelArgs,
               available: Optional[int], quantize: Optional[str] = None) -> None:
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
    if quantize != "int4":
        fixes.append("--quantize int4 (quantize='int4', CPU: about a quarter of bf16's bytes)")
    if need.kv_cache > need.weights // 10:
        fixes.append(f"a smaller --max_seq_len or --max_batch_size (the KV cache is {_size(need.kv_cache)} "
                     f"for {args.max_batch_size} x {args.max_seq_len} positions)")
    fixes.append("more ranks on more machines (torchrun --nnodes): each holds 1/N of the weights")
    ranks = f" x {local} ranks on this machine" if local > 1 else ""
    raise MemoryError(
        f"this model needs about {_size(need.total)} per rank{ranks} on {device.type} (weights "
        f"{_size(need.weights)} in {quantize or str(dtype).replace('torch.', '')}, {_size(need.loading)} more "
        f"while loading, "
        f"KV cache {_size(need.kv_cache)}, runtime {_size(need.runtime)}) but only "
        f"{_size(available)} is available; try: " + "; ".join(fixes))
