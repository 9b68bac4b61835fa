"""Native Gemma 4 text decoder (models/gemma.py) against transformers' Gemma 4, its KV cache fast
paths against full forwards, and the engine staying lossless on it with every drafter kind."""

from __future__ import annotations

import logging

import pytest
import torch

from dspark.config import EngineConfig, StopParams
from dspark.drafters.simple import NgramDrafter, NoDrafter
from dspark.engine.engine import Engine, Request
from dspark.models.gemma import GemmaTransformer
from dspark.models.loading import load_native_model
from dspark.drafters.checkpoint import load_drafter
from dspark.models.target import load_model, reference_greedy
from tests.conftest import hf_model, save_word_tokenizer
from tests.test_models import forward, ragged_batch

LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
# Sliding (window 4, crossed by every test sequence) and global layers with their own head dims.
BASE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, global_head_dim=16, sliding_window=4, layer_types=LAYER_TYPES, max_position_embeddings=256,
            bos_token_id=0, eos_token_id=1, pad_token_id=1)
CONFIGS = {
    # Per-layer inputs, KV-shared last layers, soft-capped logits, tied embeddings (Gemma 4 E2B-style).
    "ple-shared": dict(vocab_size_per_layer_input=96, hidden_size_per_layer_input=8, num_kv_shared_layers=2,
                       final_logit_softcapping=30.0, tie_word_embeddings=True),
    # Keys as values with one global KV head, double-wide MLPs on the shared layer, untied head
    # (Gemma 4 12B/31B-style attention), no per-layer inputs.
    "k-eq-v": dict(hidden_size_per_layer_input=0, attention_k_eq_v=True, num_global_key_value_heads=1,
                   num_kv_shared_layers=1, use_double_wide_mlp=True, final_logit_softcapping=30.0,
                   tie_word_embeddings=False),
}


def save_gemma(path, variant: str, seed: int = 0, vocab_size: int = 96, std: float = 0.3, multimodal: bool = False):
    from transformers import AutoConfig, AutoModelForCausalLM, Gemma4ForConditionalGeneration

    settings = {**BASE, **CONFIGS[variant], "vocab_size": vocab_size}
    if "vocab_size_per_layer_input" in settings:
        settings["vocab_size_per_layer_input"] = vocab_size
    torch.manual_seed(seed)
    if multimodal:
        config = AutoConfig.for_model("gemma4", text_config=settings, vision_config=None, audio_config=None,
                                      tie_word_embeddings=settings["tie_word_embeddings"])
        model = Gemma4ForConditionalGeneration(config)
    else:
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model("gemma4_text", **settings))
    with torch.no_grad():  # large weights: sharp, varied distributions
        for name, param in model.named_parameters():
            if param.dim() > 1:
                param.normal_(0.0, std)
            elif "norm" in name:  # norms away from 1, so a norm applied as (1 + w) would show
                param.uniform_(0.5, 1.5)
        for name, buffer in model.named_buffers():
            if name.endswith("layer_scalar"):
                buffer.fill_(0.8)
    model.save_pretrained(path)
    save_word_tokenizer(path, vocab_size)
    return path


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def gemma_dir(request, tmp_path_factory):
    return save_gemma(tmp_path_factory.mktemp(request.param), request.param)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_logits_and_hidden_states_match_transformers(gemma_dir, attn):
    native, _ = load_native_model(gemma_dir, torch.float32)
    ref = hf_model(gemma_dir, attn=attn)
    ids = torch.randint(0, native.args.vocab_size, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids, output_hidden_states=True)
    layers = tuple(range(-1, native.args.num_layers - 1))  # the last HF entry is after the final norm
    out = forward(native, ids, native.build_cache(1, 64), hidden_layers=layers)
    torch.testing.assert_close(out.logits, expected.logits, atol=1e-4, rtol=1e-4)
    hidden = native.args.hidden_size
    for j, layer in enumerate(layers):
        torch.testing.assert_close(out.hidden_states[..., j * hidden : (j + 1) * hidden],
                                   expected.hidden_states[layer + 1], atol=1e-4, rtol=1e-4)


def test_cached_decode_matches_transformers_cached_decode(gemma_dir):
    """Transformers' own cached decode (its sliding-window cache) agrees with ours step by step."""
    native, _ = load_native_model(gemma_dir, torch.float32)
    ref = hf_model(gemma_dir)
    ids = torch.randint(0, native.args.vocab_size, (14,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        # output_hidden_states: transformers 5.x fails a KV-shared prefill without per-layer inputs otherwise
        out = ref(ids[None, :6], use_cache=True, output_hidden_states=True)
        steps, past = [out.logits[0, -1]], out.cache if hasattr(out, "cache") else out.past_key_values
        for i in range(6, 14):
            out = ref(ids[None, i : i + 1], use_cache=True, **{"cache" if hasattr(out, "cache") else "past_key_values": past})
            steps.append(out.logits[0, -1])
    cache = native.build_cache(1, 64)
    mine = [forward(native, ids[:6], cache).logits[0, -1]]
    mine += [forward(native, ids[i : i + 1], cache, start=i).logits[0, 0] for i in range(6, 14)]
    torch.testing.assert_close(torch.stack(mine), torch.stack(steps), atol=1e-4, rtol=1e-4)


def test_cached_decode_equals_full_forward(gemma_dir):
    model, _ = load_native_model(gemma_dir, torch.float64)
    ids = torch.randint(0, model.args.vocab_size, (16,), generator=torch.Generator().manual_seed(2))
    full = forward(model, ids, model.build_cache(1, 64)).logits[0]
    cache = model.build_cache(1, 64)
    forward(model, ids[:5], cache)
    steps = [forward(model, ids[i : i + 1], cache, start=i).logits[0, 0] for i in range(5, 16)]
    torch.testing.assert_close(torch.stack(steps), full[5:], atol=1e-10, rtol=1e-10)


def test_rolled_back_cache_equals_fresh_prefill(gemma_dir):
    model, _ = load_native_model(gemma_dir, torch.float64)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, model.args.vocab_size, (12,), generator=gen)
    junk = torch.randint(0, model.args.vocab_size, (6,), generator=gen)
    cache = model.build_cache(1, 64)
    forward(model, ids[:8], cache)
    forward(model, junk, cache, start=8)  # rejected drafts written past the committed length
    cache.set_length(0, 8)
    rolled = forward(model, ids[8:], cache, start=8).logits
    fresh = forward(model, ids, model.build_cache(1, 64)).logits[:, 8:]
    torch.testing.assert_close(rolled, fresh, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_ragged_batch_rows_equal_single_row_forwards(gemma_dir, packed):
    model, _ = load_native_model(gemma_dir, torch.float64)
    prompts, news, slots, cache, ids, positions, num_new = ragged_batch(model, packed, (1, 5, 2))
    out = model(ids, positions, torch.tensor(slots), cache, num_new=num_new, hidden_layers=(-1, 2))
    hidden = model(ids, positions, torch.tensor(slots), cache, num_new=num_new, compute_logits=False)
    for row, (prompt, new) in enumerate(zip(prompts, news)):
        ref = forward(model, torch.cat([prompt, new]), model.build_cache(1, 64), hidden_layers=(-1, 2))
        n = len(new)
        torch.testing.assert_close(out.logits[row, :n], ref.logits[0, len(prompt) :], atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(out.hidden_states[row, :n], ref.hidden_states[0, len(prompt) :], atol=1e-10, rtol=1e-10)
        # logits_from (soft-capped) of the final hidden states is what training recomputes
        torch.testing.assert_close(model.logits_from(hidden.final_hidden[row, :n]), out.logits[row, :n],
                                   atol=1e-10, rtol=1e-10)


def test_a_multimodal_gemma4_folder_runs_its_text_model_natively(tmp_path):
    folder = save_gemma(tmp_path / "mm", "k-eq-v", multimodal=True)
    target = load_model(str(folder), "fp32")
    assert isinstance(target.model, GemmaTransformer) and target.implementation == "native"
    from transformers import Gemma4ForConditionalGeneration

    ref = Gemma4ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.randint(2, 96, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = ref(input_ids=ids, output_hidden_states=True).logits  # see the cached-decode test
    torch.testing.assert_close(forward(target.model, ids[0], target.build_cache(1, 32)).logits, expected,
                               atol=1e-4, rtol=1e-4)


def test_load_model_runs_gemma4_natively_and_moe_through_transformers(gemma_dir, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        target = load_model(str(gemma_dir), "fp32")
    assert target.implementation == "native" and not caplog.records
    forced = load_model("transformers:" + str(gemma_dir), "fp32")
    assert forced.implementation == "transformers"
    from transformers import AutoConfig, AutoModelForCausalLM

    moe = AutoConfig.for_model("gemma4_text", **{**BASE, **CONFIGS["k-eq-v"], "vocab_size": 96, "enable_moe_block": True,
                                                  "num_experts": 2, "top_k_experts": 1, "moe_intermediate_size": 16})
    AutoModelForCausalLM.from_config(moe).save_pretrained(tmp_path / "moe")
    save_word_tokenizer(tmp_path / "moe", 96)
    with caplog.at_level(logging.WARNING):
        fallback = load_model(str(tmp_path / "moe"), "fp32")
    assert fallback.implementation == "transformers"
    assert "mixture-of-experts" in caplog.text


# ------------------------------------------------------------------ lossless through the engine
PROMPTS = [[0, 5, 6, 7, 5, 6], [0, 9, 10, 11, 12, 9, 10, 11, 12, 9, 10], [0, 20, 21, 20, 21, 20, 22, 20]]
MAX_NEW = [14, 9, 11]


@pytest.fixture(scope="module")
def gemma_target(tmp_path_factory):
    return load_model(str(save_gemma(tmp_path_factory.mktemp("gt"), "ple-shared")), "fp64")


@pytest.mark.parametrize("kind", ["none", "ngram", "dspark-vanilla", "dflash", "eagle3"])
def test_greedy_identity_on_a_gemma4_target(gemma_target, kind):
    from tests.test_drafters import make

    drafter = {"none": NoDrafter, "ngram": NgramDrafter}.get(kind, lambda: make(kind, gemma_target))()
    engine = Engine(gemma_target, drafter, EngineConfig(block_size=4, max_batch_size=3, max_seq_len=64))
    stop = [StopParams(max_new_tokens=m, ignore_eos=True) for m in MAX_NEW]
    outs = engine.generate([Request(p, stop=s) for p, s in zip(PROMPTS, stop)])
    for prompt, m, out in zip(PROMPTS, MAX_NEW, outs):
        assert out.token_ids == reference_greedy(gemma_target.model, prompt, m)


@pytest.fixture(scope="module")
def gemma_vocab4(tmp_path_factory):
    folder = save_gemma(tmp_path_factory.mktemp("gv4"), "ple-shared", seed=1, vocab_size=4, std=0.6)
    return load_model(str(folder), "fp64")


@pytest.mark.parametrize("kind", ["dspark-vanilla", "dflash", "eagle3"])
def test_sequence_distribution_on_a_gemma4_target(gemma_vocab4, kind):
    from tests.test_drafters import make
    from tests.test_engine import DIST_CASES, sampled_tv

    extra = {} if kind == "eagle3" else {"mask_token_id": 3} if kind == "dflash" else {"mask_token_id": 3, "markov_rank": 4}
    drafter = make(kind, gemma_vocab4, seed=1, **extra)
    # 3 tokens (64 sequences), 10k samples: the bound is computed for that many (the Llama-family
    # tests run 20k and 200k).
    tv, bound = sampled_tv(gemma_vocab4, drafter, DIST_CASES["T=1"], 10_000, block_size=3, num_tokens=3)
    assert tv < bound, f"TV {tv:.4f} >= {bound:.4f} (null mean + 4 sigma: false-failure probability < 1e-4)"


# ------------------------------------------------------------------------- soft-capped training
def test_losses_soft_cap_the_draft_base_logits_and_the_target_logits():
    """DeepSpec's Gemma 4 compute_logits: cap * tanh(h W / cap) for the target and for the draft's
    base logits, the sequential head's bias added after the cap; the log-normaliser likewise."""
    from dspark.models.gemma import softcap
    from dspark.train.losses import LossWeights, dspark_loss, log_normalizer

    gen = torch.Generator().manual_seed(7)
    m, hdim, vocab, rank, cap = 5, 6, 11, 3, 2.0
    hidden, target_hidden = torch.randn(m, hdim, generator=gen) * 3, torch.randn(m, hdim, generator=gen) * 3
    lm, w2 = torch.randn(vocab, hdim, generator=gen), torch.randn(vocab, rank, generator=gen)
    feats, labels, weights = torch.randn(m, rank, generator=gen), torch.randint(0, vocab, (m,), generator=gen), torch.ones(m)
    out = dspark_loss(hidden, feats, None, target_hidden, labels, weights, lm, w2, LossWeights(), cap=cap)
    q = torch.softmax(softcap(hidden @ lm.T, cap) + feats @ w2.T, -1)
    p = torch.softmax(softcap(target_hidden @ lm.T, cap), -1)
    torch.testing.assert_close(out.acceptance, (1 - 0.5 * (q - p).abs().sum(-1)).clamp(0, 1))
    torch.testing.assert_close(out.ce, float(-q.log().gather(1, labels[:, None]).mean()))
    uncapped = dspark_loss(hidden, feats, None, target_hidden, labels, weights, lm, w2, LossWeights())
    assert not torch.allclose(uncapped.acceptance, out.acceptance)
    torch.testing.assert_close(log_normalizer(target_hidden, lm, cap=cap), torch.logsumexp(softcap(target_hidden @ lm.T, cap), -1))


@pytest.mark.parametrize("arch", ["dspark", "eagle3"])
def test_a_drafter_for_a_gemma4_target_trains_saves_and_loads(gemma_target, tmp_path, arch):
    """Online features from the native Gemma 4 target, soft-capped losses; the saved drafter loads,
    proposes as the trained one and decoding with it stays identical to plain greedy."""
    import json
    import math

    from dspark.data.prompts import PromptRecord
    from dspark.data.regenerate import RegenerateConfig, regenerate_local
    from dspark.drafters.checkpoint import load_drafter
    from dspark.train.trainer import Trainer, apply_overrides, preset_tiny, preset_tiny_eagle3

    target = gemma_target
    assert target.logit_softcap == 30.0
    records = [PromptRecord(f"p:{i}", ({"role": "user", "content": f"w{5 + i} w{9 + i} w{30 + i}"},)) for i in range(2)]
    regenerate_local(target, records, tmp_path / "answers", RegenerateConfig(temperature=0.0, top_p=1.0, top_k=0,
                                                                             max_new_tokens=24, batch_size=2), progress=False)
    preset = preset_tiny() if arch == "dspark" else preset_tiny_eagle3()
    cfg = apply_overrides(preset, ["lr=0.03", "max_steps=3", "save_every=3"])
    final = Trainer(target, cfg, tmp_path / "answers", tmp_path / "run").run(progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    drafter = load_drafter(final, target)
    assert drafter.model.config.target.logit_softcap == 30.0
    engine = Engine(target, drafter, EngineConfig(block_size=4, max_batch_size=2, max_seq_len=64))
    stop = [StopParams(max_new_tokens=m, ignore_eos=True) for m in MAX_NEW[:2]]
    outs = engine.generate([Request(p, stop=s) for p, s in zip(PROMPTS[:2], stop)])
    for prompt, m, out in zip(PROMPTS, MAX_NEW, outs):
        assert out.token_ids == reference_greedy(target.model, prompt, m)


@pytest.mark.parametrize("name", ["test_inference_block_equals_teacher_forced_block",
                                  "test_eagle3_training_time_test_matches_inference_chain",
                                  "test_forward_blocks_factored_mask_equals_the_dense_one"])
def test_training_and_inference_paths_of_gemma_draft_layers_agree(gemma_target, name):
    """DeepSpec's Gemma 4 draft layers (DSpark and Eagle3): the teacher-forced training forward and
    the cached inference round give the same drafts."""
    import tests.test_drafters as drafter_tests

    assert gemma_target.model.args.layer_style == "gemma4"
    getattr(drafter_tests, name)(gemma_target)


def test_gemma_draft_layers_follow_deepspec_geometry_and_names(tmp_path):
    """Global head dim, one KV head and no v_proj where keys are values, Gemma's norm set and layer
    scalar, and DeepSpec's parameter names."""
    from tests.test_drafters import make

    target = load_model(str(save_gemma(tmp_path / "k", "k-eq-v")), "fp32")
    names = set(make("dspark-vanilla", target).model.state_dict())
    assert {"layers.0.self_attn.q_proj.weight", "layers.0.self_attn.k_norm.weight", "layers.0.layer_scalar",
            "layers.0.pre_feedforward_layernorm.weight", "layers.0.post_feedforward_layernorm.weight"} <= names
    assert "layers.0.self_attn.v_proj.weight" not in names
    model = make("dspark-vanilla", target).model
    assert model.layers[0].self_attn.k_proj.weight.shape == (16, 32)  # 1 KV head x global head dim 16
    eagle = make("eagle3", target).model
    assert eagle.layers[0].self_attn.v_proj is None and eagle.layers[0].self_attn.q_proj.weight.shape == (64, 64)


# ------------------------------------------------------------------------ DeepSpec layout export
@pytest.fixture(scope="module", params=sorted(CONFIGS))
def gemma_fp32(request, tmp_path_factory):
    return load_model(str(save_gemma(tmp_path_factory.mktemp("e" + request.param), request.param)), "fp32")


def gemma_draft_shapes(cfg: dict, eagle3: bool) -> dict[str, tuple[int, ...]]:
    """DeepSpec's Gemma4DSparkModel / Gemma4Eagle3Model names and shapes (modeling/{dspark,eagle3}/
    gemma4/modeling.py), from config.json alone."""
    h, v, inter, d = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"], cfg["global_head_dim"]
    kv = cfg["num_global_key_value_heads"] if cfg["attention_k_eq_v"] else cfg["num_key_value_heads"]
    width = 2 * h if eagle3 else h
    layer = {"self_attn.q_proj.weight": (cfg["num_attention_heads"] * d, width), "self_attn.k_proj.weight": (kv * d, width),
             "self_attn.o_proj.weight": (h, cfg["num_attention_heads"] * d), "self_attn.q_norm.weight": (d,),
             "self_attn.k_norm.weight": (d,), "mlp.gate_proj.weight": (inter, h), "mlp.up_proj.weight": (inter, h),
             "mlp.down_proj.weight": (h, inter), "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
             "pre_feedforward_layernorm.weight": (h,), "post_feedforward_layernorm.weight": (h,), "layer_scalar": (1,)}
    if not cfg["attention_k_eq_v"]:
        layer["self_attn.v_proj.weight"] = (kv * d, width)
    if eagle3:
        layer["hidden_norm.weight"] = (h,)
    out = {"embed_tokens.weight": (v, h), "lm_head.weight": (v, h), "norm.weight": (h,),
           "fc.weight": (h, h * len(cfg["target_layer_ids"]))}
    out.update({f"layers.{i}.{k}": s for i in range(cfg["num_hidden_layers"]) for k, s in layer.items()})
    if not eagle3:
        out["hidden_norm.weight"] = (h,)
        r = cfg["markov_rank"]
        if r:
            out.update({"markov_head.markov_w1.weight": (v, r), "markov_head.markov_w2.weight": (v, r)})
        if cfg["enable_confidence_head"]:
            out.update({"confidence_head.proj.weight": (1, h + r), "confidence_head.proj.bias": (1,)})
    return out


@pytest.mark.parametrize("kind", ["dspark-vanilla", "dflash", "eagle3"])
def test_gemma4_drafters_export_to_deepspecs_layout_and_import_back(gemma_fp32, tmp_path, kind):
    from tests.test_drafters import _requests, _start
    from tests.test_export import export, read_export, saved_drafter

    target = gemma_fp32
    overrides = {"block_size": 3} if kind == "eagle3" else {}
    folder, _ = saved_drafter(tmp_path, target, kind, **overrides) if kind != "eagle3" else _saved_eagle3(tmp_path, target)
    out = export(folder, target, tmp_path / "out")
    cfg, state = read_export(out)
    assert cfg["architectures"] == ["Gemma4Eagle3Model" if kind == "eagle3" else "Gemma4DSparkModel"]
    assert cfg["model_type"] == "gemma4_text" and cfg["hidden_size_per_layer_input"] == 0
    assert cfg["global_head_dim"] == 16 and cfg["layer_types"] == ["full_attention"] * cfg["num_hidden_layers"]
    assert {k: tuple(t.shape) for k, t in state.items()} == gemma_draft_shapes(cfg, kind == "eagle3")
    assert all(t.dtype == torch.bfloat16 for t in state.values())
    assert "do not serve" in (out / "README.md").read_text()
    source, loaded = load_drafter(folder, target), load_drafter(out, target)
    assert loaded.model.config.target.logit_softcap == 30.0
    prompts = [p[:6] for p in PROMPTS]
    for d in (source, loaded):
        _start(d, target, prompts)
    for pa, pb in zip(source.propose(_requests(target, enumerate(prompts), 3)),
                      loaded.propose(_requests(target, enumerate(prompts), 3))):
        assert torch.equal(pa.tokens, pb.tokens) and torch.equal(pa.draft_probs, pb.draft_probs)


def _saved_eagle3(root, target):
    from dspark.drafters.checkpoint import save_drafter
    from tests.test_drafters import make

    model = make("eagle3", target, seed=2, block_size=3).model
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.copy_(tensor.to(torch.bfloat16))
    return save_drafter(model, root / "src-eagle3"), model


def test_gemma4_export_to_the_speculators_format_is_refused(gemma_fp32, tmp_path):
    from dspark.errors import DSparkError
    from tests.test_export import export, saved_drafter

    folder, _ = saved_drafter(tmp_path, gemma_fp32, "dspark-vanilla")
    with pytest.raises(DSparkError, match="do not serve DSpark drafters for Gemma 4"):
        export(folder, gemma_fp32, tmp_path / "out", fmt="speculators")
    assert not (tmp_path / "out").exists()


def test_dspark_generate_runs_a_gemma4_folder_natively_with_a_trained_drafter_folder(capsys, tmp_path):
    """`dspark generate --target <gemma4 folder> --drafter <folder>`: the same tokens as plain decoding."""
    from dspark.cli import main
    from dspark.drafters.checkpoint import save_drafter
    from tests.test_cli import json_lines
    from tests.test_drafters import make

    folder = save_gemma(tmp_path / "g", "k-eq-v")
    drafter = save_drafter(make("dspark-vanilla", load_model(str(folder), "fp32")).model, tmp_path / "d")
    runs = []
    for choice in (str(drafter), "none"):
        code = main(["generate", "--target", str(folder), "--drafter", choice, "--policy", "fixed", "--prompt",
                     "w5 w6 w7 w5 w6", "--max-new-tokens", "8", "--dtype", "fp32", "--json"])
        out = capsys.readouterr()
        assert code == 0, out.err
        assert "transformers" not in out.err  # native: no fallback notice
        runs.append(json_lines(out.out)[0]["token_ids"])
    assert runs[0] == runs[1] and len(runs[0]) > 0
