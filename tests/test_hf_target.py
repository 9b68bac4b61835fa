"""Targets outside the native families run through transformers (models/hf.py): the same forward
contract as the native decoder, and the engine stays lossless on them (greedy identity, ragged
rows, rollback) with none, ngram and a DSpark drafter."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from dspark.config import EngineConfig, StopParams
from dspark.drafters.checkpoint import build_dspark_model, new_dspark_config
from dspark.drafters.dspark import DSparkDrafter
from dspark.drafters.simple import NgramDrafter, NoDrafter
from dspark.engine.engine import Engine, Request
from dspark.models.target import load_model
from tests.conftest import save_word_tokenizer

PROMPTS = [[0, 5, 6, 7, 5, 6], [0, 9, 10, 11, 12, 9, 10, 11, 12, 9, 10], [0, 20, 21, 20, 21, 20, 22, 20]]
MAX_NEW = [14, 9, 11]

CONFIGS = {
    # GPT-NeoX: parallel residual, partial rotary, LayerNorm; Phi: partial rotary, dense MLP.
    "gpt_neox": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                     rotary_pct=0.5, use_parallel_residual=True),
    "phi": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, partial_rotary_factor=0.5),
    # Gemma 4 text (native too, tests/test_gemma.py; loaded here with `transformers:`): sliding
    # (window 4, crossed by every prompt) and global layers with their own head dims, per-layer
    # inputs, KV-shared last layers, soft-capped logits, tied embeddings.
    "gemma4_text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=8, global_head_dim=16, sliding_window=4,
                        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                        vocab_size_per_layer_input=96, hidden_size_per_layer_input=8, num_kv_shared_layers=2,
                        final_logit_softcapping=30.0, tie_word_embeddings=True),
}


def save_other_model(path, family: str, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = dict(vocab_size=96, max_position_embeddings=256, bos_token_id=0, eos_token_id=1, pad_token_id=1,
                    tie_word_embeddings=False)
    config = AutoConfig.for_model(family, **{**settings, **CONFIGS[family]})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # large weights: sharp, varied distributions
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.3)
    model.save_pretrained(path)
    save_word_tokenizer(path, config.vocab_size)
    return path


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def other_target(request, tmp_path_factory):
    folder = save_other_model(tmp_path_factory.mktemp(request.param), request.param)
    return load_model("transformers:" + str(folder), "fp64")


def full_forward_greedy(target, prompt: list[int], num_tokens: int) -> list[int]:
    """transformers' own model, a full forward over the whole sequence per token (no cache)."""
    hf, ids, out = target.model.hf, list(prompt), []
    with torch.inference_mode():
        for _ in range(num_tokens):
            token = int(hf(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            out.append(token)
            ids.append(token)
            if token in target.eos_token_ids:
                break
    return out


def test_unsupported_architecture_falls_back_with_a_notice(tmp_path, caplog):
    folder = save_other_model(tmp_path / "neox", "gpt_neox")
    with caplog.at_level(logging.WARNING):
        target = load_model(str(folder), "fp32")
    assert target.implementation == "transformers"
    assert any("no native decoder" in r.getMessage() and "gpt_neox" in r.getMessage() for r in caplog.records)
    assert target.vocab_size == 96 and target.model.args.num_layers == 3


def test_transformers_prefix_selects_transformers_for_a_native_family(tiny_dirs):
    native = load_model(str(tiny_dirs["llama"]), "fp64")
    wrapped = load_model(f"transformers:{tiny_dirs['llama']}", "fp64")
    assert (native.implementation, wrapped.implementation) == ("native", "transformers")
    ids = torch.tensor([PROMPTS[1]])
    positions = torch.arange(ids.shape[1])[None]
    outs = []
    for target in (native, wrapped):
        cache = target.build_cache(2, 64, 8)
        slot = torch.tensor([cache.allocate()])
        outs.append(target.model(ids, positions, slot, cache, hidden_layers=(-1, 0, 1)))
    # transformers computes RoPE tables in fp32, the native decoder in fp64: equal to fp32 precision.
    torch.testing.assert_close(outs[1].logits, outs[0].logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[1].hidden_states, outs[0].hidden_states, atol=1e-5, rtol=1e-5)


def test_ragged_rows_rollback_and_final_hidden_match_fresh_forwards(other_target):
    """Rows of different lengths in non-contiguous slots, after a rollback (a longer row was
    written, then the slot's length set back), equal full forwards of each sequence."""
    model = other_target.model
    cache = other_target.build_cache(4, 64, 8)
    slots = [3, 0]
    for s in slots:
        cache.in_use[s] = True
    prompts = [PROMPTS[0], PROMPTS[1]]
    for slot, prompt in zip(slots, prompts):
        model(torch.tensor([prompt + [40, 41, 42]]), torch.arange(len(prompt) + 3)[None], torch.tensor([slot]), cache)
        cache.set_length(slot, len(prompt))  # the three extra tokens were "rejected"
    news = [[7, 8], [30, 31, 32]]
    ids = torch.tensor([news[0] + [0], news[1]])
    positions = torch.tensor([len(p) for p in prompts])[:, None] + torch.arange(3)
    out = model(ids, positions, torch.tensor(slots), cache, num_new=torch.tensor([2, 3]), hidden_layers=(0, 1))
    with torch.inference_mode():
        for row, (prompt, new) in enumerate(zip(prompts, news)):
            ref = model.hf(input_ids=torch.tensor([prompt + new]), output_hidden_states=True)
            torch.testing.assert_close(out.logits[row, : len(new)], ref.logits[0, len(prompt):].float(), atol=1e-9, rtol=1e-9)
            # (hidden_states[i + 1] is layer i's output for every layer but the last, reported after the final norm)
            feats = torch.cat([ref.hidden_states[1][0], ref.hidden_states[2][0]], dim=-1)[len(prompt):]
            torch.testing.assert_close(out.hidden_states[row, : len(new)], feats, atol=1e-9, rtol=1e-9)
    assert not out.logits[0, 2].any(), "padding past a row's own tokens stays zero"


def test_final_hidden_is_what_the_logits_are_computed_from(other_target):
    """logits_from (soft-capped for Gemma) of the final hidden states equals the model's logits."""
    model = other_target.model
    cache = other_target.build_cache(1, 64, 8)
    slot = torch.tensor([cache.allocate()])
    ids = torch.tensor([PROMPTS[2]])
    out = model(ids, torch.arange(ids.shape[1])[None], slot, cache, compute_logits=False)
    assert out.logits is None
    ref = model(ids, torch.arange(ids.shape[1])[None], slot, cache)
    torch.testing.assert_close(model.logits_from(out.final_hidden), ref.logits, atol=1e-9, rtol=1e-9)


def test_a_row_starting_past_its_cached_context_is_refused(other_target):
    from dspark.errors import DSparkError

    cache = other_target.build_cache(1, 64, 8)
    slot = torch.tensor([cache.allocate()])
    with pytest.raises(DSparkError, match="no cached context"):
        other_target.model(torch.tensor([[5, 6]]), torch.tensor([[3, 4]]), slot, cache)


@pytest.mark.parametrize("kind", ["none", "ngram", "dspark"])
@pytest.mark.parametrize("block_size", [1, 4])
def test_greedy_engine_output_is_identical_to_transformers_greedy(other_target, kind, block_size):
    if kind == "dspark":
        config = new_dspark_config(other_target, overrides={"block_size": block_size, "markov_rank": 8})
        drafter = DSparkDrafter(build_dspark_model(config, other_target))
    else:
        drafter = NoDrafter() if kind == "none" else NgramDrafter(max_ngram=3, min_ngram=1)
    engine = Engine(other_target, drafter, EngineConfig(block_size=block_size, max_batch_size=3, max_seq_len=64))
    requests = [Request(p, stop=StopParams(max_new_tokens=m)) for p, m in zip(PROMPTS, MAX_NEW)]
    outputs = engine.generate(requests)
    for prompt, m, out in zip(PROMPTS, MAX_NEW, outputs):
        assert out.token_ids == full_forward_greedy(other_target, prompt, m)
    if kind == "ngram":
        assert sum(o.stats.num_verified for o in outputs) > 0


def test_a_dspark_drafter_trains_saves_and_loads_for_a_transformers_target(other_target, tmp_path):
    """Regenerate answers with the target, train a few steps (online features, final hidden states
    through the output-embedding hook), save, load: the loaded drafter proposes as the trained one
    and decoding with it stays identical to transformers' greedy."""
    from dspark.data.prompts import PromptRecord
    from dspark.data.regenerate import RegenerateConfig, regenerate_local
    from dspark.drafters.checkpoint import load_drafter
    from dspark.train.trainer import Trainer, apply_overrides, preset_tiny

    records = [PromptRecord(f"p:{i}", ({"role": "user", "content": f"w{5 + i} w{9 + i} w{30 + i}"},)) for i in range(2)]
    data = tmp_path / "answers"
    regenerate_local(other_target, records, data, RegenerateConfig(temperature=0.0, top_p=1.0, top_k=0,
                                                                   max_new_tokens=24, batch_size=2), progress=False)
    cfg = apply_overrides(preset_tiny(), ["num_anchors=64", "lr=0.03", "max_steps=3", "save_every=3"])
    trainer = Trainer(other_target, cfg, data, tmp_path / "run")
    final = trainer.run(progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    drafter = load_drafter(final, other_target)
    engine = Engine(other_target, drafter, EngineConfig(block_size=4, max_batch_size=2, max_seq_len=64))
    outs = engine.generate([Request(p, stop=StopParams(max_new_tokens=m)) for p, m in zip(PROMPTS[:2], MAX_NEW)])
    for prompt, m, out in zip(PROMPTS, MAX_NEW, outs):
        assert out.token_ids == full_forward_greedy(other_target, prompt, m)
