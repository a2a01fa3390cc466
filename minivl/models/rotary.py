"""The RoPE tables of one decoder: which `minivl.rope` functions serve its RoPE type, and when.

`DecoderLM.rotary` holds one `RotaryEmbedding`, built from `config.rope_kwargs()` on first use.
torch_impl/models/rotary.py is the same file in PyTorch.
"""
from __future__ import annotations

import numpy as np

from minivl.models.common import compute_dtype


class RotaryEmbedding:
    """cos/sin for one model, whatever its RoPE type, from the config's `rope_kwargs()`.

    * default, linear, yarn, llama3: static frequencies, computed once (`rope_init`);
    * dynamic: the reference's stateful `DynamicNTKRope`, keyed on kv_seq_len = past + new keys
      (InternLM2's remote code and transformers 4.37's Llama; newer transformers key it on
      max(position_ids)+1 and reset it below max_position_embeddings — the same values for a
      contiguous unpadded sequence, different after a longer one or with padding);
    * su / phi3_yarn / longrope: short or long factors chosen PER CALL from max(position_ids)+1
      over the whole batch (Phi-3's rule), so a prefill and a later decode step may differ.
    """

    PER_CALL = ("su", "phi3_yarn", "longrope")

    def __init__(self, rope_kwargs: dict, dtype=np.float32):
        from minivl.rope import DynamicNTKRope, rope_init

        # tables in promote(model dtype, float32): the reference's float32, or float64 in a gold run
        self.rope_kwargs = dict(rope_kwargs, dtype=compute_dtype(dtype))
        self.rope_type = self.rope_kwargs["rope_type"]
        self.dynamic = None
        if self.rope_type == "dynamic":
            kw = self.rope_kwargs
            self.dynamic = DynamicNTKRope(kw["head_dim"], kw["rope_theta"], kw["max_position_embeddings"],
                                          kw["factor"], dtype=kw["dtype"])
        elif self.rope_type not in self.PER_CALL:
            self.inv_freq, self.attention_scaling = rope_init(**self.rope_kwargs)

    def cos_sin(self, position_ids: np.ndarray, kv_seq_len: int):
        """[b, s] positions -> (cos, sin) each [b, s, head_dim], in promote(model dtype, float32)"""
        from minivl.rope import rope_cos_sin, rope_init

        if self.dynamic is not None:
            return self.dynamic.cos_sin(position_ids, kv_seq_len)
        if self.rope_type in self.PER_CALL:
            # seq_len = max(position_ids) + 1 over the batch picks short (<= original) or long factors
            seq_len = int(np.max(position_ids)) + 1
            inv_freq, attention_scaling = rope_init(**self.rope_kwargs, seq_len=seq_len)
            return rope_cos_sin(position_ids, inv_freq, attention_scaling)
        return rope_cos_sin(position_ids, self.inv_freq, self.attention_scaling)

    def position_limit(self) -> int | None:
        """How many positions this RoPE is meant to serve (None: dynamic NTK rescales without limit)."""
        kw = self.rope_kwargs
        max_pos = kw["max_position_embeddings"]
        if self.rope_type == "dynamic":
            return None
        if self.rope_type == "linear":
            return int(max_pos * kw["factor"])
        if self.rope_type in ("yarn", "llama3") and "factor" in kw:
            original = kw.get("original_max_position_embeddings", max_pos)
            return max(max_pos, int(original * kw["factor"]))
        return max_pos
