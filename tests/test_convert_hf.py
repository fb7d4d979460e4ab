"""Hugging Face safetensors folders converted by llama.convert give the logits transformers gives
(fp32, within 1e-4), on one rank and on two, for 1- and 2-shard checkpoints."""

import json
import random

import pytest
import torch

from llama import Llama
from llama.convert import convert

from .convert_helpers import LLAMA3_ROPE, TINY_VOCAB, hf_logits, run_ranks, save_hf_folder, tiny_llama

# name -> (tiny_llama settings, save sharded, sequence length). The scaled-RoPE model runs a long
# sequence: Llama 3.1 scaling only changes the slow RoPE pairs, which matter at large positions.
VARIANTS = {
    "gqa_untied": (dict(), False, 24),
    "tied_sharded_save": (dict(tied=True), True, 24),
    "llama3_rope": (dict(rope_scaling=LLAMA3_ROPE), False, 2100),
    "padded_vocab": (dict(vocab_size=TINY_VOCAB + 2), False, 24),  # embedding larger than the tokenizer
    "llama2_mha": (dict(num_key_value_heads=4), False, 24),  # Llama 2: multi-head attention, theta 10000
}
TOLERANCE = 1e-4


def prompt(length: int, seed: int = 0):
    rng = random.Random(seed)
    return [rng.randrange(TINY_VOCAB) for _ in range(length)]


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_models")
    models = {}
    for seed, (name, (settings, sharded, _)) in enumerate(VARIANTS.items()):
        model = tiny_llama(seed=seed, **settings)
        models[name] = (save_hf_folder(model, root / name, sharded=sharded), model)
    return models


@pytest.fixture(scope="module")
def converted(hf_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("converted")
    return {(name, shards): root / f"{name}-{shards}"
            for name, (folder, _) in hf_models.items() for shards in (1, 2)
            if convert(folder, root / f"{name}-{shards}", shards=shards, dtype="fp32", progress=False)}


def test_sharded_save_really_is_sharded(hf_models):
    folder = hf_models["tied_sharded_save"][0]
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("*.safetensors"))) > 2


def test_params_describe_the_source(converted):
    params = json.loads((converted["llama3_rope", 1] / "params.json").read_text())
    assert params["use_scaled_rope"] is True and params["rope_scaling_factor"] == 8.0
    assert params["n_heads"] == 4 and params["n_kv_heads"] == 2 and params["vocab_size"] == TINY_VOCAB
    assert "output.weight" not in torch.load(converted["tied_sharded_save", 1] / "consolidated.00.pth",
                                             weights_only=True)
    shard = torch.load(converted["gqa_untied", 2] / "consolidated.01.pth", weights_only=True)
    assert shard["layers.0.attention.wq.weight"].shape == (32, 64)  # 2 of 4 heads
    assert shard["layers.0.feed_forward.w2.weight"].shape == (64, 88)  # FFN width 176 exactly, split


@pytest.mark.parametrize("shards", [1, 2])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_transformers_on_one_rank(hf_models, converted, name, shards):
    tokens = prompt(VARIANTS[name][2])
    ckpt = converted[name, shards]
    generator = Llama.build(str(ckpt), str(ckpt / "tokenizer.json"), max_seq_len=len(tokens),
                            max_batch_size=1, device="cpu", dtype="fp32")
    ours = generator.model(torch.tensor([tokens]), 0)[0]
    expected = hf_logits(hf_models[name][1], tokens)
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max() < TOLERANCE


def test_scaled_rope_test_is_sensitive(hf_models):
    """Without the scaling the long sequence's logits differ: the test above does check scaling."""
    _, scaled = hf_models["llama3_rope"]
    plain = tiny_llama()
    plain.load_state_dict(scaled.state_dict())
    tokens = prompt(VARIANTS["llama3_rope"][2])
    assert (hf_logits(plain, tokens) - hf_logits(scaled, tokens)).abs().max() > 100 * TOLERANCE


def test_logits_match_transformers_on_two_ranks(hf_models, converted, tmp_path):
    names = ["gqa_untied", "tied_sharded_save", "llama3_rope"]
    jobs = [{"ckpt_dir": str(converted[name, 2]), "tokenizer": str(converted[name, 2] / "tokenizer.json"),
             "max_seq_len": VARIANTS[name][2], "max_batch_size": 1, "mode": "logits",
             "tokens": [prompt(VARIANTS[name][2])]} for name in names]
    results = run_ranks(2, jobs, tmp_path)
    for name, job, logits in zip(names, jobs, results):
        expected = hf_logits(hf_models[name][1], job["tokens"][0])
        assert (logits[0] - expected).abs().max() < TOLERANCE, name


def test_tokenizer_bigger_than_the_model_is_refused(tmp_path):
    folder = save_hf_folder(tiny_llama(vocab_size=TINY_VOCAB - 2), tmp_path / "hf")
    out = tmp_path / "out"
    convert(folder, out, progress=False)
    with pytest.raises(ValueError, match="vocab_size=256 but the tokenizer"):
        Llama.build(str(out), str(out / "tokenizer.json"), max_seq_len=8, max_batch_size=1, device="cpu")


def test_llama2_greedy_tokens_match_transformers(hf_models, converted):
    """Llama 2 shape (no GQA, theta 10000): our greedy continuation of a ragged batch equals
    transformers' generate() on each prompt."""
    model = hf_models["llama2_mha"][1]
    assert model.config.num_key_value_heads == model.config.num_attention_heads == 4
    prompts, new_tokens = [prompt(5, seed=1), prompt(13, seed=2)], 10
    ckpt = converted["llama2_mha", 1]
    generator = Llama.build(str(ckpt), str(ckpt / "tokenizer.json"), max_seq_len=32, max_batch_size=2,
                            device="cpu", dtype="fp32")
    ours, _ = generator.generate(prompts, max_gen_len=new_tokens, temperature=0)
    for tokens, ids in zip(ours, prompts):
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=new_tokens,
                                 eos_token_id=None, pad_token_id=0)
        theirs = out[0, len(ids):].tolist()
        stop = theirs.index(257) if 257 in theirs else len(theirs)  # </s> ends ours and is not returned
        assert tokens == theirs[:stop]
        assert len(tokens) >= 3
