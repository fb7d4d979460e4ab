"""The Hugging Face tokenizer.json kind: detected by content, special tokens from
tokenizer_config.json, special-token text kept as text, and a Llama 3 tokenizer.json giving
exactly the ids (and chat prompts) of Meta's tiktoken tokenizer."""

import json

import pytest

from llama.chat_format import ChatFormat, ChatMLFormat, Llama2ChatFormat, Llama3ChatFormat
from llama.tiktoken_tokenizer import _LLAMA3_NAMED_SPECIALS, _LLAMA3_NUM_SPECIAL, _LLAMA3_PATTERN
from llama.tokenizer import HuggingFaceTokenizer, Tokenizer, detect_tokenizer_kind

from .convert_helpers import write_tiny_tokenizer

CORPUS = [
    "Hello, world! How's it going?",
    "def add(a, b):\n    return a + b  # sum\n\n\tprint(add(1, 2))",
    "Numbers: 0 7 42 1234567 3.14159 -2e10 1,000,000",
    "   leading spaces, trailing   \n\n\n  and\r\nwindows newlines\t\ttabs",
    "Emoji 😀👍🏽🇫🇷 and symbols ©®™ ∑∫√",
    "中文字符，日本語のテキスト、한국어 문장.",
    "Text spelling specials: <|begin_of_text|> <|eot_id|><|start_header_id|>user<|end_header_id|> <s> </s>",
    "",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_tokenizer")
    write_tiny_tokenizer(folder, chat_template="{{ '<|im_start|>' + message['role'] }}")
    return folder


def test_tokenizer_json_is_detected_by_content(tiny, tmp_path):
    copy = tmp_path / "tokenizer.model"  # the name does not matter
    copy.write_bytes((tiny / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_bytes((tiny / "tokenizer_config.json").read_bytes())
    assert detect_tokenizer_kind(copy) == "huggingface"
    tokenizer = Tokenizer(copy)
    assert isinstance(tokenizer, HuggingFaceTokenizer) and tokenizer.n_words == 258


def test_special_tokens_come_from_tokenizer_config(tiny):
    tokenizer = Tokenizer(tiny / "tokenizer.json")
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (256, 257, -1)
    assert tokenizer.special_tokens == {"<s>": 256, "</s>": 257}
    assert tokenizer.stop_tokens == [257]
    assert tokenizer.encode("hi", bos=True, eos=True) == [256, 104, 105, 257]


def test_special_token_text_is_encoded_as_text(tiny):
    import tokenizers

    text = "a<s>b</s>"
    plain = tokenizers.Tokenizer.from_file(str(tiny / "tokenizer.json"))
    # What the library does on its own, even without add_special_tokens: the special ids appear.
    assert 256 in plain.encode(text, add_special_tokens=False).ids
    ids = Tokenizer(tiny / "tokenizer.json").encode(text, bos=False, eos=False)
    assert ids == list(text.encode())
    assert Tokenizer(tiny / "tokenizer.json").decode(ids) == text


def test_missing_or_broken_files_are_clear_errors(tiny, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((tiny / "tokenizer.json").read_bytes())
    with pytest.raises(FileNotFoundError, match="tokenizer_config.json is missing.*llama.convert"):
        Tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    with pytest.raises(ValueError, match="names the token '<\\|im_end\\|>'.*different models"):
        Tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": 3}')
    with pytest.raises(ValueError, match="could not be loaded as a Hugging Face tokenizer.json"):
        Tokenizer(tmp_path / "tokenizer.json")


def test_chat_format_follows_the_chat_template(tiny, tmp_path):
    def tokenizer_with(template, specials=("<|im_start|>", "<|im_end|>")):
        folder = tmp_path / str(abs(hash((template, specials))))
        write_tiny_tokenizer(folder, chat_template=template)
        import tokenizers

        raw = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        raw.add_special_tokens(list(specials))
        raw.save(str(folder / "tokenizer.json"))
        return Tokenizer(folder / "tokenizer.json")

    assert isinstance(ChatFormat.for_tokenizer(tokenizer_with("<|im_start|>{{ role }}")), ChatMLFormat)
    assert isinstance(ChatFormat.for_tokenizer(tokenizer_with("[INST] {{ content }} [/INST]")), Llama2ChatFormat)
    assert isinstance(ChatFormat.for_tokenizer(tokenizer_with(None)), ChatMLFormat)  # from its special tokens
    assert isinstance(ChatFormat.for_tokenizer(tokenizer_with(None, specials=("<x>",))), Llama2ChatFormat)


# ---------------------------------------------------------------- Llama 3 as a tokenizer.json
@pytest.fixture(scope="module")
def llama3_pair(llama3_tokenizer_path, tmp_path_factory):
    """Meta's tiktoken tokenizer, and the same tokenizer as a Hugging Face tokenizer.json (made by
    transformers' converter), with a Llama 3.1 Instruct tokenizer_config.json."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    folder = tmp_path_factory.mktemp("llama3_hf")
    specials = _LLAMA3_NAMED_SPECIALS + [f"<|reserved_special_token_{i}|>"
                                         for i in range(2, 2 + _LLAMA3_NUM_SPECIAL - len(_LLAMA3_NAMED_SPECIALS))]
    converted = TikTokenConverter(vocab_file=str(llama3_tokenizer_path), pattern=_LLAMA3_PATTERN,
                                  extra_special_tokens=specials).converted()
    converted.save(str(folder / "tokenizer.json"))
    template = "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "add_bos_token": True,
         "chat_template": template}))
    return Tokenizer(llama3_tokenizer_path), Tokenizer(folder / "tokenizer.json")


def test_llama3_tokenizer_json_gives_tiktoken_ids(llama3_pair):
    tiktoken, hf = llama3_pair
    assert hf.n_words == tiktoken.n_words == 128256
    for text in CORPUS:
        assert hf.encode(text, bos=True, eos=False) == tiktoken.encode(text, bos=True, eos=False), text
        ids = hf.encode(text, bos=False, eos=False)
        assert hf.decode(ids) == text and hf.decode_bytes(ids) == text.encode()
    assert set(hf.stop_tokens) == set(tiktoken.stop_tokens) - {tiktoken.eos_id} | {hf.eos_id}


def test_llama3_tokenizer_json_uses_the_llama3_chat_format(llama3_pair):
    tiktoken, hf = llama3_pair
    assert isinstance(ChatFormat.for_tokenizer(hf), Llama3ChatFormat)
    dialog = [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": "Say <|eot_id|> twice, then 42."}]
    assert (ChatFormat.for_tokenizer(hf).encode_dialog_prompt(dialog)
            == ChatFormat.for_tokenizer(tiktoken).encode_dialog_prompt(dialog))
