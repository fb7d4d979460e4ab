"""GGUF files: each supported tensor type decodes to the numbers its bytes stand for (checked on
hand-made blocks), a GGUF written the way llama.cpp writes a Llama model converts to its own
weights, and what cannot run is refused before anything is written."""

import math
import struct

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFWriter
from gguf.quants import dequantize, quantize

from llama.convert import convert
from llama.convert.dequant import to_torch
from llama.convert.gguf_reader import gguf_name
from llama.tokenizer import Tokenizer

from .convert_helpers import SPECIALS, byte_level_chars, save_hf_folder, tiny_llama


# ---------------------------------------------------------------- tensor types, on hand-made blocks
def _f16(x: float) -> bytes:
    return struct.pack("<e", x)


def _blocks(qtype, rng):
    """(raw bytes of one 32-weight row, the 32 values they encode), per GGML's block layouts."""
    if qtype == Q.Q8_0:  # fp16 scale d, then 32 int8: w = d * q
        d, q = 0.5, [rng.randrange(-128, 128) for _ in range(32)]
        return _f16(d) + struct.pack("<32b", *q), [d * v for v in q]
    nibbles = [rng.randrange(16) for _ in range(32)]
    # 16 bytes: byte j holds weight j in its low nibble and weight j + 16 in its high nibble.
    packed = bytes(nibbles[j] | (nibbles[j + 16] << 4) for j in range(16))
    if qtype == Q.Q4_0:  # fp16 d, nibbles: w = d * (n - 8)
        d = 0.25
        return _f16(d) + packed, [d * (n - 8) for n in nibbles]
    if qtype == Q.Q4_1:  # fp16 d, fp16 min m, nibbles: w = d * n + m
        d, m = 0.125, -1.5
        return _f16(d) + _f16(m) + packed, [d * n + m for n in nibbles]
    if qtype == Q.BF16:  # the top 16 bits of an fp32
        values = [rng.choice([1.0, -2.5, 0.15625, 3.0e5, -7.0e-3]) for _ in range(32)]
        words = [struct.unpack("<I", struct.pack("<f", v))[0] >> 16 for v in values]
        return struct.pack("<32H", *words), [struct.unpack("<f", struct.pack("<I", w << 16))[0] for w in words]
    raise AssertionError(qtype)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.BF16])
def test_block_types_decode_as_specified(tmp_path, qtype):
    import random

    rng = random.Random(int(qtype))
    rows = [_blocks(qtype, rng) for _ in range(3)]
    raw = np.frombuffer(b"".join(r[0] for r in rows), dtype=np.uint8).reshape(3, -1)
    path = tmp_path / "t.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_tensor("t", raw, raw_dtype=qtype)
    _finish(writer)
    tensor = to_torch(GGUFReader(str(path)).tensors[0], path)
    assert tensor.shape == (3, 32)
    assert tensor.float().tolist() == [r[1] for r in rows]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_plain_float_types_are_copied(tmp_path, dtype):
    values = np.arange(-12, 12, dtype=np.float32).reshape(4, 6) / 8
    path = tmp_path / "t.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_tensor("t", values.astype(dtype))
    _finish(writer)
    tensor = to_torch(GGUFReader(str(path)).tensors[0], path)
    assert tensor.dtype == torch.from_numpy(values.astype(dtype)).dtype and tensor.shape == (4, 6)
    assert tensor.float().tolist() == values.tolist()


# ---------------------------------------------------------------- whole models, written like llama.cpp
def _finish(writer: GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# Storage type per tensor: a mix of every supported type. ffn_down rows are 176 wide, not a
# multiple of 32, so (as in llama.cpp) they stay unquantized.
TYPES = {"token_embd": Q.Q8_0, "output": Q.Q4_1, "attn_q": Q.Q4_0, "attn_k": Q.Q4_1, "attn_v": Q.Q8_0,
         "attn_output": Q.BF16, "ffn_gate": Q.Q4_0, "ffn_up": Q.Q8_0, "ffn_down": Q.F16}


def _type_of(name: str):
    if name.endswith("norm.weight"):
        return Q.F32
    return TYPES[name.split(".")[-2]]


def _stored(array: np.ndarray, qtype) -> np.ndarray:
    """What a GGUF of this type stores for `array`, in numpy (F32/F16 arrays, bytes otherwise)."""
    if qtype == Q.F32:
        return array.astype(np.float32)
    if qtype == Q.F16:
        return array.astype(np.float16)
    return quantize(array.astype(np.float32), qtype)


def write_llama_gguf(path, meta_state, *, n_heads=4, n_kv_heads=2, arch="llama", extra_kv=None,
                     extra_tensors=None, types=None, pre="smollm", merges=(), raw_blocks=None):
    """A GGUF holding Meta-layout tensors under llama.cpp's names, with llama.cpp's metadata keys.
    raw_blocks: GGUF name -> (uint8 array (rows, row bytes), type), written in place of that tensor."""
    types = types or {}
    writer = GGUFWriter(str(path), arch)
    dim = meta_state["tok_embeddings.weight"].shape[1]
    kv = {"block_count": 2, "context_length": 4096, "embedding_length": dim,
          "feed_forward_length": meta_state["layers.0.feed_forward.w1.weight"].shape[0],
          "attention.head_count": n_heads, "attention.head_count_kv": n_kv_heads,
          "rope.dimension_count": dim // n_heads}
    for key, value in kv.items():
        writer.add_uint32(f"{arch}.{key}", value)
    writer.add_float32(f"{arch}.rope.freq_base", 10000.0)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_string("tokenizer.ggml.model", "gpt2")
    writer.add_string("tokenizer.ggml.pre", pre)
    writer.add_array("tokenizer.ggml.tokens", byte_level_chars() + SPECIALS)
    writer.add_array("tokenizer.ggml.token_type", [1] * 256 + [3] * len(SPECIALS))
    if merges:
        writer.add_array("tokenizer.ggml.merges", list(merges))
    writer.add_uint32("tokenizer.ggml.bos_token_id", 256)
    writer.add_uint32("tokenizer.ggml.eos_token_id", 257)
    writer.add_bool("tokenizer.ggml.add_bos_token", True)
    for key, value in (extra_kv or {}).items():
        if isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_uint32(key, value)
    stored = {}
    for key, tensor in meta_state.items():
        name = gguf_name(key)
        qtype = types.get(name, _type_of(name))
        data = _stored(tensor.float().numpy(), qtype)
        if name in (raw_blocks or {}):
            data, qtype = raw_blocks[name]
        stored[key] = (data, qtype)
        writer.add_tensor(name, data, raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)
    for name, array in (extra_tensors or {}).items():
        writer.add_tensor(name, array)
    _finish(writer)
    return stored


@pytest.fixture(scope="module")
def meta_state(tmp_path_factory):
    """The tiny model's weights in Meta's layout, via the Hugging Face converter (itself checked
    against transformers in test_convert_hf.py)."""
    root = tmp_path_factory.mktemp("gguf_source")
    folder = save_hf_folder(tiny_llama(seed=3), root / "hf")
    convert(folder, root / "meta", dtype="fp32", progress=False)
    return torch.load(root / "meta" / "consolidated.00.pth", weights_only=True)


def test_gguf_converts_to_the_weights_it_holds(meta_state, tmp_path):
    source = tmp_path / "model.gguf"
    stored = write_llama_gguf(source, meta_state)
    out = tmp_path / "out"
    record = convert(source, out, dtype="fp32", progress=False)
    assert record["dtype"] == "fp32" and record["tokenizer"] == "tokenizer.json"
    converted = torch.load(out / "consolidated.00.pth", weights_only=True)
    assert set(converted) == set(meta_state)
    for key, (data, qtype) in stored.items():
        exact = data.astype(np.float32) if qtype in (Q.F32, Q.F16) else dequantize(data, qtype)
        assert torch.equal(converted[key], torch.from_numpy(np.ascontiguousarray(exact))), key
        # and close to the original: no row of wq/wk moved (a permutation would be far off)
        error = (converted[key] - meta_state[key]).abs().max() / meta_state[key].abs().max()
        assert error < 0.2, key
    # The tokenizer comes from the GGUF's vocabulary.
    tokenizer = Tokenizer(out / "tokenizer.json")
    assert tokenizer.kind == "huggingface" and tokenizer.n_words == 258
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.stop_tokens) == (256, 257, [257])
    assert tokenizer.encode("hi </s>", bos=True, eos=False) == [256, 104, 105, 32, 60, 47, 115, 62]


def test_float_gguf_keeps_its_precision_by_default(meta_state, tmp_path):
    source = tmp_path / "f16.gguf"
    write_llama_gguf(source, meta_state, types={gguf_name(k): Q.F16 for k in meta_state if "norm" not in k})
    assert convert(source, tmp_path / "out", progress=False)["dtype"] == "fp16"


def _meta_rope_divisors(head_dim: int, theta: float, factor: float) -> np.ndarray:
    """Llama 3.1's per-pair frequency divisors, as llama.cpp stores them in rope_freqs."""
    divisors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < 8192 / 4:
            divisors.append(1.0)
        elif wavelen > 8192:
            divisors.append(factor)
        else:
            smooth = (8192 / wavelen - 1) / 3
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(divisors, dtype=np.float32)


def test_llama31_rope_factors_become_scaled_rope(meta_state, tmp_path):
    source = tmp_path / "model.gguf"
    write_llama_gguf(source, meta_state, extra_tensors={"rope_freqs.weight": _meta_rope_divisors(16, 1e4, 8.0)})
    convert(source, tmp_path / "out", progress=False)
    params = (tmp_path / "out" / "params.json").read_text()
    assert '"use_scaled_rope": true' in params and '"rope_scaling_factor": 8.0' in params


def _refused(meta_state, tmp_path, match, **gguf_options):
    source = tmp_path / "model.gguf"
    write_llama_gguf(source, meta_state, **gguf_options)
    with pytest.raises(ValueError, match=match):
        convert(source, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]


def test_unsupported_quant_type_is_refused(meta_state, tmp_path):
    _refused(meta_state, tmp_path, r"'blk\.0\.attn_q\.weight' is stored as IQ4_NL.*reads F32, F16, BF16, Q8_0",
             raw_blocks={"blk.0.attn_q.weight": (np.zeros((64, 2 * 18), np.uint8), Q.IQ4_NL)})


def test_other_rope_factors_are_refused(meta_state, tmp_path):
    divisors = _meta_rope_divisors(16, 1e4, 8.0) ** 0.5  # some other scaling scheme
    _refused(meta_state, tmp_path, "not Meta's Llama 3.1 scaling", extra_tensors={"rope_freqs.weight": divisors})


@pytest.mark.parametrize("options, match", [
    (dict(arch="qwen2"), "architecture is 'qwen2', not 'llama'"),
    (dict(extra_kv={"llama.expert_count": 8}), "mixture of experts"),
    (dict(extra_kv={"llama.rope.scaling.type": "yarn"}), "RoPE scaling is 'yarn'"),
    (dict(extra_tensors={"blk.0.attn_q.bias": np.zeros(64, np.float32)}), "bias tensors"),
    (dict(extra_tensors={"blk.0.attn_gate.weight": np.zeros((64, 64), np.float32)}),
     r"tensors a Llama model does not have: \['blk\.0\.attn_gate\.weight'\]"),
    (dict(pre="qwen2"), "pre-tokenizer 'qwen2'"),
    (dict(merges=["Ġ t"]), "vocabulary and merges do not form a BPE tokenizer"),
])
def test_models_we_cannot_run_are_refused(meta_state, tmp_path, options, match):
    _refused(meta_state, tmp_path, match, **options)


def test_truncated_gguf_is_refused(meta_state, tmp_path):
    source = tmp_path / "model.gguf"
    write_llama_gguf(source, meta_state)
    data = source.read_bytes()
    source.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        convert(source, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_missing_tensor_is_refused(meta_state, tmp_path):
    state = {k: v for k, v in meta_state.items() if k != "layers.1.feed_forward.w2.weight"}
    _refused(state, tmp_path, r"lacks tensors \['blk\.1\.ffn_down\.weight'\]")
