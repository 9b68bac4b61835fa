"""Prometheus metrics of one app, in its own CollectorRegistry (so several apps, e.g. in tests, never
clash). Per-round figures come from the decode thread's StepReports; per-request ones (latency,
time to first token, outcomes) from the HTTP handlers. prometheus-client is thread-safe.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from dspark.serve.async_engine import AsyncEngine, StepReport

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def _powers_of_two(limit: int) -> list[float]:
    buckets, value = [], 1
    while value < limit:
        buckets.append(float(value))
        value *= 2
    return buckets + [float(limit)]


class ServeMetrics:
    def __init__(self, async_engine: AsyncEngine):
        config = async_engine.engine.config
        self.registry = CollectorRegistry()
        r = self.registry
        self.accept_length = Histogram(
            "dspark_accept_length", "Tokens committed per request per verify round (accepted drafts + 1)",
            buckets=[float(i) for i in range(1, config.block_size + 2)], registry=r,
        )
        round_cap = config.max_batch_size * (config.block_size + 1)
        self.verified_tokens = Histogram(
            "dspark_verified_tokens_per_round", "Tokens through one verify forward (pending + verified drafts)",
            buckets=_powers_of_two(round_cap), registry=r,
        )
        self.budget = Histogram(
            "dspark_verification_budget", "Verification budget the policy chose per round (its last_budget)",
            buckets=_powers_of_two(round_cap), registry=r,
        )
        self.running = Gauge("dspark_requests_running", "Requests decoding in engine slots", registry=r)
        self.running.set_function(lambda: async_engine.num_running)
        self.waiting = Gauge("dspark_requests_waiting", "Requests accepted but not yet in a slot", registry=r)
        self.waiting.set_function(lambda: async_engine.num_waiting)
        self.latency = Histogram("dspark_request_latency_seconds", "Arrival to last token", buckets=_SECONDS, registry=r)
        self.ttft = Histogram("dspark_time_to_first_token_seconds", "Arrival to first token", buckets=_SECONDS, registry=r)
        self.generated = Counter("dspark_generated_tokens", "Tokens generated (committed)", registry=r)
        self.rejected = Counter("dspark_rejected_requests", "Requests refused (queue full or shutting down)", registry=r)
        self.finished = Counter(
            "dspark_requests_finished", "Requests ended, by finish reason (stop, length, abort, error)",
            ["finish_reason"], registry=r,
        )
        policy = async_engine.policy
        if hasattr(policy, "status"):  # a DeferredPolicy: its cost table is profiled in the background
            self.profile_ready = Gauge("dspark_cost_table_ready",
                                       "1 once the policy's background-profiled cost table is in use", registry=r)
            self.profile_ready.set_function(lambda: float(policy.status == "ready"))
        async_engine.add_observer(self.observe_step)

    def observe_step(self, report: StepReport) -> None:
        if report.new_tokens:
            self.generated.inc(report.new_tokens)
        if report.ran_round:
            self.verified_tokens.observe(report.verified_tokens)
            if report.budget is not None:
                self.budget.observe(float(report.budget))
        for out in report.finished:
            for _, accepted, _ in out.stats.round_log:
                self.accept_length.observe(accepted + 1)
