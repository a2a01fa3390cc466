"""minivl.tokenizer: the SmolLM2 tokenizer built from the GGUF's metadata, against independent references.

References: (1) a plain-Python byte-level BPE written here from the GGUF's vocabulary and ranked merges
with llama.cpp's 'smollm' pre-tokenizer rule (digits split, then GPT-2's regex) - not the `tokenizers`
package; (2) the GGUF's own Jinja chat template rendered by jinja2. Both are exact: ids and text must
be identical, not close.
"""
import json
import re as _re

import pytest

from minivl.errors import CheckpointError, GenerationError
from minivl.tokenizer import SMOLLM2_SYSTEM_MESSAGE, Tokenizer

regex = pytest.importorskip("regex", reason="the reference pre-tokenizer needs \\p{L}/\\p{N} classes (pip install regex)")


def _gguf_path():
    from minivl.errors import WeightsNotFoundError
    from minivl.weights.smollm2 import find_gguf

    try:
        return find_gguf()
    except WeightsNotFoundError as e:
        pytest.skip(f"real weights not installed: {e}")


@pytest.fixture(scope="module")
def gguf_reader():
    from minivl.weights.smollm2 import read_gguf

    return read_gguf(_gguf_path())


@pytest.fixture(scope="module")
def tokenizer(gguf_reader, tmp_path_factory):
    """The Tokenizer as a converted checkpoint directory holds it (tokenizer.json + tokenizer_config.json)."""
    from minivl.weights.smollm2 import gguf_tokenizer, tokenizer_config

    directory = tmp_path_factory.mktemp("smollm2_tokenizer")
    gguf_tokenizer(gguf_reader).save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(gguf_reader)))
    return Tokenizer.from_file(directory)


# ----------------------------------------------------------------------------- an independent BPE


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (Radford et al., 2019)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class ReferenceBPE:
    """Textbook byte-level BPE with llama.cpp's 'smollm' pre-tokenization, from GGUF metadata only."""

    GPT2_SPLIT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
    DIGIT = regex.compile(r"\p{N}")

    def __init__(self, reader):
        from minivl.weights.smollm2 import _field

        self.tokens = list(_field(reader, "tokenizer.ggml.tokens"))
        self.ids = {t: i for i, t in enumerate(self.tokens)}
        self.ranks = {tuple(m.split(" ")): r for r, m in enumerate(_field(reader, "tokenizer.ggml.merges"))}
        types = list(_field(reader, "tokenizer.ggml.token_type"))
        self.special = [t for t, k in zip(self.tokens, types) if k == 3]
        self.byte_char = _bytes_to_unicode()

    def _split(self, text):
        # llama.cpp applies the regexes in sequence: \p{N} isolates every digit, then GPT-2's
        # regex splits each remaining span (unmatched spans are kept as pieces, not dropped)
        pieces, pos = [], 0
        for m in self.DIGIT.finditer(text):
            if m.start() > pos:
                pieces.append(text[pos:m.start()])
            pieces.append(m.group())
            pos = m.end()
        if pos < len(text):
            pieces.append(text[pos:])
        return [w for piece in pieces for w in self.GPT2_SPLIT.findall(piece)]

    def _bpe(self, word):
        symbols = [self.byte_char[b] for b in word.encode("utf-8")]
        while len(symbols) > 1:
            pairs = [(self.ranks.get(p, float("inf")), i, p) for i, p in enumerate(zip(symbols, symbols[1:]))]
            rank, _, best = min(pairs)
            if rank == float("inf"):
                break
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return [self.ids[s] for s in symbols]

    def encode(self, text):
        pattern = "(" + "|".join(_re.escape(s) for s in self.special) + ")"
        ids = []
        for chunk in _re.split(pattern, text):
            if chunk in self.special:
                ids.append(self.ids[chunk])
            elif chunk:
                for word in self._split(chunk):
                    ids.extend(self._bpe(word))
        return ids


SAMPLES = [
    "What is the capital of France?",
    "The quick brown fox jumps over the lazy dog.",
    "In 2024, 3.14159 and 1,000,000 were numbers; x  1 has two spaces.",  # digits one by one
    "Café, naïve, Zürich — “quoted” text… and an emoji 😀 and 日本語.",  # multi-byte UTF-8
    "  leading spaces\n\nnew lines\tand tabs   trailing   ",
    "don't, we'll, they're, I'm, you've, it'd",
    "def f(x):\n    return x ** 2  # code\n",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",  # special tokens matched whole
]


@pytest.fixture(scope="module")
def reference_bpe(gguf_reader):
    return ReferenceBPE(gguf_reader)


@pytest.mark.realweights
@pytest.mark.parametrize("text", SAMPLES)
def test_encode_matches_reference_bpe(tokenizer, reference_bpe, text):
    # exact: tokenization is discrete, any difference is a bug
    assert tokenizer.encode(text) == reference_bpe.encode(text)


@pytest.mark.realweights
@pytest.mark.parametrize("text", SAMPLES)
def test_decode_round_trip(tokenizer, text):
    # byte-level BPE is lossless: decode(encode(t)) == t when special tokens are kept
    assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=False) == text


@pytest.mark.realweights
def test_digits_are_split_one_by_one(tokenizer, reference_bpe):
    # llama.cpp's 'smollm' pre-tokenizer: every digit its own piece. Without the Digits step
    # "x  1" would keep the space pair apart from the digit differently (GPT-2's \s+(?!\S) rule).
    ids = tokenizer.encode("12345")
    assert [tokenizer.id_to_token(i) for i in ids] == list("12345")
    assert tokenizer.encode("x  1") == reference_bpe.encode("x  1")


@pytest.mark.realweights
def test_special_tokens_are_the_gguf_control_tokens(tokenizer, gguf_reader):
    from minivl.weights.smollm2 import _field

    tokens = list(_field(gguf_reader, "tokenizer.ggml.tokens"))
    types = list(_field(gguf_reader, "tokenizer.ggml.token_type"))
    control = [t for t, k in zip(tokens, types) if k == 3]
    assert tokenizer.special_tokens == control and len(control) == 17
    for token in control:
        # each one is a single id equal to its GGUF position, and decodes back to itself
        assert tokenizer.encode(token) == [tokens.index(token)]
        assert tokenizer.decode([tokens.index(token)], skip_special_tokens=False) == token
        assert tokenizer.decode([tokens.index(token)]) == ""
    assert (tokenizer.token_to_id("<|endoftext|>"), tokenizer.token_to_id("<|im_start|>"),
            tokenizer.token_to_id("<|im_end|>")) == (0, 1, 2)
    assert tokenizer.vocab_size == len(tokens) == 49152
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert tokenizer.bos_token_id == 1 and tokenizer.pad_token_id == 2 and tokenizer.unk_token_id == 0
    assert 2 in tokenizer.stop_token_ids


@pytest.mark.realweights
def test_no_bos_is_added(tokenizer):
    # tokenizer.ggml.add_bos_token is False: SmolLM2 prompts start with the ChatML <|im_start|> itself
    assert tokenizer.encode("Hello", add_special_tokens=True) == tokenizer.encode("Hello")
    assert tokenizer.encode("Hello")[0] != tokenizer.bos_token_id


CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke."}],
]


@pytest.mark.realweights
@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_the_gguf_jinja_template(tokenizer, gguf_reader, messages, add_generation_prompt):
    jinja2 = pytest.importorskip("jinja2", reason="the reference renders the GGUF's Jinja chat template")
    from minivl.weights.smollm2 import _field

    template = jinja2.Environment().from_string(_field(gguf_reader, "tokenizer.chat_template"))
    expected = template.render(messages=messages, add_generation_prompt=add_generation_prompt)
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


@pytest.mark.realweights
def test_chat_template_default_system_message(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text == (f"<|im_start|>system\n{SMOLLM2_SYSTEM_MESSAGE}<|im_end|>\n"
                    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.encode_chat([{"role": "user", "content": "Hi"}]) == tokenizer.encode(text)
    custom = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], system_message="Be brief.")
    assert custom.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


@pytest.mark.realweights
def test_incremental_decoder_never_splits_a_character(tokenizer):
    text = "Zürich 😀 日本語 naïve — ok"
    ids = tokenizer.encode(text)
    # the emoji and the CJK characters span several byte-level tokens: a naive per-token decode breaks them
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    decoder = tokenizer.incremental_decoder()
    pieces = [decoder.add(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + decoder.flush() == text


@pytest.mark.realweights
def test_bad_inputs_raise_named_errors(tokenizer, tmp_path):
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        tokenizer.decode([49152])
    with pytest.raises(GenerationError, match="role"):
        tokenizer.apply_chat_template([{"content": "no role"}])
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        Tokenizer.from_file(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read"):
        Tokenizer.from_file(tmp_path)


def test_a_malformed_tokenizer_config_is_a_named_error(tmp_path):
    """tokenizer_config.json that is not JSON: a CheckpointError naming the file, as for InternLM2's tokenizer."""
    from minivl.tiny.internvl import write_tiny_tokenizer

    write_tiny_tokenizer(tmp_path)
    assert Tokenizer.from_file(tmp_path).bos_token is None  # the tiny qwen2 tokenizer reads as it should
    (tmp_path / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match=r"tokenizer_config.json is not valid JSON .*re-download it"):
        Tokenizer.from_file(tmp_path)
