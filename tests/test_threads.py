"""minivl/threads.py and the fast paths that use it, on one thread (MINIVL_NUM_THREADS=1: every
piece in the caller, in order, BLAS on all its threads) and on two (pieces at once, BLAS on one
thread per piece).

* Elementwise pieces (`silu_mul`, `gelu_fast`) make exactly the calls one thread would make on
  their slice: EXACT equality.
* Pieces that run GEMMs (`causal_attention_blocks`, `attention_blocks`) are equal up to the GEMM's
  accumulation order: OpenBLAS may pick another kernel for a one-thread call (seen: float64
  q·kᵀ, 1.7e-16 relative; float32 equal here). Tolerance: that of two orderings of the attention
  sums, as tests/test_attention_fast.py sets it (rtol 8 ulps, atol (sqrt(t) + 16) ulps of p·|v|).
* Whole forwards (a decoder, a ViT): MODEL_ULPS of max|output|, the decoder parity tests' bound.
"""
import math
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

import minivl
from minivl import attention as A
from minivl import attention_blocks as AB
from minivl import threads
from minivl.activations import gelu_fast, silu, silu_mul
from minivl.errors import ConfigError
from minivl.testing import assert_close, tolerance
from minivl.tiny.llm import write_tiny_llm
from minivl.tiny.vision import write_tiny_vit
from torch_impl import attention_blocks as TB
from _decoder_util import assert_parity


def attention_tolerance(q, k, v, dtype, **options):
    """(rtol, atol) of two orderings of the attention's sums: rtol 8 ulps, atol (sqrt(t) + 16) ulps of p·|v|."""
    group = q.shape[1] // k.shape[1]
    _, probs = A.scaled_dot_product_attention(q, k, v, return_probs=True, **options)
    pv = probs.astype(np.float64) @ np.repeat(np.abs(v.astype(np.float64)), group, axis=1)
    return tolerance(dtype, 8, atol_ulps=math.sqrt(k.shape[2]) + 16, scale=pv)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def at_threads(monkeypatch, n: int, run):
    """run() with MINIVL_NUM_THREADS=n (the environment restored afterwards)."""
    with monkeypatch.context() as patch:
        patch.setenv("MINIVL_NUM_THREADS", str(n))
        patch.delenv("OPENBLAS_NUM_THREADS", raising=False)
        patch.delenv("OMP_NUM_THREADS", raising=False)
        return run()


def test_parallel_returns_results_in_order_and_runs_on_other_threads(monkeypatch):
    names = at_threads(monkeypatch, 2, lambda: threads.parallel([lambda i=i: (i, threading.current_thread().name)
                                                                  for i in range(6)]))
    assert [i for i, _ in names] == list(range(6))
    assert {name for _, name in names} <= {threading.current_thread().name, "minivl_0"}


def test_the_caller_and_a_worker_run_pieces_at_the_same_time(monkeypatch):
    """Two pieces that each wait for the other to start: they finish only if two threads run them at
    once (one of them the caller, which takes pieces too), else the barrier breaks after 10 s."""
    both = threading.Barrier(2, timeout=10)

    def piece():
        both.wait()
        return threading.current_thread().name

    names = at_threads(monkeypatch, 2, lambda: threads.parallel([piece, piece]))
    assert sorted(names) == sorted([threading.current_thread().name, "minivl_0"])


def test_one_thread_runs_every_piece_in_the_caller(monkeypatch):
    caller = threading.current_thread().name
    names = at_threads(monkeypatch, 1, lambda: threads.parallel([lambda: threading.current_thread().name] * 3))
    assert names == [caller] * 3


def test_nested_parallel_runs_in_place_instead_of_waiting_on_its_own_workers(monkeypatch):
    def outer():
        return threads.parallel([lambda: threading.current_thread().name] * 2)

    inner = at_threads(monkeypatch, 2, lambda: threads.parallel([outer, outer]))
    for names in inner:  # each inner call ran on the thread that called it (the caller or the worker)
        assert len(set(names)) == 1


def test_an_exception_in_a_piece_reaches_the_caller_after_every_piece_finished(monkeypatch):
    finished = []

    def fail():
        raise ValueError("piece 2 failed")

    def slow():
        time.sleep(0.2)
        finished.append("slow")

    with pytest.raises(ValueError, match="piece 2 failed"):
        at_threads(monkeypatch, 2, lambda: threads.parallel([fail, slow]))
    assert finished == ["slow"]  # the other piece was not left running


def test_thread_count_from_the_environment(monkeypatch):
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("MINIVL_NUM_THREADS", "3")
    assert threads.num_threads() == 3
    monkeypatch.delenv("MINIVL_NUM_THREADS")
    assert threads.num_threads() == len(os.sched_getaffinity(0))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the usual way to keep a process to one core caps minivl too
    assert threads.num_threads() == 1
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("MINIVL_NUM_THREADS", bad)
        with pytest.raises(ConfigError, match="MINIVL_NUM_THREADS must be a whole number"):
            threads.num_threads()


@pytest.mark.parametrize("length,pieces,minimum", [(10, 3, 1), (10, 4, 3), (5, 8, 1), (7, 2, 100), (0, 2, 1)])
def test_split_covers_the_range_once_in_order(length, pieces, minimum):
    slices = threads.split(length, pieces, minimum)
    covered = [i for piece in slices for i in range(length)[piece]]
    assert covered == list(range(length))
    assert len(slices) <= max(1, pieces)
    if len(slices) > 1:
        assert min(piece.stop - piece.start for piece in slices) >= minimum


def test_blas_runs_one_thread_per_piece_only_while_the_pieces_run(monkeypatch):
    from threadpoolctl import threadpool_info

    def blas_threads():
        return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]

    before = blas_threads()
    inside = at_threads(monkeypatch, 2, lambda: threads.parallel([blas_threads] * 2, calls_blas=True))
    assert inside == [[1] * len(before)] * 2
    assert blas_threads() == before


def test_importing_minivl_first_shortens_openblas_spin_and_respects_a_choice():
    """OpenBLAS reads OPENBLAS_THREAD_TIMEOUT when NumPy loads it: minivl sets a default only before that."""
    code = "import os, minivl, numpy; print(os.environ.get('OPENBLAS_THREAD_TIMEOUT'))"
    env = {key: value for key, value in os.environ.items() if key != "OPENBLAS_THREAD_TIMEOUT"}
    run = lambda code, env: subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,  # noqa: E731
                                           text=True, check=True).stdout.strip()
    assert run(code, env) == "20"
    assert run(code, dict(env, OPENBLAS_THREAD_TIMEOUT="26")) == "26"
    assert run("import numpy, os, minivl; print(os.environ.get('OPENBLAS_THREAD_TIMEOUT'))", env) == "None"


@pytest.mark.parametrize("scale_mode,softmax_dtype", [("divide", "float32"), ("scale_q", None)])
def test_causal_blocks_on_one_thread_and_two(monkeypatch, scale_mode, softmax_dtype):
    rng = np.random.default_rng(0)
    q_len = 300  # three blocks of 128 (the last one short)
    q = rng.standard_normal((1, 9, q_len, 64), dtype=np.float32)
    k, v = (rng.standard_normal((1, 3, q_len, 64), dtype=np.float32) for _ in range(2))
    mask = A.build_attention_mask(None, q_len, 0, np.float32)
    options = dict(scale_mode=scale_mode, softmax_dtype=softmax_dtype)
    run = lambda: AB.causal_attention_blocks(q, k, v, mask=mask, **options)  # noqa: E731
    rtol, atol = attention_tolerance(q, k, v, "float32", mask=mask, **options)
    assert_close(at_threads(monkeypatch, 2, run), at_threads(monkeypatch, 1, run), rtol=rtol, atol=atol,
                 what="causal blocks on two threads vs one")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_attention_blocks_equal_the_full_call_and_the_torch_twin(monkeypatch, dtype):
    rng = np.random.default_rng(1)
    n = 333  # a ViT-like unmasked attention in three blocks
    q, k, v = (rng.standard_normal((2, 6, n, 32)).astype(dtype) for _ in range(3))
    options = dict(scale=32 ** -0.5, scale_mode="scale_q", softmax_dtype=None)
    two = at_threads(monkeypatch, 2, lambda: AB.attention_blocks(q, k, v, **options))
    one = at_threads(monkeypatch, 1, lambda: AB.attention_blocks(q, k, v, **options))
    rtol, atol = attention_tolerance(q, k, v, dtype, **options)
    assert_close(two, one, rtol=rtol, atol=atol, what="blocks on two threads vs one")
    full = A.scaled_dot_product_attention(q, k, v, **options)
    assert_close(two, full, rtol=rtol, atol=atol, what="blocks vs one full call")
    twin = TB.attention_blocks(*(torch.from_numpy(x) for x in (q, k, v)), **options)
    assert_close(twin, full, rtol=rtol, atol=atol, what="torch twin blocks vs NumPy full call")
    # a mask, a bias or asked-for probabilities: the plain call itself
    probs = AB.attention_blocks(q, k, v, return_probs=True, **options)
    np.testing.assert_array_equal(probs[1], A.scaled_dot_product_attention(q, k, v, return_probs=True, **options)[1])


def test_activations_are_the_same_bits_on_one_thread_and_two(monkeypatch):
    rng = np.random.default_rng(2)
    fused = (rng.standard_normal((1, 512, 2 * 1536)) * 6).astype(np.float32)
    gate, up = fused[..., :1536], fused[..., 1536:]  # column views of a fused projection, as in a prefill
    two = at_threads(monkeypatch, 2, lambda: silu_mul(gate, up))
    np.testing.assert_array_equal(two, at_threads(monkeypatch, 1, lambda: silu_mul(gate, up)))
    np.testing.assert_array_equal(two, silu(gate) * up)
    x = (rng.standard_normal((1025, 1536)) * 3).astype(np.float32)
    np.testing.assert_array_equal(at_threads(monkeypatch, 2, lambda: gelu_fast(x)),
                                  at_threads(monkeypatch, 1, lambda: gelu_fast(x)))


def test_whole_forwards_on_one_thread_and_two(monkeypatch, tmp_path):
    llm = minivl.load_model(write_tiny_llm(tmp_path / "llama", "llama", seed=4), dtype="float32")
    ids = np.random.default_rng(3).integers(0, llm.config.vocab_size, (1, 300))
    forward = lambda: llm(input_ids=ids).logits  # noqa: E731
    assert_parity(at_threads(monkeypatch, 2, forward), at_threads(monkeypatch, 1, forward), "float32",
                  what="llama prefill of 300 tokens, two threads vs one")
    vit = minivl.load_model(write_tiny_vit(tmp_path / "vit", "300m", image_size=224, seed=4), dtype="float32")
    pixels = np.random.default_rng(4).standard_normal((1, 3, 224, 224), dtype=np.float32)
    forward = lambda: vit(pixels).last_hidden_state  # noqa: E731
    assert_parity(at_threads(monkeypatch, 2, forward), at_threads(monkeypatch, 1, forward), "float32",
                  what="ViT of 257 tokens, two threads vs one")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX-only")
def test_a_forked_child_starts_a_pool_of_its_own(monkeypatch):
    """A child forked after the pool started has none of its threads: it must not wait on them forever."""
    monkeypatch.setenv("MINIVL_NUM_THREADS", "2")
    both = threading.Barrier(2)  # two pieces that wait for each other: the parent's pool has two live workers
    threads.parallel([lambda: both.wait(timeout=10)] * 2)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: run pieces on threads again, report, and leave without pytest's teardown
        signal.alarm(30)  # a child waiting on its parent's threads would hang: SIGALRM ends it, status != 0
        try:
            ok = threads.parallel([lambda: threading.current_thread().name] * 2)
            os.write(write, ("ok " + " ".join(ok)).encode())
        finally:
            os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    message = os.read(read, 200).decode()
    os.close(read)
    assert status == 0 and message.startswith("ok minivl"), message
