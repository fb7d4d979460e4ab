"""Picking the reader for a path. Source, what every reader provides, lives in base.py, so the
readers never import this module back."""

from pathlib import Path

from .base import Source

__all__ = ["Source", "open_source"]


def open_source(path: Path) -> Source:
    """A Hugging Face folder (config.json + safetensors) or a GGUF file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--source {path} does not exist; pass a Hugging Face model folder or a .gguf file")
    # Each reader is imported only when picked: gguf_reader needs the optional `gguf` package.
    if path.is_dir():
        from .hf import HuggingFaceSource

        return HuggingFaceSource(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        from .gguf_reader import GGUFSource

        return GGUFSource(path)
    raise ValueError(
        f"--source {path} is neither a folder nor a GGUF file (it does not start with 'GGUF'); pass a Hugging "
        f"Face model folder (config.json + *.safetensors) or a .gguf file"
    )
