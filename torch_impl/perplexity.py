"""Perplexity of a causal LM over a token sequence, with Hugging Face's sliding-window ("stride") scheme.

Mirror of minivl/perplexity.py (see there for the windowing); the model is a torch_impl causal LM.
"""
from __future__ import annotations


import torch

from minivl.errors import GenerationError
from minivl.perplexity import PerplexityResult, result_of, sequence_ids, window_spans

__all__ = ["PerplexityResult", "window_spans", "token_nll", "perplexity"]


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log softmax(logits)[target] per position, computed in promote(dtype, float32).

    [s, vocab], [s] -> [s]
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    peak = logits.amax(dim=-1, keepdim=True)
    # log Σ exp(z) = m + log Σ exp(z - m), stable for any logit size
    log_normaliser = peak[:, 0] + torch.log(torch.exp(logits - peak).sum(dim=-1))
    # -log p(target) = log Σ exp(z) - z_target
    return log_normaliser - torch.gather(logits, -1, targets[:, None])[:, 0]


@torch.no_grad()
def perplexity(model, input_ids, context: int | None = None, stride: int | None = None) -> PerplexityResult:
    """Sliding-window perplexity of `model` over one token sequence (see minivl.perplexity.perplexity).

    [n] (or [1, n]) -> PerplexityResult
    """
    ids = torch.as_tensor(sequence_ids(input_ids.cpu().numpy() if torch.is_tensor(input_ids) else input_ids))
    if ids.ndim == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.ndim != 1:
        raise GenerationError(f"perplexity takes one sequence [n] or [1, n], got shape {tuple(ids.shape)}")
    n = int(ids.shape[0])
    max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None) or n
    context = int(context) if context is not None else min(n, int(max_positions))
    if context > max_positions:
        raise GenerationError(f"context {context} exceeds the model's max_position_embeddings {max_positions}")
    stride = int(stride) if stride is not None else context
    spans = window_spans(n, context, stride)
    device = _device_of(model)
    total, count = 0.0, 0
    for begin, end, first_scored in spans:
        logits = model(input_ids=ids[None, begin:end].to(device)).logits[0]
        # the logit at window position p predicts token begin + p + 1
        scored = slice(first_scored - begin - 1, end - begin - 1)
        nll = token_nll(logits[scored], ids[first_scored:end].to(logits.device))
        total += float(nll.double().sum())
        count += end - first_scored
    return result_of(total, count, len(spans))


def _device_of(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device(getattr(model, "device", "cpu"))
