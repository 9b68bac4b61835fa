"""Replay recorded rounds under a cost table: what each verification policy would buy at each load.

A *trace* is a list of per-round records, one per request-round of a run that verified every
drafted token (the fixed policy at full block size):

    {"confidences": [c_1, ..., c_k], "accepted": a}            # a <= k drafts accepted
    {"confidences": [], "proposed": k, "accepted": a}          # a drafter without confidences
    optional "request": id                                     # keeps a request's rounds in order
    optional "context": n                                      # the request's cached tokens then

`accepted` is how many drafts a *full* verification accepted, so a request verified to length L
accepts min(a, L) — exact for the realised draws, since the acceptance test of draft j depends
only on positions <= j. Records whose acceptance was cut short by a shorter verification are
censored and must not be recorded (`trace_from_stats` drops them).

The simulator keeps `concurrency` requests active; each replays a recorded request's rounds in
order (or `rounds_per_request` rounds drawn from the pool when records carry no request ids) and
is replaced by a freshly sampled one when its rounds run out. A round that commits fewer tokens
than the record's full verification did leaves the request inside that record, replayed shifted
(`_Lifetime`): every policy does the same work per request, and each policy draws the same
sequence of requests (a paired comparison). `replay="rounds"` consumes one record per round
instead, whatever was committed. A step costs the table's round time for
B = R + sum l_r tokens (per-R curves and padding included when the table has them; when the table
prices context and every record of the step says its context, at the step's longest one, as the
engine prices a round, and the policies see it too), plus, when the
table carries the drafter's timing (`dspark profile --drafter`), one drafting round for the
requests that drafted. A policy with a draft gate is then asked before each step, with that
drafting time, which requests may draft at all (as the engine asks it); a request refused drafts
nothing and commits one token (by position, one token further into its record).
"""

from __future__ import annotations

import inspect
import json
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from dspark.engine.cost import CostTable
from dspark.engine.scheduler import build_policy
from dspark.errors import DSparkError


@dataclass(frozen=True)
class Round:
    confidences: tuple[float, ...] | None  # None: the drafter gave none (policies estimate online)
    proposed: int
    accepted: int
    context: int | None = None  # the request's cached tokens at this round (None: not recorded)


@dataclass(frozen=True)
class SimulationResult:
    policy: str
    concurrency: int
    tokens_per_s: float  # aggregate committed tokens per second
    per_user_tokens_per_s: float  # tokens per second of one request (all stay active all the time)
    mean_verified: float  # drafts verified per request per round
    accept_length: float  # committed tokens per request per round (tau), bonus included
    speedup: float  # tokens_per_s over plain decoding at the same concurrency (R * SPS(R))
    steps: int


# -------------------------------------------------------------------------------------- traces
def parse_round(record: object, where: str = "trace record") -> tuple[Round, object]:
    """One record -> (Round, request id or None), with errors that name the record."""
    if not isinstance(record, Mapping):
        raise DSparkError(f"{where}: expected an object with 'confidences' and 'accepted', got {record!r}")
    conf = record.get("confidences", [])
    if not isinstance(conf, list) or not all(isinstance(c, (int, float)) and 0.0 <= c <= 1.0 for c in conf):
        raise DSparkError(f"{where}: 'confidences' must be a list of numbers in [0, 1], got {conf!r}")
    proposed = record.get("proposed", len(conf))
    accepted = record.get("accepted")
    for key, value in (("proposed", proposed), ("accepted", accepted)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise DSparkError(f"{where}: '{key}' must be an integer >= 0, got {value!r}")
    if conf and proposed != len(conf):
        raise DSparkError(f"{where}: 'proposed' is {proposed} but there are {len(conf)} confidences")
    if accepted > proposed:
        raise DSparkError(f"{where}: 'accepted' {accepted} exceeds the {proposed} drafted tokens")
    context = record.get("context")
    if context is not None and (isinstance(context, bool) or not isinstance(context, int) or context < 0):
        raise DSparkError(f"{where}: 'context' must be an integer >= 0 (cached tokens), got {context!r}")
    return (Round(tuple(float(c) for c in conf) if conf else None, proposed, accepted, context),
            record.get("request"))


def load_trace(source: str | Path | Iterable[Mapping]) -> list[tuple[Round, object]]:
    """A list of records, or a JSONL file of them (one per line)."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise DSparkError(f"trace file {str(path)!r} does not exist")
        out = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DSparkError(f"{path}:{number} is not valid JSON ({err.msg})") from None
            out.append(parse_round(record, f"{path}:{number}"))
    else:
        out = [parse_round(record, f"trace record {i}") for i, record in enumerate(source)]
    if not out:
        raise DSparkError("the trace has no records")
    return out


def trace_from_logs(round_log: Iterable, confidence_log: Iterable, request=None,
                    context: int | None = None) -> list[dict]:
    """Records from one request's round log (verified, accepted, committed) and confidence log.

    A round is kept when its acceptance is known for a full verification: everything drafted was
    verified, or a draft was rejected before the verified prefix ended. With `context` (the
    request's cached tokens at its first round: its prompt's length), each record also says the
    request's context at that round."""
    records = []
    for (verified, accepted, committed), conf in zip(round_log, confidence_log):
        proposed = len(conf) if conf else verified
        if verified == proposed or accepted < verified:
            record = {"confidences": list(conf), "accepted": accepted}
            if not conf:
                record["proposed"] = proposed
            record["request"] = request
            if context is not None:
                record["context"] = context
            records.append(record)
        if context is not None:
            context += committed
    return records


def trace_from_stats(stats: Iterable, request_ids: Iterable | None = None,
                     contexts: Iterable[int] | None = None) -> list[dict]:
    """Records from the engine's RequestStats (round_log + confidence_log) of a verify-all run;
    `contexts`: each request's prompt length, to record every round's context."""
    stats = list(stats)
    ids = list(request_ids) if request_ids is not None else list(range(len(stats)))
    starts = list(contexts) if contexts is not None else [None] * len(stats)
    return [record for s, rid, start in zip(stats, ids, starts)
            for record in trace_from_logs(s.round_log, s.confidence_log, rid, start)]


def save_trace(records: Iterable[Mapping], path: str | Path) -> None:
    Path(path).write_text("".join(json.dumps(dict(r)) + "\n" for r in records))


# ----------------------------------------------------------------------------------- simulation
class _Source:
    """Hands out request lifetimes (lists of rounds), seeded."""

    def __init__(self, rounds: list[tuple[Round, object]], rng: random.Random, rounds_per_request: int):
        groups: dict[object, list[Round]] = {}
        for r, rid in rounds:
            if rid is not None:
                groups.setdefault(rid, []).append(r)
        self.requests = list(groups.values())
        self.pool = [r for r, rid in rounds if rid is None]
        self.rng, self.rounds_per_request = rng, rounds_per_request

    def draw(self) -> list[Round]:
        pick = self.rng.randrange(len(self.requests) + (1 if self.pool else 0))
        if pick < len(self.requests):
            return list(self.requests[pick])
        return [self.rng.choice(self.pool) for _ in range(self.rounds_per_request)]


PolicyFactory = Callable[[], object]
REPLAY_MODES = ("positions", "rounds")


def _factories(policies, block_size: int, cost: CostTable) -> dict[str, PolicyFactory]:
    if isinstance(policies, Mapping):
        return dict(policies)
    return {spec: (lambda spec=spec: build_policy(spec, block_size, cost)) for spec in policies}


def simulate(
    trace: str | Path | Iterable[Mapping],
    cost: CostTable,
    policies: Sequence[str] | Mapping[str, PolicyFactory] = ("none", "fixed", "scheduled"),
    concurrencies: Sequence[int] = (1, 2, 4, 8, 16, 32, 64, 128, 256),
    steps: int = 256,
    seed: int = 0,
    rounds_per_request: int = 32,
    draft_cost: bool = True,
    replay: str = "positions",
) -> list[SimulationResult]:
    """One result per (policy, concurrency). `policies` are `build_policy` specs (block size = the
    longest proposal in the trace) or name -> zero-argument factory of a fresh policy object with
    `decide(confidences, caps, keys)` (and optionally `record(lengths, num_accepted, keys)`; keys
    identify request lifetimes, and `plan(requests, draft_seconds)` for a draft gate). When the
    table prices context and the step's records say theirs, every policy's step is priced at the
    longest, and `decide` is also given it (`context=`) if it takes that argument.
    draft_cost=False leaves the drafter's time (and so the gate) out even if the table has it.
    replay: "positions" (a request replays its records by committed position, see `_Lifetime`) or
    "rounds" (one record per round)."""
    if replay not in REPLAY_MODES:
        raise DSparkError(f"unknown replay mode {replay!r}; valid: {', '.join(REPLAY_MODES)}")
    rounds = load_trace(trace)
    if steps < 1 or rounds_per_request < 1 or any(c < 1 for c in concurrencies):
        raise DSparkError(f"steps, rounds_per_request and concurrencies must be >= 1, got {steps}, "
                          f"{rounds_per_request}, {list(concurrencies)}")
    block_size = max(r.proposed for r, _ in rounds)
    factories = _factories(policies, block_size, cost)
    for factory in factories.values():
        factory()  # refuse a bad policy name before any work
    results = []
    for concurrency in concurrencies:
        for name, factory in factories.items():
            # Same seed for every policy at this concurrency: identical record sequences.
            source = _Source(rounds, random.Random(f"{seed}:{concurrency}"), rounds_per_request)
            results.append(_run(name, factory(), source, cost, concurrency, steps, block_size, draft_cost, replay))
    return results


class _Lifetime:
    """One simulated request: its recorded rounds and where it stands in them.

    By position (the default), a round that commits fewer tokens than the record's full
    verification did leaves the request inside that record: a record that accepted a drafts from
    committed position p says the drafts at p+1..p+a matched, so a round starting d tokens later
    (0 < d <= a) is replayed as that record shifted by d: a - d drafts accepted of the proposed
    - d, confidences from position d + 1 on, context + d. The request moves to its next record when
    it has committed all a + 1 of the record's tokens, so every policy does the same work per request.
    An approximation (a drafter that restarts at p + d may propose differently), but far closer
    than replaying one record per round, which made the text a policy skipped vanish and repeated
    each record's acceptance afresh: a long copy that n-gram drafts get right was worth 7 tokens a
    round to fixed:7 and 3 to fixed:3 *for the same number of rounds*, and fixed:3 looked worse
    than fixed:7 at R = 4 on a HumanEval trace where it measured 6% better.
    By round (`replay="rounds"`): one record per round whatever was committed."""

    def __init__(self, rounds: list[Round], by_position: bool):
        self.rounds, self.by_position = rounds, by_position
        self.index = self.offset = 0

    @property
    def done(self) -> bool:
        return self.index >= len(self.rounds)

    def current(self) -> Round:
        r, d = self.rounds[self.index], self.offset
        if d == 0:
            return r
        return Round(r.confidences[d:] if r.confidences is not None else None, r.proposed - d, r.accepted - d,
                     None if r.context is None else r.context + d)

    def advance(self, accepted: int) -> None:
        """The round accepted `accepted` drafts (<= current().accepted) and committed one token more."""
        self.offset += accepted + 1
        if not self.by_position or self.offset > self.rounds[self.index].accepted:
            self.index, self.offset = self.index + 1, 0


@dataclass
class _Asked:
    """What a policy's plan() reads of a request before drafting (as engine.DraftRequest)."""

    max_tokens: int
    uid: int
    cached: int | None = None  # the request's context (longest_context reads it)


def _run(name: str, policy, source: _Source, cost: CostTable, concurrency: int, steps: int, block_size: int,
         draft_cost: bool, replay: str) -> SimulationResult:
    by_position = replay == "positions"
    active = [_Lifetime(source.draw(), by_position) for _ in range(concurrency)]
    keys = list(range(concurrency))  # one per request lifetime, for per-request statistics
    next_key = concurrency
    record = getattr(policy, "record", None)
    drafts = draft_cost and getattr(policy, "name", name) != "none"  # plain decoding runs no drafter
    draft_s = cost.draft_time(concurrency) if drafts else None
    plan = getattr(policy, "plan", None) if draft_s is not None else None
    # The step's longest context prices the step when the table prices context and the records say
    # theirs (for every policy alike); the policy is told it if its decide() takes it.
    parameters = inspect.signature(policy.decide).parameters
    tell_context = "context" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    seconds = committed = verified = 0.0
    for _ in range(steps):
        current = [lifetime.current() for lifetime in active]
        confidences = [r.confidences for r in current]
        caps = [r.proposed for r in current]
        context = None
        if cost.context_s and all(r.context is not None for r in current):
            context = max(r.context for r in current)
        if draft_s is not None:
            asked = [_Asked(block_size, k, r.context if context is not None else None) for k, r in zip(keys, current)]
            allowed = list(plan(asked, draft_s)) if plan else [block_size] * concurrency
            drafting = sum(1 for n in allowed if n > 0)
            if drafting:
                seconds += cost.draft_time(drafting)
            caps = [min(c, n) for c, n in zip(caps, allowed)]
        if context is None or not tell_context:
            lengths = list(policy.decide(confidences, caps, keys))
        else:
            lengths = list(policy.decide(confidences, caps, keys, context=context))
        assert all(0 <= n <= c for n, c in zip(lengths, caps)), (name, lengths, caps)
        accepted = [min(r.accepted, n) for r, n in zip(current, lengths)]
        if record is not None:
            record(lengths, accepted, keys)
        seconds += cost.round_time(concurrency + sum(lengths), concurrency, 1 + max(lengths, default=0), context)
        committed += sum(accepted) + concurrency
        verified += sum(lengths)
        for i, (lifetime, a) in enumerate(zip(active, accepted)):
            lifetime.advance(a)
            if lifetime.done:
                active[i], keys[i], next_key = _Lifetime(source.draw(), by_position), next_key, next_key + 1
    rate = committed / seconds
    plain = concurrency * cost.sps_at(concurrency, concurrency)
    rounds = steps * concurrency
    return SimulationResult(name, concurrency, rate, rate / concurrency, verified / rounds, committed / rounds,
                            rate / plain, steps)


def results_to_json(results: Sequence[SimulationResult]) -> list[dict]:
    return [asdict(r) for r in results]


def plot_simulation(results: Sequence[SimulationResult], path: str | Path) -> Path:
    """Aggregate and per-user tokens/s against concurrency, one line per policy (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DSparkError("plotting needs matplotlib (pip install matplotlib)") from None
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for policy in dict.fromkeys(r.policy for r in results):
        rows = sorted((r for r in results if r.policy == policy), key=lambda r: r.concurrency)
        xs = [r.concurrency for r in rows]
        left.plot(xs, [r.tokens_per_s for r in rows], marker="o", label=policy)
        right.plot(xs, [r.per_user_tokens_per_s for r in rows], marker="o", label=policy)
    for ax, title in ((left, "aggregate tokens/s"), (right, "tokens/s per request")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    left.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
