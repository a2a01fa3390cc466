"""RMSNorm (HF and MPT rounding orders) and LayerNorm: NumPy vs torch twin vs independent references."""
import math

import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from minivl import norms
from minivl.testing import assert_close, compare, tolerance
from torch_impl import norms as torch_norms

DTYPES = ["float32", "float64"]


def _inputs(rng, dtype, d, offset=0.0):
    lead = tuple(int(n) for n in rng.integers(1, 5, size=int(rng.integers(1, 4))))
    x = (offset + rng.standard_normal(lead + (d,)) * rng.uniform(0.1, 10)).astype(dtype)
    weight = rng.uniform(-2, 2, size=d).astype(dtype)
    bias = rng.standard_normal(d).astype(dtype)
    return x, weight, bias


def _rms_tol(dtype, d):
    # tolerance: y = x·w/sqrt(mean(x²)+eps) is a product of per-element factors, so the error is
    # relative: the mean of d positive squares carries ≲ sqrt(d)·eps relative error (halved by the
    # square root), plus ~4 roundings (square root, reciprocal, two multiplies) on each side
    return tolerance(dtype, 8 + math.sqrt(d), atol_ulps=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1, 64, 96, 1000, 4096])
def test_rms_norm_numpy_vs_torch_twin_vs_llama_rmsnorm(dtype, d):
    rng = np.random.default_rng(d)
    x, weight, _ = _inputs(rng, dtype, d)
    eps = 1e-6
    out = norms.rms_norm(x, weight, eps)
    out_torch = torch_norms.rms_norm(torch.from_numpy(x), torch.from_numpy(weight), eps)
    reference = LlamaRMSNorm(d, eps=eps).to(getattr(torch, dtype))
    with torch.no_grad():
        reference.weight.copy_(torch.from_numpy(weight))
        out_ref = reference(torch.from_numpy(x))
    assert out.dtype == np.dtype(dtype)
    rtol, atol = _rms_tol(dtype, d)
    assert_close(out, out_torch, rtol=rtol, atol=atol, what=f"rms_norm {dtype} numpy vs torch twin")
    # LlamaRMSNorm always normalises in float32 (`.to(torch.float32)`), even for float64 input; our
    # rule is promote(x.dtype, float32), so a float64 run stays float64. Against it, a float64 run
    # therefore only agrees to float32 accuracy (same ulp count, float32 eps).
    rtol_ref, atol_ref = _rms_tol("float32", d)
    assert_close(out, out_ref, rtol=rtol_ref, atol=atol_ref, what=f"rms_norm {dtype} numpy vs LlamaRMSNorm")
    if dtype == "float32":
        # in float32 the torch twin is the LlamaRMSNorm op sequence, so it matches bit for bit
        assert torch.equal(out_torch, out_ref)



def _bits(a: np.ndarray) -> np.ndarray:
    """The bytes of an array, for bit-for-bit comparisons (−0 and +0 differ, a NaN equals itself)."""
    return np.ascontiguousarray(a).view(np.uint8)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 576), (3, 5, 64), (1, 512, 576), (2, 1024, 576), (8192, 96)])
@pytest.mark.parametrize("threads", ["1", "2"])
def test_rms_norm_fast_is_rms_norm_bit_for_bit(dtype, shape, threads, monkeypatch):
    """The models' fast path: the same operations, in one buffer, long inputs' rows on two threads
    ((2, 1024, 576) and (8192, 96) pass the per-thread minimum): EXACT equality, zeros, signs and
    huge and tiny rows included (the row of zeros is 0·inf = NaN only if eps = 0: here eps > 0)."""
    monkeypatch.setenv("MINIVL_NUM_THREADS", threads)
    rng = np.random.default_rng(sum(shape))
    x = (rng.standard_normal(shape) * rng.uniform(0.01, 100, size=shape[:-1] + (1,))).astype(dtype)
    x.reshape(-1, shape[-1])[0] = 0.0
    x.reshape(-1, shape[-1])[-1, ::3] = -0.0
    weight = rng.uniform(-2, 2, size=shape[-1]).astype(dtype)
    for eps in (1e-6, 1e-5):
        fast, reference = norms.rms_norm_fast(x, weight, eps), norms.rms_norm(x, weight, eps)
        assert fast.dtype == reference.dtype and fast.shape == reference.shape
        np.testing.assert_array_equal(_bits(fast), _bits(reference))


def _count_pieces(monkeypatch) -> list:
    """With two threads, the number of pieces each later `parallel` call hands out, appended to the list returned."""
    import minivl.threads

    monkeypatch.setenv("MINIVL_NUM_THREADS", "2")
    pieces = []
    real = minivl.threads.parallel

    def counting(tasks, **options):
        tasks = list(tasks)
        pieces.append(len(tasks))
        return real(tasks, **options)

    monkeypatch.setattr(minivl.threads, "parallel", counting)
    return pieces


def test_rms_norm_fast_splits_only_long_inputs_across_threads(monkeypatch):
    """A [2048, 576] norm goes to two threads in two pieces, a 512-token prefill's [512, 576] stays one
    piece (faster on one thread here: norms._PARALLEL_MIN_ELEMENTS)."""
    pieces = _count_pieces(monkeypatch)
    weight = np.ones(576, np.float32)
    for rows in (2048, 512):
        norms.rms_norm_fast(np.ones((rows, 576), np.float32), weight, 1e-6)
    assert pieces == [2, 1]

def test_rms_norm_fast_takes_rms_norm_itself_where_it_would_differ():
    """A transposed x (NumPy would sum its squares in another order), a weight of another dtype (the
    result promotes) and bf16 (ml_dtypes) run `rms_norm`; each equals it."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 8)).astype(np.float32).T
    weight = rng.standard_normal(64).astype(np.float32)
    cases = [(x, weight), (np.ascontiguousarray(x), weight.astype(np.float64)),
             (np.ascontiguousarray(x).astype(ml_dtypes.bfloat16), weight.astype(ml_dtypes.bfloat16))]
    for x_case, w_case in cases:
        fast, reference = norms.rms_norm_fast(x_case, w_case, 1e-6), norms.rms_norm(x_case, w_case, 1e-6)
        assert fast.dtype == reference.dtype
        np.testing.assert_array_equal(_bits(fast), _bits(reference))
    with pytest.raises(Exception, match="weight must have shape"):
        norms.rms_norm_fast(x, weight[:3], 1e-6)


def test_rms_norm_fast_torch_twin_matches():
    """torch_impl's twin is its rms_norm: the same tolerance as rms_norm's twin test."""
    rng = np.random.default_rng(1)
    x, weight = rng.standard_normal((2, 7, 96)).astype(np.float32), rng.uniform(-2, 2, 96).astype(np.float32)
    out_torch = torch_norms.rms_norm_fast(torch.from_numpy(x), torch.from_numpy(weight), 1e-6)
    rtol, atol = _rms_tol("float32", 96)
    assert_close(norms.rms_norm_fast(x, weight, 1e-6), out_torch, rtol=rtol, atol=atol, what="rms_norm_fast twin")

def _mpt_rms_norm_reference(x, weight, eps):
    """llm-foundry / InternVL-vendored MPT RMSNorm, transcribed: rms_norm(x.float(), w, eps).to(x.dtype)."""
    x32 = x.float() if x.dtype != torch.float64 else x
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * weight).to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [8, 96, 2048])
def test_rms_norm_mpt_numpy_vs_torch_twin_vs_reference(dtype, d):
    rng = np.random.default_rng(100 + d)
    x, weight, _ = _inputs(rng, dtype, d)
    eps = 1e-5
    out = norms.rms_norm_mpt(x, weight, eps)
    out_torch = torch_norms.rms_norm_mpt(torch.from_numpy(x), torch.from_numpy(weight), eps)
    out_ref = _mpt_rms_norm_reference(torch.from_numpy(x), torch.from_numpy(weight), eps)
    rtol, atol = _rms_tol(dtype, d)
    assert_close(out, out_torch, rtol=rtol, atol=atol, what=f"rms_norm_mpt {dtype} numpy vs torch")
    assert_close(out, out_ref, rtol=rtol, atol=atol, what=f"rms_norm_mpt {dtype} numpy vs MPT reference")
    # without a weight both orders are the same function
    no_weight = norms.rms_norm_mpt(x, None, eps)
    assert_close(no_weight, norms.rms_norm(x, np.ones(d, dtype=dtype), eps), rtol=rtol, atol=atol,
                 what="rms_norm_mpt(weight=None) vs rms_norm(weight=1)")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [2, 96, 1024])
@pytest.mark.parametrize("affine", ["both", "weight_only", "none"])
def test_layer_norm_numpy_vs_torch_twin_vs_functional(dtype, d, affine):
    rng = np.random.default_rng(200 + d)
    # an offset mean makes x − μ cancel, the LayerNorm-specific source of error
    x, weight, bias = _inputs(rng, dtype, d, offset=3.0)
    weight = None if affine == "none" else weight
    bias = bias if affine == "both" else None  # MPT no_bias=True: LayerNorm without bias
    eps = 1e-5
    as_t = (lambda a: None if a is None else torch.from_numpy(a))
    out = norms.layer_norm(x, weight, bias, eps)
    out_torch = torch_norms.layer_norm(as_t(x), as_t(weight), as_t(bias), eps)
    out_ref = F.layer_norm(as_t(x), (d,), as_t(weight), as_t(bias), eps)
    # tolerance: the normalised value carries ≲ (8 + sqrt(d)) ulps relative error (mean and variance
    # over d terms, root, products) times the cancellation factor (|x|/std ≈ 1 + |mean|/std ≈ 4 here);
    # the bias add makes it absolute, so atol is the same ulps times the output's typical size
    ulps = 4 * (8 + math.sqrt(d))
    scale = np.abs(out_ref.numpy()).max() + 1.0
    rtol, atol = tolerance(dtype, ulps, scale=scale)
    assert_close(out, out_torch, rtol=rtol, atol=atol, what=f"layer_norm {dtype} numpy vs torch twin")
    assert_close(out, out_ref, rtol=rtol, atol=atol, what=f"layer_norm {dtype} numpy vs F.layer_norm")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 384), (3, 5, 64), (1, 64, 576), (1, 1025, 384), (7, 257, 1024)])
@pytest.mark.parametrize("threads", ["1", "2"])
@pytest.mark.parametrize("affine", ["both", "weight_only", "bias_only", "none"])
def test_layer_norm_fast_is_layer_norm_bit_for_bit(dtype, shape, threads, affine, monkeypatch):
    """The models' fast path: the same operations, in one buffer, long inputs' rows on two threads
    ((1, 1025, 384), a 448-px DINOv2's, and (7, 257, 1024), seven 224-px InternViT-300M tiles, pass the
    per-thread minimum): EXACT equality, a row of zeros (variance 0: 1/√eps), a constant row, signed
    zeros, a row with an inf and one with a NaN, an offset mean (x − μ cancels) and huge and tiny rows
    included."""
    monkeypatch.setenv("MINIVL_NUM_THREADS", threads)
    rng = np.random.default_rng(sum(shape))
    x = (3.0 + rng.standard_normal(shape) * rng.uniform(0.01, 100, size=shape[:-1] + (1,))).astype(dtype)
    rows = x.reshape(-1, shape[-1])
    rows[0] = 0.0
    rows[-1, ::3] = -0.0
    if len(rows) > 2:
        rows[1] = 7.25
    if len(rows) > 4:  # non-finite rows: the same operations give the same NaN and inf (bytes compared)
        rows[2, 5], rows[3, 7] = np.inf, np.nan
    weight = rng.uniform(-2, 2, size=shape[-1]).astype(dtype) if affine in ("both", "weight_only") else None
    bias = rng.standard_normal(shape[-1]).astype(dtype) if affine in ("both", "bias_only") else None
    for eps in (1e-6, 1e-5):
        with np.errstate(invalid="ignore"):  # inf − inf in the inf row's x − μ: NaN in both, as NumPy warns
            fast, reference = norms.layer_norm_fast(x, weight, bias, eps), norms.layer_norm(x, weight, bias, eps)
        assert fast.dtype == reference.dtype and fast.shape == reference.shape
        np.testing.assert_array_equal(_bits(fast), _bits(reference))


def test_layer_norm_fast_splits_only_long_inputs_across_threads(monkeypatch):
    """A 448-px DINOv2's [1025, 384] LayerNorm goes to two threads in two pieces, a [512, 384] one stays
    one piece (faster on one thread here: norms._LAYER_NORM_MIN_ELEMENTS)."""
    pieces = _count_pieces(monkeypatch)
    weight, bias = np.ones(384, np.float32), np.zeros(384, np.float32)
    for rows in (1025, 512):
        norms.layer_norm_fast(np.ones((rows, 384), np.float32), weight, bias, 1e-6)
    assert pieces == [2, 1]


def test_layer_norm_fast_takes_layer_norm_itself_where_it_would_differ():
    """A transposed x (NumPy would sum its rows in another order), a weight or a bias of another dtype (the
    reference casts it to x's compute dtype first) and bf16 (ml_dtypes: statistics in float32, one
    rounding at the end) run `layer_norm`; each equals it. A mis-shaped bias is the same ShapeError."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 8)).astype(np.float32).T
    weight, bias = rng.standard_normal(64).astype(np.float32), rng.standard_normal(64).astype(np.float32)
    contiguous = np.ascontiguousarray(x)
    cases = [(x, weight, bias), (contiguous, weight.astype(np.float64), bias), (contiguous, weight, bias.astype(np.float64)),
             (contiguous.astype(ml_dtypes.bfloat16), weight.astype(ml_dtypes.bfloat16), bias.astype(ml_dtypes.bfloat16)),
             (contiguous[:0], weight, bias)]
    for x_case, w_case, b_case in cases:
        fast, reference = norms.layer_norm_fast(x_case, w_case, b_case, 1e-5), norms.layer_norm(x_case, w_case, b_case, 1e-5)
        assert fast.dtype == reference.dtype and fast.shape == reference.shape
        np.testing.assert_array_equal(_bits(fast), _bits(reference))
    with pytest.raises(Exception, match="bias must have shape"):
        norms.layer_norm_fast(contiguous, weight, bias[:3], 1e-5)


def test_layer_norm_fast_torch_twin_matches():
    """torch_impl's twin is its layer_norm (F.layer_norm): the same tolerance as layer_norm's twin test."""
    rng = np.random.default_rng(2)
    x, weight, bias = _inputs(rng, "float32", 384, offset=3.0)
    out_torch = torch_norms.layer_norm_fast(torch.from_numpy(x), torch.from_numpy(weight), torch.from_numpy(bias), 1e-6)
    ulps = 4 * (8 + math.sqrt(384))  # as in test_layer_norm_numpy_vs_torch_twin_vs_functional
    rtol, atol = tolerance("float32", ulps, scale=np.abs(out_torch.numpy()).max() + 1.0)
    assert_close(norms.layer_norm_fast(x, weight, bias, 1e-6), out_torch, rtol=rtol, atol=atol,
                 what="layer_norm_fast twin")


def test_layer_norm_uses_biased_variance():
    """[1, 3] has mean 2 and biased variance 1 (unbiased would be 2): output ±1 exactly (eps=0)."""
    out = norms.layer_norm(np.array([1.0, 3.0]), None, None, 0.0)
    np.testing.assert_array_equal(out, [-1.0, 1.0])


def test_bf16_rms_norm_rounding_orders_differ():
    """Pitfall 3: HF RMSNorm rounds y to bf16 and then multiplies by w (a second rounding), MPT
    multiplies in float32 and rounds once. Same inputs, different bf16 outputs."""
    rng = np.random.default_rng(3)
    d = 2048
    x = torch.from_numpy(rng.standard_normal((8, d))).to(torch.bfloat16)
    weight = torch.from_numpy(rng.uniform(0.5, 1.5, size=d)).to(torch.bfloat16)
    hf = torch_norms.rms_norm(x, weight, 1e-6)
    mpt = torch_norms.rms_norm_mpt(x, weight, 1e-6)
    truth = norms.rms_norm(x.double().numpy(), weight.double().numpy(), 1e-6)  # exact-ish, float64
    assert hf.dtype == mpt.dtype == torch.bfloat16

    differ = (hf != mpt)
    fraction = differ.double().mean().item()
    diff = (hf.double() - mpt.double()).abs()
    # at most one bf16 ulp apart: each path rounds to nearest, the HF path twice (≤ ½ ulp each)
    one_ulp = 2.0 ** -7 * mpt.double().abs()
    print(f"\nbf16 RMSNorm HF vs MPT order: {fraction:.1%} of {differ.numel()} outputs differ, "
          f"max |diff| {diff.max().item():.3e}, max rel {(diff / mpt.double().abs()).max().item():.3e}")
    assert 0.05 < fraction < 0.6, fraction
    assert bool((diff <= one_ulp).all())
    # MPT's single rounding is never further from the truth than half an ulp; HF's double rounding
    # is about twice as far from the float64 value on average
    err_mpt = np.abs(mpt.double().numpy() - truth).mean()
    err_hf = np.abs(hf.double().numpy() - truth).mean()
    assert err_hf > 1.3 * err_mpt, (err_hf, err_mpt)


@pytest.mark.parametrize("fn", ["rms_norm", "rms_norm_mpt"])
def test_bf16_numpy_via_ml_dtypes_matches_torch_bf16(fn):
    """The NumPy functions accept ml_dtypes bfloat16 and round the same way as torch in bf16."""
    rng = np.random.default_rng(11)
    d = 512
    x = rng.standard_normal((4, d)).astype(ml_dtypes.bfloat16)
    weight = rng.uniform(0.5, 1.5, size=d).astype(ml_dtypes.bfloat16)
    out = getattr(norms, fn)(x, weight, 1e-6)
    out_torch = getattr(torch_norms, fn)(torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16),
                                         torch.from_numpy(weight.astype(np.float32)).to(torch.bfloat16), 1e-6)
    assert out.dtype == ml_dtypes.bfloat16
    # tolerance: the float32 intermediate differs by a few float32 ulps (summation order), which can
    # flip a bf16 rounding: at most 1 bf16 ulp (2^-7 relative), per rounding step
    rtol, atol = tolerance("bfloat16", 2, atol_ulps=0)
    c = assert_close(out.astype(np.float32), out_torch, rtol=rtol, atol=atol, what=f"{fn} bf16")
    assert compare(out.astype(np.float32), out_torch, 0, 0).n_bad <= c.n_total // 20


def test_rms_norm_output_dtype_follows_weight_promotion():
    """HF order returns weight·y.to(x.dtype): a float32 weight with a bf16 input gives float32."""
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    assert torch_norms.rms_norm(x, torch.ones(8), 1e-6).dtype == torch.float32
    assert torch_norms.rms_norm_mpt(x, torch.ones(8), 1e-6).dtype == torch.bfloat16
    xn = np.ones((2, 8), dtype=np.float32)
    assert norms.rms_norm(xn, np.ones(8, dtype=np.float64), 1e-6).dtype == np.float64
