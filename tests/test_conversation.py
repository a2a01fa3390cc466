"""Conversation templates (minivl/conversation.py): the exact prompt strings of spec 6.7."""
import pytest

from minivl.conversation import (
    INTERNVL2_5_SYSTEM_MESSAGE, INTERNVL2_SYSTEM_MESSAGE, get_conv_template, image_tokens,
)
from minivl.errors import ConfigError

# Spec 6.7, typed in (not produced by the code under test).
SYS2 = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
SYS25 = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
Q = "<image>\nWhat is this?"
EXPECTED_SINGLE_TURN = {
    "internlm2-chat": f"<|im_start|>system\n{SYS2}<|im_end|><|im_start|>user\n{Q}<|im_end|><|im_start|>assistant\n",
    "Hermes-2": f"<|im_start|>system\n{SYS2}<|im_end|><|im_start|>user\n{Q}<|im_end|><|im_start|>assistant\n",
    "internvl2_5": (f"<|im_start|>system\n{SYS25}<|im_end|>\n<|im_start|>user\n{Q}<|im_end|>\n"
                    "<|im_start|>assistant\n"),
    "phi3-chat": f"<|system|>\n{SYS2}<|end|><|user|>\n{Q}<|end|><|assistant|>\n",
}
STOP = {"internlm2-chat": "<|im_end|>", "Hermes-2": "<|im_end|>", "internvl2_5": "<|im_end|>", "phi3-chat": "<|end|>"}


def test_system_messages_are_exact():
    assert INTERNVL2_SYSTEM_MESSAGE == SYS2
    assert INTERNVL2_5_SYSTEM_MESSAGE == SYS25


@pytest.mark.parametrize("name", sorted(EXPECTED_SINGLE_TURN))
def test_single_turn_prompt(name):
    conv = get_conv_template(name)
    conv.append_message(conv.roles[0], Q)
    conv.append_message(conv.roles[1], None)
    assert conv.get_prompt() == EXPECTED_SINGLE_TURN[name]
    assert conv.sep.strip() == STOP[name]


def test_multi_turn_internvl2_5_and_copies_are_independent():
    conv = get_conv_template("internvl2_5")
    conv.set_system_message("S")
    conv.append_message(conv.roles[0], "a")
    conv.append_message(conv.roles[1], "b")
    conv.append_message(conv.roles[0], "c")
    conv.append_message(conv.roles[1], None)
    assert conv.get_prompt() == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\na<|im_end|>\n"
                                 "<|im_start|>assistant\nb<|im_end|>\n<|im_start|>user\nc<|im_end|>\n"
                                 "<|im_start|>assistant\n")
    fresh = get_conv_template("internvl2_5")
    assert fresh.messages == [] and fresh.system_message == SYS25


def test_empty_message_leaves_the_turn_open_like_none():
    # the reference tests `if message:`, so "" renders as an open turn too
    conv = get_conv_template("phi3-chat")
    conv.set_system_message("S")
    conv.append_message(conv.roles[0], "")
    assert conv.get_prompt() == "<|system|>\nS<|end|><|user|>\n"


def test_image_tokens():
    assert image_tokens(2, 3) == "<img>" + "<IMG_CONTEXT>" * 6 + "</img>"


def test_unknown_template():
    with pytest.raises(ConfigError, match="internvl2_5"):
        get_conv_template("chatml")


def test_build_query_expands_the_first_remaining_image_each_time():
    from minivl.conversation import build_query

    query = build_query("internvl2_5", "S", "<image>\nand <image>?", [("<image>\nfirst", "ok")], [1, 2, 3],
                        num_image_token=1)
    ctx = "<IMG_CONTEXT>"
    # the history's placeholder is the first one: it gets the first image (1 tile), and so on
    assert query == ("<|im_start|>system\nS<|im_end|>\n"
                     f"<|im_start|>user\n<img>{ctx}</img>\nfirst<|im_end|>\n<|im_start|>assistant\nok<|im_end|>\n"
                     f"<|im_start|>user\n<img>{ctx * 2}</img>\nand <img>{ctx * 3}</img>?<|im_end|>\n"
                     "<|im_start|>assistant\n")


def test_build_query_refuses_more_images_than_placeholders():
    from minivl.conversation import build_query
    from minivl.errors import GenerationError

    with pytest.raises(GenerationError, match="only 1 '<image>' placeholders"):
        build_query("Hermes-2", "S", "<image>\nq", [], [1, 1], num_image_token=4)


def test_left_pad_and_generation_kwargs():
    from minivl.conversation import generation_kwargs, left_pad
    from minivl.errors import GenerationError

    ids, mask = left_pad([[5, 6, 7], [8]], pad_token_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert generation_kwargs({"max_new_tokens": 3}, 9) == {"max_new_tokens": 3, "eos_token_id": 9}
    with pytest.raises(GenerationError, match="num_beams"):
        generation_kwargs({"num_beams": 2}, 9)
