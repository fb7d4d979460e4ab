"""The OpenAI request bodies the server accepts, checked field by field, and its error bodies.

Unknown fields are refused (as OpenAI does), so a misspelt parameter never passes silently. Fields
of OpenAI's API that this server cannot honour are accepted only at their no-op value (n=1, no
penalties 0...) and refused with a clear 400 otherwise.
"""

import json
from typing import Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ApiError(Exception):
    """An error answered with an OpenAI error body:
    {"error": {"message", "type", "param", "code"}} and an HTTP status."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 kind: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    # strict: no quiet conversions ("0.5" is not a number, true is not 1); forbid: no unknown fields.
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class JsonSchemaFormat(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")  # as OpenAI requires
    description: Optional[str] = None
    # "schema" would shadow pydantic's BaseModel.schema, hence the alias.
    json_schema: Union[Dict[str, object], bool] = Field(True, alias="schema")  # absent: any JSON value
    strict: Optional[bool] = None  # the schema is always enforced (see the README)


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None


class _Sampling(_Strict):
    """What completions and chat completions share."""
    model: Optional[str] = None  # absent: the model this server serves (as llama.cpp and vLLM do)
    temperature: float = Field(1.0, ge=0)  # OpenAI's defaults: temperature 1, top_p 1
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=0)  # an extra of this server: 0 or None keeps every token
    stop: Union[None, str, List[str]] = None
    seed: Optional[int] = Field(None, ge=-2 ** 63, lt=2 ** 64)  # what torch.Generator.manual_seed takes
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None  # accepted and ignored
    # Accepted only at the value that changes nothing (see _refuse_unsupported).
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[Dict[str, float]] = None
    response_format: Optional[ResponseFormat] = None  # constrained decoding (llama/serve/formats.py)

    def stop_strings(self) -> List[str]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(s == "" for s in stop):
            raise ApiError(400, "stop strings must not be empty", param="stop")
        return stop


class CompletionRequest(_Sampling):
    # Text, token ids, or a list holding one of those (OpenAI's batch form, one prompt per request here).
    prompt: Union[str, List[int], List[str], List[List[int]]]
    max_tokens: Optional[int] = Field(16, ge=1)  # OpenAI's default for completions is 16
    logprobs: Optional[int] = Field(None, ge=0, le=20)  # how many most likely tokens to list at each step
    echo: bool = False
    best_of: Optional[int] = None
    suffix: Optional[str] = None


class FunctionCall(_Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallItem(_Strict):
    id: str
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(_Strict):
    role: str
    # None only where OpenAI allows it: an assistant message that makes tool calls
    content: Union[None, str, List[Dict[str, object]]] = None
    name: Optional[str] = None
    tool_calls: Optional[List[ToolCallItem]] = None  # an assistant message's calls
    tool_call_id: Optional[str] = None  # a tool message: the call it answers


class FunctionDefinition(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")  # as OpenAI requires
    description: Optional[str] = None
    parameters: Optional[Dict[str, object]] = None  # a JSON schema; absent: no arguments
    strict: Optional[bool] = None  # the schema is enforced whenever a call is required (see the README)


class ToolDefinition(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_Sampling):
    messages: List[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)  # default: whatever the context leaves
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    tools: Optional[List[ToolDefinition]] = None
    tool_choice: Union[None, Literal["none", "auto", "required"], NamedToolChoice] = None
    parallel_tool_calls: Optional[bool] = None  # default: true, as at OpenAI


def parse_body(raw: bytes, schema: type) -> BaseModel:
    """The request body as `schema`, or an ApiError (400) saying what is wrong with it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the request body is not valid UTF-8 (byte {e.start}); send JSON encoded as UTF-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}")
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        request = schema.model_validate(data)
    except ValidationError as e:
        error = e.errors()[0]
        param = ".".join(str(part) for part in error["loc"][:1]) or None
        where = ".".join(str(part) for part in error["loc"])
        if error["type"] == "extra_forbidden":
            raise ApiError(400, f"unrecognized request argument: {where}", param=param)
        raise ApiError(400, f"invalid value for {where}: {error['msg']} (got {error.get('input')!r:.80})",
                       param=param) from None
    _refuse_unsupported(request)
    return request


def _refuse_unsupported(r: _Sampling) -> None:
    def refuse(param: str, what: str) -> None:
        raise ApiError(400, f"{param}: {what} is not supported by this server", param=param)

    if r.stream_options is not None and not r.stream:
        raise ApiError(400, "stream_options is only allowed with stream=true", param="stream_options")
    if r.n != 1:
        refuse("n", "more than one choice per request (n > 1); send separate requests")
    if r.presence_penalty or r.frequency_penalty:
        refuse("presence_penalty" if r.presence_penalty else "frequency_penalty", "a penalty other than 0")
    if r.logit_bias:
        refuse("logit_bias", "logit_bias")
    form = r.response_format
    if form is not None and (form.type == "json_schema") != (form.json_schema is not None):
        raise ApiError(400, "response_format.json_schema is required with type 'json_schema', and only with it",
                       param="response_format")
    if isinstance(r, CompletionRequest):
        if r.best_of not in (None, 1):
            refuse("best_of", "best_of > 1")
        if r.suffix:
            refuse("suffix", "suffix (insertion)")
        if isinstance(r.prompt, list) and r.prompt and not isinstance(r.prompt[0], int) and len(r.prompt) != 1:
            refuse("prompt", "more than one prompt per request")
        if r.prompt in ("", [], [""], [[]]):
            raise ApiError(400, "the prompt is empty", param="prompt")
    if isinstance(r, ChatCompletionRequest):
        if r.top_logprobs and not r.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs=true", param="top_logprobs")


def message_text(message: ChatMessage, index: int) -> str:
    """A chat message's content as text: a string, or a list of text parts (images are refused);
    None (an assistant's tool calls without text) is empty."""
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    texts = []
    for part in message.content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ApiError(400, f"messages.{index}.content: only text parts are supported "
                                f"(got a {part.get('type')!r} part)", param="messages")
        texts.append(part["text"])
    return "".join(texts)
