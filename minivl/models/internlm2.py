"""InternLM2 / InternLM2.5, as InternVL's vendored `modeling_internlm2.py` (InternVL2-2B/8B/26B, V1-5).

The Llama recipe (pre-norm RMSNorm, RoPE, GQA, SwiGLU, float32 logits) with InternLM's own
key names and ONE fused projection `wqkv` whose rows are grouped per KV head:

    wqkv rows = [q_{0}, …, q_{G-1}, k_0, v_0 | q_{G}, …, q_{2G-1}, k_1, v_1 | …]   (each block D rows)

i.e. the output viewed as [K, G+2, D]: slots 0…G-1 are the query heads k·G … k·G+G-1 served by
KV head k, slot G is key head k, slot G+1 is value head k (MIL:375-385). It is NOT [Q | K | V].

RoPE: default, linear (positions / factor), or dynamic NTK with the reference's state: the base is
enlarged from kv_seq_len (cached + new keys) once that exceeds max_position_embeddings, and never
reset (`minivl.rope.DynamicNTKRope`). The reference keeps one rotary module per layer; all of them
see the same kv_seq_len, so one shared instance gives the same tables.

Module names follow the checkpoint keys: model.tok_embeddings, model.layers.{i}.attention.{wqkv,wo}
(biased iff config.bias), model.layers.{i}.feed_forward.{w1,w3,w2} (gate, up, down),
model.layers.{i}.{attention_norm,ffn_norm}, model.norm, output.
"""
from __future__ import annotations

import numpy as np

from minivl import nn
from minivl.models.common import Embedding, Linear, Norm, rope_attention
from minivl.models.decoder import DecoderLM
from minivl.models.fused import fuse_linears, project


def split_wqkv(qkv: np.ndarray, n_kv_heads: int, group: int, head_dim: int):
    """Undo the per-KV-head grouping of wqkv's output.

    [b, s, (H + 2K)·D] -> q [b, H, s, D], k [b, K, s, D], v [b, K, s, D]   (H = K·G)
    """
    b, s, _ = qkv.shape
    # 'b s (h gs d) -> b s h gs d' with gs = G + 2 slots per KV head
    grouped = qkv.reshape(b, s, n_kv_heads, group + 2, head_dim)
    # query head k·G + j sits in slot j of block k: flattening (k, j) keeps that order
    q = grouped[:, :, :, :group].reshape(b, s, n_kv_heads * group, head_dim)
    k = grouped[:, :, :, group]
    v = grouped[:, :, :, group + 1]
    return q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


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
        from minivl.activations import silu_mul

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

    def __init__(self, config):
        super().__init__(config)
        self.model = InternLM2Model(config)
        self.output = Linear(config.hidden_size, config.vocab_size, False)
