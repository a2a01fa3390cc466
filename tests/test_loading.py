"""load_model in both packages: layouts (single, shards, nested language_model), dtypes, tied heads, errors."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import minivl
import torch_impl
from _decoder_util import assert_parity, internvl_like_checkpoint
from minivl.checkpoint import load_state_dict, save_checkpoint
from minivl.errors import CheckpointError, ConfigError
from minivl.loading import plan_load
from minivl.tiny.llm import tiny_llm_config, write_tiny_llm

IDS = np.arange(3, 14)[None]


@pytest.fixture(scope="module")
def qwen2_path(tmp_path_factory):
    return write_tiny_llm(tmp_path_factory.mktemp("load") / "qwen2", "qwen2")


def test_sharded_checkpoint_equals_single_file(tmp_path, qwen2_path):
    sharded = write_tiny_llm(tmp_path / "sharded", "qwen2", max_shard_bytes=20_000)
    assert os.path.isfile(os.path.join(sharded, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(sharded) if f.endswith(".safetensors")]) > 2
    single = minivl.load_model(qwen2_path)(IDS).logits
    np.testing.assert_array_equal(minivl.load_model(sharded)(IDS).logits, single)
    torch.testing.assert_close(torch_impl.load_model(sharded)(torch.tensor(IDS)).logits,
                               torch_impl.load_model(qwen2_path)(torch.tensor(IDS)).logits, rtol=0, atol=0)


@pytest.mark.parametrize("stored", ["bfloat16", "float16"])
def test_half_precision_checkpoints_upcast_exactly_in_numpy(tmp_path, stored):
    path = write_tiny_llm(tmp_path / stored, "internlm2", dtype=stored)
    raw = load_state_dict(path)["model.tok_embeddings.weight"]
    assert str(raw.dtype) == stored  # read as ml_dtypes bfloat16 / float16, no torch involved
    ours = minivl.load_model(path, dtype="float64")
    theirs = torch_impl.load_model(path, dtype="float64")
    # bf16/fp16 -> float64 is exact, so both packages hold identical weights
    np.testing.assert_array_equal(ours.model.tok_embeddings.weight, theirs.model.tok_embeddings.weight.numpy())
    assert_parity(ours(IDS).logits, theirs(torch.tensor(IDS)).logits, "float64")
    assert torch_impl.load_model(path, dtype=stored).model.norm.weight.dtype == getattr(torch, stored)


def test_language_model_nested_in_an_internvl_checkpoint_loads_alone(tmp_path, qwen2_path):
    nested = internvl_like_checkpoint(tmp_path / "internvl", qwen2_path)
    ours = minivl.load_model(qwen2_path)
    inner = minivl.loading.load_model(nested, component="language_model")
    assert type(inner).__name__ == "Qwen2ForCausalLM"
    np.testing.assert_array_equal(inner(IDS).logits, ours(IDS).logits)
    inner_torch = torch_impl.loading.load_model(nested, component="language_model")
    torch.testing.assert_close(inner_torch(torch.tensor(IDS)).logits,
                               torch_impl.load_model(qwen2_path)(torch.tensor(IDS)).logits, rtol=0, atol=0)
    # while the chat model class is absent, a plain load falls back to the LLM with the prefix stripped
    registry = {"internvl_chat": "minivl.models.not_written_yet:InternVLChatModel",
                "qwen2": "minivl.models.qwen2:Qwen2ForCausalLM"}
    config, cls, prefix = plan_load(nested, None, registry)
    assert (cls.__name__, prefix, config.model_type) == ("Qwen2ForCausalLM", "language_model.", "qwen2")
    with pytest.raises(ConfigError, match="component='language_model' needs an InternVL"):
        minivl.loading.load_model(qwen2_path, component="language_model")
    with pytest.raises(ConfigError, match="component"):
        minivl.loading.load_model(qwen2_path, component="vision")


def test_every_bad_tensor_is_reported_at_once(tmp_path, qwen2_path):
    tensors = {k: np.asarray(v) for k, v in load_state_dict(qwen2_path).items()}
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.self_attn.o_proj.bias"] = np.zeros(96, np.float32)  # Qwen2's o_proj has none
    tensors["model.norm.weight"] = np.ones(95, np.float32)
    with open(os.path.join(qwen2_path, "config.json")) as f:
        config = json.load(f)
    broken = save_checkpoint(tmp_path / "broken", config, tensors)
    for load in (minivl.load_model, torch_impl.load_model):
        with pytest.raises(CheckpointError) as info:
            load(broken)
        message = str(info.value)
        for name in ("model.layers.1.mlp.up_proj.weight", "model.layers.0.self_attn.o_proj.bias", "model.norm.weight"):
            assert name in message
        assert "missing" in message and "unexpected" in message and "shape" in message


def test_tied_head_uses_the_embedding(tmp_path):
    path = write_tiny_llm(tmp_path / "llama", "llama")  # tie_word_embeddings true: no lm_head.weight stored
    assert "lm_head.weight" not in load_state_dict(path)
    ours, theirs = minivl.load_model(path), torch_impl.load_model(path)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    assert theirs.lm_head.weight is theirs.model.embed_tokens.weight
    # untied but the head missing: named as missing
    untied = write_tiny_llm(tmp_path / "untied", "llama")
    with open(os.path.join(untied, "config.json")) as f:
        config = json.load(f)
    config["tie_word_embeddings"] = False
    with open(os.path.join(untied, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        minivl.load_model(untied)


def test_broken_directories_give_clear_errors(tmp_path, qwen2_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        minivl.load_model(tmp_path / "nowhere")
    # truncated safetensors
    cut = tmp_path / "cut"
    cut.mkdir()
    for name in ("config.json", "model.safetensors"):
        data = open(os.path.join(qwen2_path, name), "rb").read()
        (cut / name).write_bytes(data[: len(data) // 2] if name.endswith("safetensors") else data)
    with pytest.raises(CheckpointError):
        minivl.load_model(cut)
    with pytest.raises(CheckpointError):
        torch_impl.load_model(cut)
    # a pickle checkpoint is refused, not unpickled
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps(tiny_llm_config("qwen2")))
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(CheckpointError, match="(?i)pickle"):
        minivl.load_model(pickled)
    # a named minivl error (today ShapeError; the ViT raises ConfigError for the same mistake)
    with pytest.raises(minivl.errors.MinivlError, match="float32.*float64|float64.*float32"):
        minivl.load_model(qwen2_path, dtype="bfloat16")  # NumPy computes in float32/float64 only
    with pytest.raises(ConfigError, match="attn_implementation"):
        torch_impl.load_model(qwen2_path, attn_implementation="fast")


def test_mpt_training_only_options_are_refused(tmp_path):
    path = write_tiny_llm(tmp_path / "mpt", "mpt_alibi", attn_config={"prefix_lm": True})
    for load in (minivl.load_model, torch_impl.load_model):
        with pytest.raises(ConfigError, match="prefix_lm"):
            load(path)


def test_unsupported_model_dtype_is_a_config_error(tmp_path):
    import minivl
    import torch_impl
    from minivl.errors import ConfigError
    from minivl.tiny.llm import write_tiny_llm

    directory = write_tiny_llm(tmp_path / "llama", "llama")
    with pytest.raises(ConfigError, match="'float32' or 'float64'"):
        minivl.load_model(directory, dtype="bfloat16")
    with pytest.raises(ConfigError, match="torch models run in one of"):
        torch_impl.load_model(directory, dtype="int8")
