"""The OpenAI-compatible HTTP app: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics.

Text handling matches `dspark generate`: completions encode the prompt as `encode_prompt(chat=False)`
does, chat applies the target's chat template (`encode_messages`), stop strings end a request in the
engine (StopStrings) and the text is cut before the first one (`decode_output`). Streams are
Server-Sent Events whose pieces concatenate to the same text (see detok.py). Errors use OpenAI's
shape `{"error": {"message", "type", "param", "code"}}`.

Large requests never stall the event loop (which serves every stream and /health):
- a body over `max_body_bytes` gets a 413 before anything parses it (`BodyLimit`);
- prompt text that provably exceeds the context is refused before it is tokenized
  (`chars_per_token_bound`);
- chat templating and tokenization run on a small thread pool (the fast tokenizer releases the GIL
  while it encodes).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

from fastapi import Depends, FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from dspark.config import StopParams
from dspark.engine.engine import Request
from dspark.engine.policy_spec import policy_name
from dspark.serve import protocol as p
from dspark.serve.async_engine import AsyncEngine, Increment, RequestStream, ServeError
from dspark.serve.detok import TextStream
from dspark.serve.metrics import ServeMetrics
from dspark.text import StopStrings, encode_rendered, render_messages

log = logging.getLogger(__name__)

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context
# Default body limit: 64 bytes per token of context, at least 1 MiB. English text averages about 4
# bytes per token, and JSON escapes (6 bytes for a control character, 12 for a non-BMP one as a
# surrogate pair) or long whitespace tokens rarely reach 64; a request within the context but over
# the limit gets a 413 that names --max-body-bytes.
BODY_BYTES_PER_TOKEN = 64
MIN_MAX_BODY_BYTES = 1 << 20
DISCARD_BYTES = 64 << 20  # a refused body is read and dropped up to here, so the client sees the 413
TOKENIZE_THREADS = 4  # concurrent tokenizations; more requests wait for a thread, not the event loop
# Normalizers that never drop characters; composing ones (NFC, NFKC) merge at most 4 code points
# into one (a canonical decomposition has at most 4, e.g. U+1F82 = alpha + 3 marks; Hangul 3).
_KEEPING_NORMALIZERS = {"NFC", "NFD", "NFKC", "NFKD", "Lowercase", "Prepend", "Replace", "Sequence"}
_KEEPING_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Digits", "Split", "Punctuation", "UnicodeScripts", "Sequence"}
NORMALIZER_SHRINK = 4


def default_max_body_bytes(max_seq_len: int) -> int:
    return max(MIN_MAX_BODY_BYTES, BODY_BYTES_PER_TOKEN * max_seq_len)


def chars_per_token_bound(tokenizer) -> int | None:
    """Most characters of input text that one token can stand for, when that can be proven from the
    tokenizer's definition; else None (then only tokenizing tells).

    Proven for fast BPE tokenizers that cannot lose input: byte-level BPE (a ByteLevel pre-tokenizer:
    every input byte becomes one alphabet character of some token, and a character is at least a
    byte) and BPE with byte fallback (SentencePiece style: every character is in a token's string,
    an unknown one in byte tokens). A token then stands for at most as many characters as its
    vocabulary string has (added and special tokens for their own text), times 4 when a normalizer
    composes characters. Whatever may drop input gives None: a WordLevel, WordPiece or Unigram model
    (an unknown word of any length is one token), a pre-tokenizer that splits whitespace away, a
    normalizer that strips, or a Replace that shortens.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        spec = json.loads(backend.to_str())
    except Exception:  # noqa: BLE001 - an unusual backend: no proof
        return None
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        return None

    def steps(node: dict | None, kind: str) -> list[dict] | None:  # flattened chain, None if any step is unknown
        if node is None:
            return []
        if node.get("type") == "Sequence":
            out = []
            for child in node.get(kind, []):
                sub = steps(child, kind)
                if sub is None:
                    return None
                out += sub
            return out
        return [node]

    pre = steps(spec.get("pre_tokenizer"), "pretokenizers")
    norm = steps(spec.get("normalizer"), "normalizers")
    if pre is None or norm is None:
        return None
    for step in pre:
        if step.get("type") not in _KEEPING_PRE_TOKENIZERS or step.get("behavior") == "Removed":
            return None
    for step in norm:
        if step.get("type") not in _KEEPING_NORMALIZERS:
            return None
        if step.get("type") == "Replace":
            pattern = (step.get("pattern") or {}).get("String")
            if pattern is None or len(pattern) > len(step.get("content", "")):
                return None
    if not (any(step.get("type") == "ByteLevel" for step in pre) or model.get("byte_fallback")):
        return None
    longest = max((len(token) for token in backend.get_vocab(with_added_tokens=True)), default=0)
    if longest < 1:
        return None
    composing = any(step.get("type") in ("NFC", "NFKC") for step in norm)
    return longest * (NORMALIZER_SHRINK if composing else 1)


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` gets a 413 (OpenAI error shape) before the
    app sees it, so no JSON parser, validator or tokenizer ever holds an oversized body. Accepted
    bodies are read here and handed on whole (the app would read them whole anyway). A refused body
    is read and dropped up to DISCARD_BYTES first: answering while the client still sends makes many
    clients see a reset connection instead of the 413."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope.get("headers", ()) if k == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(receive, send, int(declared), 0, more=True)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending its body
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(receive, send, None, size, more=message.get("more_body", False))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, handed = b"".join(chunks), False

        async def replay():
            nonlocal handed
            if not handed:
                handed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then what follows: a disconnect

        await self.app(scope, replay, send)

    async def _refuse(self, receive, send, declared: int | None, size: int, more: bool) -> None:
        while more and size <= DISCARD_BYTES:
            message = await receive()
            if message["type"] != "http.request":
                return
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
        what = f"{declared} bytes" if declared is not None else f"over {self.max_bytes} bytes"
        body = json.dumps(p.error_body(
            f"the request body is {what}; this server accepts at most {self.max_bytes} bytes (--max-body-bytes)",
            "invalid_request_error", None, "request_too_large")).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if more:  # the rest is still coming: this connection cannot carry another request
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


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
        self.chars_per_token = chars_per_token_bound(tokenizer)
        self.pool = ThreadPoolExecutor(TOKENIZE_THREADS, thread_name_prefix="dspark-tokenize")

    async def off_loop(self, fn: Callable, *args):
        """fn(*args) on the tokenizer pool: templating and tokenizing a long prompt take seconds."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    # ------------------------------------------------------------------------------ requests
    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise ServeError(404, f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                             "invalid_request_error", "model_not_found", "model")

    def completion_ids(self, prompt: str | list[int] | list[str]) -> list[int]:
        """Runs on the tokenizer pool."""
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise p.invalid(f"send one prompt per request (got {len(prompt)})", "prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            p.check_encodable(prompt, "prompt", "prompt")
            self.check_chars(prompt, "prompt")
            return list(self.tokenizer.encode(prompt, add_special_tokens=True))
        return list(prompt)

    def chat_ids(self, body: p.ChatRequest) -> list[int]:
        """Runs on the tokenizer pool. `encode_messages` in two steps, with the character check
        between them."""
        messages = p.message_dicts(body)
        if not getattr(self.tokenizer, "chat_template", None):
            raise p.invalid("this model has no chat template: use /v1/completions", "messages")
        try:
            text = render_messages(self.tokenizer, messages)
        except Exception as err:  # noqa: BLE001 - the template itself refused the conversation (jinja raise)
            raise p.invalid(f"the chat template could not render these messages: {err}", "messages") from None
        self.check_chars(text, "messages")
        return encode_rendered(self.tokenizer, text)

    def check_chars(self, text: str, param: str) -> None:
        """Refuse text whose length alone proves it exceeds the context (see chars_per_token_bound)."""
        bound, limit = self.chars_per_token, self.max_seq_len
        if bound is not None and len(text) > bound * (limit - 1):
            raise p.invalid(f"this model's context length is {limit} tokens, but the prompt has {len(text)} "
                            f"characters, so at least {math.ceil(len(text) / bound)} tokens (one token of this "
                            f"tokenizer covers at most {bound} characters); shorten the prompt", param)

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
    shutdown_engine: bool = False, max_body_bytes: int | None = None, on_startup: Callable[[], None] | None = None,
) -> FastAPI:
    """The OpenAI-compatible app over `async_engine`. With `api_key`, /v1/* needs
    `Authorization: Bearer <api_key>` (/health and /metrics stay open). `shutdown_engine` stops the
    decode thread when the app's lifespan ends; `on_startup` runs when it begins. Bodies over
    `max_body_bytes` (default: `default_max_body_bytes` of the context) get a 413."""
    from contextlib import asynccontextmanager

    metrics = ServeMetrics(async_engine)
    server = _Server(async_engine, tokenizer, model_name, metrics)

    @asynccontextmanager
    async def lifespan(_app):
        if on_startup is not None:
            on_startup()
        yield
        server.pool.shutdown(wait=False, cancel_futures=True)
        if shutdown_engine:
            async_engine.shutdown()

    app = FastAPI(title="dspark", lifespan=lifespan)
    app.state.dspark = server
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes or default_max_body_bytes(server.max_seq_len))

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
        request, stops = server.build_request(body, await server.off_loop(server.completion_ids, body.prompt),
                                              chat=False)
        return await server.run(body, request, stops, False, http, arrived)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(body: p.ChatRequest, http: HttpRequest):
        arrived = time.perf_counter()
        server.check_model(body.model)
        request, stops = server.build_request(body, await server.off_loop(server.chat_ids, body), chat=True)
        return await server.run(body, request, stops, True, http, arrived)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        card = {"id": model_name, "object": "model", "created": server.created, "owned_by": "dspark",
                "max_model_len": server.max_seq_len}
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health():
        ok = async_engine.is_admitting
        status = "ok" if ok else "shutting_down" if async_engine.is_alive else "unavailable"
        body = {"status": status, "running": async_engine.num_running, "waiting": async_engine.num_waiting,
                "policy": policy_name(async_engine.policy)}
        profile = getattr(async_engine.policy, "status", None)  # a DeferredPolicy: profiling | ready | failed
        if profile is not None:
            body["profile"] = profile
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
