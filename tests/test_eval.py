"""Acceptance metrics on hand-made logs, and the benchmark runner against the engine's own numbers."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dspark.cli import main
from dspark.config import EngineConfig, SamplingParams, StopParams
from dspark.drafters.checkpoint import build_dspark_model, load_drafter, new_dspark_config, save_drafter
from dspark.drafters.simple import NgramDrafter
from dspark.engine.engine import Engine, Request
from dspark.errors import DSparkError
from dspark.eval import runner
from dspark.eval.calibration import (
    SurvivalSamples, auroc, calibration_metrics, ece, fit_sts, known_positions, survival_samples, threshold_sweep,
)
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
    assert m["position_rounds"] == [4, 3, 1]  # the rounds behind each conditional acceptance below
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
    results = runner.run_eval(target, {"ngram": NgramDrafter()}, [str(bench)], tmp_path / "out", cfg, plots=False)
    got = results["benchmarks"]["bench"]["drafters"]["ngram"]
    # The same prompts and seeds straight through the engine.
    engine = Engine(target, NgramDrafter(), EngineConfig(block_size=3, max_batch_size=1, max_seq_len=64))
    committed = rounds = 0
    for i, line in enumerate(bench.read_text().split("\n")):
        ids = encode_messages(target.tokenizer, [{"role": "user", "content": json.loads(line)["turns"][0]}])
        out = engine.generate([Request(ids, SamplingParams(1.0, seed=runner.SEED + i), StopParams(12))])[0]
        committed += out.stats.committed_in_rounds
        rounds += out.stats.rounds
    assert got["accept_length"] == pytest.approx(committed / rounds)
    assert results["benchmarks"]["bench"]["drafters"]["none"]["accept_length"] == pytest.approx(1.0)
    assert "| bench | other | ngram |" in (tmp_path / "out" / "report.md").read_text()

    def must_not_run(*args, **kwargs):
        raise AssertionError("finished (benchmark, drafter) pairs are not rerun")

    monkeypatch.setattr(runner, "run_pair", must_not_run)
    again = runner.run_eval(target, {"ngram": NgramDrafter()}, [str(bench)], tmp_path / "out", cfg, plots=False)
    assert again["benchmarks"]["bench"]["drafters"]["ngram"]["accept_length"] == got["accept_length"]


def test_eval_cli(capsys, tiny_dirs, tmp_path):
    bench = tmp_path / "b.jsonl"
    bench.write_text(json.dumps({"turns": ["w5 w6 w5 w6"]}))
    assert main(["eval", "--target", str(tiny_dirs["llama"]), "--drafter", "ngram", "--benchmarks", str(bench),
                 "--out", str(tmp_path / "o"), "--max-new-tokens", "8", "--dtype", "fp32"]) == 0
    assert "speedup vs plain" in capsys.readouterr().out
    assert main(["eval", "--drafter", "ngram", "--benchmarks", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "x")]) == 2
    assert "benchmark" in capsys.readouterr().err


def test_eval_policy_caps_verification_and_belongs_to_the_settings(target, tiny_dirs, tmp_path, capsys):
    bench = tmp_path / "bench.jsonl"
    bench.write_text("\n".join(json.dumps({"turns": [f"w{i} w{i + 1} w{i} w{i + 1} w{i} w{i + 1}"]}) for i in range(5, 8)))
    runs = {}
    for policy in ("fixed", "fixed:1"):
        cfg = runner.EvalConfig(temperature=0.0, block_size=3, max_new_tokens=12, policy=policy)
        results = runner.run_eval(target, {"ngram": NgramDrafter()}, [str(bench)], tmp_path / policy, cfg, plots=False)
        runs[policy] = results["benchmarks"]["bench"]["drafters"]["ngram"]
    assert runs["fixed"]["verified_per_round"] > runs["fixed:1"]["verified_per_round"] > 0
    assert "policy fixed:1" in (tmp_path / "fixed:1" / "report.md").read_text()
    with pytest.raises(DSparkError, match="policy"):  # one folder, one policy
        runner.run_eval(target, {"ngram": NgramDrafter()}, [str(bench)], tmp_path / "fixed:1",
                        runner.EvalConfig(temperature=0.0, block_size=3, max_new_tokens=12), plots=False)
    assert main(["eval", "--target", str(tiny_dirs["llama"]), "--drafter", "ngram", "--benchmarks", str(bench),
                 "--out", str(tmp_path / "bad"), "--policy", "sometimes", "--dtype", "fp32"]) == 2
    assert "valid: auto, none, fixed" in capsys.readouterr().err and not (tmp_path / "bad").exists()


# ------------------------------------------------------------------------------------ calibration
def _synthetic_rounds(n: int, k: int, scale: float, seed: int):
    """Rounds whose true conditional acceptance is sigmoid(z); the scores are over-confident logits scale*z."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k, generator=g, dtype=torch.float64) * 1.5 + 0.8
    accepted = torch.zeros(n, dtype=torch.long)
    alive = torch.ones(n, dtype=torch.bool)
    for j in range(k):
        alive &= torch.rand(n, generator=g, dtype=torch.float64) < torch.sigmoid(z[:, j])
        accepted += alive.long()
    known = torch.where(accepted < k, torch.full_like(accepted, k), accepted)
    return SurvivalSamples(z * scale, accepted, known)


def test_sts_recovers_the_true_rates_of_over_confident_scores():
    fit, held_out = _synthetic_rounds(100_000, 5, 3.0, seed=1), _synthetic_rounds(100_000, 5, 3.0, seed=2)
    temps = fit_sts(fit)
    # Early positions are well identified; late ones see few survivors, so ECE is flat around 3.
    assert temps[:3] == pytest.approx([3.0] * 3, rel=0.15) and all(2.0 < t < 4.5 for t in temps), temps
    before, after = calibration_metrics(held_out), calibration_metrics(held_out, temps)
    assert before["ece_mean"] > 0.05
    assert after["ece_mean"] < 0.01, f"held-out ECE after STS {after['ece_mean']:.4f} (before {before['ece_mean']:.4f})"
    assert all(p["ece"] < 0.015 for p in after["positions"]), [p["ece"] for p in after["positions"]]


def test_temperature_scaling_never_changes_the_ordering_of_confidences():
    z = torch.randn(2000, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 4
    for t in (0.05, 0.7, 1.0, 3.0, 20.0):
        scaled = torch.sigmoid(z / t)
        for j in range(4):
            order = torch.argsort(z[:, j])
            assert (scaled[order, j].diff() >= 0).all()  # monotone (saturation may only create ties)
            if 0.5 <= t <= 5:
                assert torch.equal(order, torch.argsort(scaled[:, j]))


def test_ece_auroc_brier_on_hand_made_scores():
    pred = torch.tensor([0.1, 0.1, 0.9, 0.9, 0.6], dtype=torch.float64)
    label = torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    # bins: 0.1 (2 samples, rate 0.5), 0.9 (2, rate 1.0), 0.6 (1, rate 0)
    assert ece(pred, label) == pytest.approx((2 * 0.4 + 2 * 0.1 + 0.6) / 5)
    pairs = [(p, q) for p, lp in zip(pred, label) for q, lq in zip(pred, label) if lp == 1 and lq == 0]
    brute = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p, q in pairs) / len(pairs)
    assert auroc(pred, label) == pytest.approx(brute)
    assert math.isnan(auroc(pred, torch.ones(5, dtype=torch.float64)))


def test_survival_labels_respect_rejections_eos_cuts_and_unverified_positions():
    # (verified, accepted, committed), proposals of 3 with confidences
    rounds = [(3, 1, 2), (3, 3, 4), (3, 2, 2), (1, 1, 2), (3, 0, 1)]
    conf = [[0.9, 0.5, 0.5]] * 4 + [[]]
    s = survival_samples(rounds, conf, 3)
    assert len(s) == 4  # the round without confidences is left out
    assert s.known.tolist() == [3, 3, 2, 1]  # rejection: all known; EOS accepted at draft 2: 2; partial verify: 1
    assert s.labels().tolist()[0] == [1.0, 0.0, 0.0]
    assert known_positions(3, 1, 2, 3) == 3 and known_positions(3, 2, 2, 3) == 2 and known_positions(2, 2, 3, 3) == 2
    sweep = threshold_sweep(s, [0.0, 0.6, 0.95])
    assert sweep[0]["verified_per_round"] == pytest.approx((3 + 3 + 2 + 1) / 4)  # threshold 0 = verify all known
    assert sweep[0]["accepted_per_round"] == pytest.approx((1 + 3 + 2 + 1) / 4)
    assert sweep[1]["verified_per_round"] == pytest.approx(1.0) and sweep[1]["acceptance_rate"] == pytest.approx(1.0)
    assert sweep[2]["verified_per_round"] == 0 and math.isnan(sweep[2]["acceptance_rate"])


# ------------------------------------------------------------------------------ DSpark end to end
@pytest.fixture(scope="module")
def qwen3_fp32(tiny_dirs):
    return load_model(str(tiny_dirs["qwen3"]), "fp32")


def _dspark_folder(target, folder):
    model = build_dspark_model(new_dspark_config(target, "dspark", {"markov_rank": 8, "block_size": 3}), target, seed=3)
    save_drafter(model, folder)
    return folder


def test_calibrate_then_eval_with_plots_and_reports(qwen3_fp32, tiny_dirs, tmp_path, capsys):
    target = qwen3_fp32
    folder = _dspark_folder(target, tmp_path / "drafter")
    prompts = tmp_path / "held_out.jsonl"
    prompts.write_text("\n".join(json.dumps({"turns": [f"w{i} w{i + 2} w{i + 1}"]}) for i in range(3, 9)))
    assert main(["calibrate", "--target", str(tiny_dirs["qwen3"]), "--drafter", str(folder), "--prompts", str(prompts),
                 "--max-new-tokens", "24", "--dtype", "fp32"]) == 0
    cal = json.loads((folder / "calibration.json").read_text())
    assert len(cal["temperatures"]) == 3 and all(t > 0 for t in cal["temperatures"])
    assert cal["ece_mean_after"] <= cal["ece_mean_before"] + 1e-12
    assert (folder / "calibration.png").stat().st_size > 0

    # The engine applies the temperatures on load: calibrated confidences = sigmoid(raw logit / T).
    raw, calibrated = load_drafter(folder, target, calibrated=False), load_drafter(folder, target)
    assert raw.confidence_temperatures == () and list(calibrated.confidence_temperatures) == cal["temperatures"]

    bench = tmp_path / "gsm8k.jsonl"
    bench.write_text("\n".join(json.dumps({"turns": [f"w{i} w{i + 1} w{i}"]}) for i in range(10, 13)))
    cfg = runner.EvalConfig(temperature=1.0, block_size=3, max_new_tokens=16, batch_size=2)
    results = runner.run_eval(target, {str(folder): calibrated, "ngram": NgramDrafter()}, [str(bench)], tmp_path / "out", cfg)
    r = results["benchmarks"]["gsm8k"]["drafters"]["drafter"]
    assert results["benchmarks"]["gsm8k"]["domain"] == "math"
    assert {"calibration", "calibration_before", "threshold_sweep"} <= r.keys()
    assert r["threshold_sweep"][0]["verified_per_round"] == pytest.approx(r["verified_per_round"])
    assert 1 + r["threshold_sweep"][0]["accepted_per_round"] >= r["accept_length"] - 1e-9  # EOS cuts only lower tau
    assert "threshold_sweep" in results["domains"]["math"]["drafter"]
    assert "threshold_sweep" not in results["domains"]["math"]["ngram"]
    for name in results["plots"]:
        assert (tmp_path / "out" / name).stat().st_size > 1000, name
    assert {"tau.png", "conditional_acceptance.png", "threshold_sweep_drafter.png", "reliability_gsm8k_drafter.png"} <= set(results["plots"])
    report = (tmp_path / "out" / "report.md").read_text()
    for heading in ("Accept length per domain", "Conditional acceptance", "Confidence calibration", "threshold sweep",
                    "published figures, not measured here"):
        assert heading in report, heading
    assert json.loads((tmp_path / "out" / "results.json").read_text())["config"]["batch_size"] == 2
    # The full-verification rounds become a trace the simulator replays.
    from dspark.engine.simulate import load_trace

    assert results["traces"] == ["traces/drafter.jsonl", "traces/ngram.jsonl"]
    trace = load_trace(tmp_path / "out" / "traces" / "drafter.jsonl")
    assert 0 < len(trace) <= r["rounds"] and all(len(rnd.confidences) == rnd.proposed for rnd, _ in trace)


def test_calibrate_refuses_a_drafter_without_confidence_head(qwen3_fp32, tiny_dirs, tmp_path, capsys):
    target = qwen3_fp32
    model = build_dspark_model(new_dspark_config(target, "dflash", {"block_size": 3}), target, seed=3)
    save_drafter(model, tmp_path / "dflash")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"turns": ["w3 w4"]}))
    assert main(["calibrate", "--target", str(tiny_dirs["qwen3"]), "--drafter", str(tmp_path / "dflash"),
                 "--prompts", str(prompts), "--dtype", "fp32"]) == 2
    assert "no confidence head" in capsys.readouterr().err
    assert not (tmp_path / "dflash" / "calibration.json").exists()


def test_drafters_sharing_a_folder_name_get_distinct_labels_and_settings_are_not_mixed(target, tmp_path):
    assert runner.drafter_labels(["none", "runs/a/final", "runs/b/final", "ngram"]) == {
        "none": "none", "runs/a/final": "runs_a_final", "runs/b/final": "runs_b_final", "ngram": "ngram"}
    bench = tmp_path / "b.jsonl"
    bench.write_text(json.dumps({"turns": ["w5 w6 w5 w6"]}))
    cfg = runner.EvalConfig(temperature=1.0, block_size=2, max_new_tokens=6)
    runner.run_eval(target, {}, [str(bench)], tmp_path / "out", cfg, plots=False)
    other = runner.EvalConfig(temperature=0.0, block_size=2, max_new_tokens=6)
    with pytest.raises(DSparkError, match="temperature"):
        runner.run_eval(target, {}, [str(bench)], tmp_path / "out", other, plots=False)


def test_eval_without_matplotlib_writes_results_and_skips_plots(monkeypatch, tmp_path, capsys):
    """The `eval` extra is optional: without matplotlib, results.json and report.md are written and
    the plots are skipped with one line naming the extra (no traceback, nothing lost)."""
    import builtins

    from dspark.drafters.simple import NgramDrafter
    from dspark.eval.runner import EvalConfig, run_eval
    from dspark.models.target import load_model
    from tests.conftest import save_tiny_model

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    target = load_model(str(save_tiny_model(tmp_path / "t", "qwen3")), "fp32")
    bench = tmp_path / "bench.jsonl"
    bench.write_text('{"turns": ["w5 w6 w7"]}\n')
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.warns(UserWarning, match="plots skipped.*dspark\\[eval\\]"):
        results = run_eval(target, {"ngram": NgramDrafter()}, [str(bench)], tmp_path / "out",
                           EvalConfig(max_new_tokens=8, limit=1))
    assert results["plots"] == []
    assert (tmp_path / "out" / "results.json").is_file() and (tmp_path / "out" / "report.md").is_file()
