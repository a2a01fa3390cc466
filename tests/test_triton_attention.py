"""torch_impl/triton_attention.py (the Triton FlashAttention-2 kernel) through Triton's CPU interpreter.

CI has no GPU, so the kernel runs under ``TRITON_INTERPRET=1``, which must be set before triton
is first imported (triton.language's own helpers are jit functions too). Other test modules may
already have imported triton in this pytest process, so the kernel runs in ONE subprocess (this
file executed as a script with the variable set) that writes every case's output to an .npz;
the comparisons happen here. All interpreted runs are float32 on small shapes (the interpreter
executes each program serially with NumPy).

Tolerances (float32 kernel vs float64 reference of the same float32 inputs): the same budget as
the NumPy float32 tiled version, 32 ulps of float32 relative to |ref| and to max|v| (one rounding
per op more than the reference; exp of scores up to ~20 carries ~20 eps into the small weights;
seen: <= 1.4 ulps·max|v| for outputs and lse). Against torch's eager float32 attention (both
float32, each within that budget of the truth): 2·32 ulps. Whole tiny models (two layers and an
LM head amplify the attention's rounding a little): 64 ulps of max|logits| (seen: ~4).
"""
from __future__ import annotations

import os
import subprocess
import sys
import zlib

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (batch, n_heads, n_kv_heads, q_len, kv_len, head_dim, block_m, block_n, options)
DENSE = {
    "plain, blocks do not divide": (2, 2, 2, 37, 45, 8, 16, 16, {}),
    "causal square, GQA 2": (1, 4, 2, 40, 40, 16, 16, 32, {"causal": True}),
    "causal, decode-like s < t, MQA (group 8)": (1, 8, 1, 3, 45, 8, 16, 16, {"causal": True}),
    "causal, s > t: early rows see nothing": (1, 2, 2, 30, 20, 8, 16, 16, {"causal": True}),
    "sliding window (6, 0), GQA 4": (1, 4, 1, 40, 40, 8, 16, 16, {"causal": True, "window_size": (6, 0)}),
    "window (3, 5), non-causal": (1, 2, 1, 25, 31, 8, 16, 16, {"window_size": (3, 5)}),
    "ALiBi [h], causal": (1, 4, 4, 30, 30, 8, 16, 16, {"causal": True, "alibi": "heads"}),
    "ALiBi [b, h], non-causal, GQA 2": (2, 4, 2, 17, 26, 8, 16, 16, {"alibi": "batch"}),
    "head_dim 24 (padded tile), d_v 40, softmax_scale": (1, 2, 2, 19, 19, 24, 16, 16,
                                                         {"scale": 0.3, "v_dim": 40}),
}

# packed sequences (q lengths, k lengths or None = same, options); n_heads 4, n_kv_heads 2, d 8
VARLEN = {
    "self-attention, causal, empty and length-1": ([0, 1, 9, 0, 17], None, {"causal": True}),
    "cross lengths, window (2, 3), ALiBi per sequence": ([3, 0, 1, 12], [5, 0, 4, 12],
                                                         {"window_size": (2, 3), "alibi": "batch"}),
}

# through torch_impl.attention.scaled_dot_product_attention(backend="triton") with the models' masks:
# (attention_mask rows as (n_pads, n_tokens), q_len, past_len, with an MPT-style ALiBi bias tensor)
DISPATCH = {
    "left-padded prefill": ([(3, 9), (0, 12)], 12, 0, False),
    "decode with a cache and left padding": ([(5, 17), (0, 22)], 2, 20, False),
    "MPT ALiBi bias tensor + causal/padding mask": ([(2, 14), (0, 16)], 16, 0, True),
}
N_HEADS, N_KV_HEADS, HEAD_DIM = 4, 2, 8

# whole tiny models loaded with attn_implementation="triton" (a left-padded batch of two prompts)
MODEL_FAMILIES = ("qwen2", "mpt_alibi")
MODEL_INPUT_IDS = [[5, 7, 9, 11, 13, 2, 4, 6], [1, 1, 3, 5, 8, 9, 10, 12]]
MODEL_ATTENTION_MASK = [[1] * 8, [0, 0] + [1] * 6]


def _rng(name: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(name.encode()))


def dense_inputs(name):
    """q, k, v float32 and the kernel keyword arguments (NumPy) for DENSE[name]."""
    batch, n_heads, n_kv, q_len, kv_len, head_dim, _, _, options = DENSE[name]
    from flash_reference import random_inputs

    return random_inputs(_rng(name), batch, n_heads, n_kv, q_len, kv_len, head_dim, options, np.float32,
                         scale_name="scale")


def varlen_inputs(name):
    """Packed q, k, v float32, cu_seqlens, max lengths and keyword arguments for VARLEN[name]."""
    q_lens, k_lens, options = VARLEN[name]
    k_lens = q_lens if k_lens is None else k_lens
    rng = _rng(name)
    cu_q = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(k_lens)]).astype(np.int32)
    q = rng.standard_normal((cu_q[-1], N_HEADS, HEAD_DIM)).astype(np.float32)
    k = rng.standard_normal((cu_k[-1], N_KV_HEADS, HEAD_DIM)).astype(np.float32)
    v = rng.standard_normal((cu_k[-1], N_KV_HEADS, HEAD_DIM)).astype(np.float32)
    kwargs = {key: options[key] for key in ("causal", "window_size") if key in options}
    if options.get("alibi"):
        kwargs["alibi_slopes"] = rng.uniform(0.05, 1.0, (len(q_lens), N_HEADS)).astype(np.float32)
    return q, k, v, cu_q, cu_k, max(q_lens), max(k_lens), kwargs


def dispatch_inputs(name):
    """q, k, v float32, the 0/1 attention_mask [b, t], q_len, past_len, and an ALiBi bias [1, h, 1, t] or None."""
    rows, q_len, past_len, with_bias = DISPATCH[name]
    rng = _rng(name)
    kv_len = past_len + q_len
    attention_mask = np.array([[0] * pads + [1] * tokens for pads, tokens in rows], dtype=np.int64)
    assert attention_mask.shape == (len(rows), kv_len)
    q = rng.standard_normal((len(rows), N_HEADS, q_len, HEAD_DIM)).astype(np.float32)
    k = rng.standard_normal((len(rows), N_KV_HEADS, kv_len, HEAD_DIM)).astype(np.float32)
    v = rng.standard_normal((len(rows), N_KV_HEADS, kv_len, HEAD_DIM)).astype(np.float32)
    bias = None
    if with_bias:
        # MPT's causal row form slope·(j - (t - 1)), one row broadcast over queries
        slopes = 2.0 ** (-8.0 * np.arange(1, N_HEADS + 1) / N_HEADS)
        bias = (slopes[:, None] * (np.arange(kv_len) - (kv_len - 1))[None, :]).astype(np.float32)[None, :, None, :]
    return q, k, v, attention_mask, q_len, past_len, bias


def run_interpreted_cases(path: str) -> None:
    """Subprocess body (TRITON_INTERPRET=1 already in the environment): run every case, save outputs."""
    import torch

    from torch_impl.attention import build_attention_mask, scaled_dot_product_attention
    from torch_impl.triton_attention import INTERPRETED, triton_attention, triton_attention_varlen

    assert INTERPRETED, "TRITON_INTERPRET=1 did not select Triton's interpreter"
    as_torch = lambda kwargs: {key: torch.from_numpy(val) if isinstance(val, np.ndarray) else val  # noqa: E731
                               for key, val in kwargs.items()}
    results = {}
    for name, case in DENSE.items():
        q, k, v, kwargs = dense_inputs(name)
        out, lse = triton_attention(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v),
                                    block_m=case[6], block_n=case[7], return_lse=True, **as_torch(kwargs))
        results[f"dense/{name}/out"], results[f"dense/{name}/lse"] = out.numpy(), lse.numpy()
    for name in VARLEN:
        q, k, v, cu_q, cu_k, max_q, max_k, kwargs = varlen_inputs(name)
        out, lse = triton_attention_varlen(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v),
                                           torch.from_numpy(cu_q), torch.from_numpy(cu_k), max_q, max_k,
                                           block_m=16, block_n=16, **as_torch(kwargs))
        results[f"varlen/{name}/out"], results[f"varlen/{name}/lse"] = out.numpy(), lse.numpy()
    for name in DISPATCH:
        q, k, v, attention_mask, q_len, past_len, bias = dispatch_inputs(name)
        mask = build_attention_mask(torch.from_numpy(attention_mask), q_len, past_len, torch.float32)
        out = scaled_dot_product_attention(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v), mask=mask,
                                           bias=None if bias is None else torch.from_numpy(bias), backend="triton")
        results[f"dispatch/{name}/out"] = out.numpy()
    from minivl.tiny.llm import write_tiny_llm
    from torch_impl.loading import load_model

    for family in MODEL_FAMILIES:
        checkpoint = write_tiny_llm(os.path.join(os.path.dirname(path), family), family)
        model = load_model(checkpoint, dtype="float32", attn_implementation="triton")
        logits = model(input_ids=torch.tensor(MODEL_INPUT_IDS), attention_mask=torch.tensor(MODEL_ATTENTION_MASK)).logits
        results[f"model/{family}/logits"] = logits.detach().numpy()
        results[f"model/{family}/checkpoint"] = np.array(str(checkpoint))
    np.savez(path, **results)


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    import warnings

    # the interpreter evaluates finfo.min + ALiBi bias in NumPy, which warns on the (intended) overflow to -inf
    warnings.filterwarnings("ignore", "overflow encountered", RuntimeWarning)
    run_interpreted_cases(sys.argv[1])
    sys.exit(0)


# ----------------------------------------------------------------------------- the tests (pytest process)
import torch  # noqa: E402

from flash_reference import naive_attention, naive_varlen, sdpa_reference  # noqa: E402
from minivl.errors import ConfigError, DeviceError, ShapeError  # noqa: E402
from minivl.testing import assert_close, tolerance  # noqa: E402

ULPS = 32


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """Every case run once through the interpreted kernel, in a subprocess with TRITON_INTERPRET=1."""
    path = tmp_path_factory.mktemp("triton") / "results.npz"
    # one BLAS thread: the interpreter does thousands of tiny matmuls, which OpenBLAS threads only slow down
    env = dict(os.environ, TRITON_INTERPRET="1", OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(path)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"interpreted Triton run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    with np.load(path) as data:
        return dict(data)


def _check(out, lse, ref_out, ref_lse, v, what):
    rtol, atol = tolerance(np.float32, ULPS, scale=float(np.abs(v).max()))
    assert_close(out, ref_out, rtol=rtol, atol=atol, what=f"{what}: output")
    finite = np.isfinite(ref_lse)
    assert np.array_equal(np.isfinite(lse), finite), f"{what}: rows with no visible key differ"
    assert (lse[~finite] == -np.inf).all() and (out[~finite] == 0).all(), f"{what}: empty rows must be 0, lse -inf"
    rtol, atol = tolerance(np.float32, ULPS, scale=float(np.abs(ref_lse[finite]).max()))
    assert_close(lse[finite], ref_lse[finite], rtol=rtol, atol=atol, what=f"{what}: lse")


@pytest.mark.parametrize("name", list(DENSE))
def test_kernel_equals_naive_attention(interpreted, name):
    q, k, v, kwargs = dense_inputs(name)
    kwargs["softmax_scale"] = kwargs.pop("scale", None)
    out, lse = interpreted[f"dense/{name}/out"], interpreted[f"dense/{name}/lse"]
    ref_out, ref_lse = naive_attention(q, k, v, **kwargs)
    _check(out, lse, ref_out, ref_lse, v, name)
    # second reference: torch sdpa in float64 (rows with no visible key are NaN there: compared above)
    sdpa_out, rows = sdpa_reference(q, k, v, **kwargs)
    rtol, atol = tolerance(np.float32, ULPS, scale=float(np.abs(v).max()))
    assert_close(out[:, :, rows], sdpa_out[:, :, rows], rtol=rtol, atol=atol, what=f"{name} vs torch sdpa")


@pytest.mark.parametrize("name", list(VARLEN))
def test_kernel_varlen_equals_naive_per_sequence(interpreted, name):
    q, k, v, cu_q, cu_k, _, _, kwargs = varlen_inputs(name)
    out, lse = interpreted[f"varlen/{name}/out"], interpreted[f"varlen/{name}/lse"]
    ref_out, ref_lse = naive_varlen(q, k, v, cu_q, cu_k, **kwargs)
    # lse is [n_heads, total_q]; move heads last so `out[~finite]` lines up with [total_q, n_heads, d]
    _check(out, lse.T, ref_out, ref_lse.T, v, f"varlen {name}")


@pytest.mark.parametrize("name", list(DISPATCH))
def test_triton_backend_with_model_masks(interpreted, name):
    """backend="triton" with the decoder's causal+padding mask (and MPT's bias) equals eager and naive.

    Against eager float32 everywhere, pad query rows included (both see finfo.min + score round to
    finfo.min there, a uniform average); against naive float64 on real query rows only (in float64
    finfo.min + score keeps the score, so fully padded rows differ by design).
    """
    from torch_impl.attention import build_attention_mask, scaled_dot_product_attention

    q, k, v, attention_mask, q_len, past_len, bias = dispatch_inputs(name)
    out = interpreted[f"dispatch/{name}/out"]
    mask = build_attention_mask(torch.from_numpy(attention_mask), q_len, past_len, torch.float32)
    bias_t = None if bias is None else torch.from_numpy(bias)
    eager = scaled_dot_product_attention(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v),
                                         mask=mask, bias=bias_t, backend="eager")
    rtol, atol = tolerance(np.float32, 2 * ULPS, scale=float(np.abs(v).max()))
    assert_close(out, eager, rtol=rtol, atol=atol, what=f"{name} vs eager")
    additive = mask.double().numpy() + (0.0 if bias is None else bias.astype(np.float64))
    ref_out, _ = naive_attention(q, k, v, additive=additive)
    real_rows = attention_mask[:, past_len:].astype(bool)  # [b, s]: query rows that are real tokens
    rtol, atol = tolerance(np.float32, ULPS, scale=float(np.abs(v).max()))
    assert_close(out.transpose(0, 2, 1, 3)[real_rows], ref_out.transpose(0, 2, 1, 3)[real_rows],
                 rtol=rtol, atol=atol, what=f"{name} vs naive float64 (real rows)")


@pytest.mark.parametrize("family", MODEL_FAMILIES)
def test_tiny_model_with_triton_backend_equals_eager(interpreted, family):
    """A whole tiny model (2 layers) with attn_implementation="triton" vs "eager", left-padded batch, float32.

    The attention outputs differ by rounding only (<= ~2 ulps); two layers and the LM head can
    amplify that a little: 64 ulps of float32 times max|logits| (seen: ~4 ulps).
    """
    from torch_impl.loading import load_model

    logits = interpreted[f"model/{family}/logits"]
    eager = load_model(str(interpreted[f"model/{family}/checkpoint"]), dtype="float32", attn_implementation="eager")
    ref = eager(input_ids=torch.tensor(MODEL_INPUT_IDS), attention_mask=torch.tensor(MODEL_ATTENTION_MASK)).logits
    rtol, atol = tolerance(np.float32, 2 * ULPS, scale=float(ref.abs().max()))
    assert_close(logits, ref, rtol=rtol, atol=atol, what=f"tiny {family} logits, triton vs eager")


def test_bad_input_raises_named_error():
    """Checked before any launch, so these run (fast) in this process whatever the Triton mode."""
    from torch_impl.triton_attention import triton_attention, triton_attention_varlen

    a = torch.zeros(1, 4, 16, 8)
    with pytest.raises(ShapeError, match="multiple of n_kv_heads"):
        triton_attention(a[:, :3], a, a)
    with pytest.raises(ShapeError, match="float64"):
        triton_attention(a.double(), a.double(), a.double())
    with pytest.raises(ShapeError, match="broadcast"):
        triton_attention(a, a, a, mask=torch.zeros(3, 1, 1, 16))
    with pytest.raises(ShapeError, match="alibi_slopes"):
        triton_attention(a, a, a, alibi_slopes=torch.ones(3))
    with pytest.raises(ShapeError, match="power of two"):
        triton_attention(a, a, a, block_m=24)
    with pytest.raises(ShapeError, match="window_size"):
        triton_attention(a, a, a, window_size=(-3, 0))
    with pytest.raises(ConfigError, match="probabilities"):
        triton_attention(a, a, a, return_probs=True)
    packed = torch.zeros(10, 4, 8)
    with pytest.raises(ShapeError, match="max_seqlen"):
        triton_attention_varlen(packed, packed, packed, torch.tensor([0, 4, 10]), torch.tensor([0, 4, 10]), 5, 6)


def test_cpu_tensors_without_interpreter_raise_device_error():
    import torch_impl.triton_attention as module

    if module.INTERPRETED:
        pytest.skip("TRITON_INTERPRET=1 was set for this whole process: CPU tensors are legitimately accepted")
    a = torch.zeros(1, 2, 16, 8)
    with pytest.raises(DeviceError, match="TRITON_INTERPRET=1"):  # the CLI's exit 4: not available here
        module.triton_attention(a, a, a)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; CI has none")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_kernel_on_gpu_equals_sdpa(dtype):
    """Compiled on a GPU vs float64 sdpa of the same inputs.

    float32: 256 ulps (tl.exp compiles to the approximate ex2 instruction, a few ulps per weight,
    unlike the interpreter's NumPy exp). bf16: 4 bf16 ulps·max|v| (P is rounded to bf16 before P·v,
    the output to bf16 at the end).
    """
    from torch_impl.triton_attention import INTERPRETED, triton_attention

    if INTERPRETED:
        pytest.skip("TRITON_INTERPRET=1 in this process: the kernel is interpreted, not compiled")
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 8, 300, 64, device="cuda", generator=gen).to(dtype)
    k = torch.randn(2, 2, 300, 64, device="cuda", generator=gen).to(dtype)
    v = torch.randn(2, 2, 300, 64, device="cuda", generator=gen).to(dtype)
    out = triton_attention(q, k, v, causal=True)
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True,
                                                           enable_gqa=True)
    rtol, atol = tolerance(dtype, 256 if dtype == torch.float32 else 4, scale=float(v.abs().max()))
    assert_close(out, ref, rtol=rtol, atol=atol, what=f"compiled triton {dtype}")
