"""Autoregressive generation with a KV cache, in PyTorch: the mirror of minivl/generate.py.

Same steps, same checks, same position ids (cumsum(mask) − 1, pads 1). Greedy decoding matches
the NumPy package token for token; seeded sampling uses torch's generator, so it is reproducible
but draws different tokens than NumPy's.
"""
from __future__ import annotations

import torch

from minivl.errors import GenerationError
from minivl.generate import (check_finite_logits, check_generation_args, check_left_padded, check_length, fill_id,
                             check_prompt_ids, stop_ids)
from torch_impl.models.decoder import position_ids_from_mask


def warp_logits(logits: torch.Tensor, temperature: float = 1.0, top_k=None, top_p=None) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus); removed entries become -inf. [b, vocab] -> [b, vocab]"""
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, stable=True)  # ascending
        remove_sorted = sorted_logits.softmax(-1).cumsum(-1) <= (1.0 - top_p)
        remove_sorted[:, -1] = False
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def next_tokens(logits: torch.Tensor, do_sample: bool, temperature, top_k, top_p, generator) -> torch.Tensor:
    """[b, vocab] last-position logits -> [b] token ids."""
    if not do_sample:
        return logits.argmax(-1)
    probs = warp_logits(logits.double(), temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0].to(logits.device)


@torch.no_grad()
def generate(model, input_ids=None, inputs_embeds=None, attention_mask=None, max_new_tokens: int = 32,
             do_sample: bool = False, temperature: float = 1.0, top_k=None, top_p=None, seed=None,
             eos_token_id=None, pad_token_id=None, streamer=None) -> torch.Tensor:
    """input_ids [b, s] or inputs_embeds [b, s, hidden], attention_mask [b, s] (left padding) ->
    new tokens only, [b, n] int64 (n <= max_new_tokens). See minivl.generate.generate."""
    check_generation_args(max_new_tokens, do_sample, temperature, top_k, top_p, seed)
    if (input_ids is None) == (inputs_embeds is None):
        raise GenerationError("generate: pass exactly one of input_ids [batch, seq] or inputs_embeds "
                              "[batch, seq, hidden]")
    device = model.device
    if input_ids is not None:
        # the same checks as NumPy's generate, on a CPU copy of the ids (a few ints)
        ids = input_ids.cpu().numpy() if isinstance(input_ids, torch.Tensor) else input_ids
        vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
        prompt = torch.as_tensor(check_prompt_ids(ids, vocab_size), device=device)
    else:
        prompt = torch.as_tensor(inputs_embeds, device=device)
        if prompt.ndim != 3 or prompt.shape[1] == 0:
            raise GenerationError(f"generate: inputs_embeds must be [batch, seq, hidden] with seq >= 1 "
                                  f"(got shape {tuple(prompt.shape)})")
    batch, prompt_len = prompt.shape[:2]
    mask = torch.ones(batch, prompt_len, dtype=torch.int64, device=device) if attention_mask is None else \
        torch.as_tensor(attention_mask, device=device).to(torch.int64)
    if tuple(mask.shape) != (batch, prompt_len):
        raise GenerationError(f"generate: attention_mask must be [batch, seq] = {(batch, prompt_len)} "
                              f"(got {tuple(mask.shape)})")
    check_left_padded(mask.cpu().numpy())
    if max_new_tokens == 0:
        return torch.zeros(batch, 0, dtype=torch.int64, device=device)
    check_length(model, prompt_len, max_new_tokens)
    stops = torch.as_tensor(stop_ids(eos_token_id), device=device)
    fill = fill_id(pad_token_id, stops.cpu().numpy(), getattr(getattr(model, "config", None), "vocab_size", None))
    generator = torch.Generator().manual_seed(int(seed)) if seed is not None else None  # (np.int64 too)

    position_ids = position_ids_from_mask(mask)
    out = model.forward(input_ids=prompt if input_ids is not None else None,
                        inputs_embeds=prompt if inputs_embeds is not None else None,
                        attention_mask=mask, position_ids=position_ids, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    generated = []
    for step in range(max_new_tokens):
        logits = out.logits[:, -1]
        if not bool(torch.isfinite(logits).all()):  # the rare case: let the NumPy check say which rows
            check_finite_logits(logits.float().cpu().numpy(), step)
        tokens = next_tokens(logits, do_sample, temperature, top_k, top_p, generator)
        tokens = torch.where(finished, torch.full_like(tokens, fill), tokens).to(torch.int64)
        generated.append(tokens)
        if streamer is not None:
            streamer(tokens)
        finished |= torch.isin(tokens, stops)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        position_ids = position_ids[:, -1:] + 1
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.int64, device=device)], dim=-1)
        out = model.forward(input_ids=tokens[:, None], attention_mask=mask, position_ids=position_ids,
                            past_key_values=cache, use_cache=True)
        cache = out.past_key_values
    return torch.stack(generated, dim=1)
