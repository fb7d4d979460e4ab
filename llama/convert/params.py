"""Meta's params.json from the facts any source states (sizes, norm epsilon, RoPE), with the two
choices a converter has to make: FFN rounding parameters that reproduce the source's width
exactly, and whether its RoPE scaling is the one our model computes."""

import math
from typing import Dict, Optional

from ..args import ModelArgs
# Llama 3.1's RoPE scaling: our model fixes these three and only takes the factor.
from ..rope import (
    LLAMA31_HIGH_FREQ_FACTOR as META_HIGH_FREQ_FACTOR,
    LLAMA31_LOW_FREQ_FACTOR as META_LOW_FREQ_FACTOR,
    LLAMA31_ORIGINAL_CONTEXT as META_ORIGINAL_CONTEXT,
)

_MULTIPLES = (1024, 256, 512, 128, 64, 32, 16, 8, 4, 2, 1)


def ffn_rounding(dim: int, hidden: int) -> Dict[str, Optional[float]]:
    """`multiple_of` and `ffn_dim_multiplier` for which ModelArgs.ffn_hidden_dim == hidden.

    Meta's width is multiple_of * ceil(int(ffn_dim_multiplier * int(8 * dim / 3)) / multiple_of);
    the simplest pair that lands on `hidden` wins (no multiplier, a short decimal, the exact ratio).
    A solution always exists: multiple_of = hidden with a multiplier that keeps the product <= hidden."""
    if not isinstance(hidden, int) or hidden <= 0:
        raise ValueError(f"the source's feed-forward width {hidden!r} is not a positive integer")
    ratio = hidden / int(2 * (4 * dim) / 3)
    multipliers = [None] + [round(ratio, digits) for digits in (1, 2, 3, 4, 6)] + [ratio]
    # Round multiples first (Meta uses 256 and 1024); multiple_of = hidden is the last resort.
    candidates = [(m, k) for m in multipliers for k in _MULTIPLES] + [(m, hidden) for m in multipliers]
    for multiplier, multiple_of in candidates:
        if hidden % multiple_of or (multiplier is not None and multiplier <= 0):
            continue
        if _width(dim, multiple_of, multiplier) == hidden:
            return {"multiple_of": multiple_of, "ffn_dim_multiplier": multiplier}
    raise ValueError(
        f"cannot express the feed-forward width {hidden} of a model with dim={dim} in params.json "
        f"(multiple_of / ffn_dim_multiplier); this model's shape is not one our runner can build"
    )


def _width(dim: int, multiple_of: int, multiplier: Optional[float]) -> int:
    return ModelArgs(dim=dim, n_layers=1, n_heads=1, multiple_of=multiple_of,
                     ffn_dim_multiplier=multiplier).ffn_hidden_dim


def check_llama3_rope_scaling(factor, low_freq_factor, high_freq_factor, original_context, source: str) -> float:
    """The scaling factor, after checking the other three numbers are Meta's (our model fixes them)."""
    got = (low_freq_factor, high_freq_factor, original_context)
    meta = (META_LOW_FREQ_FACTOR, META_HIGH_FREQ_FACTOR, META_ORIGINAL_CONTEXT)
    if any(g is None or not math.isclose(float(g), m) for g, m in zip(got, meta)):
        raise ValueError(
            f"{source}: llama3 RoPE scaling with low_freq_factor={low_freq_factor}, high_freq_factor="
            f"{high_freq_factor}, original_max_position_embeddings={original_context}; this runner computes "
            f"Meta's Llama 3.1 scaling only ({meta[0]:g}, {meta[1]:g}, {meta[2]}), so it cannot run this model"
        )
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor <= 0:
        raise ValueError(f"{source}: llama3 RoPE scaling needs a positive 'factor', got {factor!r}")
    return float(factor)


def meta_params(*, dim: int, n_layers: int, n_heads: int, n_kv_heads: int, vocab_size: int, ffn_hidden: int,
                norm_eps: float, rope_theta: float, rope_scaling_factor: Optional[float], head_dim: int,
                source: str) -> dict:
    """params.json for these sizes; checks our model would build exactly this shape."""
    if dim % n_heads or dim // n_heads != head_dim:
        raise ValueError(
            f"{source}: attention heads of size {head_dim} with hidden size {dim} and {n_heads} heads; this "
            f"runner needs head size == hidden size / heads, so it cannot run this model"
        )
    params = {
        "dim": dim, "n_layers": n_layers, "n_heads": n_heads, "n_kv_heads": n_kv_heads, "vocab_size": vocab_size,
        **ffn_rounding(dim, ffn_hidden), "norm_eps": float(norm_eps), "rope_theta": float(rope_theta),
    }
    if params["ffn_dim_multiplier"] is None:
        del params["ffn_dim_multiplier"]
    if rope_scaling_factor is not None:
        params.update(use_scaled_rope=True, rope_scaling_factor=rope_scaling_factor)
    ModelArgs.from_dict(params, source=source)  # the same validation Llama.build will apply
    return params
