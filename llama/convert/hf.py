"""Reading a Hugging Face Llama folder: config.json, safetensors weights (one file, or shards
listed in model.safetensors.index.json) and tokenizer.json.

Hugging Face's Llama computes RoPE in the rotate-half form, so its converter reorders the rows of
each head in wq and wk: Meta's pairs (2i, 2i+1) become rows (i, i + head_dim/2). We put them back.
"""

import json
from pathlib import Path
from typing import Dict, List

import torch

from ..dtypes import TORCH_NAMES as DTYPES  # config.json writes torch's names
from ..rope import DEFAULT_ROPE_THETA
from . import params as meta
from .base import Source
from .tokenizer_files import copy_hf_tokenizer

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"

# Meta name (after "layers.{i}.") -> Hugging Face name (after "model.layers.{i}.").
LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
# Old checkpoints store RoPE tables; they are recomputed, never read.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_name(key: str) -> str:
    """The Hugging Face tensor name of Meta's `key`."""
    if key in TOP_NAMES:
        return TOP_NAMES[key]
    _, layer, suffix = key.split(".", 2)
    return f"model.layers.{layer}.{LAYER_NAMES[suffix]}"


def rotate_half_to_interleaved(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undoes Hugging Face's q/k row order: per head, rows (first half, second half) -> pairs."""
    rows, cols = weight.shape
    return weight.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _refuse(folder: Path, what: str) -> ValueError:
    return ValueError(f"{folder / CONFIG}: {what}; this runner runs plain Llama models only, so it cannot convert it")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the download may be incomplete, fetch it again") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def llama_params(config: dict, folder: Path) -> dict:
    """Meta's params.json for a LlamaForCausalLM config.json, or a clear refusal."""
    architectures = config.get("architectures") or []
    if config.get("model_type") != "llama" or (architectures and "LlamaForCausalLM" not in architectures):
        raise _refuse(folder, f"model_type {config.get('model_type')!r}, architectures {architectures} is not "
                              f"LlamaForCausalLM")
    unsupported = {
        "attention_bias": "biases on the attention projections", "mlp_bias": "biases on the MLP projections",
        "sliding_window": "sliding-window attention", "num_local_experts": "mixture of experts",
        "num_experts": "mixture of experts", "quantization_config": "pre-quantized weights",
    }
    for key, what in unsupported.items():
        if config.get(key) not in (None, False, 0, {}):
            raise _refuse(folder, f"'{key}': {config[key]!r} asks for {what}")
    if config.get("hidden_act", "silu") != "silu":
        raise _refuse(folder, f"hidden_act {config['hidden_act']!r} is not SwiGLU's silu")

    # transformers 4 writes rope_theta + rope_scaling; transformers 5 writes rope_parameters.
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = config.get("rope_theta", rope.get("rope_theta", DEFAULT_ROPE_THETA))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    factor = None
    if rope_type == "llama3":
        factor = meta.check_llama3_rope_scaling(
            rope.get("factor"), rope.get("low_freq_factor"), rope.get("high_freq_factor"),
            rope.get("original_max_position_embeddings"), str(folder / CONFIG))
    elif rope_type not in (None, "default"):
        raise _refuse(folder, f"RoPE scaling of type {rope_type!r} (only Llama 3.1's 'llama3' is supported)")

    try:
        dim, n_heads = config["hidden_size"], config["num_attention_heads"]
        return meta.meta_params(
            dim=dim, n_layers=config["num_hidden_layers"], n_heads=n_heads,
            n_kv_heads=config.get("num_key_value_heads") or n_heads, vocab_size=config["vocab_size"],
            ffn_hidden=config["intermediate_size"], norm_eps=config.get("rms_norm_eps", 1e-6), rope_theta=theta,
            rope_scaling_factor=factor, head_dim=config.get("head_dim") or dim // n_heads, source=str(folder / CONFIG))
    except KeyError as e:
        raise ValueError(f"{folder / CONFIG} has no {e.args[0]!r}; is it a complete Llama config.json?") from None


def _open_safetensors(path: Path):
    try:
        from safetensors import safe_open
    except ImportError as e:  # an optional dependency: only the converter needs it
        raise ImportError("reading safetensors files needs the `safetensors` package: pip install -e '.[convert]'") from e
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt headers
        raise ValueError(f"cannot read {path}: the file is truncated or corrupt ({e}); download it again") from None


class HuggingFaceSource(Source):
    def __init__(self, folder: Path):
        self.path = folder = Path(folder)
        if not (folder / CONFIG).is_file():
            raise FileNotFoundError(f"{folder} has no {CONFIG}: --source must be a Hugging Face model folder "
                                    f"(config.json + *.safetensors + tokenizer.json) or a .gguf file")
        self.config = _read_json(folder / CONFIG)
        self.params = llama_params(self.config, folder)
        self.tied = bool(self.config.get("tie_word_embeddings", False))
        self.dtype = DTYPES.get(self.config.get("dtype") or self.config.get("torch_dtype"), torch.bfloat16)
        self.weight_files = self._weight_files()
        self.handles = {f: _open_safetensors(f) for f in self.weight_files}
        self.location = self._locate_tensors()

    def _weight_files(self) -> List[Path]:
        folder = self.path
        if (folder / INDEX).is_file():
            weight_map = _read_json(folder / INDEX).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{folder / INDEX} has no 'weight_map'; the download may be incomplete, fetch it again")
            files = sorted({folder / name for name in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise FileNotFoundError(f"{folder / INDEX} lists {missing}, which are not in {folder}: the download "
                                        f"is incomplete; fetch the missing files")
            return files
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            pickles = sorted(p.name for p in folder.glob("*.bin"))
            hint = (f" It has {pickles[:3]}: PyTorch pickles, which are not read because loading one can run "
                    f"code; fetch the model's .safetensors files instead." if pickles else "")
            raise FileNotFoundError(f"{folder} has no *.safetensors weights.{hint}")
        return files

    def _locate_tensors(self) -> Dict[str, Path]:
        """Hugging Face name -> file, after checking every tensor is known and every needed one present."""
        location = {}
        for path, handle in self.handles.items():
            for name in handle.keys():
                location[name] = path
        needed = {hf_name(key): key for key in self.shapes()}
        optional = {"lm_head.weight"} if self.tied else set()  # some tied models store the copy anyway
        unknown = sorted(n for n in location if n not in needed and n not in optional
                         and not n.endswith(IGNORED_SUFFIXES))
        if unknown:
            raise ValueError(
                f"{self.path} holds tensors a Llama model does not have: {unknown[:5]}"
                f"{' and more' if len(unknown) > 5 else ''}; this is not a plain LlamaForCausalLM checkpoint "
                f"(biases, adapters or another architecture), so it cannot be converted"
            )
        missing = sorted(n for n in needed if n not in location)
        if missing:
            hint = " (config.json says tie_word_embeddings is false)" if missing == ["lm_head.weight"] else ""
            raise ValueError(f"{self.path} lacks tensors {missing[:5]}{hint}; the download is incomplete or the "
                             f"files belong to a different model")
        return location

    def files(self) -> List[Path]:
        extra = [self.path / name for name in (CONFIG, INDEX) if (self.path / name).is_file()]
        return extra + self.weight_files

    def read(self, key: str) -> torch.Tensor:
        name = hf_name(key)
        try:
            tensor = self.handles[self.location[name]].get_tensor(name)
        except Exception as e:
            raise ValueError(f"cannot read '{name}' from {self.location[name]}: the file is truncated or corrupt "
                             f"({e}); download it again") from None
        args = self.args
        if key.endswith("attention.wq.weight"):
            tensor = rotate_half_to_interleaved(tensor, args.n_heads)
        elif key.endswith("attention.wk.weight"):
            tensor = rotate_half_to_interleaved(tensor, args.n_kv_heads)
        return tensor

    def write_tokenizer(self, out_dir: Path) -> str:
        return copy_hf_tokenizer(self.path, self.config, out_dir)
