"""The decoders' fast paths, held equal to the readable ones (NumPy and torch):

* fused projections: Llama/Qwen2's q/k/v and gate/up weights (InternLM2's w1/w3) become views of one matrix at load
  (`FusedProjection`), so one GEMM serves each group. The checkpoint's tensors, names and
  state_dict() are unchanged; the forward equals the separate-projection forward to the summation
  order of a GEMM (the fused product may be blocked differently by BLAS: 16 ulps of max|logits|,
  measured 0 - 2 here);
* causal attention in query blocks (`causal_attention_blocks`) in every prefill longer than a block:
  equal to the full-score attention to the softmax denominators' summation order (MODEL_ULPS, the
  tolerance of the decoder parity tests; measured <= 4 ulps here);
* `logits_to_keep`: the head over the last n positions only, equal to those rows of the full logits;
* a long prefill never holds a [heads, n, n] score tensor (tracemalloc);
* the flat decode step (minivl/models/decode_step.py): one cached token through Llama/Qwen2/Phi-3/InternLM2 layers
  with the layers' operations in their order, held BIT-equal to them (logits and cache), and not
  taken where it does not apply (padding, a window that hides keys, other families, probabilities
  or hidden states asked for, a prefill).
"""
import tracemalloc

import numpy as np
import pytest
import torch

import minivl
import minivl.attention_blocks
import torch_impl
import torch_impl.attention_blocks
import torch_impl.models.fused
from _decoder_util import DTYPES, MODEL_ULPS, assert_parity
from minivl.errors import ShapeError
from minivl.models.fused import FusedProjection
from minivl.tiny.llm import write_tiny_llm


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("fast")
    return {family: write_tiny_llm(root / family, family, seed=3) for family in ("llama", "qwen2", "internlm2")}


def unfuse(model):
    """Give every fused Linear a private copy of its weight: `project` then runs the separate GEMMs."""
    for _, module in model.named_modules():
        if getattr(module, "fused", None) is not None:
            module.weight = module.weight.copy() if isinstance(module.weight, np.ndarray) else \
                torch.nn.Parameter(module.weight.clone(), requires_grad=False)
            if module.bias is not None:
                module.bias = module.bias.copy() if isinstance(module.bias, np.ndarray) else \
                    torch.nn.Parameter(module.bias.clone(), requires_grad=False)
    return model


FUSED_GROUPS = {  # family -> (path of layer 0, the groups of Linear modules fused into one GEMM)
    "llama": ("model.layers.0", [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                                 ("mlp.gate_proj", "mlp.up_proj")]),
    "qwen2": ("model.layers.0", [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                                 ("mlp.gate_proj", "mlp.up_proj")]),
    "internlm2": ("model.layers.0", [("feed_forward.w1", "feed_forward.w3")]),  # wqkv is fused in the checkpoint
}


@pytest.mark.parametrize("family", sorted(FUSED_GROUPS))
@pytest.mark.parametrize("package", ["numpy", "torch"])
def test_fused_projections_keep_the_checkpoint_and_equal_the_separate_path(checkpoints, family, package):
    from minivl.checkpoint import load_state_dict

    load = minivl.load_model if package == "numpy" else torch_impl.load_model
    model = load(checkpoints[family], dtype="float32")
    layer_path, groups = FUSED_GROUPS[family]
    layer = model.get_submodule(layer_path)
    fused_class = FusedProjection if package == "numpy" else torch_impl.models.fused.FusedProjection
    for group in groups:
        linears = [layer.get_submodule(name) for name in group]
        assert isinstance(linears[0].fused, fused_class) and linears[0].fused.serves(linears), group
    # the state dict is the checkpoint's: same keys, same values (the views hold them)
    stored = load_state_dict(checkpoints[family])
    state = model.state_dict()
    assert set(state) - {"lm_head.weight"} == set(stored) - {"lm_head.weight"}
    for key, value in stored.items():
        np.testing.assert_array_equal(np.asarray(state[key]), np.asarray(value), err_msg=key)

    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 9))
    wrap = np.asarray if package == "numpy" else torch.from_numpy
    fused = model(input_ids=wrap(ids)).logits
    separate = unfuse(model)(input_ids=wrap(ids)).logits
    for group in groups:  # unfused: project() now runs one GEMM per module
        linears = [layer.get_submodule(name) for name in group]
        assert not linears[0].fused.serves(linears), group
    assert_parity(fused, separate, "float32", ulps=16, what=f"{package} {family} fused vs separate")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("package", ["numpy", "torch"])
def test_blocked_causal_prefill_equals_full_attention(checkpoints, dtype, package, monkeypatch):
    """A 300-token prefill (3 query blocks of 128) with left padding in one row, against the same model
    with causal_attention_blocks replaced by the plain full-score call."""
    module = minivl.attention_blocks if package == "numpy" else torch_impl.attention_blocks
    load = minivl.load_model if package == "numpy" else torch_impl.load_model
    wrap = np.asarray if package == "numpy" else torch.from_numpy
    model = load(checkpoints["qwen2"], dtype=dtype)
    ids = np.random.default_rng(1).integers(0, model.config.vocab_size, (2, 300))
    mask = np.ones((2, 300), dtype=np.int64)
    mask[1, :7] = 0
    kwargs = dict(input_ids=wrap(ids), attention_mask=wrap(mask), output_hidden_states=True)
    blocked = model(**kwargs)
    calls = []

    def full(q, k, v, *, mask, bias=None, block_q=128, **options):
        calls.append(q.shape[2])
        return module.scaled_dot_product_attention(q, k, v, mask=mask, bias=bias, **options)  # the reference it imports

    monkeypatch.setattr(module, "causal_attention_blocks", full)
    reference = model(**kwargs)
    assert calls and calls[0] == 300  # the model does go through the blocked path
    real = mask.astype(bool)  # padded positions hold garbage in both (a uniform average of pads)
    for i, (a, r) in enumerate(zip(blocked.hidden_states, reference.hidden_states)):
        assert_parity(np.asarray(a)[real], np.asarray(r)[real], dtype, ulps=MODEL_ULPS, what=f"hidden {i}")
    assert_parity(np.asarray(blocked.logits)[real], np.asarray(reference.logits)[real], dtype, what="logits")


@pytest.mark.parametrize("package", ["numpy", "torch"])
def test_logits_to_keep(checkpoints, package):
    load = minivl.load_model if package == "numpy" else torch_impl.load_model
    wrap = np.asarray if package == "numpy" else torch.from_numpy
    model = load(checkpoints["llama"], dtype="float64")
    ids = wrap(np.random.default_rng(2).integers(0, model.config.vocab_size, (2, 6)))
    full = np.asarray(model(input_ids=ids).logits)
    for n in (1, 3):
        last = np.asarray(model(input_ids=ids, logits_to_keep=n).logits)
        assert last.shape == (2, n, model.config.vocab_size)
        assert_parity(last, full[:, -n:], "float64", ulps=8, what=f"logits_to_keep={n}")
    for bad in (-1, 1.5, True):
        with pytest.raises(ShapeError, match="logits_to_keep must be an int >= 0"):
            model(input_ids=ids, logits_to_keep=bad)


def test_long_prefill_never_holds_a_heads_n_n_tensor(tmp_path):
    """4096 tokens through a 1-layer, 4-head decoder: one [4, 4096, 4096] float32 score tensor would be
    256 MiB. The blocked prefill holds blocks of 128 queries (8 MiB of scores); its largest array is the
    additive [1, 1, n, n] mask (64 MiB, 1/heads of a score tensor) and its bool visibility pattern (16 MiB)."""
    path = write_tiny_llm(tmp_path / "long", "llama", num_hidden_layers=1, max_position_embeddings=8192)
    model = minivl.load_model(path, dtype="float32")
    heads, n = model.config.num_attention_heads, 4096
    ids = np.random.default_rng(3).integers(0, model.config.vocab_size, (1, n))
    tracemalloc.start()
    try:
        model(input_ids=ids, logits_to_keep=1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    scores = heads * n * n * 4
    assert peak < scores / 2, f"peak {peak / 2**20:.0f} MiB vs one score tensor {scores / 2**20:.0f} MiB"


# ----------------------------------------------------------------------------- the decode step

def _decode(model, ids, steps, attention_mask=None):
    """Prefill ids, then `steps` greedy cached steps: (the steps' logits [b, steps, vocab], the cache)."""
    out = model(input_ids=ids, attention_mask=attention_mask, use_cache=True)
    cache, logits = out.past_key_values, []
    token = np.argmax(out.logits[:, -1], axis=-1)[:, None]
    for _ in range(steps):
        if attention_mask is not None:
            attention_mask = np.concatenate([attention_mask, np.ones_like(attention_mask[:, :1])], axis=1)
        out = model(input_ids=token, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits.append(out.logits)
        token = np.argmax(out.logits[:, -1], axis=-1)[:, None]
    return np.concatenate(logits, axis=1), cache


def _with_and_without_decode_step(monkeypatch, model, *args, reference_model=None, **kwargs):
    """(_decode with minivl/models/decode_step.py, _decode with the layers' own forward), and how many steps
    went through the fast path. reference_model: a second copy for the layers' run, for a model with
    state (InternLM2's dynamic NTK RoPE keeps the base it enlarged)."""
    from minivl.models import decode_step

    calls = []
    fast = decode_step.decode_layers
    monkeypatch.setattr(decode_step, "decode_layers", lambda *a: calls.append(1) or fast(*a))
    with_step = _decode(model, *args, **kwargs)
    monkeypatch.setattr(decode_step, "decode_plan", lambda *a: None)
    return with_step, _decode(reference_model or model, *args, **kwargs), len(calls)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family,overrides", [
    ("llama", {}),
    ("qwen2", {}),  # q/k/v biases
    ("qwen2", {"use_sliding_window": True, "sliding_window": 64, "max_window_layers": 1}),  # a window wider than t
    ("phi3", {}),  # qkv_proj and gate_up_proj as the checkpoint fuses them, a window on every layer
    ("internlm2", {}),  # wqkv grouped per KV head, w1/w3 fused at load
    ("internlm2", {"bias": True}),  # biased wqkv and wo
    ("internlm2", {"max_position_embeddings": 10}),  # dynamic NTK: steps past 10 keys enlarge the base
])
def test_decode_step_is_bit_equal_to_the_layers(tmp_path, monkeypatch, dtype, family, overrides):
    """The flat decode step makes the layers' operations in their order: logits and cache equal BIT for bit."""
    path = write_tiny_llm(tmp_path / family, family, seed=5, **overrides)
    model, reference_model = (minivl.load_model(path, dtype=dtype) for _ in range(2))
    ids = np.random.default_rng(2).integers(0, model.config.vocab_size, (2, 7))
    (fast, fast_cache), (reference, reference_cache), calls = _with_and_without_decode_step(
        monkeypatch, model, ids, 6, reference_model=reference_model)
    assert calls == 6  # every step went through it
    if "max_position_embeddings" in overrides:  # the steps did cross the limit: the base was enlarged
        assert model.rotary.dynamic.base > model.rotary.dynamic.rope_theta
    np.testing.assert_array_equal(fast, reference)
    for name in ("key_cache", "value_cache"):
        for ours, theirs in zip(getattr(fast_cache, name), getattr(reference_cache, name)):
            np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("family,overrides,padded", [
    ("llama", {}, True),                    # a left-padded batch: the mask hides keys
    ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 0}, False),  # the window does
    ("phi3", {"sliding_window": 4}, False),  # Phi-3's window on every layer hides keys
    ("internlm2", {}, True),                # InternLM2 with padding
    ("mpt_alibi", {}, False),
])
def test_decode_step_leaves_other_cases_to_the_layers(tmp_path, monkeypatch, family, overrides, padded):
    model = minivl.load_model(write_tiny_llm(tmp_path / family, family, seed=6, **overrides), dtype="float32")
    ids = np.random.default_rng(3).integers(3, model.config.vocab_size, (2, 7))
    mask = None
    if padded:
        mask = np.ones_like(ids)
        mask[0, :3] = 0
    (fast, _), (reference, _), calls = _with_and_without_decode_step(monkeypatch, model, ids, 5, attention_mask=mask)
    assert calls == 0
    np.testing.assert_array_equal(fast, reference)


@pytest.mark.parametrize("family", ["llama", "phi3", "internlm2"])
def test_decode_plan_holds_the_modules_own_arrays_and_gives_up_once_they_are_unfused(tmp_path, monkeypatch, family):
    """The step reads the arrays `decode_plan` gathered that step: the modules' current ones (the same
    objects, no copies); once a fused group's weights are no longer views of one matrix (a module given
    its own weight) the plan is None and the layers run themselves, with the same logits."""
    from minivl.models import decode_step

    model = minivl.load_model(write_tiny_llm(tmp_path / family, family, seed=8), dtype="float32")
    plans = []
    fast = decode_step.decode_layers
    monkeypatch.setattr(decode_step, "decode_layers", lambda plan, *a: plans.append(plan) or fast(plan, *a))
    ids = np.random.default_rng(5).integers(0, model.config.vocab_size, (1, 6))
    cache = model(input_ids=ids[:, :5], use_cache=True).past_key_values
    fast_logits = model(input_ids=ids[:, 5:], past_key_values=cache, use_cache=True).logits
    (plan,) = plans
    layers = model.get_submodule(model.layers_path)
    assert len(plan) == len(layers)
    for step, layer in zip(plan, layers):
        if family == "internlm2":
            attention, mlp, norm = layer.attention, layer.feed_forward, layer.attention_norm
            qkv, out, down, gate = attention.wqkv.weight, attention.wo.weight, mlp.w2.weight, mlp.w1
        else:
            attention, mlp, norm = layer.self_attn, layer.mlp, layer.input_layernorm
            qkv = attention.qkv_proj.weight if family == "phi3" else attention.q_proj.fused.weight
            out, down = attention.o_proj.weight, mlp.down_proj.weight
            gate = mlp.gate_up_proj if family == "phi3" else mlp.gate_proj
        gate_up = gate.weight if family == "phi3" else gate.fused.weight
        assert step.qkv[0] is qkv and step.out_proj[0] is out and step.down_proj[0] is down
        assert step.gate_up[0] is gate_up and step.input_norm[0] is norm.weight and step.input_norm[1] == norm.eps
    if family == "phi3":
        return  # its q|k|v and gate|up are one checkpoint tensor each: nothing to unfuse
    cache = model(input_ids=ids[:, :5], use_cache=True).past_key_values
    unfuse(model)
    np.testing.assert_allclose(model(input_ids=ids[:, 5:], past_key_values=cache, use_cache=True).logits,
                               fast_logits, rtol=1e-5, atol=1e-6)  # separate GEMMs: their own summation order
    assert len(plans) == 1  # the unfused step ran the layers


def test_decode_step_not_taken_for_probabilities_hidden_states_or_a_prefill(tmp_path, monkeypatch):
    from minivl.models import decode_step

    model = minivl.load_model(write_tiny_llm(tmp_path / "llama", "llama", seed=7), dtype="float32")
    calls = []
    fast = decode_step.decode_layers
    monkeypatch.setattr(decode_step, "decode_layers", lambda *a: calls.append(1) or fast(*a))
    ids = np.random.default_rng(4).integers(0, model.config.vocab_size, (1, 5))
    cache = model(input_ids=ids, use_cache=True).past_key_values
    assert not calls  # a prefill of 5 tokens
    token = ids[:, -1:]
    for kwargs in ({"output_attentions": True}, {"output_hidden_states": True}):
        out = model(input_ids=token, past_key_values=cache, use_cache=True, **kwargs)
        cache = out.past_key_values
        assert not calls, kwargs
    assert out.hidden_states is not None
    assert len(model(input_ids=token).logits) == 1 and not calls  # no cache: a one-token forward
    model(input_ids=token, past_key_values=cache, use_cache=True)
    assert calls == [1]
