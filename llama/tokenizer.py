"""The tokenizer interface: Llama 2 (SentencePiece), Llama 3 (tiktoken BPE) and converted models (a
Hugging Face tokenizer.json, run by the `tokenizers` library) each have a backend module,
llama/sentencepiece_tokenizer.py, llama/tiktoken_tokenizer.py and llama/hf_tokenizer.py.

`Tokenizer(path)` looks at the file's content and returns the matching
subclass, so callers never need to know which model family they hold. The backends' classes
(and TIKTOKEN_MAX_ENCODE_CHARS, MAX_RUN_CHARS) can also be imported from here.

The module is laid out as Meta's llama3 `llama/tokenizer.py`: it also exports `ChatFormat`,
`Dialog`, `Message` and `Role` (defined in llama/chat_format.py), so
`from llama.tokenizer import ChatFormat, Tokenizer` works as in Meta's code.
"""

import importlib
import operator
import os
import re
from pathlib import Path
from typing import AbstractSet, Collection, Dict, List, Literal, Sequence, Union

# Meta's llama3 keeps the chat format in this module; ours lives in llama/chat_format.py, which
# names Tokenizer only in type hints, so importing it here makes no circle.
from .chat_format import ChatFormat, Dialog, Message, Role  # noqa: F401

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
    kind only needs a branch here, its module and entries in `_TOKENIZER_CLASSES` and `_BACKEND_MODULES`.
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
            cls = _from_backend(_TOKENIZER_CLASSES[detect_tokenizer_kind(*args, **kwargs)])
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

    def token_pieces(self) -> List[bytes]:
        """Each id's bytes as they read inside a text (no prefix space dropped, unlike decode_bytes
        of one token); a special token's are its name's. One entry per id, n_words in all: what a
        grammar library needs to know which tokens spell what (llama/constraints.py)."""
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


_TOKENIZER_CLASSES = {
    "sentencepiece": "SentencePieceTokenizer",
    "tiktoken": "TiktokenTokenizer",
    "huggingface": "HuggingFaceTokenizer",
}

# Where the backends' names live. Those modules import this one, so this one imports them only when
# a name of theirs is first asked for, never at its top: no import cycle.
_BACKEND_MODULES = {
    "SentencePieceTokenizer": ".sentencepiece_tokenizer",
    "TiktokenTokenizer": ".tiktoken_tokenizer",
    "TIKTOKEN_MAX_ENCODE_CHARS": ".tiktoken_tokenizer",
    "MAX_RUN_CHARS": ".tiktoken_tokenizer",
    "HuggingFaceTokenizer": ".hf_tokenizer",
}


def _from_backend(name: str):
    """`name` from the backend module that defines it (imported now, if it is not yet)."""
    return getattr(importlib.import_module(_BACKEND_MODULES[name], __package__), name)


def __getattr__(name: str):
    """`from llama.tokenizer import TiktokenTokenizer` and the like (PEP 562: called for names not defined here)."""
    if name in _BACKEND_MODULES:
        return _from_backend(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
