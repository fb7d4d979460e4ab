"""Tool calls in the model's own format (llama/tool_calls.py), against llama-models:

- prompts: the tool prompts of llama-models' prompt-format documents (Llama 3.1's JSON custom
  tools, Llama 3.2's pythonic calls), read from the installed package and encoded by its own
  ChatFormat, equal ours token for token; a history of calls and results equals what its encoder
  writes for the same RawMessages (ToolCall, StopReason, the `tool` role as `ipython`);
- parsing: our reading of model replies equals llama-models' (decode_assistant_message_from_content,
  parse_python_list_for_function_calls);
- grammars: under each format's call grammar, random draws always spell calls that parse, of the
  allowed tools, whose arguments validate; and the arguments read while a call is written are
  always a prefix of its final arguments (what streaming sends).
"""

import importlib.resources
import json
import re

import jsonschema
import pytest
import torch

from llama.chat_format import ChatFormat
from llama.constraints import Constraint, GrammarError, Vocabulary, masked_logits
from llama.tokenizer import Tokenizer
from llama.tool_calls import Call, GenericTools, JsonTools, PythonicTools, Tool, tool_format

from .test_chat_template import folder_saved_by_transformers


@pytest.fixture(scope="module")
def tokenizer(llama3_tokenizer_path):
    return Tokenizer(llama3_tokenizer_path)


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory):
    """One token per byte (and ChatML's specials): a grammar's draws under it take every path
    through the grammar's text, and its masks are cheap (Llama 3's are checked through the server)."""
    return Tokenizer(folder_saved_by_transformers(tmp_path_factory.mktemp("bytes")) / "tokenizer.json")


@pytest.fixture(scope="module")
def meta():
    """llama-models' ChatFormat over Meta's tokenizer."""
    from llama_models.llama3.chat_format import ChatFormat as MetaChatFormat
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    return MetaChatFormat(MetaTokenizer.get_instance())


def documented_prompt(document: str, heading: str) -> str:
    """The first input prompt under `heading` in one of llama-models' prompt-format documents."""
    text = (importlib.resources.files("llama_models") / document).read_text(encoding="utf-8")
    section = text[text.index(heading):]
    block = section[section.index("##### Input Prompt Format\n```\n") + len("##### Input Prompt Format\n```\n"):]
    return block[:block.index("\n```")]


_TURN = re.compile(r"<\|start_header_id\|>(\w+)<\|end_header_id\|>\n\n(.*?)(<\|eot_id\|>|<\|eom_id\|>)", re.S)


def meta_encoding(meta, prompt: str):
    """A documented prompt as llama-models' encoder writes it: its turns as RawMessages."""
    from llama_models.datatypes import RawMessage

    assert prompt.startswith("<|begin_of_text|>") and prompt.endswith(
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    turns = [RawMessage(role="tool" if role == "ipython" else role, content=content)
             for role, content, _ in _TURN.findall(prompt)]
    encoded = meta.encode_dialog_prompt(turns).tokens
    assert meta.tokenizer.decode(encoded) == prompt  # the turns are the whole document
    return encoded


def tool_from(functions_json: str) -> Tool:
    definition = json.loads(functions_json)
    definition = definition.get("function", definition)
    return Tool(definition["name"], definition)


def test_llama31_json_tools_prompt_equals_llama_models(tokenizer, meta):
    prompt = documented_prompt("llama3_1/prompt_format.md", "## JSON based tool calling")
    functions = prompt[prompt.index("in JSON format:\n") + len("in JSON format:\n"):prompt.index("\n\nReturn function")]
    dialog = [{"role": "system", "content": "You are a helpful assistant."},
              {"role": "user", "content": "Use tools to get latest trending songs"}]
    ours = JsonTools(ChatFormat(tokenizer)).prompt(dialog, [tool_from(functions)], "auto", "21 September 2024")
    assert ours == meta_encoding(meta, prompt)


def test_llama32_pythonic_prompt_equals_llama_models(tokenizer, meta):
    prompt = documented_prompt("llama3_2/text_prompt_format.md", "## Zero shot function calling\n")
    functions = json.loads(prompt[prompt.index("you can invoke.\n\n") + len("you can invoke.\n\n"):
                                  prompt.index("<|eot_id|>")])
    dialog = [{"role": "user", "content": "What is the weather in SF and Seattle?"}]
    tools = [tool_from(json.dumps(f)) for f in functions]
    ours = PythonicTools(ChatFormat(tokenizer)).prompt(dialog, tools, "auto", "unused")
    assert ours == meta_encoding(meta, prompt)


@pytest.mark.parametrize("form", ["json", "pythonic"])
def test_a_history_of_calls_and_results_equals_llama_models_encoder(tokenizer, meta, form):
    """Calls in an assistant turn (ended by <|eom_id|> in the JSON form, where the model ends a
    call so, <|eot_id|> in the pythonic one) and results in `ipython` turns, after the tool prompt."""
    from llama_models.datatypes import RawMessage, StopReason, ToolCall, ToolPromptFormat

    arguments = {"city": "Paris", "days": 3, "metric": True, "note": None, "tags": ["a", "b"]}
    dialog = [{"role": "user", "content": "What is the weather in Paris?"},
              {"role": "assistant", "content": "", "tool_calls": [Call("get_weather", json.dumps(arguments))]},
              {"role": "tool", "content": '{"temperature": 21}'},
              {"role": "assistant", "content": "It is 21 degrees."},
              {"role": "user", "content": "And tomorrow?"}]
    if form == "pythonic":
        del arguments["note"], arguments["tags"]  # llama-models writes neither as Python
        dialog[1]["tool_calls"] = [Call("get_weather", json.dumps(arguments))]
    tools = tool_format(ChatFormat(tokenizer), form)
    ours = tools.prompt(dialog, [], "auto", "unused")
    stop = StopReason.end_of_message if form == "json" else StopReason.end_of_turn
    reference = [RawMessage(role="user", content=dialog[0]["content"]),
                 RawMessage(role="assistant", content="", stop_reason=stop,
                            tool_calls=[ToolCall(call_id="1", tool_name="get_weather", arguments=arguments)]),
                 RawMessage(role="tool", content=dialog[2]["content"]),
                 RawMessage(role="assistant", content=dialog[3]["content"], stop_reason=StopReason.end_of_turn),
                 RawMessage(role="user", content=dialog[4]["content"])]
    prompt_format = ToolPromptFormat.json if form == "json" else ToolPromptFormat.python_list
    assert ours == meta.encode_dialog_prompt(reference, prompt_format).tokens


JSON_REPLIES = [
    '{"type": "function", "name": "trending_songs", "parameters": {"n": "10", "genre": "all"}}',
    '<|python_tag|>{"type": "function", "name": "trending_songs", "parameters": {"n": 10}}',
    '<|python_tag|>{\n    "type": "function",\n    "name": "trending_songs",\n    "parameters": {\n'
    '        "n": "10",\n        "genre": "all"\n    }\n}',
    '{"name": "get_weather", "parameters": {"city": "Paris", "tags": ["a", "b"], "days": 3}}',
    '<function=trending_songs>{"n": 10}</function>',
    '[get_weather(city="Paris", metric="celsius")]',
    '[get_weather(city="Paris", days=3, exact=True)]',
    "The weather in Paris is nice.",
    '{"a": 1}',
    '{"type": "object"}',
]


def test_parsing_json_replies_equals_llama_models(tokenizer, meta):
    from llama_models.datatypes import StopReason

    tools = JsonTools(ChatFormat(tokenizer))
    for reply in JSON_REPLIES:
        message = meta.decode_assistant_message_from_content(reply, StopReason.end_of_turn)
        expected = [(c.tool_name, c.arguments) for c in message.tool_calls]
        parsed = tools.parse(reply)
        assert [(c.name, json.loads(c.arguments)) for c in (parsed[1] if parsed else [])] == expected, reply
        if parsed:
            assert parsed[0] == "" == message.content, reply


PYTHONIC_REPLIES = [
    '[get_weather(city="San Francisco", metric="celsius"), get_weather(city="Seattle", metric="celsius")]',
    "[get_user_info(user_id=7890, special='black')]",
    '[f(a=1.5, b=None, c=[1, 2], d={"k": "v"}, e=False)]',
    "[f()]",
    "[]",
    '[f("positional")]',
    "f(a=1)",
    "[f(a=1), 42]",
    "[f(a=g(1))]",
    "[f(a=1)",
    "Sorry, no function fits.",
]


def test_parsing_pythonic_replies_equals_llama_models(tokenizer):
    from llama_models.llama3.tool_utils import is_valid_python_list, parse_python_list_for_function_calls

    tools = PythonicTools(ChatFormat(tokenizer))
    for reply in PYTHONIC_REPLIES:
        parsed = tools.parse(reply)
        ours = [(c.name, json.loads(c.arguments)) for c in parsed[1]] if parsed else None
        valid = is_valid_python_list(reply)
        try:
            expected = parse_python_list_for_function_calls(reply) if valid else None
        except ValueError:  # a call whose argument is not a plain value
            expected = None
        assert ours == expected, reply


def test_generic_form_round_trips_and_keeps_text_around_calls(tmp_path):
    tokenizer = Tokenizer(folder_saved_by_transformers(tmp_path) / "tokenizer.json")  # ChatML, a default system
    tools = tool_format(ChatFormat(tokenizer))
    assert isinstance(tools, GenericTools)
    weather = Tool("get_weather", {"name": "get_weather", "parameters": {"type": "object"}})
    calls = [Call("get_weather", '{"city": "Paris"}'), Call("get_weather", '{"city":"Rome"}')]
    dialog = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "", "tool_calls": calls},
              {"role": "tool", "content": "21"}, {"role": "tool", "content": "25"}]
    text = tokenizer.decode(tools.prompt(dialog, [weather], "required", "unused"))
    assert text.startswith("<|im_start|>system\nYou are a helpful bot.\n\n# Tools\n")
    assert '"name": "get_weather"' in text
    assert "You MUST use one of the provided functions/tools" in text
    written = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n' \
              '<tool_call>\n{"name": "get_weather", "arguments": {"city":"Rome"}}\n</tool_call>'
    assert f"<|im_start|>assistant\n{written}<|im_end|>" in text
    assert "<|im_start|>user\n<tool_response>\n21\n</tool_response>\n<tool_response>\n25\n</tool_response>" \
           "<|im_end|>\n<|im_start|>assistant\n" in text
    content, parsed = tools.parse(f"Let me look.\n{written}")
    assert content == "Let me look." and [(c.name, c.arguments) for c in parsed] == [(c.name, c.arguments)
                                                                                    for c in calls]
    assert tools.parse("no call here") is None
    assert tools.parse('<tool_call>\n{"name": "f"}\n</tool_call>') is None  # no arguments: not a call


def test_formats_by_chat_layout(tokenizer, sp_tokenizer_path):
    llama3 = ChatFormat(tokenizer)
    assert isinstance(tool_format(llama3), JsonTools) and isinstance(tool_format(llama3, "pythonic"), PythonicTools)
    assert tool_format(ChatFormat(Tokenizer(sp_tokenizer_path))) is None  # Llama 2: none
    with pytest.raises(ValueError, match="generic tool format needs .*ChatMLFormat"):
        tool_format(llama3, "generic")
    with pytest.raises(ValueError, match="tool_format must be one of"):
        tool_format(llama3, "xml")


WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                            "metric": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "metric"], "additionalProperties": False}
COUNT = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                          "exact": {"type": "boolean"}}, "required": ["n", "exact"],
         "additionalProperties": False}
TOOLS = [Tool("get_weather", {"name": "get_weather", "parameters": WEATHER}),
         Tool("count", {"name": "count", "parameters": COUNT})]


def draw_reply(constraint, vocabulary, tokenizer, generator, limit=500):
    """A reply drawn at random among the tokens the grammar allows: its text at each step that ends on a whole
    character (as the server streams it), the whole reply last."""
    tokens, texts = [], []
    while len(tokens) < limit:
        logits = masked_logits(torch.randn(1, vocabulary.vocab_size, generator=generator), [0],
                               [constraint.mask()])[0]
        token = int(torch.multinomial(torch.softmax(logits, -1), 1))
        if token in tokenizer.stop_tokens:
            break
        assert constraint.advance(token)
        tokens.append(token)
        try:  # the text as streamed: whole characters only
            texts.append(tokenizer.decode_bytes(tokens).decode("utf-8"))
        except UnicodeDecodeError:
            pass
    return texts


@pytest.mark.parametrize("form", ["json", "pythonic", "generic"])
def test_calls_drawn_under_the_grammar_parse_and_validate(tokenizer, byte_tokenizer, form):
    """Random draws (the worst a model can do): every reply parses into calls of the allowed
    tools whose arguments validate; one call unless parallel; for the forms that stream
    arguments, what is read mid-call is always a prefix of the final arguments."""
    formats = {"json": JsonTools, "pythonic": PythonicTools, "generic": GenericTools}
    tools = formats[form](ChatFormat(tokenizer))
    vocabulary = Vocabulary(byte_tokenizer, byte_tokenizer.n_words)
    generator = torch.Generator().manual_seed(0)
    schemas = {t.name: t.parameters for t in TOOLS}
    several = 0
    for allowed, parallel in [(TOOLS, False), (TOOLS, True), (TOOLS[1:], True)] * 5:
        texts = draw_reply(Constraint(tools.grammar(allowed, parallel), vocabulary), vocabulary, byte_tokenizer,
                           generator)
        content, calls = tools.parse(texts[-1])
        assert content == "" and calls, texts[-1]
        assert len(calls) == 1 or parallel and tools.parallel
        several += len(calls) > 1
        for call in calls:
            assert call.name in [t.name for t in allowed]
            jsonschema.validate(json.loads(call.arguments), schemas[call.name])
        for text in texts:
            so_far = tools.calls_so_far(text)
            if so_far is None:  # pythonic: read whole
                continue
            assert len(so_far) <= len(calls)
            for (name, arguments), call in zip(so_far, calls):
                assert name == call.name and call.arguments.startswith(arguments), (text, call)
    assert (several > 0) == tools.parallel  # the formats that hold several calls do write them


def test_pythonic_grammar_refuses_arguments_it_cannot_check(tokenizer):
    nested = Tool("f", {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "array"}}}})
    with pytest.raises(GrammarError, match="parameter 'x'"):
        PythonicTools(ChatFormat(tokenizer)).grammar([nested], False)
    JsonTools(ChatFormat(tokenizer)).grammar([nested], False)  # the JSON form holds any schema


def reading(plan, pieces):
    """What the server sends for a reply arriving in `pieces`: (content, tool-call deltas, the
    reply's content and calls once whole)."""
    from llama.serve.tools import ToolCallReply

    reply, content, deltas = ToolCallReply(plan), "", []
    for piece in pieces:
        text, new = reply.feed(piece)
        content, deltas = content + text, deltas + new
    text, new = reply.end()
    return content + text, deltas + new, reply.content, reply.calls


def test_a_reply_is_read_into_openai_calls_as_it_streams(tokenizer):
    """auto: text streams at once; a reply that begins as a call is held, then answered as calls
    (or as the text it was); required: each call's id, type and name first, then fragments of its
    arguments as they are written, joining to the whole arguments."""
    from llama.serve.tools import ToolPlan

    tools = JsonTools(ChatFormat(tokenizer))
    auto, required = ToolPlan(tools, TOOLS, "auto", True), ToolPlan(tools, TOOLS, "required", True)
    content, deltas, whole, calls = reading(auto, ["It is ", "sunny."])
    assert (content, deltas, whole, calls) == ("It is sunny.", [], "It is sunny.", [])
    call = '<|python_tag|>{"type": "function", "name": "count", "parameters": {"n": 3, "exact": true}}'
    content, deltas, whole, calls = reading(auto, [call[:20], call[20:50], call[50:]])
    assert content == "" and whole is None
    assert [c["function"] for c in calls] == [{"name": "count", "arguments": '{"n": 3, "exact": true}'}]
    assert deltas == [{"index": 0, "id": calls[0]["id"], "type": "function",
                       "function": {"name": "count", "arguments": ""}},
                      {"index": 0, "function": {"arguments": '{"n": 3, "exact": true}'}}]
    assert reading(auto, ["{not a call", "}"])[:3] == ("{not a call}", [], "{not a call}")
    written = '{"type":"function","name":"get_weather","parameters":{"city":"Rome","metric":"celsius"}}'
    content, deltas, whole, calls = reading(required, list(written))  # one character at a time
    assert content == "" and whole is None
    assert deltas[0]["function"] == {"name": "get_weather", "arguments": ""} and len(deltas) > 10
    assert "".join(d["function"]["arguments"] for d in deltas) == calls[0]["function"]["arguments"] == \
        '{"city":"Rome","metric":"celsius"}'
    # cut short by max_tokens: the call as far as it was written
    _, deltas, _, calls = reading(required, [written[:written.index("Rome") + 2]])
    assert calls[0]["function"] == {"name": "get_weather", "arguments": '{"city":"Ro'}
