"""Warping: temperature, top-k, top-p, greedy."""

from __future__ import annotations

import pytest
import torch

from dspark.config import SamplingParams
from dspark.errors import DSparkError
from dspark.sampling import logits_to_probs, sample

LOGITS = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]], dtype=torch.float64))


def test_greedy_is_one_hot_argmax():
    probs = logits_to_probs(LOGITS, SamplingParams(temperature=0.0))
    assert probs.tolist() == [[1.0, 0.0, 0.0, 0.0]]


def test_temperature_one_is_softmax():
    torch.testing.assert_close(logits_to_probs(LOGITS, SamplingParams(temperature=1.0)), LOGITS.exp())


def test_top_k_keeps_k_most_likely_renormalised():
    probs = logits_to_probs(LOGITS, SamplingParams(temperature=1.0, top_k=2))
    torch.testing.assert_close(probs, torch.tensor([[2 / 3, 1 / 3, 0.0, 0.0]], dtype=torch.float64))


@pytest.mark.parametrize(
    ("top_p", "kept"),
    [(0.5, 1), (0.5001, 2), (0.75, 2), (0.76, 3), (0.89, 3), (0.91, 4), (1.0, 4)],
)
def test_top_p_keeps_smallest_nucleus_reaching_p(top_p, kept):
    probs = logits_to_probs(LOGITS, SamplingParams(temperature=1.0, top_p=top_p))
    assert int((probs > 0).sum()) == kept
    torch.testing.assert_close(probs.sum(), torch.tensor(1.0, dtype=torch.float64))


def test_top_k_then_top_p_compose():
    probs = logits_to_probs(LOGITS, SamplingParams(temperature=1.0, top_k=3, top_p=0.6))
    # top-3 renormalised: 0.556, 0.278, 0.167 -> nucleus 0.6 keeps two
    assert int((probs > 0).sum()) == 2


@pytest.mark.parametrize(
    "kwargs", [dict(temperature=-0.1), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)]
)
def test_bad_sampling_params_are_rejected_with_the_value(kwargs):
    with pytest.raises(DSparkError, match=str(list(kwargs.values())[0])):
        SamplingParams(**kwargs)


def test_inverse_cdf_sampler_matches_probabilities_and_skips_zeros():
    from dspark.sampling import sample

    probs = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.2, 0.0])
    gen = torch.Generator().manual_seed(0)
    n = 40_000
    counts = torch.bincount(torch.tensor([sample(probs, gen) for _ in range(n)]), minlength=6).double() / n
    assert counts[[0, 2, 5]].sum() == 0
    sigma = (probs.double() * (1 - probs.double()) / n).sqrt()
    assert ((counts - probs.double()).abs() <= 5 * sigma + 1e-12).all(), f"{counts} vs {probs} (5 sigma per cell)"
    assert sample(torch.tensor([0.0, 0.0, 1.0]), gen) == 2


@pytest.mark.parametrize("temperature", [1e-40, 1e-300, 5e-324, 9e-6])
def test_tiny_temperatures_decode_greedily(temperature):
    params = SamplingParams(temperature=temperature, top_k=5)
    assert params.greedy
    logits = torch.tensor([0.1, 3.0, -2.0, 2.9])
    probs = logits_to_probs(logits, params)
    assert probs.tolist() == [0.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("top_p", [1e-46, 1e-300, 1e-40])
@pytest.mark.parametrize("top_k", [0, 3])
def test_tiny_top_p_keeps_the_most_likely_token(top_p, top_k):
    params = SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p)
    probs = logits_to_probs(torch.tensor([0.1, 3.0, -2.0, 2.9]), params)
    assert probs.tolist() == [0.0, 1.0, 0.0, 0.0]
    assert sample(probs, torch.Generator().manual_seed(0)) == 1


@pytest.mark.parametrize("temperature", [float("inf"), float("nan"), -1.0])
def test_non_finite_or_negative_temperature_is_refused(temperature):
    with pytest.raises(DSparkError, match="temperature must be finite and >= 0"):
        SamplingParams(temperature=temperature)
