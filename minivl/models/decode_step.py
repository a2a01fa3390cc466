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
* np.mean, np.max and np.sum's Python wrappers, around the reductions they call;
* the module attribute walks: `decode_plan` gathers each block's arrays into a `StepLayer` once
  per step (and that walk is the check that the fast path applies), so the step reads tuples;
* one RoPE pass for q and k, where they sit side by side in the q|k|v output: the rotation is
  elementwise, the same operations on the same numbers.

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
from typing import NamedTuple

import numpy as np

from minivl.models.common import merge_heads, split_heads
from minivl.models.internlm2 import InternLM2Attention, InternLM2DecoderLayer, InternLM2MLP, split_wqkv
from minivl.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaMLP
from minivl.models.phi3 import Phi3Attention, Phi3MLP


class StepLayer(NamedTuple):
    """One block's arrays and sizes, as a cached decode step reads them (gathered by `decode_plan`).

    Each (weight, bias) pair is a Linear's (bias None when it has none); each (weight, eps) a norm's.
    """
    layer_idx: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    input_norm: tuple
    qkv: tuple
    qkv_bounds: tuple | None  # ((q start, stop), (k …), (v …)), consecutive [Q | K | V] columns; None: InternLM2's wqkv
    out_proj: tuple
    post_norm: tuple
    gate_up: tuple
    gate_up_bounds: tuple     # ((gate start, stop), (up …))
    down_proj: tuple


def decode_plan(layers, hidden: np.ndarray, rope, cache, attn: dict, output_hidden_states: bool,
                output_attentions: bool) -> list[StepLayer] | None:
    """The blocks' arrays for `decode_layers`, when it may stand in for `layer(hidden, rope, attn, cache)`
    over these layers; None when the layers must run themselves.

    Gathered once per step, so the step itself reads no module attribute.
    """
    if cache is None or rope is None or output_hidden_states or output_attentions or hidden.shape[1] != 1:
        return None
    if hidden.dtype not in (np.float32, np.float64):
        return None
    # padding, or a window narrower than the cache: the mask hides keys, which the step never adds
    if any(np.any(args["mask"]) for args in attn.values()):
        return None
    plan = [_step_layer(layer, rope[0].shape[-1]) for layer in layers]
    return None if None in plan else plan


def _step_layer(layer, rotary_dim: int) -> StepLayer | None:
    """A block as `decode_layers` computes it (Llama/Qwen2/Phi-3 or InternLM2: one q/k/v GEMV, one
    gate/up GEMV, RMS norms, full rotary), or None."""
    modules = _modules(layer)
    if type(layer) is InternLM2DecoderLayer:
        attention, mlp = modules["attention"], modules["feed_forward"]
        input_norm, post_norm = modules["attention_norm"], modules["ffn_norm"]
        if type(attention) is not InternLM2Attention or type(mlp) is not InternLM2MLP:
            return None
        linears = _modules(attention)
        qkv, qkv_bounds, out_proj = _affine(linears["wqkv"]), None, linears["wo"]
        n_heads, head_dim = attention.n_kv_heads * attention.group, attention.head_dim
        gate_up = _fused(*(_modules(mlp)[name] for name in ("w1", "w3")))
        down_proj = _modules(mlp)["w2"]
    elif type(layer) is LlamaDecoderLayer:
        attention, mlp = modules.get("self_attn"), modules.get("mlp")
        input_norm, post_norm = modules["input_layernorm"], modules["post_attention_layernorm"]
        if type(attention) not in (LlamaAttention, Phi3Attention) or type(mlp) not in (LlamaMLP, Phi3MLP):
            return None
        linears, mlp_linears = _modules(attention), _modules(mlp)
        if type(attention) is LlamaAttention:  # q/k/v fused at load
            fused = _fused(*(linears[name] for name in ("q_proj", "k_proj", "v_proj")))
            if fused is None:
                return None
            (qkv, qkv_bounds) = fused
        else:  # Phi-3's qkv_proj as the checkpoint stores it: [Q | K | V] rows
            q_width, kv_width = attention.n_heads * attention.head_dim, attention.n_kv_heads * attention.head_dim
            qkv = _affine(linears["qkv_proj"])
            qkv_bounds = ((0, q_width), (q_width, q_width + kv_width), (q_width + kv_width, q_width + 2 * kv_width))
        out_proj, n_heads = linears["o_proj"], attention.n_heads
        head_dim = (qkv_bounds[0][1] - qkv_bounds[0][0]) // n_heads  # the q columns' width per head
        if type(mlp) is LlamaMLP:  # gate/up fused at load
            gate_up = _fused(mlp_linears["gate_proj"], mlp_linears["up_proj"])
        else:  # Phi-3's gate_up_proj: [gate | up] rows
            inter = _parameters(mlp_linears["gate_up_proj"])["weight"].shape[0] // 2
            gate_up = (_affine(mlp_linears["gate_up_proj"]), ((0, inter), (inter, 2 * inter)))
        down_proj = mlp_linears["down_proj"]
    else:
        return None
    if gate_up is None or rotary_dim != head_dim or not input_norm.kind == post_norm.kind == "rms":
        return None
    return StepLayer(attention.layer_idx, n_heads, attention.n_kv_heads, head_dim,
                     _norm(input_norm), qkv, qkv_bounds, _affine(out_proj), _norm(post_norm),
                     gate_up[0], gate_up[1], _affine(down_proj))


def _modules(module) -> dict:
    return module.__dict__["_modules"]


def _parameters(module) -> dict:
    return module.__dict__["_parameters"]


def _affine(linear) -> tuple:
    """(weight, bias) of a Linear."""
    parameters = _parameters(linear)
    return parameters["weight"], parameters.get("bias")


def _norm(norm) -> tuple:
    """(weight, eps) of an RMS norm."""
    return _parameters(norm)["weight"], norm.eps


def _fused(*linears) -> tuple | None:
    """((weight, bias), bounds) of the one matrix these Linears are views of (fused at load), or None."""
    fused = linears[0].__dict__.get("fused")
    if fused is None or not fused.serves(linears):
        return None
    return (fused.weight, fused.bias), tuple(fused.bounds)


def decode_layers(plan: list[StepLayer], hidden: np.ndarray, rope, cache) -> np.ndarray:
    """[b, 1, hidden] -> [b, 1, hidden]: every layer's forward for one cached token (see the module docstring)."""
    # the reference casts the RoPE tables per layer; the cast is the same for all of them
    cos, sin = (table.astype(hidden.dtype)[:, None] for table in rope)
    x = hidden
    for layer in plan:
        x = _decode_layer(layer, x, cos, sin, cache)
    return x


def _decode_layer(layer: StepLayer, x, cos, sin, cache):
    """One LlamaDecoderLayer.forward (or InternLM2DecoderLayer.forward) for one cached token. [b, 1, hidden] -> same"""
    # h = x + o_proj(attention(input_layernorm(x))), q/k/v out of one GEMV
    qkv = _linear(_rms_norm(x, *layer.input_norm), *layer.qkv)
    if layer.qkv_bounds is None:  # InternLM2: wqkv's rows grouped per KV head, its own split
        q, k, v = split_wqkv(qkv, layer.n_kv_heads, layer.n_heads // layer.n_kv_heads, layer.head_dim)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    else:  # [Q | K | V] columns, q and k side by side: rotated together (elementwise, the same bits)
        (q_start, _), (_, k_stop), (v_start, v_stop) = layer.qkv_bounds
        qk = _rope(split_heads(qkv[..., q_start:k_stop], layer.n_heads + layer.n_kv_heads), cos, sin)
        q, k = qk[:, :layer.n_heads], qk[:, layer.n_heads:]
        v = split_heads(qkv[..., v_start:v_stop], layer.n_kv_heads)
    # append the rotated k and v to the cache, attend over every cached key
    k, v = cache.update(layer.layer_idx, k, v)
    h = x + _linear(merge_heads(_attend(q, k, v)), *layer.out_proj)
    # x = h + down(silu(gate(h')) · up(h')), h' = post_attention_layernorm(h), gate/up one GEMV
    gate_up = _linear(_rms_norm(h, *layer.post_norm), *layer.gate_up)
    (gate_start, gate_stop), (up_start, up_stop) = layer.gate_up_bounds
    gated = _silu_mul(gate_up[..., gate_start:gate_stop], gate_up[..., up_start:up_stop])
    return h + _linear(gated, *layer.down_proj)


def _rms_norm(x, weight, eps):
    """minivl.norms.rms_norm's operations for x already in its compute dtype (float32/float64).

    np.mean is np.add.reduce then a division by the count (in float64, which rounds to the same
    float32: a quotient rounded to 53 bits and then to 24 is rounded once); written out, it skips
    np.mean's Python wrapper, ~10 µs of a 576-wide row's ~20.
    """
    variance = np.add.reduce(x * x, axis=-1, keepdims=True) / x.shape[-1]
    return weight * (x * (1.0 / np.sqrt(variance + eps)))


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
