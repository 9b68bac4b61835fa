"""Resolve a verification-policy spec (`auto | none | fixed[:K] | threshold[:C] | scheduled | async`) into a
policy for an engine: what `dspark generate` and `dspark serve` both do, so it lives with the
engine and the inference path imports neither training nor serving code.

scheduled and async need a cost table. Given none, `dspark generate` profiles one before it starts;
a server cannot wait minutes before it answers, so it gets a `DeferredPolicy` instead: a fallback
policy serves while the table is profiled (or read from the user cache) in the background.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from dspark.config import EngineConfig
from dspark.drafters.base import Drafter, DraftRequest, Proposal
from dspark.engine.engine import Policy
from dspark.errors import DSparkError
from dspark.models.target import LoadedModel

log = logging.getLogger(__name__)

NEEDS_COST = ("scheduled", "async")
AUTO = "auto"
PROGRESS_EVERY_S = 10.0  # a background profile logs how far it got at most this often


def check_policy_spec(spec: str, block_size: int) -> None:
    """Refuse a bad policy spec (naming the valid ones) before anything slow is loaded."""
    from dspark.engine.cost import CostTable
    from dspark.engine.scheduler import POLICY_NAMES, build_policy

    name = spec.strip().partition(":")[0]
    if name not in (AUTO, *POLICY_NAMES):
        raise DSparkError(f"unknown verification policy {spec!r}; valid: {', '.join((AUTO, *POLICY_NAMES))}")
    if name == AUTO:
        if spec.strip() != AUTO:
            raise DSparkError(f"policy {AUTO!r} takes no parameter, got {spec!r}")
        return
    build_policy(spec, block_size, CostTable.flat())


def resolve_policy(spec: str, target: LoadedModel, drafter: Drafter, config: EngineConfig,
                   cost: str | Path | None = None, threshold: float | None = None, *, defer: bool = False,
                   cached: bool = False, fallback: str = "fixed") -> Policy:
    """The verification policy `spec` (auto | none | fixed[:K] | threshold[:C] | scheduled | async).
    auto: `none` for a run without a drafter, else `scheduled` with this machine's cost table, read
    from the user cache or profiled once and cached (`cached`), so that drafting and long
    verification happen only where this hardware makes them pay.
    scheduled and async need a cost table: loaded from `cost`, else profiled over verify batches up to
    what this engine can send: now (once, at start-up), or with `defer` as a `DeferredPolicy` that
    verifies with `fallback` (fixed: every draft) until its background profile, cached per machine,
    is ready; auto's fallback is none (plain decoding), which never costs more than not drafting."""
    from dspark.engine.scheduler import DEFAULT_THRESHOLD, build_policy

    name = spec.strip().partition(":")[0]
    check_policy_spec(spec, config.block_size)
    if name == AUTO:
        if getattr(drafter, "name", None) == "none":  # nothing is drafted: nothing to schedule
            return build_policy("none", config.block_size)
        return resolve_policy("scheduled", target, drafter, config, cost, threshold, defer=defer, cached=True,
                              fallback="none")
    threshold = DEFAULT_THRESHOLD if threshold is None else threshold
    table = None
    if name in NEEDS_COST:
        from dspark.engine.cost import CostTable

        if cost is None and defer:
            settings = profile_settings(target, drafter, config)

            def build(run, progress) -> Policy:
                from dspark.engine.profile import cached_profile

                table = cached_profile(target, run=run, progress=progress, **settings)
                return build_policy(spec, config.block_size, table, threshold)

            return DeferredPolicy(spec, build_policy(fallback, config.block_size), build)
        table = CostTable.load(cost) if cost is not None else _profile_cost(target, drafter, config, cached)
    return build_policy(spec, config.block_size, table, threshold)


def profile_settings(target: LoadedModel, drafter: Drafter, config: EngineConfig) -> dict:
    """profile_target's settings for an engine: verify batches and request counts up to what it can
    send, at a context of up to 256 cached tokens, with the forward returning the drafter's features."""
    most = config.max_batch_size * (config.block_size + 1)
    return {
        "batch_tokens": sorted({min(2**i, most) for i in range(most.bit_length() + 1)}),
        "context": max(0, min(256, target.max_position_embeddings - config.block_size - 2)),
        "block_size": config.block_size,
        "feature_layers": tuple(drafter.feature_layers),
        "rows": sorted({min(2**i, config.max_batch_size) for i in range(config.max_batch_size.bit_length() + 1)}),
    }


def _profile_cost(target: LoadedModel, drafter: Drafter, config: EngineConfig, cached: bool = False):
    from dspark.engine.profile import cached_profile, profile_cache_path, profile_target

    settings = profile_settings(target, drafter, config)
    if not (cached and profile_cache_path(target, settings).is_file()):
        log.warning("profiling the target's cost table for %s verify tokens and %s requests (pass a cost table "
                    "to skip%s)", settings["batch_tokens"], settings["rows"],
                    "; cached for the next run on this machine" if cached else "")
    return cached_profile(target, **settings) if cached else profile_target(target, **settings)


def policy_name(policy: Policy) -> str:
    return getattr(policy, "name", None) or getattr(policy, "__name__", type(policy).__name__)


class DeferredPolicy:
    """A policy whose cost table is still being profiled: rounds use `fallback` until `start`'s
    background thread has built the real one with `build(run, progress)`, then that one.

    Lossless: which policy a round uses depends on the clock, never on its drafted tokens, and each
    of them is lossless. Thread safety: `run(fn)` must call fn where the engine's model and policy
    are free, and return its result; a server passes its decode thread's `call_between_steps`. So
    every profiled forward runs between decode steps (never beside one: the model and its caches
    stay single-threaded, and timings are not inflated by decoding on the same cores), and the switch
    happens between rounds, so one round never mixes the two policies' `plan`, choice and `observe`.
    Decoding goes on meanwhile, paused for one measurement (a few forwards) at a time.
    """

    def __init__(self, spec: str, fallback: Policy, build: Callable[..., Policy]):
        self.spec = spec
        self.fallback = fallback
        self.current: Policy = fallback
        self.build = build
        self.status = "profiling"  # "profiling" | "ready" | "failed"
        self.error: Exception | None = None

    @property
    def name(self) -> str:
        return policy_name(self.current)

    @property
    def ready(self) -> bool:
        return self.status == "ready"

    @property
    def last_budget(self):
        return getattr(self.current, "last_budget", None)

    def __call__(self, requests: Sequence[DraftRequest], proposals: Sequence[Proposal]) -> Sequence[int]:
        return self.current(requests, proposals)

    def plan(self, requests: Sequence[DraftRequest], draft_seconds: float | None) -> list[int]:
        plan = getattr(self.current, "plan", None)
        return list(plan(requests, draft_seconds)) if plan is not None else [r.max_tokens for r in requests]

    def observe(self, requests, lengths, num_accepted, survival=None) -> None:
        observe = getattr(self.current, "observe", None)
        if observe is not None:
            observe(requests, lengths, num_accepted, survival=survival)

    def start(self, run: Callable) -> threading.Thread:
        """Profile (or read the cached profile) on a daemon thread, then switch through `run`."""
        log.warning("--policy %s without a cost table: serving with %s while the cost "
                    "table is profiled in the background (cached for the next start)", self.spec,
                    policy_name(self.fallback))
        thread = threading.Thread(target=self._profile, args=(run,), name="dspark-profile", daemon=True)
        thread.start()
        return thread

    def _profile(self, run: Callable) -> None:
        started = last = time.monotonic()

        def progress(done: int, total: int) -> None:
            nonlocal last
            if time.monotonic() - last >= PROGRESS_EVERY_S:
                last = time.monotonic()
                log.info("profiling the cost table: %d/%d measurements", done, total)

        try:
            policy = self.build(run, progress)
            run(lambda: self._switch(policy))
        except Exception as exc:  # noqa: BLE001 - serving goes on with the fallback
            self.status, self.error = "failed", exc
            if getattr(exc, "code", None) == "shutting_down":  # the server stopped first: nothing went wrong
                log.info("profiling the cost table stopped: the server is shutting down")
            else:
                log.error("profiling the cost table failed; serving on with %s", policy_name(self.fallback),
                          exc_info=exc)
            return
        log.info("cost table ready after %.0f s: serving with %s", time.monotonic() - started, self.name)

    def _switch(self, policy: Policy) -> None:
        self.current, self.status = policy, "ready"
