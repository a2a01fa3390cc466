"""A cached decode step through Llama's, Qwen2's, Phi-3's and InternLM2's layers in as few NumPy calls as its math allows.

The fast path of one token. A decode step moves every weight through a GEMV once; between the
GEMVs, the reference layers spend their time in Python on rows of 64 to 3072 numbers (cProfile:
~7600 function calls per SmolLM2 token): module calls, argument checks, dtype promotions that
change nothing, np.mean's wrapper, a mask of zeros added to the scores, `rotate_half`'s copy. On
SmolLM2 that made a step 1.40× its own GEMVs (benchmarks/smollm2.py). `decode_layers` runs the
same operations, on the same arrays, in the same order, and leaves out only what cannot change a
bit:

* the checks (`DecoderLM.forward` has made them for the whole model before the layers run);
* the additive mask, when it is all zeros (one token, no padding, inside any window): x + 0 = x;
* RoPE's `rotate_half` copy: x·cos + rotate_half(x)·sin is x·cos with x₂·sin subtracted from
  its first half and x₁·sin added to its second, the same IEEE operations (a + (−b) is a − b);
* np.mean, np.max and np.sum's Python wrappers, around the reductions they call.

It is therefore the layers' forward bit for bit (tests/test_fast_decoder.py holds logits and cache
equal over a run of steps for Llama, Qwen2, Phi-3 and InternLM2, tests/test_smollm2.py on SmolLM2's
weights). InternLM2 (InternVL2-2B/8B/26B's LLM) differs only in names and in wqkv's rows, grouped
per KV head, which `split_wqkv` undoes as its layer does. Anything else (a batch with padding, a
window that hides keys, probabilities or hidden states asked for, MPT's LayerNorms and ALiBi) runs
the layers themselves. torch_impl has
no twin: each torch op is one C++ call already. benchmarks/ablation.py measures what it buys.
"""
from __future__ import annotations

import math

import numpy as np

from minivl.models.common import merge_heads, split_heads
from minivl.models.internlm2 import split_wqkv


def decode_applies(layers, hidden: np.ndarray, rope, cache, attn: dict, output_hidden_states: bool,
                   output_attentions: bool) -> bool:
    """True when `decode_layers` may stand in for `layer(hidden, rope, attn, cache)` over these layers."""
    if cache is None or rope is None or output_hidden_states or output_attentions or hidden.shape[1] != 1:
        return False
    if hidden.dtype not in (np.float32, np.float64):
        return False
    if not all(_flat_layer(layer, rope[0].shape[-1]) for layer in layers):
        return False
    # padding, or a window narrower than the cache: the mask hides keys, which the step never adds
    return not any(np.any(args["mask"]) for args in attn.values())


def _flat_layer(layer, rotary_dim: int) -> bool:
    """A block as `decode_layers` computes it: Llama/Qwen2/Phi-3 or InternLM2, one q/k/v GEMV, one
    gate/up GEMV, RMS norms, full rotary."""
    from minivl.models.internlm2 import InternLM2Attention, InternLM2DecoderLayer, InternLM2MLP
    from minivl.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaMLP
    from minivl.models.phi3 import Phi3Attention, Phi3MLP

    if type(layer) is InternLM2DecoderLayer:
        attention, mlp = layer.attention, layer.feed_forward
        if type(attention) is not InternLM2Attention or type(mlp) is not InternLM2MLP or not _fused(mlp.w1, mlp.w3):
            return False
        full_rotary = rotary_dim == attention.head_dim
    elif type(layer) is LlamaDecoderLayer:
        modules = layer.__dict__["_modules"]
        attention, mlp = modules.get("self_attn"), modules.get("mlp")
        if type(attention) is LlamaAttention:
            if not _fused(attention.q_proj, attention.k_proj, attention.v_proj):
                return False
        elif type(attention) is not Phi3Attention:
            return False
        if type(mlp) is LlamaMLP:
            if not _fused(mlp.gate_proj, mlp.up_proj):
                return False
        elif type(mlp) is not Phi3MLP:
            return False
        full_rotary = rotary_dim * attention.n_heads == _qkv(attention)[2][0][1]  # the q columns' width
    else:
        return False
    input_norm, post_norm = _norms(layer)
    return full_rotary and input_norm.kind == post_norm.kind == "rms"


def _is_internlm2(layer) -> bool:
    return "attention" in layer.__dict__["_modules"]


def _norms(layer) -> tuple:
    """(the norm before the attention, the norm before the MLP) under either family's names."""
    if _is_internlm2(layer):
        return layer.attention_norm, layer.ffn_norm
    return layer.input_layernorm, layer.post_attention_layernorm


def _qkv(attention) -> tuple:
    """(weight, bias, ((q start, stop), (k …), (v …))) of the one GEMV that makes q, k and v: Llama's
    q/k/v fused at load, Phi-3's qkv_proj as its checkpoint stores it ([Q | K | V] rows)."""
    fused = getattr(attention.__dict__["_modules"].get("q_proj"), "fused", None)
    if fused is not None:
        return fused.weight, fused.bias, fused.bounds
    q_width, kv_width = attention.n_heads * attention.head_dim, attention.n_kv_heads * attention.head_dim
    projection = attention.qkv_proj
    return projection.weight, projection.bias, ((0, q_width), (q_width, q_width + kv_width),
                                                (q_width + kv_width, q_width + 2 * kv_width))


def _gate_up(mlp) -> tuple:
    """(weight, bias, ((gate start, stop), (up …))) of the one gate/up GEMV: Llama's gate/up and
    InternLM2's w1/w3 fused at load, Phi-3's gate_up_proj."""
    modules = mlp.__dict__["_modules"]
    fused = getattr(modules.get("gate_proj", modules.get("w1")), "fused", None)
    if fused is not None:
        return fused.weight, fused.bias, fused.bounds
    inter = mlp.gate_up_proj.weight.shape[0] // 2
    return mlp.gate_up_proj.weight, mlp.gate_up_proj.bias, ((0, inter), (inter, 2 * inter))


def decode_layers(layers, hidden: np.ndarray, rope, cache) -> np.ndarray:
    """[b, 1, hidden] -> [b, 1, hidden]: every layer's forward for one cached token (see the module docstring)."""
    # the reference casts the RoPE tables per layer; the cast is the same for all of them
    cos, sin = (table.astype(hidden.dtype)[:, None] for table in rope)
    x = hidden
    for layer in layers:
        x = _decode_layer(layer, x, cos, sin, cache)
    return x


def _decode_layer(layer, x, cos, sin, cache):
    """One LlamaDecoderLayer.forward (or InternLM2DecoderLayer.forward) for one cached token. [b, 1, hidden] -> same"""
    internlm2 = _is_internlm2(layer)
    attention, mlp = (layer.attention, layer.feed_forward) if internlm2 else (layer.self_attn, layer.mlp)
    input_norm, post_norm = _norms(layer)
    # h = x + o_proj(attention(input_layernorm(x))), q/k/v out of one GEMV
    if internlm2:  # wqkv's rows grouped per KV head: its own split
        q, k, v = split_wqkv(_linear(_rms_norm(x, input_norm), attention.wqkv.weight, attention.wqkv.bias),
                             attention.n_kv_heads, attention.group, attention.head_dim)
        out_proj, down_proj = attention.wo, mlp.w2
    else:  # [Q | K | V] columns
        qkv_weight, qkv_bias, ((q_start, q_stop), (k_start, k_stop), (v_start, v_stop)) = _qkv(attention)
        qkv = _linear(_rms_norm(x, input_norm), qkv_weight, qkv_bias)
        q = split_heads(qkv[..., q_start:q_stop], attention.n_heads)
        k = split_heads(qkv[..., k_start:k_stop], attention.n_kv_heads)
        v = split_heads(qkv[..., v_start:v_stop], attention.n_kv_heads)
        out_proj, down_proj = attention.o_proj, mlp.down_proj
    # rotate q and k, append k/v to the cache (post-RoPE), attend over every cached key
    k, v = cache.update(attention.layer_idx, _rope(k, cos, sin), v)
    out = merge_heads(_attend(_rope(q, cos, sin), k, v))
    h = x + _linear(out, out_proj.weight, out_proj.bias)
    # x = h + down(silu(gate(h')) · up(h')), h' = post_attention_layernorm(h), gate/up one GEMV
    gate_up_weight, gate_up_bias, ((gate_start, gate_stop), (up_start, up_stop)) = _gate_up(mlp)
    gate_up = _linear(_rms_norm(h, post_norm), gate_up_weight, gate_up_bias)
    gated = _silu_mul(gate_up[..., gate_start:gate_stop], gate_up[..., up_start:up_stop])
    return h + _linear(gated, down_proj.weight, down_proj.bias)


def _fused(*linears) -> bool:
    fused = getattr(linears[0], "fused", None)
    return fused is not None and fused.serves(linears)


def _rms_norm(x, norm):
    """minivl.norms.rms_norm's operations for x already in its compute dtype (float32/float64).

    np.mean is np.add.reduce then a division by the count (in float64, which rounds to the same
    float32: a quotient rounded to 53 bits and then to 24 is rounded once); written out, it skips
    np.mean's Python wrapper, ~10 µs of a 576-wide row's ~20.
    """
    variance = np.add.reduce(x * x, axis=-1, keepdims=True) / x.shape[-1]
    return norm.weight * (x * (1.0 / np.sqrt(variance + norm.eps)))


def _linear(x, weight, bias):
    """minivl.linear.linear's operations: x·Wᵀ, then + b in place."""
    y = x @ weight.T
    if bias is not None:
        y += bias
    return y


def _silu_mul(gate, up):
    """minivl.activations.silu_mul's operations (e^(−x), 1 + e^(−x), x / (1 + e^(−x)), · up), in one buffer."""
    out = np.negative(gate)
    with np.errstate(over="ignore"):  # e^(−x) = inf for x < −88: x / inf = −0, the right limit
        np.exp(out, out=out)
    out += 1.0
    np.divide(gate, out, out=out)
    out *= up
    return out


def _rope(x, cos, sin):
    """x·cos + rotate_half(x)·sin, without rotate_half's copy (see the module docstring). [b, n, 1, d]"""
    half = x.shape[-1] // 2
    out = x * cos
    out[..., :half] -= x[..., half:] * sin[..., :half]
    out[..., half:] += x[..., :half] * sin[..., half:]
    return out


def _attend(q, k, v):
    """scaled_dot_product_attention's operations (scale_mode "divide", float32 softmax) without a mask.

    q [b, H, 1, d], k/v [b, K, t, d] -> [b, H, 1, d]
    """
    batch, n_heads, q_len, head_dim = q.shape
    n_kv_heads = k.shape[1]
    scores = q.reshape(batch, n_kv_heads, n_heads // n_kv_heads * q_len, head_dim) @ np.swapaxes(k, -1, -2)
    scores /= math.sqrt(head_dim)
    # np.max and np.sum are these reductions behind a Python wrapper each
    scores -= np.maximum.reduce(scores, axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= np.add.reduce(scores, axis=-1, keepdims=True)
    return (scores @ v).reshape(batch, n_heads, q_len, head_dim)
