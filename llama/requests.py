"""What a request to the engine is, and what the engine answers: a request's sampling settings,
the request, the event of each step, and why a request ended."""

from dataclasses import dataclass
from typing import Hashable, List, Optional, Sequence, Tuple

from .constraints import Grammar


class Finish:
    """Why a request ended: one vocabulary from the engine to the APIs (the server maps it to
    OpenAI's "stop" / "length")."""
    STOP_TOKEN = "stop_token"  # the model chose a stop token (decided by the engine; not output)
    LENGTH = "length"  # max_new_tokens or the context reached (decided by the engine)
    STOP_STRING = "stop_string"  # a stop string appeared in the text (decided by llama/outputs.py)
    ERROR = "error"  # the request's grammar allows no token (TokenEvent.error says why)


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. temperature 0 is greedy; top_k None or 0 is off."""

    temperature: float = 0.6
    top_p: float = 0.9
    top_k: Optional[int] = None
    seed: Optional[int] = None  # None: torch's global generator (Meta's behaviour)
    max_new_tokens: Optional[int] = None  # None: until the context (max_seq_len) is full
    logprobs: bool = False  # the log-probability of each new token
    top_logprobs: int = 0  # also the k most likely (token, logprob) at each new token
    prompt_logprobs: bool = False  # the prompt tokens' log-probabilities (echo), with the first event
    # (and their top_logprobs most likely rivals, when top_logprobs is set)
    stop_tokens: Tuple[int, ...] = ()  # tokens that end the request (tokenizer.stop_tokens)
    # What the output must match (llama/constraints.py): disallowed tokens are masked before
    # temperature, top-k, top-p and greedy; logprobs stay those of the raw logits.
    constraint: Optional[Grammar] = None


@dataclass(frozen=True)
class Request:
    id: Hashable
    prompt: Sequence[int]
    params: SamplingParams = SamplingParams()


@dataclass
class TokenEvent:
    """What admit() and step() return for each request that moved on.

    token: the new token, part of the output; None when the request ended without one (a stop
        token, which is not output, or no room for any new token).
    logprob / top_logprobs: when asked for; log-probabilities under the raw (untempered) logits.
    finish_reason: None while the request goes on; Finish.STOP_TOKEN or Finish.LENGTH
        (max_new_tokens or the context reached) when it ended with this event.
    prompt_logprobs: on the request's first event, when it asked for them: one per prompt token,
        0.0 for the first.
    prompt_top_logprobs: with them, when top_logprobs is set too: the top_logprobs most likely
        (token, logprob) at each prompt token, None for the first."""

    request_id: Hashable
    token: Optional[int]
    logprob: Optional[float] = None
    top_logprobs: Optional[List[Tuple[int, float]]] = None
    finish_reason: Optional[str] = None
    prompt_logprobs: Optional[List[float]] = None
    prompt_top_logprobs: Optional[List[Optional[List[Tuple[int, float]]]]] = None
    error: Optional[str] = None  # with Finish.ERROR: why the request could not go on
