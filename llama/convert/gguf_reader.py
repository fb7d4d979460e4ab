"""Reading a GGUF file (llama.cpp's format) of a Llama-architecture model, through the `gguf`
package, which memory-maps the file: a tensor's bytes are touched only when it is converted.

Layout: llama.cpp rotates RoPE pairs (2i, 2i+1), as Meta does, and its converter re-permutes
Hugging Face's rotate-half q/k rows back into that order. A "llama" GGUF therefore already holds
wq and wk in Meta's layout, and they are copied unchanged (the parity tests against transformers,
which permutes them the other way for its own model, check this).
"""

from pathlib import Path
from typing import List, Optional, Union

import torch

from ..args import ModelArgs
from ..rope import DEFAULT_ROPE_THETA, rope_frequencies
from ..stored import QuantizedWeight
from . import params as meta
from .base import Source

try:
    from gguf import GGUFReader
except ImportError as e:  # an optional dependency: only the converter needs it
    raise ImportError("reading GGUF files needs the `gguf` package: pip install -e '.[convert]'") from e

from . import dequant
from .gguf_tokenizer import write_gguf_tokenizer

LAYER_NAMES = {
    "attention.wq.weight": "attn_q.weight",
    "attention.wk.weight": "attn_k.weight",
    "attention.wv.weight": "attn_v.weight",
    "attention.wo.weight": "attn_output.weight",
    "feed_forward.w1.weight": "ffn_gate.weight",
    "feed_forward.w2.weight": "ffn_down.weight",
    "feed_forward.w3.weight": "ffn_up.weight",
    "attention_norm.weight": "attn_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
}
TOP_NAMES = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
             "output.weight": "output.weight"}
ROPE_FACTORS = "rope_freqs.weight"  # Llama 3.1 GGUFs store their RoPE scaling as per-pair divisors


def gguf_name(key: str) -> str:
    if key in TOP_NAMES:
        return TOP_NAMES[key]
    _, layer, suffix = key.split(".", 2)
    return f"blk.{layer}.{LAYER_NAMES[suffix]}"


class GGUFSource(Source):
    def __init__(self, path: Path):
        self.path = path = Path(path)
        try:
            self.reader = GGUFReader(str(path))
        except Exception as e:  # the gguf package raises ValueError/IndexError/... on a cut-off file
            raise ValueError(f"cannot read {path} as GGUF ({type(e).__name__}: {e}); the file is truncated or "
                             f"corrupt, download it again") from None
        self.fields = self.reader.fields
        self.by_name = {t.name: t for t in self.reader.tensors}
        arch = self.value("general.architecture")
        if arch != "llama":
            raise self._refuse(f"its architecture is {arch!r}, not 'llama'")
        self.tied = "output.weight" not in self.by_name
        self.params = self._params()
        self._check_names()
        for tensor in self.reader.tensors:  # refuse before writing anything, not halfway through
            dequant.check_supported(tensor.name, tensor.tensor_type, path)
        self.dtype = self._stored_dtype()

    def _stored_dtype(self) -> torch.dtype:
        """Of the tensors stored as floats: fp16/bf16 when every float matrix is stored so, else fp32
        (which also holds dequantized blocks exactly)."""
        kinds = {t.tensor_type for t in self.reader.tensors if len(t.shape) > 1} - set(dequant.BLOCK_TYPES)
        half = {dequant.Q.F16: torch.float16, dequant.Q.BF16: torch.bfloat16}
        return half[kinds.pop()] if len(kinds) == 1 and kinds <= set(half) else torch.float32

    def _refuse(self, why: str) -> ValueError:
        return ValueError(f"{self.path}: {why}; this runner runs plain Llama models only, so it cannot convert it")

    def value(self, key: str, default=None):
        field = self.fields.get(key)
        return default if field is None else field.contents()

    def _int(self, key: str, default: Optional[int] = None) -> int:
        value = self.value(f"llama.{key}", default)
        if isinstance(value, list):  # per-layer values: fine only when every layer agrees
            if len(set(value)) != 1:
                raise self._refuse(f"'llama.{key}' differs between layers ({sorted(set(value))})")
            value = value[0]
        if value is None:
            raise ValueError(f"{self.path} has no 'llama.{key}'; the file is incomplete or not a Llama GGUF")
        return int(value)

    def _params(self) -> dict:
        if self._int("expert_count", 0) > 0:
            raise self._refuse(f"it is a mixture of experts ({self._int('expert_count')} experts)")
        scaling = self.value("llama.rope.scaling.type", "none")
        if scaling not in ("none", None):
            raise self._refuse(f"its RoPE scaling is {scaling!r}")
        dim, n_heads = self._int("embedding_length"), self._int("attention.head_count")
        head_dim = self._int("rope.dimension_count", dim // n_heads)
        for key in ("attention.key_length", "attention.value_length"):
            if self._int(key, head_dim) != head_dim:
                raise self._refuse(f"'llama.{key}' = {self._int(key)} differs from the RoPE head size {head_dim}")
        if "token_embd.weight" not in self.by_name:
            raise ValueError(f"{self.path} has no token_embd.weight; the file is incomplete")
        vocab = int(self.by_name["token_embd.weight"].shape[1])
        theta = float(self.value("llama.rope.freq_base", DEFAULT_ROPE_THETA))
        return meta.meta_params(
            dim=dim, n_layers=self._int("block_count"), n_heads=n_heads,
            n_kv_heads=self._int("attention.head_count_kv", n_heads), vocab_size=vocab,
            ffn_hidden=self._int("feed_forward_length"),
            norm_eps=float(self.value("llama.attention.layer_norm_rms_epsilon", 1e-5)), rope_theta=theta,
            rope_scaling_factor=self._rope_scaling_factor(head_dim, theta), head_dim=head_dim, source=str(self.path))

    def _rope_scaling_factor(self, head_dim: int, theta: float) -> Optional[float]:
        """Llama 3.1 GGUFs keep the scaling as rope_freqs: the divisor of each pair's frequency. Ours
        computes Meta's divisors from the factor alone, so accept the file only if they agree."""
        if ROPE_FACTORS not in self.by_name:
            return None
        stored = dequant.to_torch(self.by_name[ROPE_FACTORS], self.path).float().flatten()
        if torch.allclose(stored, torch.ones_like(stored)):
            return None
        factor = float(stored.max())
        args = ModelArgs(dim=head_dim, n_layers=1, n_heads=1, rope_theta=theta, use_scaled_rope=True,
                         rope_scaling_factor=factor)
        plain = ModelArgs(dim=head_dim, n_layers=1, n_heads=1, rope_theta=theta)
        ours = rope_frequencies(plain) / rope_frequencies(args)
        if ours.shape != stored.shape or not torch.allclose(ours, stored, rtol=1e-3):
            raise self._refuse("its RoPE scaling factors (rope_freqs) are not Meta's Llama 3.1 scaling")
        return factor

    def _check_names(self) -> None:
        needed = {gguf_name(key) for key in self.shapes()}
        unknown = sorted(set(self.by_name) - needed - {ROPE_FACTORS})
        biases = [n for n in unknown if n.endswith(".bias")]
        if biases:
            raise self._refuse(f"it has bias tensors ({biases[:3]})")
        if unknown:
            raise self._refuse(f"it has tensors a Llama model does not have: {unknown[:5]}")
        missing = sorted(needed - set(self.by_name))
        if missing:
            raise ValueError(f"{self.path} lacks tensors {missing[:5]}; the file is incomplete or inconsistent")

    def files(self) -> List[Path]:
        return [self.path]

    def read(self, key: str) -> Union[torch.Tensor, QuantizedWeight]:
        tensor = self.by_name[gguf_name(key)]
        if tensor.tensor_type in dequant.BLOCK_TYPES:
            return dequant.blocks_of(tensor, self.path)
        return dequant.to_torch(tensor, self.path)

    def write_tokenizer(self, out_dir: Path) -> str:
        return write_gguf_tokenizer(self, out_dir)

