"""Phi-3 in PyTorch: the mirror of minivl/models/phi3.py.

Module names follow the checkpoint keys: model.embed_tokens, model.layers.{i}.self_attn.{qkv_proj,o_proj},
model.layers.{i}.mlp.{gate_up_proj,down_proj}, model.layers.{i}.{input,post_attention}_layernorm,
model.norm, lm_head.
"""
from __future__ import annotations

import torch
from torch import nn

from minivl.models.phi3 import Phi3ForCausalLM as _NumpyPhi3
from torch_impl.checkpoint import check_state_dict
from torch_impl.models.common import (DecoderLM, Embedding, Linear, Norm, RotaryEmbedding, as_torch_dtype,
                                      build_on_meta, check_attn_implementation, check_token_ids, rope_attention,
                                      split_heads)


class Phi3Attention(nn.Module):
    """[b, s, hidden] -> [b, s, hidden]"""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                        config.head_dim)
        self.qkv_proj = Linear(config.hidden_size, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim, False)
        self.o_proj = Linear(self.n_heads * self.head_dim, config.hidden_size, False)

    def forward(self, x, cos, sin, attn: dict, cache):
        qkv = self.qkv_proj(x)
        q_width, kv_width = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q = split_heads(qkv[..., :q_width], self.n_heads)
        k = split_heads(qkv[..., q_width:q_width + kv_width], self.n_kv_heads)
        v = split_heads(qkv[..., q_width + kv_width:], self.n_kv_heads)
        return self.o_proj(rope_attention(q, k, v, cos, sin, attn, cache, self.layer_idx))


class Phi3MLP(nn.Module):
    """down(up · silu(gate)), gate_up_proj rows = [gate | up]. [b, s, hidden] -> [b, s, hidden]"""

    def __init__(self, config):
        super().__init__()
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size, False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, False)

    def forward(self, x):
        from torch_impl.mlp import fused_swiglu_mlp

        return fused_swiglu_mlp(x, self.gate_up_proj.weight, self.down_proj.weight)


class Phi3DecoderLayer(nn.Module):
    """x + attn(input_layernorm(x)), then + mlp(post_attention_layernorm(·)). [b, s, hidden] -> same"""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.sliding_window = config.sliding_window
        self.self_attn = Phi3Attention(config, layer_idx)
        self.mlp = Phi3MLP(config)
        self.input_layernorm = Norm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = Norm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, attn: dict, cache):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, attn, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Phi3Model(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Phi3DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = Norm(config.hidden_size, config.rms_norm_eps)


class Phi3ForCausalLM(DecoderLM):
    """forward(input_ids [b, s] | inputs_embeds [b, s, hidden], ...) -> CausalLMOutput(logits [b, s, vocab])"""

    expected_shapes = _NumpyPhi3.expected_shapes

    def __init__(self, config, attn_implementation: str = "eager"):
        super().__init__()
        self.config = config
        self.attn_implementation = check_attn_implementation(attn_implementation)
        self.model = Phi3Model(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, False)

    @classmethod
    def from_state_dict(cls, config, state_dict: dict, dtype="float32", device="cpu",
                        attn_implementation: str = "eager") -> "Phi3ForCausalLM":
        check_state_dict(state_dict, cls.expected_shapes(config), where=f"{cls.__name__} checkpoint")
        dtype = as_torch_dtype(dtype)
        model = build_on_meta(cls, config, state_dict, dtype, device, attn_implementation=attn_implementation)
        model.rotary = RotaryEmbedding(config.rope_kwargs(), dtype)
        return model

    def decoder_layers(self):
        return list(self.model.layers)

    def final_norm_module(self):
        return self.model.norm

    def embed_tokens(self, input_ids) -> torch.Tensor:
        input_ids = torch.as_tensor(input_ids, device=self.device)
        check_token_ids(input_ids, self.config.vocab_size)
        return self.model.embed_tokens(input_ids)
