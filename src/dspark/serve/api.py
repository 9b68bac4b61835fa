"""The OpenAI-compatible HTTP app: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics.

Text handling matches `dspark generate`: completions encode the prompt as `encode_prompt(chat=False)`
does, chat applies the target's chat template (`encode_messages`), stop strings end a request in the
engine (StopStrings) and the text is cut before the first one (`decode_output`). Streams are
Server-Sent Events whose pieces concatenate to the same text (see detok.py). Errors use OpenAI's
shape `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator

from fastapi import Depends, FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from dspark.config import StopParams
from dspark.engine.engine import Request
from dspark.errors import DSparkError
from dspark.serve import protocol as p
from dspark.serve.async_engine import AsyncEngine, Increment, RequestStream, ServeError
from dspark.serve.detok import TextStream
from dspark.serve.metrics import ServeMetrics
from dspark.text import StopStrings, encode_messages

log = logging.getLogger(__name__)

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context


class _Server:
    """Per-app state shared by the route handlers."""

    def __init__(self, async_engine: AsyncEngine, tokenizer, model_name: str, metrics: ServeMetrics):
        self.engine = async_engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.metrics = metrics
        self.eos_ids = tuple(async_engine.engine.target.eos_token_ids)
        self.max_seq_len = async_engine.engine.config.max_seq_len
        self.created = p.now()

    # ------------------------------------------------------------------------------ requests
    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise ServeError(404, f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                             "invalid_request_error", "model_not_found", "model")

    def completion_ids(self, prompt: str | list[int] | list[str]) -> list[int]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise p.invalid(f"send one prompt per request (got {len(prompt)})", "prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            p.check_encodable(prompt, "prompt", "prompt")
            return list(self.tokenizer.encode(prompt, add_special_tokens=True))
        return list(prompt)

    def chat_ids(self, body: p.ChatRequest) -> list[int]:
        messages = p.message_dicts(body)
        try:
            return encode_messages(self.tokenizer, messages)
        except DSparkError as err:
            raise p.invalid(f"{err} (this model has no chat template: use /v1/completions)", "messages") from None
        except Exception as err:  # noqa: BLE001 - the template itself refused the conversation (jinja raise)
            raise p.invalid(f"the chat template could not render these messages: {err}", "messages") from None

    def build_request(self, body: p.CommonParams, prompt_ids: list[int], chat: bool) -> tuple[Request, list[str]]:
        p.check_unsupported(body)
        sampling = p.sampling_params(body)
        stops = p.stop_strings(body)
        wanted = p.requested_max_tokens(body)
        n, limit = len(prompt_ids), self.max_seq_len
        if n == 0:
            raise p.invalid("the prompt is empty", "messages" if chat else "prompt")
        if n + 1 > limit:
            raise p.invalid(f"this model's context length is {limit} tokens, but the prompt has {n} tokens "
                            "(prompt + at least one new token must fit); shorten the prompt",
                            "messages" if chat else "prompt")
        if wanted is not None and n + wanted > limit:
            raise p.invalid(f"this model's context length is {limit} tokens, but the prompt ({n} tokens) plus "
                            f"max_tokens ({wanted}) would need {n + wanted}; lower max_tokens", "max_tokens")
        if wanted is None:
            wanted = limit - n if chat else min(COMPLETIONS_DEFAULT_MAX_TOKENS, limit - n)
        stop = StopParams(max_new_tokens=wanted, ignore_eos=body.ignore_eos)
        checker = StopStrings(self.tokenizer, stops) if stops else None
        return Request(prompt_ids, sampling, stop, request_id=p.new_id("chatcmpl" if chat else "cmpl"),
                       stop_checker=checker), stops

    async def run(self, body: p.CommonParams, request: Request, stops: list[str], chat: bool, http: HttpRequest,
                  arrived: float) -> Response:
        try:
            stream = await self.engine.submit(request)
        except ServeError as err:
            if err.status == 503:
                self.metrics.rejected.inc()
            else:
                self.metrics.finished.labels("error").inc()
            raise
        text = TextStream(self.tokenizer, self.eos_ids, stops)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = self.sse(stream, text, request, chat, include_usage, arrived)
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self.complete(stream, text, request, chat, http, arrived)

    # ----------------------------------------------------------------------------- responses
    async def complete(self, stream: RequestStream, text: TextStream, request: Request, chat: bool,
                       http: HttpRequest, arrived: float) -> Response:
        async def collect() -> Increment:
            first = True
            async for inc in stream:
                if first and inc.token_ids:
                    first = False
                    self.metrics.ttft.observe(time.perf_counter() - arrived)
                if inc.finished:
                    return inc
            raise AssertionError("a stream ends with a finished increment")

        collector = asyncio.ensure_future(collect())
        watcher = asyncio.ensure_future(_disconnected(http))
        try:
            await asyncio.wait({collector, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not collector.done():  # the client left, or this handler was cancelled
                collector.cancel()
                stream.cancel()
        if not collector.done() or collector.cancelled():
            self.metrics.finished.labels("abort").inc()
            return Response(status_code=499)  # nobody reads it
        try:
            last = collector.result()
        except ServeError:
            self.metrics.finished.labels("error").inc()
            raise
        out = last.output
        text.finish(out.token_ids if out is not None else [])  # nothing was pushed: the whole text
        content = text.sent
        reason = self._finish_reason(last, text)
        body = p.envelope(chat, request.request_id, self.model_name, p.now(), False,
                          [p.choice(chat, content, reason, delta=False)])
        body["usage"] = p.usage(len(request.prompt_ids), len(out.token_ids) if out else 0)
        if out is not None:
            body["dspark"] = p.spec_stats(out.stats)
        self._observe_end(reason, arrived)
        return JSONResponse(body)

    async def sse(self, stream: RequestStream, text: TextStream, request: Request, chat: bool,
                  include_usage: bool, arrived: float) -> AsyncIterator[str]:
        created = p.now()

        def event(choices: list[dict], **extra) -> str:
            payload = p.envelope(chat, request.request_id, self.model_name, created, True, choices) | extra
            return f"data: {json.dumps(payload)}\n\n"

        try:
            if chat:
                yield event([p.choice(chat, "", None, delta=True, role=True)])
            first = True
            async for inc in stream:
                if first and inc.token_ids:
                    first = False
                    self.metrics.ttft.observe(time.perf_counter() - arrived)
                if not inc.finished:
                    piece = text.push(inc.token_ids)
                    if piece:
                        yield event([p.choice(chat, piece, None, delta=True)])
                    continue
                piece = text.finish(inc.token_ids)
                if piece:
                    yield event([p.choice(chat, piece, None, delta=True)])
                reason = self._finish_reason(inc, text)
                out = inc.output
                extra = {"dspark": p.spec_stats(out.stats)} if out is not None else {}
                yield event([p.choice(chat, None if chat else "", reason, delta=True)], **extra)
                if include_usage:
                    yield event([], usage=p.usage(len(request.prompt_ids), len(out.token_ids) if out else 0))
                self._observe_end(reason, arrived)
            yield "data: [DONE]\n\n"
        except ServeError as err:
            self.metrics.finished.labels("error").inc()
            yield f"data: {json.dumps(p.error_body(err.message, err.kind, err.param, err.code))}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            if not stream.finished:  # the client went away (generator closed or task cancelled)
                stream.cancel()
                self.metrics.finished.labels("abort").inc()

    def _observe_end(self, reason: str, arrived: float) -> None:
        self.metrics.latency.observe(time.perf_counter() - arrived)
        self.metrics.finished.labels(reason).inc()

    @staticmethod
    def _finish_reason(last: Increment, text: TextStream) -> str:
        # A stop string may show up in the final text (special tokens skipped) though the engine's
        # check (raw tail) ended on length; OpenAI calls that "stop".
        return "stop" if text.stopped else last.finish_reason


async def _disconnected(http: HttpRequest) -> None:
    """Returns when the client disconnects (the body has been read, so the next message is that)."""
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            return


def _error_response(status: int, message: str, kind: str, param=None, code=None, headers=None) -> JSONResponse:
    return JSONResponse(p.error_body(message, kind, param, code), status_code=status, headers=headers)


def build_app(
    async_engine: AsyncEngine, tokenizer, model_name: str, api_key: str | None = None,
    shutdown_engine: bool = False,
) -> FastAPI:
    """The OpenAI-compatible app over `async_engine`. With `api_key`, /v1/* needs
    `Authorization: Bearer <api_key>` (/health and /metrics stay open). `shutdown_engine` stops the
    decode thread when the app's lifespan ends."""
    from contextlib import asynccontextmanager

    metrics = ServeMetrics(async_engine)
    server = _Server(async_engine, tokenizer, model_name, metrics)

    @asynccontextmanager
    async def lifespan(_app):
        yield
        if shutdown_engine:
            async_engine.shutdown()

    app = FastAPI(title="dspark", lifespan=lifespan)
    app.state.dspark = server

    async def authorize(http: HttpRequest) -> None:
        if api_key is None:
            return
        header = http.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            message = "missing API key: send 'Authorization: Bearer <key>'" if not header else "incorrect API key"
            raise ServeError(401, message, "invalid_request_error", "invalid_api_key")

    @app.exception_handler(ServeError)
    async def on_serve_error(_http, err: ServeError):
        headers = {"Retry-After": "1"} if err.status == 503 else None
        return _error_response(err.status, err.message, err.kind, err.param, err.code, headers)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(_http, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            return _error_response(400, "the request body is not valid JSON", "invalid_request_error")
        param = loc[0] if loc else None
        where = ".".join(loc) if loc else "body"
        return _error_response(400, f"{where}: {first.get('msg', 'invalid value')}", "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(_http, err: StarletteHTTPException):
        kind = "invalid_request_error" if err.status_code < 500 else "server_error"
        return _error_response(err.status_code, str(err.detail), kind)

    @app.exception_handler(Exception)
    async def on_crash(_http, err: Exception):
        log.exception("unhandled error")
        return _error_response(500, f"internal error: {type(err).__name__}: {err}", "server_error")

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: p.CompletionRequest, http: HttpRequest):
        arrived = time.perf_counter()
        server.check_model(body.model)
        request, stops = server.build_request(body, server.completion_ids(body.prompt), chat=False)
        return await server.run(body, request, stops, False, http, arrived)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(body: p.ChatRequest, http: HttpRequest):
        arrived = time.perf_counter()
        server.check_model(body.model)
        request, stops = server.build_request(body, server.chat_ids(body), chat=True)
        return await server.run(body, request, stops, True, http, arrived)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        card = {"id": model_name, "object": "model", "created": server.created, "owned_by": "dspark",
                "max_model_len": server.max_seq_len}
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health():
        ok = async_engine.is_alive
        body = {"status": "ok" if ok else "unavailable", "running": async_engine.num_running,
                "waiting": async_engine.num_waiting}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
