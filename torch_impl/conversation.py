"""Conversation templates: plain strings, no framework, so torch_impl uses minivl's own module."""
from minivl.conversation import (  # noqa: F401
    CONV_TEMPLATES, GENERATION_KEYS, IMAGE_PLACEHOLDER, IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN,
    INTERNVL2_5_SYSTEM_MESSAGE, INTERNVL2_SYSTEM_MESSAGE, ChatMixin, Conversation, build_query, check_num_patches,
    encode, generation_kwargs, get_conv_template, image_tokens, left_pad, pad_id, register_conv_template, token_id,
    with_image_placeholder,
)
