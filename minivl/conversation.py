"""Conversation templates of InternVL 2 / 2.5: how a chat turns into one prompt string.

Follows `internvl_chat/internvl/conversation.py` (a FastChat fork). All four templates used by
the released InternVL2/2.5 models render in the `MPT` separator style:

    prompt = system_template.format(system_message=...) + sep
    for (role, message) in messages:  prompt += role + message + sep   if message
                                      prompt += role                   otherwise (the open turn)

so a single-turn prompt with the generation slot open is, for internlm2-chat / Hermes-2,
`<|im_start|>system\\n{SYS}<|im_end|><|im_start|>user\\n{Q}<|im_end|><|im_start|>assistant\\n`.
Note the separators: 'Hermes-2' and 'internlm2-chat' put NO newline after `<|im_end|>`,
'internvl2_5' does. Generation stops at `sep.strip()` (`<|im_end|>` or `<|end|>`).
"""
from __future__ import annotations

import dataclasses

from minivl.errors import ConfigError

# The InternVL2 system prompt (kept by the reference "to avoid changes in benchmark performance").
INTERNVL2_SYSTEM_MESSAGE = ("你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, "
                            "是一个有用无害的人工智能助手。")
# The InternVL2.5 system prompt.
INTERNVL2_5_SYSTEM_MESSAGE = ("你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位"
                              "联合开发的多模态大语言模型。")

# Tokens the InternVL chat model adds to its LLM's tokenizer (internvl/train/constants.py).
IMG_START_TOKEN = "<img>"
IMG_END_TOKEN = "</img>"
IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"
IMAGE_PLACEHOLDER = "<image>"


@dataclasses.dataclass
class Conversation:
    """A prompt template and the messages of one conversation (FastChat's `Conversation`, MPT style)."""

    name: str
    system_template: str = "{system_message}"
    system_message: str = ""
    roles: tuple = ("USER", "ASSISTANT")
    messages: list = dataclasses.field(default_factory=list)
    sep_style: str = "MPT"
    sep: str = "\n"
    stop_str: str | None = None
    stop_token_ids: list | None = None

    def get_prompt(self) -> str:
        """Render system prompt and messages; a None (or empty) message leaves its role's turn open."""
        if self.sep_style != "MPT":
            raise ConfigError(f"template {self.name!r} has separator style {self.sep_style!r}; "
                              "minivl renders only the 'MPT' style used by every InternVL2/2.5 template")
        # prompt = system_template(system_message) + sep, then role + message + sep per turn
        prompt = self.system_template.format(system_message=self.system_message) + self.sep
        for role, message in self.messages:
            prompt += role + message + self.sep if message else role
        return prompt

    def set_system_message(self, system_message: str) -> None:
        self.system_message = system_message

    def append_message(self, role: str, message: str | None) -> None:
        self.messages.append([role, message])

    def update_last_message(self, message: str) -> None:
        self.messages[-1][1] = message

    def copy(self) -> "Conversation":
        return dataclasses.replace(self, messages=[[role, message] for role, message in self.messages],
                                   stop_token_ids=None if self.stop_token_ids is None else list(self.stop_token_ids))


CONV_TEMPLATES: dict[str, Conversation] = {}


def register_conv_template(template: Conversation, override: bool = False) -> None:
    if not override and template.name in CONV_TEMPLATES:
        raise ConfigError(f"conversation template {template.name!r} is already registered; pass override=True")
    CONV_TEMPLATES[template.name] = template


def get_conv_template(name: str) -> Conversation:
    """A fresh copy of the named template (so appending messages never changes the registry)."""
    if name not in CONV_TEMPLATES:
        raise ConfigError(f"unknown conversation template {name!r}; config.json 'template' must be one of "
                          f"{sorted(CONV_TEMPLATES)}")
    return CONV_TEMPLATES[name].copy()


register_conv_template(Conversation(
    name="Hermes-2",
    system_template="<|im_start|>system\n{system_message}",
    system_message=INTERNVL2_SYSTEM_MESSAGE,
    roles=("<|im_start|>user\n", "<|im_start|>assistant\n"),
    sep_style="MPT",
    sep="<|im_end|>",
    stop_str="<|endoftext|>",
))

register_conv_template(Conversation(
    name="internlm2-chat",
    system_template="<|im_start|>system\n{system_message}",
    system_message=INTERNVL2_SYSTEM_MESSAGE,
    roles=("<|im_start|>user\n", "<|im_start|>assistant\n"),
    sep_style="MPT",
    sep="<|im_end|>",
))

register_conv_template(Conversation(
    name="phi3-chat",
    system_template="<|system|>\n{system_message}",
    system_message=INTERNVL2_SYSTEM_MESSAGE,
    roles=("<|user|>\n", "<|assistant|>\n"),
    sep_style="MPT",
    sep="<|end|>",
))

register_conv_template(Conversation(
    name="internvl2_5",
    system_template="<|im_start|>system\n{system_message}",
    system_message=INTERNVL2_5_SYSTEM_MESSAGE,
    roles=("<|im_start|>user\n", "<|im_start|>assistant\n"),
    sep_style="MPT",
    sep="<|im_end|>\n",
))


def image_tokens(num_image_token: int, num_tiles: int) -> str:
    """What one `<image>` placeholder becomes: `<img>` + `<IMG_CONTEXT>`·(tokens per tile · tiles) + `</img>`."""
    return IMG_START_TOKEN + IMG_CONTEXT_TOKEN * (num_image_token * num_tiles) + IMG_END_TOKEN
