"""Shared fixtures: tokenizers and tiny random checkpoints in Meta's consolidated format."""

import shutil
from pathlib import Path
from typing import Dict

import pytest
import torch

from llama.args import ModelArgs
from llama.checkpoint import expected_shapes, save_consolidated

from .tokenizer_files import llama3_tokenizer_path as _llama3_tokenizer_path
from .tokenizer_files import make_sentencepiece_model

REPO = Path(__file__).resolve().parent.parent

LLAMA2_PARAMS = {"dim": 64, "n_layers": 2, "n_heads": 4, "multiple_of": 32, "norm_eps": 1e-5, "vocab_size": -1}
# Llama 3.1 shape: grouped-query attention, theta 500000, scaled RoPE.
LLAMA31_PARAMS = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 32,
                  "ffn_dim_multiplier": 1.3, "norm_eps": 1e-5, "rope_theta": 500000.0,
                  "use_scaled_rope": True, "vocab_size": 128256}
# Llama 3.2 1B/3B shape: tied embeddings (no output.weight), RoPE scale factor 32.
LLAMA32_PARAMS = {**LLAMA31_PARAMS, "rope_scaling_factor": 32.0}


@pytest.fixture(scope="session")
def sp_tokenizer_path(tmp_path_factory) -> Path:
    return make_sentencepiece_model(tmp_path_factory.mktemp("sentencepiece"))


@pytest.fixture(scope="session")
def llama3_tokenizer_path() -> Path:
    return _llama3_tokenizer_path()


def random_weights(params: dict, vocab_size: int, tied: bool, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Random full tensors, scaled so logits spread out (greedy choices are not near-ties)."""
    args = ModelArgs.from_dict({**params, "vocab_size": vocab_size})
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in expected_shapes(args, tied=tied).items():
        if len(shape) == 1:
            state[key] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif key == "tok_embeddings.weight":
            state[key] = torch.randn(shape, generator=gen)
        else:
            state[key] = torch.randn(shape, generator=gen) * (2.0 / shape[1] ** 0.5)
    return state


def write_checkpoint(out_dir: Path, params: dict, tokenizer_path: Path, vocab_size: int, shards: int,
                     tied: bool = False, embedding_split: str = "vocab", seed: int = 0) -> Path:
    state = random_weights(params, vocab_size, tied, seed)
    save_consolidated(state, params, out_dir, shards, embedding_split)
    shutil.copy(tokenizer_path, out_dir / "tokenizer.model")
    return out_dir


def _sp_vocab(path: Path) -> int:
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(path)).vocab_size()


@pytest.fixture(scope="session")
def llama2_ckpts(tmp_path_factory, sp_tokenizer_path) -> Dict[int, Path]:
    """Llama 2 shape (multi-head attention, SentencePiece), saved as 1 and as 2 shards."""
    root = tmp_path_factory.mktemp("llama2")
    vocab = _sp_vocab(sp_tokenizer_path)
    return {k: write_checkpoint(root / f"mp{k}", LLAMA2_PARAMS, sp_tokenizer_path, vocab, k, embedding_split="dim")
            for k in (1, 2)}


@pytest.fixture(scope="session")
def llama31_ckpts(tmp_path_factory, llama3_tokenizer_path) -> Dict[int, Path]:
    """Llama 3.1 shape (GQA, scaled RoPE, real Llama 3 tokenizer), saved as 1 and as 2 shards."""
    root = tmp_path_factory.mktemp("llama31")
    return {k: write_checkpoint(root / f"mp{k}", LLAMA31_PARAMS, llama3_tokenizer_path, 128256, k) for k in (1, 2)}


@pytest.fixture(scope="session")
def llama32_ckpts(tmp_path_factory, llama3_tokenizer_path) -> Dict[int, Path]:
    """Llama 3.2 1B/3B shape (tied embeddings), saved as 1 and as 2 shards."""
    root = tmp_path_factory.mktemp("llama32")
    return {k: write_checkpoint(root / f"mp{k}", LLAMA32_PARAMS, llama3_tokenizer_path, 128256, k, tied=True)
            for k in (1, 2)}
