"""The README's compatibility table, row by row: each Meta name imports from where Meta's code
imports it, with Meta's parameters (names, order, defaults as in Meta's llama and llama3
repositories), and the differences the table states. Behaviour behind other rows is tested
where the table says (test_sampling, test_meta_tokenizer, test_errors, test_download ...)."""

import inspect
from typing import get_args

import pytest
import torch

from llama import Llama

# Parameters of Meta's functions as its repositories define them (llama3 = Llama 2 here, except
# where noted): name -> default (EMPTY: required).
EMPTY = inspect.Parameter.empty
META_BUILD = {"ckpt_dir": EMPTY, "tokenizer_path": EMPTY, "max_seq_len": EMPTY, "max_batch_size": EMPTY,
              "model_parallel_size": None, "seed": 1}
META_GENERATE = {"prompt_tokens": EMPTY, "max_gen_len": EMPTY, "temperature": 0.6, "top_p": 0.9,
                 "logprobs": False, "echo": False}
META_TEXT = {"prompts": EMPTY, "temperature": 0.6, "top_p": 0.9, "max_gen_len": None, "logprobs": False,
             "echo": False}
META_CHAT = {"dialogs": EMPTY, "temperature": 0.6, "top_p": 0.9, "max_gen_len": None, "logprobs": False}
META_TEXT_SCRIPT = {"ckpt_dir": EMPTY, "tokenizer_path": EMPTY, "temperature": 0.6, "top_p": 0.9,
                    "max_seq_len": 128, "max_gen_len": 64, "max_batch_size": 4}
META_CHAT_SCRIPT = {"ckpt_dir": EMPTY, "tokenizer_path": EMPTY, "temperature": 0.6, "top_p": 0.9,
                    "max_seq_len": 512, "max_batch_size": 4, "max_gen_len": None}  # llama3's (Llama 2: 8)


def meta_part(fn, meta):
    """fn's leading positional-or-keyword parameters, as many as Meta's, with their defaults; and
    the names of the rest, which must all be keyword-only or have defaults."""
    params = [p for p in inspect.signature(fn).parameters.values() if p.name != "self"]
    head = {p.name: p.default for p in params[:len(meta)]}
    assert all(p.kind == p.POSITIONAL_OR_KEYWORD for p in params[:len(meta)])
    assert all(p.default is not EMPTY for p in params[len(meta):]), "an extra parameter must be optional"
    return head


@pytest.fixture(scope="module")
def llama3(llama31_ckpts):
    ckpt = llama31_ckpts[1]
    # Meta's build call, all positional
    return Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), 32, 2, None, 1)


def test_package_names():
    from llama import Dialog, Llama, ModelArgs, Tokenizer, Transformer  # noqa: F401  (Llama 2 and 3 __init__)
    from llama.model import ModelArgs as ModelArgsFromModel, Transformer as TransformerFromModel

    assert ModelArgsFromModel is ModelArgs and TransformerFromModel is Transformer


def test_llama_methods_take_metas_parameters():
    assert meta_part(Llama.build, META_BUILD) == META_BUILD
    assert meta_part(Llama.generate, META_GENERATE) == META_GENERATE
    assert meta_part(Llama.text_completion, META_TEXT) == META_TEXT
    assert meta_part(Llama.chat_completion, META_CHAT) == META_CHAT
    assert list(inspect.signature(Llama.__init__).parameters)[1:3] == ["model", "tokenizer"]


def test_example_scripts_take_metas_flags():
    import example_chat_completion
    import example_text_completion

    assert meta_part(example_text_completion.main, META_TEXT_SCRIPT) == META_TEXT_SCRIPT
    assert meta_part(example_chat_completion.main, META_CHAT_SCRIPT) == META_CHAT_SCRIPT


def test_llama_built_from_model_and_tokenizer_works_as_metas(llama3):
    other = Llama(llama3.model, llama3.tokenizer)  # Meta's constructor
    out = other.text_completion(["Hello"], temperature=0, max_gen_len=4)
    assert out == llama3.text_completion(["Hello"], temperature=0, max_gen_len=4)


def test_max_seq_len_is_not_capped_at_8192(llama31_ckpts):
    ckpt = llama31_ckpts[1]
    generator = Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), 9000, 1)  # Llama 3 asserts <= 8192
    assert len(generator.text_completion(["Hi"], temperature=0, max_gen_len=2)[0]) > 0


def test_llama2_generation_names():
    from llama import generation

    assert (generation.B_INST, generation.E_INST) == ("[INST]", "[/INST]")
    assert (generation.B_SYS, generation.E_SYS) == ("<<SYS>>\n", "\n<</SYS>>\n\n")
    assert generation.SPECIAL_TAGS == ["[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"]
    assert generation.UNSAFE_ERROR == "Error: special tags are not allowed as part of the prompt."
    assert set(get_args(generation.Role)) == {"system", "user", "assistant", "ipython", "tool"}
    for name in ("Message", "Dialog", "CompletionPrediction", "ChatPrediction", "sample_top_p"):
        assert hasattr(generation, name), name


def test_llama3_tokenizer_module_names(llama3_tokenizer_path):
    from llama.tokenizer import ChatFormat, Dialog, Message, Role, Tokenizer  # noqa: F401

    tokenizer = Tokenizer(model_path=str(llama3_tokenizer_path))  # Meta's keyword
    assert tokenizer.num_reserved_special_tokens == 256
    assert tokenizer.pat_str.startswith("(?i:'s|'t|'re|'ve|'m|'ll|'d)")
    assert tokenizer.model.n_vocab == tokenizer.n_words == 128256
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (128000, 128001, -1)
    # llama-models' stop tokens: <|eom_id|> too (Meta llama3's set is {<|end_of_text|>, <|eot_id|>})
    assert tokenizer.stop_tokens == [128001, 128008, 128009]
    assert list(inspect.signature(ChatFormat(tokenizer).encode_header).parameters) == ["message"]


def test_llama2_tokenizer_names(sp_tokenizer_path):
    from llama.tokenizer import Tokenizer

    tokenizer = Tokenizer(model_path=str(sp_tokenizer_path))
    assert (tokenizer.n_words, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (
        tokenizer.sp_model.vocab_size(), tokenizer.sp_model.bos_id(), tokenizer.sp_model.eos_id(),
        tokenizer.sp_model.pad_id())


def test_model_module_names_and_forward(llama3):
    from llama import model

    for name in ("ModelArgs", "Transformer", "RMSNorm", "Attention", "FeedForward", "TransformerBlock"):
        assert hasattr(model, name), name
    for name in ("precompute_freqs_cis", "reshape_for_broadcast", "apply_rotary_emb", "repeat_kv"):
        assert not hasattr(model, name), name  # the table says: not provided
    assert list(inspect.signature(model.Transformer.__init__).parameters)[1] == "params"
    tokens = torch.tensor([[128000, 9906, 1917], [128000, 791, 4062]])
    logits = llama3.model(tokens, 0)  # Meta's forward(tokens, start_pos): every position's logits
    assert logits.shape == (2, 3, 128256) and logits.dtype == torch.float32


def test_model_args_fields():
    from llama.model import ModelArgs

    args = ModelArgs()
    meta = dict(dim=4096, n_layers=32, n_heads=32, vocab_size=-1, multiple_of=256, ffn_dim_multiplier=None,
                norm_eps=1e-5, max_batch_size=32, max_seq_len=2048)
    assert {k: getattr(args, k) for k in meta} == meta
    assert args.n_kv_heads == args.n_heads  # Meta: None, meaning n_heads
    assert args.rope_theta == 10000.0  # Llama 2's; Meta llama3's default is 500000, every Llama 3 file states it
    # rope_scaling_factor None: Llama.build decides it from the model (32 for Llama 3.2 1B/3B, else 8).
    assert (args.use_scaled_rope, args.rope_scaling_factor) == (False, None)
