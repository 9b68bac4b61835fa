"""Verification policies: hand-computed tables, the load property and its exact condition, the
paper's Appendix A counterexample, losslessness through the engine, cost tables, profiling and the
trace simulator."""

from __future__ import annotations

import collections
import itertools
import json
import random
import statistics

import pytest
import torch

from dspark.config import EngineConfig, SamplingParams, StopParams
from dspark.drafters.base import DraftRequest, Proposal
from dspark.drafters.draft_model import DraftModelDrafter
from dspark.drafters.simple import NgramDrafter
from dspark.engine.engine import Engine, Request, verify_all
from dspark.engine.profile import convex_times, device_name, even_rows, profile_target
from dspark.engine.scheduler import (
    AsyncScheduledPolicy, CostTable, DraftGate, EstimatedPolicy, NonePolicy, OnlineAcceptance, ScheduledPolicy,
    async_budget, build_policy, fixed_lengths, level_lengths, scheduled_lengths, threshold_lengths, top_k_lengths,
)
from dspark.engine.simulate import load_trace, plot_simulation, save_trace, simulate, trace_from_stats
from dspark.engine.verify import residual_probs
from dspark.errors import DSparkError
from dspark.models.target import load_model
from tests.conftest import tv_bound
from tests.test_drafters import make
from tests.test_engine import DIST_CASES, VOCAB4_PROMPT, exact_joint, expected_greedy, vocab4_models

TWO_ROWS = [[0.9, 0.5], [0.6, 0.9]]  # survival a: row 0 (0.9, 0.45), row 1 (0.6, 0.54)


def table(sps_by_tokens: dict[int, float]) -> CostTable:
    return CostTable(tuple(sps_by_tokens), tuple(sps_by_tokens.values()))


# --------------------------------------------------------------------------- pure rules by hand
def test_level_admission_fills_the_padding_that_algorithm_1_stops_at():
    """1 ms per verified token, 4 ms per padded one (t(2) = 10 ms): going one draft deeper costs the
    first request the padding of the other, so admission proceeds by draft position."""
    cost = CostTable((2, 10), (100.0, 1000 / 18), padding=((2, 0.004),))
    confidences = [[0.9, 0.9], [0.8, 0.1]]  # survival: row 0 (0.9, 0.81), row 1 (0.8, 0.08)
    # level 1: both rows (Theta 3.7 / 12 ms beats 2.9 / 15 ms and 2 / 10 ms); level 2: both again
    # (4.59 / 14 ms beats 4.51 / 17 ms and 3.7 / 12 ms)
    assert level_lengths(confidences, [2, 2], cost) == scheduled_lengths(confidences, [2, 2], cost) == [2, 2]
    assert cost.round_time(3, 2, 2) == pytest.approx(0.015)
    unpadded = CostTable((2, 10), (100.0, 1000 / 18))  # Algorithm 1 on B alone
    assert scheduled_lengths(confidences, [2, 2], unpadded) == [2, 1]
    # row 1 drafted nothing: row 0 alone would pay row 1's padding, 2.9 / 15 ms < 2 / 10 ms
    assert level_lengths(confidences, [1, 0], cost) == [0, 0]
    assert level_lengths(confidences, [1, 0], CostTable((2, 10), (100.0, 1000 / 18), padding=((2, 0.001),))) == [1, 0]
    assert async_budget(confidences, [2, 2], cost) == 4  # the async budget is what level admission verifies
    assert async_budget(confidences, [1, 0], cost) == 0


def test_a_longer_context_makes_deep_levels_dearer():
    """Attention reads every row's keys up to the longest context in the round, padded rows
    included, so a wide round over a long context costs more than the profiled curves say."""
    cost = CostTable((2, 10), (100.0, 1000 / 18), padding=((2, 0.001),), context=100,
                     context_s=((2, (0.0, 0.00005)),))  # 2 rows: per cached token more, 0.05 ms per extra column
    confidences = [[0.9, 0.9], [0.8, 0.1]]  # survival: row 0 (0.9, 0.81), row 1 (0.8, 0.08)
    assert cost.round_time(4, 2, 2, context=100) == cost.round_time(4, 2, 2)  # at the profiled context
    assert cost.round_time(4, 2, 2, context=300) == pytest.approx(cost.round_time(4, 2, 2) + 200 * 0.00005)
    assert cost.round_time(2, 2, 1, context=300) == cost.round_time(2, 2, 1)  # width 1: no column term here
    # t(B) = 8 ms + 1 ms per token, 1 ms per padded token; over 150 cached tokens each column adds
    # 2.5 ms: level 1 takes both rows (3.7 / 14.5 ms > 2 / 10 ms), level 2 neither (4.51 / 19 ms and
    # 4.59 / 19 ms < 3.7 / 14.5 ms); over 300, 10 ms: not even level 1 (3.7 / 22 ms).
    assert level_lengths(confidences, [2, 2], cost) == [2, 2]
    assert level_lengths(confidences, [2, 2], cost, context=150) == scheduled_lengths(confidences, [2, 2], cost,
                                                                                       context=150) == [1, 1]
    assert level_lengths(confidences, [2, 2], cost, context=300) == [0, 0]
    assert cost.context_at(4, 2, 300) == pytest.approx(2 * cost.context_at(2, 2, 300))  # per request beyond R = 2
    assert CostTable.from_json(json.loads(json.dumps(cost.to_json()))) == cost
    with pytest.raises(DSparkError, match="context it was measured at"):
        CostTable((1,), (1.0,), context_s=((1, (0.0, 0.0)),))
    with pytest.raises(DSparkError, match="context must be an integer"):
        CostTable.from_json({**CostTable((1,), (1.0,)).to_json(), "context": "abc"})
    bare = CostTable((1,), (1.0,), context=64)  # a context without a context term still round-trips
    assert CostTable.from_json(bare.to_json()) == bare
    # Without padding data, the context term alone makes admission go level by level.
    unpadded = CostTable((2, 10), (100.0, 1000 / 18), context=100, context_s=((2, (0.0, 0.00005)),))
    assert scheduled_lengths(confidences, [2, 2], unpadded, context=100) == [2, 1]  # no padding: row 1 stays short
    assert scheduled_lengths(confidences, [2, 2], unpadded, context=300) == [0, 0]
    assert async_budget(confidences, [2, 2], unpadded, context=300) == 0
    with pytest.raises(DSparkError, match="context_s"):
        CostTable.from_json({**cost.to_json(), "context_s": {"2": [0.1]}})


def test_the_policy_prices_the_rounds_longest_context():
    cost = CostTable((2, 10), (100.0, 1000 / 18), padding=((2, 0.001),), context=100, context_s=((2, (0.0, 0.00005)),))
    policy = build_policy("scheduled", 2, cost, draft_gate=False)
    requests = [DraftRequest(0, list(range(151)), 2, SamplingParams(), None, 0),
                DraftRequest(1, list(range(50)), 2, SamplingParams(), None, 1)]
    proposals = [Proposal(torch.tensor([1, 2]), None, torch.tensor(c)) for c in ([0.9, 0.9], [0.8, 0.1])]
    assert policy(requests, proposals) == [1, 1]  # the longest context (150 cached tokens) counts
    assert policy.decide([[0.9, 0.9], [0.8, 0.1]], [2, 2]) == [2, 2]  # unknown context: the profiled one


def test_fixed_and_threshold_lengths_by_hand():
    assert fixed_lengths([3, 0, 5], 4) == [3, 0, 4]
    confs = [[0.9, 0.4, 0.95], [0.3, 0.9, 0.9], [0.8, 0.8, 0.8]]
    # DeepSpec's rule looks at each position's own confidence, not the product (0.8^2 < 0.7).
    assert threshold_lengths(confs, [3, 3, 2], 0.5) == [1, 0, 2]
    assert threshold_lengths(confs, [3, 3, 3], 0.7) == [1, 0, 3]
    with pytest.raises(DSparkError, match="-1"):
        fixed_lengths([3], -1)


def test_scheduled_lengths_follow_algorithm_1_by_hand():
    # Order: (0.9, r0 j1), (0.6, r1 j1), (0.54, r1 j2), (0.45, r0 j2). Theta = tau * SPS(B):
    # B=2: 2*10 = 20; B=3: 2.9*10 = 29; B=4: 3.5*9 = 31.5; B=5: 4.04*7 = 28.28 -> stop.
    cost = table({2: 10.0, 3: 10.0, 4: 9.0, 5: 7.0, 6: 8.0})
    assert scheduled_lengths(TWO_ROWS, [2, 2], cost) == [1, 1]
    # Without the early stop the search also sees B=6: 4.49*8 = 35.92 > 31.5 and takes all four.
    assert scheduled_lengths(TWO_ROWS, [2, 2], cost, early_stop=False) == [2, 2]
    assert async_budget(TWO_ROWS, [2, 2], cost) == 4
    assert top_k_lengths(TWO_ROWS, [2, 2], 3) == [1, 2]  # r1 j2 (0.54) before r0 j2 (0.45)
    deep_first = [[0.9, 0.9], [0.5, 0.9]]  # survival: r0 (0.9, 0.81), r1 (0.5, 0.45)
    assert top_k_lengths(deep_first, [2, 2], 2) == [2, 0]
    assert top_k_lengths(deep_first, [2, 2], 2, by_level=True) == [1, 1]  # first drafts before second ones
    assert top_k_lengths(deep_first, [2, 2], 3, by_level=True) == [2, 1]
    assert scheduled_lengths(TWO_ROWS, [0, 2], cost) == [0, 2]  # caps bound the candidates
    assert scheduled_lengths([], [], cost) == []


def test_ties_keep_each_request_a_prefix():
    """Equal survival (c = 1) must admit (r, j) before (r, j + 1); ties across rows go by row."""
    confs = [[1.0, 1.0, 1.0], [1.0, 1.0, 0.5]]
    for budget in range(7):
        lengths = top_k_lengths(confs, [3, 3], budget)
        assert sum(lengths) == min(budget, 6)
    assert top_k_lengths(confs, [3, 3], 2) == [2, 0]
    assert top_k_lengths([[0.0, 1.0]], [2], 2) == [0]  # a = 0: never a candidate


def test_flat_table_verifies_every_draft_with_positive_survival_even_under_load():
    confs = [[0.9, 1e-12, 0.5]] * 300 + [[0.0, 0.9, 0.9]]
    assert scheduled_lengths(confs, [3] * 301, CostTable.flat(100.0)) == [3] * 300 + [0]


def random_case(rng: random.Random, num_rows: int, k: int):
    power = rng.choice([0.1, 0.5, 1.0, 3.0])
    confs = [[rng.random() ** power for _ in range(k)] for _ in range(num_rows)]
    return confs, [rng.randint(0, k) for _ in range(num_rows)]


def random_convex_table(rng: random.Random) -> CostTable:
    """Time per step at sparse integer points with non-negative, non-decreasing slopes; the table's
    linear interpolation (and extrapolation) of time is then convex and non-decreasing in B."""
    tokens = sorted(rng.sample(range(1, 60), rng.randint(1, 6)))
    slopes = sorted(rng.choice([0.0, rng.expovariate(1.0) * rng.choice([0.01, 0.1, 1.0])]) for _ in tokens[1:])
    times = [rng.uniform(0.01, 2.0)]
    for (x0, x1), s in zip(itertools.pairwise(tokens), slopes):
        times.append(times[-1] + s * (x1 - x0))
    return CostTable(tuple(tokens), tuple(1.0 / t for t in times))


def test_lengths_stay_within_caps_for_every_rule():
    rng = random.Random(0)
    for _ in range(300):
        confs, caps = random_case(rng, rng.randint(1, 6), rng.randint(0, 7))
        cost = random_convex_table(rng)
        for lengths in (scheduled_lengths(confs, caps, cost), scheduled_lengths(confs, caps, cost, early_stop=False),
                        threshold_lengths(confs, caps, rng.random()), top_k_lengths(confs, caps, rng.randint(0, 20)),
                        fixed_lengths(caps, rng.randint(0, 8))):
            assert all(0 <= n <= c for n, c in zip(lengths, caps)) and len(lengths) == len(caps)


# --------------------------------------------------------------------- more load, never longer
def test_more_requests_never_lengthen_an_existing_requests_verification():
    """Condition: the time per step t(B) = 1/SPS(B) is non-decreasing and
    convex on the integers (t(B+1) - t(B) >= 0 and non-decreasing). Sketch: let Algorithm 1 stop the
    smaller batch before old candidate u at state (tau, B), so u*t(B) <= tau*dt(B). In the larger
    batch, reaching u means admitting the same old prefix plus extras e (the new pending tokens,
    value 1, and new candidates, each >= u) of total value W >= e*u; convexity gives
    t(B+e) <= t(B) + e*dt(B+e) and dt(B) <= dt(B+e), so u*t(B+e) <= (tau + W)*dt(B+e): u is refused
    there too. Ties and insertion positions do not matter."""
    rng = random.Random(1)
    checked = shortened = 0
    for _ in range(500):
        cost = random_convex_table(rng)
        k = rng.randint(1, 6)
        confs, caps = random_case(rng, rng.randint(1, 8), k)
        before = scheduled_lengths(confs, caps, cost)
        more_confs, more_caps, old_rows = list(confs), list(caps), list(range(len(caps)))
        for _ in range(rng.randint(1, 3)):
            extra_confs, extra_caps = random_case(rng, 1, k)
            at = rng.randint(0, len(more_caps))
            more_confs.insert(at, extra_confs[0])
            more_caps.insert(at, extra_caps[0])
            old_rows = [r + (r >= at) for r in old_rows]
        after = scheduled_lengths(more_confs, more_caps, cost)
        for r, r_after in enumerate(old_rows):
            assert after[r_after] <= before[r], (cost, confs, caps, more_confs, more_caps)
        checked += sum(before) > 0
        shortened += any(after[r_after] < before[r] for r, r_after in enumerate(old_rows))
    assert checked > 100 and shortened > 50, f"weak cases: {checked} verified something, {shortened} shortened"


def test_with_convex_time_the_early_stop_finds_the_global_best_prefix():
    """Under the same condition Theta rises then falls along the admission order (once an item
    fails to raise it, no later, smaller item can), so the retrospective search changes nothing."""
    rng = random.Random(2)
    for _ in range(300):
        cost = random_convex_table(rng)
        confs, caps = random_case(rng, rng.randint(1, 8), rng.randint(1, 6))
        early = scheduled_lengths(confs, caps, cost)
        assert scheduled_lengths(confs, caps, cost, early_stop=False) == early
        assert async_budget(confs, caps, cost) == sum(early)


def test_a_cliff_in_the_cost_table_breaks_the_load_property():
    """Without convexity the property is false: time jumps 1 -> 2 at B = 9 (a wave-quantisation
    cliff). 8 requests stop at B = 8, but 9 requests already pay for B = 9 and fill up to B = 16."""
    cliff = table({8: 1.0, 9: 0.5, 16: 0.5, 17: 1 / 3})
    assert scheduled_lengths([[0.9]] * 8, [1] * 8, cliff) == [0] * 8
    assert scheduled_lengths([[0.9]] * 9, [1] * 9, cliff) == [1] * 7 + [0] * 2


# --------------------------------------------------------------------------- paper Appendix A
def first_token_distribution(early_stop: bool) -> list[float]:
    """Exact law of the first output token (vocabulary {A, B}) when the scheduler decides the length
    after the draft x1 was sampled, as Appendix A sets up: c1 = 0.8 before x1, c2 = 0.9 after A and
    0 after B; SPS(1) = 1, SPS(2) = 0.5, SPS(3) = 0.45."""
    target = torch.tensor([0.7, 0.3], dtype=torch.float64)
    draft = torch.tensor([0.5, 0.5], dtype=torch.float64)
    c2 = [0.9, 0.0]
    cost = table({1: 1.0, 2: 0.5, 3: 0.45})
    out = torch.zeros(2, dtype=torch.float64)
    for x1 in (0, 1):
        (length,) = scheduled_lengths([[0.8, c2[x1]]], [2], cost, early_stop=early_stop)
        if length == 0:  # x1 not admitted: the target samples the token itself
            out += draft[x1] * target
        else:  # standard speculative acceptance of x1, else the residual
            accept = min(1.0, float(target[x1] / draft[x1]))
            out[x1] += draft[x1] * accept
            out += draft[x1] * (1 - accept) * residual_probs(target, draft)
    return out.tolist()


def test_appendix_a_retrospective_search_is_biased_and_early_stop_is_exact():
    cost = table({1: 1.0, 2: 0.5, 3: 0.45})
    assert scheduled_lengths([[0.8, 0.9]], [2], cost, early_stop=False) == [2]  # Theta_2 = 1.134
    assert scheduled_lengths([[0.8, 0.0]], [2], cost, early_stop=False) == [0]  # Theta_0 = 1.0
    assert first_token_distribution(early_stop=False) == pytest.approx([0.85, 0.15], abs=1e-12)
    assert first_token_distribution(early_stop=True) == pytest.approx([0.7, 0.3], abs=1e-12)


# --------------------------------------------------------------------------------- adapters
def test_online_acceptance_counts_conditional_trials():
    est = OnlineAcceptance()
    assert est.estimate(2) == [0.5, 0.5]  # Beta(1, 1) prior
    est.update([3, 3, 1, 0], [3, 1, 0, 0])  # rows: all accepted; j2 rejected; j1 rejected; none verified
    assert est.trials == [3, 2, 1] and est.accepts == [2, 1, 1]
    # Position 1: Beta(1, 1). Deeper: a prior of the same weight (2 trials) centred on acceptance
    # given survival pooled over the *other* positions 2.. (under Beta(1, 1)): for j2 that is j3's
    # 1 / 1, (1 + 1) / (1 + 2); for j3, j2's 1 / 2, (1 + 1) / (2 + 2); for j4, both, (2 + 1) / (3 + 2).
    assert est.estimate(4) == pytest.approx([3 / 5, (1 + 2 * 2 / 3) / 4, (1 + 2 * 1 / 2) / 3, 3 / 5])


def test_online_acceptance_learns_expected_counts_from_survival():
    """Given verification's survival, position j counts the probability that draft j was reached
    (survival[j-1]) and accepted (survival[j]); at T = 0 (survival 1 then 0) that is exactly the
    realised count, and the per-request and per-outcome counts learn the same."""
    realised, expected = OnlineAcceptance(decay=1.0), OnlineAcceptance(decay=1.0)
    realised.update([3, 2], [1, 2], keys=["a", "b"])
    expected.update([3, 2], [1, 2], keys=["a", "b"], survival=[[1.0, 0.0, 0.0], [1.0, 1.0]])
    assert (expected.trials, expected.accepts) == (realised.trials, realised.accepts) == ([2, 2], [2, 1])
    assert expected.requests == realised.requests and expected.by_outcome == realised.by_outcome
    assert expected.outcomes == realised.outcomes == {"a": "rejected", "b": "accepted"}
    acc = OnlineAcceptance(decay=1.0)
    acc.update([3], [0], survival=[[0.5, 0.4, 0.1]])  # a T = 1 round whose first draft was rejected
    assert acc.trials == pytest.approx([1.0, 0.5, 0.4]) and acc.accepts == pytest.approx([0.5, 0.4, 0.1])
    # Beta(1, 1) prior: position 1 (0.5 + 1) / (1 + 2); position 2's prior mean from position 3
    assert acc.estimate(1) == pytest.approx([1.5 / 3])


def test_online_acceptance_starts_rarely_verified_deep_positions_from_the_shallower_ones():
    """n-gram drafts are all or nothing: once two are accepted the rest usually are. A deep position
    the scheduler has not verified yet must not sit at a flat 0.5 (then it would never be verified
    and never learned): it starts from what positions 2.. say."""
    est = OnlineAcceptance()
    est.update([3] * 20 + [3] * 60, [3] * 20 + [0] * 60)  # copies accepted whole, the rest rejected at once
    c = est.estimate(7)
    assert c[0] == pytest.approx(21 / 82)
    assert c[3:] == pytest.approx([(40 + 1) / (40 + 2)] * 4)  # never verified: the deep pooled estimate
    assert min(c[1:]) > 0.9
    flat = OnlineAcceptance(alpha=1.0, beta=1.0)
    assert flat.estimate(3) == [0.5, 0.5, 0.5]  # before any evidence, the prior everywhere


def test_online_acceptance_keeps_per_request_estimates_shrunk_to_the_pooled_one():
    est = OnlineAcceptance(decay=1.0, request_prior=4.0, request_decay=1.0)
    est.update([2, 2], [2, 0], keys=["copy", "prose"])  # 'copy' accepted both drafts, 'prose' none
    pooled = est.estimate(2)
    # position 2's prior mean: the other deep positions' evidence (none) under Beta(1, 1), 1/2
    assert pooled == pytest.approx([(1 + 1) / (2 + 2), (1 + 2 * 1 / 2) / (1 + 2)])
    assert est.outcomes == {"copy": "accepted", "prose": "rejected"}
    # Both rounds were their requests' first: pooled under "new", which a request without history reads.
    assert est.estimate(2, "another") == pooled
    # 'copy' reads rounds that followed an all-accepted one (none yet: Beta(1, 1)), then its own counts.
    assert est.estimate(2, "copy") == pytest.approx([(1 + 4 * 0.5) / 5, (1 + 4 * 0.5) / 5])
    assert est.estimate(2, "prose") == pytest.approx([(0 + 4 * 0.5) / 5, 0.5])  # j2 never tried
    assert est.fill([None, [0.3]], [2, 1], ["copy", "prose"]) == [est.estimate(2, "copy"), [0.3]]
    est.update([1], [1], keys=["copy"])  # 'prose' has finished: forgotten
    assert set(est.requests) == {"copy"} and set(est.outcomes) == {"copy"}
    assert est.by_outcome["accepted"] == ([1], [1])  # counted under the outcome its estimate read
    fading = OnlineAcceptance(request_decay=0.5)
    fading.update([2], [0], keys=["r"])
    fading.update([0], [0], keys=["r"])  # not verified this round: its own evidence halves all the same
    assert fading.requests["r"] == ([0.5], [0.0])
    with pytest.raises(DSparkError, match="request_decay"):
        OnlineAcceptance(request_decay=1.5)


def test_online_acceptance_tells_streaks_apart_by_the_previous_outcome():
    """Copies run in streaks: after a round whose verified drafts were all accepted, the next round's
    first drafts usually are too; after a rejection, usually not. Pooled over all rounds the two
    average out; kept apart by the previous round's outcome they do not, even for a request with
    no history of its own (request_prior so large that its own counts weigh nothing). A round that
    verifies nothing ends a streak: the request then reads the rounds that followed unverified ones."""
    est = OnlineAcceptance(decay=1.0, request_prior=1e9, request_decay=1.0)
    keys = [f"copy{i}" for i in range(4)] + [f"prose{i}" for i in range(4)]
    for _ in range(10):
        est.update([2] * 8, [2] * 4 + [0] * 4, keys)
    assert est.estimate(1)[0] == pytest.approx((40 + 1) / (80 + 2))  # all rounds together: a coin
    assert est.estimate(2, "copy0") == pytest.approx([(36 + 1) / (36 + 2)] * 2)
    assert est.estimate(1, "prose0") == pytest.approx([1 / (36 + 2)])
    assert est.estimate(1, "fresh") == pytest.approx([(4 + 1) / (8 + 2)])  # first rounds of all eight
    est.update([0] * 9, [0] * 9, keys + ["fresh"])  # nothing verified: nothing learned ...
    assert est.trials == [80, 40] and est.accepts == [40, 40]
    # ... but no request is in its streak any more: all read the (empty) pool after unverified rounds
    assert set(est.outcomes.values()) == {"unverified"}
    assert est.estimate(2, "copy0") == pytest.approx([0.5, 0.5]) and est.estimate(2, "prose0") == pytest.approx([0.5, 0.5])
    est.update([2] * 8, [2] * 4 + [0] * 4, keys)  # 'fresh' finished unverified: forgotten
    assert "fresh" not in est.outcomes
    assert est.by_outcome["unverified"] == ([8, 4], [4, 4])
    assert est.estimate(1, "copy0") == pytest.approx([(36 + 1) / (36 + 2)])  # back in its streak


def test_online_acceptance_forgets_old_evidence_only_in_rounds_that_verify():
    est = OnlineAcceptance(decay=0.5)
    est.update([1] * 4, [0] * 4)
    assert est.trials == [4]
    est.update([0, 0], [0, 0])  # nothing verified: nothing learned, nothing forgotten
    assert est.trials == [4]
    est.update([1], [1])
    assert est.trials == [3.0] and est.accepts == [1.0]  # 4 * 0.5 + 1 trials, 0 * 0.5 + 1 accepts
    with pytest.raises(DSparkError, match="decay"):
        OnlineAcceptance(decay=0.0)
    with pytest.raises(DSparkError, match="request_prior"):
        OnlineAcceptance(request_prior=0)


def test_a_probe_round_verifies_at_least_one_draft_per_request_without_confidences():
    """A closed gate never lets the scheduler learn that drafts got better unless its probes verify."""
    cost = table({1: 100.0, 2: 50.0})  # every verified token costs as much as the whole step
    policy = ScheduledPolicy(cost, draft_gate=True)
    policy.gate.probe_every = policy.gate.max_probe_every = 2
    policy.acceptance.update([4] * 50, [0] * 50)  # looks hopeless
    requests = [type("R", (), {"max_tokens": 4, "uid": i})() for i in range(3)]
    assert policy.plan(requests, 0.02) == [0, 0, 0] and not policy.gate.probing
    assert policy.plan(requests, 0.02) == [4, 4, 4] and policy.gate.probing  # the probe
    assert policy.decide([None] * 3, [4, 0, 2], [0, 1, 2]) == [1, 0, 1]
    assert policy.plan(requests, 0.02) == [0, 0, 0] and not policy.gate.probing
    assert policy.decide([None] * 3, [4, 0, 2], [0, 1, 2]) == [0, 0, 0]
    # Drafts with confidences are not forced: the gate judges them by the policy's own lengths.
    assert policy.plan(requests, 0.02) == [4, 4, 4] and policy.gate.probing
    assert policy.decide([[0.01] * 4, None, [0.01] * 2], [4, 0, 2], [0, 1, 2]) == [0, 0, 0]
    assert policy.plan(requests, 0.02) == [0, 0, 0]
    assert policy.plan(requests, 0.02) == [4, 4, 4] and policy.gate.probing
    assert policy.decide([[0.01] * 4, None, None], [4, 0, 2], [0, 1, 2]) == [0, 0, 1]


def test_a_probe_drafts_for_a_few_requests_in_turn():
    """Probing every request costs a weak drafter's whole batch of drafts; a sample tells as much."""
    cost = table({1: 100.0, 2: 50.0})
    policy = ScheduledPolicy(cost, draft_gate=True)
    policy.gate.probe_every = policy.gate.max_probe_every = 1
    policy.gate.probe_rows = 2
    policy.acceptance.update([4] * 50, [0] * 50)  # looks hopeless: every round is a probe
    caps = [4, 0, 4, 3, 4]  # request 1 can draft nothing (its answer is nearly done)
    requests = [type("R", (), {"max_tokens": c, "uid": i})() for i, c in enumerate(caps)]
    probes, probing = [], []
    for _ in range(3):
        probes.append(policy.plan(requests, 0.02))
        probing.append(policy.gate.probing)
    assert all(probing)
    assert probes == [[4, 0, 4, 0, 0], [0, 0, 0, 3, 4], [4, 0, 4, 0, 0]]  # two of the four able, in turn
    few = [type("R", (), {"max_tokens": 4, "uid": i})() for i in range(2)]
    assert policy.plan(few, 0.02) == [4, 4]  # no more than probe_rows: all of them
    with pytest.raises(DSparkError, match="probe_rows"):
        DraftGate(cost, OnlineAcceptance(), probe_rows=0)


def test_the_engine_times_drafting_only_in_rounds_where_every_request_drafts(qwen3_target):
    """The draft gate weighs drafting for every request; a probe round drafting for a few would
    make drafting look cheaper than it is."""
    engine = Engine(qwen3_target, NgramDrafter(), EngineConfig(block_size=3, max_batch_size=2, max_seq_len=64))
    for i in range(2):
        engine.add_request(Request([1, 2, 3, 1, 2, 3, 1, 2], SamplingParams(0.0), StopParams(20, ignore_eos=True)))

    class OneRow:
        def plan(self, requests, draft_seconds):
            return [requests[0].max_tokens] + [0] * (len(requests) - 1)

        def __call__(self, requests, proposals):
            return [0] * len(requests)

    engine.step(OneRow())
    assert engine._draft_s is None
    engine.step(verify_all)
    assert engine._draft_s is None, "the first drafting round pays one-time costs: left out"
    for _ in range(3):
        engine.step(verify_all)
    assert len(engine._draft_times) == 3 and engine._draft_s == statistics.median(engine._draft_times)


def test_estimates_that_stopped_verifying_are_tried_again():
    cost = table({1: 100.0, 2: 50.0})  # every verified token costs as much as the whole step
    policy = ScheduledPolicy(cost)
    policy.explore_every = 3
    policy.acceptance.update([4] * 50, [0] * 50)  # looks hopeless: nothing is verified any more
    rounds = [policy.decide([None, None, [0.5] * 4], [4, 0, 4]) for _ in range(8)]
    # rows with estimates and drafts get one draft verified after 3 idle rounds; the confidence row never
    assert rounds == [[0, 0, 0]] * 3 + [[1, 0, 0]] + [[0, 0, 0]] * 3 + [[1, 0, 0]]
    # With more estimated rows than explore_rows, an exploring round takes that many, in turn.
    policy.explore_rows = 2
    caps = [4, 0, 4, 4, 2, 4]  # row 1 has no drafts: never explored
    rounds = [policy.decide([None] * 6, caps) for _ in range(12)]
    explored = [[i for i, n in enumerate(r) if n] for r in rounds if any(r)]
    assert explored == [[0, 2], [3, 4], [0, 5]] and all(max(r) <= 1 for r in rounds)
    with pytest.raises(DSparkError, match="explore_every"):
        EstimatedPolicy("scheduled", lambda c, m, ctx: [0] * len(m), explore_every=0)
    with pytest.raises(DSparkError, match="explore_rows"):
        EstimatedPolicy("scheduled", lambda c, m, ctx: [0] * len(m), explore_rows=0)


def test_async_policy_uses_the_budget_of_two_rounds_earlier():
    cost = table({2: 10.0, 3: 10.0, 4: 9.0, 5: 7.0, 6: 8.0})
    policy = AsyncScheduledPolicy(cost)
    rounds = [TWO_ROWS, [[0.1, 0.1], [0.1, 0.1]], [[0.99, 0.99], [0.99, 0.99]], [[0.99, 0.99], [0.99, 0.99]]]
    lengths = [policy.decide(c, [2, 2]) for c in rounds]
    assert lengths[0] == scheduled_lengths(TWO_ROWS, [2, 2], cost)  # no history: Algorithm 1
    assert sum(lengths[2]) == async_budget(TWO_ROWS, [2, 2], cost) == 4  # round 0's budget
    assert sum(lengths[3]) == async_budget(rounds[1], [2, 2], cost)  # round 1's budget
    assert policy.last_budget == sum(lengths[3])


def test_build_policy_names_and_errors():
    cost = CostTable.flat()
    assert isinstance(build_policy("none", 4), NonePolicy)
    assert build_policy("fixed", 4).k == 4 and build_policy("fixed:2", 4).k == 2
    assert build_policy("threshold:0.7", 4).threshold == 0.7
    assert build_policy("scheduled", 4, cost).name == "scheduled" and build_policy("scheduled", 4, cost).cost is cost
    assert build_policy("async", 4, cost).name == "async" and build_policy("async", 4, cost).lag == 2
    with pytest.raises(DSparkError, match="'greedy'.*none, fixed.*async"):
        build_policy("greedy", 4)
    with pytest.raises(DSparkError, match="cost table"):
        build_policy("scheduled", 4)
    with pytest.raises(DSparkError, match="'x'"):
        build_policy("fixed:x", 4)
    with pytest.raises(DSparkError, match="1.5"):
        build_policy("threshold:1.5", 4)


# ----------------------------------------------------------------------- through the engine
PROMPTS = [[0, 5, 6, 7, 5, 6], [0, 9, 10, 11, 12, 9, 10, 11, 12, 9, 10], [0, 20, 21, 20, 21, 20, 22, 20]]
MAX_NEW = [20, 13, 17]


class Recorder:
    """Forwards to a policy and remembers the lengths it chose."""

    def __init__(self, policy):
        self.policy, self.lengths, self.full_lengths = policy, [], collections.Counter()
        self.gate_rounds = collections.Counter()

    def __call__(self, requests, proposals):
        lengths = self.policy(requests, proposals)
        self.lengths.extend(lengths)
        # lengths of rows that could verify their whole block (not cut by max_tokens)
        self.full_lengths.update(n for r, p, n in zip(requests, proposals, lengths) if min(len(p), r.max_tokens) >= 2)
        return lengths

    def observe(self, requests, lengths, num_accepted, survival=None):
        if hasattr(self.policy, "observe"):
            self.policy.observe(requests, lengths, num_accepted, survival=survival)

    def plan(self, requests, draft_seconds):
        plan = getattr(self.policy, "plan", None)
        caps = plan(requests, draft_seconds) if plan is not None else [r.max_tokens for r in requests]
        gate = getattr(self.policy, "gate", None)
        self.gate_rounds.update(["closed" if not any(caps) else "probe" if gate and gate.probing else "open"])
        return caps


@pytest.fixture(scope="module")
def qwen3_target(tiny_dirs):
    return load_model(str(tiny_dirs["qwen3"]), "fp64")


@pytest.mark.parametrize("drafter_kind", ["dspark-vanilla", "ngram"])
@pytest.mark.parametrize("spec", ["none", "fixed:2", "threshold", "scheduled", "async"])
def test_greedy_identity_with_every_policy(qwen3_target, drafter_kind, spec):
    target = qwen3_target
    drafter = make(drafter_kind, target) if drafter_kind != "ngram" else NgramDrafter()
    cost = CostTable.gpu_shaped(knee=8, base_ms=10.0, ms_per_token=1.0)
    policy = Recorder(build_policy(spec, 5, cost))
    engine = Engine(target, drafter, EngineConfig(block_size=5, max_batch_size=3, max_seq_len=64))
    outs = engine.generate([Request(p, stop=StopParams(max_new_tokens=m)) for p, m in zip(PROMPTS, MAX_NEW)], policy)
    for prompt, m, out in zip(PROMPTS, MAX_NEW, outs):
        assert out.token_ids == expected_greedy(target, prompt, m)
    if spec == "none":
        assert set(policy.lengths) == {0} and all(o.stats.accept_length == 1.0 for o in outs)


@pytest.fixture(scope="module")
def vocab4_pair(tmp_path_factory):
    return vocab4_models(tmp_path_factory.mktemp("v4s"), "qwen3")


def confident_dspark(target):
    """A DSpark drafter whose Markov head and confidence head both matter: c_k varies widely with
    the previous draft token, the dependence Appendix A is about."""
    drafter = make("dspark-vanilla", target, mask_token_id=3, markov_rank=4)
    with torch.no_grad():
        drafter.model.markov_head.markov_w2.weight.normal_(0, 2.0)
        drafter.model.confidence_head.proj.weight.normal_(0, 1.0)
    return drafter


# 512 requests per batch with up to 2 drafts each (4 tokens: the prefill gives one, a round commits
# drafts + 1): flat up to B = 600, then rising, so the budget runs out mid-batch and rows with the
# same block get 0, 1 or 2 verified drafts.
VOCAB4_COST = CostTable.gpu_shaped(knee=600, base_ms=10.0, ms_per_token=0.02, max_tokens=2048)
NUM_TOKENS = 4  # 256 sequences; 2 drafts let c_2 depend on x_1 (Appendix A); 3 would need 1024 cells


@pytest.fixture(scope="module")
def vocab4_joint(vocab4_pair):
    return exact_joint(vocab4_pair[0].model, VOCAB4_PROMPT, DIST_CASES["T=1"], NUM_TOKENS)


def scheduled_tv(target, drafter, policy, joint, num_samples=20_000):
    """test_engine.sampled_tv with 4 generated tokens and the exact joint computed once per module
    (with its 3 tokens a round never has more than one draft to schedule)."""
    engine = Engine(target, drafter, EngineConfig(block_size=3, max_batch_size=512, max_seq_len=16))
    stop = StopParams(max_new_tokens=NUM_TOKENS, ignore_eos=True)
    requests = [Request(VOCAB4_PROMPT, SamplingParams(temperature=1.0, seed=i), stop) for i in range(num_samples)]
    counts = collections.Counter(tuple(out.token_ids) for out in engine.generate(requests, policy))
    tv = 0.5 * sum(abs(counts[seq] / num_samples - p) for seq, p in joint.items())
    return tv, tv_bound(list(joint.values()), num_samples)


@pytest.mark.parametrize("kind", ["scheduled", "async", "scheduled-online", "scheduled-gated", "scheduled-padded",
                                  "async-padded"])
def test_sequence_distribution_with_scheduled_lengths(vocab4_pair, vocab4_joint, kind):
    """20k seeded samples of 4 tokens (256 sequences): scheduled lengths stay lossless, with DSpark's
    own confidences, with the asynchronous top-K rule, with online per-request estimates (a draft
    model), and with those behind the draft gate (closed rounds, probes that force a verification)."""
    target, draft = vocab4_pair
    drafter = DraftModelDrafter(draft) if kind.startswith("scheduled-") else confident_dspark(target)
    if kind == "async":
        policy = Recorder(AsyncScheduledPolicy(VOCAB4_COST))
    elif kind == "scheduled-gated":  # a steep table and a fast probe cycle: the gate opens, closes, probes
        gated = ScheduledPolicy(table({1: 100.0, 512: 100.0, 1024: 60.0, 2048: 10.0}), draft_gate=True)
        gated.gate.probe_every = gated.gate.max_probe_every = 2
        policy = Recorder(gated)
    elif kind.endswith("-padded"):  # level-by-level admission; async: budgets from it, top-K by level
        padded = CostTable(VOCAB4_COST.tokens, VOCAB4_COST.sps, padding=((1, 1e-5),))
        policy = Recorder(ScheduledPolicy(padded) if kind == "scheduled-padded" else AsyncScheduledPolicy(padded))
    else:
        policy = Recorder(ScheduledPolicy(VOCAB4_COST))
    tv, bound = scheduled_tv(target, drafter, policy, vocab4_joint)
    if kind == "scheduled-gated":
        assert min(policy.gate_rounds[k] for k in ("closed", "probe", "open")) > 0, policy.gate_rounds
    assert len(policy.full_lengths) > 1, f"rows with 2 drafts all got the same length: {policy.full_lengths}"
    assert tv < bound, f"TV {tv:.4f} >= {bound:.4f} (null mean + 4 sigma: false-failure probability < 1e-4)"


class RandomDraftCaps:
    """Caps drafting before each round at random (seeded, never looking at drafts): some rounds
    draft nothing, some rows fewer tokens — what a draft gate may do — then verifies everything."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def plan(self, requests, draft_seconds):
        if self.rng.random() < 0.3:
            return [0] * len(requests)
        return [self.rng.randint(0, r.max_tokens) for r in requests]

    def __call__(self, requests, proposals):
        return [min(len(p), r.max_tokens) for r, p in zip(requests, proposals)]


def test_sequence_distribution_with_drafting_capped_before_each_round(vocab4_pair, vocab4_joint):
    target, _ = vocab4_pair
    tv, bound = scheduled_tv(target, confident_dspark(target), RandomDraftCaps(3), vocab4_joint)
    assert tv < bound, f"TV {tv:.4f} >= {bound:.4f} (null mean + 4 sigma: false-failure probability < 1e-4)"


def test_draft_gate_closes_when_drafting_cannot_pay_and_probes_again():
    cost = CostTable.gpu_shaped(knee=16, base_ms=10.0, ms_per_token=1.0)
    good, bad = OnlineAcceptance(), OnlineAcceptance()
    good.update([4] * 50, [4] * 50)  # every draft accepted so far
    bad.update([4] * 50, [0] * 50)  # none accepted
    assert DraftGate(cost, good).allow([4, 4], draft_seconds=0.001)
    assert DraftGate(cost, good).allow([4, 4], draft_seconds=None)  # nothing measured yet: draft
    gate = DraftGate(cost, bad, probe_every=4, max_probe_every=8, probe_budget=1.0)
    decisions = [gate.allow([4, 4], draft_seconds=0.005) for _ in range(20)]
    # a probe every 4 closed rounds; a probe that finds it still closed does not lengthen the wait
    assert [i for i, d in enumerate(decisions) if d] == [3, 7, 11, 15, 19] and not gate.is_open
    # Probing costs at most probe_budget of the closed rounds' time: a 5 ms drafting round against
    # 10 ms rounds of plain decoding, 1%: a probe after 50 closed rounds at the earliest.
    budgeted = DraftGate(cost, bad, probe_every=4, max_probe_every=256, probe_budget=0.01)
    decisions = [budgeted.allow([4, 4], draft_seconds=0.005) for _ in range(120)]
    assert [i for i, d in enumerate(decisions) if d] == [49, 99]
    with pytest.raises(DSparkError, match="probe_budget"):
        DraftGate(cost, bad, probe_budget=0.0)
    gate.acceptance = good  # traffic changed: the next round reopens
    assert gate.allow([4, 4], draft_seconds=0.005) and gate.is_open and gate.closed_rounds == 0
    # A slow drafter does not pay even with good acceptance: 10 ms verify, 1 s of drafting.
    assert not DraftGate(cost, good).allow([4], draft_seconds=1.0)


def test_draft_gate_bound_never_changes_its_decision():
    """The gate skips the search when even free verification of every draft cannot pay for the
    drafting; on non-decreasing tables (flat, knee, padding, context) that is the search's answer."""
    rng = random.Random(0)
    tables = [CostTable.gpu_shaped(knee=16, base_ms=10.0, ms_per_token=1.0), CostTable.flat(50.0),
              CostTable((1, 8, 64), (40.0, 30.0, 8.0), padding=((2, 0.001), (8, 0.0005))),
              CostTable((1, 8, 64), (40.0, 30.0, 8.0), context=100, context_s=((1, (1e-5, 1e-6)), (8, (4e-5, 2e-6))))]
    closed_by_bound = 0
    for case in range(400):
        cost = tables[case % len(tables)]
        acc = OnlineAcceptance()
        p = rng.choice([0.02, 0.1, 0.3, 0.6, 0.9])
        lengths = [rng.randint(1, 4) for _ in range(30)]
        acc.update(lengths, [sum(rng.random() < p for _ in range(n)) for n in lengths])
        caps = [rng.randint(0, 5) for _ in range(rng.randint(1, 12))]
        if max(caps) == 0:
            continue
        draft_s, context = rng.choice([0.0005, 0.005, 0.02, 0.08]), rng.choice([None, 50, 400])
        # the search's answer, computed as the gate did before it had the bound
        estimates = [acc.estimate(m) for m in caps]
        n = scheduled_lengths(estimates, caps, cost, context=context)
        expected = sum(sum(itertools.accumulate(e[:k], lambda x, y: x * y)) for e, k in zip(estimates, n))
        rows = len(caps)
        speculative = (rows + expected) / (cost.round_time(rows + sum(n), rows, 1 + max(n), context) + draft_s)
        want = speculative > rows / cost.round_time(rows, rows, 1, context)
        gate = DraftGate(cost, acc)
        assert gate.allow(caps, draft_s, context=context) == want or gate.probing
        assert gate.is_open == want
        bound = sum(sum(itertools.accumulate(e, lambda x, y: x * y)) for e in estimates)
        plain = cost.round_time(rows, rows, 1, context)
        closed_by_bound += (rows + bound) / (plain + draft_s) <= rows / plain
    assert 50 < closed_by_bound < 350  # both paths exercised


def test_draft_gate_reads_what_confident_picks_realised():
    """With drafter confidences, the policy verifies the picks they make: acceptance learned on
    those picks (here every verified draft is accepted) says nothing of the other drafts, so the
    gate weighs what the policy's rounds realised: 1 draft gained per 4 requests that drafted."""
    cost = CostTable.gpu_shaped(knee=16, base_ms=10.0, ms_per_token=1.0)  # 4 rows: 10 ms a round

    def gate_after(confident: bool) -> DraftGate:
        acc = OnlineAcceptance()
        gate = DraftGate(cost, acc)
        for _ in range(30):
            chosen, accepted = [1, 0, 0, 0], [1, 0, 0, 0]
            acc.update(chosen, accepted)
            gate.record(chosen, [4] * 4, accepted, confident)
        return gate

    # 4 requests: plain decoding 4 / 10 ms; realised (4 + 1) / (10 ms + 3 ms of drafting): worse
    assert not gate_after(confident=True).allow([4] * 4, draft_seconds=0.003)
    # on the estimates (position 1 always accepted) every request would gain: the gate would open
    assert gate_after(confident=False).allow([4] * 4, draft_seconds=0.003)
    assert gate_after(confident=True).allow([4] * 4, draft_seconds=0.001)  # (4 + 1) / 11 ms pays

    # A probe forced one draft on every request; the policy had chosen none for three of them,
    # which count as gaining nothing, whatever the forced verification accepted.
    gate = DraftGate(cost, OnlineAcceptance())
    gate.record([2, 0, 0, 0], [4] * 4, [3, 1, 1, 1], confident=True)
    assert gate.gained / gate.seen == pytest.approx(2 / 4) and gate.verified / gate.seen == pytest.approx(2 / 4)
    assert gate.widest == 2
    gate.record([0, 0], [0, 0], [0, 0], confident=False)  # nothing drafted: nothing learned
    assert gate.confident and gate.seen == 4
    with pytest.raises(DSparkError, match="memory"):
        DraftGate(cost, OnlineAcceptance(), memory=0.5)


def test_draft_gate_judges_confident_picks_only_after_a_few_rounds():
    """One rejected first draft must not close the gate: judged on it, the builtin drafter's gate
    closed in the first round of a warm-up and stayed closed for a whole answer."""
    cost = CostTable.gpu_shaped(knee=16, base_ms=10.0, ms_per_token=1.0)
    gate = DraftGate(cost, OnlineAcceptance())
    decisions = []
    for _ in range(8):
        decisions.append(gate.allow([4], draft_seconds=0.003))
        gate.record([4], [4], [0], confident=True)  # every pick rejected
    assert decisions[:5] == [True] * 5 and not any(decisions[5:]), decisions
    assert gate.seen >= gate.min_seen


def test_draft_gate_weighs_expected_gains_when_given_survival():
    """With VerifyResult.survival the gate counts sum(survival[:n]) for the policy's n, the expected
    accepted count given the drafts, instead of the realised one (a forced probe's longer
    verification included: only the first n prefixes count)."""
    cost = CostTable.gpu_shaped(knee=16, base_ms=10.0, ms_per_token=1.0)
    gate = DraftGate(cost, OnlineAcceptance())
    gate.record([2, 1], [4, 4], [0, 3], confident=True, survival=[[0.5, 0.25, 0.1], [0.9, 0.8, 0.7]])
    assert gate.gained == pytest.approx(0.75 + 0.9) and gate.verified == 3 and gate.seen == 2
    gate = DraftGate(cost, OnlineAcceptance())
    gate.record([2, 1], [4, 4], [0, 3], confident=True)  # realised: min(a, n)
    assert gate.gained == 1


def test_engine_tells_the_policy_each_verified_prefixs_survival(vocab4_pair):
    """observe() gets VerifyResult.survival: one probability per verified draft, falling along the
    row; at T = 0 it is the realised outcome, at T = 1 its sum averages num_accepted."""
    target, draft = vocab4_pair
    seen: list[tuple[list[int], list[int], list[list[float]]]] = []

    class Spy:
        def __call__(self, requests, proposals):
            return [min(len(p), 3) for p in proposals]

        def observe(self, requests, lengths, num_accepted, survival=None):
            seen.append((list(lengths), list(num_accepted), survival))

    engine = Engine(target, DraftModelDrafter(draft), EngineConfig(block_size=3, max_batch_size=2, max_seq_len=64))
    for temperature in (0.0, 1.0):
        seen.clear()
        engine.generate([Request(list(VOCAB4_PROMPT), SamplingParams(temperature, seed=s), StopParams(40))
                         for s in range(2)], Spy())
        rows = [(n, a, row) for lengths, accepted, survival in seen for n, a, row in zip(lengths, accepted, survival)]
        assert rows and all(len(row) == n and row == sorted(row, reverse=True) for n, _, row in rows)
        if temperature == 0.0:
            assert all(row == [1.0] * a + [0.0] * (n - a) for n, a, row in rows)
        else:
            gap = sum(sum(row) - a for n, a, row in rows) / len(rows)
            assert abs(gap) < 0.25 and any(0.0 < x < 1.0 for _, _, row in rows for x in row)


def test_closed_draft_gate_reopens_when_probes_find_drafting_pays():
    """Closing shortens the gate's memory to `min_seen` request-rounds at the same ratio, so that
    probes weigh enough to reopen it. At full memory a probe moved the average by 1/16 (the memory
    was 16 request-rounds then), and after a poor stretch the builtin drafter's gate stayed shut for
    most of a GSM8K run at T = 1."""
    cost = CostTable.gpu_shaped(knee=16, base_ms=10.0, ms_per_token=1.0)  # ~10 ms a round of 1
    draft_s = 0.006  # drafting pays when a round gains more than 0.6 drafts: (1 + g) / 16 ms > 1 / 10 ms

    def closed_rounds(shorten: bool, probe_gains: list[int], limit: int = 5000) -> tuple[int, int]:
        """(rounds, probes) from closing until the gate reopens (`limit` if it does not)."""
        gate = DraftGate(cost, OnlineAcceptance())
        if not shorten:
            gate._shorten_memory = lambda: None
        for _ in range(16):  # a good stretch: 2 drafts gained of 4 verified
            assert gate.allow([4], draft_s)
            gate.record([4], [4], [2], confident=True)
        while True:  # then nothing accepted, until it closes
            ratio = gate.gained / gate.seen
            if not gate.allow([4], draft_s):
                break
            gate.record([4], [4], [0], confident=True)
        if shorten:  # the same ratio (so the same decision), at the weight of min_seen rounds
            assert gate.seen == gate.min_seen and gate.gained / gate.seen == pytest.approx(ratio)
        probes = 0
        for rounds in range(1, limit):
            if gate.allow([4], draft_s):
                if not gate.probing:
                    return rounds, probes
                gate.record([4], [4], [probe_gains[probes % len(probe_gains)]], confident=True)
                probes += 1
        return limit, probes

    # Probes that gain 2/3 a round on average (noisy, as at T = 1): drafting pays again.
    rounds, probes = closed_rounds(True, [0, 0, 2])
    full_rounds, full_probes = closed_rounds(False, [0, 0, 2])  # the mutation: each probe weighed 1/seen
    assert probes == 3 and full_probes >= 6 and full_rounds >= 2 * rounds
    # Probes that gain 1/2 a round: drafting does not pay, and the shorter memory keeps it closed.
    assert closed_rounds(True, [0, 1])[0] == 5000


def test_confident_policy_feeds_its_gate_its_own_lengths():
    cost = CostTable.gpu_shaped(knee=1, base_ms=10.0, ms_per_token=5.0)  # every token costs
    policy = build_policy("scheduled", 4, cost)
    lengths = policy.decide([[0.99, 0.01], [0.01, 0.01]], [2, 2], keys=[0, 1])
    assert lengths == [1, 0]
    policy.record(lengths, [1, 0], keys=[0, 1])
    gate = policy.gate
    assert gate.confident and gate.seen == 2 and gate.gained == 1 and gate.verified == 1
    policy.record([1, 0], [1, 0], keys=[0, 1])  # a record without a decision adds nothing to the gate
    assert gate.seen == 2
    estimated = build_policy("scheduled", 4, cost)  # no confidences: the gate judges the estimates
    estimated.record(estimated.decide([None, None], [2, 2], keys=[0, 1]), [0, 0], keys=[0, 1])
    assert not estimated.gate.confident and estimated.gate.seen == 2  # (what they realised is kept)


def test_estimates_learn_from_rows_without_confidences_only():
    """Prompt lookup in front of DSpark mixes rows with and without confidences in one round. The
    online estimates stand in for the missing confidences, so they learn from those rows only:
    drafts that confidences picked are accepted more often than drafts at large. The gate counts
    what both kinds of row realised."""
    policy = build_policy("scheduled", 3, CostTable.flat(10.0))  # verifying is free: every draft
    for _ in range(30):
        lengths = policy.decide([[0.99, 0.99, 0.99], None], [3, 3], keys=[0, 1])
        assert lengths[0] == 3
        policy.record(lengths, [3, 0], keys=[0, 1])  # the confident row: all accepted; the other: none
    assert policy.acceptance.estimate(3, 1)[0] < 0.1 and policy.acceptance.estimate(3)[0] < 0.1
    gate = policy.gate
    assert gate.confident and gate.seen > 8 and 0.4 < gate.gained / gate.seen < 0.6 * 3
    seen = gate.seen  # a round of lookup rows only (batch 1) counts too, and is judged on the estimates
    policy.record(policy.decide([None], [3], keys=[1]), [2], keys=[1])
    assert not gate.confident and gate.seen > seen


def test_scheduled_policy_plans_no_drafts_while_its_gate_is_closed():
    cost = CostTable.gpu_shaped(knee=16, base_ms=10.0, ms_per_token=1.0)
    policy = build_policy("scheduled", 4, cost)
    policy.acceptance.update([4] * 50, [0] * 50)
    requests = [type("R", (), {"max_tokens": 4, "uid": None})() for _ in range(3)]
    assert policy.plan(requests, 0.02) == [0, 0, 0]
    assert build_policy("scheduled", 4, cost, draft_gate=False).plan(requests, 0.02) == [4, 4, 4]


# ------------------------------------------------------------------------------- cost tables
def test_device_name_names_a_gpu_by_its_model(monkeypatch):
    # Cost tables and reports key on this name; the GPU path runs here without a GPU.
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert device_name(torch.device("cuda")) == "cuda:NVIDIA H200"
    assert device_name(torch.device("cpu")).startswith("cpu:")


def test_cost_table_interpolates_time_per_step():
    cost = table({2: 10.0, 4: 5.0})  # 0.1 s at B=2, 0.2 s at B=4
    assert cost.sps_at(1) == 10.0 and cost.sps_at(2) == 10.0 and cost.sps_at(4) == 5.0
    assert cost.time_at(3) == pytest.approx(0.15)  # linear in time, not in sps
    assert cost.time_at(8) == pytest.approx(0.4)  # extrapolated along the last two points
    falling = table({2: 5.0, 4: 10.0})  # time falls at the end: held flat, never <= 0
    assert falling.time_at(1000) == pytest.approx(0.1)
    assert CostTable.flat(3.0).sps_at(10_000) == 3.0
    gpu = CostTable.gpu_shaped(knee=64, base_ms=20.0, ms_per_token=0.5)
    assert gpu.time_at(1) == gpu.time_at(64) == pytest.approx(0.02)
    assert gpu.time_at(84) == pytest.approx(0.03) and gpu.time_at(10_000) > gpu.time_at(1000)


def test_cost_table_curves_per_request_count():
    # R = 1: 10 ms at B = 1, 20 ms at B = 3; R = 4: 40 ms at B = 4, 60 ms at B = 12 (per-row cost)
    cost = CostTable((1, 16), (100.0, 10.0), by_rows=((4, table({4: 25.0, 12: 1000 / 60})), (1, table({1: 100.0, 3: 50.0}))))
    assert [r for r, _ in cost.by_rows] == [1, 4]
    assert cost.time_at(8) == pytest.approx(0.01 + 7 / 15 * 0.09)  # no R: the B-only curve
    assert cost.time_at(8, rows=4) == pytest.approx(0.05) and cost.sps_at(4, rows=4) == pytest.approx(25.0)
    assert cost.time_at(2, rows=1) == pytest.approx(0.015)
    # R = 2, 2 tokens per row: R = 1 read at B = 2 (15 ms), R = 4 at B = 8 (50 ms), 1/3 of the way
    assert cost.time_at(4, rows=2) == pytest.approx(0.015 + (0.05 - 0.015) / 3)
    assert cost.time_at(16, rows=8) == pytest.approx(0.05 * 2)  # beyond the largest R: scaled by R
    assert table({1: 10.0}).time_at(5, rows=3) == 0.1  # no curves: rows are ignored
    with pytest.raises(DSparkError, match="row counts >= 1"):
        CostTable((1,), (1.0,), by_rows=((0, table({1: 1.0})),))


def test_cost_table_padding_per_request_count():
    cost = CostTable((1, 16), (100.0, 10.0), padding=((8, 0.002), (2, 0.001)))
    assert cost.padding == ((2, 0.001), (8, 0.002))
    assert cost.pad_at(1) == 0.001 and cost.pad_at(5) == pytest.approx(0.0015) and cost.pad_at(64) == 0.002
    assert cost.round_time(5, 2, 4) == pytest.approx(cost.time_at(5, 2) + 3 * 0.001)
    assert table({1: 10.0}).pad_at(4) == 0.0  # no padding data: padding is free
    with pytest.raises(DSparkError, match="padding"):
        CostTable((1,), (1.0,), padding=((2, -1.0),))


def test_cost_table_round_trips_through_a_file(tmp_path):
    cost = CostTable((1, 8, 64), (50.0, 48.5, 20.25), {"device": "cpu", "context": 256})
    cost.save(tmp_path / "sps.json")
    loaded = CostTable.load(tmp_path / "sps.json")
    assert loaded == cost and loaded.meta == cost.meta
    assert [p.name for p in tmp_path.iterdir()] == ["sps.json"]  # no temporary left behind
    shaped = CostTable((1, 8), (50.0, 40.0), {"context": 256}, by_rows=((2, table({2: 45.0, 6: 30.0})),),
                       padding=((2, 0.0005),))
    shaped.save(tmp_path / "shaped.json")
    loaded = CostTable.load(tmp_path / "shaped.json")
    assert loaded.by_rows == shaped.by_rows and loaded.padding == ((2, 0.0005),)
    sglang = {"sample_batch_tokens": [1, 16], "sample_steps_per_sec": [40.0, 30.0], "max_batch_tokens": 16}
    assert CostTable.from_json(sglang).sps == (40.0, 30.0)


@pytest.mark.parametrize(("content", "message"), [
    ("{not json", "not valid JSON"),
    ('{"format": "other", "version": 1, "tokens": [1], "sps": [1.0]}', "'other'"),
    ('{"format": "dspark-cost-table", "version": 9, "tokens": [1], "sps": [1.0]}', "version 9"),
    ('{"format": "dspark-cost-table", "version": 1, "tokens": [1, 4, 4], "sps": [1, 1, 1]}', "4 then 4"),
    ('{"format": "dspark-cost-table", "version": 1, "tokens": [1, 2], "sps": [1.0, -3]}', "-3"),
    ('{"format": "dspark-cost-table", "version": 1, "tokens": [1, 2.5], "sps": [1.0, 2.0]}', "2.5"),
    ('{"format": "dspark-cost-table", "version": 1, "tokens": [1, 2], "sps": [1.0]}', "2 token counts and 1"),
    ('{"format": "dspark-cost-table", "version": 1, "tokens": "1,2", "sps": [1.0]}', "'tokens' must be a list"),
    ('{"format": "dspark-cost-table", "version": 1, "tokens": [1], "sps": [1.0], "by_rows": {"x": {}}}', "'x'"),
    ('{"format": "dspark-cost-table", "version": 1, "tokens": [1], "sps": [1.0], "by_rows": {"2": {"tokens": [2], '
     '"sps": [0]}}}', r"by_rows\[2\].*> 0, got 0"),
    ('{"format": "dspark-cost-table", "version": 1, "tokens": [1], "sps": [1.0], "padding_s": {"2": "x"}}', "'x'"),
    ("[1, 2]", "expected a JSON object"),
])
def test_malformed_cost_tables_are_refused_with_the_bad_value(tmp_path, content, message):
    (tmp_path / "bad.json").write_text(content)
    with pytest.raises(DSparkError, match=message):
        CostTable.load(tmp_path / "bad.json")


def test_missing_cost_table_file_is_named(tmp_path):
    with pytest.raises(DSparkError, match="nope.json.*dspark profile"):
        CostTable.load(tmp_path / "nope.json")


def test_profile_target_on_a_tiny_model(qwen3_target):
    assert even_rows(10, 3) == [4, 3, 3] and even_rows(1, 8) == [1]
    cost = profile_target(qwen3_target, batch_tokens=(8, 1, 3), context=16, repeats=1, warmup=1, block_size=3,
                          drafter=make("dspark-vanilla", qwen3_target), drafter_requests=(1, 2), rows=(3, 1))
    assert cost.tokens == (1, 3, 8) and all(s > 0 for s in cost.sps)
    assert [(r, curve.tokens) for r, curve in cost.by_rows] == [(1, (1, 2, 3, 4)), (3, (3, 6, 9, 12))]
    assert cost.meta["request_counts"] == [1, 3] and "3x4" in cost.meta["seconds_min_max"]
    assert [r for r, _ in cost.padding] == [3] and cost.padding[0][1] >= 0  # R = 1 has no padding
    assert cost.meta["convex"] and set(cost.meta["measured_s"]) == {"1", "3", "8", "1x1", "1x4", "3x1", "3x4", *(
        f"{r}x{n}" for r in (1, 3) for n in (2, 3)), "3x1+3", *(f"{r}x{n}@144" for r in (1, 3) for n in (1, 4))}
    # the context term: measured again over 16 + 128 cached tokens, for rows of 1 and of K + 1
    assert cost.context == 16 and cost.meta["longer_context"] == 144
    assert [r for r, _ in cost.context_s] == [1, 3] and all(a >= 0 and b >= 0 for _, (a, b) in cost.context_s)
    for _, curve in cost.by_rows:  # stored convex and non-decreasing in time
        times = [1 / s for s in curve.sps]
        steps = [(t2 - t1) / (b2 - b1) for (b1, t1), (b2, t2) in itertools.pairwise(zip(curve.tokens, times))]
        assert all(x >= 0 for x in steps) and all(y >= x - 1e-12 for x, y in itertools.pairwise(steps))
    assert cost.meta["context"] == 16 and cost.meta["rows"]["8"] == [4, 4]
    assert set(cost.meta["drafter_propose_s"]) == {"1", "2"} and cost.meta["target_fingerprint"]
    with pytest.raises(DSparkError, match="exceed the target's context"):
        profile_target(qwen3_target, batch_tokens=(1,), context=10_000)


def test_convex_times_lower_bumps_and_keep_the_hull():
    assert convex_times([1, 2, 3, 4], [10.0, 12.0, 12.0, 14.0]) == pytest.approx([10.0, 11.0, 12.0, 14.0])
    assert convex_times([1, 2, 4, 8], [5.0, 4.0, 6.0, 10.0]) == pytest.approx([5.0, 5.0, 6.0, 10.0])  # falling start: flat
    assert convex_times([1, 3, 5], [1.0, 2.0, 9.0]) == [1.0, 2.0, 9.0]  # already convex: unchanged
    assert convex_times([4], [2.5]) == [2.5]


# -------------------------------------------------------------------------------- simulator
def synthetic_trace(seed: int = 0, num: int = 400) -> list[dict]:
    """Per-round records of a 4-draft DSpark-like drafter: decaying confidences, accepted counts
    drawn from them."""
    rng = random.Random(seed)
    records = []
    for i in range(num):
        confs = [min(1.0, max(0.0, rng.gauss(0.8 - 0.1 * j, 0.15))) for j in range(4)]
        accepted = 0
        while accepted < 4 and rng.random() < confs[accepted]:
            accepted += 1
        records.append({"confidences": confs, "accepted": accepted, "request": i // 16})
    return records


def test_simulator_is_deterministic_and_plain_decoding_commits_one_token_per_round():
    cost = CostTable.gpu_shaped(knee=32, base_ms=10.0, ms_per_token=0.2)
    trace = synthetic_trace()
    kwargs = {"policies": ["none", "fixed", "scheduled", "async"], "concurrencies": [1, 8, 64], "steps": 40, "seed": 3}
    first, second = simulate(trace, cost, **kwargs), simulate(trace, cost, **kwargs)
    assert first == second
    none = [r for r in first if r.policy == "none"]
    assert all(r.accept_length == 1.0 and r.mean_verified == 0 and r.speedup == pytest.approx(1.0) for r in none)
    assert simulate(trace, cost, **{**kwargs, "seed": 4}) != first


def test_simulated_scheduler_verifies_every_useful_draft_on_a_flat_table_and_less_on_a_steep_one():
    trace = [{"confidences": [0.9, 0.5, 0.0, 0.7], "accepted": 2}, {"confidences": [0.6, 0.6, 0.6, 0.6], "accepted": 4}]
    flat = simulate(trace, CostTable.flat(10.0), ["fixed", "scheduled"], [1, 16], steps=30)
    by = {(r.policy, r.concurrency): r for r in flat}
    for c in (1, 16):
        assert by["fixed", c].mean_verified == 4
        useful = by["scheduled", c].mean_verified  # 2 of the first record's drafts, 4 of the second's
        assert 2 <= useful <= 4 and by["scheduled", c].accept_length == by["fixed", c].accept_length
    steep = CostTable.gpu_shaped(knee=1, base_ms=10.0, ms_per_token=3.0)
    by = {(r.policy, r.concurrency): r for r in simulate(trace, steep, ["fixed", "scheduled"], [1, 16], steps=30)}
    for c in (1, 16):
        assert by["scheduled", c].mean_verified < by["fixed", c].mean_verified


def test_simulator_replays_what_a_short_verification_left_of_a_record():
    """A record that accepted a drafts says the next a tokens matched: a policy that commits fewer
    sees the rest of that record next round (shifted), and moves on only when it has all a + 1."""
    record = {"confidences": [0.9, 0.8, 0.7, 0.6, 0.5], "accepted": 2, "request": 0, "context": 50}
    seen = []

    class One:  # verifies one draft a round, and notes what it was offered
        def decide(self, confidences, caps, keys=None, context=None):
            seen.append((tuple(confidences[0]), caps[0], context))
            return [min(1, caps[0])]

    cost = CostTable((1, 64), (10.0, 10.0), context=50, context_s=((1, (1e-6, 0.0)),))
    (result,) = simulate([record], cost, {"one": One}, [1], steps=4, draft_cost=False)
    # Draft 1 accepted, the bonus token is draft 2 (accepted in the record): the request resumes
    # 2 tokens on, where the record's rejected draft 3 comes first; then the request is done.
    assert seen == [((0.9, 0.8, 0.7, 0.6, 0.5), 5, 50), ((0.7, 0.6, 0.5), 3, 52)] * 2
    assert result.accept_length == (2 + 1 + 2 + 1) / 4  # 3 tokens per record, as its full verification
    seen.clear()
    (by_round,) = simulate([record], cost, {"one": One}, [1], steps=4, draft_cost=False, replay="rounds")
    assert by_round.accept_length == 2.0  # one record per round: each offers a fresh accepted draft
    assert seen == [((0.9, 0.8, 0.7, 0.6, 0.5), 5, 50)] * 4
    # Verifying everything, both replays are the same.
    trace = synthetic_trace()
    assert simulate(trace, cost, ["fixed"], [1, 8], steps=30) == simulate(trace, cost, ["fixed"], [1, 8], steps=30,
                                                                         replay="rounds")
    with pytest.raises(DSparkError, match="replay mode 'tokens'.*positions, rounds"):
        simulate(trace, cost, ["fixed"], [1], replay="tokens")


def test_cost_table_reads_the_drafters_time_per_request_count():
    cost = CostTable.flat(10.0, drafter_propose_s={"1": 0.01, "4": 0.02, "16": 0.05})
    assert [cost.draft_time(r) for r in (1, 2, 4, 16, 32)] == pytest.approx([0.01, 0.04 / 3, 0.02, 0.05, 0.09])
    assert CostTable.flat(10.0).draft_time(4) is None  # profiled without a drafter
    assert CostTable.flat(10.0, drafter_propose_s={"2": 0.01}).draft_time(8) == 0.01
    swapped = cost.with_draft_time(0.03)  # dspark simulate --draft-ms: one time at every request count
    assert [swapped.draft_time(r) for r in (1, 4, 32)] == [0.03] * 3 and swapped.sps == cost.sps
    assert cost.draft_time(4) == pytest.approx(0.02)  # the original is unchanged
    with pytest.raises(DSparkError, match="got -1"):
        cost.with_draft_time(-1.0)
    with pytest.raises(DSparkError, match="drafter_propose_s"):
        CostTable.flat(10.0, drafter_propose_s={"x": 0.01}).draft_time(1)
    with pytest.raises(DSparkError, match="drafter_propose_s"):
        CostTable.flat(10.0, drafter_propose_s={"1": -1.0})
    with pytest.raises(DSparkError, match="distinct counts"):
        CostTable.flat(10.0, drafter_propose_s={"1": 0.01, "01": 0.02})


def test_simulated_draft_cost_and_draft_gate():
    """With the drafter's time in the table, drafting that is never accepted costs every round; a
    gated scheduler stops drafting and comes back to within a few probes of plain decoding."""
    hopeless = [{"confidences": [], "proposed": 4, "accepted": 0, "request": i // 8} for i in range(400)]
    cost = CostTable.gpu_shaped(knee=64, base_ms=10.0, ms_per_token=0.1, drafter_propose_s={"1": 0.004, "8": 0.006})
    policies = ["none", "fixed", "scheduled"]
    by = {(r.policy, r.concurrency): r for r in simulate(hopeless, cost, policies, [1, 8], steps=200)}
    free = {(r.policy, r.concurrency): r for r in simulate(hopeless, cost, policies, [1, 8], steps=200, draft_cost=False)}
    for c, draft_ms in ((1, 4.0), (8, 6.0)):
        assert by["none", c].speedup == pytest.approx(1.0)
        assert by["fixed", c].speedup < free["fixed", c].speedup  # drafting is charged ...
        assert by["fixed", c].speedup < 10.0 / (10.0 + draft_ms) + 0.01  # ... every round
        assert by["scheduled", c].speedup > 0.95  # the gate closes: only probes pay for drafting
        # the first rounds, before the estimates learn (the pools after a new, a rejected and an
        # unverified round each learn from their own), and probes
        assert by["scheduled", c].mean_verified < 0.25


def test_trace_from_engine_stats_round_trips_through_jsonl(qwen3_target, tmp_path):
    engine = Engine(qwen3_target, make("dspark-vanilla", qwen3_target), EngineConfig(block_size=4, max_batch_size=3, max_seq_len=64))
    outs = engine.generate([Request(p, stop=StopParams(max_new_tokens=m)) for p, m in zip(PROMPTS, MAX_NEW)])
    records = trace_from_stats([o.stats for o in outs])
    assert records and all(len(r["confidences"]) >= r["accepted"] for r in records)
    save_trace(records, tmp_path / "trace.jsonl")
    assert len(load_trace(tmp_path / "trace.jsonl")) == len(records)
    results = simulate(tmp_path / "trace.jsonl", CostTable.flat(), ["fixed", "scheduled"], [2], steps=5)
    assert len(results) == 2
    ngram = Engine(qwen3_target, NgramDrafter(), EngineConfig(block_size=4, max_batch_size=3, max_seq_len=64))
    outs = ngram.generate([Request(p, stop=StopParams(max_new_tokens=m)) for p, m in zip(PROMPTS, MAX_NEW)])
    no_conf = trace_from_stats([o.stats for o in outs])
    assert all(r["confidences"] == [] and "proposed" in r for r in no_conf)
    counts = collections.Counter(r.policy for r in simulate(no_conf, CostTable.flat(), ["scheduled", "threshold"], [4], steps=5))
    assert counts == {"scheduled": 1, "threshold": 1}


def test_trace_contexts_follow_each_request_and_the_simulator_prices_them(qwen3_target, tmp_path):
    engine = Engine(qwen3_target, NgramDrafter(), EngineConfig(block_size=4, max_batch_size=3, max_seq_len=64))
    outs = engine.generate([Request(p, stop=StopParams(max_new_tokens=m)) for p, m in zip(PROMPTS, MAX_NEW)])
    records = trace_from_stats([o.stats for o in outs], contexts=[len(o.prompt_ids) for o in outs])
    for i, o in enumerate(outs):  # a round's context: the prompt plus what earlier rounds committed
        starts = [len(o.prompt_ids)] + [len(o.prompt_ids) + c for c in
                                        itertools.accumulate(committed for _, _, committed in o.stats.round_log)]
        mine = [r["context"] for r in records if r["request"] == i]
        assert mine == starts[:-1]  # verify-all with n-gram drafts: every round is kept
    save_trace(records, tmp_path / "trace.jsonl")
    assert [r.context for r, _ in load_trace(tmp_path / "trace.jsonl")] == [r["context"] for r in records]

    # Same acceptance, contexts 100 and 1100; the table adds 10 us per cached token beyond 100 per row.
    trace = [{"confidences": [], "proposed": 2, "accepted": 2, "request": i // 4, "context": ctx}
             for i, ctx in enumerate([100] * 400 + [1100] * 400)]
    short, long = trace[:400], [dict(r, context=1100) for r in trace[:400]]
    cost = CostTable((1, 64), (100.0, 50.0), context=100, context_s=((1, (1e-5, 0.0)), (8, (8e-5, 0.0))))
    # replay="rounds": every round at its record's own context (by position, a round that commits
    # less than its record would sit a few tokens further on).
    at = {name: {r.policy: r for r in simulate(t, cost, ["none", "fixed"], [4], steps=50, replay="rounds")}
          for name, t in (("short", short), ("long", long), ("unsaid", [{k: v for k, v in r.items() if k != "context"}
                                                                        for r in long]))}
    for policy in ("none", "fixed"):
        assert at["short"][policy].tokens_per_s == pytest.approx(at["unsaid"][policy].tokens_per_s)
        assert at["long"][policy].tokens_per_s < 0.8 * at["short"][policy].tokens_per_s  # 40 ms more per round

    class VerifyAll:  # a policy that is never told the context is still priced at it
        def decide(self, confidences, caps, keys=None):
            return list(caps)

    mine = simulate(long, cost, {"mine": VerifyAll}, [4], steps=50, replay="rounds")[0]
    assert mine.tokens_per_s == pytest.approx(at["long"]["fixed"].tokens_per_s)
    with pytest.raises(DSparkError, match="'context' must be an integer"):
        load_trace([{"confidences": [0.5], "accepted": 0, "context": -1}])


def test_plot_simulation_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    results = simulate(synthetic_trace(num=64), CostTable.flat(), ["none", "fixed"], [1, 4], steps=5)
    assert plot_simulation(results, tmp_path / "sim.png").stat().st_size > 0


@pytest.mark.parametrize(("line", "message"), [
    ('{"confidences": [0.5, 1.5], "accepted": 0}', "numbers in \\[0, 1\\]"),
    ('{"confidences": [0.5], "accepted": 2}', "'accepted' 2 exceeds"),
    ('{"confidences": [0.5]}', "'accepted' must be an integer"),
    ("oops", "not valid JSON"),
])
def test_malformed_traces_name_the_line(tmp_path, line, message):
    (tmp_path / "t.jsonl").write_text(json.dumps({"confidences": [0.5], "accepted": 1}) + "\n" + line + "\n")
    with pytest.raises(DSparkError, match=f"t.jsonl:2.*{message}"):
        load_trace(tmp_path / "t.jsonl")


@pytest.mark.parametrize("drafter_kind", ["dspark-rnn", "dflash", "eagle3", "draft-model", "ngram"])
def test_greedy_identity_when_drafting_is_skipped_for_stretches_of_rounds(qwen3_target, tiny_dirs, drafter_kind):
    """A gate may stop a drafter for many rounds; every drafter must catch up on what was committed
    meanwhile (its caches and pending features) and stay lossless."""
    target = qwen3_target
    if drafter_kind == "ngram":
        drafter = NgramDrafter()
    elif drafter_kind == "draft-model":
        drafter = DraftModelDrafter(load_model(str(tiny_dirs["qwen3"]), "fp64"))
    else:
        drafter = make(drafter_kind, target)
    engine = Engine(target, drafter, EngineConfig(block_size=4, max_batch_size=3, max_seq_len=64))
    outs = engine.generate([Request(p, stop=StopParams(max_new_tokens=m)) for p, m in zip(PROMPTS, MAX_NEW)],
                           RandomDraftCaps(7))
    for prompt, m, out in zip(PROMPTS, MAX_NEW, outs):
        assert out.token_ids == expected_greedy(target, prompt, m)
    if drafter_kind == "draft-model":  # the target drafting itself: every verified draft is accepted
        assert sum(o.stats.num_accepted for o in outs) == sum(o.stats.num_verified for o in outs) > 0


def test_async_policy_starts_over_after_rounds_without_drafts():
    """Budgets of rounds where nothing was drafted (a closed gate) must not starve later rounds."""
    cost = CostTable.flat()
    policy = build_policy("async", 2, cost, draft_gate=False)
    confident = [[0.9, 0.9], [0.9, 0.9]]
    for _ in range(3):
        assert policy.decide([[], []], [0, 0]) == [0, 0]
    assert policy.decide(confident, [2, 2]) == scheduled_lengths(confident, [2, 2], cost) == [2, 2]
