"""Tiny SentencePiece tokenizers in the layout of InternLM2's (InternVL2-2B/-8B/-26B): tokenizer.model
plus a tokenizer_config.json with InternLM2's special tokens and the nine InternVL adds, no tokenizer.json.

    model = train_tiny_sentencepiece(vocab_size=1000, byte_fallback=True)    # the bytes of a tokenizer.model
    write_internlm2_tokenizer(directory, model)                               # tokenizer.model + config
    use_internlm2_tokenizer(write_tiny_internvl(tmp / "vl", llm="internlm2"))  # a tiny "InternVL2-2B"

The real model is a 92544-piece BPE (ids 0/1/2 = <unk>/<s>/</s>, InternLM2's six chat tokens as
user-defined pieces at the end, 92538..92543); InternVL appends <img> ... </box> after it (92544..92552).
The tiny one keeps that order with the chat tokens right after the control ids.
"""
from __future__ import annotations

import io
import json
import os

from minivl.tiny.internvl import INTERNVL_SPECIAL_TOKENS

# InternLM2's user-defined pieces, in their id order (92538..92543 in the real model)
INTERNLM2_SPECIAL_TOKENS = ["<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>",
                            "<|im_end|>", "<|im_start|>"]

# the training text: English, numbers, code and a few other scripts, so that merges and pieces exist for each
CORPUS = """\
Every town has a place where people go when they want to be alone without being lonely.
The quick brown fox jumps over the lazy dog. She sells sea shells by the sea shore.
In 2024 the library lent 31,415 books, 9265 maps and 358 films; 97.9% came back on time.
What is the capital of France? Paris is the capital of France, and Berlin is the capital of Germany.
Please describe the image in detail. The picture shows a red bus, two trees and a small white house.
def area(width, height):
    return width * height  # the area of a rectangle
for i in range(10):
    print(i, i ** 2)
Café, naïve, Zürich, São Paulo, Kraków, Ångström, façade, déjà vu, señor, Øresund.
你好，世界。我是一个有用的人工智能助手。今天天气很好，我们去公园散步吧。
こんにちは、世界。東京は日本の首都です。
Привет, мир. Москва — столица России.
I'm sure they're here; we've seen it, you'll see, it's fine, don't worry, isn't it?
Tabs\tand  double  spaces,   triple   spaces, and new lines

are whitespace too.
"""


def train_tiny_sentencepiece(vocab_size: int = 1000, byte_fallback: bool = True, add_dummy_prefix: bool = False,
                             corpus: str = CORPUS, extra_symbols=()) -> bytes:
    """Train a BPE SentencePiece model with InternLM2's settings on `corpus`; returns the model file's bytes.

    byte_fallback: characters outside the pieces become <0xNN> byte pieces (InternLM2: on), else <unk>.
    add_dummy_prefix: whether a space is prepended to every input (it changes decode spacing).
    Takes about a second.
    """
    import sentencepiece

    model = io.BytesIO()
    lines = [line for line in corpus.split("\n") if line.strip()]
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines * 20), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        hard_vocab_limit=False, character_coverage=1.0, byte_fallback=byte_fallback, split_digits=True,
        add_dummy_prefix=add_dummy_prefix, remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        user_defined_symbols=INTERNLM2_SPECIAL_TOKENS + list(extra_symbols), num_threads=1,
        minloglevel=2)
    return model.getvalue()


def internlm2_tokenizer_config(model: bytes) -> dict:
    """tokenizer_config.json of an InternVL2-2B-style checkpoint for the SentencePiece `model`."""
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_proto=model)
    n_pieces = processor.get_piece_size()
    ids = {token: processor.piece_to_id(token) for token in ["<unk>", "<s>", "</s>", *INTERNLM2_SPECIAL_TOKENS]}
    ids.update({token: n_pieces + k for k, token in enumerate(INTERNVL_SPECIAL_TOKENS)})

    def entry(token):
        return {"content": token, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                "special": True}

    return {
        "add_bos_token": True, "add_eos_token": False,
        "added_tokens_decoder": {str(i): entry(token) for token, i in sorted(ids.items(), key=lambda kv: kv[1])},
        "additional_special_tokens": INTERNLM2_SPECIAL_TOKENS + INTERNVL_SPECIAL_TOKENS,
        "bos_token": "<s>", "clean_up_tokenization_spaces": False, "eos_token": "</s>",
        "model_max_length": 8192, "pad_token": "</s>", "tokenizer_class": "InternLM2Tokenizer",
        "unk_token": "<unk>",
    }


def write_internlm2_tokenizer(directory, model: bytes | None = None) -> str:
    """tokenizer.model (`model`, else a freshly trained tiny one) + tokenizer_config.json into directory."""
    model = model if model is not None else train_tiny_sentencepiece()
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "tokenizer.model"), "wb") as f:
        f.write(model)
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(internlm2_tokenizer_config(model), f, indent=2, ensure_ascii=False)
    return os.fspath(directory)


def use_internlm2_tokenizer(directory) -> str:
    """Give a tiny InternLM2 checkpoint (minivl.tiny) InternLM2's tokenizer files instead of its tokenizer.json.

    The SentencePiece model is sized to the checkpoint's vocabulary (its pieces + InternVL's nine tokens
    fit the embedding) and has no byte fallback (256 byte pieces would not fit); the special-token ids
    match the tiny config (<unk> 0, <s> 1, </s> 2).
    """
    from minivl.config import load_config

    config = load_config(directory)
    llm_config = getattr(config, "llm_config", config)
    model = train_tiny_sentencepiece(vocab_size=llm_config.vocab_size - len(INTERNVL_SPECIAL_TOKENS),
                                     byte_fallback=False)
    tokenizer_json = os.path.join(directory, "tokenizer.json")
    if os.path.exists(tokenizer_json):
        os.remove(tokenizer_json)
    return write_internlm2_tokenizer(directory, model)
