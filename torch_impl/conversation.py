"""Conversation templates: plain strings, no framework, so torch_impl uses minivl's own module."""
from minivl.conversation import (  # noqa: F401
    CONV_TEMPLATES, IMAGE_PLACEHOLDER, IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN,
    INTERNVL2_5_SYSTEM_MESSAGE, INTERNVL2_SYSTEM_MESSAGE, Conversation, get_conv_template, image_tokens,
    register_conv_template,
)
