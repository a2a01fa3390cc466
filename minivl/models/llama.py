"""Llama, as transformers' `LlamaForCausalLM` (the 4.37.2 eager path InternVL runs).

embed -> L x [h = x + o_proj(attn(input_layernorm(x))); out = h + down(silu(gate(h')) · up(h'))]
-> norm -> lm_head, with h' = post_attention_layernorm(h). Separate q/k/v/o projections (biased
iff `attention_bias`), rotate-half RoPE, GQA, float32 softmax, float32 logits.

Checkpoint keys: model.embed_tokens.weight, model.layers.{i}.self_attn.{q,k,v,o}_proj.weight,
model.layers.{i}.mlp.{gate,up,down}_proj.weight, model.layers.{i}.{input,post_attention}_layernorm.weight,
model.norm.weight, lm_head.weight (absent when tie_word_embeddings: the head is embed_tokens).
Qwen2 (qwen2.py) is this model with biases on q/k/v and an optional sliding window.
"""
from __future__ import annotations

import numpy as np

from minivl.checkpoint import check_state_dict
from minivl.errors import CheckpointError
from minivl.linear import linear
from minivl.mlp import swiglu_mlp
from minivl.models.common import (DecoderLM, RotaryEmbedding, as_model_dtype, check_token_ids, rope_attention,
                                  split_heads, take_weights)
from minivl.norms import rms_norm


class LlamaAttention:
    """q/k/v/o projections around the shared RoPE attention core.

    [b, s, hidden] -> [b, s, hidden]
    """

    def __init__(self, config, layer_idx: int, weights: dict):
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.w = weights  # q_proj.weight, q_proj.bias (if any), ...

    def __call__(self, x, cos, sin, mask, cache):
        w = self.w
        # q = x·Wqᵀ + bq -> [b, H, s, d];  k, v -> [b, K, s, d]
        q = split_heads(linear(x, w["q_proj.weight"], w.get("q_proj.bias")), self.n_heads)
        k = split_heads(linear(x, w["k_proj.weight"], w.get("k_proj.bias")), self.n_kv_heads)
        v = split_heads(linear(x, w["v_proj.weight"], w.get("v_proj.bias")), self.n_kv_heads)
        out = rope_attention(q, k, v, cos, sin, mask, cache, self.layer_idx)
        return linear(out, w["o_proj.weight"], w.get("o_proj.bias"))


class LlamaDecoderLayer:
    """x + attn(input_layernorm(x)), then + mlp(post_attention_layernorm(·)).

    [b, s, hidden] -> [b, s, hidden]
    """

    def __init__(self, config, layer_idx: int, weights: dict, sliding_window=None):
        self.eps = config.rms_norm_eps
        self.sliding_window = sliding_window
        self.self_attn = LlamaAttention(config, layer_idx, {k[len("self_attn."):]: v for k, v in weights.items()
                                                            if k.startswith("self_attn.")})
        self.w = weights

    def __call__(self, x, cos, sin, mask, cache):
        w = self.w
        h = x + self.self_attn(rms_norm(x, w["input_layernorm.weight"], self.eps), cos, sin, mask, cache)
        # SwiGLU: down(silu(gate(h)) · up(h))
        return h + swiglu_mlp(rms_norm(h, w["post_attention_layernorm.weight"], self.eps),
                              w["mlp.gate_proj.weight"], w["mlp.up_proj.weight"], w["mlp.down_proj.weight"])


class LlamaForCausalLM(DecoderLM):
    """Llama decoder with its LM head. See the module docstring for the key layout.

    forward(input_ids [b, s] | inputs_embeds [b, s, hidden], ...) -> CausalLMOutput(logits [b, s, vocab])
    """

    # which projections carry a bias: Llama follows config.attention_bias for all four
    @staticmethod
    def projection_biases(config) -> dict:
        bias = bool(getattr(config, "attention_bias", False))
        return {"q_proj": bias, "k_proj": bias, "v_proj": bias, "o_proj": bias}

    @classmethod
    def layer_sliding_window(cls, config, layer_idx: int):
        return None

    @classmethod
    def expected_shapes(cls, config) -> dict:
        """{checkpoint key: shape} of every tensor the checkpoint must hold (lm_head only if untied)."""
        hidden, inter, d = config.hidden_size, config.intermediate_size, config.head_dim
        n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
        out_features = {"q_proj": n_heads * d, "k_proj": n_kv * d, "v_proj": n_kv * d, "o_proj": hidden}
        in_features = {"q_proj": hidden, "k_proj": hidden, "v_proj": hidden, "o_proj": n_heads * d}
        shapes = {"model.embed_tokens.weight": (config.vocab_size, hidden), "model.norm.weight": (hidden,)}
        for i in range(config.num_hidden_layers):
            p = f"model.layers.{i}."
            for name, has_bias in cls.projection_biases(config).items():
                shapes[f"{p}self_attn.{name}.weight"] = (out_features[name], in_features[name])
                if has_bias:
                    shapes[f"{p}self_attn.{name}.bias"] = (out_features[name],)
            shapes[f"{p}mlp.gate_proj.weight"] = (inter, hidden)
            shapes[f"{p}mlp.up_proj.weight"] = (inter, hidden)
            shapes[f"{p}mlp.down_proj.weight"] = (hidden, inter)
            shapes[f"{p}input_layernorm.weight"] = (hidden,)
            shapes[f"{p}post_attention_layernorm.weight"] = (hidden,)
        if not config.tie_word_embeddings:
            shapes["lm_head.weight"] = (config.vocab_size, hidden)
        return shapes

    @classmethod
    def from_state_dict(cls, config, state_dict: dict, dtype="float32") -> "LlamaForCausalLM":
        """Build from {checkpoint key: array}; every missing/unexpected/mis-shaped tensor is reported at once."""
        state_dict = dict(state_dict)
        head = state_dict.pop("lm_head.weight", None) if config.tie_word_embeddings else None
        check_state_dict(state_dict, cls.expected_shapes(config), where=f"{cls.__name__} checkpoint")
        if head is not None and tuple(head.shape) != (config.vocab_size, config.hidden_size):
            raise CheckpointError(f"{cls.__name__}: lm_head.weight has shape {tuple(head.shape)}, expected "
                                  f"{(config.vocab_size, config.hidden_size)}")
        if head is not None:
            state_dict["lm_head.weight"] = head
        return cls(config, state_dict, dtype)

    def __init__(self, config, state_dict: dict, dtype="float32"):
        self.config = config
        self.dtype = as_model_dtype(dtype)
        self.embed_weight = take_weights(state_dict, "model.", ["embed_tokens.weight"], self.dtype)["embed_tokens.weight"]
        names = [f"self_attn.{p}.{t}" for p in ("q_proj", "k_proj", "v_proj", "o_proj") for t in ("weight", "bias")]
        names += [f"mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")]
        names += ["input_layernorm.weight", "post_attention_layernorm.weight"]
        self.layers = [LlamaDecoderLayer(config, i, take_weights(state_dict, f"model.layers.{i}.", names, self.dtype),
                                         sliding_window=self.layer_sliding_window(config, i))
                       for i in range(config.num_hidden_layers)]
        self.norm_weight = take_weights(state_dict, "model.", ["norm.weight"], self.dtype)["norm.weight"]
        # tied: the unembedding IS the embedding table (same array, no copy)
        head = take_weights(state_dict, "", ["lm_head.weight"], self.dtype).get("lm_head.weight")
        self.lm_head_weight = head if head is not None else self.embed_weight
        self.rotary = RotaryEmbedding(config.rope_kwargs(), self.dtype)

    def embed_tokens(self, input_ids) -> np.ndarray:
        """[b, s] int -> [b, s, hidden]: rows of the embedding table (no scaling)."""
        check_token_ids(input_ids, self.config.vocab_size)
        return self.embed_weight[np.asarray(input_ids)]

    def final_norm(self, hidden):
        return rms_norm(hidden, self.norm_weight, self.config.rms_norm_eps)

    def lm_head(self, hidden):
        return linear(hidden, self.lm_head_weight)
