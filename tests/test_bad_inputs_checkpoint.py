"""Bad checkpoints and interrupted writes: each gives a CheckpointError naming the thing and the fix,
and no failure, however it happens, loses the previous good checkpoint.

Bit comparisons only (`np.array_equal` on the raw values): a checkpoint that survived a failed
write must be the very same bytes, so no tolerance applies in this file.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import minivl.checkpoint
from minivl.checkpoint import (INDEX_FILE, SINGLE_FILE, check_state_dict, check_weights, load_state_dict,
                               read_safetensors, save_checkpoint, write_safetensors)
from minivl.errors import CheckpointError
from minivl.loading import load_model
from minivl.staging import make_staging_dir, sweep_stale
from minivl.tiny.llm import write_tiny_llm
from torch_impl import checkpoint as torch_checkpoint
from torch_impl.loading import load_model as torch_load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def good_checkpoint(directory):
    tensors = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float16)}
    save_checkpoint(directory, {"model_type": "llama", "note": "old"}, tensors)
    return tensors


def assert_still_the_old_checkpoint(directory, tensors):
    loaded = load_state_dict(directory)
    assert sorted(loaded) == sorted(tensors)
    for name, value in tensors.items():
        assert loaded[name].dtype == value.dtype and np.array_equal(loaded[name], value), name
    assert json.load(open(os.path.join(directory, "config.json")))["note"] == "old"
    assert not [f for f in os.listdir(directory) if ".staging." in f]


# ---------------------------------------------------------------------------------------- writing

@pytest.mark.parametrize("bad, fragment", [
    (np.array([1, "a"], dtype=object), "dtype object"),
    (np.ones(2, np.complex64), "dtype complex64"),
    (np.ones(2, np.uint32), "dtype uint32"),
    (torch.ones(2), "is a Tensor, not a NumPy array"),
    ([1.0, 2.0], "is a list, not a NumPy array"),
])
def test_a_bad_tensor_leaves_the_old_checkpoint_intact(tmp_path, bad, fragment):
    # issue #16, example 1: the old model.safetensors used to be deleted before the new tensors were checked
    old = good_checkpoint(tmp_path)
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(tmp_path, {"model_type": "llama", "note": "new"}, {"w": np.zeros(2, np.float32), "bad": bad})
    message = str(info.value)
    assert "'bad'" in message and fragment in message and "nothing was written" in message
    assert "cast it to one of" in message or "convert it with np.asarray" in message
    assert_still_the_old_checkpoint(tmp_path, old)


def test_every_bad_tensor_is_listed_at_once(tmp_path):
    with pytest.raises(CheckpointError) as info:
        write_safetensors(tmp_path / "x.safetensors", {"a": np.ones(1, np.complex128), "": np.ones(1),
                                                       "c": "text", "ok": np.ones(1)})
    message = str(info.value)
    assert "3 tensors cannot be saved" in message
    assert "'a' has dtype complex128" in message and "tensor name ''" in message and "'c' is a str" in message
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("value", [0, -1, True, 1.5, "1GB"])
def test_max_shard_bytes_must_be_a_positive_int(tmp_path, value):
    with pytest.raises(CheckpointError, match=r"max_shard_bytes must be a positive integer or None \(got "):
        save_checkpoint(tmp_path, None, {"w": np.ones(2, np.float32)}, max_shard_bytes=value)
    assert not os.listdir(tmp_path)


def test_failure_mid_write_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    old = good_checkpoint(tmp_path)
    real_save = minivl.checkpoint.save_file

    def write_half_then_fail(arrays, path, metadata=None):
        real_save(arrays, path, metadata=metadata)
        with open(path, "r+b") as f:  # a half-written file on disk, then the disk fills up
            f.truncate(os.path.getsize(path) // 2)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(minivl.checkpoint, "save_file", write_half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tmp_path, {"model_type": "llama", "note": "new"}, {"w": np.zeros((2, 3), np.float32)})
    assert_still_the_old_checkpoint(tmp_path, old)


def test_failure_between_shards_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    old = good_checkpoint(tmp_path)
    real_write = minivl.checkpoint.write_safetensors
    calls = []

    def second_shard_fails(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt("Ctrl-C between two shards")
        return real_write(path, *args, **kwargs)

    monkeypatch.setattr(minivl.checkpoint, "write_safetensors", second_shard_fails)
    new = {f"w{i}": np.full(64, i, np.float32) for i in range(3)}
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, {"model_type": "llama", "note": "new"}, new, max_shard_bytes=256)
    assert_still_the_old_checkpoint(tmp_path, old)


KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    sys.path.insert(0, {root!r})
    import minivl.checkpoint

    real_save = minivl.checkpoint.save_file

    def save_then_die(arrays, path, metadata=None):
        real_save(arrays, path, metadata=metadata)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 3)   # as if killed while the bytes were going out
        os.kill(os.getpid(), signal.SIGKILL)

    minivl.checkpoint.save_file = save_then_die
    minivl.checkpoint.save_checkpoint({directory!r}, {{"model_type": "llama", "note": "new"}},
                                      {{"w": np.zeros((2, 3), np.float32)}})
""")


def test_save_killed_with_sigkill_keeps_the_old_checkpoint_and_is_swept(tmp_path):
    old = good_checkpoint(tmp_path)
    script = KILLED_SAVE.format(root=ROOT, directory=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr
    left = [f for f in os.listdir(tmp_path) if ".staging." in f]
    assert len(left) == 1  # the killed writer could not clean up ...
    loaded = load_state_dict(tmp_path)  # ... but the old checkpoint loads, unchanged
    assert all(np.array_equal(loaded[name], value) for name, value in old.items())
    assert json.load(open(tmp_path / "config.json"))["note"] == "old"
    # the next save sweeps the dead writer's staging directory
    save_checkpoint(tmp_path, {"model_type": "llama", "note": "newer"}, {"w": np.ones(2, np.float32)})
    assert sorted(os.listdir(tmp_path)) == ["config.json", SINGLE_FILE]


def test_a_live_writers_staging_directory_is_not_swept(tmp_path):
    mine = make_staging_dir(tmp_path, "checkpoint")  # this process is alive
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout.strip()
    dead = tmp_path / f".checkpoint.staging.{dead_pid}.abc123"
    dead.mkdir()
    assert sweep_stale(tmp_path) == [dead]
    assert mine.is_dir() and not dead.exists()


def test_resaving_shards_over_a_single_file_leaves_one_consistent_checkpoint(tmp_path):
    good_checkpoint(tmp_path)
    new = {f"w{i}": np.full(64, i, np.float32) for i in range(3)}
    save_checkpoint(tmp_path, None, new, max_shard_bytes=256)
    assert SINGLE_FILE not in os.listdir(tmp_path) and INDEX_FILE in os.listdir(tmp_path)
    assert sorted(load_state_dict(tmp_path)) == ["w0", "w1", "w2"]


# ---------------------------------------------------------------------------------------- reading

def raw_file(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


def test_overlapping_tensors_are_refused_by_name(tmp_path):
    # issue #16, example 3: two tensors sharing bytes used to load silently
    path = tmp_path / "model.safetensors"
    path.write_bytes(raw_file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                               "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)))
    with pytest.raises(CheckpointError) as info:
        read_safetensors(path)
    message = str(info.value)
    assert "'a' [0, 8] and 'b' [0, 8] overlap in the data block" in message and str(path) in message
    assert "re-download or re-convert" in message
    with pytest.raises(CheckpointError, match="overlap in the data block"):
        torch_checkpoint.load_state_dict(tmp_path)


def test_a_gap_in_the_data_block_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(raw_file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                               "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}, bytes(12)))
    with pytest.raises(CheckpointError, match=r"invalid offset for tensor `b`.*re-download or re-convert"):
        read_safetensors(path)


def sharded(tmp_path):
    save_checkpoint(tmp_path, None, {f"w{i}": np.full((64,), i, np.float32) for i in range(3)}, max_shard_bytes=256)
    return tmp_path / INDEX_FILE, json.load(open(tmp_path / INDEX_FILE))


def test_index_naming_the_wrong_shard(tmp_path):
    index_path, index = sharded(tmp_path)
    index["weight_map"]["w1"] = "model-00001-of-00003.safetensors"
    index["weight_map"]["w0"] = "model-00002-of-00003.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"2 tensors are not in the shard the index names \(w0 \(index: "
                                              r"model-00002-of-00003.safetensors, found in model-00001"):
        load_state_dict(tmp_path)
    index["weight_map"]["w1"] = "model-00002-of-00003.safetensors"   # shard 1 no longer listed: w0 is nowhere
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"1 tensors listed in the index are in no shard \(w0\); re-download"):
        load_state_dict(tmp_path)


def test_a_tensor_in_two_shards(tmp_path):
    index_path, index = sharded(tmp_path)
    write_safetensors(tmp_path / "model-00002-of-00003.safetensors", {"w0": np.zeros(64, np.float32),
                                                                      "w1": np.ones(64, np.float32)})
    with pytest.raises(CheckpointError, match=r"1 tensors are in more than one shard \(w0 \(model-00001-of-00003"
                                              r".safetensors, model-00002-of-00003.safetensors\)\), so which one"):
        load_state_dict(tmp_path)


def test_a_pickle_file_path_is_refused(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"\x80\x02")
    with pytest.raises(CheckpointError, match="arbitrary code.*safetensors.torch import save_file"):
        torch_checkpoint.load_state_dict(tmp_path / "model.pt")


def test_reading_maps_and_does_not_copy(tmp_path, rng):
    import ml_dtypes

    written = {"a": np.arange(4, dtype=np.float32), "b": np.ones(2), "c": np.array(1.5, ml_dtypes.bfloat16),
               "d": rng.standard_normal((3, 5)).astype(ml_dtypes.bfloat16), "e": np.zeros((0, 2), np.int8)}
    write_safetensors(tmp_path / "x.safetensors", written)
    mapped = read_safetensors(tmp_path / "x.safetensors")
    assert mapped.shapes == {"a": (4,), "b": (2,), "c": (), "d": (3, 5), "e": (0, 2)}
    assert not mapped["a"].flags.owndata and not mapped["a"].flags.writeable   # a view into the map
    # the mapped views hold exactly the bits the package's own NumPy reader returns
    copied = read_safetensors(tmp_path / "x.safetensors", mmap=False)
    for name, value in written.items():
        assert copied[name].dtype == mapped[name].dtype == value.dtype, name
        assert copied[name].shape == mapped[name].shape == value.shape, name
        assert mapped[name].tobytes() == copied[name].tobytes() == value.tobytes(), name


# ---------------------------------------------------------------------------------------- model weights

@pytest.fixture
def tiny_llama(tmp_path):
    return write_tiny_llm(tmp_path / "llama", "llama")


def rewrite(directory, **changes):
    tensors = dict(load_state_dict(directory))
    tensors.update(changes)
    save_checkpoint(directory, None, tensors)


@pytest.mark.parametrize("loader", [load_model, torch_load_model], ids=["numpy", "torch"])
@pytest.mark.parametrize("dtype", [np.int32, np.bool_, np.int64, np.uint8])
def test_integer_or_bool_weights_are_not_cast_silently(tiny_llama, loader, dtype):
    # issue #16, example 3: an int32 or bool weight used to be cast to float32 without a word
    norm = load_state_dict(tiny_llama)["model.norm.weight"]
    rewrite(tiny_llama, **{"model.norm.weight": np.ones(norm.shape, dtype)})
    with pytest.raises(CheckpointError) as info:
        loader(tiny_llama)
    message = str(info.value)
    kind = "bool" if dtype is np.bool_ else np.dtype(dtype).name
    assert f"1 weight tensors are not floating point: model.norm.weight ({kind}" in message \
        or f"1 weight tensors are not floating point: model.norm.weight (torch.{kind}" in message
    assert "check that the file is this model's weights" in message and "re-download or re-convert" in message
    with pytest.raises(CheckpointError, match="not floating point"):  # no opt-out for these
        loader(tiny_llama, allow_nonfinite=True)


@pytest.mark.parametrize("loader", [load_model, torch_load_model], ids=["numpy", "torch"])
@pytest.mark.parametrize("bad_value, counts", [(np.nan, "1 NaN, 0 inf"), (np.inf, "0 NaN, 1 inf"),
                                               (-np.inf, "0 NaN, 1 inf")])
def test_nonfinite_weights_are_named(tiny_llama, loader, bad_value, counts):
    # issue #16, example 2: NaN weights used to give all-NaN logits and greedy token 0 with exit code 0
    norm = np.array(load_state_dict(tiny_llama)["model.norm.weight"])
    norm[1] = bad_value
    rewrite(tiny_llama, **{"model.norm.weight": norm})
    with pytest.raises(CheckpointError) as info:
        loader(tiny_llama)
    message = str(info.value)
    assert f"1 weight tensors are not finite: model.norm.weight ({counts} of {norm.size})" in message
    assert "re-download or re-convert" in message and "allow_nonfinite=True" in message
    model = loader(tiny_llama, allow_nonfinite=True)  # the explicit opt-out loads it as it is
    assert model.config.model_type == "llama"


def test_check_weights_covers_bf16_torch_and_lists_everything_at_once():
    import ml_dtypes

    tensors = {"a": np.array([1, np.nan], dtype=ml_dtypes.bfloat16), "b": torch.tensor([float("inf"), 1.0]),
               "ids": np.array([1, 2], np.int64), "mask": torch.ones(2, dtype=torch.bool), "ok": np.ones(2, np.float32)}
    with pytest.raises(CheckpointError) as info:
        check_weights(tensors, where="ckpt")
    message = str(info.value)
    assert message.startswith("ckpt: 2 weight tensors are not floating point: ids (int64), mask (torch.bool)")
    assert "2 weight tensors are not finite: a (1 NaN, 0 inf of 2), b (0 NaN, 1 inf of 2)" in message
    check_weights({"a": tensors["a"], "ok": tensors["ok"]}, allow_nonfinite=True)  # the opt-out


@pytest.mark.parametrize("path", [None, 3, ["dir"]])
@pytest.mark.parametrize("loader", [load_model, torch_load_model], ids=["numpy", "torch"])
def test_load_model_of_a_non_path(loader, path):
    with pytest.raises(CheckpointError, match=r"the checkpoint path must be a directory path .*got "
                                              r".* of type .*pass the directory holding config.json"):
        loader(path)


def test_written_files_get_the_usual_mode_not_0600(tmp_path):
    # the safetensors package creates its files with mode 0600, which would lock other users out of a shared cache
    (tmp_path / "probe").write_text("x")
    usual = os.stat(tmp_path / "probe").st_mode & 0o777
    write_safetensors(tmp_path / "x.safetensors", {"a": np.ones(2, np.float32)})
    save_checkpoint(tmp_path / "ckpt", {"model_type": "llama"}, {"a": np.ones(2, np.float32)})
    assert os.stat(tmp_path / "x.safetensors").st_mode & 0o777 == usual
    assert os.stat(tmp_path / "ckpt" / SINGLE_FILE).st_mode & 0o777 == usual
