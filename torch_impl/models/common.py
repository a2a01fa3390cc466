"""What every decoder family shares, in PyTorch: the mirror of minivl/models/common.py.

Modules here hold parameters under the checkpoint's own names (so `load_state_dict` is a plain
name match) and call the torch_impl components in the same order as the NumPy code. Models are
built on the meta device and filled with the checkpoint tensors (`assign=True`): no random init.
`build_model` (meta build, dtype cast, tied weights) and `as_model_dtype` (the dtype table) are
the loading every torch model uses, InternViT and the chat model included.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from minivl.errors import ConfigError, ShapeError
from minivl.models.common import (check_attention_mask, check_inputs, check_logits_to_keep,  # noqa: F401  (shared)
                                  check_position_ids, tie_weights, tied_head)
from torch_impl.models.fused import fuse_projections
from torch_impl.models.packing import pack_parameters

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash", "triton")


@dataclass
class CausalLMOutput:
    """logits [b, s, vocab] float32 (float64 in a float64 run), past_key_values (KVCache or None),
    hidden_states: L+2 tensors [b, s, hidden] (embedding, each block, final norm) or None,
    attentions: L tensors [b, H, s, t] of softmax probabilities or None."""

    logits: torch.Tensor
    past_key_values: object = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


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


def rope_attention(q, k, v, rope, attn: dict, cache, layer_idx: int):
    """The attention core the RoPE families share (InternLM2, Phi-3, Llama, Qwen2).

    q [b, H, s, d], k/v [b, K, s, d], rope = (cos, sin) [b, s, d] -> ([b, s, H·d], probs [b, H, s, t] or None)
    attn: {mask: [b|1, 1, s, t] or None, is_causal, backend, output_attentions}, from
    `DecoderLM.attention_args`.
    """
    from torch_impl.attention import causal_attention_blocks, scaled_dot_product_attention
    from torch_impl.rope import apply_rope

    cos, sin = rope
    cos, sin = cos.to(q.dtype)[:, None], sin.to(q.dtype)[:, None]
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
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
    del tensors  # the model holds them now: each is freed as pack_parameters moves it
    fuse_projections(model)
    pack_parameters(model)
    return model.eval()


def declared_shapes(cls, config, skip=()) -> dict:
    """{checkpoint key: shape} of `cls(config)` built on the meta device (no allocation), the keys in `skip` left out."""
    with torch.device("meta"):
        model = cls(config)
    return {key: tuple(p.shape) for key, p in model.state_dict().items() if key not in skip}


class DecoderLM(nn.Module):
    """embed -> positions -> L x layer -> final norm -> head (mirror of minivl.models.common.DecoderLM).

    A family builds its modules under the checkpoint's names in `__init__(config, attn_implementation)`
    and sets `embed_path`, `layers_path`, `norm_path`, `head_path`; MPT overrides `positions` and
    `attention_args`.
    """

    embed_path, layers_path, norm_path, head_path = "model.embed_tokens", "model.layers", "model.norm", "lm_head"
    logit_scale = None  # MPT's logits are multiplied by one
    _rotary = None

    def __init__(self, config, attn_implementation: str = "eager"):
        super().__init__()
        self.config = config
        self.attn_implementation = check_attn_implementation(attn_implementation)

    @classmethod
    def tied_weights(cls, config) -> dict:
        """{target key: source key} of parameters that are one tensor: the head tied to the embedding."""
        return tied_head(config, cls.embed_path, cls.head_path)

    @staticmethod
    def check_supported(config) -> None:
        """Raise ConfigError for config options the family does not implement (the RoPE families implement all)."""

    @classmethod
    def expected_shapes(cls, config) -> dict:
        """{checkpoint key: shape} from the declared parameters (a tied head is not stored)."""
        return declared_shapes(cls, config, skip=cls.tied_weights(config))

    @classmethod
    def from_state_dict(cls, config, state_dict: dict, dtype="float32", device="cpu",
                        attn_implementation: str = "eager"):
        """Build from {checkpoint key: tensor}; every missing/unexpected/mis-shaped tensor is reported at once."""
        cls.check_supported(config)
        dtype = as_model_dtype(dtype)
        return build_model(cls, config, state_dict, dtype, device, tied=cls.tied_weights(config),
                           attn_implementation=attn_implementation)

    @property
    def dtype(self) -> torch.dtype:
        return self.get_submodule(self.norm_path).weight.dtype

    @property
    def device(self) -> torch.device:
        return self.get_submodule(self.norm_path).weight.device

    def set_attn_implementation(self, attn_implementation: str) -> None:
        self.attn_implementation = check_attn_implementation(attn_implementation)

    @property
    def rotary(self):
        """The RotaryEmbedding of config.rope_kwargs(), in promote(model dtype, float32); built on first use
        after loading, and kept (dynamic NTK is stateful). None without RoPE (MPT)."""
        from torch_impl.models.rotary import RotaryEmbedding

        if self._rotary is None or self._rotary.rope_kwargs["dtype"] != compute_dtype(self.dtype):
            rope_kwargs = self.config.rope_kwargs()
            self._rotary = RotaryEmbedding(rope_kwargs, self.dtype) if rope_kwargs is not None else None
        return self._rotary

    def position_limit(self) -> int | None:
        """Largest number of positions the model serves (None: no limit, e.g. dynamic RoPE scaling)."""
        return self.rotary.position_limit()

    def embed_tokens(self, input_ids) -> torch.Tensor:
        """[b, s] int -> [b, s, hidden]: rows of the embedding table (no scaling; positions come later)."""
        input_ids = torch.as_tensor(input_ids, device=self.device)
        check_token_ids(input_ids, self.config.vocab_size)
        return self.get_submodule(self.embed_path)(input_ids)

    def embed_inputs(self, inputs_embeds) -> torch.Tensor:
        """inputs_embeds [b, s, hidden] (the chat model's text + image embeddings) in the model dtype."""
        return torch.as_tensor(inputs_embeds, device=self.device).to(self.dtype)

    def positions(self, hidden, position_ids, attention_mask, past_len: int):
        """-> (hidden, rope): RoPE's (cos, sin) [b, s, head_dim] for these positions, hidden unchanged."""
        batch, seq_len = hidden.shape[:2]
        if position_ids is None:
            position_ids = default_position_ids(batch, seq_len, past_len, self.device)
        check_position_ids(position_ids, batch, seq_len)
        position_ids = torch.as_tensor(position_ids, dtype=torch.int64, device=self.device)
        return hidden, self.rotary.cos_sin(position_ids, past_len + seq_len)

    def attention_args(self, attention_mask, seq_len: int, past_len: int, sliding_window, output_attentions) -> dict:
        """What every attention call of one window gets: the additive mask, or none and is_causal.

        eager always gets the reference's additive mask (causal + padding), even where it is all zeros.
        sdpa / flash / triton on an unpadded batch without a window get is_causal instead (bottom-right
        aligned: the same keys hidden), which lets the kernels skip the masked tiles. flash takes no
        additive mask at all: a padded or windowed batch runs sdpa with the mask (the reference unpads
        into flash_attn_varlen_func instead: same values, another kernel). output_attentions runs
        eager, as transformers falls back to it: the fused kernels never form the probabilities.
        """
        from torch_impl.attention import build_attention_mask

        backend = "eager" if output_attentions else self.attn_implementation
        unpadded = attention_mask is None or bool(attention_mask.bool().all())
        if backend != "eager" and unpadded and sliding_window is None:
            return {"mask": None, "is_causal": True, "backend": backend, "output_attentions": False}
        mask = build_attention_mask(attention_mask, seq_len, past_len, self.dtype, sliding_window=sliding_window)
        return {"mask": mask, "is_causal": False, "backend": "sdpa" if backend == "flash" else backend,
                "output_attentions": output_attentions}

    def final_norm(self, hidden):
        """The norm after the last block. [..., hidden] -> [..., hidden]"""
        return self.get_submodule(self.norm_path)(hidden)

    def unembed(self, hidden):
        """[..., hidden] -> logits [..., vocab]: head(h) in the model dtype (· logit_scale), then .float()."""
        from torch_impl.linear import linear

        logits = linear(hidden, self.get_submodule(self.head_path).weight)
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        return logits.to(compute_dtype(self.dtype))

    @torch.no_grad()
    def forward(self, input_ids=None, inputs_embeds=None, position_ids=None, attention_mask=None,
                past_key_values=None, use_cache=False, output_hidden_states=False,
                output_attentions=False, logits_to_keep: int = 0) -> CausalLMOutput:
        """input_ids [b, s] or inputs_embeds [b, s, hidden] -> CausalLMOutput (logits [b, s, vocab])

        logits_to_keep: 0 = every position, n = the last n only (see minivl's DecoderLM.forward).
        """
        from torch_impl.attention import KVCache

        check_inputs(input_ids, inputs_embeds, self.get_submodule(self.embed_path).weight.shape[1])
        hidden = self.embed_tokens(input_ids) if input_ids is not None else self.embed_inputs(inputs_embeds)
        batch, seq_len = hidden.shape[:2]
        cache = past_key_values if past_key_values is not None else (KVCache() if use_cache else None)
        past_len = cache.get_seq_length(0) if cache is not None else 0
        check_attention_mask(attention_mask, batch, past_len + seq_len)
        if attention_mask is not None:
            attention_mask = torch.as_tensor(attention_mask, device=self.device)
        hidden, rope = self.positions(hidden, position_ids, attention_mask, past_len)
        layers = self.get_submodule(self.layers_path)
        # one attention setup per distinct window (Qwen2 may window only some layers)
        attn = {window: self.attention_args(attention_mask, seq_len, past_len, window, output_attentions)
                for window in {layer.sliding_window for layer in layers}}

        all_hidden = [hidden] if output_hidden_states else None
        all_probs = [] if output_attentions else None
        for layer in layers:
            hidden, probs = layer(hidden, rope, attn[layer.sliding_window], cache)
            if output_hidden_states:
                all_hidden.append(hidden)
            if output_attentions:
                all_probs.append(probs)
        hidden = self.final_norm(hidden)
        if output_hidden_states:
            all_hidden.append(hidden)
        check_logits_to_keep(logits_to_keep)
        return CausalLMOutput(logits=self.unembed(hidden[:, -logits_to_keep:] if logits_to_keep else hidden),
                              past_key_values=cache if (use_cache or past_key_values is not None) else None,
                              hidden_states=tuple(all_hidden) if output_hidden_states else None,
                              attentions=tuple(all_probs) if output_attentions else None)
