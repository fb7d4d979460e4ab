"""The tokenizer and chat-format layer called as Meta's code calls it: Meta llama3's own tokenizer
test vectors through `from llama.tokenizer import ChatFormat, Tokenizer`, Llama 2's positional
encode / one-id decode / sp_model, and allowed_special / disallowed_special case by case against
Meta's tokenizer in llama-models (tiktoken underneath), for the tiktoken and tokenizer.json kinds."""

import pytest

from llama.tokenizer import ChatFormat, Tokenizer  # Meta llama3's import line

from .test_hf_tokenizer import llama3_pair  # noqa: F401  (fixture: Llama 3 as tiktoken and as tokenizer.json)

# Meta llama3's llama/test_tokenizer.py (the same vectors are in llama-models' tests/api/test_tokenizer.py).
SENTENCE_IDS = [128000, 2028, 374, 264, 1296, 11914, 13, 128001]
MESSAGE_IDS = [128006, 882, 128007, 271, 2028, 374, 264, 1296, 11914, 13, 128009]
DIALOG_IDS = [128000, 128006, 9125, 128007, 271, 2028, 374, 264, 1296, 11914, 13, 128009,
              128006, 882, 128007, 271, 2028, 374, 264, 2077, 13, 128009, 128006, 78191, 128007, 271]
DIALOG = [{"role": "system", "content": "This is a test sentence."},
          {"role": "user", "content": "This is a response."}]


@pytest.fixture(scope="module")
def meta_tokenizer():
    """Meta's own Llama 3 tokenizer class from llama-models."""
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    return MetaTokenizer.get_instance()


def test_meta_llama3_tokenizer_tests_pass(llama3_tokenizer_path):
    tokenizer = Tokenizer(str(llama3_tokenizer_path))
    chat = ChatFormat(tokenizer)
    assert tokenizer.special_tokens["<|begin_of_text|>"] == 128000
    assert tokenizer.encode("This is a test sentence.", bos=True, eos=True) == SENTENCE_IDS
    assert tokenizer.decode(SENTENCE_IDS) == "<|begin_of_text|>This is a test sentence.<|end_of_text|>"
    assert chat.encode_message({"role": "user", "content": "This is a test sentence."}) == MESSAGE_IDS
    assert chat.encode_dialog_prompt(DIALOG) == DIALOG_IDS
    assert chat.encode_header({"role": "assistant", "content": ""}) == DIALOG_IDS[-4:]


def test_chat_format_of_a_tokenizer_json_gives_metas_vectors(llama3_pair):  # noqa: F811
    _, hf = llama3_pair
    chat = ChatFormat(hf)
    assert isinstance(chat, ChatFormat)
    assert chat.encode_message({"role": "user", "content": "This is a test sentence."}) == MESSAGE_IDS
    assert chat.encode_dialog_prompt(DIALOG) == DIALOG_IDS


def test_tool_role_is_written_as_llama_models_writes_it(llama3_tokenizer_path):
    from llama_models.datatypes import RawMessage
    from llama_models.llama3.chat_format import ChatFormat as MetaChatFormat
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    ours = ChatFormat(Tokenizer(llama3_tokenizer_path))
    metas = MetaChatFormat(MetaTokenizer.get_instance())
    dialog = [{"role": "user", "content": "What is 6 times 7?"}, {"role": "tool", "content": "42"}]
    expected = metas.encode_dialog_prompt([RawMessage(**m) for m in dialog]).tokens
    assert ours.encode_dialog_prompt(dialog) == expected
    # Meta llama3's name for the same turn
    assert ours.encode_dialog_prompt([dialog[0], {"role": "ipython", "content": "42"}]) == expected


def test_llama2_positional_encode_one_id_decode_and_sp_model(sp_tokenizer_path):
    import sentencepiece

    tokenizer = Tokenizer(sp_tokenizer_path)
    assert tokenizer.encode("hello world", True, False) == tokenizer.encode("hello world", bos=True, eos=False)
    assert tokenizer.encode("hello world", True, True)[-1] == tokenizer.eos_id
    reference = sentencepiece.SentencePieceProcessor(model_file=str(sp_tokenizer_path))
    ids = reference.encode("hello world")
    assert tokenizer.encode("hello world", False, False) == ids
    assert isinstance(tokenizer.sp_model, sentencepiece.SentencePieceProcessor)
    assert tokenizer.sp_model.vocab_size() == tokenizer.n_words
    assert [tokenizer.decode(t) for t in ids] == [reference.decode(t) for t in ids]  # Llama 2's per-token decode


def test_one_id_decodes_for_every_kind(llama3_pair):  # noqa: F811
    for tokenizer in llama3_pair:
        assert tokenizer.encode("This is", False, False) == [2028, 374]
        assert tokenizer.decode(2028) == tokenizer.decode([2028]) == "This"
        assert tokenizer.decode(128009) == "<|eot_id|>"


# Each case: text, keyword arguments. Only token names both tokenizers share (llama-models names
# id 128011 <|image|>, Llama 3.1's text models a reserved token).
SPECIAL_CASES = [
    ("a<|eot_id|>b", {}),  # Meta's default: plain text
    ("a<|eot_id|>b", {"allowed_special": None}),  # llama-models' spelling of the default
    ("a<|eot_id|>b<|begin_of_text|>c", {"allowed_special": "all"}),
    ("a<|eot_id|>b<|begin_of_text|>c", {"allowed_special": {"<|eot_id|>"}}),
    ("<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>", {"allowed_special": "all"}),
    ("hello world", {"allowed_special": {"hello"}}),  # not a special token: stays text
    ("plain text", {"disallowed_special": "all"}),
    ("a<|eot_id|>b", {"allowed_special": {"<|eot_id|>"}, "disallowed_special": "all"}),
    ("a<|eot_id|>b", {"disallowed_special": "all"}),  # raises
    ("a<|eot_id|>b<|python_tag|>", {"allowed_special": {"<|eot_id|>"}, "disallowed_special": "all"}),  # raises
    ("a<|eot_id|>b", {"allowed_special": "all", "disallowed_special": {"<|eot_id|>"}}),  # raises
    ("hello world", {"disallowed_special": ("hello",)}),  # any string may be disallowed: raises
    ("a<|eot_id|>b", {"disallowed_special": ("<|python_tag|>",)}),
]


def _outcome(tokenizer, text, kwargs):
    try:
        return tokenizer.encode(text, bos=True, eos=False, **kwargs)
    except ValueError:
        return ValueError


@pytest.mark.parametrize("text,kwargs", SPECIAL_CASES)
def test_allowed_and_disallowed_special_as_metas_tokenizer(meta_tokenizer, llama3_pair, text, kwargs):  # noqa: F811
    expected = _outcome(meta_tokenizer, text, kwargs)
    tiktoken_kind, json_kind = llama3_pair
    assert _outcome(tiktoken_kind, text, kwargs) == expected
    assert _outcome(json_kind, text, kwargs) == expected


def test_disallowed_text_error_names_the_token_and_the_fix(llama3_tokenizer_path):
    tokenizer = Tokenizer(llama3_tokenizer_path)
    with pytest.raises(ValueError, match=r"'<\|eot_id\|>'.*allowed_special=.*disallowed_special=\(\)"):
        tokenizer.encode("a<|eot_id|>", bos=False, eos=False, disallowed_special="all")


@pytest.mark.parametrize("kwargs", [{"allowed_special": "<|eot_id|>"}, {"allowed_special": {1}},
                                    {"disallowed_special": "<|eot_id|>"}])
def test_bad_special_arguments_are_clear_errors(llama3_tokenizer_path, kwargs):
    with pytest.raises(ValueError, match="must be 'all' or a"):
        Tokenizer(llama3_tokenizer_path).encode("x", bos=False, eos=False, **kwargs)


def test_sentencepiece_refuses_to_make_special_tokens_from_text(sp_tokenizer_path):
    tokenizer = Tokenizer(sp_tokenizer_path)
    assert tokenizer.encode("<s>x", False, False, allowed_special={"<|eot_id|>"}) == tokenizer.encode(
        "<s>x", False, False)  # nothing of this tokenizer is allowed
    with pytest.raises(ValueError, match="does not turn text into special tokens"):
        tokenizer.encode("<s>x", False, False, allowed_special="all")
    with pytest.raises(ValueError, match="disallowed_special forbids"):
        tokenizer.encode("<s>x", False, False, disallowed_special="all")
