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
