"""InternVL chat model (InternVL `modeling_internvl_chat.py`), in NumPy: ViT + pixel shuffle + mlp1 + LLM.

An image enters the language model as ordinary token embeddings:

    tiles [n, 3, s, s] --InternViT--> [n, 1+P, C] --drop cls, pixel shuffle--> [n, P/4, 4C]
                       --mlp1--> [n, P/4, D]      (P/4 = num_image_token, 256 for 448-px tiles)

The prompt carries `<img>` + `<IMG_CONTEXT>`·(num_image_token·n) + `</img>` for each image; the
embedding of every `<IMG_CONTEXT>` token is replaced by one feature row, in (tile, token) order
along the row-major (batch, position) order of the context tokens. The LLM then runs on
`inputs_embeds` as usual. `chat` / `batch_chat` build the prompt from a conversation template
(minivl/conversation.py) and generate greedily or by sampling (minivl/generate.py).

Checkpoint keys: `vision_model.*` (InternViT), `mlp1.{0,1,3}.*` (projector), `language_model.*`
(the LLM named by `llm_config.architectures[0]`: Qwen2, InternLM2, Phi-3 or Llama).
"""
from __future__ import annotations

import importlib

import numpy as np

from minivl.config import InternVLChatConfig, load_config
from minivl.conversation import (
    IMAGE_PLACEHOLDER, IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN, build_query, encode, generation_kwargs,
    get_conv_template, left_pad, pad_id, token_id,
)
from minivl.errors import ConfigError, GenerationError, ShapeError
from minivl.pixel_shuffle import pixel_shuffle
from minivl.projector import Projector, mlp1_expected_shapes

VISION_PREFIX = "vision_model."
PROJECTOR_PREFIX = "mlp1."
LLM_PREFIX = "language_model."


def llm_class(config: InternVLChatConfig, registry: dict):
    """The causal-LM class for `llm_config.model_type` from a model registry ("module:Class" entries)."""
    model_type = config.llm_config.model_type
    if model_type not in registry:
        raise ConfigError(f"llm_config model_type {model_type!r} has no model class; known: {sorted(registry)}")
    module_name, class_name = registry[model_type].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def with_prefix(prefix: str, shapes: dict) -> dict:
    return {prefix + name: shape for name, shape in shapes.items()}


def strip_prefix(prefix: str, state_dict: dict) -> dict:
    return {name[len(prefix):]: t for name, t in state_dict.items() if name.startswith(prefix)}


def as_chat_config(config) -> InternVLChatConfig:
    if isinstance(config, InternVLChatConfig):
        return config
    config = load_config(config)
    if not isinstance(config, InternVLChatConfig):
        raise ConfigError(f"expected an internvl_chat config, got model_type {config.model_type!r}")
    return config


def check_context_count(n_context_tokens: int, n_feature_rows: int, num_image_token: int) -> None:
    """One feature row per <IMG_CONTEXT> token, or a ShapeError saying which side is off."""
    if n_context_tokens != n_feature_rows:
        raise ShapeError(
            f"the prompt has {n_context_tokens} <IMG_CONTEXT> tokens but the images give {n_feature_rows} "
            f"feature rows ({n_feature_rows // max(num_image_token, 1)} tiles × {num_image_token}); each image "
            f"needs '<img>' + '<IMG_CONTEXT>'·({num_image_token}·its tiles) + '</img>' in the prompt")


# ----------------------------------------------------------------------------- the model

class InternVLChatModel:
    """InternVL: InternViT + pixel shuffle + mlp1 + a causal LM, with the reference's chat API.

    extract_feature: [n, 3, s, s] -> [n, num_image_token, D]
    forward: input_ids [b, t] + pixel_values [n, 3, s, s] -> CausalLMOutput (logits [b, t, vocab])
    """

    def __init__(self, config: InternVLChatConfig, vision_model, language_model, mlp1: Projector, dtype="float32"):
        self.config = config
        self.dtype = np.dtype(dtype)
        self.vision_model = vision_model
        self.language_model = language_model
        self.mlp1 = mlp1
        self.patch_size = config.vision_config.patch_size
        self.select_layer = config.select_layer
        self.template = config.template
        self.num_image_token = config.num_image_token
        self.downsample_ratio = config.downsample_ratio
        self.ps_version = config.ps_version
        self.llm_arch_name = (config.llm_config.architectures or [""])[0]
        # a config.json `system_message` overrides the template's (a JSON null would print as "None")
        if "system_message" in config.extra:
            self.system_message = config.extra["system_message"]
        else:
            self.system_message = get_conv_template(self.template).system_message if self.template else None
        # set by chat / batch_chat from the tokenizer, as the reference does
        self.img_context_token_id = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def expected_shapes(cls, config) -> dict[str, tuple]:
        """Every tensor of an InternVL checkpoint and its shape: vision_model.*, mlp1.*, language_model.*."""
        from minivl.models import MODEL_REGISTRY
        from minivl.models.intern_vit import InternVisionModel

        config = as_chat_config(config)
        shapes = with_prefix(VISION_PREFIX, InternVisionModel.expected_shapes(config.vision_config))
        shapes.update(mlp1_expected_shapes(config.vision_config.hidden_size, config.downsample_ratio,
                                           config.llm_config.hidden_size, PROJECTOR_PREFIX))
        shapes.update(with_prefix(LLM_PREFIX, llm_class(config, MODEL_REGISTRY).expected_shapes(config.llm_config)))
        return shapes

    @classmethod
    def from_state_dict(cls, config, state_dict: dict, dtype="float32") -> "InternVLChatModel":
        """Build from a whole InternVL state dict; one CheckpointError lists every missing/extra/mis-shaped tensor."""
        from minivl.checkpoint import check_state_dict
        from minivl.models.common import as_model_dtype
        from minivl.models import MODEL_REGISTRY
        from minivl.models.intern_vit import InternVisionModel

        config = as_chat_config(config)
        dtype = as_model_dtype(dtype)
        check_state_dict(state_dict, cls.expected_shapes(config), where="InternVLChatModel")
        vision_model = InternVisionModel.from_state_dict(config.vision_config, strip_prefix(VISION_PREFIX, state_dict),
                                                         dtype)
        language_model = llm_class(config, MODEL_REGISTRY).from_state_dict(
            config.llm_config, strip_prefix(LLM_PREFIX, state_dict), dtype)
        mlp1 = Projector.from_state_dict(state_dict, PROJECTOR_PREFIX, dtype)
        return cls(config, vision_model, language_model, mlp1, dtype)

    # ------------------------------------------------------------------ image features

    def pixel_shuffle(self, x: np.ndarray, scale_factor: float = 0.5) -> np.ndarray:
        """[n, rows, cols, C] -> [n, rows·s, cols·s, C/s²] with this checkpoint's ps_version."""
        return pixel_shuffle(x, scale_factor, self.ps_version)

    def extract_feature(self, pixel_values: np.ndarray) -> np.ndarray:
        """Tiles -> LLM-space image tokens: ViT layer `select_layer`, drop cls, pixel shuffle, mlp1.

        [n, 3, s, s] -> [n, num_image_token, D]
        """
        if self.select_layer == -1:
            vit_embeds = self.vision_model.forward(pixel_values).last_hidden_state
        else:
            # hidden_states[0] is the embedding output, so select_layer = -4 is layer L-3's output
            hidden_states = self.vision_model.forward(pixel_values, output_hidden_states=True).hidden_states
            vit_embeds = hidden_states[self.select_layer]
        vit_embeds = vit_embeds[:, 1:, :]                                    # drop the cls token
        n, n_patches, width = vit_embeds.shape
        side = int(n_patches ** 0.5)
        if side * side != n_patches:
            raise ShapeError(f"extract_feature assumes square tiles, got {n_patches} patches per tile; "
                             f"tile the image with minivl.preprocess (s×s tiles)")
        # [n, P, C] -> [n, √P, √P, C] -> [n, √P/2, √P/2, 4C] -> [n, P/4, 4C]
        vit_embeds = self.pixel_shuffle(vit_embeds.reshape(n, side, side, width), self.downsample_ratio)
        vit_embeds = vit_embeds.reshape(n, -1, vit_embeds.shape[-1])
        return self.mlp1(vit_embeds)

    def _context_positions(self, input_ids: np.ndarray) -> np.ndarray:
        if self.img_context_token_id is None:
            raise GenerationError("img_context_token_id is not set; set model.img_context_token_id = "
                                  "tokenizer.token_to_id('<IMG_CONTEXT>') (chat and batch_chat do it for you)")
        # [b, t] -> [b·t] booleans, row-major (batch, position) order
        return np.asarray(input_ids).reshape(-1) == self.img_context_token_id

    def embed_with_images(self, input_ids: np.ndarray, vit_embeds: np.ndarray, keep_graph_form: bool) -> np.ndarray:
        """Token embeddings with each <IMG_CONTEXT> row replaced by the next image feature row.

        [b, t], [n, num_image_token, D] -> [b, t, D]
        keep_graph_form: the reference's forward writes `e·0.0 + v` (a NaN/Inf embedding row would
        propagate), its generate a plain assignment; both give v for finite embeddings.
        """
        input_embeds = self.language_model.embed_tokens(input_ids)
        b, t, d = input_embeds.shape
        flat = input_embeds.reshape(b * t, d).copy()
        selected = self._context_positions(input_ids)
        features = vit_embeds.reshape(-1, d).astype(flat.dtype)
        check_context_count(int(selected.sum()), features.shape[0], self.num_image_token)
        flat[selected] = flat[selected] * 0.0 + features if keep_graph_form else features
        return flat.reshape(b, t, d)

    # ------------------------------------------------------------------ forward / generate

    def forward(self, pixel_values: np.ndarray, input_ids: np.ndarray, attention_mask=None, position_ids=None,
                image_flags=None, past_key_values=None, use_cache: bool = False, output_hidden_states: bool = False):
        """Full-sequence scoring with the images spliced in (the reference's training forward, no loss).

        pixel_values [n, 3, s, s], input_ids [b, t] -> CausalLMOutput(logits [b, t, vocab], ...)
        image_flags [n] (or [n, 1]): tiles with flag 0 are dropped after the ViT (the reference's
        dummy tiles of text-only samples); default all 1.
        Unlike the reference, a count mismatch between <IMG_CONTEXT> tokens and feature rows raises
        ShapeError: the reference's training forward silently uses the first n_token features and
        zeroes the loss of the batch (modeling_internvl_chat.py, the `except` around the splice).
        """
        input_ids = np.asarray(input_ids)
        vit_embeds = self.extract_feature(pixel_values)
        if image_flags is not None:
            flags = np.asarray(image_flags).reshape(-1)
            if flags.shape[0] != vit_embeds.shape[0]:
                raise ShapeError(f"image_flags has {flags.shape[0]} entries for {vit_embeds.shape[0]} tiles; "
                                 "give one 0/1 flag per tile")
            vit_embeds = vit_embeds[flags == 1]
        input_embeds = self.embed_with_images(input_ids, vit_embeds, keep_graph_form=True)
        return self.language_model.forward(inputs_embeds=input_embeds, attention_mask=attention_mask,
                                           position_ids=position_ids, past_key_values=past_key_values,
                                           use_cache=use_cache, output_hidden_states=output_hidden_states)

    __call__ = forward

    def generate(self, pixel_values=None, input_ids=None, attention_mask=None, visual_features=None,
                 **generate_kwargs) -> np.ndarray:
        """Generate from a prompt with images: only the NEW token ids come back, [b, new].

        pixel_values [n, 3, s, s] (or precomputed visual_features [n, num_image_token, D]),
        input_ids [b, t], attention_mask [b, t]; generate_kwargs go to minivl.generate.generate.
        """
        from minivl.generate import generate

        if self.img_context_token_id is None:
            self._context_positions(np.zeros((1, 1), dtype=np.int64))     # raises the explanatory error
        input_ids = np.asarray(input_ids)
        if pixel_values is not None or visual_features is not None:
            vit_embeds = visual_features if visual_features is not None else self.extract_feature(pixel_values)
            if not self._context_positions(input_ids).any():
                raise GenerationError("images were given but the prompt has no <IMG_CONTEXT> token; build it "
                                      "with chat() or put '<img>' + '<IMG_CONTEXT>'·n + '</img>' in it")
            input_embeds = self.embed_with_images(input_ids, vit_embeds, keep_graph_form=False)
        else:
            input_embeds = self.language_model.embed_tokens(input_ids)
        # with inputs_embeds only, generate returns just the new tokens (as HF does, pitfall 17)
        return generate(self.language_model, inputs_embeds=input_embeds, attention_mask=attention_mask,
                        **generate_kwargs)

    # ------------------------------------------------------------------ chat

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
        if history is None and pixel_values is not None and IMAGE_PLACEHOLDER not in question:
            question = IMAGE_PLACEHOLDER + "\n" + question
        if num_patches_list is None:
            num_patches_list = [pixel_values.shape[0]] if pixel_values is not None else []
        if pixel_values is not None and len(pixel_values) != sum(num_patches_list):
            raise ShapeError(f"pixel_values has {len(pixel_values)} tiles but num_patches_list {num_patches_list} "
                             f"adds up to {sum(num_patches_list)}; give each image's tile count")
        self.img_context_token_id = token_id(tokenizer, IMG_CONTEXT_TOKEN)
        stop = get_conv_template(self.template).sep.strip()
        history = [] if history is None else history
        query = build_query(self.template, self.system_message, question, history, num_patches_list,
                            self.num_image_token)
        input_ids = np.asarray([encode(tokenizer, query)], dtype=np.int64)
        attention_mask = np.ones_like(input_ids)
        output_ids = self.generate(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask,
                                   **generation_kwargs(generation_config, token_id(tokenizer, stop)))
        response = tokenizer.decode(list(output_ids[0]), skip_special_tokens=True)
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
        if pixel_values is not None and len(pixel_values) != sum(num_patches_list):
            raise ShapeError(f"pixel_values has {len(pixel_values)} tiles but num_patches_list {num_patches_list} "
                             f"adds up to {sum(num_patches_list)}")
        self.img_context_token_id = token_id(tokenizer, IMG_CONTEXT_TOKEN)
        stop = get_conv_template(self.template).sep.strip()
        queries = []
        for question, num_patches in zip(questions, num_patches_list):
            if pixel_values is not None and IMAGE_PLACEHOLDER not in question:
                question = IMAGE_PLACEHOLDER + "\n" + question
            patches = [num_patches] if pixel_values is not None else []
            queries.append(build_query(self.template, self.system_message, question, [], patches,
                                       self.num_image_token))
        stop_id = token_id(tokenizer, stop)
        input_ids, attention_mask = left_pad([encode(tokenizer, q) for q in queries], pad_id(tokenizer, stop_id))
        output_ids = self.generate(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask,
                                   **generation_kwargs(generation_config, stop_id))
        responses = [tokenizer.decode(list(row), skip_special_tokens=True).split(stop)[0].strip()
                     for row in output_ids]
        if verbose:
            for query, response in zip(queries, responses):
                print(query.replace(IMG_CONTEXT_TOKEN, ""), response)
        return responses
