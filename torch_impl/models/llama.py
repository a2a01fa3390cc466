"""Llama, as transformers' `LlamaForCausalLM`, in PyTorch: the mirror of minivl/models/llama.py.

Module names follow the checkpoint keys: model.embed_tokens, model.layers.{i}.self_attn.{q,k,v,o}_proj,
model.layers.{i}.mlp.{gate,up,down}_proj, model.layers.{i}.{input,post_attention}_layernorm,
model.norm, lm_head (the same tensor as model.embed_tokens.weight when tied).
"""
from __future__ import annotations

import torch
from torch import nn

from minivl.errors import CheckpointError
from minivl.models.llama import LlamaForCausalLM as _NumpyLlama
from torch_impl.checkpoint import check_state_dict
from torch_impl.models.common import (DecoderLM, Embedding, Linear, Norm, RotaryEmbedding, as_torch_dtype,
                                      build_on_meta, check_attn_implementation, check_token_ids, rope_attention,
                                      split_heads)


class LlamaAttention(nn.Module):
    """[b, s, hidden] -> [b, s, hidden]"""

    def __init__(self, config, layer_idx: int, biases: dict):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads = config.num_attention_heads, config.num_key_value_heads
        hidden, d = config.hidden_size, config.head_dim
        self.q_proj = Linear(hidden, self.n_heads * d, biases["q_proj"])
        self.k_proj = Linear(hidden, self.n_kv_heads * d, biases["k_proj"])
        self.v_proj = Linear(hidden, self.n_kv_heads * d, biases["v_proj"])
        self.o_proj = Linear(self.n_heads * d, hidden, biases["o_proj"])

    def forward(self, x, cos, sin, attn: dict, cache):
        q = split_heads(self.q_proj(x), self.n_heads)
        k = split_heads(self.k_proj(x), self.n_kv_heads)
        v = split_heads(self.v_proj(x), self.n_kv_heads)
        out = rope_attention(q, k, v, cos, sin, attn, cache, self.layer_idx)
        return self.o_proj(out)


class LlamaMLP(nn.Module):
    """down(silu(gate(x)) · up(x)). [b, s, hidden] -> [b, s, hidden]"""

    def __init__(self, config):
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, False)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, False)

    def forward(self, x):
        from torch_impl.mlp import swiglu_mlp

        return swiglu_mlp(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)


class LlamaDecoderLayer(nn.Module):
    """x + attn(input_layernorm(x)), then + mlp(post_attention_layernorm(·)). [b, s, hidden] -> [b, s, hidden]"""

    def __init__(self, config, layer_idx: int, biases: dict, sliding_window=None):
        super().__init__()
        self.sliding_window = sliding_window
        self.self_attn = LlamaAttention(config, layer_idx, biases)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = Norm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = Norm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, attn: dict, cache):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, attn, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, config, layer_biases: dict, windows: list):
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i, layer_biases, windows[i])
                                    for i in range(config.num_hidden_layers))
        self.norm = Norm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(DecoderLM):
    """forward(input_ids [b, s] | inputs_embeds [b, s, hidden], ...) -> CausalLMOutput(logits [b, s, vocab])"""

    projection_biases = staticmethod(_NumpyLlama.projection_biases)
    layer_sliding_window = _NumpyLlama.layer_sliding_window
    expected_shapes = _NumpyLlama.expected_shapes

    def __init__(self, config, attn_implementation: str = "eager"):
        super().__init__()
        self.config = config
        self.attn_implementation = check_attn_implementation(attn_implementation)
        windows = [self.layer_sliding_window(config, i) for i in range(config.num_hidden_layers)]
        self.model = LlamaModel(config, self.projection_biases(config), windows)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, False)

    @classmethod
    def from_state_dict(cls, config, state_dict: dict, dtype="float32", device="cpu",
                        attn_implementation: str = "eager") -> "LlamaForCausalLM":
        """Build from {checkpoint key: tensor}; every missing/unexpected/mis-shaped tensor is reported at once."""
        state_dict = dict(state_dict)
        head = state_dict.pop("lm_head.weight", None) if config.tie_word_embeddings else None
        check_state_dict(state_dict, cls.expected_shapes(config), where=f"{cls.__name__} checkpoint")
        tied = None
        if head is not None:
            if tuple(head.shape) != (config.vocab_size, config.hidden_size):
                raise CheckpointError(f"{cls.__name__}: lm_head.weight has shape {tuple(head.shape)}, expected "
                                      f"{(config.vocab_size, config.hidden_size)}")
            state_dict["lm_head.weight"] = head
        elif config.tie_word_embeddings:
            tied = {"lm_head.weight": "model.embed_tokens.weight"}
        dtype = as_torch_dtype(dtype)
        model = build_on_meta(cls, config, state_dict, dtype, device, tied=tied,
                              attn_implementation=attn_implementation)
        model.rotary = RotaryEmbedding(config.rope_kwargs(), dtype)
        return model

    def decoder_layers(self):
        return list(self.model.layers)

    def final_norm_module(self):
        return self.model.norm

    def embed_tokens(self, input_ids) -> torch.Tensor:
        """[b, s] int -> [b, s, hidden]"""
        input_ids = torch.as_tensor(input_ids, device=self.device)
        check_token_ids(input_ids, self.config.vocab_size)
        return self.model.embed_tokens(input_ids)
