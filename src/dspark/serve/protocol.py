"""OpenAI request schemas (the fields this server honours), their checks, and response bodies.

Unknown fields are ignored, as vLLM does; known fields this engine cannot honour (n > 1, logprobs,
echo, penalties) are refused with a 400 rather than silently ignored. Extensions, as in vLLM:
`top_k` (0 or -1 = off) and `ignore_eos`.
"""

from __future__ import annotations

import time
import uuid

from pydantic import BaseModel, ConfigDict

from dspark.config import SamplingParams
from dspark.engine.engine import RequestStats
from dspark.serve.async_engine import ServeError


class _Strict(BaseModel):
    # strict: "0.5" is not a number and 1 is not a boolean, as in OpenAI's API.
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class CommonParams(_Strict):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


class CompletionRequest(CommonParams):
    prompt: str | list[int] | list[str]
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None


class ContentPart(_Strict):
    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: str | None = None


class ChatMessage(_Strict):
    role: str
    content: str | list[ContentPart] | None = None


class ChatRequest(CommonParams):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens
    logprobs: bool = False


def invalid(message: str, param: str | None = None, status: int = 400) -> ServeError:
    return ServeError(status, message, "invalid_request_error", param=param)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def check_unsupported(body: CommonParams) -> None:
    """Refuse what the engine cannot do, naming the field."""
    if body.n != 1:
        raise invalid(f"n must be 1 (this server returns one choice per request), got {body.n}", "n")
    if body.presence_penalty != 0.0 or body.frequency_penalty != 0.0:
        param = "presence_penalty" if body.presence_penalty != 0.0 else "frequency_penalty"
        raise invalid(f"{param} is not supported (lossless speculative decoding samples the model as is); send 0", param)
    if getattr(body, "logprobs", None):
        raise invalid("logprobs are not supported by this server", "logprobs")
    if getattr(body, "echo", False):
        raise invalid("echo is not supported by this server", "echo")
    best_of = getattr(body, "best_of", None)
    if best_of not in (None, 1):
        raise invalid(f"best_of must be 1, got {best_of}", "best_of")


def sampling_params(body: CommonParams) -> SamplingParams:
    if not 0.0 <= body.temperature < float("inf"):
        raise invalid(f"temperature must be finite and >= 0 (0 = greedy, below 1e-5 greedy too), got {body.temperature}",
                      "temperature")
    if not 0.0 < body.top_p <= 1.0:
        raise invalid(f"top_p must be in (0, 1] (1 = off), got {body.top_p}", "top_p")
    if body.top_k < -1:
        raise invalid(f"top_k must be >= 0, or 0 or -1 for off, got {body.top_k}", "top_k")
    if body.seed is not None and not -(2**63) <= body.seed < 2**64:
        raise invalid(f"seed must be an integer in [-2**63, 2**64), got {body.seed}", "seed")
    return SamplingParams(body.temperature, max(body.top_k, 0), body.top_p, body.seed)


def stop_strings(body: CommonParams) -> list[str]:
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if any(not s for s in stops):
        raise invalid("stop strings must be non-empty", "stop")
    return stops


def requested_max_tokens(body: CommonParams) -> int | None:
    value = getattr(body, "max_completion_tokens", None)
    if value is None:
        value = body.max_tokens
    if value is not None and value < 1:
        raise invalid(f"max_tokens must be at least 1, got {value}", "max_tokens")
    return value


def message_dicts(body: ChatRequest) -> list[dict]:
    """Messages as the chat template wants them: role and plain-text content."""
    if not body.messages:
        raise invalid("messages must contain at least one message", "messages")
    out = []
    for i, message in enumerate(body.messages):
        content = message.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise invalid(f"messages[{i}] has a {part.type!r} part; only text parts are supported", "messages")
                texts.append(part.text)
            content = "\n".join(texts)
        check_encodable(content or "", f"messages[{i}].content", "messages")
        out.append({"role": message.role, "content": content or ""})
    return out


def check_encodable(text: str, where: str, param: str) -> None:
    """Refuse text that is not valid Unicode (a lone surrogate such as "\\ud800"), naming where."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise invalid(f"{where} holds an unpaired surrogate (U+{ord(text[err.start]):04X} at character "
                      f"{err.start}), which is not valid Unicode text", param) from None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def spec_stats(stats: RequestStats) -> dict:
    """Extension field: how speculation went for this request."""
    return {
        "rounds": stats.rounds, "accept_length": round(stats.accept_length, 4),
        "num_proposed": stats.num_proposed, "num_verified": stats.num_verified, "num_accepted": stats.num_accepted,
    }


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def choice(chat: bool, text: str | None, finish_reason: str | None, delta: bool, role: bool = False) -> dict:
    """One choice of a response (delta=False) or of a stream chunk (delta=True)."""
    if not chat:
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    if delta:
        content = {} if text is None else {"content": text}
        return {"index": 0, "delta": ({"role": "assistant"} if role else {}) | content,
                "logprobs": None, "finish_reason": finish_reason}
    return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
            "finish_reason": finish_reason}


def envelope(chat: bool, response_id: str, model: str, created: int, chunk: bool, choices: list[dict]) -> dict:
    kind = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
    return {"id": response_id, "object": kind, "created": created, "model": model, "choices": choices}


def now() -> int:
    return int(time.time())
