import re
import shutil
from pathlib import Path

import pytest

from llama.tiktoken_tokenizer import MAX_RUN_CHARS, _split_long_runs
from llama.tokenizer import SentencePieceTokenizer, TiktokenTokenizer, Tokenizer
from tests.tokenizer_files import llama3_tokenizer_path, make_sentencepiece_model


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory) -> Path:
    return make_sentencepiece_model(tmp_path_factory.mktemp("sp"))


@pytest.fixture(scope="module")
def sp_tok(sp_path) -> Tokenizer:
    return Tokenizer(sp_path)


@pytest.fixture(scope="module")
def llama3_tok() -> Tokenizer:
    return Tokenizer(llama3_tokenizer_path())


@pytest.fixture(params=["sentencepiece", "tiktoken"])
def tok(request, sp_tok, llama3_tok) -> Tokenizer:
    return {"sentencepiece": sp_tok, "tiktoken": llama3_tok}[request.param]


# --- detection and errors ---------------------------------------------------


def test_detects_llama3_tiktoken_file(llama3_tok):
    assert type(llama3_tok) is TiktokenTokenizer
    assert isinstance(llama3_tok, Tokenizer)
    assert llama3_tok.kind == "tiktoken"
    assert llama3_tok.n_words == 128256


def test_detects_sentencepiece_file(sp_tok):
    assert type(sp_tok) is SentencePieceTokenizer
    assert isinstance(sp_tok, Tokenizer)
    assert sp_tok.kind == "sentencepiece"
    assert sp_tok.n_words == 512


def test_detection_uses_content_not_file_name(tmp_path, sp_path):
    misleading = tmp_path / "llama3.tiktoken"
    shutil.copy(sp_path, misleading)
    assert type(Tokenizer(misleading)) is SentencePieceTokenizer
    misleading = tmp_path / "sentencepiece.model"
    shutil.copy(llama3_tokenizer_path(), misleading)
    assert type(Tokenizer(str(misleading))) is TiktokenTokenizer


def test_subclasses_can_be_built_directly(sp_path):
    tok = SentencePieceTokenizer(sp_path)
    assert type(tok) is SentencePieceTokenizer
    assert tok.encode("hello", bos=True, eos=False)[0] == 1


def test_missing_file_names_path_and_flag(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.model"
    with pytest.raises(FileNotFoundError, match="--tokenizer_path") as info:
        Tokenizer(missing)
    assert str(missing) in str(info.value)


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="directory"):
        Tokenizer(tmp_path)


@pytest.mark.parametrize(
    "content",
    [
        b"hello world, this is not a tokenizer\n",
        b"\x00\x01\x02\xff" * 64,
        b"\x0a\x05garbage that starts like a protobuf",
        b"",
    ],
    ids=["text", "binary", "fake-protobuf", "empty"],
)
def test_garbage_file_raises_value_error(tmp_path, content):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="--tokenizer_path"):
        Tokenizer(path)


def test_corrupt_tiktoken_file_names_line(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"IQ== 0\nIg== 1\nnot a valid line at all\n")
    with pytest.raises(ValueError, match=r"tokenizer\.model:3"):
        Tokenizer(path)


def test_tiktoken_file_is_reread_not_cached(tmp_path):
    # A different file at the same path must give a different vocab
    # (tiktoken's own loader caches local files by path).
    import base64

    def write(extra_merges):
        lines = [base64.b64encode(bytes([i])) + b" %d" % i for i in range(256)]
        lines += [base64.b64encode(m) + b" %d" % (256 + j) for j, m in enumerate(extra_merges)]
        path.write_bytes(b"\n".join(lines) + b"\n")

    path = tmp_path / "tokenizer.model"
    write([])
    assert Tokenizer(path).n_words == 256 + 256
    write([b"ab"])
    assert Tokenizer(path).n_words == 257 + 256


# --- Llama 3 specifics ------------------------------------------------------


def test_llama3_reference_ids(llama3_tok):
    ids = llama3_tok.encode("This is a test sentence.", bos=True, eos=True)
    assert ids == [128000, 2028, 374, 264, 1296, 11914, 13, 128001]
    assert llama3_tok.decode(ids[1:-1]) == "This is a test sentence."


def test_llama3_special_ids(llama3_tok):
    assert llama3_tok.bos_id == 128000
    assert llama3_tok.eos_id == 128001
    assert llama3_tok.token_id("<|start_header_id|>") == 128006
    assert llama3_tok.token_id("<|end_header_id|>") == 128007
    assert llama3_tok.token_id("<|eom_id|>") == 128008
    assert llama3_tok.token_id("<|eot_id|>") == 128009
    assert llama3_tok.token_id("<|python_tag|>") == 128010
    assert llama3_tok.token_id("<|reserved_special_token_246|>") == 128255
    assert len(llama3_tok.special_tokens) == 256
    assert set(llama3_tok.stop_tokens) == {128001, 128008, 128009}


def test_unknown_special_token_name(llama3_tok, sp_tok):
    with pytest.raises(ValueError, match=re.escape("'<|image|>' is not a special token")):
        llama3_tok.token_id("<|image|>")
    with pytest.raises(ValueError, match="not a special token"):
        sp_tok.token_id("<|eot_id|>")


@pytest.mark.parametrize("text", ["<|eot_id|>", "hi <|begin_of_text|><|start_header_id|>system<|end_header_id|>"])
def test_llama3_special_token_text_is_plain_text(llama3_tok, text):
    ids = llama3_tok.encode(text, bos=False, eos=False)
    assert all(i < 128000 for i in ids), ids
    assert llama3_tok.decode(ids) == text


# --- Llama 2 specifics ------------------------------------------------------


def test_sentencepiece_special_ids(sp_tok):
    assert (sp_tok.bos_id, sp_tok.eos_id, sp_tok.pad_id) == (1, 2, -1)
    assert sp_tok.stop_tokens == [2]
    assert sp_tok.token_id("<s>") == 1
    ids = sp_tok.encode("hi", bos=True, eos=True)
    assert (ids[0], ids[-1]) == (1, 2)


def test_sentencepiece_control_text_is_plain_text(sp_tok):
    ids = sp_tok.encode("<s> and </s>", bos=False, eos=False)
    assert 1 not in ids and 2 not in ids
    assert sp_tok.decode(ids) == "<s> and </s>"


# --- both kinds ---------------------------------------------------------------

MIXED = [
    "Hello, world!",
    "  leading spaces and trailing  ",
    "def f(x):\n\treturn x ** 2  # square\n",
    "Numbers: 0 12 345 6789 3.14159 -42 1e10",
    "tabs\t\tand\n\n\nnewlines\r\nand    runs     of spaces",
    "Emoji: 🦙🔥👍🏽 and 👨‍👩‍👧",
    "CJK: 你好，世界。日本語のテキスト。한국어",
    "Ünïcödé àccents — “quotes” … ñ",
    "",
]


@pytest.mark.parametrize("text", MIXED)
def test_round_trip(tok, text):
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids[1:-1]) == text
    assert tok.decode_bytes(ids[1:-1]) == text.encode("utf-8")


def test_bos_eos_flags(tok):
    plain = tok.encode("some text", bos=False, eos=False)
    assert tok.encode("some text", bos=True, eos=False) == [tok.bos_id] + plain
    assert tok.encode("some text", bos=False, eos=True) == plain + [tok.eos_id]


@pytest.mark.parametrize(
    "text",
    [" " * 100_000, "x" * (3 * MAX_RUN_CHARS + 7), "Lorem ipsum dolor sit amet. " * 40_000],
    ids=["100k-spaces", "long-non-space-run", "1M-chars"],
)
def test_very_long_inputs_round_trip(tok, text):
    ids = tok.encode(text, bos=False, eos=False)
    assert tok.decode(ids) == text


def test_split_long_runs():
    text = "ab" + " " * 7 + "cdefghij" + "\n"
    pieces = list(_split_long_runs(text, 3))
    assert "".join(pieces) == text
    for piece in pieces:
        assert " " * 4 not in piece
        assert all(len(word) <= 3 for word in piece.split())


def test_chunking_leaves_ordinary_text_alone(llama3_tok):
    text = "An ordinary paragraph, with punctuation; and numbers 123456.\n" * 500
    assert llama3_tok.encode(text, bos=False, eos=False) == llama3_tok.model.encode_ordinary(text)


def test_decode_bytes_prefixes_for_split_emoji(tok):
    text = "I like 🦙"
    ids = tok.encode(text, bos=False, eos=False)
    full = tok.decode_bytes(ids)
    assert full == text.encode("utf-8")
    prefixes = [tok.decode_bytes(ids[:k]) for k in range(len(ids) + 1)]
    for prefix in prefixes:
        assert full.startswith(prefix)
    # The emoji really is split across tokens: some prefix ends mid-character.
    incomplete = [p for p in prefixes if not _is_utf8(p)]
    assert incomplete
    # Where the characters are complete, the bytes agree with decode().
    for k, prefix in enumerate(prefixes):
        if _is_utf8(prefix):
            assert prefix.decode("utf-8") == tok.decode(ids[:k])


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_encode_rejects_non_text(tok):
    with pytest.raises(TypeError, match="str"):
        tok.encode(["a", "list"], bos=False, eos=False)
