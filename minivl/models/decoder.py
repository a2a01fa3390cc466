"""The decoder every family runs, its output record and its input checks.

InternLM2, Phi-3, Llama, Qwen2 and MPT are one machine with different key names, projection
layouts and positions: embed -> L x [x + attn(norm(x)); x + mlp(norm(x))] -> norm -> head.
`DecoderLM` is that machine, written once (forward, loading, embedding, final norm, head); each
family file declares its modules under the checkpoint's names and, for MPT, its positions.
torch_impl/models/decoder.py is the same file in PyTorch (it uses the input checks from here).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from minivl import nn
from minivl.errors import ShapeError
from minivl.models.common import as_model_dtype, build_model, compute_dtype, declared_shapes, tied_head


@dataclass
class CausalLMOutput:
    """What a causal LM forward returns.

    logits [b, s, vocab] float32 (float64 in a float64 run); past_key_values: the KVCache (or None);
    hidden_states: L+2 arrays [b, s, hidden] (embedding output, each block's output, final-norm
    output) when asked, else None; attentions: L arrays [b, H, s, t] of softmax probabilities
    (t = cached + new keys) when asked, else None.
    """

    logits: np.ndarray
    past_key_values: object = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None

    @property
    def cache(self):
        """past_key_values under transformers' newer name (5.24 returns and takes `cache`)."""
        return self.past_key_values


def default_position_ids(batch: int, seq_len: int, past_len: int) -> np.ndarray:
    """Positions past_len ... past_len+seq_len-1 for every row, as the reference's forward defaults them.

    -> [b, s] int64
    """
    return np.broadcast_to(np.arange(past_len, past_len + seq_len, dtype=np.int64), (batch, seq_len)).copy()


def position_ids_from_mask(attention_mask: np.ndarray) -> np.ndarray:
    """Positions of a left-padded batch, as prepare_inputs_for_generation builds them.

    position = cumsum(mask) - 1, and padded slots get 1 (any value works: they are masked out).
    [b, t] 0/1 -> [b, t] int64
    """
    mask = np.asarray(attention_mask).astype(np.int64)
    position_ids = np.cumsum(mask, axis=-1) - 1
    return np.where(mask == 0, 1, position_ids)


_INTEGER_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")


def one_cache(past_key_values, cache):
    """The KV cache a forward was given under either name: past_key_values (transformers' name until
    5.2x, minivl's) or cache (its name since; `past_key_values` is deprecated there). Shared by torch_impl."""
    if past_key_values is not None and cache is not None:
        raise ShapeError("forward: pass the KV cache once, as cache= or as past_key_values= (the same "
                         "argument under transformers' new and old names), not both")
    return cache if cache is not None else past_key_values


def check_inputs(input_ids, inputs_embeds, hidden_size: int) -> None:
    """Exactly one of input_ids [b, s] (integer ids) / inputs_embeds [b, s, hidden], s >= 1.

    Shared by torch_impl: NumPy arrays, torch tensors and nested lists are all checked here.
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ShapeError("forward: pass exactly one of input_ids [batch, seq] or inputs_embeds "
                         f"[batch, seq, hidden] (got {'both' if input_ids is not None else 'neither'})")
    if input_ids is not None and not hasattr(input_ids, "dtype"):  # a nested list
        try:
            ragged = np.asarray(input_ids).dtype == object
        except ValueError:  # NumPy refuses rows of different lengths
            ragged = True
        if ragged:
            raise ShapeError("forward: input_ids rows have different lengths (ragged); pad them to one length on "
                             "the LEFT and pass attention_mask with 0 at the pads")
        input_ids = np.asarray(input_ids)
    if input_ids is not None and np.ndim(input_ids) != 2:
        raise ShapeError(f"forward: input_ids must be 2-D [batch, seq] (got shape {tuple(np.shape(input_ids))}); "
                         f"add a batch axis with ids[None]")
    if input_ids is not None and str(input_ids.dtype).removeprefix("torch.") not in _INTEGER_DTYPES:
        raise ShapeError(f"forward: input_ids must be integer token ids (got dtype {input_ids.dtype}); they index "
                         f"the embedding table: cast whole-number ids with .astype(np.int64) (torch: .long())")
    if inputs_embeds is not None and (np.ndim(inputs_embeds) != 3 or np.shape(inputs_embeds)[-1] != hidden_size):
        raise ShapeError(f"forward: inputs_embeds must be [batch, seq, {hidden_size}] "
                         f"(got shape {np.shape(inputs_embeds)})")
    shape = tuple(np.shape(input_ids if input_ids is not None else inputs_embeds))
    if 0 in shape[:2]:
        raise ShapeError(f"forward: the input is empty (shape {shape}); pass at least one sequence of at least "
                         f"one token")


def check_token_ids(input_ids, vocab_size: int) -> None:
    """Token ids must index the embedding table: a clear error instead of an IndexError deep inside."""
    ids = np.asarray(input_ids)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ShapeError(f"forward: token ids must be in [0, {vocab_size}) (got min {ids.min()}, max {ids.max()}); "
                         f"the tokenizer and the checkpoint's vocab_size disagree")


def check_attention_mask(attention_mask, batch: int, kv_len: int) -> None:
    """A 2-D 0/1 mask over every key: cached ones plus the new ones."""
    if attention_mask is not None and tuple(np.shape(attention_mask)) != (batch, kv_len):
        raise ShapeError(f"forward: attention_mask must be [batch, past + seq] = [{batch}, {kv_len}] "
                         f"(got shape {tuple(np.shape(attention_mask))}); it covers the cached tokens too")


def check_position_ids(position_ids, batch: int, seq_len: int) -> None:
    """position_ids must be [batch, seq]: one position per new token."""
    if tuple(np.shape(position_ids)) != (batch, seq_len):
        raise ShapeError(f"forward: position_ids must be [batch, seq] = [{batch}, {seq_len}] "
                         f"(got shape {tuple(np.shape(position_ids))})")


def check_logits_to_keep(logits_to_keep) -> None:
    """logits_to_keep must be an int >= 0 (0: every position)."""
    if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, (int, np.integer)) or logits_to_keep < 0:
        raise ShapeError(f"forward: logits_to_keep must be an int >= 0 (0 = every position, 1 = the last one, as "
                         f"generation needs), got {logits_to_keep!r}")


class DecoderLM(nn.Module):
    """embed -> positions -> L x layer -> final norm -> head: the decoder every family runs.

    A family builds its modules under the checkpoint's names in `__init__(config)` and says where
    four of them sit (dotted paths): `embed_path`, `layers_path`, `norm_path`, `head_path` (MPT's
    head IS its embedding table). Each layer is called `layer(hidden, rope, attn, cache)` ->
    (hidden, attention probabilities or None) and has a `sliding_window`. Positions enter through
    two methods a family may override: `positions` (RoPE's cos/sin; MPT adds its learned table)
    and `attention_args` (the additive causal + padding mask; MPT's ALiBi bias).
    """

    embed_path, layers_path, norm_path, head_path = "model.embed_tokens", "model.layers", "model.norm", "lm_head"
    logit_scale = None  # MPT's logits are multiplied by one
    _rotary = None

    def __init__(self, config):
        super().__init__()
        self.config = config

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
    def from_state_dict(cls, config, state_dict: dict, dtype="float32"):
        """Build from {checkpoint key: array}; every missing/unexpected/mis-shaped tensor is reported at once."""
        cls.check_supported(config)
        dtype = as_model_dtype(dtype)
        return build_model(cls, config, state_dict, dtype, tied=cls.tied_weights(config))

    @property
    def dtype(self) -> np.dtype:
        return self.get_submodule(self.norm_path).weight.dtype

    @property
    def rotary(self):
        """The RotaryEmbedding of config.rope_kwargs(), in promote(model dtype, float32); built on first use
        after loading, and kept (dynamic NTK is stateful). None without RoPE (MPT)."""
        from minivl.models.rotary import RotaryEmbedding

        if self._rotary is None or self._rotary.rope_kwargs["dtype"] != compute_dtype(self.dtype):
            rope_kwargs = self.config.rope_kwargs()
            self._rotary = RotaryEmbedding(rope_kwargs, self.dtype) if rope_kwargs is not None else None
        return self._rotary

    def position_limit(self) -> int | None:
        """Largest number of positions the model serves (None: no limit, e.g. dynamic RoPE scaling)."""
        return self.rotary.position_limit()

    def embed_tokens(self, input_ids) -> np.ndarray:
        """[b, s] int -> [b, s, hidden]: rows of the embedding table (no scaling; positions come later)."""
        check_token_ids(input_ids, self.config.vocab_size)
        return self.get_submodule(self.embed_path)(input_ids)

    def embed_inputs(self, inputs_embeds) -> np.ndarray:
        """inputs_embeds [b, s, hidden] (the chat model's text + image embeddings) in the model dtype."""
        return np.asarray(inputs_embeds).astype(self.dtype, copy=False)

    def positions(self, hidden, position_ids, attention_mask, past_len: int):
        """-> (hidden, rope): RoPE's (cos, sin) [b, s, head_dim] for these positions, hidden unchanged.

        position_ids [b, s] default past..past+s-1; the kv length (past + s) drives dynamic NTK.
        """
        batch, seq_len = hidden.shape[:2]
        if position_ids is None:
            position_ids = default_position_ids(batch, seq_len, past_len)
        check_position_ids(position_ids, batch, seq_len)
        position_ids = np.asarray(position_ids, dtype=np.int64)
        return hidden, self.rotary.cos_sin(position_ids, past_len + seq_len)

    def attention_args(self, attention_mask, seq_len: int, past_len: int, sliding_window, output_attentions) -> dict:
        """What every attention call of one window gets: the causal + padding mask [b|1, 1, s, t]."""
        from minivl.attention import build_attention_mask

        mask = build_attention_mask(attention_mask, seq_len, past_len, self.dtype, sliding_window=sliding_window)
        return {"mask": mask, "output_attentions": output_attentions}

    def final_norm(self, hidden):
        """The norm after the last block. [..., hidden] -> [..., hidden]"""
        return self.get_submodule(self.norm_path)(hidden)

    def unembed(self, hidden):
        """[..., hidden] -> logits [..., vocab]: head(h) in the model dtype (· logit_scale), then .float()."""
        from minivl.linear import linear

        logits = linear(hidden, self.get_submodule(self.head_path).weight)
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        return logits.astype(compute_dtype(self.dtype))

    def forward(self, input_ids=None, inputs_embeds=None, position_ids=None, attention_mask=None,
                past_key_values=None, use_cache=False, output_hidden_states=False,
                output_attentions=False, logits_to_keep: int = 0, cache=None) -> CausalLMOutput:
        """input_ids [b, s] or inputs_embeds [b, s, hidden] -> CausalLMOutput (logits [b, s, vocab])

        position_ids [b, s] default past..past+s-1; attention_mask [b, past+s] 0/1 (left padding);
        past_key_values: a KVCache to extend (one is created when use_cache and none is given);
        cache: the same, under transformers' newer name (give one of the two);
        logits_to_keep: 0 = logits of every position, n = of the last n only (generation needs 1;
        transformers' name and meaning), so the head's GEMM runs over those rows alone.
        """
        from minivl.attention import KVCache
        from minivl.models.decode_step import decode_layers, decode_plan

        past_key_values = one_cache(past_key_values, cache)
        check_inputs(input_ids, inputs_embeds, self.get_submodule(self.embed_path).weight.shape[1])
        hidden = self.embed_tokens(input_ids) if input_ids is not None else self.embed_inputs(inputs_embeds)
        batch, seq_len = hidden.shape[:2]
        cache = past_key_values if past_key_values is not None else (KVCache() if use_cache else None)
        past_len = cache.get_seq_length(0) if cache is not None else 0
        check_attention_mask(attention_mask, batch, past_len + seq_len)
        hidden, rope = self.positions(hidden, position_ids, attention_mask, past_len)
        layers = self.get_submodule(self.layers_path)
        # one attention setup per distinct window (Qwen2 may window only some layers)
        attn = {window: self.attention_args(attention_mask, seq_len, past_len, window, output_attentions)
                for window in {layer.sliding_window for layer in layers}}

        all_hidden = [hidden] if output_hidden_states else None
        all_probs = [] if output_attentions else None
        plan = decode_plan(layers, hidden, rope, cache, attn, output_hidden_states, output_attentions)
        if plan is not None:
            # one cached token through Llama/Qwen2/Phi-3/InternLM2 layers: the same operations in fewer calls, bit-equal
            hidden = decode_layers(plan, hidden, rope, cache)
        else:
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
