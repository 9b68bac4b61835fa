"""Verification algebra: exact in float64, greedy rules, ragged rows."""

from __future__ import annotations

import itertools

import pytest
import torch

from dspark.config import SamplingParams
from dspark.engine.verify import residual_probs, verify_ragged, verify_row
from tests.conftest import tv_bound


def random_dist(v: int, gen: torch.Generator, zeros: int = 0) -> torch.Tensor:
    p = torch.rand(v, generator=gen, dtype=torch.float64) ** 3
    p[torch.randperm(v, generator=gen)[:zeros]] = 0.0
    return p / p.sum()


def exact_first_token_distribution(target: torch.Tensor, draft: torch.Tensor) -> torch.Tensor:
    """P(first emitted token = x) for one draft position, by enumerating the draft token and both
    branches of the accept test, using the library's residual."""
    out = torch.zeros_like(target)
    for d in range(target.numel()):
        if draft[d] == 0:
            continue
        accept = min(1.0, float(target[d] / draft[d]))
        out[d] += draft[d] * accept
        out += draft[d] * (1.0 - accept) * residual_probs(target, draft)
    return out


def test_one_step_reproduces_target_exactly_in_float64():
    gen = torch.Generator().manual_seed(0)
    for trial in range(50):
        v = 2 + trial % 7
        target = random_dist(v, gen, zeros=trial % 2)
        draft = random_dist(v, gen, zeros=(trial // 2) % 2)
        torch.testing.assert_close(exact_first_token_distribution(target, draft), target, atol=1e-15, rtol=0)


def test_one_step_with_point_mass_draft_reproduces_target_exactly():
    gen = torch.Generator().manual_seed(1)
    target = random_dist(6, gen)
    for d in range(6):
        draft = torch.zeros(6, dtype=torch.float64)
        draft[d] = 1.0
        torch.testing.assert_close(exact_first_token_distribution(target, draft), target, atol=1e-15, rtol=0)


def test_residual_of_identical_distributions_falls_back_to_target():
    p = torch.tensor([0.2, 0.8], dtype=torch.float64)
    assert torch.equal(residual_probs(p, p.clone()), p)


def test_greedy_accepts_the_matching_prefix_then_emits_argmax():
    target = torch.eye(5)[[1, 2, 4, 0]]  # argmax per position: 1, 2, 4, 0
    assert verify_row(target, torch.tensor([1, 2, 3]), None, True, None) == (2, 4)
    assert verify_row(target, torch.tensor([1, 2, 4]), None, True, None) == (3, 0)  # bonus
    assert verify_row(target[:1], torch.tensor([], dtype=torch.long), None, True, None) == (0, 1)
    assert verify_row(target, torch.tensor([0, 2, 4]), None, True, None) == (0, 1)


def test_sampling_never_emits_a_token_the_target_excludes():
    gen = torch.Generator().manual_seed(2)
    target = torch.tensor([[0.0, 0.5, 0.5, 0.0]] * 3, dtype=torch.float64)
    draft = torch.tensor([[0.7, 0.1, 0.1, 0.1]] * 2, dtype=torch.float64)
    for _ in range(200):
        tokens = torch.multinomial(draft, 1, generator=gen).squeeze(-1)
        a, nxt = verify_row(target, tokens, draft, False, gen)
        assert all(int(t) in (1, 2) for t in tokens[:a]) and nxt in (1, 2)


def test_ragged_batch_with_zero_draft_rows_matches_rowwise_verification():
    gen = torch.Generator().manual_seed(3)
    vocab, lengths = 7, [0, 3, 1]
    logits = torch.randn(3, 4, vocab, generator=gen, dtype=torch.float64)
    drafts = [torch.randint(0, vocab, (n,), generator=gen) for n in lengths]
    dprobs = [torch.softmax(torch.randn(n, vocab, generator=gen, dtype=torch.float64), -1) for n in lengths]
    params = [SamplingParams(temperature=0.8, seed=s) for s in range(3)]
    gens = [torch.Generator().manual_seed(10 + i) for i in range(3)]
    result = verify_ragged(logits, drafts, dprobs, params, gens)
    for row, n in enumerate(lengths):
        probs = torch.softmax(logits[row, : n + 1] / 0.8, -1)
        expected = verify_row(probs, drafts[row], dprobs[row], False, torch.Generator().manual_seed(10 + row))
        assert (result.num_accepted[row], result.next_tokens[row]) == expected
        assert 0 <= result.num_accepted[row] <= n


def test_monte_carlo_two_position_chain_matches_target_joint():
    """Two drafted positions with a full accept/bonus chain: the first two emitted tokens follow the
    target's joint distribution (200k draws)."""
    gen = torch.Generator().manual_seed(4)
    v, n_samples = 3, 200_000
    target = torch.stack([random_dist(v, gen) for _ in range(1 + v)])  # [0]: first pos; [1+x]: after x
    draft = torch.stack([random_dist(v, gen) for _ in range(1 + v)])
    counts = torch.zeros(v, v, dtype=torch.float64)
    sampler = torch.Generator().manual_seed(5)
    for _ in range(n_samples // 1000):
        d1 = torch.multinomial(draft[0], 1000, replacement=True, generator=sampler)
        for x1 in d1.tolist():
            d2 = int(torch.multinomial(draft[1 + x1], 1, generator=sampler))
            tp = torch.stack([target[0], target[1 + x1], target[1 + d2]])  # third row unused unless bonus
            dp = torch.stack([draft[0], draft[1 + x1]])
            a, nxt = verify_row(tp, torch.tensor([x1, d2]), dp, False, sampler)
            emitted = [x1, d2][:a] + [nxt]
            if len(emitted) < 2:  # first draft rejected: second token comes from the target
                emitted.append(int(torch.multinomial(target[1 + emitted[0]], 1, generator=sampler)))
            counts[emitted[0], emitted[1]] += 1
    joint = target[0][:, None] * target[1:]
    tv = 0.5 * (counts / n_samples - joint).abs().sum()
    bound = tv_bound(joint.flatten().tolist(), n_samples)
    assert tv < bound, f"TV {tv:.5f} >= {bound:.5f} (null mean + 4 sigma: false-failure probability < 1e-4)"


def test_every_combination_of_draft_lengths_is_handled():
    gen = torch.Generator().manual_seed(6)
    for lengths in itertools.product([0, 1, 2], repeat=3):
        logits = torch.randn(3, 3, 5, generator=gen)
        drafts = [torch.randint(0, 5, (n,), generator=gen) for n in lengths]
        params = [SamplingParams(temperature=1.0)] * 3
        result = verify_ragged(logits, drafts, [None] * 3, params, [gen] * 3)
        assert all(0 <= a <= n for a, n in zip(result.num_accepted, lengths))


def test_prefix_survival_is_the_expected_accept_count_given_the_drafts():
    """survival[k-1] = P(first k drafts accepted | drafts); exact by enumerating the accept tests
    (each draft's acceptance is min(1, target / draft), independent given the drafts), and the
    realised mean of num_accepted over many draws matches its sum."""
    from dspark.engine.verify import prefix_survival

    gen = torch.Generator().manual_seed(7)
    v, n = 5, 3
    target = torch.stack([random_dist(v, gen, zeros=1) for _ in range(n + 1)])
    draft = torch.stack([random_dist(v, gen, zeros=1) for _ in range(n)])
    draft[1, 2], draft[1] = 0.0, draft[1] / draft[1].sum()  # a token the drafter gave no mass
    target[1, 2] = 0.3  # ... and the target some: accepted surely
    target[1] /= target[1].sum()
    tokens = torch.tensor([int(draft[0].argmax()), 2, int(target[2].argmin())])
    ratios = [min(1.0, float(target[k, t] / draft[k, t])) if draft[k, t] > 0 else float(target[k, t] > 0)
              for k, t in enumerate(tokens.tolist())]
    want = list(itertools.accumulate(ratios, lambda a, b: a * b))
    survival = prefix_survival(target, tokens, draft, greedy=False)
    assert survival == pytest.approx(want, abs=1e-15) and ratios[1] == 1.0
    sampler = torch.Generator().manual_seed(8)
    draws = [verify_row(target, tokens, draft, False, sampler)[0] for _ in range(20_000)]
    mean, sd = sum(draws) / len(draws), float(torch.tensor(draws, dtype=torch.float64).std())
    assert abs(mean - sum(want)) < 5 * sd / len(draws) ** 0.5  # false failure ~6e-7
    # Point-mass drafts: the target's own probability; greedy: the matching prefix, as verify_row.
    assert prefix_survival(target, tokens, None, greedy=False) == pytest.approx(
        list(itertools.accumulate([float(target[k, t]) for k, t in enumerate(tokens.tolist())], lambda a, b: a * b)))
    logits = torch.eye(5)[[1, 2, 4, 0]]
    assert prefix_survival(logits, torch.tensor([1, 2, 3]), None, greedy=True) == [1.0, 1.0, 0.0]
    assert prefix_survival(logits, torch.tensor([0, 2]), None, greedy=True) == [0.0, 0.0]
    assert prefix_survival(logits[:1], torch.tensor([], dtype=torch.long), None, greedy=True) == []


def test_ragged_verification_reports_each_rows_survival():
    gen = torch.Generator().manual_seed(9)
    lengths = [0, 3, 1]
    logits = torch.randn(3, 4, 6, generator=gen, dtype=torch.float64)
    drafts = [torch.randint(0, 6, (n,), generator=gen) for n in lengths]
    dprobs = [torch.softmax(torch.randn(n, 6, generator=gen, dtype=torch.float64), -1) for n in lengths]
    for params in ([SamplingParams(temperature=0.7, seed=s) for s in range(3)], [SamplingParams()] * 3):
        result = verify_ragged(logits, drafts, dprobs, params, [torch.Generator().manual_seed(i) for i in range(3)])
        assert [len(s) for s in result.survival] == lengths
        assert all(all(0.0 <= x <= 1.0 for x in s) and s == sorted(s, reverse=True) for s in result.survival)
        if params[0].greedy:  # greedy: survival is the realised outcome
            assert [round(sum(s)) for s in result.survival] == result.num_accepted
