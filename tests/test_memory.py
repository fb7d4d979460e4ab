"""The memory estimate made before loading, and the refusal when a machine cannot hold a model."""

import pytest
import torch

from llama import Llama, memory
from llama.args import load_params


def test_the_estimate_counts_this_ranks_weights_and_cache(llama31_ckpts):
    ckpt = llama31_ckpts[1]
    generator = Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=64, max_batch_size=3,
                            device="cpu", dtype="fp32")
    model = generator.model
    unique = {t.untyped_storage().data_ptr(): t.nbytes for t in model.state_dict().values()}
    args = load_params(ckpt, max_seq_len=64, max_batch_size=3)
    need = memory.estimate(args, 1, 0, torch.float32, tied=False, embedding_split="vocab")
    assert need.weights == sum(unique.values())
    caches = sum(layer.attention.cache_k.nbytes + layer.attention.cache_v.nbytes for layer in model.layers)
    assert need.kv_cache == caches
    half = memory.estimate(args, 2, 1, torch.bfloat16, tied=False, embedding_split="vocab")
    assert half.weights < need.weights / 3.5  # half the slice, half the bytes (norms are whole)


def test_a_model_that_does_not_fit_is_refused_before_loading(llama31_ckpts, monkeypatch):
    ckpt = llama31_ckpts[1]
    monkeypatch.setattr(memory, "available_bytes", lambda device: 50 << 20)  # 50 MiB free
    monkeypatch.setattr(memory, "RUNTIME_BYTES", 0)
    loaded = []
    monkeypatch.setattr("llama.loading.iter_rank_weights", lambda *a, **k: loaded.append(1))
    with pytest.raises(MemoryError) as refused:
        Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=4096, max_batch_size=8,
                    device="cpu", dtype="fp32")
    message = str(refused.value)
    assert "needs about 85 MiB per rank" in message and "only 50 MiB is available" in message
    assert "--dtype bf16" in message and "--max_seq_len" in message and "KV cache 16 MiB" in message
    assert not loaded  # refused before a weight was read


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_the_estimate_of_a_quantized_model_is_what_it_holds(llama32_ckpts, quantize):
    ckpt = llama32_ckpts[1]  # tied: the output layer is a quantized copy of the embedding
    generator = Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=16, max_batch_size=1,
                            device="cpu", dtype="fp32", quantize=quantize)
    tensors = list(generator.model.state_dict().values()) + list(generator.model.buffers())
    unique = {t.untyped_storage().data_ptr(): t.nbytes for t in tensors if t.dim() > 0}
    caches = sum(layer.attention.cache_k.nbytes * 2 for layer in generator.model.layers)
    args = load_params(ckpt, max_seq_len=16, max_batch_size=1, rope_scaling_factor=32.0)
    need = memory.estimate(args, 1, 0, torch.float32, tied=True, embedding_split="vocab", quantize=quantize)
    held = sum(unique.values()) - caches
    assert abs(need.weights - held) < 0.05 * held



WHERE_BLOCKS_COME_FROM = """
import ctypes, json
import torch
from llama import memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                     "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2

def from_mmap(floats):  # whether a block of this size is served by mmap (glibc's count of mmapped bytes)
    before = libc.mallinfo2().hblkhd
    block = torch.ones(floats)
    return libc.mallinfo2().hblkhd - before >= block.nbytes

torch.ones(1 << 19).sum()  # 2 MiB from mmap, freed: glibc's threshold rises to 2 MiB
seen = {"before": from_mmap(1 << 17)}  # 512 KiB
with memory.big_allocations_returned():
    seen["loading"] = from_mmap(1 << 17)
seen["after"] = from_mmap(1 << 18)  # 1 MiB
print(json.dumps(seen))
"""


@pytest.mark.skipif(not memory.GLIBC, reason="big_allocations_returned acts on glibc only (this C library is not)")
def test_blocks_freed_while_loading_go_back_to_the_system():
    import json
    import subprocess
    import sys

    # In a fresh process: mallopt's setting is for the whole process.
    seen = json.loads(subprocess.run([sys.executable, "-c", WHERE_BLOCKS_COME_FROM], capture_output=True,
                                     text=True, check=True).stdout)
    # glibc's own rule before (a freed 2 MiB block raised its threshold: 512 KiB comes from its heap,
    # where freed memory stays); while loading, from mmap (returned when freed); after, glibc's ceiling.
    assert seen == {"before": False, "loading": True, "after": False}
