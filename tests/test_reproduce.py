"""benchmarks/reproduce.py end to end on a tiny target: every run trains on the same data with the
same steps, DSpark runs are calibrated, all are evaluated at T = 0 and T = 1 against plain decoding,
the report states each claim, and a rerun redoes nothing."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from dspark.data.prompts import read_prompts
from dspark.data.regenerate import RegenerateConfig, regenerate_local
from dspark.models.target import load_model

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "reproduce.py"


@pytest.fixture(scope="module")
def reproduce():
    spec = importlib.util.spec_from_file_location("reproduce", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def setup(tiny_dirs, tmp_path):
    target_dir = str(tiny_dirs["llama"])
    prompts = tmp_path / "train.jsonl"
    prompts.write_text("\n".join(json.dumps({"turns": [f"w{5 + i} w{9 + i} w{30 + i}"]}) for i in range(6)) + "\n")
    regenerate_local(load_model(target_dir, "fp32"), read_prompts([prompts]), tmp_path / "data",
                     RegenerateConfig(max_new_tokens=24, batch_size=6), progress=False)
    holdout = tmp_path / "holdout.jsonl"
    holdout.write_text(json.dumps({"turns": ["w3 w4 w5"]}) + "\n")
    bench = tmp_path / "bench.jsonl"
    bench.write_text("\n".join(json.dumps({"turns": [f"w{40 + i} w{41 + i}"]}) for i in range(2)) + "\n")
    argv = ["--target", target_dir, "--base-preset", "tiny", "--set", "num_anchors=16", "--data", str(tmp_path / "data"),
            "--holdout", str(holdout), "--benchmarks", str(bench), "--steps", "2", "--limit", "1", "--max-new-tokens", "8",
            "--calibrate-limit", "1", "--latency-repeats", "2", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")]
    return argv, tmp_path


def test_every_run_trains_equally_is_evaluated_and_reported(reproduce, setup):
    argv, tmp_path = setup
    assert reproduce.main(argv) == 0
    state = json.loads((tmp_path / "work" / "state.json").read_text())
    assert list(state["runs"]) == list(reproduce.RUNS)
    for name, run in state["runs"].items():
        arch = reproduce.RUNS[name][0]
        assert run["train"]["steps"] == 2 and run["train"]["tokens_seen"] == state["runs"]["dspark-b7"]["train"]["tokens_seen"]
        assert ("calibrate" in run) == (arch == "dspark")
        config = json.loads((Path(run["train"]["drafter"]) / "config.json").read_text())["config"]
        block = reproduce.RUNS[name][1].get("block_size", 4)  # the tiny preset's block
        assert config["block_size"] == block
        for t in ("0", "1"):
            ev = run[f"eval_t{t}"]
            assert ev["benchmarks"]["bench"]["accept_length"] >= 1.0
            assert len(ev["conditional_acceptance"]) == len(ev["conditional_rounds"]) == block
            assert ev["conditional_rounds"][0] > 0 and ev["conditional_rounds"] == sorted(ev["conditional_rounds"], reverse=True)
        assert run["latency"]["draft_round_ms"] > 0
        assert run["train"]["products"] == "fp32"  # the tiny preset trains without autocast
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Table 1, T = 1: macro tau DSpark / DFlash" in report and "Table 1, T = 0: macro tau DSpark / Eagle3" in report
    assert "Fig. 4" in report and "not run yet" not in report.split("RNN head")[0]
    for name, run in state["runs"].items():  # each row names the plain speed behind its speedups
        plain = " / ".join(f"{run[f'eval_t{t}']['benchmarks']['bench']['plain_tokens_per_second']:.1f}" for t in ("0", "1"))
        row = next(line for line in report.splitlines() if line.startswith(f"| {name} |") and " min |" in line)
        assert f"| {plain} |" in row and ", fp32 training products, torch" in row
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {c["holds"] for c in results["claims"]} <= {True, False, None}
    assert (tmp_path / "out" / "tau_macro.png").is_file()
    before = (tmp_path / "work" / "state.json").read_text()
    assert reproduce.main(argv) == 0  # a rerun redoes nothing
    assert (tmp_path / "work" / "state.json").read_text() == before
    older = json.loads(before)  # recorded before the rounds per position were kept
    del older["runs"]["dspark-b7"]["eval_t1"]["conditional_rounds"]
    (tmp_path / "work" / "state.json").write_text(json.dumps(older))
    assert reproduce.main(argv) == 0  # recounted from the raw evaluation folder
    assert json.dumps(json.loads((tmp_path / "work" / "state.json").read_text()), sort_keys=True) == \
        json.dumps(json.loads(before), sort_keys=True)


def test_fig2_compares_only_positions_reached_often_enough(reproduce):
    def run(cond, counts=None):
        ev = {"conditional_acceptance": cond, **({"conditional_rounds": counts} if counts else {})}
        return {"eval_t1": ev}

    few = reproduce.MIN_ROUNDS - 1
    runs = {"dspark-b7": run([0.5, 0.4, 0.4, 0.0], [900, 450, 180, few]),
            "dflash-b7": run([0.5, 0.3, 0.3, 0.5], [900, 450, 135, 40])}
    row = next(r for r in reproduce.claims(runs) if r["claim"].startswith("Fig. 2"))
    assert row["holds"] is True and "too few" in row["measured"]  # position 4: 0.0 on 29 rounds is not compared
    runs["dspark-b7"]["eval_t1"]["conditional_rounds"][3] = reproduce.MIN_ROUNDS
    assert next(r for r in reproduce.claims(runs) if r["claim"].startswith("Fig. 2"))["holds"] is False
    unrecorded = {n: run(r["eval_t1"]["conditional_acceptance"]) for n, r in runs.items()}  # older runs: every position
    row = next(r for r in reproduce.claims(unrecorded) if r["claim"].startswith("Fig. 2"))
    assert row["holds"] is False and "not recorded" in row["measured"]


def test_other_settings_are_refused_and_unknown_runs_named(reproduce, setup):
    argv, tmp_path = setup
    assert reproduce.main(argv + ["--only", "dflash-b4"]) == 0
    with pytest.raises(SystemExit, match="other settings"):
        reproduce.main([a if a != "2" else "3" for a in argv])
    with pytest.raises(SystemExit):
        reproduce.main(argv + ["--only", "dspark-b99"])


def test_a_new_work_folder_keeps_the_reported_runs(reproduce, setup):
    """Runs spread over several machines: the report in --out carries finished runs over to a new
    work folder, and only what is missing is trained."""
    argv, tmp_path = setup
    assert reproduce.main(argv + ["--only", "dflash-b4"]) == 0
    first = json.loads((tmp_path / "out" / "results.json").read_text())["runs"]["dflash-b4"]
    work2 = tmp_path / "work2"
    argv2 = [str(work2) if a == str(tmp_path / "work") else a for a in argv]
    assert reproduce.main(argv2 + ["--only", "dflash-b4", "dspark-1l"]) == 0
    state = json.loads((work2 / "state.json").read_text())
    assert state["runs"]["dflash-b4"] == first and not (work2 / "dflash-b4").exists()  # kept, not redone
    assert (work2 / "dspark-1l" / "train").is_dir() and "latency" in state["runs"]["dspark-1l"]
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(report["runs"]) == {"dflash-b4", "dspark-1l"}
    # each run names the command that started it, and the report shows both
    assert report["runs"]["dflash-b4"]["command"].endswith("--only dflash-b4")
    assert report["runs"]["dspark-1l"]["command"].endswith("--only dflash-b4 dspark-1l")
    made = (tmp_path / "out" / "report.md").read_text().split("Settings:")[0]
    assert "--only dflash-b4    # dflash-b4" in made and "--only dflash-b4 dspark-1l    # dspark-1l" in made


def test_runs_evaluated_on_another_kind_of_machine_are_named(reproduce):
    def run(*devices):
        return {f"eval_t{i}": {"machine": {"device": d}} for i, d in enumerate(devices)}

    amx, avx2 = "cpu:x86_64 AVX512 bf16-units (2 threads)", "cpu:x86_64 AVX2 (2 threads)"
    runs = {"a": run(amx, amx), "b": run(avx2.replace("2 threads", "4 threads")), "c": {}, "d": run(avx2, amx)}
    assert reproduce.measured_elsewhere(runs, avx2) == {"a": "cpu:x86_64 AVX512 bf16-units", "d": "cpu:x86_64 AVX512 bf16-units"}
    assert reproduce.measured_elsewhere(runs, amx) == {"b": "cpu:x86_64 AVX2", "d": "cpu:x86_64 AVX2"}
