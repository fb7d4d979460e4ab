"""Helpers for the converter tests: a tiny byte-level tokenizer, tiny random Hugging Face Llama
models saved as safetensors folders, and running a helper script on several ranks."""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

import torch

REPO = Path(__file__).resolve().parent.parent
RANK_WORKER = Path(__file__).resolve().parent / "rank_worker.py"
SPECIALS = ["<s>", "</s>"]
TINY_VOCAB = 256 + len(SPECIALS)  # one token per byte, then <s>, </s>

# Meta's Llama 3.1 RoPE scaling, as Hugging Face writes it.
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}


def byte_level_chars() -> List[str]:
    """GPT-2's byte-level spelling of bytes 0..255, computed independently of the code under test."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    spelled = {b: chr(b) for b in printable}
    spelled.update({b: chr(256 + i) for i, b in enumerate(others)})
    return [spelled[b] for b in range(256)]


def write_tiny_tokenizer(folder: Path, chat_template: Optional[str] = None) -> None:
    """tokenizer.json (byte-level, no merges: one token per byte) + tokenizer_config.json, as a
    Hugging Face model folder has them."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(byte_level_chars())}
    vocab.update({s: 256 + i for i, s in enumerate(SPECIALS)})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "add_bos_token": True}
    if chat_template:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def tiny_llama(*, tied: bool = False, rope_scaling: Optional[dict] = None, vocab_size: int = TINY_VOCAB,
               seed: int = 0, **overrides):
    """A random LlamaForCausalLM: GQA (4 query heads, 2 KV heads), FFN width 176, fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
                    max_position_embeddings=4096, tie_word_embeddings=tied, initializer_range=0.1,
                    bos_token_id=256, eos_token_id=257)
    if rope_scaling:
        settings["rope_scaling"] = dict(rope_scaling)
    settings.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**settings)).eval()
    with torch.no_grad():  # norms away from 1, so a misplaced norm weight shows
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.2 * torch.randn_like(param))
    return model


def save_hf_folder(model, folder: Path, sharded: bool = False) -> Path:
    """save_pretrained as safetensors (many files + index when sharded) + the tiny tokenizer."""
    model.save_pretrained(str(folder), max_shard_size="60KB" if sharded else "2GB")
    write_tiny_tokenizer(folder)
    return folder


def hf_logits(model, tokens: List[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()


def run_ranks(world: int, jobs: List[dict], workdir: Path, timeout: int = 600) -> list:
    """Runs tests/rank_worker.py on `world` CPU ranks under torchrun; returns rank 0's results."""
    jobs_path = Path(workdir) / "jobs.json"
    jobs_path.write_text(json.dumps(jobs))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
           str(RANK_WORKER), str(jobs_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return torch.load(str(jobs_path) + ".out", weights_only=True)
