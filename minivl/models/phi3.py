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

Module names follow the checkpoint keys: model.embed_tokens, model.layers.{i}.self_attn.{qkv_proj,o_proj},
model.layers.{i}.mlp.{gate_up_proj,down_proj}, model.layers.{i}.{input,post_attention}_layernorm,
model.norm, lm_head. No biases anywhere.
"""
from __future__ import annotations

from minivl import nn
from minivl.models.common import Linear, rope_attention, split_heads
from minivl.models.llama import LlamaForCausalLM


class Phi3Attention(nn.Module):
    """qkv_proj -> [Q | K | V] -> RoPE -> cache -> attention -> o_proj.  [b, s, hidden] -> [b, s, hidden]"""

    def __init__(self, config, layer_idx: int, biases: dict):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                        config.head_dim)
        self.qkv_proj = Linear(config.hidden_size, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim,
                               biases["qkv_proj"])
        self.o_proj = Linear(self.n_heads * self.head_dim, config.hidden_size, biases["o_proj"])

    def forward(self, x, rope, attn: dict, cache):
        qkv = self.qkv_proj(x)
        q_width, kv_width = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        # rows [0, H·D) are Q, the next K·D are K, the last K·D are V
        q = split_heads(qkv[..., :q_width], self.n_heads)
        k = split_heads(qkv[..., q_width:q_width + kv_width], self.n_kv_heads)
        v = split_heads(qkv[..., q_width + kv_width:], self.n_kv_heads)
        out, probs = rope_attention(q, k, v, rope, attn, cache, self.layer_idx)
        return self.o_proj(out), probs


class Phi3MLP(nn.Module):
    """down(up · silu(gate)), gate_up_proj rows = [gate | up]. [b, s, hidden] -> [b, s, hidden]"""

    def __init__(self, config):
        super().__init__()
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size, False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, False)

    def forward(self, x):
        from minivl.mlp import fused_swiglu_mlp

        return fused_swiglu_mlp(x, self.gate_up_proj.weight, self.down_proj.weight)


class Phi3ForCausalLM(LlamaForCausalLM):
    """Llama's blocks (same names, same forward: resid_pdrop and embd_pdrop are the identity at
    inference) around Phi-3's fused attention and MLP, a window on every layer, no biases.

    forward(input_ids [b, s] | inputs_embeds [b, s, hidden], ...) -> CausalLMOutput(logits [b, s, vocab])
    """

    attention_class, mlp_class = Phi3Attention, Phi3MLP

    @staticmethod
    def projection_biases(config) -> dict:
        return {"qkv_proj": False, "o_proj": False}

    @staticmethod
    def layer_sliding_window(config, layer_idx: int):
        # visible keys pos − w < j <= pos on every layer (None: the whole past)
        return config.sliding_window
