"""InternVL chat model (InternVL `modeling_internvl_chat.py`) in torch: ViT + pixel shuffle + mlp1 + LLM.

Mirror of minivl/models/internvl_chat.py (see there for the data flow). The submodules carry the
checkpoint's names (`vision_model`, `mlp1`, `language_model`), so `state_dict()` has exactly the
keys of an InternVL checkpoint. Prompt building (templates, `<image>` expansion, tokenizer calls)
is framework-free and shared with the NumPy package.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from minivl.conversation import (
    IMAGE_PLACEHOLDER, IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN, build_query, encode, generation_kwargs,
    get_conv_template, left_pad, pad_id, token_id,
)
from minivl.errors import ConfigError, GenerationError, ShapeError
from minivl.models.internvl_chat import (
    LLM_PREFIX, PROJECTOR_PREFIX, VISION_PREFIX, as_chat_config, check_context_count, llm_class, strip_prefix,
)
from minivl.models.internvl_chat import InternVLChatModel as _NumpyInternVLChatModel
from minivl.projector import projector_input_size
from torch_impl.pixel_shuffle import pixel_shuffle
from torch_impl.projector import Projector

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _as_torch_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if str(dtype) not in _DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(_DTYPES)} (got {dtype!r})")
    return _DTYPES[str(dtype)]


class InternVLChatModel(nn.Module):
    """InternVL: InternViT + pixel shuffle + mlp1 + a causal LM, with the reference's chat API.

    extract_feature: [n, 3, s, s] -> [n, num_image_token, D]
    forward: input_ids [b, t] + pixel_values [n, 3, s, s] -> CausalLMOutput (logits [b, t, vocab])
    """

    expected_shapes = _NumpyInternVLChatModel.expected_shapes

    def __init__(self, config, vision_model: nn.Module, language_model: nn.Module, mlp1: Projector):
        super().__init__()
        self.config = config
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
        self.img_context_token_id = None

    @classmethod
    def from_state_dict(cls, config, state_dict: dict, dtype="float32", device="cpu",
                        attn_implementation: str = "eager") -> "InternVLChatModel":
        """Build from a whole InternVL state dict (NumPy arrays or tensors); one CheckpointError lists every problem."""
        from minivl.checkpoint import check_state_dict
        from torch_impl.models import MODEL_REGISTRY
        from torch_impl.models.intern_vit import InternVisionModel

        config = as_chat_config(config)
        torch_dtype = _as_torch_dtype(dtype)
        check_state_dict(state_dict, cls.expected_shapes(config), where="InternVLChatModel")
        vision_model = InternVisionModel.from_state_dict(config.vision_config, strip_prefix(VISION_PREFIX, state_dict),
                                                         torch_dtype, device, attn_implementation)
        language_model = llm_class(config, MODEL_REGISTRY).from_state_dict(
            config.llm_config, strip_prefix(LLM_PREFIX, state_dict), torch_dtype, device,
            attn_implementation=attn_implementation)
        mlp1 = Projector(projector_input_size(config.vision_config.hidden_size, config.downsample_ratio),
                         config.llm_config.hidden_size).to(device=device, dtype=torch_dtype)
        # cast the module first, THEN copy: a float64 checkpoint must not pass through float32 params
        mlp1.load_state_dict({name: _to_tensor(t) for name, t in strip_prefix(PROJECTOR_PREFIX, state_dict).items()})
        return cls(config, vision_model, language_model, mlp1).eval()

    @property
    def device(self) -> torch.device:
        return self.mlp1[0].weight.device

    # ------------------------------------------------------------------ image features

    def pixel_shuffle(self, x: torch.Tensor, scale_factor: float = 0.5) -> torch.Tensor:
        """[n, rows, cols, C] -> [n, rows·s, cols·s, C/s²] with this checkpoint's ps_version."""
        return pixel_shuffle(x, scale_factor, self.ps_version)

    @torch.no_grad()
    def extract_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Tiles -> LLM-space image tokens: ViT layer `select_layer`, drop cls, pixel shuffle, mlp1.

        [n, 3, s, s] -> [n, num_image_token, D]
        """
        pixel_values = torch.as_tensor(pixel_values, device=self.device).to(self.mlp1[0].weight.dtype)
        if self.select_layer == -1:
            vit_embeds = self.vision_model(pixel_values).last_hidden_state
        else:
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
            raise GenerationError("img_context_token_id is not set; set model.img_context_token_id = "
                                  "tokenizer.token_to_id('<IMG_CONTEXT>') (chat and batch_chat do it for you)")
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
                past_key_values=None, use_cache: bool = False, output_hidden_states: bool = False):
        """Full-sequence scoring with the images spliced in; see minivl's InternVLChatModel.forward.

        A count mismatch between <IMG_CONTEXT> tokens and feature rows raises ShapeError, where the
        reference's training forward silently uses the first n_token features and zeroes the loss.
        """
        input_ids = torch.as_tensor(input_ids, device=self.device)
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
                                   use_cache=use_cache, output_hidden_states=output_hidden_states)

    @torch.no_grad()
    def generate(self, pixel_values=None, input_ids=None, attention_mask=None, visual_features=None,
                 **generate_kwargs) -> torch.Tensor:
        """Generate from a prompt with images: only the NEW token ids come back, [b, new]."""
        from torch_impl.generate import generate

        if self.img_context_token_id is None:
            self._context_positions(torch.zeros(1, 1, dtype=torch.int64))  # raises the explanatory error
        input_ids = torch.as_tensor(input_ids, device=self.device)
        if pixel_values is not None or visual_features is not None:
            vit_embeds = visual_features if visual_features is not None else self.extract_feature(pixel_values)
            if not self._context_positions(input_ids).any():
                raise GenerationError("images were given but the prompt has no <IMG_CONTEXT> token; build it "
                                      "with chat() or put '<img>' + '<IMG_CONTEXT>'·n + '</img>' in it")
            input_embeds = self.embed_with_images(input_ids, torch.as_tensor(vit_embeds, device=self.device),
                                                  keep_graph_form=False)
        else:
            input_embeds = self.language_model.embed_tokens(input_ids)
        if attention_mask is not None:
            attention_mask = torch.as_tensor(attention_mask, device=self.device)
        return generate(self.language_model, inputs_embeds=input_embeds, attention_mask=attention_mask,
                        **generate_kwargs)

    # ------------------------------------------------------------------ chat

    def chat(self, tokenizer, pixel_values, question: str, generation_config=None, history=None,
             return_history: bool = False, num_patches_list=None, verbose: bool = False):
        """One chat turn, as InternVLChatModel.chat (see minivl's docstring for the rules)."""
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
        input_ids = torch.tensor([encode(tokenizer, query)], dtype=torch.int64, device=self.device)
        attention_mask = torch.ones_like(input_ids)
        output_ids = self.generate(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask,
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
        """Single-turn answers to several questions at once (left-padded batch), as InternVLChatModel.batch_chat."""
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
        output_ids = self.generate(pixel_values=pixel_values, input_ids=torch.from_numpy(input_ids),
                                   attention_mask=torch.from_numpy(attention_mask),
                                   **generation_kwargs(generation_config, stop_id))
        responses = [tokenizer.decode(row.tolist(), skip_special_tokens=True).split(stop)[0].strip()
                     for row in output_ids]
        if verbose:
            for query, response in zip(queries, responses):
                print(query.replace(IMG_CONTEXT_TOKEN, ""), response)
        return responses


def _to_tensor(value) -> torch.Tensor:
    """A NumPy array (ml_dtypes bf16 included) or tensor as a float tensor (cast later with the module)."""
    if isinstance(value, torch.Tensor):
        return value
    array = np.asarray(value)
    if str(array.dtype) in ("bfloat16",) or array.dtype.kind == "V":
        array = array.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(array))
