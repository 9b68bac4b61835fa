"""Training data and training: prompt readers, regeneration (resumable, local and endpoint),
assistant loss masks, anchors, losses against hand-computed values, the trainer (loss falls, exact
resume, the result is a lossless drafter folder) and the CLI."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch

from dspark.cli import main
from dspark.config import EngineConfig, StopParams
from dspark.data.prompts import PromptRecord, read_prompts
from dspark.data.regenerate import ANSWERS_FILE, RegenerateConfig, read_answers, regenerate_endpoint, regenerate_local
from dspark.data.tokenize import tokenize_conversation
from dspark.drafters.checkpoint import load_drafter
from dspark.engine.engine import Engine, Request
from dspark.errors import DSparkError
from dspark.models.target import load_model, reference_greedy
from dspark.train.anchors import sample_blocks
from dspark.train.losses import LossWeights, dspark_loss, expected_accept_length, position_weights
from dspark.train.trainer import Trainer, apply_overrides, autocast_enabled, get_preset, init_distributed, preset_tiny
from tests.conftest import SHARED_DATA

GREEDY = RegenerateConfig(temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=40, batch_size=2)


@pytest.fixture(scope="module")
def target(tiny_dirs):
    return load_model(str(tiny_dirs["qwen3"]), "fp32")


def prompts(n: int) -> list[PromptRecord]:
    return [PromptRecord(f"p:{i}", ({"role": "user", "content": f"w{5 + i} w{9 + i} w{30 + i}"},)) for i in range(n)]


@pytest.fixture(scope="module")
def greedy_data(target, tmp_path_factory):
    out = tmp_path_factory.mktemp("answers")
    regenerate_local(target, prompts(2), out, GREEDY, progress=False)
    return out


# ------------------------------------------------------------------------------------------ data
def test_prompt_readers_accept_deepspec_sharegpt_and_openai_messages(tmp_path):
    file = tmp_path / "mixed.jsonl"
    file.write_text("\n".join([
        json.dumps({"turns": ["first", "second"]}),
        json.dumps({"conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "hi"},
                                      {"from": "gpt", "value": "hello"}]}),
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}),
    ]))
    records = read_prompts([file])
    assert [r.id for r in records] == ["mixed:1", "mixed:2", "mixed:3"]
    assert records[0].messages == ({"role": "user", "content": "first"},)
    assert records[1].messages == ({"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"})
    assert records[2].first_user_turn == "q"


def test_prompt_readers_name_the_bad_line(tmp_path):
    file = tmp_path / "bad.jsonl"
    file.write_text(json.dumps({"turns": ["ok"]}) + "\n" + json.dumps({"text": "no turns"}) + "\n")
    with pytest.raises(DSparkError, match="bad.jsonl:2"):
        read_prompts([file])
    with pytest.raises(DSparkError, match="does not exist"):
        read_prompts([tmp_path / "missing.jsonl"])


def test_shared_training_prompts_parse():
    folder = SHARED_DATA / "train"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent (the shared prompt sets live beside the repository)")
    records = read_prompts([folder])
    assert len(records) > 2000 and all(r.first_user_turn for r in records[:50])


def test_loss_mask_covers_assistant_tokens_and_end_of_turn_only(target):
    messages = [{"role": "user", "content": "w5 w6"}, {"role": "assistant", "content": "w7 w8 w9"}]
    conv = tokenize_conversation(target.tokenizer, messages, 64)
    words = target.tokenizer.convert_ids_to_tokens(conv.input_ids)
    assert words == ["w2", "w5", "w6", "w3", "w4", "w7", "w8", "w9", "w3"]
    assert conv.loss_mask == [0, 0, 0, 0, 0, 1, 1, 1, 1]


def test_regeneration_resumes_after_a_kill_without_loss_or_duplicates(target, tmp_path):
    cfg = RegenerateConfig(temperature=0.9, top_p=0.95, top_k=0, max_new_tokens=12, batch_size=2)
    full = tmp_path / "full"
    regenerate_local(target, prompts(5), full, cfg, progress=False)
    reference = {r["id"]: r for r in read_answers(full)}
    # A kill mid-write: two complete lines and a torn third one.
    killed = tmp_path / "killed"
    killed.mkdir()
    lines = (full / ANSWERS_FILE).read_text().splitlines(keepends=True)
    (killed / ANSWERS_FILE).write_text(lines[0] + lines[1] + lines[2][: len(lines[2]) // 2])
    stats = regenerate_local(target, prompts(5), killed, cfg, progress=False)
    assert stats["already_done"] == 2 and stats["written"] == 3
    resumed = read_answers(killed)
    assert sorted(r["id"] for r in resumed) == sorted(reference)  # nothing lost, nothing twice
    for record in resumed:  # seeds derive from ids: the resumed run answers as the full one did
        assert record["messages"] == reference[record["id"]]["messages"]
    assert regenerate_local(target, prompts(5), killed, cfg, progress=False)["written"] == 0


class _FakeOpenAI(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert self.path == "/v1/chat/completions" and body["temperature"] == 0.7
        reply = {"choices": [{"message": {"role": "assistant", "content": "answer to " + body["messages"][-1]["content"]},
                              "finish_reason": "stop"}], "usage": {"completion_tokens": 3}}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_regeneration_through_an_openai_compatible_endpoint(tmp_path):
    server = HTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        stats = regenerate_endpoint(url, "m", prompts(3), tmp_path, RegenerateConfig(batch_size=2), progress=False)
    finally:
        server.shutdown()
    assert stats["written"] == 3 and stats["tokens"] == 9
    answers = {r["id"]: r["messages"][-1]["content"] for r in read_answers(tmp_path)}
    assert answers["p:1"] == "answer to w6 w10 w31"


# --------------------------------------------------------------------------------- anchors, losses
def test_anchor_sampling_invariants():
    ids = torch.arange(100, 120)
    mask = torch.tensor([0] * 5 + [1] * 8 + [0] * 2 + [1] * 5)
    blocks = sample_blocks(ids, mask, num_anchors=16, block_size=4, generator=torch.Generator().manual_seed(0))
    kept = blocks.anchor_positions[blocks.keep]
    valid = {p for p in range(19) if mask[p] and mask[p + 1]}
    assert set(kept.tolist()) == valid and kept.tolist() == sorted(kept.tolist())  # all 11 valid, sorted, unique
    assert not blocks.label_mask[~blocks.keep].any()
    for n in range(int(blocks.keep.sum())):
        p = int(blocks.anchor_positions[n])
        assert blocks.labels[n, 0] == ids[p + 1] and blocks.prev_tokens[n, 0] == ids[p]
        row = blocks.label_mask[n].tolist()
        assert row == sorted(row, reverse=True)  # a contiguous prefix
        expected = 0
        while expected < 4 and p + expected + 1 < 20 and mask[p + expected + 1]:
            expected += 1
        assert sum(row) == expected
        assert blocks.target_positions[n, 0] == p


def test_loss_terms_match_hand_computed_values():
    lm = torch.eye(3)  # logits = hidden
    hidden = torch.tensor([[math.log(2.0), 0.0, 0.0], [0.0, 0.0, 0.0]], requires_grad=True)  # p_d = [.5,.25,.25], uniform
    target_hidden = torch.tensor([[0.0, 0.0, 0.0], [math.log(2.0), 0.0, 0.0]])  # p_t = uniform, [.5,.25,.25]
    labels = torch.tensor([0, 2])
    weights = torch.tensor([1.0, 0.5])
    conf = torch.tensor([0.0, 2.0])
    lw = LossWeights(ce=0.1, l1=0.9, confidence=1.0)
    out = dspark_loss(hidden, None, conf, target_hidden, labels, weights, lm, None, lw, chunk_rows=1)
    l1_row = abs(0.5 - 1 / 3) + 2 * abs(0.25 - 1 / 3)  # = 1/3 for both rows
    ce = (1.0 * -math.log(0.5) + 0.5 * -math.log(1 / 3)) / 1.5
    acc = 1 - 0.5 * l1_row
    bce = lambda z, y: -(y * math.log(1 / (1 + math.exp(-z))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-z))))  # noqa: E731
    conf_loss = (1.0 * bce(0.0, acc) + 0.5 * bce(2.0, acc)) / 1.5
    assert out.ce == pytest.approx(ce) and out.l1 == pytest.approx(l1_row) and out.confidence == pytest.approx(conf_loss)
    assert float(out.loss.detach()) == pytest.approx(0.1 * ce + 0.9 * l1_row + conf_loss)
    assert torch.allclose(out.acceptance, torch.tensor([acc, acc]))
    out.loss.backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0


def test_chunked_loss_equals_one_chunk_with_gradients():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 6, generator=gen, requires_grad=True)
    feats = torch.randn(10, 3, generator=gen, requires_grad=True)
    args = (torch.randn(10, 6, generator=gen), torch.randint(0, 11, (10,), generator=gen), torch.rand(10, generator=gen),
            torch.randn(11, 6, generator=gen))
    w2 = torch.randn(11, 3, generator=gen, requires_grad=True)
    results = []
    for chunk in (3, 100):
        out = dspark_loss(hidden, feats, None, args[0], args[1], args[2], args[3], w2, LossWeights(), chunk_rows=chunk)
        grads = torch.autograd.grad(out.loss, (hidden, feats, w2))
        results.append((float(out.loss.detach()), grads))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b)


def test_draft_vocabulary_loss_equals_the_full_loss_when_it_holds_every_id():
    """A draft vocabulary of all ids (permuted order, the target log-normaliser given) gives the
    full-vocabulary loss and gradients; stored logits and recomputed chunks agree too."""
    from dspark.train.losses import log_normalizer

    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(10, 6, generator=gen, requires_grad=True)
    feats = torch.randn(10, 3, generator=gen, requires_grad=True)
    target_hidden, labels = torch.randn(10, 6, generator=gen), torch.randint(0, 11, (10,), generator=gen)
    weights, lm = torch.rand(10, generator=gen), torch.randn(11, 6, generator=gen)
    w2 = torch.randn(11, 3, generator=gen, requires_grad=True)
    conf = torch.randn(10, generator=gen)
    full = dspark_loss(hidden, feats, conf, target_hidden, labels, weights, lm, w2, LossWeights(), recompute=True, chunk_rows=3)
    full_grads = torch.autograd.grad(full.loss, (hidden, feats, w2))
    perm = torch.randperm(11, generator=gen)
    index = torch.empty(11, dtype=torch.long)
    index[perm] = torch.arange(11)
    w2_sub = w2.detach()[perm].requires_grad_(True)
    sub = dspark_loss(hidden, feats, conf, target_hidden, index[labels], weights, lm[perm], w2_sub, LossWeights(),
                      target_lse=log_normalizer(target_hidden, lm))
    sub_grads = torch.autograd.grad(sub.loss, (hidden, feats, w2_sub))
    assert float(sub.loss.detach()) == pytest.approx(float(full.loss.detach()), rel=1e-5)
    torch.testing.assert_close(sub_grads[0], full_grads[0])
    torch.testing.assert_close(sub_grads[1], full_grads[1])
    torch.testing.assert_close(sub_grads[2], full_grads[2][perm])


def test_draft_vocabulary_loss_counts_the_target_mass_outside_it():
    lm = torch.eye(3)  # logits = hidden; the draft vocabulary is ids {0, 1}
    hidden = torch.zeros(1, 3)  # q over {0, 1} = [.5, .5]
    target_hidden = torch.tensor([[math.log(2.0), 0.0, 0.0]])  # p = [.5, .25, .25]
    lse = torch.logsumexp(target_hidden, -1)
    out = dspark_loss(hidden, None, None, target_hidden, torch.tensor([-1]), torch.ones(1), lm[:2], None,
                      LossWeights(), target_lse=lse)
    assert out.l1 == pytest.approx(abs(0.5 - 0.5) + abs(0.5 - 0.25) + 0.25)  # the unreachable 0.25 counts
    assert out.ce == 0.0  # a label outside the draft vocabulary is not a CE target


def test_draft_vocabulary_holds_the_most_frequent_answer_tokens_and_the_stop_tokens():
    from dspark.train.vocab import coverage, select_draft_vocab, token_counts

    ids = torch.tensor([5, 5, 5, 7, 7, 9, 2])
    mask = torch.tensor([1, 1, 1, 1, 1, 1, 0])  # id 2 is a prompt token: not counted
    counts = token_counts([(ids, mask)], 12)
    assert counts[2] == 0 and counts[5] == 3
    vocab = select_draft_vocab(counts, 3, required=[1])
    assert vocab.tolist() == [1, 5, 7]
    assert coverage(counts, vocab) == pytest.approx(5 / 6)
    with pytest.raises(DSparkError, match="draft_vocab_size 13"):
        select_draft_vocab(counts, 13)
    prompt_counts = token_counts([(ids, mask)], 12, supervised=False)
    assert prompt_counts[2] == 1 and prompt_counts.sum() == 1
    # ties among unseen answer tokens go to tokens of the prompts: id 2 before ids 0, 3, 4, ...
    assert select_draft_vocab(counts, 5, required=[1], tie_counts=prompt_counts).tolist() == [1, 2, 5, 7, 9]
    assert select_draft_vocab(counts, 5, required=[1]).tolist() == [0, 1, 5, 7, 9]


def test_position_weights_and_tau_estimate():
    torch.testing.assert_close(position_weights(3, 4.0), torch.exp(-torch.tensor([0.0, 0.25, 0.5])))
    mask = torch.tensor([[True, True, False], [True, False, False], [False, False, False]])
    acc = torch.tensor([0.5, 0.5, 1.0])
    assert expected_accept_length(acc, mask) == pytest.approx(((1 + 0.5 + 0.25) + (1 + 1.0)) / 2)


# ----------------------------------------------------------------------------------------- trainer
def tiny_config(*extra):
    # All valid anchors each step (num_anchors > answer length): a fixed batch.
    return apply_overrides(preset_tiny(), ["num_anchors=64", "lr=0.03", "save_every=2", *extra])


def test_loss_halves_on_a_fixed_tiny_batch_in_30_steps(target, greedy_data, tmp_path):
    """The distillation term (L1 to the target distribution) halves; the total, which also holds the
    irreducible cross-entropy of sampled labels and the entropy of soft confidence labels, falls by
    over 40%; the running tau estimate rises."""
    trainer = Trainer(target, tiny_config("max_steps=30", "grad_accum=2"), greedy_data, tmp_path / "run")
    metrics = [trainer.train_step() for _ in range(30)]
    first, last = metrics[0], metrics[-1]
    assert last["l1"] < 0.5 * first["l1"], [round(m["l1"], 3) for m in metrics]
    assert last["loss"] < 0.6 * first["loss"], [round(m["loss"], 3) for m in metrics]
    assert last["tau_estimate"] > first["tau_estimate"] + 0.5


def test_resume_gives_the_same_next_loss(target, greedy_data, tmp_path):
    cfg = tiny_config("max_steps=6")
    first = Trainer(target, cfg, greedy_data, tmp_path / "run")
    for _ in range(2):
        first.train_step()
    first.save()
    uninterrupted = first.train_step()["loss"]
    resumed = Trainer(target, cfg, greedy_data, tmp_path / "run")
    assert resumed.step == 2
    assert resumed.train_step()["loss"] == pytest.approx(uninterrupted, rel=1e-6, abs=1e-7)
    with pytest.raises(DSparkError, match="other settings \\(lr\\)"):
        Trainer(target, tiny_config("max_steps=6", "lr=0.5"), greedy_data, tmp_path / "run")
    longer = Trainer(target, tiny_config("max_steps=9"), greedy_data, tmp_path / "run")  # "train longer" resumes
    assert longer.step == 2 and longer.total_steps == 9
    with pytest.raises(DSparkError, match="past the 1 steps"):
        Trainer(target, tiny_config("max_steps=1"), greedy_data, tmp_path / "run")


def test_a_rerun_after_a_kill_drops_the_log_lines_it_will_train_again(target, greedy_data, tmp_path):
    run = tmp_path / "run"
    Trainer(target, tiny_config("max_steps=2", "save_every=2"), greedy_data, run).run(progress=False)
    log = run / "train_log.jsonl"
    with open(log, "a") as handle:  # a killed run's steps 3 and 4, logged after its last checkpoint
        handle.write(json.dumps({"step": 3, "loss": 1.0}) + "\n" + json.dumps({"step": 4, "loss": 1.0}) + "\n")
    Trainer(target, tiny_config("max_steps=4", "save_every=2"), greedy_data, run).run(progress=False)
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_a_trained_checkpoint_is_a_lossless_drafter(target, greedy_data, tmp_path):
    final = Trainer(target, tiny_config("max_steps=4"), greedy_data, tmp_path / "run").run(progress=False)
    assert final.name == "step_4" and (tmp_path / "run" / "train_log.jsonl").read_text().count("\n") == 4
    drafter = load_drafter(final, target)
    engine = Engine(target, drafter, EngineConfig(block_size=4, max_batch_size=2, max_seq_len=64))
    prompt_ids = [[2, 5, 9, 30, 3, 4], [2, 6, 10, 31, 3, 4]]
    outs = engine.generate([Request(p, stop=StopParams(max_new_tokens=16, ignore_eos=True)) for p in prompt_ids])
    for p, out in zip(prompt_ids, outs):
        assert out.token_ids == reference_greedy(target.model, p, 16)


def test_train_and_regenerate_cli(capsys, tiny_dirs, tmp_path):
    prompt_file = tmp_path / "p.jsonl"
    prompt_file.write_text("\n".join(json.dumps({"turns": [f"w{i} w{i + 1}"]}) for i in range(5, 8)))
    data = tmp_path / "data"
    assert main(["data", "regenerate", "--target", str(tiny_dirs["qwen3"]), "--prompts", str(prompt_file), "--out",
                 str(data), "--max-new-tokens", "16", "--dtype", "fp32", "--limit", "2"]) == 0
    assert len(read_answers(data)) == 2
    assert main(["train", "--target", str(tiny_dirs["qwen3"]), "--preset", "tiny", "--data", str(data), "--out",
                 str(tmp_path / "run"), "--set", "max_steps=2", "--set", "drafter.markov_head_type=rnn", "--dtype", "fp32",
                 "--eval-prompts", str(prompt_file)]) == 0
    assert "step_2" in capsys.readouterr().out
    evals = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().split("\n")
             if "eval_accept_length" in line]
    assert [e["step"] for e in evals] == [2] and evals[0]["eval_accept_length"] >= 1.0
    assert main(["train", "--preset", "nope", "--data", str(data), "--out", str(tmp_path / "x")]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err
    assert main(["train", "--preset", "tiny", "--data", str(data), "--out", str(tmp_path / "x"), "--set", "bogus=1"]) == 2
    assert "unknown training setting 'bogus'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- feature cache
def _cache(target, data, out, **kw):
    from dspark.data.feature_cache import write_cache
    from dspark.drafters.checkpoint import new_dspark_config
    from dspark.train.trainer import load_sequences

    layers = new_dspark_config(target, "dspark", dict(preset_tiny().drafter)).target_layer_ids
    seqs = load_sequences(data, target.tokenizer, 64)
    return write_cache(target, seqs, layers, out, progress=False, **kw), seqs, layers


def test_cached_features_equal_online_features_and_training_matches(target, greedy_data, tmp_path):
    from dspark.data.feature_cache import FeatureCache
    from dspark.train.trainer import target_features

    _, seqs, layers = _cache(target, greedy_data, tmp_path / "cache", dtype="fp32", shard_size=1)
    cache = FeatureCache(tmp_path / "cache", target, layers)
    assert len(cache) == len(seqs) == 2
    kv = target.build_cache(1, 64, headroom=0)
    for k, seq in enumerate(seqs):
        cached = cache[k]
        feats, final = target_features(target, layers, seq.input_ids, kv)
        assert torch.equal(cached.input_ids, seq.input_ids) and torch.equal(cached.loss_mask, seq.loss_mask)
        assert torch.equal(cached.features, feats) and torch.equal(cached.final_hidden, final)
    online = Trainer(target, tiny_config("max_steps=3"), greedy_data, tmp_path / "online")
    offline = Trainer(target, tiny_config("max_steps=3"), tmp_path / "cache", tmp_path / "offline")
    for _ in range(3):
        assert offline.train_step()["loss"] == pytest.approx(online.train_step()["loss"], rel=1e-6)
    # with a draft vocabulary: the same ids chosen, the cached log-normaliser equals the online one
    vocab_cfg = tiny_config("max_steps=3", "drafter.draft_vocab_size=40")
    online = Trainer(target, vocab_cfg, greedy_data, tmp_path / "online-v")
    offline = Trainer(target, vocab_cfg, tmp_path / "cache", tmp_path / "offline-v")
    assert torch.equal(online.model.draft_vocab, offline.model.draft_vocab)
    assert set(target.eos_token_ids) <= set(online.model.draft_vocab.tolist())
    for _ in range(3):
        assert offline.train_step()["loss"] == pytest.approx(online.train_step()["loss"], rel=1e-6)


def test_a_cache_for_another_target_or_other_layers_is_refused(target, greedy_data, tiny_dirs, tmp_path):
    from dspark.data.feature_cache import FeatureCache

    _cache(target, greedy_data, tmp_path / "cache")
    other = load_model(str(tiny_dirs["llama"]), "fp32")
    with pytest.raises(DSparkError, match="another target"):
        FeatureCache(tmp_path / "cache", other, (0, 1))
    with pytest.raises(DSparkError, match="holds layers"):
        FeatureCache(tmp_path / "cache", target, (1,))


def test_cache_writing_resumes_and_detects_corruption(target, greedy_data, tmp_path):
    from dspark.data.feature_cache import MANIFEST, FeatureCache

    manifest, _, layers = _cache(target, greedy_data, tmp_path / "cache", shard_size=1)
    assert len(manifest["shards"]) == 2
    # A kill after the first shard: the second shard and its manifest entry are missing.
    (tmp_path / "cache" / manifest["shards"][1]["file"]).unlink()
    with pytest.raises(DSparkError, match="incomplete"):
        FeatureCache(tmp_path / "cache", target, layers)
    resumed, _, _ = _cache(target, greedy_data, tmp_path / "cache", shard_size=1)
    assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in manifest["shards"]]
    shard = tmp_path / "cache" / resumed["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DSparkError, match="checksum"):
        FeatureCache(tmp_path / "cache", target, layers)
    assert json.loads((tmp_path / "cache" / MANIFEST).read_text())["num_sequences"] == 2


def test_cache_cli_prints_the_projected_size_and_compact_form_is_smaller(capsys, tiny_dirs, greedy_data, tmp_path):
    sizes = {}
    for dtype in ("bf16", "fp8"):
        out = tmp_path / dtype
        assert main(["data", "cache", "--target", str(tiny_dirs["qwen3"]), "--data", str(greedy_data), "--out", str(out),
                     "--cache-dtype", dtype, "--dtype", "fp32", "--max-length", "64"]) == 0
        assert "bytes/token" in capsys.readouterr().err
        sizes[dtype] = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert sizes["fp8"] < 0.7 * sizes["bf16"]
    assert main(["data", "cache", "--target", str(tiny_dirs["qwen3"]), "--data", str(greedy_data), "--out",
                 str(tmp_path / "x"), "--layers", "0,7"]) == 2
    assert "--layers [0, 7]" in capsys.readouterr().err


def test_two_process_gloo_torchrun_smoke(tiny_dirs, greedy_data, tmp_path):
    """torchrun with 2 CPU processes: gradients averaged over gloo, rank 0 saves, every rank its RNG."""
    import subprocess
    import sys

    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "dspark",
           "train", "--target", str(tiny_dirs["qwen3"]), "--preset", "tiny", "--data", str(greedy_data), "--out", str(run),
           "--set", "max_steps=2", "--dtype", "fp32"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "on 2 process(es)" in proc.stdout
    ckpt = run / "step_2"
    assert (ckpt / "rng.rank0.pt").is_file() and (ckpt / "rng.rank1.pt").is_file()
    assert json.loads((ckpt / "trainer_state.json").read_text())["world_size"] == 2
    assert len((run / "train_log.jsonl").read_text().strip().split("\n")) == 2
    target = load_model(str(tiny_dirs["qwen3"]), "fp32")
    with pytest.raises(DSparkError, match="trained with 2 processes"):
        Trainer(target, apply_overrides(preset_tiny(), ["max_steps=2"]), greedy_data, run)


def test_eagle3_training_time_test_loss_falls_and_checkpoints_are_lossless(target, greedy_data, tmp_path):
    cfg = apply_overrides(get_preset("tiny-eagle3"), ["lr=0.01", "max_steps=20", "save_every=20", "grad_accum=2"])
    trainer = Trainer(target, cfg, greedy_data, tmp_path / "run")
    metrics = [trainer.train_step() for _ in range(20)]
    # The soft cross-entropy holds the target's own entropy (times the supervised share of positions,
    # as each step is divided by all S positions), so watch what is above it: the loss falls (9.8 ->
    # 8.9 here) and the analytic acceptance (tau estimate) rises.
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.5, [round(m["loss"], 3) for m in metrics]
    assert metrics[-1]["tau_estimate"] > metrics[0]["tau_estimate"] + 0.2, [round(m["tau_estimate"], 3) for m in metrics]
    drafter = load_drafter(trainer.save(), target)
    engine = Engine(target, drafter, EngineConfig(block_size=3, max_batch_size=2, max_seq_len=64))
    prompt_ids = [[2, 5, 9, 30, 3, 4], [2, 6, 10, 31, 3, 4]]
    outs = engine.generate([Request(p, stop=StopParams(max_new_tokens=12, ignore_eos=True)) for p in prompt_ids])
    for p, out in zip(prompt_ids, outs):
        assert out.token_ids == reference_greedy(target.model, p, 12)


def test_eagle3_loss_counts_deepspecs_rows_against_the_targets_next_distribution():
    """DeepSpec's compute_eagle3_loss, derived by hand: its position mask is loss_mask with the last
    token zeroed, shifted left once per step; row t at step k reads token t+1+k, its soft target is
    softmax(target logits at t+1+k) (the distribution of token t+2+k); each step's sum is divided by
    S. (This replaces a test of the earlier rule, which counted rows by loss_mask[t+2+k] and took a
    mean over them.)"""
    from dspark.train.losses import eagle3_loss, eagle3_rows

    mask = torch.tensor([0, 0, 1, 1, 1, 0, 1, 1])  # S = 8: position mask [0, 0, 1, 1, 1, 0, 1, 0]
    rows = {0: [2, 3, 4, 6], 1: [1, 2, 3, 5], 2: [0, 1, 2, 4]}  # pm_k[t] = pm_0[t + k]
    predicted = {0: [4, 5, 6, 8], 1: [4, 5, 6, 8], 2: [4, 5, 6, 8]}  # token t+2+k; 8 = past the sequence
    assert [r.tolist() for r in eagle3_rows(mask, 3)] == [rows[k] for k in range(3)]
    assert {k: [t + 2 + k for t in rows[k]] for k in rows} == predicted
    gen = torch.Generator().manual_seed(0)
    lm = torch.randn(7, 4, generator=gen)
    final = torch.randn(8, 4, generator=gen)
    steps = [torch.randn(8, 4, generator=gen, requires_grad=True) for _ in range(3)]
    loss, accepts = eagle3_loss(steps, final, mask, lm, LossWeights(ttt_decay=0.5))
    expected = 0.0
    for k, ts in rows.items():
        for t in ts:
            logq = torch.log_softmax(steps[k][t].detach() @ lm.T, -1)
            p = torch.softmax(final[t + 1 + k] @ lm.T, -1)  # target logits at t+1+k: its next token
            expected = expected + 0.5**k * float(-(p * logq).sum()) / 8  # divided by B*S = 8
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)
    assert [a.numel() for a in accepts] == [4, 4, 4]
    loss.backward()
    assert steps[0].grad[[0, 1, 5, 7]].abs().sum() == 0 and steps[0].grad[[2, 3, 4, 6]].abs().sum() > 0


def test_eagle3_loss_row_budget_precision_and_recomputation():
    """max_rows supervises a random subset of each step's rows, scaled to estimate the full loss;
    keeping the logits equals recomputing them; bf16 products stay close to fp32."""
    from dspark.train.losses import eagle3_loss, eagle3_rows

    gen = torch.Generator().manual_seed(1)
    mask = (torch.rand(40, generator=gen) > 0.3).long()
    lm, final = torch.randn(11, 6, generator=gen), torch.randn(40, 6, generator=gen)
    steps = [torch.randn(40, 6, generator=gen, requires_grad=True) for _ in range(3)]
    lw = LossWeights(ttt_decay=0.7)
    full, _ = eagle3_loss(steps, final, mask, lm, lw)
    kept, _ = eagle3_loss(steps, final, mask, lm, lw, recompute=False)
    grads = [torch.autograd.grad(x, steps) for x in (full, kept)]
    assert float(kept.detach()) == float(full.detach()) and all(torch.equal(a, b) for a, b in zip(*grads))
    same, _ = eagle3_loss(steps, final, mask, lm, lw, max_rows=1000)  # more than there are: every row
    assert float(same) == float(full)
    low, _ = eagle3_loss(steps, final, mask, lm, lw, matmul_dtype=torch.bfloat16)
    assert float(low) == pytest.approx(float(full), rel=2e-2)
    # the subset: 5 rows per step drawn by the generator, their terms scaled by counted / 5
    drawn, accepts = eagle3_loss(steps, final, mask, lm, lw, max_rows=5, generator=torch.Generator().manual_seed(7))
    assert [a.numel() for a in accepts] == [5, 5, 5]
    again = torch.Generator().manual_seed(7)
    expected = 0.0
    for k, rows in enumerate(eagle3_rows(mask, 3)):
        pick = rows[torch.randperm(rows.numel(), generator=again)[:5].sort().values]
        logq = torch.log_softmax(steps[k][pick].detach() @ lm.T, -1)
        p = torch.softmax(final[pick + 1 + k] @ lm.T, -1)
        expected += 0.7**k * rows.numel() / 5 * float(-(p * logq).sum()) / 40
    assert float(drawn) == pytest.approx(expected, rel=1e-6)
    # unbiased: the mean over many draws approaches the full loss
    draws = [float(eagle3_loss(steps, final, mask, lm, lw, max_rows=5, generator=torch.Generator().manual_seed(i))[0])
             for i in range(400)]
    assert sum(draws) / len(draws) == pytest.approx(float(full), rel=0.05)


def _one_sequence_loss(first: torch.Tensor, length: int, lw: LossWeights):
    """dspark_loss of one sequence of `length` slots (weights exp(-k/4), the identity as LM head, a
    uniform target): the first slot's draft logits are `first` (label 0), the others uniform (label 2)."""
    hidden = torch.zeros(length, 3)
    hidden[0] = first
    labels = torch.tensor([0] + [2] * (length - 1))
    weights = position_weights(length, 4.0)
    return dspark_loss(hidden, None, None, torch.zeros(length, 3), labels, weights, torch.eye(3), None, lw)


def test_two_sequences_of_different_lengths_weigh_every_supervised_slot_equally():
    """DeepSpec's normalisation: the weighted sums of all sequences over their summed weights. The
    result for one sequence alone is unchanged."""
    from dspark.train.losses import normalised_loss
    from dspark.train.trainer import process_loss

    lw = LossWeights(ce=1.0, l1=1.0, confidence=0.0)
    short = _one_sequence_loss(torch.tensor([math.log(2.0), 0.0, 0.0]), 1, lw)  # CE ln 2, L1 1/3, weight 1
    long = _one_sequence_loss(torch.zeros(3), 4, lw)  # 4 uniform slots: CE ln 3, L1 0
    w_long = sum(math.exp(-k / 4) for k in range(4))
    ce = (math.log(2.0) + math.log(3.0) * w_long) / (1 + w_long)
    l1 = (1 / 3) / (1 + w_long)
    loss, means = normalised_loss(short.sums + long.sums, short.weights + long.weights, lw)
    assert means[0].item() == pytest.approx(ce) and means[1].item() == pytest.approx(l1)
    assert loss.item() == pytest.approx(ce + l1)
    per_sequence_mean = (short.loss.item() + long.loss.item()) / 2  # the earlier normalisation
    assert per_sequence_mean != pytest.approx(loss.item(), abs=1e-3)  # 1.0625 against 1.0799
    alone, _ = process_loss(long.sums, long.weights, lw, world=1)
    assert torch.equal(alone, long.loss)


_TWO_PROCESS_SCRIPT = """
import sys, torch, torch.distributed as dist
from dspark.train.losses import LossWeights, dspark_loss
from dspark.train.trainer import process_loss

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
proj = torch.nn.Parameter(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)))
gen = torch.Generator().manual_seed(100 + rank)
n = (2, 5)[rank]  # sequences of different lengths
rows = dict(x=torch.randn(n, 4, generator=gen), target=torch.randn(n, 3, generator=gen),
            labels=torch.randint(0, 3, (n,), generator=gen), weights=torch.rand(n, generator=gen) + 0.1,
            conf=torch.randn(n, generator=gen))
out = dspark_loss(rows["x"] @ proj, None, rows["conf"], rows["target"], rows["labels"], rows["weights"],
                  torch.eye(3), None, LossWeights())
loss, means = process_loss(out.sums, out.weights, LossWeights(), world)
loss.backward()
for t in (proj.grad, means):  # as the trainer does: averaged over processes
    dist.all_reduce(t)
    t /= world
torch.save({**rows, "grad": proj.grad, "means": means, "proj": proj.detach()}, sys.argv[1] + f"/rank{rank}.pt")
dist.destroy_process_group()
"""


def test_two_gloo_processes_weigh_every_supervised_slot_equally(tmp_path):
    """Two processes, one sequence each (2 and 5 slots): the averaged gradient and logged term means
    are those of one loss over all 7 slots (DeepSpec sums the weights over ranks)."""
    import os
    import subprocess
    import sys

    script = tmp_path / "two.py"
    script.write_text(_TWO_PROCESS_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    proj = ranks[0]["proj"].clone().requires_grad_(True)

    def loss_of(parts):
        cat = {k: torch.cat([p[k] for p in parts]) for k in ("x", "target", "labels", "weights", "conf")}
        return dspark_loss(cat["x"] @ proj, None, cat["conf"], cat["target"], cat["labels"], cat["weights"],
                           torch.eye(3), None, LossWeights())

    together = loss_of(ranks)
    (grad,) = torch.autograd.grad(together.loss, proj)
    torch.testing.assert_close(ranks[0]["grad"], grad)
    torch.testing.assert_close(ranks[0]["means"], torch.tensor([together.ce, together.l1, together.confidence]))
    (mean_of_two,) = torch.autograd.grad((loss_of(ranks[:1]).loss + loss_of(ranks[1:]).loss) / 2, proj)
    assert not torch.allclose(mean_of_two, grad, atol=1e-4)  # the earlier per-process mean differs


def test_embedding_output_as_a_feature_layer_trains_from_online_and_cached_features(target, greedy_data, tmp_path):
    """target_layer_ids with -1 (the embedding output, allowed by DeepSpec): the target returns its
    embedding as that layer's feature, the cache stores the same, and training gives the same loss."""
    from dspark.data.feature_cache import FeatureCache, write_cache
    from dspark.train.trainer import load_sequences, target_features

    layers = (-1, 1)
    seqs = load_sequences(greedy_data, target.tokenizer, 64)
    write_cache(target, seqs, layers, tmp_path / "cache", dtype="fp32", progress=False)
    cache = FeatureCache(tmp_path / "cache", target, layers)
    kv = target.build_cache(1, 64, headroom=0)
    feats, _ = target_features(target, layers, seqs[0].input_ids, kv)
    hidden = target.model.args.hidden_size
    assert torch.equal(feats[:, :hidden], target.model.model.embed_tokens(seqs[0].input_ids))
    assert torch.equal(cache[0].features, feats)
    cfg = tiny_config("max_steps=2", "drafter.target_layer_ids=[-1, 1]")
    online = Trainer(target, cfg, greedy_data, tmp_path / "online")
    offline = Trainer(target, cfg, tmp_path / "cache", tmp_path / "offline")
    assert online.model.config.target_layer_ids == layers
    for _ in range(2):
        assert offline.train_step()["loss"] == pytest.approx(online.train_step()["loss"], rel=1e-6)


def test_bf16_autocast_trains_close_to_fp32(target, greedy_data, tmp_path):
    fp32 = Trainer(target, tiny_config("max_steps=2"), greedy_data, tmp_path / "a").train_step()["loss"]
    bf16 = Trainer(target, tiny_config("max_steps=2", "autocast=bf16"), greedy_data, tmp_path / "b").train_step()["loss"]
    assert math.isfinite(bf16) and bf16 == pytest.approx(fp32, rel=0.05)
    with pytest.raises(DSparkError, match="autocast 'fp16'"):
        tiny_config("autocast=fp16")
    with pytest.raises(DSparkError, match="max_steps='many' is not a valid int"):
        tiny_config("max_steps=many")


@pytest.fixture
def gpu_host_with_an_avx2_cpu(monkeypatch):
    """A host whose GPU has bf16 and whose CPU has no bf16 units (the trainer computes on the CPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)


def test_autocast_auto_asks_the_device_the_drafter_computes_on(gpu_host_with_an_avx2_cpu):
    assert not autocast_enabled("auto", "cpu") and not autocast_enabled("auto", torch.device("cpu"))
    assert autocast_enabled("auto", "cuda")
    assert autocast_enabled("bf16", "cpu") and not autocast_enabled("off", "cuda")


def test_data_parallel_training_joins_over_gloo_on_a_gpu_host(gpu_host_with_an_avx2_cpu, monkeypatch):
    # Gradients and losses are CPU tensors, which NCCL does not take.
    backends = []
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, **kw: backends.append(backend))
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_distributed() is False and backends == []
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert init_distributed() is True and backends == ["gloo"]


def test_tensorboard_event_files_are_written(target, greedy_data, tmp_path):
    pytest.importorskip("torch.utils.tensorboard", reason="tensorboard is not installed (pip install 'dspark[train]')")
    Trainer(target, tiny_config("max_steps=2"), greedy_data, tmp_path / "run", tensorboard_dir=tmp_path / "tb").run(progress=False)
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())
