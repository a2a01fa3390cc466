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

The second half turns a chat turn into token ids as InternVLChatModel.chat does (both packages use
it): `build_query` renders the template and expands each `<image>` into
`<img>` + `<IMG_CONTEXT>`·(num_image_token·tiles) + `</img>`; `encode` tokenizes with the
tokenizer's default special tokens; `left_pad` batches prompts for batch_chat. `ChatMixin` is
`chat` / `batch_chat` themselves, written once: both packages' InternVLChatModel inherit them.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from minivl.errors import ConfigError, GenerationError, ShapeError

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


# ----------------------------------------------------------------------------- a chat turn -> token ids
# (shared by minivl's and torch_impl's InternVLChatModel.chat / batch_chat)

# the arguments minivl.generate.generate takes; chat's generation_config may set any of them
GENERATION_KEYS = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "seed", "eos_token_id",
                   "pad_token_id", "streamer")


def token_id(tokenizer, token: str) -> int:
    """Id of a special token with either tokenizer API (`token_to_id` or HF `convert_tokens_to_ids`)."""
    lookup = getattr(tokenizer, "token_to_id", None) or getattr(tokenizer, "convert_tokens_to_ids")
    found = lookup(token)
    if found is None or (hasattr(tokenizer, "unk_token_id") and found == tokenizer.unk_token_id
                         and token != getattr(tokenizer, "unk_token", None)):
        raise ConfigError(f"the tokenizer has no {token!r} token; an InternVL tokenizer adds <img>, </img> and "
                          f"<IMG_CONTEXT> as special tokens (minivl.tiny.internvl builds one)")
    return int(found)


def encode(tokenizer, text: str) -> list[int]:
    """Token ids with the tokenizer's default special tokens (InternLM2 / Phi-3 prepend <s>, Qwen2 nothing)."""
    try:
        return list(tokenizer.encode(text, add_special_tokens=True))
    except TypeError:
        return list(tokenizer.encode(text))


def build_query(template_name: str, system_message, question: str, history, num_patches_list,
                num_image_token: int) -> str:
    """The prompt string of one chat turn with each `<image>` expanded, as InternVLChatModel.chat builds it."""
    template = get_conv_template(template_name)
    template.system_message = system_message
    for old_question, old_answer in history:
        template.append_message(template.roles[0], old_question)
        template.append_message(template.roles[1], old_answer)
    template.append_message(template.roles[0], question)
    template.append_message(template.roles[1], None)
    query = template.get_prompt()
    # each entry replaces the FIRST remaining <image> of the whole prompt (history included)
    for index, num_patches in enumerate(num_patches_list):
        if IMAGE_PLACEHOLDER not in query:
            raise GenerationError(f"{len(num_patches_list)} images were given but the prompt has only {index} "
                                  f"'<image>' placeholders; put one '<image>' in the question per image")
        query = query.replace(IMAGE_PLACEHOLDER, image_tokens(num_image_token, num_patches), 1)
    return query


def generation_kwargs(generation_config, eos_token_id: int) -> dict:
    """chat's generation_config dict as keyword arguments of generate(), with the template's stop token."""
    config = dict(generation_config or {})
    unknown = sorted(set(config) - set(GENERATION_KEYS))
    if unknown:
        raise GenerationError(f"generation_config keys {unknown} are not supported; use {list(GENERATION_KEYS)}")
    config["eos_token_id"] = eos_token_id
    return config


def left_pad(sequences: list[list[int]], pad_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token lists to one [b, t] batch and its 0/1 attention mask (batch_chat's padding side)."""
    longest = max(len(ids) for ids in sequences)
    input_ids = np.full((len(sequences), longest), pad_token_id, dtype=np.int64)
    attention_mask = np.zeros((len(sequences), longest), dtype=np.int64)
    for row, ids in enumerate(sequences):
        input_ids[row, longest - len(ids):] = ids
        attention_mask[row, longest - len(ids):] = 1
    return input_ids, attention_mask


def pad_id(tokenizer, fallback: int) -> int:
    """The tokenizer's pad id (else its eos id, else `fallback`): the value of left-padding slots."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, (int, np.integer)):
            return int(value)
    return fallback


def check_num_patches(pixel_values, num_patches_list) -> None:
    """pixel_values must hold exactly sum(num_patches_list) tiles (each image's tiles, in order)."""
    if pixel_values is not None and len(pixel_values) != sum(num_patches_list):
        raise ShapeError(f"pixel_values has {len(pixel_values)} tiles but num_patches_list {num_patches_list} "
                         f"adds up to {sum(num_patches_list)}; give each image's tile count")


def with_image_placeholder(question: str) -> str:
    """`<image>\\n` + question, unless the question already places its `<image>`."""
    return question if IMAGE_PLACEHOLDER in question else IMAGE_PLACEHOLDER + "\n" + question


class ChatMixin:
    """`chat` and `batch_chat` of InternVLChatModel, written once for both packages (no framework here).

    The model class provides `template`, `system_message`, `num_image_token`, a settable
    `img_context_token_id` and `generate(pixel_values=, input_ids=, attention_mask=, **kwargs)`
    that takes NumPy [b, t] ids and returns the NEW ids [b, new] (a NumPy array or a torch tensor:
    only `row.tolist()` is used here).
    """

    def chat(self, tokenizer, pixel_values, question: str, generation_config=None, history=None,
             return_history: bool = False, num_patches_list=None, verbose: bool = False):
        """One chat turn, as InternVLChatModel.chat: returns the answer (and the new history if asked).

        `<image>\\n` is prepended only on the first turn (history None) when the question has no
        `<image>`; each image's `<image>` becomes `<img>` + `<IMG_CONTEXT>`·(num_image_token·tiles) +
        `</img>`; generation stops at the template separator (`sep.strip()`); history keeps the
        question WITH its `<image>` placeholder. The returned history is a new list (the reference
        appends to the caller's list in place). tokenizer: any object with encode / decode /
        token_to_id (minivl.tokenizer.Tokenizer) or HF's convert_tokens_to_ids.
        """
        if history is None and pixel_values is not None:
            question = with_image_placeholder(question)
        if num_patches_list is None:
            num_patches_list = [pixel_values.shape[0]] if pixel_values is not None else []
        check_num_patches(pixel_values, num_patches_list)
        self.img_context_token_id = token_id(tokenizer, IMG_CONTEXT_TOKEN)
        stop = get_conv_template(self.template).sep.strip()
        history = [] if history is None else history
        query = build_query(self.template, self.system_message, question, history, num_patches_list,
                            self.num_image_token)
        input_ids = np.asarray([encode(tokenizer, query)], dtype=np.int64)
        output_ids = self.generate(pixel_values=pixel_values, input_ids=input_ids,
                                   attention_mask=np.ones_like(input_ids),
                                   **generation_kwargs(generation_config, token_id(tokenizer, stop)))
        response = tokenizer.decode(output_ids[0].tolist(), skip_special_tokens=True)
        response = response.split(stop)[0].strip()
        history = history + [(question, response)]
        if verbose:
            shown = query.replace(IMG_CONTEXT_TOKEN, "").replace(IMG_START_TOKEN + IMG_END_TOKEN, IMAGE_PLACEHOLDER)
            print(shown, response)
        return (response, history) if return_history else response

    def batch_chat(self, tokenizer, pixel_values, questions, generation_config=None, num_patches_list=None,
                   history=None, return_history: bool = False, verbose: bool = False) -> list[str]:
        """Single-turn answers to several questions at once (left-padded batch), as InternVLChatModel.batch_chat.

        `<image>\\n` is prepended to every question without one when pixel_values is given; image k
        (num_patches_list[k] tiles, in order inside pixel_values) goes with question k.
        """
        if history is not None or return_history:
            raise GenerationError("batch_chat answers single turns only (as the reference); use chat() for "
                                  "multi-turn conversations")
        if num_patches_list is None:
            if pixel_values is not None and len(questions) != 1:
                raise ShapeError("batch_chat with several questions needs num_patches_list (tiles per image)")
            num_patches_list = [pixel_values.shape[0]] if pixel_values is not None else [0] * len(questions)
        if len(num_patches_list) != len(questions):
            raise ShapeError(f"{len(questions)} questions but {len(num_patches_list)} entries in num_patches_list")
        check_num_patches(pixel_values, num_patches_list)
        self.img_context_token_id = token_id(tokenizer, IMG_CONTEXT_TOKEN)
        stop = get_conv_template(self.template).sep.strip()
        queries = []
        for question, num_patches in zip(questions, num_patches_list):
            if pixel_values is not None:
                question = with_image_placeholder(question)
            patches = [num_patches] if pixel_values is not None else []
            queries.append(build_query(self.template, self.system_message, question, [], patches,
                                       self.num_image_token))
        stop_id = token_id(tokenizer, stop)
        input_ids, attention_mask = left_pad([encode(tokenizer, q) for q in queries], pad_id(tokenizer, stop_id))
        output_ids = self.generate(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask,
                                   **generation_kwargs(generation_config, stop_id))
        responses = [tokenizer.decode(row.tolist(), skip_special_tokens=True).split(stop)[0].strip()
                     for row in output_ids]
        if verbose:
            for query, response in zip(queries, responses):
                print(query.replace(IMG_CONTEXT_TOKEN, ""), response)
        return responses
