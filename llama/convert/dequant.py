"""Turning one GGUF tensor into a torch tensor: plain floats are copied as they are, block-quantized
types are expanded to fp32 by the `gguf` package (every weight of a block is scale * q (+ min),
which fp32 holds exactly).

Which types are read is a deliberate list: each is checked against hand-made blocks in the tests.
"""

from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as gguf_dequantize

BLOCK_TYPES = (Q.Q8_0, Q.Q4_0, Q.Q4_1)
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


def to_torch(tensor, path: Path) -> torch.Tensor:
    """A gguf ReaderTensor as a torch tensor of its logical shape (rows, columns)."""
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
    array = gguf_dequantize(np.asarray(data), tensor.tensor_type)
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32).reshape(shape))
