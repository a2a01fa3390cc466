"""Qwen2 / Qwen2.5, as transformers' `Qwen2ForCausalLM`, in PyTorch: the mirror of minivl/models/qwen2.py.

Llama with q/k/v biases (o_proj has none) and a sliding window on layers >= max_window_layers
when use_sliding_window is set.
"""
from __future__ import annotations

from torch_impl.models.llama import LlamaForCausalLM


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
