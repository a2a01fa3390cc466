"""The machinery under minivl.config: reading/writing config.json, value checks, and `BaseConfig`.

`BaseConfig` gives every config class from_dict / to_dict / from_pretrained / save_pretrained, and
keeps the config.json keys a class does not model in `extra` so a round trip loses nothing.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

from minivl.errors import ConfigError
from minivl.files import write_text_atomic

CONFIG_NAME = "config.json"


# ----------------------------------------------------------------------------------------------
# reading config.json
# ----------------------------------------------------------------------------------------------

def _config_path(dir_or_file: str | os.PathLike) -> str:
    """A checkpoint directory means its config.json; a file path means that file."""
    path = os.fspath(dir_or_file)
    return os.path.join(path, CONFIG_NAME) if os.path.isdir(path) else path


def read_config_json(dir_or_file: str | os.PathLike) -> tuple[dict, str]:
    """Read a config.json (or a checkpoint directory's). Returns `(dict, path)`; ConfigError on failure."""
    path = _config_path(dir_or_file)
    if os.path.exists(path) and not os.path.isfile(path):
        raise ConfigError(f"{path}: is a directory or other non-file, not a config file; put the checkpoint's "
                          f"{CONFIG_NAME} file there (re-download or re-write it)")
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such config file; pass a checkpoint directory holding "
                          f"{CONFIG_NAME} or the path of a config.json")
    try:
        with open(path, encoding="utf-8") as f:
            config_dict = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid JSON ({err}); re-download or re-write the config file") from None
    except RecursionError:  # json nests one Python call per bracket
        raise ConfigError(f"{path}: nested too deeply to be a config (thousands of brackets); re-download or "
                          f"re-write the config file") from None
    if not isinstance(config_dict, dict):
        raise ConfigError(f"{path}: a config must be a JSON object, got {type(config_dict).__name__}")
    return config_dict, path


def _write_config_json(config_dict: dict, directory: str | os.PathLike) -> str:
    """directory/config.json, atomically: sorted keys and a trailing newline, as transformers writes them."""
    return write_text_atomic(os.path.join(os.fspath(directory), CONFIG_NAME),
                             json.dumps(config_dict, indent=2, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------------------------
# value checks shared by the classes
# ----------------------------------------------------------------------------------------------

def describe(value: Any) -> str:
    return f"{value!r} of type {type(value).__name__}"


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int or a finite float (not a bool): JSON's NaN / Infinity, which Python's json reads, are no
    size, rate or epsilon, and would pass every `value <= 0` style range check unnoticed."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ----------------------------------------------------------------------------------------------
# the shared base
# ----------------------------------------------------------------------------------------------

@dataclass(kw_only=True)
class BaseConfig:
    """from_dict / to_dict / from_pretrained / save_pretrained, and unknown keys kept in `extra`."""

    model_type: ClassVar[str] = ""
    # keys of the reference's PretrainedConfig that every config.json may carry
    architectures: list | None = None
    torch_dtype: str | None = None
    # config.json keys this class does not model, written back unchanged by to_dict
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError if a field has a value the reference would reject."""

    # -- error helpers -------------------------------------------------------------------------
    def _error(self, name: str, value: Any, allowed: str, fix: str = "") -> ConfigError:
        fix = f"; {fix}" if fix else ""
        return ConfigError(f"{type(self).__name__}: {name} must be {allowed} (got {describe(value)}){fix}")

    def _check_int(self, name: str, minimum: int = 1) -> None:
        value = getattr(self, name)
        if not is_int(value) or value < minimum:
            raise self._error(name, value, f"an integer >= {minimum}")

    def _check_probability(self, name: str) -> None:
        value = getattr(self, name)
        if not is_number(value) or not 0.0 <= value <= 1.0:
            raise self._error(name, value, "a number in [0, 1]")

    def _check_positive_number(self, name: str) -> None:
        value = getattr(self, name)
        if not is_number(value) or value <= 0:
            raise self._error(name, value, "a number > 0")

    def _check_choice(self, name: str, allowed: tuple, fix: str = "") -> None:
        value = getattr(self, name)
        if value not in allowed:
            raise self._error(name, value, f"one of {list(allowed)}", fix)

    def _check_divides(self, numerator: str, denominator: str) -> None:
        top, bottom = getattr(self, numerator), getattr(self, denominator)
        if top % bottom != 0:
            raise ConfigError(f"{type(self).__name__}: {numerator} ({top}) must be divisible by "
                              f"{denominator} ({bottom}); change one of them")

    # -- dict and file round trip ---------------------------------------------------------------
    @classmethod
    def _field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name != "extra"]

    @classmethod
    def from_dict(cls, config_dict: dict):
        """Build from a config.json dict; keys that are not fields go to `extra`."""
        if not isinstance(config_dict, dict):
            raise ConfigError(f"{cls.__name__}.from_dict needs a dict, got {type(config_dict).__name__}")
        remaining = copy.deepcopy(config_dict)
        model_type = remaining.pop("model_type", None)
        if model_type not in (None, "", cls.model_type):
            raise ConfigError(f"{cls.__name__}: model_type must be {cls.model_type!r} (got {model_type!r}); "
                              f"use load_config() to pick the class from model_type")
        known = {name: remaining.pop(name) for name in cls._field_names() if name in remaining}
        return cls(**known, extra=remaining)

    def to_dict(self) -> dict:
        """The config.json dict: model_type, every field, then the preserved unknown keys."""
        out: dict[str, Any] = {"model_type": self.model_type}
        for name in self._field_names():
            value = getattr(self, name)
            out[name] = value.to_dict() if isinstance(value, BaseConfig) else copy.deepcopy(value)
        out.update(copy.deepcopy(self.extra))
        return out

    @classmethod
    def from_pretrained(cls, dir_or_file: str | os.PathLike):
        """Load from a checkpoint directory or a config.json path; errors name the file."""
        config_dict, path = read_config_json(dir_or_file)
        return cls._from_file_dict(config_dict, path)

    @classmethod
    def _from_file_dict(cls, config_dict: dict, path: str):
        try:
            return cls.from_dict(config_dict)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None

    def save_pretrained(self, directory: str | os.PathLike) -> str:
        """Write `directory/config.json`; returns its path."""
        return _write_config_json(self.to_dict(), directory)
