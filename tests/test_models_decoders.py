"""NumPy vs torch parity of the five decoder families on tiny checkpoints in their real layouts.

For each family x {float32, float64}, the same directory is loaded by minivl and torch_impl and
compared at every layer (embedding output, each block, final norm, logits), for a prefill, for a
cached decode against a full recompute, and for a left-padded batch against its rows run alone.
Tolerances: see tests/_decoder_util.py (MODEL_ULPS ulps of each tensor's max |value|).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import minivl
import torch_impl
from _decoder_util import DTYPES, FAMILIES, assert_parity, left_padded_batch
from minivl.tiny.llm import tiny_llm_config, write_tiny_llm

# a cached decode runs s=1 matmuls where the recompute runs s=n ones (different BLAS blocking);
# measured at most 9.2 ulps (float32) and 6.0 (float64) of the logits' max: the same 64-ulp bound
CACHE_ULPS = 64


@pytest.fixture(scope="module")
def models(tiny_llms):
    cache = {}

    def get(family, dtype):
        if (family, dtype) not in cache:
            cache[family, dtype] = (minivl.load_model(tiny_llms[family], dtype=dtype),
                                    torch_impl.load_model(tiny_llms[family], dtype=dtype))
        return cache[family, dtype]
    return get


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_every_layer_matches_torch(models, family, dtype):
    np_model, torch_model = models(family, dtype)
    ids = np.random.default_rng(1).integers(3, 300, (2, 11))
    out = np_model(ids, output_hidden_states=True)
    ref = torch_model(torch.tensor(ids), output_hidden_states=True)
    n_layers = len(np_model.get_submodule(np_model.layers_path))
    # L + 2 hidden states: embedding, each block, final norm
    assert len(out.hidden_states) == len(ref.hidden_states) == n_layers + 2
    for i, (a, r) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        assert a.dtype == np.dtype(dtype)
        assert_parity(a, r, dtype, what=f"{family} {dtype} hidden_states[{i}]")
    # logits are float32 in a float32 run and float64 in a float64 run
    assert out.logits.dtype == np.dtype(dtype) and ref.logits.dtype == getattr(torch, dtype)
    assert out.logits.shape == (2, 11, 300)
    assert_parity(out.logits, ref.logits, dtype, what=f"{family} {dtype} logits")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decode_matches_full_recompute(models, family, dtype):
    np_model, torch_model = models(family, dtype)
    ids = np.random.default_rng(2).integers(3, 300, (2, 14))
    prompt_len = 9
    for model, to_input in ((np_model, np.asarray), (torch_model, torch.tensor)):
        full = model(to_input(ids)).logits
        out = model(to_input(ids[:, :prompt_len]), use_cache=True)
        cache = out.past_key_values
        assert cache.get_seq_length(0) == prompt_len
        steps = [out.logits[:, -1]]
        for t in range(prompt_len, ids.shape[1]):
            out = model(to_input(ids[:, t:t + 1]), past_key_values=cache, use_cache=True)
            steps.append(out.logits[:, -1])
        assert cache.get_seq_length(0) == ids.shape[1]
        for j, logits in enumerate(steps):
            assert_parity(logits, full[:, prompt_len - 1 + j], dtype, CACHE_ULPS,
                          what=f"{family} {dtype} {type(model).__module__} decode step {j}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_matches_rows_alone(models, family, dtype):
    np_model, torch_model = models(family, dtype)
    ids, mask, rows = left_padded_batch(np.random.default_rng(3), [10, 6, 3], 300)
    # positions as generate builds them: cumsum(mask) - 1 (MPT derives the same from the mask)
    positions = np.where(mask == 0, 1, np.cumsum(mask, -1) - 1)
    batch_np = np_model(ids, attention_mask=mask, position_ids=positions).logits
    batch_torch = torch_model(torch.tensor(ids), attention_mask=torch.tensor(mask),
                              position_ids=torch.tensor(positions)).logits
    for i, row in enumerate(rows):
        alone = np_model(row[None]).logits[0]
        n = len(row)
        # only real tokens are compared: a pad query attends to nothing real and its output is unused
        assert_parity(batch_np[i, -n:], alone, dtype, CACHE_ULPS, what=f"{family} {dtype} padded row {i} (NumPy)")
        assert_parity(batch_torch[i, -n:], alone, dtype, CACHE_ULPS, what=f"{family} {dtype} padded row {i} (torch)")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_output_attentions_match_torch(models, family, dtype):
    """forward(output_attentions=True): L probability tensors [b, H, s, t], the same in both packages, for a
    left-padded prefill and a cached decode step (t = cached + new keys); asking for them changes no logit.
    Probabilities are <= 1, so MODEL_ULPS of their max bounds the same summation-order differences as above
    (measured worst 7.0 ulps, Phi-3 float32; 2.2-6.0 for the others)."""
    np_model, torch_model = models(family, dtype)
    ids, mask, _ = left_padded_batch(np.random.default_rng(11), [8, 5], 300)
    positions = np.where(mask == 0, 1, np.cumsum(mask, -1) - 1)
    out = np_model(ids, attention_mask=mask, position_ids=positions, use_cache=True, output_attentions=True)
    ref = torch_model(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions),
                      use_cache=True, output_attentions=True)
    n_heads = np_model.config.num_attention_heads if family[:3] != "mpt" else np_model.config.n_heads
    assert len(out.attentions) == len(ref.attentions) == len(np_model.get_submodule(np_model.layers_path))
    for i, (a, r) in enumerate(zip(out.attentions, ref.attentions)):
        assert a.shape == tuple(r.shape) == (2, n_heads, 8, 8) and a.dtype == np.dtype(dtype)
        assert_parity(a, r, dtype, what=f"{family} {dtype} attentions[{i}]")
        # each real query's row is a distribution over real, earlier keys
        real = mask.astype(bool)
        np.testing.assert_allclose(a.sum(-1)[:, :, real[1]][1], 1.0, rtol=1e-6)
        assert np.all(a[1][..., ~real[1]][:, real[1]] == 0)
        assert np.all(np.triu(a[0], k=1) == 0)
    np.testing.assert_array_equal(out.logits, np_model(ids, attention_mask=mask, position_ids=positions).logits)
    assert np_model(ids).attentions is None and torch_model(torch.tensor(ids)).attentions is None
    # one cached step: one query against 9 keys
    mask2 = np.concatenate([mask, np.ones((2, 1), mask.dtype)], 1)
    step, position = np.array([[7], [8]]), mask.sum(-1, keepdims=True)
    a = np_model(step, attention_mask=mask2, position_ids=position, past_key_values=out.past_key_values,
                 output_attentions=True).attentions
    r = torch_model(torch.tensor(step), attention_mask=torch.tensor(mask2), position_ids=torch.tensor(position),
                    past_key_values=ref.past_key_values, output_attentions=True).attentions
    for i in range(len(a)):
        assert a[i].shape == (2, n_heads, 1, 9)
        assert_parity(a[i], r[i], dtype, CACHE_ULPS, what=f"{family} {dtype} decode attentions[{i}]")


def test_output_attentions_on_a_fused_backend_run_eager(tiny_llms):
    """sdpa never forms the probabilities: asking for them runs that call eagerly (transformers falls back too)."""
    eager = torch_impl.load_model(tiny_llms["qwen2"], attn_implementation="eager")
    sdpa = torch_impl.load_model(tiny_llms["qwen2"], attn_implementation="sdpa")
    ids = torch.tensor(np.random.default_rng(12).integers(3, 300, (1, 7)))
    a, b = eager(ids, output_attentions=True), sdpa(ids, output_attentions=True)
    for i in range(len(a.attentions)):
        torch.testing.assert_close(b.attentions[i], a.attentions[i], rtol=0, atol=0)
    torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=0)
    assert sdpa.attn_implementation == "sdpa"


@pytest.mark.parametrize("family", FAMILIES)
def test_inputs_embeds_equal_input_ids(models, family):
    """forward(inputs_embeds=embed_tokens(ids)) == forward(ids): the path the chat model takes."""
    np_model, torch_model = models(family, "float64")
    ids = np.random.default_rng(4).integers(3, 300, (1, 6))
    if family == "mpt_learned":
        # the reference refuses inputs_embeds with learned positions (MPT-M:169-173)
        with pytest.raises(minivl.errors.ShapeError, match="ALiBi"):
            np_model(inputs_embeds=np_model.embed_tokens(ids))
        return
    np.testing.assert_array_equal(np_model(inputs_embeds=np_model.embed_tokens(ids)).logits, np_model(ids).logits)
    torch.testing.assert_close(torch_model(inputs_embeds=torch_model.embed_tokens(torch.tensor(ids))).logits,
                               torch_model(torch.tensor(ids)).logits, rtol=0, atol=0)


def test_bfloat16_checkpoint_loads_into_numpy_without_torch(tmp_path):
    """bf16 tensors are read through ml_dtypes and upcast bit-exactly: NumPy float32 == torch (bf16 -> f32)."""
    path = write_tiny_llm(tmp_path / "q", "qwen2", dtype="bfloat16")
    np_model = minivl.load_model(path, dtype="float32")
    torch_model = torch_impl.load_model(path, dtype="float32")
    assert np_model.model.embed_tokens.weight.dtype == np.float32
    np.testing.assert_array_equal(np_model.model.embed_tokens.weight, torch_model.model.embed_tokens.weight.numpy())
    ids = np.arange(3, 12)[None]
    assert_parity(np_model(ids).logits, torch_model(torch.tensor(ids)).logits, "float32")


def test_torch_bfloat16_run_is_close_to_float64(tmp_path):
    """The torch bf16 path runs end to end; its logits stay within bf16 rounding of the float64 gold run.

    Tolerance: bf16 carries 8 significant bits (eps 7.8e-3); two layers of bf16 matmuls and norms
    accumulate a few eps of the logits' scale, so 8 eps·max|logit| is a loose but meaningful bound
    (a wrong op would be off by O(1)).
    """
    path = write_tiny_llm(tmp_path / "p", "phi3")
    gold = minivl.load_model(path, dtype="float64")
    bf16 = torch_impl.load_model(path, dtype="bfloat16")
    ids = np.arange(3, 20)[None]
    logits = bf16(torch.tensor(ids)).logits
    assert logits.dtype == torch.float32
    assert_parity(logits, gold(ids).logits, "bfloat16", ulps=8)


VARIANTS = {
    "internlm2 with biases, linear RoPE": ("internlm2", {"bias": True, "rope_scaling": {"type": "linear", "factor": 2.0}}),
    "internlm2 without rope_scaling": ("internlm2", {"rope_scaling": None}),
    "phi3 'yarn', sliding window 5": ("phi3", {"sliding_window": 5, "rope_scaling": {
        **tiny_llm_config("phi3")["rope_scaling"], "type": "yarn"}}),
    "phi3 GQA without scaling": ("phi3", {"num_attention_heads": 4, "num_key_value_heads": 2, "rope_scaling": None}),
    "llama with biases, dynamic RoPE": ("llama", {"attention_bias": True, "tie_word_embeddings": False,
                                                  "rope_scaling": {"type": "dynamic", "factor": 2.0}}),
    "qwen2 windowed upper layer": ("qwen2", {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 1}),
    "mpt multi-query, clip, qk_ln, logit_scale, rmsnorm": ("mpt_learned", {
        "attn_config": {"attn_type": "multiquery_attention", "clip_qkv": 0.3, "qk_ln": True},
        "logit_scale": "inv_sqrt_d_model", "norm_type": "rmsnorm"}),
    "mpt alibi with biases, bias max 16, embedding_fraction": ("mpt_alibi", {
        "no_bias": False, "attn_config": {"alibi_bias_max": 16, "softmax_scale": 0.2}, "embedding_fraction": 0.5,
        "logit_scale": 0.7}),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_config_variants_match_torch(tmp_path, variant):
    """The switches the tiny defaults leave off: every layer and a cached decode, float32 and float64."""
    family, overrides = VARIANTS[variant]
    path = write_tiny_llm(tmp_path / "v", family, **overrides)
    ids = np.random.default_rng(5).integers(3, 300, (2, 10))
    for dtype in DTYPES:
        ours, theirs = minivl.load_model(path, dtype=dtype), torch_impl.load_model(path, dtype=dtype)
        out = ours(ids[:, :7], output_hidden_states=True, use_cache=True)
        ref = theirs(torch.tensor(ids[:, :7]), output_hidden_states=True, use_cache=True)
        for i, (a, r) in enumerate(zip(out.hidden_states + (out.logits,), ref.hidden_states + (ref.logits,))):
            assert_parity(a, r, dtype, what=f"{variant} {dtype} output {i}")
        step = ours(ids[:, 7:], past_key_values=out.past_key_values, use_cache=True).logits
        step_ref = theirs(torch.tensor(ids[:, 7:]), past_key_values=ref.past_key_values, use_cache=True).logits
        assert_parity(step, step_ref, dtype, CACHE_ULPS, what=f"{variant} {dtype} cached step")
        assert_parity(step, ours(ids).logits[:, 7:], dtype, CACHE_ULPS, what=f"{variant} {dtype} cache vs recompute")
