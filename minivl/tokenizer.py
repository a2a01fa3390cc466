"""Text <-> token ids for the real checkpoints: a thin wrapper around a Hugging Face `tokenizers.Tokenizer`
(a `tokenizer.json`), plus the ChatML conversation format that SmolLM2 (and InternVL2's Qwen2/InternLM2
chat models) are trained on, and an incremental decoder for streaming.

ChatML, one turn per message:

    <|im_start|>{role}\\n{content}<|im_end|>\\n

a default system turn first when the conversation has none, and the generation prompt
`<|im_start|>assistant\\n` at the end; the model's answer stops at `<|im_end|>`.

The tokenizer is byte-level BPE: every byte of UTF-8 is a symbol, so one token may end in the middle
of a multi-byte character ("é" = 2 bytes, "😀" = 4). Streaming text therefore decodes the ids seen so
far and prints only the new, complete characters (`IncrementalDecoder`).

`load_tokenizer(directory)` reads a checkpoint's tokenizer.json, else its SentencePiece tokenizer.model
as InternLM2's tokenizer (minivl/tokenizer_internlm2.py: InternVL2-2B/-8B/-26B ship only that).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from minivl.errors import CheckpointError, GenerationError

# the tokenizer files minivl reads, in the order it looks for them
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")

SMOLLM2_SYSTEM_MESSAGE = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
_REPLACEMENT = "\ufffd"  # what decoding prints for bytes that do not (yet) form a whole character


def read_tokenizer_config(directory: str | os.PathLike) -> dict:
    """directory/tokenizer_config.json as a dict ({} when the file is absent); CheckpointError if it is not JSON."""
    config_file = Path(directory) / "tokenizer_config.json"
    if not config_file.is_file():
        return {}
    try:
        settings = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{config_file} is not valid JSON ({e}); re-download it") from None
    check_tokenizer_config(settings, config_file)
    return settings


# the tokenizer_config.json fields minivl reads, and the JSON types each may have (null: absent)
_TOKEN_FIELDS = ("bos_token", "eos_token", "pad_token", "unk_token")
_FLAG_FIELDS = ("add_bos_token", "add_eos_token", "clean_up_tokenization_spaces")


def check_tokenizer_config(settings, config_file) -> None:
    """CheckpointError naming the field, unless the fields minivl reads have the types transformers writes.

    A special token is a string or an AddedToken object {"content": string, ...}; chat_template a
    string (or transformers' list of named templates); the add_*/clean_up flags true or false (null:
    absent, as for every field).
    """
    def bad(field, value, expected):
        return CheckpointError(f"{config_file}: {field} is {value!r} ({type(value).__name__}); it must be {expected}. "
                               "Fix or re-download the checkpoint's tokenizer_config.json")

    if not isinstance(settings, dict):
        raise bad("the file", settings, "a JSON object of settings")
    for field in _TOKEN_FIELDS:
        value = settings.get(field)
        if value is not None and not isinstance(token_content(value), str):
            raise bad(field, value, 'a token string or an object {"content": "<token>"}')
    for field in _FLAG_FIELDS:
        if settings.get(field) is not None and not isinstance(settings[field], bool):
            raise bad(field, settings[field], "true or false")
    template = settings.get("chat_template")
    if template is not None and not isinstance(template, (str, list)):
        raise bad("chat_template", template, "a template string")
    system = settings.get("default_system_message")
    if system is not None and not isinstance(system, str):
        raise bad("default_system_message", system, "a string")
    added = settings.get("added_tokens_decoder") or {}
    if not isinstance(added, dict) or not all(
            str(key).isdigit() and isinstance(token_content(token), str) for key, token in added.items()):
        raise bad("added_tokens_decoder", added, 'an object {"<id>": {"content": "<token>"}, ...}')
    special = settings.get("additional_special_tokens") or []
    if not isinstance(special, list) or not all(isinstance(token_content(token), str) for token in special):
        raise bad("additional_special_tokens", special, "a list of token strings")


def token_content(token):
    """A token as tokenizer_config.json writes it: a string, or an AddedToken dict whose text is "content"."""
    return token.get("content") if isinstance(token, dict) else token


def check_text(text, what: str = "text") -> str:
    """`text` if it is a str that UTF-8 can encode; GenerationError otherwise.

    Bytes that are not UTF-8 on the command line reach Python as lone surrogates ("\\udcff" for the
    byte 0xff); neither tokenizers nor SentencePiece can take them.
    """
    if not isinstance(text, str):
        raise GenerationError(f"{what} must be a str (encode() takes a str), got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        byte = text[e.start]
        shown = f"byte 0x{ord(byte) - 0xDC00:02x}" if 0xDC80 <= ord(byte) <= 0xDCFF else f"lone surrogate {byte!r}"
        raise GenerationError(f"{what} is not valid UTF-8 (it holds the {shown}); pass UTF-8 text "
                              "(a file: convert it with iconv -t utf-8)") from None
    return text


def decode_ids(ids, vocab_size: int) -> list[int]:
    """`ids` (a list, tuple, iterable or 1-d array of whole numbers) as a list of ints inside [0, vocab_size),
    or a GenerationError naming what is wrong: a str, None, a 2-d batch, floats (1.5 is not truncated), bools."""
    if isinstance(ids, (str, bytes)):
        raise GenerationError(f"decode() takes token ids, got a {type(ids).__name__}; to tokenize text use encode()")
    if not hasattr(ids, "__array__") and not isinstance(ids, (list, tuple)):
        try:
            ids = list(ids)  # a generator or range of ids
        except TypeError:
            raise GenerationError(f"decode() takes a list or 1-d array of token ids, got "
                                  f"{type(ids).__name__}") from None
    try:
        array = np.asarray(ids)
    except ValueError:  # ragged nested lists
        array = np.asarray(None)
    if array.size == 0 and array.ndim == 1:
        return []
    if array.ndim != 1:
        raise GenerationError(f"decode() takes one sequence of token ids, got shape {tuple(array.shape)}; decode a "
                              f"batch row by row: [tokenizer.decode(row) for row in ids]")
    if array.dtype.kind not in "iu":
        raise GenerationError(f"token ids must be integers, got dtype {array.dtype} (e.g. {array[0]!r})")
    bad = [int(i) for i in array if not 0 <= i < vocab_size]
    if bad:
        raise GenerationError(f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    return [int(i) for i in array]


class Tokenizer:
    """A tokenizer.json plus the roles of its special tokens and a ChatML template.

    `encode` never adds a BOS unless the checkpoint says so (SmolLM2: add_bos_token False);
    special tokens written in the text (`<|im_start|>`) are matched whole, never split into bytes.
    """

    def __init__(self, backend, *, bos_token=None, eos_token=None, pad_token=None, unk_token=None,
                 add_bos_token=False, default_system_message=None, stop_tokens=None):
        self.backend = backend  # the tokenizers.Tokenizer
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self.add_bos_token = bool(add_bos_token)
        self.default_system_message = default_system_message
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            token = getattr(self, name)
            if token is not None and self.token_to_id(token) is None:
                raise CheckpointError(f"tokenizer_config.json names {name}={token!r}, which is not in the vocabulary")
        # generation stops at any of these (ChatML: <|im_end|>, plus the end-of-text token if present)
        stops = stop_tokens if stop_tokens is not None else [eos_token, "<|im_end|>", "<|endoftext|>"]
        self.stop_token_ids = sorted({self.token_to_id(t) for t in stops
                                      if t is not None and self.token_to_id(t) is not None})

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Tokenizer":
        """From a checkpoint directory (tokenizer.json + tokenizer_config.json) or a tokenizer.json file."""
        from tokenizers import Tokenizer as Backend

        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise CheckpointError(f"no tokenizer.json at {file}; a checkpoint directory needs one "
                                  "(minivl convert smollm2 writes it for SmolLM2)")
        try:
            backend = Backend.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise CheckpointError(f"cannot read {file} as a tokenizers JSON file ({e}); re-create it") from None
        settings = read_tokenizer_config(file.parent)

        def role(name):
            return token_content(settings.get(name))

        system = settings.get("default_system_message")
        if system is None and SMOLLM2_SYSTEM_MESSAGE in (settings.get("chat_template") or ""):
            system = SMOLLM2_SYSTEM_MESSAGE
        return cls(backend, bos_token=role("bos_token"), eos_token=role("eos_token"),
                   pad_token=role("pad_token"), unk_token=role("unk_token"),
                   add_bos_token=settings.get("add_bos_token", False), default_system_message=system)

    # ------------------------------------------------------------------ vocabulary

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(int(token_id))

    def _id(self, token):
        return None if token is None else self.token_to_id(token)

    @property
    def bos_token_id(self):
        return self._id(self.bos_token)

    @property
    def eos_token_id(self):
        return self._id(self.eos_token)

    @property
    def pad_token_id(self):
        return self._id(self.pad_token)

    @property
    def unk_token_id(self):
        return self._id(self.unk_token)

    @property
    def special_tokens(self) -> list[str]:
        """Every special (control) token, in id order."""
        added = self.backend.get_added_tokens_decoder()
        return [added[i].content for i in sorted(added) if added[i].special]

    @property
    def special_token_ids(self) -> list[int]:
        return [self.token_to_id(t) for t in self.special_tokens]

    # ------------------------------------------------------------------ text <-> ids

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. `add_special_tokens=True` prepends BOS only if the checkpoint asks for it."""
        check_text(text, "the text to tokenize")
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of token ids (a list, or a 1-d array); special tokens dropped unless asked for."""
        ids = decode_ids(ids, self.vocab_size)
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ chat

    def apply_chat_template(self, messages, add_generation_prompt: bool = True,
                            system_message: str | None = None) -> str:
        """ChatML text of a conversation, as SmolLM2's chat template renders it.

        messages: [{"role": "system"|"user"|"assistant", "content": str}, ...]. When the first message
        is not a system turn, a system turn with `system_message` (default: the checkpoint's default,
        SmolLM2's "You are a helpful AI assistant named SmolLM, ...") comes first.
        """
        if isinstance(messages, dict) or not all(isinstance(m, dict) for m in messages):
            raise GenerationError("messages must be a list of {'role': ..., 'content': ...} dicts")
        for m in messages:
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise GenerationError(f"each message needs a str 'role' and a str 'content', got {m!r}")
        turns = list(messages)
        system = system_message if system_message is not None else self.default_system_message
        if system is not None and (not turns or turns[0]["role"] != "system"):
            turns = [{"role": "system", "content": system}] + turns
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in turns)
        if add_generation_prompt:
            text += "<|im_start|>assistant\n"
        return text

    def encode_chat(self, messages, add_generation_prompt: bool = True, system_message: str | None = None) -> list[int]:
        """Token ids of `apply_chat_template(messages, ...)`, after a BOS if the tokenizer prepends one.

        (InternLM2's and Phi-3's chat templates begin with `{{ bos_token }}`; SmolLM2's and Qwen2's with none.)
        """
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, system_message),
                           add_special_tokens=True)

    def incremental_decoder(self, skip_special_tokens: bool = True) -> "IncrementalDecoder":
        return IncrementalDecoder(self, skip_special_tokens)


class IncrementalDecoder:
    """Streams text from token ids arriving one at a time, never printing half a character.

    Byte-level BPE tokens are byte strings, so decoding token by token would break a multi-byte
    character across two tokens into two replacement characters. Instead: decode ALL ids so far and
    return the new suffix; hold it back while it ends in an incomplete character (U+FFFD).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""  # what has been returned so far

    def add(self, token_ids) -> str:
        """Append token id(s); return the newly completed text ("" if none yet)."""
        self.ids.extend(int(i) for i in ([token_ids] if isinstance(token_ids, int) else token_ids))
        full = self.tokenizer.decode(self.ids, self.skip_special_tokens)
        # trailing spaces wait for the next token: a decoder may still remove them (InternLM2 cleans
        # "a ." up to "a."), and what has been printed cannot be taken back
        stable = full.rstrip(" ")
        if stable.endswith(_REPLACEMENT) or not stable.startswith(self.text):
            return ""  # an unfinished UTF-8 sequence: wait for the next token
        new, self.text = stable[len(self.text):], stable
        return new

    def flush(self) -> str:
        """Whatever is left at the end (an incomplete character becomes U+FFFD)."""
        full = self.tokenizer.decode(self.ids, self.skip_special_tokens)
        new, self.text = full[len(self.text):] if full.startswith(self.text) else "", full
        return new


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a checkpoint directory: tokenizer.json (the `tokenizers` library's), else a
    SentencePiece tokenizer.model read as InternLM2's (InternVL2-2B/-8B/-26B), each with its
    tokenizer_config.json."""
    directory = Path(directory)
    if (directory / "tokenizer.json").is_file():
        return Tokenizer.from_file(directory)
    if (directory / "tokenizer.model").is_file():
        from minivl.tokenizer_internlm2 import InternLM2Tokenizer

        return InternLM2Tokenizer.from_file(directory)
    raise CheckpointError(f"{directory} has no tokenizer: minivl reads tokenizer.json (a `tokenizers` JSON) or "
                          f"tokenizer.model (SentencePiece, as InternLM2 ships it), with tokenizer_config.json; "
                          f"copy the checkpoint's tokenizer files into the directory")
