"""Attention: NumPy vs torch twin vs torch's own sdpa vs a naive float64 formula; masks, KV cache,
GQA without copies, the three scale orders, softmax precision and the fast torch backends.

Tolerance used throughout (`attention_error_scale`): a forward error bound in units of eps.
* each score is a length-d dot product: error ≲ sqrt(d)·(|q|·|k|ᵀ)·scale eps (Higham & Mary's
  probabilistic bound), plus a few ulps of |score| for the scaling and the bias/mask add;
* softmax turns a score error δ into a probability error ≲ 2·p·max δ (plus a few ulps of p);
* the output p·v is a length-t dot product: ≲ (2·max δ + sqrt(t) + 4)·(p·|v|) eps.
Two implementations each within that bound of the truth differ by at most twice it. In float64
this is typically a few tens of ulps; in float32 it grows with d and t as stated.
"""
import math
import sys
import tracemalloc
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import requires_cuda
from minivl import attention as A
from minivl.alibi import alibi_bias
from minivl.errors import ConfigError, DeviceError, ShapeError
from minivl.testing import assert_close, tolerance
from torch_impl import attention as T

DTYPES = ["float32", "float64"]
MASK_KINDS = ["none", "causal", "padding", "sliding", "decode", "chunk"]


# ----------------------------------------------------------------------------- references

def visible_pattern(batch, q_len, kv_len, attention_mask=None, sliding_window=None):
    """[b, s, t] bool, written out with loops: query i at position kv_len − q_len + i sees key j iff
    j <= pos, j > pos − w (with a window), and j is not padding."""
    visible = np.zeros((batch, q_len, kv_len), dtype=bool)
    for b in range(batch):
        for i in range(q_len):
            pos = kv_len - q_len + i
            for j in range(kv_len):
                ok = j <= pos and (sliding_window is None or j > pos - sliding_window)
                ok = ok and (attention_mask is None or attention_mask[b, j] == 1)
                visible[b, i, j] = ok
    return visible


def naive_attention(q, k, v, visible=None, bias=None, scale=None):
    """softmax(q·kᵀ·scale + bias) over visible keys, then ·v, in float64, one head at a time;
    query head h reads KV head h // (n_heads / n_kv_heads). Returns (out, probs)."""
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    batch, n_heads, q_len, d = q.shape
    group = n_heads // k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = np.zeros_like(q)
    probs = np.zeros((batch, n_heads, q_len, k.shape[2]))
    for b in range(batch):
        for h in range(n_heads):
            scores = q[b, h] @ k[b, h // group].T * scale
            if bias is not None:
                scores = scores + np.broadcast_to(bias, (batch, n_heads) + scores.shape)[b, h]
            if visible is not None:
                scores = np.where(visible[b], scores, -np.inf)
            weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
            probs[b, h] = weights / weights.sum(axis=-1, keepdims=True)
            out[b, h] = probs[b, h] @ v[b, h // group]
    return out, probs


def score_error_scale(q, k, probs, scale=None, bias=None):
    """Largest score error over each row's visible keys, in units of eps: [b, h, s, 1]."""
    q, k = (np.abs(np.asarray(a, dtype=np.float64)) for a in (q, k))
    d, group = q.shape[-1], q.shape[1] // k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    abs_scores = q @ np.swapaxes(np.repeat(k, group, axis=1), -1, -2) * scale  # test-side repeat only
    delta = math.sqrt(d) * abs_scores + 4 * abs_scores
    if bias is not None:
        delta = delta + 4 * np.abs(bias)
    return np.where(probs > 0, delta, 0).max(axis=-1, keepdims=True)


def attention_error_scale(q, k, v, probs, scale=None, bias=None):
    """Forward error bound of attention in units of eps (see the module docstring), [b, h, s, d]."""
    v = np.abs(np.asarray(v, dtype=np.float64))
    group, t = q.shape[1] // k.shape[1], k.shape[2]
    delta_row = score_error_scale(q, k, probs, scale, bias)
    return (2 * delta_row + math.sqrt(t) + 4) * (probs @ np.repeat(v, group, axis=1))


def random_case(seed, dtype):
    """Random GQA shapes (odd head counts, groups 1..8, d in 64/96/128) and one of the mask kinds."""
    rng = np.random.default_rng(seed)
    n_kv = int(rng.choice([1, 2, 3, 5]))
    group = int(rng.integers(1, 9))
    batch, d = int(rng.integers(1, 3)), int(rng.choice([64, 96, 128]))
    kind = MASK_KINDS[seed % len(MASK_KINDS)]
    q_len = {"decode": 1, "chunk": int(rng.integers(2, 5))}.get(kind, int(rng.integers(2, 12)))
    past = int(rng.integers(1, 12)) if kind in ("decode", "chunk", "sliding") else 0
    kv_len = past + q_len
    q = rng.standard_normal((batch, n_kv * group, q_len, d)).astype(dtype)
    k = rng.standard_normal((batch, n_kv, kv_len, d)).astype(dtype)
    v = rng.standard_normal((batch, n_kv, kv_len, d)).astype(dtype)
    attention_mask = window = None
    if kind in ("padding", "decode", "chunk", "sliding"):
        attention_mask = np.ones((batch, kv_len), dtype=np.int64)
        attention_mask[0, : int(rng.integers(0, kv_len - q_len + 1))] = 0  # left padding, row 0
    if kind == "sliding":
        window = int(rng.integers(1, kv_len))
    return kind, q, k, v, attention_mask, window, past


# ----------------------------------------------------------------------------- parity

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(12))
def test_random_shapes_numpy_vs_torch_vs_sdpa_vs_naive(seed, dtype):
    kind, q, k, v, attention_mask, window, past = random_case(seed, dtype)
    batch, n_heads, q_len, _ = q.shape
    kv_len, group = k.shape[2], n_heads // k.shape[1]
    if kind == "none":
        mask, is_causal, visible = None, False, None
    elif kind == "causal":
        mask, is_causal, visible = None, True, visible_pattern(batch, q_len, kv_len)
    else:
        mask = A.build_attention_mask(attention_mask, q_len, past, dtype, sliding_window=window)
        is_causal, visible = False, visible_pattern(batch, q_len, kv_len, attention_mask, window)
        # the mask we built hides exactly what the loops say is hidden
        np.testing.assert_array_equal(np.broadcast_to(mask[:, 0] == 0, visible.shape), visible)

    out, probs = A.scaled_dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, return_probs=True)
    t = torch.from_numpy
    out_torch = T.scaled_dot_product_attention(t(q), t(k), t(v), mask=None if mask is None else t(mask),
                                               is_causal=is_causal)
    # torch's own kernel, given explicitly repeated K/V and a boolean mask of the loops' pattern
    sdpa_mask = None if visible is None else t(visible[:, None])
    out_sdpa = F.scaled_dot_product_attention(t(q), t(k).repeat_interleave(group, dim=1),
                                              t(v).repeat_interleave(group, dim=1), attn_mask=sdpa_mask)
    truth, true_probs = naive_attention(q, k, v, visible)
    assert out.shape == q.shape and out.dtype == np.dtype(dtype)

    rtol, atol = tolerance(dtype, 4, atol_ulps=2, scale=attention_error_scale(q, k, v, true_probs))
    where = f"{kind} b={batch} h={n_heads} kv={k.shape[1]} s={q_len} t={kv_len} d={q.shape[-1]} {dtype}"
    assert_close(out, out_torch, rtol=rtol, atol=atol, what=f"numpy vs torch eager [{where}]")
    assert_close(out, out_sdpa, rtol=rtol, atol=atol, what=f"numpy vs F.sdpa [{where}]")
    assert_close(out, truth, rtol=rtol, atol=atol, what=f"numpy vs naive float64 [{where}]")
    # probabilities: softmax turns the score error δ into a relative error ≲ 2·max δ per side, plus
    # a few ulps for exp and the normalising division; atol 2 ulps for probabilities near 0
    p_rtol, p_atol = tolerance(dtype, 4 * score_error_scale(q, k, true_probs) + 8, atol_ulps=2)
    assert_close(probs, true_probs, rtol=p_rtol, atol=p_atol, what=f"probs vs naive [{where}]")
    if visible is not None:
        assert not probs[np.broadcast_to(~visible[:, None], probs.shape)].any(), "hidden keys must get exactly 0"


@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_is_added_and_matches_naive(dtype):
    """An additive bias (ALiBi-like, per head) with a padding mask, MPT order (multiply)."""
    rng = np.random.default_rng(1)
    q = rng.standard_normal((2, 6, 5, 64)).astype(dtype)
    k, v = (rng.standard_normal((2, 3, 8, 64)).astype(dtype) for _ in range(2))
    bias = (-np.abs(rng.standard_normal((1, 6, 1, 8)) * 3)).astype(np.float32)
    attention_mask = np.array([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8])
    mask = A.build_attention_mask(attention_mask, 5, 3, dtype)
    out = A.scaled_dot_product_attention(q, k, v, mask=mask, bias=bias, scale_mode="multiply")
    out_torch = T.scaled_dot_product_attention(*(torch.from_numpy(a) for a in (q, k, v)), mask=torch.from_numpy(mask),
                                               bias=torch.from_numpy(bias), scale_mode="multiply")
    truth, true_probs = naive_attention(q, k, v, visible_pattern(2, 5, 8, attention_mask), bias=bias)
    rtol, atol = tolerance(dtype, 4, atol_ulps=2, scale=attention_error_scale(q, k, v, true_probs, bias=bias))
    assert_close(out, truth, rtol=rtol, atol=atol, what="biased attention vs naive")
    assert_close(out, out_torch, rtol=rtol, atol=atol, what="biased attention numpy vs torch")


# ----------------------------------------------------------------------------- scale orders, softmax precision

def test_three_scale_orders_round_differently_unless_sqrt_d_is_a_power_of_two():
    """Pitfall 7. d=64: 1/sqrt(d) = 1/8 is exact, so (q·kᵀ)/8, (q/8)·kᵀ and (q·kᵀ)·⅛ are the same
    float32 numbers. d=128: they are not, and each reference's order must be mirrored for bitwise
    agreement — but all three are equally close to the truth."""
    rng = np.random.default_rng(2)
    for d, same in ((64, True), (128, False)):
        q, k, v = (rng.standard_normal((1, 4, 16, d)).astype(np.float32) for _ in range(3))
        outs = {mode: A.scaled_dot_product_attention(q, k, v, scale_mode=mode) for mode in A.SCALE_MODES}
        identical = all(np.array_equal(outs["divide"], outs[mode]) for mode in A.SCALE_MODES)
        assert identical == same, (d, {m: np.abs(o - outs["divide"]).max() for m, o in outs.items()})
        truth, true_probs = naive_attention(q, k, v)
        rtol, atol = tolerance("float32", 4, atol_ulps=2, scale=attention_error_scale(q, k, v, true_probs))
        for mode, out in outs.items():
            assert_close(out, truth, rtol=rtol, atol=atol, what=f"{mode} d={d} vs naive")
            out_torch = T.scaled_dot_product_attention(*(torch.from_numpy(a) for a in (q, k, v)), scale_mode=mode)
            assert_close(out, out_torch, rtol=rtol, atol=atol, what=f"{mode} d={d} numpy vs torch")


def test_torch_eager_reproduces_the_references_op_order_bitwise():
    """With one KV head per query head, the torch twin runs the references' own op sequences:
    InternViT (q·scale)@kᵀ with a model-dtype softmax; InternLM2 (q@kᵀ)/sqrt(d) + mask with a float32
    softmax; MPT (q@k)·scale + bias, masked_fill(min), softmax in the promoted dtype."""
    torch.manual_seed(0)
    b, h, s, d = 2, 3, 7, 96
    q, k, v = (torch.randn(b, h, s, d) for _ in range(3))
    # InternViT naive path (MIV:220-221)
    ref = ((q * d ** -0.5) @ k.transpose(-2, -1)).softmax(-1) @ v
    assert torch.equal(T.scaled_dot_product_attention(q, k, v, scale_mode="scale_q", softmax_dtype=None), ref)
    # InternLM2 eager (MIL:407-424)
    mask = T.build_attention_mask(torch.tensor([[0, 1, 1, 1, 1, 1, 1], [1] * 7]), s, 0, torch.float32)
    scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(d) + mask
    ref = torch.matmul(F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)
    assert torch.equal(T.scaled_dot_product_attention(q, k, v, mask=mask), ref)
    # MPT torch path (MPT-A:34-59), float32 ALiBi bias, causal via masked_fill
    bias = torch.from_numpy(alibi_bias(h, s))
    scores = (q @ k.transpose(2, 3)) * (1 / math.sqrt(d)) + bias
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, torch.finfo(q.dtype).min)
    ref = torch.softmax(scores, dim=-1).to(v.dtype) @ v
    ours = T.scaled_dot_product_attention(q, k, v, bias=bias, mask=T.causal_mask(s, s, torch.float32),
                                          scale_mode="multiply")
    # masked_fill(min) and "+ min" give the same probabilities (both underflow exp to 0)
    assert torch.equal(ours, ref)


def test_softmax_dtype_semantics():
    """Pitfall 8: float32 softmax (LLMs) vs model-dtype softmax (InternViT).
    * float32 model: the same thing.
    * NumPy float16 (a softmax that really runs in half precision): the float32 upcast is visibly
      more accurate.
    * torch bf16 on CPU: bitwise identical, because torch's half-precision softmax kernel already
      accumulates in float32 and rounds once; the reference's explicit upcast changes nothing there.
    """
    rng = np.random.default_rng(4)
    q, k, v = (rng.standard_normal((1, 8, 32, 64)).astype(np.float32) * 2 for _ in range(3))
    np.testing.assert_array_equal(A.scaled_dot_product_attention(q, k, v, softmax_dtype=None),
                                  A.scaled_dot_product_attention(q, k, v, softmax_dtype="float32"))

    scores16 = (rng.standard_normal((64, 256)) * 3).astype(np.float16)
    truth = A.softmax(scores16.astype(np.float64), None)
    probs_half = A.softmax(scores16, None).astype(np.float16)  # exp and the 256-term sum in float16
    probs_f32 = A.softmax(scores16, "float32").astype(np.float16)  # one rounding at the end
    err_half, err_f32 = np.abs(probs_half - truth).mean(), np.abs(probs_f32 - truth).mean()
    assert err_f32 < 0.7 * err_half, (err_f32, err_half)  # observed: about half the error

    tq, tk, tv = (torch.from_numpy(a).to(torch.bfloat16) for a in (q, k, v))
    assert torch.equal(T.scaled_dot_product_attention(tq, tk, tv, softmax_dtype=None),
                       T.scaled_dot_product_attention(tq, tk, tv, softmax_dtype="float32"))


def test_return_probs_rows_sum_to_one_and_match_torch():
    rng = np.random.default_rng(5)
    q = rng.standard_normal((2, 6, 4, 32))
    k, v = rng.standard_normal((2, 2, 9, 32)), rng.standard_normal((2, 2, 9, 32))
    mask = A.build_attention_mask(np.array([[0, 0, 0, 1, 1, 1, 1, 1, 1], [1] * 9]), 4, 5, np.float64,
                                  sliding_window=4)
    out, probs = A.scaled_dot_product_attention(q, k, v, mask=mask, return_probs=True)
    out_t, probs_t = T.scaled_dot_product_attention(*(torch.from_numpy(a) for a in (q, k, v)),
                                                    mask=torch.from_numpy(mask), return_probs=True)
    assert probs.shape == (2, 6, 4, 9)
    # tolerance: float64, t = 9 terms: a few tens of ulps
    rtol, atol = tolerance("float64", 32)
    assert_close(probs.sum(-1), np.ones((2, 6, 4)), rtol=rtol, atol=atol, what="row sums")
    assert_close(probs, probs_t, rtol=rtol, atol=atol, what="probs numpy vs torch")
    assert (probs[np.broadcast_to(mask != 0, probs.shape)] == 0).all()


# ----------------------------------------------------------------------------- GQA without copies

def test_numpy_gqa_never_materialises_repeated_kv(monkeypatch):
    """32 query heads over 1 KV head, t=1024, d=128, float64: a repeated K alone would be 32 MiB.
    No repeat/broadcast_to/tile is called and the traced peak stays far below that size."""
    for name in ("repeat", "broadcast_to", "tile"):
        def forbidden(*args, _name=name, **kwargs):
            raise AssertionError(f"np.{_name} called: GQA must be a reshape, not a copy")
        monkeypatch.setattr(np, name, forbidden)
    rng = np.random.default_rng(6)
    b, n_heads, n_kv, s, t, d = 1, 32, 1, 1, 1024, 128
    q = rng.standard_normal((b, n_heads, s, d))
    k, v = rng.standard_normal((b, n_kv, t, d)), rng.standard_normal((b, n_kv, t, d))
    repeated_bytes = b * n_heads * t * d * 8
    tracemalloc.start()
    out = A.scaled_dot_product_attention(q, k, v)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert out.shape == (b, n_heads, s, d)
    assert peak < repeated_bytes / 16, f"peak {peak / 2**20:.1f} MiB vs repeated K {repeated_bytes / 2**20:.0f} MiB"


def test_torch_gqa_never_repeats_kv(monkeypatch):
    """The torch eager path never calls repeat_interleave / repeat / expand on K or V."""
    for owner, name in ((torch, "repeat_interleave"), (torch.Tensor, "repeat_interleave"),
                        (torch.Tensor, "repeat"), (torch.Tensor, "expand"), (torch.Tensor, "expand_as"),
                        (torch, "broadcast_to")):
        def forbidden(*args, _name=name, **kwargs):
            raise AssertionError(f"{_name} called: GQA must be a reshape, not a copy")
        monkeypatch.setattr(owner, name, forbidden)
    q, k, v = torch.randn(2, 12, 3, 16), torch.randn(2, 3, 5, 16), torch.randn(2, 3, 5, 16)
    out = T.scaled_dot_product_attention(q, k, v, mask=T.causal_mask(3, 5, torch.float32))
    assert out.shape == (2, 12, 3, 16)


# ----------------------------------------------------------------------------- masks

@pytest.mark.parametrize("q_len,kv_len,window", [(1, 1, None), (5, 5, None), (3, 8, None), (1, 9, None),
                                                  (6, 6, 2), (4, 10, 3), (1, 7, 4), (5, 5, 1), (3, 3, 10)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_causal_mask_bottom_right_and_window(q_len, kv_len, window, dtype):
    mask = A.causal_mask(q_len, kv_len, dtype, sliding_window=window)
    visible = visible_pattern(1, q_len, kv_len, sliding_window=window)[0]
    assert mask.shape == (q_len, kv_len) and mask.dtype == np.dtype(dtype)
    expected = np.where(visible, 0.0, np.finfo(dtype).min).astype(dtype)
    np.testing.assert_array_equal(mask, expected)
    np.testing.assert_array_equal(T.causal_mask(q_len, kv_len, getattr(torch, dtype), sliding_window=window).numpy(),
                                  expected)
    if window is not None:
        assert (visible.sum(-1) <= window).all()  # a window of w sees at most w keys, itself included


def test_padding_and_build_mask_values():
    attention_mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    pad = A.padding_mask(attention_mask, np.float32)
    assert pad.shape == (2, 1, 1, 5)
    np.testing.assert_array_equal(pad[0, 0, 0], [np.finfo(np.float32).min] * 2 + [0.0] * 3)
    full = A.build_attention_mask(attention_mask, 3, 2, np.float32)
    assert full.shape == (2, 1, 3, 5)
    # row 0 of batch 0 (position 2): pads 0,1 masked once, keys 3,4 are in the future (masked once)
    assert full[0, 0, 0, 0] == np.finfo(np.float32).min and full[0, 0, 0, 2] == 0
    # doubly masked (pad AND future) entries overflow to −inf, as the reference's sum does
    lonely = A.build_attention_mask(np.array([[1, 1, 0]]), 3, 0, np.float32)
    assert lonely[0, 0, 0, 2] == -np.inf and lonely[0, 0, 2, 2] == np.finfo(np.float32).min
    assert A.build_attention_mask(None, 4, 3, np.float64).shape == (1, 1, 4, 7)
    for batch_mask, q_len, past in ((attention_mask, 3, 2), (attention_mask[:, :4], 1, 3)):
        ours = A.build_attention_mask(batch_mask, q_len, past, np.float32)
        theirs = T.build_attention_mask(torch.from_numpy(batch_mask), q_len, past, torch.float32)
        np.testing.assert_array_equal(ours, theirs.numpy())


@pytest.mark.parametrize("window", [None, 1, 2, 4])
@pytest.mark.parametrize("q_len,past", [(5, 0), (3, 4), (1, 6)])
def test_build_mask_vs_transformers_eager_mask(q_len, past, window):
    """Same visible set as transformers' public mask API (`transformers.masking_utils.eager_mask` with
    `causal_mask_function` / `sliding_window_causal_mask_function` and a padding mask: what
    `create_causal_mask` / `create_sliding_window_causal_mask` build for an eager model). Where a key is
    hidden twice transformers writes finfo.min once and InternLM2 adds (−inf).

    Encodes transformers >= 4.53 (masking_utils; pinned 5.24.0 in constraints.txt): a window of w shows
    w keys, itself included, as our API and InternVL's pin (transformers 4.37) do. The private
    `modeling_attn_mask_utils._prepare_4d_causal_attention_mask` this test used before (removed in 5.24)
    showed w + 1 keys for sliding_window=w (flash_attn's window_size=(w, w)), so there ours(w) matched
    theirs(w − 1)."""
    from transformers.masking_utils import causal_mask_function, eager_mask, sliding_window_causal_mask_function

    kv_len = past + q_len
    attention_mask = torch.ones(2, kv_len, dtype=torch.long)
    attention_mask[0, :2] = 0
    mask_function = causal_mask_function if window is None else sliding_window_causal_mask_function(window)
    theirs = eager_mask(2, q_len, kv_len, q_offset=past, mask_function=mask_function,
                        attention_mask=attention_mask.bool(), dtype=torch.float32)
    ours = T.build_attention_mask(attention_mask, q_len, past, torch.float32, sliding_window=window)
    ours = ours.expand_as(theirs) if ours.shape != theirs.shape else ours
    assert torch.equal(ours == 0, theirs == 0)
    assert bool((theirs[theirs != 0] == torch.finfo(torch.float32).min).all())
    hidden = theirs != 0
    assert bool(hidden.any()) and bool(((ours[hidden] == torch.finfo(torch.float32).min)
                                        | (ours[hidden] == -torch.inf)).all())


# ----------------------------------------------------------------------------- KV cache and decode

@pytest.mark.parametrize("dtype", DTYPES)
def test_incremental_decode_with_cache_equals_full_attention(dtype):
    """Prefill 5 tokens, then a chunk of 3 and 4 single tokens through KVCache with bottom-right
    aligned masks: every step's output equals the matching rows of one full causal pass."""
    rng = np.random.default_rng(8)
    b, n_heads, n_kv, d, total = 2, 6, 2, 64, 12
    q = rng.standard_normal((b, n_heads, total, d)).astype(dtype)
    k, v = (rng.standard_normal((b, n_kv, total, d)).astype(dtype) for _ in range(2))
    attention_mask = np.ones((b, total), dtype=np.int64)
    attention_mask[1, :3] = 0  # left padding
    full, probs = A.scaled_dot_product_attention(q, k, v, mask=A.build_attention_mask(attention_mask, total, 0, dtype),
                                                 return_probs=True)
    # the padded query rows of batch 1 see no real key: their outputs are garbage (a uniform average
    # over whatever finfo.min entries the row has) and differ between a full and a cached pass, so
    # only real query tokens are compared
    rtol, atol = tolerance(dtype, 4, atol_ulps=2, scale=attention_error_scale(q, k, v, probs))

    for module, wrap in ((A, np.asarray), (T, torch.from_numpy)):
        cache = module.KVCache()
        start = 0
        for step in (5, 3, 1, 1, 1, 1):
            end = start + step
            k_all, v_all = cache.update(0, wrap(k[:, :, start:end]), wrap(v[:, :, start:end]))
            assert cache.get_seq_length() == end and tuple(k_all.shape) == (b, n_kv, end, d)
            mask = module.build_attention_mask(wrap(attention_mask[:, :end]), step, start,
                                               dtype if module is A else getattr(torch, dtype))
            out = module.scaled_dot_product_attention(wrap(q[:, :, start:end]), k_all, v_all, mask=mask)
            real = np.broadcast_to(attention_mask[:, None, start:end, None] == 1, out.shape)
            assert_close(np.asarray(out)[real], full[:, :, start:end][real], rtol=rtol,
                         atol=atol[:, :, start:end][real], what=f"{module.__name__} step {start}:{end}")
            start = end
        assert cache.get_seq_length(5) == 0 and len(cache) == 1
    truth, _ = naive_attention(q[:1], k[:1], v[:1], visible_pattern(1, total, total, attention_mask[:1]))
    assert_close(full[:1], truth, rtol=rtol, atol=atol[:1], what="full pass vs naive (unpadded batch row)")


def test_kv_cache_keeps_layers_apart():
    cache = A.KVCache()
    for layer in range(3):
        cache.update(layer, np.full((1, 2, 4, 8), layer, float), np.full((1, 2, 4, 8), -layer, float))
    k_all, v_all = cache.update(1, np.ones((1, 2, 1, 8)), np.ones((1, 2, 1, 8)))
    assert k_all.shape == (1, 2, 5, 8) and cache.get_seq_length(1) == 5 and cache.get_seq_length(0) == 4
    assert (k_all[:, :, :4] == 1).all() and (v_all[:, :, :4] == -1).all() and (v_all[:, :, 4] == 1).all()


# ----------------------------------------------------------------------------- torch fast backends

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["gqa_mask_bias", "causal_square", "causal_chunk", "decode"])
def test_sdpa_backend_matches_eager(dtype, case):
    torch.manual_seed(9)
    tdtype = getattr(torch, dtype)
    q_len, kv_len = {"gqa_mask_bias": (6, 9), "causal_square": (7, 7), "causal_chunk": (3, 10), "decode": (1, 8)}[case]
    q = torch.randn(2, 12, q_len, 96, dtype=tdtype)
    k, v = torch.randn(2, 4, kv_len, 96, dtype=tdtype), torch.randn(2, 4, kv_len, 96, dtype=tdtype)
    kwargs = {"is_causal": case != "gqa_mask_bias"}
    if case == "gqa_mask_bias":
        attention_mask = torch.ones(2, kv_len, dtype=torch.long)
        attention_mask[0, :2] = 0
        kwargs = {"mask": T.build_attention_mask(attention_mask, q_len, kv_len - q_len, tdtype),
                  "bias": torch.from_numpy(alibi_bias(12, kv_len))}
    eager, probs = T.scaled_dot_product_attention(q, k, v, return_probs=True, **kwargs)
    sdpa = T.scaled_dot_product_attention(q, k, v, backend="sdpa", **kwargs)
    bias = kwargs.get("bias")
    scale = attention_error_scale(q.numpy(), k.numpy(), v.numpy(), probs.double().numpy(),
                                  bias=None if bias is None else bias.numpy())
    rtol, atol = tolerance(dtype, 4, atol_ulps=2, scale=scale)
    assert_close(sdpa, eager, rtol=rtol, atol=atol, what=f"sdpa vs eager {case} {dtype}")


def test_flash_backend_refuses_cpu_tensors():
    q = torch.randn(1, 2, 3, 64, dtype=torch.bfloat16)
    with pytest.raises(DeviceError, match="backend='flash' needs CUDA"):
        T.scaled_dot_product_attention(q, q, q, backend="flash")


@requires_cuda
@pytest.mark.parametrize("q_len,kv_len", [(16, 16), (1, 16), (4, 16)])
def test_flash_backend_on_cuda_matches_eager(q_len, kv_len):
    torch.manual_seed(10)
    q = torch.randn(2, 8, q_len, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 2, kv_len, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    flash = T.scaled_dot_product_attention(q, k, v, is_causal=True, backend="flash")
    eager, probs = T.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, return_probs=True)
    # tolerance: bf16 inputs are shared; the kernels differ by bf16 rounding of p and of the output
    rtol, atol = tolerance("bfloat16", 2, atol_ulps=2, scale=float(eager.abs().max()))
    assert_close(flash, eager, rtol=rtol, atol=atol, what="flash vs eager")
    with pytest.raises(ShapeError, match="float16 or bfloat16"):
        T.scaled_dot_product_attention(q.float(), k.float(), v.float(), backend="flash")
    with pytest.raises(ConfigError, match="no additive mask"):
        T.scaled_dot_product_attention(q, k, v, mask=torch.zeros(1, 1, q_len, kv_len, device="cuda",
                                                                 dtype=torch.bfloat16), backend="flash")


def test_triton_backend_dispatches_by_name(monkeypatch):
    calls = {}

    def fake_triton_attention(q, k, v, *, mask=None, bias=None, scale=None, causal=False):
        calls.update(mask=mask, bias=bias, scale=scale, causal=causal)
        return torch.zeros_like(q)

    fake = types.ModuleType("torch_impl.triton_attention")
    fake.triton_attention = fake_triton_attention
    monkeypatch.setitem(sys.modules, "torch_impl.triton_attention", fake)
    q, k = torch.randn(1, 4, 3, 16), torch.randn(1, 2, 5, 16)
    bias = torch.zeros(1, 4, 1, 5)
    out = T.scaled_dot_product_attention(q, k, k, bias=bias, scale=0.3, is_causal=True, backend="triton")
    assert out.shape == q.shape and calls["scale"] == 0.3 and calls["bias"] is bias
    assert calls["mask"] is None and calls["causal"] is True

    monkeypatch.setitem(sys.modules, "torch_impl.triton_attention", None)  # "not installed"
    with pytest.raises(ConfigError, match="backend='triton' needs torch_impl/triton_attention.py"):
        T.scaled_dot_product_attention(q, k, k, backend="triton")


def _triton_vs_eager(device):
    """The real Triton kernel through backend='triton' vs eager: padding mask, ALiBi bias, is_causal."""
    torch.manual_seed(11)
    q = torch.randn(1, 4, 5, 32, device=device)
    k, v = torch.randn(1, 2, 9, 32, device=device), torch.randn(1, 2, 9, 32, device=device)
    attention_mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1]], device=device)
    mask = T.padding_mask(attention_mask, torch.float32)
    bias = torch.from_numpy(alibi_bias(4, 9)).to(device)
    eager, probs = T.scaled_dot_product_attention(q, k, v, mask=mask, bias=bias, is_causal=True, return_probs=True)
    fast = T.scaled_dot_product_attention(q, k, v, mask=mask, bias=bias, is_causal=True, backend="triton")
    scale = attention_error_scale(q.cpu().numpy(), k.cpu().numpy(), v.cpu().numpy(), probs.cpu().double().numpy(),
                                  bias=bias.cpu().numpy())
    rtol, atol = tolerance("float32", 4, atol_ulps=2, scale=scale)
    assert_close(fast.cpu(), eager.cpu(), rtol=rtol, atol=atol, what="triton vs eager")


def test_triton_backend_matches_eager():
    """On a GPU directly; on CPU in Triton's interpreter, which must be switched on before triton is
    first imported, hence a fresh interpreter process."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        _triton_vs_eager("cuda")
        return
    import os
    import subprocess

    tests_dir = os.path.dirname(os.path.abspath(__file__))
    code = f"import sys; sys.path[:0] = [{tests_dir!r}, {os.path.dirname(tests_dir)!r}]; " \
           "import test_attention; test_attention._triton_vs_eager('cpu')"
    result = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TRITON_INTERPRET": "1"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_fast_backends_do_not_return_probs():
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(ConfigError, match="return_probs needs backend='eager'"):
        T.scaled_dot_product_attention(q, q, q, backend="sdpa", return_probs=True)
    with pytest.raises(ConfigError, match="backend must be one of"):
        T.scaled_dot_product_attention(q, q, q, backend="xformers")
