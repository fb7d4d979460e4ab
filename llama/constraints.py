"""Constrained decoding: a request's output must match a grammar (a JSON schema, any JSON object,
later a tool call), enforced token by token with llguidance.

Three pieces, each where it runs:
- `Grammar`: what the output must match, compiled and checked once where the request arrives (the
  HTTP handler), as llguidance's grammar text. A small frozen value: it travels to every rank
  inside the request's SamplingParams.
- `Vocabulary`: the tokenizer as the library sees it (each token's bytes, which are special, which
  end a reply), built once per process on first use (0.5 to 2 s for 49k to 128k tokens).
- `Constraint`: one request's matcher. The engine asks it for the next token mask on a worker
  thread while the model runs (llguidance works without the GIL), masks the logits with it, and
  tells it the token chosen. Same tokens in, same mask out: every rank computes the same masks,
  so constraints need no communication.

Once the grammar is complete, the mask allows only the tokenizer's stop tokens, so a finished JSON
ends the request as a stop token does.
"""

import json
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.nn.functional as F

from .tokenizer import Tokenizer


class GrammarError(ValueError):
    """The grammar cannot be used (the library refused the schema); the message says why."""


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise ImportError("constrained decoding (response_format) needs llguidance: pip install -e '.[serve]' "
                          "(or pip install llguidance)") from None
    return llguidance


@dataclass(frozen=True)
class Grammar:
    """A compiled, checked grammar: llguidance's grammar text, and what it came from (for messages)."""
    text: str
    description: str

    @staticmethod
    def json_schema(schema: object, name: str = "schema") -> "Grammar":
        """Output matching the JSON schema (a dict, or True for any JSON value); raises GrammarError
        naming what the library cannot compile."""
        if not isinstance(schema, (dict, bool)):
            raise GrammarError(f"the JSON schema must be an object, got {type(schema).__name__}")
        llg = _llguidance()
        # Compact JSON (no whitespace between tokens): a model cannot then pad its answer with
        # whitespace until max_tokens, which small models do when any whitespace is allowed.
        options = {"whitespace_flexible": False}
        try:
            text = llg.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=options)
        except ValueError as e:
            raise GrammarError(str(e)) from None
        error = llg.LLMatcher.validate_grammar(text)
        if error:
            raise GrammarError(error.strip())
        return Grammar(text, f"JSON schema {name!r}")

    @staticmethod
    def lark(text: str, description: str) -> "Grammar":
        """Output matching a grammar in llguidance's Lark syntax (which may hold JSON schemas as
        `%json {...}`); raises GrammarError naming what the library cannot compile."""
        llg = _llguidance()
        try:
            grammar = llg.LLMatcher.grammar_from_lark(text)
        except ValueError as e:
            raise GrammarError(str(e)) from None
        error = llg.LLMatcher.validate_grammar(grammar)
        if error:
            raise GrammarError(error.strip())
        return Grammar(grammar, description)

    @staticmethod
    def json_object() -> "Grammar":
        """Any JSON object (OpenAI's response_format json_object)."""
        grammar = Grammar.json_schema({"type": "object"})
        return Grammar(grammar.text, "a JSON object")


class Vocabulary:
    """The tokenizer as llguidance sees it, for a model whose logits have `vocab_size` entries (ids
    past the tokenizer's are never allowed). Built on first use, once, from any thread."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self._built = None
        self._lock = threading.Lock()

    @property
    def library_tokenizer(self):
        with self._lock:
            if self._built is None:
                self._built = self._build()
            return self._built

    def _build(self):
        llg = _llguidance()
        t = self.tokenizer
        pieces = t.token_pieces()[:self.vocab_size]
        pieces += [b""] * (self.vocab_size - len(pieces))
        special = sorted(i for i in set(t.special_tokens.values()) if i < self.vocab_size)
        # Which token spells a text: our encoder where it spells exactly those bytes, else the
        # longest token at each point (SentencePiece's encode adds a prefix space, for one).
        by_bytes: Dict[bytes, int] = {}
        for i, piece in enumerate(pieces):
            if piece and i not in special:
                by_bytes.setdefault(piece, i)
        longest = max(map(len, by_bytes))

        class Encoder:  # what llguidance.TokenizerWrapper reads
            eos_token_id = t.stop_tokens[0]
            bos_token_id = t.bos_id if t.bos_id >= 0 else None
            tokens = pieces
            special_token_ids = special

            def __call__(self, text) -> List[int]:
                data = text if isinstance(text, bytes) else text.encode("utf-8")
                try:
                    ids = t.encode(data.decode("utf-8"), bos=False, eos=False)
                    if b"".join(pieces[i] for i in ids) == data:
                        return ids
                except UnicodeDecodeError:
                    pass
                return _longest_first(data, by_bytes, longest)

        return llg.LLTokenizer(llg.TokenizerWrapper(Encoder()), n_vocab=self.vocab_size,
                               eos_token=list(t.stop_tokens))


def _longest_first(data: bytes, by_bytes: Dict[bytes, int], longest: int) -> List[int]:
    """Token ids spelling `data`, the longest known token at each point (bytes no token spells are skipped)."""
    ids, at = [], 0
    while at < len(data):
        for n in range(min(longest, len(data) - at), 0, -1):
            token = by_bytes.get(data[at:at + n])
            if token is not None:
                ids.append(token)
                at += n
                break
        else:
            at += 1
    return ids


def mask_words(vocab_size: int) -> int:
    """int32 words of one token mask: bit j of word w allows token 32 w + j."""
    return (vocab_size + 31) // 32


class Constraint:
    """One request's grammar state. Not thread-safe by itself: the engine calls prefetch() after
    each token it adds and mask() before the next draw; the worker thread does the work between."""

    def __init__(self, grammar: Grammar, vocabulary: Vocabulary):
        self.grammar, self.vocabulary = grammar, vocabulary
        self._matcher = None  # built on the worker thread, on the first prefetch
        self._pending: Optional[Future] = None
        self.error: Optional[str] = None

    def prefetch(self, pool: ThreadPoolExecutor) -> None:
        """Starts computing the next mask on `pool` (the model's forward runs meanwhile)."""
        if self._pending is None:
            self._pending = pool.submit(self._compute)

    def mask(self) -> torch.Tensor:
        """The next token's mask, (mask_words(vocab_size),) int32; all zero when nothing is allowed
        (then `error` says why)."""
        if self._pending is None:
            return self._compute()
        mask, self._pending = self._pending.result(), None
        return mask

    def advance(self, token: int) -> bool:
        """Takes the token chosen; False (and `error` set) if the grammar refuses it."""
        if self._matcher.consume_token(token):
            return True
        self.error = self._matcher.get_error() or f"the grammar refused token {token}"
        return False

    def _compute(self) -> torch.Tensor:
        if self._matcher is None:
            llg = _llguidance()
            self._matcher = llg.LLMatcher(self.vocabulary.library_tokenizer, self.grammar.text, log_level=0)
        mask = torch.zeros(mask_words(self.vocabulary.vocab_size), dtype=torch.int32)
        if not self._matcher.is_error():
            self._matcher.unsafe_compute_mask_ptr(mask.data_ptr(), mask.numel() * 4)
        if self._matcher.is_error():
            self.error = self._matcher.get_error()
            mask.zero_()
        elif not mask.any():
            self.error = f"{self.grammar.description} allows no token here"
        return mask


# (256, 8): for each byte value, 0.0 where its bit b is set and -inf where not.
_BYTE_BIAS = torch.where(((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).bool(), 0.0, float("-inf"))


def masked_logits(logits: torch.Tensor, rows: Sequence[int], masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """logits (batch, vocab) with the disallowed tokens of `rows` at -inf (a new tensor; the other
    rows and the allowed entries keep their values exactly). masks: one per row, (words,) int32.

    A byte table lookup turns each mask byte into 8 biases at once: a few ms for 16 x 128256 on
    one CPU core, and the same ops on a GPU."""
    words = torch.stack(list(masks)).to(logits.device, non_blocking=True)
    table = _BYTE_BIAS.to(device=logits.device, dtype=logits.dtype)
    bias = F.embedding(words.view(torch.uint8).long(), table).reshape(len(rows), -1)[:, :logits.shape[-1]]
    out = logits.clone()
    index = torch.tensor(list(rows), dtype=torch.long, device=logits.device)
    out[index] += bias
    return out


class Masks:
    """The engine's side: each constrained request's Constraint, its masks computed on one worker
    thread (started by the first constrained request), and a batch's logits masked with them."""

    def __init__(self, vocabulary: Optional[Vocabulary]):
        self.vocabulary = vocabulary
        self._pool: Optional[ThreadPoolExecutor] = None

    def start(self, grammar: Grammar) -> Constraint:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="llama-masks")
        return Constraint(grammar, self.vocabulary)

    def prefetch(self, constraints: Sequence[Constraint]) -> None:
        for constraint in constraints:
            constraint.prefetch(self._pool)

    def apply(self, logits: torch.Tensor, constraints: Sequence[Optional[Constraint]]) -> Tuple[torch.Tensor, Set[int]]:
        """logits (batch, vocab) with the disallowed tokens of each row that has a constraint at
        -inf, and the rows whose grammar allows no token at all (left as they are: their draw is
        not used). Rows without one (None) are untouched; with none at all, `logits` itself."""
        rows = [row for row, c in enumerate(constraints) if c is not None]
        if not rows:
            return logits, set()
        masks = {row: constraints[row].mask() for row in rows}
        stuck = {row for row in rows if constraints[row].error is not None}
        usable = [row for row in rows if row not in stuck]
        if not usable:
            return logits, stuck
        return masked_logits(logits, usable, [masks[row] for row in usable]), stuck
