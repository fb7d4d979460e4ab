"""Tool calls through the HTTP server (llama/serve/tools.py), driven with the official `openai`
client on a tiny random Llama 3.1 checkpoint (Meta's tokenizer), in the JSON form (Llama 3.1 /
3.3; the fixture takes other --tool_format values too): with tool_choice "required" or a named function even a
random model's calls parse and their arguments validate, whole and streamed (streamed as OpenAI
streams them: id, type and name first, then argument fragments that join to the whole arguments);
a follow-up with the calls and their results in the history is accepted; "none" gives text; bad
requests get a 400 naming the problem. The prompt is the one llama/tool_calls.py writes
(test_tool_calls.py checks that against llama-models)."""

import json

import httpx
import jsonschema
import openai
import pytest

from llama.tokenizer import ChatFormat, Tokenizer
from llama.tool_calls import Tool, today, tool_format

from .serving import Server

MODEL = "tiny"
# Bounded, so that a random model's choices close them well within max_tokens.
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                            "metric": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "metric"], "additionalProperties": False}
COUNT = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                          "exact": {"type": "boolean"}},
         "required": ["n", "exact"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "count", "description": "Counts", "parameters": COUNT}}]
SCHEMAS = {"get_weather": WEATHER, "count": COUNT}
ASK = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the weather in Paris?"}]


# The JSON form end to end; the pythonic form's prompt, parser and grammar are checked against
# llama-models in test_tool_calls.py (a second server here cost 35 s of the suite's time).
@pytest.fixture(scope="module", params=["json"])
def server(request, llama31_ckpts):
    srv = Server(llama31_ckpts[1], 1, "--max_batch_size", "4", "--max_seq_len", "1024", "--model_name", MODEL,
                 "--tool_format", request.param)
    srv.tool_format = request.param
    yield srv
    assert srv.stop() == 0, srv.output[-3000:]
    srv.assert_nothing_left()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def ask(client, stream=False, **options):
    """(content, [(id, name, arguments)], finish_reason) of a reply, whole or gathered from its
    stream; a stream's tool-call deltas are checked to come in OpenAI's shape."""
    options = {"model": MODEL, "messages": ASK, "tools": TOOLS, "max_tokens": 150, "temperature": 0, **options}
    if not stream:
        choice = client.chat.completions.create(**options).choices[0]
        calls = [(c.id, c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
        assert all(c.type == "function" for c in choice.message.tool_calls or [])
        return choice.message.content, calls, choice.finish_reason
    content, calls, reasons = "", [], []
    for chunk in client.chat.completions.create(stream=True, **options):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for call in delta.tool_calls or []:
            if call.index == len(calls):  # a new call: its id, type and name, no arguments yet
                assert call.id and call.type == "function" and call.function.name and call.function.arguments == ""
                calls.append([call.id, call.function.name, ""])
            else:  # then only fragments of its arguments
                assert call.index == len(calls) - 1 and call.id is None and call.function.name is None
                calls[-1][2] += call.function.arguments
        if chunk.choices[0].finish_reason:
            reasons.append(chunk.choices[0].finish_reason)
    assert len(reasons) == 1
    return content or None, [tuple(c) for c in calls], reasons[0]


def named(name):
    return {"type": "function", "function": {"name": name}}


def test_required_and_named_calls_validate_whole_and_streamed(client):
    sampled = {"temperature": 1.0, "seed": 5}
    for choice, names, options in (("required", {"get_weather", "count"}, {}),
                                   ("required", {"get_weather", "count"}, sampled),
                                   (named("count"), {"count"}, {"parallel_tool_calls": False}),
                                   (named("get_weather"), {"get_weather"}, sampled)):
        content, calls, reason = ask(client, tool_choice=choice, **options)
        assert reason == "tool_calls" and content is None and calls, (choice, options)
        assert len(calls) == 1 or options.get("parallel_tool_calls") is None
        for _, name, arguments in calls:
            assert name in names
            jsonschema.validate(json.loads(arguments), SCHEMAS[name])
        streamed = ask(client, stream=True, tool_choice=choice, **options)
        assert [c[1:] for c in streamed[1]] == [c[1:] for c in calls] and streamed[2] == "tool_calls"
        assert len({c[0] for c in calls + streamed[1]}) == 2 * len(calls)  # ids are unique


def test_the_prompt_is_the_formats_and_history_is_accepted(server, client, llama31_ckpts):
    formats = tool_format(ChatFormat(Tokenizer(llama31_ckpts[1] / "tokenizer.model")), server.tool_format)
    reply = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                           max_tokens=150, temperature=0)
    tools = [Tool(t["function"]["name"], t["function"]) for t in TOOLS]
    dialog = [{"role": m["role"], "content": m["content"]} for m in ASK]
    assert reply.usage.prompt_tokens == len(formats.prompt(dialog, tools, "required", today()))
    call = reply.choices[0].message.tool_calls[0]
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    for choice in ("none", "auto", named("count")):
        follow = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, tool_choice=choice,
                                                max_tokens=8, temperature=0).choices[0]
        if choice == "none":  # a text reply, never calls
            assert follow.message.tool_calls is None and isinstance(follow.message.content, str)
            assert follow.finish_reason in ("stop", "length")
        elif choice != "auto":
            assert follow.finish_reason in ("tool_calls", "length")
    # the history alone (no tools offered now) is written in the format too
    plain = client.chat.completions.create(model=MODEL, messages=history, max_tokens=4, temperature=0)
    assert plain.choices[0].message.tool_calls is None


def test_auto_streams_text_as_text(client):
    """A random model's reply under "auto" is text (it does not open with a call): streamed it
    joins to the whole reply, as without tools."""
    whole = ask(client, tool_choice="auto", max_tokens=12)
    streamed = ask(client, stream=True, tool_choice="auto", max_tokens=12)
    assert streamed == whole and whole[1] == [] and whole[2] in ("stop", "length")


def test_bad_tool_requests_get_400(server, client):
    chat = {"model": MODEL, "messages": ASK, "max_tokens": 4}
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "x"}'}}
    cases = {
        "a named function not in tools": ({**chat, "tools": TOOLS, "tool_choice": named("nope")}, "nope"),
        "required without tools": ({**chat, "tool_choice": "required"}, "needs tools"),
        "a function defined twice": ({**chat, "tools": TOOLS + TOOLS[:1]}, "more than once"),
        "a bad function name": ({**chat, "tools": [{"type": "function", "function": {"name": "a b"}}]}, "name"),
        "a tool without a function": ({**chat, "tools": [{"type": "function"}]}, "function"),
        "tools with response_format": ({**chat, "tools": TOOLS, "response_format": {"type": "json_object"}},
                                       "response_format"),
        "a tool message without tool_call_id": ({**chat, "messages": ASK + [
            {"role": "assistant", "tool_calls": [call]}, {"role": "tool", "content": "1"}]}, "tool_call_id"),
        "a tool message answering no call": ({**chat, "messages": ASK + [
            {"role": "tool", "tool_call_id": "call_9", "content": "1"}]}, "call_9"),
        "arguments that are not a JSON object": ({**chat, "messages": ASK + [{"role": "assistant", "tool_calls": [
            {**call, "function": {"name": "f", "arguments": "[1]"}}]}]}, "arguments"),
        "a user message without content": ({**chat, "messages": [{"role": "user"}]}, "content"),
        "a required call of a schema the grammar cannot use": ({**chat, "tool_choice": "required", "tools": [
            {"type": "function", "function": {"name": "f", "parameters": {
                "type": "object", "properties": {"a": {"type": "sting"}}}}}]}, "sting"),
    }
    for name, (body, said) in cases.items():
        response = httpx.post(server.url + "/chat/completions", json=body, timeout=60)
        assert response.status_code == 400, (name, response.text)
        assert said in response.json()["error"]["message"], (name, response.json())
    with pytest.raises(openai.BadRequestError, match="nope"):
        ask(client, tool_choice=named("nope"))
    assert ask(client, tool_choice="required")[2] == "tool_calls"  # and it goes on serving
