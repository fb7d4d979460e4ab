"""The HTTP routes of the OpenAI-compatible server: request checking, prompts (text, token ids,
or chat messages in the model's own chat format), and responses, whole or streamed as
server-sent events, in OpenAI's format.

GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions."""

import json
import time
import uuid
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

from aiohttp import web

from ..chat_format import ChatFormat
from ..constraints import Grammar
from ..requests import Finish, SamplingParams
from ..outputs import Delta, RequestOutput
from ..tokenizer import Tokenizer
from ..tool_calls import ToolFormat
from .cors import Cors
from .formats import compile_response_format
from .metrics import Metrics
from .page import add_page
from .scheduler import Job, Scheduler
from .schemas import ApiError, ChatCompletionRequest, CompletionRequest, parse_body
from .tools import ToolCallReply, ToolPlan, chat_dialog, tool_plan, uses_tools

MAX_BODY_BYTES = 8 * 1024 * 1024  # a larger request body is refused with 413


@dataclass
class Service:
    """What the routes need: the runner's tokenizer and chat format, and the scheduler."""
    scheduler: Scheduler
    tokenizer: Tokenizer
    formatter: ChatFormat
    model_name: str
    max_seq_len: int
    vocab_size: int
    utf8_errors: str = "replace"  # streaming.invalid_utf8_errors(tokenizer)
    api_key: Optional[str] = None
    created: int = 0  # when the model was loaded (the "created" of GET /v1/models)
    fingerprint: str = ""  # OpenAI's system_fingerprint: which model and settings answered
    cors: Cors = Cors(())
    metrics: Optional[Metrics] = None
    open_responses: int = 0  # requests whose answer is not fully sent yet
    tool_format: Optional[ToolFormat] = None  # how this model writes tool calls (None: it cannot)


def make_app(service: Service) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_errors(service)])
    service.cors.install(app)
    routes = _Routes(service)
    app.router.add_get("/health", routes.health)
    app.router.add_get("/v1/models", routes.models)
    app.router.add_get("/metrics", routes.metrics)
    app.router.add_post("/v1/completions", routes.completions)
    app.router.add_post("/v1/chat/completions", routes.chat_completions)
    add_page(app)  # GET /: the chat page (llama/serve/page.py)
    return app


def error_response(error: ApiError) -> web.Response:
    return web.json_response(error.body(), status=error.status)


def _errors(service: Service):
    """Answers CORS preflights, checks the API key, and answers every error with an OpenAI error body."""

    @web.middleware
    async def middleware(request: web.Request, handler):
        preflight = service.cors.preflight(request)
        if preflight is not None:
            return preflight
        response = await _answer_errors(request, handler)
        if service.metrics is not None:
            endpoint = request.path if request.match_info.route.resource is not None else "other"
            service.metrics.requests.labels(endpoint, str(response.status)).inc()
        return response

    async def _answer_errors(request: web.Request, handler):
        try:
            if service.api_key is not None and request.path.startswith("/v1/"):
                if request.headers.get("Authorization", "") != f"Bearer {service.api_key}":
                    raise ApiError(401, "invalid or missing API key: send the header 'Authorization: Bearer KEY' "
                                        "with the key the server was started with", code="invalid_api_key")
            return await handler(request)
        except ApiError as e:
            return error_response(e)
        except web.HTTPRequestEntityTooLarge:
            return error_response(ApiError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes",
                                           code="request_too_large"))
        except web.HTTPException as e:  # no such route, wrong method
            if e.status < 400:
                raise
            return error_response(ApiError(e.status, f"{request.method} {request.path}: {e.reason}"))

    return middleware


class _Routes:
    def __init__(self, service: Service):
        self.s = service

    async def health(self, request: web.Request) -> web.Response:
        # The server listens only once the model is loaded; it answers 503 once it stops or fails.
        if not self.s.scheduler.available:
            return error_response(ApiError(503, "the server is stopping", code="unavailable"))
        return web.json_response({"status": "ok"})

    async def metrics(self, request: web.Request) -> web.Response:
        if self.s.metrics is None:
            raise ApiError(404, "metrics are off on this server")
        body, content_type = self.s.metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.s.model_name, "object": "model", "created": self.s.created, "owned_by": "llama"}]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = parse_body(await request.read(), CompletionRequest)
        self._check_model(body.model)
        prompt = self._completion_prompt(body.prompt)
        want_logprobs = body.logprobs is not None
        params = self._params(body, prompt, body.max_tokens, want_logprobs, body.logprobs or 0, body.echo,
                              await compile_response_format(body.response_format))
        echo = None  # the prompt as sent (token ids: their text), which then opens the reply
        if body.echo:
            sent = _only_prompt(body.prompt)
            echo = sent if isinstance(sent, str) else self.s.tokenizer.decode(prompt)
        job = self.s.scheduler.submit(prompt, params)
        reply = _CompletionReply(self.s, body, job, want_logprobs, echo)
        return await _answer(request, job, reply, body.stream)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = parse_body(await request.read(), ChatCompletionRequest)
        self._check_model(body.model)
        prompt, plan = self._chat_prompt(body)
        max_tokens = body.max_completion_tokens or body.max_tokens
        constraint = await plan.compile() if plan is not None and plan.constrained else \
            await compile_response_format(body.response_format)
        params = self._params(body, prompt, max_tokens, body.logprobs, body.top_logprobs or 0, False, constraint)
        job = self.s.scheduler.submit(prompt, params)
        reply = _ChatReply(self.s, body, job, body.logprobs, plan)
        return await _answer(request, job, reply, body.stream)

    def _check_model(self, name: Optional[str]) -> None:
        if name is not None and name != self.s.model_name:
            raise ApiError(404, f"the model {name!r} does not exist here; this server serves {self.s.model_name!r}",
                           param="model", code="model_not_found")

    def _completion_prompt(self, prompt) -> List[int]:
        prompt = _only_prompt(prompt)
        if isinstance(prompt, str):
            return self.s.tokenizer.encode(prompt, bos=True, eos=False)
        if not prompt or min(prompt) < 0 or max(prompt) >= self.s.vocab_size:
            raise ApiError(400, f"prompt token ids must lie in [0, {self.s.vocab_size})", param="prompt")
        return list(prompt)

    def _chat_prompt(self, body: ChatCompletionRequest) -> Tuple[List[int], Optional[ToolPlan]]:
        """The prompt, and what the request asks of tools (None when it has none and no tool history)."""
        dialog = chat_dialog(body)
        if uses_tools(body, dialog):
            plan = tool_plan(body, self.s.tool_format)
            return plan.prompt(dialog), plan
        refusal = self.s.formatter.refusal(dialog)
        if refusal is not None:
            raise ApiError(400, refusal, param="messages")
        try:
            return self.s.formatter.encode_dialog_prompt(dialog), None
        except ValueError as e:  # e.g. Llama 2's strict order of roles
            raise ApiError(400, str(e), param="messages") from None

    def _params(self, body, prompt: List[int], max_tokens: Optional[int], logprobs: bool, top_logprobs: int,
                echo: bool, constraint: Optional[Grammar]) -> SamplingParams:
        room = self.s.max_seq_len - len(prompt)
        if room < 1 or (max_tokens is not None and max_tokens > room):
            asked = f" and max_tokens asks for {max_tokens} more" if max_tokens is not None else ""
            raise ApiError(400, f"this model's context is {self.s.max_seq_len} tokens: the prompt is {len(prompt)} "
                                f"tokens{asked}; shorten the prompt or lower max_tokens",
                           param="max_tokens" if room >= 1 else "prompt", code="context_length_exceeded")
        return SamplingParams(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, seed=body.seed,
                              max_new_tokens=max_tokens or room, logprobs=logprobs, top_logprobs=top_logprobs,
                              prompt_logprobs=echo and logprobs, stop_tokens=tuple(self.s.tokenizer.stop_tokens),
                              constraint=constraint)


def _only_prompt(prompt):
    """The one prompt of a completion request (OpenAI's batch form may hold one here)."""
    if isinstance(prompt, list) and len(prompt) == 1 and not isinstance(prompt[0], int):
        return prompt[0]
    return prompt


async def _answer(request: web.Request, job: Job, reply: "_Reply", stream: bool) -> web.StreamResponse:
    """Waits for the job's events and answers with one JSON body, or streams them as server-sent
    events. If the client goes away first (aiohttp then cancels this handler), the job's slot is freed."""
    service = reply.service
    service.open_responses += 1
    try:
        if not stream:
            while True:
                update = await reply.next()
                if isinstance(update, ApiError):
                    return error_response(update)
                reply.add(update)
                if update.finish_reason is not None:
                    return web.json_response(reply.whole())
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        for chunk in reply.opening():
            await _send_event(response, chunk)
        while True:
            update = await reply.next()
            if isinstance(update, ApiError):  # OpenAI's clients raise an APIError on an "error" event
                await _send_event(response, update.body())
                break
            reply.add(update)
            for chunk in reply.chunks(update):
                await _send_event(response, chunk)
            if update.finish_reason is not None:
                await response.write(b"data: [DONE]\n\n")
                break
        await response.write_eof()
        return response
    finally:
        service.open_responses -= 1
        if not job.ended:
            service.scheduler.release(job)


async def _send_event(response: web.StreamResponse, data: dict) -> None:
    await response.write(f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode())


class _Reply:
    """Turns a job's events into its output (llama/outputs.py) and shapes that as one OpenAI
    response or as its stream of chunks."""
    object_name = ""

    _echo: Optional[str] = None  # text that opens the reply (a completion's echoed prompt) and is not yet sent

    def __init__(self, service: Service, body, job: Job, want_logprobs: bool):
        self.service, self.body, self.job, self.want_logprobs = service, body, job, want_logprobs
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.output = RequestOutput(service.tokenizer, job.request.prompt, stop=body.stop_strings(),
                                    errors=service.utf8_errors)
        self.text: List[str] = []
        self.finish_reason: Optional[str] = None
        self.arrived = time.monotonic()
        self.first_token: Optional[float] = None

    async def next(self) -> Union[Delta, ApiError]:
        """What the next iteration added (its finish_reason in OpenAI's words), or the error that
        ended the request. A stop string ends it here, so its slot is released at once."""
        events = await self.job.events.get()
        if isinstance(events, ApiError):
            return events
        for event in events:
            self.output.add(event)
        if self.output.finished:
            self.service.scheduler.release(self.job)
        if self.output.error is not None:  # the response format's grammar allowed no token
            return ApiError(500, f"constrained decoding failed: {self.output.error}", code="constraint_failed")
        delta = self.output.take()
        if delta.tokens and self.first_token is None:
            self.first_token = time.monotonic()
        if delta.finish_reason is not None:
            delta.finish_reason = "length" if delta.finish_reason == Finish.LENGTH else "stop"
            if self.service.metrics is not None:
                self.service.metrics.finished(len(self.output.prompt), len(self.output.tokens), self.arrived,
                                              self.first_token or time.monotonic(), time.monotonic())
        return delta

    def add(self, update: Delta) -> None:
        self.text.append(update.text)
        self.finish_reason = update.finish_reason or self.finish_reason

    def usage(self) -> dict:
        prompt, completion = len(self.job.request.prompt), len(self.output.tokens)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.service.model_name,
                "system_fingerprint": self.service.fingerprint}

    def opening(self) -> List[dict]:
        return []

    def chunks(self, update: Delta) -> List[dict]:
        chunks = self._update_chunks(update)
        options = self.body.stream_options
        if update.finish_reason is not None and options is not None and options.include_usage:
            chunks.append({**self._head(self.chunk_object), "choices": [], "usage": self.usage()})
        return chunks

    def _update_chunks(self, update: Delta) -> List[dict]:
        """The chunks of one update, before the usage chunk that may follow the last."""
        if update.text or update.finish_reason is not None or update.tokens and self.want_logprobs or self._echo:
            return [{**self._head(self.chunk_object), "choices": [self._chunk_choice(update)]}]
        return []


class _CompletionReply(_Reply):
    id_prefix, chunk_object = "cmpl", "text_completion"

    def __init__(self, service: Service, body, job: Job, want_logprobs: bool, echo: Optional[str]):
        super().__init__(service, body, job, want_logprobs)
        self._echo = echo

    def whole(self) -> dict:
        choice = {"index": 0, "text": (self._echo or "") + "".join(self.text), "finish_reason": self.finish_reason,
                  "logprobs": self._logprobs(self.output.tokens, self.output.logprobs, self.output.top_logprobs,
                                             self.body.echo) if self.want_logprobs else None}
        return {**self._head("text_completion"), "choices": [choice], "usage": self.usage()}

    def _chunk_choice(self, update: Delta) -> dict:
        echo, self._echo = self._echo, None  # the first chunk opens with the echoed prompt and its logprobs
        logprobs = (self._logprobs(update.tokens, update.logprobs, update.top_logprobs, echo is not None)
                    if self.want_logprobs else None)
        return {"index": 0, "text": (echo or "") + update.text, "finish_reason": update.finish_reason,
                "logprobs": logprobs}

    def _logprobs(self, tokens, logprobs, top_logprobs, with_prompt: bool) -> dict:
        """OpenAI's completions logprobs: parallel lists, top_logprobs as {token text: logprob}."""
        texts = self.output.token_texts(tokens)
        chosen: List[Optional[float]] = list(logprobs)
        tops: List[Optional[dict]] = [self._by_text(top) for top in top_logprobs]
        if with_prompt:
            prompt = self.output.prompt
            prompt_logprobs = list(self.output.prompt_logprobs or [0.0] * len(prompt))
            texts = self.output.token_texts(prompt) + texts
            chosen = [None] + prompt_logprobs[1:] + chosen  # the first prompt token has no logprob
            # The first prompt token has no rivals: nothing came before it.
            prompt_tops = self.output.prompt_top_logprobs or [None] * len(prompt)
            tops = [None if top is None else self._by_text(top) for top in prompt_tops] + tops
        offsets, at = [], 0
        for text in texts:
            offsets.append(at)
            at += len(text)
        return {"tokens": texts, "token_logprobs": chosen, "top_logprobs": tops if self.body.logprobs else None,
                "text_offset": offsets}

    def _by_text(self, top: List[Tuple[int, float]]) -> dict:
        """(token, logprob) pairs as OpenAI's completions show them: {token text: logprob}."""
        return dict(zip(self.output.token_texts([t for t, _ in top]), (lp for _, lp in top)))


class _ChatReply(_Reply):
    id_prefix, chunk_object = "chatcmpl", "chat.completion.chunk"

    def __init__(self, service: Service, body, job: Job, want_logprobs: bool, plan: Optional[ToolPlan] = None):
        super().__init__(service, body, job, want_logprobs)
        # Reads the reply for tool calls when tools are offered (llama/serve/tools.py).
        self.tools = ToolCallReply(plan) if plan is not None and plan.tools else None

    def whole(self) -> dict:
        message = {"role": "assistant", "content": "".join(self.text)}
        finish_reason = self.finish_reason
        if self.tools is not None:
            self.tools.feed(message["content"])
            self.tools.end()
            message["content"] = self.tools.content
            if self.tools.calls:
                message["tool_calls"] = self.tools.calls
                finish_reason = _with_calls(finish_reason)
        choice = {"index": 0, "message": message, "finish_reason": finish_reason,
                  "logprobs": self._logprobs(self.output.tokens, self.output.logprobs, self.output.top_logprobs)
                  if self.want_logprobs else None}
        return {**self._head("chat.completion"), "choices": [choice], "usage": self.usage()}

    def _update_chunks(self, update: Delta) -> List[dict]:
        if self.tools is None:
            return super()._update_chunks(update)
        content, calls = self.tools.feed(update.text)
        if update.finish_reason is not None:
            more, more_calls = self.tools.end()
            content, calls = content + more, calls + more_calls
        # OpenAI's shape: each tool-call delta in a chunk of its own, the finish_reason in the last.
        deltas = ([{"content": content}] if content else []) + [{"tool_calls": [call]} for call in calls]
        finish_reason = update.finish_reason
        if finish_reason is not None:
            deltas.append({})
            if self.tools.calls:
                finish_reason = _with_calls(finish_reason)
        elif not deltas and update.tokens and self.want_logprobs:
            deltas.append({})
        logprobs = (self._logprobs(update.tokens, update.logprobs, update.top_logprobs)
                    if self.want_logprobs and update.tokens else None)
        chunks = []
        for i, delta in enumerate(deltas):
            last = i == len(deltas) - 1
            choice = {"index": 0, "delta": delta, "logprobs": logprobs if i == 0 else None,
                      "finish_reason": finish_reason if last else None}
            chunks.append({**self._head(self.chunk_object), "choices": [choice]})
        return chunks

    def opening(self) -> List[dict]:
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        return [{**self._head(self.chunk_object), "choices": [choice]}]

    def _chunk_choice(self, update: Delta) -> dict:
        delta = {"content": update.text} if update.text else {}
        logprobs = (self._logprobs(update.tokens, update.logprobs, update.top_logprobs)
                    if self.want_logprobs else None)
        return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": update.finish_reason}

    def _logprobs(self, tokens, logprobs, top_logprobs) -> dict:
        """OpenAI's chat logprobs: one entry per token, with its bytes and its most likely rivals."""
        def entry(token: int, logprob: float) -> dict:
            data = self.service.tokenizer.decode_bytes([token])
            return {"token": data.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(data)}

        tops = top_logprobs or [[] for _ in tokens]
        return {"content": [{**entry(t, lp), "top_logprobs": [entry(tt, tlp) for tt, tlp in top]}
                            for t, lp, top in zip(tokens, logprobs, tops)], "refusal": None}


def _with_calls(finish_reason: Optional[str]) -> Optional[str]:
    """OpenAI's finish_reason for a reply that ends in tool calls ("length" stays: they are cut short)."""
    return "tool_calls" if finish_reason == "stop" else finish_reason
