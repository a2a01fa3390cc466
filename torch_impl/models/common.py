"""What every decoder family shares, in PyTorch: the mirror of minivl/models/common.py.

Modules here hold parameters under the checkpoint's own names (so `load_state_dict` is a plain
name match) and call the torch_impl components in the same order as the NumPy code. Models are
built on the meta device and filled with the checkpoint tensors (`assign=True`): no random init.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from minivl.errors import ConfigError, ShapeError
from minivl.models.common import check_attention_mask, check_inputs  # noqa: F401  (shared checks)

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash", "triton")


@dataclass
class CausalLMOutput:
    """logits [b, s, vocab] float32 (float64 in a float64 run), past_key_values (KVCache or None),
    hidden_states: L+2 tensors [b, s, hidden] (embedding, each block, final norm) or None."""

    logits: torch.Tensor
    past_key_values: object = None
    hidden_states: tuple | None = None


def as_torch_dtype(dtype) -> torch.dtype:
    """'float32' | 'float64' | 'bfloat16' | 'float16' (or the torch dtype) -> torch.dtype."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"torch models run in one of {sorted(DTYPES)} (got {dtype!r})")
    return DTYPES[dtype]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """promote(dtype, float32): the reference's ".float()" in a float32 or float64 run."""
    return torch.promote_types(dtype, torch.float32)


def check_attn_implementation(attn_implementation: str) -> str:
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ConfigError(f"attn_implementation must be one of {list(ATTN_IMPLEMENTATIONS)} "
                          f"(got {attn_implementation!r})")
    return attn_implementation


def default_position_ids(batch: int, seq_len: int, past_len: int, device) -> torch.Tensor:
    """[b, s] int64 positions past_len ... past_len+seq_len-1 (the reference's default)."""
    return torch.arange(past_len, past_len + seq_len, dtype=torch.int64, device=device).expand(batch, seq_len)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """cumsum(mask) - 1 with pads set to 1: positions of a left-padded batch. [b, t] -> [b, t] int64"""
    mask = torch.as_tensor(attention_mask).to(torch.int64)
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


def check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size):
        raise ShapeError(f"forward: token ids must be in [0, {vocab_size}) (got min {int(input_ids.min())}, "
                         f"max {int(input_ids.max())}); the tokenizer and the checkpoint's vocab_size disagree")


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
        from torch_impl.norms import layer_norm, rms_norm, rms_norm_mpt

        if self.kind == "rms":
            return rms_norm(x, self.weight, self.eps)
        if self.kind == "rms_mpt":
            return rms_norm_mpt(x, self.weight, self.eps)
        return layer_norm(x, self.weight, self.bias, self.eps)


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


def rope_attention(q, k, v, cos, sin, attn: dict, cache, layer_idx: int) -> torch.Tensor:
    """The shared attention core of the RoPE families (see minivl.models.common.rope_attention).

    q [b, H, s, d], k/v [b, K, s, d], cos/sin [b, s, d] -> [b, s, H·d]
    attn: {mask: [b|1, 1, s, t] or None, is_causal: bool, backend: eager|sdpa|flash|triton},
    from `attention_args`.
    """
    from torch_impl.attention import scaled_dot_product_attention
    from torch_impl.rope import apply_rope

    cos, sin = cos.to(q.dtype)[:, None], sin.to(q.dtype)[:, None]
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if cache is not None:
        k, v = cache.update(layer_idx, k, v)
    out = scaled_dot_product_attention(q, k, v, mask=attn["mask"], is_causal=attn["is_causal"],
                                       scale_mode="divide", softmax_dtype="float32", backend=attn["backend"])
    return merge_heads(out)


def attention_args(backend: str, attention_mask, q_len: int, past_len: int, dtype, sliding_window=None) -> dict:
    """What one attention call needs: the 4-D additive mask, or none and is_causal for the fused kernels.

    eager always gets the reference's additive mask (causal + padding), even where it is all zeros.
    sdpa / flash / triton on an unpadded batch without a window get is_causal instead (bottom-right
    aligned: the same keys hidden), which lets the kernels skip the masked tiles. flash takes no
    additive mask at all: a padded or windowed batch runs sdpa with the mask (the reference unpads
    into flash_attn_varlen_func instead: same values, another kernel).
    """
    from torch_impl.attention import build_attention_mask

    unpadded = attention_mask is None or bool(attention_mask.bool().all())
    if backend != "eager" and unpadded and sliding_window is None:
        return {"mask": None, "is_causal": True, "backend": backend}
    mask = build_attention_mask(attention_mask, q_len, past_len, dtype, sliding_window=sliding_window)
    return {"mask": mask, "is_causal": False, "backend": "sdpa" if backend == "flash" else backend}


class RotaryEmbedding:
    """cos/sin for one model whatever its RoPE type (mirror of minivl.models.common.RotaryEmbedding)."""

    PER_CALL = ("su", "phi3_yarn", "longrope")

    def __init__(self, rope_kwargs: dict, dtype=torch.float32):
        from torch_impl.rope import DynamicNTKRope, rope_init

        self.rope_kwargs = dict(rope_kwargs, dtype=compute_dtype(dtype))
        self.rope_type = self.rope_kwargs["rope_type"]
        self.dynamic = None
        self.device = None
        if self.rope_type == "dynamic":
            kw = self.rope_kwargs
            self.dynamic = DynamicNTKRope(kw["head_dim"], kw["rope_theta"], kw["max_position_embeddings"],
                                          kw["factor"], dtype=kw["dtype"])
        elif self.rope_type not in self.PER_CALL:
            self.inv_freq, self.attention_scaling = rope_init(**self.rope_kwargs)

    def cos_sin(self, position_ids: torch.Tensor, kv_seq_len: int):
        """[b, s] positions -> (cos, sin) each [b, s, head_dim], in promote(model dtype, float32)"""
        from torch_impl.rope import rope_cos_sin, rope_init

        device = position_ids.device
        if self.dynamic is not None:
            if self.dynamic.inv_freq.device != device:
                self.dynamic.device = device
                self.dynamic.inv_freq = self.dynamic.inv_freq.to(device)
            return self.dynamic.cos_sin(position_ids, kv_seq_len)
        if self.rope_type in self.PER_CALL:
            # seq_len = max(position_ids) + 1 over the batch picks short (<= original) or long factors
            seq_len = int(position_ids.max()) + 1
            inv_freq, attention_scaling = rope_init(**self.rope_kwargs, seq_len=seq_len, device=device)
            return rope_cos_sin(position_ids, inv_freq, attention_scaling)
        if self.inv_freq.device != device:
            self.inv_freq = self.inv_freq.to(device)
        return rope_cos_sin(position_ids, self.inv_freq, self.attention_scaling)

    def position_limit(self) -> int | None:
        from minivl.models.common import RotaryEmbedding as _NumpyRotary

        return _NumpyRotary.position_limit(self)


class DecoderLM(nn.Module):
    """The pre-norm decoder loop of the RoPE families (mirror of minivl.models.common.DecoderLM).

    Subclasses define `decoder_layers()`, `final_norm_module()`, `embed_tokens`, `lm_head` and set
    `config`, `rotary`, `attn_implementation`.
    """

    def final_norm(self, hidden):
        return self.final_norm_module()(hidden)

    def position_limit(self) -> int | None:
        return self.rotary.position_limit()

    @property
    def dtype(self) -> torch.dtype:
        return self.final_norm_module().weight.dtype

    @property
    def device(self) -> torch.device:
        return self.final_norm_module().weight.device

    def set_attn_implementation(self, attn_implementation: str) -> None:
        self.attn_implementation = check_attn_implementation(attn_implementation)

    @torch.no_grad()
    def forward(self, input_ids=None, inputs_embeds=None, position_ids=None, attention_mask=None,
                past_key_values=None, use_cache=False, output_hidden_states=False) -> CausalLMOutput:
        """input_ids [b, s] or inputs_embeds [b, s, hidden] -> CausalLMOutput (logits [b, s, vocab])"""
        from torch_impl.attention import KVCache

        check_inputs(input_ids, inputs_embeds, self.config.hidden_size)
        if input_ids is not None:
            hidden = self.embed_tokens(torch.as_tensor(input_ids, device=self.device))
        else:
            hidden = torch.as_tensor(inputs_embeds, device=self.device).to(self.dtype)
        batch, seq_len = hidden.shape[:2]
        cache = past_key_values if past_key_values is not None else (KVCache() if use_cache else None)
        past_len = cache.get_seq_length(0) if cache is not None else 0
        kv_len = past_len + seq_len
        check_attention_mask(attention_mask, batch, kv_len)
        if attention_mask is not None:
            attention_mask = torch.as_tensor(attention_mask, device=self.device)
        if position_ids is None:
            position_ids = default_position_ids(batch, seq_len, past_len, self.device)
        position_ids = torch.as_tensor(position_ids, dtype=torch.int64, device=self.device)
        if tuple(position_ids.shape) != (batch, seq_len):
            raise ShapeError(f"forward: position_ids must be [batch, seq] = [{batch}, {seq_len}] "
                             f"(got shape {tuple(position_ids.shape)})")

        cos, sin = self.rotary.cos_sin(position_ids, kv_len)
        layers = self.decoder_layers()
        # one attention setup per distinct window (Qwen2 may window only some layers)
        attn = {window: attention_args(self.attn_implementation, attention_mask, seq_len, past_len, self.dtype,
                                       window)
                for window in {layer.sliding_window for layer in layers}}

        all_hidden = [hidden] if output_hidden_states else None
        for layer in layers:
            hidden = layer(hidden, cos, sin, attn[layer.sliding_window], cache)
            if output_hidden_states:
                all_hidden.append(hidden)
        hidden = self.final_norm(hidden)
        if output_hidden_states:
            all_hidden.append(hidden)
        # logits = head(h).float()
        logits = self.lm_head(hidden).to(compute_dtype(self.dtype))
        return CausalLMOutput(logits=logits,
                              past_key_values=cache if (use_cache or past_key_values is not None) else None,
                              hidden_states=tuple(all_hidden) if output_hidden_states else None)


def build_on_meta(cls, config, state_dict: dict, dtype, device, tied: dict | None = None, **kwargs):
    """Construct `cls(config, **kwargs)` without allocating, then adopt the checkpoint tensors.

    state_dict {key: tensor}: cast to `dtype` and moved to `device`; `tied` {target: source} makes a
    parameter the SAME tensor as another (tied LM head).
    """
    with torch.device("meta"):
        model = cls(config, **kwargs)
    tensors = {k: torch.as_tensor(v).to(device=device, dtype=dtype) for k, v in state_dict.items()}
    for target, source in (tied or {}).items():
        tensors[target] = tensors[source]
    model.load_state_dict(tensors, strict=True, assign=True)
    for target, source in (tied or {}).items():
        # assign=True gives two Parameters over one storage; make them one object so they stay tied
        owner_t, name_t = _owner(model, target)
        owner_s, name_s = _owner(model, source)
        setattr(owner_t, name_t, getattr(owner_s, name_s))
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _owner(model: nn.Module, key: str):
    path, name = key.rsplit(".", 1)
    return model.get_submodule(path), name
