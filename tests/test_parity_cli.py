"""`minivl parity DIR`: the table, exit 0 on agreement, DIFF and exit 1 on a corrupted torch weight."""
from __future__ import annotations

import json
import os

import pytest
import torch

from minivl_cli.cli import main
from minivl.tiny.llm import write_tiny_llm


@pytest.fixture(scope="module")
def internlm2_dir(tmp_path_factory):
    return write_tiny_llm(tmp_path_factory.mktemp("parity") / "internlm2", "internlm2")


@pytest.mark.parametrize("family", ["internlm2", "phi3", "qwen2", "llama", "mpt_alibi", "mpt_learned"])
def test_parity_table_ok_for_every_family(tmp_path, capsys, family):
    path = write_tiny_llm(tmp_path / family, family)
    assert main(["parity", path, "--ids", "5,6,7,8,9,10"]) == 0
    out = capsys.readouterr().out
    for row in ("| embedding |", "| block 0 |", "| block 1 |", "| final norm |", "| logits |"):
        assert row in out
    assert "DIFF" not in out and "all layers agree" in out


def test_corrupted_torch_weight_gives_diff_and_exit_1(internlm2_dir, capsys, monkeypatch):
    """Perturb one torch weight of block 1 by 1e-3 relative: embedding and block 0 stay OK, block 1 on DIFF."""
    import torch_impl.loading

    real_load = torch_impl.loading.load_model

    def corrupted(*args, **kwargs):
        model = real_load(*args, **kwargs)
        weight = model.model.layers[1].feed_forward.w2.weight
        weight.copy_(weight * (1 + 1e-3))
        return model

    monkeypatch.setattr(torch_impl.loading, "load_model", corrupted)
    assert main(["parity", internlm2_dir]) == 1
    rows = {line.split("|")[1].strip(): line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")}
    assert rows["embedding"].rstrip().endswith("OK |") and rows["block 0"].rstrip().endswith("OK |")
    for name in ("block 1", "final norm", "logits"):
        assert rows[name].rstrip().endswith("DIFF |"), rows[name]


def test_prompt_through_tokenizer_json(tmp_path, capsys):
    tokenizers = pytest.importorskip("tokenizers")
    path = write_tiny_llm(tmp_path / "qwen2", "qwen2")
    vocab = {word: i for i, word in enumerate(["[UNK]", "hello", "world", "the", "cat"])}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer.save(os.path.join(path, "tokenizer.json"))
    assert main(["parity", path, "--prompt", "hello the cat", "--dtype", "float64"]) == 0
    assert "3 tokens, float64" in capsys.readouterr().out


def test_user_mistakes_are_named(tmp_path, internlm2_dir, capsys):
    assert main(["parity", internlm2_dir, "--prompt", "hi"]) == 1
    assert "tokenizer.json" in capsys.readouterr().err
    assert main(["parity", internlm2_dir, "--ids", "1,x"]) == 1
    assert "comma-separated" in capsys.readouterr().err
    assert main(["parity", internlm2_dir, "--ids", "1,100000"]) == 1
    assert "outside the vocabulary" in capsys.readouterr().err
    assert main(["parity", str(tmp_path / "missing")]) == 1
    assert "not a directory" in capsys.readouterr().err


def test_sdpa_backend_and_nested_component(tmp_path, capsys):
    """--attn sdpa, and --component language_model on an InternVL-style directory."""
    path = write_tiny_llm(tmp_path / "qwen2", "qwen2")
    assert main(["parity", path, "--attn", "sdpa"]) == 0
    from _decoder_util import internvl_like_checkpoint

    nested = internvl_like_checkpoint(tmp_path / "internvl", path)
    with open(os.path.join(nested, "config.json")) as f:
        assert json.load(f)["model_type"] == "internvl_chat"
    assert main(["parity", nested, "--component", "language_model"]) == 0
    assert "Qwen2ForCausalLM" in capsys.readouterr().out
    assert torch.get_default_dtype() == torch.float32


# ----------------------------------------------------------------------------- InternVL and InternViT checkpoints

@pytest.fixture(scope="module")
def internvl_dir(tmp_path_factory):
    from minivl.tiny.internvl import write_tiny_internvl

    return write_tiny_internvl(tmp_path_factory.mktemp("parity_vl") / "internvl", llm="internlm2", seed=2)


VL_STAGES = (["tile_grid", "pixel_values", "vision_model.embeddings"]
             + [f"vision_model.encoder.layers.{i}" for i in range(3)]
             + ["select_layer", "pixel_shuffle", "mlp1", "input_ids", "image_token_positions", "inputs_embeds",
                "language_model.model.layers.0", "language_model.model.layers.1", "language_model.model.norm",
                "logits"])


def _rows(out: str) -> dict:
    return {line.split("|")[1].strip(): line.rstrip() for line in out.splitlines()
            if line.startswith("| ") and not line.startswith("| stage")}


def test_internvl_checkpoint_gives_one_row_per_stage(internvl_dir, tmp_path, capsys):
    """Was: AttributeError 'InternVLChatConfig' object has no attribute 'vocab_size'."""
    from minivl.trace import synthetic_image

    synthetic_image(130, 60).save(tmp_path / "wide.png")
    assert main(["parity", internvl_dir, "--image", str(tmp_path / "wide.png"), "--prompt", "What is it?"]) == 0
    out = capsys.readouterr().out
    rows = _rows(out)
    assert list(rows) == VL_STAGES
    assert all(row.endswith("| OK |") for row in rows.values())
    assert "grid 2×1, 3 tiles" in out and "all 16 stages agree" in out
    # without --image: the synthetic picture, float64
    assert main(["parity", internvl_dir, "--dtype", "float64"]) == 0
    assert "(synthetic 100×60)" in capsys.readouterr().out


def test_corrupted_vit_layer_is_the_first_diff(internvl_dir, capsys, monkeypatch):
    """A 1e-3 relative error in the torch ViT's layer 1 MLP: every stage before it OK, it and all after DIFF."""
    import torch_impl.loading

    real_load = torch_impl.loading.load_model

    def corrupted(*args, **kwargs):
        model = real_load(*args, **kwargs)
        weight = dict(model.named_parameters())["vision_model.encoder.layers.1.mlp.fc2.weight"]
        with torch.no_grad():
            weight.mul_(1 + 1e-3)
        return model

    monkeypatch.setattr(torch_impl.loading, "load_model", corrupted)
    assert main(["parity", internvl_dir]) == 1
    out = capsys.readouterr().out
    rows = _rows(out)
    first = VL_STAGES.index("vision_model.encoder.layers.1")
    assert all(rows[name].endswith("| OK |") for name in VL_STAGES[:first])
    for name in VL_STAGES[first:]:
        if name not in ("input_ids", "image_token_positions"):     # token ids do not see the ViT
            assert rows[name].endswith("| DIFF |"), rows[name]
    assert "first divergence at stage vision_model.encoder.layers.1: at index (" in out


def test_bare_internvit_checkpoint(tmp_path, capsys):
    from minivl.tiny.vision import write_tiny_vit

    path = write_tiny_vit(tmp_path / "vit", "6b")
    assert main(["parity", path]) == 0
    rows = _rows(capsys.readouterr().out)
    assert list(rows) == ["tile_grid", "pixel_values", "embeddings"] + [f"encoder.layers.{i}" for i in range(3)]


def test_internvl_user_mistakes_are_named(internvl_dir, tmp_path, capsys):
    assert main(["parity", internvl_dir, "--ids", "1,2"]) == 1
    assert "--ids is for text-only checkpoints" in capsys.readouterr().err
    path = write_tiny_llm(tmp_path / "llama", "llama")
    assert main(["parity", path, "--image", "x.png"]) == 1
    assert "--image needs an InternVL chat checkpoint" in capsys.readouterr().err
    assert main(["parity", internvl_dir, "--image", str(tmp_path / "missing.png")]) == 1
    assert "does not exist" in capsys.readouterr().err
