"""`pack_parameters` (minivl/models/packing.py and its torch twin): every weight moved into one buffer.

NumPy's load packs; torch_impl's does not (the torch cases pack a loaded model with the function).

A layout change only, so everything is checked for EXACT equality: a packed model's state_dict is
the checkpoint's, its logits equal those of the same model left unpacked bit for bit (the same
GEMMs on the same values; only the addresses differ), tied weights stay one object, the fused
projections keep serving their modules, and the parameters lie back to back, in the order the
forward reads them, each on a 64-byte boundary, in one allocation no larger than their sum plus
that alignment.
"""
import numpy as np
import pytest
import torch

import minivl
import minivl.models.common
import torch_impl
import torch_impl.models.common
import torch_impl.models.packing
from minivl.checkpoint import load_state_dict
from minivl.models.packing import ALIGNMENT
from minivl.tiny.internvl import write_tiny_internvl
from minivl.tiny.llm import FAMILIES, write_tiny_llm

PACKAGES = {"numpy": (minivl, minivl.models.common, np.asarray),
            "torch": (torch_impl, torch_impl.models.common, torch.from_numpy)}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("packing")
    paths = {family: write_tiny_llm(root / family, family, seed=5) for family in FAMILIES}
    paths["internvl"] = write_tiny_internvl(root / "internvl", llm="qwen2", seed=5)
    return paths


def address_range(value) -> tuple[int, int]:
    """[first byte, one past the last byte) of an array or tensor's elements."""
    if isinstance(value, torch.Tensor):
        start = value.data_ptr()
        return start, start + value.numel() * value.element_size()
    return np.lib.array_utils.byte_bounds(value)


def fused_matrix_of(model, value):
    """The FusedProjection matrix (weight or bias) that `value` is a view of, or None."""
    for _, module in model.named_modules():
        fused = module.__dict__.get("fused")
        if fused is not None and (value is module.weight or value is module.bias):
            return fused.weight if value is module.weight else fused.bias
    return None


def load(package, path, unpacked=False, monkeypatch=None):
    """NumPy's load packs (unpacked: with pack_parameters skipped); torch_impl's does not, so a packed
    torch model is packed here, by the function a caller would use."""
    package_module, common, _ = PACKAGES[package]
    if package == "numpy":
        if unpacked:
            monkeypatch.setattr(common, "pack_parameters", lambda model: None)
        return package_module.load_model(path, dtype="float32")
    model = package_module.load_model(path, dtype="float32")
    if not unpacked:
        torch_impl.models.packing.pack_parameters(model)
    return model


def test_torch_impl_loads_its_weights_unpacked(checkpoints):
    """torch_impl leaves each weight where torch allocated it (minivl/models/packing.py says why); packed,
    every parameter is a view of one storage."""
    model = torch_impl.load_model(checkpoints["llama"], dtype="float32")
    assert len({value.untyped_storage().data_ptr() for value in model.parameters()}) > 1
    torch_impl.models.packing.pack_parameters(model)
    assert len({value.untyped_storage().data_ptr() for value in model.parameters()}) == 1


@pytest.mark.parametrize("package", sorted(PACKAGES))
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_decoder_is_one_ordered_buffer_and_equals_the_unpacked_model(checkpoints, family, package,
                                                                             monkeypatch):
    model = load(package, checkpoints[family])
    params = list(model.named_parameters())  # each tensor once (a tied head is the embedding)
    ranges = [address_range(value) for _, value in params]
    # forward order: each storage (a tensor, or the fused matrix its views tile) after the one used before it
    first_use = {}
    for (key, value), (start, _) in zip(params, ranges):
        fused = fused_matrix_of(model, value)
        first_use.setdefault(id(fused) if fused is not None else id(value), (key, address_range(fused)[0]
                                                                              if fused is not None else start))
    starts = [start for _, start in first_use.values()]
    assert starts == sorted(starts), [key for key, _ in first_use.values()]
    assert all(start % ALIGNMENT == 0 for start in starts), "a storage off the 64-byte alignment"
    nbytes = sum(end - start for start, end in ranges)
    span = max(end for _, end in ranges) - min(start for start, _ in ranges)
    assert span <= nbytes + ALIGNMENT * len(params), (span, nbytes)  # one allocation, back to back

    stored = load_state_dict(checkpoints[family])
    state = model.state_dict()
    for key, value in stored.items():
        np.testing.assert_array_equal(np.asarray(state[key]), np.asarray(value), err_msg=key)
    config = model.config
    if getattr(config, "tie_word_embeddings", False) and "lm_head.weight" in state:
        assert model.get_submodule("lm_head").weight is model.get_submodule("model.embed_tokens").weight
    for _, module in model.named_modules():
        fused = module.__dict__.get("fused")
        if fused is not None:
            assert any(view is module.weight for view in fused.views), "the fused matrix no longer serves its modules"

    wrap = PACKAGES[package][2]
    ids = np.random.default_rng(1).integers(0, config.vocab_size, (2, 11))
    with torch.inference_mode():
        packed = model(input_ids=wrap(ids)).logits
        reference = load(package, checkpoints[family], unpacked=True, monkeypatch=monkeypatch)(input_ids=wrap(ids)).logits
    np.testing.assert_array_equal(np.asarray(packed), np.asarray(reference))


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_packed_chat_model_equals_the_unpacked_one(checkpoints, package, monkeypatch):
    """The vision tower, projector and language model are packed one by one; the chat forward is unchanged."""
    model = load(package, checkpoints["internvl"])
    config = model.config
    rng = np.random.default_rng(2)
    size = config.vision_config.image_size
    pixels = rng.standard_normal((1, 3, size, size), dtype=np.float32)
    wrap = PACKAGES[package][2]
    with torch.inference_mode():
        packed = model.extract_feature(wrap(pixels))
        reference = load(package, checkpoints["internvl"], unpacked=True, monkeypatch=monkeypatch).extract_feature(
            wrap(pixels))
    np.testing.assert_array_equal(np.asarray(packed), np.asarray(reference))


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_reloading_a_packed_model_adopts_the_new_tensors(checkpoints, package):
    """load_state_dict after packing replaces the views (the fused GEMM falls back to one per module)."""
    model = load(package, checkpoints["llama"])
    wrap = PACKAGES[package][2]
    ids = np.random.default_rng(3).integers(0, model.config.vocab_size, (1, 7))
    with torch.inference_mode():
        before = np.asarray(model(input_ids=wrap(ids)).logits).copy()
    state = {key: (value.copy() if isinstance(value, np.ndarray) else torch.nn.Parameter(value.clone(), requires_grad=False))
             for key, value in model.state_dict().items()}
    if package == "numpy":
        model.load_state_dict(state)
    else:
        model.load_state_dict(state, assign=True)
    with torch.inference_mode():
        after = np.asarray(model(input_ids=wrap(ids)).logits)
    np.testing.assert_allclose(after, before, rtol=0, atol=16 * np.finfo(np.float32).eps * np.abs(before).max())


def test_torch_pack_leaves_a_model_off_the_cpu_alone():
    from torch_impl.models.packing import pack_parameters

    model = torch.nn.Linear(4, 3, device="meta")
    assert pack_parameters(model) is None
    assert model.weight.device.type == "meta"
