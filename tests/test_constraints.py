"""Constrained decoding (llama/constraints.py): on each of the three tokenizer kinds a grammar's
masks let random draws spell only JSON that jsonschema accepts; through the engine, on a random
Llama 3.1 model, every constrained output validates, greedy and sampled, while unconstrained
requests in the same batch decode as alone; logprobs stay those of the raw logits; a grammar that
allows no token ends its request with an error."""

import json

import jsonschema
import pytest
import torch

from llama import Llama
from llama.constraints import Constraint, Grammar, GrammarError, Vocabulary, masked_logits
from llama.engine import Engine, Finish, Request, SamplingParams
from llama.tokenizer import Tokenizer

from .convert_helpers import write_tiny_tokenizer

# Bounded, so that random choices close them within a few dozen tokens.
SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"},
                                      "score": {"type": "number", "minimum": 0, "maximum": 1}},
     "required": ["colour", "ok"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 1, "maxItems": 4},
    {"type": "object", "properties": {"a": {"type": "object", "properties": {
        "b": {"type": "array", "items": {"enum": [1, "x", None]}, "maxItems": 3}}, "required": ["b"],
        "additionalProperties": False}}, "required": ["a"], "additionalProperties": False},
]


@pytest.fixture(scope="module")
def tokenizers(sp_tokenizer_path, llama3_tokenizer_path, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf_tokenizer")
    write_tiny_tokenizer(folder)
    return {"sentencepiece": Tokenizer(sp_tokenizer_path), "tiktoken": Tokenizer(llama3_tokenizer_path),
            "huggingface": Tokenizer(folder / "tokenizer.json")}


@pytest.fixture(scope="module")
def vocabularies(tokenizers):
    """Llama 3's as the model's (128256 logits); the small ones padded (their extra ids are never allowed)."""
    return {kind: Vocabulary(t, t.n_words + (0 if kind == "tiktoken" else 7)) for kind, t in tokenizers.items()}


@pytest.mark.parametrize("kind", ["sentencepiece", "tiktoken", "huggingface"])
def test_random_draws_under_each_tokenizer_spell_valid_json(tokenizers, vocabularies, kind):
    """Tokens drawn at random among those each mask allows: the text validates, no special token
    but a stop token is ever allowed, and the stop tokens only once the JSON is complete."""
    tokenizer = tokenizers[kind]
    pieces = tokenizer.token_pieces()
    assert len(pieces) == tokenizer.n_words
    ids = tokenizer.encode("Hello, world: {\"a\": 1}", bos=False, eos=False)
    assert tokenizer.decode_bytes(ids) in (b"".join(pieces[i] for i in ids), b"".join(pieces[i] for i in ids)[1:])
    vocabulary = vocabularies[kind]
    never = torch.zeros(vocabulary.vocab_size, dtype=torch.bool)  # special tokens but the stop tokens, padding
    never[list(set(tokenizer.special_tokens.values()) - set(tokenizer.stop_tokens))] = True
    never[tokenizer.n_words:] = True
    stops = torch.tensor(tokenizer.stop_tokens)
    generator = torch.Generator().manual_seed(0)
    for schema in SCHEMAS:
        for _ in range(1 if kind == "tiktoken" else 3):
            constraint, tokens = Constraint(Grammar.json_schema(schema), vocabulary), []
            while True:
                logits = masked_logits(torch.randn(1, vocabulary.vocab_size, generator=generator), [0],
                                       [constraint.mask()])[0]
                allowed = logits > float("-inf")
                assert allowed.any() and not (allowed & never).any()
                token = int(torch.multinomial(torch.softmax(logits, -1), 1))
                if token in tokenizer.stop_tokens:
                    break
                assert not allowed[stops].any()  # the JSON is not complete yet
                assert constraint.advance(token)
                tokens.append(token)
            jsonschema.validate(json.loads(tokenizer.decode(tokens)), schema)


def test_masked_logits_keep_the_allowed_values_exactly():
    logits = torch.randn(3, 70)
    mask = torch.zeros(3, dtype=torch.int32)
    mask[0], mask[2] = 0b1011, 1  # tokens 0, 1, 3 and 64
    out = masked_logits(logits, [1], [mask])
    assert torch.equal(out[[0, 2]], logits[[0, 2]])
    kept = torch.full((70,), float("-inf"))
    kept[[0, 1, 3, 64]] = logits[1, [0, 1, 3, 64]]
    assert torch.equal(out[1], kept)


def test_a_schema_the_library_cannot_compile_is_refused_naming_why():
    with pytest.raises(GrammarError, match="look-around"):
        Grammar.json_schema({"type": "string", "pattern": "(?<=a)b"})
    with pytest.raises(GrammarError, match="unevaluatedProperties"):
        Grammar.json_schema({"type": "object", "unevaluatedProperties": False})


@pytest.fixture(scope="module")
def llama(llama31_ckpts) -> Llama:
    ckpt = llama31_ckpts[1]
    return Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=96, max_batch_size=8,
                       device="cpu", dtype="fp32")


def run(engine, requests, prefill="together"):
    """Every request to its end: {id: (tokens, logprobs, finish_reason, error)}."""
    outputs = {r.id: ([], [], None, None) for r in requests}
    events = engine.admit(requests, prefill=prefill)
    while True:
        for e in events:
            tokens, logprobs, _, _ = outputs[e.request_id]
            if e.token is not None:
                tokens.append(e.token)
                logprobs.append(e.logprob)
            if e.finish_reason is not None:
                outputs[e.request_id] = (tokens, logprobs, e.finish_reason, e.error)
        if engine.active == 0:
            return outputs
        events = engine.step()


def test_constrained_outputs_validate_among_unconstrained_ones(llama, vocabularies):
    tokenizer = llama.tokenizer
    engine = Engine(llama.model, vocabulary=vocabularies["tiktoken"])
    stops = tuple(tokenizer.stop_tokens)
    prompts = [tokenizer.encode(t, bos=True, eos=False) for t in ["JSON please:", "The answer, as JSON, is", "Hi"]]
    plain = [Request(f"plain{i}", p, SamplingParams(temperature=0, max_new_tokens=12, stop_tokens=stops,
                                                    logprobs=True)) for i, p in enumerate(prompts)]
    alone = run(engine, plain)
    constrained = [Request(f"json{i}", prompts[i % 2], SamplingParams(
        temperature=[0, 1.0][i % 2], top_k=[None, 40][i % 2], seed=i, max_new_tokens=70, stop_tokens=stops,
        logprobs=True, constraint=Grammar.json_schema(schema))) for i, schema in enumerate(SCHEMAS)]
    together = run(engine, plain + constrained)
    # Meta's prefill: the shorter prompt's constraint starts once its prompt is fed
    reference = run(engine, plain[:1] + constrained[1:3], prefill="reference")
    for r in plain:
        assert together[r.id][0] == alone[r.id][0]
    assert reference[plain[0].id][0] == alone[plain[0].id][0]
    for r, schema in zip(constrained, SCHEMAS):
        for out in (together, reference) if r.id in reference else (together,):
            tokens, logprobs, reason, error = out[r.id]
            assert (reason, error) == (Finish.STOP_TOKEN, None)
            jsonschema.validate(json.loads(tokenizer.decode(tokens)), schema)
    # logprobs are those of the raw logits: the first token's, from the model itself
    first = together[constrained[0].id]
    with torch.inference_mode():
        raw = llama.model(torch.tensor([constrained[0].prompt]), 0)[0, -1]
    assert first[1][0] == pytest.approx(torch.log_softmax(raw.float(), -1)[first[0][0]].item(), abs=1e-4)


def test_a_grammar_allowing_no_token_ends_its_request_with_an_error(llama, vocabularies, monkeypatch):
    tokenizer = llama.tokenizer
    engine = Engine(llama.model, vocabulary=vocabularies["tiktoken"])
    grammar = Grammar.json_schema(SCHEMAS[1])
    prompt = tokenizer.encode("Hi", bos=True, eos=False)
    params = SamplingParams(temperature=0, max_new_tokens=20, stop_tokens=tuple(tokenizer.stop_tokens))
    compute = Constraint._compute

    def nothing_after_three(self):  # a grammar that allows nothing once 3 tokens are out
        mask = compute(self)
        self.seen = getattr(self, "seen", -1) + 1
        if self.seen == 3:
            self.error = "the grammar allows no token here"
            return torch.zeros_like(mask)
        return mask

    monkeypatch.setattr(Constraint, "_compute", nothing_after_three)
    out = run(engine, [Request("stuck", prompt, SamplingParams(**{**params.__dict__, "constraint": grammar})),
                       Request("free", prompt, params)])
    assert out["stuck"][2:] == (Finish.ERROR, "the grammar allows no token here")
    assert len(out["stuck"][0]) == 3
    assert out["free"][2] is not None and len(out["free"][0]) > 3
    with pytest.raises(ValueError, match="no vocabulary"):
        Engine(llama.model).admit([Request("x", prompt, SamplingParams(constraint=grammar))])
