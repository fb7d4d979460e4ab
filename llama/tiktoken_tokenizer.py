"""The Llama 3 / 3.x tokenizer: tiktoken BPE plus 256 special tokens.

`Tokenizer(path)` (llama/tokenizer.py) builds it for a tiktoken BPE file."""

import base64
import re
from pathlib import Path
from typing import AbstractSet, Dict, Iterator, List, Sequence, Union

import tiktoken

from .tokenizer import PathLike, Tokenizer, _check_file, _ids

# Llama 3 pre-tokenization pattern (from Meta's Llama 3 tokenizer).
_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_NUM_SPECIAL = 256
# Llama 3.1 layout; ids start right after the base vocab (128000).
_LLAMA3_NAMED_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",  # end of message (tool call follows)
    "<|eot_id|>",  # end of turn
    "<|python_tag|>",
]

# tiktoken gets slow (or fails) on huge inputs and on very long runs of
# whitespace or non-whitespace, so encode in bounded pieces.
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000
_RUNS = re.compile(r"\s+|\S+")


def _split_long_runs(s: str, max_run: int) -> Iterator[str]:
    """Yield consecutive pieces of `s` with no run of whitespace (or of
    non-whitespace) longer than `max_run` characters inside one piece."""
    start = 0
    for m in _RUNS.finditer(s):
        for cut in range(m.start() + max_run, m.end(), max_run):
            yield s[start:cut]
            start = cut
    yield s[start:]


def _read_tiktoken_ranks(path: Path) -> Dict[bytes, int]:
    # Parsed here rather than with tiktoken.load.load_tiktoken_bpe: that
    # function copies even local files into a cache keyed by the path
    # string, so a different file later placed at the same path would be
    # ignored in favour of the stale copy.
    ranks: Dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError as e:
                raise ValueError(
                    f"{path}:{lineno} is not a '<base64 token> <rank>' line; the tiktoken file may be "
                    f"truncated or corrupt. Pass --tokenizer_path pointing at the model's tokenizer.model."
                ) from e
    return ranks


class TiktokenTokenizer(Tokenizer):
    """Llama 3 / 3.x tokenizer: tiktoken BPE plus 256 special tokens."""

    kind = "tiktoken"
    num_reserved_special_tokens = _LLAMA3_NUM_SPECIAL  # Meta's class attributes
    pat_str = _LLAMA3_PATTERN

    def __init__(self, model_path: PathLike):
        path = Path(model_path)
        _check_file(path)
        ranks = _read_tiktoken_ranks(path)
        n_base = len(ranks)
        names = _LLAMA3_NAMED_SPECIALS + [
            f"<|reserved_special_token_{i}|>"
            for i in range(2, 2 + _LLAMA3_NUM_SPECIAL - len(_LLAMA3_NAMED_SPECIALS))
        ]
        self.special_tokens = {name: n_base + i for i, name in enumerate(names)}
        self.model = tiktoken.Encoding(
            name=path.name,
            pat_str=_LLAMA3_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=self.special_tokens,
        )
        self.n_words = self.model.n_vocab
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        # The base model has no pad token; <|finetune_right_pad_id|> is still
        # reachable through token_id().
        self.pad_id = -1
        self.eot_id = self.special_tokens["<|eot_id|>"]  # llama-models' names
        self.eom_id = self.special_tokens["<|eom_id|>"]
        self.python_tag_id = self.special_tokens["<|python_tag|>"]
        self.stop_tokens = [self.eos_id, self.eom_id, self.eot_id]

    def _encode(self, s: str, allowed: AbstractSet[str]) -> List[int]:
        ids: List[int] = []
        for i in range(0, len(s), TIKTOKEN_MAX_ENCODE_CHARS):
            for piece in _split_long_runs(s[i : i + TIKTOKEN_MAX_ENCODE_CHARS], MAX_RUN_CHARS):
                # Disallowed text was refused by encode() already; here the rest is plain text.
                ids.extend(self.model.encode(piece, allowed_special=allowed, disallowed_special=()))
        return ids

    def decode(self, t: Union[int, Sequence[int]]) -> str:
        return self.model.decode(_ids(t))

    def decode_bytes(self, t: Sequence[int]) -> bytes:
        return self.model.decode_bytes([int(x) for x in t])

    def token_pieces(self) -> List[bytes]:
        return [self.model.decode_single_token_bytes(i) for i in range(self.n_words)]
