"""torch attn_implementation backends against the eager path (the reference's op order).

* sdpa on CPU, every family, float32 and float64: a left-padded prefill and a cached decode. sdpa
  scales q and k by sqrt(scale) each and fuses the softmax, so it rounds differently from the
  eager divide; measured worst 8.4 ulps of the logits' max, bound MODEL_ULPS (64).
* triton: the project's kernel under TRITON_INTERPRET=1 (a subprocess, since the flag must be set
  before triton is imported), one family; measured 3.7 ulps, same bound.
* flash, and everything on CUDA: skipped cleanly without a GPU.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import minivl
import torch_impl
from _decoder_util import DTYPES, FAMILIES, MODEL_ULPS, assert_parity, left_padded_batch
from conftest import requires_cuda
from torch_impl.generate import generate as torch_generate

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_sdpa_matches_eager_on_cpu(tiny_llms, family, dtype):
    eager = torch_impl.load_model(tiny_llms[family], dtype=dtype, attn_implementation="eager")
    sdpa = torch_impl.load_model(tiny_llms[family], dtype=dtype, attn_implementation="sdpa")
    ids, mask, _ = left_padded_batch(np.random.default_rng(30), [9, 5], 300)
    ids, mask = torch.tensor(ids), torch.tensor(mask)
    # padded prefill: real positions only (pad queries attend to nothing real)
    a, b = eager(ids, attention_mask=mask, use_cache=True), sdpa(ids, attention_mask=mask, use_cache=True)
    assert_parity(b.logits[0], a.logits[0], dtype, MODEL_ULPS, what=f"{family} sdpa row 0")
    assert_parity(b.logits[1, 4:], a.logits[1, 4:], dtype, MODEL_ULPS, what=f"{family} sdpa row 1")
    # one cached decode step (q_len 1 against 10 keys)
    step = torch.tensor([[7], [8]])
    mask2 = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
    position = mask.sum(-1, keepdim=True)
    a2 = eager(step, attention_mask=mask2, position_ids=position, past_key_values=a.past_key_values, use_cache=True)
    b2 = sdpa(step, attention_mask=mask2, position_ids=position, past_key_values=b.past_key_values, use_cache=True)
    assert_parity(b2.logits, a2.logits, dtype, MODEL_ULPS, what=f"{family} sdpa decode")
    # unpadded: the is_causal fast path
    assert_parity(sdpa(ids[:1]).logits, eager(ids[:1]).logits, dtype, MODEL_ULPS, what=f"{family} sdpa causal")


def test_flash_is_refused_on_cpu_with_a_clear_error(tiny_llms):
    model = torch_impl.load_model(tiny_llms["qwen2"], dtype="float32", attn_implementation="flash")
    with pytest.raises(minivl.errors.MinivlError, match="CUDA"):
        model(torch.tensor([[3, 4, 5]]))


_TRITON_CHILD = r"""
import sys, numpy as np, torch
sys.path[:0] = [{root!r}, {tests!r}]
import torch_impl
from _decoder_util import MODEL_ULPS, assert_parity, left_padded_batch
eager = torch_impl.load_model({path!r}, attn_implementation="eager")
triton = torch_impl.load_model({path!r}, attn_implementation="triton")
ids, mask, _ = left_padded_batch(np.random.default_rng(31), [9, 5], 300)
ids, mask = torch.tensor(ids), torch.tensor(mask)
a, b = eager(ids, attention_mask=mask).logits, triton(ids, attention_mask=mask).logits
assert_parity(b[0], a[0], "float32", MODEL_ULPS, what="triton row 0")
assert_parity(b[1, 4:], a[1, 4:], "float32", MODEL_ULPS, what="triton row 1")
assert_parity(triton(ids[:1]).logits, eager(ids[:1]).logits, "float32", MODEL_ULPS, what="triton causal")
print("TRITON-OK")
"""


def test_triton_backend_matches_eager_under_the_interpreter(tiny_llms):
    pytest.importorskip("triton")
    code = _TRITON_CHILD.format(root=os.path.dirname(HERE), tests=HERE, path=tiny_llms["qwen2"])
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "TRITON-OK" in result.stdout, result.stderr[-3000:]


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["eager", "sdpa", "flash", "triton"])
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_bfloat16_backends_track_the_float64_gold_run(tiny_llms, family, backend):
    """bf16 on the GPU: every backend within bf16 rounding of NumPy float64 (8 eps of the logits' max,
    eps = 2^-7: two layers of bf16 matmuls), and flash/sdpa/triton agree with eager bf16 greedy tokens
    on an unpadded prompt for most steps (bf16 ties may flip a late token, so only the first is pinned)."""
    gold = minivl.load_model(tiny_llms[family], dtype="float64")
    model = torch_impl.load_model(tiny_llms[family], dtype="bfloat16", device="cuda", attn_implementation=backend)
    ids = np.random.default_rng(32).integers(3, 300, (2, 24))
    logits = model(torch.tensor(ids, device="cuda")).logits
    assert logits.dtype == torch.float32
    assert_parity(logits.cpu(), gold(ids).logits, "bfloat16", 8, what=f"{family} {backend} bf16 vs float64")
    eager = torch_impl.load_model(tiny_llms[family], dtype="bfloat16", device="cuda", attn_implementation="eager")
    new = torch_generate(model, torch.tensor(ids, device="cuda"), max_new_tokens=4)
    ref = torch_generate(eager, torch.tensor(ids, device="cuda"), max_new_tokens=4)
    assert (new[:, 0] == ref[:, 0]).all()


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_float32_eager_matches_numpy(tiny_llms, family):
    ours = minivl.load_model(tiny_llms[family], dtype="float32")
    model = torch_impl.load_model(tiny_llms[family], dtype="float32", device="cuda")
    ids, mask, _ = left_padded_batch(np.random.default_rng(33), [9, 5], 300)
    out = model(torch.tensor(ids, device="cuda"), attention_mask=torch.tensor(mask, device="cuda")).logits.cpu()
    ref = ours(ids, attention_mask=mask).logits
    # GPU float32 matmuls may use TF32-free but differently blocked kernels: same 64-ulp bound
    assert_parity(out[0], ref[0], "float32", MODEL_ULPS)
    assert_parity(out[1, 4:], ref[1, 4:], "float32", MODEL_ULPS)
