"""MPT (InternVL's vendored llm-foundry copy) in PyTorch: the mirror of minivl/models/mpt.py.

Module names follow the checkpoint keys: transformer.wte, transformer.wpe, transformer.blocks.{i}.{norm_1,
attn.Wqkv, attn.q_ln, attn.k_ln, attn.out_proj, norm_2, ffn.up_proj, ffn.down_proj}, transformer.norm_f.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from minivl.errors import GenerationError, ShapeError
from minivl.models.mpt import MPTForCausalLM as _NumpyMPT
from minivl.models.mpt import NORM_EPS
from torch_impl.checkpoint import check_state_dict
from torch_impl.models.common import (CausalLMOutput, Embedding, Linear, Norm, as_torch_dtype, build_on_meta,
                                      check_attention_mask, check_attn_implementation, check_inputs,
                                      check_token_ids, compute_dtype, merge_heads, split_heads)


def mpt_positions(batch: int, seq_len: int, past_len: int, attention_mask, device) -> torch.Tensor:
    """pos = past..past+s-1, minus the pads so far, clamped at 0 (MPT-M:186-188). -> [b, s] int64"""
    pos = torch.arange(past_len, past_len + seq_len, dtype=torch.int64, device=device).expand(batch, seq_len)
    if attention_mask is not None:
        pads_so_far = (1 - attention_mask.to(torch.int64)).cumsum(-1)[:, past_len:]
        pos = (pos - pads_so_far).clamp(min=0)
    return pos


def mpt_attention_bias(config, batch_mask, kv_len: int, dtype, device):
    """ALiBi's last kv_len columns (float32) with pads at finfo.min. -> [1|b, h|1, 1, kv_len] or None"""
    from torch_impl.alibi import alibi_bias

    attn = config.attn_config
    bias_dtype = compute_dtype(dtype)
    bias = None
    if attn["alibi"]:
        bias = alibi_bias(config.n_heads, config.max_seq_len, attn["alibi_bias_max"])[..., -kv_len:]
        bias = bias.to(device=device, dtype=bias_dtype)
    if batch_mask is not None:
        if bias is None:
            bias = torch.zeros(1, 1, 1, kv_len, dtype=bias_dtype, device=device)
        keep = batch_mask.bool()[:, None, None, :]
        bias = bias.masked_fill(~keep, torch.finfo(bias_dtype).min)
    return bias


class MPTAttention(nn.Module):
    """[b, s, d_model] -> [b, s, d_model]"""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        attn = config.attn_config
        has_bias = not config.no_bias
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.num_key_value_heads, config.head_dim
        self.d_model = config.d_model
        self.clip_qkv, self.qk_ln = attn["clip_qkv"], attn["qk_ln"]
        self.softmax_scale = attn["softmax_scale"] or 1.0 / math.sqrt(config.d_model / config.n_heads)
        kv_width = self.n_kv_heads * self.head_dim
        self.Wqkv = Linear(self.d_model, self.d_model + 2 * kv_width, has_bias)
        if self.qk_ln:
            self.q_ln = Norm(self.d_model, NORM_EPS, kind="layer", bias=has_bias)
            self.k_ln = Norm(kv_width, NORM_EPS, kind="layer", bias=has_bias)
        self.out_proj = Linear(self.d_model, self.d_model, has_bias)

    def forward(self, x, bias, causal, cache, backend="eager"):
        from torch_impl.attention import scaled_dot_product_attention

        qkv = self.Wqkv(x)
        if self.clip_qkv:
            qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
        kv_width = self.n_kv_heads * self.head_dim
        query, key, value = (qkv[..., :self.d_model], qkv[..., self.d_model:self.d_model + kv_width],
                             qkv[..., self.d_model + kv_width:])
        if self.qk_ln:
            query, key = self.q_ln(query).to(x.dtype), self.k_ln(key).to(x.dtype)
        q, k, v = split_heads(query, self.n_heads), split_heads(key, self.n_kv_heads), split_heads(value, self.n_kv_heads)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        # flash takes no additive bias: MPT on the flash backend runs sdpa (the reference refuses ALiBi with flash)
        backend = "sdpa" if backend == "flash" else backend
        out = scaled_dot_product_attention(q, k, v, mask=causal, bias=bias, scale=self.softmax_scale,
                                           scale_mode="multiply",
                                           softmax_dtype="float32" if bias is not None else None, backend=backend)
        return self.out_proj(merge_heads(out))


class MPTMLP(nn.Module):
    """down(GELU_exact(up(x))). [b, s, d_model] -> [b, s, d_model]"""

    def __init__(self, config):
        super().__init__()
        inner = config.expansion_ratio * config.d_model
        self.up_proj = Linear(config.d_model, inner, not config.no_bias)
        self.down_proj = Linear(inner, config.d_model, not config.no_bias)

    def forward(self, x):
        from torch_impl.mlp import gelu_mlp

        return gelu_mlp(x, self.up_proj.weight, self.up_proj.bias, self.down_proj.weight, self.down_proj.bias,
                        approximate=False)


def _norm(config):
    rms = config.norm_type.endswith("rmsnorm")
    return Norm(config.d_model, NORM_EPS, kind="rms_mpt" if rms else "layer", bias=not config.no_bias and not rms)


class MPTBlock(nn.Module):
    """x + attn(norm_1(x)); then x + ffn(norm_2(x)). [b, s, d_model] -> [b, s, d_model]"""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.norm_1 = _norm(config)
        self.attn = MPTAttention(config, layer_idx)
        self.norm_2 = _norm(config)
        self.ffn = MPTMLP(config)

    def forward(self, x, bias, causal, cache, backend="eager"):
        x = x + self.attn(self.norm_1(x), bias, causal, cache, backend)
        return x + self.ffn(self.norm_2(x))


class MPTModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.wte = Embedding(config.vocab_size, config.d_model)
        if config.learned_pos_emb and not config.attn_config["alibi"]:
            self.wpe = Embedding(config.max_seq_len, config.d_model)
        else:
            self.wpe = None
        self.blocks = nn.ModuleList(MPTBlock(config, i) for i in range(config.n_layers))
        self.norm_f = _norm(config)


class MPTForCausalLM(nn.Module):
    """forward(input_ids [b, s] | inputs_embeds [b, s, d_model] (ALiBi only), ...) -> CausalLMOutput"""

    expected_shapes = staticmethod(_NumpyMPT.expected_shapes)

    def __init__(self, config, attn_implementation: str = "eager"):
        super().__init__()
        self.config = config
        self.attn_implementation = check_attn_implementation(attn_implementation)
        self.transformer = MPTModel(config)
        scale = config.logit_scale
        self.logit_scale = 1.0 / math.sqrt(config.d_model) if scale == "inv_sqrt_d_model" else scale

    @classmethod
    def from_state_dict(cls, config, state_dict: dict, dtype="float32", device="cpu",
                        attn_implementation: str = "eager") -> "MPTForCausalLM":
        _NumpyMPT.check_supported(config)
        check_state_dict(state_dict, cls.expected_shapes(config), where=f"{cls.__name__} checkpoint")
        return build_on_meta(cls, config, state_dict, as_torch_dtype(dtype), device,
                             attn_implementation=attn_implementation)

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.wte.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.transformer.wte.weight.device

    def set_attn_implementation(self, attn_implementation: str) -> None:
        self.attn_implementation = check_attn_implementation(attn_implementation)

    def position_limit(self) -> int:
        return self.config.max_seq_len

    def embed_tokens(self, input_ids) -> torch.Tensor:
        input_ids = torch.as_tensor(input_ids, device=self.device)
        check_token_ids(input_ids, self.config.vocab_size)
        return self.transformer.wte(input_ids)

    @torch.no_grad()
    def forward(self, input_ids=None, inputs_embeds=None, position_ids=None, attention_mask=None,
                past_key_values=None, use_cache=False, output_hidden_states=False) -> CausalLMOutput:
        from torch_impl.attention import KVCache, causal_mask

        config = self.config
        check_inputs(input_ids, inputs_embeds, config.d_model)
        if inputs_embeds is not None and not config.attn_config["alibi"]:
            raise ShapeError("MPT: inputs_embeds are accepted only with ALiBi (the reference refuses them with "
                             "learned positions, MPT-M:169-173); pass input_ids")
        x = self.embed_tokens(input_ids) if input_ids is not None else \
            torch.as_tensor(inputs_embeds, device=self.device).to(self.dtype)
        batch, seq_len = x.shape[:2]
        cache = past_key_values if past_key_values is not None else (KVCache() if use_cache else None)
        past_len = cache.get_seq_length(0) if cache is not None else 0
        kv_len = past_len + seq_len
        check_attention_mask(attention_mask, batch, kv_len)
        if attention_mask is not None:
            attention_mask = torch.as_tensor(attention_mask, device=self.device)
        if kv_len > config.max_seq_len:
            raise GenerationError(f"MPT: {kv_len} positions (cached {past_len} + new {seq_len}) exceed max_seq_len="
                                  f"{config.max_seq_len}, the length of the position table / ALiBi bias; "
                                  f"shorten the input")
        wpe = self.transformer.wpe
        if wpe is not None:
            if position_ids is None:
                position_ids = mpt_positions(batch, seq_len, past_len, attention_mask, self.device)
            position_ids = torch.as_tensor(position_ids, dtype=torch.int64, device=self.device)
            if tuple(position_ids.shape) != (batch, seq_len) or int(position_ids.min()) < 0 \
                    or int(position_ids.max()) >= config.max_seq_len:
                raise ShapeError(f"MPT: position_ids must be [batch, seq] = [{batch}, {seq_len}] in "
                                 f"[0, {config.max_seq_len}) (got shape {tuple(position_ids.shape)})")
            x = x + wpe(position_ids)
        fraction = config.embedding_fraction
        if fraction != 1:
            x = x * fraction + x * (1 - fraction)

        bias = mpt_attention_bias(config, attention_mask, kv_len, self.dtype, self.device)
        mask_dtype = bias.dtype if bias is not None else self.dtype
        causal = None if seq_len == 1 else causal_mask(seq_len, kv_len, mask_dtype, device=self.device)[None, None]
        all_hidden = [x] if output_hidden_states else None
        for block in self.transformer.blocks:
            x = block(x, bias, causal, cache, self.attn_implementation)
            if output_hidden_states:
                all_hidden.append(x)
        x = self.transformer.norm_f(x)
        if output_hidden_states:
            all_hidden.append(x)
        from torch_impl.linear import linear

        logits = linear(x, self.transformer.wte.weight)
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        return CausalLMOutput(logits=logits.to(compute_dtype(self.dtype)),
                              past_key_values=cache if (use_cache or past_key_values is not None) else None,
                              hidden_states=tuple(all_hidden) if output_hidden_states else None)
