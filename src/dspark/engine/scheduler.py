"""Verification policies: how many of each request's drafts one round verifies.

Pure functions on plain lists come first (tested with tables and properties); thin adapters with
the engine's Policy signature follow. Terms (paper §3.2.2):

* c_{r,j}  per-position confidence of request r's draft j (j = 1..K), an estimate of
  P(draft j accepted | drafts < j accepted); computed before draft j is sampled.
* a_{r,j} = prod_{i<=j} c_{r,i}: prefix survival, P(drafts 1..j all accepted).
* B = sum_r (1 + l_r) tokens per verify forward; tau = sum_r (1 + sum_{j<=l_r} a_{r,j}) expected
  committed tokens; throughput Theta = tau * SPS(B).

Losslessness (paper Appendix A, ENGINE-NOTES): a length vector is lossless whenever the decision
"l_r >= j" does not depend on the drafted token x_{r,j} itself. c_{r,j} depends on x_{r,<j} only,
so a_{r,j+1} depends on x_{r,j}; every rule below decides position j from candidates that rank
before (r, j) in the admission order, and the tie rule keeps (r, j+1) after (r, j). The one
exception is `scheduled_lengths(..., early_stop=False)`, kept to demonstrate Appendix A.
"""

from __future__ import annotations

import itertools
import math
import operator
from collections import deque
from collections.abc import Callable, Sequence

from dspark.drafters.base import DraftRequest, Proposal
from dspark.engine.cost import CostTable
from dspark.errors import DSparkError

__all__ = [  # CostTable lives in dspark.engine.cost and is re-exported here
    "POLICY_NAMES", "AsyncScheduledPolicy", "CostTable", "FixedPolicy", "NonePolicy", "OnlineAcceptance",
    "DraftGate", "EstimatedPolicy", "ScheduledPolicy", "ThresholdPolicy", "async_budget", "build_policy", "fixed_lengths", "proposal_inputs",
    "level_lengths", "scheduled_lengths", "threshold_lengths", "top_k_lengths",
]

Confidences = Sequence[Sequence[float]]  # per request, per position (at least max_lengths[r] values)


# ----------------------------------------------------------------------------------- pure rules
def _row(confidences: Confidences, max_lengths: Sequence[int], r: int) -> list[float]:
    """Row r's confidences, cut to its cap and clamped into [0, 1] (NaN counts as 0)."""
    cap = max_lengths[r]
    if cap < 0:
        raise ValueError(f"max_lengths[{r}] = {cap} is negative")
    row = list(confidences[r])
    if len(row) < cap:
        raise ValueError(f"request {r} has {len(row)} confidences but may verify up to {cap} drafts")
    return [min(1.0, max(0.0, c)) if not math.isnan(c) else 0.0 for c in row[:cap]]


def _candidates(confidences: Confidences, max_lengths: Sequence[int]) -> list[tuple[float, int, int]]:
    """Every (a_{r,j}, r, j) with a > 0, in admission order: a descending, ties by (r, j).

    Since c <= 1 makes the rounded product a_{r,j+1} <= a_{r,j}, the order always puts (r, j)
    before (r, j + 1), so admitting a prefix of this list admits a prefix of every request.
    """
    if len(confidences) != len(max_lengths):
        raise ValueError(f"{len(confidences)} confidence rows for {len(max_lengths)} requests")
    out = []
    for r in range(len(max_lengths)):
        a = 1.0
        for j, c in enumerate(_row(confidences, max_lengths, r), 1):
            a *= c
            if a <= 0.0:
                break
            out.append((a, r, j))
    out.sort(key=lambda t: (-t[0], t[1], t[2]))
    return out


def _lengths_of(admitted: Sequence[tuple[float, int, int]], num_rows: int) -> list[int]:
    lengths = [0] * num_rows
    for _, r, j in admitted:
        lengths[r] = max(lengths[r], j)
    return lengths


def fixed_lengths(max_lengths: Sequence[int], k: int) -> list[int]:
    """Verify min(k, cap) drafts of every request."""
    if k < 0:
        raise DSparkError(f"fixed verification length must be >= 0, got {k}")
    return [min(k, m) for m in max_lengths]


def threshold_lengths(confidences: Confidences, max_lengths: Sequence[int], threshold: float) -> list[int]:
    """DeepSpec's static rule: verify up to (not including) the first position whose *own*
    confidence c_{r,j} < threshold (not the product)."""
    lengths = []
    for r in range(len(max_lengths)):
        row = _row(confidences, max_lengths, r)
        lengths.append(next((j for j, c in enumerate(row) if c < threshold), len(row)))
    return lengths


def _greedy_path(candidates: Sequence[tuple[float, int, int]], num_rows: int, cost: CostTable,
                 early_stop: bool) -> int:
    """Algorithm 1's admission walk; returns how many leading candidates reach Theta_best.

    Theta > Theta_best is tested as (tau - tau_best) * SPS(B) > tau_best * (SPS(B_best) - SPS(B)),
    the same inequality rearranged so that a tiny a is not rounded away against a large tau (with
    a flat table every a > 0 must be admitted, however many requests there are).
    """
    best_tau, best_sps, best_n = float(num_rows), cost.sps_at(num_rows, num_rows), 0  # B = R, tau* = R
    gain = 0.0  # tau - tau_best: survival admitted since the best prefix
    for n, (a, _, _) in enumerate(candidates, 1):
        gain += a
        sps = cost.sps_at(num_rows + n, num_rows)
        if gain * sps > best_tau * (best_sps - sps):  # Theta > Theta_best
            best_tau, best_sps, best_n, gain = best_tau + gain, sps, n, 0.0
        elif early_stop:
            break  # Algorithm 1, line 13: the decision never looks past the first non-improving step
    return best_n


def prices_shape(cost: CostTable, context: int | None) -> bool:
    """Whether a round's cost depends on more than B and R: padding, or (given the round's longest
    context) context. Then admission goes level by level, since the first request to verify a j-th
    draft widens the whole round."""
    return bool(cost.padding) or (bool(cost.context_s) and context is not None)


def level_lengths(confidences: Confidences, max_lengths: Sequence[int], cost: CostTable,
                  context: int | None = None) -> list[int]:
    """Admission level by level, for tables that price a round's width (`prices_shape`: padding,
    or context).

    A padded round costs t(B) + c * (R * width - B): the first request to verify a j-th draft
    pays for the padding of every other row, the next ones fill it almost for free. Algorithm 1's
    early stop would halt at that first, expensive admission. Here draft position j is a level:
    among the requests that verify j - 1 drafts and drafted a j-th, the k with the highest
    survival a_{r,j} are admitted, k chosen to maximise Theta = tau / round_time (over `context`
    cached tokens in the longest row, where the table prices context); the search ends at the
    first level where no k > 0 raises Theta. Lossless by the same argument as Algorithm 1's
    early stop: whether request r verifies draft j depends on survivals a_{., <=j}, which depend on
    drafts before j only, never on x_{r,j}.
    """
    rows = len(max_lengths)
    levels: dict[int, list[tuple[float, int]]] = {}  # j -> (a_{r,j}, r), a descending, ties by r
    for a, r, j in _candidates(confidences, max_lengths):
        levels.setdefault(j, []).append((a, r))
    lengths = [0] * rows
    tau, tokens = float(rows), rows
    best = tau / cost.round_time(tokens, rows, 1, context)
    for j in range(1, len(levels) + 1):  # a row with a candidate at j has one at every j' < j
        level = [(a, r) for a, r in levels[j] if lengths[r] == j - 1]
        best_k, gain = 0, 0.0
        for k, (a, _) in enumerate(level, 1):
            gain += a
            theta = (tau + gain) / cost.round_time(tokens + k, rows, j + 1, context)
            if theta > best:
                best, best_k = theta, k
        if best_k == 0:
            break
        for a, r in level[:best_k]:
            lengths[r] = j
            tau += a
        tokens += best_k
    return lengths


def scheduled_lengths(confidences: Confidences, max_lengths: Sequence[int], cost: CostTable,
                      early_stop: bool = True, context: int | None = None) -> list[int]:
    """Algorithm 1 (hardware-aware prefix scheduler), exactly, with early stop.

    early_stop=False is the retrospective global search (the best prefix of the whole admission
    order). It is NOT lossless for confidences that depend on earlier drafts (Appendix A) and exists
    to demonstrate that; `AsyncScheduledPolicy` uses it only on confidences from earlier rounds.
    Deviation from the pseudo-code: with the break removed, line 11 would record only the admitted
    request's length; we return the whole best prefix, the search's evident intent.

    When the time per step t(B) = 1/SPS(B) is non-decreasing and convex in B (t(B+1) - t(B) >= 0
    and non-decreasing; a piecewise-linear table whose slopes are >= 0 and non-decreasing, such as
    `CostTable.gpu_shaped`):
    * Theta along the admission order rises, then falls, so the early stop finds the global best
      prefix and early_stop=False returns the same lengths (the bias of Appendix A needs a
      non-convex table: its t = 1, 2, 2.22 is concave);
    * more requests never lengthen an existing request's verification (tests/test_scheduler.py
      states the proof). With a cliff in t (wave quantisation) both can fail.
    """
    if early_stop and prices_shape(cost, context):  # padding or context to pay: admit level by level
        return level_lengths(confidences, max_lengths, cost, context)
    candidates = _candidates(confidences, max_lengths)
    n = _greedy_path(candidates, len(max_lengths), cost, early_stop)
    return _lengths_of(candidates[:n], len(max_lengths))


def async_budget(confidences: Confidences, max_lengths: Sequence[int], cost: CostTable,
                 context: int | None = None) -> int:
    """§5.2: the total number of drafts K that the global search (no early stop) would verify; with
    a table that prices padding, what level-by-level admission would verify."""
    if prices_shape(cost, context):
        return sum(level_lengths(confidences, max_lengths, cost, context))
    return _greedy_path(_candidates(confidences, max_lengths), len(max_lengths), cost, early_stop=False)


def top_k_lengths(confidences: Confidences, max_lengths: Sequence[int], budget: int,
                  by_level: bool = False) -> list[int]:
    """Admit the `budget` candidates with the highest survival a (Algorithm 1's order and ties).

    by_level: draft position first, survival within a position (for engines that pay for padding:
    the same number of drafts in the fewest positions). Lossless like top-K: (r, j) is admitted by
    its rank among candidates that never include (r, j + 1)."""
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    candidates = _candidates(confidences, max_lengths)
    if by_level:
        candidates.sort(key=lambda t: t[2])  # stable: survival order within each position
    return _lengths_of(candidates[:budget], len(max_lengths))


# ------------------------------------------------------------------------ online acceptance prior
class OnlineAcceptance:
    """Per-position conditional acceptance learned from past rounds, for drafters that give no
    confidences (n-gram, DFlash, Eagle3, draft models), and for the draft gate.

    Pooled over requests, c_j is the posterior mean of P(draft j accepted | drafts < j accepted).
    Position 1 has a Beta(alpha, beta) prior (default Beta(1, 1): 0.5 before any evidence); each
    position j > 1 has a prior of the same weight (alpha + beta trials) centred on the acceptance
    given survival pooled over the other positions 2.., so a deep position that has rarely been
    verified starts from what the other deep ones say rather than from a flat 0.5. This matters:
    acceptance given survival is often much higher past the first draft (an n-gram copy that got
    two tokens right tends to get all seven), and since estimates only learn where something is
    verified, a pessimistic prior on positions the scheduler then never verifies would stay
    pessimistic for ever, while an optimistic one is tried and corrected. (The method estimates
    nothing here: its drafters give confidences.) Given request keys, the pooled counts are kept
    apart by how the request's previous round ended: "accepted" (every verified draft was),
    "rejected", "unverified" (it verified nothing: the policy chose none, or the draft gate kept
    drafting off), or "new" (its first round). Acceptance runs in streaks (an n-gram copy goes on
    until it does not, prose after a rejection stays prose), and a round that commits less than a
    copy's length leaves the rest for the next one: in simulation this took scheduled from 0.96 to
    1.01 of the best fixed length at R = 4 on a HumanEval trace. A request that has not been
    verified for a while is no longer in the streak it was in. (Kept under their last verifying
    round's outcome, requests left behind by a rejection, and "new" ones, whose drafts right after
    the prompt are mostly wrong, kept their low estimates for good, since only verification
    changes them: at 32-64 requests scheduled verified 0.02-0.17 drafts per request where
    verifying one for every request was 9% faster.) Old evidence
    fades: each round that verified something first multiplies all pooled counts by `decay`, so the
    estimates follow the traffic (effective memory ~1 / (1 - decay) rounds). Each request also keeps
    its own counts, shrunk towards the pooled estimate with the weight of `request_prior` trials:
    c_{r,j} = (accepts_{r,j} + m p_j) / (trials_{r,j} + m). Requests differ far more than positions
    do (a prompt to copy from makes n-gram drafts good, free text makes them useless), and the
    scheduler can then verify the requests worth it. A request's own counts fade by `request_decay`
    every round it takes part in, verified or not: a request that looked hopeless drifts back to the
    pooled estimate and is tried again (n-gram drafts that fail in prose may pay in the code that
    follows). Lossless: a round's estimates depend only on earlier rounds' outcomes, never on this
    round's drafts. A pooled position that is never verified follows the other deep positions'
    evidence; the draft gate's probes and the policy's idle-round exploration verify one draft per
    request they pick so that the estimates cannot stay pessimistic for ever.
    """

    def __init__(self, alpha: float = 1.0, beta: float = 1.0, decay: float = 0.99, request_prior: float = 4.0,
                 request_decay: float = 0.9):
        if alpha <= 0 or beta <= 0:
            raise DSparkError(f"Beta prior needs alpha > 0 and beta > 0, got {alpha}, {beta}")
        for name, value in (("decay", decay), ("request_decay", request_decay)):
            if not 0.0 < value <= 1.0:
                raise DSparkError(f"acceptance {name} must be in (0, 1], got {value}")
        if request_prior <= 0:
            raise DSparkError(f"request_prior must be > 0 (trials' worth of the pooled estimate), got {request_prior}")
        self.alpha, self.beta, self.decay, self.request_prior = alpha, beta, decay, request_prior
        self.request_decay = request_decay
        self.trials: list[float] = []  # rounds where draft j was verified and drafts < j accepted (decayed)
        self.accepts: list[float] = []  # of those, rounds where draft j was accepted (decayed)
        self.requests: dict[object, tuple[list[float], list[float]]] = {}  # request key -> (trials, accepts)
        # Request key -> how its previous round ended ("accepted": every verified draft was;
        # "rejected"; "unverified"), and pooled counts per such outcome, decayed with the pooled ones.
        self.outcomes: dict[object, str] = {}
        self.by_outcome: dict[str, tuple[list[float], list[float]]] = {}

    def estimate(self, length: int, key: object = None) -> list[float]:
        """Estimates for positions 1..length: pooled over all rounds without `key`; with it, over
        rounds after the same outcome as request `key`'s previous round, then shrunk to its own
        history."""
        own = self.requests.get(key) if key is not None else None
        # With a key: the rounds of requests whose previous round ended as this one's did.
        trials, accepts = (self.trials, self.accepts) if key is None else \
            self.by_outcome.get(self.outcomes.get(key, "new"), ([], []))
        out = []
        weight = self.alpha + self.beta
        # Prior means: Beta(alpha, beta)'s for position 1; for a deeper position, the acceptance
        # given survival pooled over the other deep positions (under the same prior).
        deep_n, deep_s = sum(trials[1:]), sum(accepts[1:])
        for j in range(length):
            n, s = (trials[j], accepts[j]) if j < len(trials) else (0.0, 0.0)
            # position j's own counts count once: in its likelihood, not also in its prior mean
            mean = (deep_s - s + self.alpha) / (deep_n - n + weight) if j else self.alpha / weight
            pooled = (s + weight * mean) / (n + weight)
            p = pooled
            if own is not None and j < len(own[0]):
                p = (own[1][j] + self.request_prior * pooled) / (own[0][j] + self.request_prior)
            out.append(p)
        return out

    def fill(self, confidences: Sequence[Sequence[float] | None], max_lengths: Sequence[int],
             keys: Sequence[object] | None = None) -> list[list[float]]:
        """The drafter's confidences where given, the online estimates elsewhere."""
        keys = keys if keys is not None else [None] * len(max_lengths)
        return [list(c) if c is not None else self.estimate(m, k) for c, m, k in zip(confidences, max_lengths, keys)]

    def update(self, lengths: Sequence[int], num_accepted: Sequence[int], keys: Sequence[object] | None = None,
               survival: Sequence[Sequence[float]] | None = None) -> None:
        """Record a round. With `keys`, requests absent from it have finished and are forgotten.

        With `survival` (VerifyResult.survival, each verified prefix's acceptance probability given
        the drafts), position j counts survival[j-1] trials and survival[j] accepts (1 trial at
        j = 1): the probability that verification reached draft j and accepted it, instead of
        whether it did. The same expectation without the noise of the acceptance draws (an n-gram
        draft at T = 1 counts the target's probability of it), from every verified draft. At T = 0
        it is the realised count."""
        if keys is not None:
            live = set(keys)
            for key in [k for k in self.outcomes if k not in live]:  # finished
                del self.outcomes[key]
                self.requests.pop(key, None)
            if self.request_decay < 1.0:  # every request with counts has an outcome: all are live
                for key, (trials, accepts) in self.requests.items():
                    self.requests[key] = ([n * self.request_decay for n in trials], [a * self.request_decay for a in accepts])
        if any(length > 0 for length in lengths) and self.decay < 1.0:
            self.trials = [n * self.decay for n in self.trials]
            self.accepts = [s * self.decay for s in self.accepts]
            self.by_outcome = {o: ([n * self.decay for n in t], [s * self.decay for s in a])
                               for o, (t, a) in self.by_outcome.items()}
        for row, (length, a) in enumerate(zip(lengths, num_accepted)):
            tried = min(length, a + 1)  # drafts 1..a accepted, draft a+1 (if verified) rejected
            if survival is not None:  # expected counts over every verified draft
                reached = [1.0, *survival[row][: length - 1]]
                while reached[-1] == 0.0:  # drafts never reached add nothing (as realised counts)
                    reached.pop()
                got = list(survival[row][: len(reached)])
            else:
                reached, got = [1.0] * tried, [float(j < a) for j in range(tried)]
            if tried == 0:
                if keys is not None:
                    self.outcomes[keys[row]] = "unverified"
                continue
            counts = [(self.trials, self.accepts)]
            if keys is not None:
                counts.append(self.requests.setdefault(keys[row], ([], [])))
                # the outcome this round's estimate was conditioned on ("new": its first round)
                counts.append(self.by_outcome.setdefault(self.outcomes.get(keys[row], "new"), ([], [])))
                self.outcomes[keys[row]] = "accepted" if a >= length else "rejected"
            for trials, accepts in counts:
                if len(reached) > len(trials):
                    trials.extend([0.0] * (len(reached) - len(trials)))
                    accepts.extend([0.0] * (len(reached) - len(accepts)))
                for j, (n, s) in enumerate(zip(reached, got)):
                    trials[j] += n
                    accepts[j] += s


def longest_context(requests: Sequence[DraftRequest]) -> int | None:
    """Cached tokens of the longest request in a round (what attention reads, padded rows
    included): len(token_ids) - 1, or a `cached` count (the simulator's requests carry no tokens);
    None when no request says."""
    lengths = []
    for r in requests:
        cached = getattr(r, "cached", None)
        if cached is None and getattr(r, "token_ids", None):
            cached = len(r.token_ids) - 1
        if cached is not None:
            lengths.append(cached)
    return max(lengths, default=None)


def proposal_inputs(requests: Sequence[DraftRequest], proposals: Sequence[Proposal]):
    """(confidences or None per row, cap per row, request key per row) from one engine round."""
    confidences = [p.confidences.tolist() if p.confidences is not None else None for p in proposals]
    caps = [min(len(p), r.max_tokens) for r, p in zip(requests, proposals)]
    return confidences, caps, [r.uid for r in requests]


# ------------------------------------------------------------------------------------ adapters
# Each adapter: decide(confidences, caps, keys=None, context=None) -> lengths on plain lists (the
# simulator calls it; keys identify requests across rounds; context: the round's longest cached
# context, for tables that price it), record(lengths, num_accepted, keys=None) after
# verification, __call__/observe for the engine, last_budget.
class NonePolicy:
    """Verify nothing: every round commits one target token, i.e. plain decoding, through the same engine."""

    name = "none"

    def __init__(self):
        self.last_budget = 0

    def decide(self, confidences, max_lengths, keys=None, context=None) -> list[int]:
        return [0] * len(max_lengths)

    def __call__(self, requests, proposals) -> list[int]:
        return self.decide(*proposal_inputs(requests, proposals))


class FixedPolicy:
    """Verify min(k, drafted) tokens of every request (k = block_size: verify everything)."""

    def __init__(self, k: int):
        fixed_lengths([], k)  # validates k
        self.k, self.name, self.last_budget = k, f"fixed:{k}", 0

    def decide(self, confidences, max_lengths, keys=None, context=None) -> list[int]:
        lengths = fixed_lengths(max_lengths, self.k)
        self.last_budget = sum(lengths)
        return lengths

    def __call__(self, requests, proposals) -> list[int]:
        return self.decide(*proposal_inputs(requests, proposals))


def _in_turn(rows: Sequence[int], count: int, turn: int) -> set[int]:
    """The `turn`-th pick of `count` of `rows` when picks go round them in order (for probes and
    exploration: a few requests at a time, every one in its turn)."""
    first = turn * count
    return {rows[(first + i) % len(rows)] for i in range(count)}


class DraftGate:
    """Whether this round's drafting can pay for itself, decided *before* drafting.

    Algorithm 1 weighs verification cost only: the drafter's own time is already spent when it
    runs. When drafts are rarely accepted (a weak drafter, or high load where the scheduler
    verifies almost nothing), drafting every round then costs more than it buys. The gate compares
    plain decoding, R / t(R), with speculation as Algorithm 1 would schedule it on the realised
    per-position acceptance of past rounds, (R + expected accepted) / (t(B) + draft time), where
    the draft time is what the engine measured on recent rounds. Closed, it still lets a round
    draft after `probe_every` closed rounds, so the estimates follow the traffic. A probe drafts for
    `probe_rows` requests only, taken in turn (a sample is enough to tell whether drafting pays
    again, and a probe of every request cost a weak DSpark drafter ~2% of plain decoding's
    throughput at 16 requests), and verifies at least one draft of each that has no confidences
    (`probing`), or pessimistic estimates could never be revised. Probes also wait long enough
    to cost at most `probe_budget` of the closed rounds' time (one drafting round of every request,
    the measured draft time, an upper bound on a probe's, against plain decoding's rounds; capped
    at `max_probe_every`): DSpark's drafting round costs about half a verify round on this CPU,
    mostly in the shared LM head, and a probe after 16 closed rounds cost ~3% of them.

    When the drafter gives confidences, the policy verifies the drafts they pick, not what the
    estimates would: acceptance learned on those picks is acceptance *given* high confidence, and
    on it the gate would see every request's first draft as good as the picked ones. For such
    rounds the gate reads what the policy's own lengths realised instead (`record`): per request
    that drafted, drafts accepted and drafts verified, and per round the longest verification,
    over the last ~`memory` requests' rounds (probes included, counted at the lengths the policy
    chose before the probe forced one). It judges them once `min_seen` requests' rounds are in
    (open until then): judged on one round, a first draft rejected by chance closed the gate, and
    the builtin SmolLM2 drafter then drafted in no round of a 128-token answer (1.02x plain decoding
    where verifying every draft made 1.37x). Given verification's `survival`, a request's gain is
    its expected accepted count given the drafts (see `record`), and closing shortens the memory
    so that probes can reopen the gate (see `_shorten_memory`).
    Lossless: it uses past rounds only, only lowers how many tokens a drafter may propose, and a
    probe's forced length is fixed before anything is drafted.
    """

    def __init__(self, cost: CostTable, acceptance: OnlineAcceptance, probe_every: int = 16,
                 max_probe_every: int = 256, probe_rows: int = 4, memory: float = 64.0,
                 probe_budget: float = 0.01, min_seen: float = 4.0):
        if memory < 1:
            raise DSparkError(f"gate memory must be >= 1 request-round, got {memory}")
        if not 0.0 < probe_budget <= 1.0:
            raise DSparkError(f"probe_budget must be in (0, 1] (a share of the closed rounds' time), got {probe_budget}")
        if not 1 <= probe_every <= max_probe_every:
            raise DSparkError(f"need 1 <= probe_every <= max_probe_every, got {probe_every}, {max_probe_every}")
        if probe_rows < 1:
            raise DSparkError(f"probe_rows must be >= 1 request, got {probe_rows}")
        self.probe_rows, self.probes, self.probe_budget = probe_rows, 0, probe_budget
        self.cost, self.acceptance = cost, acceptance
        self.probe_every, self.max_probe_every = probe_every, max_probe_every
        self.closed_rounds = 0
        self.is_open = True
        self.probing = False  # this round drafts only because a probe is due
        # What the policy's lengths realised on confident drafters' rounds (decayed sums over the
        # requests that drafted; `widest` over rounds); `confident`: the last drafting round had
        # drafter confidences.
        self.memory, self.confident, self.min_seen = memory, False, min_seen
        self.seen = self.gained = self.verified = self.widest = 0.0

    def record(self, chosen: Sequence[int], caps: Sequence[int], num_accepted: Sequence[int],
               confident: bool, survival: Sequence[Sequence[float]] | None = None) -> None:
        """A verified round: `chosen` are the policy's own lengths (before a probe forced any),
        `caps` what each request drafted, `num_accepted` what verification accepted, `survival`
        (when given) each verified prefix's acceptance probability (VerifyResult.survival)."""
        if survival is None:
            # A forced longer verification accepted a; the policy's n would have accepted min(a, n)
            # (acceptance of draft j depends on drafts <= j only).
            gains = [float(min(a, n)) for n, a in zip(chosen, num_accepted)]
        else:
            # The expected count given the drafts, sum(survival[:n]): the same mean without the
            # acceptance draws' noise. At temperature 1 that noise closed the builtin drafter's gate
            # on a run of unlucky rounds although drafting paid on average.
            gains = [float(sum(row[:n])) for n, row in zip(chosen, survival)]
        drafted = [(n, g) for n, cap, g in zip(chosen, caps, gains) if cap > 0]
        if not drafted:
            return
        # Every drafting round counts, with confidences or without: a drafter with prompt lookup in
        # front of DSpark drafts some rounds without, and what they realise is part of what
        # drafting buys. Drafters that never give confidences are judged on the estimates instead.
        self.confident = confident
        keep = (1.0 - 1.0 / self.memory) ** len(drafted)
        self.gained = keep * self.gained + sum(g for _, g in drafted)
        self.verified = keep * self.verified + sum(n for n, _ in drafted)
        widest = max(n for n, _ in drafted)
        self.widest = widest if self.seen == 0 else 0.8 * self.widest + 0.2 * widest
        self.seen = keep * self.seen + len(drafted)

    def _realised_rate(self, max_lengths: Sequence[int], draft_seconds: float, context: int | None) -> float:
        """Tokens per second if every request that can draft did, and did as well as lately.

        Per request that drafted a non-empty proposal (a drafter that often proposes nothing
        would look better here than it is; DSpark fills its block). `memory` counts requests, not
        rounds: 16 requests' outcomes are as many samples in one round of 16 as in 16 rounds of one."""
        rows, drafting = len(max_lengths), sum(1 for m in max_lengths if m > 0)
        gained, verified = drafting * self.gained / self.seen, drafting * self.verified / self.seen
        width = 1 + min(self.widest, max(max_lengths))
        return (rows + gained) / (self.cost.round_time(rows + verified, rows, width, context) + draft_seconds)

    def allow(self, max_lengths: Sequence[int], draft_seconds: float | None,
              keys: Sequence[object] | None = None, context: int | None = None) -> bool:
        rows = len(max_lengths)
        self.probing = False
        if draft_seconds is None or rows == 0 or max(max_lengths) == 0:
            return True
        plain_time = self.cost.round_time(rows, rows, 1, context)
        # Closed rounds between probes so that probing costs at most probe_budget of their time.
        floor = min(math.ceil(draft_seconds / (self.probe_budget * plain_time)), self.max_probe_every)
        if self.confident and self.seen > 0:
            if self.seen < self.min_seen:  # too few outcomes yet: one unlucky first round closed it
                return self._decide(True, floor)
            return self._decide(self._realised_rate(max_lengths, draft_seconds, context) > rows / plain_time, floor)
        # Algorithm 1's admission on the estimates: the admitted candidates' survivals are the
        # expected accepted drafts, their count the verified ones.
        keys = keys if keys is not None else [None] * rows
        estimates = [self.acceptance.estimate(m, k) for m, k in zip(max_lengths, keys)]
        # Bound first: every draft's survival, verified for free. When even that cannot pay for
        # the drafting, the gate is closed without the search (a weak drafter's gate stays closed
        # for most rounds, and the search over many requests costs ~0.3 ms per round). It is the
        # search's answer when a round never costs less than plain decoding's: true of profiled
        # tables (stored non-decreasing) at or above the profiled context; a hand-made table that
        # falls, or a context far below the profiled one, could make it close a little early.
        bound = sum(sum(itertools.accumulate(e, operator.mul)) for e in estimates)
        if (rows + bound) / (plain_time + draft_seconds) <= rows / plain_time:
            speculative = 0.0
        else:
            lengths = scheduled_lengths(estimates, max_lengths, self.cost, context=context)
            expected = sum(sum(itertools.accumulate(e[:n], operator.mul)) for e, n in zip(estimates, lengths))
            verify_time = self.cost.round_time(rows + sum(lengths), rows, 1 + max(lengths), context)
            speculative = (rows + expected) / (verify_time + draft_seconds)
        return self._decide(speculative > rows / plain_time, floor)

    def _decide(self, pays: bool, floor: int) -> bool:
        """Open or closed; closed, a probe every max(probe_every, floor) rounds.

        The wait does not grow when a probe finds the gate still closed: the floor already holds
        probing to `probe_budget` of the closed rounds' time, and doubling the wait kept a gate
        that a poor stretch had closed shut for the rest of a run. With that and 64 request-rounds
        of memory (16 before), replays of the builtin drafter's T = 1 rounds (8 ms drafting against
        36 ms rounds, four request orders) went from 1.00-1.19x plain decoding to 1.10-1.25x, and
        with 20 ms drafting, which cannot pay, the gate still keeps drafting off (docs/serving.md,
        "Long memory, steady probes")."""
        if self.is_open and not pays:
            self._shorten_memory()
        self.is_open = pays
        if self.is_open:
            self.closed_rounds = 0
            return True
        self.closed_rounds += 1
        if self.closed_rounds >= max(self.probe_every, floor):
            self.closed_rounds, self.probing = 0, True
            return True
        return False

    def _shorten_memory(self) -> None:
        """On closing, keep what the policy realised at the weight of `min_seen` requests' rounds.

        Closed, the gate learns from probes only, one request-round every `probe_every` rounds or
        more. At full memory each probe moved the average by 1/`memory`: after a run of poor
        rounds closed the gate, the builtin drafter at temperature 1 stayed closed for hundreds of
        rounds (62% of a GSM8K run) although drafting paid on average. The ratio, and so the
        decision, is unchanged; a probe now weighs about a fifth of what the gate next judges."""
        if self.seen > self.min_seen:
            shrink = self.min_seen / self.seen
            self.seen, self.gained, self.verified = self.min_seen, self.gained * shrink, self.verified * shrink

    def probe_caps(self, caps: Sequence[int]) -> list[int]:
        """A probe round's draft caps: `probe_rows` of the requests that can draft, in turn."""
        able = [i for i, cap in enumerate(caps) if cap > 0]
        if len(able) <= self.probe_rows:
            return list(caps)
        chosen = _in_turn(able, self.probe_rows, self.probes)
        self.probes += 1
        return [cap if i in chosen else 0 for i, cap in enumerate(caps)]


class EstimatedPolicy:
    """A pure length rule applied to each round's confidences (and the round's longest context,
    which a table that prices context reads; the committed tokens fix it, so it says nothing of the
    drafts); rows without confidences get
    `OnlineAcceptance` estimates (past rounds only, so still lossless). With `draft_gate`, the
    engine asks `plan` before drafting how many tokens each request may propose (see DraftGate).

    Estimates only change where something is verified, so once they say "not worth it" they would
    stay so. After `explore_every` rounds in a row in which rows with estimates had drafts and none
    was verified, the next such round verifies one draft of `explore_rows` of them, taken in turn
    (and so does a draft gate's probe, for every request it lets draft that has no confidences).
    A few samples are enough to revise pooled estimates; one draft of every request cost 0.6-1.3%
    of plain decoding's throughput at 64-256 requests in simulation on a GPU-shaped table, where
    verifying does not pay. The choice is fixed by past rounds, so it stays lossless."""

    def __init__(self, name: str, rule: Callable[[Confidences, Sequence[int], int | None], list[int]],
                 prior: OnlineAcceptance | None = None, draft_gate: bool = False, explore_every: int = 16,
                 explore_rows: int = 4, **settings):
        if explore_every < 1:
            raise DSparkError(f"explore_every must be >= 1 round, got {explore_every}")
        if explore_rows < 1:
            raise DSparkError(f"explore_rows must be >= 1 request, got {explore_rows}")
        self.name, self.rule, self.last_budget = name, rule, 0
        self.explore_every, self.idle_rounds = explore_every, 0
        self.explore_rows, self._explorations = explore_rows, 0
        self.acceptance = prior or OnlineAcceptance()
        self.__dict__.update(settings)  # e.g. threshold, cost: visible to callers and metrics
        self.gate = DraftGate(settings["cost"], self.acceptance) if draft_gate else None
        # This round's chosen lengths, caps and which rows had confidences, until recorded.
        self._chosen: tuple[list[int], list[int], list[bool]] | None = None

    def plan(self, requests: Sequence[DraftRequest], draft_seconds: float | None) -> list[int]:
        """Most tokens each request may draft this round (all of them unless the gate is closed)."""
        caps = [r.max_tokens for r in requests]
        if self.gate is None:
            return caps
        if not self.gate.allow(caps, draft_seconds, [r.uid for r in requests], longest_context(requests)):
            return [0] * len(caps)
        return self.gate.probe_caps(caps) if self.gate.probing else caps

    def decide(self, confidences, max_lengths, keys=None, context=None) -> list[int]:
        lengths = self.rule(self.acceptance.fill(confidences, max_lengths, keys), max_lengths, context)
        # The policy's own choice, for the gate's record of what it realises (before any forcing).
        self._chosen = (list(lengths), list(max_lengths), [c is not None for c in confidences])
        estimated = [c is None and cap > 0 for c, cap in zip(confidences, max_lengths)]
        explore = [False] * len(lengths)
        if any(estimated):
            if any(n > 0 for n, e in zip(lengths, estimated) if e):
                self.idle_rounds = 0
            else:
                self.idle_rounds += 1
                if self.idle_rounds > self.explore_every:
                    explore, self.idle_rounds = self._explore_rows(estimated), 0
        if self.gate is not None and self.gate.probing:
            # The probe's point is to learn: estimates only from verified drafts. Rows with
            # confidences are judged by what the policy's own lengths realise (DraftGate.record),
            # which needs no forced verification.
            explore = estimated
        lengths = [max(n, min(1, cap)) if e else n for n, cap, e in zip(lengths, max_lengths, explore)]
        self.last_budget = sum(lengths)
        return lengths

    def _explore_rows(self, estimated: list[bool]) -> list[bool]:
        """An exploring round's rows: `explore_rows` of the estimated ones, taken in turn."""
        rows = [i for i, e in enumerate(estimated) if e]
        if len(rows) <= self.explore_rows:
            return estimated
        chosen = _in_turn(rows, self.explore_rows, self._explorations)
        self._explorations += 1
        return [i in chosen for i in range(len(estimated))]

    def record(self, lengths, num_accepted, keys=None, survival=None) -> None:
        round_, self._chosen = self._chosen, None
        if round_ is not None and len(round_[2]) == len(lengths):
            # Estimates stand in for confidences, so they learn from rows that had none: drafts a
            # drafter's confidences picked are accepted more often than its drafts at large (and a
            # drafter with prompt lookup in front mixes both kinds of row).
            lengths = [0 if c else n for n, c in zip(lengths, round_[2])]
        self.acceptance.update(lengths, num_accepted, keys, survival)
        if self.gate is not None and round_ is not None:
            chosen, caps, had = round_
            confident = any(c for c, cap in zip(had, caps) if cap > 0)
            self.gate.record(chosen, caps, num_accepted, confident, survival)

    def __call__(self, requests, proposals) -> list[int]:
        return self.decide(*proposal_inputs(requests, proposals), longest_context(requests))

    def observe(self, requests, lengths, num_accepted, survival=None) -> None:
        self.record(lengths, num_accepted, [r.uid for r in requests], survival)


def ThresholdPolicy(threshold: float, prior: OnlineAcceptance | None = None) -> EstimatedPolicy:  # noqa: N802
    """DeepSpec's static confidence cut."""
    if not 0.0 <= threshold <= 1.0:
        raise DSparkError(f"confidence threshold must be in [0, 1], got {threshold}")
    return EstimatedPolicy(f"threshold:{threshold:g}", lambda c, m, _: threshold_lengths(c, m, threshold), prior,
                           threshold=threshold)


def ScheduledPolicy(cost: CostTable, prior: OnlineAcceptance | None = None,  # noqa: N802
                    draft_gate: bool = False) -> EstimatedPolicy:
    """Algorithm 1 with early stop on each round's own confidences."""
    return EstimatedPolicy("scheduled", lambda c, m, ctx: scheduled_lengths(c, m, cost, context=ctx), prior, draft_gate,
                           cost=cost)


class _AsyncRule:
    """The budget of round t from round t - lag's confidences, then top-K on the current ones."""

    def __init__(self, cost: CostTable, lag: int):
        self.cost, self.lag = cost, lag
        self._budgets: deque[int] = deque()  # budgets of the last `lag` rounds, oldest first

    def __call__(self, filled: Confidences, max_lengths: Sequence[int], context: int | None = None) -> list[int]:
        if max(max_lengths, default=0) == 0:
            # Nothing drafted (e.g. a closed draft gate): budgets from such rounds would say 0 and
            # starve the next drafting round, so start over with Algorithm 1 there.
            self._budgets.clear()
            return [0] * len(max_lengths)
        if len(self._budgets) >= self.lag:
            lengths = top_k_lengths(filled, max_lengths, self._budgets.popleft(),
                                    by_level=prices_shape(self.cost, context))
        else:
            lengths = scheduled_lengths(filled, max_lengths, self.cost, context=context)
        # What a pipelined engine would compute now, alongside this round's verification, for round t + lag.
        self._budgets.append(async_budget(filled, max_lengths, self.cost, context))
        return lengths


def AsyncScheduledPolicy(cost: CostTable, lag: int = 2, prior: OnlineAcceptance | None = None,  # noqa: N802
                         draft_gate: bool = False) -> EstimatedPolicy:
    """§5.2: the budget K of round t is the global search (no early stop) over round t - `lag`'s
    confidences; round t admits the K candidates with the highest *current* survival (top-K).

    Lossless: K is fixed before round t drafts anything, and top-K admits (r, j) by its rank among
    candidates that never include (r, j+1), so "l_r >= j" does not depend on x_{r,j}. The first
    `lag` rounds have no history and fall back to Algorithm 1 with early stop. Rows without
    confidences use `OnlineAcceptance`.
    """
    if lag < 1:
        raise DSparkError(f"async scheduling lag must be >= 1 round, got {lag}")
    return EstimatedPolicy("async", _AsyncRule(cost, lag), prior, draft_gate, cost=cost, lag=lag)


POLICY_NAMES = ("none", "fixed", "threshold", "scheduled", "async")
DEFAULT_THRESHOLD = 0.5  # our choice; DeepSpec's --confidence-threshold defaults to 0 (off)


def build_policy(spec: str, block_size: int, cost: CostTable | None = None,
                 threshold: float = DEFAULT_THRESHOLD, draft_gate: bool = True):
    """'none' | 'fixed[:K]' (K defaults to block_size) | 'threshold[:C]' | 'scheduled' | 'async'.
    scheduled and async come with the DraftGate unless draft_gate=False."""
    name, _, arg = spec.strip().partition(":")
    valid = "none, fixed[:K], threshold[:C], scheduled, async"
    if name not in POLICY_NAMES:
        raise DSparkError(f"unknown verification policy {spec!r}; valid: {valid}")
    if arg and name not in ("fixed", "threshold"):
        raise DSparkError(f"policy {name!r} takes no ':' argument, got {spec!r}; valid: {valid}")
    try:
        value = (int(arg) if name == "fixed" else float(arg)) if arg else None
    except ValueError:
        raise DSparkError(f"policy {spec!r}: {arg!r} is not a number") from None
    if name == "none":
        return NonePolicy()
    if name == "fixed":
        return FixedPolicy(block_size if value is None else value)
    if name == "threshold":
        return ThresholdPolicy(threshold if value is None else value)
    if cost is None:
        raise DSparkError(f"policy {name!r} needs a cost table (measure one with `dspark profile`)")
    if name == "scheduled":
        return ScheduledPolicy(cost, draft_gate=draft_gate)
    return AsyncScheduledPolicy(cost, draft_gate=draft_gate)

