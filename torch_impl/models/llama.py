"""Llama, as transformers' `LlamaForCausalLM`, in PyTorch: the mirror of minivl/models/llama.py.

Module names follow the checkpoint keys: model.embed_tokens, model.layers.{i}.self_attn.{q,k,v,o}_proj,
model.layers.{i}.mlp.{gate,up,down}_proj, model.layers.{i}.{input,post_attention}_layernorm,
model.norm, lm_head (the same tensor as model.embed_tokens.weight when tied).
"""
from __future__ import annotations

from torch import nn

from torch_impl.models.common import Embedding, Linear, Norm, rope_attention, split_heads
from torch_impl.models.decoder import DecoderLM
from torch_impl.models.fused import fuse_linears, project


class LlamaAttention(nn.Module):
    """q/k/v/o projections around the shared RoPE attention core. [b, s, hidden] -> [b, s, hidden]"""

    def __init__(self, config, layer_idx: int, biases: dict):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads = config.num_attention_heads, config.num_key_value_heads
        hidden, d = config.hidden_size, config.head_dim
        self.q_proj = Linear(hidden, self.n_heads * d, biases["q_proj"])
        self.k_proj = Linear(hidden, self.n_kv_heads * d, biases["k_proj"])
        self.v_proj = Linear(hidden, self.n_kv_heads * d, biases["v_proj"])
        self.o_proj = Linear(self.n_heads * d, hidden, biases["o_proj"])

    def fuse_projections(self):
        """q/k/v weights as views of one matrix: one GEMM for the three (see FusedProjection)."""
        fuse_linears(self.q_proj, self.k_proj, self.v_proj)

    def forward(self, x, rope, attn: dict, cache):
        q, k, v = project(x, self.q_proj, self.k_proj, self.v_proj)
        q, k, v = split_heads(q, self.n_heads), split_heads(k, self.n_kv_heads), split_heads(v, self.n_kv_heads)
        out, probs = rope_attention(q, k, v, rope, attn, cache, self.layer_idx)
        return self.o_proj(out), probs


class LlamaMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) · up(x)). [b, s, hidden] -> [b, s, hidden]"""

    def __init__(self, config):
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, False)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, False)

    def fuse_projections(self):
        """gate/up weights as views of one matrix: one GEMM for the two (see FusedProjection)."""
        fuse_linears(self.gate_proj, self.up_proj)

    def forward(self, x):
        from torch_impl.activations import silu_mul

        gate, up = project(x, self.gate_proj, self.up_proj)
        # down(silu(gate) · up)
        return self.down_proj(silu_mul(gate, up))


class LlamaDecoderLayer(nn.Module):
    """x + attn(input_layernorm(x)), then + mlp(post_attention_layernorm(·)). [b, s, hidden] -> [b, s, hidden]"""

    def __init__(self, config, self_attn: nn.Module, mlp: nn.Module, sliding_window=None):
        super().__init__()
        self.sliding_window = sliding_window
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = Norm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = Norm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, rope, attn: dict, cache):
        attn_out, probs = self.self_attn(self.input_layernorm(x), rope, attn, cache)
        h = x + attn_out
        return h + self.mlp(self.post_attention_layernorm(h)), probs


class LlamaModel(nn.Module):
    """embed_tokens, layers, norm: the parts DecoderLM runs."""

    def __init__(self, config, layers: list):
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = Norm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(DecoderLM):
    """forward(input_ids [b, s] | inputs_embeds [b, s, hidden], ...) -> CausalLMOutput(logits [b, s, vocab])"""

    embed_path, layers_path, norm_path, head_path = "model.embed_tokens", "model.layers", "model.norm", "lm_head"

    # the attention and MLP each block holds (Phi-3 swaps in its fused ones)
    attention_class, mlp_class = LlamaAttention, LlamaMLP

    def __init__(self, config, attn_implementation: str = "eager"):
        super().__init__(config, attn_implementation)
        biases = self.projection_biases(config)
        layers = [LlamaDecoderLayer(config, self.attention_class(config, i, biases), self.mlp_class(config),
                                    self.layer_sliding_window(config, i)) for i in range(config.num_hidden_layers)]
        self.model = LlamaModel(config, layers)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, False)

    @staticmethod
    def projection_biases(config) -> dict:
        """Which projections carry a bias: Llama follows config.attention_bias for all four."""
        bias = bool(getattr(config, "attention_bias", False))
        return {"q_proj": bias, "k_proj": bias, "v_proj": bias, "o_proj": bias}

    @staticmethod
    def layer_sliding_window(config, layer_idx: int):
        """The attention window of one layer (None: every earlier key)."""
        return None
