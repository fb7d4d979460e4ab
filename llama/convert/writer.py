"""Writing a converted model: the output folder appears whole or not at all.

Everything is written into a hidden sibling folder (.NAME.partial-XXXX), which is renamed to NAME
only once complete; any failure or Ctrl-C removes it. convert.json inside records where the model
came from, so running the same conversion again is a no-op and a folder holding another model is
never overwritten.
"""

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from collections import Counter
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from ..checkpoint import WeightValue
from ..saving import save_consolidated_streaming
from ..dtypes import DTYPES, dtype_name
from ..quantize import DEFAULT_GROUP, GROUP_CHOICES, QUANTIZE_CHOICES, stored_blocks
from ..stored import QuantizedWeight, Record
from .base import Source

RECORD = "convert.json"
_SAMPLE = 4 << 20  # bytes read from each end of a file to tell models apart without reading it all


def fingerprint(files: List[Path]) -> str:
    """Identifies the source: names, sizes and both ends of every file (headers, first and last weights)."""
    digest = hashlib.sha256()
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}\n".encode())
        with open(path, "rb") as f:
            digest.update(f.read(_SAMPLE))
            f.seek(max(size - _SAMPLE, 0))
            digest.update(f.read(_SAMPLE))
    return digest.hexdigest()


def _existing(out: Path, record: dict) -> Optional[dict]:
    """The record of a finished identical conversion in `out`, None if `out` is free; raises otherwise."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; choose a folder path")
    if not any(out.iterdir()):
        return None
    try:
        previous = json.loads((out / RECORD).read_text())
    except (OSError, ValueError):
        raise FileExistsError(f"--out {out} already holds files that llama.convert did not write; choose a new or "
                              f"empty folder") from None
    if previous.get("fingerprint") != record["fingerprint"]:
        raise FileExistsError(
            f"--out {out} already holds a different model (converted from {previous.get('source')}); choose "
            f"another --out, or delete that folder to replace it"
        )
    def options(r: dict) -> str:
        return f"--shards {r.get('shards')} --dtype {r.get('dtype')}" + (
            f" --quantize {r['quantize']}" if r.get("quantize") else "")

    if options(previous) != options(record):
        raise FileExistsError(
            f"--out {out} already holds this model converted with {options(previous)}; choose another --out "
            f"for {options(record)}, or delete that folder"
        )
    return previous


def _publish(staging: Path, out: Path) -> None:
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    try:
        os.rename(staging, out)
    except OSError as e:  # someone wrote into --out while we converted
        raise FileExistsError(f"--out {out} appeared while converting ({e}); nothing was replaced") from None


def _final_form(key: str, tensor: WeightValue, dtype: torch.dtype, keep_blocks: bool, quantize: Optional[str],
                group: int) -> WeightValue:
    """What is written for one tensor: blocks kept as the source holds them (dtype auto), floats in
    `dtype`, or with quantize our quantizer's blocks for the linear layers (int4's output layer int8)."""
    if isinstance(tensor, QuantizedWeight):
        if keep_blocks:
            return tensor
        tensor = tensor.dequantize()
    if quantize and tensor.dim() == 2 and key != "tok_embeddings.weight":  # the linear layers
        return stored_blocks(tensor, "int8" if key == "output.weight" else quantize, group)
    return tensor.to(dtype)


def _progress(source: Source, enabled: bool) -> Iterator[Tuple[str, WeightValue]]:
    try:
        from tqdm import tqdm
    except ImportError as e:  # an optional dependency: only the converter needs it
        raise ImportError("the converter needs the `tqdm` package: pip install -e '.[convert]'") from e

    shapes = source.shapes()
    with tqdm(total=len(shapes), desc="converting", unit="tensor", disable=not enabled) as bar:
        for key, tensor in source.tensors():
            bar.set_postfix_str(key, refresh=False)
            yield key, tensor
            bar.update()


def _made_by(source: Source, types: Dict[str, str], quantize: Optional[str], group: int) -> str:
    if quantize:
        return f"llama.convert --quantize {quantize}" + (f" (group {group})" if quantize == "int4" else "")
    counts = Counter(types.values())
    return f"{Path(source.path).name}'s blocks, kept: " + ", ".join(f"{n} {t}" for t, n in sorted(counts.items()))


def write_model(source: Source, out: Path, shards: int, dtype: str = "auto", progress: bool = True,
                quantize: Optional[str] = None, group: int = DEFAULT_GROUP) -> dict:
    """Converts `source` into `out` (params.json, consolidated.NN.pth, tokenizer files, convert.json,
    and quantization.json when weights are stored quantized). dtype auto keeps the source's
    precision and its quantized blocks as they are (a GGUF's); bf16/fp16/fp32 writes every weight
    as floats; quantize ("int4", "int8") stores the linear layers quantized as Llama.build(quantize=...)
    would, so that loading needs no quantization. Returns the conversion record; if `out` already
    holds this exact conversion, returns its record and writes nothing."""
    out = Path(out).absolute()
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    if not isinstance(shards, int) or isinstance(shards, bool) or shards < 1:
        raise ValueError(f"--shards must be a positive integer, got {shards!r}")
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"--quantize {quantize!r} is not one of int4, int8")
    if quantize == "int4" and (group not in GROUP_CHOICES or source.args.dim % group):
        raise ValueError(f"--quant_group {group} is not one of {GROUP_CHOICES} dividing the model's dim={source.args.dim}")
    torch_dtype = source.dtype if dtype == "auto" else DTYPES[dtype]
    record = {"source": str(Path(source.path).absolute()), "fingerprint": fingerprint(source.files()),
              "shards": shards, "dtype": dtype_name(torch_dtype), "quantize": quantize}
    previous = _existing(out, record)
    if previous is not None:
        return {**previous, "reused": True}
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        keep_blocks = dtype == "auto" and quantize is None
        tensors = ((key, _final_form(key, tensor, torch_dtype, keep_blocks, quantize, group))
                   for key, tensor in _progress(source, progress))
        types = save_consolidated_streaming(tensors, source.params, staging, shards)
        if types:
            Record(types=types, mode=quantize, made_by=_made_by(source, types, quantize, group)).write(staging)
        record["tokenizer"] = source.write_tokenizer(staging)
        (staging / RECORD).write_text(json.dumps(record, indent=2))
        _publish(staging, out)
    except BaseException:  # Ctrl-C included: leave nothing half-written behind
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return record
