"""The arithmetic of the CUDA paths, checked on CPU (tests/test_devices.py has the device choice):
causal prefill without a mask, decode attention with query groups folded, bucketed key lengths
and the 16-aligned cache give what the masked, whole-length calls give."""

import pytest
import torch
import torch.nn.functional as F

from llama import Llama
from llama.args import cache_length
from llama.compiling import key_bucket
from llama.model import attend_groups_folded


@pytest.fixture(scope="module")
def llama(llama31_ckpts) -> Llama:
    ckpt = llama31_ckpts[1]
    return Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=50, max_batch_size=3,
                       device="cpu", dtype="fp32")


def ragged(llama):
    prompts = [llama.tokenizer.encode(t, bos=True, eos=False) for t in
               ["Hi", "The capital of France is Paris, and", "1, 2, 3,"]]
    tokens = torch.zeros((len(prompts), max(map(len, prompts))), dtype=torch.long)
    for row, p in enumerate(prompts):
        tokens[row, :len(p)] = torch.tensor(p)
    return prompts, tokens


def test_causal_prefill_from_position_0_equals_the_masked_one(llama):
    """Right padding is safe: a row's keys past its prompt are only seen by its padding."""
    prompts, tokens = ragged(llama)
    last = torch.tensor([len(p) - 1 for p in prompts])
    masked = llama.model(tokens, 0, last_index=last, kv_len=tokens.shape[1], causal=False)
    causal = llama.model(tokens, 0, last_index=last, kv_len=tokens.shape[1], causal=True)
    assert torch.allclose(causal, masked, atol=1e-5, rtol=1e-5)
    whole = llama.model(tokens, 0, causal=True)
    assert torch.allclose(whole[torch.arange(3), last], masked, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="causal=True needs a prefill from position 0"):
        llama.model(tokens[:, :1], 5, causal=True)


def test_folded_query_groups_equal_grouped_attention():
    torch.manual_seed(0)
    batch, heads, kv_heads, length, dim = 3, 8, 2, 37, 16
    q = torch.randn(batch, heads, 1, dim)
    keys, values = torch.randn(batch, kv_heads, length, dim), torch.randn(batch, kv_heads, length, dim)
    mask = (torch.arange(length) <= torch.tensor([10, 36, 0]).view(batch, 1, 1, 1))  # (batch, 1, 1, length)
    want = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
    copies = F.scaled_dot_product_attention(q, keys.repeat_interleave(4, 1), values.repeat_interleave(4, 1),
                                            attn_mask=mask)
    got = attend_groups_folded(q, keys, values, mask)
    assert torch.allclose(got, want, atol=1e-6) and torch.allclose(got, copies, atol=1e-6)


def test_key_buckets_and_the_aligned_cache():
    assert [key_bucket(n, 2048) for n in (1, 255, 256, 257, 1000, 1025, 2048)] == \
        [256, 256, 256, 512, 1024, 2048, 2048]
    assert key_bucket(300, 304) == 304  # never past the cache
    # one scratch position past max_seq_len, then aligned to 16
    assert [cache_length(n) for n in (1, 15, 16, 50, 2047, 2048)] == [16, 16, 32, 64, 2048, 2064]


def test_a_decode_step_over_a_bucket_equals_one_over_the_live_positions(llama):
    prompts, tokens = ragged(llama)
    last = torch.tensor([len(p) - 1 for p in prompts])
    assert llama.model.layers[0].attention.cache_k.shape[2] == cache_length(50) == 64
    llama.model(tokens, 0, last_index=last, kv_len=tokens.shape[1])
    feed = torch.tensor([[5], [6], [7]])
    positions = torch.tensor([[len(p)] for p in prompts])
    kv_len = int(positions.max()) + 1
    with torch.inference_mode():
        live = llama.model.decode_step(feed, positions, torch.arange(kv_len))
        bucket = llama.model.decode_step(feed, positions, torch.arange(cache_length(50)))
    assert torch.allclose(bucket, live, atol=1e-5, rtol=1e-5)
