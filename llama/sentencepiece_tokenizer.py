"""The Llama 2 tokenizer: a SentencePiece model with byte fallback.

`Tokenizer(path)` (llama/tokenizer.py) builds it for a SentencePiece file."""

from pathlib import Path
from typing import AbstractSet, List, Sequence, Union

import sentencepiece

from .tokenizer import PathLike, Tokenizer, _check_file, _ids


class SentencePieceTokenizer(Tokenizer):
    """Llama 2 tokenizer: a SentencePiece model with byte fallback."""

    kind = "sentencepiece"

    def __init__(self, model_path: PathLike):
        path = Path(model_path)
        _check_file(path)
        self.model = sentencepiece.SentencePieceProcessor()
        try:
            self.model.Load(str(path))
        except (RuntimeError, OSError) as e:
            raise ValueError(
                f"{path} could not be loaded as a SentencePiece model ({e}). "
                f"Pass --tokenizer_path pointing at the model's tokenizer.model."
            ) from e
        self.n_words = self.model.vocab_size()
        self.bos_id = self.model.bos_id()
        self.eos_id = self.model.eos_id()
        self.pad_id = self.model.pad_id()
        self.stop_tokens = [self.eos_id]
        self.special_tokens = {
            self.model.id_to_piece(i): i
            for i in range(self.n_words)
            if self.model.is_control(i) or self.model.is_unknown(i)
        }
        # Precompute each id's bytes for decode_bytes.
        self._piece_bytes = [self._bytes_of(i) for i in range(self.n_words)]

    def _bytes_of(self, i: int) -> bytes:
        if self.model.is_control(i):
            return b""  # decode() drops <s>, </s>
        if self.model.is_byte(i):
            return bytes([int(self.model.id_to_piece(i)[3:5], 16)])  # "<0xNN>"
        if self.model.is_unknown(i):
            return self.model.decode([i]).encode("utf-8")
        return self.model.id_to_piece(i).replace("\u2581", " ").encode("utf-8")

    @property
    def sp_model(self) -> sentencepiece.SentencePieceProcessor:
        """Llama 2's name for the SentencePiece processor."""
        return self.model

    def _encode(self, s: str, allowed: AbstractSet[str]) -> List[int]:
        if allowed & set(self.special_tokens):
            raise ValueError(
                f"a SentencePiece (Llama 2) tokenizer does not turn text into special tokens "
                f"(allowed_special={sorted(allowed)}), as in Meta's Llama 2; add BOS/EOS with bos=True / eos=True")
        return self.model.encode(s)

    def decode(self, t: Union[int, Sequence[int]]) -> str:
        return self.model.decode(_ids(t))

    def decode_bytes(self, t: Sequence[int]) -> bytes:
        out = b"".join(self._piece_bytes[int(x)] for x in t)
        # Like decode(): the dummy-prefix space that encode adds before the
        # text is dropped again at the very start of the output.
        if out.startswith(b" ") and self._first_piece_has_prefix_space(t):
            out = out[1:]
        return out

    def token_pieces(self) -> List[bytes]:
        # Control tokens read as b"" (decode drops them); say which they are instead.
        return [self.model.id_to_piece(i).encode("utf-8") if self.model.is_control(i) else self._piece_bytes[i]
                for i in range(self.n_words)]

    def _first_piece_has_prefix_space(self, t: Sequence[int]) -> bool:
        for x in t:
            if self.model.is_control(int(x)):
                continue
            # A byte-fallback <0x20> is a literal space, not the prefix marker.
            return not self.model.is_byte(int(x)) and self.model.id_to_piece(int(x)).startswith("\u2581")
        return False
