"""The models the checks run: a small random checkpoint on disk (loaded through Llama.build, as a
user's would be) and random weights at the Llama 3.1 8B shape made directly on the device (16 GB
never touch the disk)."""

import dataclasses
import importlib.resources
import shutil
from pathlib import Path
from typing import List

import torch

from llama.args import ModelArgs, rope_scaling_factor
from llama.checkpoint import assign_weights, expected_shapes, model_weights
from llama.distributed import init_model_parallel
from llama.model import Transformer, skeleton
from llama.random_model import random_weights
from llama.saving import save_consolidated

VOCAB = 128256  # Llama 3's tokenizer
# Small, but with CUDA's usual head size (64) and grouped KV heads, so the fast kernels apply.
TINY = {"dim": 256, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 64, "ffn_dim_multiplier": 1.3,
        "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True}
LLAMA31_8B = {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "multiple_of": 1024,
              "ffn_dim_multiplier": 1.3, "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True}
# A random model's next-token distribution is nearly flat, so last-bit differences between two
# devices would swap near-equal tokens; a larger output layer gives a trained model's peaked one
# (as tests/conftest.py's sharp checkpoint does), so greedy tokens can be compared exactly.
SHARP_OUTPUT = 8.0


def llama3_tokenizer() -> Path:
    """Meta's Llama 3 tokenizer, shipped in the llama-models package (the test extra)."""
    try:
        path = Path(str(importlib.resources.files("llama_models") / "llama3" / "tokenizer.model"))
    except ModuleNotFoundError:
        raise FileNotFoundError("the Llama 3 tokenizer comes from the llama-models package: run "
                                "bash scripts/setup.sh test (or pip install llama-models==0.3.0)") from None
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall llama-models==0.3.0")
    return path


def write_tiny_checkpoint(out_dir: Path, shards: int = 1, seed: int = 0, params: dict = TINY) -> Path:
    """params.json + consolidated.NN.pth + tokenizer.model, with a sharp output layer."""
    weights = random_weights(params, VOCAB, seed=seed)
    weights["output.weight"] *= SHARP_OUTPUT
    save_consolidated(weights, params, Path(out_dir), shards, "vocab")
    shutil.copy(llama3_tokenizer(), Path(out_dir) / "tokenizer.model")
    return Path(out_dir)


def random_model(params: dict, device: torch.device, dtype: torch.dtype, max_batch_size: int, max_seq_len: int,
                 vocab_size: int = VOCAB, seed: int = 0) -> Transformer:
    """A Transformer with random weights (std 1/sqrt(fan_in), as llama.random_model's) drawn on
    `device` in `dtype`, one tensor at a time, given to the model as Llama.build gives a
    checkpoint's (assign_weights), KV cache allocated. Joins a process group of one if none."""
    args = ModelArgs.from_dict({**params, "vocab_size": vocab_size}, max_batch_size=max_batch_size,
                               max_seq_len=max_seq_len)
    if args.use_scaled_rope:
        args = dataclasses.replace(args, rope_scaling_factor=rope_scaling_factor(args, tied_embeddings=False)[0])
    init_model_parallel(device, 1)
    gen = torch.Generator(device=device).manual_seed(seed)

    def weight(key: str, shape) -> torch.Tensor:
        x = torch.randn(shape, generator=gen, device=device, dtype=dtype)
        if len(shape) == 1:
            return x.mul_(0.1).add_(1.0)
        return x if key == "tok_embeddings.weight" else x.mul_(shape[1] ** -0.5)

    with skeleton():
        model = Transformer(args, "vocab")
    shapes = expected_shapes(args)  # Meta's tensors; a fused layer's parts are stacked by rows
    assign_weights(model, ((name, torch.cat([weight(part, shapes[part]) for part in parts]))
                           for name, parts in model_weights(shapes)))
    model.setup_caches(args.max_batch_size, args.max_seq_len)
    return model.eval()


def prompts(lengths: List[int], seed: int = 0, low: int = 1000, high: int = 21000) -> List[List[int]]:
    """Fixed prompts of random ordinary token ids (none of Llama 3's special tokens)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(low, high, (n,), generator=gen).tolist() for n in lengths]
