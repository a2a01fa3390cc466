"""The decoder every family runs, in PyTorch: the mirror of minivl/models/decoder.py.

`DecoderLM` (forward, loading, embedding, final norm, head), its output record, and the input
checks: the framework-free ones are minivl's own, imported.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from minivl.errors import ShapeError
from minivl.models.decoder import (check_attention_mask, check_inputs, check_logits_to_keep,  # noqa: F401  (shared)
                                   check_position_ids, one_cache)
from torch_impl.models.common import (as_model_dtype, build_model, check_attn_implementation, compute_dtype,
                                      declared_shapes, tied_head)


@dataclass
class CausalLMOutput:
    """logits [b, s, vocab] float32 (float64 in a float64 run), past_key_values (KVCache or None),
    hidden_states: L+2 tensors [b, s, hidden] (embedding, each block, final norm) or None,
    attentions: L tensors [b, H, s, t] of softmax probabilities or None."""

    logits: torch.Tensor
    past_key_values: object = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None

    @property
    def cache(self):
        """past_key_values under transformers' newer name (5.24 returns and takes `cache`)."""
        return self.past_key_values


def default_position_ids(batch: int, seq_len: int, past_len: int, device) -> torch.Tensor:
    """[b, s] int64 positions past_len ... past_len+seq_len-1 (the reference's default)."""
    return torch.arange(past_len, past_len + seq_len, dtype=torch.int64, device=device).expand(batch, seq_len)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """cumsum(mask) - 1 with pads set to 1: positions of a left-padded batch. [b, t] -> [b, t] int64"""
    mask = torch.as_tensor(attention_mask).to(torch.int64)
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


def check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size):
        raise ShapeError(f"forward: token ids must be in [0, {vocab_size}) (got min {int(input_ids.min())}, "
                         f"max {int(input_ids.max())}); the tokenizer and the checkpoint's vocab_size disagree")


class DecoderLM(nn.Module):
    """embed -> positions -> L x layer -> final norm -> head (mirror of minivl.models.decoder.DecoderLM).

    A family builds its modules under the checkpoint's names in `__init__(config, attn_implementation)`
    and sets `embed_path`, `layers_path`, `norm_path`, `head_path`; MPT overrides `positions` and
    `attention_args`.
    """

    embed_path, layers_path, norm_path, head_path = "model.embed_tokens", "model.layers", "model.norm", "lm_head"
    logit_scale = None  # MPT's logits are multiplied by one
    _rotary = None

    def __init__(self, config, attn_implementation: str = "eager"):
        super().__init__()
        self.config = config
        self.attn_implementation = check_attn_implementation(attn_implementation)

    @classmethod
    def tied_weights(cls, config) -> dict:
        """{target key: source key} of parameters that are one tensor: the head tied to the embedding."""
        return tied_head(config, cls.embed_path, cls.head_path)

    @staticmethod
    def check_supported(config) -> None:
        """Raise ConfigError for config options the family does not implement (the RoPE families implement all)."""

    @classmethod
    def expected_shapes(cls, config) -> dict:
        """{checkpoint key: shape} from the declared parameters (a tied head is not stored)."""
        return declared_shapes(cls, config, skip=cls.tied_weights(config))

    @classmethod
    def from_state_dict(cls, config, state_dict: dict, dtype="float32", device="cpu",
                        attn_implementation: str = "eager"):
        """Build from {checkpoint key: tensor}; every missing/unexpected/mis-shaped tensor is reported at once."""
        cls.check_supported(config)
        dtype = as_model_dtype(dtype)
        return build_model(cls, config, state_dict, dtype, device, tied=cls.tied_weights(config),
                           attn_implementation=attn_implementation)

    @property
    def dtype(self) -> torch.dtype:
        return self.get_submodule(self.norm_path).weight.dtype

    @property
    def device(self) -> torch.device:
        return self.get_submodule(self.norm_path).weight.device

    def set_attn_implementation(self, attn_implementation: str) -> None:
        self.attn_implementation = check_attn_implementation(attn_implementation)

    @property
    def rotary(self):
        """The RotaryEmbedding of config.rope_kwargs(), in promote(model dtype, float32); built on first use
        after loading, and kept (dynamic NTK is stateful). None without RoPE (MPT)."""
        from torch_impl.models.rotary import RotaryEmbedding

        if self._rotary is None or self._rotary.rope_kwargs["dtype"] != compute_dtype(self.dtype):
            rope_kwargs = self.config.rope_kwargs()
            self._rotary = RotaryEmbedding(rope_kwargs, self.dtype) if rope_kwargs is not None else None
        return self._rotary

    def position_limit(self) -> int | None:
        """Largest number of positions the model serves (None: no limit, e.g. dynamic RoPE scaling)."""
        return self.rotary.position_limit()

    def embed_tokens(self, input_ids) -> torch.Tensor:
        """[b, s] int -> [b, s, hidden]: rows of the embedding table (no scaling; positions come later)."""
        input_ids = torch.as_tensor(input_ids, device=self.device)
        check_token_ids(input_ids, self.config.vocab_size)
        return self.get_submodule(self.embed_path)(input_ids)

    def embed_inputs(self, inputs_embeds) -> torch.Tensor:
        """inputs_embeds [b, s, hidden] (the chat model's text + image embeddings) in the model dtype."""
        return torch.as_tensor(inputs_embeds, device=self.device).to(self.dtype)

    def positions(self, hidden, position_ids, attention_mask, past_len: int):
        """-> (hidden, rope): RoPE's (cos, sin) [b, s, head_dim] for these positions, hidden unchanged."""
        batch, seq_len = hidden.shape[:2]
        if position_ids is None:
            position_ids = default_position_ids(batch, seq_len, past_len, self.device)
        check_position_ids(position_ids, batch, seq_len)
        position_ids = torch.as_tensor(position_ids, dtype=torch.int64, device=self.device)
        return hidden, self.rotary.cos_sin(position_ids, past_len + seq_len)

    def attention_args(self, attention_mask, seq_len: int, past_len: int, sliding_window, output_attentions) -> dict:
        """What every attention call of one window gets: the additive mask, or none and is_causal.

        eager always gets the reference's additive mask (causal + padding), even where it is all zeros.
        sdpa / flash / triton on an unpadded batch without a window get is_causal instead (bottom-right
        aligned: the same keys hidden), which lets the kernels skip the masked tiles. flash takes no
        additive mask at all: a padded or windowed batch runs sdpa with the mask (the reference unpads
        into flash_attn_varlen_func instead: same values, another kernel). output_attentions runs
        eager, as transformers falls back to it: the fused kernels never form the probabilities.
        """
        from torch_impl.attention import build_attention_mask

        backend = "eager" if output_attentions else self.attn_implementation
        unpadded = attention_mask is None or bool(attention_mask.bool().all())
        if backend != "eager" and unpadded and sliding_window is None:
            return {"mask": None, "is_causal": True, "backend": backend, "output_attentions": False}
        mask = build_attention_mask(attention_mask, seq_len, past_len, self.dtype, sliding_window=sliding_window)
        return {"mask": mask, "is_causal": False, "backend": "sdpa" if backend == "flash" else backend,
                "output_attentions": output_attentions}

    def final_norm(self, hidden):
        """The norm after the last block. [..., hidden] -> [..., hidden]"""
        return self.get_submodule(self.norm_path)(hidden)

    def unembed(self, hidden):
        """[..., hidden] -> logits [..., vocab]: head(h) in the model dtype (· logit_scale), then .float()."""
        from torch_impl.linear import linear

        logits = linear(hidden, self.get_submodule(self.head_path).weight)
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        return logits.to(compute_dtype(self.dtype))

    @torch.no_grad()
    def forward(self, input_ids=None, inputs_embeds=None, position_ids=None, attention_mask=None,
                past_key_values=None, use_cache=False, output_hidden_states=False,
                output_attentions=False, logits_to_keep: int = 0, cache=None) -> CausalLMOutput:
        """input_ids [b, s] or inputs_embeds [b, s, hidden] -> CausalLMOutput (logits [b, s, vocab])

        logits_to_keep: 0 = every position, n = the last n only (see minivl's DecoderLM.forward);
        cache: past_key_values under transformers' newer name (give one of the two).
        """
        from torch_impl.attention import KVCache

        past_key_values = one_cache(past_key_values, cache)
        check_inputs(input_ids, inputs_embeds, self.get_submodule(self.embed_path).weight.shape[1])
        hidden = self.embed_tokens(input_ids) if input_ids is not None else self.embed_inputs(inputs_embeds)
        batch, seq_len = hidden.shape[:2]
        cache = past_key_values if past_key_values is not None else (KVCache() if use_cache else None)
        past_len = cache.get_seq_length(0) if cache is not None else 0
        check_attention_mask(attention_mask, batch, past_len + seq_len)
        if attention_mask is not None:
            attention_mask = torch.as_tensor(attention_mask, device=self.device)
        hidden, rope = self.positions(hidden, position_ids, attention_mask, past_len)
        layers = self.get_submodule(self.layers_path)
        # one attention setup per distinct window (Qwen2 may window only some layers)
        attn = {window: self.attention_args(attention_mask, seq_len, past_len, window, output_attentions)
                for window in {layer.sliding_window for layer in layers}}

        all_hidden = [hidden] if output_hidden_states else None
        all_probs = [] if output_attentions else None
        for layer in layers:
            hidden, probs = layer(hidden, rope, attn[layer.sliding_window], cache)
            if output_hidden_states:
                all_hidden.append(hidden)
            if output_attentions:
                all_probs.append(probs)
        hidden = self.final_norm(hidden)
        if output_hidden_states:
            all_hidden.append(hidden)
        check_logits_to_keep(logits_to_keep)
        return CausalLMOutput(logits=self.unembed(hidden[:, -logits_to_keep:] if logits_to_keep else hidden),
                              past_key_values=cache if (use_cache or past_key_values is not None) else None,
                              hidden_states=tuple(all_hidden) if output_hidden_states else None,
                              attentions=tuple(all_probs) if output_attentions else None)
