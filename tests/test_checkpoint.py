"""Sharded checkpoints: Meta's split layout on disk, and re-slicing k shards into N ranks."""

import re

import pytest
import torch

from llama.args import ModelArgs
from llama.checkpoint import ShardedCheckpoint, load_rank_weights, rank_slice
from llama.saving import save_consolidated
from llama.model import Transformer, skeleton
from llama.random_model import random_weights

# 8 query heads, 2 KV heads: up to 2 ranks split KV heads, 4 and 8 ranks replicate them.
PARAMS = {"dim": 64, "n_layers": 2, "n_heads": 8, "n_kv_heads": 2, "multiple_of": 64, "vocab_size": 256}


@pytest.fixture(scope="module")
def full_state():
    return random_weights(PARAMS, vocab_size=256, seed=3)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, full_state):
    """The same weights saved Llama 3 style at 1, 2, 4 shards and Llama 2 style at 2 shards."""
    root = tmp_path_factory.mktemp("shards")
    dirs = {}
    for shards, split in ((1, "vocab"), (2, "vocab"), (4, "vocab"), (2, "dim")):
        dirs[(shards, split)] = root / f"{split}{shards}"
        save_consolidated(full_state, PARAMS, dirs[(shards, split)], shards, split)
    return dirs


def expected_slice(full, key, rank, world, args, embedding_split):
    """What rank `rank` of `world` should hold, written out from the sharding table by hand."""
    hd = args.head_dim
    if key.endswith(("attention.wk.weight", "attention.wv.weight")):
        if world <= args.n_kv_heads:
            rows = full.shape[0] // world
            return full[rank * rows:(rank + 1) * rows]
        head = rank * args.n_kv_heads // world
        return full[head * hd:(head + 1) * hd]
    if key.endswith(("wq.weight", "w1.weight", "w3.weight", "output.weight")) or (
            key == "tok_embeddings.weight" and embedding_split == "vocab"):
        return full.chunk(world, dim=0)[rank]
    if key.endswith(("wo.weight", "w2.weight")) or key == "tok_embeddings.weight":
        return full.chunk(world, dim=1)[rank]
    return full  # norms are replicated


# The model's fused layers, written out by hand: this rank's rows of each part, one under the other.
FUSED = {"attention.wqkv.weight": ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight"),
         "feed_forward.w13.weight": ("feed_forward.w1.weight", "feed_forward.w3.weight")}


def expected_rank_weights(full_state, rank, world, args, embedding_split):
    """Every weight the model holds on `rank`, under the model's names."""
    out = {}
    for key, full in full_state.items():
        prefix, suffix = re.fullmatch(r"(layers\.\d+\.)?(.*)", key).groups()
        fused = [name for name, parts in FUSED.items() if suffix in parts]
        if not fused:
            out[key] = expected_slice(full, key, rank, world, args, embedding_split)
        elif suffix == FUSED[fused[0]][0]:
            parts = [prefix + part for part in FUSED[fused[0]]]
            out[prefix + fused[0]] = torch.cat([expected_slice(full_state[part], part, rank, world, args,
                                                               embedding_split) for part in parts])
    return out


def test_meta_layout_on_disk(saved, full_state):
    shard = torch.load(saved[(2, "vocab")] / "consolidated.01.pth", weights_only=True)
    assert torch.equal(shard["layers.0.attention.wq.weight"], full_state["layers.0.attention.wq.weight"][32:])
    assert torch.equal(shard["layers.0.attention.wo.weight"], full_state["layers.0.attention.wo.weight"][:, 32:])
    assert torch.equal(shard["tok_embeddings.weight"], full_state["tok_embeddings.weight"][128:])
    llama2_style = torch.load(saved[(2, "dim")] / "consolidated.01.pth", weights_only=True)
    assert torch.equal(llama2_style["tok_embeddings.weight"], full_state["tok_embeddings.weight"][:, 32:])
    # 4 shards, 2 KV heads: each KV head is stored twice, as Meta's layout needs one per shard.
    shards4 = [torch.load(saved[(4, "vocab")] / f"consolidated.0{i}.pth", weights_only=True) for i in range(4)]
    wk = full_state["layers.1.attention.wk.weight"]
    assert [torch.equal(s["layers.1.attention.wk.weight"], wk[(i // 2) * 8:(i // 2 + 1) * 8])
            for i, s in enumerate(shards4)] == [True] * 4


@pytest.mark.parametrize("on_disk", [(1, "vocab"), (2, "vocab"), (4, "vocab"), (2, "dim")])
@pytest.mark.parametrize("world", [1, 2, 4, 8])
@pytest.mark.parametrize("in_memory", ["vocab", "dim"])
def test_any_shard_count_loads_into_any_fitting_rank_count(saved, full_state, on_disk, world, in_memory):
    args = ModelArgs.from_dict(PARAMS)
    ckpt = ShardedCheckpoint(saved[on_disk], args)
    for rank in range(world):
        weights = load_rank_weights(ckpt, rank, world, in_memory, torch.device("cpu"), torch.float32)
        expected = expected_rank_weights(full_state, rank, world, args, in_memory)
        assert list(weights) == list(expected)  # the checkpoint's order, the model's names
        for key, tensor in weights.items():
            assert torch.equal(tensor, expected[key]), key


def test_rank_holds_only_its_slice(saved):
    args = ModelArgs.from_dict(PARAMS)
    ckpt = ShardedCheckpoint(saved[(1, "vocab")], args)
    whole = sum(t.numel() for t in load_rank_weights(ckpt, 0, 1, "vocab", torch.device("cpu"), torch.float32).values())
    half = sum(t.numel() for t in load_rank_weights(ckpt, 1, 2, "vocab", torch.device("cpu"), torch.float32).values())
    norms = sum(t.numel() for k, t in ckpt.shards[0].items() if t.dim() == 1)
    assert half == (whole - norms) // 2 + norms


def test_tied_output_comes_from_the_embedding(tmp_path):
    state = random_weights(PARAMS, vocab_size=256, tied=True)
    assert "output.weight" not in state
    save_consolidated(state, PARAMS, tmp_path, 2)
    ckpt = ShardedCheckpoint(tmp_path, ModelArgs.from_dict(PARAMS))
    weights = load_rank_weights(ckpt, 1, 2, "vocab", torch.device("cpu"), torch.float32)
    assert torch.equal(weights["output.weight"], state["tok_embeddings.weight"][128:])


def test_loading_converts_to_the_requested_dtype(saved):
    ckpt = ShardedCheckpoint(saved[(2, "vocab")], ModelArgs.from_dict(PARAMS))
    weights = load_rank_weights(ckpt, 0, 1, "vocab", torch.device("cpu"), torch.bfloat16)
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}


def test_skeleton_allocates_no_weight_memory():
    import torch.distributed as dist
    from fairscale.nn.model_parallel.initialize import initialize_model_parallel, model_parallel_is_initialized

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if not model_parallel_is_initialized():
        initialize_model_parallel(1)
    # An 8B-sized model: 32 GB in fp32 if any of it were really allocated.
    args = ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256,
                     multiple_of=1024, ffn_dim_multiplier=1.3)
    with skeleton():
        model = Transformer(args)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert sum(p.numel() for p in model.parameters()) == 8_030_261_248  # Meta's published count


def test_rank_slice_names_the_full_range():
    args = ModelArgs.from_dict(PARAMS)
    assert rank_slice("layers.0.attention.wq.weight", args, 1, 2, "vocab") == (0, 32, 64)
    assert rank_slice("layers.0.feed_forward.w2.weight", args, 3, 4, "vocab") == (1, 144, 192)  # FFN width 192
    assert rank_slice("layers.0.attention.wk.weight", args, 5, 8, "vocab") == (0, 8, 16)
    assert rank_slice("norm.weight", args, 1, 2, "vocab") == (None, 0, 0)
