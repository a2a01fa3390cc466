"""The RoPE tables of one decoder, in PyTorch: the mirror of minivl/models/rotary.py."""
from __future__ import annotations

import torch

from torch_impl.models.common import compute_dtype


class RotaryEmbedding:
    """cos/sin for one model whatever its RoPE type (mirror of minivl.models.rotary.RotaryEmbedding)."""

    PER_CALL = ("su", "phi3_yarn", "longrope")

    def __init__(self, rope_kwargs: dict, dtype=torch.float32):
        from torch_impl.rope import DynamicNTKRope, rope_init

        self.rope_kwargs = dict(rope_kwargs, dtype=compute_dtype(dtype))
        self.rope_type = self.rope_kwargs["rope_type"]
        self.dynamic = None
        self.device = None
        if self.rope_type == "dynamic":
            kw = self.rope_kwargs
            self.dynamic = DynamicNTKRope(kw["head_dim"], kw["rope_theta"], kw["max_position_embeddings"],
                                          kw["factor"], dtype=kw["dtype"])
        elif self.rope_type not in self.PER_CALL:
            self.inv_freq, self.attention_scaling = rope_init(**self.rope_kwargs)

    def cos_sin(self, position_ids: torch.Tensor, kv_seq_len: int):
        """[b, s] positions -> (cos, sin) each [b, s, head_dim], in promote(model dtype, float32)"""
        from torch_impl.rope import rope_cos_sin, rope_init

        device = position_ids.device
        if self.dynamic is not None:
            if self.dynamic.inv_freq.device != device:
                self.dynamic.device = device
                self.dynamic.inv_freq = self.dynamic.inv_freq.to(device)
            return self.dynamic.cos_sin(position_ids, kv_seq_len)
        if self.rope_type in self.PER_CALL:
            # seq_len = max(position_ids) + 1 over the batch picks short (<= original) or long factors
            seq_len = int(position_ids.max()) + 1
            inv_freq, attention_scaling = rope_init(**self.rope_kwargs, seq_len=seq_len, device=device)
            return rope_cos_sin(position_ids, inv_freq, attention_scaling)
        if self.inv_freq.device != device:
            self.inv_freq = self.inv_freq.to(device)
        return rope_cos_sin(position_ids, self.inv_freq, self.attention_scaling)

    def position_limit(self) -> int | None:
        from minivl.models.rotary import RotaryEmbedding as _NumpyRotary

        return _NumpyRotary.position_limit(self)
