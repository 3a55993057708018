"""The HTTP side of ``peftkit serve``: OpenAI's endpoints on FastAPI, in front of the engine.

    GET  /                          the chat page (static/chat.html; no key needed: it holds no data,
                                    and every call it makes sends the key the user enters)
    GET  /health                    {"status": "ok", "running", "waiting"}; never needs a key
    GET  /v1/models                 the base model and every adapter (adapters: parent = the base)
    POST /v1/chat/completions       messages through the tokenizer's chat template
    POST /v1/completions            plain text (or token ids) prompts
    POST /v1/load_lora_adapter      --allow-runtime-adapters only (vLLM's names)
    POST /v1/unload_lora_adapter

A request becomes one :class:`~peftkit.serve.sequence.Sequence` per prompt and choice; the engine
thread fills each one's events into the request's asyncio queue. A streaming response sends them
as Server-Sent Events in OpenAI's chunk format; when its client disconnects, Starlette cancels the
response and the ``finally`` marks the sequences cancelled, which frees their rows at the next
decode step. A non-streaming request checks for a disconnected client while it waits.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from peftkit.serve.adapters import AdapterRegistry
from peftkit.serve.engine import Engine, QueueFull
from peftkit.serve.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    LoadAdapterRequest,
    UnloadAdapterRequest,
    validation_message,
)
from peftkit.serve.sequence import Event, SamplingParams, Sequence

log = logging.getLogger("peftkit.serve")


@dataclass
class ServeState:
    engine: Engine
    registry: AdapterRegistry
    tokenizer: Any
    context_length: int
    default_max_tokens: int
    api_key: str | None = None


def create_app(state: ServeState) -> FastAPI:
    app = FastAPI(title="peftkit serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = state
    _add_error_handlers(app)

    @app.middleware("http")
    async def require_key(request: Request, call_next: Callable) -> Any:
        if state.api_key and request.url.path not in ("/", "/health"):
            header = request.headers.get("authorization", "")
            scheme, _, given = header.partition(" ")
            if not header:
                return _error(
                    ApiError(401, "missing API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")
                )
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode(), state.api_key.encode()
            ):
                return _error(ApiError(401, "incorrect API key", code="invalid_api_key"))
        return await call_next(request)

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files("peftkit.serve").joinpath("static/chat.html").read_text("utf-8"))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", **state.engine.load()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return state.registry.models()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body = ChatCompletionRequest.model_validate(await _json(request))
        adapter = state.registry.resolve(body.model)
        prompt = _chat_ids(state.tokenizer, body.chat())
        return await _complete(request, state, body, adapter, [prompt], chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = CompletionRequest.model_validate(await _json(request))
        adapter = state.registry.resolve(body.model)
        prompts = [_plain_ids(state.tokenizer, p) for p in body.prompts()]
        return await _complete(request, state, body, adapter, prompts, chat=False)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> JSONResponse:
        body = LoadAdapterRequest.model_validate(await _json(request))
        await state.registry.load(state.engine, body.lora_name, body.lora_path)
        log.info("loaded adapter %s from %s", body.lora_name, state.registry.adapters[body.lora_name])
        return JSONResponse({"status": "ok", "lora_name": body.lora_name})

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request) -> JSONResponse:
        body = UnloadAdapterRequest.model_validate(await _json(request))
        await state.registry.unload(state.engine, body.lora_name)
        log.info("unloaded adapter %s", body.lora_name)
        return JSONResponse({"status": "ok", "lora_name": body.lora_name})

    return app


# ---- requests -> sequences ----------------------------------------------------------------------
async def _json(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except ValueError as err:
        raise ApiError(400, f"the request body is not valid JSON: {err}") from err


def _chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    from peftkit.loading import encode_chat, has_chat_template

    if not has_chat_template(tokenizer):
        raise ApiError(
            400, "this model's tokenizer has no chat template; use /v1/completions", param="messages"
        )
    try:
        return encode_chat(tokenizer, messages)
    except Exception as err:  # noqa: BLE001 - a template may reject e.g. a role order
        raise ApiError(400, f"the chat template rejected these messages: {err}", param="messages") from err


def _plain_ids(tokenizer: Any, prompt: str | list[int]) -> list[int]:
    from peftkit.loading import encode_plain

    if isinstance(prompt, str):
        ids = encode_plain(tokenizer, prompt)
    else:
        vocabulary = len(tokenizer)
        if any(not 0 <= token < vocabulary for token in prompt):
            raise ApiError(
                400, f"'prompt' holds token ids outside the vocabulary (0..{vocabulary - 1})", param="prompt"
            )
        ids = list(prompt)
    if not ids:
        raise ApiError(400, "'prompt' is empty", param="prompt")
    return ids


def _max_tokens(state: ServeState, body: Any, prompt_tokens: int) -> int:
    requested = body.requested_tokens()
    room = state.context_length - prompt_tokens
    if requested is None:
        if room < 1:
            raise ApiError(
                400,
                f"This model's maximum context length is {state.context_length} tokens; the prompt has "
                f"{prompt_tokens}. Please shorten it.",
                param="messages" if isinstance(body, ChatCompletionRequest) else "prompt",
                code="context_length_exceeded",
            )
        return min(state.default_max_tokens, room)
    if requested > room:
        raise ApiError(
            400,
            f"This model's maximum context length is {state.context_length} tokens. However, you requested "
            f"{prompt_tokens + requested} tokens ({prompt_tokens} in the prompt, {requested} for the "
            "completion). Please reduce the prompt or the completion length.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return requested


async def _complete(
    request: Request, state: ServeState, body: Any, adapter: str, prompts: list[list[int]], *, chat: bool
) -> Any:
    started = time.monotonic()
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()

    def sink(event: Event) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the event loop closed: nobody is listening any more
            pass

    sequences = []
    for p, prompt in enumerate(prompts):
        params = SamplingParams(
            max_tokens=_max_tokens(state, body, len(prompt)),
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            stop=body.stop_strings(),
        )
        for c in range(body.n):
            sequences.append(Sequence(prompt, adapter, params, sink, index=p * body.n + c))
    try:
        state.engine.submit(sequences)
    except QueueFull as err:
        raise ApiError(
            429,
            f"the server is busy ({state.engine.max_queue} sequences queued); retry in {err.retry_after} s",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(err.retry_after)},
        ) from err
    record = _Record(body.model, adapter, sum(len(p) for p in prompts), started, len(sequences))
    reply = _Reply(body.model, chat)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _stream(events, sequences, reply, record, include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    return await _collect(request, events, sequences, reply, record)


class _Record:
    """What the request's log line reports."""

    def __init__(self, model: str, adapter: str, prompt_tokens: int, started: float, count: int):
        self.model, self.adapter, self.prompt_tokens, self.started = model, adapter, prompt_tokens, started
        self.first_token: float | None = None
        self.completion_tokens = 0
        self.finish: list[str] = ["?"] * count
        self.outcome = "ok"

    def saw(self, event: Event) -> None:
        if self.first_token is None:
            self.first_token = time.monotonic()
        if event.kind in ("done", "error"):
            self.completion_tokens += event.completion_tokens
            self.finish[event.index] = event.finish_reason or event.kind

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    def log(self) -> None:
        now = time.monotonic()
        ttft = f"{self.first_token - self.started:.3f}s" if self.first_token else "-"
        log.info(
            "model=%s prompt_tokens=%d completion_tokens=%d ttft=%s latency=%.3fs finish=%s %s",
            self.model,
            self.prompt_tokens,
            self.completion_tokens,
            ttft,
            now - self.started,
            ",".join(self.finish),
            self.outcome,
        )


class _Reply:
    """OpenAI's response objects for one request (chat or completion)."""

    def __init__(self, model: str, chat: bool):
        self.model, self.chat = model, chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def whole(self, texts: list[str], finish: list[str], usage: dict[str, int]) -> dict[str, Any]:
        if self.chat:
            choices = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": t},
                    "logprobs": None,
                    "finish_reason": f,
                }
                for i, (t, f) in enumerate(zip(texts, finish))
            ]
            return {**self._envelope("chat.completion", choices), "usage": usage}
        choices = [
            {"index": i, "text": t, "logprobs": None, "finish_reason": f}
            for i, (t, f) in enumerate(zip(texts, finish))
        ]
        return {**self._envelope("text_completion", choices), "usage": usage}

    def chunk(
        self, index: int, text: str | None, finish: str | None, *, role: bool = False
    ) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            return self._envelope("chat.completion.chunk", [choice])
        return self._envelope(
            "text_completion",
            [{"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}],
        )

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._envelope(obj, []), "usage": usage}


def _sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


async def _stream(
    events: asyncio.Queue[Event],
    sequences: list[Sequence],
    reply: _Reply,
    record: _Record,
    include_usage: bool,
) -> AsyncIterator[str]:
    pending = len(sequences)
    try:
        if reply.chat:
            for sequence in sequences:
                yield _sse(reply.chunk(sequence.index, None, None, role=True))
        while pending:
            event = await events.get()
            record.saw(event)
            if event.kind == "text":
                yield _sse(reply.chunk(event.index, event.text, None))
                continue
            pending -= 1
            if event.kind == "error":
                record.outcome = "error"
                yield _sse(ApiError(500, event.text).body())
                continue
            if event.text:
                yield _sse(reply.chunk(event.index, event.text, None))
            yield _sse(reply.chunk(event.index, None, event.finish_reason))
        if include_usage:
            yield _sse(reply.usage_chunk(record.usage()))
        yield _sse("[DONE]")
    finally:
        if pending:  # the client went away (or the response was cancelled): stop generating
            record.outcome = "client disconnected"
            for sequence in sequences:
                sequence.cancelled.set()
        record.log()


async def _collect(
    request: Request, events: asyncio.Queue[Event], sequences: list[Sequence], reply: _Reply, record: _Record
) -> JSONResponse:
    texts = [""] * len(sequences)
    pending = len(sequences)
    try:
        while pending:
            try:
                event = await asyncio.wait_for(events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    record.outcome = "client disconnected"
                    for sequence in sequences:
                        sequence.cancelled.set()
                    return JSONResponse({}, status_code=499)
                continue
            record.saw(event)
            if event.kind == "error":
                record.outcome = "error"
                raise ApiError(500, event.text)
            texts[event.index] += event.text
            pending -= event.kind == "done"
        return JSONResponse(reply.whole(texts, record.finish, record.usage()))
    finally:
        record.log()


# ---- errors -------------------------------------------------------------------------------------
def _error(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_request: Request, err: ApiError) -> JSONResponse:
        if err.status >= 500:
            log.error("%s", err.message)
        return _error(err)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, err: RequestValidationError) -> JSONResponse:
        message, param = validation_message(list(err.errors()))
        return _error(ApiError(400, message, param=param))

    from pydantic import ValidationError

    @app.exception_handler(ValidationError)
    async def invalid_body(_request: Request, err: ValidationError) -> JSONResponse:
        message, param = validation_message(list(err.errors()))
        return _error(ApiError(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, err: StarletteHTTPException) -> JSONResponse:
        return _error(ApiError(err.status_code, str(err.detail)))
