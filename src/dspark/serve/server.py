"""Build the target, drafter, engine, policy and app, and run them with uvicorn.

`build_server_app` takes loaded objects (tests and benchmarks use it with tiny models);
`serve` loads everything from specs and blocks until the server stops; `run_in_thread` serves an
app from a background thread (in-process servers for tests and load tests).
"""

from __future__ import annotations

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
from dspark.engine.policy_spec import resolve_policy  # noqa: F401  (re-exported: the server's policy resolution)
from dspark.errors import DSparkError
from dspark.models.target import LoadedModel

log = logging.getLogger(__name__)

SERVE_EXTRA = ("fastapi", "uvicorn", "prometheus_client", "httpx")


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
):
    """(app, async_engine) over already-loaded objects; the decode thread starts with the first
    request, and stops when the app's lifespan ends."""
    from dspark.serve.api import build_app
    from dspark.serve.async_engine import AsyncEngine

    if target.tokenizer is None:
        raise DSparkError("the target was loaded without a tokenizer; the server needs one")
    async_engine = AsyncEngine(Engine(target, drafter, config), policy, max_queue=max_queue)
    app = build_app(async_engine, target.tokenizer, model_name or default_model_name(target.spec), api_key,
                    shutdown_engine=True)
    return app, async_engine


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
    target_spec: str, drafter: str = "auto", policy_name: str = "fixed", host: str = "127.0.0.1",
    port: int = 8000, api_key: str | None = None, max_batch_size: int | None = None,
    block_size: int | None = None, max_seq_len: int | None = None, *, draft_model: str | None = None,
    dtype: str = "bf16", max_queue: int = 64, model_name: str | None = None, cost: str | None = None,
    threshold: float | None = None, log_level: str = "info",
) -> None:
    """Load the target and drafter, build the policy and serve the OpenAI API until interrupted.
    None for block_size, max_batch_size or max_seq_len means EngineConfig's default (the context
    clipped to the model's)."""
    require_serve_extra()
    import uvicorn

    from dspark.drafters.registry import build_drafter
    from dspark.models.target import load_model

    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log.warning("serving on %s without an API key: anyone who can reach it can use it", host)
    target = load_model(target_spec, dtype)
    built = build_drafter(drafter, target, draft_model, dtype)
    config = engine_config(target, block_size, max_batch_size, max_seq_len)
    policy = resolve_policy(policy_name, target, built, config, cost, threshold)
    app, _ = build_server_app(target, built, policy, config, max_queue=max_queue, api_key=api_key,
                              model_name=model_name or default_model_name(target_spec))
    uvicorn.run(app, host=host, port=port, log_level=log_level)


@contextmanager
def run_in_thread(app, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0) -> Iterator[str]:
    """Serve `app` with uvicorn from a daemon thread; yields its base URL (port 0 = a free port)."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
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
