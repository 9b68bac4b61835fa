"""Resolve a verification-policy spec (`none | fixed[:K] | threshold[:C] | scheduled | async`) into a
policy for an engine: what `dspark generate` and `dspark serve` both do, so it lives with the
engine and the inference path imports neither training nor serving code."""

from __future__ import annotations

import logging
from pathlib import Path

from dspark.config import EngineConfig
from dspark.drafters.base import Drafter
from dspark.engine.engine import Policy
from dspark.errors import DSparkError
from dspark.models.target import LoadedModel

log = logging.getLogger(__name__)

NEEDS_COST = ("scheduled", "async")


def resolve_policy(spec: str, target: LoadedModel, drafter: Drafter, config: EngineConfig,
                   cost: str | Path | None = None, threshold: float | None = None) -> Policy:
    """The verification policy `spec` (none | fixed[:K] | threshold[:C] | scheduled | async).
    scheduled and async need a cost table: loaded from `cost`, else profiled now (once, at start-up)
    over verify batches up to what this engine can send."""
    from dspark.engine.scheduler import DEFAULT_THRESHOLD, POLICY_NAMES, build_policy

    name = spec.strip().partition(":")[0]
    if name not in POLICY_NAMES:
        raise DSparkError(f"unknown verification policy {spec!r}; valid: {', '.join(POLICY_NAMES)}")
    table = None
    if name in NEEDS_COST:
        from dspark.engine.cost import CostTable

        table = CostTable.load(cost) if cost is not None else _profile_cost(target, drafter, config)
    return build_policy(spec, config.block_size, table, DEFAULT_THRESHOLD if threshold is None else threshold)


def _profile_cost(target: LoadedModel, drafter: Drafter, config: EngineConfig):
    from dspark.engine.profile import profile_target

    most = config.max_batch_size * (config.block_size + 1)
    points = sorted({min(2**i, most) for i in range(most.bit_length() + 1)})
    context = max(0, min(256, target.max_position_embeddings - config.block_size - 2))
    requests = sorted({min(2**i, config.max_batch_size) for i in range(config.max_batch_size.bit_length() + 1)})
    log.warning("profiling the target's cost table for %s verify tokens and %s requests (pass a cost table to skip)",
                points, requests)
    return profile_target(target, points, context=context, block_size=config.block_size,
                          feature_layers=drafter.feature_layers, rows=requests)
