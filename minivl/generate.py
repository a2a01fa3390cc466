"""Autoregressive generation with a KV cache: greedy or sampled, batched with left padding.

One prefill forward over the prompt fills the cache; each later step feeds only the newest token.
Positions follow the reference's prepare_inputs_for_generation: position = cumsum(mask) − 1, so a
left-padded row starts at 0 at its first real token (pads get 1 and are masked out anyway).

Sampling, in the order transformers' logits processors apply it: logits / temperature, keep the
top_k largest, keep the smallest set whose probability reaches top_p, softmax, draw. A seed makes
a run reproducible (NumPy's and torch's generators differ, so seeded samples differ between the
packages; greedy decoding agrees).
"""
from __future__ import annotations

import numpy as np

from minivl.errors import GenerationError, NonFiniteError
from minivl.models.decoder import position_ids_from_mask


# seeds both generators take: NumPy's default_rng any int >= 0, torch's manual_seed below 2**64
MAX_SEED = 2**63 - 1


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


# below this a sampling temperature only risks overflow: logits / 1e-320 is inf even in float64, and any
# temperature this small picks the greedy token anyway (a logit gap of 0.01 becomes e^100)
MIN_TEMPERATURE = 1e-4


def check_generation_args(max_new_tokens, do_sample, temperature, top_k, top_p, seed=None) -> None:
    """GenerationError naming the bad setting and the allowed range."""
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be an int >= 0 (got {max_new_tokens!r})")
    if seed is not None and (not _is_int(seed) or not 0 <= seed <= MAX_SEED):
        raise GenerationError(f"seed must be None or an int in [0, 2**63 - 1] (got {seed!r}); e.g. seed=0")
    if not (isinstance(do_sample, (bool, np.bool_)) or (_is_int(do_sample) and do_sample in (0, 1))):
        raise GenerationError(f"do_sample must be True or False (got {do_sample!r}); a string such as 'no' "
                              f"would count as True")
    if do_sample:
        if isinstance(temperature, (int, float)) and temperature == float("inf"):
            raise GenerationError("temperature must be finite (got inf, which would make every token equally likely); "
                                  "e.g. temperature=0.7")
        if not isinstance(temperature, (int, float)) or not temperature > 0:
            raise GenerationError(f"temperature must be > 0 when sampling (got {temperature!r}); use "
                                  f"do_sample=False for greedy decoding")
        if temperature < MIN_TEMPERATURE:
            raise GenerationError(f"temperature {temperature:g} is too small to sample with (logits / temperature "
                                  f"overflows to inf, and inf − inf is NaN); use do_sample=False for greedy "
                                  f"decoding, or a temperature >= {MIN_TEMPERATURE:g}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
            raise GenerationError(f"top_k must be None or an int >= 1 (got {top_k!r})")
        if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
            raise GenerationError(f"top_p must be None or a number in (0, 1] (got {top_p!r})")


def check_left_padded(mask: np.ndarray) -> None:
    """Every row must be 0…0 1…1: right padding would put pads between the prompt and its new tokens."""
    if mask.ndim != 2 or not np.isin(mask, (0, 1)).all():
        raise GenerationError(f"attention_mask must be a 2-D 0/1 array [batch, seq] (got shape {mask.shape})")
    if (np.diff(mask, axis=-1) < 0).any():
        raise GenerationError("attention_mask has padding AFTER a real token: generation needs LEFT padding "
                              "(tokenizer.padding_side = 'left'), as the reference's batch_chat forces")
    if (mask.sum(-1) == 0).any():
        raise GenerationError("attention_mask has a row with no real token; every prompt needs at least one")


def stop_ids(eos_token_id) -> np.ndarray:
    """eos_token_id as a 1-D array (None -> empty, int -> one id, list -> several stop tokens)."""
    if eos_token_id is None:
        return np.zeros(0, dtype=np.int64)
    ids = eos_token_id.tolist() if hasattr(eos_token_id, "tolist") else eos_token_id
    ids = ids if isinstance(ids, (list, tuple)) else [ids]
    bad = [i for i in ids if not _is_int(i) or i < 0]
    if bad:
        raise GenerationError(f"eos_token_id must be None, a token id (int >= 0) or a list of them (got "
                              f"{eos_token_id!r}); look the stop token's id up, e.g. tokenizer.stop_token_ids")
    return np.asarray(ids, dtype=np.int64).reshape(-1)


def fill_id(pad_token_id, stops: np.ndarray, vocab_size=None) -> int:
    """The id a finished row is filled with: pad_token_id, else the first stop id, else 0; GenerationError if
    pad_token_id is not a token id (the filled ids are fed back to the model, so it must be in its vocabulary)."""
    if pad_token_id is None:
        return int(stops[0]) if len(stops) else 0
    if not _is_int(pad_token_id) or pad_token_id < 0 or (vocab_size is not None and pad_token_id >= vocab_size):
        limit = f" below the vocabulary size {vocab_size}" if vocab_size is not None else ""
        raise GenerationError(f"pad_token_id must be None or a token id (an int >= 0{limit}; got {pad_token_id!r}); "
                              f"e.g. tokenizer.pad_token_id, or leave it out to fill with the stop token")
    return int(pad_token_id)


def check_prompt_ids(input_ids, vocab_size=None) -> np.ndarray:
    """input_ids as an int64 [batch, seq] array, or a GenerationError naming what is wrong with them."""
    try:
        ids = np.asarray(input_ids)
    except ValueError:  # NumPy refuses ragged nested lists
        ids = None
    if ids is None or ids.dtype == object:
        raise GenerationError("generate: input_ids rows have different lengths (ragged); pad them to one length "
                              "on the LEFT and pass attention_mask with 0 at the pads")
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise GenerationError(f"generate: input_ids must be [batch, seq] with seq >= 1 (got shape {ids.shape}); "
                              f"wrap one prompt as [ids]")
    if ids.dtype.kind not in "iu":
        raise GenerationError(f"generate: input_ids must be integer token ids (got dtype {ids.dtype}); token ids "
                              f"index the embedding table, cast them with .astype(np.int64) if they are whole numbers")
    outside = ids[(ids < 0) | (ids >= vocab_size)] if vocab_size is not None else ids[ids < 0]
    if outside.size:
        raise GenerationError(f"generate: input_ids hold {outside.size} ids outside the vocabulary [0, {vocab_size}) "
                              f"(e.g. {sorted(set(outside.tolist()))[:5]}); encode the prompt with this model's "
                              f"own tokenizer")
    return ids.astype(np.int64, copy=False)


def check_finite_logits(logits: np.ndarray, step: int) -> None:
    """NonFiniteError when a row's next-token logits hold NaN or +inf, or no finite value at all.

    Greedy argmax over NaN picks token 0 and would print an empty answer without a word.
    """
    broken = np.isnan(logits).any(axis=-1) | np.isposinf(logits).any(axis=-1) | ~np.isfinite(logits).any(axis=-1)
    if broken.any():
        raise NonFiniteError(f"generate: the model's logits at step {step} are NaN/inf (batch rows "
                             f"{np.flatnonzero(broken).tolist()}); its weights or inputs are not finite: check the "
                             f"checkpoint (minivl.checkpoint.check_weights) and the input embeddings or pixel values")


def check_length(model, prompt_len: int, max_new_tokens: int) -> None:
    """GenerationError if prompt + new tokens exceed what the model's positions serve (RoPE scaling aside)."""
    limit = model.position_limit()
    needed = prompt_len + max_new_tokens
    if limit is not None and needed > limit:
        raise GenerationError(f"generate: the prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) = "
                              f"{needed} positions exceed the {limit} the model serves (max_position_embeddings, or "
                              f"MPT's max_seq_len; RoPE scaling, where the config has one, is already counted); "
                              f"shorten the prompt or lower max_new_tokens")


def warp_logits(logits: np.ndarray, temperature: float = 1.0, top_k=None, top_p=None) -> np.ndarray:
    """Temperature, then top-k, then top-p (nucleus); removed entries become -inf.

    [b, vocab] float -> [b, vocab]
    """
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        # keep x >= the k-th largest value of its row (ties at the boundary are kept, as transformers)
        kth = np.sort(logits, axis=-1)[:, -top_k][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    if top_p is not None and top_p < 1.0:
        order = np.argsort(logits, axis=-1, kind="stable")  # ascending, as transformers sorts
        sorted_logits = np.take_along_axis(logits, order, axis=-1)
        probs = softmax(sorted_logits)
        # drop the low tail whose total mass is <= 1 - top_p; the top token always survives
        remove_sorted = np.cumsum(probs, axis=-1) <= (1.0 - top_p)
        remove_sorted[:, -1] = False
        remove = np.zeros_like(remove_sorted)
        np.put_along_axis(remove, order, remove_sorted, axis=-1)
        logits = np.where(remove, -np.inf, logits)
    return logits


def softmax(x: np.ndarray) -> np.ndarray:
    """e^(x - max) / Σ e^(x - max) over the last axis. [..., n] -> [..., n]"""
    exp = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return exp / exp.sum(axis=-1, keepdims=True)


def next_tokens(logits: np.ndarray, do_sample: bool, temperature, top_k, top_p, rng) -> np.ndarray:
    """[b, vocab] last-position logits -> [b] token ids (argmax, or a draw from the warped softmax)."""
    if not do_sample:
        return np.argmax(logits, axis=-1)
    probs = softmax(warp_logits(logits.astype(np.float64), temperature, top_k, top_p))
    # inverse-CDF draw: the first index whose cumulative probability exceeds u ~ U[0, 1)
    u = rng.random((probs.shape[0], 1))
    cdf = np.cumsum(probs, axis=-1)
    return np.minimum((cdf <= u * cdf[:, -1:]).sum(axis=-1), probs.shape[-1] - 1)


def generate(model, input_ids=None, inputs_embeds=None, attention_mask=None, max_new_tokens: int = 32,
             do_sample: bool = False, temperature: float = 1.0, top_k=None, top_p=None, seed=None,
             eos_token_id=None, pad_token_id=None, streamer=None) -> np.ndarray:
    """Continue each prompt by up to max_new_tokens tokens.

    input_ids [b, s] or inputs_embeds [b, s, hidden], attention_mask [b, s] (left padding) ->
    new tokens only, [b, n] int64 with n <= max_new_tokens (stops early once every row has emitted a
    stop token; finished rows are filled with pad_token_id, or the first stop token if None).
    streamer(token_ids [b]) is called once per step.
    """
    check_generation_args(max_new_tokens, do_sample, temperature, top_k, top_p, seed)
    if (input_ids is None) == (inputs_embeds is None):
        raise GenerationError("generate: pass exactly one of input_ids [batch, seq] or inputs_embeds "
                              "[batch, seq, hidden]")
    if input_ids is not None:
        vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
        prompt = input_ids = check_prompt_ids(input_ids, vocab_size)
    else:
        prompt = np.asarray(inputs_embeds)
        if prompt.ndim != 3 or prompt.shape[1] == 0:
            raise GenerationError(f"generate: inputs_embeds must be [batch, seq, hidden] with seq >= 1 "
                                  f"(got shape {prompt.shape})")
    batch, prompt_len = prompt.shape[:2]
    mask = np.ones((batch, prompt_len), dtype=np.int64) if attention_mask is None else \
        np.asarray(attention_mask).astype(np.int64)
    if mask.shape != (batch, prompt_len):
        raise GenerationError(f"generate: attention_mask must be [batch, seq] = {(batch, prompt_len)} "
                              f"(got {mask.shape})")
    check_left_padded(mask)
    if max_new_tokens == 0:
        return np.zeros((batch, 0), dtype=np.int64)
    check_length(model, prompt_len, max_new_tokens)
    stops = stop_ids(eos_token_id)
    fill = fill_id(pad_token_id, stops, getattr(getattr(model, "config", None), "vocab_size", None))
    rng = np.random.default_rng(seed)

    # prefill: the whole prompt at once, positions cumsum(mask) - 1
    position_ids = position_ids_from_mask(mask)
    # the prompt's last position's logits are the only ones a step reads (logits_to_keep=1)
    out = model.forward(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=mask,
                        position_ids=position_ids, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    finished = np.zeros(batch, dtype=bool)
    generated = []
    for step in range(max_new_tokens):
        logits = np.asarray(out.logits[:, -1])
        check_finite_logits(logits, step)
        tokens = next_tokens(logits, do_sample, temperature, top_k, top_p, rng)
        tokens = np.where(finished, fill, tokens).astype(np.int64)
        generated.append(tokens)
        if streamer is not None:
            streamer(tokens)
        finished |= np.isin(tokens, stops)
        if finished.all() or step == max_new_tokens - 1:
            break
        # decode: one new token per row, its position one past the row's last
        position_ids = position_ids[:, -1:] + 1
        mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=-1)
        out = model.forward(input_ids=tokens[:, None], attention_mask=mask, position_ids=position_ids,
                            past_key_values=cache, use_cache=True)
        cache = out.past_key_values
    return np.stack(generated, axis=1)
