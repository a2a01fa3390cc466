"""Qwen2 / Qwen2.5, as transformers' `Qwen2ForCausalLM` (InternVL2-1B, InternVL2.5-1B/4B/38B/78B).

The Llama decoder (llama.py) with two differences:
* q_proj, k_proj, v_proj carry a bias; o_proj does not;
* a sliding attention window on layers i >= max_window_layers when `use_sliding_window` is true
  (transformers >= 4.45 semantics; 4.37.2's eager path passed `sliding_window` to every layer's
  mask regardless of the flag — both are inert below the released window of 32k/128k tokens).

Module names (and checkpoint keys) as Llama's, plus model.layers.{i}.self_attn.{q,k,v}_proj.bias.
"""
from __future__ import annotations

from minivl.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2 decoder with its LM head: Llama with q/k/v biases.

    forward(input_ids [b, s] | inputs_embeds [b, s, hidden], ...) -> CausalLMOutput(logits [b, s, vocab])
    """

    @staticmethod
    def projection_biases(config) -> dict:
        return {"q_proj": True, "k_proj": True, "v_proj": True, "o_proj": False}

    @staticmethod
    def layer_sliding_window(config, layer_idx: int):
        # window only where transformers marks the layer "sliding_attention"
        if config.use_sliding_window and config.sliding_window is not None and layer_idx >= config.max_window_layers:
            return config.sliding_window
        return None
