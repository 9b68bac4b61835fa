"""DSpark / DFlash / Eagle3 drafters: lossless through the engine, head and mask identities,
checkpoints and target checks."""

from __future__ import annotations

import random

import pytest
import torch

from dspark.config import EngineConfig, SamplingParams, StopParams
from dspark.drafters.base import DraftRequest
from dspark.drafters.checkpoint import (
    build_dspark_model, load_drafter, new_dspark_config, parse_overrides, save_drafter,
)
from dspark.drafters.dspark import DSparkDrafter, default_target_layer_ids, dflash_config
from dspark.drafters.eagle3 import Eagle3Drafter, build_eagle3_model, new_eagle3_config
from dspark.drafters.simple import LookupFirstDrafter
from dspark.engine.engine import Engine, Request
from dspark.errors import DSparkError
from dspark.models.target import load_model, reference_greedy
from tests.conftest import save_tiny_model
from tests.test_engine import DIST_CASES, expected_greedy, sampled_tv

PROMPTS = [[0, 5, 6, 7, 5, 6], [0, 9, 10, 11, 12, 9, 10, 11, 12, 9, 10], [0, 20, 21, 20, 21, 20, 22, 20]]
KINDS = ["dspark-vanilla", "dspark-gated", "dspark-rnn", "dspark-vocab", "dflash", "eagle3"]


@pytest.fixture(scope="module")
def qwen3_target(tiny_dirs):
    return load_model(str(tiny_dirs["qwen3"]), "fp64")


def make(kind: str, target, seed: int = 0, **overrides):
    if kind == "eagle3":
        return Eagle3Drafter(build_eagle3_model(new_eagle3_config(target, overrides), target, seed=seed))
    arch = "dflash" if kind == "dflash" else "dspark"
    vocab = kind == "dspark-vocab"  # vanilla head over a random draft vocabulary of half the ids
    if arch == "dspark":
        head = "vanilla" if vocab else kind.split("-")[1]
        overrides = {"markov_rank": 8, "markov_head_type": head, **overrides}
        if vocab:
            overrides.setdefault("draft_vocab_size", max(2, target.vocab_size // 2))
    model = build_dspark_model(new_dspark_config(target, arch, overrides), target, seed=seed)
    if vocab:
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randperm(target.vocab_size, generator=gen)[: model.config.draft_vocab_size].sort().values
        model.draft_vocab.copy_(ids)
    return DSparkDrafter(model)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("block_size", [1, 3, 7])
def test_greedy_identity_with_random_drafters(qwen3_target, kind, block_size):
    assert_greedy_identity(qwen3_target, make(kind, qwen3_target), block_size, seed=block_size)


def assert_greedy_identity(target, drafter, block_size: int, seed: int = 0) -> None:
    """PROMPTS decoded at batch 3, verifying every draft and then random prefixes of them, equal
    plain greedy decoding."""
    engine = Engine(target, drafter, EngineConfig(block_size=block_size, max_batch_size=3, max_seq_len=64))
    rng = random.Random(seed)
    policy = lambda reqs, props: [rng.randint(0, len(p)) for p in props]  # noqa: E731  (ignores the tokens)
    requests = [Request(p, stop=StopParams(max_new_tokens=m)) for p, m in zip(PROMPTS, [14, 9, 12])]
    for run_policy in (None, policy):
        outs = engine.generate(requests, **({"policy": run_policy} if run_policy else {}))
        for prompt, m, out in zip(PROMPTS, [14, 9, 12], outs):
            assert out.token_ids == expected_greedy(target, prompt, m)


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_identity_when_drafts_do_get_accepted(vocab4_target, kind):
    """On a 4-token vocabulary even a random drafter lands drafts, so the accept path is exercised."""
    target = vocab4_target
    extra = {} if kind == "eagle3" else {"mask_token_id": 3} if kind == "dflash" else {"mask_token_id": 3, "markov_rank": 4}
    drafter = make(kind, target, seed=1, **extra)
    engine = Engine(target, drafter, EngineConfig(block_size=5, max_batch_size=3, max_seq_len=64))
    prompts = [[0, 2, 3, 2], [0, 3, 3], [0, 2, 2, 3, 2, 3]]
    stop = StopParams(max_new_tokens=24, ignore_eos=True)
    outs = engine.generate([Request(p, stop=stop) for p in prompts])
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == reference_greedy(target.model, prompt, 24)
    assert sum(o.stats.num_accepted for o in outs) > 0


@pytest.mark.parametrize("kind", ["dspark-vanilla", "dflash", "eagle3"])
def test_rounded_key_counts_change_no_draft_and_no_output(vocab4_target, kind, monkeypatch):
    """Target and drafter attention reading masked keys past the live ones (as bf16 does on CPUs,
    see attention_width) draft, accept and output exactly what exact key counts do."""
    from dspark.models import llama

    target = vocab4_target
    extra = {} if kind == "eagle3" else {"mask_token_id": 3} if kind == "dflash" else {"mask_token_id": 3, "markov_rank": 4}
    prompts = [[0, 2, 3, 2], [0, 3, 3], [0, 2, 2, 3, 2, 3]]
    stop = StopParams(max_new_tokens=24, ignore_eos=True)
    runs = []
    for bucket in (1, 8):
        monkeypatch.setattr(llama, "key_bucket", lambda dtype, device, b=bucket: b)
        engine = Engine(target, make(kind, target, seed=1, **extra), EngineConfig(block_size=5, max_batch_size=3, max_seq_len=64))
        runs.append(engine.generate([Request(p, stop=stop) for p in prompts]))
    for prompt, exact, rounded in zip(prompts, *runs):
        assert rounded.token_ids == exact.token_ids == reference_greedy(target.model, prompt, 24)
        assert rounded.stats.round_log == exact.stats.round_log  # the same drafts were accepted
    assert sum(o.stats.num_accepted for o in runs[1]) > 0


# --------------------------------------------------------------------------- distribution (vocab 4)
@pytest.fixture(scope="module")
def vocab4_target(tmp_path_factory):
    root = tmp_path_factory.mktemp("v4d")
    return load_model(str(save_tiny_model(root / "t", "qwen3", seed=1, vocab_size=4, initializer_range=0.6)), "fp64")


@pytest.mark.parametrize(("kind", "case"), [("dspark-vanilla", "T=1"), ("dspark-rnn", "T=1"),
                                            ("dspark-vanilla", "T=1,top-p=0.8"), ("dspark-rnn", "T=1,top-p=0.8"),
                                            ("dspark-vocab", "T=1"), ("dspark-vocab", "T=0.8,top-k=3")])
def test_sequence_distribution_with_sequential_heads(vocab4_target, kind, case):
    drafter = make(kind, vocab4_target, mask_token_id=3, markov_rank=4)
    with torch.no_grad():  # make the heads matter: a large random Markov bias
        drafter.model.markov_head.markov_w2.weight.normal_(0, 2.0)
    # 4 generated tokens: after the prefill's token a round can verify up to 2 drafts, so the head's
    # effect on a later draft (given the earlier sampled one) is part of what is checked.
    tv, bound = sampled_tv(vocab4_target, drafter, DIST_CASES[case], 20_000, block_size=3, num_tokens=4)
    assert tv < bound, f"TV {tv:.4f} >= {bound:.4f} (null mean + 4 sigma: false-failure probability < 1e-4)"


@pytest.mark.parametrize("inner", ["dspark-vanilla", "eagle3"])
def test_sequence_distribution_with_lookup_in_front(vocab4_target, inner):
    """`<drafter>+ngram`: rounds mix point-mass lookup drafts and the model drafter's sampled ones,
    across requests and across rounds of one request; the sequences keep the target's law."""
    extra = {} if inner == "eagle3" else {"mask_token_id": 3, "markov_rank": 4}
    drafter = LookupFirstDrafter(make(inner, vocab4_target, **extra), min_match=2)
    tv, bound = sampled_tv(vocab4_target, drafter, DIST_CASES["T=1"], 20_000, block_size=3, num_tokens=5)
    assert 0 < drafter.looked_up < drafter.proposed  # both proposed, in the same runs
    assert tv < bound, f"TV {tv:.4f} >= {bound:.4f} (null mean + 4 sigma: false-failure probability < 1e-4)"


@pytest.mark.parametrize("kind", ["dspark-vanilla", "dflash", "eagle3"])
def test_greedy_identity_with_lookup_in_front(qwen3_target, kind):
    """The prompts repeat, so lookup drafts some rounds and the model drafter the others; the model
    drafter must follow the rounds it did not draft (its context check fails otherwise)."""
    drafter = LookupFirstDrafter(make(kind, qwen3_target), min_match=2)
    assert_greedy_identity(qwen3_target, drafter, block_size=4)
    assert 0 < drafter.looked_up < drafter.proposed
    assert drafter.name == f"{drafter.inner.name}+ngram" and drafter.feature_layers == drafter.inner.feature_layers


def test_lookup_goes_in_front_of_model_drafters_only(qwen3_target, tmp_path):
    from dspark.drafters import registry
    from dspark.drafters.simple import NgramDrafter, NoDrafter

    for inner in (NgramDrafter(), NoDrafter()):
        with pytest.raises(DSparkError, match="goes after a model drafter"):
            LookupFirstDrafter(inner)
    with pytest.raises(DSparkError, match="goes after a model drafter.*'ngram'"):
        registry.build_drafter("ngram+ngram", qwen3_target)
    with pytest.raises(DSparkError, match="unknown drafter 'nowhere'"):
        registry.build_drafter("nowhere+ngram", qwen3_target)
    save_drafter(make("dspark-vanilla", qwen3_target).model, tmp_path / "d")
    built = registry.build_drafter(f"{tmp_path / 'd'}+ngram", qwen3_target)
    assert isinstance(built, LookupFirstDrafter) and isinstance(built.inner, DSparkDrafter)
    assert registry.resolve_drafter_name(f"{tmp_path / 'd'}+ngram", qwen3_target) == f"{tmp_path / 'd'}+ngram"


# ------------------------------------------------------------------------------------- identities
def _requests(target, slots_prompts, k, params=SamplingParams(temperature=1.0), seed=0):
    return [DraftRequest(slot, list(p), k, params, torch.Generator().manual_seed(seed + slot))
            for slot, p in slots_prompts]


def _start(drafter, target, prompts):
    drafter.setup(4, 64, 7)
    for slot, prompt in enumerate(prompts):
        feats = target.model(torch.tensor([prompt[:-1]]), torch.arange(len(prompt) - 1)[None], torch.tensor([0]),
                             target.build_cache(1, 64, 8), hidden_layers=drafter.feature_layers).hidden_states[0]
        drafter.begin(slot, prompt[:-1], feats)


def test_dspark_with_a_zero_markov_bias_and_no_confidence_equals_dflash(qwen3_target):
    target = qwen3_target
    dspark = make("dspark-vanilla", target, seed=3, confidence_head=False)
    with torch.no_grad():
        dspark.model.markov_head.markov_w2.weight.zero_()
    dflash_model = build_dspark_model(dflash_config(dspark.config), target, seed=None)
    dflash_model.load_state_dict(dspark.model.state_dict(), strict=False)  # same backbone weights
    dflash = DSparkDrafter(dflash_model)
    for d in (dspark, dflash):
        _start(d, target, PROMPTS)
    a = dspark.propose(_requests(target, enumerate(PROMPTS), 7))
    b = dflash.propose(_requests(target, enumerate(PROMPTS), 7))
    for pa, pb in zip(a, b):
        assert torch.equal(pa.tokens, pb.tokens)
        torch.testing.assert_close(pa.draft_probs, pb.draft_probs, atol=0, rtol=0)


@pytest.mark.parametrize("head", ["vanilla", "gated", "rnn"])
def test_teacher_forced_block_logits_equal_step_by_step(qwen3_target, head):
    model = make(f"dspark-{head}", qwen3_target, seed=4).model
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(3, 7, qwen3_target.vocab_size, generator=gen, dtype=torch.float64)
    prev = torch.randint(0, qwen3_target.vocab_size, (3, 7), generator=gen)
    hidden = torch.randn(3, 7, 32, generator=gen, dtype=torch.float64)
    block = model.head_logits(base, prev, hidden)
    state = model.markov_head.init_state(3, hidden)
    for k in range(7):
        bias, state = model.markov_head.step(prev[:, k], hidden[:, k], state)
        torch.testing.assert_close(block[:, k], base[:, k] + bias, atol=1e-12, rtol=1e-12)


def test_block_masks_hide_the_anchor_feature_and_other_blocks(qwen3_target):
    model = make("dspark-vanilla", qwen3_target, seed=5).model
    gen = torch.Generator().manual_seed(1)
    feats = torch.randn(1, 12, 32 * len(model.config.target_layer_ids), generator=gen, dtype=torch.float64)
    anchors_pos = torch.tensor([[4, 8]])
    anchors_tok = torch.tensor([[7, 9]])
    ref = model.forward_blocks(feats, anchors_tok, anchors_pos)

    def changed(f=feats, tok=anchors_tok):
        out = model.forward_blocks(f, tok, anchors_pos)
        return [not torch.allclose(out[0, b], ref[0, b], atol=1e-12, rtol=0) for b in range(2)]

    at_anchor = feats.clone()
    at_anchor[0, 4] += 1.0  # block 0's anchor position: invisible to block 0, visible to block 1
    assert changed(at_anchor) == [False, True]
    before = feats.clone()
    before[0, 3] += 1.0
    assert changed(before) == [True, True]
    after_all = feats.clone()
    after_all[0, 8:] += 1.0  # at or after block 1's anchor: no block sees it
    assert changed(after_all) == [False, False]
    assert changed(tok=torch.tensor([[11, 9]])) == [True, False]  # blocks never see each other


def test_inference_block_equals_teacher_forced_block(qwen3_target):
    """The per-round inference path (context cache + one block) gives the training path's logits."""
    target = qwen3_target
    drafter = make("dspark-gated", target, seed=6)
    prompt = PROMPTS[1]
    _start(drafter, target, [prompt])
    greedy = SamplingParams(temperature=0.0)
    (prop,) = drafter.propose(_requests(target, [(0, prompt)], 7, greedy))
    feats = target.model(torch.tensor([prompt]), torch.arange(len(prompt))[None], torch.tensor([0]),
                         target.build_cache(1, 64, 8), hidden_layers=drafter.feature_layers).hidden_states
    anchor_pos = torch.tensor([[len(prompt) - 1]])
    hidden = drafter.model.forward_blocks(feats, torch.tensor([[prompt[-1]]]), anchor_pos)
    prev = torch.cat([torch.tensor([prompt[-1]]), prop.tokens[:-1]])[None, None]
    logits = drafter.model.head_logits(drafter.model.logits(hidden), prev, hidden)
    assert torch.equal(logits[0, 0].argmax(-1), prop.tokens)


def test_eagle3_training_time_test_matches_inference_chain(qwen3_target):
    target = qwen3_target
    drafter = make("eagle3", target, seed=7)
    prompt = PROMPTS[2]
    _start(drafter, target, [prompt])
    (prop,) = drafter.propose(_requests(target, [(0, prompt)], 4, SamplingParams(temperature=0.0)))
    seq = list(prompt) + prop.tokens.tolist()
    feats = target.model(torch.tensor([seq]), torch.arange(len(seq))[None], torch.tensor([0]),
                         target.build_cache(1, 64, 8), hidden_layers=drafter.feature_layers).hidden_states
    steps = drafter.model.forward_ttt(feats, torch.tensor([seq]), steps=4)
    t = len(prompt) - 2  # the last committed pair: features of token t with token t + 1
    assert [int(drafter.model.lm_logits(steps[k][0, t]).argmax()) for k in range(4)] == prop.tokens.tolist()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_ttt_attention_equals_the_dense_causal_and_diagonal_mask(dtype):
    """The training-time test's attention without the S x (k+1)S scores equals grouped_attention over
    the concatenated keys with the [causal | diagonal x k] mask (grouped heads: 6 query, 2 KV)."""
    from dspark.drafters.eagle3 import ttt_attention
    from dspark.models.llama import grouped_attention

    gen = torch.Generator().manual_seed(3)
    seq = 9
    q = torch.randn(2, 6, seq, 4, generator=gen, dtype=torch.float64)
    keys = [torch.randn(2, 2, seq, 4, generator=gen, dtype=torch.float64) for _ in range(4)]
    values = [torch.randn(2, 2, seq, 4, generator=gen, dtype=torch.float64) for _ in range(4)]
    index = torch.arange(seq)
    for k in range(4):
        mask = torch.cat([index[None, :] <= index[:, None]] + [torch.eye(seq, dtype=torch.bool)] * k, dim=-1)
        args = [q.to(dtype), [x.to(dtype) for x in keys[: k + 1]], [x.to(dtype) for x in values[: k + 1]]]
        dense = grouped_attention(args[0], torch.cat(args[1], 2), torch.cat(args[2], 2), mask[None, None], 0.7)
        fast = ttt_attention(*args, 0.7)
        assert fast.dtype == dtype
        torch.testing.assert_close(fast.double(), dense.double(), **({} if dtype == torch.float64 else {"atol": 2e-2, "rtol": 2e-2}))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_block_local_attention_equals_the_dense_block_mask(dtype):
    """Teacher-forced blocks' attention without the Q x Q block-to-block scores equals grouped_attention
    over [context ; block] keys with the dense mask, a dummy block (no context) included."""
    from dspark.drafters.dspark import BlockLocalMask, block_local_attention
    from dspark.models.llama import grouped_attention

    gen = torch.Generator().manual_seed(4)
    seq, blocks, block = 10, 3, 4
    q_len = blocks * block
    q = torch.randn(2, 6, q_len, 4, generator=gen, dtype=torch.float64)
    ctx_k, ctx_v = (torch.randn(2, 2, seq, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(2, 2, q_len, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    anchors = torch.tensor([[2, 5, 9], [0, 4, 7]]).repeat_interleave(block, dim=1)
    ctx_visible = torch.arange(seq)[None, None, :] < anchors[..., None]  # [2, Q, S]; batch 1's block 0: none
    owner = torch.arange(blocks).repeat_interleave(block)
    own = (owner[:, None] == owner[None, :]).expand(2, -1, -1)
    dense_mask = torch.cat([ctx_visible, own], dim=-1)[:, None]
    args = [x.to(dtype) for x in (q, ctx_k, ctx_v, k, v)]
    dense = grouped_attention(args[0], torch.cat([args[1], args[3]], 2), torch.cat([args[2], args[4]], 2), dense_mask, 0.7)
    fast = block_local_attention(*args, BlockLocalMask(ctx_visible, block), 0.7)
    assert fast.dtype == dtype and fast.shape == dense.shape
    tol = {"atol": 1e-12, "rtol": 1e-12} if dtype == torch.float64 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(fast.double(), dense.double(), **tol)


def test_forward_blocks_factored_mask_equals_the_dense_one(qwen3_target):
    """Training's teacher-forced blocks give the same hidden states with the factored mask as with the
    dense [Q, S + Q] one, a dummy block included (test_gemma runs it on Gemma 4's draft layers)."""
    target = qwen3_target
    model = make("dspark-vanilla", target, seed=6).model
    gen = torch.Generator().manual_seed(2)
    feats = torch.randn(1, 14, target.model.args.hidden_size * len(model.config.target_layer_ids), generator=gen,
                        dtype=torch.float64)
    tokens, positions = torch.tensor([[7, 9, 3]]), torch.tensor([[0, 5, 11]])
    keep = torch.tensor([[False, True, True]])
    dense = model.forward_blocks(feats, tokens, positions, keep, dense_mask=True)
    torch.testing.assert_close(model.forward_blocks(feats, tokens, positions, keep), dense, atol=1e-12, rtol=1e-12)


# ------------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("kind", ["dspark-rnn", "dspark-vocab", "dflash", "eagle3"])
def test_save_then_load_gives_identical_proposals(qwen3_target, tmp_path, kind):
    target = qwen3_target
    drafter = make(kind, target, seed=8)
    save_drafter(drafter.model, tmp_path / "d")
    loaded = load_drafter(tmp_path / "d", target)
    for d in (drafter, loaded):
        _start(d, target, PROMPTS)
    a = drafter.propose(_requests(target, enumerate(PROMPTS), 5))
    b = loaded.propose(_requests(target, enumerate(PROMPTS), 5))
    for pa, pb in zip(a, b):
        assert torch.equal(pa.tokens, pb.tokens)
        assert (pa.draft_probs is None and pb.draft_probs is None) or torch.equal(pa.draft_probs, pb.draft_probs)


@pytest.mark.parametrize("greedy", [True, False])
def test_a_draft_vocabulary_drafts_only_its_ids_and_hands_full_vocabulary_probabilities(qwen3_target, greedy):
    target = qwen3_target
    drafter = make("dspark-vocab", target, seed=4, draft_vocab_size=10)
    allowed = set(drafter.model.draft_vocab.tolist())
    _start(drafter, target, PROMPTS)
    params = SamplingParams(temperature=0.0 if greedy else 1.0)
    for prop in drafter.propose(_requests(target, enumerate(PROMPTS), 7, params)):
        assert set(prop.tokens.tolist()) <= allowed
        if greedy:
            continue
        assert prop.draft_probs.shape == (7, target.vocab_size)
        outside = torch.ones(target.vocab_size, dtype=torch.bool)
        outside[drafter.model.draft_vocab] = False
        assert float(prop.draft_probs[:, outside].abs().sum()) == 0.0
        torch.testing.assert_close(prop.draft_probs.sum(-1), torch.ones(7, dtype=prop.draft_probs.dtype))
        picked = prop.draft_probs.gather(1, prop.tokens[:, None])
        assert bool((picked > 0).all())  # each draft came from the distribution handed over


def test_loading_against_another_target_names_the_mismatch(qwen3_target, tiny_dirs, tmp_path):
    save_drafter(make("dspark-vanilla", qwen3_target).model, tmp_path / "d")
    with pytest.raises(DSparkError, match="architecture 'qwen3'.*has 'llama'"):
        load_drafter(tmp_path / "d", load_model(str(tiny_dirs["llama"]), "fp64"))
    same_shape = load_model(str(save_tiny_model(tmp_path / "q3b", "qwen3", seed=9)), "fp64")
    with pytest.raises(DSparkError, match="fingerprint"):
        load_drafter(tmp_path / "d", same_shape)
    assert load_drafter(tmp_path / "d", load_model(str(tiny_dirs["qwen3"]), "fp32"))  # same weights, other dtype


def test_saving_never_overwrites_an_existing_folder(qwen3_target, tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(DSparkError, match="already exists"):
        save_drafter(make("dflash", qwen3_target).model, out)
    assert (out / "keep.txt").read_text() == "precious"


def test_bad_drafter_settings_are_refused(qwen3_target):
    with pytest.raises(DSparkError, match="unknown drafter setting 'rank'"):
        parse_overrides(["rank=3"])
    with pytest.raises(DSparkError, match="markov_head_type 'lstm'"):
        new_dspark_config(qwen3_target, "dspark", {"markov_head_type": "lstm"})
    with pytest.raises(DSparkError, match="target_layer_ids"):
        new_dspark_config(qwen3_target, "dspark", {"target_layer_ids": (1, 0)})
    with pytest.raises(DSparkError, match="mask_token_id"):
        new_dspark_config(qwen3_target, "dspark", {"mask_token_id": 10_000})
    with pytest.raises(DSparkError, match="draft_vocab_size 100000 must be in"):
        new_dspark_config(qwen3_target, "dspark", {"draft_vocab_size": 100_000})


def test_default_target_layers_match_deepspec_for_36_layers():
    assert default_target_layer_ids(36) == (1, 9, 17, 25, 33)
    assert default_target_layer_ids(2) == (0, 1)
    assert len(default_target_layer_ids(30)) == 5


# ---------------------------------------------------------------------------------- DeepSpec import
def write_deepspec_folder(model, target, folder, embed_scale: float = 1.0, layer_ids=None):
    """A tiny checkpoint in DeepSpec's released layout: the target's config + drafter fields, and the
    DSparkModel weight names plus copies of the target's embedding and LM head."""
    import json

    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    raw = json.loads((target.model_dir / "config.json").read_text())
    c = model.config
    raw.update(architectures=["Qwen3DSparkModel"], num_target_layers=raw["num_hidden_layers"],
               num_hidden_layers=c.num_draft_layers, block_size=c.block_size, mask_token_id=c.mask_token_id,
               target_layer_ids=list(layer_ids or c.target_layer_ids), num_anchors=512, markov_rank=c.markov_rank,
               markov_head_type=c.markov_head_type, enable_confidence_head=c.confidence_head,
               confidence_head_with_markov=c.confidence_with_markov, tie_word_embeddings=False,
               layer_types=["full_attention"] * c.num_draft_layers, dtype="bfloat16")
    (folder / "config.json").write_text(json.dumps(raw))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["embed_tokens.weight"] = target.model.model.embed_tokens.weight.clone() * embed_scale
    state["lm_head.weight"] = target.model.lm_head.weight.clone()
    save_file(state, str(folder / "model.safetensors"))


@pytest.mark.parametrize("kind", ["dspark-vanilla", "dflash"])
def test_deepspec_checkpoint_imports_with_identical_proposals(qwen3_target, tmp_path, kind):
    target = qwen3_target
    drafter = make(kind, target, seed=10, block_size=7, num_draft_layers=2)
    write_deepspec_folder(drafter.model, target, tmp_path / "ds")
    imported = load_drafter(tmp_path / "ds", target)
    assert imported.config.arch == ("dflash" if kind == "dflash" else "dspark")
    assert imported.config.num_draft_layers == 2
    for d in (drafter, imported):
        _start(d, target, PROMPTS)
    for pa, pb in zip(drafter.propose(_requests(target, enumerate(PROMPTS), 7)),
                      imported.propose(_requests(target, enumerate(PROMPTS), 7))):
        assert torch.equal(pa.tokens, pb.tokens)
        assert (pa.draft_probs is None and pb.draft_probs is None) or torch.equal(pa.draft_probs, pb.draft_probs)
        assert (pa.confidences is None) == (pb.confidences is None)


def test_deepspec_checkpoint_for_another_target_is_refused(qwen3_target, tiny_dirs, tmp_path):
    """(An embedding-layer tap, -1, used to be refused here; it is supported now: see
    test_embedding_output_as_a_feature_layer_proposes_as_the_training_path.)"""
    drafter = make("dspark-vanilla", qwen3_target, seed=11)
    write_deepspec_folder(drafter.model, qwen3_target, tmp_path / "other", embed_scale=2.0)
    with pytest.raises(DSparkError, match="embed_tokens.weight differs"):
        load_drafter(tmp_path / "other", qwen3_target)
    write_deepspec_folder(drafter.model, qwen3_target, tmp_path / "ok")
    with pytest.raises(DSparkError, match="model_type 'qwen3'.*'llama'"):
        load_drafter(tmp_path / "ok", load_model(str(tiny_dirs["llama"]), "fp64"))


def round_to_bf16(model) -> None:
    """Weights that a bf16 checkpoint holds exactly, so a saved-and-imported copy is bit-identical."""
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.copy_(tensor.to(torch.bfloat16))


def write_deepspec_eagle3_folder(model, target, folder, embed_scale: float = 1.0, draft_layers: int = 1):
    """A tiny checkpoint as DeepSpec's Eagle3 trainer writes it: the target's config with the fields of
    eagle3/qwen3/config.py's build_draft_config, and save_pretrained's bf16 weights (Eagle3Model's
    names, which are DeepSpec's, plus copies of the target's embedding and LM head)."""
    import json

    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    raw = json.loads((target.model_dir / "config.json").read_text())
    c = model.config
    raw.update(architectures=["Qwen3Eagle3Model"], num_target_layers=raw["num_hidden_layers"],
               num_hidden_layers=draft_layers, layer_types=["full_attention"] * draft_layers,
               target_model_name_or_path="Qwen/Qwen3-4B", target_layer_ids=list(c.target_layer_ids),
               ttt_length=c.block_size, step_loss_decay=0.8, draft_num_hidden_layers=draft_layers,
               tie_word_embeddings=False, dtype="bfloat16")
    (folder / "config.json").write_text(json.dumps(raw))
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    state["embed_tokens.weight"] = (target.model.model.embed_tokens.weight * embed_scale).to(torch.bfloat16)
    state["lm_head.weight"] = target.model.lm_head.weight.to(torch.bfloat16)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_deepspec_eagle3_folder_imports_with_identical_proposals(qwen3_target, tmp_path):
    target = qwen3_target
    drafter = make("eagle3", target, seed=12, block_size=5)
    round_to_bf16(drafter.model)
    write_deepspec_eagle3_folder(drafter.model, target, tmp_path / "ds")
    imported = load_drafter(tmp_path / "ds", target)
    assert isinstance(imported, Eagle3Drafter)
    assert (imported.config.block_size, imported.config.target_layer_ids) == (5, drafter.config.target_layer_ids)
    for d in (drafter, imported):
        _start(d, target, PROMPTS)
    for pa, pb in zip(drafter.propose(_requests(target, enumerate(PROMPTS), 5)),
                      imported.propose(_requests(target, enumerate(PROMPTS), 5))):
        assert torch.equal(pa.tokens, pb.tokens) and torch.equal(pa.draft_probs, pb.draft_probs)
    write_deepspec_eagle3_folder(drafter.model, target, tmp_path / "other", embed_scale=2.0)
    with pytest.raises(DSparkError, match="embed_tokens.weight differs"):
        load_drafter(tmp_path / "other", target)
    write_deepspec_eagle3_folder(drafter.model, target, tmp_path / "deep", draft_layers=2)
    with pytest.raises(DSparkError, match="2 draft layers"):
        load_drafter(tmp_path / "deep", target)


def test_embedding_output_as_a_feature_layer_proposes_as_the_training_path(qwen3_target, tmp_path):
    """target_layer_ids (-1, 1): the target hands its embedding output as layer -1's feature; the
    inference path (cached context + one block) gives the training path's greedy block (features from
    the trainer's online extraction); the drafter is lossless; a DeepSpec folder with -1 imports."""
    from dspark.train.trainer import target_features

    target = qwen3_target
    drafter = make("dspark-gated", target, seed=13, target_layer_ids=(-1, 1))
    prompt = PROMPTS[1]
    _start(drafter, target, [prompt])
    (prop,) = drafter.propose(_requests(target, [(0, prompt)], 7, SamplingParams(temperature=0.0)))
    ids = torch.tensor(prompt)
    feats, _ = target_features(target, (-1, 1), ids, target.build_cache(1, 64, 0))
    hidden_size = target.model.args.hidden_size
    assert torch.equal(feats[:, :hidden_size], target.model.model.embed_tokens(ids))
    hidden = drafter.model.forward_blocks(feats[None], ids[-1:][None], torch.tensor([[len(prompt) - 1]]))
    prev = torch.cat([ids[-1:], prop.tokens[:-1]])[None, None]
    logits = drafter.model.head_logits(drafter.model.logits(hidden), prev, hidden)
    assert torch.equal(logits[0, 0].argmax(-1), prop.tokens)
    engine = Engine(target, drafter, EngineConfig(block_size=4, max_batch_size=3, max_seq_len=64))
    outs = engine.generate([Request(p, stop=StopParams(max_new_tokens=10)) for p in PROMPTS])
    assert [o.token_ids for o in outs] == [expected_greedy(target, p, 10) for p in PROMPTS]
    write_deepspec_folder(drafter.model, target, tmp_path / "ds")
    imported = load_drafter(tmp_path / "ds", target)
    assert imported.config.target_layer_ids == (-1, 1)
    _start(imported, target, [prompt])
    (again,) = imported.propose(_requests(target, [(0, prompt)], 7, SamplingParams(temperature=0.0)))
    assert torch.equal(again.tokens, prop.tokens)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dspark-vanilla", "dspark-rnn"])
def test_sequence_distribution_with_sequential_heads_200k(vocab4_target, kind):
    drafter = make(kind, vocab4_target, mask_token_id=3, markov_rank=4)
    with torch.no_grad():
        drafter.model.markov_head.markov_w2.weight.normal_(0, 2.0)
    rng = random.Random(1)
    policy = lambda reqs, props: [rng.randint(0, len(p)) for p in props]  # noqa: E731
    tv, bound = sampled_tv(vocab4_target, drafter, DIST_CASES["T=1"], 200_000, block_size=3, policy=policy, num_tokens=4)
    assert tv < bound, f"TV {tv:.4f} >= {bound:.4f} (null mean + 4 sigma: false-failure probability < 1e-4)"


@pytest.mark.parametrize("kind", ["dspark-vanilla", "eagle3", "draft-model"])
def test_a_request_joining_next_to_one_near_the_end_of_a_tight_cache(qwen3_target, kind):
    """Catch-up forwards pad rows to the longest: a new request's whole prompt next to a request
    deep in its answer. Only real tokens may be written, or the padding runs past the cache."""
    from dspark.drafters.draft_model import DraftModelDrafter

    target = qwen3_target
    drafter = DraftModelDrafter(target) if kind == "draft-model" else make(kind, target)
    engine = Engine(target, drafter, EngineConfig(block_size=3, max_batch_size=2, max_seq_len=40))
    gen = torch.Generator().manual_seed(7)
    long_prompt, short_prompt = (torch.randint(0, target.vocab_size, (n,), generator=gen).tolist() for n in (30, 20))
    stop = StopParams(max_new_tokens=9, ignore_eos=True)
    first = Request(long_prompt, SamplingParams(0.0), stop)
    engine.add_request(first)
    skip = lambda reqs, props: [0] * len(props)  # noqa: E731  (one token per round: the long row grows slowly)
    for _ in range(6):
        engine.step(skip)
    second = Request(short_prompt, SamplingParams(0.0), stop)
    engine.add_request(second)
    done = {}
    while engine.has_unfinished():
        done.update({id(o.request): o for o in engine.step()})
    assert done[id(first)].token_ids == reference_greedy(target.model, long_prompt, 9)
    assert done[id(second)].token_ids == reference_greedy(target.model, short_prompt, 9)


def test_auto_picks_the_targets_builtin_drafter_else_ngram(qwen3_target, tiny_dirs, tmp_path, monkeypatch):
    from dspark.drafters import registry
    from dspark.drafters.simple import NgramDrafter

    monkeypatch.setattr(registry, "BUILTIN_DIR", tmp_path / "builtin")
    assert isinstance(registry.build_drafter("auto", qwen3_target), NgramDrafter)  # none shipped
    with pytest.raises(DSparkError, match="has no builtin drafter"):
        registry.build_drafter("builtin", qwen3_target)
    drafter = make("dspark-vocab", qwen3_target, seed=2)
    save_drafter(drafter.model, tmp_path / "builtin" / "tiny-dspark")
    for name in ("builtin", "tiny-dspark"):
        built = registry.build_drafter(name, qwen3_target)
        assert isinstance(built, DSparkDrafter) and torch.equal(built.model.draft_vocab, drafter.model.draft_vocab)
    for name in ("auto", "auto+ngram", "builtin+ngram"):  # auto: the builtin drafter behind prompt lookup
        built = registry.build_drafter(name, qwen3_target)
        assert isinstance(built, LookupFirstDrafter) and isinstance(built.inner, DSparkDrafter)
        assert torch.equal(built.inner.model.draft_vocab, drafter.model.draft_vocab)
    other = load_model(str(tiny_dirs["llama"]), "fp64")  # another target: its auto stays ngram
    assert isinstance(registry.build_drafter("auto", other), NgramDrafter)
