"""ModelArgs: the schema of Meta's params.json, its validation and the sizes derived from it."""

import json
import math
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from .rope import DEFAULT_ROPE_THETA, LLAMA31_ROPE_FACTOR, LLAMA32_SMALL_ROPE_FACTOR

# Keys that describe models this runner cannot execute: refusing beats producing garbage.
UNSUPPORTED_KEYS = {
    "vision_chunk_size": "vision (Llama 3.2 Vision)",
    "vision_max_num_chunks": "vision (Llama 3.2 Vision)",
    "vision_num_cross_attention_layers": "vision (Llama 3.2 Vision)",
    "moe_args": "mixture of experts (Llama 4)",
    "num_experts": "mixture of experts",
    "quantization_args": "pre-quantized weights (QAT / SpinQuant checkpoints)",
    "lora_args": "LoRA adapters baked into a quantized checkpoint",
}


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    vocab_size: int = -1  # -1: take the tokenizer's size
    multiple_of: int = 256  # the SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = DEFAULT_ROPE_THETA
    use_scaled_rope: bool = False
    # Not in Meta's params.json: None lets Llama.build decide it from the model (rope_scaling_factor()).
    rope_scaling_factor: Optional[float] = None

    # Set by Llama.build, not by params.json.
    max_batch_size: int = 32
    max_seq_len: int = 2048

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        self._validate()

    def _validate(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "max_batch_size", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"params.json: '{name}' must be a positive integer, got {value!r}")
        if not isinstance(self.vocab_size, int) or (self.vocab_size <= 0 and self.vocab_size != -1):
            raise ValueError(f"params.json: 'vocab_size' must be a positive integer or -1, got {self.vocab_size!r}")
        for name in ("norm_eps", "rope_theta", "rope_scaling_factor", "ffn_dim_multiplier"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
                raise ValueError(f"params.json: '{name}' must be a number, got {value!r}")
        if not isinstance(self.use_scaled_rope, bool):
            raise ValueError(f"params.json: 'use_scaled_rope' must be true or false, got {self.use_scaled_rope!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"params.json: dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"params.json: head size dim/n_heads={self.head_dim} must be even for RoPE")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"params.json: n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}"
            )
        if not self.norm_eps > 0:
            raise ValueError(f"params.json: 'norm_eps' must be > 0, got {self.norm_eps!r}")
        if not self.rope_theta > 0:
            raise ValueError(f"params.json: 'rope_theta' must be > 0, got {self.rope_theta!r}")
        if self.rope_scaling_factor is not None and not self.rope_scaling_factor > 0:
            raise ValueError(f"params.json: 'rope_scaling_factor' must be > 0, got {self.rope_scaling_factor!r}")
        if self.ffn_dim_multiplier is not None and not self.ffn_dim_multiplier > 0:
            raise ValueError(f"params.json: 'ffn_dim_multiplier' must be > 0, got {self.ffn_dim_multiplier!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """SwiGLU width, derived the way Meta's FeedForward derives it."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    @classmethod
    def from_dict(cls, params: Dict[str, Any], source: str = "params.json", **overrides: Any) -> "ModelArgs":
        for key, what in UNSUPPORTED_KEYS.items():
            if params.get(key) not in (None, 0, {}, []):
                raise ValueError(f"{source}: key '{key}' asks for {what}, which this runner cannot run")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known - set(UNSUPPORTED_KEYS))
        if unknown:
            warnings.warn(f"{source}: ignoring unknown keys {unknown}", stacklevel=2)
        for required in ("dim", "n_layers", "n_heads"):
            if required not in params:
                raise ValueError(f"{source}: required key '{required}' is missing")
        kwargs = {k: v for k, v in params.items() if k in known}
        kwargs.update(overrides)
        try:
            return cls(**kwargs)
        except TypeError as e:  # e.g. a string where a number belongs
            raise ValueError(f"{source}: {e}") from e


# (dim, n_layers) of Llama 3.2 1B and 3B, which run with LLAMA32_SMALL_ROPE_FACTOR (see llama/rope.py).
LLAMA32_SMALL_SHAPES = {(2048, 16): "Llama 3.2 1B", (3072, 28): "Llama 3.2 3B"}


def rope_scaling_factor(args: ModelArgs, tied_embeddings: bool) -> Tuple[float, str]:
    """The RoPE scaling factor to run with, and why: the params.json key when present, else 32 for
    the Llama 3.2 1B/3B shapes (8 KV heads, Llama 3 vocabulary, no output.weight), else 8."""
    if args.rope_scaling_factor is not None:
        return float(args.rope_scaling_factor), "rope_scaling_factor in params.json"
    name = LLAMA32_SMALL_SHAPES.get((args.dim, args.n_layers))
    if name and args.n_kv_heads == 8 and args.vocab_size == 128256 and tied_embeddings:
        return LLAMA32_SMALL_ROPE_FACTOR, f"{name} shape"
    return LLAMA31_ROPE_FACTOR, "Meta's default, as for Llama 3.1"


def load_params(ckpt_dir: Path, **overrides: Any) -> ModelArgs:
    """Reads and validates ckpt_dir/params.json."""
    if not Path(ckpt_dir).is_dir():
        raise FileNotFoundError(f"checkpoint folder {ckpt_dir} does not exist; check --ckpt_dir")
    path = Path(ckpt_dir) / "params.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: --ckpt_dir must be a folder holding params.json and consolidated.NN.pth"
        )
    try:
        params = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-download it or fix the file") from e
    if not isinstance(params, dict):
        raise ValueError(f"{path} must hold a JSON object of model parameters")
    return ModelArgs.from_dict(params, source=str(path), **overrides)


def cache_length(max_seq_len: int) -> int:
    """The KV cache's positions: max_seq_len and one more, rounded up to a multiple of 16, since
    CUDA's attention kernels refuse a mask whose last dimension is not aligned (pytorch#121943).
    Position max_seq_len is scratch: a decode step's rows that hold no running request (free, held
    finished, still prefilling, padding) write their placeholder there, past anything a request
    reads, so that what a row holds stays whole (prefix reuse reads it later). The positions past
    max_seq_len are never attended to by a real query."""
    return -(-(max_seq_len + 1) // 16) * 16
