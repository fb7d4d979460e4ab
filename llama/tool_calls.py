"""Tool calls in a model's own format: the tool definitions and the call/result history written
into the prompt, a reply parsed back into calls, and the grammar that makes a reply a valid call.

Three formats, picked by the chat layout (or the server's --tool_format):
- "json", Llama 3.1 / 3.3's JSON custom tools, as llama-models writes them: a system turn
  opening with "Environment: ipython", the functions in a user turn before the dialog, a call
  `{"type": "function", "name": ..., "parameters": {...}}` ending with <|eom_id|>, and a tool's
  result in an `ipython` turn. The model may open a call with <|python_tag|>. One call per reply.
- "pythonic", Llama 3.2's zero-shot calls: the functions in the system turn, a reply
  `[f(a=1), g(b="x")]` holding one call or several.
- "generic", for ChatML models (their chat templates are not run here): the functions in the
  system turn inside <tools></tools>, each call `<tool_call>\n{"name": ..., "arguments": {...}}\n
  </tool_call>`, each result a user turn `<tool_response>\n...\n</tool_response>` (the layout of
  Hermes and Qwen 2.5 models).

A call's arguments stay the JSON text the model wrote (OpenAI's `arguments` is a string), so the
fragments streamed while it is written join to exactly the final arguments.
"""

import ast
import datetime
import json
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from .chat_format import ChatFormat, ChatMLFormat, Llama3ChatFormat
from .constraints import Grammar, GrammarError

PYTHON_TAG = "<|python_tag|>"
FORMATS = ("json", "pythonic", "generic")
NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True)
class Tool:
    """A function the model may call: OpenAI's `function` object as sent (it is written into
    the prompt as such), its name, and the JSON schema of its arguments."""
    name: str
    definition: dict = field(hash=False)

    @property
    def parameters(self) -> dict:
        return self.definition.get("parameters", NO_ARGUMENTS)


@dataclass
class Call:
    name: str
    arguments: str  # the JSON text of the arguments object


# What a tool_choice asks of a reply: "auto" (a call or text), "required" (one call or more of
# any tool) or a tool's name (a call of that tool). "none" sends no tools at all.
Choice = str


def today() -> str:
    """Today's date as llama-models' system prompts write it ("21 September 2024"), in any locale."""
    day = datetime.date.today()
    return f"{day.day:02d} {_MONTHS[day.month - 1]} {day.year}"


_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")


class ToolFormat:
    """One model family's way of writing tools and calls."""
    name = ""
    markers: Tuple[str, ...] = ()  # how a reply that is a call begins
    parallel = True  # whether one reply may hold several calls

    def __init__(self, formatter: ChatFormat):
        self.formatter = formatter
        self.tokenizer = formatter.tokenizer

    def prompt(self, dialog: Sequence[dict], tools: Sequence[Tool], choice: Choice, date: str) -> List[int]:
        """Prompt ids of a dialog whose messages may hold "tool_calls" (a list of Call, on an
        assistant message) or be a "tool" message (a result); tools empty: none are offered."""
        raise NotImplementedError

    def parse(self, text: str) -> Optional[Tuple[str, List[Call]]]:
        """(content, calls) when the reply makes calls, else None (the reply is text)."""
        raise NotImplementedError

    def grammar(self, tools: Sequence[Tool], parallel: bool) -> Grammar:
        """What a reply must match to be calls of `tools` whose arguments validate (one call
        unless `parallel`). Raises GrammarError for a schema the grammar cannot hold."""
        raise NotImplementedError

    def calls_so_far(self, text: str) -> Optional[List[Tuple[str, str]]]:
        """For a reply still being written under grammar(): (name, arguments so far) of each call
        whose name is complete, the arguments a prefix of the final ones; None when this format
        can only be read whole."""
        return None

    def could_be_call(self, text: str) -> bool:
        """Whether a reply beginning with `text` may turn out to be a call (so is held back)."""
        head = text.lstrip()
        return any(head.startswith(m) or m.startswith(head) for m in self.markers)


def tool_format(formatter: ChatFormat, name: str = "auto") -> Optional[ToolFormat]:
    """The tool format for a chat layout: "auto" picks json for Llama 3 and generic for ChatML;
    None where the layout has none (Llama 2). Raises ValueError for a format the layout cannot hold."""
    layouts = {"json": Llama3ChatFormat, "pythonic": Llama3ChatFormat, "generic": ChatMLFormat}
    if name == "auto":
        name = "json" if isinstance(formatter, Llama3ChatFormat) else \
            "generic" if isinstance(formatter, ChatMLFormat) else None
        if name is None:
            return None
    if name not in layouts:
        raise ValueError(f"tool_format must be one of auto, {', '.join(FORMATS)}; got {name!r}")
    if not isinstance(formatter, layouts[name]):
        raise ValueError(f"the {name} tool format needs a model with the {layouts[name].__name__} chat layout; "
                         f"this model's is {type(formatter).__name__}: use --tool_format auto")
    return {"json": JsonTools, "pythonic": PythonicTools, "generic": GenericTools}[name](formatter)


def choice_instruction(choice: Choice) -> Optional[str]:
    """What the system turn adds when a call is required (as llama-stack adds it)."""
    if choice == "auto":
        return None
    if choice == "required":
        return "You MUST use one of the provided functions/tools to answer the user query."
    return f"You MUST use the tool `{choice}` to answer the user query."


# --- JSON text: spans of an object's members, the unfinished prefix of a value ---

_DECODER = json.JSONDecoder()
_SPACE = re.compile(r"\s*")


def object_members(text: str, at: int = 0) -> Optional[Tuple[dict, Dict[str, Tuple[int, int]], int]]:
    """The JSON object starting at text[at]: (value, {key: (start, end) of its value's text}, end),
    or None if no whole object starts there."""
    try:
        value, end = _DECODER.raw_decode(text, at)
    except ValueError:
        return None
    if not isinstance(value, dict):
        return None
    spans, i = {}, _SPACE.match(text, at + 1).end()
    while text[i] != "}":  # the object parsed: every member is well formed
        key, i = _DECODER.raw_decode(text, i)
        i = _SPACE.match(text, _SPACE.match(text, i).end() + 1).end()  # past the ':'
        _, j = _DECODER.raw_decode(text, i)
        spans[key] = (i, j)
        i = _SPACE.match(text, j).end()
        if text[i] == ",":
            i = _SPACE.match(text, i + 1).end()
    return value, spans, end


def value_prefix(text: str) -> str:
    """The part of `text` that belongs to the JSON object or array it begins with: all of it
    while that is still open, up to its closing bracket once closed."""
    depth, quoted, escaped = 0, False, False
    for i, c in enumerate(text):
        if quoted:
            escaped, quoted = (False, True) if escaped else (c == "\\", c != '"')
        elif c == '"':
            quoted = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return text[:i + 1]
    return text


def _quoted(s: str) -> Optional[str]:
    try:
        return json.loads(f'"{s}"')
    except ValueError:
        return None


def compact_json(value) -> str:
    """JSON indented by 4 as llama-models' prompt templates write it: lists of plain values on one line."""
    def write(v, indent: str) -> str:
        inner = indent + "    "
        if isinstance(v, dict) and v:
            items = [f"{inner}{json.dumps(k)}: {write(x, inner)}" for k, x in v.items()]
            return "{\n" + ",\n".join(items) + f"\n{indent}}}"
        if isinstance(v, list) and v and any(isinstance(x, (dict, list)) for x in v):
            return "[\n" + ",\n".join(inner + write(x, inner) for x in v) + f"\n{indent}]"
        return json.dumps(v, ensure_ascii=False) if not isinstance(v, list) else \
            "[" + ", ".join(json.dumps(x, ensure_ascii=False) for x in v) + "]"
    return write(value, "")


def _json_schema(schema: dict) -> dict:
    """A schema as an inline %json of a grammar: compact (no whitespace between tokens), as response_format's."""
    return {**schema, "x-guidance": {"whitespace_flexible": False}} if isinstance(schema, dict) else schema


# --- Llama 3.1 / 3.3: JSON custom tools ---

_JSON_TOOLS_PROMPT = ("Answer the user's question by making use of the following functions if needed.\n"
                      "If none of the function can be used, please say so.\n"
                      "Here is a list of functions in JSON format:\n{functions}\n\n"
                      "Return function calls in JSON format.")
_FUNCTION_TAG = re.compile(r"<function=([^>]+)>")
_JSON_CALL_HEAD = re.compile(r'\{"type":"function","name":"((?:[^"\\]|\\.)*)","parameters":')


class _Llama3Tools(ToolFormat):
    """What Llama 3's two formats share: turns written without stripping (as llama-models writes
    them), a tool's result in an `ipython` turn, a call's turn ended by `end_token`."""
    end_token = "<|eot_id|>"

    def _turn(self, role: str, text: str, end: str = "<|eot_id|>") -> List[int]:
        f = self.formatter
        return (f.encode_header({"role": role, "content": ""}) + self.tokenizer.encode(text, bos=False, eos=False)
                + [self.tokenizer.token_id(end)])

    def _history(self, dialog: Sequence[dict]) -> List[int]:
        ids: List[int] = []
        for message in dialog:
            if message.get("tool_calls"):
                ids += self._turn("assistant", message["content"] + self.write_calls(message["tool_calls"]),
                                  self.end_token)
            elif message["role"] == "tool":
                ids += self._turn("ipython", message["content"])
            else:
                ids += self.formatter.encode_message(message)
        return ids

    def write_calls(self, calls: Sequence[Call]) -> str:
        raise NotImplementedError


class JsonTools(_Llama3Tools):
    name = "json"
    markers = (PYTHON_TAG, "{", "<function=", "[")
    parallel = False
    end_token = "<|eom_id|>"  # "Environment: ipython": a call ends its message, the result follows

    def prompt(self, dialog, tools, choice, date):
        ids = [self.formatter.begin_of_text]
        messages = list(dialog)
        system = messages.pop(0)["content"] if messages and messages[0]["role"] == "system" else None
        if tools:
            text = f"Environment: ipython\n\nCutting Knowledge Date: December 2023\nToday Date: {date}\n"
            for extra in (system, choice_instruction(choice)):
                if extra:
                    text += f"\n{extra}\n"
            functions = "\n".join(compact_json({"type": "function", "function": t.definition}) for t in tools)
            ids += self._turn("system", text) + self._turn("user", _JSON_TOOLS_PROMPT.format(functions=functions))
        elif system is not None:
            ids += self.formatter.encode_message({"role": "system", "content": system})
        return ids + self._history(messages) + self.formatter.encode_header({"role": "assistant", "content": ""})

    def write_calls(self, calls):
        return "".join(json.dumps({"type": "function", "name": c.name, "parameters": json.loads(c.arguments)})
                       for c in calls)

    def parse(self, text):
        body = _without_tag(text)
        tag = _FUNCTION_TAG.match(body)
        if tag is not None:  # <function=name>{...}</function>, which llama-models reads too
            found = object_members(body, tag.end())
            return None if found is None else ("", [Call(tag.group(1), body[tag.end():found[2]])])
        found = object_members(body)
        if found is not None and _SPACE.match(body, found[2]).end() == len(body):
            value, spans, _ = found
            if isinstance(value.get("name"), str) and isinstance(value.get("parameters"), dict):
                start, end = spans["parameters"]
                return "", [Call(value["name"], body[start:end])]
            return None
        calls = _python_calls(body)  # llama-models reads a pythonic list here too
        return None if calls is None else ("", calls)

    def grammar(self, tools, parallel):
        calls = [{"type": "object", "properties": {"type": {"const": "function"}, "name": {"const": t.name},
                                                   "parameters": t.parameters},
                  "required": ["type", "name", "parameters"], "additionalProperties": False} for t in tools]
        return Grammar.json_schema(calls[0] if len(calls) == 1 else {"anyOf": calls}, "tool call")

    def calls_so_far(self, text):
        body = _without_tag(text)
        head = _JSON_CALL_HEAD.match(body)
        if head is None:
            return []
        name = _quoted(head.group(1))
        return [] if name is None else [(name, value_prefix(body[head.end():]))]


def _without_tag(text: str) -> str:
    body = text.strip()
    return body[len(PYTHON_TAG):].lstrip() if body.startswith(PYTHON_TAG) else body


# --- Llama 3.2: pythonic calls ---

_PYTHONIC_PROMPT = (
    "You are an expert in composing functions. You are given a question and a set of possible functions.\n"
    "Based on the question, you will need to make one or more function/tool calls to achieve the purpose.\n"
    "If none of the function can be used, point it out. If the given question lacks the parameters required by "
    "the function,\nalso point it out. You should only return the function call in tools call sections.\n\n"
    "If you decide to invoke any of the function(s), you MUST put it in the format of [func_name1(params_name1="
    "params_value1, params_name2=params_value2...), func_name2(params)]\n"
    "You SHOULD NOT include any other text in the response.\n\n"
    "Here is a list of functions in JSON format that you can invoke.\n\n{functions}")


def _python_calls(text: str) -> Optional[List[Call]]:
    """The calls of a reply `[f(a=1), g(b="x")]` (keyword arguments of plain values only), else None."""
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except (SyntaxError, ValueError):
        return None
    if not isinstance(tree, ast.List) or not tree.elts:
        return None
    calls = []
    for node in tree.elts:
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
            return None
        if any(k.arg is None for k in node.keywords):  # f(**x)
            return None
        try:
            arguments = json.dumps({k.arg: ast.literal_eval(k.value) for k in node.keywords}, ensure_ascii=False)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):  # not plain JSON values
            return None
        calls.append(Call(node.func.id, arguments))
    return calls


def python_value(value) -> str:
    """A JSON value as a Python literal (strings double-quoted, as llama-models writes them)."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(map(python_value, value)) + "]"
    if isinstance(value, dict):
        items = (f"{json.dumps(k, ensure_ascii=False)}: {python_value(v)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    return repr(value)  # True, False, None, numbers


class PythonicTools(_Llama3Tools):
    name = "pythonic"
    markers = (PYTHON_TAG, "[")

    def prompt(self, dialog, tools, choice, date):
        ids = [self.formatter.begin_of_text]
        messages = list(dialog)
        system = messages.pop(0)["content"] if messages and messages[0]["role"] == "system" else None
        if tools:
            text = _PYTHONIC_PROMPT.format(functions=json.dumps([t.definition for t in tools], indent=4))
            for extra in (system, choice_instruction(choice)):
                if extra:
                    text += f"\n\n{extra}"
            ids += self._turn("system", text)
        elif system is not None:
            ids += self.formatter.encode_message({"role": "system", "content": system})
        return ids + self._history(messages) + self.formatter.encode_header({"role": "assistant", "content": ""})

    def write_calls(self, calls):
        written = (f"{c.name}({', '.join(f'{k}={python_value(v)}' for k, v in json.loads(c.arguments).items())})"
                   for c in calls)
        return "[" + ", ".join(written) + "]"

    def parse(self, text):
        calls = _python_calls(_without_tag(text))
        return None if calls is None else ("", calls)

    def grammar(self, tools, parallel):
        """Every argument written, in the order of the schema's properties; each a Python literal
        under its schema. Only plain values can be checked: a parameter that is an object, an
        array or a combination of schemas is refused."""
        rules, calls = [], []
        for i, tool in enumerate(tools):
            properties = tool.parameters.get("properties", {})
            parts = [json.dumps(f"{tool.name}(")]
            for j, (name, schema) in enumerate(properties.items()):
                rules.append(f"arg_{i}_{j}: {_python_literal_rule(tool.name, name, schema)}")
                parts += [json.dumps(("" if j == 0 else ", ") + f"{name}="), f"arg_{i}_{j}"]
            rules.append(f"call_{i}: {' '.join(parts)} \")\"")
            calls.append(f"call_{i}")
        more = ' (", " call)*' if parallel else ""
        lark = "\n".join([f'start: "[" call{more} "]"', f"call: {' | '.join(calls)}", *rules])
        return Grammar.lark(lark, "tool call")


def _python_literal_rule(tool: str, name: str, schema) -> str:
    """The grammar of one argument's Python literal: strings and numbers as JSON writes them
    (the same text in Python), True/False/None, or one of an enum's values."""
    if not isinstance(schema, dict):
        schema = {}
    if "enum" in schema or "const" in schema:
        values = schema.get("enum", [schema.get("const")])
        return " | ".join(json.dumps(python_value(v)) for v in values)
    kinds = schema.get("type")
    kinds = kinds if isinstance(kinds, list) else [kinds]
    plain = {k: v for k, v in schema.items() if k not in ("type", "description", "title", "default")}
    alternatives = []
    for kind in kinds:
        if kind == "boolean":
            alternatives.append('"True" | "False"')
        elif kind == "null":
            alternatives.append('"None"')
        elif kind in ("string", "integer", "number"):
            alternatives.append("%json " + json.dumps(_json_schema({**plain, "type": kind})))
        else:
            raise GrammarError(f"the pythonic tool format constrains only arguments of type string, number, "
                               f"integer, boolean, null or enum; {tool}'s parameter {name!r} is "
                               f"{json.dumps(schema)[:80]} (use --tool_format json, or tool_choice auto)")
    return " | ".join(alternatives)


# --- ChatML: the generic JSON form ---

_GENERIC_PROMPT = (
    "# Tools\n\nYou may call one or more functions to answer the user's query.\n\n"
    "The functions you may call are given within <tools></tools> XML tags:\n<tools>\n{functions}\n</tools>\n\n"
    "For each function call, write a JSON object with the function's name and its arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}}\n</tool_call>")
_CALL_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)
_GENERIC_CALL_HEAD = re.compile(r'\s*\{"name":"((?:[^"\\]|\\.)*)","arguments":')


class GenericTools(ToolFormat):
    name = "generic"
    markers = ("<tool_call>",)

    def prompt(self, dialog, tools, choice, date):
        messages, rendered = list(dialog), []
        if tools:
            functions = "\n".join(json.dumps({"type": "function", "function": t.definition}, ensure_ascii=False)
                                  for t in tools)
            section = _GENERIC_PROMPT.format(functions=functions)
            instruction = choice_instruction(choice)
            if instruction:
                section += f"\n\n{instruction}"
            has_system = messages[0]["role"] == "system"
            system = messages.pop(0)["content"] if has_system else self.formatter.default_system
            rendered.append({"role": "system", "content": f"{system}\n\n{section}" if system else section})
        for message in messages:
            if message.get("tool_calls"):
                calls = "\n".join(self.write_calls(message["tool_calls"]))
                content = f"{message['content']}\n{calls}" if message["content"] else calls
                rendered.append({"role": "assistant", "content": content})
            elif message["role"] == "tool":
                result = f"<tool_response>\n{message['content']}\n</tool_response>"
                if rendered and rendered[-1].get("results"):  # consecutive results share one user turn
                    rendered[-1]["content"] += "\n" + result
                else:
                    rendered.append({"role": "user", "content": result, "results": True})
            else:
                rendered.append(message)
        return self.formatter.encode_dialog_prompt([{"role": m["role"], "content": m["content"]} for m in rendered])

    @staticmethod
    def write_calls(calls: Sequence[Call]) -> List[str]:
        return [f'<tool_call>\n{{"name": {json.dumps(c.name, ensure_ascii=False)}, "arguments": {c.arguments}}}'
                f'\n</tool_call>' for c in calls]

    def parse(self, text):
        calls = []
        for block in _CALL_BLOCK.finditer(text):
            inner = block.group(1)
            start = _SPACE.match(inner).end()
            found = object_members(inner, start)
            if found is None or inner[found[2]:].strip():
                return None
            value, spans, _ = found
            if not isinstance(value.get("name"), str) or not isinstance(value.get("arguments"), dict):
                return None
            begin, end = spans["arguments"]
            calls.append(Call(value["name"], inner[begin:end]))
        if not calls:
            return None
        return _CALL_BLOCK.sub("", text).strip(), calls

    def grammar(self, tools, parallel):
        calls = [{"type": "object", "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                  "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
        schema = _json_schema(calls[0] if len(calls) == 1 else {"anyOf": calls})
        more = ' ("\\n" call)*' if parallel else ""
        lark = "\n".join([f"start: call{more}", 'call: "<tool_call>\\n" body "\\n</tool_call>"',
                          f"body: %json {json.dumps(schema)}"])
        return Grammar.lark(lark, "tool call")

    def calls_so_far(self, text):
        found = []
        for piece in text.split("<tool_call>")[1:]:
            head = _GENERIC_CALL_HEAD.match(piece)
            if head is None:
                break
            name = _quoted(head.group(1))
            if name is None:
                break
            found.append((name, value_prefix(piece[head.end():])))
        return found
