"""Model inputs in both packages: each bad input is a ShapeError (or CheckpointError) that names the
thing, its value and the fix, raised before any arithmetic, never an IndexError from deep inside."""
import numpy as np
import pytest
import torch

import minivl
import torch_impl.loading
from minivl.errors import CheckpointError, ShapeError
from minivl.tiny.internvl import write_tiny_internvl
from minivl.tiny.llm import write_tiny_llm


@pytest.fixture(scope="module")
def directories(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"llama": write_tiny_llm(root / "llama", "llama"), "mpt": write_tiny_llm(root / "mpt", "mpt_learned"),
            "internvl": write_tiny_internvl(root / "internvl", llm="qwen2", vision="300m", seed=1)}


@pytest.fixture(scope="module")
def models(directories):
    return {(name, backend): (minivl.load_model(path) if backend == "numpy" else torch_impl.loading.load_model(path))
            for name, path in directories.items() for backend in ("numpy", "torch")}


def as_backend(array, backend):
    return torch.from_numpy(np.asarray(array)) if backend == "torch" and isinstance(array, np.ndarray) else array


BACKENDS = ["numpy", "torch"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("input_ids, fragment", [
    (np.array([[1.0, 2.0]]), "input_ids must be integer token ids (got dtype "),
    (np.array([[1.5, 2.5]], np.float32), "cast whole-number ids with .astype(np.int64) (torch: .long())"),
    (np.array([[True, False]]), "input_ids must be integer token ids (got dtype "),
    (np.zeros((1, 0), np.int64), "forward: the input is empty (shape (1, 0)); pass at least one sequence"),
    (np.zeros((0, 3), np.int64), "forward: the input is empty (shape (0, 3))"),
    ([[1, 2, 3], [4, 5]], "input_ids rows have different lengths (ragged); pad them to one length on the LEFT"),
    (np.array([1, 2, 3]), "input_ids must be 2-D [batch, seq] (got shape (3,)); add a batch axis with ids[None]"),
])
def test_bad_token_ids_in_forward(models, backend, input_ids, fragment):
    # issue #16, example 5: float ids were an IndexError, an empty sequence a ValueError inside the softmax
    model = models[("llama", backend)]
    with pytest.raises(ShapeError) as info:
        model.forward(input_ids=as_backend(input_ids, backend))
    assert fragment in str(info.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_inputs_embeds_in_forward(models, backend):
    model = models[("llama", backend)]
    embeds = as_backend(np.zeros((1, 0, model.config.hidden_size), np.float32), backend)
    with pytest.raises(ShapeError, match=r"forward: the input is empty \(shape \(1, 0, \d+\)\)"):
        model.forward(inputs_embeds=embeds)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("positions, shown", [([[0, 10_000]], "[10000]"), ([[-1, 0]], "[-1]"),
                                              ([[64, 65]], "[64, 65]")])
def test_mpt_positions_out_of_range_name_the_values(models, backend, positions, shown):
    # issue #16, example 8: MPT position ids out of range reported the shape, not the values
    model = models[("mpt", backend)]
    position_ids = as_backend(np.array(positions), backend)
    with pytest.raises(ShapeError) as info:
        model.forward(input_ids=as_backend(np.array([[1, 2]]), backend), position_ids=position_ids)
    message = str(info.value)
    assert f"outside the learned position table [0, 64) (e.g. {shown})" in message
    assert "max_seq_len = 64 rows: keep prompt + new tokens within 64" in message


@pytest.mark.parametrize("backend", BACKENDS)
def test_mpt_position_shape_is_still_named(models, backend):
    model = models[("mpt", backend)]
    with pytest.raises(ShapeError, match=r"position_ids must be \[batch, seq\] = \[1, 2\] \(got shape \(1, 3\)\)"):
        model.forward(input_ids=as_backend(np.array([[1, 2]]), backend),
                      position_ids=as_backend(np.array([[0, 1, 2]]), backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape, got", [((1, 3, 112, 112), "got 112×112-px tiles (shape (1, 3, 112, 112))"),
                                        ((2, 3, 28, 28), "got 28×28-px tiles"),
                                        ((1, 3, 56, 0), "got 56×0-px tiles"),
                                        ((3, 56, 56), "got shape (3, 56, 56)")])
def test_tiles_of_the_wrong_size_name_the_size(models, directories, backend, shape, got):
    # issue #16, example 8: a 112-px tile for a 56-px model blamed the <IMG_CONTEXT> count ("4 tiles × 4")
    from minivl.tokenizer import Tokenizer

    model = models[("internvl", backend)]
    tokenizer = Tokenizer.from_file(directories["internvl"])
    pixel_values = as_backend(np.zeros(shape, np.float32), backend)
    with pytest.raises(ShapeError) as info:
        model.chat(tokenizer, pixel_values, "what is this?", dict(max_new_tokens=2))
    message = str(info.value)
    assert "pixel_values must be [n_tiles, 3, 56, 56]: this model's tiles are 56 px" in message and got in message
    assert "load_image(path, image_size=56)" in message and "IMG_CONTEXT" not in message


@pytest.mark.parametrize("load", [minivl.load_model, torch_impl.loading.load_model], ids=BACKENDS)
@pytest.mark.parametrize("path", [None, 0, b"dir"])
def test_load_model_needs_a_path(load, path):
    # issue #16, example 5: load_model(None) was a TypeError from os.fspath
    with pytest.raises(CheckpointError, match=r"the checkpoint path must be a directory path \(str or os.PathLike\)"):
        load(path)
