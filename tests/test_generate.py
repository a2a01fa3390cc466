"""generate() in both packages: greedy parity, cache vs recompute, sampling, stop tokens, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import minivl
import torch_impl
from _decoder_util import FAMILIES, left_padded_batch
from minivl.errors import GenerationError
from minivl.generate import generate, warp_logits
from torch_impl.generate import generate as torch_generate
from torch_impl.generate import warp_logits as torch_warp_logits


@pytest.fixture(scope="module")
def qwen2(tiny_llms):
    return minivl.load_model(tiny_llms["qwen2"]), torch_impl.load_model(tiny_llms["qwen2"])


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_numpy_equals_torch_on_a_left_padded_batch(tiny_llms, family):
    ours, theirs = minivl.load_model(tiny_llms[family]), torch_impl.load_model(tiny_llms[family])
    ids, mask, _ = left_padded_batch(np.random.default_rng(20), [8, 3, 5], 300)
    new = generate(ours, ids, attention_mask=mask, max_new_tokens=6)
    assert new.shape == (3, 6) and new.dtype == np.int64
    np.testing.assert_array_equal(new, torch_generate(theirs, torch.tensor(ids), attention_mask=torch.tensor(mask),
                                                      max_new_tokens=6).numpy())


def test_greedy_with_cache_equals_argmax_of_full_recomputes(qwen2):
    """An independent greedy loop without any cache: recompute the whole sequence, take argmax, append."""
    ours, _ = qwen2
    ids = np.random.default_rng(21).integers(3, 300, (1, 7))
    tokens = ids
    for _ in range(6):
        tokens = np.concatenate([tokens, ours(tokens).logits[:, -1].argmax(-1)[:, None]], 1)
    np.testing.assert_array_equal(generate(ours, ids, max_new_tokens=6), tokens[:, 7:])


def test_padded_rows_generate_what_they_generate_alone(qwen2):
    ours, theirs = qwen2
    ids, mask, rows = left_padded_batch(np.random.default_rng(22), [9, 4], 300)
    batch = generate(ours, ids, attention_mask=mask, max_new_tokens=5)
    for i, row in enumerate(rows):
        np.testing.assert_array_equal(batch[i], generate(ours, row[None], max_new_tokens=5)[0])
        np.testing.assert_array_equal(batch[i], torch_generate(theirs, torch.tensor(row[None]), max_new_tokens=5)[0])


def test_inputs_embeds_prompt_generates_like_input_ids(qwen2):
    """The chat model's path: prefill from embeddings, then token ids."""
    ours, theirs = qwen2
    ids = np.random.default_rng(23).integers(3, 300, (2, 6))
    expected = generate(ours, ids, max_new_tokens=5)
    np.testing.assert_array_equal(generate(ours, inputs_embeds=ours.embed_tokens(ids), max_new_tokens=5), expected)
    torch_ids = torch.tensor(ids)
    np.testing.assert_array_equal(
        torch_generate(theirs, inputs_embeds=theirs.embed_tokens(torch_ids), max_new_tokens=5).numpy(), expected)


def test_seeded_sampling_is_reproducible_and_seed_dependent(qwen2):
    ours, theirs = qwen2
    ids = np.random.default_rng(24).integers(3, 300, (2, 5))
    kwargs = dict(max_new_tokens=12, do_sample=True, temperature=1.5, top_k=50, top_p=0.95)
    a, b = generate(ours, ids, seed=7, **kwargs), generate(ours, ids, seed=7, **kwargs)
    np.testing.assert_array_equal(a, b)
    assert (generate(ours, ids, seed=8, **kwargs) != a).any()
    ta, tb = (torch_generate(theirs, torch.tensor(ids), seed=7, **kwargs) for _ in range(2))
    torch.testing.assert_close(ta, tb, rtol=0, atol=0)
    assert (torch_generate(theirs, torch.tensor(ids), seed=8, **kwargs) != ta).any()
    # top_k = 1 leaves one candidate: sampling is greedy
    greedy = generate(ours, ids, max_new_tokens=6)
    np.testing.assert_array_equal(generate(ours, ids, max_new_tokens=6, do_sample=True, top_k=1, seed=3), greedy)
    np.testing.assert_array_equal(
        torch_generate(theirs, torch.tensor(ids), max_new_tokens=6, do_sample=True, top_k=1, seed=3).numpy(), greedy)


def test_sampling_frequencies_follow_the_softmax():
    """10 000 seeded draws from fixed logits: empirical frequencies within 4 standard errors of softmax."""
    from minivl.generate import next_tokens, softmax
    from torch_impl.generate import next_tokens as torch_next_tokens

    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    n = 10000
    rng = np.random.default_rng(0)
    draws = np.concatenate([next_tokens(np.repeat(logits, 100, 0), True, 1.0, None, None, rng) for _ in range(n // 100)])
    generator = torch.Generator().manual_seed(0)
    torch_draws = torch.cat([torch_next_tokens(torch.tensor(np.repeat(logits, 100, 0)), True, 1.0, None, None, generator)
                             for _ in range(n // 100)]).numpy()
    p = softmax(logits)[0]
    for sample in (draws, torch_draws):
        freq = np.bincount(sample, minlength=4) / n
        # binomial standard error sqrt(p(1-p)/n): 4 of them is a 6e-5 false-alarm rate per entry
        assert (np.abs(freq - p) <= 4 * np.sqrt(p * (1 - p) / n)).all(), (freq, p)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 5, None), (0.7, None, 0.8), (1.3, 10, 0.5), (1.0, None, 0.01)])
def test_warpers_match_transformers_logits_processors(temperature, top_k, top_p):
    transformers = pytest.importorskip("transformers")
    logits = np.random.default_rng(25).normal(0, 2, (3, 40)).astype(np.float32)
    ref = torch.tensor(logits)
    ref = transformers.TemperatureLogitsWarper(temperature)(None, ref)
    if top_k is not None:
        ref = transformers.TopKLogitsWarper(top_k)(None, ref)
    if top_p is not None:
        ref = transformers.TopPLogitsWarper(top_p)(None, ref)
    ours = warp_logits(logits, temperature, top_k, top_p)
    theirs = torch_warp_logits(torch.tensor(logits), temperature, top_k, top_p)
    # same survivors (finite entries) and, for them, the same value. Tolerance 0: the only arithmetic
    # on a survivor is one float32 division by the temperature, correctly rounded in NumPy, torch and
    # transformers alike, so all three are bit-identical (measured: max difference 0.0)
    np.testing.assert_array_equal(np.isfinite(ours), torch.isfinite(ref).numpy())
    np.testing.assert_array_equal(torch.isfinite(theirs).numpy(), torch.isfinite(ref).numpy())
    finite = np.isfinite(ours)
    assert ours.dtype == np.float32 and theirs.dtype == torch.float32
    np.testing.assert_array_equal(ours[finite], ref.numpy()[finite])
    np.testing.assert_array_equal(theirs.numpy()[finite], ref.numpy()[finite])


def test_stop_tokens_end_rows_and_fill_with_pad(qwen2):
    ours, theirs = qwen2
    ids = np.random.default_rng(26).integers(3, 300, (2, 6))
    free = generate(ours, ids, max_new_tokens=10)
    stop = int(free[0, 2])  # row 0 emits this at step 2
    new = generate(ours, ids, max_new_tokens=10, eos_token_id=[stop, 299], pad_token_id=0)
    np.testing.assert_array_equal(new[0, :3], free[0, :3])
    hit1 = np.flatnonzero(np.isin(free[1], [stop, 299]))
    end = new.shape[1]
    assert (new[0, 3:] == 0).all()
    if hit1.size:  # row 1 stops too: generation ends at the later stop
        assert end == max(3, hit1[0] + 1)
    else:
        assert end == 10 and (new[1] == free[1]).all()
    torch_new = torch_generate(theirs, torch.tensor(ids), max_new_tokens=10, eos_token_id=[stop, 299], pad_token_id=0)
    np.testing.assert_array_equal(torch_new.numpy(), new)
    # a single row that stops ends the whole call early
    single = generate(ours, ids[:1], max_new_tokens=10, eos_token_id=stop)
    np.testing.assert_array_equal(single[0], free[0, :3])


def test_streamer_and_max_new_tokens(qwen2):
    ours, _ = qwen2
    ids = np.arange(3, 9)[None]
    seen = []
    new = generate(ours, ids, max_new_tokens=4, streamer=seen.append)
    assert new.shape == (1, 4) and len(seen) == 4
    np.testing.assert_array_equal(np.stack(seen, 1), new)
    assert generate(ours, ids, max_new_tokens=0).shape == (1, 0)


def test_too_long_for_the_positions_is_a_generation_error(tiny_llms):
    llama = minivl.load_model(tiny_llms["llama"])  # max_position_embeddings 128, no rope_scaling
    ids = np.ones((1, 120), dtype=np.int64)
    with pytest.raises(GenerationError, match="120.*max_new_tokens.*128"):
        generate(llama, ids, max_new_tokens=9)
    with pytest.raises(GenerationError, match="128"):
        torch_generate(torch_impl.load_model(tiny_llms["llama"]), torch.tensor(ids), max_new_tokens=9)
    assert generate(llama, ids, max_new_tokens=8).shape == (1, 8)  # exactly 128 is fine
    for family in ("mpt_alibi", "mpt_learned"):  # max_seq_len 64
        with pytest.raises(GenerationError, match="64"):
            generate(minivl.load_model(tiny_llms[family]), ids[:, :60], max_new_tokens=5)
    phi3 = minivl.load_model(tiny_llms["phi3"])  # su: long factors serve up to max_position_embeddings 1024
    with pytest.raises(GenerationError, match="1024"):
        generate(phi3, np.ones((1, 1020), dtype=np.int64), max_new_tokens=5)
    # dynamic NTK covers any length: InternLM2 (max_position_embeddings 48) is allowed past it
    internlm2 = minivl.load_model(tiny_llms["internlm2"])
    assert internlm2.position_limit() is None
    assert generate(internlm2, np.arange(3, 50)[None], max_new_tokens=3).shape == (1, 3)


def test_bad_generation_settings_are_named(qwen2):
    ours, theirs = qwen2
    ids = np.arange(3, 9)[None]
    with pytest.raises(GenerationError, match="LEFT padding"):
        generate(ours, ids, attention_mask=np.array([[1, 1, 1, 1, 0, 0]]))
    with pytest.raises(GenerationError, match="temperature"):
        generate(ours, ids, do_sample=True, temperature=0.0)
    with pytest.raises(GenerationError, match="top_p"):
        torch_generate(theirs, torch.tensor(ids), do_sample=True, top_p=0.0)
    with pytest.raises(GenerationError, match="top_k"):
        generate(ours, ids, do_sample=True, top_k=0)
    with pytest.raises(GenerationError, match="exactly one"):
        generate(ours, ids, inputs_embeds=ours.embed_tokens(ids))
    with pytest.raises(GenerationError, match="max_new_tokens"):
        generate(ours, ids, max_new_tokens=-1)
    with pytest.raises(GenerationError, match="no real token"):
        generate(ours, ids, attention_mask=np.zeros((1, 6)))
