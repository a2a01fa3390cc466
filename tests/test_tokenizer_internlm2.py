"""minivl.tokenizer_internlm2: InternLM2's SentencePiece tokenizer, against the reference tokenizer code.

The reference (ReferenceInternLM2Tokenizer below) is InternLM2Tokenizer from InternVL2-2B's
`tokenization_internlm2.py` (the copy in InternVL's and InternLM's repositories), written out together
with the parts of transformers 4.37's slow `PreTrainedTokenizer` it runs on (InternVL pins 4.37.2):
`tokenize` (split at added tokens with transformers' own `Trie`, SentencePiece on the rest),
`convert_ids_to_tokens`, `_decode` (legacy added tokens, `spaces_between_special_tokens=True`) and
`clean_up_tokenization` (transformers' own). transformers 5's slow tokenizer base is not used: its
decode differs from 4.37's. The AddedToken flags of InternVL2-2B's tokenizer_config (lstrip, rstrip,
single_word all False) make 4.37's strip handling a no-op, so it is left out.

The SentencePiece models are trained here (minivl.tiny.sentencepiece, about a second each) with
InternLM2's settings and special tokens, with and without a dummy prefix (which moves decode spaces).
Tokenization is discrete: ids and text must be identical.
"""
import json

import pytest
import sentencepiece as spm  # a dependency of minivl (pyproject.toml): missing means a broken install, not a skip

from minivl.conversation import get_conv_template, image_tokens
from minivl.errors import CheckpointError, GenerationError
from minivl.tiny.internvl import INTERNVL_SPECIAL_TOKENS
from minivl.tiny.sentencepiece import INTERNLM2_SPECIAL_TOKENS, train_tiny_sentencepiece, write_internlm2_tokenizer
from minivl.tokenizer import TOKENIZER_FILES, load_tokenizer
from minivl.tokenizer_internlm2 import InternLM2Tokenizer


class ReferenceInternLM2Tokenizer:
    """tokenization_internlm2.InternLM2Tokenizer on transformers 4.37's PreTrainedTokenizer, written out."""

    def __init__(self, vocab_file, config: dict):
        from transformers.tokenization_python import Trie

        self.sp_model = spm.SentencePieceProcessor()
        self.sp_model.Load(vocab_file)
        self.add_bos_token = config.get("add_bos_token", True)
        self.add_eos_token = config.get("add_eos_token", False)
        self.clean_up_tokenization_spaces = config.get("clean_up_tokenization_spaces", False)
        self._added_tokens_decoder = {int(i): t["content"] for i, t in config["added_tokens_decoder"].items()}
        self._added_tokens_encoder = {t: i for i, t in self._added_tokens_decoder.items()}
        self.additional_special_tokens = list(config["additional_special_tokens"])
        self.all_special_tokens = list(dict.fromkeys(
            [config["bos_token"], config["eos_token"], config["unk_token"], config["pad_token"]]
            + self.additional_special_tokens))
        self.all_special_ids = [self.convert_tokens_to_ids(t) for t in self.all_special_tokens]
        self.tokens_trie = Trie()
        for token in self._added_tokens_decoder.values():
            self.tokens_trie.add(token)
        self._no_prefix_space_tokens = None

    # --- InternLM2Tokenizer
    @property
    def vocab_size(self):
        return self.sp_model.get_piece_size()

    @property
    def bos_token_id(self):
        return self.sp_model.bos_id()

    @property
    def eos_token_id(self):
        return self.sp_model.eos_id()

    @property
    def no_prefix_space_tokens(self):
        if self._no_prefix_space_tokens is None:
            vocab = self.convert_ids_to_tokens(list(range(self.vocab_size)))
            self._no_prefix_space_tokens = {i for i, tok in enumerate(vocab) if not tok.startswith("▁")}
        return self._no_prefix_space_tokens

    def _tokenize(self, text):
        return self.sp_model.encode(text, out_type=str)

    def _convert_token_to_id(self, token):
        return self.sp_model.piece_to_id(token)

    def _convert_id_to_token(self, index):
        return self.sp_model.IdToPiece(index)

    def _maybe_add_prefix_space(self, tokens, decoded):
        if tokens and tokens[0] not in self.no_prefix_space_tokens:
            return " " + decoded
        return decoded

    def convert_tokens_to_string(self, tokens):
        current_sub_tokens = []
        out_string = ""
        prev_is_special = False
        for token in tokens:
            if token in self.all_special_tokens:
                if not prev_is_special:
                    out_string += " "
                out_string += self.sp_model.decode(current_sub_tokens) + token
                prev_is_special = True
                current_sub_tokens = []
            else:
                current_sub_tokens.append(token)
                prev_is_special = False
        out_string += self.sp_model.decode(current_sub_tokens)
        out_string = self.clean_up_tokenization(out_string)
        out_string = self._maybe_add_prefix_space(tokens=tokens, decoded=out_string)
        return out_string[1:]

    def build_inputs_with_special_tokens(self, token_ids_0):
        bos_token_ids = [self.bos_token_id] if self.add_bos_token else []
        output = bos_token_ids + token_ids_0
        if self.add_eos_token:
            output = output + [self.eos_token_id]
        return output

    # --- transformers 4.37 PreTrainedTokenizer / PreTrainedTokenizerBase
    @staticmethod
    def clean_up_tokenization(out_string):
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase

        return PreTrainedTokenizerBase.clean_up_tokenization(None, out_string)

    def tokenize(self, text):
        tokens = self.tokens_trie.split(text)
        tokenized_text = []
        for token in tokens:
            if not token:
                continue
            if token in self._added_tokens_encoder:
                tokenized_text.append(token)
            else:
                tokenized_text.extend(self._tokenize(token))
        return tokenized_text

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            return self._added_tokens_encoder.get(tokens, None) if tokens in self._added_tokens_encoder \
                else self._convert_token_to_id(tokens)
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids, skip_special_tokens=False):
        tokens = []
        for index in ids:
            index = int(index)
            if skip_special_tokens and index in self.all_special_ids:
                continue
            if index in self._added_tokens_decoder:
                tokens.append(self._added_tokens_decoder[index])
            else:
                tokens.append(self._convert_id_to_token(index))
        return tokens

    def encode(self, text, add_special_tokens=True):
        ids = self.convert_tokens_to_ids(self.tokenize(text))
        return self.build_inputs_with_special_tokens(ids) if add_special_tokens else ids

    def decode(self, token_ids, skip_special_tokens=False, spaces_between_special_tokens=True):
        filtered_tokens = self.convert_ids_to_tokens(token_ids, skip_special_tokens=skip_special_tokens)
        legacy_added_tokens = set(self._added_tokens_encoder.keys()) - set(self.all_special_tokens) | {
            token for token in self.additional_special_tokens if self.convert_tokens_to_ids(token) >= self.vocab_size
        }
        sub_texts = []
        current_sub_text = []
        for token in filtered_tokens:
            if skip_special_tokens and token in self.all_special_ids:
                continue
            if token in legacy_added_tokens:
                if current_sub_text:
                    string = self.convert_tokens_to_string(current_sub_text)
                    if len(string) > 0:
                        sub_texts.append(string)
                    current_sub_text = []
                sub_texts.append(token)
            else:
                current_sub_text.append(token)
        if current_sub_text:
            sub_texts.append(self.convert_tokens_to_string(current_sub_text))
        text = " ".join(sub_texts) if spaces_between_special_tokens else "".join(sub_texts)
        return self.clean_up_tokenization(text) if self.clean_up_tokenization_spaces else text


# ----------------------------------------------------------------------------- fixtures

FLAVOURS = {  # name -> train_tiny_sentencepiece settings
    "byte_fallback": dict(vocab_size=1000, byte_fallback=True, add_dummy_prefix=False),
    "dummy_prefix": dict(vocab_size=1000, byte_fallback=True, add_dummy_prefix=True),
    "no_byte_fallback": dict(vocab_size=400, byte_fallback=False, add_dummy_prefix=False),
}


@pytest.fixture(scope="module", params=sorted(FLAVOURS))
def pair(request, tmp_path_factory):
    """(minivl's InternLM2Tokenizer, the reference) on one freshly trained tokenizer.model."""
    directory = write_internlm2_tokenizer(tmp_path_factory.mktemp(request.param),
                                          train_tiny_sentencepiece(**FLAVOURS[request.param]))
    config = json.loads(open(f"{directory}/tokenizer_config.json", encoding="utf-8").read())
    return InternLM2Tokenizer.from_file(directory), ReferenceInternLM2Tokenizer(f"{directory}/tokenizer.model",
                                                                                  config)


def chat_prompt(template_name, question, answer=None, system=None):
    """A prompt as InternVLChatModel.chat builds it (minivl.conversation's templates)."""
    template = get_conv_template(template_name)
    if system is not None:
        template.system_message = system
    template.append_message(template.roles[0], question)
    template.append_message(template.roles[1], answer)
    return template.get_prompt()


SAMPLES = [
    "What is the capital of France?",
    "Hello world",
    " leading space, and  two  spaces, and   three",
    "trailing spaces   ",
    "\n\nnew lines\tand\ttabs\n",
    "In 2024, 3.14159 and 1,000,000 were numbers; 0123456789",
    "Café, naïve, Zürich — “quoted” text… an emoji 😀 and 日本語, 你好，世界。",
    "I'm sure they're here; we've seen it, don't worry , isn't it ? yes !",
    "def f(x):\n    return x ** 2  # code\n",
    "Ωmega ∑ unknown ☃ characters ⚙",
    "<s>text after a bos</s><unk>",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<|plugin|><|interpreter|><|action_start|>call<|action_end|>",
    "a<img></img>b <quad>1</quad> <ref>x</ref><box>[[1, 2]]</box>",
    "<IMG_CONTEXT>",
    "",
    "   ",
]


def prompts():
    images = image_tokens(256, 1)  # InternVL2's 448 px tile: 256 <IMG_CONTEXT> between <img> and </img>
    return [
        chat_prompt("internlm2-chat", "<image>\nDescribe the image.").replace("<image>", images, 1),
        chat_prompt("internlm2-chat", "Hi", answer="Hello! How can I help you today?"),
        chat_prompt("Hermes-2", "What is 2+2?", system="You are brief."),
        chat_prompt("internvl2_5", "Frame1: " + image_tokens(256, 2) + "\nWhat changed?"),
        image_tokens(256, 3),
    ]


# ----------------------------------------------------------------------------- encode

@pytest.mark.parametrize("text", SAMPLES)
@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_the_reference(pair, text, add_special_tokens):
    ours, reference = pair
    assert ours.encode(text, add_special_tokens=add_special_tokens) == \
        reference.encode(text, add_special_tokens=add_special_tokens)


@pytest.mark.parametrize("index", range(5))
def test_chat_prompts_and_image_context_runs_match_the_reference(pair, index):
    ours, reference = pair
    text = prompts()[index]
    ids = ours.encode(text, add_special_tokens=True)
    assert ids == reference.encode(text, add_special_tokens=True)
    context = ours.token_to_id("<IMG_CONTEXT>")
    # every <IMG_CONTEXT> is one id, never merged or split: 256 per tile
    assert ids.count(context) == text.count("<IMG_CONTEXT>") and ids.count(context) % 256 == 0
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip)


def test_bos_and_special_token_ids(pair):
    ours, reference = pair
    assert ours.bos_token_id == reference.bos_token_id == 1 and ours.eos_token_id == reference.eos_token_id == 2
    assert ours.encode("Hi", add_special_tokens=True)[0] == 1
    assert ours.encode("Hi")[:1] != [1]
    n_pieces = reference.vocab_size
    # InternLM2's chat tokens are pieces of the model; InternVL's nine follow the last piece
    for k, token in enumerate(INTERNVL_SPECIAL_TOKENS):
        assert ours.token_to_id(token) == reference.convert_tokens_to_ids(token) == n_pieces + k
    for token in INTERNLM2_SPECIAL_TOKENS + ["<s>", "</s>", "<unk>"]:
        assert ours.token_to_id(token) == reference.convert_tokens_to_ids(token) < n_pieces
    assert len(ours) == n_pieces + len(INTERNVL_SPECIAL_TOKENS)
    assert ours.token_to_id("no such piece") is None
    assert set(ours.stop_token_ids) == {ours.token_to_id("</s>"), ours.token_to_id("<|im_end|>")}


# ----------------------------------------------------------------------------- decode

@pytest.mark.parametrize("text", SAMPLES)
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_decode_matches_the_reference(pair, text, skip_special_tokens):
    ours, reference = pair
    ids = reference.encode(text, add_special_tokens=True)
    assert ours.decode(ids, skip_special_tokens) == reference.decode(ids, skip_special_tokens=skip_special_tokens)


def test_decode_of_single_and_odd_id_sequences_matches_the_reference(pair):
    ours, reference = pair
    n = len(ours)
    sequences = [[i] for i in range(n)]                      # every id alone
    sequences += [list(range(k, min(n, k + 7))) for k in range(0, n, 5)]   # overlapping windows
    sequences += [[n - 1, 7, n - 2, 8, 1, 1, 2], [8, 8, 7, 7], [n - 3] * 4, []]
    for ids in sequences:
        for skip in (True, False):
            assert ours.decode(ids, skip) == reference.decode(ids, skip_special_tokens=skip), ids


def test_decode_spacing_of_the_reference_is_kept(pair):
    # the reference's own quirks, which minivl keeps: spaces between InternVL's tokens, a space before the
    # text run that a special token closes, and " ," / " ." cleaned up even with clean_up_tokenization_spaces off
    ours, _ = pair
    ids = ours.encode("<img><IMG_CONTEXT><IMG_CONTEXT></img>")
    assert ours.decode(ids, skip_special_tokens=False) == "<img> <IMG_CONTEXT> <IMG_CONTEXT> </img>"
    assert ours.decode(ours.encode("the<|im_end|>"), skip_special_tokens=False).endswith("the<|im_end|>")
    assert ours.decode(ours.encode("the<|im_end|>"), skip_special_tokens=False).startswith(" ")
    assert ours.decode(ours.encode("yes , no .")) == "yes, no."


def test_streaming_equals_the_full_decode(pair):
    ours, _ = pair
    for text in SAMPLES[:10]:
        ids = ours.encode(text)
        decoder = ours.incremental_decoder()
        pieces = [decoder.add(i) for i in ids]
        assert all("\ufffd" not in p for p in pieces)
        assert "".join(pieces) + decoder.flush() == ours.decode(ids)


def test_added_tokens_missing_from_additional_special_tokens_follow_the_reference(tmp_path):
    # added (added_tokens_decoder) but not listed as additional_special_tokens: not skipped by
    # skip_special_tokens, decoded as their own piece of text; the reference decides this by the list
    directory = write_internlm2_tokenizer(tmp_path, train_tiny_sentencepiece(vocab_size=1000))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["additional_special_tokens"] = INTERNLM2_SPECIAL_TOKENS[4:]      # only <|im_end|>, <|im_start|>
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    ours = InternLM2Tokenizer.from_file(directory)
    reference = ReferenceInternLM2Tokenizer(f"{directory}/tokenizer.model", config)
    for text in SAMPLES + prompts():
        ids = reference.encode(text, add_special_tokens=True)
        assert ours.encode(text, add_special_tokens=True) == ids
        for skip in (True, False):
            assert ours.decode(ids, skip) == reference.decode(ids, skip_special_tokens=skip), text
    assert "<img>" in ours.decode(ours.encode("a<img>b"), skip_special_tokens=True)


# ----------------------------------------------------------------------------- files and errors

def test_load_tokenizer_picks_the_file_and_names_both_when_neither_exists(tmp_path):
    write_internlm2_tokenizer(tmp_path / "sp", train_tiny_sentencepiece(vocab_size=400, byte_fallback=False))
    assert isinstance(load_tokenizer(tmp_path / "sp"), InternLM2Tokenizer)
    assert TOKENIZER_FILES == ("tokenizer.json", "tokenizer.model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"no tokenizer.*tokenizer\.json.*tokenizer\.model"):
        load_tokenizer(tmp_path / "empty")


def test_bad_files_raise_named_errors(tmp_path, pair):
    (tmp_path / "tokenizer.model").write_bytes(b"\x00 not a sentencepiece model")
    with pytest.raises(CheckpointError, match="cannot read .*tokenizer.model as a SentencePiece model"):
        InternLM2Tokenizer.from_file(tmp_path)
    with pytest.raises(CheckpointError, match="no tokenizer.model"):
        InternLM2Tokenizer.from_file(tmp_path / "missing")
    good = write_internlm2_tokenizer(tmp_path / "good", train_tiny_sentencepiece(vocab_size=400, byte_fallback=False))
    config = json.loads(open(f"{good}/tokenizer_config.json").read())
    config["additional_special_tokens"].append("<not-a-piece>")
    open(f"{good}/tokenizer_config.json", "w").write(json.dumps(config))
    with pytest.raises(CheckpointError, match="'<not-a-piece>'.*neither in its added_tokens_decoder"):
        InternLM2Tokenizer.from_file(good)
    ours, _ = pair
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        ours.decode([len(ours)])
    with pytest.raises(GenerationError, match="takes a str"):
        ours.encode(None)


# ----------------------------------------------------------------------------- a chat through the CLI

def test_cli_chat_with_an_internlm2_tokenizer_checkpoint(tmp_path, capsys):
    """`minivl chat --model-dir` on a tiny InternVL2-2B-like checkpoint with only tokenizer.model: the answer
    is the one InternVLChatModel.chat gives with the REFERENCE tokenizer (prompt ids and decode alike)."""
    import numpy as np
    from PIL import Image

    import minivl
    from minivl.preprocess import load_image
    from minivl.tiny.internvl import write_tiny_internvl
    from minivl.tiny.sentencepiece import use_internlm2_tokenizer
    from minivl_cli.cli import main

    directory = use_internlm2_tokenizer(write_tiny_internvl(tmp_path / "vl2b", llm="internlm2", seed=5))
    assert not (tmp_path / "vl2b" / "tokenizer.json").exists()
    config = json.loads((tmp_path / "vl2b" / "tokenizer_config.json").read_text(encoding="utf-8"))
    reference = ReferenceInternLM2Tokenizer(f"{directory}/tokenizer.model", config)
    picture = tmp_path / "picture.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (6, 10, 3), dtype=np.uint8)).resize(
        (100, 60), Image.BICUBIC).save(picture)
    model = minivl.load_model(directory, "float64")
    for image in (None, str(picture)):
        pixel_values = None if image is None else load_image(image, max_num=12, image_size=56)[0]
        question = "What is in the picture?" if image is None else "<image>\nWhat is in the picture?"
        expected = model.chat(reference, pixel_values, question, dict(max_new_tokens=12, do_sample=False))
        assert expected, "the tiny model should say something for the comparison to mean anything"
        argv = ["chat", "--model-dir", directory, "--dtype", "float64", "--max-new-tokens", "12"]
        assert main(argv + (["--image", image] if image else []) + ["What is in the picture?"]) == 0
        out = capsys.readouterr().out
        assert out == expected + "\n"


def test_cli_text_chat_with_an_internlm2_llm_and_tokenizer_model(tmp_path, capsys):
    """`minivl chat --model-dir` on a tiny InternLM2 LLM with only tokenizer.model: ChatML after a BOS (as
    InternLM2's chat template), the streamed reply = the reference's decode of the greedy tokens."""
    import numpy as np

    import minivl
    from minivl.generate import generate
    from minivl.tiny.llm import write_tiny_llm
    from minivl.tiny.sentencepiece import use_internlm2_tokenizer
    from minivl_cli.cli import main

    directory = use_internlm2_tokenizer(write_tiny_llm(tmp_path / "internlm2", "internlm2", seed=3,
                                                       max_position_embeddings=128))
    config = json.loads((tmp_path / "internlm2" / "tokenizer_config.json").read_text(encoding="utf-8"))
    reference = ReferenceInternLM2Tokenizer(f"{directory}/tokenizer.model", config)
    prompt = reference.encode("<|im_start|>user\nthe weather in paris<|im_end|>\n<|im_start|>assistant\n")
    assert prompt[0] == reference.bos_token_id
    stops = [reference.eos_token_id, reference.convert_tokens_to_ids("<|im_end|>")]
    new = generate(minivl.load_model(directory, "float64"), input_ids=np.asarray([prompt]), max_new_tokens=10,
                   eos_token_id=stops)[0].tolist()
    new = new[:next((k for k, t in enumerate(new) if t in stops), len(new))]
    expected = reference.decode(new, skip_special_tokens=True)
    assert expected.strip(), "the tiny model should say something for the comparison to mean anything"
    assert main(["chat", "--model-dir", directory, "--dtype", "float64", "--max-new-tokens", "10",
                 "the weather in paris"]) == 0
    assert capsys.readouterr().out == expected + "\n"
