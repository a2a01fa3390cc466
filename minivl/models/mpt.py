"""MPT, as the llm-foundry copy vendored in InternVL's LLaVA sub-project (`mpt/modeling_mpt.py`,
`attention.py`, `blocks.py`, `norm.py`).

embed (wte, + learned wpe unless ALiBi) -> L x [x + attn(norm_1(x)); x + ffn(norm_2(x))] -> norm_f
-> logits = h·wteᵀ (tied unembedding) · logit_scale.

* `Wqkv` is plain [Q | K | V]: d_model, d_model, d_model rows (multi-head) or d_model, D, D rows
  (multi-query: one KV head for all heads; there is no grouped-query option in this MPT);
* `clip_qkv` clamps the fused output to [−c, c] before the split;
* `qk_ln`: LayerNorm on q and k, over the full d_model for multi-head but over head_dim for k
  in multi-query (k has one head), then cast back;
* scores = (q·kᵀ)·softmax_scale (multiply AFTER the matmul), + ALiBi bias (float32, built for
  max_seq_len and sliced to the last t keys), pads and the causal triangle set to finfo.min;
  the float32 bias promotes the scores, so the softmax runs in float32 exactly when a bias
  (ALiBi or a padding mask) exists, otherwise in the model dtype;
* FFN = down(GELU_exact(up(x))); norms: LayerNorm (eps 1e-5) or MPT's RMSNorm (weight applied in float32);
* `no_bias` removes EVERY bias, the LayerNorms' included.

Masks are added (a visible key gets 0, a hidden one finfo.min) where the reference masked_fills
finfo.min; every row with at least one visible key gets the same softmax either way.
KV cache: [b, n_kv, t, D] per layer like the other families (the reference keeps keys as
[b, h, D, t] in its torch path; the layout, not the values, differs).

Module names follow the checkpoint keys: transformer.wte, transformer.wpe (learned positions only),
transformer.blocks.{i}.{norm_1, attn.Wqkv, attn.q_ln, attn.k_ln (qk_ln only), attn.out_proj, norm_2,
ffn.up_proj, ffn.down_proj}, transformer.norm_f; every bias absent with no_bias, norm biases absent
for RMSNorm. The decoder loop is DecoderLM's: MPT overrides only `positions` (the learned table)
and `attention_args` (the ALiBi / padding bias).
"""
from __future__ import annotations

import math

import numpy as np

from minivl import nn
from minivl.errors import ConfigError, GenerationError, ShapeError
from minivl.models.common import Embedding, Linear, Norm, compute_dtype, merge_heads, split_heads
from minivl.models.decoder import DecoderLM

NORM_EPS = 1e-5  # every MPT norm is built with the default eps


def mpt_norm(config) -> Norm:
    """LayerNorm for 'layernorm'/'low_precision_layernorm' (the same thing without autocast), MPT RMSNorm otherwise."""
    rms = config.norm_type.endswith("rmsnorm")
    return Norm(config.d_model, NORM_EPS, kind="rms_mpt" if rms else "layer", bias=not config.no_bias and not rms)


def mpt_positions(batch: int, seq_len: int, past_len: int, attention_mask) -> np.ndarray:
    """Learned-position indices as MPT computes them (MPT-M:186-188).

    pos = past..past+s-1, and with a mask pos − (number of pads up to here), clamped at 0 —
    equal to cumsum(mask) − 1 on real tokens of a left-padded batch.
    -> [b, s] int64
    """
    pos = np.broadcast_to(np.arange(past_len, past_len + seq_len, dtype=np.int64), (batch, seq_len))
    if attention_mask is not None:
        pads_so_far = np.cumsum(1 - np.asarray(attention_mask).astype(np.int64), axis=-1)[:, past_len:]
        pos = np.maximum(pos - pads_so_far, 0)
    return pos


def positions_out_of_range(values: list[int], max_seq_len: int) -> str:
    """The message for learned positions past MPT's table: the offending values, not just a shape."""
    return (f"MPT: position_ids hold {len(values)} positions outside the learned position table [0, {max_seq_len}) "
            f"(e.g. {sorted(set(values))[:5]}); the table has max_seq_len = {max_seq_len} rows: keep prompt + new "
            f"tokens within {max_seq_len}, or pass position_ids counted from 0")


def mpt_attention_bias(config, batch_mask, kv_len: int, dtype) -> np.ndarray | None:
    """The model-level additive bias (MPT-M `_attn_bias`): ALiBi's last kv_len columns, pads at finfo.min.

    -> [1|b, n_heads|1, 1, kv_len] in promote(dtype, float32), or None (learned positions, no mask).
    """
    from minivl.alibi import alibi_bias

    attn = config.attn_config
    bias_dtype = compute_dtype(dtype)
    bias = None
    if attn["alibi"]:
        # (j − (L−1))·slope for L = max_seq_len, then the last kv_len keys: −(kv_len−1−j)·slope
        bias = alibi_bias(config.n_heads, config.max_seq_len, attn["alibi_bias_max"])[..., -kv_len:]
        bias = bias.astype(bias_dtype)
    if batch_mask is not None:
        if bias is None:
            bias = np.zeros((1, 1, 1, kv_len), dtype=bias_dtype)
        keep = np.asarray(batch_mask).astype(bool)[:, None, None, :]
        bias = np.where(keep, bias, np.finfo(bias_dtype).min).astype(bias_dtype)
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
        from minivl.attention import scaled_dot_product_attention

        qkv = self.Wqkv(x)
        if self.clip_qkv:
            qkv = np.clip(qkv, -self.clip_qkv, self.clip_qkv)
        kv_width = self.n_kv_heads * self.head_dim
        query, key, value = (qkv[..., :self.d_model], qkv[..., self.d_model:self.d_model + kv_width],
                             qkv[..., self.d_model + kv_width:])
        if self.qk_ln:
            # q over d_model; k over d_model (multi-head) or head_dim (multi-query), cast back
            query, key = self.q_ln(query).astype(x.dtype), self.k_ln(key).astype(x.dtype)
        q, k, v = split_heads(query, self.n_heads), split_heads(key, self.n_kv_heads), split_heads(value, self.n_kv_heads)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        # softmax in float32 only when the float32 bias promoted the scores (see module docstring)
        bias = attn["bias"]
        out = scaled_dot_product_attention(q, k, v, mask=attn["causal"], bias=bias, scale=self.softmax_scale,
                                           scale_mode="multiply", softmax_dtype="float32" if bias is not None else None,
                                           return_probs=attn["output_attentions"])
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
        from minivl.mlp import gelu_mlp

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

    def __init__(self, config):
        super().__init__(config)
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

    def embed_inputs(self, inputs_embeds) -> np.ndarray:
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
                position_ids = mpt_positions(batch, seq_len, past_len, attention_mask)
            position_ids = np.asarray(position_ids, dtype=np.int64)
            if position_ids.shape != (batch, seq_len):
                raise ShapeError(f"MPT: position_ids must be [batch, seq] = [{batch}, {seq_len}] "
                                 f"(got shape {position_ids.shape})")
            outside = position_ids[(position_ids < 0) | (position_ids >= config.max_seq_len)]
            if outside.size:
                raise ShapeError(positions_out_of_range(outside.tolist(), config.max_seq_len))
            hidden = hidden + wpe(position_ids)
        fraction = config.embedding_fraction
        if fraction != 1:
            # x·f + x.detach()·(1 − f): the identity in value, kept for its rounding
            hidden = hidden * fraction + hidden * (1 - fraction)
        return hidden, None

    def attention_args(self, attention_mask, seq_len: int, past_len: int, sliding_window, output_attentions) -> dict:
        """The ALiBi / padding bias [1|b, H|1, 1, t] (or None) and the causal triangle (None for one query)."""
        from minivl.attention import causal_mask

        kv_len = past_len + seq_len
        bias = mpt_attention_bias(self.config, attention_mask, kv_len, self.dtype)
        # causal triangle (bottom-right aligned); a single query sees every key, as the reference skips it
        mask_dtype = bias.dtype if bias is not None else self.dtype
        causal = None if seq_len == 1 else causal_mask(seq_len, kv_len, mask_dtype)[None, None]
        return {"bias": bias, "causal": causal, "output_attentions": output_attentions}
