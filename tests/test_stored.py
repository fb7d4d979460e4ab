"""Checkpoints stored quantized (llama/stored.py): a GGUF's K-quant and legacy blocks kept through
the converter and run as the weights they stand for (gguf's own dequantize is the reference), on
one rank and two; `llama.convert --quantize` storing exactly the products Llama.build(quantize=...)
makes (on SmolLM2, a real model); and what cannot run refused before loading."""

import numpy as np
import pytest
import torch

pytest.importorskip("gguf", reason="the `gguf` package writes these tests' GGUF files (pip install gguf)")
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q, GGUFReader  # noqa: E402
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402

from llama import Llama, memory, stored  # noqa: E402
from llama.blocks import int4_parts  # noqa: E402
from llama.args import load_params  # noqa: E402
from llama.convert import convert  # noqa: E402
from llama.convert.gguf_reader import gguf_name  # noqa: E402
from llama.quantize import ConcatProduct, Int4Product, Int8Product, check_stored, make_product  # noqa: E402

from .conftest import smollm2_gguf  # noqa: E402
from .convert_helpers import run_ranks  # noqa: E402
from .test_blocks import FP16_FIELDS  # noqa: E402
from .test_convert_gguf import write_llama_gguf  # noqa: E402

DIM, FFN, HEADS, KV_HEADS, VOCAB = 512, 1024, 8, 4, 258  # K-quant rows hold whole 256-weight blocks
# A Q4_K_M-like mix, with every type somewhere; layer 1's q/k/v and w1/w3 share a type, so they join;
# layer 0's q and k join, its v and its w1/w3 run as parts of their fused layers.
TYPES = {"token_embd": "Q6_K", "output": "Q8_0",
         "blk.0.attn_q": "Q4_K", "blk.0.attn_k": "Q4_K", "blk.0.attn_v": "Q6_K", "blk.0.attn_output": "Q5_0",
         "blk.0.ffn_gate": "Q4_K", "blk.0.ffn_up": "Q5_K", "blk.0.ffn_down": "Q6_K",
         "blk.1.attn_q": "Q4_1", "blk.1.attn_k": "Q4_1", "blk.1.attn_v": "Q4_1", "blk.1.attn_output": "Q4_0",
         "blk.1.ffn_gate": "Q4_K", "blk.1.ffn_up": "Q4_K", "blk.1.ffn_down": "Q5_1"}


def random_blocks(qtype: str, rows: int, cols: int, seed: int) -> np.ndarray:
    """Random bytes are valid blocks once their fp16 scale fields hold finite values; small scales
    keep the weights about the size of a trained model's."""
    generator = torch.Generator().manual_seed(seed)
    elems, nbytes = GGML_QUANT_SIZES[Q[qtype]]
    raw = torch.randint(0, 256, (rows, cols // elems, nbytes), dtype=torch.uint8, generator=generator)
    for offset in FP16_FIELDS[qtype]:
        values = torch.rand(rows, cols // elems, 1, generator=generator) * 2e-3 + 1e-4
        raw[..., offset:offset + 2] = values.half().view(torch.uint8)
    return raw.reshape(rows, -1).numpy()


def _shapes():
    hd = DIM // HEADS
    per_layer = {"attention.wq.weight": (DIM, DIM), "attention.wk.weight": (KV_HEADS * hd, DIM),
                 "attention.wv.weight": (KV_HEADS * hd, DIM), "attention.wo.weight": (DIM, DIM),
                 "feed_forward.w1.weight": (FFN, DIM), "feed_forward.w3.weight": (FFN, DIM),
                 "feed_forward.w2.weight": (DIM, FFN), "attention_norm.weight": (DIM,), "ffn_norm.weight": (DIM,)}
    shapes = {"tok_embeddings.weight": (VOCAB, DIM), "norm.weight": (DIM,), "output.weight": (VOCAB, DIM)}
    for i in range(2):
        shapes.update({f"layers.{i}.{k}": v for k, v in per_layer.items()})
    return shapes


@pytest.fixture(scope="module")
def kquant_gguf(tmp_path_factory):
    """A 2-layer Llama GGUF whose matrices are random blocks of the types above, and its blocks."""
    path = tmp_path_factory.mktemp("kquant") / "model.gguf"
    floats, blocks = {}, {}
    for seed, (key, shape) in enumerate(_shapes().items()):
        floats[key] = torch.ones(shape) if len(shape) == 1 else torch.zeros(shape)
        qtype = TYPES.get(gguf_name(key).removesuffix(".weight"))
        if qtype:
            blocks[gguf_name(key)] = (random_blocks(qtype, *shape, seed), Q[qtype])
    write_llama_gguf(path, floats, n_heads=HEADS, n_kv_heads=KV_HEADS, raw_blocks=blocks)
    return path, blocks


def reference_weight(blocks, key: str) -> torch.Tensor:
    raw, qtype = blocks[gguf_name(key)]
    return torch.from_numpy(gguf_dequantize(raw, qtype)).float()


def test_the_converter_keeps_gguf_blocks_as_they_are(kquant_gguf, tmp_path):
    path, blocks = kquant_gguf
    record = convert(path, tmp_path / "out", progress=False)
    assert record["quantize"] is None
    kept = stored.read_record(tmp_path / "out")
    assert kept.mode is None and "blocks, kept" in kept.made_by
    assert kept.types == {key: TYPES[gguf_name(key).removesuffix(".weight")] for key in _shapes()
                          if gguf_name(key) in blocks}
    shard = torch.load(tmp_path / "out" / "consolidated.00.pth", weights_only=True)
    for key in kept.types:
        assert torch.equal(shard[key], torch.from_numpy(blocks[gguf_name(key)][0])), key
    reader = {t.name: t for t in GGUFReader(str(path)).tensors}  # norms stay floats
    assert torch.equal(shard["norm.weight"], torch.from_numpy(np.array(reader["output_norm.weight"].data)))


@pytest.fixture(scope="module")
def kquant_ckpt(kquant_gguf, tmp_path_factory):
    out = tmp_path_factory.mktemp("kquant_ckpt") / "two_shards"
    convert(kquant_gguf[0], out, shards=2, progress=False)
    return out


def _build(ckpt, capsys=None, **options):
    return Llama.build(str(ckpt), str(ckpt / "tokenizer.json"), max_seq_len=32, max_batch_size=1,
                       device="cpu", dtype="fp32", **options)


FUSED = {"attention.wqkv": ("attention.wq", "attention.wk", "attention.wv"),
         "feed_forward.w13": ("feed_forward.w1", "feed_forward.w3")}


def _layer_products(model):
    """Each checkpoint tensor's product on one rank and its rows in that product: q/k/v (w1/w3) are
    one fused layer, whose product is one where their blocks are of one type, else a ConcatProduct
    of the runs of parts of one type."""
    def whole(product):
        return product, slice(0, product.out_features)

    out = {"output.weight": whole(model.output.product)}
    for i, block in enumerate(model.layers):
        for name in ("attention.wo", "feed_forward.w2"):
            out[f"layers.{i}.{name}.weight"] = whole(block.get_submodule(name).product)
        for fused, names in FUSED.items():
            product = block.get_submodule(fused).product
            parts = list(product.parts) if isinstance(product, ConcatProduct) else [product]
            sizes = [reference_rows(f"layers.{i}.{name}.weight") for name in names]
            start, offset = 0, 0  # this tensor's first row in the layer, and the current part's
            for name, rows in zip(names, sizes):
                while start >= offset + parts[0].out_features:
                    offset += parts.pop(0).out_features
                assert start + rows <= offset + parts[0].out_features, f"layers.{i}.{name}: across two parts"
                out[f"layers.{i}.{name}.weight"] = (parts[0], slice(start - offset, start - offset + rows))
                start += rows
    return out


def reference_rows(key: str) -> int:
    return _shapes()[key][0]


def _weights_of(product) -> torch.Tensor:
    if isinstance(product, Int4Product):
        return product.dequantized()
    return product.codes().float() * product.row_scales()[:, None]


def test_stored_blocks_run_as_the_weights_gguf_decodes(kquant_gguf, kquant_ckpt, capsys):
    blocks = kquant_gguf[1]
    llama = _build(kquant_ckpt)
    loaded = capsys.readouterr().out
    assert "stored quantized:" in loaded and "Q4_K as int4" in loaded and "Q6_K requantized to int8" in loaded
    model = llama.model
    assert torch.equal(model.tok_embeddings.weight, reference_weight(blocks, "tok_embeddings.weight"))
    products = _layer_products(model)
    joined = [name for name, (product, rows) in products.items() if rows.stop - rows.start != product.out_features]
    # Layer 1's q/k/v and w1/w3 are one product each; layer 0's q and k (both Q4_K) beside its v (Q6_K).
    assert sorted(joined) == sorted([f"layers.1.{k}" for k in ("attention.wq.weight", "attention.wk.weight",
                                                               "attention.wv.weight", "feed_forward.w1.weight",
                                                               "feed_forward.w3.weight")] +
                                    ["layers.0.attention.wq.weight", "layers.0.attention.wk.weight"])
    assert [type(p) for p in model.layers[0].attention.wqkv.product.parts] == [Int4Product, Int8Product]
    assert [type(p) for p in model.layers[0].feed_forward.w13.product.parts] == [Int4Product, Int8Product]
    x = torch.randn(3, FFN, dtype=torch.float64)
    for key, (product, rows) in _layer_products(model).items():
        want = reference_weight(blocks, key)
        got = _weights_of(product)[rows]
        qtype = TYPES[gguf_name(key).removesuffix(".weight")]
        if qtype in ("Q4_0", "Q4_1") and product.ours:
            assert torch.equal(got, want), key  # the same codes, scales and mins
        elif qtype in ("Q4_0", "Q4_1", "Q4_K"):
            # Our kernels: Q4_K's scales d * sc and mins dmin * m rounded to fp16, by 2^-11 of each at
            # most. PyTorch's (no kernels of ours here): scale and zero (min + 8 scale) in bf16, 2^-8,
            # and its weights read back through a bf16 product, another 2^-8 of each.
            raw, _ = blocks[gguf_name(key)]
            codes, scales, mins = int4_parts(torch.from_numpy(raw), qtype)
            parts = (codes.reshape(*scales.shape, 32) * scales[..., None]).abs() + mins.abs()[..., None]
            parts = parts + (0 if product.ours else 16 * scales.abs()[..., None])
            rounding = 2 ** -11 if product.ours else 2 ** -8
            read_back = 0 if product.ours else got.abs() * 2 ** -8
            assert ((got - want).abs() <= parts.reshape(want.shape) * rounding + read_back + 1e-9).all(), key
        else:  # requantized per row: half an int8 step (PyTorch's kernel also keeps the scale in bf16)
            step = want.abs().amax(dim=1, keepdim=True) / 127
            bf16_scale = 0 if product.ours else 2 ** -8
            assert ((got - want).abs() <= step / 2 * 1.001 + got.abs() * bf16_scale).all(), key
        # and the product multiplies by them (int4 rounds activations to int8 by groups of 32)
        inputs = x[:, : want.shape[1]]
        exact = inputs @ want.double().t()
        ours = product(inputs.float()).double()[:, rows]
        bound = 0.02 if isinstance(product, Int4Product) else 0.01
        assert (ours - exact).norm() / exact.norm() < bound, key


def test_stored_blocks_give_the_same_logits_on_two_ranks(kquant_ckpt, tmp_path):
    """Two shards read into one rank here and into two under torchrun: rows and whole blocks of
    columns re-cut, the same weights."""
    tokens = [[256, 72, 101, 108, 108, 111]]
    one = _build(kquant_ckpt).model(torch.tensor(tokens), 0)
    job = {"ckpt_dir": str(kquant_ckpt), "tokenizer": str(kquant_ckpt / "tokenizer.json"),
           "max_seq_len": 32, "max_batch_size": 1, "mode": "logits", "tokens": tokens}
    (two,) = run_ranks(2, [job], tmp_path)
    assert torch.isfinite(one).all() and one.std() > 0
    # The 4-bit blocks run as the same weights; the requantized ones (Q5_K, Q6_K, Q8_0) get int8
    # scales per row of each rank's slice, and the 129-row output slices run on PyTorch's kernel.
    # A block cut in the wrong place would be off by the size of the logits.
    assert ((two - one).norm() / one.norm()) < 0.03


def test_a_fused_layer_of_blocks_and_floats_runs_each_part_side_by_side():
    """A file may keep one of q/k/v as floats (F16) beside blocks: the fused layer's product runs
    the blocks' product and the floats' and puts their outputs side by side, in the parts' order."""
    q4 = random_blocks("Q4_0", 32, 64, seed=7)
    floats = torch.randn(16, 64) / 8
    weight = stored.join_rows([stored.QuantizedWeight(torch.from_numpy(q4), "Q4_0"), floats])
    assert isinstance(weight, stored.RowParts) and weight.shape == (48, 64)
    product = make_product(weight, quantize=None)
    assert isinstance(product, ConcatProduct) and product.out_features == 48
    want = torch.cat([torch.from_numpy(gguf_dequantize(q4, Q.Q4_0)).float(), floats])
    x = torch.randn(3, 64)
    exact = x.double() @ want.double().t()
    got = product(x).double()
    assert torch.equal(got[:, 32:], (x @ floats.t()).double())  # the float part as it is
    assert (got - exact).norm() / exact.norm() < 0.02  # int4 rounds activations to int8 by groups of 32


def test_a_stored_checkpoint_refuses_what_it_cannot_do(kquant_ckpt):
    with pytest.raises(ValueError, match="stored quantized .* cannot also be quantized as int8"):
        _build(kquant_ckpt, quantize="int8")
    record = stored.read_record(kquant_ckpt)
    args = load_params(kquant_ckpt, max_seq_len=32, max_batch_size=1)
    with pytest.raises(ValueError, match="runs on CPU only"):
        check_stored(record, None, args, 1, torch.device("cuda"))
    # w2 holds 1024 inputs as Q6_K blocks of 256: 8 ranks would hold half a block each.
    with pytest.raises(ValueError, match=r"w2.weight is stored as Q6_K blocks of 256 inputs.*rank counts that can "
                                         r"run it: \[1, 2, 4\]"):
        check_stored(record, None, args, 8, torch.device("cpu"))


def test_the_memory_estimate_counts_stored_blocks_as_loaded(kquant_ckpt):
    model = _build(kquant_ckpt).model
    held = sum(b.numel() * b.element_size() for b in model.buffers()) + sum(
        p.numel() * p.element_size() for p in model.parameters())
    held -= sum(b.numel() * b.element_size() for name, b in model.named_buffers() if "cache" in name)
    args = load_params(kquant_ckpt, max_seq_len=32, max_batch_size=1)
    guess = memory.estimate(args, 1, 0, torch.float32, False, "vocab", stored_types=stored.read_record(kquant_ckpt).types)
    assert abs(guess.weights - held) < 0.05 * held, (guess.weights, held)


# ---------------------------------------------------------------- quantize once, on a real model
@pytest.fixture(scope="module")
def smollm2_fp32_one_shard(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2_once") / "fp32"
    convert(smollm2_gguf(), out, dtype="fp32", progress=False)
    return out


@pytest.mark.parametrize("quantize", ["int4", "int8"])
def test_quantize_once_stores_the_products_quantize_makes(smollm2_fp32_one_shard, tmp_path, quantize):
    out = tmp_path / quantize
    record = convert(smollm2_gguf(), out, progress=False, quantize=quantize)
    assert record["quantize"] == quantize
    kept = stored.read_record(out)
    assert kept.mode == quantize and set(kept.types.values()) == {"Q4_1" if quantize == "int4" else "I8_ROW"}
    at_load = _build(smollm2_fp32_one_shard, quantize=quantize).model
    from_disk = _build(out).model
    buffers = dict(from_disk.named_buffers())
    assert sorted(buffers) == sorted(name for name, _ in at_load.named_buffers())
    # With our kernels both hold fp16 scales: equal bits. PyTorch's int4 kernel keeps them in bf16,
    # rounded from fp32 at load but from the stored fp16 here: the codes are still equal.
    ours = all(m.ours for m in at_load.modules() if isinstance(m, (Int4Product, Int8Product)))
    for name, buffer in at_load.named_buffers():
        if ours or not name.endswith("scales_and_zeros"):
            assert torch.equal(buffer, buffers[name]), name
        else:
            assert torch.allclose(buffer.float(), buffers[name].float(), rtol=2 ** -7, atol=0), name
    tokens = torch.tensor([[1, 504, 3458, 5925, 30, 6877]])
    logits = at_load.forward(tokens, 0), from_disk.forward(tokens, 0)
    assert torch.equal(*logits) if ours else torch.allclose(*logits, rtol=0.02, atol=0.1)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_q4_blocks_reach_our_layout_by_moving_bytes(qtype):
    """The fast path a stored int4 checkpoint loads by gives the layout the codes would be packed
    into, and where fp16 cannot hold Q4_0's min (-8 d) it leaves the block to the general path."""
    from llama import cpu_kernels
    from llama.quantize import ROWS_PER_BLOCK, _pack_int4, _pack_q4_blocks

    why_not = cpu_kernels.load()
    if why_not is not None:  # the op is one of our kernels' (elsewhere stored blocks take the general path)
        pytest.skip(f"our CPU kernels are not loaded here: {why_not}")
    raw = torch.from_numpy(random_blocks(qtype, 2 * ROWS_PER_BLOCK, 128, seed=7))
    assert torch.equal(_pack_q4_blocks(raw, qtype), _pack_int4(*int4_parts(raw, qtype), group=32))
    if qtype == "Q4_0":
        raw.view(raw.shape[0], -1, 18)[3, 1, 0:2] = torch.tensor([10000.0]).half().view(torch.uint8)
        assert _pack_q4_blocks(raw, qtype) is None
