"""Tool calls through OpenAI's chat API: a request's `tools`, `tool_choice`, `parallel_tool_calls`
and tool history checked and turned into the model's own format (llama/tool_calls.py), and the
reply turned back into OpenAI's `tool_calls`, whole or streamed as OpenAI streams them: for each
call a first delta with its index, id, type and name (arguments ""), then its argument fragments.

tool_choice "auto" (the default with tools): the reply is free; one that begins as a call is held
back until it ends, then answered as calls if it parses, else as text. "required" or a named
function: the reply is decoded under the grammar of a call (llama/constraints.py), so it always
parses and its arguments validate against the function's schema; its arguments stream as they
are written where the format allows. "none": no tools are offered; the reply is text."""

import asyncio
import json
import uuid
from dataclasses import dataclass
from typing import List, Optional, Tuple

from ..constraints import Grammar, GrammarError
from ..tool_calls import Call, Choice, Tool, ToolFormat, today
from .schemas import ApiError, ChatCompletionRequest, message_text

ROLES = ("system", "user", "assistant", "tool")


def chat_dialog(body: ChatCompletionRequest) -> List[dict]:
    """The request's messages as a dialog: role, content, and an assistant's "tool_calls" (Call
    list, their ids under "call_ids"); every tool message must answer a call made before it."""
    dialog, call_ids = [], set()
    for i, message in enumerate(body.messages):
        role = "system" if message.role == "developer" else message.role
        if role not in ROLES:
            raise ApiError(400, f"messages.{i}.role: {message.role!r} is not supported; use system, developer, "
                                f"user, assistant or tool", param="messages")
        if message.content is None and not (role == "assistant" and message.tool_calls):
            raise ApiError(400, f"messages.{i}.content is missing; only an assistant message with tool_calls "
                                f"may leave it out", param="messages")
        if message.tool_calls and role != "assistant":
            raise ApiError(400, f"messages.{i}: only assistant messages carry tool_calls", param="messages")
        if (message.tool_call_id is not None) != (role == "tool"):
            raise ApiError(400, f"messages.{i}: a tool message needs the tool_call_id of the call it answers, and "
                                f"only a tool message has one", param="messages")
        entry = {"role": role, "content": message_text(message, i)}
        if message.tool_calls:
            entry["tool_calls"] = [_history_call(call, i) for call in message.tool_calls]
            call_ids.update(call.id for call in message.tool_calls)
        if role == "tool" and message.tool_call_id not in call_ids:
            raise ApiError(400, f"messages.{i}.tool_call_id {message.tool_call_id!r} answers no tool call of an "
                                f"earlier assistant message", param="messages")
        dialog.append(entry)
    return dialog


def _history_call(call, index: int) -> Call:
    try:
        arguments = json.loads(call.function.arguments)
    except ValueError:
        arguments = None
    if not isinstance(arguments, dict):
        raise ApiError(400, f"messages.{index}.tool_calls: the arguments of {call.function.name!r} must be the "
                            f"JSON text of an object, got {call.function.arguments!r:.80}", param="messages")
    return Call(call.function.name, call.function.arguments)


def uses_tools(body: ChatCompletionRequest, dialog: List[dict]) -> bool:
    """Whether the request offers tools, asks for a call, or has calls or results in its history."""
    return bool(body.tools) or body.tool_choice not in (None, "none") or \
        any(m.get("tool_calls") or m["role"] == "tool" for m in dialog)


@dataclass
class ToolPlan:
    """What a request asks of tools: the format, the tools offered (none for tool_choice "none"),
    the choice ("auto", "required" or a tool's name) and whether one reply may hold several calls."""
    format: ToolFormat
    tools: List[Tool]
    choice: Choice
    parallel: bool

    @property
    def constrained(self) -> bool:
        return bool(self.tools) and self.choice != "auto"

    def prompt(self, dialog: List[dict]) -> List[int]:
        return self.format.prompt(dialog, self.tools, self.choice, today())

    def grammar(self) -> Optional[Grammar]:
        """The grammar of the call a "required" or named choice asks for; None for "auto"."""
        if not self.constrained:
            return None
        tools = self.tools if self.choice == "required" else [t for t in self.tools if t.name == self.choice]
        try:
            return self.format.grammar(tools, self.parallel and self.format.parallel)
        except ImportError as e:  # llguidance is missing (it comes with the serve extra)
            raise ApiError(501, f"tool_choice: {e}", param="tool_choice") from None
        except GrammarError as e:
            raise ApiError(400, f"tools: the parameters of {', '.join(t.name for t in tools)} cannot be used for "
                                f"constrained decoding: {e}", param="tools", code="invalid_schema") from None

    async def compile(self) -> Optional[Grammar]:
        """grammar() on a worker thread, as response_format's schemas are compiled."""
        if not self.constrained:
            return None
        return await asyncio.get_running_loop().run_in_executor(None, self.grammar)


def tool_plan(body: ChatCompletionRequest, tool_format: Optional[ToolFormat]) -> ToolPlan:
    """The request's tool settings, checked (400 for what cannot be honoured)."""
    if tool_format is None:
        raise ApiError(400, "tools: this model's chat format (Llama 2) has no way to write tool calls; "
                            "send the dialog without tools", param="tools")
    tools = [Tool(t.function.name, t.function.model_dump(exclude_none=True, exclude={"strict"}))
             for t in body.tools or []]
    names = [t.name for t in tools]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ApiError(400, f"tools: the function {duplicated[0]!r} is defined more than once", param="tools")
    choice = body.tool_choice if body.tool_choice is not None else ("auto" if tools else "none")
    if not isinstance(choice, str):
        choice = choice.function.name
        if choice not in names:
            raise ApiError(400, f"tool_choice names the function {choice!r}, which is not in tools "
                                f"({', '.join(names) or 'none given'})", param="tool_choice")
    elif choice in ("auto", "required") and not tools:
        raise ApiError(400, f"tool_choice {choice!r} needs tools: send the functions the model may call",
                       param="tool_choice")
    form = body.response_format
    if choice != "none" and form is not None and form.type != "text":
        raise ApiError(400, "response_format and tools cannot be used together: a reply is either a tool call or "
                            "text in the response format; send one of them, or tool_choice 'none'",
                       param="response_format")
    parallel = True if body.parallel_tool_calls is None else body.parallel_tool_calls
    return ToolPlan(tool_format, tools if choice != "none" else [], choice, parallel)


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCallReply:
    """One reply's text read as the model writes it: feed() each settled piece, end() once the
    reply ended; each returns (content text, tool-call deltas) to send. The reply is whole once
    ended: `content` and `calls` (OpenAI's message fields)."""

    def __init__(self, plan: ToolPlan):
        self.plan, self.format = plan, plan.format
        self.text = ""
        # "calls" (a required call: every piece is part of one), "text" (plain text), or None
        # while an "auto" reply may still turn out to be a call.
        self.mode: Optional[str] = "calls" if plan.constrained else None if plan.tools else "text"
        self._held = 0  # text[_held:] is not sent yet (while undecided, or calls read whole)
        self._sent: List[Tuple[str, str, str]] = []  # per call: id, name, arguments sent
        self.content: Optional[str] = None
        self.calls: List[dict] = []

    def feed(self, piece: str) -> Tuple[str, List[dict]]:
        self.text += piece
        if self.mode is None and not self.format.could_be_call(self.text):
            self.mode = "text"
        if self.mode == "text":
            return self._release(), []
        if self.mode == "calls":
            so_far = self.format.calls_so_far(self.text)
            if so_far is not None:
                return "", self._deltas(so_far)
        return "", []

    def end(self) -> Tuple[str, List[dict]]:
        parsed = self.format.parse(self.text) if self.mode != "text" else None
        if parsed is None and self.mode == "calls":  # a required call cut short (max_tokens): what there is
            so_far = self.format.calls_so_far(self.text) or []
            parsed = ("", [Call(name, arguments) for name, arguments in so_far]) if so_far else None
        if parsed is None:
            self.content = self.text
            return self._release(), []
        content, calls = parsed
        deltas = self._deltas([(c.name, c.arguments) for c in calls])
        self.calls = [{"id": i, "type": "function", "function": {"name": name, "arguments": arguments}}
                      for i, name, arguments in self._sent]
        self.content = content or None
        return content, deltas

    def _release(self) -> str:
        piece, self._held = self.text[self._held:], len(self.text)
        return piece

    def _deltas(self, calls: List[Tuple[str, str]]) -> List[dict]:
        """The deltas that bring the calls sent so far up to `calls`: OpenAI's streamed shape."""
        deltas = []
        for index, (name, arguments) in enumerate(calls):
            if index == len(self._sent):
                self._sent.append((_call_id(), name, ""))
                deltas.append({"index": index, "id": self._sent[index][0], "type": "function",
                               "function": {"name": name, "arguments": ""}})
            call_id, _, sent = self._sent[index]
            if len(arguments) > len(sent) and arguments.startswith(sent):
                deltas.append({"index": index, "function": {"arguments": arguments[len(sent):]}})
                self._sent[index] = (call_id, name, arguments)
        return deltas
