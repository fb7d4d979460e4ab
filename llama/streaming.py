"""The text of a sequence as it grows one token at a time: for streaming, and for stop strings.

A `TextStream` turns each new token into the text it adds, without decoding the whole sequence
again. Two things are held back until they are settled:
- the bytes of a character split across tokens (CJK, emoji), until the character is complete;
- with stop strings, text that could still turn out to be the start of a stop string.
Joined, the pieces equal `tokenizer.decode(tokens)`, or, when a stop string was found, the text
before it.
"""

import codecs
from typing import List, Optional, Sequence, Union

from .tokenizer import Tokenizer

# SentencePiece (and Hugging Face's ByteFallback decoder) turn each invalid byte into one U+FFFD;
# Python's "replace", like tiktoken and Rust's lossy UTF-8, writes one per invalid run.
codecs.register_error("llama.replace_each_byte", lambda e: ("\ufffd" * (e.end - e.start), e.end))


def invalid_utf8_errors(tokenizer: Tokenizer) -> str:
    """The codecs error handler under which UTF-8 decoding matches `tokenizer.decode` on invalid
    bytes (a model can emit byte tokens that form no character)."""
    if tokenizer.kind == "sentencepiece":
        return "llama.replace_each_byte"
    decoder = getattr(getattr(tokenizer, "model", None), "decoder", None)
    if tokenizer.kind == "huggingface" and decoder is not None and b"ByteFallback" in decoder.__getstate__():
        return "llama.replace_each_byte"
    return "replace"


def check_stop(stop: Union[None, str, Sequence[str]]) -> List[str]:
    """The stop strings as a list; one string is taken as a list of one."""
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
        raise ValueError(f"stop must be a list of non-empty strings, e.g. stop=['\\n\\n'], got {stop!r}")
    return list(stop)


class TextStream:
    """The text of one sequence. `push(token)` adds a token and says whether a stop string is now
    complete; `take()` returns the text settled since the last take; `close()` settles the rest
    when the sequence ends; `text` is all of it.

    prefix: tokens whose text comes first but is never searched for stop strings (an echoed prompt).
    errors: from invalid_utf8_errors(tokenizer)."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = (), prefix: Sequence[int] = (),
                 errors: str = "replace"):
        self._tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors=errors)
        self._stop = list(stop)
        self._head: List[int] = []  # the tokens up to the first that has bytes
        self._anchor: Optional[int] = None  # that first token: later ones are decoded right after it
        self._anchor_len = 0
        self._settled: List[str] = []  # all settled text, in pieces
        self._fresh = 0  # how many of those pieces take() has not returned yet
        self._pending = ""  # decoded text that might still begin a stop string
        self.stopped = False  # a stop string was found; the text ends just before it
        self.closed = False
        for token in prefix:
            self._settle(self._decode(token))

    def push(self, token: int) -> bool:
        """Adds one generated token; True when its text completed a stop string."""
        assert not self.closed, "push() after the sequence ended"
        self._add(self._decode(token))
        return self.stopped

    def close(self) -> None:
        """The sequence has ended: a character left incomplete becomes U+FFFD, and text that was
        held back for a stop string that never came is settled."""
        if not self.closed:
            self.closed = True
            if not self.stopped:
                self._add(self._decoder.decode(b"", final=True))
                self._settle(self._pending)
                self._pending = ""

    def take(self) -> str:
        """The text settled since the last call ("" if none)."""
        piece = "".join(self._settled[len(self._settled) - self._fresh:]) if self._fresh else ""
        self._fresh = 0
        return piece

    @property
    def text(self) -> str:
        """All settled text: after close(), the sequence's whole text."""
        return "".join(self._settled)

    def _decode(self, token: int) -> str:
        """The text this token adds. Decoding is a concatenation of token bytes, except that the
        tokenizer may treat the first token with bytes specially (SentencePiece drops its leading
        space), so each later token is decoded right after that first one, and the anchor's own
        bytes are cut off: two tiny decodes per token, whatever the sequence's length."""
        if self._anchor is None:
            self._head.append(token)
            data = self._tokenizer.decode_bytes(self._head)  # the earlier head tokens had no bytes
            if data:
                self._anchor, self._head = token, []
                self._anchor_len = len(self._tokenizer.decode_bytes([token]))
        else:
            data = self._tokenizer.decode_bytes([self._anchor, token])[self._anchor_len:]
        if not data:
            # A token without bytes (a control token) still separates the bytes on either side:
            # decode() never joins them into one character.
            text = self._decoder.decode(b"", final=True)
            self._decoder.reset()
            return text
        return self._decoder.decode(data)

    def _add(self, text: str) -> None:
        """Appends generated text, stopping at the first stop string and holding back any end of it
        that could still grow into one."""
        if self.stopped or not text:
            return
        pending = self._pending + text
        if not self._stop:
            self._settle(pending)
            return
        # Settled text never ends with the start of a stop string, so a stop string can only lie
        # within `pending`.
        found = [i for i in (pending.find(s) for s in self._stop) if i >= 0]
        if found:
            self._settle(pending[:min(found)])
            self._pending = ""
            self.stopped = True
            return
        hold = max((n for s in self._stop for n in range(1, min(len(s), len(pending) + 1))
                    if pending.endswith(s[:n])), default=0)
        self._settle(pending[:len(pending) - hold])
        self._pending = pending[len(pending) - hold:]

    def _settle(self, text: str) -> None:
        if text:
            self._settled.append(text)
            self._fresh += 1
