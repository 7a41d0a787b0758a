"""The OpenAI API over the continuous-batching engine (FastAPI on uvicorn).

``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (streamed as server-sent events ending
with ``data: [DONE]``, or whole), ``GET /health``, ``GET /metrics`` (Prometheus). Errors have OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``: 400 for a bad parameter, malformed JSON or a prompt and
completion longer than the context (code ``context_length_exceeded``), 404 for an unknown model or path, 503 with
``Retry-After`` when the queue is full or the server is shutting down. Parameters this server does not implement
(``logprobs``, ``tools``, ...) are refused with a 400 naming them rather than ignored, as are unknown ones.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from hvdtrain.serving.engine import Engine, Full, Params, Sequence

ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self):
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


@dataclass
class Served:
    """What the API serves: the engine, the model's name, window, tokenizer and chat template."""

    engine: Engine
    name: str
    context: int
    vocab: int
    tokenizer: object
    chat: object
    metrics: object
    max_n: int = 16
    created: int = field(default_factory=lambda: int(time.time()))


# ---------------------------------------------------------------------------------------------------------------
# Request fields

SAMPLING = {"max_tokens", "temperature", "top_p", "top_k", "n", "seed", "stop", "stream", "stream_options",
            "presence_penalty", "frequency_penalty", "logit_bias", "user", "ignore_eos"}
COMPLETION_FIELDS = SAMPLING | {"model", "prompt", "echo", "logprobs", "suffix", "best_of"}
CHAT_FIELDS = SAMPLING | {"model", "messages", "max_completion_tokens", "logprobs", "top_logprobs", "tools",
                          "tool_choice", "functions", "function_call", "response_format", "parallel_tool_calls"}
# accepted when absent, null or at their default value; anything else is not implemented here
NOT_IMPLEMENTED = {"logprobs": (False, 0), "top_logprobs": (0,), "suffix": ("",), "tools": ([],),
                   "tool_choice": ("none",), "functions": ([],), "function_call": ("none",),
                   "parallel_tool_calls": (False, True), "response_format": ({"type": "text"},)}


class Fields:
    """A request body's fields, each checked with a one-line 400 naming it."""

    def __init__(self, body: dict, known: set[str]):
        self.body = body
        for name in body:
            if name not in known:
                raise ApiError(400, f"unrecognized request argument supplied: {name}", name)
        for name, allowed in NOT_IMPLEMENTED.items():
            value = body.get(name)
            if name in known and value is not None and value not in allowed:
                raise ApiError(400, f"'{name}' is not supported by this server", name)

    def integer(self, name: str, default, lo: int | None = None, hi: int | None = None):
        value = self.body.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise ApiError(400, f"'{name}' must be an integer, got {json.dumps(value)}", name)
        return self._range(name, value, lo, hi)

    def number(self, name: str, default: float, lo: float, hi: float) -> float:
        value = self.body.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ApiError(400, f"'{name}' must be a number, got {json.dumps(value)}", name)
        return float(self._range(name, value, lo, hi))

    def boolean(self, name: str, default: bool = False) -> bool:
        value = self.body.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ApiError(400, f"'{name}' must be true or false, got {json.dumps(value)}", name)
        return value

    @staticmethod
    def _range(name, value, lo, hi):
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            bounds = f"at least {lo}" if hi is None else f"at most {hi}" if lo is None else f"in [{lo}, {hi}]"
            raise ApiError(400, f"'{name}' must be {bounds}, got {value}", name)
        return value


def sampling(f: Fields, served: Served) -> tuple[dict, int, bool, bool]:
    """``(Params fields but max_tokens, n, stream, include_usage)`` from a request."""
    stop = f.body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 16:
        stop = tuple(stop)
    else:
        raise ApiError(400, "'stop' must be a string or a list of at most 16 strings", "stop")
    bias = f.body.get("logit_bias") or {}
    if not isinstance(bias, dict):
        raise ApiError(400, "'logit_bias' must map token ids to numbers in [-100, 100]", "logit_bias")
    biases = []
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise ApiError(400, f"'logit_bias' has the key {json.dumps(key)}, not a token id", "logit_bias") from None
        if not 0 <= token < served.vocab or isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not -100 <= value <= 100:
            raise ApiError(400, f"'logit_bias' maps {key} to {json.dumps(value)}: token ids are 0..{served.vocab - 1}"
                           ", values in [-100, 100]", "logit_bias")
        biases.append((token, float(value)))
    top_k = f.integer("top_k", 0, lo=-1)
    stream = f.boolean("stream")
    options = f.body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise ApiError(400, "'stream_options' is {\"include_usage\": true|false}, with stream true",
                       "stream_options")
    user = f.body.get("user")
    if user is not None and not isinstance(user, str):
        raise ApiError(400, "'user' must be a string", "user")
    params = dict(temperature=f.number("temperature", 1.0, 0.0, 2.0), top_p=f.number("top_p", 1.0, 1e-9, 1.0),
                  top_k=max(0, top_k), seed=f.integer("seed", None), stop=stop,
                  presence_penalty=f.number("presence_penalty", 0.0, -2.0, 2.0),
                  frequency_penalty=f.number("frequency_penalty", 0.0, -2.0, 2.0), logit_bias=tuple(biases),
                  ignore_eos=f.boolean("ignore_eos"))
    n = f.integer("n", 1, 1, served.max_n)
    return params, n, stream, bool((options or {}).get("include_usage"))


def prompts_of(value, served: Served) -> list[list[int]]:
    """A completion request's ``prompt``: a string, strings, token ids, or lists of token ids."""
    tok = served.tokenizer

    def encoded(text: str) -> list[int]:
        return tok.encode(text, special=True) or tok.encode("\n")  # as hvdtrain generate encodes a prompt

    def ids(row) -> list[int]:
        if not row or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < served.vocab
                              for t in row):
            raise ApiError(400, f"'prompt' token ids must be 0..{served.vocab - 1}, in a non-empty list", "prompt")
        return list(row)

    if isinstance(value, str):
        return [encoded(value)]
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return [encoded(v) for v in value]
        if all(isinstance(v, list) for v in value):
            return [ids(v) for v in value]
        if all(isinstance(v, int) for v in value):
            return [ids(value)]
    raise ApiError(400, "'prompt' must be a string, a list of strings, a list of token ids or a list of lists "
                   "of token ids", "prompt")


def max_tokens_for(served: Served, prompt: list[int], requested: int | None) -> int:
    """The completion's length: ``requested``, or the rest of the context; a 400 when they do not fit."""
    room = served.context - len(prompt)
    wanted = room if requested is None else requested
    if room < 1 or wanted > room:
        raise ApiError(400, f"This model's maximum context length is {served.context} tokens. However, you "
                       f"requested {len(prompt) + max(wanted, 1)} tokens ({len(prompt)} in the prompt, "
                       f"{max(wanted, 1)} for the completion). Please reduce the prompt or the completion length.",
                       "messages" if requested is None else "max_tokens", "context_length_exceeded")
    return wanted


def messages_of(value) -> list[dict]:
    """Chat ``messages``: each a role and a content (a string, or text parts)."""
    if not isinstance(value, list) or not value:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content}", "messages")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a 'role' and a 'content'", f"messages[{i}]")
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ApiError(400, f"messages[{i}].content: only text parts are supported by this server",
                                   f"messages[{i}].content")
                parts.append(part["text"])
            content = "".join(parts)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts",
                           f"messages[{i}].content")
        out.append({**message, "content": content})
    return out


# ---------------------------------------------------------------------------------------------------------------
# The app


def create_app(served: Served) -> FastAPI:
    app = FastAPI(title="hvdtrain", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return exc.response()

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return ApiError(exc.status_code, message, kind=kind).response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        return ApiError(400, f"invalid request: {exc.errors()}").response()

    @app.exception_handler(Exception)
    async def internal(request, exc: Exception):
        return ApiError(500, f"internal error: {exc}", kind="server_error").response()

    app.add_middleware(Counting, metrics=served.metrics)

    async def body_of(request: Request) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise ApiError(400, f"could not parse the JSON body of the request: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body of the request must be a JSON object")
        return body

    def check_model(f: Fields) -> None:
        model = f.body.get("model")
        if not isinstance(model, str):
            raise ApiError(400, "'model' is required: the name GET /v1/models lists", "model")
        if model != served.name:
            raise ApiError(404, f"The model '{model}' does not exist; this server serves '{served.name}'", "model",
                           "model_not_found", kind="not_found_error")

    def model_card() -> dict:
        return {"id": served.name, "object": "model", "created": served.created, "owned_by": "hvdtrain",
                "max_model_len": served.context}

    @app.get("/health")
    async def health():
        if not served.engine.alive or served.engine.stopping:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        data, kind = served.metrics.exposition()
        return Response(data, media_type=kind)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        if model != served.name:
            raise ApiError(404, f"The model '{model}' does not exist; this server serves '{served.name}'", "model",
                           "model_not_found", kind="not_found_error")
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request):
        f = Fields(await body_of(request), COMPLETION_FIELDS)
        check_model(f)
        params, n, stream, usage = sampling(f, served)
        best_of = f.integer("best_of", n, 1)
        if best_of != n:
            raise ApiError(400, "'best_of' other than 'n' is not supported by this server", "best_of")
        if "prompt" not in f.body:
            raise ApiError(400, "'prompt' is required", "prompt")
        prompts = prompts_of(f.body["prompt"], served)
        requested = f.integer("max_tokens", 16, 1)
        lengths = [max_tokens_for(served, p, requested) for p in prompts]
        raw = f.body["prompt"]
        strings = [raw] if isinstance(raw, str) else raw if isinstance(raw[0], str) else None
        prefix = [(strings[i] if strings else served.tokenizer.decode(p, special=False)) if f.boolean("echo") else ""
                  for i, p in enumerate(prompts)]
        run = Run(served, prompts, lengths, params, n, request)

        def chunk(index: int, text: str, finish):
            return {"id": run.id, "object": "text_completion", "created": run.created, "model": served.name,
                    "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}]}

        if stream:
            async def events():
                for index in range(len(run.sequences)):
                    if prefix[index // n]:
                        yield sse(chunk(index, prefix[index // n], None))
                try:
                    async for index, update in run.updates():
                        yield sse(chunk(index, update.text, update.finish))
                except ApiError as exc:
                    yield sse(exc.body())
                if usage:
                    yield sse({**chunk(0, "", None), "choices": [], "usage": run.usage()})
                yield "data: [DONE]\n\n"

            return EventStream(events(), run.cancel)
        texts, finishes = await run.collect()
        return {"id": run.id, "object": "text_completion", "created": run.created, "model": served.name,
                "choices": [{"index": i, "text": prefix[i // n] + texts[i], "logprobs": None,
                             "finish_reason": finishes[i]} for i in range(len(texts))],
                "usage": run.usage()}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        from hvdtrain.serving.chat import TemplateError

        f = Fields(await body_of(request), CHAT_FIELDS)
        check_model(f)
        params, n, stream, usage = sampling(f, served)
        messages = messages_of(f.body.get("messages"))
        try:
            prompt = served.chat.encode(messages, served.tokenizer)
        except TemplateError as exc:
            raise ApiError(400, str(exc), "messages") from None
        requested = f.integer("max_completion_tokens", None, 1)
        requested = f.integer("max_tokens", requested, 1)
        run = Run(served, [prompt], [max_tokens_for(served, prompt, requested)], params, n, request, "chatcmpl")

        def chunk(index: int, delta: dict, finish):
            return {"id": run.id, "object": "chat.completion.chunk", "created": run.created, "model": served.name,
                    "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        if stream:
            async def events():
                for index in range(n):
                    yield sse(chunk(index, {"role": "assistant", "content": ""}, None))
                try:
                    async for index, update in run.updates():
                        if update.text:
                            yield sse(chunk(index, {"content": update.text}, None))
                        if update.finish:
                            yield sse(chunk(index, {}, update.finish))
                except ApiError as exc:
                    yield sse(exc.body())
                if usage:
                    yield sse({**chunk(0, {}, None), "choices": [], "usage": run.usage()})
                yield "data: [DONE]\n\n"

            return EventStream(events(), run.cancel)
        texts, finishes = await run.collect()
        return {"id": run.id, "object": "chat.completion", "created": run.created, "model": served.name,
                "choices": [{"index": i, "message": {"role": "assistant", "content": texts[i]}, "logprobs": None,
                             "finish_reason": finishes[i]} for i in range(n)],
                "usage": run.usage()}

    class EventStream(StreamingResponse):
        """Server-sent events; whatever ends the stream (its end, the client gone) ends its sequences."""

        def __init__(self, events, on_close):
            super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            self.on_close = on_close

        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            except (ClientDisconnect, OSError):
                pass  # the client went away: nothing to answer
            finally:
                self.on_close()

    return app


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class Run:
    """One request's sequences in the engine (``n`` per prompt), and their updates as they come."""

    def __init__(self, served: Served, prompts: list[list[int]], lengths: list[int], params: dict, n: int, request,
                 prefix: str = "cmpl"):
        self.served, self.request, self.prompts = served, request, prompts
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def deliver(index: int):
            def put(update) -> None:
                try:
                    loop.call_soon_threadsafe(self.queue.put_nowait, (index, update))
                except RuntimeError:  # the event loop has closed: nobody is listening
                    pass
            return put

        self.sequences = [Sequence(p, Params(max_tokens=m, **params), deliver(i * n + j), served.tokenizer, j)
                          for i, (p, m) in enumerate(zip(prompts, lengths)) for j in range(n)]
        try:
            served.engine.submit(self.sequences)
        except Full as exc:
            raise ApiError(503, f"the server is busy: {exc}; retry later", kind="server_error", code="overloaded",
                           headers={"Retry-After": "1"}) from None

    def cancel(self) -> None:
        self.served.engine.cancel(self.sequences)

    def _take(self, index: int, update) -> bool:
        """Whether ``update`` is for the client (a sequence's error fails the request; a cancelled one ends
        silently)."""
        if update.finish == "error":
            raise ApiError(500, "the decoding loop failed; see the server's log", kind="server_error")
        if update.finish is not None:
            self.left -= 1
        return update.finish != "cancelled"

    async def updates(self):
        """``(index, update)`` until every sequence has ended."""
        self.left = len(self.sequences)
        while self.left:
            index, update = await self.queue.get()
            if self._take(index, update):
                yield index, update

    async def collect(self) -> tuple[list[str], list[str]]:
        """Every sequence's whole text and finish reason (a client that goes away cancels them)."""
        texts = [""] * len(self.sequences)
        finishes = [None] * len(self.sequences)
        self.left = len(self.sequences)
        while self.left:
            try:
                index, update = await asyncio.wait_for(self.queue.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if await self.request.is_disconnected():
                    self.cancel()
                    raise ApiError(499, "the client closed the request") from None
                continue
            if self._take(index, update):
                texts[index] += update.text
                finishes[index] = update.finish or finishes[index]
        return texts, finishes

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(s.generated_count for s in self.sequences)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class Counting:
    """ASGI middleware: each HTTP response counted by endpoint and status (``hvdtrain_requests_total``)."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def sending(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            path = scope.get("path", "")
            endpoint = "/v1/models" if path.startswith("/v1/models") else path if path in ENDPOINTS else "other"
            self.metrics.answered(endpoint, status)
