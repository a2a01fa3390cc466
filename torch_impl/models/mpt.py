"""MPT (InternVL's vendored llm-foundry copy) in PyTorch: the mirror of minivl/models/mpt.py.

Module names follow the checkpoint keys: transformer.wte, transformer.wpe, transformer.blocks.{i}.{norm_1,
attn.Wqkv, attn.q_ln, attn.k_ln, attn.out_proj, norm_2, ffn.up_proj, ffn.down_proj}, transformer.norm_f.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from minivl.errors import ConfigError, GenerationError, ShapeError
from minivl.models.mpt import NORM_EPS, positions_out_of_range
from torch_impl.models.common import Embedding, Linear, Norm, compute_dtype, merge_heads, split_heads
from torch_impl.models.decoder import DecoderLM


def mpt_norm(config) -> Norm:
    """LayerNorm for 'layernorm'/'low_precision_layernorm' (the same thing without autocast), MPT RMSNorm otherwise."""
    rms = config.norm_type.endswith("rmsnorm")
    return Norm(config.d_model, NORM_EPS, kind="rms_mpt" if rms else "layer", bias=not config.no_bias and not rms)


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
    """Wqkv -> clip -> split -> qk_ln -> cache -> scores·scale + bias, causal -> softmax -> out_proj.

    [b, s, d_model] -> [b, s, d_model]
    """

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
            # the block builds nn.LayerNorm here whatever norm_type says
            self.q_ln = Norm(self.d_model, NORM_EPS, kind="layer", bias=has_bias)
            self.k_ln = Norm(kv_width, NORM_EPS, kind="layer", bias=has_bias)
        self.out_proj = Linear(self.d_model, self.d_model, has_bias)

    def forward(self, x, attn: dict, cache):
        from torch_impl.attention import scaled_dot_product_attention

        qkv = self.Wqkv(x)
        if self.clip_qkv:
            qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
        kv_width = self.n_kv_heads * self.head_dim
        query, key, value = (qkv[..., :self.d_model], qkv[..., self.d_model:self.d_model + kv_width],
                             qkv[..., self.d_model + kv_width:])
        if self.qk_ln:
            # q over d_model; k over d_model (multi-head) or head_dim (multi-query), cast back
            query, key = self.q_ln(query).to(x.dtype), self.k_ln(key).to(x.dtype)
        q, k, v = split_heads(query, self.n_heads), split_heads(key, self.n_kv_heads), split_heads(value, self.n_kv_heads)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        # softmax in float32 only when the float32 bias promoted the scores (see module docstring)
        bias = attn["bias"]
        out = scaled_dot_product_attention(q, k, v, mask=attn["causal"], bias=bias, scale=self.softmax_scale,
                                           scale_mode="multiply", softmax_dtype="float32" if bias is not None else None,
                                           return_probs=attn["output_attentions"], backend=attn["backend"])
        out, probs = out if attn["output_attentions"] else (out, None)
        return self.out_proj(merge_heads(out)), probs


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


class MPTBlock(nn.Module):
    """x + attn(norm_1(x)); then x + ffn(norm_2(x)). [b, s, d_model] -> [b, s, d_model]"""

    sliding_window = None

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.norm_1 = mpt_norm(config)
        self.attn = MPTAttention(config, layer_idx)
        self.norm_2 = mpt_norm(config)
        self.ffn = MPTMLP(config)

    def forward(self, x, rope, attn: dict, cache):
        # rope is None: MPT's positions are the ALiBi bias in attn, or the wpe rows already added
        attn_out, probs = self.attn(self.norm_1(x), attn, cache)
        x = x + attn_out
        return x + self.ffn(self.norm_2(x)), probs


class MPTModel(nn.Module):
    """wte, wpe (learned positions only), blocks, norm_f: the parts DecoderLM runs."""

    def __init__(self, config):
        super().__init__()
        self.wte = Embedding(config.vocab_size, config.d_model)
        if config.learned_pos_emb and not config.attn_config["alibi"]:
            self.wpe = Embedding(config.max_seq_len, config.d_model)
        else:
            self.wpe = None
        self.blocks = nn.ModuleList(MPTBlock(config, i) for i in range(config.n_layers))
        self.norm_f = mpt_norm(config)


class MPTForCausalLM(DecoderLM):
    """forward(input_ids [b, s] | inputs_embeds [b, s, d_model] (ALiBi only), ...) -> CausalLMOutput"""

    embed_path, layers_path, norm_path = "transformer.wte", "transformer.blocks", "transformer.norm_f"
    head_path = "transformer.wte"  # the tied unembedding IS wte: logits = h·wteᵀ · logit_scale

    def __init__(self, config, attn_implementation: str = "eager"):
        super().__init__(config, attn_implementation)
        self.transformer = MPTModel(config)
        scale = config.logit_scale
        # 'inv_sqrt_d_model' = 1/sqrt(d_model)
        self.logit_scale = 1.0 / math.sqrt(config.d_model) if scale == "inv_sqrt_d_model" else scale

    @staticmethod
    def check_supported(config) -> None:
        """ConfigError for the training-only MPT options minivl does not implement."""
        unsupported = [name for name in ("prefix_lm", "attn_uses_sequence_id") if config.attn_config[name]]
        if unsupported:
            raise ConfigError(f"MPT: attn_config {unsupported} = true is not implemented in minivl (prefix-LM and "
                              f"packed-sequence masks are training features); set them to false for inference")

    def position_limit(self) -> int:
        """max_seq_len: the wpe table's length, and the length the ALiBi bias is built for."""
        return self.config.max_seq_len

    def embed_inputs(self, inputs_embeds) -> torch.Tensor:
        if not self.config.attn_config["alibi"]:
            raise ShapeError("MPT: inputs_embeds are accepted only with ALiBi (the reference refuses them with "
                             "learned positions, MPT-M:169-173); pass input_ids")
        return super().embed_inputs(inputs_embeds)

    def positions(self, hidden, position_ids, attention_mask, past_len: int):
        """-> (hidden + wpe[positions] (learned positions only), no RoPE).

        position_ids (learned positions only) default to MPT's own rule from attention_mask.
        """
        config = self.config
        batch, seq_len = hidden.shape[:2]
        if past_len + seq_len > config.max_seq_len:
            raise GenerationError(f"MPT: {past_len + seq_len} positions (cached {past_len} + new {seq_len}) exceed "
                                  f"max_seq_len={config.max_seq_len}, the length of the position table / ALiBi bias; "
                                  f"shorten the input")
        wpe = self.transformer.wpe
        if wpe is not None:
            if position_ids is None:
                position_ids = mpt_positions(batch, seq_len, past_len, attention_mask, self.device)
            position_ids = torch.as_tensor(position_ids, dtype=torch.int64, device=self.device)
            if tuple(position_ids.shape) != (batch, seq_len):
                raise ShapeError(f"MPT: position_ids must be [batch, seq] = [{batch}, {seq_len}] "
                                 f"(got shape {tuple(position_ids.shape)})")
            outside = position_ids[(position_ids < 0) | (position_ids >= config.max_seq_len)]
            if outside.numel():
                raise ShapeError(positions_out_of_range(outside.tolist(), config.max_seq_len))
            hidden = hidden + wpe(position_ids)
        fraction = config.embedding_fraction
        if fraction != 1:
            # x·f + x.detach()·(1 − f): the identity in value, kept for its rounding
            hidden = hidden * fraction + hidden * (1 - fraction)
        return hidden, None

    def attention_args(self, attention_mask, seq_len: int, past_len: int, sliding_window, output_attentions) -> dict:
        """The ALiBi / padding bias [1|b, H|1, 1, t] (or None) and the causal triangle (None for one query)."""
        from torch_impl.attention import causal_mask

        kv_len = past_len + seq_len
        bias = mpt_attention_bias(self.config, attention_mask, kv_len, self.dtype, self.device)
        mask_dtype = bias.dtype if bias is not None else self.dtype
        causal = None if seq_len == 1 else causal_mask(seq_len, kv_len, mask_dtype, device=self.device)[None, None]
        # flash takes no additive bias: MPT on the flash backend runs sdpa (the reference refuses ALiBi with flash)
        backend = "eager" if output_attentions else self.attn_implementation
        return {"bias": bias, "causal": causal, "backend": "sdpa" if backend == "flash" else backend,
                "output_attentions": output_attentions}
