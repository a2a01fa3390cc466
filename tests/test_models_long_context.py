"""The stateful and per-call RoPE behaviours of the reference, at model level, NumPy vs torch.

* Phi-3 'su' / 'yarn': factors picked per call from max(position_ids)+1 over the WHOLE batch, so one
  long row switches every row of that batch to the long factors (pitfall 11); generation that
  crosses original_max_position_embeddings keeps short-rotated keys in the cache.
* InternLM2 dynamic NTK: the base grows with kv_seq_len past max_position_embeddings and never
  shrinks back (pitfall 9): after one long call, a short call sees the enlarged base.
Tolerances: MODEL_ULPS (tests/_decoder_util.py).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import minivl
import torch_impl
from _decoder_util import assert_parity, left_padded_batch
from minivl.generate import generate
from minivl.tiny.llm import write_tiny_llm
from torch_impl.generate import generate as torch_generate


@pytest.fixture(scope="module")
def phi3_path(tmp_path_factory):
    return write_tiny_llm(tmp_path_factory.mktemp("phi3") / "phi3", "phi3")


@pytest.mark.parametrize("scaling", ["su", "yarn"])
def test_phi3_generation_across_the_switch_numpy_equals_torch(tmp_path, scaling):
    """Prompt of O-3 tokens, 8 greedy tokens: positions cross O = 32 mid-generation. Same tokens and
    same logits at every step in both packages; 'yarn' is Phi-3's variant (magnitude 0.1·ln(M/O)+1)."""
    path = write_tiny_llm(tmp_path / scaling, "phi3",
                          rope_scaling={**minivl.tiny.llm.tiny_llm_config("phi3")["rope_scaling"], "type": scaling})
    ours, theirs = minivl.load_model(path, "float64"), torch_impl.load_model(path, "float64")
    original = ours.config.original_max_position_embeddings
    ids = np.random.default_rng(10).integers(3, 300, (2, original - 3))
    steps_np, steps_torch = [], []
    new = generate(ours, ids, max_new_tokens=8, streamer=steps_np.append)
    new_torch = torch_generate(theirs, torch.tensor(ids), max_new_tokens=8, streamer=steps_torch.append)
    np.testing.assert_array_equal(new, new_torch.numpy())
    assert len(steps_np) == 8 and ids.shape[1] + 8 > original
    # teacher-forced cached run over the same tokens: the keys written before the switch keep their
    # short rotation, so the last step differs from a full recompute where every key is long-rotated
    tokens = np.concatenate([ids, new], 1)
    out = ours(tokens[:, :ids.shape[1]], use_cache=True)
    for t in range(ids.shape[1], tokens.shape[1]):
        out = ours(tokens[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
    assert np.abs(ours(tokens).logits[:, -1] - out.logits[:, -1]).max() > 1e-3


def test_phi3_one_long_row_switches_the_whole_batch(phi3_path):
    """Row 0 reaches position 39 > O, row 1 only 9: in a batch both use the long factors, so row 1
    differs from row 1 run alone (short factors), exactly as the reference's batch-wide max."""
    ours, theirs = minivl.load_model(phi3_path, "float64"), torch_impl.load_model(phi3_path, "float64")
    ids, mask, rows = left_padded_batch(np.random.default_rng(11), [40, 10], 300)
    positions = np.where(mask == 0, 1, np.cumsum(mask, -1) - 1)
    batch = ours(ids, attention_mask=mask, position_ids=positions).logits
    batch_torch = theirs(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions)).logits
    assert_parity(batch, batch_torch, "float64", what="phi3 mixed batch")
    alone = ours(rows[1][None]).logits[0]
    assert np.abs(batch[1, -10:] - alone).max() > 1e-3
    # with the long row gone the batch is all-short and row 1 matches its solo run
    short_batch = ours(ids[1:], attention_mask=mask[1:], position_ids=positions[1:]).logits[0, -10:]
    assert_parity(short_batch, alone, "float64")


def test_internlm2_dynamic_ntk_is_sticky(tmp_path):
    """A fresh model and a model that once saw kv_seq_len 70 > 48 disagree on a 10-token input: the
    enlarged base stays (both packages alike)."""
    path = write_tiny_llm(tmp_path / "il", "internlm2")
    fresh_np, fresh_torch = minivl.load_model(path, "float64"), torch_impl.load_model(path, "float64")
    used_np, used_torch = minivl.load_model(path, "float64"), torch_impl.load_model(path, "float64")
    long_ids = np.random.default_rng(12).integers(3, 300, (1, 70))
    assert_parity(used_np(long_ids).logits, used_torch(torch.tensor(long_ids)).logits, "float64", what="long call")
    assert used_np.rotary.dynamic.base == used_torch.rotary.dynamic.base > used_np.config.rope_theta
    short = long_ids[:, :10]
    before = fresh_np(short).logits
    after = used_np(short).logits
    assert_parity(after, used_torch(torch.tensor(short)).logits, "float64", what="short call after long")
    assert_parity(before, fresh_torch(torch.tensor(short)).logits, "float64", what="short call, fresh")
    assert np.abs(after - before).max() > 1e-6


def test_internlm2_generation_past_max_positions_numpy_equals_torch(tmp_path):
    path = write_tiny_llm(tmp_path / "il", "internlm2")
    ours, theirs = minivl.load_model(path, "float32"), torch_impl.load_model(path, "float32")
    ids, mask, _ = left_padded_batch(np.random.default_rng(13), [44, 40], 300)
    new = generate(ours, ids, attention_mask=mask, max_new_tokens=12)
    np.testing.assert_array_equal(new, torch_generate(theirs, torch.tensor(ids), attention_mask=torch.tensor(mask),
                                                      max_new_tokens=12).numpy())
    assert ours.rotary.dynamic.base > ours.config.rope_theta  # 56 > 48 keys: the base was enlarged
