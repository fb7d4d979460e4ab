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
from typing import Iterator, List, Optional, Tuple

import torch

from ..checkpoint import save_consolidated_streaming
from .source import Source

RECORD = "convert.json"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_SAMPLE = 4 << 20  # bytes read from each end of a file to tell models apart without reading it all


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, d in DTYPES.items() if d == dtype)


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
    if (previous.get("shards"), previous.get("dtype")) != (record["shards"], record["dtype"]):
        raise FileExistsError(
            f"--out {out} already holds this model converted with --shards {previous.get('shards')} --dtype "
            f"{previous.get('dtype')}; choose another --out for --shards {record['shards']} --dtype "
            f"{record['dtype']}, or delete that folder"
        )
    return previous


def _publish(staging: Path, out: Path) -> None:
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    try:
        os.rename(staging, out)
    except OSError as e:  # someone wrote into --out while we converted
        raise FileExistsError(f"--out {out} appeared while converting ({e}); nothing was replaced") from None


def _progress(source: Source, dtype: torch.dtype, enabled: bool) -> Iterator[Tuple[str, torch.Tensor]]:
    try:
        from tqdm import tqdm
    except ImportError as e:  # an optional dependency: only the converter needs it
        raise ImportError("the converter needs the `tqdm` package: pip install -e '.[convert]'") from e

    shapes = source.shapes()
    with tqdm(total=len(shapes), desc="converting", unit="tensor", disable=not enabled) as bar:
        for key, tensor in source.tensors():
            bar.set_postfix_str(key, refresh=False)
            yield key, tensor.to(dtype)
            bar.update()


def write_model(source: Source, out: Path, shards: int, dtype: str = "auto", progress: bool = True) -> dict:
    """Converts `source` into `out` (params.json, consolidated.NN.pth, tokenizer files, convert.json).
    Returns the conversion record; if `out` already holds this exact conversion, returns its record
    and writes nothing."""
    out = Path(out).absolute()
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    if not isinstance(shards, int) or isinstance(shards, bool) or shards < 1:
        raise ValueError(f"--shards must be a positive integer, got {shards!r}")
    torch_dtype = source.dtype if dtype == "auto" else DTYPES[dtype]
    record = {"source": str(Path(source.path).absolute()), "fingerprint": fingerprint(source.files()),
              "shards": shards, "dtype": dtype_name(torch_dtype)}
    previous = _existing(out, record)
    if previous is not None:
        return {**previous, "reused": True}
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        save_consolidated_streaming(_progress(source, torch_dtype, progress), source.params, staging, shards)
        record["tokenizer"] = source.write_tokenizer(staging)
        (staging / RECORD).write_text(json.dumps(record, indent=2))
        _publish(staging, out)
    except BaseException:  # Ctrl-C included: leave nothing half-written behind
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return record
