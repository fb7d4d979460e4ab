"""Tokenizers for Llama 2 (SentencePiece), Llama 3 (tiktoken BPE) and converted models (a Hugging
Face tokenizer.json, run by the `tokenizers` library).

`Tokenizer(path)` looks at the file's content and returns the matching
subclass, so callers never need to know which model family they hold.

The module is laid out as Meta's llama3 `llama/tokenizer.py`: it also exports `ChatFormat`,
`Dialog`, `Message` and `Role` (defined in llama/chat_format.py), so
`from llama.tokenizer import ChatFormat, Tokenizer` works as in Meta's code.
"""

import importlib
import json
import operator
import os
import re
from pathlib import Path
from typing import AbstractSet, Collection, Dict, List, Literal, Sequence, Union

import tokenizers

# Meta's llama3 keeps the chat format in this module; ours lives in llama/chat_format.py, which
# names Tokenizer only in type hints, so importing it here makes no circle.
from .chat_format import ChatFormat, Dialog, Message, Role  # noqa: F401
from .chat_template import find_chat_template

PathLike = Union[str, os.PathLike]

# The first line of a tiktoken BPE file: "<base64 token> <rank>".
_TIKTOKEN_FIRST_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} [0-9]+(?:\r?\n|$)")
# A serialized SentencePiece ModelProto starts with field 1 (`pieces`),
# which protobuf writes as tag byte 0x0A (field 1, length-delimited).
_SENTENCEPIECE_FIRST_BYTE = b"\x0a"


def _check_file(path: Path) -> None:
    hint = "pass --tokenizer_path pointing at the model's tokenizer.model"
    if path.is_dir():
        raise FileNotFoundError(f"Tokenizer path {path} is a directory, not a file; {hint} (inside that directory).")
    if not path.is_file():
        raise FileNotFoundError(f"Tokenizer file not found: {path}; {hint}.")


def _check_text(s: object) -> None:
    # SentencePiece would silently batch-encode a list, so check up front.
    if not isinstance(s, str):
        raise TypeError(f"encode() takes a str, got {type(s).__name__}.")


def _ids(t: Union[int, Sequence[int]]) -> List[int]:
    """decode()'s argument as a list of ids: one id (as Llama 2's SentencePiece decode takes) or
    a sequence of them."""
    try:
        return [operator.index(t)]  # an int, or a 0-d integer tensor
    except TypeError:
        return [int(x) for x in t]


def _all_strings(items: object) -> bool:
    return isinstance(items, Collection) and all(isinstance(t, str) for t in items)


SpecialSet = Union[Literal["all"], AbstractSet[str]]


def detect_tokenizer_kind(model_path: PathLike) -> str:
    """Return "tiktoken", "sentencepiece" or "huggingface" for the file at `model_path`.

    Detection uses the content, not the name: both Meta families call the file
    `tokenizer.model`; a Hugging Face `tokenizer.json` is a JSON object. A new
    kind only needs a branch here and an entry in `_TOKENIZER_CLASSES`.
    """
    path = Path(model_path)
    _check_file(path)
    with open(path, "rb") as f:
        head = f.read(1024)
    if _TIKTOKEN_FIRST_LINE.match(head):
        return "tiktoken"
    if head.startswith(_SENTENCEPIECE_FIRST_BYTE):
        return "sentencepiece"
    if head.lstrip().startswith(b"{"):  # a JSON object: Hugging Face's tokenizer.json
        return "huggingface"
    raise ValueError(
        f"{path} is not a tokenizer this runner can read: expected a Llama 3 tiktoken BPE file "
        f"(lines of '<base64 token> <rank>'), a Llama 2 SentencePiece model or a Hugging Face tokenizer.json. "
        f"Pass --tokenizer_path pointing at the model's tokenizer.model."
    )


class Tokenizer:
    """Common interface; `Tokenizer(path)` builds the subclass that fits the file."""

    kind: str
    n_words: int
    bos_id: int
    eos_id: int
    pad_id: int  # -1 when the model has no pad token
    stop_tokens: List[int]
    special_tokens: Dict[str, int]

    def __new__(cls, *args, **kwargs):
        if cls is Tokenizer:
            cls = _backend_class(detect_tokenizer_kind(*args, **kwargs))
        # Python then calls cls.__init__ with the same arguments.
        return super().__new__(cls)

    def encode(self, s: str, bos: bool, eos: bool, *, allowed_special: Union[SpecialSet, None] = frozenset(),
               disallowed_special: Union[Literal["all"], Collection[str]] = ()) -> List[int]:
        """Token ids of `s`, with the BOS id first if bos and the EOS id last if eos. bos and eos
        may be passed by position (Llama 2) or by name (Llama 3).

        allowed_special / disallowed_special mean what they mean in tiktoken (and Meta's Llama 3
        tokenizer), with Meta's defaults: text spelling a special token is plain text unless that
        token is in allowed_special ("all" or a set of token strings), then it becomes the special
        id; text holding a string of disallowed_special ("all": every special token not allowed)
        raises ValueError. Defaults: nothing allowed, nothing disallowed."""
        _check_text(s)
        allowed = self._allowed_specials(allowed_special)
        self._check_disallowed(s, allowed, disallowed_special)
        ids = self._encode(s, allowed)
        return ([self.bos_id] if bos and self._adds_bos() else []) + ids + (
            [self.eos_id] if eos and self.eos_id >= 0 else [])

    def _encode(self, s: str, allowed: AbstractSet[str]) -> List[int]:
        """Ids of s without BOS/EOS; text spelling a token of `allowed` becomes that token's id."""
        raise NotImplementedError

    def _adds_bos(self) -> bool:
        return self.bos_id >= 0

    def _allowed_specials(self, allowed_special) -> AbstractSet[str]:
        if allowed_special is None:  # llama-models' default spelling of "nothing allowed"
            return frozenset()
        if allowed_special == "all":
            return frozenset(self.special_tokens)
        if isinstance(allowed_special, str) or not _all_strings(allowed_special):
            raise ValueError(f"allowed_special must be 'all' or a set of special-token strings, e.g. "
                             f"{{'<|eot_id|>'}}; got {allowed_special!r}")
        return frozenset(allowed_special)

    def _check_disallowed(self, s: str, allowed: AbstractSet[str], disallowed_special) -> None:
        if disallowed_special == "all":
            disallowed = set(self.special_tokens) - allowed
        elif isinstance(disallowed_special, str) or not _all_strings(disallowed_special):
            raise ValueError(f"disallowed_special must be 'all' or a collection of strings, e.g. "
                             f"('<|eot_id|>',); got {disallowed_special!r}")
        else:
            disallowed = set(disallowed_special)
        found = [(s.find(t), t) for t in disallowed if t in s]
        if found:
            token = min(found)[1]
            raise ValueError(
                f"the text holds {token!r}, which disallowed_special forbids; pass allowed_special={{{token!r}}} "
                f"to encode it as the special token, or disallowed_special=() to encode it as plain text")

    def decode(self, t: Union[int, Sequence[int]]) -> str:
        """The text of one id or of a sequence of ids."""
        raise NotImplementedError

    def decode_bytes(self, t: Sequence[int]) -> bytes:
        """Raw bytes of the tokens; may end in the middle of a UTF-8 character.

        For any prefix `t[:k]`, `decode_bytes(t[:k])` is a prefix of
        `decode_bytes(t)`, so a streamer can hold back incomplete characters.
        """
        raise NotImplementedError

    def token_id(self, special_name: str) -> int:
        try:
            return self.special_tokens[special_name]
        except KeyError:
            raise ValueError(
                f"{special_name!r} is not a special token of this {self.kind} tokenizer; "
                f"known special tokens include {sorted(self.special_tokens)[:8]}."
            ) from None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, n_words={self.n_words})"


def _bytes_of_byte_level_chars() -> Dict[str, int]:
    """GPT-2's byte-level spelling: printable Latin-1 bytes stand for themselves, the other 68 bytes
    (controls, space, ...) for the characters 256, 257, ... in byte order. Returns char -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    chars = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in printable]
    chars.update({chr(256 + i): b for i, b in enumerate(others)})
    return chars


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _token_text(value: object) -> Union[str, None]:
    # tokenizer_config.json spells a token as "<s>" or as {"content": "<s>", ...}.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class HuggingFaceTokenizer(Tokenizer):
    """A Hugging Face tokenizer.json (what `python -m llama.convert` writes), with the special
    tokens named in tokenizer_config.json beside it: bos_token, eos_token, pad_token, add_bos_token,
    chat_template, and "stop_tokens" (every token that ends a reply).

    encode(bos=True) adds the BOS token only for models whose own tokenizer does (add_bos_token);
    SmolLM2, for one, starts its texts without it. Text spelling a special token ("<|im_end|>")
    is encoded as plain text unless allowed_special names it, as with the other kinds."""

    kind = "huggingface"
    # End-of-turn tokens of the chat formats: replies stop at them whenever the model has them.
    END_OF_TURN = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>")

    def __init__(self, model_path: PathLike):
        path = Path(model_path)
        _check_file(path)
        hint = "Pass --tokenizer_path pointing at the tokenizer.json of a model converted by `python -m llama.convert`."
        try:
            self.model = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"{path} could not be loaded as a Hugging Face tokenizer.json ({e}). {hint}") from None
        # Even with add_special_tokens=False, `tokenizers` turns "<|im_end|>" written in the text into
        # the special id; this switch makes it spell such text out with ordinary tokens instead.
        self.model.encode_special_tokens = True
        config_path = path.parent / "tokenizer_config.json"
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{config_path} is missing: it names the BOS/EOS tokens of the tokenizer.json beside it. Convert "
                f"the model with `python -m llama.convert`, or copy the model's tokenizer_config.json there."
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{config_path} is not valid JSON ({e}); convert the model again.") from None

        self.n_words = self.model.get_vocab_size(with_added_tokens=True)
        added = self.model.get_added_tokens_decoder()
        self._added_text = {i: token.content for i, token in added.items()}
        self.special_tokens = {token.content: i for i, token in sorted(added.items()) if token.special}
        self.bos_id = self._id_of(config.get("bos_token"), config_path)
        self.eos_id = self._id_of(config.get("eos_token"), config_path)
        self.pad_id = self._id_of(config.get("pad_token"), config_path)
        add_bos = config.get("add_bos_token")
        if add_bos is None:  # not stated: does the tokenizer's own post-processor add it?
            ids = self.model.encode("a", add_special_tokens=True).ids
            add_bos = bool(ids) and ids[0] == self.bos_id
        self.add_bos = bool(add_bos) and self.bos_id >= 0
        self.chat_template = find_chat_template(path.parent, config)
        stops = [self.eos_id] + [self._id_of(t, config_path) for t in config.get("stop_tokens") or []]
        stops += [self.special_tokens[t] for t in self.END_OF_TURN if t in self.special_tokens]
        self.stop_tokens = [t for i, t in enumerate(stops) if t >= 0 and t not in stops[:i]]
        self._piece_bytes: Union[List[bytes], None] = None  # built on first decode_bytes
        self._strips_first_space = False
        self._path = path
        self.folder = path.parent  # where the chat template was looked for

    def _id_of(self, value: object, config_path: Path) -> int:
        text = _token_text(value)
        if text is None:
            return -1
        token_id = self.model.token_to_id(text)
        if token_id is None:
            raise ValueError(f"{config_path} names the token {text!r}, which the tokenizer.json beside it does not "
                             f"have; the two files belong to different models")
        return token_id

    def _adds_bos(self) -> bool:
        return self.add_bos

    def _encode(self, s: str, allowed: AbstractSet[str]) -> List[int]:
        allowed = sorted(allowed & set(self.special_tokens), key=len, reverse=True)
        if not allowed:
            return self.model.encode(s, add_special_tokens=False).ids
        # As tiktoken does: cut the text at each allowed special token (the longest first where two
        # start at the same place), encode the text between as plain text.
        ids: List[int] = []
        start = 0
        for match in re.finditer("|".join(map(re.escape, allowed)), s):
            if match.start() > start:
                ids += self.model.encode(s[start:match.start()], add_special_tokens=False).ids
            ids.append(self.special_tokens[match.group()])
            start = match.end()
        if start < len(s):
            ids += self.model.encode(s[start:], add_special_tokens=False).ids
        return ids

    def decode(self, t: Union[int, Sequence[int]]) -> str:
        return self.model.decode(_ids(t), skip_special_tokens=False)

    def decode_bytes(self, t: Sequence[int]) -> bytes:
        if self._piece_bytes is None:
            self._piece_bytes = self._build_piece_bytes()
        table = self._piece_bytes  # ids past the tokenizer (a padded embedding's) have no text
        out = b"".join(table[int(x)] if int(x) < len(table) else b"" for x in t)
        if self._strips_first_space and out.startswith(b" "):
            first = next((int(x) for x in t if int(x) not in self._added_text), None)
            if first is not None and (self.model.id_to_token(first) or "").startswith("\u2581"):
                out = out[1:]  # like decode(): the prefix space SentencePiece-style models add is dropped
        return out

    def _build_piece_bytes(self) -> List[bytes]:
        decoder = json.loads(self._path.read_text(encoding="utf-8")).get("decoder") or {}
        steps = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
        types = {step.get("type") for step in steps}
        self._strips_first_space = "Strip" in types or any(
            step.get("type") == "Metaspace" and step.get("prepend_scheme", "always") != "never" for step in steps)
        byte_level = "ByteLevel" in types
        chars = _bytes_of_byte_level_chars()
        table = []
        for i in range(self.n_words):
            piece = self.model.id_to_token(i)
            if i in self._added_text:
                table.append(self._added_text[i].encode("utf-8"))
            elif piece is None:
                table.append(b"")
            elif byte_level and all(c in chars for c in piece):
                table.append(bytes(chars[c] for c in piece))
            elif _BYTE_PIECE.fullmatch(piece):
                table.append(bytes([int(piece[3:5], 16)]))
            else:
                table.append(piece.replace("\u2581", " ").encode("utf-8"))
        return table


_TOKENIZER_CLASSES = {
    "sentencepiece": "SentencePieceTokenizer",
    "tiktoken": "TiktokenTokenizer",
    "huggingface": "HuggingFaceTokenizer",
}

# The backends' modules, which import this one: so this module imports them only when a name of
# theirs is first asked for (by Tokenizer(path) or `from llama.tokenizer import ...`), not at its top.
_BACKEND_MODULES = {
    "SentencePieceTokenizer": ".sentencepiece_tokenizer",
    "TiktokenTokenizer": ".tiktoken_tokenizer",
    "TIKTOKEN_MAX_ENCODE_CHARS": ".tiktoken_tokenizer",
    "MAX_RUN_CHARS": ".tiktoken_tokenizer",
}


def _backend_class(kind: str) -> type:
    name = _TOKENIZER_CLASSES[kind]
    return globals()[name] if name in globals() else __getattr__(name)


def __getattr__(name: str):
    """The backends' classes and constants, imported on first use (PEP 562)."""
    if name not in _BACKEND_MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_BACKEND_MODULES[name], __package__), name)
