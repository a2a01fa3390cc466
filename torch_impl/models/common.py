"""What every model shares, in PyTorch: the mirror of minivl/models/common.py.

Modules here hold parameters under the checkpoint's own names (so `load_state_dict` is a plain
name match) and call the torch_impl components in the same order as the NumPy code. Models are
built on the meta device and filled with the checkpoint tensors (`assign=True`): no random init.
`build_model` (meta build, dtype cast, tied weights) and `as_model_dtype` (the dtype table) are
the loading every torch model uses, InternViT and the chat model included.
"""
from __future__ import annotations

import torch
from torch import nn

from minivl.errors import ConfigError
from minivl.models.common import tie_weights, tied_head  # noqa: F401  (shared)
from torch_impl.models.fused import fuse_projections

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash", "triton")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """promote(dtype, float32): the reference's ".float()" in a float32 or float64 run."""
    return torch.promote_types(dtype, torch.float32)


def as_model_dtype(dtype) -> torch.dtype:
    """'float32' | 'float64' | 'bfloat16' | 'float16' (or the torch dtype) -> torch.dtype."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"torch models run in one of {sorted(DTYPES)} (got {dtype!r})")
    return DTYPES[dtype]


def check_attn_implementation(attn_implementation: str) -> str:
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ConfigError(f"attn_implementation must be one of {list(ATTN_IMPLEMENTATIONS)} "
                          f"(got {attn_implementation!r})")
    return attn_implementation


class Linear(nn.Module):
    """weight [out, in] (+ bias [out]) under the checkpoint's names; y = x·Wᵀ + b via torch_impl.linear."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x):
        from torch_impl.linear import linear

        return linear(x, self.weight, self.bias)


class Norm(nn.Module):
    """A norm's parameters (weight, optional bias) under the checkpoint's names; `kind` picks the formula.

    kind: 'rms' (HF order), 'rms_mpt' (weight multiplied in float32), 'layer'.
    """

    def __init__(self, dim: int, eps: float, kind: str = "rms", weight: bool = True, bias: bool = False):
        super().__init__()
        self.eps, self.kind = eps, kind
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False) if weight else None
        self.bias = nn.Parameter(torch.empty(dim), requires_grad=False) if bias else None

    def forward(self, x):
        from torch_impl.norms import layer_norm_fast, rms_norm_fast, rms_norm_mpt

        if self.kind == "rms":
            return rms_norm_fast(x, self.weight, self.eps)  # rms_norm bit for bit, in fewer buffers
        if self.kind == "rms_mpt":
            return rms_norm_mpt(x, self.weight, self.eps)
        return layer_norm_fast(x, self.weight, self.bias, self.eps)  # layer_norm bit for bit, in fewer buffers


class Embedding(nn.Module):
    """The token table [vocab, hidden] under the name `weight`; forward gathers rows."""

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)

    def forward(self, input_ids):
        return self.weight[input_ids]


def split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[b, s, n·d] -> [b, n, s, d]"""
    b, s, width = x.shape
    return x.view(b, s, n_heads, width // n_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[b, n, s, d] -> [b, s, n·d]"""
    b, n, s, d = x.shape
    return x.transpose(1, 2).reshape(b, s, n * d)


def rope_attention(q, k, v, rope, attn: dict, cache, layer_idx: int):
    """The attention core the RoPE families share (InternLM2, Phi-3, Llama, Qwen2).

    q [b, H, s, d], k/v [b, K, s, d], rope = (cos, sin) [b, s, d] -> ([b, s, H·d], probs [b, H, s, t] or None)
    attn: {mask: [b|1, 1, s, t] or None, is_causal, backend, output_attentions}, from
    `DecoderLM.attention_args`.
    """
    from torch_impl.attention import scaled_dot_product_attention
    from torch_impl.attention_blocks import causal_attention_blocks
    from torch_impl.rope import apply_rope_fast

    cos, sin = rope
    cos, sin = cos.to(q.dtype)[:, None], sin.to(q.dtype)[:, None]
    # apply_rope bit for bit, in fewer passes
    q, k = apply_rope_fast(q, cos, sin), apply_rope_fast(k, cos, sin)
    if cache is not None:
        k, v = cache.update(layer_idx, k, v)
    if attn["output_attentions"]:
        out, probs = scaled_dot_product_attention(q, k, v, mask=attn["mask"], scale_mode="divide",
                                                  softmax_dtype="float32", return_probs=True)
        return merge_heads(out), probs
    if attn["backend"] == "eager":
        # the same attention over blocks of queries that skip the keys the causal mask hides
        out = causal_attention_blocks(q, k, v, mask=attn["mask"], scale_mode="divide", softmax_dtype="float32")
    else:
        out = scaled_dot_product_attention(q, k, v, mask=attn["mask"], is_causal=attn["is_causal"],
                                           scale_mode="divide", softmax_dtype="float32", backend=attn["backend"])
    return merge_heads(out), None


def cast_tensor(value, dtype, device) -> torch.Tensor:
    """A checkpoint tensor (torch, or NumPy with bf16 through ml_dtypes) as a tensor of the model dtype on device."""
    from torch_impl.checkpoint import to_torch

    tensor = value if isinstance(value, torch.Tensor) else to_torch(value)
    return tensor.to(device=device, dtype=dtype)


def build_model(cls, config, state_dict: dict, dtype, device, tied: dict | None = None, **kwargs):
    """Construct `cls(config, **kwargs)` on the meta device (no allocation), then adopt the checkpoint tensors.

    state_dict {key: tensor}: cast to `dtype` on `device`; `tied` {target: source}: see `tie_weights`.
    Every missing, unexpected and mis-shaped tensor is reported in one CheckpointError.
    """
    from torch_impl.checkpoint import check_state_dict

    with torch.device("meta"):
        model = cls(config, **kwargs)
    tensors = tie_weights({key: cast_tensor(value, dtype, device) for key, value in state_dict.items()}, tied or {})
    check_state_dict(tensors, {key: tuple(p.shape) for key, p in model.state_dict().items()},
                     where=f"{cls.__name__} checkpoint")
    model.load_state_dict(tensors, strict=True, assign=True)
    for target, source in (tied or {}).items():
        if tensors[target] is tensors[source]:
            # assign=True gives two Parameters over one storage; make them one object so they stay tied
            owner, name = target.rsplit(".", 1)
            setattr(model.get_submodule(owner), name, model.get_parameter(source))
    for p in model.parameters():
        p.requires_grad_(False)
    del tensors  # the model holds them now
    fuse_projections(model)
    # no pack_parameters here (minivl/models/packing.py says why: torch's GEMMs ran slower on packed weights)
    return model.eval()


def declared_shapes(cls, config, skip=()) -> dict:
    """{checkpoint key: shape} of `cls(config)` built on the meta device (no allocation), the keys in `skip` left out."""
    with torch.device("meta"):
        model = cls(config)
    return {key: tuple(p.shape) for key, p in model.state_dict().items() if key not in skip}
