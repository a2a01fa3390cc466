"""minivl.checkpoint: our safetensors reader/writer is bit-exact against the `safetensors` package
in both directions, checkpoint directories (single and sharded) load, and every broken file or
mismatched state dict raises CheckpointError naming the file and the fix.

Comparisons are on raw bits (`.view(uint)`), never on values: a checkpoint round trip must not
change one bit, NaN payloads and -0.0 included, so no tolerance applies anywhere in this file.
"""
import json
import os

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as st_numpy_load
from safetensors.numpy import save_file as st_numpy_save
from safetensors.torch import load_file as st_torch_load
from safetensors.torch import save_file as st_torch_save

from minivl.checkpoint import (INDEX_FILE, SINGLE_FILE, check_state_dict, load_state_dict, read_safetensors,
                               save_checkpoint, write_safetensors)
from minivl.config import InternLM2Config, Qwen2Config, load_config
from minivl.errors import CheckpointError
from torch_impl import checkpoint as torch_checkpoint

BITS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def bits(array) -> np.ndarray:
    """The raw bit patterns of an array (NumPy or torch), for exact comparison."""
    if isinstance(array, torch.Tensor):
        array = torch_checkpoint.to_numpy(array)
    array = np.ascontiguousarray(array)
    return array.view(BITS[array.dtype.itemsize]) if array.dtype != np.bool_ else array.view(np.uint8)


def assert_same_bits(actual: dict, expected: dict):
    assert sorted(actual) == sorted(expected)
    for name in expected:
        a, e = actual[name], expected[name]
        assert tuple(a.shape) == tuple(e.shape), name
        assert np.array_equal(bits(a), bits(e)), f"{name}: bits differ"


def every_dtype(rng) -> dict:
    """One tensor per supported dtype, with awkward shapes (0-d, empty, odd sizes) and special floats."""
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-40, 65504.0, -1.5], dtype=np.float64)
    tensors = {
        "f64": np.concatenate([special, rng.standard_normal(9)]).reshape(17, 1),
        "f32": rng.standard_normal((3, 5, 7)).astype(np.float32),
        "f16": np.concatenate([special, rng.standard_normal(5)]).astype(np.float16),
        "bf16": np.concatenate([special, rng.standard_normal(25)]).astype(ml_dtypes.bfloat16).reshape(3, 11),
        "i64": rng.integers(-2**62, 2**62, size=(4,), dtype=np.int64),
        "i32": rng.integers(-2**31, 2**31 - 1, size=(2, 3), dtype=np.int32),
        "i16": rng.integers(-2**15, 2**15 - 1, size=(5,), dtype=np.int16),
        "i8": rng.integers(-128, 127, size=(3,), dtype=np.int8),
        "u8": rng.integers(0, 255, size=(1, 1, 3), dtype=np.uint8),
        "bool": rng.random((2, 3)) > 0.5,
        "scalar": np.array(3.25, dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.float16),
    }
    return tensors


# ----------------------------------------------------------------------------------------------
# one file, against the safetensors package
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mmap", [True, False])
def test_round_trip_every_dtype(rng, tmp_path, mmap):
    tensors = every_dtype(rng)
    path = write_safetensors(tmp_path / "x.safetensors", tensors, metadata={"format": "pt", "note": "hi"})
    loaded, metadata = read_safetensors(path, mmap=mmap, with_metadata=True)
    assert_same_bits(loaded, tensors)
    assert metadata == {"format": "pt", "note": "hi"}
    assert loaded["bf16"].dtype == ml_dtypes.bfloat16


def test_our_files_load_in_safetensors(rng, tmp_path):
    tensors = every_dtype(rng)
    path = write_safetensors(tmp_path / "x.safetensors", tensors)
    # safetensors.torch reads every dtype, bf16 included
    assert_same_bits(st_torch_load(path), tensors)
    # safetensors.numpy reads all but bf16 (NumPy has no bf16 of its own)
    no_bf16 = {k: v for k, v in tensors.items() if k != "bf16"}
    path = write_safetensors(tmp_path / "y.safetensors", no_bf16)
    assert_same_bits(st_numpy_load(path), no_bf16)


def test_safetensors_files_load_in_ours(rng, tmp_path):
    generator = torch.Generator().manual_seed(0)
    torch_tensors = {
        "bf16": torch.randn(7, 3, generator=generator).to(torch.bfloat16),
        "f16": torch.randn(5, generator=generator).to(torch.float16),
        "f32": torch.randn(2, 2, 2, generator=generator),
        "f64": torch.randn(3, generator=generator, dtype=torch.float64),
        "i64": torch.arange(-3, 4),
        "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(1.5, dtype=torch.bfloat16),
    }
    path = str(tmp_path / "t.safetensors")
    st_torch_save(torch_tensors, path, metadata={"format": "pt"})
    assert_same_bits(read_safetensors(path), torch_tensors)
    numpy_tensors = {k: v for k, v in every_dtype(rng).items() if k != "bf16"}
    path = str(tmp_path / "n.safetensors")
    st_numpy_save(numpy_tensors, path)
    assert_same_bits(read_safetensors(path), numpy_tensors)


def test_writer_aligns_data_and_accepts_big_endian(tmp_path):
    tensors = {"odd_f16": np.ones(3, np.float16), "f64": np.arange(3, dtype=">f8"), "i8": np.ones(5, np.int8)}
    path = write_safetensors(tmp_path / "x.safetensors", tensors)
    raw = open(path, "rb").read()
    header_len = int.from_bytes(raw[:8], "little")
    assert (8 + header_len) % 8 == 0
    header = json.loads(raw[8:8 + header_len])
    for name, entry in header.items():
        # each tensor starts at a multiple of its itemsize, as the safetensors package lays them out
        assert entry["data_offsets"][0] % tensors[name].dtype.itemsize == 0, name
    assert header["f64"]["dtype"] == "F64"
    np.testing.assert_array_equal(read_safetensors(path)["f64"], [0.0, 1.0, 2.0])


def test_writer_refuses_what_safetensors_cannot_hold(tmp_path):
    with pytest.raises(CheckpointError, match="dtype complex64"):
        write_safetensors(tmp_path / "x.safetensors", {"c": np.ones(2, np.complex64)})
    with pytest.raises(CheckpointError, match="not a NumPy array"):
        write_safetensors(tmp_path / "x.safetensors", {"t": torch.ones(2)})
    with pytest.raises(CheckpointError, match="metadata must map strings to strings"):
        write_safetensors(tmp_path / "x.safetensors", {}, metadata={"n": 1})
    assert not os.path.exists(tmp_path / "x.safetensors")


# ----------------------------------------------------------------------------------------------
# broken files: each names the file and the fix
# ----------------------------------------------------------------------------------------------

def good_file_bytes(tmp_path) -> bytes:
    path = write_safetensors(tmp_path / "good.safetensors", {"w": np.arange(4, dtype=np.float32)})
    return open(path, "rb").read()


def with_header(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data


# the fragment is the safetensors package's own diagnosis, which minivl wraps with the file and the fix
CORRUPT = {
    "shorter than 8 bytes": (lambda good: good[:5], "header too small"),
    "header length past the end": (lambda good: (10**6).to_bytes(8, "little") + good[8:], "invalid header length"),
    "cut inside the header": (lambda good: good[:20], "invalid header length"),
    "bad JSON": (lambda good: (5).to_bytes(8, "little") + b"{oops", "invalid JSON in header"),
    "header not an object": (lambda good: with_header([1, 2]), "invalid JSON in header: invalid type: sequence"),
    "cut inside the data": (lambda good: good[:-4], "file not fully covered"),
    "offsets past the data": (lambda good: with_header(
        {"w": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, bytes(16)), "invalid offset for tensor `w`"),
    "size disagrees with shape": (lambda good: with_header(
        {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, bytes(16)),
        "invalid shape, data type, or offset"),
    "unknown dtype": (lambda good: with_header(
        {"w": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}}, bytes(4)), "dtype 'F8_E4M3'"),
    "entry without shape": (lambda good: with_header(
        {"w": {"dtype": "F32", "data_offsets": [0, 4]}}, bytes(4)), "missing field `shape`"),
    "negative size": (lambda good: with_header(
        {"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, bytes(4)), "invalid value: integer `-1`"),
    "tensors overlap": (lambda good: with_header(
        {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
         "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12)),
        "tensors 'a' [0, 8] and 'b' [4, 12] overlap in the data block"),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupt_file_raises_checkpoint_error(case, tmp_path):
    make, fragment = CORRUPT[case]
    path = tmp_path / "model.safetensors"
    path.write_bytes(make(good_file_bytes(tmp_path)))
    with pytest.raises(CheckpointError) as info:
        read_safetensors(path)
    message = str(info.value)
    assert fragment in message
    assert str(path) in message and "re-download or re-convert" in message
    with pytest.raises(CheckpointError):   # the directory loader reports it the same way
        load_state_dict(tmp_path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such safetensors file"):
        read_safetensors(tmp_path / "nope.safetensors")


# ----------------------------------------------------------------------------------------------
# checkpoint directories
# ----------------------------------------------------------------------------------------------

def small_config():
    return InternLM2Config(hidden_size=8, num_attention_heads=2, num_hidden_layers=1, vocab_size=16)


def test_single_file_checkpoint(rng, tmp_path):
    tensors = every_dtype(rng)
    save_checkpoint(tmp_path, small_config(), tensors)
    assert sorted(os.listdir(tmp_path)) == ["config.json", SINGLE_FILE]
    assert_same_bits(load_state_dict(tmp_path), tensors)
    assert_same_bits(load_state_dict(tmp_path / SINGLE_FILE), tensors)
    assert load_config(tmp_path) == small_config()
    # transformers refuses safetensors files without format metadata
    assert read_safetensors(tmp_path / SINGLE_FILE, with_metadata=True)[1] == {"format": "pt"}


def test_sharded_checkpoint(rng, tmp_path):
    tensors = {f"layers.{i}.w": rng.standard_normal((16, 16)).astype(np.float32) for i in range(5)}  # 1 KiB each
    tensors["big"] = rng.standard_normal((40, 16)).astype(np.float32)   # 2.5 KiB: over the limit, sits alone
    save_checkpoint(tmp_path, {"model_type": "internlm2", "hidden_size": 8, "num_attention_heads": 2},
                    tensors, max_shard_bytes=2048)
    index = json.load(open(tmp_path / INDEX_FILE))
    shards = sorted(set(index["weight_map"].values()))
    # sorted names: big | layers.0 layers.1 | layers.2 layers.3 | layers.4
    assert shards == [f"model-0000{k}-of-00004.safetensors" for k in range(1, 5)]
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    assert not os.path.exists(tmp_path / SINGLE_FILE)
    assert_same_bits(load_state_dict(tmp_path), tensors)
    # shards load in the safetensors package too
    merged = {}
    for shard in shards:
        merged.update(st_numpy_load(str(tmp_path / shard)))
    assert_same_bits(merged, tensors)
    # saving again unsharded removes the shards, so old and new files never mix
    save_checkpoint(tmp_path, None, {"x": np.ones(2, np.float32)})
    assert sorted(os.listdir(tmp_path)) == ["config.json", SINGLE_FILE]


def test_sharded_checkpoint_with_problems(rng, tmp_path):
    tensors = {f"w{i}": np.full((64,), i, np.float32) for i in range(3)}
    save_checkpoint(tmp_path, None, tensors, max_shard_bytes=256)
    index_path = tmp_path / INDEX_FILE
    index = json.load(open(index_path))
    index["weight_map"]["ghost"] = "model-00001-of-00003.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="1 tensors listed in the index are in no shard \\(ghost\\)"):
        load_state_dict(tmp_path)
    os.remove(tmp_path / "model-00002-of-00003.safetensors")
    with pytest.raises(CheckpointError, match="lists shard 'model-00002-of-00003.safetensors', which is missing"):
        load_state_dict(tmp_path)
    index_path.write_text("{not json")
    with pytest.raises(CheckpointError, match="model.safetensors.index.json: not valid JSON"):
        load_state_dict(tmp_path)
    index_path.write_text('{"weights": {}}')
    with pytest.raises(CheckpointError, match="needs a 'weight_map' object"):
        load_state_dict(tmp_path)


def test_pickle_checkpoints_are_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02not really a pickle")
    with pytest.raises(CheckpointError) as info:
        load_state_dict(tmp_path)
    message = str(info.value)
    assert "pytorch_model.bin" in message and "arbitrary code" in message
    assert "safetensors.torch import save_file" in message
    with pytest.raises(CheckpointError, match="arbitrary code"):
        load_state_dict(tmp_path / "pytorch_model.bin")


def test_empty_or_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no model.safetensors and no model.safetensors.index.json"):
        load_state_dict(tmp_path)
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        load_state_dict(tmp_path / "absent")
    with pytest.raises(CheckpointError, match="max_shard_bytes must be a positive integer"):
        save_checkpoint(tmp_path, None, {}, max_shard_bytes=0)


# ----------------------------------------------------------------------------------------------
# check_state_dict
# ----------------------------------------------------------------------------------------------

def test_check_state_dict_lists_every_problem_at_once():
    expected = {"a": (2, 3), "b": (4,), "c": (1,), "d": (5, 5)}
    tensors = {"a": np.zeros((3, 2)), "b": np.zeros(4), "x": np.zeros(1), "y": torch.zeros(1), "d": torch.zeros(5, 5)}
    with pytest.raises(CheckpointError) as info:
        check_state_dict(tensors, expected, where="ckpt/")
    message = str(info.value)
    assert message.startswith("ckpt/: the checkpoint does not fit the model: 1 missing, 2 unexpected, "
                              "1 with the wrong shape tensors")
    assert "missing 1: c" in message
    assert "unexpected 2: x, y" in message
    assert "wrong shape 1: a (checkpoint (3, 2), model (2, 3))" in message
    check_state_dict({"a": np.zeros((2, 3))}, {"a": (2, 3)})   # a fit raises nothing


def test_check_state_dict_caps_long_lists():
    expected = {f"layers.{i}.w": (1,) for i in range(50)}
    with pytest.raises(CheckpointError) as info:
        check_state_dict({}, expected)
    message = str(info.value)
    assert "missing 50: " in message and "... and 30 more" in message
    assert message.count("layers.") == 20


# ----------------------------------------------------------------------------------------------
# torch_impl.checkpoint
# ----------------------------------------------------------------------------------------------

def test_torch_load_state_dict_is_bit_exact(rng, tmp_path):
    tensors = every_dtype(rng)
    save_checkpoint(tmp_path, None, tensors, max_shard_bytes=64)
    loaded = torch_checkpoint.load_state_dict(tmp_path)
    assert loaded["bf16"].dtype == torch.bfloat16 and loaded["bool"].dtype == torch.bool
    assert_same_bits(loaded, tensors)
    # and the same bits as the safetensors package gives for the same shards
    reference = {}
    for shard in set(json.load(open(tmp_path / INDEX_FILE))["weight_map"].values()):
        reference.update(st_torch_load(str(tmp_path / shard)))
    assert_same_bits(loaded, reference)


def test_torch_load_state_dict_casts_floats_only(rng, tmp_path):
    tensors = every_dtype(rng)
    save_checkpoint(tmp_path, None, tensors)
    loaded = torch_checkpoint.load_state_dict(tmp_path, dtype="float32", device="cpu")
    assert loaded["bf16"].dtype == torch.float32 and loaded["i64"].dtype == torch.int64
    # bf16 -> float32 is exact (bf16 is the top half of a float32), so compare bits after the upcast
    assert np.array_equal(bits(loaded["bf16"]), bits(tensors["bf16"].astype(np.float32)))
    assert torch_checkpoint.load_state_dict(tmp_path, dtype=torch.float16)["f32"].dtype == torch.float16
    with pytest.raises(CheckpointError, match="dtype must be None"):
        torch_checkpoint.load_state_dict(tmp_path, dtype="half")


def test_torch_save_checkpoint_round_trips_bf16(tmp_path):
    generator = torch.Generator().manual_seed(1)
    tensors = {"w": torch.randn(4, 4, generator=generator).to(torch.bfloat16), "n": torch.arange(3)}
    torch_checkpoint.save_checkpoint(tmp_path, small_config(), tensors)
    assert_same_bits(st_torch_load(str(tmp_path / SINGLE_FILE)), tensors)
    assert_same_bits(torch_checkpoint.load_state_dict(tmp_path), tensors)


def test_our_checkpoint_loads_in_transformers(tmp_path):
    # independent reference: transformers reads the config.json and safetensors that minivl writes
    transformers = pytest.importorskip("transformers")
    config = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=50, rope_theta=1e6, architectures=["Qwen2ForCausalLM"])
    hf_config = transformers.Qwen2Config(**{k: v for k, v in config.to_dict().items() if k != "model_type"})
    torch.manual_seed(0)
    weights = transformers.Qwen2ForCausalLM(hf_config).to(torch.bfloat16).state_dict()
    torch_checkpoint.save_checkpoint(tmp_path, config, weights)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert model.config.rope_parameters["rope_theta"] == 1e6 and model.config.num_key_value_heads == 2
    reloaded, ours = model.state_dict(), torch_checkpoint.load_state_dict(tmp_path)
    assert sorted(reloaded) == sorted(ours)
    for name in ours:
        assert torch.equal(reloaded[name], ours[name]), name   # bit-exact bf16: no tolerance
    # and the other way: what transformers' save_pretrained writes loads here (config and weights)
    model.save_pretrained(tmp_path / "hf")
    hf_written = load_config(tmp_path / "hf")
    assert type(hf_written) is Qwen2Config and hf_written.rope_theta == 1e6
    assert hf_written.num_key_value_heads == 2 and hf_written.head_dim == 8
    assert_same_bits(torch_checkpoint.load_state_dict(tmp_path / "hf"), reloaded)
