"""Load a checkpoint directory (config.json + safetensors) into the NumPy model its model_type names.

    model = load_model("InternVL2-1B/", dtype="float32")                  # the whole chat model
    llm = load_model("InternVL2-1B/", component="language_model")        # its Qwen2 alone

An InternVL chat checkpoint nests its LLM under `language_model.` (and its config under
`llm_config`): `component="language_model"` loads that LLM alone, with the prefix stripped; the
same happens automatically while the chat model class is not available. bf16/fp16 tensors are
read through ml_dtypes (no torch) and upcast to the model dtype.
"""
from __future__ import annotations

import importlib
import os

from minivl.errors import CheckpointError, ConfigError

COMPONENTS = (None, "language_model")
LLM_PREFIX = "language_model."


def resolve_class(registry: dict, model_type: str):
    """model_type -> class, importing its module only now; None if that module does not exist yet."""
    if model_type not in registry:
        raise ConfigError(f"model_type {model_type!r} has no model class; known: {sorted(registry)}")
    module_name, class_name = registry[model_type].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name == module_name:
            return None
        raise
    return getattr(module, class_name, None)


def plan_load(path, component, registry: dict):
    """Decide what to build: -> (config to build with, class, key prefix to strip or '').

    Shared by minivl.loading and torch_impl.loading so both packages load the same thing.
    """
    from minivl.config import load_config

    if not isinstance(path, (str, os.PathLike)):
        raise CheckpointError(f"load_model: the checkpoint path must be a directory path (str or os.PathLike), got "
                              f"{path!r} of type {type(path).__name__}; pass the directory holding config.json and "
                              f"model.safetensors")
    path = os.fspath(path)
    if component not in COMPONENTS:
        raise ConfigError(f"load_model: component must be None (the whole checkpoint) or 'language_model' "
                          f"(the LLM of an InternVL checkpoint), got {component!r}")
    if not os.path.isdir(path):
        raise CheckpointError(f"load_model: {path!r} is not a directory; pass the checkpoint directory that "
                              f"holds config.json and model.safetensors")
    config = load_config(path)
    if config.model_type == "internvl_chat":
        chat_class = resolve_class(registry, "internvl_chat") if component is None else None
        if chat_class is not None:
            return config, chat_class, ""
        config = config.llm_config
        return config, resolve_class(registry, config.model_type), LLM_PREFIX
    if component == "language_model":
        raise ConfigError(f"load_model: component='language_model' needs an InternVL chat checkpoint "
                          f"(model_type 'internvl_chat'), but {path!r} is a {config.model_type!r} checkpoint; "
                          f"load it without component")
    cls = resolve_class(registry, config.model_type)
    if cls is None:
        raise ConfigError(f"load_model: the {config.model_type!r} model class is not available in this install")
    return config, cls, ""


def strip_prefix(state_dict: dict, prefix: str) -> dict:
    """{prefix + key: t} -> {key: t}; keys outside the prefix (vision_model., mlp1.) are dropped."""
    if not prefix:
        return state_dict
    # keys first, so the tensors outside the prefix are never read from a lazily loaded file
    inner = {k[len(prefix):]: state_dict[k] for k in state_dict if k.startswith(prefix)}
    if not inner:
        raise CheckpointError(f"load_model: no tensor starts with {prefix!r}; this checkpoint holds no nested "
                              f"LLM (first keys: {sorted(state_dict)[:3]})")
    return inner


# config fields that size the tensors: when config.json leaves one out, the class default (the
# reference's, e.g. Llama's hidden_size 4096) builds a model the weights cannot fit
# (fields whose default is usually right, such as num_key_value_heads = heads or head_dim, are not listed)
SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "d_model", "n_heads", "n_layers", "expansion_ratio", "image_size", "patch_size")
_DTYPE_ERROR = ("NumPy models compute in float32 or float64: dtype='float32' or 'float64' (got {dtype!r}); "
                "bf16/fp16 checkpoints are upcast on load, and torch_impl runs bfloat16/float16")


def check_dtype(dtype) -> None:
    """ConfigError, before any file is read, unless dtype names float32 or float64."""
    import numpy as np

    try:
        name = dtype if isinstance(dtype, str) else str(np.dtype(dtype)) if dtype is not None else None
    except (TypeError, ValueError):
        name = None
    if name not in ("float32", "float64"):
        raise ConfigError(_DTYPE_ERROR.format(dtype=dtype))


def defaulted_size_fields(path, config, prefix: str = "") -> list[str]:
    """'section.field (default)' for each tensor-sizing field config.json leaves to its class default."""
    from minivl.config.base import read_config_json

    try:
        raw, _ = read_config_json(path)
    except ConfigError:
        return []
    if prefix:  # the LLM of a chat checkpoint: `config` is its llm_config
        sections = [("llm_config.", raw.get("llm_config"), config)]
    elif getattr(config, "model_type", None) == "internvl_chat":
        sections = [(f"{name}.", raw.get(name), getattr(config, name, None))
                    for name in ("llm_config", "vision_config")]
    else:
        sections = [("", raw, config)]
    found = []
    for section, given, built in sections:
        if not isinstance(given, dict) or built is None:
            continue
        for field in SIZE_FIELDS:
            if field not in given and field in getattr(type(built), "__dataclass_fields__", {}):
                found.append(f"{section}{field} ({getattr(built, field)!r})")
    return found


def load_model(path, dtype="float32", component=None, allow_nonfinite=False):
    """Read `path` (config.json + model.safetensors or shards) into the matching NumPy model.

    dtype: 'float32' (the reference's float32 run) or 'float64' (gold). component: None or
    'language_model' (the LLM of an InternVL chat checkpoint, its prefix stripped).
    Int/bool weights, and NaN/inf ones unless allow_nonfinite=True, are a CheckpointError naming them.
    """
    from minivl.checkpoint import check_weights, load_state_dict
    from minivl.models import MODEL_REGISTRY

    check_dtype(dtype)
    config, cls, prefix = plan_load(path, component, MODEL_REGISTRY)
    state_dict = strip_prefix(load_state_dict(path), prefix)
    check_weights(state_dict, where=os.fspath(path), allow_nonfinite=allow_nonfinite)
    try:
        return cls.from_state_dict(config, state_dict, dtype)
    except CheckpointError as error:
        defaulted = defaulted_size_fields(path, config, prefix)
        if not defaulted:
            raise
        first, *rest = str(error).split("\n")
        note = (f"  note: {os.path.join(os.fspath(path), 'config.json')} does not set {', '.join(defaulted)}, so "
                f"the class defaults shown were used; write the checkpoint's real values into config.json")
        raise CheckpointError("\n".join([first, note, *rest])) from None  # the likely cause before the lists
