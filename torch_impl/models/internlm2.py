"""InternLM2 / InternLM2.5 in PyTorch: the mirror of minivl/models/internlm2.py.

Module names follow the checkpoint keys: model.tok_embeddings, model.layers.{i}.attention.{wqkv,wo},
model.layers.{i}.feed_forward.{w1,w3,w2}, model.layers.{i}.{attention_norm,ffn_norm}, model.norm, output.
"""
from __future__ import annotations

import torch
from torch import nn

from torch_impl.models.common import Embedding, Linear, Norm, rope_attention
from torch_impl.models.decoder import DecoderLM
from torch_impl.models.fused import fuse_linears, project


def split_wqkv(qkv: torch.Tensor, n_kv_heads: int, group: int, head_dim: int):
    """Undo the per-KV-head grouping of wqkv's output.

    [b, s, (H + 2K)·D] -> q [b, H, s, D], k [b, K, s, D], v [b, K, s, D]   (H = K·G)
    """
    b, s, _ = qkv.shape
    # 'b s (h gs d) -> b s h gs d' with gs = G + 2 slots per KV head
    grouped = qkv.view(b, s, n_kv_heads, group + 2, head_dim)
    # query head k·G + j sits in slot j of block k: flattening (k, j) keeps that order
    q = grouped[:, :, :, :group].reshape(b, s, n_kv_heads * group, head_dim)
    k = grouped[:, :, :, group]
    v = grouped[:, :, :, group + 1]
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


class InternLM2Attention(nn.Module):
    """wqkv -> split per KV head -> RoPE -> cache -> attention -> wo.  [b, s, hidden] -> [b, s, hidden]"""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_kv_heads, self.group, self.head_dim = (config.num_key_value_heads, config.num_key_value_groups,
                                                      config.head_dim)
        n_heads = config.num_attention_heads
        self.wqkv = Linear(config.hidden_size, (n_heads + 2 * self.n_kv_heads) * self.head_dim, config.bias)
        self.wo = Linear(n_heads * self.head_dim, config.hidden_size, config.bias)

    def forward(self, x, rope, attn: dict, cache):
        q, k, v = split_wqkv(self.wqkv(x), self.n_kv_heads, self.group, self.head_dim)
        out, probs = rope_attention(q, k, v, rope, attn, cache, self.layer_idx)
        return self.wo(out), probs


class InternLM2MLP(nn.Module):
    """w2(silu(w1(x)) · w3(x)): w1 = gate, w3 = up, w2 = down. [b, s, hidden] -> [b, s, hidden]"""

    def __init__(self, config):
        super().__init__()
        self.w1 = Linear(config.hidden_size, config.intermediate_size, False)
        self.w3 = Linear(config.hidden_size, config.intermediate_size, False)
        self.w2 = Linear(config.intermediate_size, config.hidden_size, False)

    def fuse_projections(self):
        """w1/w3 weights as views of one matrix: one GEMM for the two (see FusedProjection)."""
        fuse_linears(self.w1, self.w3)

    def forward(self, x):
        from torch_impl.activations import silu_mul

        gate, up = project(x, self.w1, self.w3)
        # w2(silu(w1(x)) · w3(x))
        return self.w2(silu_mul(gate, up))


class InternLM2DecoderLayer(nn.Module):
    """x + attention(attention_norm(x)), then + feed_forward(ffn_norm(·)). [b, s, hidden] -> same"""

    sliding_window = None

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.attention = InternLM2Attention(config, layer_idx)
        self.feed_forward = InternLM2MLP(config)
        self.attention_norm = Norm(config.hidden_size, config.rms_norm_eps)
        self.ffn_norm = Norm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, rope, attn: dict, cache):
        attn_out, probs = self.attention(self.attention_norm(x), rope, attn, cache)
        h = x + attn_out
        return h + self.feed_forward(self.ffn_norm(h)), probs


class InternLM2Model(nn.Module):
    """tok_embeddings, layers, norm: the parts DecoderLM runs."""

    def __init__(self, config):
        super().__init__()
        self.tok_embeddings = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(InternLM2DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = Norm(config.hidden_size, config.rms_norm_eps)


class InternLM2ForCausalLM(DecoderLM):
    """forward(input_ids [b, s] | inputs_embeds [b, s, hidden], ...) -> CausalLMOutput(logits [b, s, vocab])"""

    embed_path, layers_path, norm_path, head_path = "model.tok_embeddings", "model.layers", "model.norm", "output"

    def __init__(self, config, attn_implementation: str = "eager"):
        super().__init__(config, attn_implementation)
        self.model = InternLM2Model(config)
        self.output = Linear(config.hidden_size, config.vocab_size, False)
