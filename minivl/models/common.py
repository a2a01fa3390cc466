"""What every model shares: the dtype table, the leaf modules, the heads' reshapes, RoPE attention, loading.

The leaves (`Linear`, `Norm`, `Embedding`) hold parameters under the checkpoint's names;
`build_model` declares a model from its config, casts and adopts the checkpoint's tensors, then
fuses and packs them. The decoder every family runs is in `models/decoder.py`.
torch_impl/models/common.py is the same file in PyTorch.
"""
from __future__ import annotations

import numpy as np

from minivl import nn
from minivl.errors import ConfigError
from minivl.models.fused import fuse_projections
from minivl.models.packing import pack_parameters

DTYPES = ("float32", "float64")


def compute_dtype(dtype) -> np.dtype:
    """promote(dtype, float32): what the reference's ".float()" means in a float32 or float64 run."""
    return np.promote_types(np.dtype(dtype), np.float32)


def as_model_dtype(dtype) -> np.dtype:
    """NumPy models compute in float32 or float64 (float64 is the gold reference)."""
    name = str(np.dtype(dtype)) if not isinstance(dtype, str) else dtype
    if name not in DTYPES:
        raise ConfigError(f"NumPy models compute in float32 or float64: dtype='float32' or 'float64' "
                          f"(got {dtype!r}); bf16/fp16 checkpoints are upcast on load, and torch_impl runs "
                          f"bfloat16/float16")
    return np.dtype(name)


class Linear(nn.Module):
    """weight [out, in] (+ bias [out]) under the checkpoint's names; y = x·Wᵀ + b via minivl.linear."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter((out_features, in_features))
        self.bias = nn.Parameter((out_features,)) if bias else None

    def forward(self, x):
        from minivl.linear import linear

        return linear(x, self.weight, self.bias)


class Norm(nn.Module):
    """A norm's parameters (weight, optional bias) under the checkpoint's names; `kind` picks the formula.

    kind: 'rms' (HF order), 'rms_mpt' (weight multiplied in float32), 'layer'.
    """

    def __init__(self, dim: int, eps: float, kind: str = "rms", weight: bool = True, bias: bool = False):
        super().__init__()
        self.eps, self.kind = eps, kind
        self.weight = nn.Parameter((dim,)) if weight else None
        self.bias = nn.Parameter((dim,)) if bias else None

    def forward(self, x):
        from minivl.norms import layer_norm_fast, rms_norm_fast, rms_norm_mpt

        if self.kind == "rms":
            return rms_norm_fast(x, self.weight, self.eps)  # rms_norm bit for bit, in fewer buffers
        if self.kind == "rms_mpt":
            return rms_norm_mpt(x, self.weight, self.eps)
        return layer_norm_fast(x, self.weight, self.bias, self.eps)  # layer_norm bit for bit, in fewer buffers


class Embedding(nn.Module):
    """The token table [vocab, hidden] under the name `weight`; forward gathers rows."""

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter((vocab_size, hidden_size))

    def forward(self, input_ids):
        return self.weight[np.asarray(input_ids)]


def split_heads(x: np.ndarray, n_heads: int) -> np.ndarray:
    """[b, s, n·d] -> [b, n, s, d]"""
    b, s, width = x.shape
    return x.reshape(b, s, n_heads, width // n_heads).transpose(0, 2, 1, 3)


def merge_heads(x: np.ndarray) -> np.ndarray:
    """[b, n, s, d] -> [b, s, n·d]"""
    b, n, s, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, s, n * d)


def rope_attention(q, k, v, rope, attn: dict, cache, layer_idx: int):
    """The attention core the RoPE families share (InternLM2, Phi-3, Llama, Qwen2 eager paths).

    q [b, H, s, d], k/v [b, K, s, d], rope = (cos, sin) [b, s, d] -> ([b, s, H·d], probs [b, H, s, t] or None)
    attn: {mask: [b|1, 1, s, t], output_attentions: bool}, from `DecoderLM.attention_args`.
    Order as the reference: rotate q and k, append k/v to the cache (post-RoPE, pre-GQA),
    scores = (q·kᵀ)/sqrt(d) + mask, softmax in float32 cast back, times v.
    """
    from minivl.attention import scaled_dot_product_attention
    from minivl.attention_blocks import causal_attention_blocks
    from minivl.rope import apply_rope_fast

    # cos/sin are computed in float32 and cast to the activation dtype before use, as the reference
    cos, sin = rope
    cos, sin = cos.astype(q.dtype)[:, None], sin.astype(q.dtype)[:, None]
    # apply_rope bit for bit, in fewer passes
    q, k = apply_rope_fast(q, cos, sin), apply_rope_fast(k, cos, sin)
    if cache is not None:
        k, v = cache.update(layer_idx, k, v)
    if attn["output_attentions"]:
        out, probs = scaled_dot_product_attention(q, k, v, mask=attn["mask"], scale_mode="divide",
                                                  softmax_dtype="float32", return_probs=True)
        return merge_heads(out), probs
    # the same attention over blocks of queries that skip the keys the causal mask hides
    out = causal_attention_blocks(q, k, v, mask=attn["mask"], scale_mode="divide", softmax_dtype="float32")
    return merge_heads(out), None


def cast_tensor(value, dtype) -> np.ndarray:
    """A checkpoint tensor (NumPy, bf16/fp16 through ml_dtypes) as a contiguous array of the model dtype."""
    return np.ascontiguousarray(np.asarray(value).astype(dtype))


def tie_weights(tensors: dict, tied: dict) -> dict:
    """tied {target: source}: a target the checkpoint lacks becomes the SAME tensor as its source.

    A tied target the checkpoint does hold is used as stored (it is shape-checked like any other).
    """
    tensors = dict(tensors)
    for target, source in tied.items():
        if target not in tensors and source in tensors:
            tensors[target] = tensors[source]
    return tensors


def tied_head(config, embed_path: str, head_path: str) -> dict:
    """{head weight: embedding weight} when config.tie_word_embeddings (and the head is a module of its own)."""
    if getattr(config, "tie_word_embeddings", False) and head_path != embed_path:
        return {head_path + ".weight": embed_path + ".weight"}
    return {}


def build_model(cls, config, state_dict: dict, dtype, tied: dict | None = None, **kwargs):
    """Construct `cls(config, **kwargs)` with declared (empty) parameters, then adopt the checkpoint tensors.

    state_dict {key: array}: cast to `dtype`; `tied` {target: source}: see `tie_weights`. Every
    missing, unexpected and mis-shaped tensor is reported in one CheckpointError.
    """
    model = cls(config, **kwargs)
    tensors = {key: cast_tensor(value, dtype) for key, value in state_dict.items()}
    model.load_state_dict(tie_weights(tensors, tied or {}), strict=True)
    del tensors  # the model holds them now: each is freed as pack_parameters moves it
    fuse_projections(model)
    pack_parameters(model)
    return model


def declared_shapes(cls, config, skip=()) -> dict:
    """{checkpoint key: shape} of `cls(config)` built with declared parameters, the keys in `skip` left out."""
    return {key: tuple(p.shape) for key, p in cls(config).state_dict().items() if key not in skip}
