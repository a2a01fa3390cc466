"""The decoders against transformers 5.24 on the same weights (an implementation we did not write).

Llama, Qwen2, Phi-3 and MPT load the tiny checkpoint directory directly with
`XForCausalLM.from_pretrained(dir, local_files_only=True)`; InternLM2 is not in transformers, so its
checkpoint is rewritten as a Llama one with the spec's wqkv -> q/k/v recipe (done independently in
tests/_decoder_util.py) — which checks the per-KV-head grouping of wqkv against a real Llama.

Everything runs in float32 with attn_implementation="eager": transformers builds its RoPE tables in
float32 even in a float64 model, so float32 is where both follow the same roundings. Differences
left: transformers multiplies q·kᵀ by D^-½ where the reference (and minivl) divides by sqrt(D)
(bit-identical only for power-of-two D; Phi-3's D=96 is not), and summation orders. Measured
worst error: 11.6 ulps of the logits' max (Phi-3; 4-7 for the others); tolerance TF_ULPS = 64 (the parity bound of
tests/_decoder_util.py).

Known transformers differences handled here (rope-alibi-notes 4.2, 4.3):
* 5.23 cannot load a Phi-3 config with rope type 'su' (KeyError on original_max_position_embeddings):
  the copy given to transformers says 'longrope', the same recipe (4.2 row 2);
* 5.23's MptAttentionConfig wants attn_pdrop as an int: the copy says 0;
* transformers' MPT has ALiBi only, no biases, no qk_ln, no clip: the mpt_alibi checkpoint is that.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import minivl  # noqa: E402
from _decoder_util import MODEL_ULPS, assert_parity, hf_copy, internlm2_as_llama, left_padded_batch  # noqa: E402
from minivl.generate import generate  # noqa: E402
from minivl.tiny.llm import write_tiny_llm  # noqa: E402

TF_ULPS = MODEL_ULPS


def _hf(cls, path):
    transformers.logging.set_verbosity_error()
    return cls.from_pretrained(path, local_files_only=True, dtype=torch.float32, attn_implementation="eager").eval()


def _to_longrope(config):
    config["rope_scaling"]["type"] = "longrope"


def _mpt_for_transformers(config):
    config["attn_config"]["attn_pdrop"] = 0


CASES = {
    # case: (family, transformers class name, overrides, config edit for the transformers copy)
    "llama": ("llama", "LlamaForCausalLM", {}, None),
    "llama_untied": ("llama", "LlamaForCausalLM", {"tie_word_embeddings": False}, None),
    "llama_bias": ("llama", "LlamaForCausalLM", {"attention_bias": True}, None),
    "qwen2": ("qwen2", "Qwen2ForCausalLM", {}, None),
    "qwen2_tied": ("qwen2", "Qwen2ForCausalLM", {"tie_word_embeddings": True}, None),
    # window of 4 keys on layer 1 only (layer 0 < max_window_layers stays full)
    "qwen2_window": ("qwen2", "Qwen2ForCausalLM",
                     {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}, None),
    "phi3": ("phi3", "Phi3ForCausalLM", {}, _to_longrope),
    "phi3_window": ("phi3", "Phi3ForCausalLM", {"sliding_window": 5}, _to_longrope),
    "mpt_alibi": ("mpt_alibi", "MptForCausalLM", {}, _mpt_for_transformers),
}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    cache = {}

    def get(case):
        if case not in cache:
            family, cls_name, overrides, edit = CASES[case]
            path = write_tiny_llm(root / case, family, **overrides)
            hf_path = hf_copy(path, root / f"{case}_hf", edit) if edit else path
            cache[case] = (minivl.load_model(path), _hf(getattr(transformers, cls_name), hf_path))
        return cache[case]
    return get


@pytest.mark.parametrize("case", list(CASES))
def test_prefill_logits_and_hidden_states_match_transformers(pairs, case):
    ours, theirs = pairs(case)
    ids = np.random.default_rng(5).integers(3, 300, (2, 12))
    out = ours(ids, output_hidden_states=True)
    ref = theirs(torch.tensor(ids), output_hidden_states=True)
    assert_parity(out.logits, ref.logits, "float32", TF_ULPS, what=f"{case} logits vs transformers")
    # transformers returns L+1 states: embedding, blocks 1..L-1, then the FINAL-NORM output in place of
    # block L's; minivl returns L+2 (block L's output as well)
    n = len(ref.hidden_states)
    assert len(out.hidden_states) == n + 1
    for i in range(n - 1):
        assert_parity(out.hidden_states[i], ref.hidden_states[i], "float32", TF_ULPS, what=f"{case} hidden {i}")
    assert_parity(out.hidden_states[-1], ref.hidden_states[-1], "float32", TF_ULPS, what=f"{case} final norm")


@pytest.mark.parametrize("case", list(CASES))
def test_attention_probabilities_match_transformers(pairs, case):
    """output_attentions=True: each layer's softmax probabilities [b, H, s, t] against transformers' eager
    attn_weights (the windowed Qwen2 case shows the window). Probabilities are <= 1: TF_ULPS of their max.
    Measured worst: 11.0 ulps (phi3_window), 2.5-7.5 for the others; layer 0 against layer 1 is off by ~6e6."""
    ours, theirs = pairs(case)
    ids = np.random.default_rng(10).integers(3, 300, (2, 12))
    out = ours(ids, output_attentions=True)
    ref = theirs(torch.tensor(ids), output_attentions=True)
    assert len(out.attentions) == len(ref.attentions) > 0
    for i, (a, r) in enumerate(zip(out.attentions, ref.attentions)):
        assert a.shape == tuple(r.shape) and a.shape[-2:] == (12, 12)
        assert_parity(a, r, "float32", TF_ULPS, what=f"{case} attentions[{i}] vs transformers")


@pytest.mark.parametrize("case", ["llama", "qwen2", "phi3", "mpt_alibi"])
def test_left_padded_greedy_generation_matches_transformers(pairs, case):
    ours, theirs = pairs(case)
    ids, mask, _ = left_padded_batch(np.random.default_rng(6), [9, 5], 300)
    new = generate(ours, ids, attention_mask=mask, max_new_tokens=8)
    ref = theirs.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=8, do_sample=False,
                          pad_token_id=0, eos_token_id=None)
    np.testing.assert_array_equal(new, ref[:, ids.shape[1]:].numpy())


def test_phi3_short_long_switch_across_a_cached_decode_matches_transformers(pairs):
    """Prefill 28 tokens (short factors, max position 27 < O = 32), then decode one token at a time past
    position 32: each step re-picks the factors from max(position_ids)+1, while the cached keys keep
    the short-factor rotation. transformers' longrope does the same per call; compare every step."""
    ours, theirs = pairs("phi3")
    original = ours.config.original_max_position_embeddings
    ids = np.random.default_rng(7).integers(3, 300, (1, original + 6))
    prompt = original - 4
    out = ours(ids[:, :prompt], use_cache=True)
    ref = theirs(torch.tensor(ids[:, :prompt]), use_cache=True)
    cache, ref_cache = out.past_key_values, ref.cache  # transformers >= 5.24 calls its KV cache `cache`
    for t in range(prompt, ids.shape[1]):
        out = ours(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
        ref = theirs(torch.tensor(ids[:, t:t + 1]), cache=ref_cache, use_cache=True)
        ref_cache = ref.cache
        assert_parity(out.logits, ref.logits, "float32", TF_ULPS, what=f"phi3 decode at position {t}")
    # and the switch is real: a full recompute (all keys long-rotated) differs from the cached run
    full = ours(ids).logits[:, -1]
    assert np.abs(full - out.logits[:, -1]).max() > 1e-3


@pytest.fixture(scope="module")
def internlm2_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("internlm2")
    path = write_tiny_llm(root / "internlm2", "internlm2")
    llama_path = internlm2_as_llama(path, root / "as_llama")
    return path, _hf(transformers.LlamaForCausalLM, llama_path)


def test_internlm2_matches_transformers_llama_after_wqkv_split(internlm2_pair):
    path, theirs = internlm2_pair
    ours = minivl.load_model(path)
    ids = np.random.default_rng(8).integers(3, 300, (2, 12))
    assert_parity(ours(ids).logits, theirs(torch.tensor(ids)).logits, "float32", TF_ULPS, what="internlm2 vs llama")


def test_internlm2_attention_probabilities_match_transformers_llama(internlm2_pair):
    """The wqkv split puts every query head against its own KV head: per-head probabilities show it."""
    path, theirs = internlm2_pair
    ours = minivl.load_model(path)
    ids = np.random.default_rng(8).integers(3, 300, (2, 12))
    ref = theirs(torch.tensor(ids), output_attentions=True).attentions
    attentions = ours(ids, output_attentions=True).attentions
    # one tensor per layer on both sides: an empty or short tuple would make the loop below check nothing
    assert len(attentions) == len(ref) == ours.config.num_hidden_layers > 0
    for i, a in enumerate(attentions):
        assert_parity(a, ref[i], "float32", TF_ULPS, what=f"internlm2 attentions[{i}] vs llama")


def test_internlm2_dynamic_ntk_past_max_positions_matches_transformers(internlm2_pair):
    """Beyond max_position_embeddings (48) the base grows with the sequence length. For one prefill from
    position 0, InternLM2's kv_seq_len and transformers' max(position_ids)+1 are the same L, so the two
    must agree; then each cached decode step grows L by one in both, the older keys keeping the
    rotation of the base they were written with (base computed in float64 by the reference, float32
    by transformers: ~1e-7 relative in ω, inside the tolerance at these positions)."""
    path, theirs = internlm2_pair
    ours = minivl.load_model(path)
    max_pos = ours.config.max_position_embeddings
    ids = np.random.default_rng(9).integers(3, 300, (1, max_pos + 12))
    prompt = max_pos + 4
    out = ours(ids[:, :prompt], use_cache=True)
    ref = theirs(torch.tensor(ids[:, :prompt]), use_cache=True)
    assert_parity(out.logits, ref.logits, "float32", TF_ULPS, what="internlm2 dynamic prefill")
    cache, ref_cache = out.past_key_values, ref.cache  # transformers >= 5.24 calls its KV cache `cache`
    for t in range(prompt, ids.shape[1]):
        out = ours(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
        ref = theirs(torch.tensor(ids[:, t:t + 1]), cache=ref_cache, use_cache=True)
        ref_cache = ref.cache
        assert_parity(out.logits, ref.logits, "float32", TF_ULPS, what=f"internlm2 dynamic decode at {t}")
    # the scaling did something: the base was enlarged past max_position_embeddings (a model that enlarged
    # the base but kept the old inv_freq fails the decode comparisons above: checked by mutation)
    assert ours.rotary.dynamic.base > ours.config.rope_theta



@pytest.mark.parametrize("package", ["numpy", "torch"])
def test_a_decode_loop_written_for_transformers_runs_unchanged(tmp_path, package):
    """transformers 5.24 names the KV cache `cache` (argument and output; `past_key_values` is deprecated
    there): the same loop, cache=… in and out.cache back, runs on minivl and torch_impl, its logits equal
    to the old name's bit for bit and transformers' within TF_ULPS; both names at once is a named error."""
    import torch_impl
    from minivl.errors import ShapeError

    path = write_tiny_llm(tmp_path / "llama", "llama", seed=12)
    ours = minivl.load_model(path) if package == "numpy" else torch_impl.load_model(path)
    theirs = _hf(transformers.LlamaForCausalLM, path)
    wrap, unwrap = ((lambda x: x), np.asarray) if package == "numpy" else (torch.from_numpy, lambda t: t.numpy())
    ids = np.random.default_rng(11).integers(3, 300, (1, 9))
    runs = {}
    with torch.no_grad():
        for who, model, name, to_input, to_numpy in (("ours", ours, "cache", wrap, unwrap),
                                                     ("ours", ours, "past_key_values", wrap, unwrap),
                                                     ("transformers", theirs, "cache", torch.from_numpy,
                                                      lambda t: t.numpy())):
            out = model(input_ids=to_input(ids[:, :6]), use_cache=True)
            logits = []
            for t in range(6, 9):
                out = model(input_ids=to_input(ids[:, t:t + 1]), use_cache=True, **{name: getattr(out, name)})
                logits.append(to_numpy(out.logits))
            runs[who, name] = np.concatenate(logits, axis=1)
        np.testing.assert_array_equal(runs["ours", "cache"], runs["ours", "past_key_values"])
        assert_parity(runs["ours", "cache"], runs["transformers", "cache"], "float32", TF_ULPS,
                      what=f"{package} decode through cache=")
        first = ours(input_ids=wrap(ids[:, :6]), use_cache=True)
        assert first.cache is first.past_key_values is not None
        with pytest.raises(ShapeError, match="pass the KV cache once"):
            ours(input_ids=wrap(ids[:, 6:7]), cache=first.cache, past_key_values=first.cache)
