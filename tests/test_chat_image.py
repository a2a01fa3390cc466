"""`minivl chat --model-dir INTERNVL --image PATH`: the CLI answers exactly as InternVLChatModel.chat does.

Every expected answer comes from calling `model.chat` directly (the reference's own entry point) on
pixel values built independently here with `minivl.preprocess.load_image` and the checkpoint's tile
size; the CLI must print the same text, streamed. Greedy decoding, so the comparisons are exact
string equality: the NumPy CLI runs the very same computation as the direct call, and the torch
backend in float64 picks the same argmax tokens (token-level NumPy/torch agreement of the chat model
itself is tested in tests/test_internvl_chat.py; this file checks the command's wiring).
"""
import io
import os
import shutil
import sys

import numpy as np
import pytest
from PIL import Image

import minivl
from minivl.errors import CheckpointError, ConfigError, ImageError
from minivl.preprocess import load_image
from minivl.tiny.internvl import write_tiny_internvl
from minivl.tiny.llm import write_tiny_llm
from minivl.tokenizer import Tokenizer
from minivl_cli.cli import main
from minivl_cli.commands import chat as chat_command

COMBOS = ["qwen2", "phi3"]
SYSTEM = "You are InternVL."   # short: the tiny byte-level tokenizer makes the default system prompt ~200 tokens
NEW = 8                        # max new tokens per answer


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A float64 tiny InternVL checkpoint per LLM family (56-px tiles, 300M-flavour ViT)."""
    root = tmp_path_factory.mktemp("chat_image")
    return {llm: write_tiny_internvl(root / llm, llm=llm, vision="300m", dtype="float64", seed=5)
            for llm in COMBOS}


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    """A smooth random 100×60 RGB PNG: a 3×2 grid + thumbnail = 7 tiles at 56 px (max 12 tiles)."""
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, size=(6, 10, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("img") / "picture.png"
    Image.fromarray(small).resize((100, 60), Image.BICUBIC).save(path)
    return str(path)


def direct_chat(directory, image_paths, questions, dtype="float64", max_tiles=12):
    """The expected answers: InternVLChatModel.chat called directly, turn after turn, with history."""
    model = minivl.load_model(directory, dtype)
    model.system_message = SYSTEM
    tokenizer = Tokenizer.from_file(directory)
    size = model.config.force_image_size or model.config.vision_config.image_size
    tiles = [load_image(p, max_num=max_tiles, image_size=size, use_thumbnail=model.config.use_thumbnail)[0]
             for p in image_paths]
    pixel_values = np.concatenate(tiles) if tiles else None
    num_patches = [len(t) for t in tiles] if tiles else None
    prefix = "".join(f"Image-{k}: <image>\n" for k in range(1, len(tiles) + 1)) if len(tiles) > 1 else ""
    answers, history = [], None
    for i, question in enumerate(questions):
        answer, history = model.chat(tokenizer, pixel_values, (prefix if i == 0 else "") + question,
                                     dict(max_new_tokens=NEW, do_sample=False), history=history,
                                     return_history=True, num_patches_list=num_patches)
        answers.append(answer)
    return answers, [len(t) for t in tiles], model.num_image_token


def run_cli(capsys, *argv):
    code = main(["chat", "--system", SYSTEM, "--max-new-tokens", str(NEW), *argv])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out, captured.err


@pytest.mark.parametrize("llm", COMBOS)
def test_answer_equals_direct_chat_numpy_and_torch(checkpoints, picture, llm, capsys):
    path = checkpoints[llm]
    (expected,), (n_tiles,), per_tile = direct_chat(path, [picture], ["What is in the picture?"], dtype="float32")
    assert n_tiles == 7 and expected, "the tiny model should say something for the comparison to mean anything"
    out, err = run_cli(capsys, "--model-dir", path, "--image", picture, "What is in the picture?")
    assert out == expected + "\n"
    # the one stderr line before the answer: grid, tiles, image-token count
    assert f"grid 3x2 + thumbnail = 7 tiles of 56 px, 7 x {per_tile} = {7 * per_tile} image tokens" in err

    # torch backend, greedy: same text as NumPy (float64 on both sides so no near-tie can flip a token)
    (expected64,), _, _ = direct_chat(path, [picture], ["What is in the picture?"], dtype="float64")
    out_np, _ = run_cli(capsys, "--model-dir", path, "--image", picture, "--dtype", "float64",
                        "What is in the picture?")
    out_torch, _ = run_cli(capsys, "--model-dir", path, "--image", picture, "--dtype", "float64",
                           "--backend", "torch", "What is in the picture?")
    assert out_np == out_torch == expected64 + "\n"


def test_interactive_keeps_history_and_image(checkpoints, picture, capsys, monkeypatch):
    """Three turns: the image goes into turn 1's question only and stays in the history; /reset starts over."""
    path = checkpoints["qwen2"]
    questions = ["Describe it.", "And the colour?"]
    expected, _, _ = direct_chat(path, [picture], questions)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Describe it.\nAnd the colour?\n/reset\nDescribe it.\n/exit\n"))
    out, err = run_cli(capsys, "--model-dir", path, "--image", picture, "--dtype", "float64")
    # after /reset the first question is asked afresh, with the image again: the first answer again
    assert out == "".join(answer + "\n" for answer in [*expected, expected[0]])
    assert err.count("grid 3x2") == 1           # the image is tiled once, not per turn


def test_several_images_and_max_tiles(checkpoints, picture, tmp_path, capsys):
    path = checkpoints["phi3"]
    square = tmp_path / "square.png"
    Image.fromarray(np.full((40, 40, 3), 200, dtype=np.uint8)).save(square)
    (expected,), tiles, _ = direct_chat(path, [picture, str(square)], ["Compare them."], max_tiles=1)
    assert tiles == [1, 1]                      # --max-tiles 1: one tile each, no thumbnail
    out, err = run_cli(capsys, "--model-dir", path, "--image", picture, "--image", str(square),
                       "--max-tiles", "1", "--dtype", "float64", "Compare them.")
    assert out == expected + "\n"
    assert err.count("grid 1x1 = 1 tile of") == 2


def test_image_needs_an_internvl_checkpoint(tmp_path, picture, capsys):
    # the default model: refused before any weight conversion starts
    assert main(["chat", "--image", picture, "hi"]) == 1
    err = capsys.readouterr().err
    assert "ConfigError" in err and "--image needs an InternVL chat checkpoint" in err and "--model-dir" in err
    assert "Traceback" not in err
    text_only = write_tiny_llm(tmp_path / "qwen2", "qwen2")
    with pytest.raises(ConfigError, match=r"is a text-only 'qwen2' checkpoint.*--model-dir DIR.*internvl_chat"):
        chat_command.run(chat_command_args(["--model-dir", text_only, "--image", picture, "hi"]))


def test_internvl_without_tokenizer_json(checkpoints, tmp_path, picture):
    bare = tmp_path / "no_tokenizer"
    shutil.copytree(checkpoints["qwen2"], bare)
    os.remove(bare / "tokenizer.json")
    with pytest.raises(CheckpointError, match=r"has no tokenizer: minivl reads tokenizer\.json .* or tokenizer\.model"):
        chat_command.run(chat_command_args(["--model-dir", str(bare), "--image", picture, "hi"]))
    (bare / "tokenizer.model").write_bytes(b"\x00sentencepiece")  # InternLM2's file, but not a SentencePiece model
    with pytest.raises(CheckpointError, match=r"cannot read .*tokenizer\.model as a SentencePiece model"):
        chat_command.run(chat_command_args(["--model-dir", str(bare), "--image", picture, "hi"]))


def test_not_an_image_and_bad_max_tiles(checkpoints, tmp_path, picture):
    text = tmp_path / "notes.txt"
    text.write_text("not a picture")
    with pytest.raises(ImageError, match="not an image"):
        chat_command.run(chat_command_args(["--model-dir", checkpoints["qwen2"], "--image", str(text), "hi"]))
    with pytest.raises(minivl.errors.GenerationError, match="--max-tiles must be >= 1"):
        chat_command.run(chat_command_args(["--model-dir", checkpoints["qwen2"], "--image", picture,
                                            "--max-tiles", "0", "hi"]))


def chat_command_args(argv):
    """The parsed namespace of `minivl chat ARGV` (to call the command and catch its exception)."""
    from minivl_cli.cli import build_parser

    return build_parser().parse_args(["chat", *argv])


def test_internvl_checkpoint_without_image_is_plain_text_chat(checkpoints, capsys):
    path = checkpoints["phi3"]
    (expected,), _, _ = direct_chat(path, [], ["Hello"])
    out, err = run_cli(capsys, "--model-dir", path, "--dtype", "float64", "Hello")
    assert out == expected + "\n" and "image tokens" not in err


def test_stream_prints_exactly_what_chat_returns(checkpoints):
    """Leading/trailing whitespace and a tail that may begin the stop string are held back while streaming.

    "<|im" and "_end|>" are encoded separately, so they arrive as plain byte tokens that DECODE to
    the stop string without being the stop token: chat() cuts the text there (split(stop)[0]).
    """
    tokenizer = Tokenizer.from_file(checkpoints["qwen2"])
    stop = "<|im_end|>"
    ids = tokenizer.encode("  Hi there ") + tokenizer.encode("<|im") + tokenizer.encode("_end|> tail")
    expected = tokenizer.decode(ids, skip_special_tokens=True).split(stop)[0].strip()   # chat()'s rule
    assert expected == "Hi there"
    writes = []

    class Out:
        def write(self, text):
            writes.append(text)

        def flush(self):
            pass

    stream = chat_command.AnswerStream(tokenizer, stop, tokenizer.token_to_id(stop), Out())
    seen = []
    for token in ids:
        stream(np.array([token]))
        seen.append("".join(writes))
    stream.finish(expected)
    assert "".join(writes) == expected + "\n"
    assert seen[3] == "Hi"                                # streamed as it came (ids: ' ', ' ', 'H', 'i', ...)
    assert all(not s.startswith(" ") and "<" not in s for s in seen)
    assert stream.n_new == len(ids)
