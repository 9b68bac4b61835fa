"""Acceptance metrics on hand-made logs, and the benchmark runner against the engine's own numbers."""

from __future__ import annotations

import json
import math

import pytest

from dspark.cli import main
from dspark.config import EngineConfig, SamplingParams, StopParams
from dspark.drafters.simple import NgramDrafter
from dspark.engine.engine import Engine, Request
from dspark.eval import runner
from dspark.eval.metrics import summarize_rounds
from dspark.models.target import load_model
from dspark.text import encode_messages


def test_metrics_on_a_hand_made_log_with_an_eos_cut_round():
    # (verified, accepted, committed); the last round accepted a stop token: it commits a, no bonus
    rounds = [(3, 3, 4), (3, 1, 2), (3, 0, 1), (2, 2, 2)]
    m = summarize_rounds(rounds, max_positions=3)
    assert m["accept_length"] == pytest.approx(9 / 4)
    assert m["verified_per_round"] == pytest.approx(11 / 4)
    assert m["acceptance_rate"] == pytest.approx(6 / 11)
    assert m["prefix_survival"] == pytest.approx([3 / 4, 2 / 4, 1 / 3])
    assert m["conditional_acceptance"] == pytest.approx([3 / 4, 2 / 3, 1.0])
    empty = summarize_rounds([])
    assert empty["rounds"] == 0 and math.isnan(empty["accept_length"])


@pytest.fixture(scope="module")
def target(tiny_dirs):
    return load_model(str(tiny_dirs["llama"]), "fp32")


def test_runner_tau_equals_the_engines_statistics_and_resumes(target, tmp_path, monkeypatch):
    bench = tmp_path / "bench.jsonl"
    bench.write_text("\n".join(json.dumps({"turns": [f"w{i} w{i + 1} w{i} w{i + 1}"]}) for i in range(5, 9)))
    cfg = runner.EvalConfig(temperature=1.0, block_size=3, max_new_tokens=12)
    results = runner.run_eval(target, {"ngram": NgramDrafter()}, [str(bench)], tmp_path / "out", cfg)
    got = results["benchmarks"]["bench"]["ngram"]
    # The same prompts and seeds straight through the engine.
    engine = Engine(target, NgramDrafter(), EngineConfig(block_size=3, max_batch_size=1, max_seq_len=64))
    committed = rounds = 0
    for i, line in enumerate(bench.read_text().split("\n")):
        ids = encode_messages(target.tokenizer, [{"role": "user", "content": json.loads(line)["turns"][0]}])
        out = engine.generate([Request(ids, SamplingParams(1.0, seed=runner.SEED + i), StopParams(12))])[0]
        committed += out.stats.committed_in_rounds
        rounds += out.stats.rounds
    assert got["accept_length"] == pytest.approx(committed / rounds)
    assert results["benchmarks"]["bench"]["none"]["accept_length"] == pytest.approx(1.0)
    assert "| bench | ngram |" in (tmp_path / "out" / "report.md").read_text()

    def must_not_run(*args, **kwargs):
        raise AssertionError("finished (benchmark, drafter) pairs are not rerun")

    monkeypatch.setattr(runner, "run_pair", must_not_run)
    again = runner.run_eval(target, {"ngram": NgramDrafter()}, [str(bench)], tmp_path / "out", cfg)
    assert again["benchmarks"]["bench"]["ngram"]["accept_length"] == got["accept_length"]


def test_eval_cli(capsys, tiny_dirs, tmp_path):
    bench = tmp_path / "b.jsonl"
    bench.write_text(json.dumps({"turns": ["w5 w6 w5 w6"]}))
    assert main(["eval", "--target", str(tiny_dirs["llama"]), "--drafter", "ngram", "--benchmarks", str(bench),
                 "--out", str(tmp_path / "o"), "--max-new-tokens", "8", "--dtype", "fp32"]) == 0
    assert "speedup vs plain" in capsys.readouterr().out
    assert main(["eval", "--drafter", "ngram", "--benchmarks", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "x")]) == 2
    assert "benchmark" in capsys.readouterr().err
