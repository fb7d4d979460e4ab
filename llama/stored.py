"""Checkpoints stored quantized: what a consolidated.NN.pth holds for a weight that is kept in
blocks, and the record beside the shards that says so.

A quantized weight of logical shape (rows, cols) is stored under its usual name as a uint8 tensor
(rows, row bytes): each row is its cols weights as blocks of one type (llama/blocks.py: GGUF's
Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K, or our I8_ROW), so a shard is cut along rows or along whole
blocks of columns like any other tensor. quantization.json, beside params.json, names each stored
weight's type; a checkpoint without it is all floats.

    {"format": 1, "made_by": "GGUF Q4_K_M.gguf blocks, kept", "mode": null,
     "types": {"layers.0.attention.wq.weight": "Q4_K", ...}}

"mode" is "int4" or "int8" when llama.convert --quantize made the blocks (Q4_1 and I8_ROW: exactly
the codes Llama.build(quantize=...) would make), null for blocks kept from a GGUF file.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch

from . import blocks

RECORD = "quantization.json"
FORMAT = 1


@dataclass
class Record:
    types: Dict[str, str]  # weight name -> block type
    mode: Optional[str]  # "int4" / "int8" when our quantizer made the blocks, else None
    made_by: str

    def write(self, folder: Path) -> None:
        (Path(folder) / RECORD).write_text(json.dumps(
            {"format": FORMAT, "made_by": self.made_by, "mode": self.mode, "types": self.types}, indent=1))


def read_record(folder: Path) -> Optional[Record]:
    """The folder's quantization record, None for an all-float checkpoint."""
    path = Path(folder) / RECORD
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r}, this runner reads format {FORMAT}")
        unknown = sorted({t for t in data["types"].values() if t not in blocks.TYPES and t != blocks.I8_ROW})
        if unknown:
            raise ValueError(f"block types {unknown} that this runner does not read")
        return Record(types=dict(data["types"]), mode=data.get("mode"), made_by=str(data.get("made_by", "")))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"cannot read {path} ({e}); convert the model again with this version of "
                         f"python -m llama.convert") from None


@dataclass
class QuantizedWeight:
    """A (rows, cols) weight held as raw blocks (see the module docstring)."""

    raw: torch.Tensor  # uint8 (rows, row bytes)
    qtype: str

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.raw.shape[0], blocks.logical_cols(self.qtype, self.raw.shape[1])))

    def narrow(self, dim: int, start: int, length: int) -> "QuantizedWeight":
        """Rows or columns [start, start + length), as torch.Tensor.narrow (columns: whole blocks only)."""
        if dim == 0:
            return QuantizedWeight(self.raw.narrow(0, start, length), self.qtype)
        return QuantizedWeight(blocks.take_columns(self.raw, self.qtype, self.shape[1], start, start + length),
                               self.qtype)

    def copy(self) -> "QuantizedWeight":
        """Its own memory (not the file's pages)."""
        return QuantizedWeight(self.raw.clone(), self.qtype)

    def dequantize(self) -> torch.Tensor:
        return blocks.dequantize(self.raw, self.qtype)


def _kind(weight) -> Optional[str]:
    """What weights can be concatenated with: None for floats, else the block type."""
    return weight.qtype if isinstance(weight, QuantizedWeight) else None


def cat(parts: List, dim: int):
    """torch.cat for tensors or for QuantizedWeights of one type; None when the types differ."""
    if len({_kind(p) for p in parts}) != 1:
        return None
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts, dim)
    raws = [p.raw for p in parts]
    return QuantizedWeight(torch.cat(raws, 0) if dim == 0 else blocks.join_columns(raws, parts[0].qtype),
                           parts[0].qtype)


@dataclass
class RowParts:
    """A weight whose blocks of rows cannot be held as one: blocks of different types (a Q4_K_M
    file keeps some v layers as Q6_K beside Q4_K q and k), or floats beside blocks. Its parts, top
    to bottom, each a tensor or a QuantizedWeight, all with the same columns."""

    parts: List

    @property
    def shape(self) -> torch.Size:
        return torch.Size((sum(p.shape[0] for p in self.parts), self.parts[0].shape[1]))


def join_rows(parts: List):
    """The parts' rows, top to bottom, as one weight: a tensor or a QuantizedWeight where they are
    all of one kind (cat), else RowParts of the runs of consecutive parts that are."""
    runs = [[parts[0]]]
    for part in parts[1:]:
        if _kind(part) == _kind(runs[-1][-1]):
            runs[-1].append(part)
        else:
            runs.append([part])
    joined = [run[0] if len(run) == 1 else cat(run, 0) for run in runs]
    return joined[0] if len(joined) == 1 else RowParts(joined)
