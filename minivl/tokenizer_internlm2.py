"""InternLM2's tokenizer: a SentencePiece `tokenizer.model` plus the tokens InternVL adds, as InternVL2-2B,
-8B and -26B ship it (InternLM2Tokenizer, `tokenization_internlm2.py`, remote code; no tokenizer.json).

    tokenizer = InternLM2Tokenizer.from_file("InternVL2-2B/")    # tokenizer.model + tokenizer_config.json
    tokenizer.encode("<|im_start|>user\\nHi", add_special_tokens=True)   # [bos, <|im_start|>, ...]

It is read with the `sentencepiece` package itself, not converted to a `tokenizers` JSON: InternVL runs
the slow (sentencepiece) tokenizer (`use_fast=False` in its examples), so SentencePiece's own encode
and decode are the reference, and the spacing rules below are Python code of that slow tokenizer and of
transformers 4.37's `PreTrainedTokenizer`, which a `tokenizers` JSON (a fixed pipeline of normalizer,
model and decoder) would have to imitate. What the reference does, and minivl with it:

* encode: the text is split at every added token (`<s>`, `<|im_start|>`, `<img>`, `<IMG_CONTEXT>`, ...:
  the `added_tokens_decoder` of tokenizer_config.json, matched whole, longest first); each piece between
  them goes through SentencePiece on its own; `add_special_tokens=True` prepends SentencePiece's BOS id
  (`add_bos_token`, True for InternLM2) and appends EOS only if `add_eos_token`.
* decode: special tokens (the four roles plus `additional_special_tokens`) are dropped with
  `skip_special_tokens`. Of those kept, "legacy" added tokens (not special, or special with an id past
  the SentencePiece vocabulary, i.e. InternVL's `<img>`... `</box>`) are their own pieces of text and all
  pieces are joined with ONE SPACE (`spaces_between_special_tokens`): `<img> <IMG_CONTEXT> </img>`.
  Within a piece, a special token in the vocabulary (`<|im_end|>`, `<s>`) gets a space before the text
  run it ends unless the previous token was special too. Every piece's text is then "cleaned up"
  (` .` -> `.`, ` ,` -> `,`, ` n't` -> `n't`, ...) unconditionally; the whole text once more only if
  `clean_up_tokenization_spaces` (False for InternLM2).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from minivl.errors import CheckpointError, GenerationError
from minivl.tokenizer import Tokenizer, check_text, decode_ids, read_tokenizer_config, token_content

# InternLM2Tokenizer.__init__'s defaults (used where tokenizer_config.json says nothing)
DEFAULT_ROLES = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>"}
# PreTrainedTokenizerBase.clean_up_tokenization (transformers 4.37), in its order
CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
            (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def clean_up_tokenization(text: str) -> str:
    """transformers' English detokenization: drop the space before punctuation and contractions."""
    for before, after in CLEAN_UP:
        text = text.replace(before, after)
    return text


class InternLM2Tokenizer(Tokenizer):
    """A SentencePiece model plus added tokens, with InternLM2Tokenizer's BOS and decode spacing.

    Same interface as `Tokenizer` (encode / decode / token_to_id / apply_chat_template / encode_chat /
    incremental_decoder), so chat, the CLI and InternVLChatModel.chat take either.
    """

    def __init__(self, sp_model, added_tokens: dict[int, str], special_tokens=(), *, add_eos_token=False,
                 clean_up_tokenization_spaces=False, **settings):
        """sp_model: a sentencepiece.SentencePieceProcessor; added_tokens: {id: text} matched whole;
        special_tokens: additional_special_tokens; settings: Tokenizer's (bos_token=, add_bos_token=, ...)."""
        self.sp_model = sp_model
        self.added_tokens = dict(sorted(added_tokens.items()))  # id -> content, matched whole in text
        self.added_ids = {content: i for i, content in self.added_tokens.items()}
        self.add_eos_token = bool(add_eos_token)
        self.clean_up_tokenization_spaces = bool(clean_up_tokenization_spaces)
        # longest first, so that a token is never cut by a shorter one that starts it
        ordered = sorted(self.added_ids, key=len, reverse=True)
        self._added_pattern = re.compile("(" + "|".join(map(re.escape, ordered)) + ")") if ordered else None
        super().__init__(None, **settings)
        # special = the four roles + additional_special_tokens; only these are dropped by skip_special_tokens
        self._special = [t for t in dict.fromkeys([self.bos_token, self.eos_token, self.unk_token,
                                                   self.pad_token, *special_tokens]) if t is not None]
        n_pieces = sp_model.get_piece_size()
        # tokens decoded as their own piece of text (transformers 4.37's "legacy added tokens")
        self._standalone = ({t for t in self.added_ids if t not in self._special}
                            | {t for t in special_tokens if (self.token_to_id(t) or 0) >= n_pieces})

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "InternLM2Tokenizer":
        """From a checkpoint directory (tokenizer.model + tokenizer_config.json) or a tokenizer.model file."""
        try:
            import sentencepiece
        except ImportError:
            raise CheckpointError("reading a SentencePiece tokenizer.model needs the sentencepiece package "
                                  "(pip install sentencepiece)") from None
        path = Path(path)
        file = path / "tokenizer.model" if path.is_dir() else path
        if not file.is_file():
            raise CheckpointError(f"no tokenizer.model at {file}; an InternLM2 checkpoint ships its "
                                  "SentencePiece model under that name")
        try:
            sp_model = sentencepiece.SentencePieceProcessor(model_file=str(file))
        except (RuntimeError, OSError) as e:  # sentencepiece: "Internal: could not parse ModelProto"
            raise CheckpointError(f"cannot read {file} as a SentencePiece model ({e}); re-download it") from None
        settings = read_tokenizer_config(file.parent)
        config_file = file.parent / "tokenizer_config.json"
        roles = {name: token_content(settings[name]) if name in settings else default
                 for name, default in DEFAULT_ROLES.items()}
        added = {int(i): token_content(t) for i, t in (settings.get("added_tokens_decoder") or {}).items()}
        special = [token_content(t) for t in settings.get("additional_special_tokens") or []]
        # every special token is an added token too (PreTrainedTokenizer.__init__ adds them): a piece of
        # the SentencePiece model keeps its id
        for token in [*roles.values(), *special]:
            if token is None or token in added.values():
                continue
            piece_id = sp_model.piece_to_id(token)
            if sp_model.id_to_piece(piece_id) != token:
                raise CheckpointError(f"{config_file} names the special token {token!r}, which is neither in its "
                                      f"added_tokens_decoder nor a piece of {file}; add it to added_tokens_decoder")
            added[piece_id] = token
        return cls(sp_model, added, special, add_bos_token=settings.get("add_bos_token", True),
                   add_eos_token=settings.get("add_eos_token", False),
                   clean_up_tokenization_spaces=settings.get("clean_up_tokenization_spaces", False),
                   default_system_message=settings.get("default_system_message"), **roles)

    # ------------------------------------------------------------------ vocabulary

    @property
    def vocab_size(self) -> int:
        """Number of ids: the SentencePiece pieces, then the added tokens past them."""
        return max([self.sp_model.get_piece_size(), *(i + 1 for i in self.added_tokens)])

    def token_to_id(self, token: str) -> int | None:
        if token in self.added_ids:
            return self.added_ids[token]
        found = self.sp_model.piece_to_id(token)
        return None if found == self.sp_model.unk_id() and token != self.sp_model.id_to_piece(found) else found

    def id_to_token(self, token_id: int) -> str | None:
        token_id = int(token_id)
        if token_id in self.added_tokens:
            return self.added_tokens[token_id]
        return self.sp_model.id_to_piece(token_id) if 0 <= token_id < self.sp_model.get_piece_size() else None

    @property
    def bos_token_id(self):
        # InternLM2Tokenizer returns SentencePiece's own BOS / EOS ids, not the role strings' ids
        return self.sp_model.bos_id() if self.sp_model.bos_id() >= 0 else None

    @property
    def eos_token_id(self):
        return self.sp_model.eos_id() if self.sp_model.eos_id() >= 0 else None

    @property
    def special_tokens(self) -> list[str]:
        """The roles and additional_special_tokens, in id order."""
        return sorted(self._special, key=lambda t: self.token_to_id(t) if self.token_to_id(t) is not None else -1)

    # ------------------------------------------------------------------ text <-> ids

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; `add_special_tokens=True` prepends BOS (and appends EOS) as the checkpoint says."""
        check_text(text, "the text to tokenize")
        chunks = self._added_pattern.split(text) if self._added_pattern else [text]
        ids = []
        for chunk in chunks:
            if chunk in self.added_ids:
                ids.append(self.added_ids[chunk])
            elif chunk:
                # each stretch between added tokens is its own SentencePiece input
                ids.extend(self.sp_model.encode(chunk))
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        if add_special_tokens and self.add_eos_token and self.eos_token_id is not None:
            ids = ids + [self.eos_token_id]
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of token ids, with the reference's spacing around added and special tokens (module docstring)."""
        ids = decode_ids(ids, self.vocab_size)
        bad = [i for i in ids if self.id_to_token(i) is None]
        if bad:
            raise GenerationError(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        special_ids = set(self.special_token_ids)
        tokens = [self.id_to_token(i) for i in ids if not (skip_special_tokens and i in special_ids)]
        texts, run = [], []
        for token in tokens:
            if token in self._standalone:
                if run and self._pieces_to_text(run):
                    texts.append(self._pieces_to_text(run))
                run = []
                texts.append(token)
            else:
                run.append(token)
        if run:
            texts.append(self._pieces_to_text(run))
        text = " ".join(texts)
        return clean_up_tokenization(text) if self.clean_up_tokenization_spaces else text

    def _pieces_to_text(self, tokens: list[str]) -> str:
        """InternLM2Tokenizer.convert_tokens_to_string: SentencePiece decodes the runs between special tokens.

        (The reference then prepends a space unless the first token is in `no_prefix_space_tokens` and
        drops the first character; that set holds ids while the test is on strings, so the space is always
        prepended and removed again: a no-op, left out here.)
        """
        out, run, previous_special = "", [], False
        for token in tokens:
            if token in self._special:
                # a space before the text run a special token closes, unless a special token precedes it
                out += ("" if previous_special else " ") + self.sp_model.decode(run) + token
                run, previous_special = [], True
            else:
                run.append(token)
                previous_special = False
        return clean_up_tokenization(out + self.sp_model.decode(run))
