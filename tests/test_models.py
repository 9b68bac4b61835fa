"""Native decoder vs transformers, and the KV cache fast paths vs full forwards."""

from __future__ import annotations

import pytest
import torch

from dspark.models.kv_cache import build_kv_cache
from dspark.models.loading import load_native_model
from tests.conftest import FAMILIES, hf_model


def forward(model, ids, cache, slot=0, start=0, **kw):
    n = ids.shape[-1]
    return model(ids.view(1, n), (start + torch.arange(n))[None], torch.tensor([slot]), cache, **kw)


def new_cache(model, slots=1, max_seq_len=64):
    a = model.args
    return build_kv_cache(a.num_layers, slots, max_seq_len, a.num_kv_heads, a.head_dim, model.dtype)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_native_logits_and_hidden_states_match_transformers(tiny_dirs, family, attn):
    native, _ = load_native_model(tiny_dirs[family], torch.float32)
    ref = hf_model(tiny_dirs[family], attn=attn)
    ids = torch.randint(0, native.args.vocab_size, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids, output_hidden_states=True)
    out = forward(native, ids, new_cache(native), hidden_layers=(0, 1))
    torch.testing.assert_close(out.logits, expected.logits, atol=2e-5, rtol=1e-4)
    # hidden_layers=(0,) is HF's hidden_states[1]; the last HF entry is normed, so compare layer 0 only.
    torch.testing.assert_close(out.hidden_states[..., : native.args.hidden_size], expected.hidden_states[1], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decode_equals_full_forward(tiny_dirs, family):
    model, _ = load_native_model(tiny_dirs[family], torch.float64)
    ids = torch.randint(0, model.args.vocab_size, (16,), generator=torch.Generator().manual_seed(2))
    full = forward(model, ids, new_cache(model)).logits[0]
    cache = new_cache(model)
    forward(model, ids[:5], cache)
    steps = [forward(model, ids[i : i + 1], cache, start=i).logits[0, 0] for i in range(5, 16)]
    torch.testing.assert_close(torch.stack(steps), full[5:], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("family", FAMILIES)
def test_rolled_back_cache_equals_fresh_prefill(tiny_dirs, family):
    model, _ = load_native_model(tiny_dirs[family], torch.float64)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, model.args.vocab_size, (12,), generator=gen)
    junk = torch.randint(0, model.args.vocab_size, (6,), generator=gen)
    cache = new_cache(model)
    forward(model, ids[:8], cache)
    forward(model, junk, cache, start=8)  # rejected drafts written past the committed length
    cache.set_length(0, 8)  # rollback = set the length
    rolled = forward(model, ids[8:], cache, start=8).logits
    fresh = forward(model, ids, new_cache(model)).logits[:, 8:]
    torch.testing.assert_close(rolled, fresh, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("family", ["qwen3", "mistral"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_ragged_batch_rows_equal_single_row_forwards(tiny_dirs, family, packed):
    """Rows with different committed lengths and padded new tokens, in non-contiguous slots; with
    num_new the per-token layers run on the real tokens only (packed), and the results are the same."""
    model, _ = load_native_model(tiny_dirs[family], torch.float64)
    prompts, news, slots, cache, ids, positions, num_new = ragged_batch(model, packed, (1, 4, 2))
    out = model(ids, positions, torch.tensor(slots), cache, num_new=num_new, hidden_layers=(1,))
    for row, (prompt, new) in enumerate(zip(prompts, news)):
        ref = forward(model, torch.cat([prompt, new]), new_cache(model), hidden_layers=(1,))
        torch.testing.assert_close(out.logits[row, : len(new)], ref.logits[0, len(prompt) :], atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(out.hidden_states[row, : len(new)], ref.hidden_states[0, len(prompt) :], atol=1e-10, rtol=1e-10)
    if packed:  # the last-token and hidden-only outputs of the packed path
        last = model(ids, positions, torch.tensor(slots), cache, num_new=num_new, last_only=True)
        hidden = model(ids, positions, torch.tensor(slots), cache, num_new=num_new, compute_logits=False)
        for row, new in enumerate(news):
            torch.testing.assert_close(last.logits[row, 0], out.logits[row, len(new) - 1], atol=1e-10, rtol=1e-10)
            torch.testing.assert_close(model.lm_head(hidden.final_hidden[row, : len(new)]).float(),
                                       out.logits[row, : len(new)].float(), atol=1e-10, rtol=1e-10)


def ragged_batch(model, packed: bool, new_lengths: tuple[int, ...]):
    """Three rows with different committed contexts (prefilled into non-contiguous slots 3, 0, 2)
    and new tokens of new_lengths, right-padded to one width; num_new when `packed`."""
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, model.args.vocab_size, (n,), generator=gen) for n in (3, 9, 6)]
    news = [torch.randint(0, model.args.vocab_size, (n,), generator=gen) for n in new_lengths]
    slots = [3, 0, 2]
    cache = model.build_cache(4, 64)
    for slot, prompt in zip(slots, prompts):
        forward(model, prompt, cache, slot=slot)
    width = max(new_lengths)
    ids = torch.zeros(3, width, dtype=torch.long)
    for row, n in enumerate(news):
        ids[row, : len(n)] = n
    positions = torch.tensor([len(p) for p in prompts])[:, None] + torch.arange(width)
    num_new = torch.tensor(new_lengths) if packed else None
    return prompts, news, slots, cache, ids, positions, num_new


@pytest.mark.slow
def test_smollm2_native_logits_match_transformers(smollm2_dir):
    native, _ = load_native_model(smollm2_dir, torch.float32)
    ref = hf_model(smollm2_dir, attn="sdpa")
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 1789, 28, 2, 9690, 198, 3725]])
    with torch.no_grad():
        expected = ref(ids).logits
    out = forward(native, ids, new_cache(native))
    torch.testing.assert_close(out.logits, expected, atol=1e-3, rtol=1e-3)
    assert torch.equal(out.logits.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama"])
def test_fused_projections_equal_separate_projections(tiny_dirs, family):
    fused, _ = load_native_model(tiny_dirs[family], torch.float64)
    plain, _ = load_native_model(tiny_dirs[family], torch.float64, fuse=False)
    ids = torch.randint(0, fused.args.vocab_size, (10,), generator=torch.Generator().manual_seed(5))
    for n in (1, 10):  # the small-query attention path and the SDPA path
        torch.testing.assert_close(forward(fused, ids[:n], new_cache(fused)).logits,
                                   forward(plain, ids[:n], new_cache(plain)).logits, atol=1e-12, rtol=1e-12)
    assert set(fused.state_dict()) == set(plain.state_dict())


def test_grouped_attention_equals_sdpa_with_masks():
    from dspark.models.llama import grouped_attention

    gen = torch.Generator().manual_seed(6)
    q = torch.randn(2, 6, 5, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(2, 2, 11, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(2, 2, 11, 8, generator=gen, dtype=torch.float64)
    mask = torch.rand(2, 1, 5, 11, generator=gen) < 0.7
    mask[..., 0] = True  # every query sees at least one key
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(grouped_attention(q, k, v, mask), expected, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(grouped_attention(q, k, v, None),
                               torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral"])
def test_a_long_fresh_prefill_takes_the_causal_path_and_matches_transformers(tiny_dirs, family):
    """One row prefilling 40 tokens from position 0 uses SDPA's is_causal (Mistral's 6-token window
    keeps its explicit mask); logits equal transformers' either way."""
    native, _ = load_native_model(tiny_dirs[family], torch.float64)
    ref = hf_model(tiny_dirs[family], dtype=torch.float64)
    ids = torch.randint(2, native.args.vocab_size, (40,), generator=torch.Generator().manual_seed(3))
    ctx = native.build_context(torch.arange(40)[None], torch.tensor([0]), new_cache(native))
    assert ctx.causal == [family != "mistral"] * native.args.num_layers
    with torch.no_grad():
        expected = ref(ids[None]).logits
    torch.testing.assert_close(forward(native, ids, new_cache(native)).logits.double(), expected, atol=1e-5, rtol=1e-5)


def test_attention_width_rounds_bf16_key_counts_up_within_the_buffer(monkeypatch):
    from dspark.models import llama

    cpu = torch.device("cpu")
    assert llama.attention_width(100, 1000, torch.float32, cpu) == 100  # only bf16 is ever rounded
    monkeypatch.setattr(llama, "native_bf16_matmul", lambda device: True)
    assert llama.attention_width(100, 1000, torch.bfloat16, cpu) == 128
    assert llama.attention_width(128, 1000, torch.bfloat16, cpu) == 128
    assert llama.attention_width(100, 110, torch.bfloat16, cpu) == 110  # never past the buffer
    monkeypatch.setattr(llama, "native_bf16_matmul", lambda device: False)
    assert llama.attention_width(100, 1000, torch.bfloat16, cpu) == 100


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_rounded_key_counts_leave_decoding_unchanged(tiny_dirs, family, monkeypatch):
    """Decode and verify steps that read keys past the live ones (masked; here stale rejected
    drafts) give the logits of a fresh full forward."""
    from dspark.models import llama

    monkeypatch.setattr(llama, "key_bucket", lambda dtype, device: 8)
    model, _ = load_native_model(tiny_dirs[family], torch.float64)
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, model.args.vocab_size, (21,), generator=gen)
    cache = new_cache(model)
    forward(model, ids[:5], cache)
    forward(model, torch.randint(0, model.args.vocab_size, (6,), generator=gen), cache, start=5)  # rejected
    cache.set_length(0, 5)
    ctx = model.build_context(torch.tensor([[5]]), torch.tensor([0]), cache)
    assert ctx.num_keys == 8  # 6 live keys, read as 8: the rounding is exercised
    steps = [forward(model, ids[i : i + 1], cache, start=i).logits[0, 0] for i in range(5, 13)]
    steps.append(forward(model, ids[13:21], cache, start=13).logits[0])  # an 8-token verify step
    full = forward(model, ids, new_cache(model)).logits[0]
    torch.testing.assert_close(torch.cat([torch.stack(steps[:8]), steps[8]]), full[5:], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("native", [False, True])
def test_dtype_auto_is_bf16_only_where_the_cpu_has_bf16_units(monkeypatch, caplog, tiny_dirs, native):
    """--dtype auto (the compute-bound commands' default): bf16 on CPUs with AVX512-BF16 or AMX, fp32
    elsewhere, with a notice; explicit dtypes are kept; the CLI's defaults follow."""
    import logging

    from dspark.cli import build_parser
    from dspark.config import resolve_dtype
    from dspark.models.target import load_model

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: native)
    assert resolve_dtype("auto") == ("bf16" if native else "fp32")
    assert (resolve_dtype("bf16"), resolve_dtype("fp32")) == ("bf16", "fp32")
    with caplog.at_level(logging.WARNING):
        target = load_model(str(tiny_dirs["llama"]), "auto", with_tokenizer=False)
    assert next(target.model.parameters()).dtype == (torch.bfloat16 if native else torch.float32)
    assert ("no bf16 matmul units" in caplog.text) == (not native)
    parser = build_parser()
    for argv in (["data", "cache", "--data", "d", "--out", "o"], ["data", "regenerate", "--prompts", "p", "--out", "o"],
                 ["train", "--preset", "tiny", "--data", "d", "--out", "o"], ["distill", "--prompts", "p", "--out", "o"]):
        assert parser.parse_args(argv).dtype == "auto", argv
    assert parser.parse_args(["generate", "--prompt", "x"]).dtype == "bf16"  # decoding is memory-bound: bf16
