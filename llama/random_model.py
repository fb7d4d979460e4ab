"""Random-weight checkpoints in Meta's consolidated format: for smoke tests, demos and benchmarks
of the machinery (loading, sharding, speed) when no real weights are at hand."""

import shutil
from pathlib import Path
from typing import Dict, Optional

import torch

from .args import ModelArgs
from .checkpoint import expected_shapes
from .saving import save_consolidated


def random_weights(params: dict, vocab_size: int, tied: bool = False, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Full tensors with unit-variance activations (std 1/sqrt(fan_in)), like a trained model's scale."""
    args = ModelArgs.from_dict({**params, "vocab_size": vocab_size})
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in expected_shapes(args, tied=tied).items():
        if len(shape) == 1:
            state[key] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif key == "tok_embeddings.weight":
            state[key] = torch.randn(shape, generator=gen)
        else:
            state[key] = torch.randn(shape, generator=gen) / shape[1] ** 0.5
    return state


def write_random_checkpoint(out_dir: Path, params: dict, tokenizer_path: Optional[Path], vocab_size: int,
                            shards: int = 1, tied: bool = False, embedding_split: str = "vocab",
                            seed: int = 0) -> Path:
    """Writes params.json + consolidated.NN.pth (+ a copy of the tokenizer) into out_dir."""
    out_dir = Path(out_dir)
    save_consolidated(random_weights(params, vocab_size, tied, seed), params, out_dir, shards, embedding_split)
    if tokenizer_path is not None:
        shutil.copy(tokenizer_path, out_dir / "tokenizer.model")
    return out_dir
