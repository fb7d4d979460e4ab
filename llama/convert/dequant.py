"""Turning one GGUF tensor into a torch tensor: plain floats are copied as they are; block-quantized
types are kept as their blocks (a stored.QuantizedWeight, llama/blocks.py reads them), or expanded
to fp32 when floats are asked for (every weight of a block is scale * q (+ min), which fp32 holds
exactly).

Which types are read is a deliberate list: each is checked against hand-made blocks in the tests.
"""

from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

from ..stored import QuantizedWeight

BLOCK_TYPES = (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K)
SUPPORTED = (Q.F32, Q.F16, Q.BF16) + BLOCK_TYPES


def supported_names() -> str:
    return ", ".join(t.name for t in SUPPORTED)


def check_supported(name: str, qtype, path: Path) -> None:
    if qtype not in SUPPORTED:
        label = getattr(qtype, "name", str(qtype))
        raise ValueError(
            f"{path}: tensor '{name}' is stored as {label}, which this converter does not read (it reads "
            f"{supported_names()}); use a GGUF quantized to one of those (e.g. Q8_0), or convert the model's "
            f"Hugging Face folder instead"
        )


def blocks_of(tensor, path: Path) -> QuantizedWeight:
    """A block-quantized gguf ReaderTensor as its blocks: (rows, bytes per row), as the file holds them."""
    check_supported(tensor.name, tensor.tensor_type, path)
    rows = int(np.prod([int(n) for n in tensor.shape[1:]]))
    # A copy: the file is mapped read-only, and torch wants tensors it may write to.
    return QuantizedWeight(torch.from_numpy(np.array(tensor.data).reshape(rows, -1)), tensor.tensor_type.name)


def to_torch(tensor, path: Path) -> torch.Tensor:
    """A gguf ReaderTensor as a torch tensor of its logical shape (rows, columns), blocks expanded."""
    check_supported(tensor.name, tensor.tensor_type, path)
    shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dimensions innermost first
    data = tensor.data
    if tensor.tensor_type == Q.F32:
        array = np.array(data, dtype=np.float32)
        return torch.from_numpy(array.reshape(shape))
    if tensor.tensor_type == Q.F16:
        array = np.array(data, dtype=np.float16)
        return torch.from_numpy(array.reshape(shape))
    if tensor.tensor_type == Q.BF16:  # bf16 is the top half of an fp32: reinterpret the raw 16-bit words
        words = np.array(data).view(np.int16)
        return torch.from_numpy(words.reshape(shape)).view(torch.bfloat16)
    return blocks_of(tensor, path).dequantize().reshape(shape)
