"""What a request's engine events become: its tokens, logprobs, text and why it ended.

One `RequestOutput` per request, on rank 0, serves Llama.generate, the completion and stream
methods and the server alike. The engine decides what needs the model (stop tokens, budgets); the
output decides what needs text (stop strings), and hands out what is new since it last did as a
`Delta`. It runs wherever the caller reads results: the caller's thread for the Python API, the
HTTP handler for the server (never the engine thread).
"""

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from .requests import Finish, TokenEvent
from .streaming import TextStream
from .tokenizer import Tokenizer


@dataclass
class Delta:
    """What a request gained since the last take()."""
    text: str = ""  # text settled since then (whole characters; never the start of a stop string)
    tokens: List[int] = field(default_factory=list)  # output tokens since then
    logprobs: List[float] = field(default_factory=list)  # theirs, when asked for
    top_logprobs: List[List[Tuple[int, float]]] = field(default_factory=list)  # theirs, when asked for
    finish_reason: Optional[str] = None  # on the last delta: a Finish reason


class RequestOutput:
    """One request's output as its events arrive: add(event) for each, take() for what is new.

    stop: strings that end the output as soon as its text holds one (its text then ends before
        it; tokens and logprobs run up to the token that completed it). The engine does not know:
        whoever drives it releases the request once `finished` (or, as Llama.generate does for
        Meta's draws, lets it run on unseen: later events are ignored).
    watch_text: follow the text as it grows (off for token-only callers: no decoding at all).
    echo: the prompt's text opens the output's text (it is never searched for stop strings).
    errors: from streaming.invalid_utf8_errors(tokenizer)."""

    def __init__(self, tokenizer: Tokenizer, prompt: Sequence[int], *, stop: Sequence[str] = (),
                 watch_text: bool = True, echo: bool = False, errors: str = "replace"):
        self.tokenizer = tokenizer
        self.prompt = list(prompt)
        self.tokens: List[int] = []
        self.logprobs: List[float] = []
        self.top_logprobs: List[List[Tuple[int, float]]] = []
        self.prompt_logprobs: Optional[List[float]] = None  # when asked for (echo with logprobs)
        self.prompt_top_logprobs: Optional[List[Optional[List[Tuple[int, float]]]]] = None
        self.finish_reason: Optional[str] = None
        self.error: Optional[str] = None  # with Finish.ERROR: why the engine could not go on
        self.text = TextStream(tokenizer, stop, prefix=self.prompt if echo else (), errors=errors) \
            if watch_text else None
        self._taken = 0  # tokens already handed out by take()
        self._token_texts: Dict[int, str] = {}

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, event: TokenEvent) -> None:
        """Takes one engine event of this request; ignored once the output has finished."""
        if self.finished:
            return
        if event.prompt_logprobs is not None:
            self.prompt_logprobs = event.prompt_logprobs
            self.prompt_top_logprobs = event.prompt_top_logprobs
        if event.token is not None:
            self.tokens.append(event.token)
            if event.logprob is not None:
                self.logprobs.append(event.logprob)
            if event.top_logprobs is not None:
                self.top_logprobs.append(event.top_logprobs)
            if self.text is not None and self.text.push(event.token):
                self._finish(Finish.STOP_STRING)
                return
        if event.finish_reason is not None:
            self.error = event.error
            self._finish(event.finish_reason)

    def take(self) -> Delta:
        """What is new since the last take(); its finish_reason is set on the last one."""
        new = slice(self._taken, len(self.tokens))
        self._taken = len(self.tokens)
        return Delta(self.text.take() if self.text is not None else "", self.tokens[new], self.logprobs[new],
                     self.top_logprobs[new], self.finish_reason)

    def output_tokens(self, echo: bool = False) -> List[int]:
        return (self.prompt if echo else []) + self.tokens

    def output_logprobs(self, echo: bool = False) -> List[float]:
        return (list(self.prompt_logprobs or []) if echo else []) + self.logprobs

    def final_text(self, echo: bool = False) -> str:
        """The whole text once finished: what decode() gives for the output tokens (the prompt's
        first when echo), or the text before the stop string that ended it."""
        if self.finish_reason == Finish.STOP_STRING:
            return self.text.text
        return self.tokenizer.decode(self.output_tokens(echo))

    def token_texts(self, tokens: Sequence[int]) -> List[str]:
        """Each token's own text, decode([token]), as Meta's "tokens" and OpenAI's logprobs show
        them; each distinct token is decoded once per request."""
        texts = self._token_texts
        for t in tokens:
            if t not in texts:
                texts[t] = self.tokenizer.decode([t])
        return [texts[t] for t in tokens]

    def _finish(self, reason: str) -> None:
        self.finish_reason = reason
        if self.text is not None:
            self.text.close()
