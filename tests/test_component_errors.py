"""Every wrong component input raises a named minivl error whose message names the problem and the fix,
in NumPy and in the torch twin alike."""
import numpy as np
import pytest
import torch

from minivl import alibi, attention, linear, mlp, norms
from minivl.errors import ConfigError, MinivlError, ShapeError
from torch_impl import alibi as t_alibi
from torch_impl import attention as t_attention
from torch_impl import linear as t_linear
from torch_impl import mlp as t_mlp
from torch_impl import norms as t_norms


def z(*shape, dtype="float32"):
    return np.zeros(shape, dtype=dtype)


# (case id, error class, message fragment, callable taking a "framework" namespace and an array maker)
CASES = [
    ("linear_weight_rank", ShapeError, "weight must be 2-D [out, in]",
     lambda m, a: m["linear"](a(2, 4), a(4))),
    ("linear_in_features", ShapeError, "expects in=5; if the weight is [in, out] transpose it",
     lambda m, a: m["linear"](a(2, 4), a(3, 5))),
    ("linear_bias_shape", ShapeError, "bias must have shape (3,)",
     lambda m, a: m["linear"](a(2, 4), a(3, 4), a(4))),
    ("linear_dtype", ShapeError, "cast the weights to the model dtype",
     lambda m, a: m["linear"](a(2, 4), a(3, 4, dtype="float64"))),
    ("rms_norm_weight_shape", ShapeError, "weight must have shape (8,) to match x",
     lambda m, a: m["rms_norm"](a(2, 8), a(4), 1e-6)),
    ("rms_norm_mpt_weight_shape", ShapeError, "weight must have shape (8,)",
     lambda m, a: m["rms_norm_mpt"](a(2, 8), a(8, 1), 1e-6)),
    ("layer_norm_bias_shape", ShapeError, "bias must have shape (8,)",
     lambda m, a: m["layer_norm"](a(2, 8), a(8), a(7), 1e-5)),
    ("norm_negative_eps", ConfigError, "eps must be a number >= 0",
     lambda m, a: m["rms_norm"](a(2, 8), a(8), -1e-6)),
    ("swiglu_gate_up_mismatch", ShapeError, "must both be [intermediate, hidden]",
     lambda m, a: m["swiglu_mlp"](a(2, 4), a(6, 4), a(5, 4), a(4, 6))),
    ("swiglu_down_shape", ShapeError, "down_weight must be [hidden, 6]",
     lambda m, a: m["swiglu_mlp"](a(2, 4), a(6, 4), a(6, 4), a(6, 4))),
    ("fused_swiglu_odd_rows", ShapeError, "with an even number of rows",
     lambda m, a: m["fused_swiglu_mlp"](a(2, 4), a(7, 4), a(4, 3))),
    ("gelu_mlp_fc2_shape", ShapeError, "fc2_weight must be [hidden, 6]",
     lambda m, a: m["gelu_mlp"](a(2, 4), a(6, 4), a(6), a(4, 5), a(4))),
    ("gelu_mlp_bad_approximate", ConfigError, "approximate must be False/'none'",
     lambda m, a: m["gelu_mlp"](a(2, 4), a(6, 4), a(6), a(4, 6), a(4), approximate="fast")),
    ("alibi_zero_heads", ConfigError, "n_heads must be an int >= 1",
     lambda m, a: m["alibi_slopes"](0)),
    ("alibi_negative_bias_max", ConfigError, "alibi_bias_max must be a number > 0",
     lambda m, a: m["alibi_bias"](4, 8, alibi_bias_max=-8)),
    ("alibi_zero_seq_len", ConfigError, "seq_len (max_seq_len) must be an int >= 1",
     lambda m, a: m["alibi_bias"](4, 0)),
    ("attention_q_rank", ShapeError, "q must be 4-D [b, n_heads, s, d], got shape (2, 5, 64)",
     lambda m, a: m["sdpa"](a(2, 5, 64), a(2, 1, 5, 64), a(2, 1, 5, 64))),
    ("attention_heads_do_not_divide", ShapeError, "n_heads=6 (q (1, 6, 3, 8)) is not a multiple of n_kv_heads=4",
     lambda m, a: m["sdpa"](a(1, 6, 3, 8), a(1, 4, 3, 8), a(1, 4, 3, 8))),
    ("attention_head_dim", ShapeError, "head_dim differs: q (1, 4, 3, 8) has d=8, k/v (1, 2, 3, 16) have d=16",
     lambda m, a: m["sdpa"](a(1, 4, 3, 8), a(1, 2, 3, 16), a(1, 2, 3, 16))),
    ("attention_dtypes", ShapeError, "q, k, v must share one dtype",
     lambda m, a: m["sdpa"](a(1, 2, 3, 8), a(1, 2, 3, 8, dtype="float64"), a(1, 2, 3, 8))),
    ("attention_k_v_shapes", ShapeError, "must have the same shape [b, n_kv_heads, t, d]",
     lambda m, a: m["sdpa"](a(1, 2, 3, 8), a(1, 2, 3, 8), a(1, 2, 4, 8))),
    ("attention_batch", ShapeError, "q has batch 2 but k/v have batch 1",
     lambda m, a: m["sdpa"](a(2, 2, 3, 8), a(1, 2, 3, 8), a(1, 2, 3, 8))),
    ("attention_mask_shape", ShapeError, "mask of shape (1, 1, 3, 4) does not broadcast to the scores",
     lambda m, a: m["sdpa"](a(1, 2, 3, 8), a(1, 2, 5, 8), a(1, 2, 5, 8), mask=a(1, 1, 3, 4))),
    ("attention_scale_mode", ConfigError, "scale_mode must be one of",
     lambda m, a: m["sdpa"](a(1, 2, 3, 8), a(1, 2, 3, 8), a(1, 2, 3, 8), scale_mode="sqrt")),
    ("attention_softmax_dtype", ConfigError, "softmax_dtype must be 'float32'",
     lambda m, a: m["sdpa"](a(1, 2, 3, 8), a(1, 2, 3, 8), a(1, 2, 3, 8), softmax_dtype="float16")),
    ("sliding_window_zero", ConfigError, "sliding_window must be None or an int >= 1",
     lambda m, a: m["causal_mask"](4, 4, "float32", sliding_window=0)),
    ("causal_kv_shorter_than_q", ShapeError, "kv_len=3 < q_len=4",
     lambda m, a: m["causal_mask"](4, 3, "float32")),
    ("padding_mask_rank", ShapeError, "attention_mask must be 2-D [batch, kv_len]",
     lambda m, a: m["padding_mask"](a(2, 1, 5), "float32")),
    ("padding_mask_values", ShapeError, "must hold only 0 (pad) and 1 (token)",
     lambda m, a: m["padding_mask"](a(2, 5) - 3, "float32")),
    ("build_mask_length", ShapeError, "attention_mask must be [batch, past_len + q_len] = [b, 7]",
     lambda m, a: m["build_attention_mask"](a(2, 5) + 1, 3, 4, "float32")),
    ("cache_layer_order", ShapeError, "layer_idx 2 out of order",
     lambda m, a: m["KVCache"]().update(2, a(1, 2, 3, 8), a(1, 2, 3, 8))),
    ("cache_mismatch", ShapeError, "cannot append (1, 3, 1, 8)",
     lambda m, a: _cache_then(m["KVCache"](), a(1, 2, 3, 8), a(1, 3, 1, 8))),
]


def _cache_then(cache, first, second):
    cache.update(0, first, first)
    cache.update(0, second, second)


NUMPY = {"linear": linear.linear, "rms_norm": norms.rms_norm, "rms_norm_mpt": norms.rms_norm_mpt,
         "layer_norm": norms.layer_norm, "swiglu_mlp": mlp.swiglu_mlp, "fused_swiglu_mlp": mlp.fused_swiglu_mlp,
         "gelu_mlp": mlp.gelu_mlp, "alibi_slopes": alibi.alibi_slopes, "alibi_bias": alibi.alibi_bias,
         "sdpa": attention.scaled_dot_product_attention, "causal_mask": attention.causal_mask,
         "padding_mask": attention.padding_mask, "build_attention_mask": attention.build_attention_mask,
         "KVCache": attention.KVCache}
TORCH = {"linear": t_linear.linear, "rms_norm": t_norms.rms_norm, "rms_norm_mpt": t_norms.rms_norm_mpt,
         "layer_norm": t_norms.layer_norm, "swiglu_mlp": t_mlp.swiglu_mlp, "fused_swiglu_mlp": t_mlp.fused_swiglu_mlp,
         "gelu_mlp": t_mlp.gelu_mlp, "alibi_slopes": t_alibi.alibi_slopes, "alibi_bias": t_alibi.alibi_bias,
         "sdpa": t_attention.scaled_dot_product_attention, "causal_mask": t_attention.causal_mask,
         "padding_mask": t_attention.padding_mask, "build_attention_mask": t_attention.build_attention_mask,
         "KVCache": t_attention.KVCache}


def torch_zeros(*shape, dtype="float32"):
    return torch.zeros(shape, dtype=getattr(torch, dtype))


@pytest.mark.parametrize("framework", ["numpy", "torch"])
@pytest.mark.parametrize("case_id,error,fragment,call", CASES, ids=[c[0] for c in CASES])
def test_wrong_component_input_raises_named_error(framework, case_id, error, fragment, call):
    namespace, make = (NUMPY, z) if framework == "numpy" else (TORCH, torch_zeros)
    with pytest.raises(error) as excinfo:
        call(namespace, make)
    message = str(excinfo.value)
    assert fragment in message, message
    assert isinstance(excinfo.value, MinivlError) and isinstance(excinfo.value, ValueError)


def test_at_least_ten_distinct_cases():
    assert len({c[0] for c in CASES}) >= 10
