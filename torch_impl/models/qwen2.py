"""Qwen2 / Qwen2.5, as transformers' `Qwen2ForCausalLM`, in PyTorch: the mirror of minivl/models/qwen2.py.

Llama with q/k/v biases (o_proj has none) and a sliding window on layers >= max_window_layers
when use_sliding_window is set.
"""
from __future__ import annotations

from minivl.models.qwen2 import Qwen2ForCausalLM as _NumpyQwen2
from torch_impl.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    """forward(input_ids [b, s] | inputs_embeds [b, s, hidden], ...) -> CausalLMOutput(logits [b, s, vocab])"""

    projection_biases = staticmethod(_NumpyQwen2.projection_biases)
    layer_sliding_window = staticmethod(_NumpyQwen2.layer_sliding_window)
