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

Checkpoint keys: transformer.wte.weight, transformer.wpe.weight (learned positions only),
transformer.blocks.{i}.norm_1.{weight,bias}, .attn.Wqkv.{weight,bias}, .attn.q_ln.{weight,bias},
.attn.k_ln.{weight,bias} (qk_ln only), .attn.out_proj.{weight,bias}, .norm_2.{weight,bias},
.ffn.up_proj.{weight,bias}, .ffn.down_proj.{weight,bias}, transformer.norm_f.{weight,bias};
every bias absent with no_bias, norm biases absent for RMSNorm.
"""
from __future__ import annotations

import math

import numpy as np

from minivl.checkpoint import check_state_dict
from minivl.errors import ConfigError, GenerationError, ShapeError
from minivl.linear import linear
from minivl.mlp import gelu_mlp
from minivl.models.common import (CausalLMOutput, as_model_dtype, check_attention_mask, check_inputs,
                                  check_token_ids, compute_dtype, merge_heads, split_heads)
from minivl.norms import layer_norm, rms_norm_mpt

NORM_EPS = 1e-5  # every MPT norm is built with the default eps


def mpt_norm(x, weight, bias, norm_type: str):
    """LayerNorm for 'layernorm'/'low_precision_layernorm' (the same thing without autocast), MPT RMSNorm otherwise."""
    if norm_type.endswith("rmsnorm"):
        return rms_norm_mpt(x, weight, NORM_EPS)
    return layer_norm(x, weight, bias, NORM_EPS)


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


class MPTAttention:
    """Wqkv -> clip -> split -> qk_ln -> cache -> scores·scale + bias, causal -> softmax -> out_proj.

    [b, s, d_model] -> [b, s, d_model]
    """

    def __init__(self, config, layer_idx: int, weights: dict):
        attn = config.attn_config
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.num_key_value_heads, config.head_dim
        self.d_model = config.d_model
        self.clip_qkv = attn["clip_qkv"]
        self.qk_ln = attn["qk_ln"]
        self.softmax_scale = attn["softmax_scale"] or 1.0 / math.sqrt(config.d_model / config.n_heads)
        self.w = weights

    def __call__(self, x, bias, causal, cache):
        w = self.w
        qkv = linear(x, w["Wqkv.weight"], w.get("Wqkv.bias"))
        if self.clip_qkv:
            qkv = np.clip(qkv, -self.clip_qkv, self.clip_qkv)
        kv_width = self.n_kv_heads * self.head_dim
        query, key, value = (qkv[..., :self.d_model], qkv[..., self.d_model:self.d_model + kv_width],
                             qkv[..., self.d_model + kv_width:])
        if self.qk_ln:
            # q over d_model; k over d_model (multi-head) or head_dim (multi-query), cast back
            query = layer_norm(query, w["q_ln.weight"], w.get("q_ln.bias"), NORM_EPS).astype(x.dtype)
            key = layer_norm(key, w["k_ln.weight"], w.get("k_ln.bias"), NORM_EPS).astype(x.dtype)
        q, k, v = split_heads(query, self.n_heads), split_heads(key, self.n_kv_heads), split_heads(value, self.n_kv_heads)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        from minivl.attention import scaled_dot_product_attention

        # softmax in float32 only when the float32 bias promoted the scores (see module docstring)
        out = scaled_dot_product_attention(q, k, v, mask=causal, bias=bias, scale=self.softmax_scale,
                                           scale_mode="multiply",
                                           softmax_dtype="float32" if bias is not None else None)
        return linear(merge_heads(out), w["out_proj.weight"], w.get("out_proj.bias"))


class MPTBlock:
    """x + attn(norm_1(x)); then x + down(gelu(up(norm_2(x)))). [b, s, d_model] -> [b, s, d_model]"""

    def __init__(self, config, layer_idx: int, weights: dict):
        self.norm_type = config.norm_type
        self.attn = MPTAttention(config, layer_idx, {k[len("attn."):]: v for k, v in weights.items()
                                                     if k.startswith("attn.")})
        self.w = weights

    def __call__(self, x, bias, causal, cache):
        w = self.w
        x = x + self.attn(mpt_norm(x, w["norm_1.weight"], w.get("norm_1.bias"), self.norm_type), bias, causal, cache)
        m = mpt_norm(x, w["norm_2.weight"], w.get("norm_2.bias"), self.norm_type)
        return x + gelu_mlp(m, w["ffn.up_proj.weight"], w.get("ffn.up_proj.bias"), w["ffn.down_proj.weight"],
                            w.get("ffn.down_proj.bias"), approximate=False)


class MPTForCausalLM:
    """forward(input_ids [b, s] | inputs_embeds [b, s, d_model] (ALiBi only), ...) -> CausalLMOutput"""

    @staticmethod
    def expected_shapes(config) -> dict:
        """{checkpoint key: shape}; biases only without no_bias, norm biases only for LayerNorm, wpe only
        for learned positions, q_ln/k_ln only with qk_ln."""
        d, inner = config.d_model, config.expansion_ratio * config.d_model
        kv_width = config.num_key_value_heads * config.head_dim
        has_bias = not config.no_bias
        norm_bias = has_bias and not config.norm_type.endswith("rmsnorm")
        shapes = {"transformer.wte.weight": (config.vocab_size, d)}
        if config.learned_pos_emb and not config.attn_config["alibi"]:
            shapes["transformer.wpe.weight"] = (config.max_seq_len, d)

        def add(name, out_features, in_features=None, bias=has_bias):
            shapes[name + ".weight"] = (out_features, in_features) if in_features else (out_features,)
            if bias:
                shapes[name + ".bias"] = (out_features,)

        for i in range(config.n_layers):
            p = f"transformer.blocks.{i}."
            add(p + "norm_1", d, bias=norm_bias)
            add(p + "attn.Wqkv", d + 2 * kv_width, d)
            if config.attn_config["qk_ln"]:
                # the block builds nn.LayerNorm here whatever norm_type says
                add(p + "attn.q_ln", d)
                add(p + "attn.k_ln", kv_width)
            add(p + "attn.out_proj", d, d)
            add(p + "norm_2", d, bias=norm_bias)
            add(p + "ffn.up_proj", inner, d)
            add(p + "ffn.down_proj", d, inner)
        add("transformer.norm_f", d, bias=norm_bias)
        return shapes

    @staticmethod
    def check_supported(config) -> None:
        """ConfigError for the training-only MPT options minivl does not implement."""
        unsupported = [name for name in ("prefix_lm", "attn_uses_sequence_id") if config.attn_config[name]]
        if unsupported:
            raise ConfigError(f"MPT: attn_config {unsupported} = true is not implemented in minivl (prefix-LM and "
                              f"packed-sequence masks are training features); set them to false for inference")

    @classmethod
    def from_state_dict(cls, config, state_dict: dict, dtype="float32") -> "MPTForCausalLM":
        """Build from {checkpoint key: array}; every missing/unexpected/mis-shaped tensor is reported at once."""
        cls.check_supported(config)
        check_state_dict(state_dict, cls.expected_shapes(config), where=f"{cls.__name__} checkpoint")
        return cls(config, state_dict, dtype)

    def __init__(self, config, state_dict: dict, dtype="float32"):
        self.config = config
        self.dtype = as_model_dtype(dtype)
        cast = {k: np.ascontiguousarray(np.asarray(v).astype(self.dtype)) for k, v in state_dict.items()}
        self.wte = cast["transformer.wte.weight"]
        self.wpe = cast.get("transformer.wpe.weight")
        self.blocks = []
        for i in range(config.n_layers):
            p = f"transformer.blocks.{i}."
            self.blocks.append(MPTBlock(config, i, {k[len(p):]: v for k, v in cast.items() if k.startswith(p)}))
        self.norm_f_weight, self.norm_f_bias = cast["transformer.norm_f.weight"], cast.get("transformer.norm_f.bias")
        scale = config.logit_scale
        # 'inv_sqrt_d_model' = 1/sqrt(d_model)
        self.logit_scale = 1.0 / math.sqrt(config.d_model) if scale == "inv_sqrt_d_model" else scale

    def __call__(self, *args, **kwargs) -> CausalLMOutput:
        return self.forward(*args, **kwargs)

    def position_limit(self) -> int:
        """max_seq_len: the wpe table's length, and the length the ALiBi bias is built for."""
        return self.config.max_seq_len

    def embed_tokens(self, input_ids) -> np.ndarray:
        """[b, s] int -> [b, s, d_model]: rows of wte (positions are added in forward)."""
        check_token_ids(input_ids, self.config.vocab_size)
        return self.wte[np.asarray(input_ids)]

    def forward(self, input_ids=None, inputs_embeds=None, position_ids=None, attention_mask=None,
                past_key_values=None, use_cache=False, output_hidden_states=False) -> CausalLMOutput:
        """input_ids [b, s] (or inputs_embeds with ALiBi) -> CausalLMOutput(logits [b, s, vocab])

        position_ids (learned positions only) default to MPT's own rule from attention_mask.
        """
        from minivl.attention import KVCache, causal_mask

        config = self.config
        check_inputs(input_ids, inputs_embeds, config.d_model)
        if inputs_embeds is not None and not config.attn_config["alibi"]:
            raise ShapeError("MPT: inputs_embeds are accepted only with ALiBi (the reference refuses them with "
                             "learned positions, MPT-M:169-173); pass input_ids")
        x = self.embed_tokens(input_ids) if input_ids is not None else np.asarray(inputs_embeds).astype(self.dtype)
        batch, seq_len = x.shape[:2]
        cache = past_key_values if past_key_values is not None else (KVCache() if use_cache else None)
        past_len = cache.get_seq_length(0) if cache is not None else 0
        kv_len = past_len + seq_len
        check_attention_mask(attention_mask, batch, kv_len)
        if kv_len > config.max_seq_len:
            raise GenerationError(f"MPT: {kv_len} positions (cached {past_len} + new {seq_len}) exceed max_seq_len="
                                  f"{config.max_seq_len}, the length of the position table / ALiBi bias; "
                                  f"shorten the input")
        if self.wpe is not None:
            if position_ids is None:
                position_ids = mpt_positions(batch, seq_len, past_len, attention_mask)
            position_ids = np.asarray(position_ids, dtype=np.int64)
            if position_ids.shape != (batch, seq_len) or position_ids.min() < 0 or position_ids.max() >= config.max_seq_len:
                raise ShapeError(f"MPT: position_ids must be [batch, seq] = [{batch}, {seq_len}] in "
                                 f"[0, {config.max_seq_len}) (got shape {position_ids.shape})")
            x = x + self.wpe[position_ids]
        fraction = config.embedding_fraction
        if fraction != 1:
            # x·f + x.detach()·(1 − f): the identity in value, kept for its rounding
            x = x * fraction + x * (1 - fraction)

        bias = mpt_attention_bias(config, attention_mask, kv_len, self.dtype)
        # causal triangle (bottom-right aligned); a single query sees every key, as the reference skips it
        mask_dtype = bias.dtype if bias is not None else self.dtype
        causal = None if seq_len == 1 else causal_mask(seq_len, kv_len, mask_dtype)[None, None]
        all_hidden = [x] if output_hidden_states else None
        for block in self.blocks:
            x = block(x, bias, causal, cache)
            if output_hidden_states:
                all_hidden.append(x)
        x = mpt_norm(x, self.norm_f_weight, self.norm_f_bias, config.norm_type)
        if output_hidden_states:
            all_hidden.append(x)
        # tied unembedding h·wteᵀ in the model dtype, then · logit_scale; logits returned in float32
        logits = linear(x, self.wte)
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        return CausalLMOutput(logits=logits.astype(compute_dtype(self.dtype)),
                              past_key_values=cache if (use_cache or past_key_values is not None) else None,
                              hidden_states=tuple(all_hidden) if output_hidden_states else None)
