"""InternVL chat model (InternVL `modeling_internvl_chat.py`), in NumPy: ViT + pixel shuffle + mlp1 + LLM.

An image enters the language model as ordinary token embeddings:

    tiles [n, 3, s, s] --InternViT--> [n, 1+P, C] --drop cls, pixel shuffle--> [n, P/4, 4C]
                       --mlp1--> [n, P/4, D]      (P/4 = num_image_token, 256 for 448-px tiles)

The prompt carries `<img>` + `<IMG_CONTEXT>`·(num_image_token·n) + `</img>` for each image; the
embedding of every `<IMG_CONTEXT>` token is replaced by one feature row, in (tile, token) order
along the row-major (batch, position) order of the context tokens. The LLM then runs on
`inputs_embeds` as usual. `chat` / `batch_chat` build the prompt from a conversation template
(minivl/conversation.py) and generate greedily or by sampling (minivl/generate.py).

Checkpoint keys are the module tree (the same in torch_impl/models/internvl_chat.py):
`vision_model` (InternViT), `language_model` (the LLM named by `llm_config.architectures[0]`:
Qwen2, InternLM2, Phi-3 or Llama), `mlp1.{0,1,3}` (the projector). `chat` / `batch_chat` are
framework-free and live once, in minivl.conversation.ChatMixin.
"""
from __future__ import annotations

import importlib

import numpy as np

from minivl import nn
from minivl.checkpoint import check_state_dict
from minivl.config import InternVLChatConfig, load_config
from minivl.conversation import ChatMixin, get_conv_template
from minivl.errors import ConfigError, GenerationError, ShapeError
from minivl.loading import LLM_PREFIX, strip_prefix
from minivl.models import MODEL_REGISTRY
from minivl.models.common import as_model_dtype, declared_shapes
from minivl.models.intern_vit import VISION_PREFIX, InternVisionModel
from minivl.pixel_shuffle import pixel_shuffle
from minivl.projector import PROJECTOR_PREFIX, Projector, projector_input_size


def llm_class(config: InternVLChatConfig, registry: dict):
    """The causal-LM class for `llm_config.model_type` from a model registry ("module:Class" entries)."""
    model_type = config.llm_config.model_type
    if model_type not in registry:
        raise ConfigError(f"llm_config model_type {model_type!r} has no model class; known: {sorted(registry)}")
    module_name, class_name = registry[model_type].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def as_chat_config(config) -> InternVLChatConfig:
    if isinstance(config, InternVLChatConfig):
        return config
    config = load_config(config)
    if not isinstance(config, InternVLChatConfig):
        raise ConfigError(f"expected an internvl_chat config, got model_type {config.model_type!r}")
    return config


def system_message(config: InternVLChatConfig):
    """A config.json `system_message` overrides the template's (a JSON null would print as "None")."""
    if "system_message" in config.extra:
        return config.extra["system_message"]
    return get_conv_template(config.template).system_message if config.template else None


def check_tiles(shape, config) -> None:
    """pixel_values must be [n, 3, s, s] tiles of THIS model's size s: num_image_token per tile assumes it.

    Without this, a 112-px tile for a 56-px model passes the ViT (its position table is resized) and
    fails later as a wrong <IMG_CONTEXT> count, which names the prompt instead of the tiles.
    """
    size = config.image_size
    if len(shape) != 4 or tuple(shape[-2:]) != (size, size):
        got = f"{shape[-2]}×{shape[-1]}-px tiles (shape {tuple(shape)})" if len(shape) == 4 else f"shape {tuple(shape)}"
        raise ShapeError(f"pixel_values must be [n_tiles, 3, {size}, {size}]: this model's tiles are {size} px "
                         f"(force_image_size or vision_config.image_size), which its {config.num_image_token} image "
                         f"tokens per tile assume; got {got}. Tile the image with "
                         f"minivl.preprocess.load_image(path, image_size={size})")


def check_context_count(n_context_tokens: int, n_feature_rows: int, num_image_token: int) -> None:
    """One feature row per <IMG_CONTEXT> token, or a ShapeError saying which side is off."""
    if n_context_tokens != n_feature_rows:
        raise ShapeError(
            f"the prompt has {n_context_tokens} <IMG_CONTEXT> tokens but the images give {n_feature_rows} "
            f"feature rows ({n_feature_rows // max(num_image_token, 1)} tiles × {num_image_token}); each image "
            f"needs '<img>' + '<IMG_CONTEXT>'·({num_image_token}·its tiles) + '</img>' in the prompt")


def chat_input_ids(input_ids, vocab_size) -> np.ndarray:
    """input_ids as int64 [b, t] token ids inside the LLM's vocabulary, or a GenerationError naming the problem
    (None, floats, a wrong rank), before they index the embedding table."""
    from minivl.generate import check_prompt_ids

    if input_ids is None:
        raise GenerationError("input_ids is None; pass the prompt's token ids [b, t] (model.chat builds them for you)")
    return check_prompt_ids(input_ids, vocab_size)


def context_token_id_error() -> GenerationError:
    return GenerationError("img_context_token_id is not set; set model.img_context_token_id = "
                           "tokenizer.token_to_id('<IMG_CONTEXT>') (chat and batch_chat do it for you)")


def no_context_tokens_error() -> GenerationError:
    return GenerationError("images were given but the prompt has no <IMG_CONTEXT> token; build it "
                           "with chat() or put '<img>' + '<IMG_CONTEXT>'·n + '</img>' in it")


# ----------------------------------------------------------------------------- the model

class InternVLChatModel(ChatMixin, nn.Module):
    """InternVL: InternViT + pixel shuffle + mlp1 + a causal LM, with the reference's chat API.

    extract_feature: [n, 3, s, s] -> [n, num_image_token, D]
    forward: input_ids [b, t] + pixel_values [n, 3, s, s] -> CausalLMOutput (logits [b, t, vocab])
    Parts not given are declared from the config (parameters without data, as the reference's
    __init__ builds them); from_state_dict loads all three.
    """

    def __init__(self, config: InternVLChatConfig, vision_model=None, language_model=None, mlp1=None):
        super().__init__()
        config = as_chat_config(config)
        self.config = config
        vit_hidden_size, llm_hidden_size = config.vision_config.hidden_size, config.llm_config.hidden_size
        if vision_model is None:
            vision_model = InternVisionModel(config.vision_config)
        if language_model is None:
            language_model = llm_class(config, MODEL_REGISTRY)(config.llm_config)
        if mlp1 is None:
            mlp1 = Projector(projector_input_size(vit_hidden_size, config.downsample_ratio), llm_hidden_size)
        self.vision_model, self.language_model, self.mlp1 = vision_model, language_model, mlp1
        self.patch_size = config.vision_config.patch_size
        self.select_layer = config.select_layer
        self.template = config.template
        self.num_image_token = config.num_image_token
        self.downsample_ratio = config.downsample_ratio
        self.ps_version = config.ps_version
        self.llm_arch_name = (config.llm_config.architectures or [""])[0]
        self.system_message = system_message(config)
        # set by chat / batch_chat from the tokenizer, as the reference does
        self.img_context_token_id = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_state_dict(cls, config, state_dict: dict, dtype="float32") -> "InternVLChatModel":
        """Build from a whole InternVL state dict; one CheckpointError lists every missing/extra/mis-shaped tensor."""
        config = as_chat_config(config)
        as_model_dtype(dtype)  # a bad dtype is named before the tensors are checked
        check_state_dict(state_dict, cls.expected_shapes(config), where="InternVLChatModel")
        vision_model = InternVisionModel.from_state_dict(config.vision_config, strip_prefix(state_dict, VISION_PREFIX),
                                                         dtype)
        language_model = llm_class(config, MODEL_REGISTRY).from_state_dict(
            config.llm_config, strip_prefix(state_dict, LLM_PREFIX), dtype)
        mlp1 = Projector.from_state_dict(state_dict, PROJECTOR_PREFIX, dtype)
        return cls(config, vision_model, language_model, mlp1)

    @classmethod
    def expected_shapes(cls, config) -> dict[str, tuple]:
        """Every tensor of an InternVL checkpoint and its shape (vision_model.*, language_model.*, mlp1.*), declared."""
        return declared_shapes(cls, as_chat_config(config))

    @property
    def dtype(self) -> np.dtype:
        return self.mlp1[1].weight.dtype

    # ------------------------------------------------------------------ image features

    def pixel_shuffle(self, x: np.ndarray, scale_factor: float = 0.5) -> np.ndarray:
        """[n, rows, cols, C] -> [n, rows·s, cols·s, C/s²] with this checkpoint's ps_version."""
        return pixel_shuffle(x, scale_factor, self.ps_version)

    def extract_feature(self, pixel_values: np.ndarray) -> np.ndarray:
        """Tiles -> LLM-space image tokens: ViT layer `select_layer`, drop cls, pixel shuffle, mlp1.

        [n, 3, s, s] -> [n, num_image_token, D]
        """
        check_tiles(np.shape(pixel_values), self.config)
        if self.select_layer == -1:
            vit_embeds = self.vision_model(pixel_values).last_hidden_state
        else:
            # hidden_states[0] is the embedding output, so select_layer = -4 is layer L-3's output
            vit_embeds = self.vision_model(pixel_values, output_hidden_states=True).hidden_states[self.select_layer]
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
            raise context_token_id_error()
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
                image_flags=None, past_key_values=None, use_cache: bool = False, output_hidden_states: bool = False,
                output_attentions: bool = False, cache=None):
        """Full-sequence scoring with the images spliced in (the reference's training forward, no loss).

        pixel_values [n, 3, s, s], input_ids [b, t] -> CausalLMOutput(logits [b, t, vocab], ...)
        image_flags [n] (or [n, 1]): tiles with flag 0 are dropped after the ViT (the reference's
        dummy tiles of text-only samples); default all 1. output_attentions: the language model's
        softmax probabilities, one [b, heads, t, t] per layer (which text and image tokens each
        position reads), as the reference's forward returns them.
        Unlike the reference, a count mismatch between <IMG_CONTEXT> tokens and feature rows raises
        ShapeError: the reference's training forward silently uses the first n_token features and
        zeroes the loss of the batch (modeling_internvl_chat.py, the `except` around the splice).
        """
        input_ids = chat_input_ids(input_ids, self.language_model.config.vocab_size)
        vit_embeds = self.extract_feature(pixel_values)
        if image_flags is not None:
            flags = np.asarray(image_flags).reshape(-1)
            if flags.shape[0] != vit_embeds.shape[0]:
                raise ShapeError(f"image_flags has {flags.shape[0]} entries for {vit_embeds.shape[0]} tiles; "
                                 "give one 0/1 flag per tile")
            vit_embeds = vit_embeds[flags == 1]
        input_embeds = self.embed_with_images(input_ids, vit_embeds, keep_graph_form=True)
        return self.language_model(inputs_embeds=input_embeds, attention_mask=attention_mask,
                                   position_ids=position_ids, past_key_values=past_key_values,
                                   use_cache=use_cache, output_hidden_states=output_hidden_states,
                                   output_attentions=output_attentions, cache=cache)

    def generate(self, pixel_values=None, input_ids=None, attention_mask=None, visual_features=None,
                 **generate_kwargs) -> np.ndarray:
        """Generate from a prompt with images: only the NEW token ids come back, [b, new].

        pixel_values [n, 3, s, s] (or precomputed visual_features [n, num_image_token, D]),
        input_ids [b, t], attention_mask [b, t]; generate_kwargs go to minivl.generate.generate.
        """
        from minivl.generate import generate

        if self.img_context_token_id is None:
            raise context_token_id_error()
        input_ids = chat_input_ids(input_ids, self.language_model.config.vocab_size)
        if pixel_values is not None or visual_features is not None:
            vit_embeds = visual_features if visual_features is not None else self.extract_feature(pixel_values)
            if not self._context_positions(input_ids).any():
                raise no_context_tokens_error()
            input_embeds = self.embed_with_images(input_ids, vit_embeds, keep_graph_form=False)
        else:
            input_embeds = self.language_model.embed_tokens(input_ids)
        # with inputs_embeds only, generate returns just the new tokens (as HF does, pitfall 17)
        return generate(self.language_model, inputs_embeds=input_embeds, attention_mask=attention_mask,
                        **generate_kwargs)
