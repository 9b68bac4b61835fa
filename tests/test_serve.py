"""The HTTP server: greedy identity with `dspark generate`, streaming, cancellation, validation,
queue bound, metrics, failure isolation, request size limits, start-up with a background profile,
bounded shutdown and the load generator. Tiny fp32 models, CPU."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

import httpx
from fastapi.testclient import TestClient

from dspark.config import EngineConfig, SamplingParams, StopParams
from dspark.drafters.simple import NgramDrafter, NoDrafter
from dspark.engine.engine import Engine, Request, verify_all
from dspark.models.target import load_model
from dspark.serve.api import chars_per_token_bound
from dspark.serve.async_engine import AsyncEngine, ServeError
from dspark.serve.detok import TextStream
from dspark.serve.loadtest import load_loadtest_results, run_loadtest, write_loadtest_report
from dspark.serve.server import build_server_app, resolve_policy, run_in_thread
from dspark.text import StopStrings, decode_output, encode_messages

MAX_SEQ_LEN = 128
PROMPTS = ["w5 w6 w7 w8 w5 w6 w7", "w10 w11 w12 w10 w11", "w20 w21 w22 w23 w24 w20 w21 w22",
           "w30 w31 w30 w31 w30", "w40 w41 w42 w43", "w50 w51 w52 w50 w51 w52 w50"]
POISON = 90  # FlakyDrafter fails on requests holding this token (the word "w90")
POISON_SEED = 4242  # failing_rows() breaks the verification of requests with this seed


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and OpenMP pools shared by the decode thread,
    the test's own forwards and a busy machine can stall for seconds; restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def target(tiny_dirs):
    return load_model(str(tiny_dirs["llama"]), "fp32")


def config(max_batch_size: int = 3, block_size: int = 4) -> EngineConfig:
    return EngineConfig(block_size=block_size, max_batch_size=max_batch_size, max_seq_len=MAX_SEQ_LEN)


def reference(target, prompt_ids: list[int], max_tokens: int, stops=(), ignore_eos=False) -> tuple[str, list[int]]:
    """What `dspark generate` prints for these ids (greedy): Engine.generate + decode_output."""
    tok = target.tokenizer
    engine = Engine(target, NgramDrafter(), config(max_batch_size=1))
    checker = StopStrings(tok, list(stops)) if stops else None
    request = Request(prompt_ids, SamplingParams(), StopParams(max_tokens, ignore_eos=ignore_eos), stop_checker=checker)
    out = engine.generate([request])[0]
    return decode_output(tok, out.token_ids, target.eos_token_ids, list(stops)), out.token_ids


def make_app(target, policy=verify_all, drafter=None, **kwargs):
    max_batch_size = kwargs.pop("max_batch_size", 3)
    return build_server_app(target, drafter or NgramDrafter(), policy, config(max_batch_size), **kwargs)


def sse_events(text: str) -> list[dict]:
    events = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: "):]
            if data == "[DONE]":
                break
            events.append(json.loads(data))
    assert text.rstrip().endswith("data: [DONE]"), text[-200:]
    return events


def streamed_text(events: list[dict], chat: bool) -> str:
    pieces = []
    for e in events:
        for c in e["choices"]:
            pieces.append((c["delta"].get("content") or "") if chat else c["text"])
    return "".join(pieces)


def is_openai_error(response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    if param is not None:
        assert error["param"] == param, error
    return error


def wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def engine_is_empty(async_engine: AsyncEngine) -> bool:
    engine = async_engine.engine
    return (not engine.running and not engine.waiting and not any(engine.cache.in_use)
            and async_engine.num_running == 0 and async_engine.num_waiting == 0)


def verify_none(requests, proposals):
    return [0] * len(proposals)


class SlowPolicy:
    """verify_all (or another rule), slowed down so clients can leave mid-generation; exposes a
    verification budget. With verify_none every round commits exactly one token."""

    def __init__(self, delay: float, rule=verify_all):
        self.delay = delay
        self.rule = rule
        self.last_budget = None

    def __call__(self, requests, proposals):
        time.sleep(self.delay)
        lengths = self.rule(requests, proposals)
        self.last_budget = sum(lengths)
        return lengths


class GatePolicy:
    """verify_all once the gate opens (holds the decode thread inside a step)."""

    def __init__(self):
        self.entered = threading.Event()
        self.gate = threading.Event()

    def __call__(self, requests, proposals):
        self.entered.set()
        assert self.gate.wait(30), "the test never opened the gate"
        return verify_all(requests, proposals)


class FlakyDrafter(NgramDrafter):
    def propose(self, requests):
        if any(POISON in r.token_ids for r in requests):
            raise RuntimeError("injected drafter failure")
        return super().propose(requests)


def failing_rows(monkeypatch, after: int = 2) -> None:
    """Make the engine's verification of a request seeded POISON_SEED raise from its (after+1)-th round."""
    import dspark.engine.engine as engine_module

    real, seen = engine_module.verify_ragged, {}

    def verify_ragged(logits, drafts, draft_probs, params, generators):
        if params[0].seed == POISON_SEED:
            seen[id(generators[0])] = seen.get(id(generators[0]), 0) + 1
            if seen[id(generators[0])] > after:
                raise RuntimeError("injected row failure")
        return real(logits, drafts, draft_probs, params, generators)

    monkeypatch.setattr(engine_module, "verify_ragged", verify_ragged)


class ProxyTokenizer:
    """The target's tokenizer, recording what it encodes on which thread; encoding a text longer than
    `block_above` characters waits for `gate` (as tokenizing a huge prompt takes seconds)."""

    def __init__(self, tokenizer, block_above: int | None = None):
        self._tokenizer = tokenizer
        self.block_above = block_above
        self.gate, self.entered = threading.Event(), threading.Event()
        self.encoded: list[tuple[int, str]] = []  # (characters, thread name)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def encode(self, text, **kwargs):
        self.encoded.append((len(text), threading.current_thread().name))
        if self.block_above is not None and len(text) > self.block_above:
            self.entered.set()
            assert self.gate.wait(30), "the test never opened the gate"
        return self._tokenizer.encode(text, **kwargs)


# ------------------------------------------------------------------------------------ identity
@pytest.mark.parametrize("stops", [[], ["w9"], ["w7 w8", "w11"]])
def test_completions_equal_dspark_generate_streamed_and_not(target, stops):
    tok = target.tokenizer
    app, _ = make_app(target)
    with TestClient(app) as client:
        for prompt in PROMPTS[:3]:
            expected, tokens = reference(target, tok.encode(prompt), 24, stops)
            body = {"model": "llama", "prompt": prompt, "max_tokens": 24, "temperature": 0, "stop": stops}
            plain = client.post("/v1/completions", json=body)
            assert plain.status_code == 200, plain.text
            data = plain.json()
            assert data["choices"][0]["text"] == expected
            assert data["usage"]["completion_tokens"] == len(tokens)
            assert data["usage"]["prompt_tokens"] == len(tok.encode(prompt))
            assert data["choices"][0]["finish_reason"] in ("stop", "length")
            streamed = client.post("/v1/completions", json=body | {"stream": True,
                                                                   "stream_options": {"include_usage": True}})
            events = sse_events(streamed.text)
            assert streamed_text(events, chat=False) == expected
            assert events[-1]["usage"]["completion_tokens"] == len(tokens)
            assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == data["choices"][0]["finish_reason"]


def test_chat_applies_the_chat_template_and_equals_the_engine(target):
    tok = target.tokenizer
    messages = [{"role": "user", "content": "w5 w6 w7 w5 w6"}]
    expected, _ = reference(target, encode_messages(tok, messages), 20)
    app, _ = make_app(target)
    with TestClient(app) as client:
        body = {"model": "llama", "messages": messages, "max_tokens": 20, "temperature": 0}
        data = client.post("/v1/chat/completions", json=body).json()
        assert data["object"] == "chat.completion"
        assert data["choices"][0]["message"] == {"role": "assistant", "content": expected}
        events = sse_events(client.post("/v1/chat/completions", json=body | {"stream": True}).text)
        assert events[0]["choices"][0]["delta"]["role"] == "assistant"
        assert all(e["object"] == "chat.completion.chunk" for e in events)
        assert streamed_text(events, chat=True) == expected


# ------------------------------------------------------------------------ streaming, cancelling
def test_concurrent_streams_with_cancellations_lose_nothing_and_free_every_slot(target):
    tok = target.tokenizer
    max_tokens, cancelled = 48, {1, 4}
    expected = [reference(target, tok.encode(p), max_tokens, ignore_eos=True)[0] for p in PROMPTS]
    app, async_engine = make_app(target, SlowPolicy(0.01), max_batch_size=3)

    async def one(client, i: int) -> str:
        body = {"prompt": PROMPTS[i], "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True}
        text = ""
        async with client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                text += json.loads(line[6:])["choices"][0]["text"]
                if i in cancelled and text:
                    return text  # leaving the block closes the connection mid-stream
        return text

    async def main(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            return await asyncio.gather(*(one(client, i) for i in range(len(PROMPTS))))

    with run_in_thread(app) as url:
        texts = asyncio.run(main(url))
        assert wait_until(lambda: engine_is_empty(async_engine)), "requests or slots left behind"
        metrics = httpx.get(f"{url}/metrics").text
    for i, text in enumerate(texts):
        if i in cancelled:
            assert text and expected[i].startswith(text)
        else:
            assert text == expected[i], f"stream {i} was corrupted"
    assert 'dspark_requests_finished_total{finish_reason="abort"} 2.0' in metrics
    assert async_engine.num_aborted == 2  # both left mid-generation, and the engine dropped them


# -------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("extra", [{"temperature": 1e-40}, {"temperature": 5e-324}, {"temperature": 1.0, "top_p": 1e-46},
                                   {"temperature": 1.0, "top_p": 1e-300, "top_k": 3}])
def test_sampling_edge_values_complete_and_keep_other_requests_alive(target, extra):
    """Values that once failed inside the engine step (and aborted every request in flight)."""
    app, async_engine = make_app(target)
    with TestClient(app) as client:
        reply = client.post("/v1/completions", json={"prompt": "w5 w6", "max_tokens": 4, **extra})
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["finish_reason"] in ("length", "stop")
        assert client.post("/v1/completions", json={"prompt": "w7", "max_tokens": 2, "temperature": 0}).status_code == 200


@pytest.mark.parametrize("path, raw", [
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "w5 \\ud800 w6"}], "max_tokens": 2}'),
    ("/v1/completions", '{"prompt": "w5 \\udfff", "max_tokens": 2}'),
])
def test_a_lone_surrogate_gets_a_400_that_says_what_is_wrong(target, path, raw):
    app, async_engine = make_app(target)
    with TestClient(app) as client:
        reply = client.post(path, content=raw, headers={"Content-Type": "application/json"})
        assert reply.status_code == 400, reply.text
        message = reply.json()["error"]["message"]
        assert "unpaired surrogate" in message and "TypeError" not in message and "argument" not in message
        assert engine_is_empty(async_engine)


@pytest.mark.parametrize("raw", ['{"prompt": "w5", "temperature": Infinity}', '{"prompt": "w5", "temperature": 1e400}',
                                 '{"prompt": "w5", "temperature": NaN}'])
def test_non_finite_temperature_is_refused(target, raw):
    app, async_engine = make_app(target)
    with TestClient(app) as client:
        reply = client.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"})
        assert reply.status_code == 400 and "temperature" in reply.text, reply.text
        assert engine_is_empty(async_engine)


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/completions", {"prompt": "w5", "temperature": -0.5}, 400, "temperature"),
    ("/v1/completions", {"prompt": "w5", "n": 2}, 400, "n"),
    ("/v1/completions", {"prompt": "w5", "model": "gpt-9"}, 404, "model"),
    ("/v1/chat/completions", {"model": "llama", "max_tokens": 4}, 400, "messages"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/completions", {"prompt": " ".join(["w5"] * 200)}, 400, "prompt"),
    ("/v1/completions", {"prompt": "w5 w6", "max_tokens": MAX_SEQ_LEN}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "w5", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "w5", "max_tokens": "ten"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "w5", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "w5"}], "max_completion_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "w5", "seed": 2**70}, 400, "seed"),
    ("/v1/completions", {"prompt": "w5", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"prompt": "w5", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "w5", "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"prompt": "w5", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"prompt": [3, 4, 999]}, 400, None),
    ("/v1/completions", {"prompt": ["w5", "w6"]}, 400, "prompt"),
])
def test_bad_requests_get_4xx_in_openai_error_shape(target, path, body, status, param):
    app, async_engine = make_app(target)
    with TestClient(app) as client:
        is_openai_error(client.post(path, json=body), status, param)
        assert engine_is_empty(async_engine)


def test_unknown_fields_are_ignored_and_bad_json_is_refused(target):
    app, _ = make_app(target)
    with TestClient(app) as client:
        ok = client.post("/v1/completions", json={"prompt": "w5 w6", "max_tokens": 3, "temperature": 0,
                                                  "frobnicate": True, "user": "someone"})
        assert ok.status_code == 200, ok.text
        bad = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
        is_openai_error(bad, 400)
        is_openai_error(client.get("/v1/nothing-here"), 404)


def test_api_key_is_required_when_set(target):
    app, _ = make_app(target, api_key="sekret")
    body = {"prompt": "w5 w6", "max_tokens": 2}
    with TestClient(app) as client:
        assert is_openai_error(client.post("/v1/completions", json=body), 401)["code"] == "invalid_api_key"
        wrong = client.post("/v1/completions", json=body, headers={"Authorization": "Bearer nope"})
        is_openai_error(wrong, 401)
        is_openai_error(client.get("/v1/models"), 401)
        right = client.post("/v1/completions", json=body, headers={"Authorization": "Bearer sekret"})
        assert right.status_code == 200, right.text
        assert client.get("/health").status_code == 200


# ------------------------------------------------------------------------------- queue bound
def test_requests_beyond_the_queue_bound_are_refused_clearly(target):
    gate = GatePolicy()
    app, async_engine = make_app(target, gate, max_batch_size=1, max_queue=1)
    body = {"prompt": "w5 w6 w7", "max_tokens": 3, "temperature": 0}

    async def main(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            first = asyncio.create_task(client.post("/v1/completions", json=body))
            await asyncio.to_thread(gate.entered.wait, 30)  # the first request holds the only slot
            second = asyncio.create_task(client.post("/v1/completions", json=body))
            while async_engine.num_running + async_engine.num_waiting < 2:
                await asyncio.sleep(0.01)
            third = await client.post("/v1/completions", json=body)
            gate.gate.set()
            return await first, await second, third

    with run_in_thread(app) as url:
        first, second, third = asyncio.run(main(url))
        metrics = httpx.get(f"{url}/metrics").text
    assert first.status_code == 200 and second.status_code == 200
    error = is_openai_error(third, 503)
    assert error["code"] == "queue_full" and "max_queue=1" in error["message"]
    assert third.headers["retry-after"] == "1"
    assert "dspark_rejected_requests_total 1.0" in metrics


# ---------------------------------------------------------------------- metrics, health, models
def test_metrics_health_and_models(target):
    app, _ = make_app(target, SlowPolicy(0.0))
    with TestClient(app) as client:
        models = client.get("/v1/models").json()
        assert models["data"][0]["id"] == "llama" and models["data"][0]["max_model_len"] == MAX_SEQ_LEN
        assert client.get("/health").json()["status"] == "ok"
        generated = 0
        for prompt in PROMPTS[:3]:
            data = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 12, "temperature": 0}).json()
            generated += data["usage"]["completion_tokens"]
            assert data["dspark"]["rounds"] >= 1
        client.post("/v1/completions", json={"prompt": "w5", "stream": True, "max_tokens": 4})
        text = client.get("/metrics").text
    for name in ("dspark_accept_length_bucket", "dspark_verified_tokens_per_round_count",
                 "dspark_verification_budget_count", "dspark_requests_running", "dspark_requests_waiting",
                 "dspark_request_latency_seconds_count", "dspark_time_to_first_token_seconds_count",
                 "dspark_rejected_requests_total", "dspark_generated_tokens_total"):
        assert name in text, name
    samples = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line and line[0] != "#"}
    assert samples["dspark_request_latency_seconds_count"] == 4
    assert samples["dspark_verification_budget_count"] > 0
    assert samples["dspark_generated_tokens_total"] >= generated + 1


# ----------------------------------------------------------------------------- failures
def test_a_raising_stop_checker_fails_only_its_request(target):
    tok = target.tokenizer
    ids = [tok.encode(p) for p in PROMPTS[:3]]
    expected = [reference(target, x, 30, ignore_eos=True)[1] for x in ids]
    async_engine = AsyncEngine(Engine(target, NgramDrafter(), config()), verify_all)

    def explode(generated):
        if len(generated) > 5:
            raise KeyError("boom")
        return False

    async def run(request):
        tokens = []
        async for inc in await async_engine.submit(request):
            tokens += inc.token_ids
        return tokens

    async def main():
        stop = StopParams(30, ignore_eos=True)
        requests = [Request(x, SamplingParams(), stop) for x in ids]
        requests[1].stop_checker = explode
        return await asyncio.gather(*(run(r) for r in requests), return_exceptions=True)

    try:
        results = asyncio.run(main())
        assert results[0] == expected[0] and results[2] == expected[2]
        assert isinstance(results[1], ServeError) and results[1].status == 500 and "boom" in results[1].message
        assert wait_until(lambda: engine_is_empty(async_engine))
    finally:
        async_engine.shutdown()


def test_an_abandoned_stream_cancels_its_request_and_not_an_equal_one(target):
    tok = target.tokenizer
    expected = reference(target, tok.encode(PROMPTS[0]), 40, ignore_eos=True)[1]
    async_engine = AsyncEngine(Engine(target, NgramDrafter(), config()), SlowPolicy(0.01))

    async def main():
        stop = StopParams(40, ignore_eos=True)
        first = Request(tok.encode(PROMPTS[0]), SamplingParams(), stop)
        second = Request(tok.encode(PROMPTS[0]), SamplingParams(), stop)
        assert first == second  # equal, yet two requests
        abandoned = await async_engine.submit(first)
        kept = await async_engine.submit(second)
        del abandoned  # nobody will read it: the request must not hold its slot to the end
        return [t for inc in [i async for i in kept] for t in inc.token_ids]

    try:
        assert asyncio.run(main()) == expected
        assert wait_until(lambda: engine_is_empty(async_engine))
        assert async_engine.num_aborted == 1
    finally:
        async_engine.shutdown()


def test_a_failing_step_fails_the_running_batch_and_the_loop_keeps_serving(target):
    tok = target.tokenizer
    expected = reference(target, tok.encode(PROMPTS[0]), 16)[0]
    app, async_engine = make_app(target, drafter=FlakyDrafter(), max_batch_size=1)
    good = {"prompt": PROMPTS[0], "max_tokens": 16, "temperature": 0}
    bad = {"prompt": "w90 w5 w6", "max_tokens": 16, "temperature": 0}

    async def main(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            # One slot: the poisoned request and the good ones never share a batch, so the good
            # ones wait (or run) untouched while the poisoned step fails.
            return await asyncio.gather(*(client.post("/v1/completions", json=b) for b in (bad, good, good)))

    with run_in_thread(app) as url:
        failed, *served = asyncio.run(main(url))
        later = httpx.post(f"{url}/v1/completions", json=good, timeout=60)
        health = httpx.get(f"{url}/health")
        streamed = httpx.post(f"{url}/v1/completions", json=bad | {"stream": True}, timeout=60)
    error = is_openai_error(failed, 500)
    assert "injected drafter failure" in error["message"]
    assert [r.json()["choices"][0]["text"] for r in served + [later]] == [expected] * 3
    assert health.status_code == 200 and async_engine.num_failed_steps >= 1
    # Admitted before its step failed, so the stream had started: the error comes as an event.
    assert streamed.status_code == 200
    events = sse_events(streamed.text)
    assert "injected drafter failure" in events[-1]["error"]["message"]
    assert engine_is_empty(async_engine)


def test_a_request_that_fails_in_the_engine_fails_alone_streamed_or_not(target, monkeypatch):
    """A failure in one request's own row (here its verification) ends that request with a 500 or a
    final error event; the requests decoding beside it keep their exact greedy text."""
    failing_rows(monkeypatch)
    tok = target.tokenizer
    expected = [reference(target, tok.encode(p), 24, ignore_eos=True)[0] for p in PROMPTS[:2]]
    app, async_engine = make_app(target, SlowPolicy(0.005), max_batch_size=4)
    good = [{"prompt": p, "max_tokens": 24, "temperature": 0, "ignore_eos": True} for p in PROMPTS[:2]]
    bad = {"prompt": PROMPTS[2], "max_tokens": 24, "temperature": 0, "ignore_eos": True, "seed": POISON_SEED}

    async def main(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            return await asyncio.gather(
                client.post("/v1/completions", json=good[0]), client.post("/v1/completions", json=bad),
                client.post("/v1/completions", json=good[1] | {"stream": True}),
                client.post("/v1/completions", json=bad | {"stream": True}))

    with run_in_thread(app) as url:
        plain, failed, streamed, failed_stream = asyncio.run(main(url))
        health = httpx.get(f"{url}/health")
        assert wait_until(lambda: engine_is_empty(async_engine)), "a failed request kept its slot"
    assert plain.json()["choices"][0]["text"] == expected[0]
    assert streamed_text(sse_events(streamed.text), chat=False) == expected[1]
    assert "injected row failure" in is_openai_error(failed, 500)["message"]
    assert failed_stream.status_code == 200
    events = sse_events(failed_stream.text)
    assert "injected row failure" in events[-1]["error"]["message"]
    assert health.status_code == 200 and async_engine.num_failed_steps == 0  # no step failed as a whole


# ------------------------------------------------------------------------------- request size
def test_a_huge_request_freezes_neither_streams_nor_health_and_an_oversize_body_gets_413(target):
    """While a prompt far over the context is being tokenized (held there by the test), the event
    loop keeps streaming another request and answering /health; a body over the limit is refused
    with a 413 before anything parses it."""
    tok = target.tokenizer
    max_tokens = 100  # one token per 0.03 s round: about 3 s of streaming
    expected = reference(target, tok.encode(PROMPTS[0]), max_tokens, ignore_eos=True)[0]
    app, async_engine = make_app(target, SlowPolicy(0.03, verify_none), max_body_bytes=200_000)
    proxy = ProxyTokenizer(tok, block_above=10_000)
    app.state.dspark.tokenizer = proxy
    big = {"prompt": "w5 " * 50_000, "max_tokens": 4}  # 150 kB: within the body limit, far over the context
    huge = {"prompt": "w5 " * 100_000, "max_tokens": 4}  # 300 kB: over the body limit

    async def main(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            pieces: list[str] = []

            async def stream():
                body = {"prompt": PROMPTS[0], "max_tokens": max_tokens, "temperature": 0, "stream": True,
                        "ignore_eos": True}
                async with client.stream("POST", "/v1/completions", json=body) as response:
                    async for line in response.aiter_lines():
                        if line.startswith("data: {"):
                            pieces.append(json.loads(line[6:])["choices"][0]["text"])

            streaming = asyncio.create_task(stream())
            while not pieces:
                await asyncio.sleep(0.01)
            stuck = asyncio.create_task(client.post("/v1/completions", json=big))
            assert await asyncio.to_thread(proxy.entered.wait, 30), "the big prompt never reached the tokenizer"
            before = len(pieces)
            health = await client.get("/health", timeout=10)  # liveness bound: the loop is not blocked
            refused = await client.post("/v1/completions", json=huge, timeout=10)
            deadline = time.monotonic() + 10
            while len(pieces) < before + 3 and not streaming.done() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            progressed = len(pieces) >= before + 3 or streaming.done()
            still_blocked = not proxy.gate.is_set()
            proxy.gate.set()
            await streaming
            return health, refused, await stuck, progressed and still_blocked, "".join(pieces)

    with run_in_thread(app) as url:
        health, refused, stuck, progressed, text = asyncio.run(main(url))
    assert health.status_code == 200
    assert progressed, "the stream stalled while a prompt was being tokenized"
    assert text == expected
    assert is_openai_error(refused, 413)["code"] == "request_too_large"
    assert "context length" in is_openai_error(stuck, 400, "prompt")["message"]
    assert all(name.startswith("dspark-tokenize") for _, name in proxy.encoded), proxy.encoded
    assert max(chars for chars, _ in proxy.encoded) < 200_000  # the oversize prompt was never tokenized
    assert engine_is_empty(async_engine)


def test_a_prompt_whose_length_proves_it_too_long_is_refused_without_tokenizing(target):
    app, async_engine = make_app(target)
    server = app.state.dspark
    assert server.chars_per_token is None  # word-level: an unknown word of any length is one token
    server.chars_per_token = 3  # as a byte-level tokenizer whose longest token has 3 characters would prove
    server.tokenizer = proxy = ProxyTokenizer(target.tokenizer)
    long_text = "w5 " * 200  # 600 characters > 3 * (MAX_SEQ_LEN - 1)
    with TestClient(app) as client:
        refused = client.post("/v1/completions", json={"prompt": long_text})
        assert "at least 200 tokens" in is_openai_error(refused, 400, "prompt")["message"]
        chat = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": long_text}]})
        is_openai_error(chat, 400, "messages")
        assert proxy.encoded == []
        ok = client.post("/v1/completions", json={"prompt": "w5 w6", "max_tokens": 2})
        assert ok.status_code == 200 and len(proxy.encoded) == 1
    assert engine_is_empty(async_engine)


def test_the_characters_per_token_bound_holds_for_a_byte_level_bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["def f(x):\n    return x + 1\n", "the quick brown fox jumps over the lazy dog " * 3,
              "        indented    ", "résumé ☃ 🙂 naïve"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|end|>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe)
    bound = chars_per_token_bound(tok)
    assert bound is not None
    for text in corpus + [" " * 300, "é☃🙂" * 20, "<|end|>" * 5, "x" * 500, "\n\n\t  " * 40]:
        assert len(text) <= bound * len(tok.encode(text, add_special_tokens=False)), text


# ------------------------------------------------------------------------------------ start-up
def test_a_cached_profile_is_reused_and_a_corrupt_one_is_profiled_again(target, tmp_path, monkeypatch, caplog):
    import dspark.engine.profile as profile_module
    from dspark.engine.cost import CostTable

    monkeypatch.setenv("DSPARK_CACHE_DIR", str(tmp_path))
    real, calls = profile_module.profile_target, []
    monkeypatch.setattr(profile_module, "profile_target", lambda t, **kw: calls.append(kw) or real(t, **kw))
    settings = {"batch_tokens": [1, 2], "context": 8, "block_size": 1, "repeats": 1, "warmup": 0}
    first = profile_module.cached_profile(target, **settings)
    path = profile_module.profile_cache_path(target, settings)
    assert path.parent == tmp_path / "profiles" and path.is_file() and len(calls) == 1
    assert profile_module.cached_profile(target, **settings).sps == first.sps and len(calls) == 1  # reused
    assert profile_module.profile_cache_path(target, settings | {"context": 16}) != path  # settings are in the key
    path.write_text('{"format": "dspark-cost-table", "tok')
    with caplog.at_level(logging.WARNING, logger="dspark.engine.profile"):
        again = profile_module.cached_profile(target, **settings)
    assert len(calls) == 2 and "ignoring the cached cost table" in caplog.text
    assert CostTable.load(path).tokens == again.tokens  # rewritten whole


def test_scheduled_without_a_cost_table_serves_at_once_and_switches_once_profiled(target, tmp_path, monkeypatch):
    """The server answers while its cost table is profiled (held back here by the test), serving with
    verify-all; the profile's forwards run on the decode thread only; then the policy switches, and
    a restart reads the cached table instead of profiling again."""
    import dspark.engine.profile as profile_module

    monkeypatch.setenv("DSPARK_CACHE_DIR", str(tmp_path))
    real, gate, threads, calls = profile_module.profile_target, threading.Event(), set(), []

    def gated(target_, *, run, **kwargs):
        calls.append(kwargs)
        assert gate.wait(30), "the test never opened the gate"

        def recording_run(fn):
            return run(lambda: (threads.add(threading.current_thread().name), fn())[1])

        return real(target_, run=recording_run, **kwargs)

    monkeypatch.setattr(profile_module, "profile_target", gated)
    expected, _ = reference(target, target.tokenizer.encode(PROMPTS[0]), 16)
    body = {"prompt": PROMPTS[0], "max_tokens": 16, "temperature": 0}
    app, _ = make_app(target, resolve_policy("scheduled", target, NgramDrafter(), config(), defer=True))
    with TestClient(app) as client:
        health = client.get("/health")
        assert health.status_code == 200 and health.json()["profile"] == "profiling", health.text
        assert health.json()["policy"] == "fixed:4"  # the stated fallback: verify every draft
        assert client.post("/v1/completions", json=body).json()["choices"][0]["text"] == expected
        gate.set()
        assert wait_until(lambda: client.get("/health").json()["profile"] == "ready", 60)
        assert client.get("/health").json()["policy"] == "scheduled"
        assert client.post("/v1/completions", json=body).json()["choices"][0]["text"] == expected
        assert "dspark_cost_table_ready 1.0" in client.get("/metrics").text
    assert threads == {"dspark-decode"} and len(calls) == 1
    assert len(list((tmp_path / "profiles").glob("*.json"))) == 1
    app, _ = make_app(target, resolve_policy("scheduled", target, NgramDrafter(), config(), defer=True))
    with TestClient(app) as client:  # a restart: the cached table, nothing profiled
        assert wait_until(lambda: client.get("/health").json()["profile"] == "ready", 30)
    assert len(calls) == 1
    app, _ = make_app(target, resolve_policy("auto", target, NgramDrafter(), config(), defer=True))
    with TestClient(app) as client:  # auto reads the same cached table
        assert wait_until(lambda: client.get("/health").json()["profile"] == "ready", 30)
        assert client.get("/health").json()["policy"] == "scheduled"
    assert len(calls) == 1


def test_auto_policy_decodes_plainly_while_its_cost_table_is_profiled(target, tmp_path, monkeypatch):
    from dspark.engine import profile as profile_module

    monkeypatch.setenv("DSPARK_CACHE_DIR", str(tmp_path))
    gate = threading.Event()
    real = profile_module.profile_target

    def gated(target_, **kwargs):
        assert gate.wait(30), "the test never opened the gate"
        return real(target_, **kwargs)

    monkeypatch.setattr(profile_module, "profile_target", gated)
    expected, _ = reference(target, target.tokenizer.encode(PROMPTS[0]), 16)
    body = {"prompt": PROMPTS[0], "max_tokens": 16, "temperature": 0}
    app, _ = make_app(target, resolve_policy("auto", target, NgramDrafter(), config(), defer=True))
    with TestClient(app) as client:
        health = client.get("/health").json()
        assert health["profile"] == "profiling" and health["policy"] == "none", health
        assert client.post("/v1/completions", json=body).json()["choices"][0]["text"] == expected
        gate.set()
        assert wait_until(lambda: client.get("/health").json()["profile"] == "ready", 60)
        assert client.get("/health").json()["policy"] == "scheduled"


# ------------------------------------------------------------------------------------ shutdown
def test_drain_refuses_new_requests_and_lets_those_in_flight_finish(target):
    tok = target.tokenizer
    expected = reference(target, tok.encode(PROMPTS[0]), 12, ignore_eos=True)[1]
    async_engine = AsyncEngine(Engine(target, NgramDrafter(), config()), SlowPolicy(0.02))

    async def main():
        stream = await async_engine.submit(Request(tok.encode(PROMPTS[0]), SamplingParams(),
                                                   StopParams(12, ignore_eos=True)))
        drainer = async_engine.drain(30.0)
        with pytest.raises(ServeError) as refused:
            await async_engine.submit(Request(tok.encode(PROMPTS[1]), SamplingParams(), StopParams(4)))
        return refused.value, [inc async for inc in stream], drainer

    refused, increments, drainer = asyncio.run(main())
    assert refused.status == 503 and refused.code == "shutting_down"
    assert [t for inc in increments for t in inc.token_ids] == expected and increments[-1].finish_reason == "length"
    drainer.join(10)  # the last request ended the drain well before its timeout
    assert not drainer.is_alive() and not async_engine.is_alive


def test_shutdown_ends_requests_still_running_at_the_timeout_with_a_final_event_or_a_503(target):
    app, async_engine = make_app(target, SlowPolicy(0.05, verify_none))  # 100 tokens take about 5 s
    body = {"prompt": PROMPTS[0], "max_tokens": 100, "temperature": 0, "ignore_eos": True}
    started, results = threading.Event(), {}

    def client(url):
        async def main():
            async with httpx.AsyncClient(base_url=url, timeout=60) as http:
                async def stream():
                    lines = []
                    async with http.stream("POST", "/v1/completions", json=body | {"stream": True}) as response:
                        async for line in response.aiter_lines():
                            if line:
                                lines.append(line)
                                started.set()
                    return lines

                return await asyncio.gather(stream(), http.post("/v1/completions", json=body))

        results["out"] = asyncio.run(main())

    with run_in_thread(app, shutdown_timeout=0.3) as url:
        worker = threading.Thread(target=client, args=(url,), daemon=True)
        worker.start()
        assert started.wait(30) and wait_until(lambda: async_engine.num_running == 2)
    # Leaving the block shut the server down as SIGTERM does; it returned once both requests ended.
    worker.join(30)
    lines, plain = results["out"]
    assert lines[-1] == "data: [DONE]" and len(lines) >= 3, lines
    assert json.loads(lines[-2][len("data: "):])["error"]["code"] == "shutting_down"
    assert is_openai_error(plain, 503)["code"] == "shutting_down"
    assert not async_engine.is_alive and not async_engine.engine.running


# ------------------------------------------------------------------------------- detokenizer
class ByteTokenizer:
    """Token i < 256 is byte i; 256 is eos (special). Multi-byte characters span several tokens."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def test_streamed_text_never_splits_a_character_nor_shows_a_stop_string():
    text = "aé ☃ STx ST done STOP never"
    stream = TextStream(ByteTokenizer(), (256,), ["STOP"])
    pieces = [stream.push([b]) for b in text.encode()]
    pieces.append(stream.finish([256]))
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == "aé ☃ STx ST done "
    # "ST" waited until the next character showed it was not the start of "STOP".
    sent = ""
    for piece in pieces:
        sent += piece
        assert not sent.endswith(("S", "ST", "STO"))


def test_streamed_text_ends_with_the_final_decode_without_stops():
    data = list("résumé ✓".encode()) + [256]
    stream = TextStream(ByteTokenizer(), (256,), [])
    pieces = [stream.push(data[i:i + 2]) for i in range(0, len(data) - 1, 2)]
    pieces.append(stream.finish([]))
    assert "".join(pieces) == "résumé ✓"


# ------------------------------------------------------------------------- policies, loadtest
def test_every_verification_policy_serves_the_greedy_text(target, tmp_path):
    pytest.importorskip("dspark.engine.scheduler")
    from dspark.engine.cost import CostTable

    cost = tmp_path / "cost.json"
    CostTable.flat(100.0).save(cost)
    expected, _ = reference(target, target.tokenizer.encode(PROMPTS[0]), 16)
    with pytest.raises(ValueError, match="unknown verification policy"):
        resolve_policy("no-such-policy", target, NgramDrafter(), config())
    from dspark.engine.policy_spec import policy_name

    assert policy_name(resolve_policy("auto", target, NoDrafter(), config(), defer=True)) == "none"  # nothing to schedule
    given = resolve_policy("auto", target, NgramDrafter(), config(), cost=cost, defer=True)
    assert policy_name(given) == "scheduled", "auto with a cost table: scheduled at once"
    for spec in ("auto", "none", "fixed:2", "threshold", "scheduled", "async"):
        policy = resolve_policy(spec, target, NgramDrafter(), config(), cost=cost)
        app, _ = make_app(target, policy)
        with TestClient(app) as client:
            body = {"prompt": PROMPTS[0], "max_tokens": 16, "temperature": 0}
            assert client.post("/v1/completions", json=body).json()["choices"][0]["text"] == expected, spec
            assert "dspark_verification_budget_count" in client.get("/metrics").text


def test_loadtest_against_an_in_process_server_writes_its_report(target, tmp_path):
    app, _ = make_app(target)
    with run_in_thread(app) as url:
        streamed = run_loadtest(url, [1, 2], PROMPTS[:3], max_tokens=8, requests_per_level=3)
        plain = run_loadtest(url, [2], PROMPTS[:2], max_tokens=8, requests_per_level=2, stream=False, chat=True)
    for result in (streamed, plain):
        for level in result["levels"]:
            assert level["errors"] == 0, level["first_error"]
            assert level["aggregate_tok_s"] > 0 and level["per_user_tok_s"] > 0 and level["completion_tokens"] > 0
    assert all(level["mean_ttft_s"] > 0 for level in streamed["levels"])
    assert [lv["concurrency"] for lv in streamed["levels"]] == [1, 2]
    paths = write_loadtest_report(streamed, tmp_path, "fixed")
    write_loadtest_report(plain, tmp_path, "chat")
    assert all(p.stat().st_size > 0 for p in paths.values())
    runs = load_loadtest_results(tmp_path)
    assert [r["label"] for r in runs] == ["chat", "fixed"]
    both = write_loadtest_report(runs, tmp_path, "comparison")
    assert both["png"].stat().st_size > 0 and "## chat" in both["markdown"].read_text()


# ------------------------------------------------------------------------------- real model
@pytest.mark.slow
def test_smollm2_streams_equal_dspark_generate_with_multibyte_text(smollm2_dir):
    """A byte-level BPE tokenizer: leading spaces, merged and multi-byte characters in the stream."""
    target = load_model(str(smollm2_dir), "fp32")
    tok = target.tokenizer
    prompts = ["Écris trois mots français avec des accents: é, è, ü, ç, et un emoji 🙂:",
               "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"]
    text = " Ça marche: 日本語 🙂🙃 naïve\n  indented"
    ids = tok.encode(text, add_special_tokens=False)
    stream = TextStream(tok, target.eos_token_ids, [])
    pieces = [stream.push([i]) for i in ids] + [stream.finish()]
    assert "".join(pieces) == tok.decode(ids) and not any("\ufffd" in piece for piece in pieces)
    app, _ = build_server_app(target, NgramDrafter(), verify_all, config())
    with TestClient(app) as client:
        for prompt in prompts:
            for stops in ([], ["\n\n"]):
                expected, _ = reference(target, tok.encode(prompt), 40, stops)
                body = {"prompt": prompt, "max_tokens": 40, "temperature": 0, "stop": stops}
                assert client.post("/v1/completions", json=body).json()["choices"][0]["text"] == expected
                events = sse_events(client.post("/v1/completions", json=body | {"stream": True}).text)
                pieces = [e["choices"][0]["text"] for e in events]
                assert "".join(pieces) == expected and not any("\ufffd" in piece for piece in pieces)
        messages = [{"role": "user", "content": "Say hello in Japanese."}]
        expected, _ = reference(target, encode_messages(tok, messages), 30)
        events = sse_events(client.post("/v1/chat/completions", json={
            "messages": messages, "max_tokens": 30, "temperature": 0, "stream": True}).text)
        assert streamed_text(events, chat=True) == expected
