"""Writing checkpoints in Meta's layout: params.json + consolidated.NN.pth, each tensor cut into
the shards by the sharding table (llama/checkpoint.py), as Meta's own checkpoints are cut. Used by
the converter (llama/convert/writer.py) and the random checkpoints of tests and demos."""

import json
from pathlib import Path
from typing import Dict, Iterable, List, Tuple

import torch

from . import stored
from .args import ModelArgs
from .checkpoint import WeightValue, check_world_size, rank_slice


def save_consolidated(state: Dict[str, torch.Tensor], params: dict, out_dir: Path, num_shards: int,
                      embedding_split: str = "vocab") -> None:
    """Writes full tensors as Meta's params.json + consolidated.NN.pth, split as Meta splits them
    (embedding_split "dim" for Llama 2 style, "vocab" for Llama 3 style)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    args = ModelArgs.from_dict({**params, "vocab_size": state["tok_embeddings.weight"].shape[0]})
    check_world_size(args, num_shards)
    (out_dir / "params.json").write_text(json.dumps(params, indent=2))
    for shard in range(num_shards):
        part = {}
        for key, tensor in state.items():
            part[key] = shard_piece(key, tensor, args, shard, num_shards, embedding_split)
        torch.save(part, out_dir / f"consolidated.{shard:02d}.pth")


def shard_piece(key: str, tensor: WeightValue, args: ModelArgs, shard: int, num_shards: int,
                embedding_split: str) -> WeightValue:
    """A copy of the part of full tensor `key` that Meta's shard `shard` of `num_shards` holds."""
    dim, start, end = rank_slice(key, args, shard, num_shards, embedding_split)
    piece = tensor if dim is None else tensor.narrow(dim, start, end - start)
    return piece.copy() if isinstance(piece, stored.QuantizedWeight) else piece.clone()


def save_consolidated_streaming(tensors: Iterable[Tuple[str, WeightValue]], params: dict, out_dir: Path,
                                num_shards: int, embedding_split: str = "vocab") -> Dict[str, str]:
    """Like save_consolidated, for full tensors that arrive one at a time (a converter reading a
    file): each is split into the shards as it comes, so besides the shards being built only one
    full tensor is held at once. params must state the real vocab_size. Weights that arrive as
    stored.QuantizedWeight are saved as their blocks; returns their types, for the folder's
    quantization record (llama/stored.py)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    args = ModelArgs.from_dict(params)
    check_world_size(args, num_shards)
    parts: List[Dict[str, torch.Tensor]] = [{} for _ in range(num_shards)]
    types: Dict[str, str] = {}
    for key, tensor in tensors:
        if isinstance(tensor, stored.QuantizedWeight):
            types[key] = tensor.qtype
        for shard, part in enumerate(parts):
            piece = shard_piece(key, tensor, args, shard, num_shards, embedding_split)
            part[key] = piece.raw if isinstance(piece, stored.QuantizedWeight) else piece
        del tensor  # the full tensor goes now, before the next one is read
    (out_dir / "params.json").write_text(json.dumps(params, indent=2))
    for shard in range(num_shards):
        torch.save(parts[shard], out_dir / f"consolidated.{shard:02d}.pth")
        parts[shard] = {}
    return types
