"""The HTTP server (python -m llama.serve) on 1 and 2 CPU ranks, on a tiny random Llama 3.1
checkpoint, driven over HTTP with the official `openai` client: completions and chat equal the
runner's, streamed text joins to the whole answer, a request's greedy output is the same alone
and among 15 others, and each bad request gets a 4xx with an OpenAI error body while the server
keeps serving. Each server starts once per module."""

import json
import random
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from llama import Llama

from .serving import Server

API_KEY = "test-key"
MODEL = "tiny"
PROMPTS = ["The quick brown fox", "Hello", "Once upon a time in a land far away, there lived", "def add(a, b):",
           "I like", "1, 2, 3,", "Roses are red,", "A", "The capital of France is", "Dear team, I just",
           "Translate to French: cheese =>", "Q: What is 2 + 2?\nA:", "It was a dark and stormy night; the rain",
           "x", "Breaking news:", "Once"]
DIALOG = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module", params=[1, 2], ids=["1rank", "2ranks"])
def server(request, llama31_ckpts):
    """8 slots and a queue of 8, so that 16 requests at once fill both. Prompts of more than 5 tokens
    are prefilled 5 tokens a step (chunked prefill), so every answer checked against the runner,
    which prefills whole prompts, checks the chunks too."""
    ranks = request.param
    srv = Server(llama31_ckpts[ranks], ranks, "--max_batch_size", "8", "--max_queue", "8", "--max_seq_len", "128",
                 "--model_name", MODEL, "--api_key", API_KEY, "--prefill_chunk", "5")
    yield srv
    code = srv.stop()
    assert code == 0 if ranks == 1 else code is not None, srv.output[-3000:]  # torchrun exits with 1 after SIGTERM
    assert "Server stopped: every rank has left its loop" in srv.output, srv.output[-3000:]
    srv.assert_nothing_left()


@pytest.fixture(scope="module")
def client(server):
    return server.client(api_key=API_KEY)


@pytest.fixture(scope="module")
def runner(llama31_ckpts):
    """The runner itself, in this process: what the server must answer."""
    ckpt = llama31_ckpts[1]
    return Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=128, max_batch_size=4, device="cpu",
                       dtype="fp32")


def complete(client, prompt, **options):
    return client.completions.create(model=MODEL, prompt=prompt, **{"temperature": 0, **options})


def test_health_and_models(server, client):
    assert httpx.get(server.url.removesuffix("/v1") + "/health").status_code == 200
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_completion_equals_the_runner(client, runner):
    for prompt in PROMPTS[:4]:
        got = complete(client, prompt, max_tokens=12)
        (want,) = runner.text_completion([prompt], temperature=0, max_gen_len=12)
        choice = got.choices[0]
        assert choice.text == want["generation"]
        assert choice.finish_reason in ("length", "stop")
        tokens = runner.tokenizer.encode(prompt, bos=True, eos=False)
        assert got.usage.prompt_tokens == len(tokens)
        assert got.usage.total_tokens == len(tokens) + got.usage.completion_tokens
        # token ids as the prompt: the same answer
        assert complete(client, tokens, max_tokens=12).choices[0].text == want["generation"]


def test_the_server_compiles_by_default_and_answers_as_the_runner(llama31_ckpts, runner):
    """A server pays the compile once, so it compiles unless told --nocompile (issue 11)."""
    srv = Server(llama31_ckpts[1], 1, "--max_batch_size", "1", "--max_seq_len", "128", "--model_name", MODEL,
                 compile=None)  # one slot: warm-up compiles batch 1 only
    try:
        assert "compiled decode step" in srv.output, srv.output[-3000:]  # the "Loaded" line
        client = srv.client()
        for prompt in PROMPTS[:2]:  # one at a time: batch 1, one compiled graph
            (want,) = runner.text_completion([prompt], temperature=0, max_gen_len=12)
            assert complete(client, prompt, max_tokens=12).choices[0].text == want["generation"]
    finally:
        assert srv.stop() == 0, srv.output[-3000:]
        srv.assert_nothing_left()


def test_completion_logprobs_and_echo_equal_the_runner(client, runner):
    prompt = PROMPTS[2]
    got = complete(client, prompt, max_tokens=6, logprobs=2, echo=True).choices[0]
    (want,) = runner.text_completion([prompt], temperature=0, max_gen_len=6, logprobs=True, echo=True)
    assert got.text == prompt + runner.text_completion([prompt], temperature=0, max_gen_len=6)[0]["generation"]
    assert got.logprobs.tokens == want["tokens"]
    assert got.logprobs.token_logprobs[0] is None
    assert got.logprobs.token_logprobs[1:] == pytest.approx(want["logprobs"][1:], abs=1e-4)
    n_prompt = len(runner.tokenizer.encode(prompt, bos=True, eos=False))
    for chosen, top in zip(got.logprobs.token_logprobs[n_prompt:], got.logprobs.top_logprobs[n_prompt:]):
        assert len(top) <= 2 and max(top.values()) == pytest.approx(chosen, abs=1e-4)  # greedy: the top one


def test_chat_equals_the_runner(client, runner):
    got = client.chat.completions.create(model=MODEL, messages=DIALOG, temperature=0, max_tokens=10)
    (want,) = runner.chat_completion([DIALOG], temperature=0, max_gen_len=10)
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want["generation"]["content"]
    assert got.usage.prompt_tokens == len(runner.formatter.encode_dialog_prompt(DIALOG))


def test_stop_strings_cut_the_text(client, runner):
    whole = complete(client, PROMPTS[0], max_tokens=20).choices[0].text
    stop = whole[5:8]
    got = complete(client, PROMPTS[0], max_tokens=20, stop=[stop, "never appears"]).choices[0]
    (want,) = runner.text_completion([PROMPTS[0]], temperature=0, max_gen_len=20, stop=[stop, "never appears"])
    assert got.text == want["generation"] == whole[:whole.index(stop)]
    assert got.finish_reason == "stop"


@pytest.mark.parametrize("options", [{}, {"stop": ["e"]}, {"logprobs": True, "top_logprobs": 2}],
                         ids=["plain", "stop", "logprobs"])
def test_streamed_chat_joins_to_the_whole_answer(client, options):
    whole = client.chat.completions.create(model=MODEL, messages=DIALOG, temperature=0, max_tokens=16, **options)
    chunks = list(client.chat.completions.create(model=MODEL, messages=DIALOG, temperature=0, max_tokens=16,
                                                 stream=True, stream_options={"include_usage": True}, **options))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [whole.choices[0].finish_reason]
    assert chunks[-1].usage == whole.usage
    if options.get("logprobs"):
        # The second of the two requests may start from the first one's prompt in the cache (prefix
        # reuse), whose logits can differ in the last bits from a whole prefill's.
        streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
        wanted = whole.choices[0].logprobs.content
        assert [(t.token, t.bytes) for t in streamed] == [(t.token, t.bytes) for t in wanted]
        for got, want in zip(streamed, wanted):
            assert got.logprob == pytest.approx(want.logprob, abs=1e-4)
            tops, wanted_tops = ({t.token: t.logprob for t in x.top_logprobs} for x in (got, want))
            assert len(tops) == len(wanted_tops)  # (near-equal rivals may trade places)
            for token in tops.keys() & wanted_tops.keys():
                assert tops[token] == pytest.approx(wanted_tops[token], abs=1e-4)


def test_streamed_completion_joins_to_the_whole_answer(client):
    for options in ({}, {"echo": True, "logprobs": 1}, {"stop": ["a", "o"]}):
        whole = complete(client, PROMPTS[1], max_tokens=16, **options).choices[0]
        chunks = list(complete(client, PROMPTS[1], max_tokens=16, stream=True, **options))
        assert "".join(c.choices[0].text for c in chunks) == whole.text
        assert chunks[-1].choices[0].finish_reason == whole.finish_reason
        if "logprobs" in options:
            assert [t for c in chunks for t in c.choices[0].logprobs.tokens] == whole.logprobs.tokens


def test_a_request_alone_equals_it_among_15_others(client):
    """Greedy requests of different prompt and output lengths: each answered alone, then all 16 at
    once (8 decode together, 8 wait for a slot and join as others leave)."""
    rng = random.Random(0)
    requests = [dict(prompt=p, max_tokens=rng.randint(1, 40), temperature=0) for p in PROMPTS]

    def ask(r):
        choice = client.completions.create(model=MODEL, **r).choices[0]
        return choice.text, choice.finish_reason

    alone = [ask(r) for r in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(ask, requests))
    assert together == alone


def raw_post(server, path, content, headers=None):
    return httpx.post(server.url + path, content=content, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json",
                               **(headers or {})})


def assert_error_body(response, status):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_bad_requests_get_4xx_and_change_nothing(server, client):
    before = complete(client, PROMPTS[0], max_tokens=8).choices[0].text
    ok = {"model": MODEL, "prompt": "Hello", "max_tokens": 4}
    cases = {
        "malformed JSON": (b'{"model": "tiny", "prompt": ', 400),
        "not an object": (b'["tiny"]', 400),
        "missing prompt": (json.dumps({"model": MODEL}).encode(), 400),
        "stream_options without streaming": (json.dumps({**ok, "stream_options": {"include_usage": True}}).encode(),
                                             400),
        "prompt of wrong type": (json.dumps({**ok, "prompt": 3}).encode(), 400),
        "max_tokens of wrong type": (json.dumps({**ok, "max_tokens": "4"}).encode(), 400),
        "temperature < 0": (json.dumps({**ok, "temperature": -0.5}).encode(), 400),
        "top_p 0": (json.dumps({**ok, "top_p": 0}).encode(), 400),
        "top_p > 1": (json.dumps({**ok, "top_p": 1.5}).encode(), 400),
        "prompt plus max_tokens over the context": (json.dumps({**ok, "max_tokens": 500}).encode(), 400),
        "prompt over the context": (json.dumps({**ok, "prompt": "word " * 200}).encode(), 400),
        "token ids outside the vocabulary": (json.dumps({**ok, "prompt": [1, 10 ** 9]}).encode(), 400),
        "unknown field": (json.dumps({**ok, "temprature": 0}).encode(), 400),
        "n > 1": (json.dumps({**ok, "n": 2}).encode(), 400),
        "unknown model": (json.dumps({**ok, "model": "gpt-4"}).encode(), 404),
        "invalid UTF-8": (b'{"model": "tiny", "prompt": "\xff\xfe"}', 400),
        "over-large body": (json.dumps({**ok, "prompt": "a" * (9 * 1024 * 1024)}).encode(), 413),
    }
    for name, (body, status) in cases.items():
        error = assert_error_body(raw_post(server, "/completions", body), status)
        assert error["type"] == "invalid_request_error", name
    chat = {"model": MODEL, "messages": DIALOG}
    chat_cases = {
        "no messages": {**chat, "messages": []},
        "message without content": {**chat, "messages": [{"role": "user"}]},
        "unknown role": {**chat, "messages": [{"role": "wizard", "content": "hi"}]},
        "an image": {**chat, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]},
        "a tool without its function": {**chat, "tools": [{"type": "function"}]},
        "top_logprobs without logprobs": {**chat, "top_logprobs": 2},
        "max_completion_tokens over the context": {**chat, "max_completion_tokens": 1000},
    }
    for name, body in chat_cases.items():
        assert_error_body(raw_post(server, "/chat/completions", json.dumps(body).encode()), 400)
    # the official client raises its typed errors on the same answers
    with pytest.raises(openai.BadRequestError, match="temperature"):
        complete(client, "Hi", temperature=-1)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="Hi")
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").completions.create(model=MODEL, prompt="Hi")
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").models.list()
    assert_error_body(raw_post(server, "/completions", json.dumps(ok).encode(), {"Authorization": ""}), 401)
    # and the server goes on as before
    assert complete(client, PROMPTS[0], max_tokens=8).choices[0].text == before


def test_a_seed_gives_the_same_sample(client):
    """(Sampled tokens of a random model are near ties: the smallest difference in the logits, such as
    another batch size brings, can change them; so the seed is checked request against request.)"""
    options = dict(max_tokens=12, temperature=1.0, top_p=0.95)
    first, again = (complete(client, PROMPTS[0], seed=7, **options).choices[0].text for _ in range(2))
    assert first == again
    assert complete(client, PROMPTS[0], seed=8, **options).choices[0].text != first


# --- response_format: constrained decoding (llama/constraints.py) ---

# Bounded (strings, arrays and integers have limits), so that a random model's choices close them
# well within max_tokens; the unbounded ones are checked on SmolLM2 (test_serve_smollm2.py).
SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
     "required": ["colour", "ok"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 1, "maxItems": 4},
    {"type": "object", "properties": {"a": {"type": "object", "properties": {
        "b": {"type": "array", "items": {"enum": [1, "x", None]}, "maxItems": 3}}, "required": ["b"],
        "additionalProperties": False}}, "required": ["a"], "additionalProperties": False},
]


def json_format(schema, name="answer"):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def chat_json(client, schema, stream=False, **options):
    """(text, finish_reason) of a chat reply under the schema, whole or joined from its stream."""
    options = {"model": MODEL, "messages": DIALOG, "max_tokens": 60, "temperature": 0,
               "response_format": json_format(schema), **options}
    if not stream:
        choice = client.chat.completions.create(**options).choices[0]
        return choice.message.content, choice.finish_reason
    chunks = list(client.chat.completions.create(stream=True, **options))
    return "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason


def test_json_schema_replies_validate_streamed_and_not(client):
    import jsonschema

    for schema in SCHEMAS:
        whole = chat_json(client, schema)
        assert chat_json(client, schema, stream=True) == whole
        sampled = ({"temperature": 1.0, "seed": 3}, {"temperature": 0.8, "extra_body": {"top_k": 50}, "seed": 4})
        for options in ({}, *sampled):
            text, reason = chat_json(client, schema, **options) if options else whole
            assert reason == "stop", text
            jsonschema.validate(json.loads(text), schema)
    # on completions too (an extra, as in vLLM)
    choice = client.completions.create(model=MODEL, prompt="JSON:", max_tokens=60, temperature=0,
                                       extra_body={"response_format": json_format(SCHEMAS[1])}).choices[0]
    jsonschema.validate(json.loads(choice.text), SCHEMAS[1])


def test_constrained_requests_among_unconstrained_ones(client):
    """In one batch, the unconstrained requests answer as alone and the constrained ones validate."""
    import jsonschema

    plain = [dict(prompt=p, max_tokens=20, temperature=0) for p in PROMPTS[:4]]

    def ask(r):
        choice = client.completions.create(model=MODEL, **r).choices[0]
        return choice.text, choice.finish_reason

    alone = [ask(r) for r in plain]
    with ThreadPoolExecutor(8) as pool:
        constrained = [pool.submit(chat_json, client, s, stream=i % 2 == 1) for i, s in enumerate(SCHEMAS)]
        together = list(pool.map(ask, plain))
        for schema, future in zip(SCHEMAS, constrained):
            text, reason = future.result()
            assert reason == "stop"
            jsonschema.validate(json.loads(text), schema)
    assert together == alone


def test_max_tokens_before_the_json_closes_gives_length(client):
    text, reason = chat_json(client, SCHEMAS[3], max_tokens=3)
    assert reason == "length" and text.startswith('{"a"')  # truncated JSON, as OpenAI answers


def test_bad_response_formats_get_400(server, client):
    chat = {"model": MODEL, "messages": DIALOG, "max_tokens": 4}
    cases = {
        "a schema the library refuses": (json_format({"type": "string", "pattern": "(?<=x)a"}), "look-around"),
        "an unknown keyword": (json_format({"type": "object", "unevaluatedProperties": False}),
                               "unevaluatedProperties"),
        "an unknown type": (json_format({"type": "sting"}), "sting"),
        "no name": ({"type": "json_schema", "json_schema": {"schema": {}}}, "name"),
        "json_schema missing": ({"type": "json_schema"}, "json_schema"),
        "an unknown format type": ({"type": "yaml"}, "type"),
    }
    for name, (response_format, named) in cases.items():
        error = assert_error_body(raw_post(server, "/chat/completions", json.dumps(
            {**chat, "response_format": response_format}).encode()), 400)
        assert named in error["message"] and error["param"] == "response_format", (name, error)
    with pytest.raises(openai.BadRequestError, match="look-around"):
        chat_json(client, {"type": "string", "pattern": "(?<=x)a"})
    text, _ = chat_json(client, {"type": "string", "maxLength": 5})  # a format of type text works after them
    assert json.loads(text) is not None
