"""The server on a real model, SmolLM2-135M-Instruct converted from its GGUF, against transformers
running the same GGUF: greedy completions and chat replies (ChatML, the model's own template) over
HTTP equal transformers' greedy continuations, asked one at a time and all at once; structured
output and tool calls (the generic ChatML form) validate."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from .serving import Server

NEW_TOKENS = 24
PROMPTS = ["The capital of France is", "Here is a list of three fruits:\n1.", "Water boils at a temperature of"]
DIALOGS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "Name three primary colors."}],
]


@pytest.fixture(scope="module")
def server(smollm2_ckpt):
    srv = Server(smollm2_ckpt, 1, "--max_batch_size", "4", "--max_seq_len", "512", "--model_name", "smollm2",
                 tokenizer="tokenizer.json")
    yield srv
    assert srv.stop() == 0, srv.output[-3000:]
    srv.assert_nothing_left()


def greedy(smollm2_reference, ids):
    """transformers' greedy continuation, cut before the stop token, as text and finish reason."""
    tokenizer, model = smollm2_reference
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=stop, pad_token_id=stop)
    new = out[0, len(ids):].tolist()
    if stop in new:
        return tokenizer.decode(new[:new.index(stop)]), "stop"
    return tokenizer.decode(new), "length"


@pytest.fixture(scope="module")
def expected(smollm2_reference):
    tokenizer, _ = smollm2_reference
    plain = [greedy(smollm2_reference, tokenizer(p).input_ids) for p in PROMPTS]
    templated = [tokenizer.apply_chat_template(d, tokenize=False, add_generation_prompt=True) for d in DIALOGS]
    chat = [greedy(smollm2_reference, tokenizer(t, add_special_tokens=False).input_ids) for t in templated]
    return plain, chat


def test_greedy_completions_and_chat_equal_transformers(server, expected):
    client = server.client()

    def complete(prompt):
        choice = client.completions.create(model="smollm2", prompt=prompt, max_tokens=NEW_TOKENS,
                                           temperature=0).choices[0]
        return choice.text, choice.finish_reason

    def chat(dialog):
        choice = client.chat.completions.create(model="smollm2", messages=dialog, max_tokens=NEW_TOKENS,
                                                temperature=0).choices[0]
        return choice.message.content, choice.finish_reason

    plain, replies = expected
    assert [complete(p) for p in PROMPTS] == plain
    assert [chat(d) for d in DIALOGS] == replies
    assert "Paris" in replies[0][0]
    with ThreadPoolExecutor(len(PROMPTS) + len(DIALOGS)) as pool:  # all at once: one batch
        together = [pool.submit(complete, p) for p in PROMPTS] + [pool.submit(chat, d) for d in DIALOGS]
        assert [f.result() for f in together] == plain + replies


CITY = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"},
                                         "population_millions": {"type": "number"}},
        "required": ["city", "country"], "additionalProperties": False}
ASK_JSON = [{"role": "user", "content": "Give the capital of France as JSON with the keys city and country."}]


def test_structured_replies_validate_among_plain_ones(server, expected):
    """json_schema and json_object replies, whole and streamed, parse and validate, sent together
    with plain greedy chats, which still equal transformers' replies."""
    import json

    import jsonschema

    client = server.client()
    formats = [{"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}},
               {"type": "json_object"}]

    def structured(response_format, stream):
        options = dict(model="smollm2", messages=ASK_JSON, max_tokens=60, temperature=0,
                       response_format=response_format)
        if not stream:
            choice = client.chat.completions.create(**options).choices[0]
            return choice.message.content, choice.finish_reason
        chunks = list(client.chat.completions.create(stream=True, **options))
        return "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason

    def chat(dialog):
        choice = client.chat.completions.create(model="smollm2", messages=dialog, max_tokens=NEW_TOKENS,
                                                temperature=0).choices[0]
        return choice.message.content, choice.finish_reason

    with ThreadPoolExecutor(4) as pool:
        replies = [pool.submit(structured, f, stream) for f in formats for stream in (False, True)]
        plain = list(pool.map(chat, DIALOGS[:1] * 2))  # the other slots: greedy chats
        replies = [r.result() for r in replies]
    assert plain == expected[1][:1] * 2
    assert replies[0] == replies[1] and replies[2] == replies[3]  # streamed joins to the whole
    for (text, reason), schema in zip(replies[::2], [CITY, {"type": "object"}]):
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), schema)
    assert json.loads(replies[0][0])["city"] == "Paris"


CAPITAL_TOOL = {"type": "function", "function": {
    "name": "get_capital", "description": "The capital city of a country",
    "parameters": {"type": "object", "properties": {"country": {"type": "string", "maxLength": 40}},
                   "required": ["country"], "additionalProperties": False}}}


def test_tool_calls_in_the_generic_form(server):
    """A required call (the generic <tool_call> form: SmolLM2's template has no tool section)
    parses and validates, streamed as OpenAI streams calls; its result in the history is accepted."""
    import json

    import jsonschema

    client = server.client()
    options = dict(model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}],
                   tools=[CAPITAL_TOOL], tool_choice="required", parallel_tool_calls=False, max_tokens=60,
                   temperature=0)
    choice = client.chat.completions.create(**options).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_capital"
    jsonschema.validate(json.loads(call.function.arguments), CAPITAL_TOOL["function"]["parameters"])
    chunks = list(client.chat.completions.create(stream=True, **options))
    deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or []]
    assert deltas[0].id and deltas[0].function.name == "get_capital" and deltas[0].function.arguments == ""
    assert "".join(d.function.arguments for d in deltas) == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    history = options["messages"] + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                                     {"role": "tool", "tool_call_id": call.id, "content": "Paris"}]
    follow = client.chat.completions.create(**{**options, "messages": history, "tool_choice": "none"}).choices[0]
    assert follow.message.tool_calls is None and follow.finish_reason in ("stop", "length")
    assert isinstance(follow.message.content, str) and follow.message.content
