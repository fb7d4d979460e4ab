"""Meta's consolidated checkpoint format: which tensor is split along which dim, reading shards
safely, and re-slicing k shards on disk into N ranks (llama/saving.py writes them).

The sharding table below is the single source of truth for every split and merge; FUSED names
the tensors the model holds as one layer (q/k/v, w1/w3), each rank's slices one under the other.
"""

import ctypes
import dataclasses
import ctypes.util
import mmap
import pickle
import sys
import re
import warnings
import zipfile
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import torch
from torch import nn

from . import stored
from .args import ModelArgs

# Split dim of each tensor in the consolidated format: 0 for column-parallel layers (output
# features), 1 for row-parallel ones (input features), None for replicated tensors.
# tok_embeddings is absent: Llama 2 splits it along dim 1, Llama 3 along dim 0 (vocab).
SPLIT_DIM: Dict[str, Optional[int]] = {
    "attention.wq.weight": 0,
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "attention.wo.weight": 1,
    "feed_forward.w1.weight": 0,
    "feed_forward.w3.weight": 0,
    "feed_forward.w2.weight": 1,
    "attention_norm.weight": None,
    "ffn_norm.weight": None,
    "norm.weight": None,
    "output.weight": 0,
}
KV_KEYS = ("attention.wk.weight", "attention.wv.weight")
# The model holds the column-parallel layers that read the same input as one layer: this rank's
# rows of each checkpoint tensor, in this order (llama/model.py splits its product again).
FUSED: Dict[str, Tuple[str, ...]] = {
    "attention.wqkv.weight": ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight"),
    "feed_forward.w13.weight": ("feed_forward.w1.weight", "feed_forward.w3.weight"),
}
_FUSED_INTO = {part: fused for fused, parts in FUSED.items() for part in parts}
IGNORED_KEYS = {"rope.freqs"}  # old checkpoints store RoPE tables; we compute them
LAYER_KEY = re.compile(r"(layers\.\d+)\.")
SHARD_NAME = re.compile(r"consolidated\.(\d+)\.pth$")
_MADV_DONTNEED = 4
WeightValue = Union[torch.Tensor, stored.QuantizedWeight, stored.RowParts]
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if sys.platform.startswith("linux") else None


def _suffix(key: str) -> str:
    return re.sub(r"^layers\.\d+\.", "", key)


def expected_shapes(args: ModelArgs, tied: bool = False) -> Dict[str, Tuple[int, ...]]:
    """Full (unsharded) shape of every tensor the model needs."""
    hd, dim = args.head_dim, args.dim
    per_layer = {
        "attention.wq.weight": (args.n_heads * hd, dim),
        "attention.wk.weight": (args.n_kv_heads * hd, dim),
        "attention.wv.weight": (args.n_kv_heads * hd, dim),
        "attention.wo.weight": (dim, args.n_heads * hd),
        "feed_forward.w1.weight": (args.ffn_hidden_dim, dim),
        "feed_forward.w3.weight": (args.ffn_hidden_dim, dim),
        "feed_forward.w2.weight": (dim, args.ffn_hidden_dim),
        "attention_norm.weight": (dim,),
        "ffn_norm.weight": (dim,),
    }
    shapes = {"tok_embeddings.weight": (args.vocab_size, dim), "norm.weight": (dim,)}
    if not tied:
        shapes["output.weight"] = (args.vocab_size, dim)
    for i in range(args.n_layers):
        shapes.update({f"layers.{i}.{k}": v for k, v in per_layer.items()})
    return shapes


def _full_shape(key: str, args: ModelArgs) -> Tuple[int, ...]:
    """expected_shapes(args)[key] without building the table for every layer."""
    if key in ("tok_embeddings.weight", "output.weight", "norm.weight"):
        return expected_shapes(args)[key]
    return expected_shapes(dataclasses.replace(args, n_layers=1))["layers.0." + _suffix(key)]


def check_world_size(args: ModelArgs, world: int) -> None:
    """Raises unless the model's weights split evenly over `world` ranks."""
    problems = []
    if args.n_heads % world:
        problems.append(f"n_heads={args.n_heads} is not divisible by {world}")
    if args.n_kv_heads % world and world % args.n_kv_heads:
        problems.append(f"n_kv_heads={args.n_kv_heads} neither divides nor is divisible by {world}")
    if args.ffn_hidden_dim % world:
        problems.append(f"the feed-forward width {args.ffn_hidden_dim} is not divisible by {world}")
    if args.vocab_size % world:
        problems.append(f"vocab_size={args.vocab_size} is not divisible by {world}")
    if problems:
        fits = [n for n in range(1, args.n_heads + 1) if args.n_heads % n == 0 and
                (args.n_kv_heads % n == 0 or n % args.n_kv_heads == 0) and
                args.ffn_hidden_dim % n == 0 and args.vocab_size % n == 0]
        raise ValueError(
            f"this model cannot be split across {world} ranks: {'; '.join(problems)}. "
            f"Run with a rank count of {fits} (torchrun --nproc_per_node N)"
        )


def rank_slice(key: str, args: ModelArgs, rank: int, world: int,
               embedding_split: str) -> Tuple[Optional[int], int, int]:
    """(dim, start, end) of the full tensor that `rank` of `world` holds; dim None = all of it.
    Also Meta's shard layout: shard s of k is rank_slice(key, args, s, k)."""
    suffix = _suffix(key)
    if suffix == "tok_embeddings.weight":
        dim = 0 if embedding_split == "vocab" else 1
    else:
        dim = SPLIT_DIM[suffix]
    if dim is None or world == 1:
        return None, 0, 0
    if suffix in KV_KEYS and world > args.n_kv_heads:
        # More ranks than KV heads: rank r keeps the one KV head its query heads use.
        head = rank // (world // args.n_kv_heads)
        return 0, head * args.head_dim, (head + 1) * args.head_dim
    size = _full_shape(key, args)[dim] // world
    return dim, rank * size, (rank + 1) * size


def find_shards(ckpt_dir: Path) -> List[Path]:
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"checkpoint folder {ckpt_dir} does not exist; check --ckpt_dir")
    found = {}
    for path in ckpt_dir.glob("consolidated.*.pth"):
        match = SHARD_NAME.search(path.name)
        if match:
            found[int(match.group(1))] = path
    if not found:
        raise FileNotFoundError(
            f"no consolidated.NN.pth shards in {ckpt_dir}; download the model (download.sh) "
            f"or convert one (python -m llama.convert)"
        )
    missing = sorted(set(range(max(found) + 1)) - set(found))
    if missing:
        raise FileNotFoundError(
            f"{ckpt_dir} is missing shards {['consolidated.%02d.pth' % i for i in missing]}; "
            f"finish the download"
        )
    return [found[i] for i in sorted(found)]


def open_shard(path: Path) -> Dict[str, torch.Tensor]:
    """Memory-maps one shard. weights_only=True: a .pth is a pickle, and ours never runs its code."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"refusing to load {path}: it holds Python objects other than tensors, and unpickling "
            f"them could run code. Only plain tensor checkpoints are loaded ({e})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"cannot read {path}: the file is truncated or corrupt ({e}); download it again") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a state dict of tensors; is it a Meta consolidated checkpoint?")
    return state


class ShardedCheckpoint:
    """The k shards of one checkpoint, read lazily through mmap, addressed as full tensors."""

    def __init__(self, ckpt_dir: Path, args: ModelArgs):
        self.paths = find_shards(ckpt_dir)
        self.shards = [open_shard(p) for p in self.paths]
        self.args = args
        self.quantization = stored.read_record(Path(ckpt_dir))  # None: all floats
        self.types = self.quantization.types if self.quantization else {}
        for shard in self.shards:  # view each stored-quantized weight as its blocks
            for key, qtype in self.types.items():
                if key in shard:
                    shard[key] = stored.QuantizedWeight(shard[key], qtype)
        first = self.shards[0]
        self.tied = "output.weight" not in first
        self.shapes = expected_shapes(args, tied=self.tied)
        for key in sorted(set(self.shapes) - set(first)):
            raise ValueError(f"{self.paths[0]} has no tensor '{key}'; params.json and the shards disagree")
        layer_ids = [int(m.group(1)) for m in (re.match(r"layers\.(\d+)\.", key) for key in first) if m]
        if layer_ids and max(layer_ids) >= args.n_layers:  # running the first n_layers only would give garbage
            raise ValueError(f"the shards in {ckpt_dir} hold {max(layer_ids) + 1} layers but params.json says "
                             f"n_layers={args.n_layers}; params.json and the shards disagree")
        extra = sorted(set(first) - set(self.shapes) - IGNORED_KEYS)
        if extra:
            warnings.warn(f"{ckpt_dir}: ignoring tensors the model does not use: {extra[:5]}", stacklevel=2)
        self.disk_dim = {key: self._check_key(key) for key in self.shapes}

    @property
    def embedding_split_on_disk(self) -> Optional[str]:
        dim = self.disk_dim["tok_embeddings.weight"]
        return None if dim is None else ("vocab" if dim == 0 else "dim")

    def _check_key(self, key: str) -> Optional[int]:
        """Validates the shard shapes of `key` against params.json; returns the split dim on disk."""
        full = self.shapes[key]
        shapes = []
        for path, shard in zip(self.paths, self.shards):
            if key not in shard:
                raise ValueError(f"{path} has no tensor '{key}' but {self.paths[0].name} has it; the shards are "
                                 f"incomplete or come from different models")
            try:
                shapes.append(tuple(shard[key].shape))
            except ValueError as e:  # stored blocks whose row size fits no whole number of blocks
                raise ValueError(f"{path}: tensor '{key}' does not hold whole {self.types[key]} blocks ({e}); "
                                 f"the file and {stored.RECORD} disagree") from None
        k, shape = len(shapes), shapes[0]
        if len(set(shapes)) == 1:
            if shape == full and (k == 1 or SPLIT_DIM.get(_suffix(key), 0) is None):
                return None
            for dim in range(len(full)):
                if any(shape[d] != full[d] for d in range(len(full)) if d != dim):
                    continue
                if shape[dim] * k == full[dim]:
                    return dim
                # More shards than KV heads: each shard holds one KV head, repeated.
                if _suffix(key) in KV_KEYS and dim == 0 and full[0] % shape[0] == 0 and k % (full[0] // shape[0]) == 0:
                    return dim
            if _suffix(key) in ("tok_embeddings.weight", "output.weight") and shape[1] in (full[1], full[1] / k):
                vocab = shape[0] * k if shape[1] == full[1] and k > 1 else shape[0]
                raise ValueError(
                    f"the shards in {self.paths[0].parent} hold a vocabulary of {vocab} tokens ('{key}') but the model "
                    f"expects vocab_size={full[0]} (params.json's vocab_size, or the tokenizer's size when it is -1); "
                    f"pass the tokenizer that belongs to this checkpoint"
                )
        raise ValueError(
            f"tensor '{key}' has shard shapes {shapes} in {self.paths[0].parent}, which do not fit the "
            f"full shape {full} implied by params.json; params.json and the shards disagree"
        )

    def release(self, key: str) -> None:
        """Done with `key`: its file pages need not stay in memory."""
        for shard in self.shards:
            tensor = shard[key]
            _drop_file_pages(tensor.raw if isinstance(tensor, stored.QuantizedWeight) else tensor)

    def read(self, key: str, dim: Optional[int], start: int, end: int) -> torch.Tensor:
        """Slice [start:end) along `dim` of the full tensor `key` (dim None: the whole tensor),
        touching only the shard bytes that overlap it."""
        disk = self.disk_dim[key]
        pieces = [s[key] for s in self.shards]
        if disk is None:
            return pieces[0] if dim is None else pieces[0].narrow(dim, start, end - start)
        per = pieces[0].shape[disk]
        pieces = pieces[:: per * len(pieces) // self.shapes[key][disk]]  # drop repeated KV heads
        if dim != disk:
            if dim is not None:
                pieces = [p.narrow(dim, start, end - start) for p in pieces]
            return stored.cat(pieces, disk)
        parts = []
        for i, piece in enumerate(pieces):
            lo, hi = max(start, i * per), min(end, (i + 1) * per)
            if lo < hi:
                parts.append(piece.narrow(dim, lo - i * per, hi - lo))
        return parts[0] if len(parts) == 1 else stored.cat(parts, dim)


def _drop_file_pages(tensor: torch.Tensor) -> None:
    """Lets the kernel drop the file pages behind an mmap-ed tensor once it has been copied, so a
    load holds about one tensor of file pages on top of its own slice. Linux only; elsewhere the
    pages stay until the shard is closed."""
    if _libc is None or tensor.numel() == 0:
        return
    page = mmap.PAGESIZE
    begin = tensor.untyped_storage().data_ptr() + tensor.storage_offset() * tensor.element_size()
    first = begin // page * page
    length = begin + tensor.numel() * tensor.element_size() - first
    _libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(length), _MADV_DONTNEED)


def model_weights(keys: Iterable[str]) -> Iterator[Tuple[str, Tuple[str, ...]]]:
    """The name of each weight the model holds, with the checkpoint tensors it is made of (FUSED),
    in the order of `keys` (a fused weight where its first part is)."""
    for key in keys:
        suffix = _suffix(key)
        prefix = key[:len(key) - len(suffix)]
        fused = _FUSED_INTO.get(suffix)
        if fused is None:
            yield key, (key,)
        elif suffix == FUSED[fused][0]:
            yield prefix + fused, tuple(prefix + part for part in FUSED[fused])


def iter_rank_weights(ckpt: ShardedCheckpoint, rank: int, world: int, embedding_split: str,
                      device: torch.device, dtype: torch.dtype) -> Iterator[Tuple[str, WeightValue]]:
    """This rank's slice of every weight the model holds (model_weights: a fused layer's slices of
    its checkpoint tensors one under the other), converted straight into its final device and
    dtype, one at a time in the checkpoint's order (the embedding, norm and output first, then
    layer by layer), so a caller can turn each layer into its final form before the next is read.
    A weight stored quantized comes as a stored.QuantizedWeight (copied out of the file), or as
    stored.RowParts where a fused layer's parts are of different types (or floats beside blocks),
    except the embedding, which is dequantized: a step reads one row of it."""

    def piece(key: str, source: str):
        return ckpt.read(source, *rank_slice(key, ckpt.args, rank, world, embedding_split))

    def final(value, keep_blocks: bool) -> WeightValue:
        if isinstance(value, stored.QuantizedWeight):
            if keep_blocks:
                return value.copy()
            value = value.dequantize()
        return torch.empty(value.shape, dtype=dtype, device=device).copy_(value)

    def fused(sources: Tuple[str, ...]) -> WeightValue:
        pieces = [piece(source, source) for source in sources]
        if any(isinstance(p, stored.QuantizedWeight) for p in pieces):
            return stored.join_rows([final(p, keep_blocks=True) for p in pieces])
        out = torch.empty((sum(p.shape[0] for p in pieces), pieces[0].shape[1]), dtype=dtype, device=device)
        for rows, p in zip(out.split([p.shape[0] for p in pieces]), pieces):
            rows.copy_(p)  # straight into the fused tensor: no copy of the parts on the side
        return out

    for key, sources in model_weights(ckpt.shapes):
        if len(sources) > 1:
            tensor = fused(sources)
        else:
            tensor = final(piece(key, key), keep_blocks=key != "tok_embeddings.weight")
        yield key, tensor
        if ckpt.tied and key == "tok_embeddings.weight":
            # Tied output layer: with both split by vocab, this rank's embedding rows (its blocks, if stored so).
            stored_blocks = key in ckpt.types
            yield "output.weight", (tensor if embedding_split == "vocab" and not stored_blocks
                                    else final(piece("output.weight", key), keep_blocks=True))
        for source in sources:
            ckpt.release(source)


def load_rank_weights(ckpt: ShardedCheckpoint, rank: int, world: int, embedding_split: str,
                      device: torch.device, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """iter_rank_weights as one dict."""
    return dict(iter_rank_weights(ckpt, rank, world, embedding_split, device, dtype))


def assign_weights(model: nn.Module, weights: Iterable[Tuple[str, WeightValue]],
                   finish: Optional[Callable[[nn.Module], None]] = None) -> None:
    """Gives the model (built on the meta device) its weights as they arrive from
    iter_rank_weights. `finish` is called on the model once the embedding, norm and output layer
    are in (it must leave alone what is still on the meta device), then on each transformer block
    as soon as its last tensor is in: quantize_model turns a block into its quantized products
    there, so only one block's float weights are held beside the finished ones. Weights stored
    quantized are left beside their layer as its `stored`, for `finish` to make products of."""
    rest: Dict[str, WeightValue] = {}
    block: Dict[str, WeightValue] = {}
    prefix: Optional[str] = None

    def place_stored(module: nn.Module, weights: Dict[str, WeightValue]) -> None:
        """Weights kept as blocks go beside their layer (its `stored`) for `finish` to make products of."""
        for key in [k for k, v in weights.items() if not isinstance(v, torch.Tensor)]:
            layer = module.get_submodule(key.rsplit(".", 1)[0])
            layer.weight = None
            layer.stored = weights.pop(key)

    def not_stored(module: nn.Module, keys: List[str]) -> List[str]:
        return [key for key in keys if getattr(module.get_submodule(key.rsplit(".", 1)[0]), "stored", None) is None]

    def finish_rest() -> None:
        place_stored(model, rest)
        result = model.load_state_dict(rest, strict=False, assign=True)
        missing = [key for key in not_stored(model, result.missing_keys) if not LAYER_KEY.match(key)]
        if missing or result.unexpected_keys:
            raise ValueError(f"the weights do not fit the model: missing {missing}, unexpected {result.unexpected_keys}")
        rest.clear()
        if finish is not None:
            finish(model)

    def finish_block() -> None:
        module = model.get_submodule(prefix)
        weights = {key[len(prefix) + 1:]: value for key, value in block.items()}
        place_stored(module, weights)
        result = module.load_state_dict(weights, strict=False, assign=True)
        missing = not_stored(module, result.missing_keys)
        if missing or result.unexpected_keys:
            raise ValueError(f"the weights of {prefix} do not fit the model: missing {missing}, unexpected "
                             f"{result.unexpected_keys}")
        block.clear()
        if finish is not None:
            finish(module)

    for key, tensor in weights:
        match = LAYER_KEY.match(key)
        if match is None:
            rest[key] = tensor
            continue
        if prefix is None:
            finish_rest()
        elif match.group(1) != prefix:
            finish_block()
        prefix = match.group(1)
        block[key] = tensor
    if prefix is None:
        finish_rest()
    else:
        finish_block()
