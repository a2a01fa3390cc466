"""RoPE: minivl/rope.py (NumPy) against torch_impl/rope.py, against transformers 5.24, and properties.

Tolerances are |actual − ref| <= atol + rtol·|ref| from minivl.testing.tolerance, each justified
where it is used. Three facts drive them:
* inv_freq: torch's vectorised float32 pow is within 1 ulp but not correctly rounded, NumPy's is
  (nearly) correctly rounded, so the two differ by 1 ulp in a few entries; YaRN's blend and Llama-3's
  smoothing add a few more roundings (4 ulps measured).
* cos/sin from the SAME inv_freq: the angle float(p)·ω is one correctly rounded product in both, so
  only the cos/sin routines differ (1 ulp measured).
* cos/sin each from its own inv_freq: an ulp of ω moves the angle p·ω by p·ω·eps, up to 8e-3 rad at
  p = 131072 in float32. Those comparisons are done per position band with atol ∝ the band's
  largest angle.
"""
import math

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, Phi3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as hf_apply_rotary_pos_emb
from transformers.models.llama.modeling_llama import rotate_half as hf_rotate_half
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding
from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb as hf_phi3_apply_rotary_pos_emb

import minivl.rope as npr
import torch_impl.rope as tr
from minivl.errors import ConfigError, GenerationError, ShapeError
from minivl.testing import assert_close, tolerance
from tests.conftest import requires_cuda

DTYPES = [pytest.param(np.float32, torch.float32, id="float32"), pytest.param(np.float64, torch.float64, id="float64")]
TYPES = ["default", "linear", "dynamic", "yarn", "longrope", "llama3", "su", "phi3_yarn"]
HF_TYPES = ["linear", "dynamic", "yarn", "longrope", "llama3"]  # the keys of ROPE_INIT_FUNCTIONS we cover
MAX_POSITION = 131072


def make_case(rope_type, head_dim, rng, partial=1.0):
    """(rope_theta, max_position_embeddings, params) for one randomised but realistic config."""
    rope_theta = float(rng.choice([1e4, 5e5, 1e6]))
    rotary_half = int(head_dim * partial) // 2
    params = {} if partial == 1.0 else {"partial_rotary_factor": partial}
    if rope_type == "linear":
        return rope_theta, 4096, {**params, "factor": float(rng.uniform(1.0, 8.0))}
    if rope_type == "dynamic":
        return rope_theta, 32768, {**params, "factor": float(rng.uniform(1.0, 4.0))}
    if rope_type == "yarn":
        factor = float(rng.choice([2.0, 4.0, 8.0, 16.0]))
        return rope_theta, int(4096 * factor), {**params, "factor": factor, "original_max_position_embeddings": 4096}
    if rope_type == "llama3":
        return rope_theta, 131072, {**params, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 8192}
    if rope_type in ("longrope", "su", "phi3_yarn"):
        return rope_theta, 131072, {**params, "original_max_position_embeddings": 4096,
                                    "short_factor": list(rng.uniform(1.0, 1.2, rotary_half)),
                                    "long_factor": list(rng.uniform(1.0, 40.0, rotary_half))}
    return rope_theta, 4096, params


def hf_config(head_dim, rope_theta, max_position_embeddings, rope_type, params):
    """A transformers LlamaConfig carrying this RoPE in `rope_parameters` (5.x form)."""
    return LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim,
                       max_position_embeddings=max_position_embeddings,
                       rope_parameters={"rope_type": rope_type, "rope_theta": rope_theta, **params})


def gold_rtol_ulps(rope_theta):
    """float32 reference vs float64 gold, in float32 ulps: rounding the exponent 2j/d to float32 moves
    b^(2j/d) by up to ln(b)·eps/2 relative; pow, divisions and the blends add a few ulps more."""
    return math.log(rope_theta) / 2 + 6


def seq_lens_for(rope_type, max_position_embeddings, params):
    original = params.get("original_max_position_embeddings", max_position_embeddings)
    return sorted({None, original, original + 1, max_position_embeddings, MAX_POSITION}, key=lambda v: v or 0)


# ---------------------------------------------------------------- NumPy vs torch_impl ---------------------------
@pytest.mark.parametrize("rope_type", TYPES)
@pytest.mark.parametrize("np_dtype, torch_dtype", DTYPES)
def test_inv_freq_numpy_matches_torch(rope_type, np_dtype, torch_dtype):
    rng = np.random.default_rng(TYPES.index(rope_type))
    for head_dim in (64, 96, 128):
        for partial in (1.0, float(rng.choice([0.5, 0.75]))):
            rope_theta, M, params = make_case(rope_type, head_dim, rng, partial)
            for seq_len in seq_lens_for(rope_type, M, params):
                inv_np, s_np = npr.rope_init(rope_type, head_dim, rope_theta, M, seq_len, dtype=np_dtype, **params)
                inv_t, s_t = tr.rope_init(rope_type, head_dim, rope_theta, M, seq_len, dtype=torch_dtype, **params)
                assert inv_np.dtype == np_dtype and inv_t.dtype == torch_dtype
                assert inv_np.shape == (int(head_dim * partial) // 2,)
                # 8 ulps, relative only (every ω > 0): pow differs by ≤ 1 ulp (torch's SIMD pow is not
                # correctly rounded), the yarn/llama3 blends add up to 3 more roundings
                rtol, atol = tolerance(np_dtype, 8, 0)
                assert_close(inv_np, inv_t, rtol=rtol, atol=atol, what=f"{rope_type} D={head_dim} pr={partial} "
                             f"seq_len={seq_len} inv_freq")
                assert s_np == s_t  # the same Python-float arithmetic in both


@pytest.mark.parametrize("rope_type", ["default", "yarn", "su", "llama3"])
@pytest.mark.parametrize("np_dtype, torch_dtype", DTYPES)
def test_cos_sin_numpy_matches_torch_up_to_131072(rope_type, np_dtype, torch_dtype):
    rng = np.random.default_rng(1)
    positions = np.concatenate([np.arange(16), rng.integers(0, MAX_POSITION + 1, (2, 768)).ravel(),
                                [MAX_POSITION - 1, MAX_POSITION]]).reshape(2, -1)
    for head_dim in (64, 96, 128):
        rope_theta, M, params = make_case(rope_type, head_dim, rng, float(rng.choice([1.0, 0.5])))
        inv_t, s = tr.rope_init(rope_type, head_dim, rope_theta, M, MAX_POSITION + 1, dtype=torch_dtype, **params)
        inv_np, _ = npr.rope_init(rope_type, head_dim, rope_theta, M, MAX_POSITION + 1, dtype=np_dtype, **params)
        cos_t, sin_t = tr.rope_cos_sin(torch.as_tensor(positions), inv_t, s)
        assert cos_t.shape == (2, positions.shape[1], inv_t.shape[0] * 2) and cos_t.dtype == torch_dtype

        # same ω: identical angles (one rounded product), only cos/sin differ: 2 ulps of s (1 measured)
        cos_np, sin_np = npr.rope_cos_sin(positions, inv_t.numpy(), s)
        rtol, atol = tolerance(np_dtype, 2, 2, scale=s)
        assert_close(cos_np, cos_t, rtol=rtol, atol=atol, what=f"{rope_type} D={head_dim} cos, same inv_freq")
        assert_close(sin_np, sin_t, rtol=rtol, atol=atol, what=f"{rope_type} D={head_dim} sin, same inv_freq")

        # each its own ω (≤ 8 ulps apart): |Δθ| ≤ 10 ulps·θ_max per band, plus 2 ulps for cos/sin
        cos_np, sin_np = npr.rope_cos_sin(positions, inv_np, s)
        for lo, hi in [(0, 2048), (2048, 16384), (16384, MAX_POSITION + 1)]:
            band = (positions >= lo) & (positions < hi)
            theta_max = float(positions[band].max() * inv_np.max())
            rtol, atol = tolerance(np_dtype, 2, 10, scale=s * (theta_max + 1))
            assert_close(cos_np[band], cos_t[torch.as_tensor(band)], rtol=rtol, atol=atol,
                         what=f"{rope_type} D={head_dim} cos in [{lo}, {hi})")
            assert_close(sin_np[band], sin_t[torch.as_tensor(band)], rtol=rtol, atol=atol,
                         what=f"{rope_type} D={head_dim} sin in [{lo}, {hi})")


@pytest.mark.parametrize("np_dtype, torch_dtype", DTYPES)
@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_apply_rope_numpy_matches_torch(np_dtype, torch_dtype, partial, rng):
    b, h, n, head_dim = 2, 3, 17, 96
    x = rng.standard_normal((b, h, n, head_dim)).astype(np_dtype)
    position_ids = rng.integers(0, MAX_POSITION, (b, n))
    params = make_case("su", head_dim, rng, partial)[2]
    inv, s = tr.rope_init("su", head_dim, 1e4, 131072, n, dtype=torch_dtype, **params)
    cos, sin = tr.rope_cos_sin(torch.as_tensor(position_ids), inv, s)
    out_t = tr.apply_rope(torch.as_tensor(x), cos[:, None], sin[:, None])
    out_np = npr.apply_rope(x, cos.numpy()[:, None], sin.numpy()[:, None])
    assert out_np.shape == x.shape and out_np.dtype == np_dtype
    # identical inputs, two products and one add in both: 1 ulp each, 4 ulps of |x|·s allowed
    rtol, atol = tolerance(np_dtype, 4, 4, scale=s * float(np.abs(x).max()))
    assert_close(out_np, out_t, rtol=rtol, atol=atol, what=f"apply_rope pr={partial}")
    rotary_dim = cos.shape[-1]
    assert np.array_equal(out_np[..., rotary_dim:], x[..., rotary_dim:])  # pass-through dims untouched



@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
@pytest.mark.parametrize("layout", ["contiguous", "heads of a fused projection", "partial rotary", "tables per head"])
def test_apply_rope_fast_is_apply_rope_bit_for_bit(dtype, layout, rng):
    """The models' fast path (three passes, no rotate_half copy): EXACT equality, the layouts a model
    gives it included: q as a strided view [b, H, s, d] of a projection's [b, s, H·d] output, Phi-3's
    partial rotary (the rest passes through), tables broadcast over the heads or one per head."""
    import ml_dtypes

    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    b, h, n, head_dim, rotary_dim = 2, 3, 17, 64, 64
    if layout == "heads of a fused projection":
        x = rng.standard_normal((b, n, 2 * h * head_dim)).astype(np_dtype)[..., :h * head_dim]
        x = x.reshape(b, n, h, head_dim).transpose(0, 2, 1, 3)
    else:
        x = rng.standard_normal((b, h, n, head_dim)).astype(np_dtype)
    if layout == "partial rotary":
        rotary_dim = 32
    x[0, 0, 0] = -0.0
    heads = h if layout == "tables per head" else 1
    cos, sin = (rng.uniform(-1, 1, (b, heads, n, rotary_dim)).astype(np.float32) for _ in range(2))
    fast, reference = npr.apply_rope_fast(x, cos, sin), npr.apply_rope(x, cos, sin)
    assert fast.dtype == reference.dtype and fast.shape == reference.shape
    bits = [np.ascontiguousarray(a).view(np.uint8) for a in (fast, reference)]
    np.testing.assert_array_equal(*bits)
    out_t = tr.apply_rope_fast(torch.from_numpy(np.asarray(x, np.float64)), torch.from_numpy(cos.astype(np.float64)),
                               torch.from_numpy(sin.astype(np.float64)))
    # against the torch twin in float64: the fast path's own rounding only (two products, one sum)
    rtol, atol = tolerance(dtype, 4, 4, scale=float(np.abs(np.asarray(x, np.float64)).max()))
    assert_close(np.asarray(fast, np.float64), out_t, rtol=rtol, atol=atol, what=f"apply_rope_fast {dtype} {layout}")
    with pytest.raises(ShapeError, match="apply_rope"):
        npr.apply_rope_fast(x, cos[..., :-1], sin[..., :-1])

# ---------------------------------------------------------------- transformers 5.24 as the reference --------
@pytest.mark.parametrize("rope_type", HF_TYPES)
def test_inv_freq_matches_transformers_init_functions(rope_type):
    rng = np.random.default_rng(7 + len(rope_type))
    for head_dim in (64, 96, 128):
        for partial in (1.0, 0.5):
            rope_theta, M, params = make_case(rope_type, head_dim, rng, partial)
            for seq_len in seq_lens_for(rope_type, M, params):
                config = hf_config(head_dim, rope_theta, M, rope_type, dict(params))
                # a Python-int seq_len: transformers' dynamic then computes b' in float64, as we do
                ref, ref_s = ROPE_INIT_FUNCTIONS[rope_type](config, None, seq_len=seq_len)
                what = f"{rope_type} D={head_dim} pr={partial} seq_len={seq_len}"
                inv_t, s_t = tr.rope_init(rope_type, head_dim, rope_theta, M, seq_len, **params)
                # torch_impl runs the same torch ops in the same order on the same kernels: bit-exact
                rtol, atol = tolerance(torch.float32, 0, 0)
                assert_close(inv_t, ref, rtol=rtol, atol=atol, what=what + " torch_impl")
                assert s_t == pytest.approx(ref_s, rel=0, abs=0)
                inv_np, s_np = npr.rope_init(rope_type, head_dim, rope_theta, M, seq_len, **params)
                # NumPy float32: 8 ulps (see test_inv_freq_numpy_matches_torch)
                rtol, atol = tolerance(np.float32, 8, 0)
                assert_close(inv_np, ref, rtol=rtol, atol=atol, what=what + " numpy float32")
                assert s_np == ref_s
                inv_gold, _ = npr.rope_init(rope_type, head_dim, rope_theta, M, seq_len, dtype=np.float64, **params)
                base = npr.rope_parameters(rope_type, head_dim, rope_theta, M, seq_len, **params).rope_theta
                # the float32 reference's own rounding, measured from the float64 gold
                rtol, atol = tolerance(np.float32, gold_rtol_ulps(base), 0)
                assert_close(ref, inv_gold, rtol=rtol, atol=atol, what=what + " transformers vs float64 gold")


@pytest.mark.parametrize("partial", [1.0, 0.5, 0.75])
def test_default_matches_transformers_llama_and_phi3(partial):
    for head_dim in (64, 96, 128):
        phi3 = Phi3Config(hidden_size=head_dim * 2, num_attention_heads=2, max_position_embeddings=4096,
                          rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": partial})
        ref, _ = Phi3RotaryEmbedding.compute_default_rope_parameters(phi3)
        kwargs = {} if partial == 1.0 else {"partial_rotary_factor": partial}
        inv_t, s = tr.rope_init("default", head_dim, 1e4, 4096, **kwargs)
        rtol, atol = tolerance(torch.float32, 0, 0)  # same ops, same kernels: bit-exact
        assert_close(inv_t, ref, rtol=rtol, atol=atol, what=f"default D={head_dim} pr={partial} vs Phi-3")
        assert s == 1.0
        if partial == 1.0:  # Llama's default ignores partial_rotary_factor
            llama = hf_config(head_dim, 1e6, 4096, "default", {})
            ref, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(llama)
            inv_t, _ = tr.rope_init("default", head_dim, 1e6, 4096)
            assert_close(inv_t, ref, rtol=rtol, atol=atol, what=f"default D={head_dim} vs Llama")
            inv_np, _ = npr.rope_init("default", head_dim, 1e6, 4096)
            rtol8, atol8 = tolerance(np.float32, 8, 0)  # see test_inv_freq_numpy_matches_torch
            assert_close(inv_np, ref, rtol=rtol8, atol=atol8, what=f"default D={head_dim} numpy vs Llama")


@pytest.mark.parametrize("rope_type", ["default", "linear", "yarn", "llama3"])
def test_cos_sin_match_transformers_rotary_module(rope_type):
    """The static types through LlamaRotaryEmbedding.forward: the tables the model multiplies by."""
    rng = np.random.default_rng(3)
    head_dim = 128
    rope_theta, M, params = make_case(rope_type, head_dim, rng)
    module = LlamaRotaryEmbedding(hf_config(head_dim, rope_theta, M, rope_type, dict(params)))
    position_ids = torch.as_tensor(np.sort(rng.integers(0, MAX_POSITION, (2, 512))))
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.zeros(2, 512, head_dim, dtype=dtype)
        ref_cos, ref_sin = module(x, position_ids)
        inv, s = tr.rope_init(rope_type, head_dim, rope_theta, M, **params)
        cos, sin = tr.rope_cos_sin(position_ids, inv, s)
        # same ops on the same kernels, then the same cast: bit-exact
        rtol, atol = tolerance(torch.float32, 0, 0)
        assert_close(cos.to(dtype), ref_cos, rtol=rtol, atol=atol, what=f"{rope_type} cos {dtype}")
        assert_close(sin.to(dtype), ref_sin, rtol=rtol, atol=atol, what=f"{rope_type} sin {dtype}")
    # NumPy float32 from its own ω: ≤ 10 ulps of the largest angle (see the module docstring)
    inv_np, s = npr.rope_init(rope_type, head_dim, rope_theta, M, **params)
    cos_np, sin_np = npr.rope_cos_sin(position_ids.numpy(), inv_np, s)
    theta_max = float(position_ids.max()) * float(inv_np.max())
    rtol, atol = tolerance(np.float32, 2, 10, scale=s * theta_max)
    ref_cos, ref_sin = module(torch.zeros(1, dtype=torch.float32), position_ids)
    assert_close(cos_np, ref_cos, rtol=rtol, atol=atol, what=f"{rope_type} numpy cos")
    assert_close(sin_np, ref_sin, rtol=rtol, atol=atol, what=f"{rope_type} numpy sin")


def test_longrope_switch_matches_transformers_phi3_module():
    """Phi-3's module picks short/long per call from max(position_ids)+1; so do su and longrope here."""
    rng = np.random.default_rng(4)
    head_dim, O, M = 96, 4096, 131072
    short, long = list(rng.uniform(1, 1.2, 48)), list(rng.uniform(1, 40, 48))
    config = Phi3Config(hidden_size=head_dim * 2, num_attention_heads=2, max_position_embeddings=M,
                        original_max_position_embeddings=O,
                        rope_parameters={"rope_type": "longrope", "rope_theta": 1e4,
                                         "short_factor": short, "long_factor": long})
    module = Phi3RotaryEmbedding(config)
    x = torch.zeros(1, dtype=torch.float32)
    for max_position in (O - 2, O - 1, O, O + 5, O - 1):  # back to short at the end: a per-call choice
        position_ids = torch.arange(max_position - 7, max_position + 1)[None]
        ref_cos, ref_sin = module(x, position_ids)
        for rope_type in ("longrope", "su"):
            inv, s = tr.rope_init(rope_type, head_dim, 1e4, M, seq_len=max_position + 1, short_factor=short,
                                  long_factor=long, original_max_position_embeddings=O)
            cos, sin = tr.rope_cos_sin(position_ids, inv, s)
            rtol, atol = tolerance(torch.float32, 0, 0)  # same ops, same kernels: bit-exact
            assert_close(cos, ref_cos, rtol=rtol, atol=atol, what=f"{rope_type} cos at max position {max_position}")
            assert_close(sin, ref_sin, rtol=rtol, atol=atol, what=f"{rope_type} sin at max position {max_position}")


def test_dynamic_model_path_computes_base_in_float32():
    """transformers' module passes seq_len as a tensor, so b' is float32 there (notes 2.3); we use float64."""
    head_dim, M, factor, L = 128, 32768, 2.0, 65536
    module = LlamaRotaryEmbedding(hf_config(head_dim, 1e6, M, "dynamic", {"factor": factor}))
    module(torch.zeros(1), torch.arange(L)[None, -4:])
    ref = module.inv_freq
    ours, _ = tr.rope_init("dynamic", head_dim, 1e6, M, seq_len=L, factor=factor)
    # b' rounded to float32 on their side: b'^(−2j/d) moves by ≤ (2j/d)·eps relative, plus the float32
    # arithmetic of f·L/M − (f−1) raised to d/(d−2): 4 ulps (1 measured; notes: "about 1e-7 relative")
    rtol, atol = tolerance(torch.float32, 4, 0)
    assert_close(ours, ref, rtol=rtol, atol=atol, what="dynamic inv_freq, float64 b' vs float32 b'")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_apply_rope_matches_transformers(dtype, partial):
    gen = torch.Generator().manual_seed(0)
    b, h, n, head_dim = 2, 4, 9, 64
    q, k = torch.randn(2, b, h, n, head_dim, generator=gen, dtype=torch.float64).to(dtype)
    rope_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    kwargs = {} if partial == 1.0 else {"partial_rotary_factor": partial}
    inv, s = tr.rope_init("yarn", head_dim, 1e4, 32768, factor=8.0, original_max_position_embeddings=4096,
                          dtype=rope_dtype, **kwargs)
    cos, sin = tr.rope_cos_sin(torch.randint(0, 32768, (b, n), generator=gen), inv, s)
    cos, sin = cos.to(dtype), sin.to(dtype)  # the model hands the tables over in the activation dtype
    if partial == 1.0:
        ref_q, ref_k = hf_apply_rotary_pos_emb(q, k, cos, sin)
        assert torch.equal(tr.rotate_half(q), hf_rotate_half(q))
    else:
        ref_q, ref_k = hf_phi3_apply_rotary_pos_emb(q, k, cos, sin)
    # the same two products and one add in the same dtype: bit-exact
    rtol, atol = tolerance(dtype, 0, 0)
    assert_close(tr.apply_rope(q, cos[:, None], sin[:, None]), ref_q, rtol=rtol, atol=atol, what="torch q")
    assert_close(tr.apply_rope(k, cos[:, None], sin[:, None]), ref_k, rtol=rtol, atol=atol, what="torch k")
    if dtype in (torch.float32, torch.float64):
        np_q = npr.apply_rope(q.numpy(), cos.numpy()[:, None], sin.numpy()[:, None])
        # NumPy: the same three correctly rounded operations: bit-exact too
        assert_close(np_q, ref_q, rtol=rtol, atol=atol, what="numpy q")
        assert np.array_equal(npr.rotate_half(q.numpy()), hf_rotate_half(q).numpy())


# ---------------------------------------------------------------- properties --------------------------------
@pytest.mark.parametrize("np_dtype", [np.float32, np.float64])
def test_linear_is_default_divided_by_factor(np_dtype):
    default, _ = npr.rope_init("default", 128, 1e6, 4096, dtype=np_dtype)
    linear, s = npr.rope_init("linear", 128, 1e6, 4096, factor=3.0, dtype=np_dtype)
    # one extra correctly rounded division: 1 ulp
    rtol, atol = tolerance(np_dtype, 1, 0)
    assert_close(linear, default / np_dtype(3.0), rtol=rtol, atol=atol, what="linear")
    assert s == 1.0


def test_internlm2_linear_divides_positions_equal_up_to_rounding():
    """InternLM2 computes cos((t/f)·ω), transformers cos(t·(ω/f)): equal maths, float32 rounding only."""
    default, _ = tr.rope_init("default", 128, 1e6, 4096)
    linear, _ = tr.rope_init("linear", 128, 1e6, 4096, factor=3.0)
    t = torch.arange(4096, dtype=torch.float32)
    internlm2_cos = torch.cos(torch.cat([torch.outer(t / 3.0, default)] * 2, -1))
    ours_cos, _ = tr.rope_cos_sin(torch.arange(4096), linear, 1.0)
    # both angles carry ~2 roundings of θ ≤ 1365 rad: 4 ulps of θ_max (notes 4.1 #7: 2.3e-4 at θ≈4096)
    rtol, atol = tolerance(torch.float32, 0, 4, scale=4096 / 3.0)
    assert_close(ours_cos, internlm2_cos, rtol=rtol, atol=atol, what="linear: t/f vs ω/f")


@pytest.mark.parametrize("np_dtype", [np.float32, np.float64])
def test_dynamic_unchanged_up_to_max_position_embeddings(np_dtype):
    default, _ = npr.rope_init("default", 128, 1e6, 32768, dtype=np_dtype)
    for seq_len in (None, 1, 1000, 32768):
        dynamic, _ = npr.rope_init("dynamic", 128, 1e6, 32768, seq_len=seq_len, factor=2.0, dtype=np_dtype)
        assert np.array_equal(dynamic, default), seq_len  # b' = b·1^(d/(d−2)) = b exactly
    longer, _ = npr.rope_init("dynamic", 128, 1e6, 32768, seq_len=32769, factor=2.0, dtype=np_dtype)
    assert longer[0] == default[0] and np.all(longer[1:] < default[1:])  # only the base grows


@pytest.mark.parametrize("np_dtype", [np.float32, np.float64])
def test_yarn_and_llama3_between_default_over_factor_and_default(np_dtype):
    slack = 4 * float(np.finfo(np_dtype).eps)  # blends are a few roundings away from the ends
    cases = [("yarn", 1e4, 32768, dict(factor=8.0, original_max_position_embeddings=4096)),
             ("llama3", 5e5, 131072, dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                          original_max_position_embeddings=8192))]
    for rope_type, theta, M, params in cases:
        default, _ = npr.rope_init("default", 128, theta, M, dtype=np_dtype)
        scaled, _ = npr.rope_init(rope_type, 128, theta, M, dtype=np_dtype, **params)
        assert np.all(scaled <= default * (1 + slack)) and np.all(scaled >= default / 8.0 * (1 - slack)), rope_type
        assert scaled[0] == default[0]  # the fastest pair is never touched
        assert scaled[-1] == pytest.approx(default[-1] / 8.0, rel=slack)  # the slowest is fully interpolated
    # Llama 3.1 (b=5e5, O=8192, f=8, α=1, β=4, d=128): 29 pairs kept, 29 divided by 8, 6 smoothed (notes 2.6)
    default, _ = npr.rope_init("default", 128, 5e5, 131072, dtype=np.float64)
    scaled, _ = npr.rope_init("llama3", 128, 5e5, 131072, dtype=np.float64, **cases[1][3])
    kept = np.isclose(scaled, default, rtol=1e-12, atol=0)
    divided = np.isclose(scaled, default / 8.0, rtol=1e-12, atol=0)
    assert (kept.sum(), divided.sum(), (~kept & ~divided).sum()) == (29, 29, 6)


def test_su_switches_to_long_factors_exactly_past_original_length():
    rng = np.random.default_rng(5)
    head_dim, theta, O, M = 96, 1e4, 4096, 131072
    short, long = list(rng.uniform(1, 1.2, 48)), list(rng.uniform(1, 40, 48))
    # independent float64 formula: ω_j = 1 / (λ_j · b^(2j/d))
    base_freqs = theta ** (np.arange(0, head_dim, 2) / head_dim)
    expect_short, expect_long = 1 / (np.array(short) * base_freqs), 1 / (np.array(long) * base_freqs)
    rtol, atol = tolerance(np.float64, 8, 0)  # pow (1 ulp) and two roundings, in float64
    for rope_type in ("su", "phi3_yarn", "longrope"):
        for seq_len, expect in [(None, expect_short), (1, expect_short), (O, expect_short),
                                (O + 1, expect_long), (M, expect_long)]:
            inv, _ = npr.rope_init(rope_type, head_dim, theta, M, seq_len=seq_len, short_factor=short,
                                   long_factor=long, original_max_position_embeddings=O, dtype=np.float64)
            assert_close(inv, expect, rtol=rtol, atol=atol, what=f"{rope_type} at seq_len {seq_len}")


def test_phi3_attention_scaling_values():
    O, M = 4096, 131072  # Phi-3-mini-128k
    factors = dict(short_factor=[1.0] * 48, long_factor=[2.0] * 48, original_max_position_embeddings=O)
    _, s_su = npr.rope_init("su", 96, 1e4, M, **factors)
    _, s_yarn = npr.rope_init("phi3_yarn", 96, 1e4, M, **factors)
    _, s_longrope = npr.rope_init("longrope", 96, 1e4, M, **factors)
    assert s_su == math.sqrt(1 + math.log(M / O) / math.log(O)) == pytest.approx(1.1902380714238083, abs=1e-15)
    assert s_yarn == 0.1 * math.log(M / O) + 1.0 == pytest.approx(1.3465735902799727, abs=1e-15)
    assert s_longrope == s_su  # transformers' longrope without factor/attention_factor = su
    # the scale is always M/O for the Phi-3 types, and 1 when M <= O
    _, s_short = npr.rope_init("su", 96, 1e4, 4096, **factors)
    assert s_short == 1.0
    # notes 4.2 #3: at scale 16 with O = 2048, phi3_yarn 1.2772589 vs su 1.1677484
    factors["original_max_position_embeddings"] = 2048
    assert npr.rope_init("phi3_yarn", 96, 1e4, 32768, **factors)[1] == pytest.approx(1.2772589, abs=1e-7)
    assert npr.rope_init("su", 96, 1e4, 32768, **factors)[1] == pytest.approx(1.1677484, abs=1e-7)


def test_yarn_worked_examples_from_notes():
    """rope-alibi-notes 2.4: ramp ends and attention factors, checked against the published numbers."""
    assert npr.yarn_correction_dim(32, 64, 1e4, 4096) == pytest.approx(10.47, abs=0.005)
    assert npr.yarn_correction_dim(1, 64, 1e4, 4096) == pytest.approx(22.51, abs=0.005)
    assert npr.yarn_correction_range(32, 1, 64, 1e4, 4096) == (10, 23)
    assert npr.yarn_correction_range(32, 1, 128, 1e4, 4096) == (20, 46)
    low, high = npr.yarn_correction_range(16, 2, 64, 5e5, 2048, truncate=False)
    assert (low, high) == (pytest.approx(7.35, abs=0.005), pytest.approx(12.42, abs=0.005))
    for factor, extra, expect in [(4.0, {}, 1.138629), (8.0, {}, 1.207944),
                                  (16.0, dict(mscale=1, mscale_all_dim=0.707), 1.067923)]:
        _, s = npr.rope_init("yarn", 64, 1e4, int(4096 * factor), factor=factor,
                             original_max_position_embeddings=4096, **extra)
        assert s == pytest.approx(expect, abs=5e-7), (factor, extra)
    # the ramp through rope_init: pairs j <= low keep ω, j >= high get ω/f exactly
    default, _ = npr.rope_init("default", 64, 1e4, 4096, dtype=np.float64)
    yarn, _ = npr.rope_init("yarn", 64, 1e4, 16384, factor=4.0, original_max_position_embeddings=4096,
                            dtype=np.float64)
    assert np.array_equal(yarn[:11], default[:11])
    rtol, atol = tolerance(np.float64, 2, 0)  # 1/(f·b^e) vs (1/b^e)/f: two roundings apart
    assert_close(yarn[23:], default[23:] / 4.0, rtol=rtol, atol=atol, what="yarn interpolated pairs")
    assert npr.yarn_correction_range is tr.yarn_correction_range  # one implementation, shared


@pytest.mark.parametrize("rope_type", ["default", "yarn", "su"])
def test_scores_depend_only_on_relative_position(rope_type, rng):
    head_dim = 128
    theta, M, params = make_case(rope_type, head_dim, rng)
    inv, s = npr.rope_init(rope_type, head_dim, theta, M, seq_len=M, dtype=np.float64, **params)
    q, k = rng.standard_normal((2, head_dim))
    starts = np.array([0, 7, 1000, 65536, MAX_POSITION - 40])
    offsets = np.arange(-5, 6)
    m = starts[:, None] + 20 + offsets[None, :] * 0  # query positions, one row per start
    n = m - offsets[None, :]                         # key positions at a fixed offset m − n
    cos_q, sin_q = npr.rope_cos_sin(m, inv, s)
    cos_k, sin_k = npr.rope_cos_sin(n, inv, s)
    scores = np.sum(npr.apply_rope(q, cos_q, sin_q) * npr.apply_rope(k, cos_k, sin_k), axis=-1)
    # each column has one m − n: the score may differ only by rounding of angles up to θ_max
    theta_max = float(MAX_POSITION * inv.max())
    rtol, atol = tolerance(np.float64, 0, 8 * head_dim, scale=theta_max * np.abs(q).sum() * np.abs(k).max() * s * s)
    for col in range(len(offsets)):
        assert_close(scores[:, col], np.full(len(starts), scores[0, col]), rtol=rtol, atol=atol,
                     what=f"score at offset {offsets[col]}")
    # at m = n the rotation cancels and only s² remains
    cos0, sin0 = npr.rope_cos_sin(np.array([12345]), inv, s)
    same = np.sum(npr.apply_rope(q[None], cos0, sin0) * npr.apply_rope(k[None], cos0, sin0))
    rtol, atol = tolerance(np.float64, 64, 64, scale=np.abs(q) @ np.abs(k) * s * s)
    assert_close(same, s * s * q @ k, rtol=rtol, atol=atol, what="q·k at m = n")


def _hf_permutation(n_heads, head_dim):
    """Independent index table: half row h·D + j·D/2 + i <- interleaved row h·D + 2i + j."""
    perm = np.empty(n_heads * head_dim, dtype=np.int64)
    for h in range(n_heads):
        for j in range(2):
            for i in range(head_dim // 2):
                perm[h * head_dim + j * (head_dim // 2) + i] = h * head_dim + 2 * i + j
    return perm


@pytest.mark.parametrize("module", [npr, tr], ids=["numpy", "torch"])
def test_interleaved_half_permutation(module, rng):
    n_heads, head_dim, hidden = 3, 16, 10
    weight = rng.standard_normal((n_heads * head_dim, hidden))
    bias = rng.standard_normal(n_heads * head_dim)
    as_array = np.asarray if module is npr else torch.as_tensor
    perm = _hf_permutation(n_heads, head_dim)
    for w in (weight, bias):
        half = np.asarray(module.interleaved_to_half(as_array(w), n_heads))
        assert np.array_equal(half, w[perm])
        assert np.array_equal(np.asarray(module.half_to_interleaved(as_array(half), n_heads)), w)
        assert np.array_equal(np.asarray(module.interleaved_to_half(module.half_to_interleaved(as_array(w), n_heads),
                                                                    n_heads)), w)


def test_interleaved_rope_on_interleaved_rows_equals_half_rope_on_permuted_rows(rng):
    """Meta/GPT-J RoPE (complex pairs 2i, 2i+1, via torch.view_as_complex) on the original weights equals
    rotate-half RoPE on the permuted weights, up to the same permutation of the output features."""
    n_heads, head_dim, hidden, n = 2, 32, 24, 11
    w_interleaved = torch.as_tensor(rng.standard_normal((n_heads * head_dim, hidden)))
    x = torch.as_tensor(rng.standard_normal((n, hidden)))
    positions = torch.as_tensor(rng.integers(0, 5000, n))
    inv, _ = tr.rope_init("default", head_dim, 1e4, 4096, dtype=torch.float64)

    q = (x @ w_interleaved.T).reshape(n, n_heads, head_dim // 2, 2)
    rotation = torch.polar(torch.ones(n, head_dim // 2, dtype=torch.float64), positions[:, None] * inv)
    q_interleaved = torch.view_as_real(torch.view_as_complex(q.contiguous()) * rotation[:, None])
    q_interleaved = q_interleaved.reshape(n, n_heads * head_dim)

    q_half = (x @ tr.interleaved_to_half(w_interleaved, n_heads).T).reshape(n, n_heads, head_dim)
    cos, sin = tr.rope_cos_sin(positions, inv)
    q_half = tr.apply_rope(q_half.transpose(0, 1), cos, sin).transpose(0, 1).reshape(n, -1)
    perm = torch.as_tensor(_hf_permutation(n_heads, head_dim))
    # float64, angles up to 5000 rad computed two ways: ~θ·eps each, times |q|
    rtol, atol = tolerance(torch.float64, 0, 16, scale=5000 * float(q.abs().max()))
    assert_close(q_half, q_interleaved[:, perm], rtol=rtol, atol=atol, what="interleaved vs rotate-half RoPE")


# ---------------------------------------------------------------- InternLM2 dynamic NTK ------------------------
class _InternLM2RemoteTable:
    """The remote code's algorithm restated for the test: an explicit float32 table, rebuilt only
    when kv_seq_len outgrows it, base enlarged only past max_position_embeddings, sliced [:kv_seq_len]
    and gathered by position ids."""

    def __init__(self, dim, base, max_position_embeddings, factor):
        self.dim, self.base, self.max_pos, self.factor = dim, base, max_position_embeddings, factor
        self.inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
        self._build(max_position_embeddings)

    def _build(self, seq_len):
        self.cached = seq_len
        if seq_len > self.max_pos:
            # b' = b·(f·L/M − (f−1))^(d/(d−2)) in Python floats
            kappa = (self.factor * seq_len / self.max_pos) - (self.factor - 1)
            new_base = self.base * kappa ** (self.dim / (self.dim - 2))
            self.inv_freq = 1.0 / (new_base ** (torch.arange(0, self.dim, 2).float() / self.dim))
        angles = torch.outer(torch.arange(seq_len).float(), self.inv_freq)
        self.cos, self.sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

    def __call__(self, position_ids, kv_seq_len):
        if kv_seq_len > self.cached:
            self._build(kv_seq_len)
        return self.cos[:kv_seq_len][position_ids], self.sin[:kv_seq_len][position_ids]


@pytest.mark.parametrize("module", [npr, tr], ids=["numpy", "torch"])
def test_dynamic_ntk_is_sticky_like_the_remote_code(module):
    head_dim, M, factor = 64, 2048, 2.0
    ours = module.DynamicNTKRope(head_dim, 1e4, M, factor)
    remote = _InternLM2RemoteTable(head_dim, 1e4, M, factor)
    default, _ = module.rope_init("default", head_dim, 1e4, M)
    calls = [(np.arange(0, 100), 100), (np.arange(100, 101), 101),  # below M: default frequencies
             (np.arange(M - 2, M), M),                                 # exactly M: still default
             (np.arange(M - 1, M + 1), M + 1),                         # one past M: enlarged for M + 1
             (np.arange(0, 5000), 5000),                               # long: base enlarged for 5000
             (np.arange(0, 10), 10),                                   # short again: base stays enlarged
             (np.arange(4000, 4500), 4500),                            # within the table: no rebuild
             (np.arange(5000, 6000), 6000),                            # grows again: rebuilt for 6000
             (np.array([[3, 4, 5], [0, 1, 2]]), 6)]                    # a batch, still sticky
    enlarged_bases = []
    for position_ids, kv_seq_len in calls:
        cos, sin = ours.cos_sin(position_ids, kv_seq_len)
        ref_cos, ref_sin = remote(torch.as_tensor(position_ids), kv_seq_len)
        assert cos.shape == tuple(position_ids.shape) + (head_dim,)
        # same ω up to 8 ulps (NumPy pow, see above) and the same angles: ≤ 10 ulps of θ_max
        theta_max = float(position_ids.max()) + 1
        rtol, atol = tolerance(np.float32, 2, 10, scale=theta_max)
        assert_close(cos, ref_cos, rtol=rtol, atol=atol, what=f"cos after kv_seq_len {kv_seq_len}")
        assert_close(sin, ref_sin, rtol=rtol, atol=atol, what=f"sin after kv_seq_len {kv_seq_len}")
        enlarged_bases.append(ours.base)
    assert enlarged_bases[0] == enlarged_bases[1] == enlarged_bases[2] == 1e4  # untouched up to M
    assert 1e4 < enlarged_bases[3] < enlarged_bases[4]  # grows with the longest kv_seq_len seen
    assert enlarged_bases[4] == enlarged_bases[5] == enlarged_bases[6]  # sticky after a long call
    assert enlarged_bases[7] > enlarged_bases[6] and enlarged_bases[8] == enlarged_bases[7]
    assert not np.array_equal(np.asarray(ours.inv_freq), np.asarray(default))
    assert ours.max_seq_len_cached == 6000


@pytest.mark.parametrize("module, dtype", [(npr, np.float32), (npr, np.float64), (tr, torch.float32),
                                           (tr, torch.float64)], ids=["np32", "np64", "torch32", "torch64"])
def test_dynamic_ntk_single_long_call_matches_transformers_init(module, dtype):
    head_dim, M, factor, L = 128, 32768, 3.0, 50000
    rope = module.DynamicNTKRope(head_dim, 1e6, M, factor, dtype=dtype)
    below, _ = module.rope_init("default", head_dim, 1e6, M, dtype=dtype)
    cos, _ = rope.cos_sin(np.arange(0, 200), 200)
    ref_cos, _ = module.rope_cos_sin(np.arange(0, 200), below, 1.0)
    assert np.array_equal(np.asarray(cos), np.asarray(ref_cos))  # below M it IS default RoPE
    rope.cos_sin(np.arange(L - 3, L), L)
    ref, _ = ROPE_INIT_FUNCTIONS["dynamic"](hf_config(head_dim, 1e6, M, "dynamic", {"factor": factor}), None,
                                            seq_len=L)
    if dtype in (torch.float32,):
        rtol, atol = tolerance(torch.float32, 0, 0)  # same ops on the same kernels: bit-exact
    elif dtype == np.float32:
        rtol, atol = tolerance(np.float32, 8, 0)  # NumPy vs torch pow, see above
    else:
        rtol, atol = tolerance(np.float32, gold_rtol_ulps(rope.base), 0)  # the reference's float32 rounding
    assert_close(rope.inv_freq, ref, rtol=rtol, atol=atol, what="dynamic NTK inv_freq after one long call")
    assert rope.base == 1e6 * (factor * L / M - (factor - 1)) ** (head_dim / (head_dim - 2))


def test_dynamic_ntk_differs_from_transformers_5_after_a_long_call():
    """transformers 5.24 resets to the original ω once a call is shorter than M; InternLM2 does not."""
    head_dim, M = 64, 2048
    module = LlamaRotaryEmbedding(hf_config(head_dim, 1e4, M, "dynamic", {"factor": 2.0}))
    module(torch.zeros(1), torch.arange(8192)[None, -2:])
    module(torch.zeros(1), torch.arange(100)[None])
    ours = tr.DynamicNTKRope(head_dim, 1e4, M, 2.0)
    ours.cos_sin(torch.arange(8190, 8192), 8192)
    ours.cos_sin(torch.arange(100), 100)
    original, _ = tr.rope_init("default", head_dim, 1e4, M)
    assert torch.equal(module.inv_freq, original)
    assert torch.all(ours.inv_freq[1:] < original[1:])


@pytest.mark.parametrize("module", [npr, tr], ids=["numpy", "torch"])
def test_dynamic_ntk_rejects_positions_outside_the_table(module):
    rope = module.DynamicNTKRope(64, 1e4, 2048, 2.0)
    with pytest.raises(GenerationError, match="kv_seq_len=10"):
        rope.cos_sin(np.array([0, 10]), 10)
    with pytest.raises(GenerationError, match=r"\[0, kv_seq_len"):
        rope.cos_sin(np.array([-1, 3]), 10)


# ---------------------------------------------------------------- bad input -----------------------------------
@pytest.mark.parametrize("module", [npr, tr], ids=["numpy", "torch"])
def test_bad_configs_raise_config_error(module):
    lists = dict(short_factor=[1.0] * 48, long_factor=[2.0] * 48, original_max_position_embeddings=4096)
    bad = [
        (dict(rope_type="ntk"), "unknown rope_type 'ntk'; use one of default, linear"),
        (dict(rope_type="default", head_dim=95), "head_dim must be a positive even integer"),
        (dict(rope_type="linear"), r"needs \['factor'\]"),
        (dict(rope_type="linear", factor=0.5), "factor must be a number >= 1.0"),
        (dict(rope_type="dynamic", factor=0.9), "factor must be a number >= 1.0"),
        (dict(rope_type="su", long_factor=[1.0] * 48, original_max_position_embeddings=4096),
         r"needs \['short_factor'\]"),
        (dict(rope_type="su", short_factor=[1.0] * 47, long_factor=[1.0] * 48, original_max_position_embeddings=4096),
         "short_factor must have rotary_dim/2 = 48 entries"),
        (dict(rope_type="su", factor=4.0, **lists), "use rope_type 'longrope'"),
        (dict(rope_type="llama3", factor=8.0, low_freq_factor=4.0, high_freq_factor=1.0), "must exceed"),
        (dict(rope_type="yarn", factr=4.0), r"unknown RoPE parameter\(s\) \['factr'\]"),
        (dict(rope_type="default", partial_rotary_factor=1.5), "partial_rotary_factor must be in"),
        (dict(rope_type="default", head_dim=96, partial_rotary_factor=0.01), "must be even and >= 2"),
        (dict(rope_type="default", dtype="float16"), "float32 .* or float64"),
    ]
    for kwargs, message in bad:
        kwargs = {"head_dim": 96, "rope_theta": 1e4, "max_position_embeddings": 131072, **kwargs}
        with pytest.raises(ConfigError, match=message):
            module.rope_init(**kwargs)
    with pytest.raises(ConfigError, match="factor must be a number >= 1.0"):
        module.DynamicNTKRope(64, 1e4, 2048, 0.5)


@pytest.mark.parametrize("module", [npr, tr], ids=["numpy", "torch"])
def test_bad_shapes_raise_shape_error(module):
    as_array = np.asarray if module is npr else torch.as_tensor
    x = as_array(np.zeros((2, 5, 64), np.float32))
    cos = as_array(np.zeros((5, 128), np.float32))
    with pytest.raises(ShapeError, match="even last axis <= head_dim"):
        module.apply_rope(x, cos, cos)
    with pytest.raises(ShapeError, match="must match"):
        module.apply_rope(x, as_array(np.zeros((5, 64), np.float32)), as_array(np.zeros((5, 32), np.float32)))
    with pytest.raises(ShapeError, match="1-D"):
        module.rope_cos_sin(as_array(np.arange(3)), as_array(np.zeros((2, 3), np.float32)))
    with pytest.raises(ShapeError, match=r"not n_heads \(3\)"):
        module.interleaved_to_half(as_array(np.zeros((64, 8))), 3)


@requires_cuda
@pytest.mark.parametrize("rope_type", ["default", "yarn", "su"])
def test_torch_rope_on_cuda_matches_cpu(rope_type):
    rng = np.random.default_rng(9)
    theta, M, params = make_case(rope_type, 128, rng)
    inv_cpu, s = tr.rope_init(rope_type, 128, theta, M, seq_len=M, **params)
    inv_gpu, _ = tr.rope_init(rope_type, 128, theta, M, seq_len=M, device="cuda", **params)
    # CUDA powf and CPU SLEEF pow are each within 1-2 ulps: 8 ulps (see test_inv_freq_numpy_matches_torch)
    rtol, atol = tolerance(torch.float32, 8, 0)
    assert_close(inv_gpu, inv_cpu, rtol=rtol, atol=atol, what=f"{rope_type} inv_freq cuda vs cpu")
    positions = torch.arange(0, 4096)[None]
    cos_gpu, sin_gpu = tr.rope_cos_sin(positions.cuda(), inv_cpu.cuda(), s)
    cos_cpu, sin_cpu = tr.rope_cos_sin(positions, inv_cpu, s)
    # same ω and angles; CUDA's cosf/sinf are within 2 ulps (fast-math off in torch): 4 ulps of s
    rtol, atol = tolerance(torch.float32, 4, 4, scale=s)
    assert_close(cos_gpu, cos_cpu, rtol=rtol, atol=atol, what=f"{rope_type} cos cuda vs cpu")
    assert_close(sin_gpu, sin_cpu, rtol=rtol, atol=atol, what=f"{rope_type} sin cuda vs cpu")
    x = torch.randn(1, 4, 4096, 128, dtype=torch.bfloat16)
    out_gpu = tr.apply_rope(x.cuda(), cos_cpu.cuda()[:, None], sin_cpu.cuda()[:, None])
    out_cpu = tr.apply_rope(x, cos_cpu[:, None], sin_cpu[:, None])
    rtol, atol = tolerance(torch.bfloat16, 1, 1, scale=s * float(x.abs().max()))  # same bf16 roundings
    assert_close(out_gpu, out_cpu, rtol=rtol, atol=atol, what=f"{rope_type} apply_rope bf16 cuda vs cpu")
