"""Phi-3, as InternVL's vendored `modeling_phi3.py` (InternVL2-4B, Mini-InternVL-Chat-4B-V1-5).

The Llama recipe with two fused projections and Phi-3's long-context RoPE:
* `qkv_proj` rows are plain [Q | K | V] (H·D, K·D, K·D rows; heads contiguous) (MP3:355-359);
* `gate_up_proj` rows are [gate | up]; out = down(up · silu(gate)) (MP3:262-273);
* RoPE 'su' (LongRoPE) or Phi-3's own 'yarn' (same factor lists, magnitude 0.1·ln(M/O)+1, no
  ramp): on EVERY forward, seq_len = max(position_ids)+1 over the whole batch picks the long
  factors if seq_len > original_max_position_embeddings, else the short ones, and both cos and
  sin are multiplied by the scale. A prompt prefilled short and decoded past the threshold keeps
  its short-rotated keys in the cache while new tokens use the long factors (MP3:148-177);
* an optional sliding window (visible keys: pos − w < j <= pos) on every layer.

Checkpoint keys: model.embed_tokens.weight, model.layers.{i}.self_attn.{qkv_proj,o_proj}.weight,
model.layers.{i}.mlp.{gate_up_proj,down_proj}.weight, model.layers.{i}.{input,post_attention}_layernorm.weight,
model.norm.weight, lm_head.weight. No biases anywhere.
"""
from __future__ import annotations

import numpy as np

from minivl.checkpoint import check_state_dict
from minivl.linear import linear
from minivl.mlp import fused_swiglu_mlp
from minivl.models.common import (DecoderLM, RotaryEmbedding, as_model_dtype, check_token_ids, rope_attention,
                                  split_heads, take_weights)
from minivl.norms import rms_norm


class Phi3Attention:
    """qkv_proj -> [Q | K | V] -> RoPE -> cache -> attention -> o_proj.  [b, s, hidden] -> [b, s, hidden]"""

    def __init__(self, config, layer_idx: int, weights: dict):
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.w = weights

    def __call__(self, x, cos, sin, mask, cache):
        qkv = linear(x, self.w["qkv_proj.weight"])
        q_width, kv_width = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        # rows [0, H·D) are Q, the next K·D are K, the last K·D are V
        q = split_heads(qkv[..., :q_width], self.n_heads)
        k = split_heads(qkv[..., q_width:q_width + kv_width], self.n_kv_heads)
        v = split_heads(qkv[..., q_width + kv_width:], self.n_kv_heads)
        out = rope_attention(q, k, v, cos, sin, mask, cache, self.layer_idx)
        return linear(out, self.w["o_proj.weight"])


class Phi3DecoderLayer:
    """h = x + attn(input_layernorm(x)); out = h + mlp(post_attention_layernorm(h)). [b, s, hidden] -> same"""

    def __init__(self, config, layer_idx: int, weights: dict):
        self.eps = config.rms_norm_eps
        self.sliding_window = config.sliding_window
        self.self_attn = Phi3Attention(config, layer_idx, {k[len("self_attn."):]: v for k, v in weights.items()
                                                           if k.startswith("self_attn.")})
        self.w = weights

    def __call__(self, x, cos, sin, mask, cache):
        w = self.w
        # resid_pdrop dropout is the identity at inference
        h = x + self.self_attn(rms_norm(x, w["input_layernorm.weight"], self.eps), cos, sin, mask, cache)
        return h + fused_swiglu_mlp(rms_norm(h, w["post_attention_layernorm.weight"], self.eps),
                                    w["mlp.gate_up_proj.weight"], w["mlp.down_proj.weight"])


class Phi3ForCausalLM(DecoderLM):
    """forward(input_ids [b, s] | inputs_embeds [b, s, hidden], ...) -> CausalLMOutput(logits [b, s, vocab])"""

    @classmethod
    def expected_shapes(cls, config) -> dict:
        """{checkpoint key: shape}: fused qkv [(H+2K)·D, hidden], fused gate_up [2I, hidden], untied head."""
        hidden, inter, d = config.hidden_size, config.intermediate_size, config.head_dim
        n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
        shapes = {"model.embed_tokens.weight": (config.vocab_size, hidden), "model.norm.weight": (hidden,),
                  "lm_head.weight": (config.vocab_size, hidden)}
        for i in range(config.num_hidden_layers):
            p = f"model.layers.{i}."
            shapes[p + "self_attn.qkv_proj.weight"] = ((n_heads + 2 * n_kv) * d, hidden)
            shapes[p + "self_attn.o_proj.weight"] = (hidden, n_heads * d)
            shapes[p + "mlp.gate_up_proj.weight"] = (2 * inter, hidden)
            shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
            shapes[p + "input_layernorm.weight"] = (hidden,)
            shapes[p + "post_attention_layernorm.weight"] = (hidden,)
        return shapes

    @classmethod
    def from_state_dict(cls, config, state_dict: dict, dtype="float32") -> "Phi3ForCausalLM":
        """Build from {checkpoint key: array}; every missing/unexpected/mis-shaped tensor is reported at once."""
        check_state_dict(state_dict, cls.expected_shapes(config), where=f"{cls.__name__} checkpoint")
        return cls(config, state_dict, dtype)

    def __init__(self, config, state_dict: dict, dtype="float32"):
        self.config = config
        self.dtype = as_model_dtype(dtype)
        self.embed_weight = take_weights(state_dict, "model.", ["embed_tokens.weight"], self.dtype)["embed_tokens.weight"]
        names = ["self_attn.qkv_proj.weight", "self_attn.o_proj.weight", "mlp.gate_up_proj.weight",
                 "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight"]
        self.layers = [Phi3DecoderLayer(config, i, take_weights(state_dict, f"model.layers.{i}.", names, self.dtype))
                       for i in range(config.num_hidden_layers)]
        self.norm_weight = take_weights(state_dict, "model.", ["norm.weight"], self.dtype)["norm.weight"]
        self.lm_head_weight = take_weights(state_dict, "", ["lm_head.weight"], self.dtype)["lm_head.weight"]
        self.rotary = RotaryEmbedding(config.rope_kwargs(), self.dtype)

    def embed_tokens(self, input_ids) -> np.ndarray:
        """[b, s] int -> [b, s, hidden] (embd_pdrop is never applied, as in the reference's forward)."""
        check_token_ids(input_ids, self.config.vocab_size)
        return self.embed_weight[np.asarray(input_ids)]

    def final_norm(self, hidden):
        return rms_norm(hidden, self.norm_weight, self.config.rms_norm_eps)

    def lm_head(self, hidden):
        return linear(hidden, self.lm_head_weight)
