"""transformers' Auto classes for minivl: AutoConfig, AutoModel and AutoModelForCausalLM load InternVL checkpoints.

    import torch_impl.auto          # registers the classes below; the only module that imports transformers
    from transformers import AutoConfig, AutoModel
    config = AutoConfig.from_pretrained("InternVL2-2B/")   # InternVLChatConfig; .llm_config an InternLM2Config
    model = AutoModel.from_pretrained("InternVL2-2B/", dtype=torch.bfloat16)
    model(pixel_values, input_ids).logits                  # torch_impl's model: same logits as load_model
    model.save_pretrained("copy/")                         # read back by minivl, torch_impl and AutoModel

Registered: the model types transformers does not have, with the class names InternVL's own
`auto_map` uses: `internvl_chat` (InternVLChatConfig; AutoModel and AutoModelForCausalLM ->
InternVLChatModel), `intern_vit_6b` (InternVisionConfig; AutoModel -> InternVisionModel) and
`internlm2` (InternLM2Config; AutoModel and AutoModelForCausalLM -> InternLM2ForCausalLM).

Not registered: llama, qwen2, phi3 and mpt belong to transformers, and registering over them would
change what every transformers user in the process gets; their own classes load those checkpoints
(they are minivl's references in the parity tests). Inside an InternVL config, though, `llm_config`
is read with this module's Llama / Qwen2 / Phi3 configs, in the layout InternVL writes (it pins
transformers 4.37): transformers 5's own classes turn rope_theta into `rope_parameters` and drop it
from to_dict, and its Phi3Config refuses a LongRoPE config whose original_max_position_embeddings is
a top-level key (InternVL vendors its own Phi3Config for that reason too).

The configs are transformers `PretrainedConfig`s whose fields, defaults and validation are minivl's
(minivl.config): a bad value raises minivl's ConfigError. The models are torch_impl's own classes
(what `torch_impl.load_model` returns) with `from_pretrained` / `save_pretrained` added; they are not
`PreTrainedModel`s, so transformers' `generate`, Trainer and hub features do not apply: use
`model.chat` / `model.generate` (torch_impl's). Local directories only: nothing is downloaded.

trust_remote_code: minivl's checkpoints keep InternVL's auto_map, with the .py files it names written
beside config.json (minivl/auto_map.py, one import from this module each). So in a process that has
not imported this module, `AutoModel.from_pretrained(dir, trust_remote_code=True)` imports them and
loads minivl's model; once this module is imported, transformers prefers the registered classes
whatever trust_remote_code says (its rule for explicitly registered code).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import ClassVar

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PretrainedConfig

import minivl.config as minivl_config
from minivl.errors import CheckpointError, ConfigError

# keys transformers passes to a config's __init__ that are run-time settings, not config.json fields
_RUNTIME_KEYS = ("name_or_path", "num_labels", "output_attentions", "experts_implementation", "dtype")


def _dtype_name(value):
    """torch.bfloat16 -> 'bfloat16' (config.json spells dtypes as strings); strings pass through."""
    return str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else value


# ----------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------

class MinivlConfig(PretrainedConfig):
    """A PretrainedConfig holding one minivl config's keys as attributes; minivl validates and fills defaults.

    `to_minivl()` is the minivl config of the current attribute values; `to_dict()` is its config.json dict.
    """

    minivl_class: ClassVar[type] = None

    def __init_subclass__(cls, **kwargs):
        # PretrainedConfig makes every subclass a dataclass with a generated __init__ unless the class
        # defines one itself: give each subclass this class's __init__ as its own
        cls.__init__ = MinivlConfig.__init__
        super().__init_subclass__(**kwargs)

    def __init__(self, **kwargs):
        runtime = {key: kwargs.pop(key) for key in _RUNTIME_KEYS if key in kwargs}
        if "torch_dtype" in kwargs:
            kwargs["torch_dtype"] = _dtype_name(kwargs["torch_dtype"])
        config = self.minivl_class.from_dict(kwargs)   # ConfigError on a value the reference would refuse
        super().__init__(**runtime)
        values = config.to_dict()
        values.pop("model_type")
        self.__dict__["_minivl_keys"] = list(values)
        for key, value in values.items():
            self.__dict__[key] = self._wrap(key, value)

    def _wrap(self, key, value):
        """A nested config dict as its PretrainedConfig (the chat config overrides this)."""
        return value

    # PretrainedConfig has properties of these names (transformers 5 keeps them in rope_parameters and
    # dtype); here they are the config.json keys themselves, as in the 4.37 layout InternVL writes
    rope_scaling = property(lambda self: self.__dict__.get("rope_scaling"),
                            lambda self, value: self.__dict__.__setitem__("rope_scaling", value))
    torch_dtype = property(lambda self: self.__dict__.get("torch_dtype"),
                           lambda self, value: self.__dict__.__setitem__("torch_dtype", _dtype_name(value)))

    def to_minivl(self):
        """The minivl config of the current values (nested configs included)."""
        values = {key: self.__dict__[key] for key in self.__dict__["_minivl_keys"]}
        values = {key: value.to_minivl().to_dict() if isinstance(value, MinivlConfig) else value
                  for key, value in values.items()}
        values["torch_dtype"] = _dtype_name(values.get("torch_dtype"))
        return self.minivl_class.from_dict(values)

    def to_dict(self) -> dict:
        """config.json's dict, as minivl writes it (InternVL's layout)."""
        return self.to_minivl().to_dict()

    def to_diff_dict(self) -> dict:
        return self.to_dict()

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs) -> None:
        """Write save_directory/config.json (and the .py files its auto_map names); no hub."""
        if push_to_hub:
            raise CheckpointError("minivl's configs are saved to local directories only (push_to_hub=False)")
        from minivl.auto_map import write_auto_map_modules

        self.to_minivl().save_pretrained(save_directory)
        write_auto_map_modules(save_directory)


class InternVisionConfig(MinivlConfig):
    """InternViT (300M / 6B): minivl.config.InternVisionConfig."""

    model_type = "intern_vit_6b"
    minivl_class = minivl_config.InternVisionConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Also from a chat checkpoint: its nested vision_config, as the reference's from_pretrained."""
        config_dict, kwargs = cls.get_config_dict(pretrained_model_name_or_path, **kwargs)
        return cls.from_dict(config_dict.get("vision_config", config_dict), **kwargs)


class InternLM2Config(MinivlConfig):
    """InternLM2 (InternVL2-2B/-8B/-26B's LLM): minivl.config.InternLM2Config."""

    model_type = "internlm2"
    minivl_class = minivl_config.InternLM2Config


class Phi3Config(MinivlConfig):
    """Phi-3 as an InternVL llm_config (InternVL's vendored Phi3Config); not registered: phi3 is transformers'."""

    model_type = "phi3"
    minivl_class = minivl_config.Phi3Config


class LlamaConfig(MinivlConfig):
    """Llama as an InternVL llm_config, in transformers 4.37's layout; not registered: llama is transformers'."""

    model_type = "llama"
    minivl_class = minivl_config.LlamaConfig


class Qwen2Config(MinivlConfig):
    """Qwen2 as an InternVL llm_config, in transformers 4.37's layout; not registered: qwen2 is transformers'."""

    model_type = "qwen2"
    minivl_class = minivl_config.Qwen2Config


# InternVLChatConfig picks the llm_config class from architectures[0], as the reference does
LLM_CONFIGS = {"LlamaForCausalLM": LlamaConfig, "InternLM2ForCausalLM": InternLM2Config,
               "Phi3ForCausalLM": Phi3Config, "Qwen2ForCausalLM": Qwen2Config}


class InternVLChatConfig(MinivlConfig):
    """InternVL's chat config: `vision_config` an InternVisionConfig, `llm_config` the class its
    architectures[0] names, `hidden_size` the LLM's, tie_word_embeddings False on both (minivl's rules,
    which are InternVLChatConfig.__init__'s)."""

    model_type = "internvl_chat"
    minivl_class = minivl_config.InternVLChatConfig

    def _wrap(self, key, value):
        if key == "vision_config":
            return InternVisionConfig(**value)
        if key == "llm_config":
            return LLM_CONFIGS[value["architectures"][0]](**value)
        return value


# ----------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------

class MinivlAutoModel:
    """from_pretrained / save_pretrained for torch_impl's models; the three model classes below are this.

    The loaded object is exactly what torch_impl.load_model returns, its class extended by the model
    class (`isinstance(model, InternVLChatModel)` and torch_impl's class both hold), so state_dict()
    keys are the checkpoint's, forward / chat / generate are torch_impl's, and `config` is the minivl
    config the model runs on.
    """

    config_class: ClassVar[type] = None
    _auto_class: ClassVar[str | None] = None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, dtype=None, torch_dtype=None,
                        attn_implementation=None, device=None, device_map=None, **kwargs):
        """Load a local checkpoint directory with torch_impl.load_model.

        dtype (or torch_dtype): torch.float32 (default, as torch_impl.load_model), float64, bfloat16,
        float16, or "auto" for the checkpoint's torch_dtype; attn_implementation: eager (default) | sdpa |
        flash | triton; device or device_map: one device ('cpu', 'cuda', 'cuda:0').
        """
        import torch_impl

        path = os.fspath(pretrained_model_name_or_path)
        if model_args:
            raise TypeError(f"{cls.__name__}.from_pretrained takes no positional model arguments")
        if not os.path.isdir(path):
            raise CheckpointError(f"{path!r} is not a local checkpoint directory; minivl never downloads, "
                                  f"pass the directory that holds config.json and the safetensors")
        _check_hub_kwargs(kwargs)
        on_disk = minivl_config.load_config(path)
        dtype = dtype if dtype is not None else torch_dtype
        # transformers moves from_pretrained's attn_implementation into the config it builds
        requested = config.__dict__.get("attn_implementation") if config is not None else None
        if attn_implementation is None and requested != on_disk.to_dict().get("attn_implementation"):
            attn_implementation = requested
        if config is not None and _modelled_fields(config.to_minivl()) != _modelled_fields(on_disk):
            raise ConfigError(f"{cls.__name__}.from_pretrained: the config passed differs from {path}/config.json, "
                              f"and minivl builds the model from the directory; save the changed config there "
                              f"first (config.save_pretrained({path!r}))")
        if dtype == "auto":  # the stored dtype ("dtype" is the key transformers 5 writes)
            dtype = on_disk.torch_dtype or on_disk.to_dict().get("dtype") or "float32"
        if isinstance(device_map, dict) or device_map == "auto":
            raise ConfigError(f"device_map={device_map!r}: minivl loads the whole model onto one device; "
                              f"pass device_map='cuda' (or device='cuda')")
        if on_disk.model_type != cls.config_class.model_type:
            raise CheckpointError(f"{path}: model_type is {on_disk.model_type!r}, not {cls.config_class.model_type!r} "
                                  f"as {cls.__name__} needs; load it with AutoModel, which picks the class from it")
        model = torch_impl.load_model(path, dtype=_dtype_name(dtype) or "float32",
                                      device=str(device or device_map or "cpu"),
                                      attn_implementation=attn_implementation or "eager")
        model.__class__ = _extended(cls, type(model))  # the same object, now with save_pretrained
        return model

    def save_pretrained(self, save_directory, max_shard_size: int | None = None, push_to_hub: bool = False,
                        **kwargs) -> str:
        """Write config.json (torch_dtype = the model's dtype), the safetensors and the auto_map's .py files."""
        from minivl.auto_map import write_auto_map_modules
        from torch_impl.checkpoint import save_checkpoint

        if push_to_hub:
            raise CheckpointError("minivl saves to local directories only (push_to_hub=False)")
        _check_hub_kwargs(kwargs)
        state_dict = self.state_dict()
        dtypes = {t.dtype for t in state_dict.values() if t.is_floating_point()}
        config = self.config.to_dict()
        if len(dtypes) == 1:
            # the tensors' dtype; "dtype" is transformers 5's name for the same key, which it reads first
            config["torch_dtype"] = _dtype_name(dtypes.pop())
            config.pop("dtype", None)
        save_checkpoint(save_directory, config, state_dict, max_shard_size)
        write_auto_map_modules(save_directory)
        return os.fspath(save_directory)

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModel"):
        """What transformers calls on a class it loaded through trust_remote_code."""
        cls._auto_class = auto_class if isinstance(auto_class, str) else auto_class.__name__


def _modelled_fields(config) -> dict:
    """The values a minivl config models, nested configs included; its unknown keys (`extra`), the stored
    dtype and InternLM2's attn_implementation (both from_pretrained's run-time choices) left out."""
    return {field.name: _modelled_fields(value) if dataclasses.is_dataclass(value) else value
            for field in dataclasses.fields(config) if field.name not in ("extra", "torch_dtype", "attn_implementation")
            for value in [getattr(config, field.name)]}


# keyword arguments transformers passes along (hub, loading info) that mean nothing for a local directory
# read by torch_impl: accepted and ignored; safetensors is the only format written anyway
_IGNORED_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token",
                   "code_revision", "trust_remote_code", "adapter_kwargs", "_from_auto", "_commit_hash",
                   "use_safetensors", "low_cpu_mem_usage", "safe_serialization")


def _check_hub_kwargs(kwargs: dict) -> None:
    unknown = sorted(key for key in kwargs if key not in _IGNORED_KWARGS)
    if unknown:
        raise ConfigError(f"minivl's from_pretrained / save_pretrained do not support {unknown}; "
                          f"they read and write local directories with torch_impl")
    for key in ("subfolder", "revision", "code_revision"):
        if kwargs.get(key) not in (None, "", "main"):
            raise ConfigError(f"{key}={kwargs[key]!r}: minivl reads the directory itself, with no {key}")


@functools.cache
def _extended(model_class: type, torch_impl_class: type) -> type:
    """torch_impl's class with one of the model classes below (from_pretrained / save_pretrained) in front."""
    return type(torch_impl_class.__name__, (model_class, torch_impl_class), {"__module__": __name__})


class InternVLChatModel(MinivlAutoModel):
    """InternVL's chat model (AutoModel and AutoModelForCausalLM of internvl_chat): torch_impl's."""

    config_class = InternVLChatConfig


class InternVisionModel(MinivlAutoModel):
    """InternViT (AutoModel of intern_vit_6b): torch_impl's."""

    config_class = InternVisionConfig


class InternLM2ForCausalLM(MinivlAutoModel):
    """InternLM2 (AutoModel and AutoModelForCausalLM of internlm2): torch_impl's."""

    config_class = InternLM2Config


REGISTERED = {  # model_type -> (config class, {Auto class: model class})
    "internvl_chat": (InternVLChatConfig, {AutoModel: InternVLChatModel, AutoModelForCausalLM: InternVLChatModel}),
    "intern_vit_6b": (InternVisionConfig, {AutoModel: InternVisionModel}),
    "internlm2": (InternLM2Config, {AutoModel: InternLM2ForCausalLM, AutoModelForCausalLM: InternLM2ForCausalLM}),
}


def register() -> None:
    """Register the configs with AutoConfig and the models with AutoModel / AutoModelForCausalLM (idempotent)."""
    for model_type, (config_class, models) in REGISTERED.items():
        AutoConfig.register(model_type, config_class, exist_ok=True)
        for auto_class, model_class in models.items():
            auto_class.register(config_class, model_class, exist_ok=True)


register()
