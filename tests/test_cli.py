"""`dspark generate`: smoke tests on tiny models and SmolLM2, and clear errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dspark.cli import main
from dspark.models import loading
from tests.conftest import SHARED_DATA, save_tiny_model


def run(capsys, *argv):
    code = main(["generate", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def json_lines(text):
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("drafter", ["none", "ngram", "draft-model"])
def test_generate_json_has_the_documented_fields_and_drafters_agree(capsys, tiny_dirs, drafter):
    extra = ["--draft-model", str(tiny_dirs["llama"])] if drafter == "draft-model" else []
    code, out, err = run(capsys, "--target", str(tiny_dirs["llama"]), "--drafter", drafter, *extra,
                         "--prompt", "w5 w6 w7 w5 w6", "--max-new-tokens", "6", "--dtype", "fp32", "--json")
    assert code == 0, err
    (record,) = json_lines(out)
    for key in ("text", "token_ids", "num_generated", "rounds", "accept_length", "tokens_per_second"):
        assert key in record
    assert record["num_generated"] == len(record["token_ids"]) <= 6
    reference = json_lines(run(capsys, "--target", str(tiny_dirs["llama"]), "--drafter", "none", "--prompt",
                               "w5 w6 w7 w5 w6", "--max-new-tokens", "6", "--dtype", "fp32", "--json")[1])[0]
    assert record["token_ids"] == reference["token_ids"]


def test_generate_chat_prompts_file_and_batch(capsys, tiny_dirs, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"turns": [f"w{i} w{i+1}", "ignored"]}) for i in range(5, 10)))
    code, out, err = run(capsys, "--target", str(tiny_dirs["qwen3"]), "--prompts-file", str(prompts), "--chat",
                         "--batch-size", "2", "--max-new-tokens", "4", "--temperature", "0.9", "--top-k", "5",
                         "--top-p", "0.9", "--seed", "3", "--policy", "fixed", "--json")
    assert code == 0, err
    records = json_lines(out)
    assert [r["index"] for r in records] == list(range(5))
    again = json_lines(run(capsys, "--target", str(tiny_dirs["qwen3"]), "--prompts-file", str(prompts), "--chat",
                           "--batch-size", "3", "--max-new-tokens", "4", "--temperature", "0.9", "--top-k", "5",
                           "--top-p", "0.9", "--seed", "3", "--policy", "fixed", "--json")[1])
    # With a policy whose lengths depend on the drafts alone (not on timings, as auto's do), a
    # seed fixes the sampled text whatever the batch size.
    assert [r["token_ids"] for r in again] == [r["token_ids"] for r in records], "seeded sampling is reproducible"


def test_module_entry_point_runs_as_a_process(tiny_dirs):
    proc = subprocess.run(
        [sys.executable, "-m", "dspark", "generate", "--target", str(tiny_dirs["mistral"]), "--prompt", "w3 w4",
         "--max-new-tokens", "3"], capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "tok/s" in proc.stderr


def test_stop_strings_cut_the_text_before_the_stop(capsys, tiny_dirs):
    argv = ["--target", str(tiny_dirs["llama"]), "--prompt", "w5 w6 w7", "--max-new-tokens", "8", "--dtype", "fp32", "--json"]
    full = json_lines(run(capsys, *argv)[1])[0]
    words = full["text"].split()
    assert len(words) >= 4
    stop = words[2]
    cut = json_lines(run(capsys, *argv, "--stop", stop)[1])[0]
    assert cut["finish_reason"] == "stop" and stop not in cut["text"].split()
    assert full["text"].startswith(cut["text"].rstrip())
    assert full["token_ids"][: len(cut["token_ids"])] == cut["token_ids"]


def test_an_architecture_without_a_native_decoder_runs_through_transformers_with_a_notice(capsys, caplog, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.conftest import save_word_tokenizer

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32)).save_pretrained(tmp_path / "gpt2")
    save_word_tokenizer(tmp_path / "gpt2", 50)
    code, out, err = run(capsys, "--target", str(tmp_path / "gpt2"), "--prompt", "w5 w6", "--max-new-tokens", "4",
                         "--drafter", "ngram", "--json")
    assert code == 0 and json_lines(out)[0]["num_generated"] >= 1
    notice = [r.getMessage() for r in caplog.records if "no native decoder" in r.getMessage()]  # a warning line
    assert len(notice) == 1 and "'gpt2'" in notice[0] and "llama, mistral, qwen2, qwen3" in notice[0]


BAD_INPUTS = [
    (["--target", "no-such-model", "--prompt", "x"], "unknown model 'no-such-model'"),
    (["--target", "missing.gguf", "--prompt", "x"], "GGUF file 'missing.gguf' does not exist"),
    (["--target", "{llama}", "--drafter", "medusa", "--prompt", "x"], "unknown drafter 'medusa'; choose one of: auto, builtin, none, ngram, draft-model"),
    (["--target", "{llama}", "--drafter", "draft-model", "--prompt", "x"], "needs --draft-model"),
    (["--target", "{llama}", "--prompts-file", "nowhere.txt"], "prompts file 'nowhere.txt' does not exist"),
    (["--target", "{llama}", "--prompt", "w5 " * 40, "--max-seq-len", "16"], "prompt 0 has 40 tokens"),
    (["--target", "{llama}", "--prompt", "w5", "--temperature", "-1"], "temperature must be finite and >= 0"),
    (["--target", "{llama}", "--prompt", "w5", "--top-p", "2"], "top_p must be in (0, 1]"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_INPUTS)
def test_bad_input_gets_a_clear_error_not_a_traceback(capsys, tiny_dirs, argv, message):
    argv = [a.format(**tiny_dirs) for a in argv]
    code, _, err = run(capsys, *argv)
    assert code == 2 and message in err and "Traceback" not in err


@pytest.mark.parametrize(("flag", "value"), [("--max-new-tokens", "0"), ("--max-new-tokens", "-3"), ("--batch-size", "0"), ("--block-size", "-1")])
def test_non_positive_limits_are_refused_by_the_parser(capsys, flag, value):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--prompt", "x", flag, value])
    assert exc.value.code == 2
    assert value in capsys.readouterr().err


def test_vocab_mismatch_between_drafter_and_target_is_refused(capsys, tiny_dirs, tmp_path):
    small = save_tiny_model(tmp_path / "small", "llama", vocab_size=64)
    code, _, err = run(capsys, "--target", str(tiny_dirs["llama"]), "--drafter", "draft-model",
                       "--draft-model", str(small), "--prompt", "w5")
    assert code == 2 and "vocab mismatch" in err and "64" in err and "96" in err


def test_tokenizer_mismatch_between_drafter_and_target_is_refused(capsys, tiny_dirs, tmp_path):
    from transformers import AutoTokenizer

    other = save_tiny_model(tmp_path / "other", "llama")
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["extra-word"])  # same vocab size in the model, different token -> id map
    tok.save_pretrained(other)
    code, _, err = run(capsys, "--target", str(tiny_dirs["llama"]), "--drafter", "draft-model",
                       "--draft-model", str(other), "--prompt", "w5")
    assert code == 2 and "tokenizer mismatch" in err


def test_wrong_sha256_of_a_builtin_is_refused_and_nothing_is_cached(capsys, monkeypatch, tmp_path, smollm2_wheel):
    entry = loading.BUILTIN_MODELS["smollm2-135m"]
    monkeypatch.setitem(loading.BUILTIN_MODELS, "smollm2-135m", loading.BuiltinModel(entry.package, entry.filename, "0" * 64, entry.description))
    monkeypatch.setenv("DSPARK_CACHE_DIR", str(tmp_path / "cache"))
    code, _, err = run(capsys, "--target", "smollm2-135m", "--prompt", "hi")
    assert code == 2 and "sha256" in err and "0" * 64 in err
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_smollm2_chat_generation_on_humaneval_prompts(capsys, smollm2_dir, tmp_path):
    source = SHARED_DATA / "eval" / "humaneval.jsonl"
    if not source.is_file():
        pytest.skip(f"{source} is absent (the shared prompt sets live beside the repository)")
    prompts = tmp_path / "he.jsonl"
    prompts.write_text("\n".join(source.read_text().splitlines()[:2]))
    results = {}
    for drafter in ("none", "ngram"):
        code, out, err = run(capsys, "--prompts-file", str(prompts), "--chat", "--drafter", drafter,
                             "--max-new-tokens", "48", "--dtype", "fp32", "--json")
        assert code == 0, err
        results[drafter] = json_lines(out)
    assert [r["token_ids"] for r in results["ngram"]] == [r["token_ids"] for r in results["none"]]
    assert all(r["text"].strip() for r in results["ngram"])
    assert all(r["accept_length"] >= 1.0 for r in results["ngram"])


@pytest.mark.slow
def test_the_builtin_drafter_is_the_default_lossless_and_accepted(capsys, smollm2_dir):
    """The quick start's drafter: `auto` picks the builtin DSpark drafter behind prompt lookup for
    SmolLM2; greedy output equals plain decoding (fp32) and drafts are accepted."""
    from dspark.drafters.registry import builtin_drafters

    if "smollm2-135m-dspark" not in builtin_drafters():
        pytest.fail("the package ships no builtin drafter for smollm2-135m")
    argv = ["--prompt", "What is 12 * 7? Explain step by step.", "--chat", "--max-new-tokens", "48", "--dtype", "fp32"]
    code, out, err = run(capsys, *argv, "--json", "--policy", "fixed")  # verify every draft: acceptance shows
    assert code == 0, err
    auto = json_lines(out)[0]
    code, out, err = run(capsys, *argv, "--json", "--drafter", "none")
    assert code == 0, err
    assert auto["token_ids"] == json_lines(out)[0]["token_ids"]
    assert auto["accept_length"] > 1.2
    code, _, err = run(capsys, *argv)
    assert code == 0 and "[builtin smollm2-135m-dspark+ngram]" in err and "accept length" in err
    code, _, err = run(capsys, *argv, "--drafter", "builtin")
    assert code == 0 and "[builtin smollm2-135m-dspark]" in err
    assert main(["drafter", "info", "smollm2-135m-dspark"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config"]["draft_vocab_size"] > 0 and "card" in info and "calibration" in info


@pytest.mark.parametrize("arch", ["dspark", "dflash", "eagle3"])
def test_drafter_init_info_and_generate_with_the_folder(capsys, tiny_dirs, tmp_path, arch):
    out = tmp_path / arch
    sets = ["--set", "markov_rank=8", "--set", "markov_head_type=rnn"] if arch == "dspark" else []
    assert main(["drafter", "init", "--target", str(tiny_dirs["qwen3"]), "--arch", arch, "--out", str(out), *sets]) == 0
    assert main(["drafter", "info", str(out)]) == 0
    info = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert info["arch"] == arch and info["total_parameters"] > 0
    argv = ["--target", str(tiny_dirs["qwen3"]), "--prompt", "w5 w6 w7 w5", "--max-new-tokens", "8", "--dtype", "fp32", "--json"]
    code, stdout, err = run(capsys, *argv, "--drafter", str(out))
    assert code == 0, err
    assert json_lines(stdout)[0]["token_ids"] == json_lines(run(capsys, *argv, "--drafter", "none")[1])[0]["token_ids"]


def test_drafter_init_refuses_bad_settings_and_existing_folders(capsys, tiny_dirs, tmp_path):
    assert main(["drafter", "init", "--target", str(tiny_dirs["qwen3"]), "--arch", "dspark", "--out",
                 str(tmp_path / "a"), "--set", "rank=4"]) == 2
    assert "unknown drafter setting 'rank'" in capsys.readouterr().err
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_text("keep")
    assert main(["drafter", "init", "--target", str(tiny_dirs["qwen3"]), "--arch", "dflash", "--out", str(tmp_path / "b")]) == 2
    assert "already exists" in capsys.readouterr().err and (tmp_path / "b" / "x").read_text() == "keep"


def test_a_drafter_made_for_another_target_is_refused(capsys, tiny_dirs, tmp_path):
    assert main(["drafter", "init", "--target", str(tiny_dirs["qwen3"]), "--arch", "dflash", "--out", str(tmp_path / "d")]) == 0
    capsys.readouterr()
    code, _, err = run(capsys, "--target", str(tiny_dirs["llama"]), "--drafter", str(tmp_path / "d"), "--prompt", "w5")
    assert code == 2 and "was made for a target with architecture 'qwen3'" in err


def test_profile_then_simulate(capsys, tiny_dirs, tmp_path):
    cost = tmp_path / "cost.json"
    assert main(["profile", "--target", str(tiny_dirs["llama"]), "--tokens", "1,4,8", "--context", "16",
                 "--repeats", "2", "--block-size", "3", "--dtype", "fp32", "--requests", "1,2", "--drafter", "ngram",
                 "--out", str(cost)]) == 0
    table = json.loads(cost.read_text())
    assert table["tokens"] == [1, 4, 8] and all(s > 0 for s in table["sps"])
    assert set(table["meta"]["drafter_propose_s"]) == {"1", "2"}  # the drafter, timed per request count
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(json.dumps({"confidences": [0.9, 0.6, 0.3], "accepted": a}) + "\n" for a in (3, 1, 0, 2)))
    capsys.readouterr()
    assert main(["simulate", "--profile", str(cost), "--trace", str(trace), "--concurrency", "1,2",
                 "--policies", "none,fixed:3,scheduled", "--steps", "8", "--out", str(tmp_path / "sim")]) == 0
    rows = json.loads((tmp_path / "sim" / "simulation.json").read_text())
    assert {(r["policy"], r["concurrency"]) for r in rows} == {(p, c) for p in ("none", "fixed:3", "scheduled") for c in (1, 2)}
    assert (tmp_path / "sim" / "simulation.png").stat().st_size > 0
    assert main(["simulate", "--profile", str(cost), "--trace", str(trace), "--concurrency", "2", "--no-draft-cost",
                 "--policies", "fixed:3", "--steps", "8", "--out", str(tmp_path / "free")]) == 0
    free = json.loads((tmp_path / "free" / "simulation.json").read_text())[0]
    charged = next(r for r in rows if r["policy"] == "fixed:3" and r["concurrency"] == 2)
    assert free["tokens_per_s"] > charged["tokens_per_s"]  # the same rounds without the drafter's time
    assert main(["simulate", "--profile", str(cost), "--trace", str(trace), "--concurrency", "2", "--draft-ms", "1000",
                 "--policies", "fixed:3", "--steps", "8", "--out", str(tmp_path / "slow")]) == 0
    slow = json.loads((tmp_path / "slow" / "simulation.json").read_text())[0]
    assert slow["tokens_per_s"] < min(charged["tokens_per_s"], 8 * 2 * 4 / (8 * 1.0))  # 1 s per round charged
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["simulate", "--profile", str(cost), "--trace", str(trace), "--draft-ms", "-1", "--out", str(tmp_path / "s3")])
    assert "expected a finite number >= 0, got -1" in capsys.readouterr().err
    assert main(["simulate", "--profile", str(cost), "--trace", str(trace), "--concurrency", "2", "--draft-ms", "0",
                 "--policies", "fixed:3", "--steps", "8", "--out", str(tmp_path / "zero")]) == 0
    zero = json.loads((tmp_path / "zero" / "simulation.json").read_text())[0]
    assert zero["tokens_per_s"] == pytest.approx(free["tokens_per_s"])  # 0 ms charged = the drafter left out
    assert main(["simulate", "--profile", str(cost), "--trace", str(trace), "--policies", "bogus", "--out", str(tmp_path / "s2")]) == 2
    assert "none, fixed" in capsys.readouterr().err


@pytest.mark.parametrize("policy", ["none", "fixed:2", "threshold:0.5", "scheduled", "async"])
def test_generate_with_each_verification_policy_keeps_greedy_output(capsys, tiny_dirs, policy):
    args = ["--target", str(tiny_dirs["llama"]), "--prompt", "w5 w6 w7 w5 w6 w7 w5", "--max-new-tokens", "8",
            "--dtype", "fp32", "--json", "--block-size", "3"]
    code, out, err = run(capsys, *args, "--drafter", "ngram", "--policy", policy)
    assert code == 0, err
    reference = json_lines(run(capsys, *args, "--drafter", "none")[1])[0]
    assert json_lines(out)[0]["token_ids"] == reference["token_ids"]


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("dspark ")


def test_auto_policy_profiles_once_and_reuses_the_cached_table(capsys, caplog, tiny_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("DSPARK_CACHE_DIR", str(tmp_path / "cache"))
    args = ["--target", str(tiny_dirs["llama"]), "--prompt", "w5 w6 w7 w5 w6 w7 w5", "--max-new-tokens", "8",
            "--dtype", "fp32", "--json", "--block-size", "3"]
    reference = json_lines(run(capsys, *args, "--drafter", "none")[1])[0]  # auto without a drafter: none
    assert not (tmp_path / "cache" / "profiles").exists(), "nothing drafted, nothing profiled"
    with caplog.at_level("WARNING", logger="dspark.engine.policy_spec"):
        code, out, err = run(capsys, *args, "--drafter", "ngram")  # --policy auto is the default
    assert code == 0, err
    assert json_lines(out)[0]["token_ids"] == reference["token_ids"]
    assert "profiling the target's cost table" in caplog.text
    (table,) = (tmp_path / "cache" / "profiles").iterdir()
    caplog.clear()
    with caplog.at_level("WARNING", logger="dspark.engine.policy_spec"):
        code, out, err = run(capsys, *args, "--drafter", "ngram", "--policy", "auto")
    assert code == 0, err
    assert json_lines(out)[0]["token_ids"] == reference["token_ids"]
    assert "profiling" not in caplog.text, "the second run reads the cached table"
    assert list((tmp_path / "cache" / "profiles").iterdir()) == [table]
    code, _, err = run(capsys, *args, "--drafter", "ngram", "--policy", "auto:3")
    assert code == 2 and "auto:3" in err
