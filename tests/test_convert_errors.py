"""What goes wrong around a conversion: missing or half-written sources, tensors or settings a
Llama model does not have, FFN widths, the output folder (atomic, never overwriting another model)
and the command line."""

import json

import pytest
import torch

import llama.checkpoint
from llama.convert import convert
from llama.convert.__main__ import main
from llama.convert.params import ffn_rounding
from llama.args import ModelArgs

from .convert_helpers import LLAMA3_ROPE, save_hf_folder, tiny_llama


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    return save_hf_folder(tiny_llama(), tmp_path_factory.mktemp("hf") / "model")


@pytest.fixture()
def copy_of(hf_folder, tmp_path):
    """A fresh copy of the tiny model's folder, for tests that damage it."""
    def make(name="copy", sharded=False, **settings):
        return save_hf_folder(tiny_llama(**settings), tmp_path / name, sharded=sharded)
    return make


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------- sources
def test_missing_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert(tmp_path / "nowhere", tmp_path / "out")


def test_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        convert(tmp_path / "empty", tmp_path / "out")


def test_file_that_is_not_gguf(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ValueError, match="neither a folder nor a GGUF file"):
        convert(tmp_path / "model.bin", tmp_path / "out")


def test_half_downloaded_sharded_folder(copy_of, tmp_path):
    folder = copy_of(sharded=True)
    victim = sorted(folder.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=f"lists.*{victim.name}.*the download is incomplete"):
        convert(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_truncated_safetensors(copy_of, tmp_path):
    folder = copy_of()
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        convert(folder, tmp_path / "out")
    assert leftovers(tmp_path) == ["copy"]


def test_unknown_tensor_name(copy_of, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = copy_of()
    state = load_file(folder / "model.safetensors")
    state["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)
    save_file(state, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"tensors a Llama model does not have: \['model\.layers\.0\.self_attn\.q_norm"):
        convert(folder, tmp_path / "out")


def test_missing_output_weight_of_an_untied_model(copy_of, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = copy_of()
    state = load_file(folder / "model.safetensors")
    del state["lm_head.weight"]
    save_file(state, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"lacks tensors \['lm_head\.weight'\].*tie_word_embeddings is false"):
        convert(folder, tmp_path / "out")


def test_only_pickled_weights(copy_of, tmp_path):
    folder = copy_of()
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors.*pickles"):
        convert(folder, tmp_path / "out")


def _with_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("changes, match", [
    (dict(model_type="mistral", architectures=["MistralForCausalLM"]), "is not LlamaForCausalLM"),
    (dict(attention_bias=True), "biases on the attention projections"),
    (dict(mlp_bias=True), "biases on the MLP projections"),
    (dict(sliding_window=4096), "sliding-window attention"),
    (dict(num_local_experts=8), "mixture of experts"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    (dict(head_dim=32), "head size == hidden size / heads"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}), "RoPE scaling of type 'yarn'"),
    (dict(rope_parameters={**LLAMA3_ROPE, "rope_theta": 1e4, "high_freq_factor": 2.0}),
     "high_freq_factor=2.0.*Meta's Llama 3.1 scaling only"),
    (dict(rope_parameters={**LLAMA3_ROPE, "rope_theta": 1e4, "original_max_position_embeddings": 4096}),
     "original_max_position_embeddings=4096"),
])
def test_architectures_we_cannot_run_are_refused(copy_of, tmp_path, changes, match):
    folder = _with_config(copy_of(), **changes)
    with pytest.raises(ValueError, match=match):
        convert(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_shard_count_must_split_the_heads(hf_folder, tmp_path):
    with pytest.raises(ValueError, match="cannot be split across 3 ranks"):
        convert(hf_folder, tmp_path / "out", shards=3, progress=False)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("dim, hidden", [
    (4096, 11008),  # Llama 2 7B
    (8192, 28672),  # Llama 2 70B
    (4096, 14336),  # Llama 3 8B
    (2048, 8192),   # Llama 3.2 1B
    (576, 1536),    # SmolLM2 135M
    (960, 2560),    # SmolLM2 360M
    (64, 176), (64, 100), (64, 1000), (48, 7),
])
def test_ffn_width_comes_out_exactly(dim, hidden):
    rounding = ffn_rounding(dim, hidden)
    args = ModelArgs(dim=dim, n_layers=1, n_heads=1, **rounding)
    assert args.ffn_hidden_dim == hidden


def test_meta_ffn_parameters_are_found_for_meta_shapes():
    assert ffn_rounding(4096, 11008) == {"multiple_of": 256, "ffn_dim_multiplier": None}
    rounding = ffn_rounding(4096, 14336)  # Meta: multiple_of 1024, ffn_dim_multiplier 1.3
    assert rounding["multiple_of"] == 1024 and rounding["ffn_dim_multiplier"] == 1.3


# ---------------------------------------------------------------- the output folder
def test_failure_while_writing_leaves_nothing(hf_folder, tmp_path, monkeypatch):
    real_save = torch.save
    calls = []

    def failing_save(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(llama.checkpoint.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        convert(hf_folder, tmp_path / "out", shards=2, progress=False)
    assert len(calls) == 2  # the first shard had been written when the second failed
    assert leftovers(tmp_path) == []


def test_interrupt_while_reading_leaves_nothing(hf_folder, tmp_path, monkeypatch):
    from llama.convert.hf import HuggingFaceSource

    real_read = HuggingFaceSource.read
    count = []

    def interrupted(self, key):
        count.append(key)
        if len(count) == 5:
            raise KeyboardInterrupt
        return real_read(self, key)

    monkeypatch.setattr(HuggingFaceSource, "read", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(hf_folder, tmp_path / "out", progress=False)
    assert leftovers(tmp_path) == []


def test_same_model_again_is_a_no_op(hf_folder, tmp_path):
    out = tmp_path / "out"
    first = convert(hf_folder, out, progress=False)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = convert(hf_folder, out, progress=False)
    assert again["reused"] and again["fingerprint"] == first["fingerprint"]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps


def test_output_holding_a_different_model_is_refused(hf_folder, copy_of, tmp_path):
    out = tmp_path / "out"
    convert(hf_folder, out, progress=False)
    before = (out / "consolidated.00.pth").read_bytes()
    other = copy_of(seed=7)
    with pytest.raises(FileExistsError, match="already holds a different model"):
        convert(other, out, progress=False)
    assert (out / "consolidated.00.pth").read_bytes() == before
    assert leftovers(tmp_path) == ["copy", "out"]


def test_output_holding_the_model_in_another_layout_is_refused(hf_folder, tmp_path):
    out = tmp_path / "out"
    convert(hf_folder, out, progress=False)
    with pytest.raises(FileExistsError, match="converted with --shards 1 --dtype fp32.*--shards 2"):
        convert(hf_folder, out, shards=2, progress=False)


def test_output_holding_other_files_is_refused(hf_folder, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="files that llama.convert did not write"):
        convert(hf_folder, out, progress=False)
    assert leftovers(out) == ["notes.txt"]


def test_empty_output_folder_is_used(hf_folder, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    convert(hf_folder, out, progress=False)
    assert {"params.json", "consolidated.00.pth", "tokenizer.json", "tokenizer_config.json",
            "convert.json"} == set(leftovers(out))


# ---------------------------------------------------------------- command line
def test_cli_converts_and_says_how_to_run(hf_folder, tmp_path, capsys):
    assert main(["--source", str(hf_folder), "--out", str(tmp_path / "out"), "--shards", "2", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "--tokenizer_path" in printed and "tokenizer.json" in printed
    assert sorted(p.name for p in (tmp_path / "out").glob("consolidated.*.pth")) == [
        "consolidated.00.pth", "consolidated.01.pth"]


def test_cli_reports_errors_without_a_traceback(tmp_path, capsys):
    assert main(["--source", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "does not exist" in err and "Traceback" not in err
