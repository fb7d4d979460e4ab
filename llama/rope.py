"""RoPE's numbers and its per-pair frequencies, with Meta's Llama 3.1 long-context scaling: one home
for the model (llama/model.py), params.json's defaults (llama/args.py) and the converter, which
checks that a source's scaling is the one computed here."""

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # only for hints: llama/args.py imports the numbers below
    from .args import ModelArgs

# Llama 2's params.json has no rope_theta and used 10000 (so do Hugging Face's and llama.cpp's
# defaults); every Llama 3 file states 500000.
DEFAULT_ROPE_THETA = 10000.0

# Meta's code hard-codes 8 (Llama 3.1, 3.2 11B/90B, 3.3). Llama 3.2 1B and 3B were trained with 32
# (meta-llama/llama-models #166, #241), but their params.json says only "use_scaled_rope": true.
LLAMA31_ROPE_FACTOR = 8.0
LLAMA32_SMALL_ROPE_FACTOR = 32.0
# The other three numbers of Llama 3.1's scaling, fixed by Meta: models differ only in the factor.
LLAMA31_LOW_FREQ_FACTOR = 1.0
LLAMA31_HIGH_FREQ_FACTOR = 4.0
LLAMA31_ORIGINAL_CONTEXT = 8192


def rope_frequencies(args: "ModelArgs") -> torch.Tensor:
    """Per-pair rotation speeds, with Llama 3.1's long-context rescaling when asked for."""
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, args.head_dim, 2, dtype=torch.float64) / args.head_dim))
    if not args.use_scaled_rope:
        return freqs.float()
    # Llama 3.1: slow (long-wavelength) pairs are slowed by the factor, fast ones kept, a smooth
    # blend between.
    factor = args.rope_scaling_factor if args.rope_scaling_factor is not None else LLAMA31_ROPE_FACTOR
    low_freq_factor, high_freq_factor = LLAMA31_LOW_FREQ_FACTOR, LLAMA31_HIGH_FREQ_FACTOR
    original_context = LLAMA31_ORIGINAL_CONTEXT
    wavelen = 2 * math.pi / freqs
    smooth = (original_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * freqs / factor + smooth * freqs
    scaled = torch.where(wavelen > original_context / low_freq_factor, freqs / factor, blended)
    scaled = torch.where(wavelen < original_context / high_freq_factor, freqs, scaled)
    return scaled.float()
