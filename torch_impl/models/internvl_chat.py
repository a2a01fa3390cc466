"""InternVL chat model (InternVL `modeling_internvl_chat.py`) in torch: ViT + pixel shuffle + mlp1 + LLM.

Mirror of minivl/models/internvl_chat.py (see there for the data flow): the same class with the
same attributes. The submodules carry the checkpoint's names (`vision_model`, `language_model`,
`mlp1`), so `state_dict()` has exactly the keys of an InternVL checkpoint. Prompt building and
`chat` / `batch_chat` are framework-free and shared with the NumPy package (ChatMixin).
"""
from __future__ import annotations

import torch
from torch import nn

from minivl.checkpoint import check_state_dict
from minivl.conversation import ChatMixin
from minivl.errors import ShapeError
from minivl.loading import LLM_PREFIX, strip_prefix
from minivl.models.intern_vit import VISION_PREFIX
from minivl.models.internvl_chat import (as_chat_config, chat_input_ids, check_context_count, check_tiles, context_token_id_error,
                                         llm_class, no_context_tokens_error, system_message)
from minivl.projector import PROJECTOR_PREFIX, projector_input_size
from torch_impl.models import MODEL_REGISTRY
from torch_impl.models.common import as_model_dtype, declared_shapes
from torch_impl.models.intern_vit import InternVisionModel
from torch_impl.pixel_shuffle import pixel_shuffle
from torch_impl.projector import Projector


class InternVLChatModel(ChatMixin, nn.Module):
    """InternVL: InternViT + pixel shuffle + mlp1 + a causal LM, with the reference's chat API.

    extract_feature: [n, 3, s, s] -> [n, num_image_token, D]
    forward: input_ids [b, t] + pixel_values [n, 3, s, s] -> CausalLMOutput (logits [b, t, vocab])
    Parts not given are declared from the config (build it under torch.device("meta") to skip
    the allocation); from_state_dict loads all three.
    """

    def __init__(self, config, vision_model=None, language_model=None, mlp1=None):
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
    def from_state_dict(cls, config, state_dict: dict, dtype="float32", device="cpu",
                        attn_implementation: str = "eager") -> "InternVLChatModel":
        """Build from a whole InternVL state dict (NumPy arrays or tensors); one CheckpointError lists every problem."""
        config = as_chat_config(config)
        dtype = as_model_dtype(dtype)  # a bad dtype is named before the tensors are checked
        check_state_dict(state_dict, cls.expected_shapes(config), where="InternVLChatModel")
        vision_model = InternVisionModel.from_state_dict(config.vision_config, strip_prefix(state_dict, VISION_PREFIX),
                                                         dtype, device, attn_implementation)
        language_model = llm_class(config, MODEL_REGISTRY).from_state_dict(
            config.llm_config, strip_prefix(state_dict, LLM_PREFIX), dtype, device,
            attn_implementation=attn_implementation)
        mlp1 = Projector.from_state_dict(state_dict, PROJECTOR_PREFIX, dtype, device)
        return cls(config, vision_model, language_model, mlp1).eval()

    @classmethod
    def expected_shapes(cls, config) -> dict[str, tuple]:
        """Every tensor of an InternVL checkpoint and its shape (vision_model.*, language_model.*, mlp1.*), declared."""
        return declared_shapes(cls, as_chat_config(config))

    @property
    def dtype(self) -> torch.dtype:
        return self.mlp1[1].weight.dtype

    @property
    def device(self) -> torch.device:
        return self.mlp1[1].weight.device

    # ------------------------------------------------------------------ image features

    def pixel_shuffle(self, x: torch.Tensor, scale_factor: float = 0.5) -> torch.Tensor:
        """[n, rows, cols, C] -> [n, rows·s, cols·s, C/s²] with this checkpoint's ps_version."""
        return pixel_shuffle(x, scale_factor, self.ps_version)

    @torch.no_grad()
    def extract_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Tiles -> LLM-space image tokens: ViT layer `select_layer`, drop cls, pixel shuffle, mlp1.

        [n, 3, s, s] -> [n, num_image_token, D]
        """
        check_tiles(tuple(pixel_values.shape), self.config)
        pixel_values = torch.as_tensor(pixel_values, device=self.device).to(self.dtype)
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

    def _context_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.img_context_token_id is None:
            raise context_token_id_error()
        # [b, t] -> [b·t] booleans, row-major (batch, position) order
        return input_ids.reshape(-1) == self.img_context_token_id

    def embed_with_images(self, input_ids: torch.Tensor, vit_embeds: torch.Tensor,
                          keep_graph_form: bool) -> torch.Tensor:
        """Token embeddings with each <IMG_CONTEXT> row replaced by the next image feature row.

        [b, t], [n, num_image_token, D] -> [b, t, D]   (keep_graph_form: the forward's `e·0.0 + v`)
        """
        input_embeds = self.language_model.embed_tokens(input_ids)
        b, t, d = input_embeds.shape
        flat = input_embeds.reshape(b * t, d).clone()
        selected = self._context_positions(input_ids)
        features = vit_embeds.reshape(-1, d).to(flat.dtype)
        check_context_count(int(selected.sum()), features.shape[0], self.num_image_token)
        flat[selected] = flat[selected] * 0.0 + features if keep_graph_form else features
        return flat.reshape(b, t, d)

    # ------------------------------------------------------------------ forward / generate

    @torch.no_grad()
    def forward(self, pixel_values, input_ids, attention_mask=None, position_ids=None, image_flags=None,
                past_key_values=None, use_cache: bool = False, output_hidden_states: bool = False,
                output_attentions: bool = False, cache=None):
        """Full-sequence scoring with the images spliced in; see minivl's InternVLChatModel.forward.

        A count mismatch between <IMG_CONTEXT> tokens and feature rows raises ShapeError, where the
        reference's training forward silently uses the first n_token features and zeroes the loss.
        """
        input_ids = torch.as_tensor(chat_input_ids(_as_numpy(input_ids), self.language_model.config.vocab_size),
                                    device=self.device)
        vit_embeds = self.extract_feature(pixel_values)
        if image_flags is not None:
            flags = torch.as_tensor(image_flags, device=self.device).reshape(-1)
            if flags.shape[0] != vit_embeds.shape[0]:
                raise ShapeError(f"image_flags has {flags.shape[0]} entries for {vit_embeds.shape[0]} tiles; "
                                 "give one 0/1 flag per tile")
            vit_embeds = vit_embeds[flags == 1]
        input_embeds = self.embed_with_images(input_ids, vit_embeds, keep_graph_form=True)
        if attention_mask is not None:
            attention_mask = torch.as_tensor(attention_mask, device=self.device)
        if position_ids is not None:
            position_ids = torch.as_tensor(position_ids, device=self.device)
        return self.language_model(inputs_embeds=input_embeds, attention_mask=attention_mask,
                                   position_ids=position_ids, past_key_values=past_key_values,
                                   use_cache=use_cache, output_hidden_states=output_hidden_states,
                                   output_attentions=output_attentions, cache=cache)

    @torch.no_grad()
    def generate(self, pixel_values=None, input_ids=None, attention_mask=None, visual_features=None,
                 **generate_kwargs) -> torch.Tensor:
        """Generate from a prompt with images: only the NEW token ids come back, [b, new].

        pixel_values [n, 3, s, s] (or precomputed visual_features [n, num_image_token, D]),
        input_ids [b, t], attention_mask [b, t]; generate_kwargs go to torch_impl.generate.generate.
        """
        from torch_impl.generate import generate

        if self.img_context_token_id is None:
            raise context_token_id_error()
        input_ids = torch.as_tensor(chat_input_ids(_as_numpy(input_ids), self.language_model.config.vocab_size),
                                    device=self.device)
        if pixel_values is not None or visual_features is not None:
            vit_embeds = visual_features if visual_features is not None else self.extract_feature(pixel_values)
            if not self._context_positions(input_ids).any():
                raise no_context_tokens_error()
            input_embeds = self.embed_with_images(input_ids, torch.as_tensor(vit_embeds, device=self.device),
                                                  keep_graph_form=False)
        else:
            input_embeds = self.language_model.embed_tokens(input_ids)
        if attention_mask is not None:
            attention_mask = torch.as_tensor(attention_mask, device=self.device)
        # with inputs_embeds only, generate returns just the new tokens (as HF does, pitfall 17)
        return generate(self.language_model, inputs_embeds=input_embeds, attention_mask=attention_mask,
                        **generate_kwargs)


def _as_numpy(value):
    """A tensor as a NumPy array (on the CPU), anything else as it is: for the checks minivl shares."""
    return value.detach().cpu().numpy() if torch.is_tensor(value) else value
