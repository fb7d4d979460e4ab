"""The RoPE scaling factor: 32 for Llama 3.2 1B/3B (whose params.json does not say so), 8 for the
other Llama 3 models, the params.json key as an override; and our scaled RoPE against
transformers' `llama3` rope type at positions far past the original 8192-token context."""

import dataclasses

import pytest
import torch

from llama import Llama
from llama.args import ModelArgs, rope_scaling_factor
from llama.model import apply_rope, rope_tables

# Meta's params.json files as downloaded (llama-models / download.sh).
META_PARAMS = {
    "Llama 3.2 1B": {"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
                     "ffn_dim_multiplier": 1.5, "multiple_of": 256, "norm_eps": 1e-05, "rope_theta": 500000.0,
                     "use_scaled_rope": True},
    "Llama 3.2 3B": {"dim": 3072, "n_layers": 28, "n_heads": 24, "n_kv_heads": 8, "vocab_size": 128256,
                     "ffn_dim_multiplier": 1.0, "multiple_of": 256, "norm_eps": 1e-05, "rope_theta": 500000.0,
                     "use_scaled_rope": True},
    "Llama 3.1 8B": {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
                     "ffn_dim_multiplier": 1.3, "multiple_of": 1024, "norm_eps": 1e-05, "rope_theta": 500000.0,
                     "use_scaled_rope": True},
    "Llama 3.3 70B": {"dim": 8192, "n_layers": 80, "n_heads": 64, "n_kv_heads": 8, "vocab_size": 128256,
                      "ffn_dim_multiplier": 1.3, "multiple_of": 4096, "norm_eps": 1e-05, "rope_theta": 500000.0,
                      "use_scaled_rope": True},
}
POSITIONS = [0, 1, 4095, 8191, 9000, 9001, 20000, 20001]


def decided(name: str, tied: bool, **extra) -> ModelArgs:
    args = ModelArgs.from_dict({**META_PARAMS[name], **extra})
    factor, _ = rope_scaling_factor(args, tied_embeddings=tied)
    return dataclasses.replace(args, rope_scaling_factor=factor)


@pytest.mark.parametrize("name,tied,factor", [("Llama 3.2 1B", True, 32), ("Llama 3.2 3B", True, 32),
                                              ("Llama 3.1 8B", False, 8), ("Llama 3.3 70B", False, 8),
                                              ("Llama 3.2 1B", False, 8)])  # untied: not Meta's 1B
def test_factor_decided_from_the_model(name, tied, factor):
    assert decided(name, tied).rope_scaling_factor == factor


def test_params_json_key_overrides_the_decision():
    assert decided("Llama 3.2 1B", True, rope_scaling_factor=8.0).rope_scaling_factor == 8
    assert decided("Llama 3.1 8B", False, rope_scaling_factor=32.0).rope_scaling_factor == 32


def test_build_says_which_factor_it_used(llama31_ckpts, llama32_ckpts, capsys):
    for ckpt, said in ((llama31_ckpts[1], "RoPE scaling factor 8 (Meta's default, as for Llama 3.1)"),
                       (llama32_ckpts[1], "RoPE scaling factor 32 (rope_scaling_factor in params.json)")):
        Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=8, max_batch_size=1, device="cpu")
        assert said in capsys.readouterr().out


def transformers_rotation(x: torch.Tensor, factor: float) -> torch.Tensor:
    """transformers' Llama RoPE with rope type llama3, applied to x (positions, head_dim) laid out as
    Meta's interleaved pairs; the result is laid out as Meta's again."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    head_dim = x.shape[-1]
    config = LlamaConfig(hidden_size=head_dim, num_attention_heads=1, rope_theta=500000.0,
                         max_position_embeddings=131072,
                         rope_scaling={"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    positions = torch.tensor([POSITIONS])
    cos, sin = LlamaRotaryEmbedding(config)(x, positions)
    # Meta pairs (2i, 2i+1); transformers pairs (i, i + head_dim/2).
    half = torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)[None, None]
    rotated, _ = apply_rotary_pos_emb(half, half, cos, sin)
    rotated = rotated[0, 0]
    return torch.stack([rotated[..., :head_dim // 2], rotated[..., head_dim // 2:]], dim=-1).flatten(-2)


def our_rotation(x: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    cos, sin = rope_tables(args, max(POSITIONS) + 1, torch.device("cpu"))
    index = torch.tensor(POSITIONS)
    return apply_rope(x[None, :, None], cos[index][None], sin[index][None])[0, :, 0]


def rotation_error(args: ModelArgs, reference_factor: float) -> float:
    x = torch.randn(len(POSITIONS), args.head_dim, generator=torch.Generator().manual_seed(0))
    return (our_rotation(x, args) - transformers_rotation(x, reference_factor)).abs().max().item()


def test_llama32_1b_rope_matches_transformers_factor_32_far_past_8192():
    # Angles of ~20000 rad in fp32 carry ~1e-3 rad of rounding, differently in each implementation.
    assert rotation_error(decided("Llama 3.2 1B", tied=True), 32.0) < 5e-3


def test_factor_8_fails_that_comparison():
    assert rotation_error(decided("Llama 3.2 1B", tied=True, rope_scaling_factor=8.0), 32.0) > 0.5
    assert rotation_error(decided("Llama 3.1 8B", tied=False), 8.0) < 5e-3
