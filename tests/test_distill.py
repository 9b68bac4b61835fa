"""`dspark distill` end to end on a tiny target: every stage runs, a rerun redoes nothing, a run
stopped by its time budget resumes where it stopped, and a rerun with other settings is refused."""

from __future__ import annotations

import json

import pytest

from dspark.cli import main
from dspark.errors import DSparkError
from dspark.models.target import load_model
from dspark.train.distill import STAGES, DistillConfig, distill, split_prompts


@pytest.fixture(scope="module")
def target(tiny_dirs):
    return load_model(str(tiny_dirs["qwen3"]), "fp32")


@pytest.fixture
def files(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(json.dumps({"turns": [f"w{5 + i} w{9 + i} w{30 + i}"]}) for i in range(10)) + "\n")
    bench = tmp_path / "bench.jsonl"
    bench.write_text("\n".join(json.dumps({"turns": [f"w{40 + i} w{41 + i}"]}) for i in range(2)) + "\n")
    return train, bench


def config(**kw) -> DistillConfig:
    base = dict(preset="tiny", overrides=("num_anchors=64",), holdout_every=3, max_new_tokens=24, batch_size=4,
                eval_benchmarks=(), eval_limit=2, eval_max_new_tokens=12, calibrate_limit=2, max_steps=3)
    return DistillConfig(**{**base, **kw})


def test_every_stage_runs_once_and_a_rerun_redoes_nothing(target, files, tmp_path):
    train, bench = files
    cfg = config(eval_benchmarks=(str(bench),))
    out = tmp_path / "run"
    state = distill(target, [str(train)], out, cfg, progress=False, log=lambda line: None)
    assert list(state["done"]) == list(STAGES)
    assert state["done"]["train"]["steps"] == 3 and (out / "run" / "step_3" / "config.json").is_file()
    assert (out / "run" / "step_3" / "calibration.json").is_file()
    assert set(state["done"]["evaluate"]["benchmarks"]["bench"]) == {"none", "ngram", "step_3"}
    held = state["done"]["split"]["held_out_prompts"]
    assert held > 0 and state["done"]["split"]["train_prompts"] == 10 - held
    answers = (out / "data" / "answers.jsonl").read_bytes()
    assert answers.count(b"\n") == 10 - held  # held-out prompts are never answered for training
    report = (out / "report.md").read_text()
    assert "| evaluate | done |" in report and "| bench | ngram |" in report
    lines = []
    distill(target, [str(train)], out, cfg, progress=False, log=lines.append)
    assert all("skipped" in line for line in lines) and len(lines) == len(STAGES)
    assert (out / "data" / "answers.jsonl").read_bytes() == answers
    assert (out / "run" / "latest").read_text().strip() == "step_3"


def test_a_run_stopped_by_its_time_budget_resumes_and_other_settings_are_refused(target, files, tmp_path):
    train, _ = files
    out = tmp_path / "run"
    state = distill(target, [str(train)], out, config(time_budget_s=1e-9), progress=False, log=lambda line: None)
    assert "train" not in state["done"] and (out / "run" / "latest").read_text().strip() == "step_1"
    answers = (out / "data" / "answers.jsonl").read_bytes()
    state = distill(target, [str(train)], out, config(), progress=False, log=lambda line: None)
    assert state["done"]["train"]["steps"] == 3
    assert (out / "data" / "answers.jsonl").read_bytes() == answers  # nothing regenerated
    with pytest.raises(DSparkError, match="other settings"):
        distill(target, [str(train)], out, config(max_new_tokens=30), progress=False, log=lambda line: None)


def test_holdout_split_is_deterministic_and_disjoint():
    from dspark.data.prompts import PromptRecord

    prompts = [PromptRecord(f"f:{i}", ({"role": "user", "content": "x"},)) for i in range(200)]
    train, held = split_prompts(prompts, 10)
    assert {p.id for p in train}.isdisjoint(p.id for p in held) and len(train) + len(held) == 200
    assert 5 <= len(held) <= 40
    assert [p.id for p in split_prompts(prompts, 10)[1]] == [p.id for p in held]


def test_distill_cli(capsys, tiny_dirs, files, tmp_path):
    train, _ = files
    argv = ["distill", "--target", str(tiny_dirs["qwen3"]), "--prompts", str(train), "--out", str(tmp_path / "d"),
            "--preset", "tiny", "--max-new-tokens", "16", "--max-steps", "2", "--holdout-every", "3",
            "--features", "online", "--dtype", "fp32"]
    assert main(argv) == 0
    assert "| train | done |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([*argv, "--time-budget", "soon"])
    assert "is not a duration" in capsys.readouterr().err


@pytest.mark.slow
def test_distill_rebuilds_a_smollm2_drafter_in_a_few_steps(smollm2_dir, tmp_path):
    """The builtin target through every stage: 6 MATH-500 prompts answered, cached, 2 training steps
    of the preset, calibration on the held-out prompt, evaluation on one GSM8K prompt."""
    from tests.conftest import SHARED_DATA

    train_file, eval_file = SHARED_DATA / "train" / "math500.jsonl", SHARED_DATA / "eval" / "gsm8k.jsonl"
    if not train_file.is_file() or not eval_file.is_file():
        pytest.skip(f"{SHARED_DATA} is absent (the shared prompt sets live beside the repository)")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(train_file.read_text().split("\n")[:6]) + "\n")
    bench = tmp_path / "gsm8k.jsonl"
    bench.write_text(eval_file.read_text().split("\n")[0] + "\n")
    target = load_model(str(smollm2_dir), "bf16")
    cfg = DistillConfig(overrides=("grad_accum=2",), holdout_every=3, max_new_tokens=32, max_steps=2,
                        eval_benchmarks=(str(bench),), eval_limit=1, eval_max_new_tokens=16, calibrate_limit=1)
    state = distill(target, [str(prompts)], tmp_path / "d", cfg, progress=False, log=lambda line: None)
    assert list(state["done"]) == list(STAGES)
    assert state["done"]["train"]["steps"] == 2 and state["done"]["split"]["held_out_prompts"] >= 1
    assert "gsm8k" in state["done"]["evaluate"]["benchmarks"]
