"""Build the target, drafter, engine, policy and app, and run them with uvicorn.

`build_server_app` takes loaded objects (tests and benchmarks use it with tiny models);
`serve` loads everything from specs and blocks until the server stops; `run_in_thread` serves an
app from a background thread (in-process servers for tests and load tests).

Start-up: the server answers as soon as the model is loaded. An auto, scheduled or async policy
without a cost table is a DeferredPolicy: plain decoding (auto) or verify-all serves while the table
is profiled between decode steps (or read from the user cache), then the policy switches
(engine/policy_spec.py).

Shutdown (SIGTERM, Ctrl-C): uvicorn stops accepting connections; the engine stops admitting and lets
requests in flight finish for up to `shutdown_timeout` seconds, then ends the rest with a final
error event (streams) or a 503. uvicorn's own graceful timeout, a little longer, only backs that up.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dspark.config import EngineConfig
from dspark.drafters.base import Drafter
from dspark.engine.engine import Engine, Policy
from dspark.engine.policy_spec import DeferredPolicy, resolve_policy  # resolve_policy is also re-exported
from dspark.errors import DSparkError
from dspark.models.target import LoadedModel

log = logging.getLogger(__name__)

SERVE_EXTRA = ("fastapi", "uvicorn", "prometheus_client", "httpx")
DEFAULT_SHUTDOWN_TIMEOUT = 5.0  # seconds requests in flight may go on after SIGTERM
SHUTDOWN_GRACE_S = 5.0  # uvicorn's backstop past it, for handlers that still have to write their last event


def require_serve_extra() -> None:
    """Raise a DSparkError naming the missing packages when the `serve` extra is not installed."""
    missing = [name for name in SERVE_EXTRA if importlib.util.find_spec(name) is None]
    if missing:
        raise DSparkError(f"serving needs {', '.join(missing)}: pip install 'dspark[serve]'")


def default_model_name(spec: str) -> str:
    return Path(spec.rstrip("/")).name or spec


def build_server_app(
    target: LoadedModel, drafter: Drafter, policy: Policy, config: EngineConfig, *,
    max_queue: int = 64, api_key: str | None = None, model_name: str | None = None,
    max_body_bytes: int | None = None,
):
    """(app, async_engine) over already-loaded objects; the decode thread starts with the first
    request (or a DeferredPolicy's first measurement, when the app starts), and stops when the
    app's lifespan ends."""
    from dspark.serve.api import build_app
    from dspark.serve.async_engine import AsyncEngine

    if target.tokenizer is None:
        raise DSparkError("the target was loaded without a tokenizer; the server needs one")
    async_engine = AsyncEngine(Engine(target, drafter, config), policy, max_queue=max_queue)
    deferred = isinstance(policy, DeferredPolicy)
    on_startup = functools.partial(policy.start, async_engine.call_between_steps) if deferred else None
    app = build_app(async_engine, target.tokenizer, model_name or default_model_name(target.spec), api_key,
                    shutdown_engine=True, max_body_bytes=max_body_bytes, on_startup=on_startup)
    return app, async_engine


def build_uvicorn_server(app, shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT, **config):
    """A uvicorn.Server for an app from `build_app` whose shutdown first drains the engine for up to
    `shutdown_timeout` seconds (module docstring); `config`: uvicorn.Config's other arguments."""
    import uvicorn

    if shutdown_timeout < 0:
        raise DSparkError(f"shutdown timeout must be >= 0 seconds, got {shutdown_timeout}")
    async_engine = app.state.dspark.engine

    class DrainingServer(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            async_engine.drain(shutdown_timeout)
            await super().shutdown(sockets)

    return DrainingServer(uvicorn.Config(app, timeout_graceful_shutdown=shutdown_timeout + SHUTDOWN_GRACE_S, **config))


def engine_config(target: LoadedModel, block_size: int | None, max_batch_size: int | None,
                  max_seq_len: int | None) -> EngineConfig:
    """EngineConfig with its own defaults for what is None; the context is clipped to the model's."""
    defaults = EngineConfig()
    limit = target.max_position_embeddings
    return EngineConfig(
        block_size=defaults.block_size if block_size is None else block_size,
        max_batch_size=max_batch_size or defaults.max_batch_size,
        max_seq_len=max_seq_len or min(defaults.max_seq_len, limit),
    )


def serve(
    target_spec: str, drafter: str = "auto", policy_name: str = "auto", host: str = "127.0.0.1",
    port: int = 8000, api_key: str | None = None, max_batch_size: int | None = None,
    block_size: int | None = None, max_seq_len: int | None = None, *, draft_model: str | None = None,
    dtype: str = "bf16", max_queue: int = 64, model_name: str | None = None, cost: str | None = None,
    threshold: float | None = None, log_level: str = "info", max_body_bytes: int | None = None,
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
) -> None:
    """Load the target and drafter, build the policy and serve the OpenAI API until interrupted.
    None for block_size, max_batch_size or max_seq_len means EngineConfig's default (the context
    clipped to the model's); None for max_body_bytes, the API's default for that context."""
    require_serve_extra()
    from dspark.drafters.registry import build_drafter
    from dspark.models.target import load_model

    _log_to_stderr(log_level)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log.warning("serving on %s without an API key: anyone who can reach it can use it", host)
    if max_body_bytes is not None and max_body_bytes < 1:
        raise DSparkError(f"max body bytes must be >= 1, got {max_body_bytes}")
    target = load_model(target_spec, dtype)
    built = build_drafter(drafter, target, draft_model, dtype)
    config = engine_config(target, block_size, max_batch_size, max_seq_len)
    policy = resolve_policy(policy_name, target, built, config, cost, threshold, defer=True)
    app, _ = build_server_app(target, built, policy, config, max_queue=max_queue, api_key=api_key,
                              model_name=model_name or default_model_name(target_spec), max_body_bytes=max_body_bytes)
    build_uvicorn_server(app, shutdown_timeout, host=host, port=port, log_level=log_level).run()


def _log_to_stderr(level: str) -> None:
    """Show dspark's own log lines (profiling progress, failed requests) beside uvicorn's."""
    logger = logging.getLogger("dspark")
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if level == "trace" else level.upper())


@contextmanager
def run_in_thread(app, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0,
                  shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT) -> Iterator[str]:
    """Serve `app` with uvicorn from a daemon thread; yields its base URL (port 0 = a free port).
    Leaving the block shuts the server down as SIGTERM does (`build_uvicorn_server`)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound = sock.getsockname()[1]
    server = build_uvicorn_server(app, shutdown_timeout, log_level="warning", lifespan="on")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="dspark-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the in-process server on {host}:{bound} did not start")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
