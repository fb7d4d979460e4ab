"""User mistakes: each one raises a clear exception that names the problem and the fix, and
nothing hangs. Session fixtures are copied into tmp_path before anything is corrupted."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama import Llama
from llama.args import ModelArgs
from llama.checkpoint import check_world_size

from .conftest import LLAMA2_PARAMS, REPO

MAX_SEQ_LEN = 32


def build(ckpt: Path, tokenizer: Path = None, **kwargs) -> Llama:
    tokenizer = ckpt / "tokenizer.model" if tokenizer is None else tokenizer
    kwargs = {"max_seq_len": MAX_SEQ_LEN, "max_batch_size": 2, "device": "cpu", **kwargs}
    return Llama.build(str(ckpt), str(tokenizer), **kwargs)


def copy_ckpt(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / "ckpt"))


def edit_params(ckpt: Path, **changes) -> None:
    """Sets keys of ckpt/params.json; a value of None deletes the key."""
    path = ckpt / "params.json"
    params = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            params.pop(key, None)
        else:
            params[key] = value
    path.write_text(json.dumps(params))


@pytest.fixture(scope="module")
def llama2(llama2_ckpts) -> Llama:
    return build(llama2_ckpts[1])


@pytest.fixture
def llama2_copy(llama2_ckpts, tmp_path) -> Path:
    return copy_ckpt(llama2_ckpts[1], tmp_path)


@pytest.fixture
def llama2_copy2(llama2_ckpts, tmp_path) -> Path:
    """The 2-shard Llama 2 checkpoint, copied."""
    return copy_ckpt(llama2_ckpts[2], tmp_path)


# --- 1-6: generation inputs ------------------------------------------------------------------

def test_prompt_longer_than_max_seq_len(llama2):
    with pytest.raises(ValueError, match=r"prompt 0 is \d+ tokens long, more than max_seq_len=32.*larger max_seq_len"):
        llama2.text_completion(["one more word " * 40], max_gen_len=4)
    with pytest.raises(ValueError, match=r"prompt 1 is 33 tokens long, more than max_seq_len=32"):
        llama2.generate([[1, 5, 6], [1] * 33], max_gen_len=4)
    # Exactly max_seq_len tokens is allowed: nothing to generate, but not an error.
    assert llama2.generate([[1] * MAX_SEQ_LEN], max_gen_len=4)[0] == [[]]


def test_empty_prompt_list(llama2):
    with pytest.raises(ValueError, match="no prompts given: pass a non-empty list"):
        llama2.text_completion([])
    with pytest.raises(ValueError, match="no dialogs given: pass a non-empty list"):
        llama2.chat_completion([])
    with pytest.raises(ValueError, match="no prompts given: pass a non-empty list"):
        llama2.generate([], max_gen_len=4)


def test_empty_prompt(llama2):
    with pytest.raises(ValueError, match="prompt 1 must be a non-empty string"):
        llama2.text_completion(["hello", ""], max_gen_len=4)
    with pytest.raises(ValueError, match="prompt 0 is empty; every prompt needs at least one token"):
        llama2.generate([[]], max_gen_len=4)


def test_prompts_given_as_a_single_string(llama2):
    with pytest.raises(ValueError, match=r"prompts must be a list of strings, got one string; pass \['hello'\]"):
        llama2.text_completion("hello", max_gen_len=4)


@pytest.mark.parametrize("prompt", [[1, 2.5], [1, "a"], [1, True], 5, None, "hello"])
def test_generate_prompt_that_is_not_a_list_of_token_ids(llama2, prompt):
    with pytest.raises(ValueError, match=r"prompt 1 must be a list of int token ids \(tokenizer.encode's output\)"):
        llama2.generate([[1, 5], prompt], max_gen_len=4)


def test_chat_completion_given_one_dialog_instead_of_a_list(llama2):
    with pytest.raises(ValueError, match=r"dialogs must be a list of dialogs.*pass \[dialog\]"):
        llama2.chat_completion([{"role": "user", "content": "hi"}], max_gen_len=4)


def test_token_ids_outside_the_vocabulary(llama2):
    with pytest.raises(ValueError, match=r"prompt 0 holds token ids outside \[0, 512\)"):
        llama2.generate([[1, 512]], max_gen_len=4)
    with pytest.raises(ValueError, match=r"outside \[0, 512\)"):
        llama2.generate([[1, -1]], max_gen_len=4)


def test_negative_max_gen_len(llama2):
    with pytest.raises(ValueError, match="max_gen_len must be an integer >= 0"):
        llama2.text_completion(["hello"], max_gen_len=-1)


def test_negative_temperature(llama2):
    with pytest.raises(ValueError, match=r"temperature must be >= 0 \(0 means greedy\), got -0.1"):
        llama2.text_completion(["hello"], temperature=-0.1, max_gen_len=4)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        llama2.generate([[1, 5]], max_gen_len=4, temperature=-1)


@pytest.mark.parametrize("top_p", [-0.1, 1.5, "0.9"])
def test_top_p_outside_0_1(llama2, top_p):
    with pytest.raises(ValueError, match=rf"top_p must be in \[0, 1\].*got {top_p!r}"):
        llama2.text_completion(["hello"], top_p=top_p, max_gen_len=4)
    with pytest.raises(ValueError, match=r"top_p must be in \[0, 1\]"):
        llama2.chat_completion([[{"role": "user", "content": "hi"}]], top_p=top_p, max_gen_len=4)


@pytest.mark.parametrize("top_k", [-1, 2.5, "3", True])
def test_bad_top_k(llama2, top_k):
    with pytest.raises(ValueError, match=r"top_k must be None or an integer >= 0"):
        llama2.text_completion(["hello"], top_k=top_k, max_gen_len=4)
    with pytest.raises(ValueError, match=r"top_k must be None or an integer >= 0"):
        llama2.generate([[1, 5]], max_gen_len=4, top_k=top_k)


# --- 7-10: missing files ---------------------------------------------------------------------

def test_missing_ckpt_dir(llama2_ckpts, tmp_path):
    tokenizer = llama2_ckpts[1] / "tokenizer.model"
    with pytest.raises(FileNotFoundError, match=r"checkpoint folder .*does-not-exist does not exist.*--ckpt_dir"):
        build(tmp_path / "does-not-exist", tokenizer)


def test_missing_params_json(llama2_copy):
    (llama2_copy / "params.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"params.json not found.*--ckpt_dir must be a folder holding params.json"):
        build(llama2_copy)


def test_no_shards(llama2_copy):
    (llama2_copy / "consolidated.00.pth").unlink()
    with pytest.raises(FileNotFoundError, match=r"no consolidated.NN.pth shards in .*download the model"):
        build(llama2_copy)


def test_missing_shard_in_the_middle(llama2_copy2):
    # 00 and 02 present: 01 is missing.
    (llama2_copy2 / "consolidated.01.pth").rename(llama2_copy2 / "consolidated.02.pth")
    with pytest.raises(FileNotFoundError, match=r"missing shards \['consolidated.01.pth'\]; finish the download"):
        build(llama2_copy2)


def test_missing_first_shard(llama2_copy2):
    (llama2_copy2 / "consolidated.00.pth").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing shards \['consolidated.00.pth'\]"):
        build(llama2_copy2)


def test_missing_tokenizer(llama2_copy):
    (llama2_copy / "tokenizer.model").unlink()
    with pytest.raises(FileNotFoundError, match=r"Tokenizer file not found: .*tokenizer.model; pass --tokenizer_path"):
        build(llama2_copy)
    with pytest.raises(FileNotFoundError, match=r"is a directory, not a file; pass --tokenizer_path"):
        build(llama2_copy, tokenizer=llama2_copy)


# --- 11-12: params.json against the shards and the tokenizer ----------------------------------

@pytest.mark.parametrize("change", [{"dim": 128}, {"n_kv_heads": 2}, {"multiple_of": 256}])
def test_params_shapes_disagree_with_shards(llama2_copy, change):
    edit_params(llama2_copy, **change)
    with pytest.raises(ValueError, match=r"has shard shapes .* which do not fit the full shape .*params.json and the shards disagree"):
        build(llama2_copy)


def test_params_n_kv_heads_disagree_with_gqa_shards(llama31_ckpts, tmp_path):
    ckpt = copy_ckpt(llama31_ckpts[1], tmp_path)
    edit_params(ckpt, n_kv_heads=1)
    with pytest.raises(ValueError, match=r"'layers.0.attention.wk.weight' has shard shapes \[\(32, 64\)\].*\(16, 64\)"):
        build(ckpt)


def test_params_more_layers_than_shards(llama2_copy2):
    edit_params(llama2_copy2, n_layers=3)
    with pytest.raises(ValueError, match=r"has no tensor 'layers\.2\.[a-z_.]+'; params.json and the shards disagree"):
        build(llama2_copy2)


def test_params_fewer_layers_than_shards(llama2_copy):
    edit_params(llama2_copy, n_layers=1)
    with pytest.raises(ValueError, match=r"hold 2 layers but params.json says n_layers=1; params.json and the shards disagree"):
        build(llama2_copy)


@pytest.mark.parametrize("shard", ["00", "01"])
def test_shard_missing_a_tensor(llama2_copy2, shard):
    path = llama2_copy2 / f"consolidated.{shard}.pth"
    state = torch.load(path, weights_only=True)
    del state["layers.1.feed_forward.w2.weight"]
    torch.save(state, path)
    with pytest.raises(ValueError, match=rf"consolidated.{shard}.pth has no tensor 'layers.1.feed_forward.w2.weight'.*(disagree|incomplete)"):
        build(llama2_copy2)


def test_params_vocab_size_disagrees_with_tokenizer(llama2_copy):
    edit_params(llama2_copy, vocab_size=1000)
    with pytest.raises(ValueError, match=r"vocab_size=1000 but the tokenizer .* has 512 tokens; pass the tokenizer that belongs"):
        build(llama2_copy)


def test_wrong_tokenizer_for_a_vocab_size_minus_one_checkpoint(llama2_ckpts, llama3_tokenizer_path):
    # Llama 2's params.json says vocab_size=-1: the size comes from the tokenizer, so blame it.
    with pytest.raises(ValueError, match=r"hold a vocabulary of 512 tokens .* expects vocab_size=128256 .*pass the tokenizer that belongs"):
        build(llama2_ckpts[1], llama3_tokenizer_path)


# --- 13: rank counts -------------------------------------------------------------------------

def test_check_world_size_lists_valid_counts():
    args = ModelArgs.from_dict({**LLAMA2_PARAMS, "vocab_size": 512})
    for world in (1, 2, 4):
        check_world_size(args, world)
    with pytest.raises(ValueError, match=r"cannot be split across 3 ranks: n_heads=4 is not divisible by 3.*"
                                         r"rank count of \[1, 2, 4\] \(torchrun --nproc_per_node N\)"):
        check_world_size(args, 3)
    gqa = ModelArgs(dim=64, n_layers=1, n_heads=8, n_kv_heads=2, multiple_of=32, vocab_size=512)
    with pytest.raises(ValueError, match=r"16 ranks: n_heads=8 is not divisible by 16.*\[1, 2, 4, 8\]"):
        check_world_size(gqa, 16)


def test_torchrun_with_a_rank_count_that_does_not_fit_the_heads(llama2_ckpts):
    ckpt = llama2_ckpts[1]  # 4 heads: 3 ranks cannot split them
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "3",
           "example_text_completion.py", "--ckpt_dir", str(ckpt),
           "--tokenizer_path", str(ckpt / "tokenizer.model"), "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Own session so that a hang can be killed with every worker, not just the launcher.
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"torchrun with 3 ranks hung instead of failing:\n{output[-3000:]}")
    assert proc.returncode != 0, output[-3000:]
    assert "cannot be split across 3 ranks" in output, output[-3000:]
    assert "[1, 2, 4]" in output


# --- 14-15: unreadable and unsafe shards -----------------------------------------------------

def test_truncated_shard(llama2_copy):
    path = llama2_copy / "consolidated.00.pth"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cannot read .*consolidated.00.pth: the file is truncated or corrupt.*download it again"):
        build(llama2_copy)


@pytest.mark.parametrize("content", ["random", "empty"])
def test_corrupt_shard(llama2_copy, content):
    path = llama2_copy / "consolidated.00.pth"
    path.write_bytes(os.urandom(path.stat().st_size) if content == "random" else b"")
    with pytest.raises(ValueError, match=r"cannot read .*consolidated.00.pth: the file is truncated or corrupt"):
        build(llama2_copy)


class _Payload:
    """Unpickling this calls open(marker, "w"): a file appears if the pickle's code runs."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_shard_whose_pickle_would_run_code(llama2_copy, tmp_path):
    marker = tmp_path / "pwned"
    path = llama2_copy / "consolidated.00.pth"
    state = torch.load(path, weights_only=True)
    torch.save({**state, "payload": _Payload(marker)}, path)
    with pytest.raises(ValueError, match=r"refusing to load .*consolidated.00.pth: it holds Python objects"):
        build(llama2_copy)
    assert not marker.exists()
    # The payload is live: an unsafe load does run it (so the check above can fail).
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_shard_holding_something_other_than_tensors(llama2_copy):
    path = llama2_copy / "consolidated.00.pth"
    torch.save({"layers": [1, 2, 3]}, path)
    with pytest.raises(ValueError, match=r"is not a state dict of tensors"):
        build(llama2_copy)


# --- 16: params.json contents ----------------------------------------------------------------

def test_params_json_invalid(llama2_copy):
    (llama2_copy / "params.json").write_text('{"dim": 64, "n_layers": 2,')
    with pytest.raises(ValueError, match=r"params.json is not valid JSON.*re-download it or fix the file"):
        build(llama2_copy)
    (llama2_copy / "params.json").write_text("[64, 2, 4]")
    with pytest.raises(ValueError, match=r"params.json must hold a JSON object"):
        build(llama2_copy)


@pytest.mark.parametrize("key", ["dim", "n_layers", "n_heads"])
def test_params_json_missing_required_key(llama2_copy, key):
    edit_params(llama2_copy, **{key: None})
    with pytest.raises(ValueError, match=rf"params.json: required key '{key}' is missing"):
        build(llama2_copy)


@pytest.mark.parametrize("change,message", [
    ({"n_heads": 5}, r"dim=64 is not divisible by n_heads=5"),
    ({"n_heads": 8, "n_kv_heads": 3}, r"n_heads=8 is not divisible by n_kv_heads=3"),
    ({"n_heads": 64}, r"head size dim/n_heads=1 must be even"),
    ({"n_layers": -1}, r"'n_layers' must be a positive integer, got -1"),
    ({"dim": 0}, r"'dim' must be a positive integer, got 0"),
    ({"dim": "64"}, r"'dim' must be a positive integer, got '64'"),
    ({"n_heads": 4.0}, r"'n_heads' must be a positive integer, got 4.0"),
    ({"vocab_size": -5}, r"'vocab_size' must be a positive integer or -1, got -5"),
    ({"norm_eps": -1e-5}, r"'norm_eps' must be > 0, got -1e-05"),
    ({"norm_eps": "1e-5"}, r"'norm_eps' must be a number, got '1e-5'"),
    ({"rope_theta": "500000"}, r"'rope_theta' must be a number, got '500000'"),
    ({"ffn_dim_multiplier": "1.3"}, r"'ffn_dim_multiplier' must be a number, got '1.3'"),
    ({"use_scaled_rope": "yes"}, r"'use_scaled_rope' must be true or false, got 'yes'"),
])
def test_params_json_bad_value(llama2_copy, change, message):
    edit_params(llama2_copy, **change)
    with pytest.raises(ValueError, match=r"params.json: " + message):
        build(llama2_copy)


@pytest.mark.parametrize("key,value,what", [
    ("vision_chunk_size", 560, "vision"),
    ("vision_num_cross_attention_layers", 8, "vision"),
    ("moe_args", {"num_experts": 16}, "mixture of experts"),
    ("quantization_args", {"scheme": "int4_weight_int8_dynamic_activation"}, "pre-quantized"),
])
def test_params_json_unsupported_model(llama2_copy, key, value, what):
    edit_params(llama2_copy, **{key: value})
    with pytest.raises(ValueError, match=rf"key '{key}' asks for {what}.*which this runner cannot run"):
        build(llama2_copy)


def test_params_json_unknown_key_warns_and_builds(llama2_copy):
    edit_params(llama2_copy, my_custom_flag=True)
    with pytest.warns(UserWarning, match=r"ignoring unknown keys \['my_custom_flag'\]"):
        model = build(llama2_copy)
    assert len(model.text_completion(["hello"], temperature=0, max_gen_len=2)) == 1


# --- 17: device and dtype --------------------------------------------------------------------

@pytest.mark.parametrize("device,message", [
    ("gpu", r"unknown device 'gpu'; use 'auto', 'cuda', 'cuda:N' or 'cpu'"),
    ("", r"unknown device ''; use 'auto'"),
    ("mps", r"unsupported device mps; use 'auto', 'cuda', 'cuda:N' or 'cpu'"),
])
def test_bad_device(llama2_ckpts, device, message):
    with pytest.raises(ValueError, match=message):
        build(llama2_ckpts[1], device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_device_without_a_gpu(llama2_ckpts):
    with pytest.raises(ValueError, match=r"device='cuda' was asked for but no CUDA GPU is visible; use device='cpu'"):
        build(llama2_ckpts[1], device="cuda")


@pytest.mark.parametrize("dtype,message", [
    ("float8", r"unknown dtype 'float8'; use one of bf16, fp16, fp32"),
    ("int8", r"unknown dtype 'int8'"),
    (torch.int8, r"unsupported dtype torch.int8; use bf16, fp16 or fp32"),
])
def test_bad_dtype(llama2_ckpts, dtype, message):
    with pytest.raises(ValueError, match=message):
        build(llama2_ckpts[1], dtype=dtype)


@pytest.mark.parametrize("name,value", [("max_seq_len", 0), ("max_batch_size", -2), ("max_seq_len", "32")])
def test_bad_build_sizes(llama2_ckpts, name, value):
    with pytest.raises(ValueError, match=rf"{name} must be a positive integer, got {value!r}"):
        build(llama2_ckpts[1], **{name: value})


# --- 18: chat dialogs ------------------------------------------------------------------------

@pytest.mark.parametrize("roles", [
    ["assistant", "user"],
    ["user", "user"],
    ["user", "assistant"],
    ["system", "assistant", "user"],
    ["user", "system", "user"],
])
def test_llama2_dialog_roles_in_wrong_order(llama2, roles):
    dialog = [{"role": role, "content": f"a {role} message"} for role in roles]
    with pytest.raises(ValueError, match=r"Llama 2 chat needs roles in the order: optional system, then user, "
                                         r"assistant, user, ... ending with user"):
        llama2.chat_completion([[{"role": "user", "content": "fine"}], dialog], max_gen_len=4)


def test_dialog_with_unknown_role_or_missing_content(llama2):
    with pytest.raises(ValueError, match=r"Message 0 has unknown role 'bot'; use one of"):
        llama2.chat_completion([[{"role": "bot", "content": "hi"}]], max_gen_len=4)
    with pytest.raises(ValueError, match=r"Message 0 must be a dict with 'role' and 'content' keys"):
        llama2.chat_completion([[{"role": "user"}]], max_gen_len=4)
    with pytest.raises(ValueError, match=r"The dialog is empty"):
        llama2.chat_completion([[]], max_gen_len=4)
