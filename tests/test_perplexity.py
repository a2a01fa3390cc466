"""minivl.perplexity vs torch_impl.perplexity, both against Hugging Face's sliding-window loop run on
transformers' own LlamaForCausalLM (the independent reference), on a tiny random Llama checkpoint.
The real-weights perplexity (SmolLM2 on tests/data/english.txt) is tested in test_smollm2.py.
"""
import math

import numpy as np
import pytest
import torch

import minivl.perplexity as mp
import torch_impl.perplexity as tp
from minivl.errors import GenerationError
from minivl.testing import assert_close, tolerance


def hf_guide_windows(n, context, stride):
    """Hugging Face's perplexity guide loop, transcribed: returns (begin, end, scored target positions).

    for begin in range(0, n, stride): end = min(begin + context, n); trg_len = end - prev_end;
    labels = ids[begin:end] with all but the last trg_len set to -100; the model's loss shifts labels
    left by one, so the window's first label is never scored.
    """
    out, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + context, n)
        trg_len = end - prev_end
        labels = np.arange(begin, end)
        labels[:-trg_len] = -100
        scored = [int(t) for t in labels[1:] if t != -100]  # the shift drops label 0
        out.append((begin, end, scored))
        prev_end = end
        if end == n:
            break
    return out


@pytest.mark.parametrize("n,context,stride", [(10, 4, 2), (10, 4, 4), (11, 5, 3), (7, 7, 7), (7, 16, 8),
                                              (100, 32, 1), (2, 2, 1)])
def test_window_spans_are_the_hf_loop(n, context, stride):
    ours = mp.window_spans(n, context, stride)
    theirs = hf_guide_windows(n, context, stride)
    assert [(b, e, list(range(f, e))) for b, e, f in ours] == theirs
    scored = [t for _, e, f in ours for t in range(f, e)]
    assert len(scored) == len(set(scored))  # never twice
    if stride < context:
        assert scored == list(range(1, n))  # every token but the first, exactly once


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_token_nll_matches_torch_cross_entropy(rng, dtype):
    logits = (rng.standard_normal((13, 997)) * 4).astype(dtype)
    targets = rng.integers(0, 997, size=13)
    ref = torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(targets), reduction="none")
    # a log-sum-exp over ~1000 terms and a subtraction: a few ulps of the ~10-sized result
    rtol, atol = tolerance(dtype, 16, 16, scale=10.0)
    assert_close(mp.token_nll(logits, targets), ref, rtol=rtol, atol=atol, what="numpy token_nll")
    assert_close(tp.token_nll(torch.from_numpy(logits), torch.from_numpy(targets)), ref, rtol=rtol, atol=atol,
                 what="torch token_nll")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from minivl.tiny.llm import write_tiny_llm

    return write_tiny_llm(tmp_path_factory.mktemp("tiny_llama_ppl"), "llama", dtype="float32", seed=3)


@pytest.fixture(scope="module")
def tiny_models(tiny_llama):
    """(numpy, torch_impl, transformers-or-None) models of the tiny checkpoint per dtype, loaded once."""
    import minivl
    from torch_impl.loading import load_model as torch_load

    cache = {}

    def get(dtype):
        if dtype not in cache:
            try:
                import transformers

                hf = transformers.LlamaForCausalLM.from_pretrained(tiny_llama, dtype=getattr(torch, dtype)).eval()
            except ImportError:
                hf = None
            cache[dtype] = (minivl.load_model(tiny_llama, dtype=dtype), torch_load(tiny_llama, dtype=dtype), hf)
        return cache[dtype]

    return get


def _ids(model, n, seed=0):
    return np.random.default_rng(seed).integers(0, model.config.vocab_size, size=n)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("context,stride", [(None, None), (16, 8), (16, 16), (12, 5)])
def test_numpy_equals_torch_equals_transformers(tiny_models, dtype, context, stride):
    np_model, torch_model, hf = tiny_models(dtype)
    ids = _ids(np_model, 40)
    ours = mp.perplexity(np_model, ids, context=context, stride=stride)
    mirror = tp.perplexity(torch_model, ids, context=context, stride=stride)
    assert (ours.n_tokens, ours.n_windows) == (mirror.n_tokens, mirror.n_windows)
    # the mean NLL sums ~40 per-token NLLs, each a few ulps off between two float32 forwards through
    # the same (tiny, 2-layer) network: 64 ulps of the ~ln(vocab) sized mean covers it
    rtol, atol = tolerance(dtype, 64, 64, scale=math.log(np_model.config.vocab_size))
    assert_close(np.array(ours.nll), np.array(mirror.nll), rtol=rtol, atol=atol, what="numpy vs torch NLL")

    if hf is None:
        pytest.skip("transformers is not installed: the independent reference half of this test needs it")
    context = context or len(ids)
    stride = stride or context
    total, count = 0.0, 0
    with torch.no_grad():
        for begin, end, scored in hf_guide_windows(len(ids), context, stride):
            window = torch.from_numpy(ids[begin:end])[None]
            labels = window.clone()
            labels[:, : (end - begin) - len(scored)] = -100  # keep only the targets this window scores
            # the guide's `model(window, labels=labels).loss`, with the shift and -100 masking spelled out:
            # transformers' own loss upcasts logits to float32 only, which would spoil the float64 run
            logits = hf(window).logits[0, :-1]
            loss = torch.nn.functional.cross_entropy(logits, labels[0, 1:], ignore_index=-100)
            total += float(loss) * len(scored)
            count += len(scored)
    assert count == ours.n_tokens
    # transformers' Llama runs its RMSNorm and RoPE tables in float32 even in a float64 model, so
    # against it the float32 budget applies in both runs (64 ulps of the ~ln(vocab) mean NLL)
    rtol, atol = tolerance("float32", 64, 64, scale=math.log(np_model.config.vocab_size))
    assert_close(np.array(ours.nll), np.array(total / count), rtol=rtol, atol=atol, what="numpy vs transformers NLL")
    assert ours.perplexity == pytest.approx(math.exp(ours.nll))


def test_bad_settings_raise_generation_error(tiny_models):
    model = tiny_models("float32")[0]
    ids = _ids(model, 20)
    with pytest.raises(GenerationError, match="stride"):
        mp.perplexity(model, ids, context=8, stride=9)
    with pytest.raises(GenerationError, match="at least 2 tokens"):
        mp.perplexity(model, ids[:1])
    with pytest.raises(GenerationError, match="max_position_embeddings"):
        mp.perplexity(model, ids, context=model.config.max_position_embeddings + 1)
    with pytest.raises(GenerationError, match="one sequence"):
        mp.perplexity(model, np.stack([ids, ids]))
    with pytest.raises(GenerationError, match="stride"):
        tp.perplexity(model, ids, context=8, stride=0)
