"""InternLM2 / InternLM2.5 in PyTorch: the mirror of minivl/models/internlm2.py.

Module names follow the checkpoint keys: model.tok_embeddings, model.layers.{i}.attention.{wqkv,wo},
model.layers.{i}.feed_forward.{w1,w3,w2}, model.layers.{i}.{attention_norm,ffn_norm}, model.norm, output.
"""
from __future__ import annotations

import torch
from torch import nn

from minivl.models.internlm2 import InternLM2ForCausalLM as _NumpyInternLM2
from torch_impl.checkpoint import check_state_dict
from torch_impl.models.common import (DecoderLM, Embedding, Linear, Norm, RotaryEmbedding, as_torch_dtype,
                                      build_on_meta, check_attn_implementation, check_token_ids, rope_attention)


def split_wqkv(qkv: torch.Tensor, n_kv_heads: int, group: int, head_dim: int):
    """[b, s, (H + 2K)·D] -> q [b, H, s, D], k [b, K, s, D], v [b, K, s, D] (wqkv grouped per KV head)"""
    b, s, _ = qkv.shape
    grouped = qkv.view(b, s, n_kv_heads, group + 2, head_dim)
    q = grouped[:, :, :, :group].reshape(b, s, n_kv_heads * group, head_dim)
    k = grouped[:, :, :, group]
    v = grouped[:, :, :, group + 1]
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


class InternLM2Attention(nn.Module):
    """[b, s, hidden] -> [b, s, hidden]"""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_kv_heads, self.group, self.head_dim = (config.num_key_value_heads, config.num_key_value_groups,
                                                      config.head_dim)
        n_heads = config.num_attention_heads
        self.wqkv = Linear(config.hidden_size, (n_heads + 2 * self.n_kv_heads) * self.head_dim, config.bias)
        self.wo = Linear(n_heads * self.head_dim, config.hidden_size, config.bias)

    def forward(self, x, cos, sin, attn: dict, cache):
        q, k, v = split_wqkv(self.wqkv(x), self.n_kv_heads, self.group, self.head_dim)
        return self.wo(rope_attention(q, k, v, cos, sin, attn, cache, self.layer_idx))


class InternLM2MLP(nn.Module):
    """w2(silu(w1(x)) · w3(x)). [b, s, hidden] -> [b, s, hidden]"""

    def __init__(self, config):
        super().__init__()
        self.w1 = Linear(config.hidden_size, config.intermediate_size, False)
        self.w3 = Linear(config.hidden_size, config.intermediate_size, False)
        self.w2 = Linear(config.intermediate_size, config.hidden_size, False)

    def forward(self, x):
        from torch_impl.mlp import swiglu_mlp

        return swiglu_mlp(x, self.w1.weight, self.w3.weight, self.w2.weight)


class InternLM2DecoderLayer(nn.Module):
    """x + attention(attention_norm(x)), then + feed_forward(ffn_norm(·)). [b, s, hidden] -> same"""

    sliding_window = None

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.attention = InternLM2Attention(config, layer_idx)
        self.feed_forward = InternLM2MLP(config)
        self.attention_norm = Norm(config.hidden_size, config.rms_norm_eps)
        self.ffn_norm = Norm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, attn: dict, cache):
        h = x + self.attention(self.attention_norm(x), cos, sin, attn, cache)
        return h + self.feed_forward(self.ffn_norm(h))


class InternLM2Model(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.tok_embeddings = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(InternLM2DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = Norm(config.hidden_size, config.rms_norm_eps)


class InternLM2ForCausalLM(DecoderLM):
    """forward(input_ids [b, s] | inputs_embeds [b, s, hidden], ...) -> CausalLMOutput(logits [b, s, vocab])"""

    expected_shapes = _NumpyInternLM2.expected_shapes

    def __init__(self, config, attn_implementation: str = "eager"):
        super().__init__()
        self.config = config
        self.attn_implementation = check_attn_implementation(attn_implementation)
        self.model = InternLM2Model(config)
        self.output = Linear(config.hidden_size, config.vocab_size, False)

    @classmethod
    def from_state_dict(cls, config, state_dict: dict, dtype="float32", device="cpu",
                        attn_implementation: str = "eager") -> "InternLM2ForCausalLM":
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
        return self.model.tok_embeddings(input_ids)

    def lm_head(self, hidden):
        return self.output(hidden)
