"""Perplexity of a causal LM over a token sequence, with Hugging Face's sliding-window ("stride") scheme.

Perplexity = exp(mean over scored tokens t of -log p(x_t | x_<t)). A uniform guess over SmolLM2's
49,152 tokens scores 49,152; a good small model on ordinary English prose about 10-20.

Text longer than the model's context is cut into windows of `context` tokens whose starts are
`stride` apart (Hugging Face's perplexity guide). Each window scores only the tokens that no earlier
window scored, each seeing at least `context - stride` tokens of left context:

    window k covers [begin_k, end_k) with begin_k = k·stride, end_k = min(begin_k + context, n);
    it scores targets [max(end_{k-1}, 1), end_k)   (end_{-1} = 0; token 0 has nothing to condition on).

With stride < context every token but the first is scored exactly once. stride = context gives
disjoint windows (fast, pessimistic) in which, as in Hugging Face's loop, the first token of each
window is not scored: nothing in its window precedes it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from minivl.errors import GenerationError, NonFiniteError


@dataclass
class PerplexityResult:
    perplexity: float  # exp(nll)
    nll: float  # mean negative log-likelihood per scored token, in nats
    n_tokens: int  # how many tokens were scored (n - 1 for a sequence of n tokens)
    n_windows: int


def window_spans(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """The sliding windows as (begin, end, first_scored): the model sees ids[begin:end] and scores
    targets first_scored .. end-1 (Hugging Face's stride loop, with exact token counts)."""
    if n_tokens < 2:
        raise GenerationError(f"perplexity needs at least 2 tokens, got {n_tokens}: the text is too short")
    if not 2 <= context:
        raise GenerationError(f"context must be >= 2 tokens, got {context}")
    if not 1 <= stride <= context:
        raise GenerationError(f"stride must be in [1, context={context}], got {stride}")
    spans, previous_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context, n_tokens)
        spans.append((begin, end, max(previous_end, begin + 1)))
        previous_end = end
        if end == n_tokens:
            break
    return spans


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target] per position, computed in promote(dtype, float32).

    [s, vocab], [s] -> [s]
    """
    logits = logits.astype(np.promote_types(logits.dtype, np.float32))
    peak = logits.max(axis=-1, keepdims=True)
    # log Σ exp(z) = m + log Σ exp(z - m), stable for any logit size
    log_normaliser = peak[:, 0] + np.log(np.exp(logits - peak).sum(axis=-1))
    # -log p(target) = log Σ exp(z) - z_target
    return log_normaliser - np.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]


def sequence_ids(input_ids) -> np.ndarray:
    """input_ids as int64, or a GenerationError when they are not whole token ids (floats are not truncated)."""
    try:
        ids = np.asarray(input_ids)
    except ValueError:  # ragged nested lists
        ids = np.asarray(None)
    if ids.dtype.kind not in "iu":
        raise GenerationError(f"perplexity takes integer token ids [n] (got {type(input_ids).__name__} of dtype "
                              f"{ids.dtype}); encode a text first: tokenizer.encode(text)")
    return ids.astype(np.int64, copy=False)


def result_of(total: float, count: int, n_windows: int) -> PerplexityResult:
    """The PerplexityResult of a summed NLL; NonFiniteError when it is NaN (the model's logits were not finite)."""
    mean = total / count
    if mean != mean:
        raise NonFiniteError("the mean negative log-likelihood is NaN: the model's logits are not finite; check the "
                             "checkpoint (minivl.checkpoint.check_weights) or compute in float64")
    # e^mean overflows a float past 709 nats a token (math.exp would raise): that perplexity is inf
    return PerplexityResult(perplexity=math.exp(mean) if mean < 709 else math.inf, nll=mean, n_tokens=count,
                            n_windows=n_windows)


def perplexity(model, input_ids, context: int | None = None, stride: int | None = None) -> PerplexityResult:
    """Sliding-window perplexity of `model` (a causal LM: forward(input_ids [1, s]).logits [1, s, vocab])
    over one token sequence. context defaults to min(n, max_position_embeddings), stride to context.

    [n] (or [1, n]) -> PerplexityResult
    """
    ids = sequence_ids(input_ids)
    if ids.ndim == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.ndim != 1:
        raise GenerationError(f"perplexity takes one sequence [n] or [1, n], got shape {ids.shape}")
    n = int(ids.shape[0])
    max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None) or n
    context = int(context) if context is not None else min(n, int(max_positions))
    if context > max_positions:
        raise GenerationError(f"context {context} exceeds the model's max_position_embeddings {max_positions}")
    stride = int(stride) if stride is not None else context
    spans = window_spans(n, context, stride)
    total, count = 0.0, 0
    for begin, end, first_scored in spans:
        logits = np.asarray(model(input_ids=ids[None, begin:end]).logits)[0]
        # the logit at window position p predicts token begin + p + 1
        scored = slice(first_scored - begin - 1, end - begin - 1)
        nll = token_nll(logits[scored], ids[first_scored:end])
        total += float(nll.astype(np.float64).sum())
        count += end - first_scored
    return result_of(total, count, len(spans))
