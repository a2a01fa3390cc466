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

Checkpoint keys: model.tok_embeddings.weight, model.layers.{i}.attention.wqkv.weight (+ .bias if
config.bias), model.layers.{i}.attention.wo.weight (+ .bias), model.layers.{i}.feed_forward.{w1,w3,w2}.weight
(gate, up, down), model.layers.{i}.attention_norm.weight, model.layers.{i}.ffn_norm.weight,
model.norm.weight, output.weight.
"""
from __future__ import annotations

import numpy as np

from minivl.checkpoint import check_state_dict
from minivl.linear import linear
from minivl.mlp import swiglu_mlp
from minivl.models.common import DecoderLM, RotaryEmbedding, as_model_dtype, check_token_ids, rope_attention, take_weights
from minivl.norms import rms_norm


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


class InternLM2Attention:
    """wqkv -> split per KV head -> RoPE -> cache -> attention -> wo.  [b, s, hidden] -> [b, s, hidden]"""

    def __init__(self, config, layer_idx: int, weights: dict):
        self.layer_idx = layer_idx
        self.n_kv_heads = config.num_key_value_heads
        self.group = config.num_key_value_groups
        self.head_dim = config.head_dim
        self.w = weights

    def __call__(self, x, cos, sin, mask, cache):
        w = self.w
        qkv = linear(x, w["wqkv.weight"], w.get("wqkv.bias"))
        q, k, v = split_wqkv(qkv, self.n_kv_heads, self.group, self.head_dim)
        out = rope_attention(q, k, v, cos, sin, mask, cache, self.layer_idx)
        return linear(out, w["wo.weight"], w.get("wo.bias"))


class InternLM2DecoderLayer:
    """h = x + attention(attention_norm(x)); out = h + w2(silu(w1(h')) · w3(h')), h' = ffn_norm(h).

    [b, s, hidden] -> [b, s, hidden]
    """

    sliding_window = None

    def __init__(self, config, layer_idx: int, weights: dict):
        self.eps = config.rms_norm_eps
        self.attention = InternLM2Attention(config, layer_idx, {k[len("attention."):]: v for k, v in weights.items()
                                                                if k.startswith("attention.")})
        self.w = weights

    def __call__(self, x, cos, sin, mask, cache):
        w = self.w
        h = x + self.attention(rms_norm(x, w["attention_norm.weight"], self.eps), cos, sin, mask, cache)
        # w1 = gate, w3 = up, w2 = down
        return h + swiglu_mlp(rms_norm(h, w["ffn_norm.weight"], self.eps), w["feed_forward.w1.weight"],
                              w["feed_forward.w3.weight"], w["feed_forward.w2.weight"])


class InternLM2ForCausalLM(DecoderLM):
    """forward(input_ids [b, s] | inputs_embeds [b, s, hidden], ...) -> CausalLMOutput(logits [b, s, vocab])"""

    @classmethod
    def expected_shapes(cls, config) -> dict:
        """{checkpoint key: shape}; biases on wqkv/wo iff config.bias (False in every release)."""
        hidden, inter, d = config.hidden_size, config.intermediate_size, config.head_dim
        n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
        qkv_rows = (n_heads + 2 * n_kv) * d
        shapes = {"model.tok_embeddings.weight": (config.vocab_size, hidden), "model.norm.weight": (hidden,),
                  "output.weight": (config.vocab_size, hidden)}
        for i in range(config.num_hidden_layers):
            p = f"model.layers.{i}."
            shapes[p + "attention.wqkv.weight"] = (qkv_rows, hidden)
            shapes[p + "attention.wo.weight"] = (hidden, n_heads * d)
            if config.bias:
                shapes[p + "attention.wqkv.bias"] = (qkv_rows,)
                shapes[p + "attention.wo.bias"] = (hidden,)
            shapes[p + "feed_forward.w1.weight"] = (inter, hidden)
            shapes[p + "feed_forward.w3.weight"] = (inter, hidden)
            shapes[p + "feed_forward.w2.weight"] = (hidden, inter)
            shapes[p + "attention_norm.weight"] = (hidden,)
            shapes[p + "ffn_norm.weight"] = (hidden,)
        return shapes

    @classmethod
    def from_state_dict(cls, config, state_dict: dict, dtype="float32") -> "InternLM2ForCausalLM":
        """Build from {checkpoint key: array}; every missing/unexpected/mis-shaped tensor is reported at once."""
        check_state_dict(state_dict, cls.expected_shapes(config), where=f"{cls.__name__} checkpoint")
        return cls(config, state_dict, dtype)

    def __init__(self, config, state_dict: dict, dtype="float32"):
        self.config = config
        self.dtype = as_model_dtype(dtype)
        self.embed_weight = take_weights(state_dict, "model.", ["tok_embeddings.weight"], self.dtype)["tok_embeddings.weight"]
        names = [f"attention.{p}.{t}" for p in ("wqkv", "wo") for t in ("weight", "bias")]
        names += [f"feed_forward.{p}.weight" for p in ("w1", "w3", "w2")] + ["attention_norm.weight", "ffn_norm.weight"]
        self.layers = [InternLM2DecoderLayer(config, i, take_weights(state_dict, f"model.layers.{i}.", names, self.dtype))
                       for i in range(config.num_hidden_layers)]
        self.norm_weight = take_weights(state_dict, "model.", ["norm.weight"], self.dtype)["norm.weight"]
        self.output_weight = take_weights(state_dict, "", ["output.weight"], self.dtype)["output.weight"]
        self.rotary = RotaryEmbedding(config.rope_kwargs(), self.dtype)

    def embed_tokens(self, input_ids) -> np.ndarray:
        """[b, s] int -> [b, s, hidden]: rows of tok_embeddings (no scaling)."""
        check_token_ids(input_ids, self.config.vocab_size)
        return self.embed_weight[np.asarray(input_ids)]

    def final_norm(self, hidden):
        return rms_norm(hidden, self.norm_weight, self.config.rms_norm_eps)

    def lm_head(self, hidden):
        return linear(hidden, self.output_weight)
